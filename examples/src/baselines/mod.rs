//! Weight-quantization baselines BitStack is compared against: RTN, GPTQ and AWQ.
//!
//! Every method produces a [`QuantizedLinear`]: densely packed 2/3/4-bit codes, f16 scales and
//! zero points per group of input columns (or per output row), and for AWQ an f16 `1/s` per
//! input column. It implements [`bitstack_core::LinearOp`], so the Llama forward pass can run
//! on it directly, and its [`weight_bytes`](bitstack_core::LinearOp::weight_bytes) counts the
//! packed codes, scales, zeros and AWQ's input scale — the same way BitStack's blocks are
//! counted, so the two can be compared at equal memory.
//!
//! * [`rtn`]: round-to-nearest with asymmetric min/max parameters per group.
//! * [`gptq`]: Frantar et al. 2022, with the reference's 1% damping, dead-column handling,
//!   lazy batches of 128 columns and optional act-order (static groups; see [`GptqConfig`]).
//! * [`awq`]: Lin et al. 2024, α grid search over `s = s_x^α` on the layer output error, then
//!   RTN with the optional clipping search.
//!
//! Calibration activations of a layer are summarised once in a [`HessianAccumulator`]
//! (`XᵀX` and `Σ|x|` per column), which both GPTQ and AWQ consume; it also gives the exact
//! layer output error `‖X Wᵀ − X Ŵᵀ‖²` over all calibration tokens.
//!
//! All arithmetic follows PyTorch's convention: weights are `[out = rows, in = cols]`
//! row-major and a layer computes `Y = X Wᵀ`.
//!
//! ```
//! use bitstack_core::LinearOp;
//! use bitstack_examples::baselines::{
//!     gptq, rtn, GptqConfig, Grouping, HessianAccumulator, QuantConfig, WeightView,
//! };
//!
//! let (rows, cols, tokens) = (8, 32, 64);
//! let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
//! let x: Vec<f32> = (0..tokens * cols).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
//! let w = WeightView::new(&w, rows, cols)?;
//!
//! let mut stats = HessianAccumulator::new(cols)?;
//! stats.observe(&x)?;
//!
//! let quant = QuantConfig { bits: 3, grouping: Grouping::PerChannel };
//! let q_rtn = rtn(w, &quant)?;
//! let q_gptq = gptq(w, &stats, &GptqConfig { quant, ..GptqConfig::default() })?;
//!
//! // 3-bit codes for 32 columns fill exactly 3 words per row, plus one f16 scale and zero.
//! assert_eq!(q_rtn.weight_bytes(), (rows * (3 * 4 + 2 + 2)) as u64);
//!
//! let err_rtn = stats.output_error(w, &q_rtn.dequantize())?;
//! let err_gptq = stats.output_error(w, &q_gptq.dequantize())?;
//! assert!(err_gptq <= err_rtn);
//!
//! let mut y = vec![0f32; tokens * rows];
//! q_gptq.forward(&x, &mut y)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod awq;
mod calib;
mod error;
mod gptq;
mod method;
mod pack;
mod quant;

pub use awq::{awq, AwqConfig, AwqResult};
pub use calib::{output_error, HessianAccumulator};
pub use error::{BaselineError, Result};
pub use gptq::{gptq, GptqConfig};
pub use method::Baseline;
pub use pack::{pack_codes, packed_words, unpack_codes, SUPPORTED_BITS};
pub use quant::{rtn, Grouping, QuantBytes, QuantConfig, QuantizedLinear, WeightView};

#[cfg(test)]
mod tests;
