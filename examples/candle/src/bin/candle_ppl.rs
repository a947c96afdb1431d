//! `candle_ppl FILE --text T --budgets 90MB,120MB,200MB [--seq-len N --max-windows W]`:
//! perplexity of a stack file's model at each budget computed twice on the same windows, by
//! candle-transformers' Llama over the restored weights and by bitstack's own Llama over the
//! elastic snapshot, with their relative difference.

use std::path::PathBuf;
use std::process::ExitCode;

use bitstack_candle::{candle_perplexity, CandleLlama};
use bitstack_core::{MemoryBudget, MB, MIB};
use bitstack_examples::llama::{EmbeddingPrecision, Llama};
use bitstack_examples::perplexity::{perplexity, PerplexityParams, WindowSelection};
use bitstack_examples::report::exit_status;
use bitstack_examples::stackmodel::{LoadedStack, SnapshotLinears};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "candle_ppl",
    about = "Perplexity of a BitStack file on candle-transformers' Llama and on bitstack's, side by side"
)]
struct Args {
    /// The stack file (made by `bitstack compress`).
    file: PathBuf,
    /// The evaluation text (e.g. wikitext2-test.raw).
    #[arg(long)]
    text: PathBuf,
    /// Comma-separated budgets (`90MB,120MiB,150000000`).
    #[arg(long, value_delimiter = ',', required = true)]
    budgets: Vec<MemoryBudget>,
    /// Window length in tokens (as `bitstack eval --seq-len`).
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Evaluate at most this many windows (which ones: --windows, as `bitstack eval`).
    #[arg(long)]
    max_windows: Option<usize>,
    /// Which windows --max-windows picks: spread (evenly over the text) or first.
    #[arg(long, default_value_t = WindowSelection::EvenlySpaced)]
    windows: WindowSelection,
    /// Windows candle runs side by side in one batch.
    #[arg(long, default_value_t = 8)]
    batch_windows: usize,
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn mb(bytes: u64) -> f64 {
    bytes as f64 / MB
}

fn run(args: &Args) -> Res<()> {
    if args.batch_windows == 0 {
        return Err("--batch-windows: must be at least 1".into());
    }
    let bytes = std::fs::read(&args.text)
        .map_err(|e| format!("cannot read --text {}: {e}", args.text.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| format!("--text {}: not UTF-8 text: {e}", args.text.display()))?;
    // candle reads the embedding as stored (f16, widened); ours holds it so too, so the two
    // forward passes compute the same model (budgets count the f16 embedding).
    let loaded = LoadedStack::open_with(&args.file, None, EmbeddingPrecision::F16)
        .map_err(|e| format!("{}: {e}", args.file.display()))?;
    let (min, full) = (loaded.elastic.minimum_bytes(), loaded.elastic.full_bytes());
    for b in &args.budgets {
        if b.bytes() < min {
            return Err(format!(
                "--budgets: {:.1} MB is below the model's minimum of {:.1} MB ({:.1} MiB)",
                b.mb(),
                mb(min),
                min as f64 / MIB
            )
            .into());
        }
    }
    // `bitstack eval` encodes the text without BOS; so does this, so the windows are the same.
    let tokens = loaded.tokenizer.encode(&text, false)?;
    if tokens.len() < args.seq_len {
        return Err(format!(
            "--text {}: {} tokens do not fill one window of --seq-len {}",
            args.text.display(),
            tokens.len(),
            args.seq_len
        )
        .into());
    }
    let params = PerplexityParams {
        seq_len: args.seq_len,
        max_windows: args.max_windows,
        selection: args.windows,
        ..Default::default()
    };
    println!(
        "{}: {} tokens of text; model minimum {:.1} MB, full {:.1} MB",
        args.file.display(),
        tokens.len(),
        mb(min),
        mb(full)
    );
    let mut rows = Vec::new();
    for &budget in &args.budgets {
        loaded.elastic.resize(budget)?;
        let snap = loaded.elastic.snapshot();
        let linears = SnapshotLinears(snap.clone());
        let ours = Llama::new(&loaded.resident, &linears)?;
        let label = format!("budget {:.1} MB", budget.mb());
        let b = perplexity(&ours, &tokens, &params, &mut |p| {
            eprintln!(
                "{label}: bitstack {}/{} windows, {:.1} s",
                p.windows_done,
                p.windows_total,
                p.elapsed.as_secs_f64()
            );
        })?;
        let candle = CandleLlama::from_snapshot(loaded.model.file(), &snap)?;
        let c = candle_perplexity(
            &candle,
            &tokens,
            &params,
            args.batch_windows,
            &mut |done, total| eprintln!("{label}: candle {done}/{total} windows"),
        )?;
        if (b.windows, b.tokens_scored) != (c.windows, c.tokens_scored) {
            return Err(format!(
                "window mismatch: bitstack scored {} tokens in {} windows, candle {} in {}",
                b.tokens_scored, b.windows, c.tokens_scored, c.windows
            )
            .into());
        }
        eprintln!(
            "{label}: bitstack {:.1} s, candle {:.1} s",
            b.seconds, c.seconds
        );
        rows.push((budget, snap.held_bytes(), c, b));
    }
    println!(
        "windows: {} x {} tokens, --windows {} ({} tokens scored per model)",
        rows[0].2.windows, args.seq_len, args.windows, rows[0].2.tokens_scored
    );
    println!("| budget (MB) | held (MB) | candle ppl | bitstack ppl | relative difference |");
    println!("|---:|---:|---:|---:|---:|");
    for (budget, held, c, b) in &rows {
        let rel = (c.ppl - b.ppl).abs() / b.ppl;
        println!(
            "| {:.1} | {:.2} | {:.4} | {:.4} | {:.2e} ({:.5} %) |",
            budget.mb(),
            mb(*held),
            c.ppl,
            b.ppl,
            rel,
            100.0 * rel
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    exit_status("candle_ppl", run(&Args::parse()))
}
