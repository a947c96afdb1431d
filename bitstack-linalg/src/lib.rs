//! # bitstack-linalg
//!
//! The maths that *produces* [BitStack](https://arxiv.org/abs/2410.23918) residual blocks
//! (types and runtime live in `bitstack-core`):
//!
//! * [`scale`]: activation-aware scaling (paper eq. 3–4) — [`ActivationNorms`] accumulates
//!   per-input-channel norms over calibration windows and yields the scale vector `s`.
//! * [`svd`]: top-k SVD on faer — randomized subspace iteration with faer's exact thin SVD as
//!   fallback and option ([`truncated_svd`], [`TruncatedSvdParams`]).
//! * [`signs`]: [`pack_signs`] into bitstack-core's packed layout (`sign(0) = +1`).
//! * [`iavd`]: iterative absolute value decomposition (eq. 5–8) — [`decompose`] turns a weight
//!   into `levels` [`bitstack_core::ResidualBlock`]s and reports the relative Frobenius error
//!   after each, measured against the f16 factors as stored.
//! * [`plain`]: the sign-free iterative SVD of the paper's "w/o absolute value
//!   decomposition" ablation, at the same bits per level ([`same_size_rank`]).
//!
//! ```
//! use bitstack_core::kernels::restore_into;
//! use bitstack_linalg::{decompose_slice, relative_error, ActivationNorms, IavdParams,
//!                       ScaleParams};
//!
//! let (rows, cols) = (48, 40);
//! let w: Vec<f32> = (0..rows * cols).map(|t| ((t * 37 % 101) as f32 - 50.0) / 50.0).collect();
//!
//! // Calibration: two windows of 3 tokens each.
//! let mut norms = ActivationNorms::new(cols, ScaleParams::default())?;
//! let x: Vec<f32> = (0..3 * cols).map(|t| (t % 7) as f32 - 3.0).collect();
//! norms.observe(&x, 3)?;
//! norms.observe(&x[..cols], 1)?;
//! let s = norms.scale()?;
//!
//! let params = IavdParams { levels: 4, rank: 4, ..IavdParams::default() };
//! let dec = decompose_slice(&w, rows, cols, Some(&s), &params)?;
//! assert_eq!(dec.blocks.len(), 4);
//! assert!(dec.relative_errors.windows(2).all(|e| e[1] < e[0]));
//!
//! // Restoring the blocks (without 1/s) reproduces the reported error of W·diag(s).
//! let views: Vec<_> = dec.blocks.iter().map(|b| b.view()).collect();
//! let mut w_hat = vec![0.0; rows * cols];
//! restore_into(&views, rows, cols, None, &mut w_hat)?;
//! let scaled: Vec<f32> = w.chunks(cols).flat_map(|r| r.iter().zip(&s).map(|(a, b)| a * b)).collect();
//! let err = relative_error(&scaled, &w_hat)?;
//! assert!((err - dec.relative_errors[3]).abs() <= 1e-5 * err);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

mod error;
pub mod iavd;
pub mod plain;
mod rng;
pub mod scale;
pub mod signs;
pub mod svd;

pub use error::{LinalgError, Result};
pub use iavd::{
    decompose, decompose_slice, quantize_factor_i8, relative_error, Decomposition, IavdParams,
};
pub use plain::{decompose_plain_slice, same_size_rank, PlainDecomposition, PlainLevel};
pub use scale::{inverse_scale, ActivationNorms, ScaleParams, ScaleRule};
pub use signs::pack_signs;
pub use svd::{truncated_svd, SvdMethod, TruncatedSvd, TruncatedSvdParams};
