//! The non-linear weights of a Llama model and the ready-made [`LinearTable`] provider.

use bitstack_core::kernels::dense::Q8Matrix;
use bitstack_core::kernels::q4::{Q4Matrix, Q4_GEMV_MAX_BATCH};
use bitstack_core::{DenseLinear, LinearOp};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::{LinearKind, LinearProvider, LlamaConfig, LlamaError, Result};
use crate::gguf::{ModelError, ModelSource};

/// Vocabulary rows of an f16 matrix widened to f32 at once by [`gemm_xwt_f16`]: 2048 × 576
/// f32 is 4.5 MiB of scratch, large enough for an efficient GEMM per chunk.
const F16_CHUNK_ROWS: usize = 2048;
/// Rows widened per rayon task inside one chunk.
const F16_CONVERT_ROWS: usize = 64;

/// `y (batch × rows) = x (batch × cols) · wᵀ` for an f16 `w` (`rows × cols`, row-major), without
/// ever holding an f32 copy of `w`: decode batches use the register-widening GEMV; larger
/// ones widen [`F16_CHUNK_ROWS`] rows at a time into one reusable f32 scratch and multiply
/// with faer's GEMM ([`gemm_xwt_chunked`]). Lengths must already be checked by the caller.
fn gemm_xwt_f16(x: &[f32], w: &[f16], rows: usize, cols: usize, y: &mut [f32]) {
    let batch = x.len() / cols;
    if batch <= bitstack_core::kernels::dense::GEMV_F16_MAX_BATCH {
        // Decode: read the f16 rows once and widen in registers (no f32 copy of W).
        if bitstack_core::kernels::dense::gemv_f16(x, w, rows, cols, y).is_ok() {
            return;
        }
    }
    debug_assert_eq!(w.len(), rows * cols);
    gemm_xwt_chunked(x, rows, cols, y, &|r0, n, dst| {
        dst.par_chunks_mut(F16_CONVERT_ROWS * cols)
            .zip(w[r0 * cols..(r0 + n) * cols].par_chunks(F16_CONVERT_ROWS * cols))
            .for_each(|(d, s)| s.convert_to_f32_slice(d));
    });
}

/// `y = x · Wᵀ` where `fill(r0, n, dst)` writes rows `r0..r0 + n` of `W` (`rows × cols`) as
/// f32 into `dst`: [`F16_CHUNK_ROWS`] rows at a time into one reusable scratch, each chunk
/// multiplied with faer's GEMM into the matching columns of `y`.
fn gemm_xwt_chunked(
    x: &[f32],
    rows: usize,
    cols: usize,
    y: &mut [f32],
    fill: &(dyn Fn(usize, usize, &mut [f32]) + Sync),
) {
    let batch = x.len() / cols;
    debug_assert_eq!(y.len(), batch * rows);
    let xm = MatRef::from_row_major_slice(x, batch, cols);
    let mut scratch = vec![0f32; F16_CHUNK_ROWS.min(rows) * cols];
    let mut ym = MatMut::from_row_major_slice_mut(y, batch, rows);
    let mut r0 = 0;
    while r0 < rows {
        let n = F16_CHUNK_ROWS.min(rows - r0);
        let dst = &mut scratch[..n * cols];
        fill(r0, n, dst);
        let wm = MatRef::from_row_major_slice(dst, n, cols);
        matmul(
            ym.as_mut().subcols_mut(r0, n),
            Accum::Replace,
            xm,
            wm.transpose(),
            1.0f32,
            faer::get_global_parallelism(),
        );
        r0 += n;
    }
}

/// Storage precision of the token embedding (and of an untied head loaded with
/// [`LlamaResident::from_source_with`]): the model contract's type, so the bytes a budget
/// counts ([`bitstack_format::ModelConfig::held_resident_bytes`]) and the bytes held here are
/// one definition.
pub use bitstack_format::EmbeddingPrecision;

/// The token embedding, `vocab × hidden` row-major, in its storage precision.
#[derive(Clone, Debug)]
pub enum TokenEmbedding {
    /// f32 values.
    F32(Vec<f32>),
    /// f16 values, widened one row (lookup) or one chunk of rows (tied head) at a time.
    F16(Vec<f16>),
    /// int8 values with f16 group scales, dequantized one row or one chunk at a time.
    Q8(Q8Matrix),
    /// 4-bit codes with f16 group scales, dequantized one row or one chunk at a time.
    Q4(Q4Matrix),
}

impl TokenEmbedding {
    /// The storage precision.
    pub fn precision(&self) -> EmbeddingPrecision {
        match self {
            Self::F32(_) => EmbeddingPrecision::F32,
            Self::F16(_) => EmbeddingPrecision::F16,
            Self::Q8(_) => EmbeddingPrecision::Q8,
            Self::Q4(_) => EmbeddingPrecision::Q4,
        }
    }

    /// Number of values, `vocab · hidden`.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
            Self::Q8(m) => m.rows() * m.cols(),
            Self::Q4(m) => m.rows() * m.cols(),
        }
    }

    /// Whether no values are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the values held.
    pub fn bytes(&self) -> u64 {
        match self {
            Self::F32(v) => std::mem::size_of_val(v.as_slice()) as u64,
            Self::F16(v) => std::mem::size_of_val(v.as_slice()) as u64,
            Self::Q8(m) => m.bytes(),
            Self::Q4(m) => m.bytes(),
        }
    }

    /// The values when stored as f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            Self::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The values when stored as f16.
    pub fn as_f16(&self) -> Option<&[f16]> {
        match self {
            Self::F16(v) => Some(v),
            _ => None,
        }
    }

    /// Appends row `row` (of `hidden` values) to `out`, widened to f32. The caller checks
    /// `row < vocab`.
    pub fn extend_row(&self, row: usize, hidden: usize, out: &mut Vec<f32>) {
        let r = row * hidden..(row + 1) * hidden;
        match self {
            Self::F32(v) => out.extend_from_slice(&v[r]),
            Self::F16(v) => {
                let start = out.len();
                out.resize(start + hidden, 0.0);
                v[r].convert_to_f32_slice(&mut out[start..]);
            }
            Self::Q8(m) => {
                let start = out.len();
                out.resize(start + hidden, 0.0);
                // The caller checked `row < vocab`; lengths match by construction.
                let _ = m.row_into(row, &mut out[start..]);
            }
            Self::Q4(m) => {
                let start = out.len();
                out.resize(start + hidden, 0.0);
                // The caller checked `row < vocab`; lengths match by construction.
                let _ = m.row_into(row, &mut out[start..]);
            }
        }
    }

    /// `y (batch × vocab) = x (batch × hidden) · Eᵀ`: the tied head. An f16 embedding is
    /// widened a chunk of rows at a time, never as a whole; a q8 one multiplies decode
    /// batches with `activations`.
    pub(crate) fn matmul_t(
        &self,
        x: &[f32],
        vocab: usize,
        hidden: usize,
        activations: HeadActivations,
        y: &mut [f32],
    ) {
        match self {
            Self::F32(e) => {
                let rows = x.len() / hidden;
                let xm = MatRef::from_row_major_slice(x, rows, hidden);
                let em = MatRef::from_row_major_slice(e, vocab, hidden);
                let ym = MatMut::from_row_major_slice_mut(y, rows, vocab);
                matmul(
                    ym,
                    Accum::Replace,
                    xm,
                    em.transpose(),
                    1.0f32,
                    faer::get_global_parallelism(),
                );
            }
            Self::F16(e) => gemm_xwt_f16(x, e, vocab, hidden, y),
            Self::Q8(m) => gemm_xwt_q8(x, m, activations, y),
            Self::Q4(m) => gemm_xwt_q4(x, m, y),
        }
    }

    /// Converts to `precision` (f32 → f16 rounds to nearest; f16 → f32 is exact; to Q8 or
    /// Q4 quantizes per group of 32; from Q8 or Q4 dequantizes).
    /// `hidden` is the row width (needed to group a Q8 or Q4 conversion by rows).
    pub fn into_precision(self, precision: EmbeddingPrecision, hidden: usize) -> Self {
        match (self, precision) {
            (Self::Q8(m), EmbeddingPrecision::Q8) => Self::Q8(m),
            (Self::Q8(m), p) => {
                let mut f = vec![0f32; m.rows() * m.cols()];
                // Lengths match by construction.
                let _ = m.rows_into(0, m.rows(), &mut f);
                Self::F32(f).into_precision(p, hidden)
            }
            (Self::Q4(m), EmbeddingPrecision::Q4) => Self::Q4(m),
            (Self::Q4(m), p) => {
                let mut f = vec![0f32; m.rows() * m.cols()];
                // Lengths match by construction.
                let _ = m.rows_into(0, m.rows(), &mut f);
                Self::F32(f).into_precision(p, hidden)
            }
            // From f16 directly, a row widened at a time (no f32 copy of the matrix).
            (Self::F16(v), EmbeddingPrecision::Q4) => {
                let rows = v.len() / hidden.max(1);
                match Q4Matrix::quantize_f16(rows, hidden, &v) {
                    Ok(m) => Self::Q4(m),
                    // Values that cannot be quantized (non-finite, beyond the f16 scale
                    // range) stay as they were.
                    Err(_) => Self::F16(v),
                }
            }
            (Self::F32(v), EmbeddingPrecision::Q4) => {
                let rows = v.len() / hidden.max(1);
                match Q4Matrix::quantize(rows, hidden, &v) {
                    Ok(m) => Self::Q4(m),
                    Err(_) => Self::F32(v),
                }
            }
            (Self::F16(v), EmbeddingPrecision::Q8) => {
                let mut f = vec![0f32; v.len()];
                v.convert_to_f32_slice(&mut f);
                Self::F32(f).into_precision(EmbeddingPrecision::Q8, hidden)
            }
            (Self::F32(v), EmbeddingPrecision::Q8) => {
                let rows = v.len() / hidden.max(1);
                match Q8Matrix::quantize(rows, hidden, &v) {
                    Ok(m) => Self::Q8(m),
                    // Non-finite values cannot be quantized; they stay as they were.
                    Err(_) => Self::F32(v),
                }
            }
            (Self::F32(v), EmbeddingPrecision::F16) => {
                let mut h = vec![f16::ZERO; v.len()];
                h.convert_from_f32_slice(&v);
                Self::F16(h)
            }
            (Self::F16(v), EmbeddingPrecision::F32) => {
                let mut f = vec![0f32; v.len()];
                v.convert_to_f32_slice(&mut f);
                Self::F32(f)
            }
            (same, _) => same,
        }
    }
}

/// `y = x · Wᵀ` for a [`Q8Matrix`] `W`: the pool GEMV for decode batches (with
/// `activations`), chunks of rows dequantized for a GEMM otherwise ([`gemm_xwt_chunked`]).
fn gemm_xwt_q8(x: &[f32], w: &Q8Matrix, activations: HeadActivations, y: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    let batch = x.len() / cols;
    if batch <= bitstack_core::kernels::dense::GEMV_F16_MAX_BATCH {
        let done = match activations {
            HeadActivations::Int16 => w.gemv_i16(x, y),
            HeadActivations::F32 => w.gemv(x, y),
        };
        if done.is_ok() {
            return;
        }
    }
    gemm_xwt_chunked(x, rows, cols, y, &|r0, n, dst| {
        // Lengths match by construction.
        let _ = w.rows_into(r0, n, dst);
    });
}

/// `y = x · Wᵀ` for a [`Q4Matrix`] `W`: the pool GEMV for batches up to
/// [`Q4_GEMV_MAX_BATCH`], chunks of rows dequantized for a GEMM otherwise.
fn gemm_xwt_q4(x: &[f32], w: &Q4Matrix, y: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    let batch = x.len() / cols;
    if batch <= Q4_GEMV_MAX_BATCH && w.gemv(x, y).is_ok() {
        return;
    }
    gemm_xwt_chunked(x, rows, cols, y, &|r0, n, dst| {
        // Lengths match by construction.
        let _ = w.rows_into(r0, n, dst);
    });
}

/// `x` must be whole rows of `cols` and `y` the same number of rows of `rows`.
fn check_linear_io(
    rows: usize,
    cols: usize,
    x: &[f32],
    y: &[f32],
    what: &'static str,
) -> bitstack_core::Result<()> {
    if cols == 0 || !x.len().is_multiple_of(cols) || y.len() != x.len() / cols * rows {
        return Err(bitstack_core::CoreError::ShapeMismatch {
            what,
            expected: cols,
            actual: x.len(),
        });
    }
    Ok(())
}

/// An untied head (or any dense weight) held as a [`Q4Matrix`].
#[derive(Clone, Debug)]
pub struct Q4Linear(pub Q4Matrix);

impl LinearOp for Q4Linear {
    fn in_features(&self) -> usize {
        self.0.cols()
    }
    fn out_features(&self) -> usize {
        self.0.rows()
    }
    fn forward(&self, x: &[f32], y: &mut [f32]) -> bitstack_core::Result<()> {
        check_linear_io(self.0.rows(), self.0.cols(), x, y, "q4 linear input/output")?;
        gemm_xwt_q4(x, &self.0, y);
        Ok(())
    }
    fn weight_bytes(&self) -> u64 {
        self.0.bytes()
    }
}

/// An untied head (or any dense weight) held as a [`Q8Matrix`].
#[derive(Clone, Debug)]
pub struct Q8Linear(pub Q8Matrix);

impl LinearOp for Q8Linear {
    fn in_features(&self) -> usize {
        self.0.cols()
    }
    fn out_features(&self) -> usize {
        self.0.rows()
    }
    fn forward(&self, x: &[f32], y: &mut [f32]) -> bitstack_core::Result<()> {
        check_linear_io(self.0.rows(), self.0.cols(), x, y, "q8 linear input/output")?;
        gemm_xwt_q8(x, &self.0, HeadActivations::F32, y);
        Ok(())
    }
    fn weight_bytes(&self) -> u64 {
        self.0.bytes()
    }
}

/// A dense `rows × cols` weight stored in f16 and multiplied a chunk of rows at a time (see
/// [`TokenEmbedding`]); the f16 counterpart of [`DenseLinear`], used for an untied head.
#[derive(Clone, Debug)]
pub struct HalfLinear {
    rows: usize,
    cols: usize,
    w: Vec<f16>,
}

impl HalfLinear {
    /// `w` is `rows × cols`, row-major (PyTorch's `[out, in]`).
    pub fn new(rows: usize, cols: usize, w: Vec<f16>) -> bitstack_core::Result<Self> {
        if w.len() != rows * cols {
            return Err(bitstack_core::CoreError::ShapeMismatch {
                what: "f16 dense weight",
                expected: rows * cols,
                actual: w.len(),
            });
        }
        Ok(Self { rows, cols, w })
    }

    /// Rounds an f32 `rows × cols` weight to f16.
    pub fn from_f32(rows: usize, cols: usize, w: &[f32]) -> bitstack_core::Result<Self> {
        let mut h = vec![f16::ZERO; w.len()];
        h.convert_from_f32_slice(w);
        Self::new(rows, cols, h)
    }

    /// The weights, row-major.
    pub fn weights(&self) -> &[f16] {
        &self.w
    }
}

impl LinearOp for HalfLinear {
    fn in_features(&self) -> usize {
        self.cols
    }
    fn out_features(&self) -> usize {
        self.rows
    }
    fn forward(&self, x: &[f32], y: &mut [f32]) -> bitstack_core::Result<()> {
        let shape_err = |what, expected, actual| bitstack_core::CoreError::ShapeMismatch {
            what,
            expected,
            actual,
        };
        if self.cols == 0 || !x.len().is_multiple_of(self.cols) {
            return Err(shape_err("input", self.cols, x.len()));
        }
        let batch = x.len() / self.cols;
        if y.len() != batch * self.rows {
            return Err(shape_err("output", batch * self.rows, y.len()));
        }
        gemm_xwt_f16(x, &self.w, self.rows, self.cols, y);
        Ok(())
    }
    fn weight_bytes(&self) -> u64 {
        std::mem::size_of_val(self.w.as_slice()) as u64
    }
}

/// Q/K/V biases of one block (Qwen2-style models).
#[derive(Clone, Debug)]
pub(crate) struct QkvBias {
    pub(crate) q: Vec<f32>,
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
}

/// Per-block resident tensors.
#[derive(Clone, Debug)]
pub(crate) struct BlockResident {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) bias: Option<QkvBias>,
}

/// Everything of a Llama model except the seven linears of each block: the token embedding,
/// the RMSNorm weights, optional Q/K/V biases and the output head.
///
/// The embedding is f32 by default; [`LlamaResident::into_f16_embeddings`] (or
/// [`LlamaResident::from_source_with`]) stores it as f16, halving its bytes, with lookups and
/// the tied head widening rows on the fly. [`LlamaResident::held_bytes`] counts everything held.
///
/// With tied embeddings the head multiplies by `token_embd` directly (no second copy); an
/// untied head is a [`LinearOp`] so it can be swapped for a compressed one with
/// [`LlamaResident::set_head`].
pub struct LlamaResident {
    pub(crate) config: LlamaConfig,
    pub(crate) token_embd: TokenEmbedding,
    pub(crate) blocks: Vec<BlockResident>,
    pub(crate) output_norm: Vec<f32>,
    pub(crate) head: Option<Box<dyn LinearOp>>,
    pub(crate) head_activations: HeadActivations,
}

/// How a q8 tied head ([`EmbeddingPrecision::Q8`]) multiplies a decode batch (≤ 8 rows;
/// larger batches dequantize rows for an f32 GEMM either way).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HeadActivations {
    /// Inputs rounded to int16, one scale per input ([`Q8Matrix::gemv_i16`], VNNI where
    /// the CPU has it): the default.
    #[default]
    Int16,
    /// Inputs in f32 ([`Q8Matrix::gemv`]): the exact product of the stored weights.
    F32,
}

impl std::fmt::Debug for LlamaResident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaResident")
            .field("config", &self.config)
            .field("embedding", &self.token_embd.precision())
            .field("untied_head", &self.head.is_some())
            .finish_non_exhaustive()
    }
}

fn load(
    src: &dyn ModelSource,
    name: &str,
    expected: &[usize],
) -> std::result::Result<Vec<f32>, LlamaError> {
    let (shape, data) = src.tensor_f32(name)?;
    if shape != expected {
        return Err(LlamaError::TensorShape {
            name: name.to_owned(),
            expected: expected.to_vec(),
            actual: shape,
        });
    }
    if data.iter().any(|v| !v.is_finite()) {
        return Err(LlamaError::NonFinite(name.to_owned()));
    }
    Ok(data)
}

impl LlamaResident {
    /// Reads the resident tensors of `src` (dequantized to f32). An untied head becomes a
    /// [`DenseLinear`].
    pub fn from_source(src: &dyn ModelSource) -> Result<Self> {
        Self::from_source_with(src, EmbeddingPrecision::F32)
    }

    /// Like [`LlamaResident::from_source`], storing the token embedding in `precision`; with
    /// [`EmbeddingPrecision::F16`] an untied head becomes a [`HalfLinear`]. Each tensor is
    /// dequantised to f32 and then rounded, so the f32 copy of one tensor exists only briefly.
    pub fn from_source_with(src: &dyn ModelSource, precision: EmbeddingPrecision) -> Result<Self> {
        let c = src.config().clone();
        c.validate()?;
        let token_embd = TokenEmbedding::F32(load(src, "token_embd.weight", &[c.vocab, c.hidden])?)
            .into_precision(precision, c.hidden);
        let (q, kv) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let blocks = (0..c.n_layers)
            .map(|l| {
                let bias = if c.attn_bias {
                    Some(QkvBias {
                        q: load(src, &format!("blk.{l}.attn_q.bias"), &[q])?,
                        k: load(src, &format!("blk.{l}.attn_k.bias"), &[kv])?,
                        v: load(src, &format!("blk.{l}.attn_v.bias"), &[kv])?,
                    })
                } else {
                    None
                };
                Ok(BlockResident {
                    attn_norm: load(src, &format!("blk.{l}.attn_norm.weight"), &[c.hidden])?,
                    ffn_norm: load(src, &format!("blk.{l}.ffn_norm.weight"), &[c.hidden])?,
                    bias,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let output_norm = load(src, "output_norm.weight", &[c.hidden])?;
        let head: Option<Box<dyn LinearOp>> = if c.tied_embeddings {
            None
        } else {
            let w = load(src, "output.weight", &[c.vocab, c.hidden])?;
            Some(match precision {
                EmbeddingPrecision::F32 => Box::new(DenseLinear::new(c.vocab, c.hidden, w)?),
                EmbeddingPrecision::F16 => Box::new(HalfLinear::from_f32(c.vocab, c.hidden, &w)?),
                EmbeddingPrecision::Q8 => {
                    Box::new(Q8Linear(Q8Matrix::quantize(c.vocab, c.hidden, &w)?))
                }
                EmbeddingPrecision::Q4 => {
                    Box::new(Q4Linear(Q4Matrix::quantize(c.vocab, c.hidden, &w)?))
                }
            })
        };
        Ok(Self {
            config: c,
            token_embd,
            blocks,
            output_norm,
            head,
            head_activations: HeadActivations::default(),
        })
    }

    /// Random resident weights of the right shapes (for tests, benchmarks and examples):
    /// embedding entries uniform in `[-1, 1)`, norm weights near 1, small biases when
    /// `config.attn_bias`, and a random dense head when the config is untied.
    pub fn random(config: &LlamaConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let c = config;
        let mut rng = super::SplitMix64::new(seed);
        let mut vec = |n: usize, centre: f32, spread: f32| -> Vec<f32> {
            (0..n)
                .map(|_| centre + spread * rng.next_signed())
                .collect()
        };
        let token_embd = TokenEmbedding::F32(vec(c.vocab * c.hidden, 0.0, 1.0));
        let (q, kv) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let blocks = (0..c.n_layers)
            .map(|_| BlockResident {
                attn_norm: vec(c.hidden, 1.0, 0.2),
                ffn_norm: vec(c.hidden, 1.0, 0.2),
                bias: c.attn_bias.then(|| QkvBias {
                    q: vec(q, 0.0, 0.3),
                    k: vec(kv, 0.0, 0.3),
                    v: vec(kv, 0.0, 0.3),
                }),
            })
            .collect();
        let output_norm = vec(c.hidden, 1.0, 0.2);
        let head: Option<Box<dyn LinearOp>> = if c.tied_embeddings {
            None
        } else {
            let w = vec(c.vocab * c.hidden, 0.0, 1.0);
            Some(Box::new(DenseLinear::new(c.vocab, c.hidden, w)?))
        };
        Ok(Self {
            config: c.clone(),
            token_embd,
            blocks,
            output_norm,
            head,
            head_activations: HeadActivations::default(),
        })
    }

    /// The model hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The token embedding, `vocab × hidden` row-major, in its storage precision.
    pub fn token_embd(&self) -> &TokenEmbedding {
        &self.token_embd
    }

    /// Stores the token embedding as f16 (round to nearest), halving its bytes. An untied
    /// head is left as it is (load with [`LlamaResident::from_source_with`] or call
    /// [`LlamaResident::set_head`] with a [`HalfLinear`] for an f16 one).
    pub fn into_f16_embeddings(self) -> Self {
        self.with_embedding_precision(EmbeddingPrecision::F16)
    }

    /// Stores the token embedding in `precision`.
    pub fn with_embedding_precision(mut self, precision: EmbeddingPrecision) -> Self {
        let hidden = self.config.hidden;
        self.token_embd = self.token_embd.into_precision(precision, hidden);
        self
    }

    /// Bytes of every tensor held: the embedding in its storage precision, the f32 norm
    /// weights and biases, and an untied head's [`LinearOp::weight_bytes`].
    pub fn held_bytes(&self) -> u64 {
        let f32s = (self.param_count() - self.token_embd.len()) as u64;
        self.token_embd.bytes()
            + f32s * std::mem::size_of::<f32>() as u64
            + self.head.as_ref().map_or(0, |h| h.weight_bytes())
    }

    /// How a q8 tied head multiplies decode batches.
    pub fn head_activations(&self) -> HeadActivations {
        self.head_activations
    }

    /// Sets how a q8 tied head multiplies decode batches. (An untied q8 head, a
    /// [`Q8Linear`], always multiplies f32 inputs.)
    pub fn set_head_activations(&mut self, activations: HeadActivations) {
        self.head_activations = activations;
    }

    /// The untied output head, `None` when the head is the token embedding.
    pub fn head(&self) -> Option<&dyn LinearOp> {
        self.head.as_deref()
    }

    /// Replaces the output head (it must map `hidden → vocab`); returns the previous untied
    /// head, if any. Setting a head on a tied model unties it.
    pub fn set_head(&mut self, head: Box<dyn LinearOp>) -> Result<Option<Box<dyn LinearOp>>> {
        let c = &self.config;
        if head.in_features() != c.hidden || head.out_features() != c.vocab {
            return Err(LlamaError::InvalidParameter {
                name: "head",
                reason: format!(
                    "maps {} -> {}, expected {} -> {}",
                    head.in_features(),
                    head.out_features(),
                    c.hidden,
                    c.vocab
                ),
            });
        }
        Ok(self.head.replace(head))
    }

    /// Number of values held here (f32 or, for an f16 embedding, f16), excluding an untied head (whose size is
    /// [`LinearOp::weight_bytes`] of [`LlamaResident::head`]).
    pub fn param_count(&self) -> usize {
        self.token_embd.len()
            + self.output_norm.len()
            + self
                .blocks
                .iter()
                .map(|b| {
                    b.attn_norm.len()
                        + b.ffn_norm.len()
                        + b.bias
                            .as_ref()
                            .map_or(0, |q| q.q.len() + q.k.len() + q.v.len())
                })
                .sum::<usize>()
    }
}

/// A [`LinearProvider`] holding one boxed [`LinearOp`] per `(layer, kind)`.
pub struct LinearTable {
    layers: Vec<[Box<dyn LinearOp>; 7]>,
}

impl std::fmt::Debug for LinearTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinearTable")
            .field("layers", &self.layers.len())
            .finish_non_exhaustive()
    }
}

impl LinearTable {
    /// Wraps per-layer ops, indexed by [`LinearKind::index`]. Shapes are checked by
    /// [`super::Llama::new`].
    pub fn new(layers: Vec<[Box<dyn LinearOp>; 7]>) -> Self {
        Self { layers }
    }

    /// Every linear of `src` as a dense f32 [`DenseLinear`]: the original model.
    pub fn dense_from_source(src: &dyn ModelSource) -> Result<Self> {
        let c = src.config().clone();
        c.validate()?;
        let layers = (0..c.n_layers)
            .map(|l| {
                let ops = LinearKind::ALL.map(|kind| -> Result<Box<dyn LinearOp>> {
                    let (out, inp) = kind.shape(&c);
                    let w = load(src, &kind.tensor_name(l), &[out, inp])?;
                    Ok(Box::new(DenseLinear::new(out, inp, w)?))
                });
                collect_array(ops)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// Random dense linears of the right shapes (for tests, benchmarks and examples), entries
    /// uniform with variance `1 / in_features` so activations keep their scale.
    pub fn random(config: &LlamaConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = super::SplitMix64::new(seed);
        let layers = (0..config.n_layers)
            .map(|_| {
                let ops = LinearKind::ALL.map(|kind| -> Result<Box<dyn LinearOp>> {
                    let (out, inp) = kind.shape(config);
                    let amp = (3.0 / inp as f32).sqrt();
                    let w = (0..out * inp).map(|_| amp * rng.next_signed()).collect();
                    Ok(Box::new(DenseLinear::new(out, inp, w)?))
                });
                collect_array(ops)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// Number of layers held.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Swaps in `op` for `(layer, kind)`, returning the previous op. The shape is checked
    /// against the old op's.
    pub fn replace(
        &mut self,
        layer: usize,
        kind: LinearKind,
        op: Box<dyn LinearOp>,
    ) -> Result<Box<dyn LinearOp>> {
        let n_layers = self.layers.len();
        let slot = self
            .layers
            .get_mut(layer)
            .map(|ops| &mut ops[kind.index()])
            .ok_or(LlamaError::NoSuchLayer { layer, n_layers })?;
        if (slot.in_features(), slot.out_features()) != (op.in_features(), op.out_features()) {
            return Err(LlamaError::LinearShape {
                layer,
                kind,
                expected_in: slot.in_features(),
                expected_out: slot.out_features(),
                actual_in: op.in_features(),
                actual_out: op.out_features(),
            });
        }
        Ok(std::mem::replace(slot, op))
    }
}

fn collect_array(ops: [Result<Box<dyn LinearOp>>; 7]) -> Result<[Box<dyn LinearOp>; 7]> {
    let v = ops.into_iter().collect::<Result<Vec<_>>>()?;
    v.try_into()
        .map_err(|_| LlamaError::Model(ModelError::Unsupported("linear count".into())))
}

/// Stands in for a linear the table does not hold: its `0 -> 0` shape makes
/// [`super::Llama::new`] report the gap as a [`LlamaError::LinearShape`] instead of panicking.
struct Missing;

impl LinearOp for Missing {
    fn in_features(&self) -> usize {
        0
    }
    fn out_features(&self) -> usize {
        0
    }
    fn forward(&self, x: &[f32], _y: &mut [f32]) -> bitstack_core::Result<()> {
        Err(bitstack_core::CoreError::ShapeMismatch {
            what: "missing linear layer",
            expected: 0,
            actual: x.len(),
        })
    }
    fn weight_bytes(&self) -> u64 {
        0
    }
}

impl LinearProvider for LinearTable {
    /// A layer past [`LinearTable::n_layers`] yields a `0 -> 0` placeholder that
    /// [`super::Llama::new`] rejects.
    fn linear(&self, layer: usize, kind: LinearKind) -> &dyn LinearOp {
        match self.layers.get(layer) {
            Some(ops) => ops[kind.index()].as_ref(),
            None => &Missing,
        }
    }
}
