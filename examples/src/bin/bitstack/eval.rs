//! `bitstack eval`: perplexity at several budgets by resizing one loaded model, or of an
//! original model.

use crate::common::{
    is_stack_file, mb, mib, named, open_loaded, open_source, read_text, usage, window_selections,
    Res,
};
use bitstack_core::runtime::trim_allocator;
use bitstack_core::MemoryBudget;
use bitstack_examples::llama::{EmbeddingPrecision, LinearTable, Llama, LlamaResident};
use bitstack_examples::memstat::{self, fmt_bytes};
use bitstack_examples::output::check_output;
use bitstack_examples::perplexity::{perplexity, Perplexity, PerplexityParams, WindowSelection};
use bitstack_examples::report::{markdown_table, svg_plot, Series};
use bitstack_examples::stackmodel::SnapshotLinears;
use bitstack_examples::{noteln, outln};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;

/// `bitstack eval`; `matches` are the subcommand's matches, for the flags given explicitly.
pub(crate) fn run(a: &EvalArgs, matches: &clap::ArgMatches) -> Res<()> {
    // The flags given on the command line (not defaulted), for the original-model check.
    let explicit: Vec<String> = matches
        .ids()
        .filter(|id| {
            matches.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
        })
        .map(|id| id.as_str().replace('_', "-"))
        .collect();
    let explicit: Vec<&str> = explicit.iter().map(String::as_str).collect();
    let stack = is_stack_file(&a.file);
    check_eval_flags(a, stack, &explicit)?;
    if stack {
        eval_stack(a).map(|_| ())
    } else {
        eval_original(a).map(|_| ())
    }
}

/// The most budgets one `eval` evaluates (`--budgets`, `--sweep`, `--points`).
const MAX_BUDGETS: u64 = 1000;

#[derive(Args, Debug, Clone)]
pub(crate) struct EvalArgs {
    /// A stack file, or an original model (`.gguf` / Hugging Face directory).
    pub(crate) file: PathBuf,
    /// The evaluation text.
    #[arg(long)]
    pub(crate) text: PathBuf,
    /// Comma-separated budgets (`90MB,120MiB,150000000`).
    #[arg(long, value_delimiter = ',')]
    pub(crate) budgets: Vec<MemoryBudget>,
    /// `MIN:MAX:STEP` budgets (e.g. `100MB:120MB:2MB`).
    #[arg(long)]
    pub(crate) sweep: Option<String>,
    /// Without --budgets/--sweep: this many budgets evenly from the minimum to the full model.
    #[arg(long, default_value_t = 10)]
    pub(crate) points: usize,
    /// Window length in tokens.
    #[arg(long, default_value_t = 2048)]
    pub(crate) seq_len: usize,
    /// Evaluate at most this many windows (which ones: --windows).
    #[arg(long)]
    pub(crate) max_windows: Option<usize>,
    /// Which windows --max-windows picks: spread evenly over the text (the default, which
    /// the README's numbers use) or the first ones (what the paper and llama.cpp report).
    #[arg(long, default_value_t = WindowSelection::EvenlySpaced, value_parser = window_selections())]
    pub(crate) windows: WindowSelection,
    /// Write the results as JSON here.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Write an SVG plot of perplexity against memory here.
    #[arg(long)]
    pub(crate) plot: Option<PathBuf>,
    /// Original model's perplexity, drawn as a line on the plot.
    #[arg(long)]
    pub(crate) original_ppl: Option<f64>,
    /// Precision the token embedding (and an untied head) is held in: q8 (the default: int8
    /// with an f16 scale per 32 values, 47 % fewer bytes than the stored f16, which the budget
    /// then spends on more blocks), f16 (as stored), q4 (4-bit codes with an f16 scale per 32
    /// values, 72 % fewer bytes) or f32.
    #[arg(long, default_value_t = EmbeddingPrecision::default())]
    pub(crate) resident: EmbeddingPrecision,
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

/// The perplexity parameters of `eval`'s flags.
pub(crate) fn ppl_params(args: &EvalArgs) -> PerplexityParams {
    PerplexityParams {
        seq_len: args.seq_len,
        max_windows: args.max_windows,
        selection: args.windows,
        ..Default::default()
    }
}

/// `eval --json`: the run's settings and one entry per budget.
#[derive(Serialize)]
struct EvalDoc {
    file: String,
    text: String,
    text_tokens: usize,
    seq_len: usize,
    max_windows: Option<usize>,
    window_selection: WindowSelection,
    minimum_bytes: u64,
    full_bytes: u64,
    original_f16_bytes: u64,
    process_rss_before_load_bytes: Option<u64>,
    rows: Vec<EvalRowDoc>,
}

/// One budget of [`EvalDoc`].
#[derive(Serialize)]
struct EvalRowDoc {
    budget_bytes: Option<u64>,
    held_bytes: u64,
    blocks: usize,
    ppl: f64,
    mean_nll: f64,
    windows: usize,
    tokens_scored: usize,
    seconds: f64,
    peak_rss_bytes: Option<u64>,
    resize_ms: f64,
    bytes_moved: u64,
}

impl From<&EvalRow> for EvalRowDoc {
    fn from(r: &EvalRow) -> Self {
        Self {
            budget_bytes: r.budget,
            held_bytes: r.held,
            blocks: r.blocks,
            ppl: r.ppl.ppl,
            mean_nll: r.ppl.mean_nll,
            windows: r.ppl.windows,
            tokens_scored: r.ppl.tokens_scored,
            seconds: r.ppl.seconds,
            peak_rss_bytes: r.peak_rss,
            resize_ms: r.resize_ms,
            bytes_moved: r.bytes_moved,
        }
    }
}

/// One evaluated row.
#[derive(Clone, Debug)]
pub(crate) struct EvalRow {
    budget: Option<u64>,
    held: u64,
    blocks: usize,
    ppl: Perplexity,
    peak_rss: Option<u64>,
    resize_ms: f64,
    bytes_moved: u64,
}

pub(crate) fn eval_original(args: &EvalArgs) -> Res<f64> {
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
    let params = ppl_params(args);
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
                format!(
                    "{} of {} x {} ({})",
                    r.windows, r.windows_available, r.seq_len, args.windows
                ),
                format!("{:.0}", r.seconds),
            ]]
        )
    )?;
    Ok(r.ppl)
}

pub(crate) fn eval_stack(args: &EvalArgs) -> Res<Vec<EvalRow>> {
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
    let params = ppl_params(args);
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
        "windows: {} of {} x {} tokens per budget (--windows {})\n{}",
        params
            .max_windows
            .map_or("all".to_owned(), |w| w.to_string()),
        rows.first().map_or(0, |r| r.ppl.windows_available),
        args.seq_len,
        args.windows,
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
        let doc = EvalDoc {
            file: args.file.display().to_string(),
            text: args.text.display().to_string(),
            text_tokens: tokens.len(),
            seq_len: args.seq_len,
            max_windows: args.max_windows,
            window_selection: args.windows,
            minimum_bytes: min,
            full_bytes: full,
            original_f16_bytes: loaded.original_f16_bytes,
            process_rss_before_load_bytes: base_rss.rss,
            rows: rows.iter().map(EvalRowDoc::from).collect(),
        };
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
            "perplexity (log scale)",
            &series,
            &hlines,
        )?;
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
