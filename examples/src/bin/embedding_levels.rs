//! What the token embedding (the tied head) costs and buys when it is held as BitStack levels
//! instead of a resident f16 / q8 / q4 tensor, measured on a real stack file at equal memory.
//!
//! The embedding `E` (`vocab × hidden`) is decomposed like any linear: activation-scaled by
//! the channel norms of the head's input (the final normed hidden states of `--calib`), then
//! `--max-levels` residual blocks of rank `--rank` with int8 factors. For each total budget
//! and each way of holding `E` (q8, q4, or the first `L` levels), the linears get the longest
//! prefix of the file's universal order that fits what is left, and the model is scored on
//! the same windows of `--text` (validation text: never tune on the reported test windows).
//!
//! ```text
//! cargo run --release -p examples --bin embedding_levels -- FILE.bitstack \
//!     --calib ../shared/data/wikitext2-train-head.txt --text /tmp/val.txt \
//!     --budgets 90MB,105.5MB,145MB --levels 2,3,4,6,8
//! ```
use bitstack_core::{FactorDtype, MemoryBudget, ResidualBlock, StackMeta, WeightStack};
use bitstack_examples::gguf::{LlamaConfig, ModelError, ModelSource};
use bitstack_examples::llama::{EmbeddingPrecision, Llama, LlamaResident};
use bitstack_examples::perplexity::{perplexity, PerplexityParams, WindowSelection};
use bitstack_examples::report::exit_status;
use bitstack_examples::stackmodel::{LoadedStack, StackModel};
use bitstack_examples::tokenizer::Tokenizer;
use bitstack_linalg::{ActivationNorms, IavdParams, ScaleParams};
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

/// Measures the embedding held as BitStack levels against q8 / q4 at equal memory.
#[derive(Parser, Debug)]
struct Args {
    /// The stack file.
    file: PathBuf,
    /// Calibration text for the head-input scaling (e.g. the WikiText-2 train excerpt).
    #[arg(long)]
    calib: PathBuf,
    /// Text to score (validation text).
    #[arg(long)]
    text: PathBuf,
    /// Total budgets, comma-separated (e.g. 90MB,145MB).
    #[arg(long, value_delimiter = ',', required = true)]
    budgets: Vec<MemoryBudget>,
    /// Embedding levels to try, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2,3,4,6,8")]
    levels: Vec<usize>,
    /// Singular vectors per embedding level.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Scale the embedding's columns by the head-input channel norms before decomposing.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    scale: bool,
    /// Calibration windows of `--seq-len` tokens for the scaling.
    #[arg(long, default_value_t = 8)]
    calib_windows: usize,
    /// Windows to score (the first ones of `--text`).
    #[arg(long, default_value_t = 4)]
    windows: usize,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
}

/// A stack model whose token embedding is replaced by given values.
struct WithEmbedding<'a> {
    model: &'a StackModel,
    embedding: Vec<f32>,
}

impl ModelSource for WithEmbedding<'_> {
    fn config(&self) -> &LlamaConfig {
        self.model.config()
    }
    fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        if name == "token_embd.weight" {
            let c = self.model.config();
            Ok((vec![c.vocab, c.hidden], self.embedding.clone()))
        } else {
            self.model.tensor_f32(name)
        }
    }
    fn has_tensor(&self, name: &str) -> bool {
        self.model.has_tensor(name)
    }
    fn tokenizer(&self) -> Result<Tokenizer, ModelError> {
        self.model.tokenizer()
    }
}

fn main() -> ExitCode {
    exit_status("error", run(&Args::parse()))
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let model = StackModel::open(&args.file)?;
    let c = model.config().clone();
    if !c.tied_embeddings {
        return Err("this study handles tied embeddings only".into());
    }
    let (_, embedding) = model.tensor_f32("token_embd.weight")?;
    let tokenizer = model.tokenizer()?;
    let read =
        |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let calib = tokenizer.encode(&read(&args.calib)?, false)?;
    let text = tokenizer.encode(&read(&args.text)?, false)?;

    // Head-input channel norms from the full stack (the closest model to the original).
    let full = LoadedStack::open_with(
        &args.file,
        Some(MemoryBudget::from_bytes(u64::MAX / 4)),
        EmbeddingPrecision::F16,
    )?;
    let scale = if args.scale {
        let linears = full.linears();
        let llama = Llama::new(&full.resident, &linears)?;
        let mut norms = ActivationNorms::new(c.hidden, ScaleParams::default())?;
        let l = args.seq_len;
        for w in 0..args.calib_windows.min(calib.len() / l) {
            let toks = &calib[w * l..(w + 1) * l];
            let seqs = llama.seq_batch(1, l)?;
            let h = llama.final_norm(&llama.forward_hidden(toks, &seqs, None)?)?;
            norms.observe(&h, l)?;
        }
        Some(norms.scale()?)
    } else {
        None
    };
    drop(full);

    let max_levels = args.levels.iter().copied().max().unwrap_or(1);
    let t = Instant::now();
    let params = IavdParams {
        levels: max_levels,
        rank: args.rank,
        factors: FactorDtype::I8,
        ..IavdParams::default()
    };
    let dec =
        bitstack_linalg::decompose_slice(&embedding, c.vocab, c.hidden, scale.as_deref(), &params)?;
    println!(
        "decomposed the {}×{} embedding into {} levels of k = {} in {:.1} s (scaling: {}); relative error per level (scaled space): {}",
        c.vocab,
        c.hidden,
        max_levels,
        args.rank,
        t.elapsed().as_secs_f64(),
        args.scale,
        dec.relative_errors.iter().map(|e| format!("{e:.4}")).collect::<Vec<_>>().join(" ")
    );
    let meta: StackMeta = dec.stack_meta("token_embd", scale);
    let scale_bytes = meta.scale_bytes();
    let blocks: Vec<Arc<ResidualBlock>> = dec.blocks.into_iter().map(Arc::new).collect();
    let stack = WeightStack::with_blocks(Arc::new(meta), blocks)?;
    let f32_bytes = 4 * (c.vocab * c.hidden) as u64;
    let plain_rel = |approx: &[f32]| -> f64 {
        let num: f64 = approx
            .iter()
            .zip(&embedding)
            .map(|(a, e)| f64::from(a - e).powi(2))
            .sum();
        let den: f64 = embedding.iter().map(|e| f64::from(*e).powi(2)).sum();
        (num / den).sqrt()
    };

    let params = PerplexityParams {
        seq_len: args.seq_len,
        max_windows: Some(args.windows),
        selection: WindowSelection::First,
        ..PerplexityParams::default()
    };
    println!("| budget | embedding | embedding MB | rel. error of E | linear blocks | ppl |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for &budget in &args.budgets {
        for precision in [EmbeddingPrecision::Q8, EmbeddingPrecision::Q4] {
            let loaded = LoadedStack::open_with(&args.file, Some(budget), precision)?;
            let linears = loaded.linears();
            let e = loaded.resident.token_embd();
            let mut restored = Vec::with_capacity(c.vocab * c.hidden);
            for r in 0..c.vocab {
                e.extend_row(r, c.hidden, &mut restored);
            }
            let llama = Llama::new(&loaded.resident, &linears)?;
            let p = perplexity(&llama, &text, &params, &mut |_| {})?;
            println!(
                "| {} | {} | {:.2} | {:.4} | {} | {:.3} |",
                budget,
                precision,
                e.bytes() as f64 / 1e6,
                plain_rel(&restored),
                loaded.elastic.snapshot().prefix(),
                p.ppl
            );
        }
        for &levels in &args.levels {
            let bytes = stack.meta().block_bytes() * levels as u64 + scale_bytes;
            // An f32 resident embedding counts 4 bytes a value: take it back out and charge the levels.
            let Some(lin_budget) = budget
                .bytes()
                .checked_add(f32_bytes)
                .and_then(|b| b.checked_sub(bytes))
            else {
                continue;
            };
            let Ok(loaded) = LoadedStack::open_with(
                &args.file,
                Some(MemoryBudget::from_bytes(lin_budget)),
                EmbeddingPrecision::F32,
            ) else {
                println!(
                    "| {budget} | {levels} levels | {:.2} | | below the minimum | |",
                    bytes as f64 / 1e6
                );
                continue;
            };
            let mut restored = vec![0f32; c.vocab * c.hidden];
            stack.restore_into(levels, &mut restored)?;
            let rel = plain_rel(&restored);
            let src = WithEmbedding {
                model: &model,
                embedding: restored,
            };
            let resident = LlamaResident::from_source_with(&src, EmbeddingPrecision::F32)?;
            let linears = loaded.linears();
            let llama = Llama::new(&resident, &linears)?;
            let p = perplexity(&llama, &text, &params, &mut |_| {})?;
            println!(
                "| {} | {} levels (k {}) | {:.2} | {:.4} | {} | {:.3} |",
                budget,
                levels,
                args.rank,
                bytes as f64 / 1e6,
                rel,
                loaded.elastic.snapshot().prefix(),
                p.ppl
            );
        }
    }
    Ok(())
}
