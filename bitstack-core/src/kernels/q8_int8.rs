//! The [`Q8Matrix`] product with int8 activations, as llama.cpp multiplies a Q8_0 weight:
//! each item's input is rounded to int8 per group of [`Q8_GROUP`] values (`scale =
//! max|x| / 127`), so a group's dot product is an exact integer sum, scaled once by the
//! weight's and the input's group scales.
//!
//! On SmolLM2 the tied head is 49,152 × 576: read once per token, widening every code to
//! f32 (the exact path, [`Q8Matrix::gemv`]) costs 12 vector operations per 32 weights. With
//! AVX-512 VNNI, `vpdpbusd` multiplies 64 unsigned activation bytes `|q_x|` by 64 signed
//! weight codes, whose signs were flipped where `q_x < 0`, and sums each group's four-byte
//! runs into its 8 lanes: one step of 64 weights is seven operations. The portable kernel
//! computes the same integer sums.

use super::dense::{Q8Matrix, GEMV_F16_MAX_BATCH, Q8_GROUP};
use crate::error::{check_len, Result};
use crate::kernels::batch_of;

/// Columns of one VNNI step (two groups).
const STEP: usize = 64;
/// Rows per parallel task (1,024 rows of 576 codes are 576 KiB).
const ROWS_PER_TASK: usize = 1024;

/// A batch of inputs rounded per group: `abs` (`|q|`, padded to whole steps), the sign
/// bits of `q` per step, and per step the 16 lane scales (8 lanes per group).
struct QuantizedInput {
    steps: usize,
    abs: Vec<u8>,
    negative: Vec<u64>,
    lane_scales: Vec<f32>,
}

impl QuantizedInput {
    fn new(x: &[f32], batch: usize, cols: usize) -> Self {
        let steps = cols.div_ceil(STEP);
        let mut abs = vec![0u8; batch * steps * STEP];
        let mut negative = vec![0u64; batch * steps];
        let mut lane_scales = vec![0.0f32; batch * steps * 16];
        for bi in 0..batch {
            let xr = &x[bi * cols..(bi + 1) * cols];
            for (g, xg) in xr.chunks(Q8_GROUP).enumerate() {
                let max = xg.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let scale = max / 127.0;
                let inv = if scale > 0.0 && scale.is_finite() {
                    1.0 / scale
                } else {
                    0.0
                };
                let (step, half) = (g / 2, g % 2);
                let lanes = &mut lane_scales[(bi * steps + step) * 16 + 8 * half..][..8];
                lanes.fill(if inv > 0.0 { scale } else { 0.0 });
                for (c, v) in xg.iter().enumerate() {
                    let q = (v * inv).round().clamp(-127.0, 127.0) as i32;
                    let at = g * Q8_GROUP + c;
                    abs[bi * steps * STEP + at] = q.unsigned_abs() as u8;
                    if q < 0 {
                        negative[bi * steps + at / STEP] |= 1 << (at % STEP);
                    }
                }
            }
        }
        Self {
            steps,
            abs,
            negative,
            lane_scales,
        }
    }
    /// Item `bi`'s code of column `c` (signed).
    fn code(&self, bi: usize, c: usize) -> i32 {
        let q = i32::from(self.abs[bi * self.steps * STEP + c]);
        if self.negative[bi * self.steps + c / STEP] >> (c % STEP) & 1 == 1 {
            -q
        } else {
            q
        }
    }
    /// Item `bi`'s scale of group `g`.
    fn scale(&self, bi: usize, g: usize) -> f32 {
        self.lane_scales[(bi * self.steps + g / 2) * 16 + 8 * (g % 2)]
    }
}

impl Q8Matrix {
    /// `y (batch × rows) = x (batch × cols) · Wᵀ` with `x` rounded to int8 per group of
    /// [`Q8_GROUP`] (see the module docs) for `batch ≤` [`GEMV_F16_MAX_BATCH`], in parallel
    /// over rows; AVX-512 VNNI where the CPU has it. Equals
    /// [`Q8Matrix::gemv_int8_reference`] up to f32 summation order; differs from the exact
    /// [`Q8Matrix::gemv`] by at most `Σ_j |w_j| · s_x(j) / 2` per output (`s_x(j)` the
    /// input scale of column `j`'s group).
    pub fn gemv_int8(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        let (rows, cols) = (self.rows(), self.cols());
        let batch = batch_of(x.len(), cols)?;
        check_len("output", batch * rows, y.len())?;
        if batch > GEMV_F16_MAX_BATCH {
            return Err(crate::CoreError::InvalidParameter {
                name: "batch",
                reason: format!("{batch} > {GEMV_F16_MAX_BATCH}; dequantize rows and use a GEMM"),
            });
        }
        let qx = QuantizedInput::new(x, batch, cols);
        #[cfg(target_arch = "x86_64")]
        let fast = std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni");
        #[cfg(not(target_arch = "x86_64"))]
        let fast = false;
        let mut yt = vec![0.0f32; rows * batch];
        let yt_ptr = super::SyncPtr(yt.as_mut_ptr());
        let qx = &qx;
        super::pool::run(rows.div_ceil(ROWS_PER_TASK), &|task, _slot| {
            let r0 = task * ROWS_PER_TASK;
            let n = ROWS_PER_TASK.min(rows - r0);
            // SAFETY: task `task` alone owns rows r0..r0 + n of `yt` (rows · batch floats).
            let out =
                unsafe { std::slice::from_raw_parts_mut(yt_ptr.get().add(r0 * batch), n * batch) };
            #[cfg(target_arch = "x86_64")]
            if fast {
                // SAFETY: AVX-512 BW and VNNI were detected above; the rows lie inside the
                // matrix and `qx` was built for this batch and these columns.
                unsafe { rows_vnni(self, r0, qx, batch, out) };
                return;
            }
            let _ = fast;
            rows_portable(self, r0, qx, batch, out);
        });
        for (i, row) in yt.chunks_exact(batch).enumerate() {
            for (bi, v) in row.iter().enumerate() {
                y[bi * rows + i] = *v;
            }
        }
        Ok(())
    }

    /// The plain reference of [`Q8Matrix::gemv_int8`]: the same rounding of `x`, every
    /// group's integer dot product times both scales, summed in f64.
    pub fn gemv_int8_reference(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        let (rows, cols) = (self.rows(), self.cols());
        let batch = batch_of(x.len(), cols)?;
        check_len("output", batch * rows, y.len())?;
        let qx = QuantizedInput::new(x, batch, cols);
        let groups = cols.div_ceil(Q8_GROUP);
        for bi in 0..batch {
            for i in 0..rows {
                let mut acc = 0.0f64;
                for g in 0..groups {
                    let dot: i32 = (g * Q8_GROUP..cols.min((g + 1) * Q8_GROUP))
                        .map(|c| i32::from(self.q[i * cols + c]) * qx.code(bi, c))
                        .sum();
                    let ws = self.scales[i * groups + g].to_f64();
                    acc += ws * f64::from(qx.scale(bi, g)) * f64::from(dot);
                }
                y[bi * rows + i] = acc as f32;
            }
        }
        Ok(())
    }
}

/// Rows `r0..r0 + out.len() / batch` into `out` (row-major, `batch` per row), group by
/// group in exact integers.
fn rows_portable(m: &Q8Matrix, r0: usize, qx: &QuantizedInput, batch: usize, out: &mut [f32]) {
    let cols = m.cols();
    let groups = cols.div_ceil(Q8_GROUP);
    for (d, o) in out.chunks_exact_mut(batch).enumerate() {
        let i = r0 + d;
        let codes = &m.q[i * cols..(i + 1) * cols];
        for (bi, ob) in o.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for (g, cg) in codes.chunks(Q8_GROUP).enumerate() {
                let dot: i32 = cg
                    .iter()
                    .enumerate()
                    .map(|(c, &w)| i32::from(w) * qx.code(bi, g * Q8_GROUP + c))
                    .sum();
                acc += m.scales[i * groups + g].to_f32() * qx.scale(bi, g) * dot as f32;
            }
            *ob = acc;
        }
    }
}

/// [`rows_portable`] with AVX-512 VNNI, one step of 64 columns (two groups) at a time.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI; `r0 + out.len() / batch ≤ rows`; `qx` built
/// for `batch` items of `m.cols()` columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn rows_vnni(m: &Q8Matrix, r0: usize, qx: &QuantizedInput, batch: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let cols = m.cols();
    let groups = cols.div_ceil(Q8_GROUP);
    let steps = qx.steps;
    let full = cols / STEP;
    let tail_mask: u64 = if cols.is_multiple_of(STEP) {
        !0
    } else {
        (1u64 << (cols % STEP)) - 1
    };
    // Lane permutation of step j within a 16-group scale register: lanes 0..8 take group
    // 2t, lanes 8..16 group 2t + 1, t = j % 8.
    let mut idx = [_mm512_setzero_si512(); 8];
    for (t, v) in idx.iter_mut().enumerate() {
        let mut lanes = [0i32; 16];
        for (l, x) in lanes.iter_mut().enumerate() {
            *x = (2 * t + l / 8) as i32;
        }
        *v = _mm512_loadu_si512(lanes.as_ptr().cast());
    }
    let zero = _mm512_setzero_si512();
    for (d, o) in out.chunks_exact_mut(batch).enumerate() {
        let i = r0 + d;
        let w = m.q.as_ptr().add(i * cols);
        let ws = m.scales.as_ptr().add(i * groups).cast::<u16>();
        let mut acc = [_mm512_setzero_ps(); GEMV_F16_MAX_BATCH];
        let mut wsv = _mm512_setzero_ps();
        for j in 0..steps {
            if j % 8 == 0 {
                let left = (groups - 2 * j).min(16);
                let mask = ((1u32 << left) - 1) as u16;
                wsv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, ws.add(2 * j).cast()));
            }
            let wscale = _mm512_permutexvar_ps(idx[j % 8], wsv);
            let codes = if j < full {
                _mm512_loadu_si512(w.add(j * STEP).cast())
            } else {
                _mm512_maskz_loadu_epi8(tail_mask, w.add(j * STEP).cast())
            };
            for (bi, a) in acc[..batch].iter_mut().enumerate() {
                let at = bi * steps + j;
                let neg = *qx.negative.get_unchecked(at);
                let signed = _mm512_mask_sub_epi8(codes, neg, zero, codes);
                let xa = _mm512_loadu_si512(qx.abs.as_ptr().add(at * STEP).cast());
                let dot = _mm512_dpbusd_epi32(zero, xa, signed);
                let xs = _mm512_loadu_ps(qx.lane_scales.as_ptr().add(at * 16));
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wscale, xs), *a);
            }
        }
        for (ob, a) in o.iter_mut().zip(&acc[..batch]) {
            *ob = _mm512_reduce_add_ps(*a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::XorShift;
    use proptest::prelude::*;

    fn matrix(rows: usize, cols: usize, seed: u64) -> (Q8Matrix, Vec<f32>) {
        let mut rng = XorShift::new(seed);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.next_gaussian()).collect();
        let m = Q8Matrix::quantize(rows, cols, &w).unwrap();
        let mut back = vec![0.0; rows * cols];
        m.rows_into(0, rows, &mut back).unwrap();
        (m, back)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// The fast product equals the reference (same integers, f32 summation), and both
        /// lie within the rounding bound of the input from the exact product.
        #[test]
        fn int8_gemv_equals_reference_within_the_rounding_bound(
            rows in 1usize..1100, cols in 1usize..300, batch in 1usize..=GEMV_F16_MAX_BATCH,
            seed in 0u64..1000,
        ) {
            let (m, back) = matrix(rows, cols, seed);
            let mut rng = XorShift::new(seed + 1);
            let x: Vec<f32> = (0..batch * cols).map(|_| rng.next_gaussian()).collect();
            let mut fast = vec![f32::NAN; batch * rows];
            m.gemv_int8(&x, &mut fast).unwrap();
            let mut reference = vec![f32::NAN; batch * rows];
            m.gemv_int8_reference(&x, &mut reference).unwrap();
            let mut portable = vec![f32::NAN; batch * rows];
            let qx = QuantizedInput::new(&x, batch, cols);
            rows_portable(&m, 0, &qx, batch, &mut portable);
            for bi in 0..batch {
                for i in 0..rows {
                    let wrow = &back[i * cols..(i + 1) * cols];
                    let xr = &x[bi * cols..(bi + 1) * cols];
                    let abs: f64 = wrow.iter().zip(xr).map(|(w, v)| (w * v).abs() as f64).sum();
                    let (f, r) = (fast[bi * rows + i] as f64, reference[bi * rows + i] as f64);
                    let p = portable[i * batch + bi] as f64;
                    prop_assert!((f - r).abs() <= 1e-5 * (1.0 + abs), "fast {f} vs {r}");
                    prop_assert!((p - r).abs() <= 1e-5 * (1.0 + abs), "portable {p} vs {r}");
                    let exact: f64 = wrow.iter().zip(xr).map(|(w, v)| *w as f64 * *v as f64).sum();
                    let bound: f64 = (0..cols)
                        .map(|c| wrow[c].abs() as f64 * qx.scale(bi, c / Q8_GROUP) as f64 / 2.0)
                        .sum();
                    prop_assert!((r - exact).abs() <= bound * 1.001 + 1e-5 * (1.0 + abs),
                        "{r} vs exact {exact}, bound {bound}");
                }
            }
        }
    }

    #[test]
    fn int8_gemv_checks_its_arguments_and_keeps_zero_inputs_zero() {
        let (m, _) = matrix(5, 40, 3);
        let mut y = vec![0.0; 5];
        assert!(m.gemv_int8(&[0.0; 39], &mut y).is_err());
        assert!(m.gemv_int8(&[0.0; 40], &mut [0.0; 4]).is_err());
        let nine = vec![1.0; 40 * (GEMV_F16_MAX_BATCH + 1)];
        assert!(m
            .gemv_int8(&nine, &mut [0.0; 5 * (GEMV_F16_MAX_BATCH + 1)])
            .is_err());
        m.gemv_int8(&[0.0; 40], &mut y).unwrap();
        assert_eq!(y, vec![0.0; 5]);
    }
}
