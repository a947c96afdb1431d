//! The crate's error type.

use bitstack_examples::gguf::ModelError;
use bitstack_examples::perplexity::PerplexityError;

/// Errors of building or running a BitStack model on candle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CandleError {
    /// candle rejected a tensor operation.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// The BitStack runtime rejected a restore or a product.
    #[error(transparent)]
    Core(#[from] bitstack_core::CoreError),
    /// The stack file's model is unusable.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The stack file's bytes are unusable.
    #[error(transparent)]
    Format(#[from] bitstack_format::FormatError),
    /// The stack file's model contract is unusable.
    #[error(transparent)]
    Contract(#[from] bitstack_format::model::ContractError),
    /// The window parameters are invalid (same checks as `bitstack eval`).
    #[error(transparent)]
    Perplexity(#[from] PerplexityError),
    /// The model has a feature candle-transformers' Llama cannot express.
    #[error("candle-transformers' Llama cannot run this model: {0}")]
    Unsupported(String),
    /// A caller argument is out of range.
    #[error("invalid {name}: {reason}")]
    InvalidArgument {
        /// Which argument.
        name: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// The model produced a NaN likelihood.
    #[error("NaN negative log-likelihood in window {window}")]
    NanLikelihood {
        /// Index of the window in the text's list of windows.
        window: usize,
    },
}
