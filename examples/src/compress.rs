//! From a Llama model to a BitStack stack file: calibration, activation norms, iterative
//! absolute value decomposition of every linear weight, the universal order, and one atomic
//! file write.
//!
//! # Calibration defaults
//!
//! The paper calibrates on 256 WikiText-2 train windows of 2048 tokens. On a 2-core laptop the
//! forward passes alone would take about 20 minutes, so [`CompressParams::default`] uses
//! 32 windows of 512 tokens (16,384 tokens, evenly spaced over the text). Activation norms
//! converge quickly with token count (they are per-channel L2 norms, not a Hessian), and the
//! `eval` command measures the result.
//!
//! # Defaults chosen by measurement (README, "Results")
//!
//! * k by weight shape ([`RankRule::Adaptive`], 0.5 bits per weight per level of vectors,
//!   k in 4..=16): on SmolLM2 (k = 5, 9, 13) it beats k = 16 at every budget up to 200 MB and
//!   ties above; on Llama-7B/8B shapes it gives the paper's k = 16.
//! * Level-major round robin order: of the orders that need no forward passes it was the best
//!   at 6 of 8 budgets; `bitstack sort` computes the paper's Average.

use crate::gguf::{LlamaConfig, ModelError, ModelSource};
use crate::llama::{
    ActivationObserver, EmbeddingPrecision, LinearKind, LinearTable, Llama, LlamaError,
    LlamaResident,
};
use crate::report::Progress;
use crate::stackmodel::{weight_index, weight_of_index, META_COMPRESSION, TOKENIZER_TENSOR};
use crate::tokenizer::{Tokenizer, TokenizerError};
use bitstack_core::{ResidualBlock, StackMeta, UniversalOrder};
use bitstack_format::model::{ContractError, ModelConfig, ModelContract, QkLayout};
use bitstack_format::{FormatError, ResidentTensor, StackFileContents};
use bitstack_linalg::{ActivationNorms, IavdParams, LinalgError, ScaleParams};
use bitstack_sort::{ActivationStats, ProxyConfig, ProxyWeight, SortError, SortMethod};
use half::f16;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Errors of [`compress`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompressError {
    /// Reading the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The forward pass failed.
    #[error(transparent)]
    Llama(#[from] LlamaError),
    /// Tokenizing the calibration text failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// Decomposition failed.
    #[error("decomposing {weight}: {source}")]
    Linalg {
        /// The weight.
        weight: String,
        /// The cause.
        source: LinalgError,
    },
    /// Computing the order failed.
    #[error(transparent)]
    Sort(#[from] SortError),
    /// Writing the file failed.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The model cannot be described by the stack file's model contract.
    #[error(transparent)]
    Contract(#[from] ContractError),
    /// A parameter was unusable.
    #[error("invalid parameter {name}: {reason}")]
    InvalidParameter {
        /// The parameter.
        name: &'static str,
        /// Why.
        reason: String,
    },
    /// Serializing the compression record (`bitstack.compression`) failed.
    #[error("bitstack.compression record: {0}")]
    Record(#[from] serde_json::Error),
}

/// The settings of the universal order [`compress`] computes ([`CompressParams::order`] names
/// the method; each method reads the settings it takes and ignores the others).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderSettings {
    /// `random`: the seed.
    pub seed: u64,
    /// `proxy-sensitive`, `first-order`, `average`, `greedy`: evenly spaced scoring windows
    /// of the calibration text.
    pub scoring_seqs: usize,
    /// Tokens per scoring window.
    pub seq_len: usize,
    /// `proxy-sensitive`: where the sensitivities are measured.
    pub probe: bitstack_sort::SensitivityProbe,
    /// `first-order`: blocks per weight at which a gradient is taken.
    pub bases: Vec<u16>,
}

impl OrderSettings {
    /// The settings measured in the README for `method`: first-order takes gradients at 2,
    /// 3 and 4 blocks per weight on 4 windows of 256 calibration tokens (Average's scoring
    /// set); proxy-sensitive uses 1 window of 256 tokens, each weight cut from 2 blocks (every
    /// other weight holding 2) to 1, so the sensitivities are those of the low-budget models
    /// the order decides; average and greedy score on 4 windows of 256 tokens; random uses
    /// seed 0.
    pub fn for_method(method: SortMethod) -> Self {
        let (scoring_seqs, probe) = match method {
            SortMethod::ProxySensitive => (
                1,
                bitstack_sort::SensitivityProbe {
                    base_blocks: 2,
                    probe_blocks: 1,
                },
            ),
            _ => (4, bitstack_sort::SensitivityProbe::default()),
        };
        Self {
            seed: 0,
            scoring_seqs,
            seq_len: 256,
            probe,
            bases: vec![2, 3, 4],
        }
    }

    /// `method` with these settings, as users read it (also stored in the file's compression
    /// metadata, which `compare` reads back by its leading name).
    pub fn describe(&self, method: SortMethod) -> String {
        let (n, l) = (self.scoring_seqs, self.seq_len);
        match method {
            SortMethod::Random => format!("random (seed {})", self.seed),
            SortMethod::ProxySensitive => format!(
                "proxy-sensitive ({n} x {l} tokens, each weight moved from {} to {} blocks)",
                self.probe.base_blocks, self.probe.probe_blocks
            ),
            SortMethod::FirstOrder => {
                let b: Vec<String> = self.bases.iter().map(u16::to_string).collect();
                format!(
                    "first-order (gradients at {} blocks per weight on {n} x {l} tokens)",
                    b.join(",")
                )
            }
            SortMethod::Average | SortMethod::Greedy => format!("{method} ({n} x {l} tokens)"),
            SortMethod::RoundRobin | SortMethod::Proxy | SortMethod::Import => method.to_string(),
        }
    }
}

/// How many singular vectors (k) each weight's blocks get.
///
/// A block of an `m×n` weight costs `m·n` sign bits plus `16·k·(m+n)` bits of f16 vectors. On
/// Llama-8B shapes k = 16 adds ~0.1 bit per weight; on a 576-wide model it adds 0.9–1.8, so
/// one level is far more expensive and a budget buys fewer levels. [`RankRule::Adaptive`]
/// caps the vectors' share instead: `k = clamp(round(b·m·n / (16·(m+n))), min, max)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RankRule {
    /// The same k for every weight (the paper: 16).
    Fixed(usize),
    /// Vectors cost about `bits_per_weight` bits per weight per level, within `min..=max`.
    Adaptive {
        /// Target vector cost per weight per level.
        bits_per_weight: f64,
        /// Smallest k.
        min: usize,
        /// Largest k.
        max: usize,
    },
}

impl RankRule {
    /// k for an `rows × cols` weight (at least 1 and at most `min(rows, cols)`).
    pub fn rank_for(&self, rows: usize, cols: usize) -> usize {
        let k = match *self {
            RankRule::Fixed(k) => k,
            RankRule::Adaptive {
                bits_per_weight,
                min,
                max,
            } => {
                let ideal = bits_per_weight * (rows * cols) as f64 / (16 * (rows + cols)) as f64;
                (ideal.round() as usize).clamp(min, max.max(min))
            }
        };
        k.clamp(1, rows.min(cols).max(1))
    }
}

impl std::fmt::Display for RankRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            RankRule::Fixed(k) => write!(f, "{k}"),
            RankRule::Adaptive {
                bits_per_weight,
                min,
                max,
            } => write!(
                f,
                "auto ({bits_per_weight} bits per weight per level of vectors, k in {min}..={max})"
            ),
        }
    }
}

impl std::str::FromStr for RankRule {
    type Err = String;
    /// `16` (fixed) or `auto` (adaptive, 0.5 bits per weight, k in 4..=16) or
    /// `auto:B` (adaptive with B bits per weight).
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("auto") {
            let b = match rest.strip_prefix(':') {
                Some(b) => b.parse::<f64>().map_err(|e| format!("rank {s:?}: {e}"))?,
                None if rest.is_empty() => 0.5,
                None => return Err(format!("rank {s:?}: expected auto or auto:BITS")),
            };
            if !(b.is_finite() && b > 0.0) {
                return Err(format!("rank {s:?}: bits per weight must be positive"));
            }
            return Ok(RankRule::Adaptive {
                bits_per_weight: b,
                min: 4,
                max: 16,
            });
        }
        match s.parse::<usize>() {
            Ok(k) if k > 0 => Ok(RankRule::Fixed(k)),
            _ => Err(format!(
                "rank {s:?}: expected a positive integer, auto or auto:BITS"
            )),
        }
    }
}

/// Settings of [`compress`].
#[derive(Clone, Debug, PartialEq)]
pub struct CompressParams {
    /// Calibration windows.
    pub calib_windows: usize,
    /// Tokens per calibration window.
    pub calib_seq_len: usize,
    /// Activation scaling; `None` decomposes the raw weights (ablation).
    pub scale: Option<ScaleParams>,
    /// Levels and SVD settings (`iavd.rank` is overridden per weight by `rank`).
    pub iavd: IavdParams,
    /// Singular vectors per block, per weight shape.
    pub rank: RankRule,
    /// The universal order's method ([`SortMethod::Import`] is refused: an imported order
    /// is applied to an existing file with `bitstack sort`).
    pub order: SortMethod,
    /// The order's settings.
    pub order_settings: OrderSettings,
}

/// The `bitstack compress` defaults: 32 × 512 calibration tokens, activation scaling, 16
/// levels with int8 factor vectors (chosen on validation text: lower perplexity than f16 at
/// every budget measured), `k` for 0.5 bits per weight of vectors, the first-order order.
impl Default for CompressParams {
    fn default() -> Self {
        Self {
            calib_windows: 32,
            calib_seq_len: 512,
            scale: Some(ScaleParams::default()),
            iavd: IavdParams {
                factors: bitstack_core::FactorDtype::I8,
                ..IavdParams::default()
            },
            rank: RankRule::Adaptive {
                bits_per_weight: 0.5,
                min: 4,
                max: 16,
            },
            order: SortMethod::FirstOrder,
            order_settings: OrderSettings::for_method(SortMethod::FirstOrder),
        }
    }
}

/// Wall time of one phase.
#[derive(Clone, Debug, PartialEq)]
pub struct Phase {
    /// Phase name.
    pub name: &'static str,
    /// Seconds.
    pub seconds: f64,
}

/// Everything [`compress`] produced, in memory (written to disk by [`write_compressed`]).
#[derive(Debug)]
pub struct Compressed {
    /// The file's contents.
    pub contents: StackFileContents,
    /// Mean over weights of the relative (scaled-space) Frobenius error after each level.
    pub mean_relative_errors: Vec<f64>,
    /// Phase times so far.
    pub phases: Vec<Phase>,
    /// Calibration tokens used.
    pub calib_tokens: usize,
}

struct NormObserver {
    norms: Vec<Mutex<ActivationNorms>>,
    error: Mutex<Option<LinalgError>>,
}

impl ActivationObserver for NormObserver {
    fn observe(&self, layer: usize, kind: LinearKind, x: &[f32]) {
        let Some(slot) = self.norms.get(weight_index(layer, kind)) else {
            return;
        };
        let mut acc = slot.lock().unwrap_or_else(|p| p.into_inner());
        let rows = x.len() / acc.channels().max(1);
        if let Err(e) = acc.observe(x, rows) {
            self.error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(e);
        }
    }
}

/// Activation scales of every linear (in [`weight_index`] order) from `windows` evenly
/// spaced windows of `seq_len` tokens of `tokens`, one forward pass per window (each window
/// is one observation, as the reference implementation's per-sample norms).
pub fn calibrate(
    source: &dyn ModelSource,
    tokens: &[u32],
    windows: usize,
    seq_len: usize,
    params: ScaleParams,
) -> Result<Vec<Vec<f32>>, CompressError> {
    let available = tokens.len() / seq_len.max(1);
    if windows == 0 || seq_len < 2 || available < windows {
        return Err(CompressError::InvalidParameter {
            name: "calibration windows",
            reason: format!(
                "{windows} windows of {seq_len} tokens requested, the text has {} tokens",
                tokens.len()
            ),
        });
    }
    let resident = LlamaResident::from_source(source)?;
    let linears = LinearTable::dense_from_source(source)?;
    let model = Llama::new(&resident, &linears)?;
    let c = source.config();
    let observer = NormObserver {
        norms: (0..c.n_layers * LinearKind::ALL.len())
            .map(|w| {
                let (_, kind) = weight_of_index(w);
                ActivationNorms::new(kind.shape(c).1, params).map(Mutex::new)
            })
            .collect::<Result<_, _>>()
            .map_err(|source| CompressError::Linalg {
                weight: "activation norms".into(),
                source,
            })?,
        error: Mutex::new(None),
    };
    run_calibration(
        &model,
        tokens,
        windows,
        seq_len,
        &observer,
        "calibration windows",
    )?;
    if let Some(e) = observer
        .error
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
    {
        return Err(CompressError::Linalg {
            weight: "activation norms".into(),
            source: e,
        });
    }
    observer
        .norms
        .into_iter()
        .enumerate()
        .map(|(w, m)| {
            m.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .scale()
                .map_err(|source| CompressError::Linalg {
                    weight: weight_name(w),
                    source,
                })
        })
        .collect()
}

/// Runs `model` over `windows` evenly spaced windows of `seq_len` tokens of `tokens`, one
/// forward pass per window, showing `observer` every linear's input (a window is one
/// observation). The caller checks that the text holds `windows` windows.
pub fn run_calibration(
    model: &Llama<'_>,
    tokens: &[u32],
    windows: usize,
    seq_len: usize,
    observer: &dyn ActivationObserver,
    label: &str,
) -> Result<(), LlamaError> {
    let available = tokens.len() / seq_len.max(1);
    let batch = model.seq_batch(1, seq_len)?;
    let mut progress = Progress::new(label, windows);
    for i in 0..windows {
        let start = (i * available / windows.max(1)) * seq_len;
        let window = tokens
            .get(start..start + seq_len)
            .ok_or(LlamaError::InvalidParameter {
                name: "calibration windows",
                reason: format!("{windows} windows of {seq_len} tokens exceed the text"),
            })?;
        model.forward_hidden(window, &batch, Some(observer))?;
        progress.update(i + 1);
    }
    Ok(())
}

fn weight_name(w: usize) -> String {
    let (layer, kind) = weight_of_index(w);
    kind.tensor_name(layer)
}

/// [`compress`]'s error for [`SortMethod::Import`], which computes no order.
fn import_refused() -> CompressError {
    CompressError::InvalidParameter {
        name: "order",
        reason: "import takes an order computed elsewhere: compress with another order, then apply it with `bitstack sort --method import`".into(),
    }
}

/// Compresses `source` with calibration text `calib_text` (see the module docs).
pub fn compress(
    source: &dyn ModelSource,
    calib_text: &str,
    params: &CompressParams,
) -> Result<Compressed, CompressError> {
    if params.order == SortMethod::Import {
        return Err(import_refused());
    }
    let c = source.config().clone();
    let mut phases = Vec::new();
    let (tokenizer, calib_tokens) = timed(&mut phases, "tokenize calibration text", || {
        let tokenizer = source.tokenizer()?;
        let tokens = tokenizer.encode(calib_text, false)?;
        Ok((tokenizer, tokens))
    })?;
    let scales = timed(&mut phases, "calibration (activation norms)", || {
        calibrate_scales(source, &calib_tokens, params)
    })?;
    let decomposed = timed(&mut phases, "decomposition (IAVD of every linear)", || {
        decompose_all(source, &c, scales.as_deref(), params)
    })?;
    let order = timed(&mut phases, "universal order", || {
        universal_order(source, &decomposed, &calib_tokens, params)
    })?;
    let Decomposed {
        originals,
        stacks,
        blocks,
        error_sums,
    } = decomposed;
    drop(originals);
    // The model contract of the file.
    let residents = resident_tensors(source, &c, &tokenizer)?;
    let metadata = file_metadata(&c, params)?;
    let n_weights = c.n_layers * LinearKind::ALL.len();
    Ok(Compressed {
        contents: StackFileContents {
            metadata,
            residents,
            stacks,
            blocks,
            order,
        },
        mean_relative_errors: error_sums.iter().map(|s| s / n_weights as f64).collect(),
        phases,
        calib_tokens: params.calib_windows * params.calib_seq_len,
    })
}

/// Runs `f` and, when it succeeds, records its wall time in `phases` as `name`.
fn timed<T>(
    phases: &mut Vec<Phase>,
    name: &'static str,
    f: impl FnOnce() -> Result<T, CompressError>,
) -> Result<T, CompressError> {
    let t = Instant::now();
    let value = f()?;
    phases.push(Phase {
        name,
        seconds: t.elapsed().as_secs_f64(),
    });
    Ok(value)
}

/// The activation scales of every linear ([`calibrate`] on `params`' calibration windows),
/// or `None` when `params` decomposes the raw weights.
pub fn calibrate_scales(
    source: &dyn ModelSource,
    calib_tokens: &[u32],
    params: &CompressParams,
) -> Result<Option<Vec<Vec<f32>>>, CompressError> {
    params
        .scale
        .map(|sp| {
            calibrate(
                source,
                calib_tokens,
                params.calib_windows,
                params.calib_seq_len,
                sp,
            )
        })
        .transpose()
}

/// Every linear decomposed, in [`weight_index`] order.
struct Decomposed {
    /// The original weights, kept only for orders that read them.
    originals: Vec<Vec<f32>>,
    /// The stacks' descriptions (shape, levels, scale vector).
    stacks: Vec<StackMeta>,
    /// The residual blocks of every weight.
    blocks: Vec<Vec<ResidualBlock>>,
    /// Per level, the sum over weights of the relative error after it.
    error_sums: Vec<f64>,
}

/// Decomposes every linear of `source` (IAVD with `params`, scaled by `scales` when given),
/// keeping the original weights when `params.order` needs them.
fn decompose_all(
    source: &dyn ModelSource,
    c: &LlamaConfig,
    scales: Option<&[Vec<f32>]>,
    params: &CompressParams,
) -> Result<Decomposed, CompressError> {
    let n_weights = c.n_layers * LinearKind::ALL.len();
    let keep_originals = params.order.needs_original_weights();
    let mut out = Decomposed {
        originals: Vec::new(),
        stacks: Vec::with_capacity(n_weights),
        blocks: Vec::with_capacity(n_weights),
        error_sums: vec![0f64; params.iavd.levels],
    };
    let mut progress = Progress::new("decomposing weights", n_weights);
    for w in 0..n_weights {
        let scale = scales.map(|s| s[w].as_slice());
        let (name, data, d) = decompose_weight(source, c, w, scale, params)?;
        for (sum, e) in out.error_sums.iter_mut().zip(&d.relative_errors) {
            *sum += e;
        }
        out.stacks
            .push(d.stack_meta(name, scale.map(<[f32]>::to_vec)));
        out.blocks.push(d.blocks);
        if keep_originals {
            out.originals.push(data);
        }
        progress.update(w + 1);
    }
    Ok(out)
}

/// Reads weight `w` of `source`, checks its shape and decomposes it with `params` (k from
/// `params.rank`); returns its tensor name, its original values and the decomposition.
fn decompose_weight(
    source: &dyn ModelSource,
    c: &LlamaConfig,
    w: usize,
    scale: Option<&[f32]>,
    params: &CompressParams,
) -> Result<(String, Vec<f32>, bitstack_linalg::Decomposition), CompressError> {
    let (layer, kind) = weight_of_index(w);
    let name = kind.tensor_name(layer);
    let (rows, cols) = kind.shape(c);
    let (shape, data) = source.tensor_f32(&name)?;
    if shape != [rows, cols] {
        return Err(LlamaError::TensorShape {
            name,
            expected: vec![rows, cols],
            actual: shape,
        }
        .into());
    }
    let iavd = IavdParams {
        rank: params.rank.rank_for(rows, cols),
        ..params.iavd
    };
    let d =
        bitstack_linalg::decompose_slice(&data, rows, cols, scale, &iavd).map_err(|source| {
            CompressError::Linalg {
                weight: name.clone(),
                source,
            }
        })?;
    Ok((name, data, d))
}

/// The universal order of `params.order` over the decomposed stacks: the orders computed
/// from the blocks alone here, the ones that evaluate the model by [`evaluated_order`].
fn universal_order(
    source: &dyn ModelSource,
    d: &Decomposed,
    calib_tokens: &[u32],
    params: &CompressParams,
) -> Result<UniversalOrder, CompressError> {
    let levels: Vec<u16> = d.stacks.iter().map(|m| m.levels).collect();
    let proxy_weights = || -> Vec<ProxyWeight<'_>> {
        (0..d.stacks.len())
            .map(|w| ProxyWeight {
                original: &d.originals[w],
                rows: d.stacks[w].rows,
                cols: d.stacks[w].cols,
                blocks: &d.blocks[w],
                scale: d.stacks[w].scale.as_deref(),
                stats: ActivationStats::FromScale,
            })
            .collect()
    };
    let settings = &params.order_settings;
    let scoring = ScoringInputs {
        source,
        stacks: &d.stacks,
        blocks: &d.blocks,
        calib_tokens,
        n_seqs: settings.scoring_seqs,
        seq_len: settings.seq_len,
    };
    Ok(match params.order {
        SortMethod::RoundRobin => UniversalOrder::round_robin(levels)
            .map_err(|e| CompressError::Sort(SortError::from(e)))?,
        SortMethod::Random => bitstack_sort::sort_random(&levels, settings.seed)?,
        SortMethod::Proxy => {
            let weights = proxy_weights();
            bitstack_sort::sort_proxy(&weights, &ProxyConfig::default())?.order
        }
        SortMethod::ProxySensitive => {
            let mut progress = Progress::new("sensitivity evaluations", d.stacks.len() + 1);
            let mut observer = |p: &bitstack_sort::SortProgress| progress.update(p.done);
            let sensitivity = with_evaluator(&scoring, |ev| {
                Ok(bitstack_sort::measure_sensitivity(
                    ev,
                    settings.probe,
                    &mut observer,
                )?)
            })?;
            let weights = proxy_weights();
            bitstack_sort::sort_proxy_sensitive(&weights, &sensitivity, &ProxyConfig::default())?
                .order
        }
        SortMethod::FirstOrder | SortMethod::Average | SortMethod::Greedy => {
            evaluated_order(&scoring, &levels, params)?
        }
        // Refused before any work (in `compress`).
        SortMethod::Import => return Err(import_refused()),
    })
}

/// The orders that score the decomposed model on calibration windows and need no
/// sensitivities: first-order, Average and greedy.
fn evaluated_order(
    scoring: &ScoringInputs<'_>,
    levels: &[u16],
    params: &CompressParams,
) -> Result<UniversalOrder, CompressError> {
    let settings = &params.order_settings;
    if params.order == SortMethod::FirstOrder {
        let mut progress = Progress::new("order gradients", settings.bases.len());
        let mut observer = |p: &bitstack_sort::SortProgress| progress.update(p.done);
        let config = bitstack_sort::FirstOrderConfig {
            bases: settings.bases.clone(),
        };
        return with_evaluator(scoring, |ev| {
            Ok(bitstack_sort::sort_first_order(ev, &config, &mut observer)?.order)
        });
    }
    let total: usize = levels.iter().map(|&l| l as usize - 1).sum();
    let mut progress = Progress::new("order evaluations", total);
    let mut observer = |p: &bitstack_sort::SortProgress| progress.update(p.done);
    let config = bitstack_sort::SortConfig::default();
    with_evaluator(scoring, |ev| {
        Ok(if params.order == SortMethod::Average {
            bitstack_sort::sort_average(ev, &config, &mut observer)?.order
        } else {
            ev.prepare_greedy()?;
            bitstack_sort::sort_greedy(ev, &config, &mut observer)?.order
        })
    })
}

/// The file's metadata: the model contract (the config, and the Q/K layout the rows have
/// here — the sources un-permute GGUF's interleaved rows, so always rotate-half) and the
/// compression record.
fn file_metadata(
    contract_config: &ModelConfig,
    params: &CompressParams,
) -> Result<BTreeMap<String, Vec<u8>>, CompressError> {
    let mut metadata = ModelContract::metadata(contract_config, QkLayout::RotateHalf)?;
    metadata.insert(
        META_COMPRESSION.to_owned(),
        serde_json::to_vec(&CompressionRecord::of(params))?,
    );
    Ok(metadata)
}

/// The resident tensors the contract names, read from `source` and stored in f16 (refused
/// when a finite value overflows f16), then the tokenizer.
fn resident_tensors(
    source: &dyn ModelSource,
    contract_config: &ModelConfig,
    tokenizer: &Tokenizer,
) -> Result<Vec<ResidentTensor>, CompressError> {
    let mut residents = Vec::new();
    for slot in contract_config.residents() {
        let name = slot.role.tensor_name();
        let (shape, data) = source.tensor_f32(&name)?;
        let half: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
        if half
            .iter()
            .zip(&data)
            .any(|(h, v)| !h.is_finite() && v.is_finite())
        {
            return Err(CompressError::InvalidParameter {
                name: "resident tensor",
                reason: format!("{name} has values outside the f16 range"),
            });
        }
        let shape = shape.iter().map(|&d| d as u64).collect();
        residents.push(ResidentTensor::from_f16(name, shape, &half)?);
    }
    residents.push(ResidentTensor::blob(TOKENIZER_TENSOR, tokenizer.to_json()?));
    Ok(residents)
}

/// The [`META_COMPRESSION`] record of a file: the settings it was made with. The fields are
/// in alphabetical order, the order the record had when it was a `serde_json::Value`, so
/// files keep their bytes.
#[derive(serde::Serialize)]
struct CompressionRecord {
    activation_scaling: bool,
    calib_seq_len: usize,
    calib_windows: usize,
    /// The factor dtype; left out for f16 (the only dtype before it was recorded), so f16
    /// files keep their bytes.
    #[serde(skip_serializing_if = "is_f16")]
    factors: &'static str,
    levels: usize,
    order: String,
    rank: RankRecord,
    /// The scale's power α; left out when it is the paper's 1 (files keep their bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    scale_exponent: Option<f32>,
    tool: &'static str,
}

impl CompressionRecord {
    /// The record of a file compressed with `params`.
    fn of(params: &CompressParams) -> Self {
        Self {
            activation_scaling: params.scale.is_some(),
            calib_seq_len: params.calib_seq_len,
            calib_windows: params.calib_windows,
            factors: params.iavd.factors.name(),
            levels: params.iavd.levels,
            order: params.order_settings.describe(params.order),
            rank: match params.rank {
                RankRule::Fixed(k) => RankRecord::Fixed(k),
                RankRule::Adaptive { .. } => RankRecord::Adaptive(params.rank.to_string()),
            },
            scale_exponent: params.scale.map(|s| s.exponent).filter(|&e| e != 1.0),
            tool: concat!("bitstack-rs ", env!("CARGO_PKG_VERSION")),
        }
    }
}

fn is_f16(name: &&'static str) -> bool {
    *name == bitstack_core::FactorDtype::F16.name()
}

/// The rank of a [`CompressionRecord`]: a number for a fixed rank, the rule's text for an
/// adaptive one.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum RankRecord {
    Fixed(usize),
    Adaptive(String),
}

/// What an order that evaluates the model scores with: the freshly decomposed stacks and
/// `n_seqs` evenly spaced windows of `seq_len` calibration tokens.
struct ScoringInputs<'a> {
    source: &'a dyn ModelSource,
    stacks: &'a [StackMeta],
    blocks: &'a [Vec<ResidualBlock>],
    calib_tokens: &'a [u32],
    n_seqs: usize,
    seq_len: usize,
}

/// Runs `f` on a [`crate::sorting::LlamaStackEvaluator`] over `inputs`, with the model's
/// resident part loaded for it (and dropped after).
fn with_evaluator<T>(
    inputs: &ScoringInputs<'_>,
    f: impl FnOnce(&mut crate::sorting::LlamaStackEvaluator<'_>) -> Result<T, CompressError>,
) -> Result<T, CompressError> {
    let resident = LlamaResident::from_source_with(inputs.source, EmbeddingPrecision::F16)?;
    let scoring =
        crate::sorting::scoring_windows(inputs.calib_tokens, inputs.n_seqs, inputs.seq_len)?;
    let parts = inputs
        .stacks
        .iter()
        .zip(inputs.blocks)
        .map(|(m, b)| {
            (
                Arc::new(m.clone()),
                b.iter().cloned().map(Arc::new).collect::<Vec<_>>(),
            )
        })
        .collect();
    let mut evaluator =
        crate::sorting::LlamaStackEvaluator::from_parts(&resident, parts, scoring, inputs.seq_len)?;
    f(&mut evaluator)
}

/// Writes compressed contents atomically (temporary file, fsync, rename) and returns the
/// wall time.
pub fn write_compressed(compressed: &Compressed, path: &Path) -> Result<f64, CompressError> {
    let t = Instant::now();
    bitstack_format::write_stack_file(path, &compressed.contents)?;
    Ok(t.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_record_keeps_the_bytes_of_the_json_value_it_replaced() {
        // The record was a serde_json::Value (keys sorted); a file's bytes must not change.
        for (rank, want_rank) in [
            (RankRecord::Fixed(16), serde_json::json!(16)),
            (
                RankRecord::Adaptive("auto".into()),
                serde_json::json!("auto"),
            ),
        ] {
            let record = CompressionRecord {
                activation_scaling: true,
                calib_seq_len: 512,
                calib_windows: 32,
                factors: "f16",
                levels: 16,
                order: "first-order".into(),
                rank,
                scale_exponent: None,
                tool: "bitstack-rs test",
            };
            let old = serde_json::json!({
                "levels": 16,
                "rank": want_rank,
                "activation_scaling": true,
                "calib_windows": 32,
                "calib_seq_len": 512,
                "order": "first-order",
                "tool": "bitstack-rs test",
            });
            assert_eq!(
                serde_json::to_vec(&record).unwrap(),
                old.to_string().into_bytes()
            );
        }
    }

    #[test]
    fn rank_rules() {
        assert_eq!(RankRule::Fixed(16).rank_for(576, 576), 16);
        assert_eq!(RankRule::Fixed(16).rank_for(8, 576), 8);
        let auto: RankRule = "auto".parse().unwrap();
        // 0.5 · m·n / (16 (m + n)): 576² → 9, 1536×576 → 13, 192×576 → 4.5 → 5 (rounded),
        // Llama-8B 4096² → 64, capped at 16.
        assert_eq!(auto.rank_for(576, 576), 9);
        assert_eq!(auto.rank_for(1536, 576), 13);
        assert_eq!(auto.rank_for(192, 576), 5);
        assert_eq!(auto.rank_for(4096, 4096), 16);
        assert_eq!("auto:1".parse::<RankRule>().unwrap().rank_for(576, 576), 16);
        assert!("auto:-1".parse::<RankRule>().is_err());
        assert!("0".parse::<RankRule>().is_err());
        assert!("sixteen".parse::<RankRule>().is_err());
    }
}
