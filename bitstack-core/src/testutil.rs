//! Deterministic random blocks for tests, benchmarks and other crates' tests.
//!
//! Not part of the public API: hidden from the documentation and free to change in any
//! release (it is public only so the workspace's other crates can share it in their tests).

use crate::block::{Factor, FactorDtype, ResidualBlock};
use crate::signs::{pack_row_bools, words_per_row};
use half::f16;

/// A small xorshift generator: deterministic, dependency-free.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// Seeded generator (any seed, including 0).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// Standard normal (Box–Muller, one value per two draws).
    pub fn next_gaussian(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

/// A `rows × cols` weight like a real LLM layer's: Gaussian (σ = 0.02) with three input
/// columns (3, cols/2, cols−5, those that exist) scaled ×8, the heavy-channel pattern.
pub fn heavy_gaussian(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = XorShift::new(seed);
    let mut w: Vec<f32> = (0..rows * cols)
        .map(|_| 0.02 * rng.next_gaussian())
        .collect();
    for j in [3, cols / 2, cols.saturating_sub(5)] {
        for i in (0..rows).filter(|_| j < cols) {
            w[i * cols + j] *= 8.0;
        }
    }
    w
}

/// A random valid block (factors uniform in [-1, 1), random signs).
pub fn random_block(rows: usize, cols: usize, rank: usize, seed: u64) -> ResidualBlock {
    random_block_with(rows, cols, rank, seed, FactorDtype::F16)
}

/// [`random_block`] with factors of type `dtype`: for int8, codes uniform in −127..=127 and
/// per-column scales uniform in [0.5, 1.5)/127 (so values lie within about ±1.5).
pub fn random_block_with(
    rows: usize,
    cols: usize,
    rank: usize,
    seed: u64,
    dtype: FactorDtype,
) -> ResidualBlock {
    let mut rng = XorShift::new(seed);
    let wpr = words_per_row(cols);
    let mut signs = vec![0u64; rows * wpr];
    for r in 0..rows {
        let bits: Vec<bool> = (0..cols).map(|_| rng.next_u64() & 1 == 1).collect();
        pack_row_bools(bits, &mut signs[r * wpr..(r + 1) * wpr]);
    }
    let mut factor = |n: usize| match dtype {
        FactorDtype::F16 => Factor::F16(
            (0..n * rank)
                .map(|_| f16::from_f32(rng.next_f32()))
                .collect(),
        ),
        FactorDtype::I8 => Factor::I8 {
            q: (0..n * rank)
                .map(|_| (rng.next_f32() * 127.49).round() as i8)
                .collect(),
            scale: (0..rank)
                .map(|_| (1.0 + 0.5 * rng.next_f32()) / 127.0)
                .collect(),
        },
    };
    let a = factor(rows);
    let b = factor(cols);
    ResidualBlock::with_factors(rows, cols, rank, signs, a, b).expect("valid by construction")
}
