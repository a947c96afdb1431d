//! Dense f16 products for small batches: `Y = X Wᵀ` with `W` stored in IEEE half precision
//! (an f16 embedding used as the tied output head, an f16 untied head).
//!
//! A decode step multiplies one token by the whole vocabulary (49,152 × 576 on SmolLM2,
//! 56.6 MB in f16): reading `W` once, widening in registers and never writing an f32 copy is
//! what bounds it. The AVX-512 kernel widens 16 halves per `vcvtph2ps` and keeps one
//! accumulator per batch item; the portable one widens a row at a time.

use crate::error::{check_len, check_row, Result};
use crate::kernels::batch_of;
use half::f16;
use half::slice::HalfFloatSliceExt;

/// Largest batch [`gemv_f16`] handles; larger batches belong to a GEMM.
pub const GEMV_F16_MAX_BATCH: usize = 8;

/// Rows per parallel task: 256 rows of 576 halves are 288 KiB, large enough to amortise the
/// task and small enough to balance over the cores.
const ROWS_PER_TASK: usize = 256;

/// `y (batch × rows) = x (batch × cols) · wᵀ` for `w` in f16 (`rows × cols`, row-major) and
/// `batch ≤` [`GEMV_F16_MAX_BATCH`], accumulating in f32, in parallel over rows.
pub fn gemv_f16(x: &[f32], w: &[f16], rows: usize, cols: usize, y: &mut [f32]) -> Result<()> {
    let batch = batch_of(x.len(), cols)?;
    check_len("f16 weight", rows * cols, w.len())?;
    check_len("output", batch * rows, y.len())?;
    if batch > GEMV_F16_MAX_BATCH {
        return Err(crate::CoreError::InvalidParameter {
            name: "batch",
            reason: format!("{batch} > {GEMV_F16_MAX_BATCH}; use a GEMM"),
        });
    }
    #[cfg(target_arch = "x86_64")]
    let fast = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let fast = false;
    // The decode kernels' spinning pool: no futex wake per head product.
    super::pool::gemv_row_tiles(rows, batch, ROWS_PER_TASK, y, &|r0, out| {
        let wc = &w[r0 * cols..(r0 + out.len() / batch) * cols];
        #[cfg(target_arch = "x86_64")]
        if fast {
            // SAFETY: AVX-512F was detected above; lengths are consistent by construction.
            unsafe { rows_avx512(x, wc, cols, batch, out) };
            return;
        }
        let _ = fast;
        rows_portable(x, wc, cols, batch, out);
    });
    Ok(())
}

fn rows_portable(x: &[f32], w: &[f16], cols: usize, batch: usize, yt: &mut [f32]) {
    let mut wrow = vec![0.0f32; cols];
    for (wr, out) in w.chunks_exact(cols).zip(yt.chunks_exact_mut(batch)) {
        wr.convert_to_f32_slice(&mut wrow);
        for (bi, o) in out.iter_mut().enumerate() {
            let xr = &x[bi * cols..(bi + 1) * cols];
            *o = wrow.iter().zip(xr).map(|(a, b)| a * b).sum();
        }
    }
}

/// # Safety
/// The CPU must support AVX-512F; `w.len()` is a multiple of `cols`, `x.len() == batch·cols`
/// and `yt.len() == batch · w.len() / cols`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(x: &[f32], w: &[f16], cols: usize, batch: usize, yt: &mut [f32]) {
    use std::arch::x86_64::*;
    let full = cols / 16;
    let tail = cols % 16;
    let tail_mask: u16 = ((1u32 << tail) - 1) as u16;
    for (wr, out) in w.chunks_exact(cols).zip(yt.chunks_exact_mut(batch)) {
        let mut acc = [_mm512_setzero_ps(); GEMV_F16_MAX_BATCH];
        let wp = wr.as_ptr().cast::<u16>();
        for c in 0..full {
            let wv = _mm512_cvtph_ps(_mm256_loadu_si256(wp.add(c * 16).cast()));
            for (bi, a) in acc[..batch].iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(x.as_ptr().add(bi * cols + c * 16));
                *a = _mm512_fmadd_ps(wv, xv, *a);
            }
        }
        if tail > 0 {
            let wv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                tail_mask,
                wp.add(full * 16).cast(),
            ));
            for (bi, a) in acc[..batch].iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_ps(tail_mask, x.as_ptr().add(bi * cols + full * 16));
                *a = _mm512_fmadd_ps(wv, xv, *a);
            }
        }
        for (o, a) in out.iter_mut().zip(&acc[..batch]) {
            *o = _mm512_reduce_add_ps(*a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::XorShift;

    #[test]
    fn gemv_f16_matches_f64_reference() {
        let mut rng = XorShift::new(3);
        for &(rows, cols, batch) in &[(1, 1, 1), (300, 37, 3), (513, 576, 1), (64, 16, 8)] {
            let w: Vec<f16> = (0..rows * cols)
                .map(|_| f16::from_f32(rng.next_f32()))
                .collect();
            let x: Vec<f32> = (0..batch * cols).map(|_| rng.next_f32()).collect();
            let mut y = vec![0.0; batch * rows];
            gemv_f16(&x, &w, rows, cols, &mut y).unwrap();
            for bi in 0..batch {
                for i in 0..rows {
                    let want: f64 = (0..cols)
                        .map(|j| w[i * cols + j].to_f64() * x[bi * cols + j] as f64)
                        .sum();
                    let got = y[bi * rows + i] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{got} vs {want}"
                    );
                }
            }
        }
        let mut y = vec![0.0; 9];
        assert!(gemv_f16(&[0.0; 9], &[f16::ZERO; 9], 1, 1, &mut y).is_err());
    }
}

/// Values per scale of a [`Q8Matrix`] (llama.cpp's Q8_0 block size).
pub const Q8_GROUP: usize = 32;

/// A dense `rows × cols` matrix quantized to int8 with one f16 scale per [`Q8_GROUP`]
/// consecutive values of a row (`w ≈ scale · q`, `|q| ≤ 127`): 8.5 bits per value, for
/// resident tensors such as a large-vocabulary embedding and head. Row lookups and the
/// small-batch product dequantize in registers; nothing is ever widened as a whole.
#[derive(Clone, Debug, PartialEq)]
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    pub(super) q: Vec<i8>,
    pub(super) scales: Vec<half::f16>,
}

impl Q8Matrix {
    /// Quantizes `w` (`rows × cols`, row-major; values must be finite): per group,
    /// `scale = max|w| / 127` rounded to f16, `q = round(w / scale)`.
    pub fn quantize(rows: usize, cols: usize, w: &[f32]) -> Result<Self> {
        check_len("q8 source", rows * cols, w.len())?;
        if w.iter().any(|v| !v.is_finite()) {
            return Err(crate::CoreError::NonFinite("q8 source"));
        }
        let groups = cols.div_ceil(Q8_GROUP);
        let mut q = vec![0i8; rows * cols];
        let mut scales = vec![half::f16::ZERO; rows * groups];
        for ((row, qrow), srow) in w
            .chunks_exact(cols)
            .zip(q.chunks_exact_mut(cols))
            .zip(scales.chunks_exact_mut(groups))
        {
            for ((g, qg), s) in row
                .chunks(Q8_GROUP)
                .zip(qrow.chunks_mut(Q8_GROUP))
                .zip(srow.iter_mut())
            {
                let max = g.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let scale = half::f16::from_f32(max / 127.0);
                *s = scale;
                let sf = scale.to_f32();
                let inv = if sf > 0.0 { 1.0 / sf } else { 0.0 };
                for (qv, v) in qg.iter_mut().zip(g) {
                    *qv = (v * inv).round().clamp(-127.0, 127.0) as i8;
                }
            }
        }
        Ok(Self {
            rows,
            cols,
            q,
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
    /// Bytes held (values and scales).
    pub fn bytes(&self) -> u64 {
        (self.q.len() + 2 * self.scales.len()) as u64
    }
    /// Row `i` dequantized into `out` (`cols` values).
    pub fn row_into(&self, i: usize, out: &mut [f32]) -> Result<()> {
        check_row(i, self.rows)?;
        check_len("q8 row output", self.cols, out.len())?;
        let groups = self.cols.div_ceil(Q8_GROUP);
        let q = &self.q[i * self.cols..(i + 1) * self.cols];
        let s = &self.scales[i * groups..(i + 1) * groups];
        for ((og, qg), sc) in out.chunks_mut(Q8_GROUP).zip(q.chunks(Q8_GROUP)).zip(s) {
            let sc = sc.to_f32();
            for (o, &v) in og.iter_mut().zip(qg) {
                *o = sc * v as f32;
            }
        }
        Ok(())
    }
    /// Rows `r0..r0 + n` dequantized into `out` (`n × cols`).
    pub fn rows_into(&self, r0: usize, n: usize, out: &mut [f32]) -> Result<()> {
        check_len("q8 rows output", n * self.cols, out.len())?;
        for (d, o) in out.chunks_exact_mut(self.cols).enumerate() {
            self.row_into(r0 + d, o)?;
        }
        Ok(())
    }
    /// `y (batch × rows) = x (batch × cols) · Wᵀ` for `batch ≤` [`GEMV_F16_MAX_BATCH`], in
    /// parallel over rows on the kernel pool.
    pub fn gemv(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        let (rows, cols) = (self.rows, self.cols);
        let batch = batch_of(x.len(), cols)?;
        check_len("output", batch * rows, y.len())?;
        if batch > GEMV_F16_MAX_BATCH {
            return Err(crate::CoreError::InvalidParameter {
                name: "batch",
                reason: format!("{batch} > {GEMV_F16_MAX_BATCH}; dequantize rows and use a GEMM"),
            });
        }
        #[cfg(target_arch = "x86_64")]
        let fast = std::arch::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        let fast = false;
        super::pool::gemv_row_tiles(rows, batch, ROWS_PER_TASK, y, &|r0, out| {
            #[cfg(target_arch = "x86_64")]
            if fast {
                // SAFETY: AVX-512F was detected above; the row range is inside the matrix.
                unsafe { self.rows_avx512(r0, x, batch, out) };
                return;
            }
            let _ = fast;
            self.rows_portable(r0, x, batch, out);
        });
        Ok(())
    }

    /// Rows `r0..r0 + out.len() / batch` of the product into `out` (row-major, `batch` per
    /// row): each row dequantized once, then one dot product per batch item.
    fn rows_portable(&self, r0: usize, x: &[f32], batch: usize, out: &mut [f32]) {
        let cols = self.cols;
        let groups = cols.div_ceil(Q8_GROUP);
        let mut wrow = vec![0.0f32; cols];
        for (d, o) in out.chunks_exact_mut(batch).enumerate() {
            let i = r0 + d;
            let q = &self.q[i * cols..(i + 1) * cols];
            let s = &self.scales[i * groups..(i + 1) * groups];
            for ((wg, qg), sc) in wrow.chunks_mut(Q8_GROUP).zip(q.chunks(Q8_GROUP)).zip(s) {
                let sc = sc.to_f32();
                for (w, &v) in wg.iter_mut().zip(qg) {
                    *w = sc * v as f32;
                }
            }
            for (bi, ob) in o.iter_mut().enumerate() {
                let xr = &x[bi * cols..(bi + 1) * cols];
                *ob = wrow.iter().zip(xr).map(|(a, b)| a * b).sum();
            }
        }
    }

    /// [`Self::rows_portable`] with AVX-512F: 16 codes widened per step (`vpmovsxbd`,
    /// `vcvtdq2ps`), scaled by their group's scale (a 16-lane step never straddles a group
    /// of 32), one accumulator per batch item.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `r0 + out.len() / batch ≤ rows`,
    /// `x.len() == batch · cols`, `batch ≤` [`GEMV_F16_MAX_BATCH`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn rows_avx512(&self, r0: usize, x: &[f32], batch: usize, out: &mut [f32]) {
        use std::arch::x86_64::*;
        const _: () = assert!(Q8_GROUP.is_multiple_of(16));
        let cols = self.cols;
        let groups = cols.div_ceil(Q8_GROUP);
        let full = cols / 16;
        let tail = cols % 16;
        let tail_mask: u16 = ((1u32 << tail) - 1) as u16;
        let steps_per_group = Q8_GROUP / 16;
        for (d, o) in out.chunks_exact_mut(batch).enumerate() {
            let i = r0 + d;
            let q = self.q.as_ptr().add(i * cols);
            let s = &self.scales[i * groups..(i + 1) * groups];
            let mut acc = [_mm512_setzero_ps(); GEMV_F16_MAX_BATCH];
            for c in 0..full {
                let codes = _mm512_cvtepi8_epi32(_mm_loadu_si128(q.add(c * 16).cast()));
                let sc = _mm512_set1_ps(s[c / steps_per_group].to_f32());
                let wv = _mm512_mul_ps(_mm512_cvtepi32_ps(codes), sc);
                for (bi, a) in acc[..batch].iter_mut().enumerate() {
                    let xv = _mm512_loadu_ps(x.as_ptr().add(bi * cols + c * 16));
                    *a = _mm512_fmadd_ps(wv, xv, *a);
                }
            }
            if tail > 0 {
                let mut buf = [0i8; 16];
                std::ptr::copy_nonoverlapping(q.add(full * 16), buf.as_mut_ptr(), tail);
                let codes = _mm512_cvtepi8_epi32(_mm_loadu_si128(buf.as_ptr().cast()));
                let sc = _mm512_set1_ps(s[full / steps_per_group].to_f32());
                let wv = _mm512_mul_ps(_mm512_cvtepi32_ps(codes), sc);
                for (bi, a) in acc[..batch].iter_mut().enumerate() {
                    let xv =
                        _mm512_maskz_loadu_ps(tail_mask, x.as_ptr().add(bi * cols + full * 16));
                    *a = _mm512_fmadd_ps(wv, xv, *a);
                }
            }
            for (ob, a) in o.iter_mut().zip(&acc[..batch]) {
                *ob = _mm512_reduce_add_ps(*a);
            }
        }
    }
}

#[cfg(test)]
mod q8_tests {
    use super::*;
    use crate::testutil::XorShift;

    #[test]
    fn q8_gemv_matches_the_dequantized_product_for_every_shape_and_batch() {
        let mut rng = XorShift::new(21);
        // Columns off every vector width and group size; rows over one task; batch 1 writes
        // its output in place, larger batches transpose.
        for &(rows, cols) in &[
            (1, 1),
            (5, 15),
            (7, 16),
            (3, 31),
            (9, 33),
            (300, 70),
            (2, 577),
        ] {
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.next_gaussian()).collect();
            let m = Q8Matrix::quantize(rows, cols, &w).unwrap();
            let mut back = vec![0.0; rows * cols];
            m.rows_into(0, rows, &mut back).unwrap();
            for batch in [1, 2, GEMV_F16_MAX_BATCH] {
                let x: Vec<f32> = (0..batch * cols).map(|_| rng.next_gaussian()).collect();
                let mut y = vec![f32::NAN; batch * rows];
                m.gemv(&x, &mut y).unwrap();
                let mut portable = vec![0.0; batch * rows];
                m.rows_portable(0, &x, batch, &mut portable);
                for bi in 0..batch {
                    for i in 0..rows {
                        let want: f64 = (0..cols)
                            .map(|j| back[i * cols + j] as f64 * x[bi * cols + j] as f64)
                            .sum();
                        let tol = 1e-4 * (1.0 + want.abs());
                        let got = y[bi * rows + i] as f64;
                        assert!(
                            (got - want).abs() <= tol,
                            "{rows}x{cols} b{batch}: {got} vs {want}"
                        );
                        let p = portable[i * batch + bi] as f64;
                        assert!((p - want).abs() <= tol, "portable {p} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn q8_round_trip_and_product() {
        let mut rng = XorShift::new(9);
        let (rows, cols) = (37, 70);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.next_gaussian()).collect();
        let m = Q8Matrix::quantize(rows, cols, &w).unwrap();
        assert_eq!(m.bytes(), (rows * cols + 2 * rows * 3) as u64);
        let mut back = vec![0.0; rows * cols];
        m.rows_into(0, rows, &mut back).unwrap();
        // Each value within half a step of its group's scale (plus the f16 rounding of it).
        for (wr, br) in w.chunks(cols).zip(back.chunks(cols)) {
            for (wv, bv) in wr.chunks(Q8_GROUP).zip(br.chunks(Q8_GROUP)) {
                let max = wv.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                for (a, b) in wv.iter().zip(bv) {
                    assert!(
                        (a - b).abs() <= 0.51 * max / 127.0 + 1e-3 * max,
                        "{a} vs {b}"
                    );
                }
            }
        }
        let x: Vec<f32> = (0..3 * cols).map(|_| rng.next_gaussian()).collect();
        let mut y = vec![0.0; 3 * rows];
        m.gemv(&x, &mut y).unwrap();
        for bi in 0..3 {
            for i in 0..rows {
                let want: f32 = (0..cols)
                    .map(|j| back[i * cols + j] * x[bi * cols + j])
                    .sum();
                assert!((y[bi * rows + i] - want).abs() <= 1e-4 * (1.0 + want.abs()));
            }
        }
        assert!(m.row_into(rows, &mut vec![0.0; cols]).is_err());
        assert!(Q8Matrix::quantize(2, 2, &[0.0, f32::NAN, 0.0, 0.0]).is_err());
    }
}
