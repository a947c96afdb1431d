//! x86-64 SIMD kernels for the int8-table product (layout in [`super::int8`]).
//!
//! ## AVX-512 VBMI + VNNI (`tile_avx512`)
//! Eight rows at a time, one 64-bit sign word (16 groups of four columns) per step:
//! * a gather puts the eight rows' sign words in the eight qwords of a zmm register;
//! * `vpmultishiftqb` cuts each qword into eight bytes holding the nibbles of groups
//!   `q = 0..8` (then `8..16`), and a ternary-logic op keeps the nibble and ORs in `q << 4`:
//!   byte `8p + q` becomes the 7-bit index of row `p`'s entry in the 128-byte table of
//!   groups 0..8 (two zmm registers);
//! * `vpermi2b` looks up all 64 (row, group) entries in one instruction, and `vpdpbusd`
//!   against a vector of ones adds each row's four neighbouring bytes into int32 lanes.
//!
//! So per (8 rows, 64 columns, rank) the kernel spends 2 permutes, 2 dot-product adds and one
//! convert + FMA for the word's scale: the sign bits are loaded and unpacked once per word for
//! all `k` ranks and all batch items, and nothing is widened by hand.

use super::int8::{
    group_range, GroupScale, TableBuild, TileInput, GROUPS, SCALE_WORDS, SPLIT_WEIGHT, TABLE_BYTES,
};
use crate::block::FactorRef;
use std::arch::x86_64::*;

/// Whether [`tile_avx512`] can run on this CPU.
pub(super) fn avx512_available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512vbmi")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}

/// Rows `row0..row0 + nrows` of the product into `yt` (`nrows × batch`, accumulated), in
/// tiles of `SUB` sub-tiles of eight rows.
///
/// Loop order, innermost last: tile → level → item → block of words sharing a scale →
/// rank → word → sub-tile. The sign words of a block are unpacked once into index vectors
/// (kept in L1), then each rank's tables are loaded once per word and used by all `SUB`
/// sub-tiles, whose int32 sums stay in registers: the table traffic per lookup falls with
/// `SUB` (it, not the permutes, bounds a one-sub-tile loop once tables leave L1).
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VBMI and VNNI ([`avx512_available`]); `inp` must
/// describe consistent buffers (checked by the caller) and `row0 + nrows <= inp.rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni")]
pub(super) unsafe fn tile_avx512<const SUB: usize, const SPLIT: bool>(
    inp: &TileInput<'_>,
    row0: usize,
    nrows: usize,
    yt: &mut [f32],
) {
    let rank = inp.rank;
    let words = inp.words;
    debug_assert!(rank <= 64 && row0 + nrows <= inp.rows && nrows > 0 && SUB <= 8);
    // Byte j of every qword selects bits 4j.. (groups 0..8) or 32 + 4j.. (groups 8..16).
    let shift_lo = _mm512_set1_epi64(0x1c18_1410_0c08_0400);
    let shift_hi = _mm512_set1_epi64(0x3c38_3430_2c28_2420);
    let nib = _mm512_set1_epi8(0x0f);
    let qtag = _mm512_set1_epi64(0x7060_5040_3020_1000);
    let ones = _mm512_set1_epi8(1);
    let w_hi = _mm512_set1_epi8(SPLIT_WEIGHT as u8 as i8);
    let stride = if SPLIT { 2 * TABLE_BYTES } else { TABLE_BYTES };
    let unit = if SPLIT {
        1.0 / SPLIT_WEIGHT as f32
    } else {
        1.0
    };
    // Every entry below is written before it is read: zeroing these 48 KiB per call showed
    // up as memset in decode profiles.
    let mut accf = std::mem::MaybeUninit::<[[__m512; SUB]; 64]>::uninit();
    let accf = &mut *accf.as_mut_ptr();
    let mut idx = std::mem::MaybeUninit::<[[[__m512i; 2]; SUB]; SCALE_WORDS]>::uninit();
    let idx = &mut *idx.as_mut_ptr();
    let mut a = std::mem::MaybeUninit::<[f32; 64 * 64]>::uninit();
    let a = &mut *a.as_mut_ptr();
    let mut tile = 0;
    while tile < nrows {
        let n = (nrows - tile).min(8 * SUB);
        // Rows past the tile repeat its last row (valid memory); their sums are discarded.
        let last = row0 + tile + n - 1;
        let row_off: [[usize; 8]; SUB] = std::array::from_fn(|s| {
            std::array::from_fn(|p| (row0 + tile + 8 * s + p).min(last) * words)
        });
        for (l, blk) in inp.blocks.iter().enumerate() {
            let sign_words = blk.signs.words();
            debug_assert_eq!(sign_words.len(), inp.rows * words);
            // The blocks live in a memory map and are read once per token, so they come from
            // DRAM; a 64-row tile's rows of one level are only ~6 KB, too short for the
            // hardware prefetchers to ramp up (they stop at 4 KiB pages). Fetch the next
            // level's rows of this tile (or the next tile's first level) while this one
            // computes: `perf` put a fifth of the tile's time on those misses.
            match inp.blocks.get(l + 1) {
                Some(next) => prefetch_rows(next, row0 + tile, n, words, rank),
                None if row0 + tile + n < inp.rows => {
                    let m = (inp.rows - row0 - tile - n).min(8 * SUB);
                    prefetch_rows(&inp.blocks[0], row0 + tile + n, m, words, rank);
                }
                None => {}
            }
            // The tile's factor rows, widened once: a[q·rank + r] for tile row q (int8
            // factors: the raw codes, their scales are folded into the tables).
            let (fa, fb) = ((row0 + tile) * rank, (row0 + tile + n) * rank);
            match blk.a {
                FactorRef::F16(a16) => {
                    let a16 = &a16[fa..fb];
                    let mut c = 0;
                    while c + 16 <= a16.len() {
                        let v = _mm512_cvtph_ps(_mm256_loadu_si256(a16.as_ptr().add(c).cast()));
                        _mm512_storeu_ps(a.as_mut_ptr().add(c), v);
                        c += 16;
                    }
                    for (dst, h) in a[c..a16.len()].iter_mut().zip(&a16[c..]) {
                        *dst = h.to_f32();
                    }
                }
                FactorRef::I8 { q, .. } => {
                    let q = &q[fa..fb];
                    let mut c = 0;
                    while c + 16 <= q.len() {
                        let v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                            q.as_ptr().add(c).cast(),
                        )));
                        _mm512_storeu_ps(a.as_mut_ptr().add(c), v);
                        c += 16;
                    }
                    for (dst, &v) in a[c..q.len()].iter_mut().zip(&q[c..]) {
                        *dst = v as f32;
                    }
                }
            }
            for bi in 0..inp.batch {
                for v in accf[..rank].iter_mut() {
                    *v = [_mm512_setzero_ps(); SUB];
                }
                let mut w0 = 0;
                while w0 < words {
                    let nw = (words - w0).min(SCALE_WORDS);
                    for (dw, idx_w) in idx[..nw].iter_mut().enumerate() {
                        let p = sign_words.as_ptr().add(w0 + dw);
                        for (ix, rows8) in idx_w.iter_mut().zip(&row_off) {
                            // Eight scalar loads: a hardware gather is several times slower
                            // on CPUs with the gather-data-sampling mitigation.
                            let sw = _mm512_set_epi64(
                                *p.add(rows8[7]) as i64,
                                *p.add(rows8[6]) as i64,
                                *p.add(rows8[5]) as i64,
                                *p.add(rows8[4]) as i64,
                                *p.add(rows8[3]) as i64,
                                *p.add(rows8[2]) as i64,
                                *p.add(rows8[1]) as i64,
                                *p.add(rows8[0]) as i64,
                            );
                            ix[0] = _mm512_ternarylogic_epi32::<0xEA>(
                                _mm512_multishift_epi64_epi8(shift_lo, sw),
                                nib,
                                qtag,
                            );
                            ix[1] = _mm512_ternarylogic_epi32::<0xEA>(
                                _mm512_multishift_epi64_epi8(shift_hi, sw),
                                nib,
                                qtag,
                            );
                        }
                    }
                    for (r, accf_r) in accf[..rank].iter_mut().enumerate() {
                        // This rank's tables for the block: nw × 256 contiguous bytes.
                        let at = inp.table_index(bi, l, w0, r);
                        let mut acc = [_mm512_setzero_si512(); SUB];
                        let split = SPLIT && r < inp.split_ranks;
                        if split {
                            for (dw, idx_w) in idx[..nw].iter().enumerate() {
                                let t = inp.tables.as_ptr().add((at + dw) * stride);
                                lookup_accumulate2(t, idx_w, w_hi, w_hi, &mut acc);
                                // The low halves: same indices, weight 1.
                                let low = t.add(TABLE_BYTES);
                                lookup_accumulate2(low, idx_w, ones, ones, &mut acc);
                            }
                        } else {
                            // Grouped int8 (a split table's high half alone for the ranks
                            // beyond the split ones): each group's multiplier is the
                            // unsigned operand of `vpdpbusd`, so it costs two broadcasts.
                            for (dw, idx_w) in idx[..nw].iter().enumerate() {
                                let t = inp.tables.as_ptr().add((at + dw) * stride);
                                let m = inp.mults.as_ptr().add((at + dw) * GROUPS);
                                let m_lo = _mm512_set1_epi64(m.cast::<i64>().read_unaligned());
                                let m_hi =
                                    _mm512_set1_epi64(m.add(8).cast::<i64>().read_unaligned());
                                lookup_accumulate2(t, idx_w, m_lo, m_hi, &mut acc);
                            }
                        }
                        // One convert-and-scale per block of words sharing a scale.
                        let unit = if split { unit } else { 1.0 };
                        let scale = _mm512_set1_ps(*inp.scales.as_ptr().add(at) * unit);
                        for (f, i) in accf_r.iter_mut().zip(&acc) {
                            *f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(*i), scale, *f);
                        }
                    }
                    w0 += nw;
                }
                // Row p of sub-tile s sums lanes 2p and 2p + 1 of every rank's accumulator;
                // y = Σ_r a[row][r]·sum_r[row]. A transpose puts the ranks in lanes, so this
                // is one FMA per row and 16 ranks (it was 8 scalar FMAs per rank, a third of
                // the tile's time at k = 9).
                for s in 0..SUB {
                    let rows_here = n.saturating_sub(8 * s).min(8);
                    if rows_here == 0 {
                        break;
                    }
                    let mut out = [_mm512_setzero_ps(); 8];
                    let mut r0 = 0;
                    while r0 < rank {
                        let nr = (rank - r0).min(16);
                        let rmask = ((1u32 << nr) - 1) as __mmask16;
                        let mut m = [_mm512_setzero_ps(); 16];
                        for (mr, accf_r) in m[..nr].iter_mut().zip(&accf[r0..r0 + nr]) {
                            *mr = accf_r[s];
                        }
                        transpose16(&mut m);
                        for (p, o) in out[..rows_here].iter_mut().enumerate() {
                            let pair = _mm512_add_ps(m[2 * p], m[2 * p + 1]);
                            let av = _mm512_maskz_loadu_ps(
                                rmask,
                                a.as_ptr().add((8 * s + p) * rank + r0),
                            );
                            *o = _mm512_fmadd_ps(pair, av, *o);
                        }
                        r0 += 16;
                    }
                    for (p, o) in out[..rows_here].iter().enumerate() {
                        yt[(tile + 8 * s + p) * inp.batch + bi] += _mm512_reduce_add_ps(*o);
                    }
                }
            }
        }
        tile += n;
    }
}

/// [`super::scale_codes_into`] 16 values at a time: `out[c] = q[c] · rep[c mod 16k]`, where
/// `rep` repeats the `k` per-column folds 16 times (so every 16-value step starts at a
/// multiple of 16 in it), then the scalar tail.
///
/// # Safety
/// AVX-512F; `rep.len()` must be a positive multiple of 16 and `q.len() == out.len()`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn scale_codes_avx512(q: &[i8], rep: &[f32], out: &mut [f32]) {
    let period = rep.len();
    let (mut c, mut p) = (0, 0);
    while c + 16 <= q.len() {
        let codes = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
            q.as_ptr().add(c).cast(),
        )));
        let f = _mm512_loadu_ps(rep.as_ptr().add(p));
        _mm512_storeu_ps(out.as_mut_ptr().add(c), _mm512_mul_ps(codes, f));
        c += 16;
        p += 16;
        if p == period {
            p = 0;
        }
    }
    while c < q.len() {
        out[c] = q[c] as f32 * rep[p];
        c += 1;
        p += 1;
    }
}

/// Prefetches (into L2) rows `row0..row0 + n` of a block's packed signs and left factor.
///
/// # Safety
/// SSE (every x86-64 CPU); `row0 + n` must not exceed the block's rows.
#[inline]
unsafe fn prefetch_rows(
    blk: &crate::block::ResidualBlockRef<'_>,
    row0: usize,
    n: usize,
    words: usize,
    rank: usize,
) {
    let signs = blk.signs.words().as_ptr().add(row0 * words).cast::<i8>();
    let mut off = 0;
    while off < n * words * 8 {
        _mm_prefetch::<_MM_HINT_T1>(signs.add(off));
        off += 64;
    }
    let (a, elem) = match blk.a {
        FactorRef::F16(a) => (a.as_ptr().cast::<i8>(), 2),
        FactorRef::I8 { q, .. } => (q.as_ptr(), 1),
    };
    let a = a.add(row0 * rank * elem);
    let mut off = 0;
    while off < n * rank * elem {
        _mm_prefetch::<_MM_HINT_T1>(a.add(off));
        off += 64;
    }
}

/// `acc[s] += w · (the 64 table bytes each of sub-tile s's index pair selects)`, from the
/// 256-byte table of one (word, rank) at `t`: two `vpermi2b` lookups (groups 0..8, 8..16) and
/// two `vpdpbusd` adds per sub-tile, the first weighted byte-wise by `w_lo` (byte `j` of each
/// qword: group `j`), the second by `w_hi` (groups `8 + j`); the table is loaded once for all
/// `SUB` sub-tiles.
///
/// # Safety
/// AVX-512 F, BW, VBMI and VNNI; `t` points at 256 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni")]
unsafe fn lookup_accumulate2<const SUB: usize>(
    t: *const i8,
    idx: &[[__m512i; 2]; SUB],
    w_lo: __m512i,
    w_hi: __m512i,
    acc: &mut [__m512i; SUB],
) {
    let t0 = _mm512_loadu_si512(t.cast());
    let t1 = _mm512_loadu_si512(t.add(64).cast());
    let t2 = _mm512_loadu_si512(t.add(128).cast());
    let t3 = _mm512_loadu_si512(t.add(192).cast());
    for (acc_s, ix) in acc.iter_mut().zip(idx) {
        let v0 = _mm512_permutex2var_epi8(t0, ix[0], t1);
        let v1 = _mm512_permutex2var_epi8(t2, ix[1], t3);
        *acc_s = _mm512_dpbusd_epi32(*acc_s, w_lo, v0);
        *acc_s = _mm512_dpbusd_epi32(*acc_s, w_hi, v1);
    }
}

/// [`super::int8::build_tables_generic`] written out in AVX-512, byte for byte the same
/// tables and scales (tested): the compiler's version of the generic loop scattered `t` one
/// float at a time, summed the scale scalar, and stored the high table byte by byte before
/// reloading it for the low one (a store-forwarding stall), which made the build as slow as
/// the look-ups at 576 columns (`perf`: 47 % of the kernel).
///
/// * `t[r][j] = b[j][r] · xs[j]`: 16 rows of `b` (16 columns × up to 16 ranks, f16) are
///   widened and transposed in registers, so `t` is written 16 floats at a time.
/// * The scale of a block of words: `|t|` summed in groups of four with two in-lane
///   shuffles, then a max.
/// * Each group's 16 entries are one vector: four broadcasts times the ±1 sign patterns,
///   the scale, one rounding convert and a saturating pack for each half.
///
/// `b` points at the `cols × rank` factor, `b_len` values: f16 bits when `F32SRC` is false
/// (widened here, 16 halves per `vcvtph2ps`), f32 values when true (int8 factors, widened and
/// scale-folded by the caller; one masked load per row instead of the convert).
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL, VBMI and VNNI ([`avx512_available`]); `b` must be
/// valid for `b_len` values of its type and the buffers must have the sizes
/// [`super::int8::build_tables`] documents.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
pub(super) unsafe fn build_tables_avx512<const F32SRC: bool>(
    b: *const u8,
    b_len: usize,
    rank: usize,
    xs: &[f32],
    out: TableBuild<'_>,
) {
    let (t, tables, scales, mults) = (out.t, out.tables, out.scales, out.mults);
    let (halves, split_ranks) = (out.halves, out.split_ranks);
    let cols = xs.len();
    let words = crate::signs::words_per_row(cols);
    let padded = words * 64;
    assert!(
        b_len >= cols * rank
            && t.len() >= rank * padded
            && tables.len() >= words * rank * TABLE_BYTES * halves
            && scales.len() >= words * rank
            && mults.len() >= words * rank * GROUPS,
        "table build buffers too small"
    );
    let bp = b.cast::<u16>();
    let bp32 = b.cast::<f32>();
    let tp = t.as_mut_ptr();
    let mut j0 = 0;
    while j0 < cols {
        let n = (cols - j0).min(16);
        let jmask = ((1u32 << n) - 1) as __mmask16;
        // Lanes past the last column are zero, so the padding they land on is zero too.
        let xv = _mm512_maskz_loadu_ps(jmask, xs.as_ptr().add(j0));
        let mut r0 = 0;
        while r0 < rank {
            let nr = (rank - r0).min(16);
            let rmask = ((1u32 << nr) - 1) as __mmask16;
            let mut m = [_mm512_setzero_ps(); 16];
            for (i, mi) in m[..n].iter_mut().enumerate() {
                let off = (j0 + i) * rank + r0;
                *mi = if F32SRC {
                    _mm512_maskz_loadu_ps(rmask, bp32.add(off))
                } else {
                    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(rmask, bp.add(off).cast()))
                };
            }
            transpose16(&mut m);
            for (r, mr) in m[..nr].iter().enumerate() {
                // j0 + 16 <= padded: j0 is a multiple of 16 below cols <= padded (64 | padded).
                _mm512_storeu_ps(tp.add((r0 + r) * padded + j0), _mm512_mul_ps(*mr, xv));
            }
            r0 += 16;
        }
        j0 += 16;
    }
    let written = cols.div_ceil(16) * 16;
    for r in 0..rank {
        t[r * padded + written..(r + 1) * padded].fill(0.0);
    }

    let sign = |c: usize| _mm512_loadu_ps(super::int8::SIGN[c].as_ptr());
    let (s0, s1, s2, s3) = (sign(0), sign(1), sign(2), sign(3));
    let split = _mm512_set1_ps(SPLIT_WEIGHT as f32);
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let stride = TABLE_BYTES * halves;
    // Dword 4s + k of the packed vector comes from dword 4k + s (see `pack4_epi8`).
    let order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    let mut w0 = 0;
    while w0 < words {
        let w1 = (w0 + SCALE_WORDS).min(words);
        for r in 0..rank {
            let base = t.as_ptr().add(r * padded);
            let mut mx = _mm512_setzero_ps();
            let mut q = w0 * 64;
            while q < w1 * 64 {
                let a = _mm512_abs_ps(_mm512_loadu_ps(base.add(q)));
                // (|t0| + |t1|) + (|t2| + |t3|) in every lane of each group of four.
                let p = _mm512_add_ps(a, _mm512_permute_ps::<0xB1>(a));
                mx = _mm512_max_ps(mx, _mm512_add_ps(p, _mm512_permute_ps::<0x4E>(p)));
                q += 16;
            }
            let maxabs = _mm512_reduce_max_ps(mx);
            let (scale, inv) = if maxabs > 0.0 {
                (maxabs / 127.0, 127.0 / maxabs)
            } else {
                (0.0, 0.0)
            };
            let low = halves == 2 && r < split_ranks;
            let grouped = GroupScale::new(maxabs);
            for w in w0..w1 {
                let idx = super::int8::slot(w, r, rank, words);
                *scales.get_unchecked_mut(idx) = if low { scale } else { grouped.unit };
                let out = tables.as_mut_ptr().add(idx * stride);
                let tw = base.add(w * 64);
                // Four groups at a time, so each half is one 64-byte store (a `vpmovdb` to
                // memory per group was the build's hottest instruction).
                for gq in 0..4 {
                    let mut his = [_mm512_setzero_si512(); 4];
                    let mut los = [_mm512_setzero_si512(); 4];
                    for (k, (hi, lo)) in his.iter_mut().zip(los.iter_mut()).enumerate() {
                        let g = tw.add(16 * gq + 4 * k);
                        // Split ranks: the block's scale; others: the group's own (see
                        // `GroupScale`), computed as the generic build computes it.
                        let m_at = mults.get_unchecked_mut(idx * GROUPS + 4 * gq + k);
                        let inv = if low {
                            *m_at = 1;
                            inv
                        } else {
                            let (m, inv_g) =
                                grouped.group(group_range(std::slice::from_raw_parts(g, 4)));
                            *m_at = m;
                            inv_g
                        };
                        let invv = _mm512_set1_ps(inv);
                        let mut e = _mm512_mul_ps(_mm512_set1_ps(*g), s0);
                        e = _mm512_fmadd_ps(_mm512_set1_ps(*g.add(1)), s1, e);
                        e = _mm512_fmadd_ps(_mm512_set1_ps(*g.add(2)), s2, e);
                        e = _mm512_fmadd_ps(_mm512_set1_ps(*g.add(3)), s3, e);
                        e = _mm512_mul_ps(e, invv);
                        // No clamp to ±127 (the generic build clamps): |e| ≤ 127·(1 + a few
                        // ulps), because the scale is the largest group sum of |t|, so `e`
                        // rounds into range on its own, and |e − H| ≤ ½ keeps the low half
                        // within ±127 too; the proptest below checks the bytes are equal.
                        *hi = _mm512_cvt_roundps_epi32::<NEAREST>(e);
                        if low {
                            let l = _mm512_mul_ps(_mm512_sub_ps(e, _mm512_cvtepi32_ps(*hi)), split);
                            *lo = _mm512_cvt_roundps_epi32::<NEAREST>(l);
                        }
                    }
                    _mm512_storeu_si512(out.add(64 * gq).cast(), pack4_epi8(his, order));
                    if low {
                        _mm512_storeu_si512(
                            out.add(TABLE_BYTES + 64 * gq).cast(),
                            pack4_epi8(los, order),
                        );
                    }
                }
            }
        }
        w0 = w1;
    }
}

/// The 64 int8 values of four int32 vectors (each already within ±127), in order: the
/// in-lane saturating packs leave 128-bit lane `k` holding dwords `[a_k, b_k, c_k, d_k]`
/// (four bytes of each source), and one dword permute puts them back in source order.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack4_epi8(v: [__m512i; 4], order: __m512i) -> __m512i {
    let ab = _mm512_packs_epi32(v[0], v[1]);
    let cd = _mm512_packs_epi32(v[2], v[3]);
    _mm512_permutexvar_epi32(order, _mm512_packs_epi16(ab, cd))
}

/// Transposes the 16×16 matrix whose rows are `m` in place (64 in-register shuffles).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(m: &mut [__m512; 16]) {
    // Pairs of rows interleaved, then pairs of pairs: u[4i + c] holds, in each 128-bit lane
    // k, rows 4i..4i + 4 at column 4k + c.
    let mut u = [_mm512_setzero_ps(); 16];
    for i in 0..4 {
        let r = &m[4 * i..4 * i + 4];
        let t0 = _mm512_unpacklo_ps(r[0], r[1]);
        let t1 = _mm512_unpackhi_ps(r[0], r[1]);
        let t2 = _mm512_unpacklo_ps(r[2], r[3]);
        let t3 = _mm512_unpackhi_ps(r[2], r[3]);
        let pd = _mm512_castps_pd;
        let ps = _mm512_castpd_ps;
        u[4 * i] = ps(_mm512_unpacklo_pd(pd(t0), pd(t2)));
        u[4 * i + 1] = ps(_mm512_unpackhi_pd(pd(t0), pd(t2)));
        u[4 * i + 2] = ps(_mm512_unpacklo_pd(pd(t1), pd(t3)));
        u[4 * i + 3] = ps(_mm512_unpackhi_pd(pd(t1), pd(t3)));
    }
    // Column 4k + c gathers lane k of u[c], u[4 + c], u[8 + c], u[12 + c].
    for c in 0..4 {
        let v0 = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
        let v1 = _mm512_shuffle_f32x4::<0xDD>(u[c], u[4 + c]);
        let w0 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
        let w1 = _mm512_shuffle_f32x4::<0xDD>(u[8 + c], u[12 + c]);
        m[c] = _mm512_shuffle_f32x4::<0x88>(v0, w0);
        m[4 + c] = _mm512_shuffle_f32x4::<0x88>(v1, w1);
        m[8 + c] = _mm512_shuffle_f32x4::<0xDD>(v0, w0);
        m[12 + c] = _mm512_shuffle_f32x4::<0xDD>(v1, w1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signs::words_per_row;
    use half::f16;
    use proptest::prelude::*;

    /// Which table build [`build`] runs.
    #[derive(Clone, Copy, Debug)]
    enum Build {
        /// The generic loop.
        Generic,
        /// AVX-512 from f16 (`false`) or f32 (`true`, what int8 factors use) factors.
        Avx512(bool),
        /// The generic loop compiled for AVX2.
        Avx2,
    }

    /// Tables from `b` through `which` build.
    fn build(
        which: Build,
        b: &[f16],
        rank: usize,
        xs: &[f32],
        halves: usize,
        split_ranks: usize,
    ) -> (Vec<i8>, Vec<f32>, Vec<u8>) {
        let words = words_per_row(xs.len());
        let mut t = vec![f32::NAN; rank * words * 64];
        let bf: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
        let mut tables = vec![0x55i8; words * rank * TABLE_BYTES * halves];
        let mut scales = vec![f32::NAN; words * rank];
        let mut mults = vec![0xAAu8; words * rank * GROUPS];
        let out = TableBuild {
            t: &mut t,
            tables: &mut tables,
            scales: &mut scales,
            mults: &mut mults,
            halves,
            split_ranks,
        };
        match which {
            // SAFETY: callers check `avx512_available`; the buffers have the documented sizes.
            Build::Avx512(false) => unsafe {
                build_tables_avx512::<false>(b.as_ptr().cast(), b.len(), rank, xs, out)
            },
            // SAFETY: as above.
            Build::Avx512(true) => unsafe {
                build_tables_avx512::<true>(bf.as_ptr().cast(), bf.len(), rank, xs, out)
            },
            // SAFETY: callers check AVX2; as above.
            Build::Avx2 => unsafe {
                crate::kernels::avx2::build_tables_generic_avx2(&bf, rank, xs, out)
            },
            Build::Generic => crate::kernels::int8::build_tables_generic(&bf, rank, xs, out),
        }
        (tables, scales, mults)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// The AVX-512 and AVX2 builds write exactly the generic build's bytes and scales, for every
        /// rank (one and several 16-rank slabs), widths that are not multiples of 4/16/64,
        /// both table kinds, any number of ranks with low halves, and inputs with zeros (a zero scale).
        #[test]
        fn avx512_tables_equal_generic(
            rank in 1usize..=64,
            cols in 1usize..=300,
            halves in 1usize..=2,
            split_sel in 0usize..=64,
            seed in 0u64..1000,
            zero_x in proptest::bool::ANY,
        ) {
            let mut builds = Vec::new();
            if avx512_available() {
                builds.extend([Build::Avx512(false), Build::Avx512(true)]);
            } else {
                println!("AVX-512 VBMI not on this CPU: its table build is not tested here");
            }
            if crate::kernels::avx2::available() {
                builds.push(Build::Avx2);
            }
            let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 20_001) as f32 / 10_000.0 - 1.0
            };
            let b: Vec<f16> = (0..cols * rank).map(|_| f16::from_f32(next())).collect();
            let xs: Vec<f32> = (0..cols)
                .map(|j| if zero_x && j % 3 != 1 { 0.0 } else { 3.0 * next() })
                .collect();
            let split_ranks = split_sel.min(rank);
            let want = build(Build::Generic, &b, rank, &xs, halves, split_ranks);
            for which in builds {
                let got = build(which, &b, rank, &xs, halves, split_ranks);
                prop_assert_eq!(&got.0, &want.0, "{:?}", which);
                prop_assert_eq!(
                    got.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
                prop_assert_eq!(&got.2, &want.2, "multipliers, {:?}", which);
            }
        }
    }
}
