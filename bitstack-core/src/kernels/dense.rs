//! Dense f16 products for small batches: `Y = X Wᵀ` with `W` stored in IEEE half precision
//! (an f16 embedding used as the tied output head, an f16 untied head).
//!
//! A decode step multiplies one token by the whole vocabulary (49,152 × 576 on SmolLM2,
//! 56.6 MB in f16): reading `W` once, widening in registers and never writing an f32 copy is
//! what bounds it. The AVX-512 kernel widens 16 halves per `vcvtph2ps` and keeps one
//! accumulator per batch item; the portable one widens a row at a time.

use crate::error::{check_len, Result};
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
    // Row-major output per task: yt[i][β], transposed at the end.
    let mut yt = vec![0.0f32; rows * batch];
    #[cfg(target_arch = "x86_64")]
    let fast = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let fast = false;
    let tasks = rows.div_ceil(ROWS_PER_TASK);
    let yt_ptr = super::SyncPtr(yt.as_mut_ptr());
    // The decode kernels' spinning pool: no futex wake per head product.
    super::pool::run(tasks, &|task, _slot| {
        let r0 = task * ROWS_PER_TASK;
        let n = ROWS_PER_TASK.min(rows - r0);
        let wc = &w[r0 * cols..(r0 + n) * cols];
        // SAFETY: task `task` alone owns rows r0..r0 + n of `yt`.
        let ytc =
            unsafe { std::slice::from_raw_parts_mut(yt_ptr.get().add(r0 * batch), n * batch) };
        #[cfg(target_arch = "x86_64")]
        if fast {
            // SAFETY: AVX-512F was detected above; lengths are consistent by construction.
            unsafe { rows_avx512(x, wc, cols, batch, ytc) };
            return;
        }
        let _ = fast;
        rows_portable(x, wc, cols, batch, ytc);
    });
    for (i, row) in yt.chunks_exact(batch).enumerate() {
        for (bi, v) in row.iter().enumerate() {
            y[bi * rows + i] = *v;
        }
    }
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
