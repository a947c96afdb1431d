//! `bitstack compare`: the paper's Table 1 for one model — the original, the RTN / GPTQ / AWQ
//! baselines at `w{2,3,4}` and `w{2,3,4}g128`, and BitStack at the largest budget that does not
//! exceed each baseline's memory — plus optional ablations of BitStack (no activation scaling,
//! other `k`).
//!
//! # Memory accounting
//!
//! Every method is charged the same way: the bytes of the weights it holds plus the resident
//! tensors the forward pass needs. The resident part is identical for all rows (the token
//! embedding and an untied head at [`CompareOptions::resident`] precision — q8 by default —,
//! the f32 RMSNorm weights and biases: [`LlamaResident::held_bytes`]); a baseline adds its
//! packed codes, f16 scales and zeros and (AWQ) its f16 per-input-column scale
//! ([`QuantizedLinear::bytes`]); BitStack adds its f32 scale vectors and loaded blocks
//! ([`ElasticModel::bytes_at_prefix`](bitstack_core::ElasticModel::bytes_at_prefix), whose
//! resident part [`LoadedStack::open_with`] sets to the same `held_bytes`). The original row
//! is the model with every parameter in f16.
//!
//! # llama.cpp rows (`--llama-cpp DIR`)
//!
//! With a llama.cpp build, the original GGUF is converted to an F32 GGUF and quantized to
//! `llama_quants` (Q2_K … Q8_0) by `llama-quantize` ([`crate::llama_cpp`]; cached in
//! OUT_DIR/llama-cpp), each file is scored by `llama-perplexity` on the same text, window length
//! and window count, and BitStack is evaluated at each file's size in bytes (file size =
//! memory). llama-perplexity scores the second half of each chunk and we score the whole
//! window, so each engine's perplexity is reported relative to its own unquantized model:
//! llama.cpp's quant to its F32 GGUF, BitStack to our original row.
//!
//! # Calibration of the baselines
//!
//! GPTQ and AWQ read `XᵀX` and `Σ|x|` of every linear's input, accumulated in one forward pass
//! of the original model over `calib_windows` evenly spaced windows of `calib_seq_len` tokens
//! (the same windows `compress` uses for BitStack's activation norms). Q/K/V and Gate/Up share
//! their input and therefore their statistics. The reference implementations re-collect the
//! inputs of each block after quantizing the previous ones; this one-pass variant does not.

use crate::baselines::BaselineError;
use crate::baselines::{
    packed_words, Baseline, Grouping, HessianAccumulator, QuantBytes, QuantConfig, WeightView,
};
use crate::compress::CompressError;
use crate::compress::{compress, write_compressed, CompressParams};
use crate::gguf::ModelError;
use crate::gguf::{open_model, ModelSource};
use crate::llama::LlamaError;
use crate::llama::{
    ActivationObserver, EmbeddingPrecision, LinearKind, LinearProvider, LinearTable, Llama,
    LlamaResident,
};
use crate::llama_cpp::{ratio, GgufQuant, LlamaCpp, LlamaCppError, LlamaPerplexity, QuantizedFile};
use crate::output::{OutputError, UsageError};
use crate::perplexity::PerplexityError;
use crate::perplexity::{perplexity, Perplexity, PerplexityParams, WindowSelection};
use crate::report::{markdown_table, svg_plot, PlotError, Progress, Series};
use crate::stackmodel::LoadError;
use crate::stackmodel::{weight_index, weight_of_index, LoadedStack, META_COMPRESSION};
use crate::tokenizer::TokenizerError;
use bitstack_core::{LinearOp, MemoryBudget, MB};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

/// Errors of [`run`].
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// An option value that cannot work (exit status 2 on the command line).
    #[error(transparent)]
    Usage(#[from] UsageError),
    /// An output path that cannot be written, or a failed write.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// compare.svg could not be drawn.
    #[error("compare.svg: {0}")]
    Plot(#[from] PlotError),
    /// The original model could not be opened.
    #[error("{}: {source}", path.display())]
    OpenModel {
        /// The model given.
        path: PathBuf,
        /// Why.
        source: ModelError,
    },
    /// A tensor or the tokenizer of the opened original model could not be read (the error
    /// names the tensor).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The stack file could not be opened.
    #[error("{}: {source}", path.display())]
    OpenStack {
        /// The stack file.
        path: PathBuf,
        /// Why (boxed: a load error is large, and this keeps every `Result` small).
        source: Box<LoadError>,
    },
    /// An ablation's stack file (written by this run) could not be opened.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A text (`--text`, `--calib`) could not be read.
    #[error("cannot read {flag} {}: {source}", path.display())]
    ReadText {
        /// The flag that named it.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The output folder could not be created.
    #[error("cannot create --out-dir {}: {source}", path.display())]
    CreateOutDir {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The calibration text is too short for the calibration windows asked for.
    #[error(
        "{windows} calibration windows of {seq_len} tokens requested, the text has {tokens} tokens"
    )]
    CalibrationTooShort {
        /// Windows asked for.
        windows: usize,
        /// Tokens per window.
        seq_len: usize,
        /// Tokens of the text.
        tokens: usize,
    },
    /// Accumulating a layer's calibration statistics failed.
    #[error("calibration statistics: layer {layer} {kind:?}: {source}")]
    Statistics {
        /// The layer.
        layer: usize,
        /// The linear whose input was observed.
        kind: LinearKind,
        /// Why.
        source: BaselineError,
    },
    /// The stack file does not hold the model given (its resident tensors differ in size).
    #[error("resident bytes differ: model {model}, stack {stack}")]
    ResidentMismatch {
        /// Bytes of the model's resident tensors (f16 embedding, f32 norms).
        model: u64,
        /// Bytes the stack file's layout records.
        stack: u64,
    },
    /// A weight of the original model has another shape than its configuration gives.
    #[error("{tensor} has shape {shape:?}, expected [{rows}, {cols}]")]
    TensorShape {
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
        /// Rows the configuration gives.
        rows: usize,
        /// Columns the configuration gives.
        cols: usize,
    },
    /// Quantizing one weight with a baseline failed.
    #[error("{config}: {tensor}: {source}")]
    Quantize {
        /// Method and configuration (`GPTQ w3g128`).
        config: String,
        /// The weight.
        tensor: String,
        /// Why.
        source: BaselineError,
    },
    /// A quantized model holds other bytes than the storage format predicts (an accounting
    /// bug: the table would compare unequal memories).
    #[error("{config}: held {held} bytes, the storage format predicts {predicted}")]
    BytesMismatch {
        /// Method and configuration.
        config: String,
        /// Bytes held.
        held: u64,
        /// Bytes predicted.
        predicted: u64,
    },
    /// The runtime held more than the budget it was given (a budget-rule bug).
    #[error("BitStack holds {held} bytes at prefix {prefix}, over {budget}")]
    OverBudget {
        /// Bytes held.
        held: u64,
        /// Blocks loaded.
        prefix: usize,
        /// The budget.
        budget: u64,
    },
    /// Decomposing a weight for the no-AVD ablation failed.
    #[error("{tensor}: {source}")]
    Decompose {
        /// The weight.
        tensor: String,
        /// Why.
        source: bitstack_linalg::LinalgError,
    },
    /// Compressing the stack (or an ablation's) failed.
    #[error(transparent)]
    Compress(#[from] CompressError),
    /// The forward pass failed.
    #[error(transparent)]
    Llama(#[from] LlamaError),
    /// A baseline quantizer failed.
    #[error(transparent)]
    Baseline(#[from] BaselineError),
    /// A perplexity evaluation failed.
    #[error(transparent)]
    Perplexity(#[from] PerplexityError),
    /// Tokenizing a text failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The elastic runtime refused a resize.
    #[error(transparent)]
    Core(#[from] bitstack_core::CoreError),
    /// An order (the stack's, or an ablation's) could not be computed.
    #[error(transparent)]
    Sort(#[from] bitstack_sort::SortError),
    /// A decomposition (the no-AVD ablation's restore) failed.
    #[error(transparent)]
    Linalg(#[from] bitstack_linalg::LinalgError),
    /// Serializing the JSON report failed.
    #[error("compare.json: {0}")]
    Json(#[from] serde_json::Error),
    /// Finding, running or reading llama.cpp's tools failed (`--llama-cpp`); the error names
    /// the file and quotes the tool's stderr.
    #[error(transparent)]
    LlamaCpp(#[from] LlamaCppError),
}

type Res<T> = Result<T, CompareError>;

/// A usage error: an option value that cannot work.
fn usage(msg: impl Into<String>) -> CompareError {
    CompareError::Usage(UsageError(msg.into()))
}

/// What `bitstack compare` runs (the command line's flags, as plain options; [`Default`] is
/// the command's defaults with empty paths).
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// The original model (`.gguf` file or Hugging Face directory).
    pub model: PathBuf,
    /// Calibration text for GPTQ / AWQ (and for compressing when stack is not given).
    pub calib: PathBuf,
    /// Evaluation text.
    pub text: PathBuf,
    /// A stack file of the same model; without it one is compressed (default settings) into
    /// `out_dir`/stack.bitstack, or reused from there.
    pub stack: Option<PathBuf>,
    /// Folder for compare.json, compare.md and compare.svg.
    pub out_dir: PathBuf,
    /// Evaluation windows of seq-len tokens (0: all).
    pub max_windows: usize,
    /// Which windows `max_windows` picks (spread evenly over the text, or the first ones).
    pub windows: WindowSelection,
    /// Evaluation window length.
    pub seq_len: usize,
    /// Calibration windows for GPTQ / AWQ.
    pub calib_windows: usize,
    /// Tokens per calibration window.
    pub calib_seq_len: usize,
    /// Bit widths of the baselines.
    pub bits: Vec<u8>,
    /// Group size of the grouped configurations (`wNg128`).
    pub group_size: usize,
    /// Baselines: rtn, gptq, gptq-act, awq.
    pub methods: Vec<Baseline>,
    /// Skip the original model's row.
    pub skip_original: bool,
    /// Also evaluate BitStack without activation scaling and with k in ablation-ranks
    /// (each compressed afresh into `out_dir` and deleted afterwards), at the memory of the
    /// first method's grouped configurations.
    pub ablations: bool,
    /// Only the ablations (no baseline rows); their budgets are then those of RTN
    /// `wNg128` computed analytically.
    pub ablations_only: bool,
    /// Ranks k of the k ablation (16, the main stack's usual k, is reused from stack).
    pub ablation_ranks: Vec<usize>,
    /// Evaluation windows for the ablations (default: max-windows).
    pub ablation_windows: Option<usize>,
    /// Extra budgets for the ablations, beyond the baselines' grouped memories (e.g. `250MB`).
    pub ablation_budgets: Vec<MemoryBudget>,
    /// Which ablations to run.
    pub ablation_variants: Vec<AblationKind>,
    /// Precision the token embedding (and an untied head) is held in by the baselines and
    /// BitStack (the original row always holds it in f16): q8 (the default), f16 (as stored),
    /// q4 or f32.
    pub resident: EmbeddingPrecision,
    /// A folder holding llama.cpp's `llama-quantize` and `llama-perplexity`: adds llama.cpp
    /// rows (an F32 GGUF of the original and `llama_quants` made from it, cached in
    /// `out_dir`/llama-cpp, scored by llama-perplexity) and BitStack at each file's size.
    pub llama_cpp: Option<PathBuf>,
    /// The llama.cpp types of those rows (F32 is always made, as their reference).
    pub llama_quants: Vec<GgufQuant>,
    /// Threads llama.cpp's tools run with (`-t`).
    pub llama_threads: usize,
}

impl Default for CompareOptions {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            calib: PathBuf::new(),
            text: PathBuf::new(),
            stack: None,
            out_dir: PathBuf::from(".cache/compare"),
            max_windows: 8,
            windows: WindowSelection::EvenlySpaced,
            seq_len: 2048,
            calib_windows: 32,
            calib_seq_len: 512,
            bits: vec![2, 3, 4],
            group_size: 128,
            methods: vec![Baseline::Rtn, Baseline::Gptq, Baseline::Awq],
            skip_original: false,
            ablations: false,
            ablations_only: false,
            ablation_ranks: vec![1, 4, 8, 32],
            ablation_windows: None,
            ablation_budgets: vec![],
            ablation_variants: AblationKind::ALL.to_vec(),
            resident: EmbeddingPrecision::default(),
            llama_cpp: None,
            llama_quants: GgufQuant::DEFAULT_QUANTS.to_vec(),
            llama_threads: 2,
        }
    }
}

/// One kind of BitStack ablation (paper Fig. 5 and Fig. 7b).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AblationKind {
    /// Without activation-aware scaling.
    NoScaling,
    /// Without absolute value decomposition: plain iterative SVD with `k' = k + mn/(16(m+n))`
    /// ([`bitstack_linalg::same_size_rank`]), so every level costs what a block costs.
    NoAvd,
    /// Other ranks `k` (`--ablation-ranks`).
    Ranks,
}

impl AblationKind {
    /// Every kind, in the order `--ablation-variants` lists them by default.
    pub const ALL: [AblationKind; 3] = [Self::NoScaling, Self::NoAvd, Self::Ranks];

    /// The kind's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::NoScaling => "no-scaling",
            Self::NoAvd => "no-avd",
            Self::Ranks => "ranks",
        }
    }

    /// One line on what the kind measures (the command's help).
    pub fn help(self) -> &'static str {
        match self {
            Self::NoScaling => "Without activation-aware scaling",
            Self::NoAvd => "Without absolute value decomposition: plain iterative SVD with `k' = k + mn/(16(m+n))`, so every level costs what a block costs",
            Self::Ranks => "Other ranks `k` (`--ablation-ranks`)",
        }
    }
}

impl std::fmt::Display for AblationKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for AblationKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown ablation {s:?} (no-scaling, no-avd, ranks)"))
    }
}

/// Parses a baseline name (`rtn`, `gptq`, `gptq-act`, `awq`).
pub fn parse_baseline(s: &str) -> Result<Baseline, String> {
    match s.to_ascii_lowercase().as_str() {
        "rtn" => Ok(Baseline::Rtn),
        "gptq" => Ok(Baseline::Gptq),
        "gptq-act" | "gptq_act" => Ok(Baseline::GptqActOrder),
        "awq" => Ok(Baseline::Awq),
        o => Err(format!("unknown method {o:?} (rtn, gptq, gptq-act, awq)")),
    }
}

/// Bytes a quantized `rows × cols` weight holds under `quant`, computed from the storage format
/// alone: rows padded to whole `u32` words of codes, one f16 scale and one f16 zero per row and
/// group, and (AWQ) one f16 input scale per column. Equals [`QuantizedLinear::bytes`] of every
/// layer RTN / GPTQ / AWQ produce.
///
/// [`QuantizedLinear::bytes`]: crate::baselines::QuantizedLinear::bytes
pub fn quant_bytes(
    rows: usize,
    cols: usize,
    quant: &QuantConfig,
    input_scale: bool,
) -> Res<QuantBytes> {
    let gl = quant.group_len(cols)?;
    let groups = (rows * cols.div_ceil(gl)) as u64;
    Ok(QuantBytes {
        codes: (rows * packed_words(cols, quant.bits) * 4) as u64,
        scales: 2 * groups,
        zeros: 2 * groups,
        input_scale: if input_scale { 2 * cols as u64 } else { 0 },
    })
}

/// Memory of a whole model quantized with `method`: the resident bytes plus
/// [`quant_bytes`] of every `(rows, cols)` linear in `shapes`.
pub fn baseline_model_bytes(
    shapes: &[(usize, usize)],
    quant: &QuantConfig,
    method: Baseline,
    resident_bytes: u64,
) -> Res<u64> {
    let mut total = resident_bytes;
    for &(r, c) in shapes {
        total += quant_bytes(r, c, quant, method == Baseline::Awq)?.total();
    }
    Ok(total)
}

/// The largest prefix of a universal order whose bytes `cumulative[p]` do not exceed `bytes`
/// (the runtime's own rule, [`bitstack_core::prefix_within`]), or `None` when even the minimum
/// model (`floor` blocks, one per weight) is larger.
fn largest_prefix_within(cumulative: &[u64], floor: usize, bytes: u64) -> Res<Option<usize>> {
    match bitstack_core::prefix_within(cumulative, floor, MemoryBudget::from_bytes(bytes)) {
        Ok(p) => Ok(Some(p)),
        Err(bitstack_core::CoreError::BudgetBelowMinimum { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The baseline configurations of the table: for each bit width, per-channel then grouped.
pub fn configs(bits: &[u8], group_size: usize) -> Vec<QuantConfig> {
    bits.iter()
        .flat_map(|&b| {
            [
                QuantConfig {
                    bits: b,
                    grouping: Grouping::PerChannel,
                },
                QuantConfig {
                    bits: b,
                    grouping: Grouping::Groups(group_size),
                },
            ]
        })
        .collect()
}

/// Which shared statistics slot a linear's input falls in: Q/K/V read the same normalised
/// input, as do Gate/Up.
fn stats_slot(kind: LinearKind) -> usize {
    match kind {
        LinearKind::Q | LinearKind::K | LinearKind::V => 0,
        LinearKind::O => 1,
        LinearKind::Gate | LinearKind::Up => 2,
        LinearKind::Down => 3,
    }
}

struct HessianObserver {
    stats: Vec<Mutex<HessianAccumulator>>,
    error: Mutex<Option<(usize, LinearKind, BaselineError)>>,
}

impl ActivationObserver for HessianObserver {
    fn observe(&self, layer: usize, kind: LinearKind, x: &[f32]) {
        // Observe each shared input once (at its first reader).
        if !matches!(
            kind,
            LinearKind::Q | LinearKind::O | LinearKind::Gate | LinearKind::Down
        ) {
            return;
        }
        let Some(slot) = self.stats.get(layer * 4 + stats_slot(kind)) else {
            return;
        };
        let mut acc = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = acc.observe(x) {
            self.error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert((layer, kind, e));
        }
    }
}

/// Calibration statistics of every shared linear input (`4 · n_layers`, see `stats_slot`).
fn collect_stats(
    source: &dyn ModelSource,
    model: &Llama<'_>,
    tokens: &[u32],
    windows: usize,
    seq_len: usize,
) -> Res<Vec<HessianAccumulator>> {
    let c = source.config();
    let available = tokens.len() / seq_len.max(1);
    if windows == 0 || seq_len < 2 || available < windows {
        return Err(CompareError::CalibrationTooShort {
            windows,
            seq_len,
            tokens: tokens.len(),
        });
    }
    let mut stats = Vec::with_capacity(4 * c.n_layers);
    for _ in 0..c.n_layers {
        for kind in [
            LinearKind::Q,
            LinearKind::O,
            LinearKind::Gate,
            LinearKind::Down,
        ] {
            stats.push(Mutex::new(HessianAccumulator::new(kind.shape(c).1)?));
        }
    }
    let observer = HessianObserver {
        stats,
        error: Mutex::new(None),
    };
    crate::compress::run_calibration(
        model,
        tokens,
        windows,
        seq_len,
        &observer,
        "baseline calibration windows",
    )?;
    if let Some((layer, kind, source)) = observer
        .error
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
    {
        return Err(CompareError::Statistics {
            layer,
            kind,
            source,
        });
    }
    Ok(observer
        .stats
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .collect())
}

/// A perplexity in compare.json.
#[derive(Serialize)]
struct PplDoc {
    ppl: f64,
    mean_nll: f64,
    windows: usize,
    windows_available: usize,
    tokens_scored: usize,
    seconds: f64,
}

impl From<&Perplexity> for PplDoc {
    fn from(p: &Perplexity) -> Self {
        Self {
            ppl: p.ppl,
            mean_nll: p.mean_nll,
            windows: p.windows,
            windows_available: p.windows_available,
            tokens_scored: p.tokens_scored,
            seconds: p.seconds,
        }
    }
}

/// The settings at the top of compare.json (and of compare.md's caption).
#[derive(Clone, Debug, Serialize)]
struct Header {
    model: String,
    stack: String,
    /// The stack file's own `bitstack.compression` record, as stored.
    stack_compression: Value,
    text: String,
    text_tokens: usize,
    seq_len: usize,
    max_windows: Option<usize>,
    window_selection: WindowSelection,
    ablation_windows: Option<usize>,
    calib: String,
    calib_windows: usize,
    calib_seq_len: usize,
    calibration_note: &'static str,
    resident_bytes: u64,
    /// How the baselines and BitStack hold the embedding (`f16`, `q8`, `q4`, `f32`).
    resident_precision: String,
    memory_note: String,
    original_note: &'static str,
    bitstack_minimum_bytes: u64,
    bitstack_full_bytes: u64,
    original_f16_bytes: u64,
    /// Wall time per phase, `[name, seconds]`; written once the run is complete.
    #[serde(skip_serializing_if = "Option::is_none")]
    phases_seconds: Option<Vec<(String, f64)>>,
}

/// compare.json.
#[derive(Serialize)]
struct ReportDoc<'a> {
    #[serde(flatten)]
    header: &'a Header,
    original: Option<OriginalDoc>,
    rows: Vec<RowDoc>,
    ablations: AblationsDoc<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    llama_cpp: Option<LlamaCppDoc>,
}

/// What llama-perplexity reported, in compare.json.
#[derive(Serialize)]
struct LlamaPplDoc {
    ppl: f64,
    plus_minus: f64,
    chunks: Option<usize>,
    n_ctx: Option<usize>,
    running: Vec<f64>,
    seconds: f64,
}

impl From<&LlamaPerplexity> for LlamaPplDoc {
    fn from(p: &LlamaPerplexity) -> Self {
        Self {
            ppl: p.ppl,
            plus_minus: p.plus_minus,
            chunks: p.chunks,
            n_ctx: p.n_ctx,
            running: p.running.clone(),
            seconds: p.seconds,
        }
    }
}

/// One llama.cpp GGUF file and its score.
#[derive(Serialize)]
struct LlamaFileDoc {
    quant: GgufQuant,
    file: String,
    file_bytes: u64,
    reused: bool,
    quantize_seconds: f64,
    llama_perplexity: LlamaPplDoc,
}

/// One llama.cpp row: a quantized file, its ratio to llama.cpp's F32, BitStack at its size.
#[derive(Serialize)]
struct LlamaRowDoc {
    #[serde(flatten)]
    file: LlamaFileDoc,
    ratio_to_llama_f32: Option<f64>,
    bitstack: Option<StackPointDoc>,
    bitstack_ratio_to_original: Option<f64>,
}

/// The llama.cpp rows of compare.json.
#[derive(Serialize)]
struct LlamaCppDoc {
    llama_cpp_dir: String,
    threads: usize,
    chunks: Option<usize>,
    seq_len: usize,
    window_selection: WindowSelection,
    notes: Vec<String>,
    original_ppl: Option<f64>,
    f32: Option<LlamaFileDoc>,
    rows: Vec<LlamaRowDoc>,
}

/// The original model's row.
#[derive(Serialize)]
struct OriginalDoc {
    memory_bytes: u64,
    perplexity: PplDoc,
}

/// One baseline row and BitStack at its memory.
#[derive(Serialize)]
struct RowDoc {
    config: String,
    bits: u8,
    method: &'static str,
    memory_bytes: u64,
    codes_bytes: u64,
    scales_bytes: u64,
    zeros_bytes: u64,
    input_scale_bytes: u64,
    quantize_seconds: f64,
    perplexity: PplDoc,
    bitstack: Option<StackPointDoc>,
}

/// A BitStack point.
#[derive(Serialize)]
struct StackPointDoc {
    prefix_blocks: usize,
    memory_bytes: u64,
    perplexity: PplDoc,
}

/// The ablations.
#[derive(Serialize)]
struct AblationsDoc<'a> {
    notes: &'a [String],
    points: Vec<AblationDoc<'a>>,
}

/// One ablation point (`null` fields where the budget is below the variant's minimum).
#[derive(Serialize)]
struct AblationDoc<'a> {
    variant: &'a str,
    config: &'a str,
    budget_bytes: u64,
    prefix_blocks: Option<usize>,
    memory_bytes: Option<u64>,
    perplexity: Option<PplDoc>,
    note: Option<&'a str>,
}

/// A count of windows for compare.md: `all` when unbounded.
fn windows_text(w: Option<usize>) -> String {
    w.map_or("all".to_owned(), |w| w.to_string())
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / MB
}

use crate::output::write_atomic;

/// A BitStack point: the prefix loaded, the bytes held and its perplexity.
#[derive(Clone, Debug)]
struct StackPoint {
    prefix: usize,
    held: u64,
    ppl: Perplexity,
}

/// One baseline row and its BitStack counterpart.
#[derive(Clone, Debug)]
struct Row {
    config: QuantConfig,
    method: Baseline,
    bytes: QuantBytes,
    total: u64,
    quantize_seconds: f64,
    ppl: Perplexity,
    bitstack: Option<StackPoint>,
}

#[derive(Clone, Debug)]
struct AblationPoint {
    variant: String,
    config: String,
    budget: u64,
    point: Option<StackPoint>,
    note: Option<String>,
}

/// A llama.cpp file scored by llama-perplexity, and BitStack at its size (`None` for the
/// F32 reference, or below the stack's minimum).
#[derive(Clone, Debug)]
struct LlamaRow {
    file: QuantizedFile,
    ppl: LlamaPerplexity,
    bitstack: Option<StackPoint>,
}

/// The llama.cpp part of the report.
#[derive(Clone, Debug)]
struct LlamaRows {
    dir: PathBuf,
    threads: usize,
    chunks: Option<usize>,
    f32: Option<LlamaRow>,
    rows: Vec<LlamaRow>,
}

impl LlamaRows {
    /// A quant's perplexity relative to llama.cpp's own F32 (`None` until F32 is scored).
    fn llama_ratio(&self, r: &LlamaRow) -> Option<f64> {
        ratio(r.ppl.ppl, self.f32.as_ref()?.ppl.ppl)
    }

    /// The notes compare.md and compare.json carry (memory rule, scoring, window choice).
    fn notes(&self, h: &Header) -> Vec<String> {
        let mut n = vec![
            "memory of a llama.cpp row = its GGUF file's size in bytes (metadata and tokenizer included), as issue 15 defines it; BitStack = the largest prefix of the stack whose held bytes (blocks + scale vectors + resident tensors) do not exceed that size".to_owned(),
            format!(
                "llama.cpp: llama-perplexity -c {} {} -t {} scores the second half of each chunk of {} tokens (ours scores tokens 1..{} of each window), so raw perplexities differ between the engines: compare llama.cpp's ratio to its own F32 GGUF with BitStack's ratio to our original",
                h.seq_len,
                self.chunks.map_or("(all chunks)".to_owned(), |c| format!("--chunks {c}")),
                self.threads,
                h.seq_len,
                h.seq_len,
            ),
        ];
        n.push(match h.window_selection {
            WindowSelection::First => "our windows: --windows first, the same first chunks of the text llama.cpp scores".to_owned(),
            WindowSelection::EvenlySpaced => "our windows: --windows spread (evenly over the text) while llama.cpp scores the first chunks: the two engines score different text (use --windows first to match)".to_owned(),
        });
        n.push("the F32 GGUF is made with llama-quantize --allow-requantize from the original; the others from the F32".to_owned());
        n
    }
}

struct Report {
    header: Header,
    original: Option<(u64, Perplexity)>,
    rows: Vec<Row>,
    extra_stack_points: BTreeMap<usize, StackPoint>,
    ablations: Vec<AblationPoint>,
    ablation_notes: Vec<String>,
    llama: Option<LlamaRows>,
}

fn llama_file_doc(r: &LlamaRow) -> LlamaFileDoc {
    LlamaFileDoc {
        quant: r.file.quant,
        file: r.file.path.display().to_string(),
        file_bytes: r.file.bytes,
        reused: r.file.reused,
        quantize_seconds: r.file.seconds,
        llama_perplexity: (&r.ppl).into(),
    }
}

fn stack_point_doc(s: &StackPoint) -> StackPointDoc {
    StackPointDoc {
        prefix_blocks: s.prefix,
        memory_bytes: s.held,
        perplexity: (&s.ppl).into(),
    }
}

impl Report {
    fn json(&self) -> ReportDoc<'_> {
        ReportDoc {
            header: &self.header,
            original: self.original.as_ref().map(|(b, p)| OriginalDoc {
                memory_bytes: *b,
                perplexity: p.into(),
            }),
            rows: self
                .rows
                .iter()
                .map(|r| RowDoc {
                    config: r.config.label(),
                    bits: r.config.bits,
                    method: r.method.name(),
                    memory_bytes: r.total,
                    codes_bytes: r.bytes.codes,
                    scales_bytes: r.bytes.scales,
                    zeros_bytes: r.bytes.zeros,
                    input_scale_bytes: r.bytes.input_scale,
                    quantize_seconds: r.quantize_seconds,
                    perplexity: (&r.ppl).into(),
                    bitstack: r.bitstack.as_ref().map(|s| StackPointDoc {
                        prefix_blocks: s.prefix,
                        memory_bytes: s.held,
                        perplexity: (&s.ppl).into(),
                    }),
                })
                .collect(),
            ablations: AblationsDoc {
                notes: &self.ablation_notes,
                points: self
                    .ablations
                    .iter()
                    .map(|a| AblationDoc {
                        variant: &a.variant,
                        config: &a.config,
                        budget_bytes: a.budget,
                        prefix_blocks: a.point.as_ref().map(|p| p.prefix),
                        memory_bytes: a.point.as_ref().map(|p| p.held),
                        perplexity: a.point.as_ref().map(|p| (&p.ppl).into()),
                        note: a.note.as_deref(),
                    })
                    .collect(),
            },
            llama_cpp: self.llama.as_ref().map(|l| {
                let original = self.original.as_ref().map(|o| o.1.ppl);
                LlamaCppDoc {
                    llama_cpp_dir: l.dir.display().to_string(),
                    threads: l.threads,
                    chunks: l.chunks,
                    seq_len: self.header.seq_len,
                    window_selection: self.header.window_selection,
                    notes: l.notes(&self.header),
                    original_ppl: original,
                    f32: l.f32.as_ref().map(llama_file_doc),
                    rows: l
                        .rows
                        .iter()
                        .map(|r| LlamaRowDoc {
                            file: llama_file_doc(r),
                            ratio_to_llama_f32: l.llama_ratio(r),
                            bitstack: r.bitstack.as_ref().map(stack_point_doc),
                            bitstack_ratio_to_original: r
                                .bitstack
                                .as_ref()
                                .zip(original)
                                .and_then(|(s, o)| ratio(s.ppl.ppl, o)),
                        })
                        .collect(),
                }
            }),
        }
    }

    /// compare.md's llama.cpp table (empty without `--llama-cpp`).
    fn llama_markdown(&self) -> String {
        let Some(l) = &self.llama else {
            return String::new();
        };
        let h = &self.header;
        let original = self.original.as_ref().map(|o| o.1.ppl);
        let mut s = format!(
            "\nllama.cpp at equal memory ({} chunks / windows of {} tokens; llama.cpp {}; BitStack's resident embedding {}):\n\n",
            windows_text(l.chunks),
            h.seq_len,
            l.dir.display(),
            h.resident_precision,
        );
        let f = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.3}"));
        let mut rows = Vec::new();
        if let Some(r) = &l.f32 {
            rows.push(vec![
                r.file.quant.name().to_owned(),
                format!("{:.1}", mb(r.file.bytes)),
                format!("{:.3} ± {:.3}", r.ppl.ppl, r.ppl.plus_minus),
                "1.000".into(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
        for r in &l.rows {
            let lr = l.llama_ratio(r);
            let (bm, bp, br) = match &r.bitstack {
                Some(b) => (
                    format!("{:.1}", mb(b.held)),
                    format!("{:.3}", b.ppl.ppl),
                    original.and_then(|o| ratio(b.ppl.ppl, o)),
                ),
                None => ("below minimum".into(), "n/a".into(), None),
            };
            let lower = match (lr, br) {
                (Some(a), Some(b)) if b < a => "BitStack",
                (Some(_), Some(_)) => "llama.cpp",
                _ => "",
            };
            rows.push(vec![
                r.file.quant.name().to_owned(),
                format!("{:.1}", mb(r.file.bytes)),
                format!("{:.3} ± {:.3}", r.ppl.ppl, r.ppl.plus_minus),
                f(lr),
                bm,
                bp,
                f(br),
                lower.to_owned(),
            ]);
        }
        s.push_str(&markdown_table(
            &[
                "llama.cpp type",
                "file MB",
                "llama.cpp ppl",
                "ratio to llama.cpp F32",
                "BitStack MB (≤ file)",
                "BitStack ppl",
                "ratio to our original",
                "lower ratio",
            ],
            &rows,
        ));
        if let Some(o) = original {
            s.push_str(&format!(
                "\n* our original's perplexity (the BitStack ratios' reference): {o:.3}"
            ));
        }
        for n in l.notes(h) {
            s.push_str(&format!("\n* {n}"));
        }
        s.push('\n');
        s
    }

    /// compare.md: the caption, the baseline table, the ablations, the llama.cpp table.
    fn markdown(&self) -> String {
        let mut s = self.markdown_caption();
        s.push_str(&self.baseline_markdown());
        s.push_str(&self.ablation_markdown());
        s.push_str(&self.llama_markdown());
        s
    }

    /// compare.md's caption: the text, windows, memory rule, stack and calibration.
    fn markdown_caption(&self) -> String {
        let h = &self.header;
        format!(
            "Perplexity on {} ({} windows of {} tokens, picked by --windows {}, of {} available); memory in MB (10^6 bytes) = weights + scales + zeros + resident tensors ({} embedding, f32 norms). BitStack is the largest prefix of {} that does not exceed the baseline's memory. Baselines calibrated on {} windows of {} tokens of {} (statistics from one pass of the original model).\n\n",
            h.text,
            windows_text(h.max_windows),
            h.seq_len,
            h.window_selection,
            self.rows
                .first()
                .map(|r| r.ppl.windows_available)
                .or(self.original.as_ref().map(|o| o.1.windows_available))
                .or(self
                    .ablations
                    .iter()
                    .find_map(|a| a.point.as_ref().map(|p| p.ppl.windows_available)))
                .map_or("?".to_owned(), |n| n.to_string()),
            h.resident_precision,
            h.stack,
            h.calib_windows,
            h.calib_seq_len,
            h.calib,
        )
    }

    /// compare.md's baseline table: the original row, then each baseline and BitStack at its
    /// memory.
    fn baseline_markdown(&self) -> String {
        let mut rows = Vec::new();
        if let Some((b, p)) = &self.original {
            rows.push(vec![
                "FP16".into(),
                "original".into(),
                format!("{:.1}", mb(*b)),
                format!("{:.3}", p.ppl),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
        for r in &self.rows {
            let (bm, bp, win) = match &r.bitstack {
                Some(s) => (
                    format!("{:.1}", mb(s.held)),
                    format!("{:.3}", s.ppl.ppl),
                    if s.ppl.ppl < r.ppl.ppl {
                        "BitStack"
                    } else {
                        r.method.name()
                    }
                    .to_owned(),
                ),
                None => (
                    "below minimum".into(),
                    "n/a".into(),
                    r.method.name().to_owned(),
                ),
            };
            rows.push(vec![
                r.config.label(),
                r.method.name().into(),
                format!("{:.1}", mb(r.total)),
                format!("{:.3}", r.ppl.ppl),
                bm,
                bp,
                win,
            ]);
        }
        markdown_table(
            &[
                "config",
                "method",
                "memory MB",
                "ppl",
                "BitStack MB (≤)",
                "BitStack ppl",
                "lower ppl",
            ],
            &rows,
        )
    }

    /// compare.md's ablation table and notes (empty without ablations).
    fn ablation_markdown(&self) -> String {
        if self.ablations.is_empty() && self.ablation_notes.is_empty() {
            return String::new();
        }
        let mut s = format!(
            "\nBitStack ablations ({} windows):\n\n",
            windows_text(self.header.ablation_windows)
        );
        let rows: Vec<Vec<String>> = self
            .ablations
            .iter()
            .map(|a| {
                vec![
                    a.variant.clone(),
                    a.config.clone(),
                    format!("{:.1}", mb(a.budget)),
                    a.point
                        .as_ref()
                        .map_or("n/a".into(), |p| format!("{:.1}", mb(p.held))),
                    a.point.as_ref().map_or_else(
                        || a.note.clone().unwrap_or_default(),
                        |p| format!("{:.3}", p.ppl.ppl),
                    ),
                ]
            })
            .collect();
        s.push_str(&markdown_table(
            &["variant", "at memory of", "budget MB", "held MB", "ppl"],
            &rows,
        ));
        for n in &self.ablation_notes {
            s.push_str(&format!("\n* {n}"));
        }
        s.push('\n');
        s
    }

    /// compare.svg: perplexity against memory for each baseline, BitStack, each ablation and
    /// llama.cpp, with the original as a horizontal line.
    fn svg(&self) -> Result<String, PlotError> {
        let mut series = self.baseline_series();
        series.extend(self.bitstack_series());
        series.extend(self.ablation_series());
        series.extend(self.llama_series());
        let hlines: Vec<(String, f64)> = self
            .original
            .as_ref()
            .map(|(_, p)| vec![("original".to_owned(), p.ppl)])
            .unwrap_or_default();
        svg_plot(
            "Perplexity at equal memory: baselines vs BitStack",
            "memory (MB = 10^6 bytes, weights + resident tensors)",
            "perplexity (log scale)",
            &series,
            &hlines,
        )
    }

    /// One series per baseline method (in the order the rows first name them).
    fn baseline_series(&self) -> Vec<Series> {
        let mut methods: Vec<Baseline> = Vec::new();
        for r in &self.rows {
            if !methods.contains(&r.method) {
                methods.push(r.method);
            }
        }
        methods
            .into_iter()
            .filter_map(|m| {
                let points = self
                    .rows
                    .iter()
                    .filter(|r| r.method == m)
                    .map(|r| (mb(r.total), r.ppl.ppl))
                    .collect();
                sorted_series(m.name().into(), points)
            })
            .collect()
    }

    /// BitStack's points, by prefix: at the baselines', the extra and the llama.cpp rows'
    /// memories (`None` when there are none).
    fn bitstack_series(&self) -> Option<Series> {
        let mut bs: BTreeMap<usize, (f64, f64)> = BTreeMap::new();
        let llama_rows = self.llama.iter().flat_map(|l| &l.rows);
        for s in self
            .rows
            .iter()
            .filter_map(|r| r.bitstack.as_ref())
            .chain(self.extra_stack_points.values())
            .chain(llama_rows.filter_map(|r| r.bitstack.as_ref()))
        {
            bs.insert(s.prefix, (mb(s.held), s.ppl.ppl));
        }
        (!bs.is_empty()).then(|| Series {
            name: "BitStack".into(),
            points: bs.into_values().collect(),
        })
    }

    /// One series per ablation variant that has points (in the order they first appear).
    fn ablation_series(&self) -> Vec<Series> {
        let mut variants: Vec<&str> = Vec::new();
        for a in &self.ablations {
            if !variants.contains(&a.variant.as_str()) {
                variants.push(&a.variant);
            }
        }
        variants
            .into_iter()
            .filter_map(|v| {
                let points = self
                    .ablations
                    .iter()
                    .filter(|a| a.variant == v)
                    .filter_map(|a| a.point.as_ref().map(|p| (mb(p.held), p.ppl.ppl)))
                    .collect();
                sorted_series(v.to_owned(), points)
            })
            .collect()
    }

    /// llama.cpp's points on our scale: its ratio to its own F32 times our original's
    /// perplexity (the raw numbers score other tokens, see the notes).
    fn llama_series(&self) -> Option<Series> {
        let (Some(l), Some((_, o))) = (&self.llama, &self.original) else {
            return None;
        };
        let points = l
            .rows
            .iter()
            .filter_map(|r| Some((mb(r.file.bytes), l.llama_ratio(r)? * o.ppl)))
            .collect();
        sorted_series(
            "llama.cpp GGUF (file size; ppl ratio to its F32 x our original)".into(),
            points,
        )
    }

    fn write(&self, out_dir: &Path) -> Res<()> {
        write_atomic(
            &out_dir.join("compare.json"),
            serde_json::to_string_pretty(&self.json())?.as_bytes(),
        )?;
        write_atomic(&out_dir.join("compare.md"), self.markdown().as_bytes())?;
        write_atomic(&out_dir.join("compare.svg"), self.svg()?.as_bytes())?;
        Ok(())
    }
}

/// A plot series of `points` sorted by memory (`None` when there are none).
fn sorted_series(name: String, mut points: Vec<(f64, f64)>) -> Option<Series> {
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    (!points.is_empty()).then_some(Series { name, points })
}

/// The original model's perplexity (the reference of every ratio), with progress lines.
fn original_perplexity(
    model: &Llama<'_>,
    tokens: &[u32],
    params: &PerplexityParams,
) -> Res<Perplexity> {
    Ok(perplexity(
        model,
        tokens,
        params,
        &mut crate::report::perplexity_progress("original".into()),
    )?)
}

/// A BitStack point for a progress line: its held MB and perplexity, or that the memory is
/// below the stack's minimum.
fn describe_point(point: Option<&StackPoint>) -> String {
    point.map_or("below its minimum".into(), |s| {
        format!("{:.2} MB ppl {:.3}", mb(s.held), s.ppl.ppl)
    })
}

/// Evaluates the stack at the largest prefix within `bytes`, reusing `cache` by prefix.
fn eval_stack_within(
    loaded: &LoadedStack,
    bytes: u64,
    tokens: &[u32],
    params: &PerplexityParams,
    label: &str,
    cache: &mut BTreeMap<usize, StackPoint>,
) -> Res<Option<StackPoint>> {
    let prefix = match loaded
        .elastic
        .prefix_for_budget(MemoryBudget::from_bytes(bytes))
    {
        Ok(p) => p,
        Err(bitstack_core::CoreError::BudgetBelowMinimum { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if let Some(p) = cache.get(&prefix) {
        return Ok(Some(p.clone()));
    }
    loaded.elastic.resize_to_prefix(prefix)?;
    let linears = loaded.linears();
    let held = linears.0.held_bytes();
    if held > bytes {
        return Err(CompareError::OverBudget {
            held,
            prefix,
            budget: bytes,
        });
    }
    let model = Llama::new(&loaded.resident, &linears)?;
    let ppl = perplexity(
        &model,
        tokens,
        params,
        &mut crate::report::perplexity_progress(format!(
            "{label} ({:.2} MB, {prefix} blocks)",
            mb(held)
        )),
    )?;
    let p = StackPoint { prefix, held, ppl };
    cache.insert(prefix, p.clone());
    Ok(Some(p))
}

/// Validates `args` before any work: the counts, and that OUT_DIR exists (it is created) and
/// its outputs can be written without touching an input.
pub fn check_args(args: &CompareOptions) -> Res<()> {
    for (flag, v) in [
        ("--seq-len", args.seq_len),
        ("--calib-windows", args.calib_windows),
        ("--calib-seq-len", args.calib_seq_len),
        ("--group-size", args.group_size),
    ] {
        if v == 0 {
            return Err(usage(format!("{flag} must be at least 1")));
        }
    }
    let supported = crate::baselines::SUPPORTED_BITS;
    if let Some(b) = args.bits.iter().find(|b| !supported.contains(*b)) {
        return Err(usage(format!(
            "--bits {b}: supported bit widths are {supported:?}"
        )));
    }
    std::fs::create_dir_all(&args.out_dir).map_err(|source| CompareError::CreateOutDir {
        path: args.out_dir.clone(),
        source,
    })?;
    let mut inputs = vec![
        args.model.as_path(),
        args.calib.as_path(),
        args.text.as_path(),
    ];
    if let Some(s) = &args.stack {
        inputs.push(s.as_path());
    }
    for name in ["compare.json", "compare.md", "compare.svg"] {
        crate::output::check_output(&args.out_dir.join(name), &inputs)?;
    }
    if args.stack.is_none() {
        let p = args.out_dir.join("stack.bitstack");
        if !p.is_file() {
            crate::output::check_output(&p, &inputs)?;
        }
    }
    check_llama_args(args, &inputs)?;
    Ok(())
}

/// The folder the llama.cpp GGUF files are cached in.
fn llama_cache_dir(args: &CompareOptions) -> PathBuf {
    args.out_dir.join("llama-cpp")
}

/// `check_args`' part for `--llama-cpp`: the tools are there, the model is a GGUF file, the
/// cached files can be written; returns the tools found.
fn check_llama_args(args: &CompareOptions, inputs: &[&Path]) -> Res<Option<LlamaCpp>> {
    let Some(dir) = &args.llama_cpp else {
        return Ok(None);
    };
    if args.skip_original {
        return Err(usage(
            "--skip-original cannot go with --llama-cpp: BitStack's ratios in the llama.cpp rows are taken to the original's perplexity",
        ));
    }
    if args.llama_threads == 0 {
        return Err(usage("--llama-threads must be at least 1"));
    }
    if args.llama_quants.is_empty() {
        return Err(usage("--llama-quants: give at least one type"));
    }
    if args.llama_quants.contains(&GgufQuant::F32) {
        return Err(usage(
            "--llama-quants: F32 is always made and scored, as the llama.cpp ratios' reference; list only quantized types",
        ));
    }
    let lc = LlamaCpp::find(dir)?;
    crate::llama_cpp::check_gguf_input(&args.model)?;
    let cache = llama_cache_dir(args);
    std::fs::create_dir_all(&cache).map_err(|source| CompareError::CreateOutDir {
        path: cache.clone(),
        source,
    })?;
    for q in std::iter::once(GgufQuant::F32).chain(args.llama_quants.iter().copied()) {
        crate::output::check_output(
            &crate::llama_cpp::cached_path(&cache, &args.model, q),
            inputs,
        )?;
    }
    Ok(Some(lc))
}

/// Runs the comparison and writes OUT_DIR/compare.{json,md,svg}; returns the markdown.
pub fn run(args: &CompareOptions) -> Res<String> {
    let t_all = Instant::now();
    check_args(args)?;
    let llama = args.llama_cpp.as_ref().map(LlamaCpp::find).transpose()?;
    let inputs = load_inputs(args)?;
    let stack = open_stack(args, &inputs)?;
    let residents = Residents::load(args, inputs.source.as_ref(), &stack.loaded)?;
    let s = Session::new(args, &inputs, &stack, &residents);
    let mut out = Outcome {
        report: s.new_report(),
        cache: BTreeMap::new(),
        phases: Vec::new(),
    };
    s.note_start();
    let cfgs = configs(&args.bits, args.group_size);
    if !args.ablations_only {
        run_baselines(&s, &cfgs, &mut out)?;
    }
    if let Some(lc) = &llama {
        if out.report.original.is_none() {
            // --ablations-only skips the baseline block; the llama.cpp rows' BitStack ratios
            // still need the original.
            original_row_alone(&s, &mut out)?;
        }
        run_llama_rows(&s, lc, &mut out)?;
    }
    if args.ablations || args.ablations_only {
        run_ablations(&s, &cfgs, &mut out)?;
    }
    out.phases
        .push(("total".into(), t_all.elapsed().as_secs_f64()));
    out.report.header.phases_seconds = Some(out.phases);
    out.report.write(&args.out_dir)?;
    Ok(out.report.markdown())
}

/// The model [`run`] compares and its texts, tokenized.
struct Inputs {
    source: Box<dyn ModelSource>,
    /// The calibration text (also compressed from, for the stack and the ablations).
    calib_text: String,
    /// The evaluation text's tokens.
    tokens: Vec<u32>,
    /// The calibration text's tokens.
    calib_tokens: Vec<u32>,
}

/// Opens `--model` and reads and tokenizes `--text` and `--calib`.
fn load_inputs(args: &CompareOptions) -> Res<Inputs> {
    let model_err = |source| CompareError::OpenModel {
        path: args.model.clone(),
        source,
    };
    let source = open_model(&args.model).map_err(model_err)?;
    let tokenizer = source.tokenizer().map_err(model_err)?;
    let text = read_text("--text", &args.text)?;
    let calib_text = read_text("--calib", &args.calib)?;
    let tokens = tokenizer.encode(&text, false)?;
    let calib_tokens = tokenizer.encode(&calib_text, false)?;
    Ok(Inputs {
        source,
        calib_text,
        tokens,
        calib_tokens,
    })
}

/// The text of the file `flag` names.
fn read_text(flag: &'static str, path: &Path) -> Res<String> {
    std::fs::read_to_string(path).map_err(|source| CompareError::ReadText {
        flag,
        path: path.to_owned(),
        source,
    })
}

/// The stack [`run`] compares against.
struct MainStack {
    path: PathBuf,
    loaded: LoadedStack,
    /// Its `bitstack.compression` record (null when absent or unreadable).
    compression: Value,
}

/// Opens the stack file: `--stack`, or OUT_DIR/stack.bitstack, compressed from the model with
/// the default settings when it is not there yet; held at `--resident`.
fn open_stack(args: &CompareOptions, inputs: &Inputs) -> Res<MainStack> {
    let path = match &args.stack {
        Some(p) => p.clone(),
        None => {
            let p = args.out_dir.join("stack.bitstack");
            if !p.is_file() {
                crate::noteln!(
                    "no --stack: compressing {} into {}",
                    args.model.display(),
                    p.display()
                );
                let out = compress(
                    inputs.source.as_ref(),
                    &inputs.calib_text,
                    &CompressParams::default(),
                )?;
                write_compressed(&out, &p)?;
            }
            p
        }
    };
    let loaded = LoadedStack::open_with(&path, None, args.resident).map_err(|source| {
        CompareError::OpenStack {
            path: path.clone(),
            source: Box::new(source),
        }
    })?;
    let compression = loaded
        .model
        .file()
        .metadata_str(META_COMPRESSION)
        .and_then(|s| serde_json::from_str::<Value>(s).ok())
        .unwrap_or(Value::Null);
    Ok(MainStack {
        path,
        loaded,
        compression,
    })
}

/// The resident tensors of the rows: the original row holds the embedding in f16; the
/// baselines and BitStack at `--resident` (the same tensors when that is f16).
struct Residents {
    f16: LlamaResident,
    other: Option<LlamaResident>,
}

impl Residents {
    /// Loads them from `source`, refusing a stack whose resident bytes differ from the
    /// baselines' (the rows would not be charged alike).
    fn load(args: &CompareOptions, source: &dyn ModelSource, loaded: &LoadedStack) -> Res<Self> {
        let f16 = LlamaResident::from_source_with(source, EmbeddingPrecision::F16)?;
        let other = match args.resident {
            EmbeddingPrecision::F16 => None,
            p => Some(LlamaResident::from_source_with(source, p)?),
        };
        let r = Self { f16, other };
        let (model, stack) = (
            r.held().held_bytes(),
            loaded.elastic.layout().resident_bytes,
        );
        if model != stack {
            return Err(CompareError::ResidentMismatch { model, stack });
        }
        Ok(r)
    }

    /// The resident tensors the baselines and BitStack hold (`--resident`).
    fn held(&self) -> &LlamaResident {
        self.other.as_ref().unwrap_or(&self.f16)
    }
}

/// What every phase of [`run`] reads: the options, the inputs, the stack, the resident
/// tensors and what follows from them.
struct Session<'a> {
    args: &'a CompareOptions,
    source: &'a dyn ModelSource,
    calib_text: &'a str,
    tokens: &'a [u32],
    calib_tokens: &'a [u32],
    stack: &'a MainStack,
    loaded: &'a LoadedStack,
    residents: &'a Residents,
    /// The evaluation settings of the rows.
    params: PerplexityParams,
    /// Those of the ablations (`--ablation-windows`).
    ablation_params: PerplexityParams,
    n_layers: usize,
    /// `(rows, cols)` of every linear, in [`weight_index`] order.
    shapes: Vec<(usize, usize)>,
    /// Bytes of the resident tensors the baselines and BitStack hold.
    resident_bytes: u64,
    /// The original row's memory: every parameter in f16.
    original_f16: u64,
}

impl<'a> Session<'a> {
    fn new(
        args: &'a CompareOptions,
        inputs: &'a Inputs,
        stack: &'a MainStack,
        residents: &'a Residents,
    ) -> Self {
        let c = inputs.source.config();
        let n_weights = c.n_layers * LinearKind::ALL.len();
        let shapes: Vec<(usize, usize)> = (0..n_weights)
            .map(|w| weight_of_index(w).1.shape(c))
            .collect();
        let resident = residents.held();
        let original_f16 = 2
            * (shapes.iter().map(|&(r, cc)| (r * cc) as u64).sum::<u64>()
                + resident.param_count() as u64);
        let params = PerplexityParams {
            seq_len: args.seq_len,
            max_windows: (args.max_windows > 0).then_some(args.max_windows),
            selection: args.windows,
            ..Default::default()
        };
        let ablation_params = PerplexityParams {
            max_windows: args.ablation_windows.or(params.max_windows),
            ..params.clone()
        };
        Self {
            args,
            source: inputs.source.as_ref(),
            calib_text: &inputs.calib_text,
            tokens: &inputs.tokens,
            calib_tokens: &inputs.calib_tokens,
            stack,
            loaded: &stack.loaded,
            residents,
            params,
            ablation_params,
            n_layers: c.n_layers,
            shapes,
            resident_bytes: resident.held_bytes(),
            original_f16,
        }
    }

    /// The report before any row: its header.
    fn new_report(&self) -> Report {
        let args = self.args;
        Report {
            header: Header {
                model: args.model.display().to_string(),
                stack: self.stack.path.display().to_string(),
                stack_compression: self.stack.compression.clone(),
                text: args.text.display().to_string(),
                text_tokens: self.tokens.len(),
                seq_len: args.seq_len,
                max_windows: self.params.max_windows,
                window_selection: args.windows,
                ablation_windows: self.ablation_params.max_windows,
                calib: args.calib.display().to_string(),
                calib_windows: args.calib_windows,
                calib_seq_len: args.calib_seq_len,
                calibration_note: "baseline statistics (X^T X, sum |x|) from one forward pass of the original model; Q/K/V and Gate/Up share them",
                resident_bytes: self.resident_bytes,
                resident_precision: args.resident.to_string(),
                memory_note: format!("weights + scales + zeros (+ AWQ input scale) + resident tensors ({} embedding, f32 norms); BitStack: blocks + f32 scale vectors + the same resident tensors", args.resident),
                original_note: "the original row runs the source weights (dequantized to f32) with the f16 embedding; its memory counts every parameter in f16",
                bitstack_minimum_bytes: self.loaded.elastic.minimum_bytes(),
                bitstack_full_bytes: self.loaded.elastic.full_bytes(),
                original_f16_bytes: self.original_f16,
                phases_seconds: None,
            },
            original: None,
            rows: Vec::new(),
            extra_stack_points: BTreeMap::new(),
            ablations: Vec::new(),
            ablation_notes: Vec::new(),
            llama: None,
        }
    }

    /// The progress line before the first row: text, memory range, windows.
    fn note_start(&self) {
        crate::noteln!(
            "text {} tokens; resident {:.2} MB; BitStack {:.1}..{:.1} MB; evaluating {} windows of {}",
            self.tokens.len(),
            mb(self.resident_bytes),
            mb(self.loaded.elastic.minimum_bytes()),
            mb(self.loaded.elastic.full_bytes()),
            self.params
                .max_windows
                .map_or("all".to_owned(), |w| w.to_string()),
            self.args.seq_len
        );
    }
}

/// What the phases of [`run`] produce: the report (rewritten after every row), BitStack's
/// points by prefix (shared by the baseline and llama.cpp rows) and the wall time per phase.
struct Outcome {
    report: Report,
    cache: BTreeMap<usize, StackPoint>,
    phases: Vec<(String, f64)>,
}

impl Outcome {
    /// Records the wall time since `t` as phase `name`.
    fn phase(&mut self, name: impl Into<String>, t: Instant) {
        self.phases.push((name.into(), t.elapsed().as_secs_f64()));
    }
}

/// The perplexity of the model of `resident` and `linears` on `tokens`, with progress lines
/// labelled `label`.
fn model_perplexity(
    resident: &LlamaResident,
    linears: &dyn LinearProvider,
    tokens: &[u32],
    params: &PerplexityParams,
    label: String,
) -> Res<Perplexity> {
    let model = Llama::new(resident, linears)?;
    Ok(perplexity(
        &model,
        tokens,
        params,
        &mut crate::report::perplexity_progress(label),
    )?)
}

/// The linear table of `n_layers` layers from their 7 linears each, in [`weight_index`]
/// order (`what`: the panic message should `ops` run short).
fn layer_table(
    ops: impl IntoIterator<Item = Box<dyn LinearOp>>,
    n_layers: usize,
    what: &str,
) -> LinearTable {
    let mut ops = ops.into_iter();
    let layers: Vec<[Box<dyn LinearOp>; 7]> = (0..n_layers)
        .map(|_| std::array::from_fn(|_| ops.next().expect(what)))
        .collect();
    LinearTable::new(layers)
}

/// Scores `model` (the source weights with the f16 resident tensors) as the original row.
fn score_original(s: &Session<'_>, model: &Llama<'_>, out: &mut Outcome) -> Res<()> {
    let p = original_perplexity(model, s.tokens, &s.params)?;
    out.report.original = Some((s.original_f16, p));
    Ok(())
}

/// The original row on its own, for when the baseline block (which scores it) is skipped.
fn original_row_alone(s: &Session<'_>, out: &mut Outcome) -> Res<()> {
    let t = Instant::now();
    let dense = LinearTable::dense_from_source(s.source)?;
    let model = Llama::new(&s.residents.f16, &dense)?;
    score_original(s, &model, out)?;
    out.phase("original", t);
    Ok(())
}

/// The baseline rows: the original row, the baselines' calibration, then every method at
/// every configuration with BitStack at its memory.
fn run_baselines(s: &Session<'_>, cfgs: &[QuantConfig], out: &mut Outcome) -> Res<()> {
    let stats = original_and_stats(s, out)?;
    let t = Instant::now();
    let weights = load_weights(s)?;
    out.phase("load weights", t);
    let q = QuantInputs {
        weights: &weights,
        stats: stats.as_deref(),
    };
    for cfg in cfgs {
        for &method in &s.args.methods {
            baseline_row(s, &q, cfg, method, out)?;
        }
    }
    Ok(())
}

/// From one dense model of the source weights: the original row (unless `--skip-original`)
/// and the calibration statistics of the baselines (when a method needs them).
fn original_and_stats(s: &Session<'_>, out: &mut Outcome) -> Res<Option<Vec<HessianAccumulator>>> {
    let t = Instant::now();
    let dense = LinearTable::dense_from_source(s.source)?;
    let model = Llama::new(&s.residents.f16, &dense)?;
    if !s.args.skip_original {
        score_original(s, &model, out)?;
        out.report.write(&s.args.out_dir)?;
    }
    out.phase("original", t);
    let t = Instant::now();
    let need_stats = s.args.methods.iter().any(|m| m.needs_calibration());
    let stats = if need_stats {
        Some(collect_stats(
            s.source,
            &model,
            s.calib_tokens,
            s.args.calib_windows,
            s.args.calib_seq_len,
        )?)
    } else {
        None
    };
    drop(dense);
    out.phase("baseline calibration", t);
    Ok(stats)
}

/// The original weights in f32 for quantizing, shapes checked (none without baselines:
/// `--methods none`).
fn load_weights(s: &Session<'_>) -> Res<Vec<Vec<f32>>> {
    (0..s.shapes.len())
        .filter(|_| !s.args.methods.is_empty())
        .map(|w| {
            let (layer, kind) = weight_of_index(w);
            let (shape, data) = s.source.tensor_f32(&kind.tensor_name(layer))?;
            let (r, cc) = s.shapes[w];
            if shape != [r, cc] {
                return Err(CompareError::TensorShape {
                    tensor: kind.tensor_name(layer),
                    shape,
                    rows: r,
                    cols: cc,
                });
            }
            Ok(data)
        })
        .collect()
}

/// What the baselines quantize: the original weights and their calibration statistics.
struct QuantInputs<'a> {
    weights: &'a [Vec<f32>],
    stats: Option<&'a [HessianAccumulator]>,
}

/// One baseline row: `method` at `cfg`, its memory checked against the storage format,
/// scored, and BitStack at that memory; the report is rewritten after it.
fn baseline_row(
    s: &Session<'_>,
    q: &QuantInputs<'_>,
    cfg: &QuantConfig,
    method: Baseline,
    out: &mut Outcome,
) -> Res<()> {
    let label = format!("{} {}", method.name(), cfg.label());
    let t = Instant::now();
    let quantized = quantize_all(s, q, cfg, method, &label)?;
    let quantize_seconds = t.elapsed().as_secs_f64();
    let bytes = sum_bytes(&quantized);
    let total = s.resident_bytes + bytes.total();
    let predicted = baseline_model_bytes(&s.shapes, cfg, method, s.resident_bytes)?;
    if predicted != total {
        return Err(CompareError::BytesMismatch {
            config: label.clone(),
            held: total,
            predicted,
        });
    }
    let ops = quantized
        .into_iter()
        .map(|q| Box::new(q) as Box<dyn LinearOp>);
    let table = layer_table(ops, s.n_layers, "7 per layer");
    debug_assert_eq!(weight_index(1, LinearKind::Q), 7);
    let ppl = model_perplexity(
        s.residents.held(),
        &table,
        s.tokens,
        &s.params,
        format!("{label} ({:.2} MB)", mb(total)),
    )?;
    drop(table);
    out.phases
        .push((format!("{label} quantize"), quantize_seconds));
    out.phases.push((format!("{label} eval"), ppl.seconds));
    let t = Instant::now();
    let bitstack = eval_stack_within(
        s.loaded,
        total,
        s.tokens,
        &s.params,
        &format!("BitStack at {label}"),
        &mut out.cache,
    )?;
    out.phase(format!("BitStack at {label}"), t);
    crate::noteln!(
        "{label}: {:.2} MB ppl {:.3} | BitStack {}",
        mb(total),
        ppl.ppl,
        describe_point(bitstack.as_ref())
    );
    out.report.rows.push(Row {
        config: *cfg,
        method,
        bytes,
        total,
        quantize_seconds,
        ppl,
        bitstack,
    });
    out.report.write(&s.args.out_dir)
}

/// Every linear quantized by `method` at `cfg` (in parallel, with a progress line labelled
/// `label`).
fn quantize_all(
    s: &Session<'_>,
    q: &QuantInputs<'_>,
    cfg: &QuantConfig,
    method: Baseline,
    label: &str,
) -> Res<Vec<crate::baselines::QuantizedLinear>> {
    let (shapes, n_weights) = (&s.shapes, s.shapes.len());
    let done = std::sync::atomic::AtomicUsize::new(0);
    let progress = Mutex::new(Progress::new(format!("{label}: quantizing"), n_weights));
    (0..n_weights)
        .into_par_iter()
        .map(|w| -> Res<_> {
            let (layer, kind) = weight_of_index(w);
            let (r, cc) = shapes[w];
            let view = WeightView::new(&q.weights[w], r, cc)?;
            let st = q.stats.map(|s| &s[layer * 4 + stats_slot(kind)]);
            let quantized =
                method
                    .quantize(view, st, *cfg)
                    .map_err(|source| CompareError::Quantize {
                        config: label.to_owned(),
                        tensor: kind.tensor_name(layer),
                        source,
                    })?;
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if let Ok(mut p) = progress.lock() {
                p.update(n);
            }
            Ok(quantized)
        })
        .collect()
}

/// The bytes `quantized` holds, by part.
fn sum_bytes(quantized: &[crate::baselines::QuantizedLinear]) -> QuantBytes {
    let mut bytes = QuantBytes::default();
    for q in quantized {
        let b = q.bytes();
        bytes.codes += b.codes;
        bytes.scales += b.scales;
        bytes.zeros += b.zeros;
        bytes.input_scale += b.input_scale;
    }
    bytes
}

/// The llama.cpp rows: the F32 GGUF of the original and `args.llama_quants` made from it
/// (cached in OUT_DIR/llama-cpp), each scored by llama-perplexity on the same text, window
/// length and window count, and BitStack at each quantized file's size in bytes.
fn run_llama_rows(s: &Session<'_>, lc: &LlamaCpp, out: &mut Outcome) -> Res<()> {
    out.report.llama = Some(LlamaRows {
        dir: lc.dir.clone(),
        threads: s.args.llama_threads,
        chunks: s.params.max_windows,
        f32: None,
        rows: Vec::new(),
    });
    let (f32_file, files) = make_llama_files(s, lc, out)?;
    let ppl = score_llama_file(s, lc, &f32_file)?;
    out.phases
        .push(("llama.cpp F32 perplexity".into(), ppl.seconds));
    if let Some(l) = out.report.llama.as_mut() {
        l.f32 = Some(LlamaRow {
            file: f32_file,
            ppl,
            bitstack: None,
        });
    }
    out.report.write(&s.args.out_dir)?;
    for f in files {
        llama_row(s, lc, f, out)?;
    }
    Ok(())
}

/// The F32 GGUF of the original and the quantized files made from it (made by
/// llama-quantize, or reused from OUT_DIR/llama-cpp).
fn make_llama_files(
    s: &Session<'_>,
    lc: &LlamaCpp,
    out: &mut Outcome,
) -> Res<(QuantizedFile, Vec<QuantizedFile>)> {
    let (args, threads) = (s.args, s.args.llama_threads);
    let dir = llama_cache_dir(args);
    let path = |q| crate::llama_cpp::cached_path(&dir, &args.model, q);
    let f32_path = path(GgufQuant::F32);
    let f32_file = lc.quantize_cached(&args.model, &f32_path, GgufQuant::F32, true, threads)?;
    out.phases
        .push(("llama.cpp F32 GGUF".into(), f32_file.seconds));
    let mut files = Vec::new();
    for &q in &args.llama_quants {
        let f = lc.quantize_cached(&f32_path, &path(q), q, false, threads)?;
        out.phases.push((format!("llama.cpp {q} GGUF"), f.seconds));
        files.push(f);
    }
    Ok((f32_file, files))
}

/// `f` scored by llama-perplexity on the evaluation text, with progress lines.
fn score_llama_file(s: &Session<'_>, lc: &LlamaCpp, f: &QuantizedFile) -> Res<LlamaPerplexity> {
    crate::noteln!(
        "llama.cpp: llama-perplexity on {} ({:.1} MB)",
        f.path.display(),
        mb(f.bytes)
    );
    let p = lc.perplexity(
        &f.path,
        &s.args.text,
        s.args.seq_len,
        s.params.max_windows,
        s.args.llama_threads,
    )?;
    crate::noteln!(
        "llama.cpp {}: ppl {:.4} +/- {:.5} ({:.0} s)",
        f.quant,
        p.ppl,
        p.plus_minus,
        p.seconds
    );
    Ok(p)
}

/// One llama.cpp row: `f` scored, and BitStack at its size; the report is rewritten after it.
fn llama_row(s: &Session<'_>, lc: &LlamaCpp, f: QuantizedFile, out: &mut Outcome) -> Res<()> {
    let ppl = score_llama_file(s, lc, &f)?;
    out.phases
        .push((format!("llama.cpp {} perplexity", f.quant), ppl.seconds));
    let t = Instant::now();
    let label = format!("BitStack at llama.cpp {}", f.quant);
    let bitstack = eval_stack_within(
        s.loaded,
        f.bytes,
        s.tokens,
        &s.params,
        &label,
        &mut out.cache,
    )?;
    out.phase(label.clone(), t);
    crate::noteln!(
        "{label} ({:.2} MB file): {}",
        mb(f.bytes),
        describe_point(bitstack.as_ref())
    );
    if let Some(l) = out.report.llama.as_mut() {
        l.rows.push(LlamaRow {
            file: f,
            ppl,
            bitstack,
        });
    }
    out.report.write(&s.args.out_dir)
}

/// The "w/o absolute value decomposition" ablation: every linear decomposed by the plain
/// iterative SVD at the main stack's calibration, levels and per-weight `k' =
/// same_size_rank(m, n, k)`, ordered as the main stack (proxy: the level's share of the
/// scaled weight's energy, the plain-SVD counterpart of [`bitstack_sort::sort_proxy`] with
/// [`bitstack_sort::ActivationStats::FromScale`]), charged like BitStack (resident tensors +
/// f32 scale vectors + `2·k'·(m+n)` bytes per level) and evaluated on the restored weights.
fn eval_plain_svd_ablation(
    s: &Session<'_>,
    base: &CompressParams,
    budgets: &[(String, u64)],
    out: &mut Outcome,
) -> Res<()> {
    let t = Instant::now();
    let plain = PlainSvd::decompose(s, base)?;
    out.phase(format!("{} decompose", plain.name), t);
    let n = plain.decs.len();
    let mut cache: BTreeMap<usize, StackPoint> = BTreeMap::new();
    for (cfg, budget) in budgets {
        let Some(prefix) = largest_prefix_within(&plain.cumulative, n, *budget)? else {
            out.report.ablations.push(AblationPoint {
                variant: plain.name.clone(),
                config: cfg.clone(),
                budget: *budget,
                point: None,
                note: Some(format!(
                    "below this variant's minimum {:.1} MB",
                    mb(plain.cumulative[n])
                )),
            });
            continue;
        };
        let point = match cache.get(&prefix) {
            Some(p) => p.clone(),
            None => {
                let t = Instant::now();
                let p = plain.point_at(s, prefix)?;
                out.phase(format!("{} at {cfg}", plain.name), t);
                cache.insert(prefix, p.clone());
                p
            }
        };
        crate::noteln!(
            "{} at {cfg}: {:.2} MB ppl {:.3}",
            plain.name,
            mb(point.held),
            point.ppl.ppl
        );
        out.report.ablations.push(AblationPoint {
            variant: plain.name.clone(),
            config: cfg.clone(),
            budget: *budget,
            point: Some(point),
            note: None,
        });
    }
    out.report.ablation_notes.push(format!(
        "w/o absolute value decomposition: plain iterative SVD of the scaled weight with k' = k + round(mn/(16(m+n))) per level (f16 factors, residual against the stored factors), {} levels, the main stack's calibration and order rule; memory = resident tensors + f32 scale vectors + 2·k'·(m+n) bytes per level (minimum, one level per weight: {:.1} MB); perplexity of the restored dense weights",
        base.iavd.levels,
        mb(plain.cumulative[n])
    ));
    Ok(())
}

/// The plain-SVD model of the "w/o AVD" ablation: every linear's levels, their order and the
/// bytes held after each prefix of it.
struct PlainSvd {
    name: String,
    decs: Vec<bitstack_linalg::PlainDecomposition>,
    scales: Option<Vec<Vec<f32>>>,
    order: bitstack_core::UniversalOrder,
    /// Bytes held by each prefix of `order` (index: the prefix length).
    cumulative: Vec<u64>,
}

impl PlainSvd {
    /// Calibrates as `base`, decomposes every linear by the plain iterative SVD, orders the
    /// levels and charges each prefix.
    fn decompose(s: &Session<'_>, base: &CompressParams) -> Res<Self> {
        use bitstack_linalg::{decompose_plain_slice, same_size_rank, IavdParams};
        let name = "BitStack w/o AVD (plain SVD, same bits)".to_owned();
        let c = s.source.config();
        let calib_tokens = s.source.tokenizer()?.encode(s.calib_text, false)?;
        let scales = crate::compress::calibrate_scales(s.source, &calib_tokens, base)?;
        let n = c.n_layers * LinearKind::ALL.len();
        let mut decs = Vec::with_capacity(n);
        let mut progress = Progress::new("w/o AVD: plain SVD of every linear", n);
        for w in 0..n {
            let (layer, kind) = weight_of_index(w);
            let (rows, cols) = kind.shape(c);
            let tensor = kind.tensor_name(layer);
            let (_, data) = s.source.tensor_f32(&tensor)?;
            let p = IavdParams {
                rank: same_size_rank(rows, cols, base.rank.rank_for(rows, cols)),
                ..base.iavd
            };
            let scale = scales.as_ref().map(|s| s[w].as_slice());
            decs.push(
                decompose_plain_slice(&data, rows, cols, scale, &p).map_err(|source| {
                    CompareError::Decompose {
                        tensor: tensor.clone(),
                        source,
                    }
                })?,
            );
            progress.update(w + 1);
        }
        let order = plain_svd_order(&decs, base)?;
        let fixed = s.loaded.elastic.layout().resident_bytes
            + scales
                .as_ref()
                .map_or(0, |s| s.iter().map(|v| 4 * v.len() as u64).sum());
        let mut cumulative = vec![fixed];
        for id in order.as_slice() {
            let last = *cumulative.last().unwrap_or(&fixed);
            cumulative.push(last + decs[id.weight as usize].level_bytes());
        }
        Ok(Self {
            name,
            decs,
            scales,
            order,
            cumulative,
        })
    }

    /// The point at the first `prefix` levels of the order: the restored dense weights scored.
    fn point_at(&self, s: &Session<'_>, prefix: usize) -> Res<StackPoint> {
        let mut counts = vec![0usize; self.decs.len()];
        for id in &self.order.as_slice()[..prefix] {
            // A prefix of a level-major order: counts are levels.
            counts[id.weight as usize] += 1;
        }
        let ops = self
            .decs
            .iter()
            .zip(&counts)
            .enumerate()
            .map(|(w, (d, &count))| -> Res<Box<dyn LinearOp>> {
                let mut dense = vec![0f32; d.rows * d.cols];
                let scale = self.scales.as_ref().map(|s| s[w].as_slice());
                d.restore_into(count, scale, &mut dense)?;
                Ok(Box::new(bitstack_core::DenseLinear::new(
                    d.rows, d.cols, dense,
                )?))
            })
            .collect::<Res<Vec<_>>>()?;
        let table = layer_table(ops, s.n_layers, "7 restored linears per layer");
        let ppl = model_perplexity(
            &s.loaded.resident,
            &table,
            s.tokens,
            &s.ablation_params,
            format!(
                "{} ({:.2} MB, {prefix} levels)",
                self.name,
                mb(self.cumulative[prefix])
            ),
        )?;
        Ok(StackPoint {
            prefix,
            held: self.cumulative[prefix],
            ppl,
        })
    }
}

/// The order of the plain-SVD levels for the main stack's order method: proxy by each level's
/// share of the scaled weight's energy, random as the main stack's seed, round robin for the
/// rest (the evaluated orders score residual blocks, which the sign-free levels are not).
fn plain_svd_order(
    decs: &[bitstack_linalg::PlainDecomposition],
    base: &CompressParams,
) -> Res<bitstack_core::UniversalOrder> {
    use bitstack_sort::SortMethod;
    let levels: Vec<u16> = decs.iter().map(|d| d.levels.len() as u16).collect();
    Ok(match base.order {
        SortMethod::Proxy => {
            let scores: Vec<Vec<Option<f64>>> = decs
                .iter()
                .map(|d| {
                    let mut prev = 1.0f64;
                    d.relative_errors
                        .iter()
                        .enumerate()
                        .map(|(l, e)| {
                            let gain = prev * prev - e * e;
                            prev = *e;
                            (l > 0).then_some(-gain)
                        })
                        .collect()
                })
                .collect();
            bitstack_sort::level_major_order(&levels, &scores)?
        }
        // The evaluated orders score residual blocks, which the sign-free levels are not; they
        // fall back to round robin.
        SortMethod::RoundRobin
        | SortMethod::ProxySensitive
        | SortMethod::FirstOrder
        | SortMethod::Average
        | SortMethod::Greedy
        | SortMethod::Import => bitstack_core::UniversalOrder::round_robin(levels.clone())?,
        SortMethod::Random => bitstack_sort::sort_random(&levels, base.order_settings.seed)?,
    })
}

/// The ablations: the main stack, the plain-SVD variant and stacks compressed afresh with
/// one setting changed, each at the ablation budgets.
fn run_ablations(s: &Session<'_>, cfgs: &[QuantConfig], out: &mut Outcome) -> Res<()> {
    let args = s.args;
    let budgets = ablation_budgets(s, cfgs)?;
    let main = MainSettings::of(&s.stack.compression);
    out.report.ablation_notes.push(format!(
        "ablation stacks are compressed with the main stack's k and order and the default calibration ({} calibration windows of {} tokens, 16 levels), changing only the ablated setting; the main stack's settings: {}",
        CompressParams::default().calib_windows,
        CompressParams::default().calib_seq_len,
        s.stack.compression
    ));
    // The main stack at the ablation budgets (same windows as the ablations).
    let main_name = format!(
        "BitStack k={} (main stack)",
        main.rank.map_or("?".into(), |k| k.to_string())
    );
    let mut main_cache = BTreeMap::new();
    for (cfg, b) in &budgets {
        let point = eval_stack_within(
            s.loaded,
            *b,
            s.tokens,
            &s.ablation_params,
            &main_name,
            &mut main_cache,
        )?;
        out.report.ablations.push(AblationPoint {
            variant: main_name.clone(),
            config: cfg.clone(),
            budget: *b,
            note: point.is_none().then(|| "below minimum".into()),
            point,
        });
        out.report.write(&args.out_dir)?;
    }
    if args.ablation_variants.contains(&AblationKind::NoAvd) {
        eval_plain_svd_ablation(s, &main.base, &budgets, out)?;
        out.report.write(&args.out_dir)?;
    }
    for (name, p) in ablation_variants(args, &main) {
        run_variant(s, &name, &p, &budgets, out)?;
    }
    Ok(())
}

/// The ablation budgets: the memory of the first method (RTN by default) at the grouped
/// configurations, from the storage format (identical to the measured bytes, checked in the
/// baseline rows), then `--ablation-budgets`.
fn ablation_budgets(s: &Session<'_>, cfgs: &[QuantConfig]) -> Res<Vec<(String, u64)>> {
    let method = s.args.methods.first().copied().unwrap_or(Baseline::Rtn);
    let mut budgets: Vec<(String, u64)> = cfgs
        .iter()
        .filter(|q| matches!(q.grouping, Grouping::Groups(_)))
        .map(|q| {
            Ok((
                format!("{} {}", method.name(), q.label()),
                baseline_model_bytes(&s.shapes, q, method, s.resident_bytes)?,
            ))
        })
        .collect::<Res<_>>()?;
    budgets.extend(
        s.args
            .ablation_budgets
            .iter()
            .map(|b| (format!("{:.1} MB", b.mb()), b.bytes())),
    );
    Ok(budgets)
}

/// The main stack's settings the ablations keep, from its compression record.
struct MainSettings {
    /// Its k, when fixed.
    rank: Option<u64>,
    /// Whether it was compressed with activation scaling (`None`: not recorded).
    scaled: Option<bool>,
    /// The compression settings of an ablation stack before its one change: the main
    /// stack's k (when fixed) and order, the default calibration.
    base: CompressParams,
}

impl MainSettings {
    /// Reads them from `compression`. Files store the order as its display text
    /// (`first-order (…)`); older ones as Debug text.
    fn of(compression: &Value) -> Self {
        use bitstack_sort::SortMethod;
        let rank = compression.get("rank").and_then(Value::as_u64);
        let scaled = compression
            .get("activation_scaling")
            .and_then(Value::as_bool);
        let order = match compression.get("order").and_then(Value::as_str) {
            Some("Proxy" | "proxy") => SortMethod::Proxy,
            Some(o) if o.starts_with("ProxySensitive") || o.starts_with("proxy-sensitive") => {
                SortMethod::ProxySensitive
            }
            Some(o) if o.starts_with("FirstOrder") || o.starts_with("first-order") => {
                SortMethod::FirstOrder
            }
            Some(o) if o.starts_with("Random") || o.starts_with("random") => SortMethod::Random,
            _ => SortMethod::RoundRobin,
        };
        let base = CompressParams {
            rank: rank.map_or(CompressParams::default().rank, |k| {
                crate::compress::RankRule::Fixed(k as usize)
            }),
            order,
            order_settings: crate::compress::OrderSettings::for_method(order),
            ..Default::default()
        };
        Self { rank, scaled, base }
    }
}

/// The ablation stacks to compress: without scaling (when the main stack scales) and each
/// `--ablation-ranks` k other than the main stack's, as `--ablation-variants` asks.
fn ablation_variants(args: &CompareOptions, main: &MainSettings) -> Vec<(String, CompressParams)> {
    let mut variants: Vec<(String, CompressParams)> = Vec::new();
    if main.scaled != Some(false) && args.ablation_variants.contains(&AblationKind::NoScaling) {
        variants.push((
            "BitStack w/o scaling".into(),
            CompressParams {
                scale: None,
                ..main.base.clone()
            },
        ));
    }
    let ranks: &[usize] = if args.ablation_variants.contains(&AblationKind::Ranks) {
        &args.ablation_ranks
    } else {
        &[]
    };
    for &k in ranks {
        if Some(k as u64) == main.rank {
            continue;
        }
        let p = CompressParams {
            rank: crate::compress::RankRule::Fixed(k),
            ..main.base.clone()
        };
        variants.push((format!("BitStack k={k}"), p));
    }
    variants
}

/// One ablation stack: compressed with `p` into OUT_DIR, evaluated at every budget, deleted.
fn run_variant(
    s: &Session<'_>,
    name: &str,
    p: &CompressParams,
    budgets: &[(String, u64)],
    out: &mut Outcome,
) -> Res<()> {
    let t = Instant::now();
    crate::noteln!("ablation {name}: compressing");
    let compressed = compress(s.source, s.calib_text, p)?;
    let path = s.args.out_dir.join(format!(
        "ablation-{}.bitstack",
        name.replace(|ch: char| !ch.is_ascii_alphanumeric(), "-")
    ));
    write_compressed(&compressed, &path)?;
    drop(compressed);
    out.phase(format!("{name} compress"), t);
    let result = eval_variant(s, name, &path, budgets, out);
    let _ = std::fs::remove_file(&path);
    result
}

/// The ablation stack at `path` evaluated at every budget; the report is rewritten after
/// each point.
fn eval_variant(
    s: &Session<'_>,
    name: &str,
    path: &Path,
    budgets: &[(String, u64)],
    out: &mut Outcome,
) -> Res<()> {
    let ab = LoadedStack::open(path, None)?;
    let mut cache = BTreeMap::new();
    for (cfg, b) in budgets {
        let t = Instant::now();
        let point = eval_stack_within(&ab, *b, s.tokens, &s.ablation_params, name, &mut cache)?;
        out.phase(format!("{name} at {cfg}"), t);
        out.report.ablations.push(AblationPoint {
            variant: name.to_owned(),
            config: cfg.clone(),
            budget: *b,
            note: point.is_none().then(|| {
                format!(
                    "below this stack's minimum {:.1} MB",
                    mb(ab.elastic.minimum_bytes())
                )
            }),
            point,
        });
        out.report.write(&s.args.out_dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::baselines::rtn;

    fn weight(rows: usize, cols: usize, seed: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| (((i * 37 + seed * 11) % 101) as f32 - 50.0) / 50.0)
            .collect()
    }

    #[test]
    fn baseline_memory_is_packed_codes_scales_zeros_and_residents() {
        // A 3-linear "model" whose column counts exercise padding (20 columns of 3 bits do not
        // fill whole words) and a short last group (20 = 8 + 8 + 4).
        let shapes = [(4usize, 20usize), (6, 8), (3, 33)];
        let resident = 1000u64;
        for bits in [2u8, 3, 4] {
            for grouping in [Grouping::PerChannel, Grouping::Groups(8)] {
                let quant = QuantConfig { bits, grouping };
                let mut by_hand = resident;
                let mut measured = resident;
                for (i, &(r, cc)) in shapes.iter().enumerate() {
                    let words = (cc * bits as usize).div_ceil(32);
                    let groups = match grouping {
                        Grouping::PerChannel => 1,
                        Grouping::Groups(g) => cc.div_ceil(g),
                    };
                    by_hand += (r * words * 4 + r * groups * 2 * 2) as u64;
                    let w = weight(r, cc, i);
                    let q = rtn(WeightView::new(&w, r, cc).unwrap(), &quant).unwrap();
                    assert_eq!(
                        q.bytes(),
                        quant_bytes(r, cc, &quant, false).unwrap(),
                        "{bits} bits {grouping:?} {r}x{cc}"
                    );
                    measured += q.weight_bytes();
                }
                let predicted = baseline_model_bytes(&shapes, &quant, Baseline::Rtn, resident);
                assert_eq!(predicted.unwrap(), by_hand);
                assert_eq!(measured, by_hand);
                // AWQ adds one f16 per input column.
                let awq = baseline_model_bytes(&shapes, &quant, Baseline::Awq, resident).unwrap();
                assert_eq!(awq, by_hand + 2 * (20 + 8 + 33));
            }
        }
        // 3-bit per-channel on 32 columns: exactly 3 words per row, one scale and zero.
        let q = quant_bytes(
            8,
            32,
            &QuantConfig {
                bits: 3,
                grouping: Grouping::PerChannel,
            },
            false,
        )
        .unwrap();
        assert_eq!(q.total(), 8 * (3 * 4 + 2 + 2));
    }

    #[test]
    fn awq_bytes_match_the_storage_format() {
        let (r, cc) = (6, 40);
        let w = weight(r, cc, 3);
        let x: Vec<f32> = (0..64 * cc)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
            .collect();
        let mut stats = HessianAccumulator::new(cc).unwrap();
        stats.observe(&x).unwrap();
        let quant = QuantConfig {
            bits: 3,
            grouping: Grouping::Groups(16),
        };
        for m in Baseline::ALL {
            let q = m
                .quantize(WeightView::new(&w, r, cc).unwrap(), Some(&stats), quant)
                .unwrap();
            assert_eq!(
                q.bytes(),
                quant_bytes(r, cc, &quant, m == Baseline::Awq).unwrap(),
                "{m:?}"
            );
        }
    }

    fn ppl(v: f64, windows: usize) -> Perplexity {
        Perplexity {
            ppl: v,
            mean_nll: v.ln(),
            tokens_scored: windows * 127,
            windows,
            windows_available: 10,
            seq_len: 128,
            seconds: 1.0,
        }
    }

    fn llama_row(q: GgufQuant, bytes: u64, p: f64, bitstack: Option<(u64, f64)>) -> LlamaRow {
        LlamaRow {
            file: QuantizedFile {
                quant: q,
                path: PathBuf::from(format!("/c/m.{q}.gguf")),
                bytes,
                reused: false,
                seconds: 0.5,
            },
            ppl: LlamaPerplexity {
                ppl: p,
                plus_minus: 0.1,
                chunks: Some(4),
                n_ctx: Some(128),
                running: vec![p],
                seconds: 2.0,
            },
            bitstack: bitstack.map(|(held, v)| StackPoint {
                prefix: 7,
                held,
                ppl: ppl(v, 4),
            }),
        }
    }

    fn report_with_llama(selection: WindowSelection) -> Report {
        Report {
            header: Header {
                model: "m.gguf".into(),
                stack: "m.bitstack".into(),
                stack_compression: Value::Null,
                text: "t.txt".into(),
                text_tokens: 1280,
                seq_len: 128,
                max_windows: Some(4),
                window_selection: selection,
                ablation_windows: Some(4),
                calib: "c.txt".into(),
                calib_windows: 2,
                calib_seq_len: 64,
                calibration_note: "",
                resident_bytes: 1000,
                resident_precision: "q4".into(),
                memory_note: String::new(),
                original_note: "",
                bitstack_minimum_bytes: 30_000_000,
                bitstack_full_bytes: 300_000_000,
                original_f16_bytes: 270_000_000,
                phases_seconds: None,
            },
            original: Some((270_000_000, ppl(20.0, 4))),
            rows: vec![],
            extra_stack_points: BTreeMap::new(),
            ablations: vec![],
            ablation_notes: vec![],
            llama: Some(LlamaRows {
                dir: PathBuf::from("/llama/bin"),
                threads: 2,
                chunks: Some(4),
                f32: Some(llama_row(GgufQuant::F32, 540_000_000, 16.0, None)),
                rows: vec![
                    // llama.cpp 1.5x its F32, BitStack 1.25x our original: BitStack lower.
                    llama_row(GgufQuant::Q2K, 80_000_000, 24.0, Some((79_900_000, 25.0))),
                    // llama.cpp 1.0625x, BitStack 1.1x: llama.cpp lower.
                    llama_row(
                        GgufQuant::Q4KM,
                        105_000_000,
                        17.0,
                        Some((104_000_000, 22.0)),
                    ),
                    // Below the stack's minimum.
                    llama_row(GgufQuant::Q3KM, 20_000_000, 30.0, None),
                ],
            }),
        }
    }

    #[test]
    fn llama_rows_report_ratios_to_each_engines_own_reference() {
        let r = report_with_llama(WindowSelection::First);
        let json = serde_json::to_value(r.json()).unwrap();
        let rows = json["llama_cpp"]["rows"].as_array().unwrap();
        let close = |v: &Value, x: f64| (v.as_f64().unwrap() - x).abs() < 1e-12;
        assert!(close(&rows[0]["ratio_to_llama_f32"], 1.5));
        assert!(close(&rows[0]["bitstack_ratio_to_original"], 1.25));
        assert_eq!(rows[0]["file_bytes"], 80_000_000);
        assert_eq!(rows[0]["quant"], "Q2_K");
        assert_eq!(rows[0]["bitstack"]["memory_bytes"], 79_900_000);
        assert!(close(&rows[1]["ratio_to_llama_f32"], 17.0 / 16.0));
        assert!(close(&rows[1]["bitstack_ratio_to_original"], 1.1));
        assert!(rows[2]["bitstack"].is_null());
        assert!(rows[2]["bitstack_ratio_to_original"].is_null());
        assert_eq!(json["llama_cpp"]["f32"]["file_bytes"], 540_000_000);
        assert_eq!(json["llama_cpp"]["window_selection"], "first");
        assert_eq!(json["resident_precision"], "q4");
        let md = r.markdown();
        let line = |q: &str| {
            md.lines()
                .find(|l| l.starts_with(&format!("| {q} ")))
                .unwrap_or_else(|| panic!("no {q} row in\n{md}"))
                .to_owned()
        };
        let q2 = line("Q2_K");
        assert!(
            q2.contains("| 80.0 |") && q2.contains("| 1.500 |") && q2.contains("| 1.250 |"),
            "{q2}"
        );
        assert!(q2.trim_end().ends_with("| BitStack |"), "{q2}");
        let q4 = line("Q4_K_M");
        assert!(q4.contains("| 1.062 |") && q4.contains("| 1.100 |"), "{q4}");
        assert!(q4.trim_end().ends_with("| llama.cpp |"), "{q4}");
        assert!(line("Q3_K_M").contains("below minimum"));
        assert!(line("F32").contains("| 1.000 |"));
        assert!(md.contains("GGUF file's size in bytes"), "{md}");
        assert!(md.contains("--windows first"), "{md}");
        // Spread windows are flagged as scoring other text than llama.cpp.
        let md = report_with_llama(WindowSelection::EvenlySpaced).markdown();
        assert!(md.contains("score different text"), "{md}");
        // The plot carries the llama.cpp series on our scale (ratio x our original).
        let svg = r.svg().unwrap();
        assert!(svg.contains("llama.cpp GGUF"), "no llama.cpp series");
    }

    #[test]
    fn llama_flags_are_checked_before_any_work() {
        let dir = std::env::temp_dir().join(format!("bitstack-cmp-llama-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("m.gguf");
        std::fs::write(&model, b"GGUF\x03\x00\x00\x00").unwrap();
        let base = CompareOptions {
            model: model.clone(),
            calib: model.clone(),
            text: model.clone(),
            stack: Some(model.clone()),
            out_dir: dir.join("out"),
            llama_cpp: Some(dir.join("nothing")),
            ..Default::default()
        };
        let e = check_args(&base).unwrap_err().to_string();
        assert!(
            e.contains(
                &dir.join("nothing")
                    .join("llama-quantize")
                    .display()
                    .to_string()
            ),
            "{e}"
        );
        let e = check_args(&CompareOptions {
            skip_original: true,
            ..base.clone()
        })
        .unwrap_err();
        assert!(matches!(e, CompareError::Usage(_)), "{e}");
        let e = check_args(&CompareOptions {
            llama_quants: vec![GgufQuant::F32],
            ..base.clone()
        })
        .unwrap_err();
        assert!(e.to_string().contains("F32 is always made"), "{e}");
        assert!(!dir.join("out/llama-cpp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn configs_follow_the_table_order() {
        let labels: Vec<String> = configs(&[2, 3, 4], 128).iter().map(|q| q.label()).collect();
        assert_eq!(
            labels,
            ["w2", "w2g128", "w3", "w3g128", "w4", "w4g128"].map(String::from)
        );
        assert_eq!(parse_baseline("GPTQ"), Ok(Baseline::Gptq));
        assert!(parse_baseline("svd").is_err());
    }
}
