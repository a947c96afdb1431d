//! Decode and prefill speed at several memory budgets, next to the machine's read bandwidth:
//! the library side of `bitstack bench`.
//!
//! One loaded stack model is resized in place between budgets (as `bitstack eval` does), and
//! each budget is timed with [`Llama::generate`], the same path `bitstack generate` takes:
//!
//! * **prefill**: the whole prompt of [`BenchParams::prompt_tokens`] tokens as one batch, from an
//!   empty cache to the logits of its last token; tokens/s = prompt tokens / that time;
//! * **decode**: greedy, [`BenchParams::gen_tokens`] one-token steps after the prompt (the
//!   prefill excluded); tokens/s = steps / their total time.
//!
//! Each is measured [`BenchParams::reps`] times and reported as median, min and max. The
//! effective bandwidth of a row is the bytes its linear layers hold (blocks and scale vectors)
//! times the median decode tokens/s: what every decode step must read at least once, apart from
//! the head, the norms and the KV cache. [`measure_read_bandwidth`] gives the machine's own
//! figure in the same process (a timed sum over a large buffer on every thread).
//!
//! ```no_run
//! use bitstack_examples::bench::{bench_stack, measure_read_bandwidth, BenchParams, BudgetSpec};
//! use bitstack_examples::stackmodel::LoadedStack;
//!
//! let loaded = LoadedStack::open("smollm2.bitstack", None)?;
//! let params = BenchParams { prompt_tokens: 64, gen_tokens: 8, reps: 1 };
//! let rows = bench_stack(&loaded, &[BudgetSpec::Minimum, BudgetSpec::Full], &params, &mut |_| {})?;
//! let bw = measure_read_bandwidth(1_000_000_000, 3)?;
//! println!("{:.1} tok/s decode at the minimum; read bandwidth {:.1} GB/s",
//!          rows[0].decode_tokens_per_s.median, bw.gb_per_s.median);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::gguf::ModelSource;
use crate::llama::{
    GenerateParams, LinearKind, LinearProvider, LinearTable, Llama, LlamaError, LlamaResident,
    Sampling,
};
use crate::stackmodel::{LoadedStack, SnapshotLinears};
use crate::tokenizer::{Tokenizer, TokenizerError};
use bitstack_core::runtime::trim_allocator;
use bitstack_core::{CoreError, MemoryBudget};
use rayon::prelude::*;
use serde::Serialize;
use std::time::Instant;

/// The fixed text prompts are cut from (repeated as often as the prompt length needs).
pub const PROMPT_TEXT: &str = "The history of the lighthouse is a history of coastlines, of \
trade and of the people who kept the lamps burning through long winter nights. Early towers \
burned wood or coal in open braziers; later ones used oil lamps with polished reflectors, and \
in the nineteenth century the Fresnel lens concentrated a small flame into a beam that could be \
seen more than twenty miles out at sea. Keepers trimmed the wicks, wound the clockwork that \
turned the lens, logged the weather and the passing ships, and in storms they rowed out to \
rescue sailors whose vessels had struck the rocks. Most lights are automatic now, yet many \
towers still stand, white and red against the sky, and visitors climb their spiral stairs to \
look at the water the keepers watched for a lifetime. ";

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// A parameter is out of range (`name` is the [`BenchParams`] field or the argument).
    #[error("{name}: {reason}")]
    InvalidParameter {
        /// The parameter.
        name: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// The model failed.
    #[error(transparent)]
    Llama(#[from] LlamaError),
    /// The runtime failed (resizing).
    #[error(transparent)]
    Core(#[from] CoreError),
    /// Tokenizing the prompt failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The buffer for the bandwidth measurement could not be allocated.
    #[error("cannot allocate {bytes} bytes for the read-bandwidth buffer")]
    Allocation {
        /// Bytes asked for.
        bytes: u64,
    },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, BenchError>;

/// What to time at each budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchParams {
    /// Prompt length in tokens (prefill batch), at least 1.
    pub prompt_tokens: usize,
    /// Greedy decode steps after the prompt, at least 1.
    pub gen_tokens: usize,
    /// Repetitions per budget, at least 1.
    pub reps: usize,
}

impl Default for BenchParams {
    fn default() -> Self {
        Self {
            prompt_tokens: 512,
            gen_tokens: 48,
            reps: 3,
        }
    }
}

impl BenchParams {
    /// Checks the counts and that prompt plus generated tokens fit the model's context
    /// (`max_seq` positions).
    pub fn validate(&self, max_seq: usize) -> Result<()> {
        for (name, v) in [
            ("prompt_tokens", self.prompt_tokens),
            ("gen_tokens", self.gen_tokens),
            ("reps", self.reps),
        ] {
            if v == 0 {
                return Err(BenchError::InvalidParameter {
                    name,
                    reason: "must be at least 1".into(),
                });
            }
        }
        if self.prompt_tokens.saturating_add(self.gen_tokens) > max_seq {
            return Err(BenchError::InvalidParameter {
                name: "prompt_tokens",
                reason: format!(
                    "{} prompt + {} generated tokens exceed the model's context of {max_seq} positions",
                    self.prompt_tokens, self.gen_tokens
                ),
            });
        }
        Ok(())
    }
}

/// A budget to bench a stack model at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetSpec {
    /// The smallest model (one block per weight).
    Minimum,
    /// Every block of the stack.
    Full,
    /// The longest prefix that fits this many bytes (the full stack if it is larger).
    Bytes(MemoryBudget),
}

impl BudgetSpec {
    /// The label used in tables: `min`, `full` or the budget in MB.
    pub fn label(&self) -> String {
        match self {
            Self::Minimum => "min".into(),
            Self::Full => "full".into(),
            Self::Bytes(b) => format!("{:.1} MB", b.mb()),
        }
    }
}

impl std::str::FromStr for BudgetSpec {
    type Err = CoreError;
    /// `min`, `full`, or a [`MemoryBudget`] (`90MB`, `105.5MB`, `120MiB`, `150000000`).
    fn from_str(s: &str) -> std::result::Result<Self, CoreError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "min" | "minimum" => Ok(Self::Minimum),
            "full" | "max" => Ok(Self::Full),
            _ => s.parse().map(Self::Bytes),
        }
    }
}

/// Median, smallest and largest of a set of measurements.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Spread {
    /// The median (the mean of the two middle values for an even count).
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
}

impl Spread {
    /// The spread of `values` (NaN everywhere when empty).
    pub fn of(values: &[f64]) -> Self {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            return Self {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
            };
        }
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            0.5 * (v[n / 2 - 1] + v[n / 2])
        };
        Self {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }
}

/// One benched model size.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BenchRow {
    /// `min`, `full`, the budget in MB, or `dense f32` for an original model.
    pub label: String,
    /// The budget asked for in bytes (for `min` / `full` the stack's own sizes; for a dense
    /// model its held bytes).
    pub budget_bytes: u64,
    /// Bytes the model holds as the CLI counts them: resident tensors, scale vectors and
    /// loaded blocks (for a dense model: resident tensors and f32 linears).
    pub held_bytes: u64,
    /// Bytes of the linear layers alone (blocks and scales, or the f32 matrices).
    pub linear_bytes: u64,
    /// Blocks loaded (stack models only).
    pub blocks: Option<usize>,
    /// Milliseconds the in-place resize to this budget took (stack models only).
    pub resize_ms: Option<f64>,
    /// Prompt tokens per second of the batched prefill, over the repetitions.
    pub prefill_tokens_per_s: Spread,
    /// One-token decode steps per second, over the repetitions.
    pub decode_tokens_per_s: Spread,
    /// `linear_bytes` × median decode tokens/s, in GB/s (10^9 bytes per second).
    pub decode_linear_gb_per_s: f64,
    /// `held_bytes` × median decode tokens/s, in GB/s.
    pub decode_held_gb_per_s: f64,
}

/// The machine's read bandwidth.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Bandwidth {
    /// Bytes of the buffer summed each repetition.
    pub buffer_bytes: u64,
    /// Threads that summed it.
    pub threads: usize,
    /// GB/s (10^9 bytes per second) over the repetitions.
    pub gb_per_s: Spread,
}

/// Times `reps` generations of `model` on `prompt` (plus one short untimed warm-up).
fn time_model(model: &Llama<'_>, prompt: &[u32], params: &BenchParams) -> Result<(Spread, Spread)> {
    let greedy = |n| GenerateParams {
        max_new_tokens: n,
        sampling: Sampling::Greedy,
        seed: 0,
        stop_tokens: Vec::new(),
    };
    // Warm-up: touches every weight and the allocator once outside the timed region.
    model.generate(&prompt[..prompt.len().min(8)], &greedy(2), &mut |_| {})?;
    let mut prefill = Vec::with_capacity(params.reps);
    let mut decode = Vec::with_capacity(params.reps);
    for _ in 0..params.reps {
        // gen_tokens + 1 new tokens: the first comes from the prefill's logits, the other
        // gen_tokens are the timed one-token decode steps.
        let g = model.generate(prompt, &greedy(params.gen_tokens + 1), &mut |_| {})?;
        prefill.push(prompt.len() as f64 / g.prefill_seconds.max(1e-12));
        decode.push(g.decode_tokens_per_second());
    }
    Ok((Spread::of(&prefill), Spread::of(&decode)))
}

fn linear_bytes(linears: &dyn LinearProvider, n_layers: usize) -> u64 {
    (0..n_layers)
        .flat_map(|l| LinearKind::ALL.map(|k| linears.linear(l, k).weight_bytes()))
        .sum()
}

/// Exactly `n` prompt tokens cut from [`PROMPT_TEXT`] repeated (with BOS first when the
/// tokenizer adds one by default).
pub fn prompt_tokens(tokenizer: &Tokenizer, n: usize) -> Result<Vec<u32>> {
    let one = tokenizer.encode(PROMPT_TEXT, false)?.len();
    if one == 0 {
        return Err(BenchError::InvalidParameter {
            name: "tokenizer",
            reason: "encodes the benchmark text to no tokens".into(),
        });
    }
    let mut repeats = n / one + 1;
    loop {
        let ids = tokenizer.encode(&PROMPT_TEXT.repeat(repeats), tokenizer.add_bos_default())?;
        if ids.len() >= n {
            return Ok(ids[..n].to_vec());
        }
        repeats *= 2;
    }
}

fn row(
    label: String,
    budget_bytes: u64,
    held_bytes: u64,
    linear_bytes: u64,
    timings: (Spread, Spread),
) -> BenchRow {
    let (prefill, decode) = timings;
    BenchRow {
        label,
        budget_bytes,
        held_bytes,
        linear_bytes,
        blocks: None,
        resize_ms: None,
        prefill_tokens_per_s: prefill,
        decode_linear_gb_per_s: linear_bytes as f64 * decode.median / 1e9,
        decode_held_gb_per_s: held_bytes as f64 * decode.median / 1e9,
        decode_tokens_per_s: decode,
    }
}

/// Benches a loaded stack model at each budget, resizing it in place in the given order, and
/// calls `on_row` after each. Every budget must be at least the stack's minimum
/// ([`CoreError::BudgetBelowMinimum`] otherwise, before anything is timed).
pub fn bench_stack(
    loaded: &LoadedStack,
    budgets: &[BudgetSpec],
    params: &BenchParams,
    on_row: &mut dyn FnMut(&BenchRow),
) -> Result<Vec<BenchRow>> {
    let config = loaded.resident.config();
    params.validate(config.max_seq)?;
    let (min, full) = (loaded.elastic.minimum_bytes(), loaded.elastic.full_bytes());
    let bytes_of = |b: &BudgetSpec| match b {
        BudgetSpec::Minimum => min,
        BudgetSpec::Full => full,
        BudgetSpec::Bytes(m) => m.bytes(),
    };
    for b in budgets {
        loaded
            .elastic
            .prefix_for_budget(MemoryBudget::from_bytes(bytes_of(b)))?;
    }
    let prompt = prompt_tokens(&loaded.tokenizer, params.prompt_tokens)?;
    let mut rows = Vec::with_capacity(budgets.len());
    for b in budgets {
        let budget = bytes_of(b);
        let report = loaded.elastic.resize(MemoryBudget::from_bytes(budget))?;
        trim_allocator();
        let snap = loaded.elastic.snapshot();
        let linears = SnapshotLinears(snap.clone());
        let model = Llama::new(&loaded.resident, &linears)?;
        let timings = time_model(&model, &prompt, params)?;
        let mut r = row(
            b.label(),
            budget,
            snap.held_bytes(),
            linear_bytes(&linears, config.n_layers),
            timings,
        );
        r.blocks = Some(snap.prefix());
        r.resize_ms = Some(report.elapsed.as_secs_f64() * 1e3);
        on_row(&r);
        rows.push(r);
    }
    Ok(rows)
}

/// Benches an original model with every linear in dense f32 (and an f32 embedding), once.
/// Its budget is its held bytes.
pub fn bench_dense(source: &dyn ModelSource, params: &BenchParams) -> Result<BenchRow> {
    params.validate(source.config().max_seq)?;
    let tokenizer = source.tokenizer().map_err(LlamaError::from)?;
    let prompt = prompt_tokens(&tokenizer, params.prompt_tokens)?;
    let resident = LlamaResident::from_source(source)?;
    let linears = LinearTable::dense_from_source(source)?;
    let model = Llama::new(&resident, &linears)?;
    let lin = linear_bytes(&linears, resident.config().n_layers);
    let held = resident.held_bytes() + lin;
    let timings = time_model(&model, &prompt, params)?;
    Ok(row("dense f32".into(), held, held, lin, timings))
}

/// The machine's read bandwidth: `reps` timed sums (u64, wrapping) over a buffer of
/// `buffer_bytes` bytes on every thread of the current rayon pool, after one untimed pass that
/// faults the pages in. The buffer is freed (and the allocator trimmed) before returning.
pub fn measure_read_bandwidth(buffer_bytes: u64, reps: usize) -> Result<Bandwidth> {
    if reps == 0 {
        return Err(BenchError::InvalidParameter {
            name: "reps",
            reason: "must be at least 1".into(),
        });
    }
    let words = usize::try_from(buffer_bytes / 8).map_err(|_| BenchError::Allocation {
        bytes: buffer_bytes,
    })?;
    if words == 0 {
        return Err(BenchError::InvalidParameter {
            name: "buffer_bytes",
            reason: format!("{buffer_bytes} bytes is less than one u64"),
        });
    }
    let mut buf: Vec<u64> = Vec::new();
    buf.try_reserve_exact(words)
        .map_err(|_| BenchError::Allocation {
            bytes: buffer_bytes,
        })?;
    buf.resize(words, 0);
    buf.par_iter_mut()
        .enumerate()
        .for_each(|(i, w)| *w = i as u64);
    let sum = |b: &[u64]| -> u64 {
        b.par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
            .reduce(|| 0, u64::wrapping_add)
    };
    std::hint::black_box(sum(&buf));
    let bytes = (words * 8) as f64;
    let mut rates = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        let s = sum(std::hint::black_box(&buf));
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        rates.push(bytes / secs.max(1e-12) / 1e9);
    }
    drop(buf);
    trim_allocator();
    Ok(Bandwidth {
        buffer_bytes: (words * 8) as u64,
        threads: rayon::current_num_threads(),
        gb_per_s: Spread::of(&rates),
    })
}

/// `/proc/loadavg`'s 1, 5 and 15 minute load averages, `None` where it cannot be read.
pub fn load_average() -> Option<String> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    let f: Vec<&str> = s.split_whitespace().take(3).collect();
    (f.len() == 3).then(|| f.join(" "))
}

/// The CPU's model name from `/proc/cpuinfo`, `None` where it cannot be read.
pub fn cpu_model() -> Option<String> {
    let s = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    s.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

/// The whole `bitstack bench` result, as its `--json` writes it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BenchReport {
    /// The benched file.
    pub file: String,
    /// `stack` or `dense f32`.
    pub kind: String,
    /// The CPU ([`cpu_model`]).
    pub cpu: Option<String>,
    /// Threads the model ran on.
    pub threads: usize,
    /// Prompt tokens per prefill.
    pub prompt_tokens: usize,
    /// Decode steps per repetition.
    pub gen_tokens: usize,
    /// Repetitions per row.
    pub reps: usize,
    /// The stack's minimum budget in bytes (stack files only).
    pub minimum_bytes: Option<u64>,
    /// The stack's full size in bytes (stack files only).
    pub full_bytes: Option<u64>,
    /// [`load_average`] before the first measurement.
    pub load_before: Option<String>,
    /// [`load_average`] after the last.
    pub load_after: Option<String>,
    /// The machine's read bandwidth, measured in the same process.
    pub read_bandwidth: Bandwidth,
    /// One row per budget, in the order benched.
    pub rows: Vec<BenchRow>,
}

impl BenchReport {
    /// The report as a markdown table (MB = 10^6 bytes, GB/s = 10^9 bytes per second), with
    /// the load before and after and the read bandwidth beside it.
    pub fn markdown(&self) -> String {
        let f1 = |x: f64| format!("{x:.1}");
        let spread = |s: &Spread| format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max);
        let bw = self.read_bandwidth.gb_per_s.median;
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                vec![
                    r.label.clone(),
                    f1(r.budget_bytes as f64 / 1e6),
                    f1(r.held_bytes as f64 / 1e6),
                    r.blocks.map_or("-".into(), |b| b.to_string()),
                    spread(&r.decode_tokens_per_s),
                    spread(&r.prefill_tokens_per_s),
                    format!(
                        "{:.2} ({:.1} %)",
                        r.decode_linear_gb_per_s,
                        100.0 * r.decode_linear_gb_per_s / bw
                    ),
                ]
            })
            .collect();
        let table = crate::report::markdown_table(
            &[
                "budget",
                "budget MB",
                "held MB",
                "blocks",
                "decode tok/s median (min–max)",
                &format!("prefill {} tok/s median (min–max)", self.prompt_tokens),
                "linear bytes × decode tok/s GB/s (% of read bw)",
            ],
            &rows,
        );
        format!(
            "{} on {} ({} threads): prompt {} tokens, {} greedy decode steps, {} reps per row\n\
             load before: {}; after: {}\n\
             read bandwidth (sum over {:.0} MB, {} threads): {:.2} GB/s median ({:.2}–{:.2})\n{}",
            self.file,
            self.cpu.as_deref().unwrap_or("unknown CPU"),
            self.threads,
            self.prompt_tokens,
            self.gen_tokens,
            self.reps,
            self.load_before.as_deref().unwrap_or("n/a"),
            self.load_after.as_deref().unwrap_or("n/a"),
            self.read_bandwidth.buffer_bytes as f64 / 1e6,
            self.read_bandwidth.threads,
            bw,
            self.read_bandwidth.gb_per_s.min,
            self.read_bandwidth.gb_per_s.max,
            table
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_median_min_max() {
        let s = Spread::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Spread::of(&[4.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 10.0));
        assert!(Spread::of(&[]).median.is_nan());
    }

    #[test]
    fn budget_specs_parse() {
        assert_eq!("min".parse::<BudgetSpec>().unwrap(), BudgetSpec::Minimum);
        assert_eq!(" Full ".parse::<BudgetSpec>().unwrap(), BudgetSpec::Full);
        assert_eq!(
            "105.5MB".parse::<BudgetSpec>().unwrap(),
            BudgetSpec::Bytes(MemoryBudget::from_bytes(105_500_000))
        );
        assert_eq!(
            "88200000B".parse::<BudgetSpec>().unwrap(),
            BudgetSpec::Bytes(MemoryBudget::from_bytes(88_200_000))
        );
        assert!("lots".parse::<BudgetSpec>().is_err());
        assert!("-3MB".parse::<BudgetSpec>().is_err());
        assert_eq!(
            BudgetSpec::Bytes(MemoryBudget::from_bytes(90_000_000)).label(),
            "90.0 MB"
        );
    }

    #[test]
    fn params_are_validated_against_the_context() {
        let p = BenchParams::default();
        assert!(p.validate(2048).is_ok());
        assert!(p.validate(560).is_ok());
        let e = p.validate(559).unwrap_err();
        assert!(
            matches!(
                e,
                BenchError::InvalidParameter {
                    name: "prompt_tokens",
                    ..
                }
            ),
            "{e}"
        );
        for (field, p) in [
            (
                "reps",
                BenchParams {
                    reps: 0,
                    ..p.clone()
                },
            ),
            (
                "gen_tokens",
                BenchParams {
                    gen_tokens: 0,
                    ..p.clone()
                },
            ),
            (
                "prompt_tokens",
                BenchParams {
                    prompt_tokens: 0,
                    ..p.clone()
                },
            ),
        ] {
            match p.validate(2048) {
                Err(BenchError::InvalidParameter { name, .. }) => assert_eq!(name, field),
                r => panic!("{field}: {r:?}"),
            }
        }
    }

    #[test]
    fn read_bandwidth_is_positive_and_sized() {
        let b = measure_read_bandwidth(8_000_000, 3).unwrap();
        assert_eq!(b.buffer_bytes, 8_000_000);
        assert!(b.gb_per_s.min > 0.0 && b.gb_per_s.min <= b.gb_per_s.median);
        assert!(b.gb_per_s.median <= b.gb_per_s.max && b.gb_per_s.max.is_finite());
        assert!(measure_read_bandwidth(4, 1).is_err());
        assert!(measure_read_bandwidth(8_000, 0).is_err());
    }
}
