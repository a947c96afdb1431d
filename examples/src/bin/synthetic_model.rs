//! Writes a random model of any real model's shapes as an F32 GGUF (the tensor names, dims
//! order and tokenizer keys llama.cpp's converter writes), so the default paths can be run on
//! the shapes of a model that is not in `../shared`, e.g. Qwen2.5-0.5B's:
//!
//! ```text
//! cargo run --release -p examples --bin synthetic_model -- --arch qwen2 --layers 24 \
//!     --hidden 896 --ffn 4864 --heads 14 --kv-heads 2 --vocab 151936 --untied --attn-bias \
//!     -o /tmp/qwen2-shaped.gguf
//! ```
//!
//! The tokenizer is GPT-2's 256 byte tokens padded to `--vocab` (any text encodes, one token
//! per byte). The file is written atomically.
use bitstack_examples::gguf::{SyntheticGguf, SyntheticVocab};
use bitstack_examples::report::exit_status;
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

/// Writes a random model of the given shapes as GGUF.
#[derive(Parser, Debug)]
struct Args {
    /// `general.architecture`: llama, qwen2 or mistral.
    #[arg(long, default_value = "llama")]
    arch: String,
    /// Decoder layers.
    #[arg(long)]
    layers: usize,
    /// Model width.
    #[arg(long)]
    hidden: usize,
    /// MLP inner width.
    #[arg(long)]
    ffn: usize,
    /// Query heads.
    #[arg(long)]
    heads: usize,
    /// Key/value heads.
    #[arg(long)]
    kv_heads: usize,
    /// Vocabulary size (≥ 256).
    #[arg(long)]
    vocab: usize,
    /// Context length written into the metadata.
    #[arg(long, default_value_t = 2048)]
    context: usize,
    /// An output head of its own instead of the tied embedding.
    #[arg(long)]
    untied: bool,
    /// Q/K/V biases (as Qwen2).
    #[arg(long)]
    attn_bias: bool,
    /// Seed of the values.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Output GGUF.
    #[arg(short, long)]
    output: PathBuf,
}

fn main() -> ExitCode {
    exit_status("error", run(&Args::parse()))
}

fn run(a: &Args) -> Result<(), Box<dyn std::error::Error>> {
    if a.vocab < 256 {
        return Err(format!("--vocab {} is below the 256 byte tokens", a.vocab).into());
    }
    if a.heads == 0
        || a.kv_heads == 0
        || !a.hidden.is_multiple_of(a.heads)
        || !a.heads.is_multiple_of(a.kv_heads)
    {
        return Err(format!(
            "--hidden {} / --heads {} / --kv-heads {}: heads must divide hidden and KV heads divide heads",
            a.hidden, a.heads, a.kv_heads
        )
        .into());
    }
    let model = SyntheticGguf {
        arch: a.arch.clone(),
        n_layers: a.layers,
        hidden: a.hidden,
        ffn: a.ffn,
        n_heads: a.heads,
        n_kv_heads: a.kv_heads,
        context: a.context,
        tied: !a.untied,
        attn_bias: a.attn_bias,
        vocab: SyntheticVocab::BytesPadded(a.vocab),
        seed: a.seed,
        // Embedding rows of unit-variance-like size, as the linears' default.
        embedding_scale: 0.05,
        head_scale: 0.05,
        ..SyntheticGguf::default()
    };
    model.write(&a.output)?;
    let c = model.config();
    println!(
        "wrote {} ({} layers, hidden {}, ffn {}, {} heads / {} KV, vocab {}, {} head)",
        a.output.display(),
        c.n_layers,
        c.hidden,
        c.ffn,
        c.n_heads,
        c.n_kv_heads,
        c.vocab,
        if c.tied_embeddings { "tied" } else { "untied" }
    );
    Ok(())
}
