//! Residual blocks: the ~1 bit/weight unit BitStack loads and drops.

use crate::budget::block_bytes;
use crate::error::{check_len, CoreError, Result};
use crate::signs::{words_per_row, SignsRef};
use half::f16;

/// One residual block `Ŵ⁽ˡ⁾ = S ⊙ (A Bᵀ)` of a `rows × cols` weight (paper eq. 7).
///
/// * `signs`: the packed sign matrix `S` (layout in [`crate::signs`]).
/// * `a`: `rows × rank`, row-major, `√σ·u` (f16).
/// * `b`: `cols × rank`, row-major, `√σ·v` (f16).
#[derive(Clone, Debug, PartialEq)]
pub struct ResidualBlock {
    rows: usize,
    cols: usize,
    rank: usize,
    signs: Vec<u64>,
    a: Vec<f16>,
    b: Vec<f16>,
}

/// A borrowed [`ResidualBlock`], e.g. a zero-copy view into a memory-mapped stack file.
#[derive(Clone, Copy, Debug)]
pub struct ResidualBlockRef<'a> {
    /// Packed signs.
    pub signs: SignsRef<'a>,
    /// Left factor, `rows × rank` row-major.
    pub a: &'a [f16],
    /// Right factor, `cols × rank` row-major.
    pub b: &'a [f16],
    /// Number of singular vectors `k`.
    pub rank: usize,
}

impl<'a> ResidualBlockRef<'a> {
    /// Checks every length and the factors for non-finite values.
    pub fn new(
        rows: usize,
        cols: usize,
        rank: usize,
        signs: &'a [u64],
        a: &'a [f16],
        b: &'a [f16],
    ) -> Result<Self> {
        if rank == 0 {
            return Err(CoreError::InvalidParameter {
                name: "rank",
                reason: "must be at least 1".into(),
            });
        }
        let signs = SignsRef::new(rows, cols, signs)?;
        check_len("factor A", rows * rank, a.len())?;
        check_len("factor B", cols * rank, b.len())?;
        if a.iter().chain(b).any(|v| !v.is_finite()) {
            return Err(CoreError::NonFinite("residual block factors"));
        }
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
    /// Copies into an owned block.
    pub fn to_owned(&self) -> ResidualBlock {
        ResidualBlock {
            rows: self.rows(),
            cols: self.cols(),
            rank: self.rank,
            signs: self.signs.words().to_vec(),
            a: self.a.to_vec(),
            b: self.b.to_vec(),
        }
    }
}

impl ResidualBlock {
    /// Builds a block from its parts, validating shapes and finiteness.
    pub fn new(
        rows: usize,
        cols: usize,
        rank: usize,
        signs: Vec<u64>,
        a: Vec<f16>,
        b: Vec<f16>,
    ) -> Result<Self> {
        ResidualBlockRef::new(rows, cols, rank, &signs, &a, &b)?;
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
            a: &self.a,
            b: &self.b,
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
    /// Packed sign words.
    pub fn sign_words(&self) -> &[u64] {
        &self.signs
    }
    /// Left factor (`rows × rank`).
    pub fn a(&self) -> &[f16] {
        &self.a
    }
    /// Right factor (`cols × rank`).
    pub fn b(&self) -> &[f16] {
        &self.b
    }
    /// Heap bytes this block holds (signs + factors), equal to [`block_bytes`].
    pub fn heap_bytes(&self) -> u64 {
        debug_assert_eq!(self.signs.len(), self.rows * words_per_row(self.cols));
        block_bytes(self.rows, self.cols, self.rank)
    }
}
