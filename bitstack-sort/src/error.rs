//! The crate's typed errors.

use std::path::PathBuf;
use thiserror::Error;

/// Everything that can go wrong while computing a universal order.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SortError {
    /// The evaluator reported an error; the sort stopped (finished levels are checkpointed).
    #[error("evaluator failed: {0}")]
    Evaluator(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// The problem description was malformed (no weights, a weight without blocks, bad shapes).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A value that must be finite was NaN or infinite.
    #[error("non-finite value in {0}")]
    NonFinite(String),
    /// `bitstack-core` rejected something (e.g. the produced order; that would be a bug here).
    #[error(transparent)]
    Core(#[from] bitstack_core::CoreError),
    /// Reading or writing the checkpoint file failed.
    #[error("checkpoint {path}: {source}")]
    CheckpointIo {
        /// The checkpoint path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The checkpoint file is unreadable: truncated, edited, or not a checkpoint at all.
    #[error("checkpoint {path} is corrupt: {reason}")]
    CheckpointCorrupt {
        /// The checkpoint path.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The checkpoint belongs to a different problem (method, levels or problem key differ).
    /// Delete it or point the sort at another path.
    #[error("checkpoint {path} is stale: it was written for problem {found:016x}, this sort is {expected:016x}")]
    CheckpointStale {
        /// The checkpoint path.
        path: PathBuf,
        /// Fingerprint of the current problem.
        expected: u64,
        /// Fingerprint stored in the file.
        found: u64,
    },
}

/// Shorthand for results in this crate.
pub type Result<T, E = SortError> = std::result::Result<T, E>;
