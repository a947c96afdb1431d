//! Average, Greedy and Random against a synthetic evaluator with a known answer.

use bitstack_core::UniversalOrder;
use bitstack_sort::{
    sort_average, sort_greedy, sort_random, NoObserver, SortConfig, SortError, SortMethod,
    SortObserver, SortProgress, SortWarning, StackEvaluator,
};
use proptest::prelude::*;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[error("synthetic failure after {0} calls")]
struct Boom(usize);

/// loss(c) = Σ_w importance_w · decay_w^c_w: weight w's residual shrinks by decay_w per block.
#[derive(Clone)]
struct Synthetic {
    importance: Vec<f64>,
    decay: Vec<f64>,
    levels: Vec<u16>,
    calls: usize,
    fail_after: Option<usize>,
    nan_for: Option<(usize, u16)>,
}

impl Synthetic {
    fn new(importance: Vec<f64>, decay: Vec<f64>, levels: Vec<u16>) -> Self {
        Self {
            importance,
            decay,
            levels,
            calls: 0,
            fail_after: None,
            nan_for: None,
        }
    }
    fn residual(&self, w: usize, count: u16) -> f64 {
        self.importance[w] * self.decay[w].powi(count as i32)
    }
    fn value(&self, c: &[u16]) -> f64 {
        (0..c.len()).map(|w| self.residual(w, c[w])).sum()
    }
}

impl StackEvaluator for Synthetic {
    type Error = Boom;
    fn num_weights(&self) -> usize {
        self.levels.len()
    }
    fn levels(&self, weight: usize) -> u16 {
        self.levels[weight]
    }
    fn loss(&mut self, c: &[u16]) -> Result<f64, Boom> {
        assert_eq!(c.len(), self.levels.len());
        for (w, (&n, &max)) in c.iter().zip(&self.levels).enumerate() {
            assert!(n >= 1 && n <= max, "weight {w}: {n} blocks of {max}");
        }
        if self.fail_after == Some(self.calls) {
            return Err(Boom(self.calls));
        }
        self.calls += 1;
        if let Some((w, count)) = self.nan_for {
            // Only when w alone is ahead: the configuration that scores w's block count−1.
            if c[w] == count && c.iter().enumerate().all(|(v, &n)| v == w || n < count) {
                return Ok(f64::NAN);
            }
        }
        Ok(self.value(c))
    }
}

fn ids(o: &UniversalOrder) -> Vec<(u32, u16)> {
    o.as_slice().iter().map(|b| (b.weight, b.level)).collect()
}

fn problem(seed: u64, weights: usize, max_levels: u16) -> Synthetic {
    let mut rng = bitstack_core::testutil::XorShift::new(seed);
    let importance = (0..weights)
        .map(|_| 1.0 + 9.0 * (rng.next_f32() as f64 + 1.0))
        .collect();
    let decay = (0..weights)
        .map(|_| 0.3 + 0.3 * (rng.next_f32() as f64 + 1.0))
        .collect();
    let levels = (0..weights)
        .map(|_| 1 + (rng.next_u64() % max_levels as u64) as u16)
        .collect();
    Synthetic::new(importance, decay, levels)
}

/// Within level i, block i of w lowers the loss by importance_w·(decay^i − decay^(i+1)); the
/// optimal within-level order is by that drop, largest first.
fn expected_average(p: &Synthetic) -> Vec<(u32, u16)> {
    let max = *p.levels.iter().max().unwrap();
    let mut out: Vec<(u32, u16)> = (0..p.levels.len()).map(|w| (w as u32, 0)).collect();
    for i in 1..max {
        let mut ws: Vec<usize> = (0..p.levels.len()).filter(|&w| i < p.levels[w]).collect();
        ws.sort_by(|&a, &b| {
            let drop = |w: usize| p.residual(w, i) - p.residual(w, i + 1);
            drop(b).total_cmp(&drop(a))
        });
        out.extend(ws.into_iter().map(|w| (w as u32, i)));
    }
    out
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bitstack-sort-it-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join(name);
    let _ = std::fs::remove_file(&p);
    p
}

#[test]
fn average_gives_the_known_optimal_within_level_order() {
    let mut p = problem(1, 12, 6);
    let expected = expected_average(&p);
    let total: usize = p.levels.iter().map(|&n| n as usize - 1).sum();
    let out = sort_average(&mut p, &SortConfig::default(), &mut NoObserver).unwrap();
    assert_eq!(ids(&out.order), expected);
    assert_eq!(out.evaluations, total);
    assert_eq!(p.calls, total);
    // The recorded score is the loss with exactly that block added on top of the level.
    let base: Vec<u16> = p.levels.iter().map(|&n| n.min(2)).collect();
    let w = (0..p.levels.len()).find(|&w| p.levels[w] > 2).unwrap();
    let mut c = base.clone();
    c[w] += 1;
    assert_eq!(out.scores[w][2], Some(p.value(&c)));
    assert_eq!(out.scores[w][0], None);
}

#[test]
fn greedy_scores_against_half_depth_and_keeps_level_order() {
    // Weight 1 is the important one: its loss at every depth ≥ 2 is below weight 0's.
    let mut p = Synthetic::new(vec![1.0, 10.0], vec![0.9, 0.5], vec![4, 4]);
    let out = sort_greedy(&mut p, &SortConfig::default(), &mut NoObserver).unwrap();
    let frozen = [2u16, 2];
    for w in 0..2 {
        for l in 1..4u16 {
            let mut c = frozen;
            c[w] = l + 1;
            assert_eq!(out.scores[w][l as usize], Some(p.value(&c)));
        }
    }
    // Ranking the six scores by increasing loss yields weight picks; deep levels of weight 1
    // rank first but load as its levels 1, 2, 3.
    let mut ranked: Vec<(f64, usize)> = (0..2)
        .flat_map(|w| (1..4).map(move |l| (w, l)))
        .map(|(w, l)| (out.scores[w][l].unwrap(), w))
        .collect();
    ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut next = [1u16, 1];
    let mut expected = vec![(0, 0), (1, 0)];
    for (_, w) in ranked {
        expected.push((w as u32, next[w]));
        next[w] += 1;
    }
    assert_eq!(ids(&out.order), expected);
    assert_eq!(expected[2].0, 1, "important weight first");
}

#[test]
fn random_is_seeded_and_valid() {
    let levels = vec![5u16, 3, 1, 7, 2];
    let a = sort_random(&levels, 42).unwrap();
    assert_eq!(a, sort_random(&levels, 42).unwrap());
    assert_ne!(a, sort_random(&levels, 43).unwrap());
    assert_eq!(ids(&a)[..5], [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0)]);
    assert!(sort_random(&[], 1).is_err());
    assert!(sort_random(&[2, 0], 1).is_err());
}

#[test]
fn random_interleavings_are_roughly_uniform() {
    // Two weights with 2 non-floor blocks each: C(4,2) = 6 interleavings, each ≈ 1/6.
    let mut counts = std::collections::HashMap::new();
    for seed in 0..6000 {
        *counts
            .entry(ids(&sort_random(&[3, 3], seed).unwrap()))
            .or_insert(0usize) += 1;
    }
    assert_eq!(counts.len(), 6);
    for &c in counts.values() {
        assert!((800..1200).contains(&c), "{counts:?}");
    }
}

#[test]
fn resume_matches_uninterrupted_run_without_reevaluating() {
    let clean = {
        let mut p = problem(7, 9, 6);
        sort_average(&mut p, &SortConfig::default(), &mut NoObserver).unwrap()
    };
    let path = tmp("resume.ckpt");
    let config = SortConfig {
        checkpoint: Some(path.clone()),
        problem_key: "synthetic-7".into(),
    };
    let mut p = problem(7, 9, 6);
    let per_level = |l: u16| p.levels.iter().filter(|&&n| l < n).count();
    let first_two = per_level(1) + per_level(2);
    // Fail in the middle of level 3.
    p.fail_after = Some(first_two + 1);
    let err = sort_average(&mut p.clone(), &config, &mut NoObserver).unwrap_err();
    assert!(matches!(err, SortError::Evaluator(_)), "{err}");

    let mut fresh = problem(7, 9, 6);
    let mut warnings = Vec::new();
    struct Collect<'a>(&'a mut Vec<SortWarning>);
    impl SortObserver for Collect<'_> {
        fn warning(&mut self, w: &SortWarning) {
            self.0.push(w.clone());
        }
    }
    let resumed = sort_average(&mut fresh, &config, &mut Collect(&mut warnings)).unwrap();
    assert_eq!(resumed.order, clean.order);
    assert_eq!(resumed.resumed_levels, 2);
    assert_eq!(warnings, vec![SortWarning::Resumed { levels: 2 }]);
    assert_eq!(fresh.calls, clean.evaluations - first_two);
    assert_eq!(resumed.evaluations, fresh.calls);
    for (a, b) in resumed
        .scores
        .iter()
        .flatten()
        .zip(clean.scores.iter().flatten())
    {
        assert_eq!(a.map(f64::to_bits), b.map(f64::to_bits));
    }

    // A finished checkpoint makes a rerun free.
    let mut again = problem(7, 9, 6);
    let rerun = sort_average(&mut again, &config, &mut NoObserver).unwrap();
    assert_eq!(again.calls, 0);
    assert_eq!(rerun.order, clean.order);
}

#[test]
fn stale_and_corrupt_checkpoints_are_typed_errors() {
    let path = tmp("stale.ckpt");
    let config = SortConfig {
        checkpoint: Some(path.clone()),
        problem_key: "model-a".into(),
    };
    sort_average(&mut problem(3, 4, 4), &config, &mut NoObserver).unwrap();

    let other_key = SortConfig {
        problem_key: "model-b".into(),
        ..config.clone()
    };
    let err = sort_average(&mut problem(3, 4, 4), &other_key, &mut NoObserver).unwrap_err();
    assert!(matches!(err, SortError::CheckpointStale { .. }), "{err}");
    // Same key, other method: also stale.
    let err = sort_greedy(&mut problem(3, 4, 4), &config, &mut NoObserver).unwrap_err();
    assert!(matches!(err, SortError::CheckpointStale { .. }), "{err}");

    std::fs::write(&path, b"bitstack-sort checkpoint v1\ngarbage").unwrap();
    let err = sort_average(&mut problem(3, 4, 4), &config, &mut NoObserver).unwrap_err();
    assert!(matches!(err, SortError::CheckpointCorrupt { .. }), "{err}");
}

#[test]
fn non_finite_losses_rank_last_with_a_warning() {
    let mut p = Synthetic::new(vec![5.0, 1.0, 2.0], vec![0.5; 3], vec![3, 3, 3]);
    // Weight 0 (most important) collapses when it gets its second block.
    p.nan_for = Some((0, 2));
    let out = sort_average(&mut p, &SortConfig::default(), &mut NoObserver).unwrap();
    assert_eq!(ids(&out.order)[3..6], [(2, 1), (1, 1), (0, 1)]);
    assert!(matches!(
        out.warnings.as_slice(),
        [SortWarning::NonFiniteLoss { weight: 0, level: 1, value }] if value.is_nan()
    ));
}

#[test]
fn progress_reaches_total_with_an_eta() {
    let mut p = problem(5, 6, 5);
    let total: usize = p.levels.iter().map(|&n| n as usize - 1).sum();
    let mut seen: Vec<SortProgress> = Vec::new();
    let mut obs = |pr: &SortProgress| seen.push(pr.clone());
    sort_greedy(&mut p, &SortConfig::default(), &mut obs).unwrap();
    assert_eq!(seen.len(), total);
    assert!(seen.windows(2).all(|w| w[1].done == w[0].done + 1));
    let last = seen.last().unwrap();
    assert_eq!((last.done, last.total), (total, total));
    assert_eq!(last.eta, Some(std::time::Duration::ZERO));
    assert!(seen.iter().all(|s| s.level >= 1 && s.level <= s.last_level));
}

#[test]
fn methods_parse_from_cli_names() {
    for m in SortMethod::ALL {
        assert_eq!(m.name().parse::<SortMethod>().unwrap(), m);
    }
    assert_eq!(" Proxy ".parse::<SortMethod>().unwrap(), SortMethod::Proxy);
    assert!("best".parse::<SortMethod>().is_err());
    for m in SortMethod::ALL {
        assert_eq!(m.to_string().parse::<SortMethod>().unwrap(), m);
    }
    assert_eq!(
        "round-robin".parse::<SortMethod>().unwrap(),
        SortMethod::RoundRobin
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_method_yields_a_valid_order(seed in any::<u64>(), weights in 1usize..12, max in 1u16..7) {
        let p = problem(seed, weights, max);
        let levels = p.levels.clone();
        let avg = sort_average(&mut p.clone(), &SortConfig::default(), &mut NoObserver).unwrap();
        let greedy = sort_greedy(&mut p.clone(), &SortConfig::default(), &mut NoObserver).unwrap();
        let random = sort_random(&levels, seed).unwrap();
        for o in [&avg.order, &greedy.order, &random] {
            prop_assert!(UniversalOrder::new(levels.clone(), o.as_slice().to_vec()).is_ok());
            prop_assert_eq!(o.levels(), levels.as_slice());
        }
        prop_assert_eq!(ids(&avg.order), expected_average(&p));
        // Average's load balancing: stack lengths never differ by more than one level, except
        // for stacks that are already complete.
        for prefix in 0..=avg.order.len() {
            let at = avg.order.levels_at(prefix);
            let open: Vec<u16> = at.iter().zip(&levels).filter(|(a, n)| a < n).map(|(a, _)| *a).collect();
            if let (Some(lo), Some(hi)) = (open.iter().min(), at.iter().max()) {
                prop_assert!(hi - lo <= 1);
            }
        }
    }
}
