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

use super::int8::{TileInput, TABLE_BYTES};
use std::arch::x86_64::*;

/// Whether [`tile_avx512`] can run on this CPU.
pub(super) fn avx512_available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vbmi")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}

/// Rows `row0..row0 + nrows` of the product into `yt` (`nrows × batch`, accumulated).
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VBMI and VNNI ([`avx512_available`]); `inp` must
/// describe consistent buffers (checked by the caller) and `row0 + nrows <= inp.rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni")]
pub(super) unsafe fn tile_avx512(inp: &TileInput<'_>, row0: usize, nrows: usize, yt: &mut [f32]) {
    let rank = inp.rank;
    let words = inp.words;
    debug_assert!(rank <= 64 && row0 + nrows <= inp.rows);
    // Byte j of every qword selects bits 4j.. (groups 0..8) or 32 + 4j.. (groups 8..16).
    let shift_lo = _mm512_set1_epi64(0x1c18_1410_0c08_0400);
    let shift_hi = _mm512_set1_epi64(0x3c38_3430_2c28_2420);
    let nib = _mm512_set1_epi8(0x0f);
    let qtag = _mm512_set1_epi64(0x7060_5040_3020_1000);
    let ones = _mm512_set1_epi8(1);
    let mut accf = [_mm512_setzero_ps(); 64];
    let mut sub = 0;
    while sub < nrows {
        let n = (nrows - sub).min(8);
        // Rows past the tile repeat its last row (valid memory); their sums are discarded.
        let row_of = |p: usize| row0 + sub + p.min(n - 1);
        let offs = _mm512_set_epi64(
            (row_of(7) * words) as i64,
            (row_of(6) * words) as i64,
            (row_of(5) * words) as i64,
            (row_of(4) * words) as i64,
            (row_of(3) * words) as i64,
            (row_of(2) * words) as i64,
            (row_of(1) * words) as i64,
            (row_of(0) * words) as i64,
        );
        for (l, blk) in inp.blocks.iter().enumerate() {
            let sign_words = blk.signs.words();
            // The sub-tile's factor rows, widened once: a[p·rank + r].
            let mut a = [0.0f32; 8 * 64];
            let a16 = &blk.a[(row0 + sub) * rank..(row0 + sub + n) * rank];
            let mut c = 0;
            while c + 16 <= a16.len() {
                let v = _mm512_cvtph_ps(_mm256_loadu_si256(a16.as_ptr().add(c).cast()));
                _mm512_storeu_ps(a.as_mut_ptr().add(c), v);
                c += 16;
            }
            for (dst, h) in a[c..a16.len()].iter_mut().zip(&a16[c..]) {
                *dst = h.to_f32();
            }
            debug_assert_eq!(sign_words.len(), inp.rows * words);
            for bi in 0..inp.batch {
                for a in accf[..rank].iter_mut() {
                    *a = _mm512_setzero_ps();
                }
                for w in 0..words {
                    // SAFETY: every offset is `row * words` with row < rows, plus w < words.
                    let sw = _mm512_i64gather_epi64::<8>(offs, sign_words.as_ptr().add(w).cast());
                    let idx_lo = _mm512_ternarylogic_epi32::<0xEA>(
                        _mm512_multishift_epi64_epi8(shift_lo, sw),
                        nib,
                        qtag,
                    );
                    let idx_hi = _mm512_ternarylogic_epi32::<0xEA>(
                        _mm512_multishift_epi64_epi8(shift_hi, sw),
                        nib,
                        qtag,
                    );
                    let base = inp.table_index(bi, l, w);
                    let tab = inp.tables.as_ptr().add(base * TABLE_BYTES);
                    let sc = inp.scales.as_ptr().add(base);
                    for (r, acc_r) in accf[..rank].iter_mut().enumerate() {
                        let t = tab.add(r * TABLE_BYTES);
                        let t0 = _mm512_loadu_si512(t.cast());
                        let t1 = _mm512_loadu_si512(t.add(64).cast());
                        let t2 = _mm512_loadu_si512(t.add(128).cast());
                        let t3 = _mm512_loadu_si512(t.add(192).cast());
                        let v0 = _mm512_permutex2var_epi8(t0, idx_lo, t1);
                        let v1 = _mm512_permutex2var_epi8(t2, idx_hi, t3);
                        let s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, v0);
                        let s = _mm512_dpbusd_epi32(s, ones, v1);
                        *acc_r = _mm512_fmadd_ps(
                            _mm512_cvtepi32_ps(s),
                            _mm512_set1_ps(*sc.add(r)),
                            *acc_r,
                        );
                    }
                }
                // Row p's sum is lanes 2p and 2p + 1; y_p = Σ_r a[p][r]·sum_r[p].
                let mut lanes = [0.0f32; 16];
                let mut out = [0.0f32; 8];
                for (r, acc_r) in accf[..rank].iter().enumerate() {
                    _mm512_storeu_ps(lanes.as_mut_ptr(), *acc_r);
                    for (p, o) in out[..n].iter_mut().enumerate() {
                        *o += a[p * rank + r] * (lanes[2 * p] + lanes[2 * p + 1]);
                    }
                }
                for (p, o) in out[..n].iter().enumerate() {
                    yt[(sub + p) * inp.batch + bi] += *o;
                }
            }
        }
        sub += n;
    }
}
