//! [`BitStackLinear`]: one weight stack as a candle layer.

use bitstack_core::{LinearOp, ModelSnapshot, WeightStack};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Shape, Tensor};

use crate::CandleError;

/// `y = x Ŵᵀ` for one BitStack weight at the levels its [`WeightStack`] holds, as a candle
/// [`Module`] on CPU f32 tensors of shape `[..., in_features]`.
///
/// The product runs bitstack-core's fused look-up-table kernel (`WeightStack`'s
/// [`LinearOp::forward`]): up to [`bitstack_core::kernels::FUSED_MAX_BATCH`] rows never
/// materialise `Ŵ`; larger batches restore it into a buffer freed when the call returns. The
/// stack is shared, not copied (its blocks are `Arc`s), so holding a layer keeps exactly the
/// snapshot's blocks alive. The table precision is the stack's
/// [`fused_params`](WeightStack::fused_params) (int8 by default; see [`BitStackLinear::exact`]).
///
/// Forward only: candle's autograd gets no backward for this op.
#[derive(Clone, Debug)]
pub struct BitStackLinear {
    stack: WeightStack,
}

impl BitStackLinear {
    /// A layer over `stack` at the levels it holds now.
    pub fn new(stack: WeightStack) -> Self {
        Self { stack }
    }

    /// The layer of weight `index` of a model snapshot.
    pub fn from_snapshot(snapshot: &ModelSnapshot, index: usize) -> Result<Self, CandleError> {
        let stack = snapshot
            .weight(index)
            .ok_or_else(|| CandleError::InvalidArgument {
                name: "weight index",
                reason: format!(
                    "{index}, the snapshot has {} weights",
                    snapshot.weights().len()
                ),
            })?;
        Ok(Self::new(stack.clone()))
    }

    /// The same layer with the exact f32 look-up tables (slower than int8, but equal to the
    /// dense product up to f32 rounding).
    pub fn exact(mut self) -> Self {
        self.stack
            .set_fused_params(bitstack_core::kernels::FusedParams::exact());
        self
    }

    /// The underlying stack.
    pub fn stack(&self) -> &WeightStack {
        &self.stack
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.stack.in_features()
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.stack.out_features()
    }

    /// The dense restored weight `Ŵ` (`[out, in]`, f32) at the levels held, e.g. for a
    /// [`candle_nn::Linear`].
    pub fn restored_weight(&self) -> Result<Tensor, CandleError> {
        let (rows, cols) = (self.out_features(), self.in_features());
        let mut w = vec![0f32; rows * cols];
        self.stack
            .restore_into(self.stack.loaded_levels(), &mut w)?;
        Ok(Tensor::from_vec(
            w,
            (rows, cols),
            &candle_core::Device::Cpu,
        )?)
    }
}

impl CustomOp1 for BitStackLinear {
    fn name(&self) -> &'static str {
        "bitstack-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!(
                "bitstack-linear takes f32 tensors, got {:?}",
                storage.dtype()
            );
        };
        // `Module::forward` makes its input contiguous first; a direct `apply_op1` caller with a
        // strided view gets an error instead of a silently wrong product.
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("bitstack-linear needs a contiguous input (call .contiguous())");
        };
        let dims = layout.dims();
        let (in_f, out_f) = (self.in_features(), self.out_features());
        match dims.last() {
            Some(&d) if d == in_f => {}
            _ => candle_core::bail!(
                "bitstack-linear over {}: input shape {dims:?} does not end in {in_f} features",
                self.stack.meta().name
            ),
        }
        let x = &data[start..end];
        let batch = x.len() / in_f;
        let mut y = vec![0f32; batch * out_f];
        if batch > 0 {
            self.stack
                .forward(x, &mut y)
                .map_err(candle_core::Error::wrap)?;
        }
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = out_f;
        }
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }
}

impl Module for BitStackLinear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let xs = xs.contiguous()?;
        xs.apply_op1_no_bwd(self)
    }
}
