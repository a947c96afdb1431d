//! Calibration statistics shared by GPTQ and AWQ, and the layer output error they minimise.

use faer::{Accum, Mat, MatRef, Par};

use super::error::{check_finite, check_len, BaselineError, Result};
use super::quant::WeightView;

/// Running statistics of a layer's input activations: `XᵀX` (for GPTQ's Hessian and exact
/// output errors) and `Σ|x_j|` per input column (for AWQ's activation magnitudes).
///
/// Accumulated in f64 so long calibration runs do not lose small contributions.
#[derive(Clone, Debug)]
pub struct HessianAccumulator {
    cols: usize,
    xtx: Mat<f64>,
    abs_sum: Vec<f64>,
    tokens: usize,
}

impl HessianAccumulator {
    /// Empty statistics for a layer with `cols` input features.
    pub fn new(cols: usize) -> Result<Self> {
        if cols == 0 {
            return Err(BaselineError::InvalidParameter {
                name: "cols",
                reason: "must be positive".into(),
            });
        }
        Ok(Self {
            cols,
            xtx: Mat::zeros(cols, cols),
            abs_sum: vec![0.0; cols],
            tokens: 0,
        })
    }

    /// Adds a batch of activations, `tokens × cols` row-major.
    pub fn observe(&mut self, x: &[f32]) -> Result<()> {
        if !x.len().is_multiple_of(self.cols) {
            return Err(BaselineError::ShapeMismatch {
                what: "activations (multiple of cols)",
                expected: self.cols,
                actual: x.len(),
            });
        }
        check_finite("activations", x)?;
        let t = x.len() / self.cols;
        if t == 0 {
            return Ok(());
        }
        let xm = Mat::<f64>::from_fn(t, self.cols, |i, j| x[i * self.cols + j] as f64);
        faer::linalg::matmul::matmul(
            self.xtx.as_mut(),
            Accum::Add,
            xm.transpose(),
            xm.as_ref(),
            1.0,
            faer::get_global_parallelism(),
        );
        for row in x.chunks(self.cols) {
            for (a, &v) in self.abs_sum.iter_mut().zip(row) {
                *a += v.abs() as f64;
            }
        }
        self.tokens += t;
        Ok(())
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Tokens observed so far.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
    /// The raw `XᵀX`.
    pub fn xtx(&self) -> MatRef<'_, f64> {
        self.xtx.as_ref()
    }

    pub(crate) fn require_tokens(&self) -> Result<()> {
        if self.tokens == 0 {
            Err(BaselineError::NoCalibration)
        } else {
            Ok(())
        }
    }

    /// GPTQ's Hessian `H = 2 XᵀX / N`.
    pub fn hessian(&self) -> Result<Mat<f64>> {
        self.require_tokens()?;
        let f = 2.0 / self.tokens as f64;
        Ok(Mat::from_fn(self.cols, self.cols, |i, j| {
            self.xtx[(i, j)] * f
        }))
    }

    /// AWQ's activation magnitude `s_x[j] = mean over tokens of |x_j|`.
    pub fn mean_abs(&self) -> Result<Vec<f64>> {
        self.require_tokens()?;
        let n = self.tokens as f64;
        Ok(self.abs_sum.iter().map(|a| a / n).collect())
    }

    /// `‖X Wᵀ − X Ŵᵀ‖²_F` over every observed token, computed exactly from `XᵀX` as
    /// `Σ_r e_rᵀ (XᵀX) e_r` with `e_r` the error of row `r`.
    pub fn output_error(&self, w: WeightView<'_>, w_hat: &[f32]) -> Result<f64> {
        check_len("weight columns", self.cols, w.cols())?;
        check_len("approximate weight", w.rows() * w.cols(), w_hat.len())?;
        check_finite("approximate weight", w_hat)?;
        let e: Vec<f64> = w
            .data()
            .iter()
            .zip(w_hat)
            .map(|(&a, &b)| a as f64 - b as f64)
            .collect();
        Ok(self.quadratic_error(&e, w.rows()))
    }

    /// `Σ_r e_rᵀ (XᵀX) e_r` for an error matrix `e` (`rows × cols`, row-major).
    pub(crate) fn quadratic_error(&self, e: &[f64], rows: usize) -> f64 {
        let em = MatRef::from_row_major_slice(e, rows, self.cols);
        let mut eh = Mat::<f64>::zeros(rows, self.cols);
        faer::linalg::matmul::matmul(
            eh.as_mut(),
            Accum::Replace,
            em,
            self.xtx.as_ref(),
            1.0,
            faer::get_global_parallelism(),
        );
        let mut total = 0.0;
        for r in 0..rows {
            for j in 0..self.cols {
                total += eh[(r, j)] * e[r * self.cols + j];
            }
        }
        total
    }
}

/// `‖X Wᵀ − X Ŵᵀ‖²_F` computed directly from activations `x` (`tokens × cols`), in f64.
pub fn output_error(x: &[f32], w: WeightView<'_>, w_hat: &[f32]) -> Result<f64> {
    let cols = w.cols();
    if !x.len().is_multiple_of(cols) {
        return Err(BaselineError::ShapeMismatch {
            what: "activations (multiple of cols)",
            expected: cols,
            actual: x.len(),
        });
    }
    check_finite("activations", x)?;
    check_len("approximate weight", w.rows() * cols, w_hat.len())?;
    check_finite("approximate weight", w_hat)?;
    let t = x.len() / cols;
    let xm = Mat::<f64>::from_fn(t, cols, |i, j| x[i * cols + j] as f64);
    let em = Mat::<f64>::from_fn(w.rows(), cols, |i, j| {
        w.data()[i * cols + j] as f64 - w_hat[i * cols + j] as f64
    });
    let mut d = Mat::<f64>::zeros(t, w.rows());
    faer::linalg::matmul::matmul(
        d.as_mut(),
        Accum::Replace,
        xm.as_ref(),
        em.transpose(),
        1.0,
        Par::Seq,
    );
    Ok(d.squared_norm_l2())
}
