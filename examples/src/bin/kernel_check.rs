//! What the int8-table decode kernels change, measured on a real stack file:
//!
//! 1. the relative error of `Ŵ X` against the f64 reference, for every weight at each budget,
//!    with `X` the real inputs of that linear (captured on a few tokens of `--text`), for the
//!    int8 tables and for the exact f32 tables;
//! 2. the perplexity of the same windows scored the way a decoder runs them (KV cache, `--chunk`
//!    tokens per step, so every linear runs on the small-batch fused kernels), with the int8
//!    tables and with the exact f32 tables.
//!
//! ```text
//! cargo run --release -p examples --bin kernel_check -- FILE.bitstack \
//!     --text ../shared/data/wikitext2-test.raw --budgets 90MB,105.5MB,145MB,200MB
//! ```
use bitstack_core::kernels::{fused_matmul_with, fused_scratch_len_with, matmul_reference};
use bitstack_core::kernels::{FusedParams, KernelIsa, TablePrecision};
use bitstack_core::{MemoryBudget, ResidualBlockRef};
use bitstack_examples::llama::{ActivationObserver, LinearKind, Llama};
use bitstack_examples::perplexity::cached_window_nll;
use bitstack_examples::report::exit_status;
use bitstack_examples::stackmodel::{weight_index, LoadedStack};
use clap::Parser;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Instant;

/// Measures the int8-table kernels against the exact path on a stack file.
#[derive(Parser, Debug)]
struct Args {
    /// The stack file.
    file: PathBuf,
    /// Text to score and to take activations from (e.g. ../shared/data/wikitext2-test.raw).
    #[arg(long)]
    text: PathBuf,
    /// Budgets, comma-separated (e.g. 90MB,145MB).
    #[arg(long, value_delimiter = ',', required = true)]
    budgets: Vec<MemoryBudget>,
    /// Windows to score (the first ones of the text).
    #[arg(long, default_value_t = 2)]
    windows: usize,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Tokens per cached forward step (1..=16 stays on the fused kernels).
    #[arg(long, default_value_t = 16)]
    chunk: usize,
    /// Tokens whose linear inputs are captured for the error measurement.
    #[arg(long, default_value_t = 8)]
    activation_tokens: usize,
    /// Tokens per step of the exact-table reference (default: `--chunk`). The exact path's
    /// perplexity does not depend on it beyond f32 rounding, so `--chunk 1` (the decode
    /// kernels' batch) can be checked against a faster `--exact-chunk 16` reference.
    #[arg(long)]
    exact_chunk: Option<usize>,
    /// Skip the exact-table perplexity (it takes minutes per budget at `--chunk 1`); the
    /// table then lists the fast path's perplexity only.
    #[arg(long)]
    no_exact: bool,
    /// Skip the (slow) f64 reference error measurement.
    #[arg(long)]
    no_error: bool,
    /// Table precision compared with the exact f32 tables (int16, mixed or int8).
    #[arg(long, default_value_t = TablePrecision::Int16)]
    kernel: TablePrecision,
}

/// Captures the input of every linear on one forward pass.
#[derive(Default)]
struct Capture(Mutex<HashMap<(usize, LinearKind), Vec<f32>>>);

impl ActivationObserver for Capture {
    fn observe(&self, layer: usize, kind: LinearKind, x: &[f32]) {
        if let Ok(mut m) = self.0.lock() {
            m.insert((layer, kind), x.to_vec());
        }
    }
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

fn main() -> ExitCode {
    exit_status("error", run(&Args::parse()))
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let chunk_ok = |c: usize| (1..=16).contains(&c);
    if !chunk_ok(args.chunk)
        || !args.exact_chunk.is_none_or(chunk_ok)
        || args.seq_len < 2
        || args.windows == 0
    {
        return Err(
            "--chunk and --exact-chunk must be 1..=16, --seq-len ≥ 2, --windows ≥ 1".into(),
        );
    }
    let mut loaded = LoadedStack::open(&args.file, None)?;
    let text =
        std::fs::read_to_string(&args.text).map_err(|e| format!("{}: {e}", args.text.display()))?;
    let tokens = loaded.tokenizer.encode(&text, false)?;
    let need = args.windows * args.seq_len;
    if tokens.len() < need.max(args.activation_tokens) {
        return Err(format!(
            "{}: {} tokens, need {need}",
            args.text.display(),
            tokens.len()
        )
        .into());
    }
    // The resolved ISA, not `Auto`: under `Auto` a kernel may hand batches it is slow at to
    // the restore path (`FusedParams::max_fused_batch`), and this tool measures the kernel.
    let fast = FusedParams {
        tables: args.kernel,
        isa: KernelIsa::Auto.resolve(),
    };
    let exact = FusedParams::exact();
    println!(
        "file: {}  int8 kernel: {}  windows: first {} × {} tokens, chunk {} (exact: {})",
        args.file.display(),
        KernelIsa::Auto.resolve().name(),
        args.windows,
        args.seq_len,
        args.chunk,
        args.exact_chunk.unwrap_or(args.chunk)
    );
    let mut ppl_rows = Vec::new();
    for &budget in &args.budgets {
        loaded.set_fused_params(fast);
        loaded.elastic.resize(budget)?;
        let held = loaded.elastic.snapshot().held_bytes();
        if !args.no_error {
            error_table(&loaded, &tokens[..args.activation_tokens], held)?;
        }
        let mut ppl = [0f64; 2];
        let mut secs = [0f64; 2];
        let exact_chunk = args.exact_chunk.unwrap_or(args.chunk);
        let runs = if args.no_exact { 1 } else { 2 };
        for (slot, (params, chunk)) in [(fast, args.chunk), (exact, exact_chunk)]
            .into_iter()
            .take(runs)
            .enumerate()
        {
            loaded.set_fused_params(params);
            let linears = loaded.linears();
            let model = Llama::new(&loaded.resident, &linears)?;
            let t = Instant::now();
            let mut sum = 0f64;
            for w in 0..args.windows {
                let win = &tokens[w * args.seq_len..(w + 1) * args.seq_len];
                sum += cached_window_nll(&model, win, chunk)?;
            }
            secs[slot] = t.elapsed().as_secs_f64();
            ppl[slot] = (sum / (args.windows * (args.seq_len - 1)) as f64).exp();
        }
        let exact_text = if args.no_exact {
            "not run (--no-exact)".to_owned()
        } else {
            format!("{:.4} ({:.0} s)", ppl[1], secs[1])
        };
        println!(
            "budget {:.1} MB: ppl {} {:.4} ({:.0} s), exact {exact_text}",
            held as f64 / 1e6,
            args.kernel,
            ppl[0],
            secs[0],
        );
        ppl_rows.push((held, ppl));
    }
    println!(
        "\n| held MB (10^6 B) | ppl, {} tables | ppl, exact f32 tables | change |",
        args.kernel
    );
    println!("| --- | --- | --- | --- |");
    for (held, p) in ppl_rows {
        let (exact, change) = if args.no_exact {
            ("-".to_owned(), "-".to_owned())
        } else {
            (
                format!("{:.4}", p[1]),
                format!("{:+.3} %", 100.0 * (p[0] / p[1] - 1.0)),
            )
        };
        println!(
            "| {:.1} | {:.4} | {exact} | {change} |",
            held as f64 / 1e6,
            p[0],
        );
    }
    Ok(())
}

/// Per linear kind: median and max relative error of `Ŵ X` against the f64 reference.
fn error_table(
    loaded: &LoadedStack,
    tokens: &[u32],
    held: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let snap = loaded.elastic.snapshot();
    let linears = loaded.linears();
    let model = Llama::new(&loaded.resident, &linears)?;
    let capture = Capture::default();
    let seqs = model.seq_batch(1, tokens.len())?;
    model.forward_hidden(tokens, &seqs, Some(&capture))?;
    let inputs = capture
        .0
        .into_inner()
        .map_err(|_| "capture lock poisoned")?;
    let t = Instant::now();
    let mut per_kind: Vec<(LinearKind, [Vec<f64>; 3])> = Vec::new();
    let n_layers = loaded.resident.config().n_layers;
    for kind in LinearKind::ALL {
        let mut errs: [Vec<f64>; 3] = Default::default();
        for layer in 0..n_layers {
            let ws = &snap.weights()[weight_index(layer, kind)];
            let x = inputs.get(&(layer, kind)).ok_or("missing activation")?;
            let m = &ws.meta();
            let refs: Vec<ResidualBlockRef<'_>> = ws.blocks().iter().map(|b| b.view()).collect();
            let batch = x.len() / m.cols;
            let mut want = vec![0f32; batch * m.rows];
            matmul_reference(&refs, m.rows, m.cols, ws.inv_scale(), x, &mut want)?;
            let paths = [
                TablePrecision::Int16,
                TablePrecision::Int8,
                TablePrecision::F32,
            ];
            for (tables, out) in paths.into_iter().zip(errs.iter_mut()) {
                let params = FusedParams {
                    tables,
                    isa: KernelIsa::Auto.resolve(),
                };
                let mut y = vec![0f32; batch * m.rows];
                let mut scratch =
                    vec![
                        0f32;
                        fused_scratch_len_with(m.rows, m.cols, m.rank, refs.len(), batch, params)
                    ];
                fused_matmul_with(
                    &refs,
                    m.rows,
                    m.cols,
                    ws.inv_scale(),
                    x,
                    &mut y,
                    params,
                    &mut scratch,
                )?;
                out.push(rel_err(&y, &want));
            }
        }
        per_kind.push((kind, errs));
    }
    println!(
        "\nrelative error of Ŵ X vs the f64 reference at {:.1} MB ({} tokens of real inputs per linear, {:.0} s):",
        held as f64 / 1e6,
        tokens.len(),
        t.elapsed().as_secs_f64()
    );
    println!("| linear | int16 median | int16 max | int8 median | int8 max | exact f32 median | exact f32 max |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (kind, mut errs) in per_kind {
        let mut cells = Vec::new();
        for e in errs.iter_mut() {
            e.sort_by(f64::total_cmp);
            cells.push(format!("{:.2e} | {:.2e}", e[e.len() / 2], e[e.len() - 1]));
        }
        println!("| {kind:?} | {} |", cells.join(" | "));
    }
    Ok(())
}
