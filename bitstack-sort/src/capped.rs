//! Scoring only the first levels of a long stack.
//!
//! A search-based sort costs one evaluation per block, and its choices matter most at small
//! budgets, where each level's order decides which weights get their next bit first. On a
//! slow machine an engine can score the first `cap` levels with Average or Greedy through
//! [`LevelCap`] and take the rest of the order from a cheaper one (e.g. the proxy) with
//! [`splice_orders`]. Both orders are level-major here, so the result is too.

use crate::error::{Result, SortError};
use crate::evaluator::StackEvaluator;
use bitstack_core::UniversalOrder;

/// An evaluator that exposes at most `cap` levels of every weight of `inner`.
#[derive(Debug)]
pub struct LevelCap<E> {
    /// The wrapped evaluator.
    pub inner: E,
    /// Levels exposed per weight (`≥ 1`).
    pub cap: u16,
}

impl<E: StackEvaluator> StackEvaluator for LevelCap<E> {
    type Error = E::Error;
    fn num_weights(&self) -> usize {
        self.inner.num_weights()
    }
    fn levels(&self, weight: usize) -> u16 {
        self.inner.levels(weight).min(self.cap.max(1))
    }
    fn loss(&mut self, blocks_per_weight: &[u16]) -> std::result::Result<f64, Self::Error> {
        self.inner.loss(blocks_per_weight)
    }
    fn loss_plus_one(
        &mut self,
        base: &[u16],
        weight: usize,
    ) -> std::result::Result<f64, Self::Error> {
        self.inner.loss_plus_one(base, weight)
    }
}

/// The blocks of `head` (an order over the first levels of each weight), then the blocks of
/// `full` that `head` does not hold, in `full`'s sequence. `full` must be an order of the same
/// weights; `head` must hold, per weight, a prefix of its levels.
pub fn splice_orders(head: &UniversalOrder, full: &UniversalOrder) -> Result<UniversalOrder> {
    let levels = full.levels().to_vec();
    if head.levels().len() != levels.len() {
        return Err(SortError::from(bitstack_core::CoreError::InvalidOrder(
            format!(
                "head order has {} weights, full order {}",
                head.levels().len(),
                levels.len()
            ),
        )));
    }
    let held = head.levels();
    let mut ids = head.as_slice().to_vec();
    ids.extend(
        full.as_slice()
            .iter()
            .filter(|id| id.level >= held[id.weight as usize]),
    );
    Ok(UniversalOrder::new(levels, ids)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::sort_random;

    #[test]
    fn splice_keeps_head_then_tail_and_validates() {
        let levels = vec![4u16, 3, 4];
        let full = UniversalOrder::round_robin(levels.clone()).unwrap();
        let head = sort_random(&[2, 2, 2], 7).unwrap();
        let s = splice_orders(&head, &full).unwrap();
        assert_eq!(s.len(), 11);
        assert_eq!(&s.as_slice()[..6], head.as_slice());
        assert!(s.as_slice()[6..].iter().all(|id| id.level >= 2));
        let wrong = UniversalOrder::round_robin(vec![2, 2]).unwrap();
        assert!(splice_orders(&wrong, &full).is_err());
    }
}
