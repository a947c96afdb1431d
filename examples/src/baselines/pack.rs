//! Dense bit-packing of 2/3/4-bit integer codes into `u32` words.
//!
//! Code `i` of a row occupies bits `i·bits .. (i+1)·bits` of the row's little-endian bit stream;
//! 3-bit codes straddle word boundaries, so nothing is wasted but the tail of the last word.

use super::error::{BaselineError, Result};

/// Bit widths the baselines support.
pub const SUPPORTED_BITS: [u8; 3] = [2, 3, 4];

pub(crate) fn check_bits(bits: u8) -> Result<()> {
    if SUPPORTED_BITS.contains(&bits) {
        Ok(())
    } else {
        Err(BaselineError::InvalidParameter {
            name: "bits",
            reason: format!("{bits} is not one of 2, 3, 4"),
        })
    }
}

/// `u32` words needed for `n` codes of `bits` bits.
pub fn packed_words(n: usize, bits: u8) -> usize {
    (n * bits as usize).div_ceil(32)
}

/// Packs `codes` (each `< 2^bits`) densely into `packed_words(codes.len(), bits)` words.
pub fn pack_codes(codes: &[u8], bits: u8) -> Result<Vec<u32>> {
    check_bits(bits)?;
    let maxq = (1u8 << bits) - 1;
    if let Some(&bad) = codes.iter().find(|&&c| c > maxq) {
        return Err(BaselineError::InvalidParameter {
            name: "codes",
            reason: format!("code {bad} does not fit in {bits} bits"),
        });
    }
    let mut words = vec![0u32; packed_words(codes.len(), bits)];
    pack_into(codes, bits, &mut words);
    Ok(words)
}

/// Unpacks the first `n` codes of a packed stream.
pub fn unpack_codes(words: &[u32], bits: u8, n: usize) -> Result<Vec<u8>> {
    check_bits(bits)?;
    super::error::check_len("packed words", packed_words(n, bits), words.len())?;
    let mut out = vec![0u8; n];
    unpack_into(words, bits, &mut out);
    Ok(out)
}

/// Caller guarantees `bits` is supported, codes fit and `words` is zeroed and long enough.
pub(crate) fn pack_into(codes: &[u8], bits: u8, words: &mut [u32]) {
    let b = bits as usize;
    for (i, &c) in codes.iter().enumerate() {
        let bit = i * b;
        let (w, off) = (bit / 32, bit % 32);
        words[w] |= (c as u32) << off;
        if off + b > 32 {
            words[w + 1] |= (c as u32) >> (32 - off);
        }
    }
}

/// Caller guarantees `words` holds at least `out.len()` codes.
pub(crate) fn unpack_into(words: &[u32], bits: u8, out: &mut [u8]) {
    let b = bits as usize;
    let mask = (1u64 << b) - 1;
    for (i, o) in out.iter_mut().enumerate() {
        let bit = i * b;
        let (w, off) = (bit / 32, bit % 32);
        let lo = words[w] as u64;
        // Only read the next word when the code straddles into it: the last word of a row
        // has no successor.
        let v = if off + b > 32 {
            lo | ((words[w + 1] as u64) << 32)
        } else {
            lo
        };
        *o = ((v >> off) & mask) as u8;
    }
}
