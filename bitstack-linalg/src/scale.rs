//! Activation-aware scaling (paper §2.1.1, eq. 3–4).
//!
//! A weight `W` (`[out, in]`) is decomposed as `W_scaled = W·diag(s)`, where `s_j` measures how
//! large input channel `j` is on calibration activations; restoration multiplies column `j`
//! by `1/s_j` ([`inverse_scale`]). Errors in columns fed by large activations are thereby
//! weighted up in the decomposition.
//!
//! ## Rules
//! * [`ScaleRule::WindowMeanL2`] (default, the authors' reference code): for every
//!   calibration window (one [`ActivationNorms::observe`] call), the L2 norm of each channel
//!   over that window's tokens; then the mean over windows.
//! * [`ScaleRule::GlobalL2`] (the paper's eq. 3): the L2 norm of each channel over all
//!   observed tokens.
//!
//! Either way the result is `s_j = clamp((norm_j + offset)^α, floor, f32::MAX)` with
//! `α = ScaleParams::exponent` (1 by default, as in the paper). Statistics are
//! accumulated in f64 and inputs must be finite, so `norm_j` is a finite non-negative number;
//! a dead channel (all zeros) gets `max(offset, floor) > 0`, and a channel whose norm exceeds
//! the f32 range is clamped to `f32::MAX`. Hence every scale is finite and strictly positive,
//! and its inverse is finite and non-zero: no division by zero or NaN downstream.

use crate::error::{check_finite, check_len, LinalgError, Result};

/// How per-channel norms are combined across calibration windows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScaleRule {
    /// Mean over windows of each window's per-channel L2 norm (reference implementation).
    #[default]
    WindowMeanL2,
    /// Per-channel L2 norm over every observed token (paper eq. 3).
    GlobalL2,
}

/// Parameters of [`ActivationNorms`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScaleParams {
    /// Combination rule.
    pub rule: ScaleRule,
    /// Added to every norm (reference: `1e-3`). Must be finite and `>= 0`.
    pub offset: f32,
    /// Lower bound of every scale, so dead channels never divide by zero. Must be finite and
    /// `> 0`.
    pub floor: f32,
    /// Power `α` the norm is raised to, `s = (norm + offset)^α` (AWQ searches such an α; the
    /// paper and the reference use `1`). Must be finite and in `0 ..= 4`; `0` turns
    /// scaling into the identity.
    pub exponent: f32,
}

impl Default for ScaleParams {
    fn default() -> Self {
        Self {
            rule: ScaleRule::WindowMeanL2,
            offset: 1e-3,
            floor: 1e-6,
            exponent: 1.0,
        }
    }
}

impl ScaleParams {
    fn validate(&self) -> Result<()> {
        if !(self.offset.is_finite() && self.offset >= 0.0) {
            return Err(LinalgError::InvalidParameter {
                name: "offset",
                reason: format!("must be finite and >= 0, got {}", self.offset),
            });
        }
        if !(self.floor.is_finite() && self.floor > 0.0) {
            return Err(LinalgError::InvalidParameter {
                name: "floor",
                reason: format!("must be finite and > 0, got {}", self.floor),
            });
        }
        if !(self.exponent.is_finite() && (0.0..=4.0).contains(&self.exponent)) {
            return Err(LinalgError::InvalidParameter {
                name: "exponent",
                reason: format!("must be finite and in 0..=4, got {}", self.exponent),
            });
        }
        Ok(())
    }
}

/// Streaming accumulator of per-input-channel activation statistics.
///
/// Feed it one calibration window at a time with [`observe`](Self::observe); read the scale
/// vector with [`scale`](Self::scale). Accumulators of disjoint windows can be combined with
/// [`merge`](Self::merge) (e.g. one per thread).
#[derive(Clone, Debug)]
pub struct ActivationNorms {
    params: ScaleParams,
    /// Σ over windows of the window's L2 norm, per channel.
    sum_window_norms: Vec<f64>,
    /// Σ over all tokens of x², per channel.
    sum_squares: Vec<f64>,
    /// Per-window Σx² scratch, kept to avoid an allocation per window.
    scratch: Vec<f64>,
    windows: u64,
    tokens: u64,
}

impl ActivationNorms {
    /// An empty accumulator for `channels` input channels.
    pub fn new(channels: usize, params: ScaleParams) -> Result<Self> {
        params.validate()?;
        if channels == 0 {
            return Err(LinalgError::InvalidParameter {
                name: "channels",
                reason: "must be at least 1".into(),
            });
        }
        Ok(Self {
            params,
            sum_window_norms: vec![0.0; channels],
            sum_squares: vec![0.0; channels],
            scratch: vec![0.0; channels],
            windows: 0,
            tokens: 0,
        })
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.sum_squares.len()
    }
    /// Windows observed so far.
    pub fn windows(&self) -> u64 {
        self.windows
    }
    /// Tokens (activation rows) observed so far.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }
    /// The parameters.
    pub fn params(&self) -> &ScaleParams {
        &self.params
    }

    /// Adds one calibration window: `x` is `rows × channels`, row-major (one row per token).
    ///
    /// Non-finite activations and bad lengths are rejected before any state changes, so a
    /// failed call leaves the accumulator as it was.
    pub fn observe(&mut self, x: &[f32], rows: usize) -> Result<()> {
        let c = self.channels();
        if rows == 0 {
            return Err(LinalgError::InvalidParameter {
                name: "rows",
                reason: "a window needs at least one token".into(),
            });
        }
        check_len("activations", rows.saturating_mul(c), x.len())?;
        check_finite("activations", x)?;
        self.scratch.fill(0.0);
        for row in x.chunks_exact(c) {
            for (acc, &v) in self.scratch.iter_mut().zip(row) {
                let v = v as f64;
                *acc += v * v;
            }
        }
        for ((wn, sq), &s) in self
            .sum_window_norms
            .iter_mut()
            .zip(&mut self.sum_squares)
            .zip(&self.scratch)
        {
            *wn += s.sqrt();
            *sq += s;
        }
        self.windows += 1;
        self.tokens += rows as u64;
        Ok(())
    }

    /// Adds the windows another accumulator has seen (same channel count required; this
    /// accumulator's parameters are kept).
    pub fn merge(&mut self, other: &ActivationNorms) -> Result<()> {
        check_len(
            "merged accumulator channels",
            self.channels(),
            other.channels(),
        )?;
        for (a, b) in self
            .sum_window_norms
            .iter_mut()
            .zip(&other.sum_window_norms)
        {
            *a += b;
        }
        for (a, b) in self.sum_squares.iter_mut().zip(&other.sum_squares) {
            *a += b;
        }
        self.windows += other.windows;
        self.tokens += other.tokens;
        Ok(())
    }

    /// Raw per-channel norms under the configured rule, before offset and clamping.
    pub fn norms(&self) -> Result<Vec<f64>> {
        if self.windows == 0 {
            return Err(LinalgError::NoObservations);
        }
        Ok(match self.params.rule {
            ScaleRule::WindowMeanL2 => {
                let n = self.windows as f64;
                self.sum_window_norms.iter().map(|s| s / n).collect()
            }
            ScaleRule::GlobalL2 => self.sum_squares.iter().map(|s| s.sqrt()).collect(),
        })
    }

    /// The scale vector `s` (one entry per input channel): `clamp((norm + offset)^exponent,
    /// floor, f32::MAX)`, always finite and `> 0` (see the module docs).
    pub fn scale(&self) -> Result<Vec<f32>> {
        let p = self.params;
        Ok(self
            .norms()?
            .into_iter()
            .map(|n| {
                let s = (n + p.offset as f64)
                    .powf(p.exponent as f64)
                    .max(p.floor as f64);
                // f64 -> f32 rounds overflow to +inf; clamp first.
                s.min(f32::MAX as f64) as f32
            })
            .collect())
    }
}

/// `1/s` for every entry, for restoration (`bitstack_core::kernels::restore_into`'s
/// `inv_scale`). Rejects entries that are not finite and strictly positive, and entries whose
/// reciprocal would round to zero.
pub fn inverse_scale(scale: &[f32]) -> Result<Vec<f32>> {
    check_scale(scale, scale.len())?;
    Ok(scale.iter().map(|s| 1.0 / s).collect())
}

/// Checks a scale vector for `cols` columns: finite, strictly positive, invertible in f32.
pub(crate) fn check_scale(scale: &[f32], cols: usize) -> Result<()> {
    check_len("scale", cols, scale.len())?;
    check_finite("scale", scale)?;
    if let Some(index) = scale.iter().position(|&s| s <= 0.0 || 1.0 / s == 0.0) {
        return Err(LinalgError::InvalidParameter {
            name: "scale",
            reason: format!(
                "entry {index} is {}; scales must be > 0 with a non-zero inverse",
                scale[index]
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_mean_matches_hand_computation() {
        let mut acc = ActivationNorms::new(2, ScaleParams::default()).unwrap();
        // Window 1: channel norms (5, 0); window 2: (0, 2).
        acc.observe(&[3.0, 0.0, 4.0, 0.0], 2).unwrap();
        acc.observe(&[0.0, 2.0], 1).unwrap();
        let s = acc.scale().unwrap();
        assert!((s[0] - (2.5 + 1e-3)).abs() < 1e-6, "{s:?}");
        assert!((s[1] - (1.0 + 1e-3)).abs() < 1e-6, "{s:?}");
        assert_eq!((acc.windows(), acc.tokens()), (2, 3));
    }

    #[test]
    fn exponent_raises_the_norm() {
        let params = ScaleParams {
            rule: ScaleRule::GlobalL2,
            offset: 0.0,
            exponent: 0.5,
            ..ScaleParams::default()
        };
        let mut acc = ActivationNorms::new(2, params).unwrap();
        acc.observe(&[3.0, 16.0, 4.0, 0.0], 2).unwrap();
        let s = acc.scale().unwrap();
        assert!(
            (s[0] - 5f32.sqrt()).abs() < 1e-6 && (s[1] - 4.0).abs() < 1e-6,
            "{s:?}"
        );
        let identity = ScaleParams {
            exponent: 0.0,
            ..params
        };
        let mut acc = ActivationNorms::new(2, identity).unwrap();
        acc.observe(&[3.0, 16.0], 1).unwrap();
        assert_eq!(acc.scale().unwrap(), vec![1.0, 1.0]);
    }

    #[test]
    fn global_rule_is_plain_l2() {
        let params = ScaleParams {
            rule: ScaleRule::GlobalL2,
            offset: 0.0,
            ..ScaleParams::default()
        };
        let mut acc = ActivationNorms::new(2, params).unwrap();
        acc.observe(&[3.0, 0.0, 4.0, 0.0], 2).unwrap();
        acc.observe(&[0.0, 2.0], 1).unwrap();
        let s = acc.scale().unwrap();
        assert!(
            (s[0] - 5.0).abs() < 1e-6 && (s[1] - 2.0).abs() < 1e-6,
            "{s:?}"
        );
    }

    #[test]
    fn dead_and_huge_channels_stay_finite_and_positive() {
        let params = ScaleParams {
            rule: ScaleRule::GlobalL2,
            offset: 0.0,
            floor: 1e-6,
            exponent: 1.0,
        };
        let mut acc = ActivationNorms::new(3, params).unwrap();
        for _ in 0..4 {
            acc.observe(&[0.0, f32::MAX, 1.0, 0.0, f32::MAX, 1.0], 2)
                .unwrap();
        }
        let s = acc.scale().unwrap();
        assert_eq!(s[0], 1e-6);
        assert_eq!(s[1], f32::MAX);
        let inv = inverse_scale(&s).unwrap();
        assert!(inv.iter().all(|v| v.is_finite() && *v > 0.0), "{inv:?}");
    }

    #[test]
    fn typed_errors_and_no_state_change_on_failure() {
        assert!(matches!(
            ActivationNorms::new(0, ScaleParams::default()),
            Err(LinalgError::InvalidParameter { .. })
        ));
        let bad = ScaleParams {
            floor: 0.0,
            ..ScaleParams::default()
        };
        assert!(ActivationNorms::new(2, bad).is_err());
        for exponent in [-0.5, 4.5, f32::NAN] {
            let bad = ScaleParams {
                exponent,
                ..ScaleParams::default()
            };
            assert!(ActivationNorms::new(2, bad).is_err(), "{exponent}");
        }
        let mut acc = ActivationNorms::new(2, ScaleParams::default()).unwrap();
        assert!(matches!(acc.scale(), Err(LinalgError::NoObservations)));
        assert!(matches!(
            acc.observe(&[1.0, f32::NAN], 1),
            Err(LinalgError::NonFinite { index: 1, .. })
        ));
        assert!(matches!(
            acc.observe(&[1.0, 2.0, 3.0], 2),
            Err(LinalgError::ShapeMismatch { .. })
        ));
        assert!(acc.observe(&[], 0).is_err());
        assert_eq!(acc.windows(), 0);
        assert!(inverse_scale(&[1.0, 0.0]).is_err());
        assert!(inverse_scale(&[1.0, f32::INFINITY]).is_err());
    }

    #[test]
    fn merge_equals_sequential() {
        let x1 = [1.0, -2.0, 0.5, 3.0];
        let x2 = [4.0, 0.25];
        let mut a = ActivationNorms::new(2, ScaleParams::default()).unwrap();
        a.observe(&x1, 2).unwrap();
        a.observe(&x2, 1).unwrap();
        let mut b1 = ActivationNorms::new(2, ScaleParams::default()).unwrap();
        let mut b2 = b1.clone();
        b1.observe(&x1, 2).unwrap();
        b2.observe(&x2, 1).unwrap();
        b1.merge(&b2).unwrap();
        assert_eq!(a.scale().unwrap(), b1.scale().unwrap());
        let c3 = ActivationNorms::new(3, ScaleParams::default()).unwrap();
        assert!(b1.merge(&c3).is_err());
    }
}
