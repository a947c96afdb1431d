//! First-order order: Average's criterion from a few gradients (our addition; not in the
//! paper).
//!
//! Average ranks block `i` of weight `w` by the loss after adding it to a base holding `i`
//! blocks everywhere: `L(base + B_{w,i}) − L(base)`. To first order that is
//! `⟨∂L/∂W_w, B_{w,i}⟩`, the gradient of the calibration loss at the base against the
//! block, so **one gradient at base `i` scores every level-`i` block at once** where Average
//! runs one forward pass per block. The blocks are small next to the weight (each one
//! corrects the residual the previous ones left), which is where a first-order expansion is
//! accurate: on SmolLM2-135M the gradient at base `i` ranks Average's level-`i` blocks with
//! Spearman 0.97 for `i = 2, 3, 4` (README, issue 3).
//!
//! A gradient is computed only at the [`FirstOrderConfig::bases`]; block `i` is scored with
//! the gradient at the listed base nearest to `i` (ties: the larger base), so a few bases
//! cover all levels: the deep levels that the gradient at the deepest base scores decide
//! only high budgets, where every order is close. Below its base a gradient scores a block's
//! *removal* (`L(base − B) − L(base) ≈ −⟨G, B⟩`), the regime the sensitivity proxy measures
//! ([`crate::sensitivity`]), which suits the lowest budgets better than Average's own
//! measurement on a one-block model.
//!
//! The engine supplies the scores through [`FirstOrderEvaluator`]; the order is level-major
//! like Average's (no weight gets block `i + 1` before every weight has block `i`).

use crate::error::{Result, SortError};
use crate::evaluator::{SortObserver, SortProgress, StackEvaluator};
use crate::order::{check_levels, level_major_order, BlockScores};
use crate::search::SortOutcome;
use std::time::Instant;

/// A [`StackEvaluator`] that can also differentiate its loss.
///
/// # Contract
/// `first_order(base, levels)` returns, for every weight `w`, `levels(w)` entries: for each
/// 0-based block index `l` in `levels` (and `< levels(w)`), `Some(⟨∂L/∂W_w, B_{w,l}⟩)`, the
/// directional derivative of the loss at the configuration `base` along block `l` of weight
/// `w` (restored alone, in the weight's own coordinates); `None` elsewhere. Negative means
/// adding the block lowers the loss. The loss is the one [`StackEvaluator::loss`] returns, so
/// the first-order and the measured orders rank by the same criterion.
pub trait FirstOrderEvaluator: StackEvaluator {
    /// First-order loss change of the blocks in `levels` at the configuration `base`.
    fn first_order(
        &mut self,
        base: &[u16],
        levels: std::ops::Range<u16>,
    ) -> std::result::Result<BlockScores, Self::Error>;
}

/// Options of [`sort_first_order`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirstOrderConfig {
    /// Blocks every weight holds where a gradient is taken (each `≥ 1`; one gradient each).
    pub bases: Vec<u16>,
}

impl Default for FirstOrderConfig {
    /// Bases 2, 3 and 4: the second and third blocks from the gradient at 2, the fourth from 3,
    /// the rest from 4 — the levels that decide the budgets below ~1.5× the minimum.
    fn default() -> Self {
        Self {
            bases: vec![2, 3, 4],
        }
    }
}

/// The base whose gradient scores block index `level`: the nearest in `bases`, ties to the
/// larger one. `bases` is sorted, deduplicated and non-empty.
fn base_for(bases: &[u16], level: u16) -> u16 {
    let mut best = bases[0];
    for &b in bases {
        if level.abs_diff(b) <= level.abs_diff(best) {
            best = b;
        }
    }
    best
}

/// Orders the universal stack by first-order scores (module docs): one
/// [`FirstOrderEvaluator::first_order`] call per configured base. `evaluations` in the
/// outcome counts those calls; `scores` holds the derivative behind every non-floor block.
pub fn sort_first_order<E: FirstOrderEvaluator>(
    evaluator: &mut E,
    config: &FirstOrderConfig,
    observer: &mut dyn SortObserver,
) -> Result<SortOutcome> {
    let started = Instant::now();
    let mut bases = config.bases.clone();
    bases.sort_unstable();
    bases.dedup();
    if bases.is_empty() || bases[0] == 0 {
        return Err(SortError::InvalidInput(
            "first-order bases must be at least one, each ≥ 1 block".into(),
        ));
    }
    let n = evaluator.num_weights();
    let levels: Vec<u16> = (0..n).map(|w| evaluator.levels(w)).collect();
    check_levels(&levels)?;
    let max = levels.iter().copied().max().unwrap_or(1);
    let mut scores: BlockScores = levels.iter().map(|&l| vec![None; l as usize]).collect();
    let wrap = |e: E::Error| SortError::Evaluator(Box::new(e));
    let mut done = 0;
    for &b in &bases {
        // The block indices this base scores: a contiguous range, as `base_for` is monotone.
        let scored: Vec<u16> = (1..max).filter(|&l| base_for(&bases, l) == b).collect();
        let (Some(&lo), Some(&hi)) = (scored.first(), scored.last()) else {
            continue;
        };
        let base: Vec<u16> = levels.iter().map(|&l| l.min(b)).collect();
        let got = evaluator.first_order(&base, lo..hi + 1).map_err(wrap)?;
        if got.len() != n {
            return Err(SortError::InvalidInput(format!(
                "first_order returned {} weights, expected {n}",
                got.len()
            )));
        }
        for (w, row) in got.iter().enumerate() {
            for l in lo..=hi.min(levels[w].saturating_sub(1)) {
                let v = row.get(l as usize).copied().flatten().ok_or_else(|| {
                    SortError::InvalidInput(format!(
                        "first_order gave no score for block {l} of weight {w}"
                    ))
                })?;
                scores[w][l as usize] = Some(v);
            }
        }
        done += 1;
        let elapsed = started.elapsed();
        observer.progress(&SortProgress {
            level: b,
            last_level: *bases.last().unwrap_or(&b),
            done,
            total: bases.len(),
            elapsed,
            eta: Some(elapsed.mul_f64((bases.len() - done) as f64 / done as f64)),
        });
    }
    let order = level_major_order(&levels, &scores)?;
    Ok(SortOutcome {
        order,
        scores,
        evaluations: done,
        resumed_levels: 0,
        warnings: Vec::new(),
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{sort_average, NoObserver, SortConfig};
    use std::convert::Infallible;

    /// Loss = Σ_w a_w · e_w² with e_w = Π_{l < b_w} (1 − r_{w,l}): block `l` shrinks weight
    /// `w`'s error by the factor `1 − r_{w,l}`. Its "gradient along block l" at a base is the
    /// exact derivative of the loss along the block's scale.
    struct Quadratic {
        a: Vec<f64>,
        r: Vec<Vec<f64>>,
        calls: Vec<Vec<u16>>,
    }

    impl Quadratic {
        fn error(&self, w: usize, blocks: u16) -> f64 {
            self.r[w][..blocks as usize]
                .iter()
                .map(|r| 1.0 - r)
                .product()
        }
    }

    impl StackEvaluator for Quadratic {
        type Error = Infallible;
        fn num_weights(&self) -> usize {
            self.a.len()
        }
        fn levels(&self, w: usize) -> u16 {
            self.r[w].len() as u16
        }
        fn loss(&mut self, blocks: &[u16]) -> std::result::Result<f64, Infallible> {
            Ok((0..self.a.len())
                .map(|w| self.a[w] * self.error(w, blocks[w]).powi(2))
                .sum())
        }
    }

    impl FirstOrderEvaluator for Quadratic {
        fn first_order(
            &mut self,
            base: &[u16],
            levels: std::ops::Range<u16>,
        ) -> std::result::Result<BlockScores, Infallible> {
            self.calls.push(base.to_vec());
            Ok((0..self.a.len())
                .map(|w| {
                    (0..self.levels(w))
                        .map(|l| {
                            levels.contains(&l).then(|| {
                                // Block l moves the error by −r_l · e_l; d(a e²) = 2 a e · Δe.
                                let e = self.error(w, base[w]);
                                2.0 * self.a[w] * e * (-self.r[w][l as usize] * self.error(w, l))
                            })
                        })
                        .collect()
                })
                .collect())
        }
    }

    fn toy() -> Quadratic {
        Quadratic {
            a: vec![1.0, 4.0, 0.5, 2.0],
            r: vec![
                vec![0.5, 0.1, 0.6, 0.2],
                vec![0.5, 0.3, 0.1, 0.4],
                vec![0.5, 0.25, 0.2, 0.3],
                vec![0.5, 0.2, 0.3],
            ],
            calls: Vec::new(),
        }
    }

    #[test]
    fn matches_average_when_first_order_is_exact_enough() {
        let mut t = toy();
        let config = FirstOrderConfig {
            bases: vec![1, 2, 3],
        };
        let fo = sort_first_order(&mut t, &config, &mut NoObserver).unwrap();
        // One gradient per base, each at every weight holding min(base, levels) blocks.
        assert_eq!(fo.evaluations, 3);
        assert_eq!(t.calls, vec![vec![1; 4], vec![2; 4], vec![3, 3, 3, 3]]);
        let avg = sort_average(&mut toy(), &SortConfig::default(), &mut NoObserver).unwrap();
        // Each level's blocks in the same order as Average's (small steps: ranking agrees).
        assert_eq!(fo.order.levels(), avg.order.levels());
        assert_eq!(fo.order.as_slice(), avg.order.as_slice());
        // The floor is never scored; every other block is.
        for (w, row) in fo.scores.iter().enumerate() {
            assert_eq!(row[0], None);
            assert!(row[1..].iter().all(Option::is_some), "weight {w}");
        }
    }

    #[test]
    fn each_block_uses_the_nearest_base() {
        assert_eq!(base_for(&[2, 3, 4], 1), 2);
        assert_eq!(base_for(&[2, 3, 4], 2), 2);
        assert_eq!(base_for(&[2, 3, 4], 3), 3);
        assert_eq!(base_for(&[2, 3, 4], 9), 4);
        assert_eq!(base_for(&[2, 6], 4), 6);
        let mut t = toy();
        let config = FirstOrderConfig { bases: vec![4, 2] };
        sort_first_order(&mut t, &config, &mut NoObserver).unwrap();
        assert_eq!(t.calls, vec![vec![2; 4], vec![4, 4, 4, 3]]);
    }

    proptest::proptest! {
        /// The chosen base is one of the bases, no other is nearer, and the choice never moves
        /// back as the level grows (so each base scores one contiguous range of levels).
        #[test]
        fn nearest_base_is_nearest_and_monotone(
            mut bases in proptest::collection::vec(1u16..40, 1..6),
            level in 1u16..60,
        ) {
            bases.sort_unstable();
            bases.dedup();
            let b = base_for(&bases, level);
            proptest::prop_assert!(bases.contains(&b));
            proptest::prop_assert!(bases.iter().all(|&o| level.abs_diff(o) >= level.abs_diff(b)));
            proptest::prop_assert!(base_for(&bases, level + 1) >= b);
        }
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        for bases in [vec![], vec![0, 2]] {
            let config = FirstOrderConfig { bases };
            assert!(matches!(
                sort_first_order(&mut toy(), &config, &mut NoObserver),
                Err(SortError::InvalidInput(_))
            ));
        }
    }
}
