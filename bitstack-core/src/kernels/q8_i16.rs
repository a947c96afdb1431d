//! The [`Q8Matrix`] product with 16-bit activations: each item's input is rounded once to
//! int16 (`scale = max|x| / 32767`), so every group's dot product with the int8 codes is an
//! exact integer sum, scaled by the weight's group scale; the item's scale multiplies the
//! row's sum at the end.
//!
//! On SmolLM2 the tied head is 49,152 × 576, read once per token. Widening every code to
//! f32 (the exact path, [`Q8Matrix::gemv`]) costs about 12 vector operations per 32
//! weights; here, with AVX-512 VNNI, a group of 32 is one widening load (`vpmovsxbw`), one
//! `vpdpwssd` (16-bit pairs summed into int32 lanes), one conversion and one multiply-add.
//! Int8 activations per group of 32 (llama.cpp's Q8_0 × Q8_0) were tried first: they moved
//! perplexity by +0.15 % and +0.19 % at 105.5 and 145 MB on validation text (token-by-token
//! decode against the exact path), over the 0.1 % the decode kernels keep; 16-bit rounding
//! is ~250× finer. The portable kernel computes the same integer sums.

use super::dense::{Q8Matrix, GEMV_F16_MAX_BATCH, Q8_GROUP};
use crate::error::{check_len, Result};
use crate::kernels::batch_of;

/// Largest activation code.
const QMAX: f32 = 32767.0;
/// Rows per parallel task (1,024 rows of 576 codes are 576 KiB).
const ROWS_PER_TASK: usize = 1024;

/// A batch of inputs rounded to int16 (`codes`, each item padded to whole groups) with one
/// scale per item.
struct QuantizedInput {
    padded: usize,
    codes: Vec<i16>,
    scales: Vec<f32>,
}

impl QuantizedInput {
    fn new(x: &[f32], batch: usize, cols: usize) -> Self {
        let padded = cols.div_ceil(Q8_GROUP) * Q8_GROUP;
        let mut codes = vec![0i16; batch * padded];
        let mut scales = vec![0.0f32; batch];
        for bi in 0..batch {
            let xr = &x[bi * cols..(bi + 1) * cols];
            let max = xr.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            if !(max > 0.0 && max.is_finite()) {
                continue;
            }
            scales[bi] = max / QMAX;
            let inv = QMAX / max;
            for (q, v) in codes[bi * padded..].iter_mut().zip(xr) {
                *q = (v * inv).round().clamp(-QMAX, QMAX) as i16;
            }
        }
        Self {
            padded,
            codes,
            scales,
        }
    }
    /// Item `bi`'s codes.
    fn item(&self, bi: usize) -> &[i16] {
        &self.codes[bi * self.padded..(bi + 1) * self.padded]
    }
}

impl Q8Matrix {
    /// `y (batch × rows) = x (batch × cols) · Wᵀ` with each item of `x` rounded to int16
    /// (see the module docs) for `batch ≤` [`GEMV_F16_MAX_BATCH`], in parallel over rows;
    /// AVX-512 VNNI where the CPU has it. Equals [`Q8Matrix::gemv_i16_reference`] up to f32
    /// summation order, and differs from the exact [`Q8Matrix::gemv`] by at most
    /// `Σ_j |w_j| · s_x / 2` per output (`s_x = max|x| / 32767`).
    pub fn gemv_i16(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
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
        let qx = &qx;
        super::pool::gemv_row_tiles(rows, batch, ROWS_PER_TASK, y, &|r0, out| {
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
        Ok(())
    }

    /// The plain reference of [`Q8Matrix::gemv_i16`]: the same rounding of `x`, every
    /// group's integer dot product times its weight scale, summed in f64, times the item's
    /// scale.
    pub fn gemv_i16_reference(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        let (rows, cols) = (self.rows(), self.cols());
        let batch = batch_of(x.len(), cols)?;
        check_len("output", batch * rows, y.len())?;
        let qx = QuantizedInput::new(x, batch, cols);
        let groups = cols.div_ceil(Q8_GROUP);
        for bi in 0..batch {
            let codes = qx.item(bi);
            for i in 0..rows {
                let mut acc = 0.0f64;
                for g in 0..groups {
                    let dot: i64 = (g * Q8_GROUP..cols.min((g + 1) * Q8_GROUP))
                        .map(|c| i64::from(self.q[i * cols + c]) * i64::from(codes[c]))
                        .sum();
                    acc += self.scales[i * groups + g].to_f64() * dot as f64;
                }
                y[bi * rows + i] = (acc * f64::from(qx.scales[bi])) as f32;
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
        let w = &m.q[i * cols..(i + 1) * cols];
        for (bi, ob) in o.iter_mut().enumerate() {
            let codes = qx.item(bi);
            let mut acc = 0.0f32;
            for (g, wg) in w.chunks(Q8_GROUP).enumerate() {
                let dot: i32 = wg
                    .iter()
                    .zip(&codes[g * Q8_GROUP..])
                    .map(|(&w, &q)| i32::from(w) * i32::from(q))
                    .sum();
                acc += m.scales[i * groups + g].to_f32() * dot as f32;
            }
            *ob = acc * qx.scales[bi];
        }
    }
}

/// [`rows_portable`] with AVX-512 VNNI, one group of 32 columns per step.
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
    let full = cols / Q8_GROUP;
    let tail_mask: u32 = if cols.is_multiple_of(Q8_GROUP) {
        !0
    } else {
        (1u32 << (cols % Q8_GROUP)) - 1
    };
    // Lane g % 16 of a register of 16 group scales, broadcast.
    let mut idx = [_mm512_setzero_si512(); 16];
    for (g, v) in idx.iter_mut().enumerate() {
        *v = _mm512_set1_epi32(g as i32);
    }
    let zero = _mm512_setzero_si512();
    for (d, o) in out.chunks_exact_mut(batch).enumerate() {
        let i = r0 + d;
        let w = m.q.as_ptr().add(i * cols);
        let ws = m.scales.as_ptr().add(i * groups).cast::<u16>();
        let mut acc = [_mm512_setzero_ps(); GEMV_F16_MAX_BATCH];
        let mut wsv = _mm512_setzero_ps();
        for g in 0..groups {
            if g % 16 == 0 {
                let left = (groups - g).min(16);
                let mask = ((1u32 << left) - 1) as u16;
                wsv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, ws.add(g).cast()));
            }
            let wscale = _mm512_permutexvar_ps(idx[g % 16], wsv);
            let codes = if g < full {
                _mm256_loadu_si256(w.add(g * Q8_GROUP).cast())
            } else {
                _mm256_maskz_loadu_epi8(tail_mask, w.add(g * Q8_GROUP).cast())
            };
            let wide = _mm512_cvtepi8_epi16(codes);
            for (bi, a) in acc[..batch].iter_mut().enumerate() {
                let xq = _mm512_loadu_si512(qx.item(bi).as_ptr().add(g * Q8_GROUP).cast());
                let dot = _mm512_dpwssd_epi32(zero, xq, wide);
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), wscale, *a);
            }
        }
        for (bi, (ob, a)) in o.iter_mut().zip(&acc[..batch]).enumerate() {
            *ob = _mm512_reduce_add_ps(*a) * qx.scales[bi];
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
        /// The fast and portable products equal the reference (same integers, f32
        /// summation), which lies within the rounding bound of the input from the exact
        /// product.
        #[test]
        fn i16_gemv_equals_reference_within_the_rounding_bound(
            rows in 1usize..1100, cols in 1usize..300, batch in 1usize..=GEMV_F16_MAX_BATCH,
            seed in 0u64..1000,
        ) {
            let (m, back) = matrix(rows, cols, seed);
            let mut rng = XorShift::new(seed + 1);
            let x: Vec<f32> = (0..batch * cols).map(|_| rng.next_gaussian()).collect();
            let mut fast = vec![f32::NAN; batch * rows];
            m.gemv_i16(&x, &mut fast).unwrap();
            let mut reference = vec![f32::NAN; batch * rows];
            m.gemv_i16_reference(&x, &mut reference).unwrap();
            let mut portable = vec![f32::NAN; batch * rows];
            let qx = QuantizedInput::new(&x, batch, cols);
            rows_portable(&m, 0, &qx, batch, &mut portable);
            for bi in 0..batch {
                let xr = &x[bi * cols..(bi + 1) * cols];
                let sx = qx.scales[bi] as f64;
                for i in 0..rows {
                    let wrow = &back[i * cols..(i + 1) * cols];
                    let abs: f64 = wrow.iter().zip(xr).map(|(w, v)| (w * v).abs() as f64).sum();
                    let (f, r) = (fast[bi * rows + i] as f64, reference[bi * rows + i] as f64);
                    let p = portable[i * batch + bi] as f64;
                    prop_assert!((f - r).abs() <= 1e-5 * (1.0 + abs), "fast {f} vs {r}");
                    prop_assert!((p - r).abs() <= 1e-5 * (1.0 + abs), "portable {p} vs {r}");
                    let exact: f64 = wrow.iter().zip(xr).map(|(w, v)| *w as f64 * *v as f64).sum();
                    let bound: f64 = wrow.iter().map(|w| w.abs() as f64 * sx / 2.0).sum();
                    prop_assert!((r - exact).abs() <= bound * 1.001 + 1e-6 * (1.0 + abs),
                        "{r} vs exact {exact}, bound {bound}");
                }
            }
        }
    }

    #[test]
    fn i16_gemv_checks_its_arguments_and_keeps_zero_inputs_zero() {
        let (m, _) = matrix(5, 40, 3);
        let mut y = vec![0.0; 5];
        assert!(m.gemv_i16(&[0.0; 39], &mut y).is_err());
        assert!(m.gemv_i16(&[0.0; 40], &mut [0.0; 4]).is_err());
        let nine = vec![1.0; 40 * (GEMV_F16_MAX_BATCH + 1)];
        assert!(m
            .gemv_i16(&nine, &mut [0.0; 5 * (GEMV_F16_MAX_BATCH + 1)])
            .is_err());
        m.gemv_i16(&[0.0; 40], &mut y).unwrap();
        assert_eq!(y, vec![0.0; 5]);
    }
}
