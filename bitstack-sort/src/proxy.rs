//! The forward-pass-free proxy order (our addition; not in the paper).
//!
//! ## What it measures
//! A linear layer computes `y = W x`. Serving it with the restoration `Ŵ` of its first `l+1`
//! blocks changes its output by `R_l x` with `R_l = W − Ŵ_{≤l}`, whose expected energy over
//! the calibration inputs is
//!
//! ```text
//! E_l = E‖R_l x‖² = tr(R_l G R_lᵀ),   G = E[x xᵀ]            (Gram form)
//!     ≈ Σ_ij R_l[i,j]² d_j,            d_j = E[x_j²]          (diagonal form)
//! ```
//!
//! The diagonal form keeps only the per-channel energies, the same statistic BitStack's
//! activation-aware scaling uses (`s_j = ‖x_j‖₂`, so `s_j² ∝ d_j`; [`ActivationStats::FromScale`]
//! reuses it and needs no extra calibration). Block `l`'s *gain* is the output error it
//! removes, `g_l = E_{l−1} − E_l` (with `E_{−1} = E‖W x‖²`, nothing loaded).
//!
//! ## Why it can stand in for Average
//! Average ranks the level-`i` blocks by the loss after adding one block on top of level
//! `i−1` everywhere. To first order the loss change is the layer's sensitivity times the
//! output error removed, so ranking by gain drops only the (unknown) per-layer sensitivity.
//! We normalise it away by dividing by the layer's own output energy `E‖W x‖²`
//! ([`ProxyNormalisation::Relative`]): a block is worth the *fraction of its layer's signal*
//! it restores, which compares a `q_proj` with a `down_proj` without a forward pass. The
//! level-major constraint of Average is kept (blocks only compete within their level), so
//! the proxy can only permute blocks inside a level: its worst case is bounded by the spread
//! between orders that all respect the paper's load balancing.
//!
//! ## Cost
//! No forward pass. Per weight the residual is updated one level at a time: the block's
//! `A Bᵀ` as a GEMM in L2-sized row tiles, then signs, subtraction and the diagonal error in
//! the same pass, so each level reads and writes the residual once. That is about one full
//! restoration of every stack, `O(rows·cols·k)` per block, plus `O(rows·cols)` (diagonal) or
//! a `rows×cols×cols` GEMM (Gram) per block for the error. Weights run in parallel.
//! SmolLM2-135M shapes (210 weights × 16 levels, k = 16, diagonal statistics) take about
//! 0.8 s on 2 cores (`examples/proxy_speed.rs`).

use crate::error::{Result, SortError};
use crate::order::{level_major_order, BlockScores};
use bitstack_core::{ResidualBlock, UniversalOrder};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;
use std::borrow::Cow;
use std::time::{Duration, Instant};

/// Calibration statistics of one weight's input activations.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum ActivationStats<'a> {
    /// No statistics: every input channel weighs 1 (plain Frobenius error).
    #[default]
    Uniform,
    /// `d_j = E[x_j²]` per input column (`cols` entries, finite, `≥ 0`).
    Diagonal(&'a [f32]),
    /// `d_j = s_j²` from the stack's activation scale (BitStack's `s_j = ‖x_j‖₂`); falls back
    /// to [`ActivationStats::Uniform`] for a weight whose scale is `None` (scaling off).
    FromScale,
    /// `G = E[x xᵀ]` (`cols × cols`, row-major, finite). Exact output error but
    /// `O(rows·cols²)` per block; use it when that fits the time budget.
    Gram(&'a [f32]),
}

/// One weight as the proxy sees it.
#[derive(Clone, Copy, Debug)]
pub struct ProxyWeight<'a> {
    /// The original, unscaled dense weight, `rows × cols` row-major (PyTorch `[out, in]`).
    pub original: &'a [f32],
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// The stack's blocks in level order.
    pub blocks: &'a [ResidualBlock],
    /// The activation scale `s` the blocks were decomposed under (restoration divides
    /// column `j` by `s_j`), or `None`.
    pub scale: Option<&'a [f32]>,
    /// Input statistics.
    pub stats: ActivationStats<'a>,
}

/// How gains of different layers are made comparable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProxyNormalisation {
    /// Gain divided by the layer's output energy `E‖W x‖²` (see the module docs).
    #[default]
    Relative,
    /// Raw gain: assumes every layer's output error costs the same.
    Absolute,
}

/// Proxy options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Cross-layer normalisation.
    pub normalisation: ProxyNormalisation,
    /// Divide each gain by its block's bytes, favouring small blocks at equal gain. Off by
    /// default, as in Average, which ranks by loss alone.
    pub per_byte: bool,
}

/// The proxy's order and the numbers behind it.
#[derive(Clone, Debug)]
pub struct ProxyOutcome {
    /// The universal order.
    pub order: UniversalOrder,
    /// Normalised gain of every block (`gains[w][l]`, level 0 included); higher loads earlier
    /// within a level.
    pub gains: BlockScores,
    /// Per weight: `E‖W x‖²` followed by `E_l` after each level (`levels + 1` entries).
    pub errors: Vec<Vec<f64>>,
    /// Wall time.
    pub elapsed: Duration,
}

/// Computes the proxy order (module docs): level-major like Average, within each level by
/// decreasing normalised gain, ties by weight index.
pub fn sort_proxy(weights: &[ProxyWeight<'_>], config: &ProxyConfig) -> Result<ProxyOutcome> {
    let started = Instant::now();
    let errors = all_errors(weights)?;
    let multipliers: Vec<f64> = errors
        .iter()
        .map(|e| match config.normalisation {
            // A zero weight has nothing to restore: every block gains nothing.
            ProxyNormalisation::Relative if e[0] > 0.0 => 1.0 / e[0],
            ProxyNormalisation::Relative => 0.0,
            ProxyNormalisation::Absolute => 1.0,
        })
        .collect();
    rank_by_gain(weights, errors, &multipliers, config.per_byte, started)
}

/// The sensitivity-weighted proxy ([`crate::sensitivity`]): block `l` of weight `w` is worth
/// `c_w · (E_{l−1} − E_l)` with `c_w = ΔL_w / (E_probe − E_base)`, the loss change
/// [`measure_sensitivity`](crate::measure_sensitivity) saw when `w` alone was moved from its
/// base to its probe blocks, per unit of activation-weighted output error that move added (a
/// cut) or removed (an addition). Level-major, like Average and [`sort_proxy`];
/// `config.normalisation` is replaced by `c_w`.
///
/// A loss change against the error change (evaluation noise) counts as zero sensitivity; a
/// non-finite loss after a cut (the model collapsed without that weight) as ten times the
/// largest finite sensitivity, and after an addition as zero.
pub fn sort_proxy_sensitive(
    weights: &[ProxyWeight<'_>],
    sensitivity: &crate::Sensitivity,
    config: &ProxyConfig,
) -> Result<ProxyOutcome> {
    let started = Instant::now();
    if sensitivity.losses.len() != weights.len()
        || sensitivity.probe_blocks.len() != weights.len()
        || sensitivity.base_blocks.len() != weights.len()
    {
        return Err(SortError::InvalidInput(format!(
            "sensitivity has {} weights, the proxy {}",
            sensitivity.losses.len(),
            weights.len()
        )));
    }
    let errors = all_errors(weights)?;
    let raw: Vec<f64> = errors
        .iter()
        .enumerate()
        .map(|(w, e)| {
            let (cut, base) = (
                sensitivity.probe_blocks[w] as usize,
                sensitivity.base_blocks[w] as usize,
            );
            let at = |blocks: usize| e.get(blocks).copied().unwrap_or(0.0);
            let added = at(cut) - at(base);
            let delta = sensitivity.delta(w);
            if !delta.is_finite() {
                if cut < base {
                    f64::INFINITY
                } else {
                    0.0
                }
            } else if delta * added <= 0.0 {
                0.0
            } else {
                delta / added
            }
        })
        .collect();
    let top = raw
        .iter()
        .copied()
        .filter(|c| c.is_finite())
        .fold(0.0f64, f64::max);
    let multipliers: Vec<f64> = raw
        .iter()
        .map(|&c| {
            if c.is_finite() {
                c
            } else {
                10.0 * top.max(1.0)
            }
        })
        .collect();
    rank_by_gain(weights, errors, &multipliers, config.per_byte, started)
}

fn all_errors(weights: &[ProxyWeight<'_>]) -> Result<Vec<Vec<f64>>> {
    if weights.is_empty() {
        return Err(SortError::InvalidInput("no weights".into()));
    }
    weights
        .par_iter()
        .enumerate()
        .map(|(w, pw)| weighted_errors(pw).map_err(|e| annotate(e, w)))
        .collect()
}

/// Level-major order by decreasing `multiplier[w] · (E_{l−1} − E_l)` (per byte if asked).
fn rank_by_gain(
    weights: &[ProxyWeight<'_>],
    errors: Vec<Vec<f64>>,
    multipliers: &[f64],
    per_byte: bool,
    started: Instant,
) -> Result<ProxyOutcome> {
    let mut gains: BlockScores = Vec::with_capacity(weights.len());
    let mut keys: BlockScores = Vec::with_capacity(weights.len());
    for (w, ((pw, e), m)) in weights.iter().zip(&errors).zip(multipliers).enumerate() {
        let g: Vec<Option<f64>> = e
            .windows(2)
            .zip(pw.blocks)
            .map(|(p, block)| {
                let mut g = (p[0] - p[1]) * m;
                if per_byte {
                    g /= block.heap_bytes() as f64;
                }
                Some(g)
            })
            .collect();
        if g.iter().flatten().any(|v| !v.is_finite()) {
            return Err(SortError::NonFinite(format!(
                "proxy gain of weight {w} (overflow in the weighted error)"
            )));
        }
        keys.push(
            g.iter()
                .enumerate()
                .map(|(l, v)| if l == 0 { None } else { v.map(|v| -v) })
                .collect(),
        );
        gains.push(g);
    }
    let levels: Vec<u16> = weights.iter().map(|w| w.blocks.len() as u16).collect();
    let order = level_major_order(&levels, &keys)?;
    Ok(ProxyOutcome {
        order,
        gains,
        errors,
        elapsed: started.elapsed(),
    })
}

fn annotate(e: SortError, w: usize) -> SortError {
    match e {
        SortError::InvalidInput(m) => SortError::InvalidInput(format!("weight {w}: {m}")),
        SortError::NonFinite(m) => SortError::NonFinite(format!("weight {w}: {m}")),
        other => other,
    }
}

fn check_finite(what: &str, v: &[f32]) -> Result<()> {
    if v.iter().any(|x| !x.is_finite()) {
        return Err(SortError::NonFinite(what.into()));
    }
    Ok(())
}

fn check_len(what: &str, expected: usize, actual: usize) -> Result<()> {
    if expected != actual {
        return Err(SortError::InvalidInput(format!(
            "{what} has {actual} entries, expected {expected}"
        )));
    }
    Ok(())
}

/// How the error of a residual row is weighted.
enum Weighting<'a> {
    Diagonal(Cow<'a, [f32]>),
    Gram(&'a [f32]),
}

/// `E‖W x‖²`, then `E_l` after each level, computed incrementally: one block restored at a
/// time into a scratch buffer and subtracted from the running residual.
fn weighted_errors(pw: &ProxyWeight<'_>) -> Result<Vec<f64>> {
    let (rows, cols) = (pw.rows, pw.cols);
    if rows == 0 || cols == 0 {
        return Err(SortError::InvalidInput("zero-sized weight".into()));
    }
    if pw.blocks.is_empty() {
        return Err(SortError::InvalidInput("no blocks".into()));
    }
    if pw.blocks.len() > u16::MAX as usize {
        return Err(SortError::InvalidInput("more than 65535 blocks".into()));
    }
    check_len("original weight", rows * cols, pw.original.len())?;
    check_finite("original weight", pw.original)?;
    for (l, b) in pw.blocks.iter().enumerate() {
        if b.rows() != rows || b.cols() != cols {
            return Err(SortError::InvalidInput(format!(
                "block {l} is {}×{}, the weight is {rows}×{cols}",
                b.rows(),
                b.cols()
            )));
        }
    }
    let inv_scale = match pw.scale {
        Some(s) => {
            check_len("scale", cols, s.len())?;
            if s.iter().any(|v| !v.is_finite() || *v <= 0.0) {
                return Err(SortError::NonFinite(
                    "scale (must be finite and > 0)".into(),
                ));
            }
            Some(s.iter().map(|v| 1.0 / v).collect::<Vec<f32>>())
        }
        None => None,
    };
    let weighting = match pw.stats {
        ActivationStats::Uniform => Weighting::Diagonal(vec![1.0; cols].into()),
        ActivationStats::FromScale => Weighting::Diagonal(match pw.scale {
            Some(s) => s.iter().map(|v| v * v).collect(),
            None => vec![1.0; cols].into(),
        }),
        ActivationStats::Diagonal(d) => {
            check_len("activation second moments", cols, d.len())?;
            if d.iter().any(|v| !v.is_finite() || *v < 0.0) {
                return Err(SortError::NonFinite(
                    "activation second moments (must be finite and ≥ 0)".into(),
                ));
            }
            Weighting::Diagonal(d.into())
        }
        ActivationStats::Gram(g) => {
            check_len("Gram matrix", cols * cols, g.len())?;
            check_finite("Gram matrix", g)?;
            Weighting::Gram(g)
        }
    };

    let mut residual = pw.original.to_vec();
    let mut scratch = match weighting {
        Weighting::Gram(_) => vec![0.0f32; rows * cols],
        Weighting::Diagonal(_) => Vec::new(),
    };
    let mut errors = Vec::with_capacity(pw.blocks.len() + 1);
    errors.push(weighted_energy(
        &residual,
        rows,
        cols,
        &weighting,
        &mut scratch,
    ));
    for b in pw.blocks {
        let diagonal = subtract_block(&mut residual, b, inv_scale.as_deref(), &weighting);
        errors.push(match diagonal {
            Some(e) => e,
            None => weighted_energy(&residual, rows, cols, &weighting, &mut scratch),
        });
    }
    Ok(errors)
}

/// Rows per task in [`subtract_block`]: a `ROW_CHUNK × cols` product tile stays in L2.
const ROW_CHUNK: usize = 32;

/// `residual −= (S ⊙ A Bᵀ) · diag(inv_scale)` for one block; with diagonal weighting also
/// returns the new `Σ_ij R_ij² d_j`, computed in the same pass.
///
/// Per tile of rows, `A Bᵀ` is a small GEMM into an L2-resident buffer, then one fused pass
/// applies the signs, subtracts and accumulates the error, so the residual is read and
/// written once per level (the proxy is memory-bound otherwise). `tests/proxy.rs` checks it
/// against `kernels::restore_reference`.
fn subtract_block(
    residual: &mut [f32],
    block: &ResidualBlock,
    inv_scale: Option<&[f32]>,
    weighting: &Weighting,
) -> Option<f64> {
    let (rows, cols, k) = (block.rows(), block.cols(), block.rank());
    // Slice conversion: SIMD once per block; a per-element `to_f32` re-checks CPU features
    // on every call and was the proxy's largest cost.
    let mut a = vec![0.0f32; rows * k];
    block.a().dequantize_into(k, &mut a);
    let mut b = vec![0.0f32; cols * k];
    block.b().dequantize_into(k, &mut b);
    // Column scaling commutes with the sign mask, S ⊙ (A Bᵀ) · D = S ⊙ (A (D B)ᵀ), so the
    // inverse scale is folded into B's rows for free.
    if let Some(s) = inv_scale {
        for (row, &sj) in b.chunks_exact_mut(k).zip(s) {
            row.iter_mut().for_each(|v| *v *= sj);
        }
    }
    let bt = MatRef::from_row_major_slice(&b, cols, k).transpose();
    let signs = block.view().signs;
    let d = match weighting {
        Weighting::Diagonal(d) => Some(&**d),
        Weighting::Gram(_) => None,
    };
    debug_assert_eq!(residual.len(), rows * cols);
    let energy: f64 = residual
        .par_chunks_mut(ROW_CHUNK * cols)
        .enumerate()
        .map(|(chunk, tile)| {
            let first = chunk * ROW_CHUNK;
            let n = tile.len() / cols;
            let mut product = vec![0.0f32; n * cols];
            matmul(
                MatMut::from_row_major_slice_mut(&mut product, n, cols),
                Accum::Replace,
                MatRef::from_row_major_slice(&a[first * k..(first + n) * k], n, k),
                bt,
                1.0f32,
                Par::Seq,
            );
            let mut energy = 0.0f64;
            for (di, (r, c)) in tile
                .chunks_exact_mut(cols)
                .zip(product.chunks_exact(cols))
                .enumerate()
            {
                subtract_signed_row(signs.row(first + di), c, r);
                if let Some(d) = d {
                    energy += weighted_square_sum(r, d);
                }
            }
            energy
        })
        .sum();
    d.map(|_| energy)
}

/// Sign masks for one byte of packed signs: lane `t` is `0x8000_0000` (flip the IEEE sign)
/// where bit `t` is clear (−1) and 0 where it is set (+1), per `bitstack_core::signs`.
/// A table keeps the inner loop branch- and shift-free so it vectorises on baseline x86-64.
static SIGN_MASKS: [[u32; 8]; 256] = {
    let mut t = [[0u32; 8]; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut bit = 0;
        while bit < 8 {
            if (byte >> bit) & 1 == 0 {
                t[byte][bit] = 0x8000_0000;
            }
            bit += 1;
        }
        byte += 1;
    }
    t
};

/// `r[j] −= sign_j · c[j]` for one row, `words` its packed signs.
#[inline]
fn subtract_signed_row(words: &[u64], c: &[f32], r: &mut [f32]) {
    let bytes = words.iter().flat_map(|w| w.to_le_bytes());
    let mut rc = r.chunks_exact_mut(8);
    let mut cc = c.chunks_exact(8);
    let mut bytes = bytes.into_iter();
    for ((r8, c8), byte) in (&mut rc).zip(&mut cc).zip(&mut bytes) {
        let mask = &SIGN_MASKS[byte as usize];
        for t in 0..8 {
            r8[t] -= f32::from_bits(c8[t].to_bits() ^ mask[t]);
        }
    }
    if let Some(byte) = bytes.next() {
        let mask = &SIGN_MASKS[byte as usize];
        for (t, (rj, cj)) in rc
            .into_remainder()
            .iter_mut()
            .zip(cc.remainder())
            .enumerate()
        {
            *rj -= f32::from_bits(cj.to_bits() ^ mask[t]);
        }
    }
}

/// `Σ_j r_j² d_j` for one row: eight f32 lanes (vectorisable; a single f64 accumulator is a
/// serial dependency chain), folded into f64 every 64 columns to bound rounding.
#[inline]
fn weighted_square_sum(r: &[f32], d: &[f32]) -> f64 {
    let mut total = 0.0f64;
    for (r64, d64) in r.chunks(64).zip(d.chunks(64)) {
        let mut acc = [0.0f32; 8];
        let mut rc = r64.chunks_exact(8);
        let mut dc = d64.chunks_exact(8);
        for (r8, d8) in (&mut rc).zip(&mut dc) {
            for t in 0..8 {
                acc[t] += r8[t] * r8[t] * d8[t];
            }
        }
        for (&x, &dj) in rc.remainder().iter().zip(dc.remainder()) {
            acc[0] += x * x * dj;
        }
        total += acc.iter().map(|&v| v as f64).sum::<f64>();
    }
    total
}

/// `Σ_i r_i D r_iᵀ` (diagonal) or `Σ_i r_i G r_iᵀ = Σ R ⊙ (R G)` (Gram, one GEMM into
/// `scratch`) over the rows of `r`, accumulated in f64.
fn weighted_energy(
    r: &[f32],
    rows: usize,
    cols: usize,
    weighting: &Weighting,
    scratch: &mut [f32],
) -> f64 {
    let rowwise = |d: &[f32]| -> f64 {
        r.par_chunks(cols)
            .zip(d.par_chunks(cols))
            .map(|(row, dr)| {
                row.iter()
                    .zip(dr)
                    .map(|(&x, &y)| x as f64 * y as f64)
                    .sum::<f64>()
            })
            .sum()
    };
    match weighting {
        // Same summation as the per-level pass in `subtract_block`, so that E_{−1} and E_l
        // round alike.
        Weighting::Diagonal(d) => r
            .par_chunks(cols)
            .map(|row| weighted_square_sum(row, d))
            .sum(),
        Weighting::Gram(g) => {
            matmul(
                MatMut::from_row_major_slice_mut(scratch, rows, cols),
                Accum::Replace,
                MatRef::from_row_major_slice(r, rows, cols),
                MatRef::from_row_major_slice(g, cols, cols),
                1.0f32,
                Par::rayon(0),
            );
            rowwise(scratch)
        }
    }
}
