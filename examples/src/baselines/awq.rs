//! AWQ (Lin et al. 2024): activation-aware per-input-channel scaling before RTN.

use faer::{Accum, Mat, Par};
use half::f16;
use rayon::prelude::*;

use super::calib::HessianAccumulator;
use super::error::{check_len, BaselineError, Result};
use super::quant::{
    dequantize_value, group_params, quantize_value, rtn_parts, QuantConfig, QuantizedLinear,
    WeightView,
};

/// AWQ settings; the defaults are the reference implementation's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AwqConfig {
    /// Bits and grouping.
    pub quant: QuantConfig,
    /// Points of the α grid `{0, 1/n, …, (n−1)/n}` (reference: 20).
    pub n_grid: usize,
    /// Run the reference's weight-clipping search after scaling (`auto_clip`).
    pub clip_search: bool,
    /// Resolution of the clipping grid: ratios `1 − i / clip_grid` (reference: 20).
    pub clip_grid: usize,
    /// Smallest clipping ratio tried is `1 − max_shrink` (reference: 0.5).
    pub max_shrink: f64,
}

impl Default for AwqConfig {
    fn default() -> Self {
        Self {
            quant: QuantConfig::default(),
            n_grid: 20,
            clip_search: true,
            clip_grid: 20,
            max_shrink: 0.5,
        }
    }
}

/// What AWQ chose, and the layer it produced.
#[derive(Clone, Debug)]
pub struct AwqResult {
    /// The quantized layer; its [`QuantizedLinear::input_scale`] holds the f16 `1/s`.
    pub layer: QuantizedLinear,
    /// The exponent α of the chosen scales `s = s_x^α`.
    pub alpha: f64,
    /// Whether the clipping search improved the layer output error and was kept.
    pub clipped: bool,
    /// Layer output error `‖X Wᵀ − X Ŵᵀ‖²_F` of `layer` over the calibration tokens.
    pub error: f64,
}

/// The stored f16 `1/s` for `s = max(s_x^α, 1e-4) / sqrt(max(s)·min(s))`, or `None` when the
/// activation magnitudes are so spread that `1/s` leaves f16's range.
fn inv_scales(sx: &[f64], alpha: f64) -> Option<Vec<f16>> {
    let s: Vec<f64> = sx.iter().map(|v| v.powf(alpha).max(1e-4)).collect();
    let (mn, mx) = s
        .iter()
        .fold((f64::INFINITY, 0f64), |(a, b), &v| (a.min(v), b.max(v)));
    let norm = (mn * mx).sqrt();
    let inv: Vec<f16> = s.iter().map(|v| f16::from_f64(norm / v)).collect();
    inv.iter()
        .all(|v| v.is_finite() && v.to_f64() > 0.0)
        .then_some(inv)
}

/// `W·diag(s)` with `s = 1 / stored(1/s)`, so dequantizing with the stored vector inverts it.
fn scale_weight(w: &[f64], cols: usize, inv: &[f16]) -> Vec<f64> {
    let mut ws = w.to_vec();
    for row in ws.chunks_mut(cols) {
        for (v, i) in row.iter_mut().zip(inv) {
            *v /= i.to_f64();
        }
    }
    ws
}

fn build(
    ws: &[f64],
    rows: usize,
    cols: usize,
    inv: &[f16],
    quant: &QuantConfig,
) -> Result<QuantizedLinear> {
    let gl = quant.group_len(cols)?;
    let (codes, scales, zeros) = rtn_parts(ws, rows, cols, quant)?;
    QuantizedLinear::from_codes(
        rows,
        cols,
        quant.bits,
        gl,
        &codes,
        scales,
        zeros,
        Some(inv.to_vec()),
    )
}

fn layer_error(stats: &HessianAccumulator, w: &[f64], layer: &QuantizedLinear) -> f64 {
    let e: Vec<f64> = w
        .iter()
        .zip(layer.dequantize())
        .map(|(a, b)| a - b as f64)
        .collect();
    stats.quadratic_error(&e, layer.rows())
}

/// Per-(row, group) clipping thresholds minimising each group's share of the output error,
/// `eᵀ G e` with `G = diag(1/s) (XᵀX)_g diag(1/s)` the scaled inputs' Gram block — the same
/// loss the reference estimates from 512 sampled tokens, here over every calibration token.
fn clip_thresholds(
    ws: &[f64],
    rows: usize,
    cols: usize,
    inv: &[f16],
    stats: &HessianAccumulator,
    cfg: &AwqConfig,
) -> Result<Vec<f64>> {
    let gl = cfg.quant.group_len(cols)?;
    let groups = cols.div_ceil(gl);
    let maxq = cfg.quant.maxq();
    let xtx = stats.xtx();
    let grams: Vec<Mat<f64>> = (0..groups)
        .map(|g| {
            let (j0, j1) = (g * gl, ((g + 1) * gl).min(cols));
            Mat::from_fn(j1 - j0, j1 - j0, |a, b| {
                xtx[(j0 + a, j0 + b)] * inv[j0 + a].to_f64() * inv[j0 + b].to_f64()
            })
        })
        .collect();
    let steps = ((cfg.max_shrink * cfg.clip_grid as f64) as usize).max(1);
    let mut thresholds = vec![0f64; rows * groups];
    thresholds
        .par_chunks_mut(groups)
        .zip(ws.par_chunks(cols))
        .enumerate()
        .try_for_each(|(r, (trow, wrow))| -> Result<()> {
            for (g, (t, wg)) in trow.iter_mut().zip(wrow.chunks(gl)).enumerate() {
                let len = wg.len();
                let mv = wg.iter().fold(0f64, |a, v| a.max(v.abs()));
                let ratio = |i: usize| mv * (1.0 - i as f64 / cfg.clip_grid as f64);
                // All candidate thresholds' errors at once, so their losses eᵀ G e come out of
                // one GEMM instead of `steps` scalar quadratic forms.
                let mut e = Mat::<f64>::zeros(steps, len);
                for i in 0..steps {
                    let c = ratio(i);
                    let (mn, mx) =
                        wg.iter()
                            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                                let v = v.clamp(-c, c);
                                (a.min(v), b.max(v))
                            });
                    let (s, z) = group_params(mn, mx, maxq, r, g)?;
                    let (s, z) = (s.to_f64(), z.to_f64());
                    for (j, &v) in wg.iter().enumerate() {
                        let q = quantize_value(v.clamp(-c, c), s, z, maxq);
                        e[(i, j)] = v - dequantize_value(q, s, z);
                    }
                }
                let mut eg = Mat::<f64>::zeros(steps, len);
                faer::linalg::matmul::matmul(
                    eg.as_mut(),
                    Accum::Replace,
                    e.as_ref(),
                    grams[g].as_ref(),
                    1.0,
                    Par::Seq,
                );
                let mut best = (f64::INFINITY, mv);
                for i in 0..steps {
                    let loss: f64 = (0..len).map(|j| eg[(i, j)] * e[(i, j)]).sum();
                    if loss < best.0 {
                        best = (loss, ratio(i));
                    }
                }
                *t = best.1;
            }
            Ok(())
        })?;
    Ok(thresholds)
}

/// Quantizes `w` with AWQ using the activation statistics of `stats`.
///
/// The α grid is searched on this layer's own output error (the reference measures the
/// output of the whole block the scaled layers feed, e.g. attention for q/k/v); every
/// candidate is the actual stored layer, f16 rounding included. α = 0 (`s = 1`) is plain RTN
/// and always on the grid, so AWQ never does worse than RTN on the calibration data. The
/// clipping search minimises a per-group proxy, so its result is kept only when it lowers the
/// full layer output error (the reference keeps it unconditionally and skips it for q/k).
///
/// `1/s` is kept as an f16 vector on the layer and counted in its bytes; in a full model it can
/// be folded into the preceding RMSNorm or linear layer at no cost, as the reference does.
pub fn awq(w: WeightView<'_>, stats: &HessianAccumulator, cfg: &AwqConfig) -> Result<AwqResult> {
    let (rows, cols) = (w.rows(), w.cols());
    check_len("calibration columns", cols, stats.cols())?;
    cfg.quant.group_len(cols)?;
    if cfg.n_grid == 0 || cfg.clip_grid == 0 {
        return Err(BaselineError::InvalidParameter {
            name: "grid",
            reason: "n_grid and clip_grid must be positive".into(),
        });
    }
    if !(cfg.max_shrink.is_finite() && (0.0..1.0).contains(&cfg.max_shrink)) {
        return Err(BaselineError::InvalidParameter {
            name: "max_shrink",
            reason: format!("{} is not in [0, 1)", cfg.max_shrink),
        });
    }
    let sx = stats.mean_abs()?;
    let w64 = w.to_f64();
    let mut best: Option<(f64, f64, Vec<f16>, QuantizedLinear)> = None;
    for k in 0..cfg.n_grid {
        let alpha = k as f64 / cfg.n_grid as f64;
        let Some(inv) = inv_scales(&sx, alpha) else {
            continue;
        };
        let layer = build(
            &scale_weight(&w64, cols, &inv),
            rows,
            cols,
            &inv,
            &cfg.quant,
        )?;
        let err = layer_error(stats, &w64, &layer);
        if best.as_ref().is_none_or(|b| err < b.0) {
            best = Some((err, alpha, inv, layer));
        }
    }
    // α = 0 gives s = 1 exactly, which is always representable.
    let Some((mut error, alpha, inv, mut layer)) = best else {
        return Err(BaselineError::NonFinite("AWQ scales"));
    };
    let mut clipped = false;
    if cfg.clip_search {
        let mut ws = scale_weight(&w64, cols, &inv);
        let gl = cfg.quant.group_len(cols)?;
        let groups = cols.div_ceil(gl);
        let t = clip_thresholds(&ws, rows, cols, &inv, stats, cfg)?;
        for (r, row) in ws.chunks_mut(cols).enumerate() {
            for (g, seg) in row.chunks_mut(gl).enumerate() {
                let c = t[r * groups + g];
                for v in seg {
                    *v = v.clamp(-c, c);
                }
            }
        }
        let cand = build(&ws, rows, cols, &inv, &cfg.quant)?;
        let err = layer_error(stats, &w64, &cand);
        if err < error {
            (error, layer, clipped) = (err, cand, true);
        }
    }
    Ok(AwqResult {
        layer,
        alpha,
        clipped,
        error,
    })
}
