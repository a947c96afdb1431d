//! Per-weight loss sensitivity: the term the plain proxy is missing (our addition).
//!
//! The proxy ranks a block by the activation-weighted output error `g` it removes from its
//! layer. What Average actually ranks by is the *loss* change, which to first order is
//! `c_w · g` with `c_w` the loss's sensitivity to output error of weight `w`. The relative
//! proxy assumes `c_w = 1 / E‖W x‖²`, i.e. that every layer matters in proportion to its own
//! signal; on SmolLM2-135M that loses to plain round robin (README, issue 3).
//!
//! [`measure_sensitivity`] measures `c_w` directly with **one evaluation per weight**: the
//! loss of a base configuration (by default the full stack; [`SensitivityProbe`]) with weight
//! `w` alone set to `probe_blocks` blocks — fewer than the base (a cut) or more (an
//! addition) — minus the loss of the base. Dividing that loss change by the change of error
//! energy (`E_probe − E_base`) gives `c_w` ([`crate::sort_proxy_sensitive`]). A base of a few
//! blocks everywhere measures the sensitivities where low budgets operate; the full stack,
//! near the original model. An addition on a base of `b` blocks is exactly what Average
//! measures for level `b + 1`, so that level's ranking is Average's own. That is
//! `num_weights` evaluations instead of Average's `Σ_w (levels(w) − 1)` — 1/15 of a
//! 16-level Average at the same scoring set — and all of them differ from one fixed base in a
//! single weight, so an evaluator that caches hidden states re-runs only the layers from
//! that weight on.

use crate::error::{Result, SortError};
use crate::evaluator::{SortObserver, SortProgress, StackEvaluator};
use crate::order::check_levels;
use std::time::{Duration, Instant};

/// Where [`measure_sensitivity`] probes: every weight holds `min(base_blocks, levels)` blocks
/// and each weight in turn is set to `min(probe_blocks, levels)` blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SensitivityProbe {
    /// Blocks every weight holds in the base (`u16::MAX`: all of them, the default).
    pub base_blocks: u16,
    /// Blocks a probed weight is set to (`≥ 1`, `≠ base_blocks`; default 1, the floor): fewer
    /// than the base measures a cut, more an addition.
    pub probe_blocks: u16,
}

impl Default for SensitivityProbe {
    fn default() -> Self {
        Self {
            base_blocks: u16::MAX,
            probe_blocks: 1,
        }
    }
}

/// What [`measure_sensitivity`] measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Sensitivity {
    /// Blocks weight `w` held in the base configuration.
    pub base_blocks: Vec<u16>,
    /// Blocks weight `w` was set to (equal to `base_blocks[w]` when it was not probed).
    pub probe_blocks: Vec<u16>,
    /// Loss of the base configuration.
    pub base_loss: f64,
    /// Loss with weight `w` alone set to `probe_blocks[w]` (the base loss when it was not probed).
    pub losses: Vec<f64>,
    /// Evaluations run (the base included).
    pub evaluations: usize,
    /// Wall time.
    pub elapsed: Duration,
}

impl Sensitivity {
    /// Loss change caused by probing weight `w` (positive for a cut, negative for an addition,
    /// up to noise).
    pub fn delta(&self, w: usize) -> f64 {
        self.losses[w] - self.base_loss
    }
}

/// Measures every weight's loss change when it alone is moved from the probe's base to
/// `probe.probe_blocks` blocks (module docs). Non-finite losses are kept as returned;
/// [`crate::sort_proxy_sensitive`] treats them as the most sensitive.
pub fn measure_sensitivity<E: StackEvaluator>(
    evaluator: &mut E,
    probe: SensitivityProbe,
    observer: &mut dyn SortObserver,
) -> Result<Sensitivity> {
    let started = Instant::now();
    if probe.probe_blocks == 0 || probe.base_blocks == 0 {
        return Err(SortError::InvalidInput(
            "a probe holds and probes at least 1 block (the floor)".into(),
        ));
    }
    if probe.probe_blocks == probe.base_blocks {
        return Err(SortError::InvalidInput(format!(
            "a probe of {} blocks on a base of {} changes nothing",
            probe.probe_blocks, probe.base_blocks
        )));
    }
    let n = evaluator.num_weights();
    let levels: Vec<u16> = (0..n).map(|w| evaluator.levels(w)).collect();
    check_levels(&levels)?;
    let full: Vec<u16> = levels.iter().map(|&l| l.min(probe.base_blocks)).collect();
    let wrap = |e: E::Error| SortError::Evaluator(Box::new(e));
    let base_loss = evaluator.loss(&full).map_err(wrap)?;
    if !base_loss.is_finite() {
        return Err(SortError::NonFinite(format!(
            "loss of the probe's base configuration is {base_loss}"
        )));
    }
    let probe_blocks: Vec<u16> = levels.iter().map(|&l| l.min(probe.probe_blocks)).collect();
    let total = 1 + full
        .iter()
        .zip(&probe_blocks)
        .filter(|(f, p)| p != f)
        .count();
    let mut done = 1;
    let mut losses = Vec::with_capacity(n);
    let mut config = full.clone();
    for w in 0..n {
        if probe_blocks[w] == full[w] {
            losses.push(base_loss);
            continue;
        }
        config[w] = probe_blocks[w];
        let loss = evaluator.loss(&config).map_err(wrap)?;
        config[w] = full[w];
        losses.push(loss);
        done += 1;
        let elapsed = started.elapsed();
        observer.progress(&SortProgress {
            level: 0,
            last_level: 0,
            done,
            total,
            elapsed,
            eta: Some(elapsed.mul_f64((total - done) as f64 / done as f64)),
        });
    }
    Ok(Sensitivity {
        base_blocks: full,
        probe_blocks,
        base_loss,
        losses,
        evaluations: done,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NoObserver;
    use std::convert::Infallible;

    struct Toy {
        importance: Vec<f64>,
        calls: usize,
    }

    impl StackEvaluator for Toy {
        type Error = Infallible;
        fn num_weights(&self) -> usize {
            self.importance.len()
        }
        fn levels(&self, w: usize) -> u16 {
            if w == 2 {
                1
            } else {
                4
            }
        }
        fn loss(&mut self, blocks: &[u16]) -> std::result::Result<f64, Infallible> {
            self.calls += 1;
            Ok(self
                .importance
                .iter()
                .zip(blocks)
                .map(|(i, &b)| i * 0.5f64.powi(b as i32))
                .sum())
        }
    }

    #[test]
    fn one_evaluation_per_cuttable_weight_and_exact_deltas() {
        let mut toy = Toy {
            importance: vec![1.0, 8.0, 3.0],
            calls: 0,
        };
        let s =
            measure_sensitivity(&mut toy, SensitivityProbe::default(), &mut NoObserver).unwrap();
        // Weight 2 has a single block: nothing to cut, no evaluation.
        assert_eq!(toy.calls, 3);
        assert_eq!(s.evaluations, 3);
        assert_eq!(s.probe_blocks, vec![1, 1, 1]);
        // Cutting from 4 blocks to 1: importance · (1/2 − 1/16).
        assert!((s.delta(0) - 1.0 * (0.5 - 0.0625)).abs() < 1e-12);
        assert!((s.delta(1) - 8.0 * (0.5 - 0.0625)).abs() < 1e-12);
        assert_eq!(s.delta(2), 0.0);
        assert_eq!(s.base_blocks, vec![4, 4, 1]);
        // A base of 2 blocks, cut to 1: importance · (1/2 − 1/4).
        let probe = SensitivityProbe {
            base_blocks: 2,
            probe_blocks: 1,
        };
        let s = measure_sensitivity(&mut toy, probe, &mut NoObserver).unwrap();
        assert_eq!(s.base_blocks, vec![2, 2, 1]);
        assert!((s.delta(1) - 8.0 * 0.25).abs() < 1e-12);
        // An addition: base 2, each weight given a third block (weight 2 has none to add).
        let calls = toy.calls;
        let probe = SensitivityProbe {
            base_blocks: 2,
            probe_blocks: 3,
        };
        let s = measure_sensitivity(&mut toy, probe, &mut NoObserver).unwrap();
        assert_eq!(toy.calls - calls, 3);
        assert_eq!(s.probe_blocks, vec![3, 3, 1]);
        assert!((s.delta(1) + 8.0 * 0.125).abs() < 1e-12);
        assert_eq!(s.delta(2), 0.0);
    }

    #[test]
    fn probe_zero_is_rejected() {
        let mut toy = Toy {
            importance: vec![1.0],
            calls: 0,
        };
        for (base_blocks, cut_to) in [(u16::MAX, 0), (0, 1), (2, 2)] {
            let probe = SensitivityProbe {
                base_blocks,
                probe_blocks: cut_to,
            };
            assert!(matches!(
                measure_sensitivity(&mut toy, probe, &mut NoObserver),
                Err(SortError::InvalidInput(_))
            ));
        }
    }
}
