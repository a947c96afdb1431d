//! The evaluator contract and the progress/warning observer.

use std::time::Duration;

/// Supplies "loss of the model with this many blocks loaded per weight" to the search-based
/// orderings ([`crate::sort_average`], [`crate::sort_greedy`]). The crate knows nothing else
/// about the model.
///
/// # Contract
/// * Weights are numbered `0..num_weights()`; weight `w` has `levels(w) ≥ 1` blocks, and both
///   answers stay fixed for the evaluator's lifetime.
/// * `blocks_per_weight[w]` is a *count* in `1..=levels(w)`: weight `w` is restored from its
///   first `blocks_per_weight[w]` blocks (levels `0..count`). Every weight always has at least
///   its floor block, as in the reference implementation.
/// * The loss is *lower is better* (e.g. mean negative log-likelihood or perplexity on a small
///   calibration set) and must be a deterministic function of the configuration: checkpoint
///   resume relies on re-running a level giving the same scores.
/// * NaN or ±∞ is allowed (a collapsed model); the sort treats it as `+∞` (the least useful
///   block) and reports a [`SortWarning::NonFiniteLoss`], as the reference replaces NaN
///   perplexity by a large value.
/// * An `Err` stops the sort; levels already finished stay in the checkpoint.
///
/// # Call pattern (for caching)
/// Average scores level `i` by calling [`StackEvaluator::loss_plus_one`] once per weight with
/// the *same* `base` (every weight at `min(i, levels(w))` blocks), weight indices ascending.
/// An engine can therefore build the `base` model once per level and cache e.g. the hidden
/// states entering every layer, so that a block of layer `l` only re-runs layers `l..L`.
/// Greedy calls [`StackEvaluator::loss`] with arbitrary configurations.
pub trait StackEvaluator {
    /// The engine's error type.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Number of weight stacks.
    fn num_weights(&self) -> usize;
    /// Blocks available for weight `weight` (`≥ 1`).
    fn levels(&self, weight: usize) -> u16;
    /// Loss with `blocks_per_weight[w]` blocks loaded for every weight `w`.
    fn loss(&mut self, blocks_per_weight: &[u16]) -> Result<f64, Self::Error>;
    /// Loss of `base` with one more block for `weight` (`base[weight] < levels(weight)`).
    ///
    /// The default copies `base`, increments one entry and calls [`StackEvaluator::loss`];
    /// override it when the engine can reuse work shared by all calls with the same `base`.
    fn loss_plus_one(&mut self, base: &[u16], weight: usize) -> Result<f64, Self::Error> {
        let mut config = base.to_vec();
        config[weight] += 1;
        self.loss(&config)
    }
}

impl<E: StackEvaluator + ?Sized> StackEvaluator for &mut E {
    type Error = E::Error;
    fn num_weights(&self) -> usize {
        (**self).num_weights()
    }
    fn levels(&self, weight: usize) -> u16 {
        (**self).levels(weight)
    }
    fn loss(&mut self, blocks_per_weight: &[u16]) -> Result<f64, Self::Error> {
        (**self).loss(blocks_per_weight)
    }
    fn loss_plus_one(&mut self, base: &[u16], weight: usize) -> Result<f64, Self::Error> {
        (**self).loss_plus_one(base, weight)
    }
}

/// A progress report, sent after every evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct SortProgress {
    /// The 0-based level being scored.
    pub level: u16,
    /// Highest level index that is scored (levels `1..=last_level`; level 0 is the floor).
    pub last_level: u16,
    /// Evaluations finished, including those restored from a checkpoint.
    pub done: usize,
    /// Evaluations the whole sort needs.
    pub total: usize,
    /// Wall time of this run (excluding work restored from a checkpoint).
    pub elapsed: Duration,
    /// Estimated time left, from this run's mean time per evaluation; `None` before the first.
    pub eta: Option<Duration>,
}

impl SortProgress {
    /// Finished fraction in `[0, 1]`.
    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            self.done as f64 / self.total as f64
        }
    }
}

/// `level 3/15, 420/3360 evaluations (12.5%), elapsed 1m02s, ETA 7m30s`: one line for a CLI.
impl std::fmt::Display for SortProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "level {}/{}, {}/{} evaluations ({:.1}%), elapsed {}",
            self.level,
            self.last_level,
            self.done,
            self.total,
            100.0 * self.fraction(),
            Hms(self.elapsed)
        )?;
        match self.eta {
            Some(eta) => write!(f, ", ETA {}", Hms(eta)),
            None => Ok(()),
        }
    }
}

/// Durations as `1h02m03s` / `2m03s` / `3.4s`.
struct Hms(Duration);

impl std::fmt::Display for Hms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0.as_secs();
        match (s / 3600, s / 60 % 60, s % 60) {
            (0, 0, _) => write!(f, "{:.1}s", self.0.as_secs_f64()),
            (0, m, sec) => write!(f, "{m}m{sec:02}s"),
            (h, m, sec) => write!(f, "{h}h{m:02}m{sec:02}s"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_reads_well() {
        let p = SortProgress {
            level: 3,
            last_level: 15,
            done: 420,
            total: 3360,
            elapsed: Duration::from_secs(62),
            eta: Some(Duration::from_secs(3600 + 7 * 60 + 30)),
        };
        assert_eq!(
            p.to_string(),
            "level 3/15, 420/3360 evaluations (12.5%), elapsed 1m02s, ETA 1h07m30s"
        );
        let early = SortProgress {
            eta: None,
            elapsed: Duration::from_millis(3400),
            ..p
        };
        assert!(early.to_string().ends_with("elapsed 3.4s"));
    }
}

/// Something worth telling the user that does not stop the sort.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum SortWarning {
    /// The evaluator returned NaN or ±∞; it was ranked as `+∞`.
    NonFiniteLoss {
        /// The weight whose block was being scored.
        weight: usize,
        /// The block's 0-based level.
        level: u16,
        /// The value returned.
        value: f64,
    },
    /// Finished levels were restored from a checkpoint and will not be re-evaluated.
    Resumed {
        /// Number of levels restored.
        levels: usize,
    },
}

impl std::fmt::Display for SortWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NonFiniteLoss {
                weight,
                level,
                value,
            } => write!(
                f,
                "loss for weight {weight} block {level} was {value}; ranked last in its level"
            ),
            Self::Resumed { levels } => {
                write!(f, "resumed {levels} finished level(s) from the checkpoint")
            }
        }
    }
}

/// Receives progress and warnings. Both methods default to doing nothing, so a CLI implements
/// only what it prints; a closure `FnMut(&SortProgress)` is an observer too.
pub trait SortObserver {
    /// Called after every evaluation.
    fn progress(&mut self, _progress: &SortProgress) {}
    /// Called for every warning (they are also collected in the outcome).
    fn warning(&mut self, _warning: &SortWarning) {}
}

/// An observer that ignores everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoObserver;

impl SortObserver for NoObserver {}

impl<F: FnMut(&SortProgress)> SortObserver for F {
    fn progress(&mut self, progress: &SortProgress) {
        self(progress)
    }
}
