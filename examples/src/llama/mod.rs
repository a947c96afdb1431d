//! The reference CPU Llama forward pass, written against [`LinearOp`] so that any linear-layer
//! implementation plugs in: dense f32 for the original model, a BitStack
//! [`WeightStack`](bitstack_core::WeightStack) at some memory budget, or a quantized baseline.
//!
//! # Pieces
//!
//! - [`LlamaResident`]: everything that is not one of the seven per-layer linears — token
//!   embedding, RMSNorm weights, optional Q/K/V biases (Qwen2), and the output head (tied to the
//!   embedding, or its own swappable [`LinearOp`]).
//! - [`LinearProvider`]: hands out the linear for `(layer, LinearKind)`. [`LinearTable`] is the
//!   ready-made one holding boxed ops (dense from a [`ModelSource`](crate::gguf::ModelSource),
//!   or anything else swapped in with [`LinearTable::replace`]).
//! - [`Llama`]: a resident part and a provider, shape-checked once, with the forward pass split
//!   for its three users: [`Llama::embed`] → [`Llama::layer_forward`] per layer →
//!   [`Llama::token_nll`] / [`Llama::logits`] (so an evaluator can cache the hidden states
//!   entering layer `l` and recompute only layers `l..L`), an optional [`ActivationObserver`]
//!   seeing the input of every linear (calibration), and a [`KvCache`] for incremental decoding
//!   with greedy or temperature / top-p sampling ([`Llama::generate`]).
//!
//! # Conventions
//!
//! Activations are `tokens × width` row-major; a forward over a [`SeqBatch`] processes
//! `n_seqs` whole sequences of `seq_len` tokens each, stored one after the other. Weights are in
//! Hugging Face layout (what every [`ModelSource`](crate::gguf::ModelSource) hands out, see
//! [`crate::gguf`]), so RoPE is the **rotate-half** form: within a head of width `d`, dimension
//! `i` is rotated together with `i + d/2` by the angle `p · θ^(-2i/d) / f_i`. Attention is causal
//! with grouped-query sharing (query head `h` reads KV head `h / (n_heads / n_kv_heads)`), the MLP
//! is `down(silu(gate(x)) ⊙ up(x))`, normalisation is RMSNorm with the config's epsilon. All
//! arithmetic is f32 (sums of squares and soft-max denominators in f64).
//!
//! # Example
//!
//! ```
//! use bitstack_examples::gguf::{Architecture, LlamaConfig};
//! use bitstack_examples::llama::{GenerateParams, LinearTable, Llama, LlamaResident};
//!
//! let config = LlamaConfig {
//!     arch: Architecture::Llama,
//!     n_layers: 2,
//!     hidden: 16,
//!     ffn: 24,
//!     n_heads: 4,
//!     n_kv_heads: 2,
//!     head_dim: 4,
//!     vocab: 32,
//!     rope_theta: 10_000.0,
//!     rope_freq_factors: None,
//!     rms_eps: 1e-5,
//!     tied_embeddings: true,
//!     attn_bias: false,
//!     max_seq: 64,
//!     bos_id: None,
//!     eos_id: None,
//! };
//! let resident = LlamaResident::random(&config, 1)?;
//! let linears = LinearTable::random(&config, 2)?;
//! let model = Llama::new(&resident, &linears)?;
//!
//! // Per-token negative log-likelihood of two 8-token sequences (7 predictions each).
//! let tokens: Vec<u32> = (0..16).map(|i| (i * 5 % 32) as u32).collect();
//! let nll = model.sequence_nll(&tokens, 8)?;
//! assert_eq!(nll.len(), 14);
//! assert!(nll.iter().all(|v| v.is_finite() && *v > 0.0));
//!
//! // Greedy continuation through the KV cache.
//! let params = GenerateParams { max_new_tokens: 5, ..Default::default() };
//! let out = model.generate(&tokens[..4], &params, &mut |_| {})?;
//! assert_eq!(out.tokens.len(), 5);
//! # Ok::<(), bitstack_examples::llama::LlamaError>(())
//! ```

mod forward;
mod generate;
mod grad;
mod resident;
#[cfg(test)]
mod tests;

use bitstack_core::{CoreError, LinearOp};

pub use crate::gguf::LlamaConfig;
use crate::gguf::ModelError;
pub use forward::{Llama, SeqBatch};
pub use generate::{sample, GenerateParams, Generation, KvCache, Sampling, SplitMix64};
pub use grad::{weight_gradients, WeightGradients};
pub use resident::{
    EmbeddingPrecision, HalfLinear, HeadActivations, LinearTable, LlamaResident, TokenEmbedding,
};

/// Errors of the forward pass and of loading its weights.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LlamaError {
    /// Reading the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A linear layer failed.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// A buffer did not have the length its shape requires.
    #[error("shape mismatch for {what}: expected {expected}, got {actual}")]
    ShapeMismatch {
        /// What was being checked.
        what: &'static str,
        /// Expected length.
        expected: usize,
        /// Length received.
        actual: usize,
    },
    /// A model tensor had the wrong shape for the config.
    #[error("tensor {name} has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        /// Canonical tensor name.
        name: String,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape found.
        actual: Vec<usize>,
    },
    /// A linear layer's dimensions do not fit the config.
    #[error(
        "linear {kind:?} of layer {layer} maps {actual_in} -> {actual_out}, expected {expected_in} -> {expected_out}"
    )]
    LinearShape {
        /// Layer index.
        layer: usize,
        /// Which linear.
        kind: LinearKind,
        /// Input features the config implies.
        expected_in: usize,
        /// Output features the config implies.
        expected_out: usize,
        /// Input features of the op.
        actual_in: usize,
        /// Output features of the op.
        actual_out: usize,
    },
    /// A token id is not in the vocabulary.
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        /// The id.
        token: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// A layer index is past the last layer.
    #[error("layer {layer} does not exist ({n_layers} layers)")]
    NoSuchLayer {
        /// Requested layer.
        layer: usize,
        /// Number of layers.
        n_layers: usize,
    },
    /// The KV cache cannot hold the new tokens.
    #[error("KV cache full: {needed} positions needed, capacity {capacity}")]
    CacheFull {
        /// Positions the step needs.
        needed: usize,
        /// Positions the cache holds.
        capacity: usize,
    },
    /// A parameter was outside its allowed range.
    #[error("invalid parameter {name}: {reason}")]
    InvalidParameter {
        /// Parameter name.
        name: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// A weight or input held NaN or infinity.
    #[error("non-finite value in {0}")]
    NonFinite(String),
}

impl From<bitstack_format::ContractError> for LlamaError {
    /// A config the model contract rejects: [`ModelError::BadConfig`] in a
    /// [`LlamaError::Model`].
    fn from(e: bitstack_format::ContractError) -> Self {
        LlamaError::Model(e.into())
    }
}

/// Shorthand for results of this module.
pub type Result<T, E = LlamaError> = std::result::Result<T, E>;

pub(crate) fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(LlamaError::ShapeMismatch {
            what,
            expected,
            actual,
        })
    }
}

/// The seven linear layers of a Llama decoder block: the model contract's type
/// (`bitstack_format::model`), which also numbers the stacks of a stack file.
/// [`LinearKind::shape`] takes a [`LlamaConfig`] (`impl From<&ModelConfig> for LinearDims`).
pub use bitstack_format::model::LinearKind;

/// Hands out the linear layer for each `(layer, kind)`.
///
/// Implementations must answer for every `layer < config.n_layers` and every kind;
/// [`Llama::new`] asks for all of them once and checks their shapes.
pub trait LinearProvider: Sync {
    /// The linear `kind` of block `layer`.
    fn linear(&self, layer: usize, kind: LinearKind) -> &dyn LinearOp;
}

/// Sees the input activations of every linear during a forward pass (calibration statistics).
///
/// Q, K and V read the same normalised input, as do Gate and Up; it is passed once per linear
/// so an observer keyed by linear needs no knowledge of that sharing. Calls for one layer come
/// in [`LinearKind::ALL`] order; layers run in order. `x` is `tokens × in_features`, row-major,
/// covering every token of the batch.
pub trait ActivationObserver: Sync {
    /// Called with the input of linear `kind` of block `layer`.
    fn observe(&self, layer: usize, kind: LinearKind, x: &[f32]);
}
