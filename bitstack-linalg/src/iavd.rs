//! Absolute value decomposition (paper eq. 5) and its iterative form (eq. 6–8).
//!
//! With `R⁽⁰⁾ = W_scaled = W·diag(s)`, level `l` (0-based) computes
//!
//! * `S = sign(R⁽ˡ⁾)` with `sign(0) = +1`, packed into bitstack-core's layout;
//! * the top-`k` SVD `|R⁽ˡ⁾| ≈ U Σ Vᵀ` ([`crate::svd`]);
//! * `A = U√Σ` (`rows × k`) and `B = V√Σ` (`cols × k`), **rounded to f16**, or with
//!   [`IavdParams::factors`] = [`FactorDtype::I8`] quantized to int8 with one f32 scale per
//!   column ([`quantize_factor_i8`]: symmetric, `max_i |x[i][r]| / 127`);
//! * `R⁽ˡ⁺¹⁾ = R⁽ˡ⁾ − S ⊙ (A Bᵀ)` using the rounded (dequantized) factors.
//!
//! Because every residual is taken against the factors *as stored*, the error this module
//! reports after level `l` is exactly (up to f32 summation order) the error of restoring
//! blocks `0..=l` with [`bitstack_core::kernels::restore_into`], rather than the slightly
//! optimistic error of the unrounded factors. Rounding error of one level is corrected by
//! the following levels.
//!
//! Per level, all element-wise work — subtracting the block, accumulating `‖R‖²`, writing
//! `|R|` for the next SVD and packing the next signs — is one fused parallel pass over the
//! matrix; the buffers for `R`, `|R|` and the SVD sketches are allocated once.

use crate::error::{check_len, LinalgError, Result};
use crate::rng::derive_seed;
use crate::scale::check_scale;
use crate::signs::pack_row_into;
use crate::svd::{SvdWorkspace, TruncatedSvdParams};
use bitstack_core::signs::words_per_row;
use bitstack_core::{Factor, FactorDtype, ResidualBlock, StackMeta};
use faer::MatRef;
use half::{f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;
use std::time::{Duration, Instant};

/// Parameters of [`decompose`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IavdParams {
    /// Residual blocks to produce (`n` in the paper), `1 ..= 65535`.
    pub levels: usize,
    /// Singular vectors per block (`k`); overrides `svd.rank`.
    pub rank: usize,
    /// SVD settings for `|R|` (method, oversampling, power iterations, seed, threads). Level
    /// `l` uses a seed derived from `svd.seed` and `l`.
    pub svd: TruncatedSvdParams,
    /// Storage type of the factors `A`, `B` (the residual is taken against the stored values).
    pub factors: FactorDtype,
}

impl Default for IavdParams {
    /// The paper's setting: 16 levels of k = 16.
    fn default() -> Self {
        Self {
            levels: 16,
            rank: 16,
            svd: TruncatedSvdParams::default(),
            factors: FactorDtype::F16,
        }
    }
}

/// The result of [`decompose`].
#[derive(Clone, Debug)]
pub struct Decomposition {
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// Singular vectors per block.
    pub rank: usize,
    /// Storage type of the blocks' factors.
    pub factors: FactorDtype,
    /// One block per level, in order.
    pub blocks: Vec<ResidualBlock>,
    /// `‖W_scaled − Σ_{l' ≤ l} S_l' ⊙ A_l' B_l'ᵀ‖_F / ‖W_scaled‖_F` after each level `l`,
    /// measured in the **scaled** space (where the decomposition works; with no scale it is
    /// the plain relative error of `W`), with the f16 factors. `0` for an all-zero `W`.
    pub relative_errors: Vec<f64>,
    /// `‖W_scaled‖_F`.
    pub reference_norm: f64,
    /// Wall time of each level (SVD, factor rounding and the fused update), for profiling.
    pub level_times: Vec<Duration>,
}

impl Decomposition {
    /// Metadata for a [`bitstack_core::WeightStack`] built from these blocks.
    pub fn stack_meta(&self, name: impl Into<String>, scale: Option<Vec<f32>>) -> StackMeta {
        StackMeta {
            name: name.into(),
            rows: self.rows,
            cols: self.cols,
            rank: self.rank,
            // decompose() caps levels at u16::MAX.
            levels: self.blocks.len() as u16,
            scale,
            factors: self.factors,
        }
    }
}

/// Rows of `R` one parallel task handles.
const ROW_CHUNK: usize = 8;
/// Independent accumulators for the squared-norm reduction.
const LANES: usize = 8;

/// Iterative absolute value decomposition of `w` (`rows × cols`, PyTorch `[out, in]`, any
/// strides) after scaling column `j` by `scale[j]` (see [`crate::scale`]).
///
/// Errors: non-finite entries in `w` or in `w·diag(scale)`, a scale that is not finite and
/// positive or has the wrong length, `levels` outside `1..=65535`, `rank` outside
/// `1..=min(rows, cols)`, and factors that overflow f16.
pub fn decompose(
    w: MatRef<'_, f32>,
    scale: Option<&[f32]>,
    params: &IavdParams,
) -> Result<Decomposition> {
    let (rows, cols) = w.shape();
    let svd = validate(rows, cols, scale, params)?;
    let mut r = vec![0.0f32; rows * cols];
    r.par_chunks_mut(cols).enumerate().for_each(|(i, row)| {
        for (j, x) in row.iter_mut().enumerate() {
            *x = w[(i, j)] * scale.map_or(1.0, |s| s[j]);
        }
    });
    check_scaled(&r, |index| w[(index / cols, index % cols)])?;
    run(r, rows, cols, &svd, params.levels, params.factors)
}

/// [`decompose`] for a row-major slice of `rows × cols` values.
pub fn decompose_slice(
    w: &[f32],
    rows: usize,
    cols: usize,
    scale: Option<&[f32]>,
    params: &IavdParams,
) -> Result<Decomposition> {
    let (r, svd) = scaled_copy(w, rows, cols, scale, params)?;
    run(r, rows, cols, &svd, params.levels, params.factors)
}

/// Validates a row-major `w`, its scale and `params`, and returns `w·diag(scale)` (checked
/// finite) with the SVD settings of one level.
pub(crate) fn scaled_copy(
    w: &[f32],
    rows: usize,
    cols: usize,
    scale: Option<&[f32]>,
    params: &IavdParams,
) -> Result<(Vec<f32>, TruncatedSvdParams)> {
    check_len("weight", rows.saturating_mul(cols), w.len())?;
    let svd = validate(rows, cols, scale, params)?;
    let r = match scale {
        None => w.to_vec(),
        Some(s) => w
            .chunks_exact(cols)
            .flat_map(|row| row.iter().zip(s).map(|(x, s)| x * s))
            .collect(),
    };
    check_scaled(&r, |index| w[index])?;
    Ok((r, svd))
}

/// `‖reference − approx‖_F / ‖reference‖_F` in f64 (`0` when both are zero, `inf` when only
/// the reference is).
pub fn relative_error(reference: &[f32], approx: &[f32]) -> Result<f64> {
    check_len("approximation", reference.len(), approx.len())?;
    let (num, den) = reference
        .iter()
        .zip(approx)
        .fold((0.0f64, 0.0f64), |(n, d), (&x, &y)| {
            let e = x as f64 - y as f64;
            (n + e * e, d + x as f64 * x as f64)
        });
    Ok(if num == 0.0 { 0.0 } else { (num / den).sqrt() })
}

fn validate(
    rows: usize,
    cols: usize,
    scale: Option<&[f32]>,
    params: &IavdParams,
) -> Result<TruncatedSvdParams> {
    if params.levels == 0 || params.levels > u16::MAX as usize {
        return Err(LinalgError::InvalidParameter {
            name: "levels",
            reason: format!("must be in 1..=65535, got {}", params.levels),
        });
    }
    let svd = TruncatedSvdParams {
        rank: params.rank,
        ..params.svd
    };
    svd.validate(rows, cols)?;
    if let Some(s) = scale {
        check_scale(s, cols)?;
    }
    Ok(svd)
}

/// Reports the first non-finite scaled entry, blaming the weight when it was already
/// non-finite there and the scaling otherwise (overflow).
fn check_scaled(r: &[f32], original: impl Fn(usize) -> f32) -> Result<()> {
    match r.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(LinalgError::NonFinite {
            what: if original(index).is_finite() {
                "scaled weight (overflow)"
            } else {
                "weight"
            },
            index,
        }),
    }
}

/// The IAVD loop on the (finite, scaled) row-major matrix `w`.
///
/// The residual is kept implicitly as `R = S ⊙ |R|`: one f32 buffer holding `|R|` (which the
/// SVD needs anyway) plus the packed signs `S` (which the block needs anyway). Since
/// `R − S⊙C = S ⊙ (|R| − C)` exactly in IEEE arithmetic, this is bit-for-bit the explicit
/// update while moving half the bytes per level.
fn run(
    mut abs: Vec<f32>,
    rows: usize,
    cols: usize,
    svd: &TruncatedSvdParams,
    levels: usize,
    factors: FactorDtype,
) -> Result<Decomposition> {
    let k = svd.rank;
    let wpr = words_per_row(cols);
    let mut signs = vec![0u64; rows * wpr];
    // Level-0 inputs: sign(W), |W| (in place) and ‖W‖².
    let sq: Vec<f64> = abs
        .par_chunks_mut(cols * ROW_CHUNK)
        .zip(signs.par_chunks_mut(wpr * ROW_CHUNK))
        .map(|(w, signs)| {
            let mut lanes = [0.0f64; LANES];
            for (wr, sr) in w.chunks_exact_mut(cols).zip(signs.chunks_exact_mut(wpr)) {
                pack_row_into(wr, sr);
                for x in wr.chunks_mut(LANES) {
                    for (t, x) in x.iter_mut().enumerate() {
                        lanes[t] += *x as f64 * *x as f64;
                        *x = x.abs();
                    }
                }
            }
            lanes.iter().sum::<f64>()
        })
        .collect();
    let norm0 = sq.iter().sum::<f64>().sqrt();

    let mut ws = SvdWorkspace::new(rows, cols, svd);
    let mut blocks = Vec::with_capacity(levels);
    let mut relative_errors = Vec::with_capacity(levels);
    let mut a32 = vec![0.0f32; rows * k];
    let mut bt32 = vec![0.0f32; k * cols];
    let mut level_times = Vec::with_capacity(levels);
    for level in 0..levels {
        let start = Instant::now();
        let t = ws.compute(
            MatRef::from_row_major_slice(&abs, rows, cols),
            svd,
            derive_seed(svd.seed, level as u64),
        )?;
        // Factors √σ·u and √σ·v, rounded to f16 or int8; the residual below uses exactly these.
        // Bulk slice conversions: half's per-value conversion is ~100× slower here.
        t.balanced_factors_into(&mut a32, &mut bt32, |j, c| c * cols + j);
        // B is stored cols × k (row-major): transpose the rank-major buffer on the way.
        let b32: Vec<f32> = (0..cols * k)
            .map(|t| bt32[(t % k) * cols + t / k])
            .collect();
        let (fa, fb) = match factors {
            FactorDtype::F16 => {
                let mut a16 = vec![f16::ZERO; rows * k];
                a16.convert_from_f32_slice(&a32);
                let mut b16 = vec![f16::ZERO; cols * k];
                b16.convert_from_f32_slice(&b32);
                check_f16(&a16, &a32, level)?;
                check_f16(&b16, &b32, level)?;
                (Factor::F16(a16), Factor::F16(b16))
            }
            FactorDtype::I8 => {
                let (qa, sa) = quantize_factor_i8(&a32, k);
                let (qb, sb) = quantize_factor_i8(&b32, k);
                (
                    Factor::I8 { q: qa, scale: sa },
                    Factor::I8 { q: qb, scale: sb },
                )
            }
        };
        // The residual is taken against the stored values, dequantized as the kernels do.
        fa.view().dequantize_into(k, &mut a32);
        let mut b_deq = b32;
        fb.view().dequantize_into(k, &mut b_deq);
        for (t, &b) in b_deq.iter().enumerate() {
            bt32[(t % k) * cols + t / k] = b;
        }
        let need_next = level + 1 < levels;
        // Allocated every level because it moves into the block; the last level's stays
        // zero and is dropped.
        let mut next_signs = vec![0u64; if need_next { rows * wpr } else { 0 }];
        let sq: Vec<f64> = if need_next {
            abs.par_chunks_mut(cols * ROW_CHUNK)
                .zip(signs.par_chunks(wpr * ROW_CHUNK))
                .zip(next_signs.par_chunks_mut(wpr * ROW_CHUNK))
                .zip(a32.par_chunks(k * ROW_CHUNK))
                .map_init(
                    || vec![0.0f32; cols],
                    |c, (((abs, signs), next), a)| {
                        update_rows(RowUpdate {
                            abs,
                            signs,
                            next: Some(next),
                            a,
                            bt: &bt32,
                            c,
                            k,
                        })
                    },
                )
                .collect()
        } else {
            abs.par_chunks_mut(cols * ROW_CHUNK)
                .zip(signs.par_chunks(wpr * ROW_CHUNK))
                .zip(a32.par_chunks(k * ROW_CHUNK))
                .map_init(
                    || vec![0.0f32; cols],
                    |c, ((abs, signs), a)| {
                        update_rows(RowUpdate {
                            abs,
                            signs,
                            next: None,
                            a,
                            bt: &bt32,
                            c,
                            k,
                        })
                    },
                )
                .collect()
        };
        let norm = sq.iter().sum::<f64>().sqrt();
        relative_errors.push(if norm0 == 0.0 { 0.0 } else { norm / norm0 });
        let level_signs = std::mem::replace(&mut signs, next_signs);
        blocks.push(ResidualBlock::with_factors(
            rows,
            cols,
            k,
            level_signs,
            fa,
            fb,
        )?);
        level_times.push(start.elapsed());
    }
    Ok(Decomposition {
        rows,
        cols,
        rank: k,
        factors,
        blocks,
        relative_errors,
        reference_norm: norm0,
        level_times,
    })
}

/// Quantizes an `n × rank` row-major factor to int8 with one scale per column `r`:
/// `scale[r] = max_i |x[i][r]| / 127`, `q = round(x / scale)` (ties away from zero), so
/// `|x − q·scale| ≤ scale / 2` up to f32 rounding. An all-zero column gets scale 0 and codes 0.
/// Values must be finite.
pub fn quantize_factor_i8(x: &[f32], rank: usize) -> (Vec<i8>, Vec<f32>) {
    let mut amax = vec![0.0f32; rank];
    for row in x.chunks_exact(rank) {
        for (m, v) in amax.iter_mut().zip(row) {
            *m = m.max(v.abs());
        }
    }
    let scale: Vec<f32> = amax.iter().map(|m| m / 127.0).collect();
    let inv: Vec<f32> = scale
        .iter()
        .map(|s| if *s > 0.0 { 1.0 / s } else { 0.0 })
        .collect();
    let q = x
        .chunks_exact(rank)
        .flat_map(|row| {
            row.iter()
                .zip(&inv)
                .map(|(v, i)| (v * i).round().clamp(-127.0, 127.0) as i8)
        })
        .collect();
    (q, scale)
}

/// Rejects factors that overflowed f16 (the f32 values are finite, so any non-finite f16 is
/// an overflow).
fn check_f16(h: &[f16], f: &[f32], level: usize) -> Result<()> {
    match h.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(LinalgError::FactorOverflow { level, value: f[i] }),
    }
}

/// The operands of one level's update for a chunk of rows ([`update_rows_generic`] says
/// what each holds): one value, so the portable, AVX2 and dispatching entry points share one
/// parameter list.
struct RowUpdate<'a> {
    /// `|R|` of the chunk's rows, `rows × cols`.
    abs: &'a mut [f32],
    /// Packed signs of `R`, `words_per_row(cols)` words a row.
    signs: &'a [u64],
    /// Where the signs of `R'` go, when another level follows.
    next: Option<&'a mut [u64]>,
    /// The chunk's rows of `A`, `rows × k`.
    a: &'a [f32],
    /// `Bᵀ`, `k × cols`.
    bt: &'a [f32],
    /// Scratch row of `cols` floats.
    c: &'a mut [f32],
    /// Rank.
    k: usize,
}

/// [`update_rows_generic`], compiled for AVX2 when the CPU has it (the default x86-64 target
/// only assumes SSE2). No FMA is enabled, so results are bit-identical on both paths and
/// `C` matches `restore_into`'s products exactly.
fn update_rows(rows: RowUpdate<'_>) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 support was just checked at run time.
        return unsafe { update_rows_avx2(rows) };
    }
    update_rows_generic(rows)
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn update_rows_avx2(rows: RowUpdate<'_>) -> f64 {
    update_rows_generic(rows)
}

/// One level's update for a chunk of rows, with `R = S ⊙ |R|` held as `abs` and `signs`:
/// `R' = R − S ⊙ C = S ⊙ (|R| − C)` where `C = A Bᵀ`. Returns `Σ R'²` of the chunk; when
/// `next` is given, overwrites `abs` with `|R'|` and writes the packed signs of `R'` there
/// (`sign(±0) = +1`). `c` is a scratch row of `cols` floats.
///
/// Each row of `C` is built with `k` axpys into `c` (which stays in L1), the same operations
/// in the same order as `restore_into`, so `C` is bit-identical to what restoration computes.
#[inline(always)]
fn update_rows_generic(rows: RowUpdate<'_>) -> f64 {
    let RowUpdate {
        abs,
        signs,
        mut next,
        a,
        bt,
        c,
        k,
    } = rows;
    let cols = c.len();
    let wpr = words_per_row(cols);
    let write = next.is_some();
    let mut ss = 0.0f64;
    for (i, (ar, arow)) in abs
        .chunks_exact_mut(cols)
        .zip(a.chunks_exact(k))
        .enumerate()
    {
        c.fill(0.0);
        for (q, &av) in arow.iter().enumerate() {
            for (cj, &b) in c.iter_mut().zip(&bt[q * cols..(q + 1) * cols]) {
                *cj += av * b;
            }
        }
        // Eight independent f64 lanes: a single running sum is a serial dependency chain the
        // compiler may not reorder.
        let mut lanes = [0.0f64; LANES];
        for (wi, (xw, cw)) in ar.chunks_mut(64).zip(c.chunks(64)).enumerate() {
            let word = signs[i * wpr + wi];
            let mut bits = 0u64;
            for (g, (x8, c8)) in xw.chunks_mut(LANES).zip(cw.chunks(LANES)).enumerate() {
                let shift = g * LANES;
                let byte = match (
                    <&mut [f32; LANES]>::try_from(&mut *x8),
                    <&[f32; LANES]>::try_from(c8),
                ) {
                    (Ok(x8), Ok(c8)) => update_group(x8, c8, word >> shift, write, &mut lanes),
                    _ => {
                        // Row tail shorter than LANES: pad with zeros, which add nothing.
                        let n = x8.len();
                        let (mut xs, mut cs) = ([0.0f32; LANES], [0.0f32; LANES]);
                        xs[..n].copy_from_slice(x8);
                        cs[..n].copy_from_slice(c8);
                        let byte = update_group(&mut xs, &cs, word >> shift, write, &mut lanes);
                        x8.copy_from_slice(&xs[..n]);
                        byte & ((1u64 << n) - 1)
                    }
                };
                bits |= byte << shift;
            }
            if let Some(next) = next.as_deref_mut() {
                next[i * wpr + wi] = bits;
            }
        }
        ss += lanes.iter().sum::<f64>();
    }
    ss
}

/// `d = |R| − C` for eight entries: accumulates `d²`, writes `|d|` when `write`, and returns
/// the eight sign bits of `R' = S ⊙ d` (bit `t` for entry `t`; `S` is read from the low 8
/// bits of `s_bits`).
#[inline(always)]
fn update_group(
    x: &mut [f32; LANES],
    c: &[f32; LANES],
    s_bits: u64,
    write: bool,
    lanes: &mut [f64; LANES],
) -> u64 {
    let mut byte = 0u64;
    for t in 0..LANES {
        let d = x[t] - c[t];
        // R' = ±d: flip d's sign bit where S is −1 (packed bit clear).
        let negative = (((s_bits >> t) & 1) ^ 1) as u32;
        let y = f32::from_bits(d.to_bits() ^ (negative << 31));
        byte |= ((y >= 0.0) as u64) << t;
        lanes[t] += d as f64 * d as f64;
        if write {
            x[t] = d.abs();
        }
    }
    byte
}
