//! The one trait every linear-layer implementation shares.

use crate::error::{check_len, Result};
use crate::kernels::batch_of;

/// A linear layer `y = W x` that knows how to multiply: dense f32, a BitStack weight stack, a
/// quantized baseline or a GPU kernel. Model code (e.g. the Llama forward pass in `examples`)
/// is written against this trait only.
pub trait LinearOp: Send + Sync {
    /// Input features (`cols` of `W`).
    fn in_features(&self) -> usize;
    /// Output features (`rows` of `W`).
    fn out_features(&self) -> usize;
    /// `Y = X Wᵀ`: `x` holds `batch` rows of `in_features` (row-major), `y` receives `batch`
    /// rows of `out_features`; the batch is `x.len() / in_features`. Shape errors are reported,
    /// never panicked on.
    fn forward(&self, x: &[f32], y: &mut [f32]) -> Result<()>;
    /// Bytes of weight data this layer holds.
    fn weight_bytes(&self) -> u64;
}

/// A plain dense f32 weight: the reference every compressed layer is compared against.
#[derive(Clone, Debug)]
pub struct DenseLinear {
    rows: usize,
    cols: usize,
    w: Vec<f32>,
}

impl DenseLinear {
    /// `w` is `rows × cols`, row-major (PyTorch's `[out, in]`).
    pub fn new(rows: usize, cols: usize, w: Vec<f32>) -> Result<Self> {
        check_len("dense weight", rows * cols, w.len())?;
        Ok(Self { rows, cols, w })
    }
    /// The weights, row-major.
    pub fn weights(&self) -> &[f32] {
        &self.w
    }
}

impl LinearOp for DenseLinear {
    fn in_features(&self) -> usize {
        self.cols
    }
    fn out_features(&self) -> usize {
        self.rows
    }
    fn forward(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        let batch = batch_of(x.len(), self.cols)?;
        check_len("output", batch * self.rows, y.len())?;
        gemm_xwt(x, &self.w, self.rows, self.cols, y);
        Ok(())
    }
    fn weight_bytes(&self) -> u64 {
        (self.w.len() * 4) as u64
    }
}

/// `y (batch × rows) = x (batch × cols) · wᵀ`: faer's parallel GEMM with the default `faer`
/// feature, else [`gemm_xwt_plain`]. Lengths must already be checked by the caller.
pub(crate) fn gemm_xwt(x: &[f32], w: &[f32], rows: usize, cols: usize, y: &mut [f32]) {
    #[cfg(feature = "faer")]
    gemm_xwt_faer(x, w, rows, cols, y);
    #[cfg(not(feature = "faer"))]
    gemm_xwt_plain(x, w, rows, cols, y);
}

/// [`gemm_xwt`] on faer's parallel GEMM.
#[cfg(feature = "faer")]
fn gemm_xwt_faer(x: &[f32], w: &[f32], rows: usize, cols: usize, y: &mut [f32]) {
    let batch = x.len() / cols;
    debug_assert_eq!(w.len(), rows * cols);
    debug_assert_eq!(y.len(), batch * rows);
    let xm = faer::MatRef::from_row_major_slice(x, batch, cols);
    let wm = faer::MatRef::from_row_major_slice(w, rows, cols);
    let ym = faer::MatMut::from_row_major_slice_mut(y, batch, rows);
    faer::linalg::matmul::matmul(
        ym,
        faer::Accum::Replace,
        xm,
        wm.transpose(),
        1.0f32,
        faer::get_global_parallelism(),
    );
}

/// `y (batch × rows) = x (batch × cols) · wᵀ` without faer (`default-features = false`): rayon
/// over tiles of [`GEMM_BATCH_TILE`] input rows; inside a tile, each weight row is read once
/// for all of the tile's inputs (so `W` streams `batch / 8` times, not `batch` times), with
/// eight-lane partial sums the compiler vectorizes. Slower than faer's packed GEMM, but exact
/// to f32 rounding and dependency-free. Compiled (and tested) with either feature set.
#[cfg_attr(feature = "faer", allow(dead_code))]
fn gemm_xwt_plain(x: &[f32], w: &[f32], rows: usize, cols: usize, y: &mut [f32]) {
    use rayon::prelude::*;
    debug_assert_eq!(w.len(), rows * cols);
    debug_assert_eq!(y.len() * cols, x.len() * rows);
    if rows == 0 || cols == 0 {
        y.fill(0.0);
        return;
    }
    x.par_chunks(GEMM_BATCH_TILE * cols)
        .zip(y.par_chunks_mut(GEMM_BATCH_TILE * rows))
        .for_each(|(xt, yt)| {
            for (r, wr) in w.chunks_exact(cols).enumerate() {
                for (xb, yb) in xt.chunks_exact(cols).zip(yt.chunks_exact_mut(rows)) {
                    yb[r] = dot_f32(xb, wr);
                }
            }
        });
}

/// Input rows per tile of the faer-free GEMM: each weight row is reused from L1 this often.
const GEMM_BATCH_TILE: usize = 8;

/// `Σ a_i b_i` in eight independent lanes (vectorizable without reassociation flags).
#[inline]
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(p, q)| p * q)
        .sum();
    for (pa, pb) in a8.zip(b8) {
        for i in 0..8 {
            acc[i] += pa[i] * pb[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::XorShift;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Both batched products (the dispatched one — faer's with the default feature —
        /// and the faer-free one) equal `Σ_c x[b,c]·w[r,c]` in f64 to f32 rounding, at
        /// odd shapes.
        #[test]
        fn gemm_matches_f64_reference(rows in 1usize..40, cols in 1usize..70, batch in 1usize..20, seed: u64) {
            let mut rng = XorShift::new(seed);
            let x: Vec<f32> = (0..batch * cols).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
            let mut dispatched = vec![f32::NAN; batch * rows];
            let mut plain = vec![f32::NAN; batch * rows];
            gemm_xwt(&x, &w, rows, cols, &mut dispatched);
            gemm_xwt_plain(&x, &w, rows, cols, &mut plain);
            for (b, xb) in x.chunks_exact(cols).enumerate() {
                for (r, wr) in w.chunks_exact(cols).enumerate() {
                    let terms = xb.iter().zip(wr).map(|(p, q)| f64::from(*p) * f64::from(*q));
                    let want: f64 = terms.clone().sum();
                    let bound = terms.map(f64::abs).sum::<f64>() * 1e-5 + 1e-6;
                    for got in [dispatched[b * rows + r], plain[b * rows + r]] {
                        prop_assert!((f64::from(got) - want).abs() <= bound,
                            "b {} r {}: {} vs {}", b, r, got, want);
                    }
                }
            }
        }
    }
}
