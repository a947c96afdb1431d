//! `bitstack bench`: decode and prefill tokens/s per budget next to the machine's read
//! bandwidth (the measuring lives in `bitstack_examples::bench`; this is flags and output).

use bitstack_core::MemoryBudget;
use bitstack_examples::bench::{
    bench_dense, bench_stack, cpu_model, load_average, measure_read_bandwidth, BenchError,
    BenchParams, BenchReport, BenchRow, BudgetSpec,
};
use bitstack_examples::gguf::open_model;
use bitstack_examples::stackmodel::LoadedStack;
use clap::builder::RangedU64ValueParser;
use clap::Args;
use std::path::PathBuf;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A stack file, or an original model (`.gguf` / Hugging Face directory), which is benched
    /// once with every linear in dense f32.
    file: PathBuf,
    /// Comma-separated budgets for a stack file, in this order: `min`, `full`, `90MB`,
    /// `105.5MB`, `120MiB`, `88200000` (bytes). A budget above the full stack benches the full
    /// stack. Default: min,full.
    #[arg(long, value_delimiter = ',')]
    budgets: Vec<BudgetSpec>,
    /// Prompt tokens, prefilled as one batch (cut from a fixed English text, repeated).
    #[arg(long, default_value_t = 512, value_parser = RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    prompt_tokens: usize,
    /// Greedy decode steps timed after the prompt.
    #[arg(long, default_value_t = 48, value_parser = RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    gen_tokens: usize,
    /// Repetitions per budget (median, min and max are reported).
    #[arg(long, default_value_t = 3, value_parser = RangedU64ValueParser::<usize>::new().range(1..=1000))]
    reps: usize,
    /// Threads for the model and the bandwidth sum (default: rayon's, one per CPU).
    #[arg(long, value_parser = RangedU64ValueParser::<usize>::new().range(1..=4096))]
    threads: Option<usize>,
    /// Buffer summed to measure the machine's read bandwidth (median of 3 sums).
    #[arg(long, default_value = "1GB")]
    bandwidth_buffer: MemoryBudget,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Decode-kernel tables: int16 (default), mixed, int8 or exact (see `generate --kernel`).
    #[arg(long, default_value_t = bitstack_core::kernels::TablePrecision::default())]
    kernel: bitstack_core::kernels::TablePrecision,
    /// Precision of the resident embedding: q8 (the default), f16 (as stored) or q4 (see
    /// `eval --resident`).
    #[arg(long, default_value_t = bitstack_examples::llama::EmbeddingPrecision::default())]
    resident: bitstack_examples::llama::EmbeddingPrecision,
}

/// A usage error: printed like clap's own, exit status 2.
fn usage(msg: String) -> ! {
    eprintln!("error: {msg}\n\nFor more information, try 'bitstack bench --help'.");
    std::process::exit(2)
}

/// `InvalidParameter { name: "prompt_tokens" }` becomes a usage error naming `--prompt-tokens`.
fn flag_error(e: BenchError) -> Box<dyn std::error::Error + Send + Sync> {
    match e {
        BenchError::InvalidParameter { name, reason }
            if ["prompt_tokens", "gen_tokens", "reps"].contains(&name) =>
        {
            usage(format!("--{}: {reason}", name.replace('_', "-")))
        }
        e => e.into(),
    }
}

fn progress(r: &BenchRow) {
    eprintln!(
        "[bench] {}: held {:.1} MB, decode {:.2} tok/s, prefill {:.1} tok/s (medians)",
        r.label,
        r.held_bytes as f64 / 1e6,
        r.decode_tokens_per_s.median,
        r.prefill_tokens_per_s.median
    );
}

fn run_in_pool(args: &BenchArgs) -> Res<()> {
    let params = BenchParams {
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        reps: args.reps,
    };
    let stack = crate::common::is_stack_file(&args.file);
    let load_before = load_average();
    let (kind, rows, bandwidth, minimum, full) = if stack {
        let mut loaded = LoadedStack::open_with(&args.file, None, args.resident)
            .map_err(|e| format!("{}: {e}", args.file.display()))?;
        loaded.set_fused_params(bitstack_core::kernels::FusedParams::with_tables(
            args.kernel,
        ));
        params
            .validate(loaded.resident.config().max_seq)
            .map_err(flag_error)?;
        let (min, full) = (loaded.elastic.minimum_bytes(), loaded.elastic.full_bytes());
        let budgets = if args.budgets.is_empty() {
            vec![BudgetSpec::Minimum, BudgetSpec::Full]
        } else {
            args.budgets.clone()
        };
        for b in &budgets {
            if let BudgetSpec::Bytes(m) = b {
                if m.bytes() < min {
                    usage(format!(
                        "--budgets: {:.1} MB is below {}'s minimum of {:.1} MB ({:.1} MiB)",
                        m.mb(),
                        args.file.display(),
                        min as f64 / 1e6,
                        min as f64 / (1u64 << 20) as f64
                    ));
                }
            }
        }
        let bw = measure_read_bandwidth(args.bandwidth_buffer.bytes(), 3)?;
        let rows = bench_stack(&loaded, &budgets, &params, &mut progress).map_err(flag_error)?;
        ("stack", rows, bw, Some(min), Some(full))
    } else {
        if !args.budgets.is_empty() {
            usage(format!(
                "--budgets: {} is not a stack file; an original model is benched once, as dense f32",
                args.file.display()
            ));
        }
        let source = open_model(&args.file).map_err(|e| format!("{}: {e}", args.file.display()))?;
        params
            .validate(source.config().max_seq)
            .map_err(flag_error)?;
        let bw = measure_read_bandwidth(args.bandwidth_buffer.bytes(), 3)?;
        let row = bench_dense(source.as_ref(), &params).map_err(flag_error)?;
        progress(&row);
        ("dense f32", vec![row], bw, None, None)
    };
    let report = BenchReport {
        file: args.file.display().to_string(),
        kind: kind.into(),
        cpu: cpu_model(),
        threads: rayon::current_num_threads(),
        prompt_tokens: params.prompt_tokens,
        gen_tokens: params.gen_tokens,
        reps: params.reps,
        minimum_bytes: minimum,
        full_bytes: full,
        load_before,
        load_after: load_average(),
        read_bandwidth: bandwidth,
        rows,
    };
    println!("{}", report.markdown());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        bitstack_examples::output::write_atomic(path, text.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Runs `bitstack bench` (on a pool of `--threads` threads when given).
pub fn run(args: &BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.bandwidth_buffer.bytes() < 8 {
        usage(format!(
            "--bandwidth-buffer: {} is less than one 8-byte word",
            args.bandwidth_buffer
        ));
    }
    let r = match args.threads {
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map_err(|e| format!("--threads {n}: {e}"))?
            .install(|| run_in_pool(args)),
        None => run_in_pool(args),
    };
    r.map_err(|e| e as Box<dyn std::error::Error>)
}
