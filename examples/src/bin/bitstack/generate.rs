//! `bitstack generate`: text at a budget.

use crate::common::{mb, open_loaded, usage, Res};
use bitstack_core::MemoryBudget;
use bitstack_examples::gguf::ModelSource;
use bitstack_examples::llama::{EmbeddingPrecision, GenerateParams, Llama, Sampling};
use bitstack_examples::outln;
use bitstack_examples::stackmodel::{LoadedStack, SnapshotLinears};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub(crate) struct GenerateArgs {
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
    /// Decode-kernel tables: int16 (default; perplexity within 0.1 % of exact), mixed (16-bit
    /// tables for each level's leading rank, int8 for the rest; -0.04 / -0.16 % perplexity on a
    /// validation window at 90 / 105.4 MB), int8 (fastest, about 1 % error per product) or
    /// exact (f32 tables).
    #[arg(long, default_value_t = bitstack_core::kernels::TablePrecision::default())]
    kernel: bitstack_core::kernels::TablePrecision,
    /// Precision of the resident embedding: q8 (the default), f16 (as stored) or q4 (see
    /// `eval --resident`).
    #[arg(long, default_value_t = EmbeddingPrecision::default())]
    resident: EmbeddingPrecision,
}
pub(crate) fn generate_text(
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

/// `bitstack generate`.
pub(crate) fn run(args: &GenerateArgs) -> Res<()> {
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
    let mut loaded = open_loaded(&args.file, Some(args.budget), args.resident)?;
    loaded.set_fused_params(bitstack_core::kernels::FusedParams::with_tables(
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
