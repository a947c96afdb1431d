//! The elastic runtime: a model's weight stacks held at any memory budget, resized in place.
//!
//! ## Concurrency
//! The loaded state is an immutable [`ModelSnapshot`] behind an `RwLock<Arc<_>>`. Readers
//! call [`ElasticModel::snapshot`], which holds the read lock only long enough to clone the
//! `Arc`, and then compute on that snapshot with no lock at all: a forward pass that started on
//! a snapshot finishes on exactly those blocks. [`ElasticModel::resize`] (serialised by a
//! mutex) loads new blocks *outside* any lock, builds a new snapshot sharing the unchanged
//! blocks (`Arc<ResidualBlock>`), and swaps it in under the write lock in O(weights). Dropped
//! blocks are freed when the last snapshot holding them is dropped. A reader can therefore
//! never observe a half-updated weight (no torn reads) nor a weight with a gap in its levels:
//! every snapshot is built from a prefix of the universal order, which is level-ordered per
//! weight.

use crate::block::ResidualBlock;
use crate::budget::MemoryBudget;
use crate::error::{CoreError, Result};
use crate::kernels::FusedParams;
use crate::linear::LinearOp;
use crate::order::{BlockId, UniversalOrder};
use crate::stack::{StackMeta, WeightStack};
use rayon::prelude::*;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Where blocks come from: a stack file, a network store, a test's memory. Implementations
/// must verify what they deliver (e.g. checksums) and return an error instead of bad data.
pub trait BlockSource: Send + Sync {
    /// Loads one block into owned memory.
    fn load_block(&self, id: BlockId) -> Result<ResidualBlock>;
}

/// Everything the runtime needs to know about a model except its block payloads.
#[derive(Clone, Debug)]
pub struct ModelLayout {
    /// One entry per weight stack, indexed by `BlockId::weight`.
    pub stacks: Vec<Arc<StackMeta>>,
    /// The universal stack.
    pub order: UniversalOrder,
    /// Bytes of tensors always held (embeddings, norms, untied head, ...).
    pub resident_bytes: u64,
}

impl ModelLayout {
    /// Checks that the order matches the stacks.
    pub fn validate(&self) -> Result<()> {
        if self.stacks.len() != self.order.num_weights() {
            return Err(CoreError::InvalidOrder(format!(
                "order has {} weights, layout {}",
                self.order.num_weights(),
                self.stacks.len()
            )));
        }
        for (w, (m, &l)) in self.stacks.iter().zip(self.order.levels()).enumerate() {
            m.validate()?;
            if m.levels != l {
                return Err(CoreError::InvalidOrder(format!(
                    "weight {w} has {} levels, order says {l}",
                    m.levels
                )));
            }
        }
        Ok(())
    }
    /// Bytes held with the first `prefix` blocks of the order loaded, for every prefix
    /// `0..=order.len()`: resident tensors + scale vectors + blocks.
    pub fn cumulative_bytes(&self) -> Vec<u64> {
        let base = self.resident_bytes + self.stacks.iter().map(|m| m.scale_bytes()).sum::<u64>();
        let mut out = Vec::with_capacity(self.order.len() + 1);
        let mut acc = base;
        out.push(acc);
        for id in self.order.as_slice() {
            acc += self.stacks[id.weight as usize].block_bytes();
            out.push(acc);
        }
        out
    }
    /// Bytes of the smallest loadable model (resident + scales + level 0 of every weight).
    pub fn minimum_bytes(&self) -> u64 {
        self.cumulative_bytes()[self.stacks.len()]
    }
    /// Bytes of the full model.
    pub fn full_bytes(&self) -> u64 {
        *self.cumulative_bytes().last().unwrap_or(&0)
    }
    /// Longest prefix whose bytes fit `budget`; an error naming the minimum if none does.
    pub fn prefix_for_budget(&self, budget: MemoryBudget) -> Result<usize> {
        let cum = self.cumulative_bytes();
        prefix_within(&cum, self.stacks.len(), budget)
    }
}

/// The longest prefix of a universal order that fits `budget`: `cumulative[p]` is the bytes
/// held with `p` blocks loaded (non-decreasing, as [`ModelLayout::cumulative_bytes`]), and
/// `floor` the smallest loadable prefix (one block per weight). This is the rule
/// [`ElasticModel::resize`] applies, for a caller that sizes a model it has not built (e.g.
/// a variant being compared at equal memory). Errors when even `floor` blocks exceed the
/// budget, or when `floor` is past the end of `cumulative`.
pub fn prefix_within(cumulative: &[u64], floor: usize, budget: MemoryBudget) -> Result<usize> {
    let minimum = *cumulative
        .get(floor)
        .ok_or_else(|| CoreError::InvalidParameter {
            name: "floor",
            reason: format!(
                "{floor} blocks, but the order has {} prefixes",
                cumulative.len()
            ),
        })?;
    if budget.bytes() < minimum {
        return Err(CoreError::BudgetBelowMinimum {
            budget: budget.bytes(),
            budget_mib: budget.mib(),
            minimum,
            minimum_mib: minimum as f64 / crate::budget::MIB,
        });
    }
    // cumulative is non-decreasing: the number of entries <= budget, minus the empty prefix.
    Ok(cumulative.partition_point(|&b| b <= budget.bytes()) - 1)
}

/// An immutable view of the loaded model: what one forward pass computes with.
#[derive(Clone, Debug)]
pub struct ModelSnapshot {
    prefix: usize,
    held_bytes: u64,
    weights: Vec<WeightStack>,
}

impl ModelSnapshot {
    /// Number of universal-order blocks loaded.
    pub fn prefix(&self) -> usize {
        self.prefix
    }
    /// Bytes held: resident tensors + scales + loaded blocks.
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }
    /// The weight stacks, indexed like the layout.
    pub fn weights(&self) -> &[WeightStack] {
        &self.weights
    }
    /// One weight stack.
    pub fn weight(&self, index: usize) -> Option<&WeightStack> {
        self.weights.get(index)
    }
}

/// What a resize did.
#[derive(Clone, Debug, PartialEq)]
pub struct ResizeReport {
    /// Prefix before.
    pub from_prefix: usize,
    /// Prefix after.
    pub to_prefix: usize,
    /// Bytes held before.
    pub from_bytes: u64,
    /// Bytes held after.
    pub to_bytes: u64,
    /// Blocks read from the source.
    pub blocks_loaded: usize,
    /// Blocks dropped.
    pub blocks_dropped: usize,
    /// Payload bytes read from the source.
    pub bytes_loaded: u64,
    /// Payload bytes released.
    pub bytes_dropped: u64,
    /// Wall time of the resize.
    pub elapsed: Duration,
}

/// A model whose weights follow a memory budget: see the module docs.
pub struct ElasticModel<S: BlockSource> {
    source: S,
    layout: ModelLayout,
    cumulative: Vec<u64>,
    // Shared with every [`ElasticLinear`] handle, so a handle sees each resize.
    current: Arc<RwLock<Arc<ModelSnapshot>>>,
    resizing: Mutex<()>,
}

/// Reads the current snapshot of a shared cell (a poisoned lock still holds a whole
/// snapshot: writers only ever swap an `Arc`).
fn current_of(cell: &RwLock<Arc<ModelSnapshot>>) -> Arc<ModelSnapshot> {
    match cell.read() {
        Ok(g) => g.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

impl<S: BlockSource> ElasticModel<S> {
    /// Opens a model at `budget`, loading the longest prefix of the universal order that fits.
    pub fn new(source: S, layout: ModelLayout, budget: MemoryBudget) -> Result<Self> {
        layout.validate()?;
        let cumulative = layout.cumulative_bytes();
        let prefix = prefix_within(&cumulative, layout.stacks.len(), budget)?;
        let empty = ModelSnapshot {
            prefix: 0,
            held_bytes: cumulative[0],
            weights: layout
                .stacks
                .iter()
                .map(|m| WeightStack::new(m.clone()))
                .collect::<Result<_>>()?,
        };
        let model = Self {
            source,
            layout,
            cumulative,
            current: Arc::new(RwLock::new(Arc::new(empty))),
            resizing: Mutex::new(()),
        };
        model.resize_to_prefix(prefix)?;
        Ok(model)
    }
    /// The layout this model was opened with.
    pub fn layout(&self) -> &ModelLayout {
        &self.layout
    }
    /// The block source.
    pub fn source(&self) -> &S {
        &self.source
    }
    /// Bytes of the smallest model.
    pub fn minimum_bytes(&self) -> u64 {
        self.cumulative[self.layout.stacks.len()]
    }
    /// Bytes of the full model.
    pub fn full_bytes(&self) -> u64 {
        *self.cumulative.last().unwrap_or(&0)
    }
    /// Bytes held with the first `prefix` blocks loaded.
    pub fn bytes_at_prefix(&self, prefix: usize) -> Option<u64> {
        self.cumulative.get(prefix).copied()
    }
    /// The current snapshot (cheap: one `Arc` clone under a read lock).
    pub fn snapshot(&self) -> Arc<ModelSnapshot> {
        current_of(&self.current)
    }
    /// A handle on weight `index` that an engine keeps in its layer: its products and
    /// restores always use the snapshot current *at the call*, so it follows every later
    /// resize without the engine re-fetching snapshots. Errors past the last weight.
    pub fn linear(&self, index: usize) -> Result<ElasticLinear> {
        let meta = self
            .layout
            .stacks
            .get(index)
            .ok_or_else(|| CoreError::InvalidParameter {
                name: "weight index",
                reason: format!("{index} >= {} weights", self.layout.stacks.len()),
            })?
            .clone();
        Ok(ElasticLinear {
            current: self.current.clone(),
            index,
            meta,
        })
    }
    /// Longest prefix fitting `budget`.
    pub fn prefix_for_budget(&self, budget: MemoryBudget) -> Result<usize> {
        prefix_within(&self.cumulative, self.layout.stacks.len(), budget)
    }
    /// Grows or shrinks to the longest prefix that fits `budget`.
    pub fn resize(&self, budget: MemoryBudget) -> Result<ResizeReport> {
        let p = self.prefix_for_budget(budget)?;
        self.resize_to_prefix(p)
    }
    /// Sets the fused-product parameters of every weight (int8 tables by default;
    /// [`FusedParams::exact`] for the f32 tables) in a new snapshot that shares all blocks.
    /// Snapshots taken before keep their parameters; resizes carry the new ones.
    pub fn set_fused_params(&self, params: FusedParams) {
        let _guard = self.resizing.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.snapshot();
        let mut weights = cur.weights.clone();
        for w in &mut weights {
            w.set_fused_params(params);
        }
        let next = Arc::new(ModelSnapshot {
            prefix: cur.prefix,
            held_bytes: cur.held_bytes,
            weights,
        });
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
    }
    /// Grows or shrinks to exactly `prefix` blocks of the universal order (at least the floor
    /// of one block per weight). Only the blocks between the old and new prefix move.
    pub fn resize_to_prefix(&self, prefix: usize) -> Result<ResizeReport> {
        let floor = self.layout.stacks.len();
        if prefix < floor || prefix > self.layout.order.len() {
            return Err(CoreError::InvalidParameter {
                name: "prefix",
                reason: format!("{prefix} outside {floor}..={}", self.layout.order.len()),
            });
        }
        let _guard = self.resizing.lock().unwrap_or_else(|p| p.into_inner());
        let start = Instant::now();
        let cur = self.snapshot();
        let order = self.layout.order.as_slice();
        let mut weights = cur.weights.clone();
        let (mut loaded, mut dropped, mut bytes_in, mut bytes_out) = (0, 0, 0u64, 0u64);
        if prefix > cur.prefix {
            let ids = &order[cur.prefix..prefix];
            let blocks: Vec<ResidualBlock> = ids
                .par_iter()
                .map(|&id| self.source.load_block(id))
                .collect::<Result<_>>()?;
            for (id, b) in ids.iter().zip(blocks) {
                let w = &mut weights[id.weight as usize];
                if w.loaded_levels() != id.level as usize {
                    return Err(CoreError::InvalidOrder(format!(
                        "block {}:{} would leave a gap",
                        id.weight, id.level
                    )));
                }
                bytes_in += b.heap_bytes();
                w.push(Arc::new(b))?;
                loaded += 1;
            }
        } else {
            for id in order[prefix..cur.prefix].iter().rev() {
                let w = &mut weights[id.weight as usize];
                if let Some(b) = w.pop() {
                    bytes_out += b.heap_bytes();
                    dropped += 1;
                }
            }
        }
        let next = Arc::new(ModelSnapshot {
            prefix,
            held_bytes: self.cumulative[prefix],
            weights,
        });
        {
            let mut g = self.current.write().unwrap_or_else(|p| p.into_inner());
            *g = next;
        }
        // `cur` (and the old snapshot held by the lock) drop here unless a reader still uses
        // them; the blocks they alone held are freed then.
        Ok(ResizeReport {
            from_prefix: cur.prefix,
            to_prefix: prefix,
            from_bytes: cur.held_bytes,
            to_bytes: self.cumulative[prefix],
            blocks_loaded: loaded,
            blocks_dropped: dropped,
            bytes_loaded: bytes_in,
            bytes_dropped: bytes_out,
            elapsed: start.elapsed(),
        })
    }
}

/// One weight of an [`ElasticModel`], following its resizes ([`ElasticModel::linear`]).
///
/// Cheap to clone (two `Arc`s and an index). Each call reads the model's current snapshot
/// once and computes on it, so one product never mixes two budgets; a resize that lands
/// between two calls takes effect at the second. Holding a handle keeps no blocks alive
/// between calls.
#[derive(Clone)]
pub struct ElasticLinear {
    current: Arc<RwLock<Arc<ModelSnapshot>>>,
    index: usize,
    meta: Arc<StackMeta>,
}

impl std::fmt::Debug for ElasticLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElasticLinear")
            .field("index", &self.index)
            .field("name", &self.meta.name)
            .field("loaded_levels", &self.loaded_levels())
            .finish()
    }
}

impl ElasticLinear {
    /// The weight's index in the layout (`BlockId::weight`).
    pub fn index(&self) -> usize {
        self.index
    }
    /// The weight's stack meta (name, shape, rank, levels, scale).
    pub fn meta(&self) -> &StackMeta {
        &self.meta
    }
    /// The current snapshot's stack of this weight (an `Arc` of the snapshot keeps it alive).
    fn with_current<T>(&self, f: impl FnOnce(&WeightStack) -> Result<T>) -> Result<T> {
        let snap = current_of(&self.current);
        // The snapshot was built from the same layout the index was checked against.
        let w = snap
            .weight(self.index)
            .ok_or_else(|| CoreError::InvalidParameter {
                name: "weight index",
                reason: format!("{} missing from the snapshot", self.index),
            })?;
        f(w)
    }
    /// Levels loaded at the current budget.
    pub fn loaded_levels(&self) -> usize {
        self.with_current(|w| Ok(w.loaded_levels())).unwrap_or(0)
    }
    /// Restores the dense weight of the levels loaded now (scale divided out) into `out`
    /// (`rows × cols`, row-major) of f32, f16 or bf16, and returns how many levels it used.
    /// A wrong `out` length is an error.
    pub fn restore_into_as<T: crate::kernels::RestoreElement>(
        &self,
        out: &mut [T],
    ) -> Result<usize> {
        self.with_current(|w| {
            let levels = w.loaded_levels();
            w.restore_into_as(levels, out)?;
            Ok(levels)
        })
    }
}

impl LinearOp for ElasticLinear {
    fn in_features(&self) -> usize {
        self.meta.cols
    }
    fn out_features(&self) -> usize {
        self.meta.rows
    }
    /// `Y = X Ŵᵀ` with the levels loaded at the time of the call.
    fn forward(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        self.with_current(|w| w.forward(x, y))
    }
    /// Bytes this weight holds at the current budget (blocks and scale).
    fn weight_bytes(&self) -> u64 {
        self.with_current(|w| Ok(w.held_bytes())).unwrap_or(0)
    }
}

/// A [`BlockSource`] over blocks already in memory (tests, and engines that decompose on the fly).
#[derive(Clone, Debug, Default)]
pub struct InMemorySource {
    /// `blocks[w][l]` is weight `w`'s level `l`.
    pub blocks: Vec<Vec<ResidualBlock>>,
}

impl BlockSource for InMemorySource {
    fn load_block(&self, id: BlockId) -> Result<ResidualBlock> {
        self.blocks
            .get(id.weight as usize)
            .and_then(|w| w.get(id.level as usize))
            .cloned()
            .ok_or(CoreError::NoSuchBlock {
                weight: id.weight,
                level: id.level,
            })
    }
}

/// Asks the allocator to hand freed memory back to the OS, so dropped blocks show up as a
/// lower RSS. glibc keeps freed small and medium chunks (a 576×576 block is ~80 KB, below its
/// mmap threshold) in its arenas; `malloc_trim` returns them. A no-op elsewhere.
pub fn trim_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim only walks glibc's own arenas; it has no preconditions.
        unsafe {
            malloc_trim(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::random_block;

    #[test]
    fn prefix_within_picks_the_largest_fitting_prefix() {
        // 3 weights (floor 3), then blocks of varying size; cumulative[p] = bytes with p blocks.
        let cum = [100, 110, 120, 130, 140, 140, 155, 170];
        let at = |floor: usize, b: u64| prefix_within(&cum, floor, MemoryBudget::from_bytes(b));
        assert!(matches!(
            at(3, 129),
            Err(CoreError::BudgetBelowMinimum { minimum: 130, .. })
        ));
        assert_eq!(at(3, 130).unwrap(), 3);
        assert_eq!(at(3, 139).unwrap(), 3);
        // A zero-byte block at the boundary is included (the longest prefix within budget).
        assert_eq!(at(3, 140).unwrap(), 5);
        assert_eq!(at(3, 154).unwrap(), 5);
        assert_eq!(at(3, 155).unwrap(), 6);
        assert_eq!(at(3, 10_000).unwrap(), 7);
        // Never exceeds the budget, and the next prefix would.
        for b in 130..200u64 {
            let p = at(3, b).unwrap();
            assert!(cum[p] <= b);
            assert!(p + 1 == cum.len() || cum[p + 1] > b);
        }
        assert!(matches!(
            at(9, 10_000),
            Err(CoreError::InvalidParameter { name: "floor", .. })
        ));
    }

    fn model(levels: u16) -> (InMemorySource, ModelLayout) {
        let shapes = [(16usize, 64usize), (32, 64), (64, 128)];
        let mut src = InMemorySource::default();
        let mut stacks = vec![];
        for (w, &(m, n)) in shapes.iter().enumerate() {
            src.blocks.push(
                (0..levels)
                    .map(|l| random_block(m, n, 4, (w * 100 + l as usize) as u64))
                    .collect(),
            );
            stacks.push(Arc::new(StackMeta {
                name: format!("w{w}"),
                rows: m,
                cols: n,
                rank: 4,
                levels,
                scale: Some(vec![2.0; n]),
                factors: crate::FactorDtype::F16,
            }));
        }
        let order = UniversalOrder::round_robin(vec![levels; 3]).unwrap();
        (
            src,
            ModelLayout {
                stacks,
                order,
                resident_bytes: 1000,
            },
        )
    }

    #[test]
    fn budget_prefix_and_minimum() {
        let (src, layout) = model(4);
        let min = layout.minimum_bytes();
        let full = layout.full_bytes();
        assert!(matches!(
            ElasticModel::new(
                src.clone(),
                layout.clone(),
                MemoryBudget::from_bytes(min - 1)
            ),
            Err(CoreError::BudgetBelowMinimum { .. })
        ));
        let m = ElasticModel::new(src, layout, MemoryBudget::from_bytes(min)).unwrap();
        assert_eq!(m.snapshot().prefix(), 3);
        assert_eq!(m.snapshot().held_bytes(), min);
        let r = m.resize(MemoryBudget::from_bytes(full)).unwrap();
        assert_eq!((r.blocks_loaded, r.to_prefix, r.to_bytes), (9, 12, full));
        let r = m.resize(MemoryBudget::from_bytes(min + 10)).unwrap();
        assert_eq!((r.blocks_dropped, r.to_prefix), (9, 3));
        // Held bytes are exactly resident + scales + blocks.
        let snap = m.snapshot();
        let sum: u64 = snap.weights().iter().map(|w| w.held_bytes()).sum();
        assert_eq!(sum + 1000, snap.held_bytes());
    }

    #[test]
    fn snapshots_survive_resizes() {
        let (src, layout) = model(3);
        let full = layout.full_bytes();
        let m = ElasticModel::new(src, layout.clone(), MemoryBudget::from_bytes(full)).unwrap();
        let old = m.snapshot();
        m.resize_to_prefix(3).unwrap();
        assert_eq!(old.weight(2).unwrap().loaded_levels(), 3);
        assert_eq!(m.snapshot().weight(2).unwrap().loaded_levels(), 1);
        let x = vec![0.5f32; 128];
        let mut y = vec![0.0f32; 64];
        old.weight(2).unwrap().forward(&x, &mut y).unwrap();
        assert!(y.iter().all(|v| v.is_finite()));
    }

    /// A handle follows resizes: before and after, its product and its restores (f32, f16,
    /// bf16) equal those of the snapshot current at the call; bad sizes are errors.
    #[test]
    fn elastic_linear_follows_resizes() {
        use half::{bf16, f16};
        let (src, layout) = model(3);
        let full = layout.full_bytes();
        let m = ElasticModel::new(src, layout, MemoryBudget::from_bytes(full)).unwrap();
        assert!(m.linear(3).is_err());
        let lin = m.linear(2).unwrap();
        let cloned = lin.clone();
        assert_eq!((lin.in_features(), lin.out_features()), (128, 64));
        let x: Vec<f32> = (0..2 * 128)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
            .collect();
        let check = |levels: usize| {
            let snap = m.snapshot();
            let w = snap.weight(2).unwrap();
            assert_eq!(lin.loaded_levels(), levels);
            assert_eq!(w.loaded_levels(), levels);
            let (mut want, mut got) = (vec![0f32; 2 * 64], vec![0f32; 2 * 64]);
            w.forward(&x, &mut want).unwrap();
            cloned.forward(&x, &mut got).unwrap();
            assert_eq!(got, want);
            assert_eq!(lin.weight_bytes(), w.held_bytes());
            let mut dense = vec![0f32; 64 * 128];
            w.restore_into(levels, &mut dense).unwrap();
            let mut r32 = vec![0f32; 64 * 128];
            assert_eq!(lin.restore_into_as(&mut r32).unwrap(), levels);
            assert_eq!(r32, dense);
            let mut r16 = vec![f16::ZERO; 64 * 128];
            lin.restore_into_as(&mut r16).unwrap();
            let mut rb = vec![bf16::ZERO; 64 * 128];
            lin.restore_into_as(&mut rb).unwrap();
            for ((d, h), b) in dense.iter().zip(&r16).zip(&rb) {
                assert_eq!(*h, f16::from_f32(*d));
                assert_eq!(*b, bf16::from_f32(*d));
            }
            dense
        };
        let at_full = check(3);
        m.resize_to_prefix(3).unwrap();
        let at_min = check(1);
        assert_ne!(at_full, at_min);
        m.resize_to_prefix(6).unwrap();
        check(2);
        // Wrong sizes: a short output, an input that is not whole rows, a short restore.
        let mut y = vec![0f32; 63];
        assert!(lin.forward(&x[..128], &mut y).is_err());
        let mut y = vec![0f32; 64];
        assert!(lin.forward(&x[..127], &mut y).is_err());
        assert!(lin.restore_into_as(&mut vec![0f32; 64 * 127]).is_err());
        assert!(lin.restore_into_as(&mut [f16::ZERO; 1]).is_err());
    }
}
