//! x86-64 AVX2 kernel for the int8-table product (layout in [`super::int8`]): the T-MAC
//! design with 16-entry `vpshufb` look-ups, for CPUs without AVX-512 VBMI (most desktop and
//! laptop x86 CPUs, AMD Zen 2–4 included).
//!
//! ## One tile: 32 rows, one 64-column sign word at a time
//! * **Indices.** The 32 rows' sign words (8 bytes each, byte `b` holding groups `2b` and
//!   `2b + 1` in its nibbles) are byte-transposed in registers (one `vpshufb` and three
//!   unpack stages, [`transpose_words`]) so that register `b` holds byte `b` of all 32 rows;
//!   a mask and a shift then give, per group `g`, one vector of the 32 rows' 4-bit indices.
//!   The transpose leaves the rows in a fixed permuted order ([`row_of`]): nothing is
//!   shuffled back, the per-row sums are read out in that order at the end.
//! * **Look-ups.** Group `g`'s 16 table bytes are broadcast to both 128-bit lanes and one
//!   `vpshufb` returns the 32 rows' entries. Two groups' results are byte-interleaved
//!   (`vpunpck[lh]bw`) so each row's two entries are neighbours, then
//!   - split 16-bit tables: `vpmaddubsw` against ones adds the pair into 16 bits (at most
//!     2·127), kept in 16-bit sums over a block of [`SCALE_WORDS`] words (at most
//!     64·127 = 8128) for the high and the low half, combined as `254·H + L` in 32 bits by
//!     one `vpmaddwd` per block;
//!   - grouped int8 tables (multipliers up to 255, see [`super::int8::GroupScale`]): the pair is
//!     sign-extended in-lane to 16 bits and `vpmaddwd` against the two groups' multipliers
//!     gives `m_g·T_g + m_h·T_h` exactly in 32 bits (`vpmaddubsw` would saturate there).
//! * One convert-and-FMA per (block of words, rank) with the block's scale, as in the
//!   AVX-512 kernel; `y[row] += Σ_r a[row][r]·sum_r[row]` at the end of each level and item.
//!
//! The integer sums are exact, so this kernel differs from [`super::int8::tile_portable`]
//! only in the order of f32 additions (tested against `matmul_reference` with every other
//! kernel).

use super::int8::{TableBuild, TileInput, GROUPS, SCALE_WORDS, SPLIT_WEIGHT, TABLE_BYTES};
use std::arch::x86_64::*;

/// Rows per tile.
const TILE: usize = 32;

/// Whether [`tile_avx2`] can run on this CPU.
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// [`super::int8::build_tables_generic`] compiled for AVX2 and FMA (the generic loop is
/// `inline(always)`, so this is the same code vectorized 8 floats wide; Rust never contracts
/// float operations, so the tables are byte for byte the generic ones).
///
/// # Safety
/// AVX2 and FMA ([`available`]); buffers as [`super::int8::build_tables`] documents.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn build_tables_generic_avx2(
    bf: &[f32],
    rank: usize,
    xs: &[f32],
    out: TableBuild<'_>,
) {
    super::int8::build_tables_generic(bf, rank, xs, out)
}

/// The tile row held at byte position `pos` (0..32) of a transposed index vector: lane
/// `pos / 16`, byte `t = pos % 16` holds row `4·(t / 2) + 2·lane + t % 2`.
#[inline(always)]
const fn row_of(pos: usize) -> usize {
    let (lane, t) = (pos / 16, pos % 16);
    4 * (t / 2) + 2 * lane + t % 2
}

/// The tile row behind element `e` (0..8) of the 32-bit sum vector `c` (0..4): lane `e / 4`,
/// pair position `t = 4c + e % 4` (the order the unpacks of [`lookup_pair_split`] and
/// [`lookup_pair_grouped`] leave).
#[inline(always)]
const fn row_of_sum(c: usize, e: usize) -> usize {
    row_of(16 * (e / 4) + 4 * c + e % 4)
}

/// Byte-transposes the sign words of 32 rows: `w[j]` holds rows `4j..4j + 4` (one qword
/// each); returns `v` with `v[b]` holding byte `b` of every row, at the positions
/// [`row_of`] gives.
///
/// # Safety
/// AVX2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn transpose_words(w: [__m256i; 8]) -> [__m256i; 8] {
    // Per lane: the two qwords' bytes interleaved, so 16-bit unit u holds byte u of both rows.
    let m = _mm256_setr_epi8(
        0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5,
        13, 6, 14, 7, 15,
    );
    let z: [__m256i; 8] = std::array::from_fn(|j| _mm256_shuffle_epi8(w[j], m));
    // 16-bit stage: p_lo[m] dword d = byte d of z[2m], z[2m + 1]; p_hi: byte 4 + d.
    let p_lo: [__m256i; 4] = std::array::from_fn(|i| _mm256_unpacklo_epi16(z[2 * i], z[2 * i + 1]));
    let p_hi: [__m256i; 4] = std::array::from_fn(|i| _mm256_unpackhi_epi16(z[2 * i], z[2 * i + 1]));
    // 32-bit stage: qword q = byte base + q of z[4n..4n + 4].
    let q = |p: &[__m256i; 4], n: usize, hi: bool| {
        if hi {
            _mm256_unpackhi_epi32(p[2 * n], p[2 * n + 1])
        } else {
            _mm256_unpacklo_epi32(p[2 * n], p[2 * n + 1])
        }
    };
    let mut v = [_mm256_setzero_si256(); 8];
    for (base, p, hi) in [
        (0, &p_lo, false),
        (2, &p_lo, true),
        (4, &p_hi, false),
        (6, &p_hi, true),
    ] {
        let (q0, q1) = (q(p, 0, hi), q(p, 1, hi));
        // 64-bit stage: both halves of z[0..8], i.e. all 32 rows.
        v[base] = _mm256_unpacklo_epi64(q0, q1);
        v[base + 1] = _mm256_unpackhi_epi64(q0, q1);
    }
    v
}

/// `acc_h += pairs of the high table's entries`, `acc_l += the low table's`, 16-bit sums at
/// pair positions (see [`row_of_sum`]), for groups `g`, `g + 1` of the split table at `t`.
///
/// # Safety
/// AVX2; `t` points at the `2 · TABLE_BYTES` bytes of a split table.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn lookup_pair_split(
    t: *const i8,
    g: usize,
    ix: [__m256i; 2],
    ones: __m256i,
    acc_h: &mut [__m256i; 2],
    acc_l: &mut [__m256i; 2],
) {
    for (half, acc) in [(0, acc_h), (TABLE_BYTES, acc_l)] {
        let t0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(t.add(half + 16 * g).cast()));
        let t1 = _mm256_broadcastsi128_si256(_mm_loadu_si128(t.add(half + 16 * g + 16).cast()));
        let v0 = _mm256_shuffle_epi8(t0, ix[0]);
        let v1 = _mm256_shuffle_epi8(t1, ix[1]);
        acc[0] = _mm256_add_epi16(
            acc[0],
            _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(v0, v1)),
        );
        acc[1] = _mm256_add_epi16(
            acc[1],
            _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(v0, v1)),
        );
    }
}

/// `acc[c] += m_g·T_g + m_{g+1}·T_{g+1}` in 32 bits at the sum positions of [`row_of_sum`],
/// for groups `g`, `g + 1` of the grouped int8 table at `t` with multipliers `mults`.
///
/// # Safety
/// AVX2; `t` points at `TABLE_BYTES` bytes, `mults` at [`GROUPS`].
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn lookup_pair_grouped(
    t: *const i8,
    mults: *const u8,
    g: usize,
    ix: [__m256i; 2],
    acc: &mut [__m256i; 4],
) {
    let t0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(t.add(16 * g).cast()));
    let t1 = _mm256_broadcastsi128_si256(_mm_loadu_si128(t.add(16 * g + 16).cast()));
    let v0 = _mm256_shuffle_epi8(t0, ix[0]);
    let v1 = _mm256_shuffle_epi8(t1, ix[1]);
    // (m_g, m_{g+1}) as 16-bit pairs.
    let m = _mm256_set1_epi32(i32::from(*mults.add(g)) | (i32::from(*mults.add(g + 1)) << 16));
    for (k, pairs) in [_mm256_unpacklo_epi8(v0, v1), _mm256_unpackhi_epi8(v0, v1)]
        .into_iter()
        .enumerate()
    {
        // In-lane sign extension: each byte into the high byte of a 16-bit lane, then shifted down.
        let lo = _mm256_srai_epi16::<8>(_mm256_unpacklo_epi8(pairs, pairs));
        let hi = _mm256_srai_epi16::<8>(_mm256_unpackhi_epi8(pairs, pairs));
        acc[2 * k] = _mm256_add_epi32(acc[2 * k], _mm256_madd_epi16(lo, m));
        acc[2 * k + 1] = _mm256_add_epi32(acc[2 * k + 1], _mm256_madd_epi16(hi, m));
    }
}

/// Rows `row0..row0 + nrows` of the product into `yt` (`nrows × batch`, accumulated), in
/// tiles of 32 rows. Loop order as [`super::x86::tile_avx512`]: tile → level → item → block
/// of words sharing a scale → rank → word.
///
/// # Safety
/// The CPU must support AVX2 and FMA ([`available`]); `inp` must describe consistent
/// buffers (checked by the caller) and `row0 + nrows <= inp.rows`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tile_avx2<const SPLIT: bool>(
    inp: &TileInput<'_>,
    row0: usize,
    nrows: usize,
    yt: &mut [f32],
) {
    let rank = inp.rank;
    let words = inp.words;
    debug_assert!(rank <= 64 && row0 + nrows <= inp.rows && nrows > 0);
    let nib = _mm256_set1_epi8(0x0f);
    let ones = _mm256_set1_epi8(1);
    // (254, 1) as 16-bit pairs: 254·H + L from interleaved (H, L).
    let hl = _mm256_set1_epi32(SPLIT_WEIGHT | (1 << 16));
    let stride = if SPLIT { 2 * TABLE_BYTES } else { TABLE_BYTES };
    // Every entry below is written before it is read.
    let mut accf = std::mem::MaybeUninit::<[[__m256; 4]; 64]>::uninit();
    let accf = &mut *accf.as_mut_ptr();
    let mut idx = std::mem::MaybeUninit::<[[__m256i; GROUPS]; SCALE_WORDS]>::uninit();
    let idx = &mut *idx.as_mut_ptr();
    let mut a = [0.0f32; TILE * 64];
    let mut sums = [0.0f32; 32];
    let mut tile = 0;
    while tile < nrows {
        let n = (nrows - tile).min(TILE);
        // Rows past the tile repeat its last row (valid memory); their sums are discarded.
        let last = row0 + tile + n - 1;
        let row_off: [usize; TILE] = std::array::from_fn(|p| (row0 + tile + p).min(last) * words);
        for (l, blk) in inp.blocks.iter().enumerate() {
            let sign_words = blk.signs.words();
            debug_assert_eq!(sign_words.len(), inp.rows * words);
            // The tile's factor rows, widened once (int8 factors: the raw codes; their
            // scales are folded into the tables).
            for p in 0..n {
                blk.kernel_a_row(row0 + tile + p, &mut a[p * rank..(p + 1) * rank]);
            }
            for bi in 0..inp.batch {
                for v in accf[..rank].iter_mut() {
                    *v = [_mm256_setzero_ps(); 4];
                }
                let mut w0 = 0;
                while w0 < words {
                    let nw = (words - w0).min(SCALE_WORDS);
                    for (dw, idx_w) in idx[..nw].iter_mut().enumerate() {
                        let p = sign_words.as_ptr().add(w0 + dw);
                        let rows4: [__m256i; 8] = std::array::from_fn(|j| {
                            _mm256_set_epi64x(
                                *p.add(row_off[4 * j + 3]) as i64,
                                *p.add(row_off[4 * j + 2]) as i64,
                                *p.add(row_off[4 * j + 1]) as i64,
                                *p.add(row_off[4 * j]) as i64,
                            )
                        });
                        let bytes = transpose_words(rows4);
                        for (b, v) in bytes.iter().enumerate() {
                            idx_w[2 * b] = _mm256_and_si256(*v, nib);
                            idx_w[2 * b + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(*v), nib);
                        }
                    }
                    for (r, accf_r) in accf[..rank].iter_mut().enumerate() {
                        let at = inp.table_index(bi, l, w0, r);
                        let mut acc = [_mm256_setzero_si256(); 4];
                        let split = SPLIT && r < inp.split_ranks;
                        if split {
                            let (mut acc_h, mut acc_l) =
                                ([_mm256_setzero_si256(); 2], [_mm256_setzero_si256(); 2]);
                            for (dw, idx_w) in idx[..nw].iter().enumerate() {
                                let t = inp.tables.as_ptr().add((at + dw) * stride);
                                for g in (0..GROUPS).step_by(2) {
                                    let ix = [idx_w[g], idx_w[g + 1]];
                                    lookup_pair_split(t, g, ix, ones, &mut acc_h, &mut acc_l);
                                }
                            }
                            // 254·H + L per pair position, in 32 bits.
                            for k in 0..2 {
                                acc[2 * k] = _mm256_madd_epi16(
                                    _mm256_unpacklo_epi16(acc_h[k], acc_l[k]),
                                    hl,
                                );
                                acc[2 * k + 1] = _mm256_madd_epi16(
                                    _mm256_unpackhi_epi16(acc_h[k], acc_l[k]),
                                    hl,
                                );
                            }
                        } else {
                            for (dw, idx_w) in idx[..nw].iter().enumerate() {
                                let t = inp.tables.as_ptr().add((at + dw) * stride);
                                let m = inp.mults.as_ptr().add((at + dw) * GROUPS);
                                for g in (0..GROUPS).step_by(2) {
                                    let ix = [idx_w[g], idx_w[g + 1]];
                                    lookup_pair_grouped(t, m, g, ix, &mut acc);
                                }
                            }
                        }
                        let unit = if split {
                            1.0 / SPLIT_WEIGHT as f32
                        } else {
                            1.0
                        };
                        let scale = _mm256_set1_ps(*inp.scales.as_ptr().add(at) * unit);
                        for (f, i) in accf_r.iter_mut().zip(&acc) {
                            *f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(*i), scale, *f);
                        }
                    }
                    w0 += nw;
                }
                // y[row] += Σ_r a[row][r]·sum_r[row], reading the sums in their order.
                let mut out = [0.0f32; TILE];
                for (r, accf_r) in accf[..rank].iter().enumerate() {
                    for (c, v) in accf_r.iter().enumerate() {
                        _mm256_storeu_ps(sums.as_mut_ptr().add(8 * c), *v);
                    }
                    for c in 0..4 {
                        for e in 0..8 {
                            let row = row_of_sum(c, e);
                            if row < n {
                                out[row] += sums[8 * c + e] * a[row * rank + r];
                            }
                        }
                    }
                }
                for (p, o) in out[..n].iter().enumerate() {
                    yt[(tile + p) * inp.batch + bi] += *o;
                }
            }
        }
        tile += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The transpose puts byte `b` of row `row_of(pos)` at position `pos` of vector `b`, and
    /// `row_of` / `row_of_sum` are permutations of the 32 rows.
    #[test]
    fn transpose_and_row_maps_agree() {
        if !available() {
            println!("AVX2 not on this CPU: skipped");
            return;
        }
        let word =
            |row: usize| -> u64 { (0..8u64).fold(0, |w, b| w | ((row as u64 * 8 + b) << (8 * b))) };
        // SAFETY: AVX2 checked above.
        let out = unsafe {
            let w: [__m256i; 8] = std::array::from_fn(|j| {
                _mm256_set_epi64x(
                    word(4 * j + 3) as i64,
                    word(4 * j + 2) as i64,
                    word(4 * j + 1) as i64,
                    word(4 * j) as i64,
                )
            });
            transpose_words(w)
        };
        for (b, v) in out.iter().enumerate() {
            let mut bytes = [0u8; 32];
            // SAFETY: 32 writable bytes.
            unsafe { _mm256_storeu_si256(bytes.as_mut_ptr().cast(), *v) };
            for (pos, &x) in bytes.iter().enumerate() {
                assert_eq!(x as usize, row_of(pos) * 8 + b, "byte {b} position {pos}");
            }
        }
        let mut seen = [false; 32];
        for pos in 0..32 {
            seen[row_of(pos)] = true;
        }
        assert!(seen.iter().all(|&s| s));
        let mut seen = [false; 32];
        for c in 0..4 {
            for e in 0..8 {
                seen[row_of_sum(c, e)] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
    }
}
