//! Perplexity of an original (uncompressed) model: every linear dense f32, dequantized from the
//! GGUF or read from a Hugging Face directory. The reference row BitStack is compared against.
//!
//! ```text
//! ppl_original MODEL TEXT [--seq-len 2048] [--max-windows N] [--first]
//! ```
//!
//! On `../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf` and WikiText-2 test (301,948 tokens,
//! 147 windows of 2048) this gave ppl 21.9667 in 875 s on 2 shared cores, against 21.9674 from
//! Hugging Face transformers on the same dequantized weights.

use std::process::ExitCode;
use std::time::Instant;

use bitstack_examples::gguf::open_model;
use bitstack_examples::llama::{LinearTable, Llama, LlamaResident};
use bitstack_examples::perplexity::{perplexity, PerplexityParams, WindowSelection};
use bitstack_examples::report::exit_status;
use clap::Parser;

/// Perplexity of the original model on a text (non-overlapping windows, no BOS).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// A `.gguf` file or a Hugging Face model directory.
    model: String,
    /// The evaluation text (read as is and tokenized once).
    text: String,
    /// Window length in tokens.
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Evaluate at most this many windows (which ones: --windows).
    #[arg(long)]
    max_windows: Option<usize>,
    /// Which windows --max-windows picks: spread (evenly over the text) or first (as
    /// `bitstack eval --windows`).
    #[arg(long, default_value_t = WindowSelection::EvenlySpaced)]
    windows: WindowSelection,
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    let src = open_model(&args.model)?;
    let resident = LlamaResident::from_source(src.as_ref())?;
    let linears = LinearTable::dense_from_source(src.as_ref())?;
    let model = Llama::new(&resident, &linears)?;
    let c = model.config();
    eprintln!(
        "loaded {} ({} layers, hidden {}, {} heads / {} KV, vocab {}) in {:.1} s",
        args.model,
        c.n_layers,
        c.hidden,
        c.n_heads,
        c.n_kv_heads,
        c.vocab,
        t0.elapsed().as_secs_f64()
    );
    let text = std::fs::read_to_string(&args.text)?;
    let t1 = Instant::now();
    let tokens = src.tokenizer()?.encode(&text, false)?;
    println!(
        "tokens: {} ({:.1} s to tokenize)",
        tokens.len(),
        t1.elapsed().as_secs_f64()
    );
    let params = PerplexityParams {
        seq_len: args.seq_len,
        max_windows: args.max_windows,
        selection: args.windows,
        ..Default::default()
    };
    let r = perplexity(&model, &tokens, &params, &mut |p| {
        eprintln!(
            "window {}/{}  running ppl {:.4}  elapsed {:.0} s  eta {:.0} s",
            p.windows_done,
            p.windows_total,
            p.running_ppl,
            p.elapsed.as_secs_f64(),
            p.eta.as_secs_f64()
        );
    })?;
    println!(
        "ppl {:.4}  mean nll {:.6}  windows {}/{} of {} tokens  tokens scored {}  {:.1} s",
        r.ppl, r.mean_nll, r.windows, r.windows_available, r.seq_len, r.tokens_scored, r.seconds
    );
    Ok(())
}

fn main() -> ExitCode {
    exit_status("error", run(&Args::parse()))
}
