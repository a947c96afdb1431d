//! The evaluator-driven orderings of the paper (Average, Greedy) and Random.

use crate::checkpoint::{self, LevelScores};
use crate::error::{Result, SortError};
use crate::evaluator::{SortObserver, SortProgress, SortWarning, StackEvaluator};
use crate::order::{check_levels, level_major_order, order_from_picks, rank_key, BlockScores};
use bitstack_core::UniversalOrder;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Options shared by the search-based sorts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SortConfig {
    /// Where to keep the checkpoint. When the file exists and matches the problem, its
    /// finished levels are reused; it is rewritten after every finished level and left in
    /// place at the end (a rerun then costs no evaluation). `None`: no checkpointing.
    pub checkpoint: Option<PathBuf>,
    /// Identifies the problem beyond its shape, e.g. model file, stack file and calibration
    /// set. It enters the checkpoint fingerprint, so a checkpoint of another model with the
    /// same level counts is rejected as stale rather than silently reused.
    pub problem_key: String,
}

/// The result of a search-based sort.
#[derive(Clone, Debug)]
pub struct SortOutcome {
    /// The universal order.
    pub order: UniversalOrder,
    /// The raw evaluator loss behind every non-floor block (`scores[w][l]`, `None` at level 0).
    pub scores: BlockScores,
    /// Evaluations run by this call (excluding those restored from the checkpoint).
    pub evaluations: usize,
    /// Levels restored from the checkpoint.
    pub resumed_levels: usize,
    /// Warnings, in the order they were raised.
    pub warnings: Vec<SortWarning>,
    /// Wall time of this call.
    pub elapsed: Duration,
}

/// The paper's default ordering (section 2.2, Algorithm 1 lines 24-45).
///
/// The floor (level 0 of every weight) comes first and is not scored. Then for each level
/// `i = 1, 2, …` every weight `w` with a block `i` is scored by
/// `loss_plus_one(base, w)` where `base[v] = min(i, levels(v))`: every weight at level `i−1`
/// (or complete, if it has fewer levels) plus `w`'s block `i` alone. Level `i`'s blocks are
/// pushed by increasing loss, and all of them before any block `i+1`. Costs
/// `Σ_w (levels(w) − 1)` evaluations.
pub fn sort_average<E: StackEvaluator>(
    evaluator: &mut E,
    config: &SortConfig,
    observer: &mut dyn SortObserver,
) -> Result<SortOutcome> {
    let levels = collect_levels(evaluator)?;
    let run = run_levels(
        evaluator,
        &levels,
        "average",
        config,
        observer,
        |ev, level, w| {
            let base: Vec<u16> = levels.iter().map(|&n| n.min(level)).collect();
            ev.loss_plus_one(&base, w)
        },
    )?;
    let order = level_major_order(&levels, &run.scores)?;
    Ok(run.finish(order))
}

/// The paper's Greedy baseline (section 3.3): every weight stack is evaluated at each of its
/// levels while all other stacks are frozen at half their depth, and that loss is the
/// importance of the block that reaches the level.
///
/// Precisely: block `l ≥ 1` of weight `w` is scored by `loss(c)` with `c[w] = l + 1` and
/// `c[v] = max(1, levels(v) / 2)` for every other `v`. All non-floor blocks are then ranked
/// globally by increasing loss (ties by weight, then level).
///
/// That ranking ignores each weight's own level order (a weight's loss usually falls with
/// depth, so its deep blocks rank *first*). To keep the order loadable we read the ranking as
/// a sequence of *weight picks*: the `j`-th ranked block of weight `w` loads `w`'s next level,
/// whatever level it was scored at. At every prefix each weight thus holds as many blocks as
/// it has ranked entries in that prefix, i.e. the number of its depths whose loss is below
/// the prefix's threshold: the stack lengths the ranking asks for, in the only level order a
/// stack can be loaded. The floor still comes first. Same evaluation count as Average.
pub fn sort_greedy<E: StackEvaluator>(
    evaluator: &mut E,
    config: &SortConfig,
    observer: &mut dyn SortObserver,
) -> Result<SortOutcome> {
    let levels = collect_levels(evaluator)?;
    let frozen: Vec<u16> = levels.iter().map(|&n| (n / 2).max(1)).collect();
    let run = run_levels(
        evaluator,
        &levels,
        "greedy",
        config,
        observer,
        |ev, level, w| {
            let mut c = frozen.clone();
            c[w] = level + 1;
            ev.loss(&c)
        },
    )?;
    let mut ranked: Vec<(f64, usize, u16)> = run
        .scores
        .iter()
        .enumerate()
        .flat_map(|(w, s)| {
            s.iter()
                .enumerate()
                .skip(1)
                .map(move |(l, v)| (rank_key(v.unwrap_or(f64::INFINITY)), w, l as u16))
        })
        .collect();
    ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let order = order_from_picks(&levels, ranked.into_iter().map(|(_, w, _)| w))?;
    Ok(run.finish(order))
}

/// The paper's Random baseline: the non-floor blocks in a uniformly random order, seeded.
///
/// A plain shuffle of blocks would break per-weight level order, so we shuffle the multiset
/// of *weight picks* (weight `w` appears `levels[w] − 1` times; Fisher–Yates with SplitMix64)
/// and let the `j`-th pick of `w` load `w`'s level `j`. Every valid interleaving of the
/// stacks is equally likely, and the floor comes first. Deterministic for a given seed.
pub fn sort_random(levels: &[u16], seed: u64) -> Result<UniversalOrder> {
    check_levels(levels)?;
    let mut picks: Vec<usize> = levels
        .iter()
        .enumerate()
        .flat_map(|(w, &n)| std::iter::repeat_n(w, n as usize - 1))
        .collect();
    let mut rng = SplitMix64(seed);
    for i in (1..picks.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        picks.swap(i, j);
    }
    order_from_picks(levels, picks)
}

/// SplitMix64: well-distributed for any seed (including 0), four lines, no dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` by rejection (no modulo bias).
    fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next();
            if v < zone {
                return v % n;
            }
        }
    }
}

fn collect_levels<E: StackEvaluator>(evaluator: &E) -> Result<Vec<u16>> {
    let levels: Vec<u16> = (0..evaluator.num_weights())
        .map(|w| evaluator.levels(w))
        .collect();
    check_levels(&levels)?;
    Ok(levels)
}

/// Scores gathered by [`run_levels`], before they become an order.
struct LevelRun {
    scores: BlockScores,
    evaluations: usize,
    resumed_levels: usize,
    warnings: Vec<SortWarning>,
    started: Instant,
}

impl LevelRun {
    fn finish(self, order: UniversalOrder) -> SortOutcome {
        SortOutcome {
            order,
            scores: self.scores,
            evaluations: self.evaluations,
            resumed_levels: self.resumed_levels,
            warnings: self.warnings,
            elapsed: self.started.elapsed(),
        }
    }
}

/// Scores levels `1..max_level` one at a time with `score(evaluator, level, weight)`,
/// checkpointing after each, resuming from a matching checkpoint, reporting progress.
fn run_levels<E: StackEvaluator>(
    evaluator: &mut E,
    levels: &[u16],
    method: &str,
    config: &SortConfig,
    observer: &mut dyn SortObserver,
    mut score: impl FnMut(&mut E, u16, usize) -> Result<f64, E::Error>,
) -> Result<LevelRun> {
    let started = Instant::now();
    let max = levels.iter().copied().max().unwrap_or(1);
    let last_level = max - 1;
    let total: usize = levels.iter().map(|&n| n as usize - 1).sum();
    let per_level = |level: u16| levels.iter().filter(|&&n| level < n).count();
    let fp = checkpoint::fingerprint(method, levels, &config.problem_key);

    let mut finished: Vec<LevelScores> = match &config.checkpoint {
        Some(path) => checkpoint::load(path, fp, levels.len())?.unwrap_or_default(),
        None => Vec::new(),
    };
    if finished.len() > last_level as usize {
        return Err(SortError::CheckpointCorrupt {
            path: config.checkpoint.clone().unwrap_or_default(),
            reason: format!(
                "{} levels finished, the problem has {last_level}",
                finished.len()
            ),
        });
    }
    let mut warnings = Vec::new();
    let resumed_levels = finished.len();
    if resumed_levels > 0 {
        let w = SortWarning::Resumed {
            levels: resumed_levels,
        };
        observer.warning(&w);
        warnings.push(w);
    }
    let mut done: usize = (1..=resumed_levels as u16).map(per_level).sum();
    let mut evaluations = 0usize;

    for level in (resumed_levels as u16 + 1)..max {
        let mut row: LevelScores = vec![None; levels.len()];
        for (w, slot) in row.iter_mut().enumerate() {
            if level >= levels[w] {
                continue;
            }
            let loss = score(evaluator, level, w).map_err(|e| SortError::Evaluator(Box::new(e)))?;
            *slot = Some(loss);
            evaluations += 1;
            done += 1;
            let elapsed = started.elapsed();
            let eta = elapsed.mul_f64((total - done) as f64 / evaluations as f64);
            observer.progress(&SortProgress {
                level,
                last_level,
                done,
                total,
                elapsed,
                eta: Some(eta),
            });
        }
        finished.push(row);
        if let Some(path) = &config.checkpoint {
            checkpoint::save(path, fp, &finished)?;
        }
    }

    let mut scores: BlockScores = levels.iter().map(|&n| vec![None; n as usize]).collect();
    for (i, row) in finished.iter().enumerate() {
        let level = i + 1;
        for (w, s) in row.iter().enumerate() {
            if level < levels[w] as usize {
                let Some(v) = *s else {
                    return Err(SortError::CheckpointCorrupt {
                        path: config.checkpoint.clone().unwrap_or_default(),
                        reason: format!("weight {w} level {level} has no score"),
                    });
                };
                if !v.is_finite() {
                    let warn = SortWarning::NonFiniteLoss {
                        weight: w,
                        level: level as u16,
                        value: v,
                    };
                    observer.warning(&warn);
                    warnings.push(warn);
                }
                scores[w][level] = Some(v);
            }
        }
    }
    Ok(LevelRun {
        scores,
        evaluations,
        resumed_levels,
        warnings,
        started,
    })
}
