//! Top-k singular value decomposition on faer.
//!
//! The default path is randomized subspace iteration (Halko, Martinsson & Tropp 2011,
//! Algorithm 4.4): with `l = rank + oversample` Gaussian test vectors `Ω` (`n × l`),
//!
//! 1. `Q = orth(A Ω)`;
//! 2. `power_iters` times: `Q = orth(A · orth(Aᵀ Q))` — re-orthonormalising (Householder QR)
//!    between the products keeps the small singular directions from being lost to rounding;
//! 3. `Z = Aᵀ Q` (`n × l`), thin SVD `Z = U_z Σ V_zᵀ` (a small problem), so
//!    `A ≈ Q Qᵀ A = (Q V_z) Σ U_zᵀ`: `U = Q V_z`, `V = U_z`, truncated to `rank`.
//!
//! It costs `2·power_iters + 2` products of `A` with an `l`-column matrix instead of a full
//! SVD. Results are deterministic for a given seed (the test matrix comes from a fixed
//! SplitMix64 stream and faer's kernels are deterministic for a fixed thread count).
//!
//! faer's exact thin SVD is used instead when `min(m, n) < exact_below`, when `l` would not be
//! smaller than `min(m, n)`, or when [`SvdMethod::Exact`] is requested.

use crate::error::{LinalgError, Result};
use crate::rng::SplitMix64;
use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use faer::linalg::matmul::matmul;
use faer::linalg::svd::ComputeSvdVectors;
use faer::{Accum, Mat, MatMut, MatRef, Par};

/// Which algorithm [`truncated_svd`] uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SvdMethod {
    /// Randomized, except for small matrices (`min(m, n) < exact_below`) where the exact SVD
    /// is cheap anyway.
    #[default]
    Auto,
    /// Always randomized subspace iteration (the exact SVD is still used when
    /// `rank + oversample >= min(m, n)`, where a sketch would not be smaller than `A`).
    Randomized,
    /// Always faer's exact thin SVD.
    Exact,
}

/// Parameters of [`truncated_svd`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TruncatedSvdParams {
    /// Singular triplets to return (`k`), `1 ..= min(m, n)`.
    pub rank: usize,
    /// Extra sketch columns beyond `rank`.
    pub oversample: usize,
    /// Power (subspace) iterations; each adds two products with `A`.
    pub power_iters: usize,
    /// Seed of the Gaussian test matrix.
    pub seed: u64,
    /// `Auto` uses the exact SVD when `min(m, n)` is below this. Default 256: on 2 cores,
    /// 16 IAVD levels of a 256×192 matrix took about as long either way (~0.1 s), and the
    /// randomized path wins clearly from ~500 (1536×576: 0.28 s vs 1.95 s).
    pub exact_below: usize,
    /// Algorithm choice.
    pub method: SvdMethod,
    /// Threads for faer's kernels; 0 = all of rayon's global pool.
    pub threads: usize,
}

impl Default for TruncatedSvdParams {
    /// `rank 16, oversample 16, power_iters 6`: chosen so that IAVD with the randomized SVD
    /// stays within 1% (relative) of IAVD with the exact SVD at all 16 levels, where the
    /// spectra of `|R|` are flat (see the crate tests and the `iavd_speed` example). With 4
    /// power iterations the gap reached 0.9–1.6% at deep levels of 1536×576 test matrices.
    /// Each power iteration is two passes over `A`, which on large matrices are
    /// memory-bandwidth bound, so cost grows with `power_iters` far more than with
    /// `oversample` (up to `l ≈ 32`).
    fn default() -> Self {
        Self {
            rank: 16,
            oversample: 16,
            power_iters: 6,
            seed: 0x0B17_57AC,
            exact_below: 256,
            method: SvdMethod::Auto,
            threads: 0,
        }
    }
}

impl TruncatedSvdParams {
    pub(crate) fn par(&self) -> Par {
        Par::rayon(self.threads)
    }
    /// `true` when a matrix of this shape would be handled by the exact SVD.
    pub fn uses_exact(&self, rows: usize, cols: usize) -> bool {
        let min = rows.min(cols);
        match self.method {
            SvdMethod::Exact => true,
            SvdMethod::Auto if min < self.exact_below => true,
            _ => self.rank + self.oversample >= min,
        }
    }
    pub(crate) fn validate(&self, rows: usize, cols: usize) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Err(LinalgError::InvalidParameter {
                name: "shape",
                reason: format!("matrix is {rows}×{cols}; both dimensions must be >= 1"),
            });
        }
        if self.rank == 0 || self.rank > rows.min(cols) {
            return Err(LinalgError::InvalidParameter {
                name: "rank",
                reason: format!(
                    "must be in 1..={} for a {rows}×{cols} matrix, got {}",
                    rows.min(cols),
                    self.rank
                ),
            });
        }
        Ok(())
    }
}

/// A rank-`k` SVD `A ≈ U diag(s) Vᵀ`.
#[derive(Clone, Debug)]
pub struct TruncatedSvd {
    /// Left singular vectors, `m × k`, orthonormal columns.
    pub u: Mat<f32>,
    /// Singular values, non-increasing, `k` entries.
    pub s: Vec<f32>,
    /// Right singular vectors, `n × k`, orthonormal columns.
    pub v: Mat<f32>,
    /// The algorithm actually used ([`SvdMethod::Exact`] or [`SvdMethod::Randomized`]).
    pub method: SvdMethod,
}

impl TruncatedSvd {
    /// Splits `σ` evenly between the factors: `√σ_c·u_c` into `a` (`m × k`, row-major) and
    /// `√σ_c·v_c` into `b[b_at(j, c)]`, so each decomposition keeps its own layout of `B`.
    pub(crate) fn balanced_factors_into(
        &self,
        a: &mut [f32],
        b: &mut [f32],
        b_at: impl Fn(usize, usize) -> usize,
    ) {
        let k = self.s.len();
        for c in 0..k {
            let root = self.s[c].max(0.0).sqrt();
            for (i, &u) in self.u.col_as_slice(c).iter().enumerate() {
                a[i * k + c] = u * root;
            }
            for (j, &v) in self.v.col_as_slice(c).iter().enumerate() {
                b[b_at(j, c)] = v * root;
            }
        }
    }
}

/// Top-`rank` SVD of `a` (any strides). Rejects non-finite entries, empty matrices and a rank
/// outside `1..=min(m, n)` with typed errors.
pub fn truncated_svd(a: MatRef<'_, f32>, params: &TruncatedSvdParams) -> Result<TruncatedSvd> {
    let (m, n) = a.shape();
    params.validate(m, n)?;
    for i in 0..m {
        for j in 0..n {
            if !a[(i, j)].is_finite() {
                return Err(LinalgError::NonFinite {
                    what: "matrix",
                    index: i * n + j,
                });
            }
        }
    }
    let mut ws = SvdWorkspace::new(m, n, params);
    ws.compute(a, params, params.seed)
}

/// Reusable buffers for repeated top-k SVDs of same-shaped matrices (one per IAVD level).
pub(crate) struct SvdWorkspace {
    omega: Vec<f32>,
    y: Mat<f32>,
    z: Mat<f32>,
    q: Mat<f32>,
    qz: Mat<f32>,
    q_coeff: Mat<f32>,
    stack: MemBuffer,
}

impl SvdWorkspace {
    pub(crate) fn new(m: usize, n: usize, params: &TruncatedSvdParams) -> Self {
        let par = params.par();
        if params.uses_exact(m, n) {
            return Self {
                omega: Vec::new(),
                y: Mat::new(),
                z: Mat::new(),
                q: Mat::new(),
                qz: Mat::new(),
                q_coeff: Mat::new(),
                stack: MemBuffer::new(exact_scratch(m, n, par)),
            };
        }
        let l = params.rank + params.oversample;
        let bs = faer::linalg::qr::no_pivoting::factor::recommended_block_size::<f32>(m.max(n), l);
        let req = StackReq::any_of(&[
            orth_scratch(m, l, bs),
            orth_scratch(n, l, bs),
            exact_scratch(n, l, Par::Seq),
        ]);
        Self {
            omega: vec![0.0; n * l],
            y: Mat::zeros(m, l),
            z: Mat::zeros(n, l),
            q: Mat::zeros(m, l),
            qz: Mat::zeros(n, l),
            q_coeff: Mat::zeros(bs, l),
            stack: MemBuffer::new(req),
        }
    }

    /// Top-k SVD of `a` (assumed finite; shape and rank already validated).
    pub(crate) fn compute(
        &mut self,
        a: MatRef<'_, f32>,
        params: &TruncatedSvdParams,
        seed: u64,
    ) -> Result<TruncatedSvd> {
        let (m, n) = a.shape();
        let k = params.rank;
        let par = params.par();
        if params.uses_exact(m, n) {
            let (u, s, v) = exact_svd(a, par, &mut self.stack)?;
            return Ok(TruncatedSvd {
                u: u.subcols(0, k).to_owned(),
                s: s[..k].to_vec(),
                v: v.subcols(0, k).to_owned(),
                method: SvdMethod::Exact,
            });
        }
        let l = k + params.oversample;
        SplitMix64::new(seed).fill_normal(&mut self.omega);
        let omega = MatRef::from_column_major_slice(&self.omega, n, l);
        let stack = MemStack::new(&mut self.stack);

        range_step(
            self.y.as_mut(),
            self.q.as_mut(),
            self.q_coeff.as_mut(),
            a,
            omega,
            par,
            stack,
        );
        for _ in 0..params.power_iters {
            range_step(
                self.z.as_mut(),
                self.qz.as_mut(),
                self.q_coeff.as_mut(),
                a.transpose(),
                self.q.as_ref(),
                par,
                stack,
            );
            range_step(
                self.y.as_mut(),
                self.q.as_mut(),
                self.q_coeff.as_mut(),
                a,
                self.qz.as_ref(),
                par,
                stack,
            );
        }
        // Z = Aᵀ Q is tall (n × l); its SVD is the SVD of Qᵀ A transposed.
        product(self.z.as_mut(), a.transpose(), self.q.as_ref(), par);
        let (uz, s, vz) = exact_svd(self.z.as_ref(), Par::Seq, &mut self.stack)?;
        let mut u = Mat::zeros(m, k);
        product(u.as_mut(), self.q.as_ref(), vz.subcols(0, k), par);
        Ok(TruncatedSvd {
            u,
            s: s[..k].to_vec(),
            v: uz.subcols(0, k).to_owned(),
            method: SvdMethod::Randomized,
        })
    }
}

/// `out = lhs · rhs`, overwriting `out`: the one product form the range finder uses.
fn product(out: MatMut<'_, f32>, lhs: MatRef<'_, f32>, rhs: MatRef<'_, f32>, par: Par) {
    matmul(out, Accum::Replace, lhs, rhs, 1.0, par);
}

/// One range-finder step: `work = lhs · rhs`, then an orthonormal basis of `work` into `q`
/// (`q_coeff` as [`orthonormalize`] takes it).
fn range_step(
    mut work: MatMut<'_, f32>,
    q: MatMut<'_, f32>,
    q_coeff: MatMut<'_, f32>,
    lhs: MatRef<'_, f32>,
    rhs: MatRef<'_, f32>,
    par: Par,
    stack: &mut MemStack,
) {
    product(work.as_mut(), lhs, rhs, par);
    orthonormalize(work, q, q_coeff, stack);
}

fn exact_scratch(m: usize, n: usize, par: Par) -> StackReq {
    faer::linalg::svd::svd_scratch::<f32>(
        m,
        n,
        ComputeSvdVectors::Thin,
        ComputeSvdVectors::Thin,
        par,
        Default::default(),
    )
}

fn orth_scratch(m: usize, l: usize, bs: usize) -> StackReq {
    StackReq::any_of(&[
        faer::linalg::qr::no_pivoting::factor::qr_in_place_scratch::<f32>(
            m,
            l,
            bs,
            Par::Seq,
            Default::default(),
        ),
        faer::linalg::householder::apply_block_householder_sequence_on_the_left_in_place_scratch::<
            f32,
        >(m, bs, l),
    ])
}

/// Thin SVD `(U, s, V)` of `a`, singular values non-increasing.
fn exact_svd(
    a: MatRef<'_, f32>,
    par: Par,
    buf: &mut MemBuffer,
) -> Result<(Mat<f32>, Vec<f32>, Mat<f32>)> {
    let (m, n) = a.shape();
    let size = m.min(n);
    let req = exact_scratch(m, n, par);
    // The workspace was sized for this shape; re-size only if a caller changed it.
    let mut owned;
    let buf = if buf.len() < req.unaligned_bytes_required() {
        owned = MemBuffer::new(req);
        &mut owned
    } else {
        buf
    };
    let mut u = Mat::zeros(m, size);
    let mut v = Mat::zeros(n, size);
    let mut s = Diag::zeros(size);
    faer::linalg::svd::svd(
        a,
        s.as_mut(),
        Some(u.as_mut()),
        Some(v.as_mut()),
        par,
        MemStack::new(buf),
        Default::default(),
    )
    .map_err(|_| LinalgError::SvdNoConvergence("faer thin SVD"))?;
    let s = (0..size).map(|i| s[i]).collect();
    Ok((u, s, v))
}

/// `q ← orth(y)` (thin Q of a Householder QR); `y` is overwritten.
///
/// Sequential on purpose: for the tall, thin (`l ≤ ~64` columns) sketches, faer's parallel QR
/// was measured slower (up to 3× for 256–1536 rows) or no faster (4096 rows) than the
/// sequential one on 2 cores; synchronisation dominates.
fn orthonormalize(
    mut y: MatMut<'_, f32>,
    mut q: MatMut<'_, f32>,
    mut q_coeff: MatMut<'_, f32>,
    stack: &mut MemStack,
) {
    let par = Par::Seq;
    faer::linalg::qr::no_pivoting::factor::qr_in_place(
        y.as_mut(),
        q_coeff.as_mut(),
        par,
        stack,
        Default::default(),
    );
    q.fill(0.0);
    q.as_mut().diagonal_mut().fill(1.0);
    faer::linalg::householder::apply_block_householder_sequence_on_the_left_in_place_with_conj(
        y.as_ref(),
        q_coeff.as_ref(),
        faer::Conj::No,
        q,
        par,
        stack,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `m × n` matrix with singular values `decay^i` and random singular vectors.
    fn graded(m: usize, n: usize, decay: f32, seed: u64) -> Mat<f32> {
        let mut rng = SplitMix64::new(seed);
        let mut g1 = vec![0.0; m * m];
        let mut g2 = vec![0.0; n * n];
        rng.fill_normal(&mut g1);
        rng.fill_normal(&mut g2);
        let q1 = MatRef::from_column_major_slice(&g1, m, m).qr().compute_Q();
        let q2 = MatRef::from_column_major_slice(&g2, n, n).qr().compute_Q();
        let size = m.min(n);
        let mut d = Mat::zeros(m, n);
        for i in 0..size {
            d[(i, i)] = decay.powi(i as i32);
        }
        &q1 * &d * q2.transpose()
    }

    #[test]
    fn randomized_matches_exact_on_decaying_spectrum() {
        let a = graded(120, 90, 0.8, 1);
        let exact = truncated_svd(
            a.as_ref(),
            &TruncatedSvdParams {
                rank: 8,
                method: SvdMethod::Exact,
                ..Default::default()
            },
        )
        .unwrap();
        let rand = truncated_svd(
            a.as_ref(),
            &TruncatedSvdParams {
                rank: 8,
                oversample: 8,
                method: SvdMethod::Randomized,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(rand.method, SvdMethod::Randomized);
        assert_eq!(exact.method, SvdMethod::Exact);
        for i in 0..8 {
            let want = 0.8f32.powi(i as i32);
            assert!((exact.s[i] - want).abs() < 1e-4, "{:?}", exact.s);
            assert!((rand.s[i] - want).abs() < 1e-4, "{:?}", rand.s);
        }
        // Orthonormal columns.
        let utu = rand.u.transpose() * &rand.u;
        let vtv = rand.v.transpose() * &rand.v;
        for i in 0..8 {
            for j in 0..8 {
                let id = if i == j { 1.0 } else { 0.0 };
                assert!((utu[(i, j)] - id).abs() < 1e-4);
                assert!((vtv[(i, j)] - id).abs() < 1e-4);
            }
        }
        // A v_i = s_i u_i.
        let av = &a * &rand.v;
        for i in 0..8 {
            for r in 0..120 {
                assert!((av[(r, i)] - rand.s[i] * rand.u[(r, i)]).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn deterministic_for_seed_and_seed_matters() {
        let a = graded(100, 140, 0.97, 2);
        let p = TruncatedSvdParams {
            rank: 4,
            oversample: 4,
            power_iters: 0,
            method: SvdMethod::Randomized,
            ..Default::default()
        };
        let r1 = truncated_svd(a.as_ref(), &p).unwrap();
        let r2 = truncated_svd(a.as_ref(), &p).unwrap();
        assert_eq!(r1.s, r2.s);
        assert_eq!(r1.u, r2.u);
        let r3 = truncated_svd(a.as_ref(), &TruncatedSvdParams { seed: 99, ..p }).unwrap();
        assert_ne!(r1.s, r3.s);
    }

    #[test]
    fn auto_falls_back_to_exact_for_small_matrices() {
        let a = graded(40, 30, 0.9, 3);
        let r = truncated_svd(
            a.as_ref(),
            &TruncatedSvdParams {
                rank: 3,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(r.method, SvdMethod::Exact);
        assert_eq!(
            (r.u.nrows(), r.u.ncols(), r.v.nrows(), r.s.len()),
            (40, 3, 30, 3)
        );
    }

    #[test]
    fn typed_errors() {
        let mut a = Mat::<f32>::zeros(10, 10);
        let p = TruncatedSvdParams {
            rank: 11,
            ..Default::default()
        };
        assert!(matches!(
            truncated_svd(a.as_ref(), &p),
            Err(LinalgError::InvalidParameter { name: "rank", .. })
        ));
        a[(2, 3)] = f32::NAN;
        let p = TruncatedSvdParams {
            rank: 2,
            ..Default::default()
        };
        assert!(matches!(
            truncated_svd(a.as_ref(), &p),
            Err(LinalgError::NonFinite { index: 23, .. })
        ));
        assert!(truncated_svd(Mat::<f32>::zeros(0, 5).as_ref(), &p).is_err());
    }
}
