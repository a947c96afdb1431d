//! # bitstack-core
//!
//! Types, memory accounting, CPU restoration kernels and the elastic runtime of
//! [BitStack](https://arxiv.org/abs/2410.23918): training-free weight compression where every
//! linear weight `W` (`rows × cols`, PyTorch's `[out, in]`) becomes a stack of ~1-bit
//! [`ResidualBlock`]s `S ⊙ (A Bᵀ)`, and the blocks of all weights form one universal stack
//! ([`UniversalOrder`]) of which any prefix is a working model.
//!
//! * [`ResidualBlock`]: packed signs ([`signs`] documents the bit order) + f16 or int8
//!   factors ([`FactorDtype`]).
//! * [`WeightStack`]: one weight's loaded levels; implements [`LinearOp`] with a fused
//!   product that never materialises `Ŵ` ([`kernels`]).
//! * [`MemoryBudget`], [`block_bits`], [`block_bytes`]: sizes per paper eq. 9.
//! * [`ElasticModel`]: holds the longest prefix that fits a budget and grows or shrinks in
//!   place, thread-safely ([`runtime`]).
//!
//! Cargo features: `faer` (default) runs batched products (prefill, evaluation) on faer's
//! parallel GEMM; without it (`default-features = false`) a plain row-tiled GEMM in this
//! crate runs and faer is not compiled. `testutil` exposes the random blocks the examples
//! below use; it is for tests, not part of the public API.
//!
//! Maths that *produce* blocks (scaling, SVD, decomposition) lives in `bitstack-linalg`;
//! the on-disk stack file in `bitstack-format`.
//!
//! ```
//! use bitstack_core::{testutil::random_block, ElasticModel, InMemorySource, LinearOp,
//!                     MemoryBudget, ModelLayout, StackMeta, UniversalOrder};
//! use std::sync::Arc;
//!
//! // One 32×64 weight with 3 levels of k = 4.
//! let blocks: Vec<_> = (0..3).map(|l| random_block(32, 64, 4, l)).collect();
//! let meta = Arc::new(StackMeta { name: "w".into(), rows: 32, cols: 64, rank: 4, levels: 3, scale: None,
//!                                factors: Default::default() });
//! let layout = ModelLayout {
//!     stacks: vec![meta],
//!     order: UniversalOrder::round_robin(vec![3]).unwrap(),
//!     resident_bytes: 0,
//! };
//! let min = layout.minimum_bytes();
//! let model = ElasticModel::new(InMemorySource { blocks: vec![blocks] }, layout, MemoryBudget::from_bytes(min)).unwrap();
//! assert_eq!(model.snapshot().weight(0).unwrap().loaded_levels(), 1);
//!
//! let report = model.resize("1MiB".parse().unwrap()).unwrap();  // grow: loads 2 blocks
//! assert_eq!(report.blocks_loaded, 2);
//! let snap = model.snapshot();
//! let mut y = vec![0.0; 32];
//! snap.weight(0).unwrap().forward(&vec![1.0; 64], &mut y).unwrap();
//! ```
#![deny(missing_docs)]

pub mod block;
pub mod budget;
mod error;
pub mod kernels;
pub mod linear;
pub mod order;
pub mod policy;
pub mod runtime;
pub mod signs;
pub mod stack;
// Test and benchmark helpers shared with the other crates' tests, examples and doc examples:
// not part of the public API (behind the `testutil` feature, hidden from the docs, may change
// in any release).
#[cfg(any(test, feature = "testutil"))]
#[doc(hidden)]
pub mod testutil;

pub use block::{Factor, FactorDtype, FactorRef, ResidualBlock, ResidualBlockRef};
pub use budget::{block_bits, block_bytes, MemoryBudget, MB, MIB};
pub use error::{CoreError, Result};
pub use linear::{DenseLinear, LinearOp};
pub use order::{BlockId, UniversalOrder};
pub use runtime::{
    prefix_within, BlockSource, ElasticLinear, ElasticModel, InMemorySource, ModelLayout,
    ModelSnapshot, ResizeReport,
};
pub use signs::SignsRef;
pub use stack::{release_thread_scratch, thread_scratch_bytes, StackMeta, WeightStack};
