//! Memory budgets and the byte accounting of paper eq. 9.
//!
//! `MB` means 10^6 bytes and `MiB` 2^20 bytes (the paper's "MB" are MiB); both are accepted,
//! as are `KB`/`KiB`, `GB`/`GiB` and a plain byte count.

use crate::block::FactorDtype;
use crate::error::{CoreError, Result};
use std::fmt;
use std::str::FromStr;

/// Bytes in a mebibyte (2^20).
pub const MIB: f64 = 1024.0 * 1024.0;
/// Bytes in a megabyte (10^6).
pub const MB: f64 = 1e6;

/// A memory budget in bytes.
///
/// ```
/// use bitstack_core::MemoryBudget;
/// assert_eq!("750MB".parse::<MemoryBudget>().unwrap().bytes(), 750_000_000);
/// assert_eq!("1.5GiB".parse::<MemoryBudget>().unwrap().bytes(), 1_610_612_736);
/// assert_eq!("123456789".parse::<MemoryBudget>().unwrap().bytes(), 123_456_789);
/// assert!("-3MB".parse::<MemoryBudget>().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemoryBudget(u64);

impl MemoryBudget {
    /// A budget of exactly `bytes` bytes.
    pub const fn from_bytes(bytes: u64) -> Self {
        Self(bytes)
    }
    /// The budget in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
    /// The budget in MB (10^6 bytes).
    pub fn mb(self) -> f64 {
        self.0 as f64 / MB
    }
    /// The budget in MiB (2^20 bytes).
    pub fn mib(self) -> f64 {
        self.0 as f64 / MIB
    }
}

impl fmt::Display for MemoryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2} MB ({:.2} MiB)", self.mb(), self.mib())
    }
}

impl FromStr for MemoryBudget {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        let err = |reason| CoreError::InvalidBudget {
            input: s.to_string(),
            reason,
        };
        let t = s.trim();
        if t.is_empty() {
            return Err(err("empty"));
        }
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        if num.is_empty() {
            return Err(err("no number"));
        }
        let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "kb" | "k" => 1e3,
            "kib" => 1024.0,
            "mb" | "m" => 1e6,
            "mib" => MIB,
            "gb" | "g" => 1e9,
            "gib" => MIB * 1024.0,
            _ => return Err(err("unknown unit (use B, KB, KiB, MB, MiB, GB or GiB)")),
        };
        let value: f64 = num.parse().map_err(|_| err("not a number"))?;
        if !value.is_finite() {
            return Err(err("not finite"));
        }
        let bytes = (value * mult).round();
        if bytes > u64::MAX as f64 / 2.0 {
            return Err(err("too large"));
        }
        if unit.trim().is_empty() && num.contains('.') {
            return Err(err("a plain byte count must be an integer"));
        }
        Ok(Self(bytes as u64))
    }
}

/// Bits of one residual block of an `rows × cols` weight with `rank` singular vectors, paper eq. 9:
/// `m·n + 16·k·(m+n)`.
pub const fn block_bits(rows: usize, cols: usize, rank: usize) -> u64 {
    (rows as u64) * (cols as u64) + 16 * (rank as u64) * (rows as u64 + cols as u64)
}

/// Bytes a [`crate::ResidualBlock`] of this shape actually holds in memory and on disk: sign rows
/// padded to whole 64-bit words, plus the two factor matrices of `factors`' type (int8 factors
/// add one f32 scale per rank and factor). With f16 factors it equals `block_bits / 8` when
/// `cols` is a multiple of 64 (every LLM shape we know).
pub const fn block_bytes(rows: usize, cols: usize, rank: usize, factors: FactorDtype) -> u64 {
    let words_per_row = cols.div_ceil(64) as u64;
    (rows as u64) * words_per_row * 8
        + factors.factor_bytes(rows, rank)
        + factors.factor_bytes(cols, rank)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mib(bits: u64) -> f64 {
        bits as f64 / 8.0 / MIB
    }

    /// Paper Table 6 (k = 16).
    #[test]
    fn table6_block_sizes() {
        let cases = [
            (4096, 4096, 2.25),
            (1024, 4096, 0.66),
            (14336, 4096, 7.56),
            (4096, 14336, 7.56),
            (11008, 4096, 5.84),
        ];
        for (m, n, want) in cases {
            let got = mib(block_bits(m, n, 16));
            assert!((got - want).abs() < 0.005, "{m}x{n}: {got} vs {want}");
            assert_eq!(
                block_bits(m, n, 16) / 8,
                block_bytes(m, n, 16, FactorDtype::F16)
            );
        }
    }

    #[test]
    fn padding_counted() {
        // 3 columns still take one whole 64-bit word per row.
        assert_eq!(block_bytes(2, 3, 1, FactorDtype::F16), 2 * 8 + 2 * 5);
        // int8: one byte per factor value plus an f32 scale per rank for A and for B.
        assert_eq!(block_bytes(2, 3, 1, FactorDtype::I8), 2 * 8 + 5 + 2 * 4);
        // SmolLM2's 576 × 576 at k = 5: the factors fall from 11,520 to 5,800 bytes.
        assert_eq!(
            block_bytes(576, 576, 5, FactorDtype::I8),
            576 * 9 * 8 + 5 * 1152 + 40
        );
    }

    #[test]
    fn parse_budgets() {
        let p = |s: &str| s.parse::<MemoryBudget>().map(|b| b.bytes());
        assert_eq!(p("750MB").unwrap(), 750_000_000);
        assert_eq!(p("750 MiB").unwrap(), 750 * 1024 * 1024);
        assert_eq!(p("1.5GiB").unwrap(), 1_610_612_736);
        assert_eq!(p("2gb").unwrap(), 2_000_000_000);
        assert_eq!(p("123456789").unwrap(), 123_456_789);
        assert_eq!(p("64KiB").unwrap(), 65536);
        for bad in [
            "",
            "MB",
            "-1MB",
            "1.2.3MB",
            "12 parsecs",
            "1e9",
            "nan",
            "1.5",
            "99999999999999999999GB",
        ] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
    }
}
