//! GPTQ (Frantar et al. 2022): column-by-column quantization with second-order error feedback.

use faer::linalg::solvers::{DenseSolveCore, LltError};
use faer::{Accum, MatMut, MatRef, Side};
use half::f16;
use rayon::prelude::*;

use super::calib::HessianAccumulator;
use super::error::{check_len, BaselineError, Result};
use super::quant::{
    dequantize_value, group_params, quantize_value, Grouping, QuantConfig, QuantizedLinear,
    WeightView,
};

/// GPTQ settings; the defaults are the reference implementation's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptqConfig {
    /// Bits and grouping.
    pub quant: QuantConfig,
    /// Damping added to the Hessian diagonal, as a fraction of its mean (reference: 0.01).
    pub damp_percent: f64,
    /// Columns per lazy-batch block (reference: 128).
    pub block_size: usize,
    /// Quantize columns in order of descending Hessian diagonal ("act-order", `--act-order`).
    ///
    /// With groups this uses the reference's static groups (`--static-groups`): every group's
    /// scale and zero are fixed from the unquantized weight in the natural column order before
    /// any error feedback. The stored layout is then identical to RTN's, with no per-column
    /// group index tensor; dynamic groups in permuted order would need one (`g_idx`).
    pub act_order: bool,
}

impl Default for GptqConfig {
    fn default() -> Self {
        Self {
            quant: QuantConfig::default(),
            damp_percent: 0.01,
            block_size: 128,
            act_order: false,
        }
    }
}

/// Min and max of a slice (`(+inf, -inf)` when empty).
fn min_max(v: impl IntoIterator<Item = f64>) -> (f64, f64) {
    v.into_iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(x), b.max(x))
        })
}

/// Quantizes `w` with GPTQ using the Hessian of `stats` (which must describe `w`'s inputs).
pub fn gptq(
    w: WeightView<'_>,
    stats: &HessianAccumulator,
    cfg: &GptqConfig,
) -> Result<QuantizedLinear> {
    let (rows, n) = (w.rows(), w.cols());
    check_len("calibration columns", n, stats.cols())?;
    let gl = cfg.quant.group_len(n)?;
    if !(cfg.damp_percent.is_finite() && cfg.damp_percent >= 0.0) {
        return Err(BaselineError::InvalidParameter {
            name: "damp_percent",
            reason: format!("{} is not a finite non-negative number", cfg.damp_percent),
        });
    }
    if cfg.block_size == 0 {
        return Err(BaselineError::InvalidParameter {
            name: "block_size",
            reason: "must be positive".into(),
        });
    }
    let maxq = cfg.quant.maxq();
    let groups = n.div_ceil(gl);
    let grouped = matches!(cfg.quant.grouping, Grouping::Groups(_)) && gl < n;
    let mut h = stats.hessian()?;
    let mut wm = w.to_f64();

    // Dead inputs (never active in calibration) carry no information: the reference sets
    // H_jj = 1 so the factorisation exists and zeroes the weight column.
    for j in 0..n {
        if h[(j, j)] == 0.0 {
            h[(j, j)] = 1.0;
            for r in 0..rows {
                wm[r * n + j] = 0.0;
            }
        }
    }

    let mut scales = vec![f16::ZERO; rows * groups];
    let mut zeros = vec![f16::ZERO; rows * groups];
    let static_groups = cfg.act_order && grouped;
    // Per-channel parameters and static groups depend only on the (dead-zeroed) weight. (The
    // reference fits per-channel parameters before zeroing dead columns; fitting after keeps
    // weights that are dropped anyway from widening the range.)
    if !grouped || static_groups {
        for r in 0..rows {
            for g in 0..groups {
                let seg = &wm[r * n + g * gl..r * n + ((g + 1) * gl).min(n)];
                let (mn, mx) = min_max(seg.iter().copied());
                let (s, z) = group_params(mn, mx, maxq, r, g)?;
                scales[r * groups + g] = s;
                zeros[r * groups + g] = z;
            }
        }
    }

    let perm: Vec<usize> = if cfg.act_order {
        let mut p: Vec<usize> = (0..n).collect();
        p.sort_by(|&a, &b| h[(b, b)].total_cmp(&h[(a, a)]));
        p
    } else {
        (0..n).collect()
    };
    let mut wp = vec![0f64; rows * n];
    for r in 0..rows {
        for (k, &j) in perm.iter().enumerate() {
            wp[r * n + k] = wm[r * n + j];
        }
    }
    let mut hp = faer::Mat::<f64>::from_fn(n, n, |a, b| h[(perm[a], perm[b])]);
    let damp = cfg.damp_percent * (0..n).map(|j| hp[(j, j)]).sum::<f64>() / n as f64;
    for j in 0..n {
        hp[(j, j)] += damp;
    }

    // U upper-triangular with H⁻¹ = Uᵀ U, the reference's `cholesky(cholesky_inverse(
    // cholesky(H)), upper=True)`; row i of U holds the error-feedback coefficients of column i.
    let not_pd = |e: LltError| match e {
        LltError::NonPositivePivot { index } => BaselineError::NotPositiveDefinite { index },
    };
    let hinv = hp.llt(Side::Lower).map_err(not_pd)?.inverse();
    let l2 = hinv.llt(Side::Lower).map_err(not_pd)?;
    let l2 = l2.L();
    let mut u = vec![0f64; n * n];
    for i in 0..n {
        for j in i..n {
            u[i * n + j] = l2[(j, i)];
        }
    }
    if u.iter().any(|v| !v.is_finite()) {
        return Err(BaselineError::NonFinite("inverse Hessian factor"));
    }

    let mut codes_p = vec![0u8; rows * n];
    let bs = cfg.block_size;
    let mut i1 = 0;
    while i1 < n {
        let mut i2 = (i1 + bs).min(n);
        // A dynamic group's parameters are taken from its columns at the group's start, which
        // must then have absorbed every earlier column's error. A group straddling the block
        // end would miss this block's lazy update (the reference has that quirk when the
        // block size is not a multiple of the group size), so the block is cut at its start.
        if grouped && !static_groups && i2 < n {
            let last_start = (i2 - 1) / gl * gl;
            if last_start > i1 && last_start + gl > i2 {
                i2 = last_start;
            }
        }
        let bw = i2 - i1;
        let mut err = vec![0f64; rows * bw];
        // Rows are independent given the inverse-Hessian factor, so each row runs its whole
        // block of columns on its own thread.
        wp.par_chunks_mut(n)
            .zip(codes_p.par_chunks_mut(n))
            .zip(err.par_chunks_mut(bw))
            .zip(
                scales
                    .par_chunks_mut(groups)
                    .zip(zeros.par_chunks_mut(groups)),
            )
            .enumerate()
            .try_for_each(|(r, (((wrow, crow), erow), (srow, zrow)))| -> Result<()> {
                for i in i1..i2 {
                    let g = if static_groups { perm[i] / gl } else { i / gl };
                    if grouped && !static_groups && i % gl == 0 {
                        let (mn, mx) = min_max(wrow[i..(i + gl).min(n)].iter().copied());
                        let (s, z) = group_params(mn, mx, maxq, r, g)?;
                        srow[g] = s;
                        zrow[g] = z;
                    }
                    let (s, z) = (srow[g].to_f64(), zrow[g].to_f64());
                    let x = wrow[i];
                    let q = quantize_value(x, s, z, maxq);
                    crow[i] = q;
                    let e = (x - dequantize_value(q, s, z)) / u[i * n + i];
                    erow[i - i1] = e;
                    let urow = &u[i * n..(i + 1) * n];
                    for j in i + 1..i2 {
                        wrow[j] -= e * urow[j];
                    }
                }
                Ok(())
            })?;
        if i2 < n {
            // The lazy batch update: all later columns absorb this block's errors in one GEMM.
            let dst = MatMut::from_row_major_slice_mut(&mut wp, rows, n).submatrix_mut(
                0,
                i2,
                rows,
                n - i2,
            );
            let em = MatRef::from_row_major_slice(&err, rows, bw);
            let um = MatRef::from_row_major_slice(&u, n, n).submatrix(i1, i2, bw, n - i2);
            faer::linalg::matmul::matmul(
                dst,
                Accum::Add,
                em,
                um,
                -1.0,
                faer::get_global_parallelism(),
            );
        }
        i1 = i2;
    }

    let mut codes = vec![0u8; rows * n];
    for r in 0..rows {
        for (k, &j) in perm.iter().enumerate() {
            codes[r * n + j] = codes_p[r * n + k];
        }
    }
    QuantizedLinear::from_codes(rows, n, cfg.quant.bits, gl, &codes, scales, zeros, None)
}
