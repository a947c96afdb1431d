//! The crate's typed errors.

use thiserror::Error;

/// Everything that can go wrong in `bitstack-core`.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CoreError {
    /// A buffer or matrix did not have the length its shape requires.
    #[error("shape mismatch for {what}: expected {expected}, got {actual}")]
    ShapeMismatch {
        /// What was being checked.
        what: &'static str,
        /// Expected length or dimension.
        expected: usize,
        /// Length or dimension received.
        actual: usize,
    },
    /// A memory budget string could not be parsed.
    #[error("invalid memory budget {input:?}: {reason}")]
    InvalidBudget {
        /// The text given.
        input: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The budget cannot hold even the smallest model (resident tensors plus block 1 of every weight).
    #[error("budget of {budget} bytes ({budget_mib:.2} MiB) is below the minimum of {minimum} bytes ({minimum_mib:.2} MiB): resident tensors plus the first residual block of every weight")]
    BudgetBelowMinimum {
        /// Requested budget in bytes.
        budget: u64,
        /// Requested budget in MiB.
        budget_mib: f64,
        /// Smallest loadable model in bytes.
        minimum: u64,
        /// Smallest loadable model in MiB.
        minimum_mib: f64,
    },
    /// A universal order was malformed.
    #[error("invalid universal order: {0}")]
    InvalidOrder(String),
    /// A value was NaN or infinite where a finite number is required.
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
    /// A block id referred to a weight or level that does not exist.
    #[error("block {weight}:{level} does not exist")]
    NoSuchBlock {
        /// Weight index.
        weight: u32,
        /// Level index (0-based).
        level: u16,
    },
    /// The block source (e.g. a stack file) failed to deliver a block.
    #[error("block source failed: {0}")]
    Source(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

/// Shorthand for results in this crate.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

pub(crate) fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(CoreError::ShapeMismatch {
            what,
            expected,
            actual,
        })
    }
}

/// Rejects row `i` of a matrix of `rows` rows: the row lookups of the quantized dense
/// matrices report an out-of-range token the same way.
pub(crate) fn check_row(i: usize, rows: usize) -> Result<()> {
    if i >= rows {
        return Err(CoreError::InvalidParameter {
            name: "row",
            reason: format!("{i} >= {rows} rows"),
        });
    }
    Ok(())
}
