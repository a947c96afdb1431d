//! `bitstack compare`: the paper's Table 1 (RTN / GPTQ / AWQ against BitStack at equal memory);
//! the flags of [`bitstack_examples::compare::run`].

use crate::common::{window_selections, Res};
use bitstack_core::MemoryBudget;
use bitstack_examples::baselines::Baseline;
use bitstack_examples::compare::{parse_baseline, AblationKind, CompareError, CompareOptions};
use bitstack_examples::llama::EmbeddingPrecision;
use bitstack_examples::llama_cpp::GgufQuant;
use bitstack_examples::outln;
use bitstack_examples::output::UsageError;
use bitstack_examples::perplexity::WindowSelection;
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::Args;
use std::path::PathBuf;

/// Arguments of `bitstack compare`.
#[derive(Args, Debug, Clone)]
pub(crate) struct CompareArgs {
    /// The original model (`.gguf` file or Hugging Face directory).
    model: PathBuf,
    /// Calibration text for GPTQ / AWQ (and for compressing when --stack is not given).
    #[arg(long)]
    calib: PathBuf,
    /// Evaluation text.
    #[arg(long)]
    text: PathBuf,
    /// A stack file of the same model; without it one is compressed (default settings) into
    /// OUT_DIR/stack.bitstack, or reused from there.
    #[arg(long)]
    stack: Option<PathBuf>,
    /// Folder for compare.json, compare.md and compare.svg.
    #[arg(long, default_value = ".cache/compare")]
    out_dir: PathBuf,
    /// Evaluation windows of --seq-len tokens (0: all; which ones: --windows).
    #[arg(long, default_value_t = 8)]
    max_windows: usize,
    /// Which windows --max-windows picks: spread evenly over the text (the default, which
    /// the README's numbers use) or the first ones (what the paper and llama.cpp report).
    #[arg(long, default_value_t = WindowSelection::EvenlySpaced, value_parser = window_selections())]
    windows: WindowSelection,
    /// Evaluation window length.
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Calibration windows for GPTQ / AWQ.
    #[arg(long, default_value_t = 32)]
    calib_windows: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    calib_seq_len: usize,
    /// Bit widths of the baselines.
    #[arg(long, value_delimiter = ',', default_value = "2,3,4")]
    bits: Vec<u8>,
    /// Group size of the grouped configurations (`wNg128`).
    #[arg(long, default_value_t = 128)]
    group_size: usize,
    /// Baselines: rtn, gptq, gptq-act, awq; `none` for no baseline rows (e.g. only the
    /// llama.cpp rows).
    #[arg(long, value_delimiter = ',', default_value = "rtn,gptq,awq", value_parser = parse_method)]
    methods: Vec<Option<Baseline>>,
    /// Skip the original model's row.
    #[arg(long)]
    skip_original: bool,
    /// Also evaluate BitStack without activation scaling and with k in --ablation-ranks
    /// (each compressed afresh into OUT_DIR and deleted afterwards), at the memory of the
    /// first method's grouped configurations.
    #[arg(long)]
    ablations: bool,
    /// Only the ablations (no baseline rows); their budgets are then those of RTN
    /// `wNg128` computed analytically.
    #[arg(long)]
    ablations_only: bool,
    /// Ranks k of the k ablation (16, the main stack's usual k, is reused from --stack).
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,32")]
    ablation_ranks: Vec<usize>,
    /// Evaluation windows for the ablations (default: --max-windows).
    #[arg(long)]
    ablation_windows: Option<usize>,
    /// Extra budgets for the ablations, beyond the baselines' grouped memories (e.g. `250MB`).
    #[arg(long, value_delimiter = ',')]
    ablation_budgets: Vec<MemoryBudget>,
    /// Which ablations to run.
    #[arg(long, value_delimiter = ',', default_value = "no-scaling,no-avd,ranks", value_parser = ablation_kinds())]
    ablation_variants: Vec<AblationKind>,
    /// Precision the baselines and BitStack hold the token embedding (and an untied head) in,
    /// as `eval --resident`: q8 (the default, as eval's), f16 (as stored), q4 or f32; the
    /// bytes saved buy BitStack more blocks at the same memory. The original row keeps f16.
    #[arg(long, default_value_t = EmbeddingPrecision::default())]
    resident: EmbeddingPrecision,
    /// Folder of a llama.cpp build holding llama-quantize and llama-perplexity (e.g.
    /// ~/.cache/bitstack-llama/build-11434.0.0/bin): adds llama.cpp rows. An F32 GGUF of the
    /// original (GGUF input only) and --llama-quants made from it are cached in
    /// OUT_DIR/llama-cpp, scored with llama-perplexity -c SEQ_LEN --chunks MAX_WINDOWS, and
    /// BitStack is evaluated at each file's size in bytes.
    #[arg(long)]
    llama_cpp: Option<PathBuf>,
    /// llama.cpp types of the llama.cpp rows (F32 is always made, as their reference).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "Q2_K,Q3_K_M,Q4_K_M,Q5_K_M,Q8_0"
    )]
    llama_quants: Vec<GgufQuant>,
    /// Threads llama.cpp's tools run with.
    #[arg(long, default_value_t = 2)]
    llama_threads: usize,
}

/// `--methods`' parser: a baseline, or `none`.
fn parse_method(s: &str) -> Result<Option<Baseline>, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    parse_baseline(s).map(Some)
}

/// `--ablation-variants`' parser: the kinds' names, each with its help line.
fn ablation_kinds() -> impl TypedValueParser<Value = AblationKind> {
    PossibleValuesParser::new(
        AblationKind::ALL.map(|k| PossibleValue::new(k.name()).help(k.help())),
    )
    .try_map(|s| s.parse::<AblationKind>())
}

impl CompareArgs {
    fn options(&self) -> CompareOptions {
        CompareOptions {
            model: self.model.clone(),
            calib: self.calib.clone(),
            text: self.text.clone(),
            stack: self.stack.clone(),
            out_dir: self.out_dir.clone(),
            max_windows: self.max_windows,
            windows: self.windows,
            seq_len: self.seq_len,
            calib_windows: self.calib_windows,
            calib_seq_len: self.calib_seq_len,
            bits: self.bits.clone(),
            group_size: self.group_size,
            methods: self.methods.iter().flatten().copied().collect(),
            skip_original: self.skip_original,
            ablations: self.ablations,
            ablations_only: self.ablations_only,
            ablation_ranks: self.ablation_ranks.clone(),
            ablation_windows: self.ablation_windows,
            ablation_budgets: self.ablation_budgets.clone(),
            ablation_variants: self.ablation_variants.clone(),
            resident: self.resident,
            llama_cpp: self.llama_cpp.clone(),
            llama_quants: self.llama_quants.clone(),
            llama_threads: self.llama_threads,
        }
    }
}

/// `bitstack compare`: runs the comparison, prints the markdown table and where the files
/// went. Usage and output-path errors keep their own types, for exit status 2.
pub(crate) fn run(a: &CompareArgs) -> Res<()> {
    let md = bitstack_examples::compare::run(&a.options()).map_err(|e| match e {
        CompareError::Usage(u) => Box::new(u) as Box<dyn std::error::Error>,
        CompareError::Output(o) => Box::new(o),
        CompareError::LlamaCpp(l) if l.is_usage() => Box::new(UsageError(l.to_string())),
        e => Box::new(e),
    })?;
    outln!("{md}")?;
    outln!(
        "wrote {}/compare.json, compare.md, compare.svg",
        a.out_dir.display()
    )?;
    Ok(())
}
