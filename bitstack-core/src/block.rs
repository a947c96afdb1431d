//! Residual blocks: the ~1 bit/weight unit BitStack loads and drops.
//!
//! A block's factors `A` (`rows × k`) and `B` (`cols × k`) are stored either in f16
//! ([`FactorDtype::F16`], the paper's layout) or as int8 with one f32 scale per factor column
//! ([`FactorDtype::I8`]): `A[i][r] = qa[i][r]·sa[r]`, `B[j][r] = qb[j][r]·sb[r]`. The value a
//! block *means* is always the dequantized one, `q as f32 * s` rounded to f32, and the
//! decomposition takes each level's residual against exactly that value.

use crate::budget::block_bytes;
use crate::error::{check_len, CoreError, Result};
use crate::signs::{words_per_row, SignsRef};
use half::f16;
use std::fmt;
use std::str::FromStr;

/// Storage type of a block's factor matrices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FactorDtype {
    /// IEEE half precision, 2 bytes per value (the paper's layout; BitStack file 1.0).
    #[default]
    F16,
    /// int8 codes with one f32 scale per factor column (rank), 1 byte per value plus
    /// `4·k` bytes per factor.
    I8,
}

impl FactorDtype {
    /// Lower-case name (`f16`, `i8`), as [`FromStr`] reads it.
    pub fn name(self) -> &'static str {
        match self {
            FactorDtype::F16 => "f16",
            FactorDtype::I8 => "i8",
        }
    }
    /// Bytes of one `n × rank` factor matrix of this type, scales included.
    pub const fn factor_bytes(self, n: usize, rank: usize) -> u64 {
        match self {
            FactorDtype::F16 => 2 * (n as u64) * (rank as u64),
            FactorDtype::I8 => (n as u64) * (rank as u64) + 4 * rank as u64,
        }
    }
}

impl fmt::Display for FactorDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FactorDtype {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f16" => Ok(FactorDtype::F16),
            "i8" | "int8" => Ok(FactorDtype::I8),
            _ => Err(CoreError::InvalidParameter {
                name: "factor dtype",
                reason: format!("{s:?} (use f16 or i8)"),
            }),
        }
    }
}

/// One borrowed factor matrix (`n × rank`, row-major).
#[derive(Clone, Copy, Debug)]
pub enum FactorRef<'a> {
    /// f16 values.
    F16(&'a [f16]),
    /// int8 codes `q` (`n × rank`) and one scale per column (`rank`): value `q·scale[r]`.
    I8 {
        /// Codes, `n × rank` row-major.
        q: &'a [i8],
        /// Per-column scales, `rank` finite values.
        scale: &'a [f32],
    },
}

impl<'a> FactorRef<'a> {
    /// The storage type.
    pub fn dtype(&self) -> FactorDtype {
        match self {
            FactorRef::F16(_) => FactorDtype::F16,
            FactorRef::I8 { .. } => FactorDtype::I8,
        }
    }
    /// Number of values (`n × rank`).
    pub fn len(&self) -> usize {
        match self {
            FactorRef::F16(v) => v.len(),
            FactorRef::I8 { q, .. } => q.len(),
        }
    }
    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes held (values and scales).
    pub fn bytes(&self) -> u64 {
        match self {
            FactorRef::F16(v) => 2 * v.len() as u64,
            FactorRef::I8 { q, scale } => q.len() as u64 + 4 * scale.len() as u64,
        }
    }
    /// The dequantized value of row `i`, column `r` (the value the block means).
    #[inline]
    pub fn get(&self, i: usize, r: usize, rank: usize) -> f32 {
        match self {
            FactorRef::F16(v) => v[i * rank + r].to_f32(),
            FactorRef::I8 { q, scale } => q[i * rank + r] as f32 * scale[r],
        }
    }
    /// Every dequantized value, row-major, into `out` (`n × rank`).
    pub fn dequantize_into(&self, rank: usize, out: &mut [f32]) {
        match self {
            FactorRef::F16(v) => {
                use half::slice::HalfFloatSliceExt;
                v.convert_to_f32_slice(&mut out[..v.len()]);
            }
            FactorRef::I8 { q, scale } => {
                for (orow, qrow) in out.chunks_exact_mut(rank).zip(q.chunks_exact(rank)) {
                    for ((o, &q), &s) in orow.iter_mut().zip(qrow).zip(*scale) {
                        *o = q as f32 * s;
                    }
                }
            }
        }
    }
    /// Copies into an owned factor.
    pub fn to_owned(&self) -> Factor {
        match self {
            FactorRef::F16(v) => Factor::F16(v.to_vec()),
            FactorRef::I8 { q, scale } => Factor::I8 {
                q: q.to_vec(),
                scale: scale.to_vec(),
            },
        }
    }
    fn check(&self, what: &'static str, n: usize, rank: usize) -> Result<()> {
        check_len(what, n * rank, self.len())?;
        match self {
            FactorRef::F16(v) => {
                if v.iter().any(|v| !v.is_finite()) {
                    return Err(CoreError::NonFinite("residual block factors"));
                }
            }
            FactorRef::I8 { scale, .. } => {
                check_len("factor scales", rank, scale.len())?;
                if scale.iter().any(|v| !v.is_finite()) {
                    return Err(CoreError::NonFinite("residual block factor scales"));
                }
            }
        }
        Ok(())
    }
}

/// An owned factor matrix (see [`FactorRef`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Factor {
    /// f16 values.
    F16(Vec<f16>),
    /// int8 codes and per-column scales.
    I8 {
        /// Codes, `n × rank` row-major.
        q: Vec<i8>,
        /// Per-column scales (`rank`).
        scale: Vec<f32>,
    },
}

impl Factor {
    /// Borrowed view.
    pub fn view(&self) -> FactorRef<'_> {
        match self {
            Factor::F16(v) => FactorRef::F16(v),
            Factor::I8 { q, scale } => FactorRef::I8 { q, scale },
        }
    }
}

/// One residual block `Ŵ⁽ˡ⁾ = S ⊙ (A Bᵀ)` of a `rows × cols` weight (paper eq. 7).
///
/// * `signs`: the packed sign matrix `S` (layout in [`crate::signs`]).
/// * `a`: `rows × rank`, row-major, `√σ·u` (f16 or int8 + scales, see [`FactorDtype`]).
/// * `b`: `cols × rank`, row-major, `√σ·v`, the same type as `a`.
#[derive(Clone, Debug, PartialEq)]
pub struct ResidualBlock {
    rows: usize,
    cols: usize,
    rank: usize,
    signs: Vec<u64>,
    a: Factor,
    b: Factor,
}

/// A borrowed [`ResidualBlock`], e.g. a zero-copy view into a memory-mapped stack file.
#[derive(Clone, Copy, Debug)]
pub struct ResidualBlockRef<'a> {
    /// Packed signs.
    pub signs: SignsRef<'a>,
    /// Left factor, `rows × rank` row-major.
    pub a: FactorRef<'a>,
    /// Right factor, `cols × rank` row-major.
    pub b: FactorRef<'a>,
    /// Number of singular vectors `k`.
    pub rank: usize,
}

impl<'a> ResidualBlockRef<'a> {
    /// A block with f16 factors; checks every length and the factors for non-finite values.
    pub fn new(
        rows: usize,
        cols: usize,
        rank: usize,
        signs: &'a [u64],
        a: &'a [f16],
        b: &'a [f16],
    ) -> Result<Self> {
        Self::with_factors(
            rows,
            cols,
            rank,
            signs,
            FactorRef::F16(a),
            FactorRef::F16(b),
        )
    }
    /// A block with factors of any [`FactorDtype`] (both the same); checks every length,
    /// the values (f16) or scales (int8) for non-finite values.
    pub fn with_factors(
        rows: usize,
        cols: usize,
        rank: usize,
        signs: &'a [u64],
        a: FactorRef<'a>,
        b: FactorRef<'a>,
    ) -> Result<Self> {
        if rank == 0 {
            return Err(CoreError::InvalidParameter {
                name: "rank",
                reason: "must be at least 1".into(),
            });
        }
        if a.dtype() != b.dtype() {
            return Err(CoreError::InvalidParameter {
                name: "factor dtype",
                reason: format!("A is {} but B is {}", a.dtype(), b.dtype()),
            });
        }
        let signs = SignsRef::new(rows, cols, signs)?;
        a.check("factor A", rows, rank)?;
        b.check("factor B", cols, rank)?;
        Ok(Self { signs, a, b, rank })
    }
    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.signs.rows()
    }
    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.signs.cols()
    }
    /// The factors' storage type.
    pub fn factor_dtype(&self) -> FactorDtype {
        self.a.dtype()
    }
    /// Copies into an owned block.
    pub fn to_owned(&self) -> ResidualBlock {
        ResidualBlock {
            rows: self.rows(),
            cols: self.cols(),
            rank: self.rank,
            signs: self.signs.words().to_vec(),
            a: self.a.to_owned(),
            b: self.b.to_owned(),
        }
    }
    /// `B` as the fused kernels read it, `cols × rank` f32 into `out`: for f16 the values;
    /// for int8 `qb[j][r]·(sa[r]·sb[r])`, the product of both scales folded into the input
    /// side so that the row side reads the raw codes ([`Self::kernel_a_row`]).
    pub(crate) fn kernel_b_into(&self, out: &mut [f32]) {
        let k = self.rank;
        match (self.a, self.b) {
            (FactorRef::I8 { scale: sa, .. }, FactorRef::I8 { q, scale: sb }) => {
                // One fold per rank for the whole factor (the same f32 product per value);
                // on the stack for the ranks the kernels serve (≤ 64).
                let mut stack = [0.0f32; 64];
                let mut heap = Vec::new();
                let fold = if k <= 64 {
                    &mut stack[..k]
                } else {
                    heap.resize(k, 0.0);
                    &mut heap[..]
                };
                for ((f, a), b) in fold.iter_mut().zip(sa).zip(sb) {
                    *f = a * b;
                }
                crate::kernels::scale_codes_into(q, fold, out);
            }
            _ => self.b.dequantize_into(k, out),
        }
    }
    /// `A`'s row `i` as the fused kernels read it into `out[..rank]`: the f16 values, or the
    /// raw int8 codes (their scale is folded into `B`, see [`Self::kernel_b_into`]).
    #[inline]
    pub(crate) fn kernel_a_row(&self, i: usize, out: &mut [f32]) {
        let k = self.rank;
        match self.a {
            FactorRef::F16(a) => {
                use half::slice::HalfFloatSliceExt;
                a[i * k..(i + 1) * k].convert_to_f32_slice(&mut out[..k]);
            }
            FactorRef::I8 { q, .. } => {
                for (o, &q) in out[..k].iter_mut().zip(&q[i * k..(i + 1) * k]) {
                    *o = q as f32;
                }
            }
        }
    }
}

impl ResidualBlock {
    /// Builds a block with f16 factors from its parts, validating shapes and finiteness.
    pub fn new(
        rows: usize,
        cols: usize,
        rank: usize,
        signs: Vec<u64>,
        a: Vec<f16>,
        b: Vec<f16>,
    ) -> Result<Self> {
        Self::with_factors(rows, cols, rank, signs, Factor::F16(a), Factor::F16(b))
    }
    /// Builds a block with factors of any [`FactorDtype`] (both the same).
    pub fn with_factors(
        rows: usize,
        cols: usize,
        rank: usize,
        signs: Vec<u64>,
        a: Factor,
        b: Factor,
    ) -> Result<Self> {
        ResidualBlockRef::with_factors(rows, cols, rank, &signs, a.view(), b.view())?;
        Ok(Self {
            rows,
            cols,
            rank,
            signs,
            a,
            b,
        })
    }
    /// Borrowed view.
    pub fn view(&self) -> ResidualBlockRef<'_> {
        ResidualBlockRef {
            signs: SignsRef::new(self.rows, self.cols, &self.signs)
                .expect("validated at construction"),
            a: self.a.view(),
            b: self.b.view(),
            rank: self.rank,
        }
    }
    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Singular vectors kept (`k`).
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// The factors' storage type.
    pub fn factor_dtype(&self) -> FactorDtype {
        self.a.view().dtype()
    }
    /// Packed sign words.
    pub fn sign_words(&self) -> &[u64] {
        &self.signs
    }
    /// Left factor (`rows × rank`).
    pub fn a(&self) -> FactorRef<'_> {
        self.a.view()
    }
    /// Right factor (`cols × rank`).
    pub fn b(&self) -> FactorRef<'_> {
        self.b.view()
    }
    /// Heap bytes this block holds (signs + factors + scales), equal to [`block_bytes`].
    pub fn heap_bytes(&self) -> u64 {
        debug_assert_eq!(self.signs.len(), self.rows * words_per_row(self.cols));
        block_bytes(self.rows, self.cols, self.rank, self.factor_dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i8_block_dequantizes_and_counts_bytes() {
        let signs = vec![1u64; 3];
        let a = Factor::I8 {
            q: vec![1, -2, 127, -127, 0, 5],
            scale: vec![0.5, 0.25],
        };
        let b = Factor::I8 {
            q: vec![3, 4],
            scale: vec![2.0, 4.0],
        };
        let blk = ResidualBlock::with_factors(3, 1, 2, signs, a, b).unwrap();
        assert_eq!(blk.factor_dtype(), FactorDtype::I8);
        assert_eq!(blk.a().get(1, 0, 2), 127.0 * 0.5);
        assert_eq!(blk.a().get(1, 1, 2), -127.0 * 0.25);
        assert_eq!(blk.heap_bytes(), 3 * 8 + (3 * 2 + 8) + (2 + 8));
        let v = blk.view();
        let mut kb = [0.0f32; 2];
        v.kernel_b_into(&mut kb);
        assert_eq!(kb, [3.0 * 0.5 * 2.0, 4.0 * 0.25 * 4.0]);
        let mut ka = [0.0f32; 2];
        v.kernel_a_row(2, &mut ka);
        assert_eq!(ka, [0.0, 5.0]);
        assert_eq!(v.to_owned(), blk);
    }

    #[test]
    fn bad_i8_factors_are_errors() {
        let s = [0b11u64; 2];
        let ok_b = FactorRef::I8 {
            q: &[1, 1],
            scale: &[1.0],
        };
        let mk = |a| ResidualBlockRef::with_factors(2, 2, 1, &s, a, ok_b);
        assert!(mk(FactorRef::I8 {
            q: &[1, 1],
            scale: &[1.0]
        })
        .is_ok());
        assert!(mk(FactorRef::I8 {
            q: &[1],
            scale: &[1.0]
        })
        .is_err());
        assert!(mk(FactorRef::I8 {
            q: &[1, 1],
            scale: &[]
        })
        .is_err());
        assert!(mk(FactorRef::I8 {
            q: &[1, 1],
            scale: &[f32::NAN]
        })
        .is_err());
        let h = [f16::ONE; 2];
        assert!(mk(FactorRef::F16(&h)).is_err(), "mixed dtypes accepted");
        assert!("i8".parse::<FactorDtype>().unwrap() == FactorDtype::I8);
        assert!("f32".parse::<FactorDtype>().is_err());
    }
}
