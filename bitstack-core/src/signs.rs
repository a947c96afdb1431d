//! Packed sign matrices.
//!
//! ## Bit order (part of the file format)
//! A `rows × cols` sign matrix is stored row-major in 64-bit words. Each row starts on a fresh
//! word and takes `words_per_row = ceil(cols / 64)` words. Column `j` of row `i` is bit `j % 64`
//! (least significant bit first) of word `i * words_per_row + j / 64`. A set bit means `+1`, a
//! clear bit `-1`; `sign(0)` is `+1`. Padding bits past `cols` are zero. On disk words are
//! little-endian, so the byte stream is "8 columns per byte, lowest column in the lowest bit".

use crate::error::{check_len, Result};

/// Number of 64-bit words one row of `cols` signs occupies.
pub const fn words_per_row(cols: usize) -> usize {
    cols.div_ceil(64)
}

/// A borrowed packed sign matrix.
#[derive(Clone, Copy, Debug)]
pub struct SignsRef<'a> {
    rows: usize,
    cols: usize,
    words: &'a [u64],
}

impl<'a> SignsRef<'a> {
    /// Wraps `words` as a `rows × cols` sign matrix, checking its length and padding bits.
    pub fn new(rows: usize, cols: usize, words: &'a [u64]) -> Result<Self> {
        let wpr = words_per_row(cols);
        check_len("sign words", rows * wpr, words.len())?;
        if !cols.is_multiple_of(64) {
            let pad_mask = !0u64 << (cols % 64);
            for r in 0..rows {
                if words[r * wpr + wpr - 1] & pad_mask != 0 {
                    return Err(crate::CoreError::InvalidParameter {
                        name: "sign words",
                        reason: format!("padding bits set in row {r}"),
                    });
                }
            }
        }
        Ok(Self { rows, cols, words })
    }
    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The packed words (see the module docs for the layout).
    pub fn words(&self) -> &'a [u64] {
        self.words
    }
    /// The packed words of row `i`.
    #[inline]
    pub fn row(&self, i: usize) -> &'a [u64] {
        let wpr = words_per_row(self.cols);
        &self.words[i * wpr..(i + 1) * wpr]
    }
    /// `true` when entry `(i, j)` is `+1`.
    #[inline]
    pub fn is_positive(&self, i: usize, j: usize) -> bool {
        debug_assert!(i < self.rows && j < self.cols);
        (self.row(i)[j / 64] >> (j % 64)) & 1 == 1
    }
    /// Entry `(i, j)` as `+1.0` or `-1.0`.
    #[inline]
    pub fn get(&self, i: usize, j: usize) -> f32 {
        if self.is_positive(i, j) {
            1.0
        } else {
            -1.0
        }
    }
    /// Unpacks into `out` (`rows × cols`, row-major) as ±1.0.
    pub fn unpack_into(&self, out: &mut [f32]) -> Result<()> {
        check_len("unpacked signs", self.rows * self.cols, out.len())?;
        for i in 0..self.rows {
            let row = self.row(i);
            for (j, o) in out[i * self.cols..(i + 1) * self.cols]
                .iter_mut()
                .enumerate()
            {
                *o = if (row[j / 64] >> (j % 64)) & 1 == 1 {
                    1.0
                } else {
                    -1.0
                };
            }
        }
        Ok(())
    }
}

/// Packs one row of booleans (`true` = +1) into `out` words. `out` must hold
/// `words_per_row(row.len())` words; it is overwritten.
pub fn pack_row_bools(row: impl IntoIterator<Item = bool>, out: &mut [u64]) {
    out.fill(0);
    for (j, positive) in row.into_iter().enumerate() {
        if positive {
            out[j / 64] |= 1u64 << (j % 64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pack_unpack_identity(rows in 1usize..6, cols in 1usize..200, seed in any::<u64>()) {
            let mut state = seed | 1;
            let bits: Vec<bool> = (0..rows * cols).map(|_| {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17; state & 1 == 1
            }).collect();
            let wpr = words_per_row(cols);
            let mut words = vec![0u64; rows * wpr];
            for r in 0..rows {
                pack_row_bools(bits[r * cols..(r + 1) * cols].iter().copied(), &mut words[r * wpr..(r + 1) * wpr]);
            }
            let s = SignsRef::new(rows, cols, &words).unwrap();
            let mut out = vec![0.0; rows * cols];
            s.unpack_into(&mut out).unwrap();
            for (b, o) in bits.iter().zip(&out) {
                prop_assert_eq!(*o, if *b { 1.0 } else { -1.0 });
            }
        }
    }

    #[test]
    fn padding_bits_rejected() {
        let words = [1u64 << 10];
        assert!(SignsRef::new(1, 10, &words).is_err());
        assert!(SignsRef::new(1, 11, &words).is_ok());
        assert!(SignsRef::new(2, 11, &words).is_err());
    }
}
