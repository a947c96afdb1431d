//! Row kernels of the dense restore `Ŵ = (Σ_l S_l ⊙ A_l B_lᵀ) · diag(inv_scale)`, the step
//! before the GEMM of every batch the small-batch kernels do not take
//! ([`super::FusedParams::max_fused_batch`]: prefill, evaluation), chosen at run time by
//! [`rows_into`].
//!
//! Per element and level the restore costs `k` multiply-adds, so with `k ≈ 12` and four
//! levels it is a fifth of a 512-token prefill's GEMM work. The crate is compiled for the
//! x86-64 baseline, so the plain loop ran as 4-wide SSE with a store and reload of each
//! level's row (`perf` on an AVX-512 Zen 4: 39 % of a 512-token prefill, more than the GEMM).
//! [`rows_avx512`] keeps four rows' sums for 16 columns in registers across every level and
//! rank and applies the signs with one masked XOR per level; it performs the *same* f32
//! operations in the same order as [`rows_portable`] (a multiply, then an add — no fused
//! multiply-add), so both write bit-identical rows (tested) and every evaluation reproduces.
//! On x86 CPUs without AVX-512, [`rows_avx2`] is the portable loop compiled for AVX2 (also
//! bit-identical; with AVX-512 disabled by hand it prefilled 512 tokens at 367–455 tokens/s
//! against 273–284 for the baseline build and 452–514 for AVX-512, 105.5 MB, Zen 4).

use crate::block::ResidualBlockRef;

/// What every row of one restore shares.
pub(super) struct RestoreInput<'a> {
    /// The levels, in stack order.
    pub blocks: &'a [ResidualBlockRef<'a>],
    /// Per level, `B` transposed to rank-major f32 (`k × cols`), dequantized.
    pub bts: &'a [Vec<f32>],
    /// Input features.
    pub cols: usize,
    /// Activation scale, `cols` entries.
    pub inv_scale: Option<&'a [f32]>,
}

/// Rows `i0 .. i0 + out.len() / cols` of `Ŵ` into `out` (row-major f32) with the best row
/// kernel this CPU runs; every kernel writes the same bits. The rows must exist in every
/// block and `inp.bts` must be built from `inp.blocks` (the caller checked the shapes).
pub(super) fn rows_into(inp: &RestoreInput<'_>, i0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512_available() {
            let mut a = vec![0.0f32; 4 * inp.blocks.iter().map(|b| b.rank).sum::<usize>()];
            // SAFETY: AVX-512F was detected; `a` has the documented length and the rows and
            // factors are consistent (the caller's contract above).
            unsafe { rows_avx512(inp, i0, out, &mut a) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was detected; arguments as for the portable rows.
            unsafe { rows_avx2(inp, i0, out) };
            return;
        }
    }
    rows_portable(inp, i0, out)
}

/// Rows `i0 .. i0 + out.len() / cols` of `Ŵ` into `out` (row-major f32), one row at a time:
/// each level's row `c = Σ_r a_ir · bt_r` (multiply, then add, rank by rank from zero), then
/// `out_i += ±c` where the sign bit is set / clear, then `· inv_scale`.
#[inline(always)]
fn rows_portable(inp: &RestoreInput<'_>, i0: usize, out: &mut [f32]) {
    let cols = inp.cols;
    let mut c = vec![0.0f32; cols];
    for (di, orow) in out.chunks_exact_mut(cols).enumerate() {
        let i = i0 + di;
        orow.fill(0.0);
        for (blk, bt) in inp.blocks.iter().zip(inp.bts) {
            let k = blk.rank;
            c.fill(0.0);
            for r in 0..k {
                let a = blk.a.get(i, r, k);
                for (cj, &b) in c.iter_mut().zip(&bt[r * cols..(r + 1) * cols]) {
                    *cj += a * b;
                }
            }
            apply_signs_accumulate(blk.signs.row(i), &c, orow);
        }
        if let Some(s) = inp.inv_scale {
            for (o, &s) in orow.iter_mut().zip(s) {
                *o *= s;
            }
        }
    }
}

/// `out[j] += sign_j · c[j]`, flipping the IEEE sign bit where the packed bit is clear.
#[inline(always)]
fn apply_signs_accumulate(words: &[u64], c: &[f32], out: &mut [f32]) {
    for (w, (cc, oo)) in words.iter().zip(c.chunks(64).zip(out.chunks_mut(64))) {
        for (t, (cj, oj)) in cc.iter().zip(oo.iter_mut()).enumerate() {
            let negative = (((w >> t) & 1) ^ 1) as u32;
            *oj += f32::from_bits(cj.to_bits() ^ (negative << 31));
        }
    }
}

/// [`rows_portable`] compiled for AVX2 (for x86 CPUs without AVX-512): the same code, so the
/// same operations in the same order (Rust never fuses a multiply and an add), vectorized
/// 8 floats wide instead of the baseline's 4.
///
/// # Safety
/// The CPU must support AVX2; the arguments as for [`rows_portable`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rows_avx2(inp: &RestoreInput<'_>, i0: usize, out: &mut [f32]) {
    rows_portable(inp, i0, out)
}

/// Whether [`rows_avx512`] can run here.
#[cfg(target_arch = "x86_64")]
fn avx512_available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// [`rows_portable`] in AVX-512F, bit for bit: rows in fours (then singly), 16 columns per
/// step with a masked tail, `a_ir` of every level widened once per group of rows into
/// `a_scratch` (`≥ 4 · Σ_l k_l` floats).
///
/// # Safety
/// The CPU must support AVX-512F ([`avx512_available`]); `out.len()` must be a multiple of
/// `inp.cols`, the rows must exist in every block and `inp.bts` must match `inp.blocks`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(inp: &RestoreInput<'_>, i0: usize, out: &mut [f32], a_scratch: &mut [f32]) {
    let n = out.len() / inp.cols;
    let mut d = 0;
    while d + 4 <= n {
        rows_group::<4>(inp, i0 + d, &mut out[d * inp.cols..], a_scratch);
        d += 4;
    }
    while d < n {
        rows_group::<1>(inp, i0 + d, &mut out[d * inp.cols..], a_scratch);
        d += 1;
    }
}

/// `R` consecutive rows from `i0` into the first `R · cols` values of `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_group<const R: usize>(
    inp: &RestoreInput<'_>,
    i0: usize,
    out: &mut [f32],
    a_scratch: &mut [f32],
) {
    use std::arch::x86_64::*;
    let cols = inp.cols;
    // a[level offset + r · R + rr] = a_{i0 + rr, r} of that level.
    let mut off = 0;
    for blk in inp.blocks {
        let k = blk.rank;
        for r in 0..k {
            for rr in 0..R {
                a_scratch[off + r * R + rr] = blk.a.get(i0 + rr, r, k);
            }
        }
        off += k * R;
    }
    let sign_bit = _mm512_set1_epi32(i32::MIN);
    let mut j0 = 0;
    while j0 < cols {
        let tail = (cols - j0).min(16);
        let tm: __mmask16 = if tail == 16 {
            0xffff
        } else {
            ((1u32 << tail) - 1) as u16
        };
        let mut o = [_mm512_setzero_ps(); R];
        let mut off = 0;
        for (blk, bt) in inp.blocks.iter().zip(inp.bts) {
            let k = blk.rank;
            let mut c = [_mm512_setzero_ps(); R];
            for r in 0..k {
                let b = _mm512_maskz_loadu_ps(tm, bt.as_ptr().add(r * cols + j0));
                for (rr, cr) in c.iter_mut().enumerate() {
                    let a = _mm512_set1_ps(*a_scratch.get_unchecked(off + r * R + rr));
                    *cr = _mm512_add_ps(*cr, _mm512_mul_ps(a, b));
                }
            }
            off += k * R;
            for (rr, (or, cr)) in o.iter_mut().zip(&c).enumerate() {
                let word = *blk.signs.row(i0 + rr).get_unchecked(j0 / 64);
                let set = (word >> (j0 % 64)) as u16;
                // Negate where the sign bit is clear: flip the IEEE sign bit of those lanes.
                let ci = _mm512_castps_si512(*cr);
                let flipped = _mm512_mask_xor_epi32(ci, !set, ci, sign_bit);
                *or = _mm512_add_ps(*or, _mm512_castsi512_ps(flipped));
            }
        }
        if let Some(s) = inp.inv_scale {
            let sv = _mm512_maskz_loadu_ps(tm, s.as_ptr().add(j0));
            for or in o.iter_mut() {
                *or = _mm512_mul_ps(*or, sv);
            }
        }
        for (rr, or) in o.iter().enumerate() {
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(rr * cols + j0), tm, *or);
        }
        j0 += 16;
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::block::FactorDtype;
    use crate::testutil::random_block_with;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// The AVX-512 rows are the portable rows, bit for bit, for odd shapes, every row
        /// count (groups of four and the rest), several levels, f16 and int8 factors, with
        /// and without an activation scale.
        #[test]
        fn avx512_rows_equal_portable_rows_bit_for_bit(
            rows in 1usize..23, cols in 1usize..150, k in 1usize..20, levels in 1usize..4,
            seed in any::<u64>(), int8 in any::<bool>(), scaled in any::<bool>(), first in 0usize..3,
        ) {
            if !avx512_available() {
                eprintln!("skipping: no AVX-512F on this CPU");
                return Ok(());
            }
            let dt = if int8 { FactorDtype::I8 } else { FactorDtype::F16 };
            let blocks: Vec<_> = (0..levels)
                .map(|l| random_block_with(rows, cols, k, seed.wrapping_add(l as u64), dt))
                .collect();
            let refs: Vec<_> = blocks.iter().map(|b| b.view()).collect();
            let bts: Vec<Vec<f32>> = refs.iter().map(|b| super::super::transposed_b(b, cols)).collect();
            let s: Vec<f32> = (0..cols).map(|j| 0.5 + (j % 7) as f32 * 0.25).collect();
            let inp = RestoreInput { blocks: &refs, bts: &bts, cols, inv_scale: scaled.then_some(&s[..]) };
            let i0 = first.min(rows - 1);
            let n = rows - i0;
            let mut want = vec![0.0f32; n * cols];
            rows_portable(&inp, i0, &mut want);
            let mut got = vec![f32::NAN; n * cols];
            let mut a = vec![0.0f32; 4 * k * levels];
            unsafe { rows_avx512(&inp, i0, &mut got, &mut a) };
            let same = want.iter().zip(&got).all(|(w, g)| w.to_bits() == g.to_bits());
            prop_assert!(same, "AVX-512 restore differs from the portable one");
            if std::arch::is_x86_feature_detected!("avx2") {
                let mut got2 = vec![f32::NAN; n * cols];
                unsafe { rows_avx2(&inp, i0, &mut got2) };
                let same = want.iter().zip(&got2).all(|(w, g)| w.to_bits() == g.to_bits());
                prop_assert!(same, "AVX2 restore differs from the portable one");
            }
        }
    }
}
