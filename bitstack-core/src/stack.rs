//! Weight stacks: one linear weight as an ordered stack of residual blocks.

use crate::block::{FactorDtype, ResidualBlock, ResidualBlockRef};
use crate::budget::block_bytes;
use crate::error::{check_len, CoreError, Result};
use crate::kernels::{self, FusedParams};
use crate::linear::LinearOp;
use std::cell::RefCell;

thread_local! {
    /// Per-thread scratch of [`WeightStack`]'s `forward` (see [`release_thread_scratch`]).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Frees the calling thread's reusable product scratch (the tables of the largest small-batch
/// product it ran: ~2.5 MB for one SmolLM2 token at 8 levels, up to batch × that). It is
/// re-allocated on the next product; call this when a thread stops running products, or before
/// measuring the heap.
pub fn release_thread_scratch() {
    SCRATCH.with(|cell| {
        if let Ok(mut s) = cell.try_borrow_mut() {
            *s = Vec::new();
        }
    });
}

/// Bytes of the calling thread's reusable product scratch.
pub fn thread_scratch_bytes() -> u64 {
    SCRATCH.with(|cell| cell.try_borrow().map_or(0, |s| 4 * s.capacity() as u64))
}
use std::sync::Arc;

/// What is known about a weight stack before any block is loaded.
#[derive(Clone, Debug, PartialEq)]
pub struct StackMeta {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Output features `m`.
    pub rows: usize,
    /// Input features `n`.
    pub cols: usize,
    /// Singular vectors per block `k`.
    pub rank: usize,
    /// Blocks this weight has in total (decomposition iterations).
    pub levels: u16,
    /// Activation scale `s` per input column (paper eq. 3-4); `None` when the scale was folded
    /// into a preceding layer or scaling is off. Restoration divides column `j` by `s[j]`.
    pub scale: Option<Vec<f32>>,
    /// Storage type of every block's factors (one per stack).
    pub factors: FactorDtype,
}

impl StackMeta {
    /// Validates dimensions and the scale vector (finite, strictly positive).
    pub fn validate(&self) -> Result<()> {
        if self.rows == 0 || self.cols == 0 || self.rank == 0 || self.levels == 0 {
            return Err(CoreError::InvalidParameter {
                name: "stack meta",
                reason: format!(
                    "{}: rows, cols, rank and levels must be positive",
                    self.name
                ),
            });
        }
        if let Some(s) = &self.scale {
            check_len("scale vector", self.cols, s.len())?;
            if s.iter().any(|v| !v.is_finite() || *v <= 0.0) {
                return Err(CoreError::NonFinite(
                    "scale vector (must be finite and > 0)",
                ));
            }
        }
        Ok(())
    }
    /// Bytes of one block of this weight.
    pub fn block_bytes(&self) -> u64 {
        block_bytes(self.rows, self.cols, self.rank, self.factors)
    }
    /// Bytes the scale vector holds (f32).
    pub fn scale_bytes(&self) -> u64 {
        self.scale.as_ref().map_or(0, |s| 4 * s.len() as u64)
    }
}

/// A weight with a loaded prefix of its blocks. Cheap to clone (blocks are shared), so a
/// snapshot of a whole model is a vector of these.
#[derive(Clone, Debug)]
pub struct WeightStack {
    meta: Arc<StackMeta>,
    inv_scale: Option<Arc<[f32]>>,
    blocks: Vec<Arc<ResidualBlock>>,
    params: FusedParams,
}

impl WeightStack {
    /// A stack with no block loaded.
    pub fn new(meta: Arc<StackMeta>) -> Result<Self> {
        meta.validate()?;
        let inv_scale = meta
            .scale
            .as_ref()
            .map(|s| s.iter().map(|v| 1.0 / v).collect::<Arc<[f32]>>());
        Ok(Self {
            meta,
            inv_scale,
            blocks: Vec::new(),
            params: FusedParams::default(),
        })
    }
    /// A stack holding `blocks` as its levels 0, 1, ...
    pub fn with_blocks(meta: Arc<StackMeta>, blocks: Vec<Arc<ResidualBlock>>) -> Result<Self> {
        let mut s = Self::new(meta)?;
        for b in blocks {
            s.push(b)?;
        }
        Ok(s)
    }
    /// Appends the next level.
    pub fn push(&mut self, block: Arc<ResidualBlock>) -> Result<()> {
        check_len("block rows", self.meta.rows, block.rows())?;
        check_len("block cols", self.meta.cols, block.cols())?;
        check_len("block rank", self.meta.rank, block.rank())?;
        if block.factor_dtype() != self.meta.factors {
            return Err(CoreError::InvalidParameter {
                name: "factor dtype",
                reason: format!(
                    "{}: block has {} factors, the stack {}",
                    self.meta.name,
                    block.factor_dtype(),
                    self.meta.factors
                ),
            });
        }
        if self.blocks.len() >= self.meta.levels as usize {
            return Err(CoreError::NoSuchBlock {
                weight: u32::MAX,
                level: self.blocks.len() as u16,
            });
        }
        self.blocks.push(block);
        Ok(())
    }
    /// Drops the top level, returning it.
    pub fn pop(&mut self) -> Option<Arc<ResidualBlock>> {
        self.blocks.pop()
    }
    /// Keeps only the first `levels` blocks.
    pub fn truncate(&mut self, levels: usize) {
        self.blocks.truncate(levels);
    }
    /// Static description.
    pub fn meta(&self) -> &Arc<StackMeta> {
        &self.meta
    }
    /// Loaded blocks, level order.
    pub fn blocks(&self) -> &[Arc<ResidualBlock>] {
        &self.blocks
    }
    /// Number of loaded levels.
    pub fn loaded_levels(&self) -> usize {
        self.blocks.len()
    }
    /// `1/s` per input column, if scaled.
    pub fn inv_scale(&self) -> Option<&[f32]> {
        self.inv_scale.as_deref()
    }
    fn refs(&self, levels: usize) -> Result<Vec<ResidualBlockRef<'_>>> {
        if levels > self.blocks.len() {
            return Err(CoreError::InvalidParameter {
                name: "levels",
                reason: format!("{levels} requested, {} loaded", self.blocks.len()),
            });
        }
        Ok(self.blocks[..levels].iter().map(|b| b.view()).collect())
    }
    /// Restores the dense `Ŵ` of the first `levels` loaded levels, scale divided out, into
    /// `out` (`rows × cols`, row-major).
    pub fn restore_into(&self, levels: usize, out: &mut [f32]) -> Result<()> {
        let refs = self.refs(levels)?;
        kernels::restore_into(&refs, self.meta.rows, self.meta.cols, self.inv_scale(), out)
    }
    /// [`WeightStack::restore_into`] into f32, f16 or bf16 caller buffers (for BLAS or GPU
    /// engines that multiply a dense copy).
    pub fn restore_into_as<T: kernels::RestoreElement>(
        &self,
        levels: usize,
        out: &mut [T],
    ) -> Result<()> {
        let refs = self.refs(levels)?;
        kernels::restore_into_as(&refs, self.meta.rows, self.meta.cols, self.inv_scale(), out)
    }
    /// Parameters of the fused product (int8 tables by default).
    pub fn fused_params(&self) -> FusedParams {
        self.params
    }
    /// Sets the parameters of the fused product.
    pub fn set_fused_params(&mut self, params: FusedParams) {
        self.params = params;
    }
    /// Scratch floats [`WeightStack::forward_with_scratch`] needs for `batch` inputs with the
    /// levels loaded now (a grown stack needs more).
    pub fn scratch_len(&self, batch: usize) -> usize {
        kernels::fused_scratch_len_with(
            self.meta.rows,
            self.meta.cols,
            self.meta.rank,
            self.blocks.len(),
            batch,
            self.params,
        )
    }
    /// `Y = X Ŵᵀ` over all loaded levels into caller scratch (no allocation for small batches
    /// beyond a few pointers).
    pub fn forward_with_scratch(
        &self,
        x: &[f32],
        y: &mut [f32],
        scratch: &mut [f32],
    ) -> Result<()> {
        let refs = self.refs(self.blocks.len())?;
        kernels::fused_matmul_with(
            &refs,
            self.meta.rows,
            self.meta.cols,
            self.inv_scale(),
            x,
            y,
            self.params,
            scratch,
        )
    }
    /// Bytes held: loaded blocks plus the scale vector.
    pub fn held_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.heap_bytes()).sum::<u64>() + self.meta.scale_bytes()
    }
}

impl LinearOp for WeightStack {
    fn in_features(&self) -> usize {
        self.meta.cols
    }
    fn out_features(&self) -> usize {
        self.meta.rows
    }
    /// Small batches run in a per-thread scratch buffer (tables, a few hundred KiB at most
    /// on 4096-wide weights) that grows to the largest product seen and is reused, so a
    /// decode loop allocates nothing per call. Larger batches restore `Ŵ` into a buffer that
    /// is freed when the call returns, so no dense copy outlives the product.
    fn forward(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        let batch = kernels::batch_of(x.len(), self.meta.cols)?;
        let need = self.scratch_len(batch);
        if batch > self.params.max_fused_batch() {
            return self.forward_with_scratch(x, y, &mut vec![0.0; need]);
        }
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => {
                if scratch.len() < need {
                    scratch.resize(need, 0.0);
                }
                self.forward_with_scratch(x, y, &mut scratch[..need])
            }
            // Re-entered on this thread (a product inside a product): use a fresh buffer.
            Err(_) => self.forward_with_scratch(x, y, &mut vec![0.0; need]),
        })
    }
    fn weight_bytes(&self) -> u64 {
        self.held_bytes()
    }
}
