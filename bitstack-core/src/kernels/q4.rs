//! 4-bit group-quantized dense matrices for resident tensors (llama.cpp's Q4_0 rule).
//!
//! A large-vocabulary embedding and head dominate a small model's minimum (SmolLM2-135M:
//! the 49,152 × 576 embedding is 56.6 MB in f16, 30.1 MB in q8). [`Q4Matrix`] holds it in
//! 4.5 bits per value: per group of [`Q4_GROUP`] consecutive values of a row, one f16 scale
//! `d` and 4-bit codes `u ∈ 0..16` with `w ≈ d · (u − 8)`.
//!
//! ## The quantization rule and its error
//! As in llama.cpp's Q4_0, `d = m / −8` where `m` is the group's value of largest magnitude,
//! so `m` itself is exact (`u = 0`) and the step is `|m| / 8`, not `|m| / 7` as a symmetric
//! `−7..=7` code would give. Codes are `clamp(round(w / d), −8, 7) + 8`, computed with the
//! f16-rounded `d`, so every value whose ratio `w / d` is at most 7.5 is within `|d| / 2` of
//! its input; only values of the opposite sign to `m` and within one step of `|m|` are
//! clamped (to `7d`), and those are within `|m| − 7|d|`, one step up to the f16 rounding of
//! `d` (the property tests state both). The bound holds
//! whenever `d` is a normal f16 (`|m| ≥ 8 · 2⁻¹⁴`); smaller groups lose relative precision
//! to f16 subnormals, and a group of zeros stays zeros.
//!
//! ## Layout
//! Row `i` is `⌈cols / 2⌉` bytes: byte `k` holds value `2k` in its low nibble and `2k + 1`
//! in its high one (an odd last column leaves the last high nibble zero). Groups of 32
//! values are 16 bytes, so any column count works: the last group of a row may be short.
//! Scales are `⌈cols / 32⌉` per row. [`Q4Matrix::bytes_for`] is that count, the one
//! definition behind the byte accounting of a budget.
//!
//! ## Products
//! [`Q4Matrix::gemv`] (batch ≤ [`Q4_GEMV_MAX_BATCH`]) decodes a group's 32 codes once into
//! registers, takes the dot product of the integer codes with each batch item's 32 inputs
//! and scales the sum once per group: one multiply by `d` per group and item instead of per
//! value. It runs on the decode kernels' spinning pool, as the f16 and q8 GEMVs do.
//! [`Q4Matrix::gemv_reference`] is the plain reference (dequantize, then f64 sums).

use half::f16;
use rayon::prelude::*;

use crate::error::{check_len, check_row, CoreError, Result};
use crate::kernels::batch_of;

/// Values per scale of a [`Q4Matrix`] (llama.cpp's Q4_0 block size).
pub const Q4_GROUP: usize = 32;

/// Largest batch [`Q4Matrix::gemv`] takes (the fused kernels' small-batch limit); larger
/// batches dequantize rows for a GEMM.
pub const Q4_GEMV_MAX_BATCH: usize = crate::kernels::FUSED_MAX_BATCH;

/// Bytes of one group's codes.
const GROUP_BYTES: usize = Q4_GROUP / 2;

/// Rows per parallel task of [`Q4Matrix::gemv`]: 256 rows of 576 values are 81 KiB of codes,
/// enough to amortise a task and few enough to balance over the cores.
const ROWS_PER_TASK: usize = 256;

/// A dense `rows × cols` matrix in 4-bit codes with one f16 scale per [`Q4_GROUP`] values of
/// a row (4.5 bits per value when `cols` is a multiple of 32). See the module docs for the
/// rule, its error bound and the layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Q4Matrix {
    rows: usize,
    cols: usize,
    /// `rows × ⌈cols / 2⌉` bytes, two codes per byte (low nibble first).
    codes: Vec<u8>,
    /// `rows × ⌈cols / 32⌉` scales.
    scales: Vec<f16>,
}

/// Quantizes one group: writes its codes (`⌈g.len() / 2⌉` bytes) and returns its scale.
/// `g` must be finite.
fn quantize_group(g: &[f32], out: &mut [u8]) -> Result<f16> {
    // The value of largest magnitude, with its sign (the first one on ties, as llama.cpp).
    let m = g
        .iter()
        .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = f16::from_f32(m / -8.0);
    if !d.is_finite() {
        return Err(CoreError::InvalidParameter {
            name: "q4 source",
            reason: format!(
                "a group's largest magnitude {} exceeds the f16 scale range (8 × 65504)",
                m.abs()
            ),
        });
    }
    let df = d.to_f32();
    let code = |v: f32| -> u8 {
        if df == 0.0 {
            return 8;
        }
        ((v / df).round().clamp(-8.0, 7.0) + 8.0) as u8
    };
    for (o, pair) in out.iter_mut().zip(g.chunks(2)) {
        let lo = code(pair[0]);
        let hi = pair.get(1).map_or(0, |&v| code(v));
        *o = lo | (hi << 4);
    }
    Ok(d)
}

/// Decodes the codes of one group into `out` as the signed integers `u − 8` (as f32).
#[inline(always)]
fn decode_group(bytes: &[u8], out: &mut [f32]) {
    for (pair, &b) in out.chunks_mut(2).zip(bytes) {
        pair[0] = (b & 0x0f) as f32 - 8.0;
        if let Some(hi) = pair.get_mut(1) {
            *hi = (b >> 4) as f32 - 8.0;
        }
    }
}

/// Dot product of two 32-value groups with 8 independent lanes (vectorizes on any target).
#[inline(always)]
fn dot32(a: &[f32; Q4_GROUP], b: &[f32; Q4_GROUP]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    acc.iter().sum()
}

impl Q4Matrix {
    /// Bytes a `rows × cols` [`Q4Matrix`] holds: `⌈cols / 2⌉` code bytes and `⌈cols / 32⌉`
    /// two-byte scales per row. The byte accounting of a budget uses this count.
    pub fn bytes_for(rows: usize, cols: usize) -> u64 {
        rows as u64 * (cols.div_ceil(2) + 2 * cols.div_ceil(Q4_GROUP)) as u64
    }

    /// Quantizes `w` (`rows × cols`, row-major; values must be finite, and no group's largest
    /// magnitude may exceed 8 × 65504, the f16 scale range), in parallel over rows.
    pub fn quantize(rows: usize, cols: usize, w: &[f32]) -> Result<Self> {
        check_len("q4 source", rows * cols, w.len())?;
        Self::quantize_rows(rows, cols, &|i, dst| {
            dst.copy_from_slice(&w[i * cols..(i + 1) * cols])
        })
    }

    /// [`Q4Matrix::quantize`] from f16 values (what a stack file stores), widening one row at
    /// a time: no f32 copy of the whole matrix is made.
    pub fn quantize_f16(rows: usize, cols: usize, w: &[f16]) -> Result<Self> {
        use half::slice::HalfFloatSliceExt;
        check_len("q4 source", rows * cols, w.len())?;
        Self::quantize_rows(rows, cols, &|i, dst| {
            w[i * cols..(i + 1) * cols].convert_to_f32_slice(dst)
        })
    }

    /// Quantizes the rows `fill(i, dst)` writes as f32.
    fn quantize_rows(
        rows: usize,
        cols: usize,
        fill: &(dyn Fn(usize, &mut [f32]) + Sync),
    ) -> Result<Self> {
        let (row_bytes, groups) = (cols.div_ceil(2), cols.div_ceil(Q4_GROUP));
        let mut codes = vec![0u8; rows * row_bytes];
        let mut scales = vec![f16::ZERO; rows * groups];
        if rows > 0 && cols > 0 {
            codes
                .par_chunks_mut(row_bytes)
                .zip(scales.par_chunks_mut(groups))
                .enumerate()
                .try_for_each_init(
                    || vec![0.0f32; cols],
                    |row, (i, (crow, srow))| -> Result<()> {
                        fill(i, row);
                        if row.iter().any(|v| !v.is_finite()) {
                            return Err(CoreError::NonFinite("q4 source"));
                        }
                        for ((g, cg), s) in row
                            .chunks(Q4_GROUP)
                            .zip(crow.chunks_mut(GROUP_BYTES))
                            .zip(srow.iter_mut())
                        {
                            *s = quantize_group(g, cg)?;
                        }
                        Ok(())
                    },
                )?;
        }
        Ok(Self {
            rows,
            cols,
            codes,
            scales,
        })
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held (codes and scales): [`Q4Matrix::bytes_for`] of the shape.
    pub fn bytes(&self) -> u64 {
        (self.codes.len() + std::mem::size_of_val(self.scales.as_slice())) as u64
    }

    /// The scale of group `g` of row `i` (`w ≈ scale · (code − 8)`), `None` out of range.
    pub fn scale(&self, i: usize, g: usize) -> Option<f16> {
        let groups = self.cols.div_ceil(Q4_GROUP);
        (i < self.rows && g < groups).then(|| self.scales[i * groups + g])
    }

    fn row_parts(&self, i: usize) -> (&[u8], &[f16]) {
        let (rb, groups) = (self.cols.div_ceil(2), self.cols.div_ceil(Q4_GROUP));
        (
            &self.codes[i * rb..(i + 1) * rb],
            &self.scales[i * groups..(i + 1) * groups],
        )
    }

    /// Row `i` dequantized into `out` (`cols` values): the embedding lookup of token `i`.
    pub fn row_into(&self, i: usize, out: &mut [f32]) -> Result<()> {
        check_row(i, self.rows)?;
        check_len("q4 row output", self.cols, out.len())?;
        let (codes, scales) = self.row_parts(i);
        for ((og, cg), s) in out
            .chunks_mut(Q4_GROUP)
            .zip(codes.chunks(GROUP_BYTES))
            .zip(scales)
        {
            decode_group(cg, og);
            let s = s.to_f32();
            for o in og {
                *o *= s;
            }
        }
        Ok(())
    }

    /// Rows `r0..r0 + n` dequantized into `out` (`n × cols`).
    pub fn rows_into(&self, r0: usize, n: usize, out: &mut [f32]) -> Result<()> {
        check_len("q4 rows output", n * self.cols, out.len())?;
        if self.cols == 0 {
            return Ok(());
        }
        for (d, o) in out.chunks_exact_mut(self.cols).enumerate() {
            self.row_into(r0 + d, o)?;
        }
        Ok(())
    }

    fn check_product(&self, x: &[f32], y: &[f32]) -> Result<usize> {
        let batch = batch_of(x.len(), self.cols)?;
        check_len("output", batch * self.rows, y.len())?;
        Ok(batch)
    }

    /// Plain reference for `y (batch × rows) = x (batch × cols) · Ŵᵀ` with `Ŵ` the
    /// dequantized matrix: every row dequantized, products summed in f64. Any batch.
    pub fn gemv_reference(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        let batch = self.check_product(x, y)?;
        let cols = self.cols;
        let mut w = vec![0.0f32; cols];
        for i in 0..self.rows {
            self.row_into(i, &mut w)?;
            for b in 0..batch {
                let xr = &x[b * cols..(b + 1) * cols];
                let acc: f64 = w.iter().zip(xr).map(|(&a, &v)| a as f64 * v as f64).sum();
                y[b * self.rows + i] = acc as f32;
            }
        }
        Ok(())
    }

    /// `y (batch × rows) = x (batch × cols) · Ŵᵀ` for `batch ≤` [`Q4_GEMV_MAX_BATCH`], in
    /// parallel over rows on the kernel pool, dequantizing in registers (see the module
    /// docs). Equals [`Q4Matrix::gemv_reference`] up to f32 summation order.
    pub fn gemv(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        let batch = self.check_product(x, y)?;
        if batch > Q4_GEMV_MAX_BATCH {
            return Err(CoreError::InvalidParameter {
                name: "batch",
                reason: format!("{batch} > {Q4_GEMV_MAX_BATCH}; dequantize rows and use a GEMM"),
            });
        }
        super::pool::gemv_row_tiles(self.rows, batch, ROWS_PER_TASK, y, &|r0, out| {
            for (d, o) in out.chunks_exact_mut(batch).enumerate() {
                self.row_dot(r0 + d, x, batch, o);
            }
        });
        Ok(())
    }

    /// `out[β] = Ŵ_i · x_β` for the `batch` inputs of `x`.
    #[inline]
    fn row_dot(&self, i: usize, x: &[f32], batch: usize, out: &mut [f32]) {
        let cols = self.cols;
        let (codes, scales) = self.row_parts(i);
        let full = cols / Q4_GROUP;
        let mut acc = [0.0f32; Q4_GEMV_MAX_BATCH];
        let mut q = [0.0f32; Q4_GROUP];
        for (g, s) in scales.iter().enumerate().take(full) {
            decode_group(&codes[g * GROUP_BYTES..(g + 1) * GROUP_BYTES], &mut q);
            let s = s.to_f32();
            for (bi, a) in acc[..batch].iter_mut().enumerate() {
                let o = bi * cols + g * Q4_GROUP;
                // In bounds: o + 32 ≤ bi·cols + full·32 ≤ (bi + 1)·cols.
                let xg: &[f32; Q4_GROUP] = x[o..o + Q4_GROUP].try_into().unwrap_or(&[0.0; 32]);
                *a += s * dot32(&q, xg);
            }
        }
        let tail = cols - full * Q4_GROUP;
        if tail > 0 {
            let qt = &mut q[..tail];
            decode_group(&codes[full * GROUP_BYTES..], qt);
            let s = scales[full].to_f32();
            for (bi, a) in acc[..batch].iter_mut().enumerate() {
                let o = bi * cols + full * Q4_GROUP;
                let dot: f32 = qt.iter().zip(&x[o..o + tail]).map(|(c, v)| c * v).sum();
                *a += s * dot;
            }
        }
        out.copy_from_slice(&acc[..batch]);
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::slack;
    use super::*;
    use crate::testutil::XorShift;

    /// Every value of `w` against its dequantized value: within half a step where its code
    /// was not clamped, within `|m| − 7|d|` (one step) where it was (see the module docs).
    fn check_error_bound(m: &Q4Matrix, w: &[f32]) -> std::result::Result<(), String> {
        let (rows, cols) = (m.rows(), m.cols());
        let mut back = vec![0.0f32; cols];
        for i in 0..rows {
            m.row_into(i, &mut back).map_err(|e| e.to_string())?;
            let row = &w[i * cols..(i + 1) * cols];
            for (g, (wg, bg)) in row.chunks(Q4_GROUP).zip(back.chunks(Q4_GROUP)).enumerate() {
                let d = m.scale(i, g).ok_or("missing scale")?.to_f32();
                let amax = wg.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                for (&a, &b) in wg.iter().zip(bg) {
                    let clamped = a / d > 7.5;
                    let bound = if clamped {
                        amax - 7.0 * d.abs()
                    } else {
                        0.5 * d.abs()
                    } + slack(amax);
                    if (a - b).abs() > bound {
                        return Err(format!(
                            "row {i} group {g}: {a} -> {b}, scale {d}, clamped {clamped}"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn hand_computed_group() {
        // Largest magnitude −4 → d = 0.5; codes round(w / 0.5) + 8; 3.9 clamps to 7 → 3.5.
        let w = [-4.0, 0.0, 1.0, -1.2, 3.9, 0.26];
        let m = Q4Matrix::quantize(1, 6, &w).unwrap();
        assert_eq!(m.scale(0, 0), Some(f16::from_f32(0.5)));
        let mut back = [0.0f32; 6];
        m.row_into(0, &mut back).unwrap();
        assert_eq!(back, [-4.0, 0.0, 1.0, -1.0, 3.5, 0.5]);
        assert_eq!(m.bytes(), 3 + 2);
        assert_eq!(Q4Matrix::bytes_for(1, 6), 5);
    }

    #[test]
    fn zero_groups_stay_zero_and_bytes_count_the_layout() {
        let m = Q4Matrix::quantize(3, 33, &[0.0; 99]).unwrap();
        let mut back = vec![1.0f32; 99];
        m.rows_into(0, 3, &mut back).unwrap();
        assert!(back.iter().all(|&v| v == 0.0));
        // 17 code bytes and 2 scales per row.
        assert_eq!(m.bytes(), 3 * (17 + 4));
        assert_eq!(Q4Matrix::bytes_for(49_152, 576), 49_152 * (288 + 36));
        let empty = Q4Matrix::quantize(0, 5, &[]).unwrap();
        assert_eq!(empty.bytes(), 0);
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        assert!(matches!(
            Q4Matrix::quantize(2, 2, &[0.0, f32::NAN, 0.0, 0.0]),
            Err(CoreError::NonFinite(_))
        ));
        assert!(matches!(
            Q4Matrix::quantize(1, 2, &[1e6, 0.0]),
            Err(CoreError::InvalidParameter { .. })
        ));
        assert!(matches!(
            Q4Matrix::quantize(2, 3, &[0.0; 5]),
            Err(CoreError::ShapeMismatch { .. })
        ));
        let m = Q4Matrix::quantize(2, 3, &[1.0; 6]).unwrap();
        assert!(m.row_into(2, &mut [0.0; 3]).is_err());
        assert!(m.row_into(0, &mut [0.0; 4]).is_err());
        let mut y = vec![0.0; 2 * (Q4_GEMV_MAX_BATCH + 1)];
        let x = vec![0.0; 3 * (Q4_GEMV_MAX_BATCH + 1)];
        assert!(m.gemv(&x, &mut y).is_err());
        assert!(m.gemv_reference(&x, &mut y).is_ok());
        assert!(m.gemv(&[0.0; 4], &mut [0.0; 2]).is_err());
        assert!(m.gemv(&[0.0; 3], &mut [0.0; 3]).is_err());
    }

    /// The f16 entry point quantizes exactly what the f32 one does on the widened values.
    #[test]
    fn quantize_f16_equals_quantize_of_the_widened_values() {
        let mut rng = XorShift::new(5);
        let h: Vec<f16> = (0..7 * 45)
            .map(|_| f16::from_f32(rng.next_gaussian()))
            .collect();
        let f: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
        assert_eq!(
            Q4Matrix::quantize_f16(7, 45, &h).unwrap(),
            Q4Matrix::quantize(7, 45, &f).unwrap()
        );
    }

    /// A SmolLM2-wide matrix over several pool tasks, every batch size of the fast path.
    #[test]
    fn gemv_matches_reference_on_many_rows() {
        let mut rng = XorShift::new(11);
        let (rows, cols) = (700, 576);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| 0.05 * rng.next_gaussian())
            .collect();
        let m = Q4Matrix::quantize(rows, cols, &w).unwrap();
        check_error_bound(&m, &w).unwrap();
        for batch in [1, 2, 7, Q4_GEMV_MAX_BATCH] {
            let x: Vec<f32> = (0..batch * cols).map(|_| rng.next_gaussian()).collect();
            let (mut got, mut want) = (vec![0.0; batch * rows], vec![0.0; batch * rows]);
            m.gemv(&x, &mut got).unwrap();
            m.gemv_reference(&x, &mut want).unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
            }
        }
    }
}

#[cfg(test)]
mod proptests {
    use super::tests_support::*;
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any shape (odd column counts and short last groups included), values spanning six
        /// orders of magnitude: each value is within half a step of its input unless its code
        /// was clamped, then within `|m| − 7|d|` (one step, to the f16 rounding of `d`).
        #[test]
        fn dequantized_values_are_within_the_step(rows in 1usize..6, cols in 1usize..100,
                                                  scale in -3.0f32..3.0, seed in any::<u64>()) {
            let w = values(rows, cols, 10f32.powf(scale), seed);
            let m = Q4Matrix::quantize(rows, cols, &w).unwrap();
            prop_assert_eq!(m.bytes(), Q4Matrix::bytes_for(rows, cols));
            let mut back = vec![0.0f32; rows * cols];
            m.rows_into(0, rows, &mut back).unwrap();
            for i in 0..rows {
                for (g, (wg, bg)) in w[i * cols..(i + 1) * cols].chunks(Q4_GROUP)
                    .zip(back[i * cols..(i + 1) * cols].chunks(Q4_GROUP)).enumerate() {
                    let d = m.scale(i, g).unwrap().to_f32();
                    let amax = wg.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                    // The scale is the largest magnitude over 8, to f16 rounding (relative for a
                    // normal f16, half the smallest subnormal below).
                    prop_assert!((d.abs() - amax / 8.0).abs() <= (1e-3 * amax / 8.0).max(SUBNORMAL_HALF_STEP));
                    for (&a, &b) in wg.iter().zip(bg) {
                        let clamped = a / d > 7.5;
                        let bound = if clamped { amax - 7.0 * d.abs() } else { 0.5 * d.abs() } + slack(amax);
                        prop_assert!((a - b).abs() <= bound, "{} -> {} (scale {}, clamped {})", a, b, d, clamped);
                    }
                }
            }
        }

        /// The fast product equals the reference product on the dequantized matrix, for any
        /// shape and batch 1..=16, within f32 summation error (relative to Σ|ŵ||x|).
        #[test]
        fn gemv_equals_reference(rows in 1usize..40, cols in 1usize..150,
                                 batch in 1usize..=Q4_GEMV_MAX_BATCH, seed in any::<u64>()) {
            let w = values(rows, cols, 1.0, seed);
            let x = values(batch, cols, 2.0, seed ^ 0x5eed);
            let m = Q4Matrix::quantize(rows, cols, &w).unwrap();
            let (mut got, mut want) = (vec![f32::NAN; batch * rows], vec![f32::NAN; batch * rows]);
            m.gemv(&x, &mut got).unwrap();
            m.gemv_reference(&x, &mut want).unwrap();
            let mut wi = vec![0.0f32; cols];
            for i in 0..rows {
                m.row_into(i, &mut wi).unwrap();
                for b in 0..batch {
                    let mag: f32 = wi.iter().zip(&x[b * cols..(b + 1) * cols]).map(|(a, v)| (a * v).abs()).sum();
                    let (g, r) = (got[b * rows + i], want[b * rows + i]);
                    prop_assert!((g - r).abs() <= 1e-5 * mag + 1e-30, "row {} item {}: {} vs {}", i, b, g, r);
                }
            }
        }
    }
}

/// Deterministic test values and the error slack shared by the test modules.
#[cfg(test)]
mod tests_support {
    use crate::testutil::XorShift;

    /// Half the smallest f16 subnormal, 2⁻²⁵: how far a tiny group's rounded scale may be
    /// from `|m| / 8`.
    pub(super) const SUBNORMAL_HALF_STEP: f32 = 1.0 / (1u64 << 25) as f32;

    /// Slack on the per-value error bound: f32 rounding (relative to the group's largest
    /// magnitude `amax`) plus, for a group whose scale is an f16 subnormal or zero, eight
    /// times the scale's rounding (the extreme value's error then, see the module docs).
    pub(super) fn slack(amax: f32) -> f32 {
        1e-6 * amax + 8.0 * SUBNORMAL_HALF_STEP
    }

    /// `rows × cols` Gaussian values times `scale`, with one in nine set to zero and one in
    /// eleven a ±4σ outlier (the shapes of real embedding rows, ties and zeros included).
    pub(super) fn values(rows: usize, cols: usize, scale: f32, seed: u64) -> Vec<f32> {
        let mut rng = XorShift::new(seed);
        (0..rows * cols)
            .map(|_| {
                let r = rng.next_u64() % 99;
                let g = rng.next_gaussian();
                scale
                    * if r.is_multiple_of(9) {
                        0.0
                    } else if r.is_multiple_of(11) {
                        4.0 * g.signum()
                    } else {
                        g
                    }
            })
            .collect()
    }
}
