//! One entry point over the three methods, for tools that sweep them (the `compare` command).

use super::awq::{awq, AwqConfig};
use super::calib::HessianAccumulator;
use super::error::{BaselineError, Result};
use super::gptq::{gptq, GptqConfig};
use super::quant::{rtn, QuantConfig, QuantizedLinear, WeightView};

/// A baseline quantization method with its reference settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Baseline {
    /// Round-to-nearest, no calibration.
    Rtn,
    /// GPTQ in natural column order.
    Gptq,
    /// GPTQ with act-order (static groups).
    GptqActOrder,
    /// AWQ with scale search and clipping search.
    Awq,
}

impl Baseline {
    /// Every method, in table order.
    pub const ALL: [Baseline; 4] = [
        Baseline::Rtn,
        Baseline::Gptq,
        Baseline::GptqActOrder,
        Baseline::Awq,
    ];

    /// Short name for tables: `RTN`, `GPTQ`, `GPTQ-act`, `AWQ`.
    pub fn name(&self) -> &'static str {
        match self {
            Baseline::Rtn => "RTN",
            Baseline::Gptq => "GPTQ",
            Baseline::GptqActOrder => "GPTQ-act",
            Baseline::Awq => "AWQ",
        }
    }

    /// Whether [`Baseline::quantize`] needs calibration statistics.
    pub fn needs_calibration(&self) -> bool {
        !matches!(self, Baseline::Rtn)
    }

    /// Quantizes `w` with this method and the reference defaults for everything but `quant`.
    /// `stats` describes `w`'s input activations; it is ignored by RTN and required otherwise.
    pub fn quantize(
        &self,
        w: WeightView<'_>,
        stats: Option<&HessianAccumulator>,
        quant: QuantConfig,
    ) -> Result<QuantizedLinear> {
        let stats = || stats.ok_or(BaselineError::NoCalibration);
        match self {
            Baseline::Rtn => rtn(w, &quant),
            Baseline::Gptq | Baseline::GptqActOrder => gptq(
                w,
                stats()?,
                &GptqConfig {
                    quant,
                    act_order: *self == Baseline::GptqActOrder,
                    ..GptqConfig::default()
                },
            ),
            Baseline::Awq => Ok(awq(
                w,
                stats()?,
                &AwqConfig {
                    quant,
                    ..AwqConfig::default()
                },
            )?
            .layer),
        }
    }
}
