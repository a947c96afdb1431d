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

/// `y (batch × rows) = x (batch × cols) · wᵀ`, with faer's parallel GEMM. Lengths must already
/// be checked by the caller.
pub(crate) fn gemm_xwt(x: &[f32], w: &[f32], rows: usize, cols: usize, y: &mut [f32]) {
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
