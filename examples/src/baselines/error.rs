//! Typed errors of the quantization baselines.

use thiserror::Error;

/// Everything that can go wrong while quantizing a weight with RTN, GPTQ or AWQ.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BaselineError {
    /// A buffer did not have the length its shape requires.
    #[error("shape mismatch for {what}: expected {expected}, got {actual}")]
    ShapeMismatch {
        /// What was being checked.
        what: &'static str,
        /// Expected length or dimension.
        expected: usize,
        /// Length or dimension received.
        actual: usize,
    },
    /// A NaN or infinity was found where finite numbers are required.
    #[error("non-finite value in {0}")]
    NonFinite(&'static str),
    /// A parameter was outside its allowed range.
    #[error("invalid parameter {name}: {reason}")]
    InvalidParameter {
        /// Parameter name.
        name: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// A calibration-based method was given statistics of zero tokens.
    #[error("no calibration tokens were observed")]
    NoCalibration,
    /// The damped Hessian (or its inverse) was not numerically positive definite.
    #[error("damped Hessian is not positive definite (pivot {index}); raise the damping")]
    NotPositiveDefinite {
        /// Index of the failing pivot.
        index: usize,
    },
    /// A group's quantization step does not fit in an f16.
    #[error("quantization scale {scale} of row {row}, group {group} does not fit in f16")]
    ScaleOutOfRange {
        /// Row of the weight.
        row: usize,
        /// Group index within the row.
        group: usize,
        /// The step that overflowed.
        scale: f64,
    },
}

/// Shorthand for results of the baselines.
pub type Result<T, E = BaselineError> = std::result::Result<T, E>;

pub(crate) fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(BaselineError::ShapeMismatch {
            what,
            expected,
            actual,
        })
    }
}

pub(crate) fn check_finite(what: &'static str, data: &[f32]) -> Result<()> {
    if data.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(BaselineError::NonFinite(what))
    }
}
