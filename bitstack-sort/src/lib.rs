//! # bitstack-sort
//!
//! The order of BitStack's universal stack (paper section 2.2, Algorithm 1 lines 24-45, and
//! the ablation of section 3.3): which residual block is loaded next when memory grows.
//!
//! * [`sort_average`]: the paper's method. Levels are filled one at a time; the blocks of a
//!   level are ranked by the calibration loss with only that block added.
//! * [`sort_greedy`] and [`sort_random`]: the paper's two baselines.
//! * [`sort_proxy`]: our addition, no forward pass at all: blocks are ranked within each
//!   level by the activation-weighted output error they remove ([`proxy`] explains why).
//! * [`measure_sensitivity`] + [`sort_proxy_sensitive`]: the proxy weighted by each
//!   weight's measured loss sensitivity, one evaluation per weight ([`sensitivity`]).
//! * [`sort_first_order`]: Average's criterion to first order, from a few gradients of the
//!   loss instead of one forward pass per block ([`first_order`]); the engine supplies them
//!   through [`FirstOrderEvaluator`].
//!
//! The search-based sorts talk to the model only through [`StackEvaluator`], so this crate
//! knows nothing of Llama; they checkpoint after every level ([`SortConfig::checkpoint`])
//! and report progress with an ETA to any [`SortObserver`] (a closure will do). Every
//! result is a validated [`bitstack_core::UniversalOrder`]: the floor (level 0 of every
//! weight) first and each weight's blocks in level order.
//!
//! ```
//! use bitstack_sort::{sort_average, NoObserver, SortConfig, StackEvaluator};
//! use std::convert::Infallible;
//!
//! /// Loss = Σ_w importance_w · 2^(−blocks_w): each block halves its weight's error.
//! struct Toy { importance: Vec<f64> }
//!
//! impl StackEvaluator for Toy {
//!     type Error = Infallible;
//!     fn num_weights(&self) -> usize { self.importance.len() }
//!     fn levels(&self, _weight: usize) -> u16 { 3 }
//!     fn loss(&mut self, blocks: &[u16]) -> Result<f64, Infallible> {
//!         Ok(self.importance.iter().zip(blocks).map(|(i, &b)| i * 0.5f64.powi(b as i32)).sum())
//!     }
//! }
//!
//! let mut toy = Toy { importance: vec![1.0, 5.0, 2.0] };
//! let outcome = sort_average(&mut toy, &SortConfig::default(), &mut NoObserver).unwrap();
//! let order: Vec<(u32, u16)> =
//!     outcome.order.as_slice().iter().map(|b| (b.weight, b.level)).collect();
//! // Floor first; then within each level the most important weight's block first.
//! assert_eq!(&order[..3], &[(0, 0), (1, 0), (2, 0)]);
//! assert_eq!(&order[3..6], &[(1, 1), (2, 1), (0, 1)]);
//! assert_eq!(&order[6..], &[(1, 2), (2, 2), (0, 2)]);
//! assert_eq!(outcome.evaluations, 6);
//! ```
#![deny(missing_docs)]

mod capped;
mod checkpoint;
mod error;
mod evaluator;
pub mod first_order;
mod order;
pub mod proxy;
mod search;
pub mod sensitivity;

pub use capped::{splice_orders, LevelCap};
pub use error::{Result, SortError};
pub use evaluator::{NoObserver, SortObserver, SortProgress, SortWarning, StackEvaluator};
pub use first_order::{sort_first_order, FirstOrderConfig, FirstOrderEvaluator};
pub use order::{level_major_order, BlockScores};
pub use proxy::{
    sort_proxy, sort_proxy_sensitive, ActivationStats, ProxyConfig, ProxyNormalisation,
    ProxyOutcome, ProxyWeight,
};
pub use search::{sort_average, sort_greedy, sort_random, SortConfig, SortOutcome};
pub use sensitivity::{measure_sensitivity, Sensitivity, SensitivityProbe};

/// The ways to order a universal stack, named as the `bitstack` command line names them
/// (`compress --order`, `sort --method`): the one type for "which sort" in this workspace. The
/// settings a method takes (seed, scoring windows, gradient bases) are passed to the function
/// that computes it; this names the method only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SortMethod {
    /// Level-major round robin over weights in model order, no scoring
    /// ([`UniversalOrder::round_robin`](bitstack_core::UniversalOrder::round_robin)).
    RoundRobin,
    /// [`sort_random`].
    Random,
    /// [`sort_proxy`].
    Proxy,
    /// [`sort_proxy_sensitive`] on the sensitivities of [`measure_sensitivity`].
    ProxySensitive,
    /// [`sort_first_order`].
    FirstOrder,
    /// [`sort_average`].
    Average,
    /// [`sort_greedy`].
    Greedy,
    /// An order computed elsewhere and given as a list of blocks (nothing is computed here).
    Import,
}

impl SortMethod {
    /// Every method, in the order above.
    pub const ALL: [SortMethod; 8] = [
        Self::RoundRobin,
        Self::Random,
        Self::Proxy,
        Self::ProxySensitive,
        Self::FirstOrder,
        Self::Average,
        Self::Greedy,
        Self::Import,
    ];

    /// The lower-case name ([`std::str::FromStr`] accepts it back).
    pub fn name(self) -> &'static str {
        match self {
            Self::RoundRobin => "roundrobin",
            Self::Random => "random",
            Self::Proxy => "proxy",
            Self::ProxySensitive => "proxy-sensitive",
            Self::FirstOrder => "first-order",
            Self::Average => "average",
            Self::Greedy => "greedy",
            Self::Import => "import",
        }
    }

    /// Whether the method runs forward (or backward) passes through a [`StackEvaluator`].
    pub fn needs_evaluator(self) -> bool {
        matches!(
            self,
            Self::Average | Self::Greedy | Self::ProxySensitive | Self::FirstOrder
        )
    }

    /// Whether the method reads the original (uncompressed) weights: the proxies.
    pub fn needs_original_weights(self) -> bool {
        matches!(self, Self::Proxy | Self::ProxySensitive)
    }
}

impl std::fmt::Display for SortMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SortMethod {
    type Err = SortError;
    /// A name of [`SortMethod::name`], in any case, with surrounding blanks ignored;
    /// `round-robin` is accepted for `roundrobin`.
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("round-robin") {
            return Ok(Self::RoundRobin);
        }
        Self::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(t))
            .ok_or_else(|| {
                SortError::InvalidInput(format!(
                    "unknown method {s:?}; expected one of {}",
                    Self::ALL.map(Self::name).join(", ")
                ))
            })
    }
}
