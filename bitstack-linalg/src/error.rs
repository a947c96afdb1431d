//! The crate's typed errors.

use thiserror::Error;

/// Everything that can go wrong in `bitstack-linalg`.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LinalgError {
    /// A buffer or matrix did not have the length or dimension its shape requires.
    #[error("shape mismatch for {what}: expected {expected}, got {actual}")]
    ShapeMismatch {
        /// What was being checked.
        what: &'static str,
        /// Expected length or dimension.
        expected: usize,
        /// Length or dimension received.
        actual: usize,
    },
    /// An input held NaN or an infinity.
    #[error("non-finite value in {what} at flat index {index}")]
    NonFinite {
        /// Which input.
        what: &'static str,
        /// Flat (row-major) index of the first offending element.
        index: usize,
    },
    /// A parameter was outside its allowed range.
    #[error("invalid parameter {name}: {reason}")]
    InvalidParameter {
        /// Parameter name.
        name: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// A scale vector was requested before any activations were observed.
    #[error("no calibration activations observed")]
    NoObservations,
    /// faer's SVD did not converge.
    #[error("SVD did not converge ({0})")]
    SvdNoConvergence(&'static str),
    /// A factor of level `level` does not fit in f16 (|value| > 65504); the weight is too
    /// large in magnitude to be stored as BitStack blocks.
    #[error("factor of level {level} overflows f16 (value {value})")]
    FactorOverflow {
        /// 0-based level.
        level: usize,
        /// The offending f32 value.
        value: f32,
    },
    /// bitstack-core rejected a value (e.g. while building a block).
    #[error(transparent)]
    Core(#[from] bitstack_core::CoreError),
}

/// Shorthand for results in this crate.
pub type Result<T, E = LinalgError> = std::result::Result<T, E>;

pub(crate) fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(LinalgError::ShapeMismatch {
            what,
            expected,
            actual,
        })
    }
}

/// First non-finite element of `xs`, as a typed error.
pub(crate) fn check_finite(what: &'static str, xs: &[f32]) -> Result<()> {
    match xs.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(LinalgError::NonFinite { what, index }),
    }
}
