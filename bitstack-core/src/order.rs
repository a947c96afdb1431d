//! Block ids and the universal stack order.

use crate::error::{CoreError, Result};

/// Identifies one residual block: weight `weight`'s level `level`.
///
/// Levels are 0-based: level 0 is the paper's "block 1", the first decomposition iteration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId {
    /// Index of the weight stack.
    pub weight: u32,
    /// 0-based level within that weight's stack.
    pub level: u16,
}

impl BlockId {
    /// Shorthand constructor.
    pub const fn new(weight: u32, level: u16) -> Self {
        Self { weight, level }
    }
}

/// The order in which all residual blocks of a model are loaded: the universal stack.
///
/// Invariants, checked by [`UniversalOrder::new`]:
/// 1. every block of every weight appears exactly once;
/// 2. each weight's blocks appear in level order (block i+1 never before block i);
/// 3. the first `num_weights` entries are level 0 of every weight (the *floor*: the smallest
///    loadable model holds block 1 of every weight, as in the paper and the reference code).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UniversalOrder {
    levels: Vec<u16>,
    order: Vec<BlockId>,
}

impl UniversalOrder {
    /// Validates `order` against `levels[w]` = number of blocks of weight `w`.
    pub fn new(levels: Vec<u16>, order: Vec<BlockId>) -> Result<Self> {
        let bad = |s: String| Err(CoreError::InvalidOrder(s));
        if levels.is_empty() {
            return bad("no weights".into());
        }
        if let Some(w) = levels.iter().position(|&l| l == 0) {
            return bad(format!("weight {w} has no blocks"));
        }
        let total: usize = levels.iter().map(|&l| l as usize).sum();
        if order.len() != total {
            return bad(format!("{} entries, expected {total}", order.len()));
        }
        let mut next = vec![0u16; levels.len()];
        for (pos, id) in order.iter().enumerate() {
            let w = id.weight as usize;
            if w >= levels.len() {
                return bad(format!("entry {pos} names weight {w} of {}", levels.len()));
            }
            if id.level != next[w] {
                return bad(format!(
                    "entry {pos}: weight {w} level {} out of order (expected level {})",
                    id.level, next[w]
                ));
            }
            if pos < levels.len() && id.level != 0 {
                return bad(format!(
                    "entry {pos}: the first {} entries must be level 0 of every weight",
                    levels.len()
                ));
            }
            next[w] += 1;
        }
        Ok(Self { levels, order })
    }

    /// The level-major round robin: level 0 of every weight, then level 1 of every weight, ...
    pub fn round_robin(levels: Vec<u16>) -> Result<Self> {
        let max = levels.iter().copied().max().unwrap_or(0);
        let order = (0..max)
            .flat_map(|l| {
                levels
                    .iter()
                    .enumerate()
                    .filter(move |(_, &n)| l < n)
                    .map(move |(w, _)| BlockId::new(w as u32, l))
            })
            .collect();
        Self::new(levels, order)
    }

    /// Number of weight stacks.
    pub fn num_weights(&self) -> usize {
        self.levels.len()
    }
    /// Number of blocks of each weight.
    pub fn levels(&self) -> &[u16] {
        &self.levels
    }
    /// The ordered blocks.
    pub fn as_slice(&self) -> &[BlockId] {
        &self.order
    }
    /// Total number of blocks.
    pub fn len(&self) -> usize {
        self.order.len()
    }
    /// Always false for a valid order (every weight has at least one block).
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
    /// Blocks per weight after loading the first `prefix` entries.
    pub fn levels_at(&self, prefix: usize) -> Vec<u16> {
        let mut out = vec![0u16; self.levels.len()];
        for id in &self.order[..prefix.min(self.order.len())] {
            out[id.weight as usize] += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_valid() {
        let o = UniversalOrder::round_robin(vec![2, 3, 1]).unwrap();
        assert_eq!(o.len(), 6);
        assert_eq!(o.levels_at(3), vec![1, 1, 1]);
        assert_eq!(o.levels_at(6), vec![2, 3, 1]);
    }

    #[test]
    fn rejects_bad_orders() {
        let l = vec![2, 2];
        let b = BlockId::new;
        assert!(UniversalOrder::new(l.clone(), vec![b(0, 0), b(1, 0), b(1, 1), b(0, 1)]).is_ok());
        // level out of order
        assert!(UniversalOrder::new(l.clone(), vec![b(0, 0), b(1, 0), b(0, 1), b(0, 1)]).is_err());
        // floor violated
        assert!(UniversalOrder::new(l.clone(), vec![b(0, 0), b(0, 1), b(1, 0), b(1, 1)]).is_err());
        // missing / unknown weight
        assert!(UniversalOrder::new(l.clone(), vec![b(0, 0), b(1, 0), b(1, 1)]).is_err());
        assert!(UniversalOrder::new(l, vec![b(0, 0), b(1, 0), b(2, 0), b(1, 1)]).is_err());
    }
}
