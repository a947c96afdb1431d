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

use super::int8::{TileInput, SCALE_WORDS, SPLIT_WEIGHT, TABLE_BYTES};
use std::arch::x86_64::*;

/// Whether [`tile_avx512`] can run on this CPU.
pub(super) fn avx512_available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
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
    let w_hi = _mm512_set1_epi8(if SPLIT { SPLIT_WEIGHT as u8 as i8 } else { 1 });
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
            // The tile's factor rows, widened once: a[q·rank + r] for tile row q.
            let a16 = &blk.a[(row0 + tile) * rank..(row0 + tile + n) * rank];
            let mut c = 0;
            while c + 16 <= a16.len() {
                let v = _mm512_cvtph_ps(_mm256_loadu_si256(a16.as_ptr().add(c).cast()));
                _mm512_storeu_ps(a.as_mut_ptr().add(c), v);
                c += 16;
            }
            for (dst, h) in a[c..a16.len()].iter_mut().zip(&a16[c..]) {
                *dst = h.to_f32();
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
                        for (dw, idx_w) in idx[..nw].iter().enumerate() {
                            let t = inp.tables.as_ptr().add((at + dw) * stride);
                            lookup_accumulate(t, idx_w, w_hi, &mut acc);
                            if SPLIT {
                                // The low halves: same indices, weight 1.
                                lookup_accumulate(t.add(TABLE_BYTES), idx_w, ones, &mut acc);
                            }
                        }
                        // One convert-and-scale per block of words sharing a scale.
                        let scale = _mm512_set1_ps(*inp.scales.as_ptr().add(at) * unit);
                        for (f, i) in accf_r.iter_mut().zip(&acc) {
                            *f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(*i), scale, *f);
                        }
                    }
                    w0 += nw;
                }
                // Row p of sub-tile s sums lanes 2p and 2p + 1; y = Σ_r a[row][r]·sum_r[row].
                let mut lanes = [0.0f32; 16];
                for s in 0..SUB {
                    let rows_here = n.saturating_sub(8 * s).min(8);
                    if rows_here == 0 {
                        break;
                    }
                    let mut out = [0.0f32; 8];
                    for (r, accf_r) in accf[..rank].iter().enumerate() {
                        _mm512_storeu_ps(lanes.as_mut_ptr(), accf_r[s]);
                        for (p, o) in out[..rows_here].iter_mut().enumerate() {
                            *o += a[(8 * s + p) * rank + r] * (lanes[2 * p] + lanes[2 * p + 1]);
                        }
                    }
                    for (p, o) in out[..rows_here].iter().enumerate() {
                        yt[(tile + 8 * s + p) * inp.batch + bi] += *o;
                    }
                }
            }
        }
        tile += n;
    }
}

/// `acc[s] += weight · (the 64 table bytes each of sub-tile s's index pair selects)`, from the
/// 256-byte table of one (word, rank) at `t`: two `vpermi2b` lookups (groups 0..8, 8..16) and
/// two `vpdpbusd` adds per sub-tile; the table is loaded once for all `SUB` sub-tiles.
///
/// # Safety
/// AVX-512 F, BW, VBMI and VNNI; `t` points at 256 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni")]
unsafe fn lookup_accumulate<const SUB: usize>(
    t: *const i8,
    idx: &[[__m512i; 2]; SUB],
    weight: __m512i,
    acc: &mut [__m512i; SUB],
) {
    let t0 = _mm512_loadu_si512(t.cast());
    let t1 = _mm512_loadu_si512(t.add(64).cast());
    let t2 = _mm512_loadu_si512(t.add(128).cast());
    let t3 = _mm512_loadu_si512(t.add(192).cast());
    for (acc_s, ix) in acc.iter_mut().zip(idx) {
        let v0 = _mm512_permutex2var_epi8(t0, ix[0], t1);
        let v1 = _mm512_permutex2var_epi8(t2, ix[1], t3);
        *acc_s = _mm512_dpbusd_epi32(*acc_s, weight, v0);
        *acc_s = _mm512_dpbusd_epi32(*acc_s, weight, v1);
    }
}

/// [`super::int8::build_tables_generic`] compiled for AVX-512.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VBMI and VNNI ([`avx512_available`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn build_tables_avx512(
    b: &[half::f16],
    rank: usize,
    xs: &[f32],
    t: &mut [f32],
    bf: &mut [f32],
    tables: &mut [i8],
    scales: &mut [f32],
    halves: usize,
) {
    super::int8::build_tables_generic(b, rank, xs, t, bf, tables, scales, halves)
}
