//! Turning scores into a valid [`UniversalOrder`].

use crate::error::{Result, SortError};
use bitstack_core::{BlockId, UniversalOrder};

/// Per weight, per 0-based level, the block's score (lower is loaded earlier); `None` for the
/// floor (level 0), which is never scored because it is always loaded first.
pub type BlockScores = Vec<Vec<Option<f64>>>;

/// Checks that there is at least one weight and every weight has at least one block.
pub(crate) fn check_levels(levels: &[u16]) -> Result<()> {
    if levels.is_empty() {
        return Err(SortError::InvalidInput("no weights".into()));
    }
    if let Some(w) = levels.iter().position(|&n| n == 0) {
        return Err(SortError::InvalidInput(format!("weight {w} has no blocks")));
    }
    Ok(())
}

/// NaN and ±∞ rank as +∞: a block whose model collapsed is the least useful one.
pub(crate) fn rank_key(score: f64) -> f64 {
    if score.is_finite() {
        score
    } else {
        f64::INFINITY
    }
}

/// The level-major order of the paper's Average method: the floor (level 0 of every weight,
/// weight index order), then for each level `i ≥ 1` the level-`i` blocks of every weight
/// that has one, by increasing score (ties by weight index). No weight gets block `i+1`
/// before every weight that has block `i` got it.
///
/// `scores[w]` must hold `levels[w]` entries with `Some` for every level `≥ 1`; non-finite
/// scores rank last.
pub fn level_major_order(levels: &[u16], scores: &[Vec<Option<f64>>]) -> Result<UniversalOrder> {
    check_scores(levels, scores)?;
    let max = levels.iter().copied().max().unwrap_or(0);
    let mut order: Vec<BlockId> = (0..levels.len())
        .map(|w| BlockId::new(w as u32, 0))
        .collect();
    for level in 1..max {
        let mut ranked: Vec<(f64, usize)> = (0..levels.len())
            .filter(|&w| level < levels[w])
            .map(|w| (score_at(scores, w, level), w))
            .collect();
        // Stable sort on the key alone keeps ties in weight order.
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
        order.extend(
            ranked
                .into_iter()
                .map(|(_, w)| BlockId::new(w as u32, level)),
        );
    }
    Ok(UniversalOrder::new(levels.to_vec(), order)?)
}

/// Reads a checked score (see [`check_scores`]) as a ranking key.
fn score_at(scores: &[Vec<Option<f64>>], weight: usize, level: u16) -> f64 {
    rank_key(scores[weight][level as usize].unwrap_or(f64::INFINITY))
}

/// Checks that `scores` matches `levels` and has a score for every non-floor block.
pub(crate) fn check_scores(levels: &[u16], scores: &[Vec<Option<f64>>]) -> Result<()> {
    check_levels(levels)?;
    if scores.len() != levels.len() {
        return Err(SortError::InvalidInput(format!(
            "scores for {} weights, levels for {}",
            scores.len(),
            levels.len()
        )));
    }
    for (w, (s, &n)) in scores.iter().zip(levels).enumerate() {
        if s.len() != n as usize {
            return Err(SortError::InvalidInput(format!(
                "weight {w}: {} scores for {n} levels",
                s.len()
            )));
        }
        if let Some(l) = s.iter().skip(1).position(Option::is_none) {
            return Err(SortError::InvalidInput(format!(
                "weight {w}: level {} has no score",
                l + 1
            )));
        }
    }
    Ok(())
}

/// Builds an order from a sequence of *weight picks*: the floor first, then each pick of
/// weight `w` loads `w`'s next level. Any sequence in which weight `w` appears exactly
/// `levels[w] − 1` times gives a valid order; this is how Greedy and Random, whose rankings
/// ignore the per-weight level order, are made loadable (see their docs).
pub(crate) fn order_from_picks(
    levels: &[u16],
    picks: impl IntoIterator<Item = usize>,
) -> Result<UniversalOrder> {
    check_levels(levels)?;
    let mut next = vec![1u16; levels.len()];
    let mut order: Vec<BlockId> = (0..levels.len())
        .map(|w| BlockId::new(w as u32, 0))
        .collect();
    for w in picks {
        if w >= levels.len() || next[w] >= levels[w] {
            return Err(SortError::InvalidInput(format!(
                "weight {w} picked more often than it has blocks"
            )));
        }
        order.push(BlockId::new(w as u32, next[w]));
        next[w] += 1;
    }
    Ok(UniversalOrder::new(levels.to_vec(), order)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_major_sorts_within_levels_and_handles_ragged_levels() {
        let levels = [3u16, 2, 1, 3];
        let scores = vec![
            vec![None, Some(2.0), Some(0.5)],
            vec![None, Some(1.0)],
            vec![None],
            vec![None, Some(f64::NAN), Some(0.1)],
        ];
        let o = level_major_order(&levels, &scores).unwrap();
        let ids: Vec<(u32, u16)> = o.as_slice().iter().map(|b| (b.weight, b.level)).collect();
        assert_eq!(
            ids,
            vec![
                (0, 0),
                (1, 0),
                (2, 0),
                (3, 0),
                (1, 1),
                (0, 1),
                (3, 1), // NaN ranks last within its level
                (3, 2),
                (0, 2),
            ]
        );
    }

    #[test]
    fn missing_scores_and_bad_picks_are_errors() {
        assert!(level_major_order(&[2], &[vec![None, None]]).is_err());
        assert!(level_major_order(&[2], &[vec![None]]).is_err());
        assert!(level_major_order(&[], &[]).is_err());
        assert!(order_from_picks(&[2, 1], [1]).is_err());
        assert!(order_from_picks(&[2, 1], [0, 0]).is_err());
        // Too few picks leaves blocks out: core's validation rejects it.
        assert!(order_from_picks(&[3, 1], [0]).is_err());
        assert!(order_from_picks(&[3, 1], [0, 0]).is_ok());
    }
}
