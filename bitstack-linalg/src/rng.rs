//! A small deterministic Gaussian generator for sketch matrices (no external RNG crate, and
//! identical streams on every platform).

/// SplitMix64: full-period, well-mixed 64-bit output, any seed.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (-1, 1) with 24 random bits.
    #[inline]
    fn next_signed_unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 + 0.5) / (1u64 << 23) as f32 - 1.0
    }
    /// Two independent standard normals (Marsaglia's polar method: no trigonometry, one
    /// `ln` per pair; the sketch needs ~10⁵ of them per SVD, so this is on the hot path).
    pub(crate) fn normal_pair(&mut self) -> (f32, f32) {
        loop {
            let u = self.next_signed_unit();
            let v = self.next_signed_unit();
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                let f = (-2.0 * s.ln() / s).sqrt();
                return (u * f, v * f);
            }
        }
    }
    /// Fills `out` with standard normals.
    pub(crate) fn fill_normal(&mut self, out: &mut [f32]) {
        let mut chunks = out.chunks_exact_mut(2);
        for pair in &mut chunks {
            let (a, b) = self.normal_pair();
            pair[0] = a;
            pair[1] = b;
        }
        if let [last] = chunks.into_remainder() {
            *last = self.normal_pair().0;
        }
    }
}

/// Mixes a seed with a stream index (e.g. the IAVD level) so each stream is independent.
pub(crate) fn derive_seed(seed: u64, stream: u64) -> u64 {
    SplitMix64::new(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normals_have_unit_moments() {
        let mut rng = SplitMix64::new(7);
        let mut xs = vec![0.0f32; 200_001];
        rng.fill_normal(&mut xs);
        let n = xs.len() as f64;
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
        assert!(xs.iter().all(|x| x.is_finite()));
    }
}
