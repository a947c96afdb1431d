//! Packing a matrix's signs into bitstack-core's layout ([`bitstack_core::signs`]).

use crate::error::{LinalgError, Result};
use bitstack_core::signs::words_per_row;
use faer::MatRef;

/// `true` where BitStack's sign is `+1`: `x >= 0`, so `sign(0) = sign(-0) = +1` (the reference
/// implementation's rule).
#[inline(always)]
pub(crate) fn is_positive(x: f32) -> bool {
    x >= 0.0
}

/// Packs the signs of `m` (`rows × cols`, any strides) row-major into 64-bit words: column
/// `j` of row `i` is bit `j % 64` of word `i·ceil(cols/64) + j/64`, set for `+1`
/// (`x >= 0`, so zeros are `+1`), padding bits clear. Rejects NaN (whose sign is undefined);
/// infinities have a sign and are accepted.
pub fn pack_signs(m: MatRef<'_, f32>) -> Result<Vec<u64>> {
    let (rows, cols) = m.shape();
    let wpr = words_per_row(cols);
    let mut words = vec![0u64; rows * wpr];
    for i in 0..rows {
        let out = &mut words[i * wpr..(i + 1) * wpr];
        for j in 0..cols {
            let x = m[(i, j)];
            if x.is_nan() {
                return Err(LinalgError::NonFinite {
                    what: "sign matrix",
                    index: i * cols + j,
                });
            }
            out[j / 64] |= (is_positive(x) as u64) << (j % 64);
        }
    }
    Ok(words)
}

/// Packs one row slice into `out` (`words_per_row(row.len())` words, overwritten). No NaN
/// check: callers guarantee finite input.
#[inline]
pub(crate) fn pack_row_into(row: &[f32], out: &mut [u64]) {
    for (w, chunk) in out.iter_mut().zip(row.chunks(64)) {
        let mut bits = 0u64;
        for (t, &x) in chunk.iter().enumerate() {
            bits |= (is_positive(x) as u64) << t;
        }
        *w = bits;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitstack_core::SignsRef;
    use faer::Mat;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pack_then_unpack_is_sign(rows in 1usize..7, cols in 1usize..200,
                                    vals in proptest::collection::vec(-3i8..=3, 7 * 200)) {
            let m = Mat::from_fn(rows, cols, |i, j| vals[i * cols + j] as f32 * 0.5);
            let words = pack_signs(m.as_ref()).unwrap();
            let signs = SignsRef::new(rows, cols, &words).unwrap();  // also checks padding
            let mut unpacked = vec![0.0; rows * cols];
            signs.unpack_into(&mut unpacked).unwrap();
            for i in 0..rows {
                for j in 0..cols {
                    let want = if m[(i, j)] >= 0.0 { 1.0 } else { -1.0 };
                    prop_assert_eq!(unpacked[i * cols + j], want);
                }
            }
            // The row kernel agrees with the strided one, also on a transposed view.
            let mut row_words = vec![0u64; words.len()];
            let wpr = words_per_row(cols);
            let flat: Vec<f32> = (0..rows * cols).map(|t| m[(t / cols, t % cols)]).collect();
            for i in 0..rows {
                pack_row_into(&flat[i * cols..(i + 1) * cols], &mut row_words[i * wpr..(i + 1) * wpr]);
            }
            prop_assert_eq!(&row_words, &words);
            let mt = m.transpose().to_owned();
            prop_assert_eq!(pack_signs(mt.transpose()).unwrap(), words);
        }
    }

    #[test]
    fn zeros_are_positive_and_nan_rejected() {
        let m = Mat::from_fn(1, 3, |_, j| [0.0f32, -0.0, -1e-30][j]);
        assert_eq!(pack_signs(m.as_ref()).unwrap(), vec![0b011]);
        let m = Mat::from_fn(2, 2, |i, j| if (i, j) == (1, 0) { f32::NAN } else { 1.0 });
        assert!(matches!(
            pack_signs(m.as_ref()),
            Err(LinalgError::NonFinite { index: 2, .. })
        ));
    }
}
