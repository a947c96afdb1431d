//! Iterative **plain** SVD: the paper's "w/o absolute value decomposition" ablation (Fig. 5).
//!
//! BitStack approximates `|R|` and keeps `sign(R)` at one bit per weight. The ablation drops the
//! sign matrix and approximates `R` itself by its top-`k'` singular triplets per level, spending
//! the bits the sign matrix would have taken on more singular vectors instead:
//!
//! ```text
//! k' = k + round(m·n / (16·(m + n)))     so that 16·k'·(m+n) ≈ m·n + 16·k·(m+n) bits
//! ```
//!
//! ([`same_size_rank`]). Level `l` stores `A = U√Σ` and `B = V√Σ` rounded to f16 and the next
//! residual is taken against the rounded factors, exactly as [`crate::iavd`] does, so the
//! reported errors are those of the stored levels. Without f16 rounding the levels would be the
//! successive `k'`-slices of one truncated SVD (Eckart–Young), which is why this is the natural
//! sign-free counterpart of a residual block.
//!
//! The result is a dense-restoration type ([`PlainDecomposition::restore_into`]) rather than a
//! runtime block: it exists to measure what the absolute value decomposition buys.

use crate::error::{check_len, LinalgError, Result};
use crate::iavd::{scaled_copy, IavdParams};
use crate::rng::derive_seed;
use crate::scale::check_scale;
use crate::svd::{truncated_svd, TruncatedSvdParams};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use half::{f16, slice::HalfFloatSliceExt};

/// The rank `k'` whose sign-free level costs as many bits as a BitStack block of rank `k`
/// (`m·n + 16·k·(m+n)` bits, paper eq. 9), capped at `min(rows, cols)`.
pub fn same_size_rank(rows: usize, cols: usize, k: usize) -> usize {
    let extra = (rows as f64 * cols as f64 / (16.0 * (rows + cols) as f64)).round() as usize;
    (k + extra).min(rows.min(cols)).max(1)
}

/// One level of a [`PlainDecomposition`]: `R ≈ A Bᵀ` with f16 factors.
#[derive(Clone, Debug, PartialEq)]
pub struct PlainLevel {
    /// `A = U√Σ`, `rows × rank` row-major.
    pub left: Vec<f16>,
    /// `B = V√Σ`, `cols × rank` row-major.
    pub right: Vec<f16>,
}

/// The result of [`decompose_plain_slice`].
#[derive(Clone, Debug)]
pub struct PlainDecomposition {
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// Singular triplets per level (`k'`).
    pub rank: usize,
    /// The levels in order.
    pub levels: Vec<PlainLevel>,
    /// Relative Frobenius error of the scaled weight after each level (f16 factors), as
    /// [`crate::Decomposition::relative_errors`].
    pub relative_errors: Vec<f64>,
}

impl PlainDecomposition {
    /// Bytes one level holds: the two f16 factors, `2·rank·(rows + cols)`.
    pub fn level_bytes(&self) -> u64 {
        2 * (self.rank * (self.rows + self.cols)) as u64
    }

    /// Writes `Σ_{l < levels} A_l B_lᵀ` into `out` (`rows × cols`, row-major), then divides
    /// column `j` by `scale[j]` when a scale is given (undoing the activation scaling).
    pub fn restore_into(
        &self,
        levels: usize,
        scale: Option<&[f32]>,
        out: &mut [f32],
    ) -> Result<()> {
        let (rows, cols, k) = (self.rows, self.cols, self.rank);
        check_len("restored weight", rows * cols, out.len())?;
        if levels > self.levels.len() {
            return Err(LinalgError::InvalidParameter {
                name: "levels",
                reason: format!("{levels} requested, {} decomposed", self.levels.len()),
            });
        }
        if let Some(s) = scale {
            check_scale(s, cols)?;
        }
        out.fill(0.0);
        let mut a = vec![0f32; rows * k];
        let mut b = vec![0f32; cols * k];
        for level in &self.levels[..levels] {
            level.left.convert_to_f32_slice(&mut a);
            level.right.convert_to_f32_slice(&mut b);
            matmul(
                MatMut::from_row_major_slice_mut(out, rows, cols),
                Accum::Add,
                MatRef::from_row_major_slice(&a, rows, k),
                MatRef::from_row_major_slice(&b, cols, k).transpose(),
                1.0f32,
                Par::rayon(0),
            );
        }
        if let Some(s) = scale {
            for row in out.chunks_exact_mut(cols) {
                for (x, s) in row.iter_mut().zip(s) {
                    *x /= s;
                }
            }
        }
        Ok(())
    }
}

/// Iterative plain SVD of `w` (`rows × cols` row-major) after scaling column `j` by
/// `scale[j]`: `params.levels` levels of rank `params.rank` (use [`same_size_rank`] for the
/// paper's equal-size ablation). Errors as [`crate::decompose_slice`].
pub fn decompose_plain_slice(
    w: &[f32],
    rows: usize,
    cols: usize,
    scale: Option<&[f32]>,
    params: &IavdParams,
) -> Result<PlainDecomposition> {
    let (mut r, svd) = scaled_copy(w, rows, cols, scale, params)?;
    let norm0 = frobenius(&r);
    let k = params.rank;
    let mut levels = Vec::with_capacity(params.levels);
    let mut relative_errors = Vec::with_capacity(params.levels);
    let mut a32 = vec![0f32; rows * k];
    let mut b32 = vec![0f32; cols * k];
    for level in 0..params.levels {
        let t = truncated_svd(
            MatRef::from_row_major_slice(&r, rows, cols),
            &TruncatedSvdParams {
                seed: derive_seed(svd.seed, level as u64),
                ..svd
            },
        )?;
        t.balanced_factors_into(&mut a32, &mut b32, |j, c| j * k + c);
        let mut left = vec![f16::ZERO; rows * k];
        let mut right = vec![f16::ZERO; cols * k];
        left.convert_from_f32_slice(&a32);
        right.convert_from_f32_slice(&b32);
        for (h, f) in [(&left, &a32), (&right, &b32)] {
            if let Some(i) = h.iter().position(|v| !v.is_finite()) {
                return Err(LinalgError::FactorOverflow { level, value: f[i] });
            }
        }
        // The residual is taken against the factors as stored.
        left.convert_to_f32_slice(&mut a32);
        right.convert_to_f32_slice(&mut b32);
        matmul(
            MatMut::from_row_major_slice_mut(&mut r, rows, cols),
            Accum::Add,
            MatRef::from_row_major_slice(&a32, rows, k),
            MatRef::from_row_major_slice(&b32, cols, k).transpose(),
            -1.0f32,
            Par::rayon(0),
        );
        relative_errors.push(if norm0 == 0.0 {
            0.0
        } else {
            frobenius(&r) / norm0
        });
        levels.push(PlainLevel { left, right });
    }
    Ok(PlainDecomposition {
        rows,
        cols,
        rank: k,
        levels,
        relative_errors,
    })
}

fn frobenius(x: &[f32]) -> f64 {
    x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relative_error;
    use bitstack_core::block_bytes;
    use bitstack_core::testutil::XorShift;
    use proptest::prelude::*;

    fn matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = XorShift::new(seed);
        (0..rows * cols).map(|_| 0.5 * rng.next_f32()).collect()
    }

    #[test]
    fn same_size_rank_matches_a_bitstack_block() {
        for &(m, n) in &[
            (576, 576),
            (192, 576),
            (1536, 576),
            (4096, 4096),
            (14336, 4096),
        ] {
            let k2 = same_size_rank(m, n, 16);
            let plain = 2 * (k2 * (m + n)) as u64;
            let avd = block_bytes(m, n, 16, bitstack_core::FactorDtype::F16);
            // Within one singular triplet (2·(m+n) bytes) of the signed block.
            assert!(
                plain.abs_diff(avd) <= (m + n) as u64,
                "{m}x{n}: k'={k2} plain {plain} avd {avd}"
            );
        }
        assert_eq!(same_size_rank(8, 8, 16), 8);
    }

    #[test]
    fn first_level_is_near_eckart_young_and_all_levels_converge() {
        let (rows, cols) = (40, 24);
        let w = matrix(rows, cols, 3);
        let s: Vec<f32> = (0..cols).map(|j| 0.5 + j as f32 / 10.0).collect();
        let params = IavdParams {
            levels: 4,
            rank: 6,
            ..IavdParams::default()
        };
        let d = decompose_plain_slice(&w, rows, cols, Some(&s), &params).unwrap();
        // Optimal rank-6 error of the scaled matrix.
        let scaled: Vec<f32> = w
            .chunks(cols)
            .flat_map(|r| r.iter().zip(&s).map(|(a, b)| a * b))
            .collect();
        let m = faer::Mat::from_fn(rows, cols, |i, j| scaled[i * cols + j] as f64);
        let sv = m.singular_values().unwrap();
        let total: f64 = sv.iter().map(|v| v * v).sum();
        let tail: f64 = sv[6..].iter().map(|v| v * v).sum();
        let optimum = (tail / total).sqrt();
        assert!((d.relative_errors[0] - optimum).abs() < 1e-3 * optimum.max(1e-3));
        assert!(d.relative_errors.windows(2).all(|e| e[1] <= e[0]));
        // 4 levels of rank 6 cover all 24 columns: only f16 rounding is left.
        assert!(d.relative_errors[3] < 2e-3, "{:?}", d.relative_errors);
        // Restoration (with 1/s) reproduces the weight to the reported error.
        let mut out = vec![0f32; rows * cols];
        d.restore_into(4, Some(&s), &mut out).unwrap();
        assert!(relative_error(&w, &out).unwrap() < 2e-3);
        d.restore_into(1, None, &mut out).unwrap();
        let e1 = relative_error(&scaled, &out).unwrap();
        assert!((e1 - d.relative_errors[0]).abs() < 1e-5);
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let w = matrix(8, 6, 1);
        let p = IavdParams {
            levels: 2,
            rank: 2,
            ..IavdParams::default()
        };
        assert!(decompose_plain_slice(&w[..47], 8, 6, None, &p).is_err());
        let mut nan = w.clone();
        nan[5] = f32::NAN;
        assert!(matches!(
            decompose_plain_slice(&nan, 8, 6, None, &p),
            Err(LinalgError::NonFinite { index: 5, .. })
        ));
        assert!(decompose_plain_slice(&w, 8, 6, Some(&[1.0; 5]), &p).is_err());
        let too_big = IavdParams { rank: 7, ..p };
        assert!(decompose_plain_slice(&w, 8, 6, None, &too_big).is_err());
        let d = decompose_plain_slice(&w, 8, 6, None, &p).unwrap();
        let mut out = vec![0f32; 48];
        assert!(d.restore_into(3, None, &mut out).is_err());
        assert!(d.restore_into(1, None, &mut out[..40]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn errors_fall_and_full_rank_restores(rows in 2usize..24, cols in 2usize..24, seed in 0u64..1000) {
            let w = matrix(rows, cols, seed);
            let k = rows.min(cols).div_ceil(3);
            let p = IavdParams { levels: 4, rank: k, ..IavdParams::default() };
            let d = decompose_plain_slice(&w, rows, cols, None, &p).unwrap();
            prop_assert!(d.relative_errors.windows(2).all(|e| e[1] <= e[0] + 1e-6));
            prop_assert!(*d.relative_errors.last().unwrap() < 2e-3);
            let mut out = vec![0f32; rows * cols];
            d.restore_into(4, None, &mut out).unwrap();
            prop_assert!(relative_error(&w, &out).unwrap() < 2e-3);
        }
    }
}
