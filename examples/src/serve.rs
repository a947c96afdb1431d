//! Following the memory the device has while generating: `bitstack serve` (a line-based
//! generation loop that resizes the model in place before every prompt and every few decode
//! tokens) and `bitstack pressure-demo` (a scripted schedule of available memory, with the
//! in-place resize measured against reopening the model, and process RSS checked against the
//! budget).
//!
//! ## How a running generation follows a resize
//!
//! A resize swaps the [`ElasticModel`](bitstack_core::ElasticModel)'s snapshot; the decode loop
//! picks the new snapshot up at its next poll and builds a new [`Llama`] over it (cheap: shape
//! checks only). The [`KvCache`] is kept: tokens decoded after the resize are computed with the
//! new weights, while the keys and values of earlier tokens stay as the old weights computed
//! them. Nothing is recomputed, so generation never pauses for more than the resize itself; the
//! price is that the cache mixes two approximations of the same model for a while (BitStack's
//! snapshots are nested prefixes of one stack, so the mismatch is a small perturbation, not a
//! different model).

use crate::llama::{sample, KvCache, Llama, Sampling, SplitMix64};
use crate::memstat;
use crate::stackmodel::{LoadedStack, SnapshotLinears};
use bitstack_core::policy::{
    CgroupSource, Decision, FallbackChain, FileSource, FixedSource, MemInfoSource, MemoryPolicy,
    MemorySource, PolicyParams, Reading,
};
use bitstack_core::runtime::trim_allocator;
use bitstack_core::{MemoryBudget, ResizeReport, MB};
use clap::Args;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Errors of this module's commands.
pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn mb(bytes: u64) -> f64 {
    bytes as f64 / MB
}

/// Where `serve` reads available memory from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemorySpec {
    /// cgroup v2 limit → `/proc/meminfo` `MemAvailable` → the full model.
    Auto,
    /// A fixed budget.
    Fixed(MemoryBudget),
    /// A file holding the available memory (e.g. `300MB`), re-read on every poll.
    File(PathBuf),
}

impl std::str::FromStr for MemorySpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "auto" {
            return Ok(Self::Auto);
        }
        if let Some(v) = s.strip_prefix("fixed:") {
            return v
                .parse::<MemoryBudget>()
                .map(Self::Fixed)
                .map_err(|e| e.to_string());
        }
        if let Some(p) = s.strip_prefix("file:") {
            if p.is_empty() {
                return Err("file: needs a path".into());
            }
            return Ok(Self::File(p.into()));
        }
        Err(format!(
            "--memory {s:?}: expected auto, fixed:SIZE (e.g. fixed:150MB) or file:PATH"
        ))
    }
}

/// The availability reading for which the policy's target is exactly `budget` (inverts the
/// headroom), so a fixed budget is used as given rather than shrunk by the headroom.
pub fn reading_for_budget(budget: u64, params: &PolicyParams) -> u64 {
    let keep_frac = params.headroom_fraction.clamp(0.0, 0.99);
    ((budget.saturating_add(params.headroom_bytes)) as f64 / (1.0 - keep_frac)).ceil() as u64
}

/// The policy's target before clamping to the model's size range.
pub fn unclamped_target(available: u64, params: &PolicyParams) -> u64 {
    let keep = (available as f64 * params.headroom_fraction) as u64 + params.headroom_bytes;
    available.saturating_sub(keep)
}

/// A [`FallbackChain`] whose members have names, and which remembers which member answered so
/// that a change (and the reasons the earlier members failed) can be logged.
#[derive(Debug)]
pub struct NamedChain {
    names: Vec<String>,
    chain: FallbackChain,
    /// Reasons members could not even be constructed (e.g. no cgroup v2 entry).
    pub skipped: Vec<String>,
}

impl NamedChain {
    /// Tries each member in order, like [`FallbackChain`]; returns the reading and a note
    /// naming the member that answered and why the ones before it did not.
    pub fn probe(&self, held: u64) -> (Reading, String) {
        let mut why: Vec<String> = self.skipped.clone();
        for (name, s) in self.names.iter().zip(&self.chain.0) {
            match s.available(held) {
                Ok(v) => {
                    let note = if why.is_empty() {
                        format!("source {name}")
                    } else {
                        format!("source {name} (fell back: {})", why.join("; "))
                    };
                    return (Ok(v), note);
                }
                Err(e) => why.push(format!("{name}: {e}")),
            }
        }
        let e = format!("no memory source answered: {}", why.join("; "));
        (Err(e.clone()), e)
    }
}

/// Builds the named source chain for a spec. `full` is the full model's bytes (the last
/// fallback of `auto`).
pub fn build_source(spec: &MemorySpec, full: u64, params: &PolicyParams) -> NamedChain {
    let mut names = Vec::new();
    let mut members: Vec<Box<dyn MemorySource>> = Vec::new();
    let mut skipped = Vec::new();
    match spec {
        MemorySpec::Auto => {
            match CgroupSource::current() {
                Ok(c) => {
                    names.push(format!("cgroup v2 ({})", c.dir.display()));
                    members.push(Box::new(c));
                }
                Err(e) => skipped.push(format!("cgroup v2: {e}")),
            }
            names.push("/proc/meminfo MemAvailable".into());
            members.push(Box::new(MemInfoSource::default()));
            names.push(format!("fixed full model ({:.1} MB)", mb(full)));
            members.push(Box::new(FixedSource(MemoryBudget::from_bytes(
                reading_for_budget(full, params),
            ))));
        }
        MemorySpec::Fixed(b) => {
            names.push(format!("fixed {:.1} MB", b.mb()));
            members.push(Box::new(FixedSource(MemoryBudget::from_bytes(
                reading_for_budget(b.bytes(), params),
            ))));
        }
        MemorySpec::File(p) => {
            names.push(format!("file {}", p.display()));
            members.push(Box::new(FileSource { path: p.clone() }));
        }
    }
    NamedChain {
        names,
        chain: FallbackChain(members),
        skipped,
    }
}

/// One poll of the memory source that changed the model.
#[derive(Clone, Debug)]
pub struct ResizeEvent {
    /// The reading (bytes the model may hold in total).
    pub available: u64,
    /// The budget the policy chose.
    pub budget: u64,
    /// What the runtime did.
    pub report: ResizeReport,
}

/// Polls a source, feeds the policy, resizes the model in place and logs what happened.
pub struct Follower<'a> {
    loaded: &'a LoadedStack,
    source: NamedChain,
    policy: MemoryPolicy,
    params: PolicyParams,
    last_note: String,
    /// Where the log lines go (`[memory] ...`).
    pub log: Box<dyn FnMut(&str) + 'a>,
}

impl<'a> Follower<'a> {
    /// A follower of `source` for `loaded`, with policy `params`.
    pub fn new(
        loaded: &'a LoadedStack,
        source: NamedChain,
        params: PolicyParams,
        log: Box<dyn FnMut(&str) + 'a>,
    ) -> Self {
        let policy = MemoryPolicy::new(
            params,
            loaded.elastic.minimum_bytes(),
            loaded.elastic.full_bytes(),
        );
        Self {
            loaded,
            source,
            policy,
            params,
            last_note: String::new(),
            log,
        }
    }

    /// The budget currently decided, if any.
    pub fn budget(&self) -> Option<u64> {
        self.policy.current()
    }

    /// Reads the source, asks the policy, and resizes if it says so. `when` labels the log.
    pub fn poll(&mut self, when: &str) -> Res<Option<ResizeEvent>> {
        let held = self.loaded.elastic.snapshot().held_bytes();
        let (reading, note) = self.source.probe(held);
        if note != self.last_note {
            (self.log)(&format!("[memory] {note}"));
            self.last_note = note;
        }
        let available = match &reading {
            Ok(v) => *v,
            Err(_) => {
                // The policy keeps the current size; the reason was just logged if new.
                let _ = self.policy.decide(reading);
                return Ok(None);
            }
        };
        let budget = match self.policy.decide(Ok(available)) {
            Decision::Resize(b) => b,
            Decision::Keep | Decision::NoReading(_) => return Ok(None),
        };
        let (min, full) = (
            self.loaded.elastic.minimum_bytes(),
            self.loaded.elastic.full_bytes(),
        );
        let raw = unclamped_target(available, &self.params);
        if raw < min {
            (self.log)(&format!(
                "[memory] {when}: available {:.1} MB leaves {:.1} MB after headroom, below the model minimum {:.1} MB: clamped to the minimum (the process may exceed what is available)",
                mb(available),
                mb(raw),
                mb(min)
            ));
        } else if raw > full {
            (self.log)(&format!(
                "[memory] {when}: available {:.1} MB exceeds the full model; budget {:.1} MB (full)",
                mb(available),
                mb(full)
            ));
        }
        let report = self.loaded.elastic.resize(budget)?;
        (self.log)(&format!(
            "[memory] {when}: available {:.1} MB -> budget {:.1} MB; resized {:.1} -> {:.1} MB held, {} blocks loaded ({:.1} MB), {} dropped ({:.1} MB), {:.1} ms",
            mb(available),
            budget.mb(),
            mb(report.from_bytes),
            mb(report.to_bytes),
            report.blocks_loaded,
            mb(report.bytes_loaded),
            report.blocks_dropped,
            mb(report.bytes_dropped),
            report.elapsed.as_secs_f64() * 1e3
        ));
        Ok(Some(ResizeEvent {
            available,
            budget: budget.bytes(),
            report,
        }))
    }
}

/// Policy options shared by both commands.
#[derive(Args, Debug, Clone)]
pub struct PolicyArgs {
    /// Fraction of the available memory left free for everything else.
    #[arg(long, default_value_t = 0.05)]
    pub headroom: f64,
    /// Bytes always left free on top of the fraction.
    #[arg(long, default_value = "0MB")]
    pub headroom_bytes: MemoryBudget,
    /// A grow happens only when the target exceeds the current budget by more than this.
    #[arg(long, default_value = "4MB")]
    pub hysteresis: MemoryBudget,
    /// Poll the memory source every this many decode tokens.
    #[arg(long, default_value_t = 16)]
    pub poll_every: usize,
}

impl PolicyArgs {
    fn params(&self) -> Res<PolicyParams> {
        if !(0.0..1.0).contains(&self.headroom) {
            return Err(format!("--headroom {} is not in [0, 1)", self.headroom).into());
        }
        Ok(PolicyParams {
            headroom_fraction: self.headroom,
            headroom_bytes: self.headroom_bytes.bytes(),
            hysteresis_bytes: self.hysteresis.bytes(),
        })
    }
}

/// Sampling options shared by both commands.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus mass for sampling.
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    fn sampling(&self) -> Sampling {
        if self.temperature > 0.0 {
            Sampling::TopP {
                temperature: self.temperature,
                top_p: self.top_p,
            }
        } else {
            Sampling::Greedy
        }
    }
}

/// `bitstack serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The stack file.
    pub file: PathBuf,
    /// Memory source: auto (cgroup v2, then /proc/meminfo, then the full model),
    /// fixed:SIZE, or file:PATH (a file holding e.g. `300MB`, re-read on every poll).
    #[arg(long, default_value = "auto")]
    pub memory: MemorySpec,
    /// Read prompts from this file (one per line) instead of stdin.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Most new tokens per prompt.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Send prompts as they are instead of wrapping them in the model's chat template.
    #[arg(long)]
    pub raw: bool,
    /// Memory policy options.
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Sampling options.
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Ids that end a turn: EOS and, for chat models, `<|im_end|>`.
fn stop_ids(loaded: &LoadedStack) -> Vec<u32> {
    let mut v: Vec<u32> = loaded.tokenizer.eos_id().into_iter().collect();
    if let Some(id) = loaded.tokenizer.token_to_id("<|im_end|>") {
        if !v.contains(&id) {
            v.push(id);
        }
    }
    v
}

/// One forward step over the snapshot held by `linears`, continuing `cache`.
fn step(
    loaded: &LoadedStack,
    linears: &SnapshotLinears,
    tokens: &[u32],
    cache: &mut KvCache,
) -> Res<Vec<f32>> {
    let model = Llama::new(&loaded.resident, linears)?;
    Ok(model.forward_cached(tokens, cache)?)
}

/// Streams the text of `tokens` as it grows (a token may end inside a UTF-8 character, so
/// the whole text is decoded and only its new suffix printed).
struct TextStream {
    printed: usize,
}

impl TextStream {
    fn push(&mut self, loaded: &LoadedStack, tokens: &[u32]) -> Res<String> {
        let text = loaded.tokenizer.decode(tokens)?;
        if text.ends_with('\u{fffd}') || text.len() < self.printed {
            return Ok(String::new());
        }
        let new = text
            .get(self.printed..)
            .map(str::to_owned)
            .unwrap_or_default();
        self.printed = text.len();
        Ok(new)
    }
}

/// `bitstack serve`: see the module docs.
pub fn serve(args: &ServeArgs) -> Res<()> {
    let params = args.policy.params()?;
    let t = Instant::now();
    let loaded = LoadedStack::open(&args.file, None)?;
    let (min, full) = (loaded.elastic.minimum_bytes(), loaded.elastic.full_bytes());
    eprintln!(
        "[serve] opened {} at the minimum ({:.1} MB; full {:.1} MB) in {:.2} s; memory {:?}, headroom {:.0} % + {:.1} MB, hysteresis {:.1} MB, poll every {} tokens",
        args.file.display(),
        mb(min),
        mb(full),
        t.elapsed().as_secs_f64(),
        args.memory,
        params.headroom_fraction * 100.0,
        mb(params.headroom_bytes),
        mb(params.hysteresis_bytes),
        args.policy.poll_every
    );
    let source = build_source(&args.memory, full, &params);
    let mut follower = Follower::new(
        &loaded,
        source,
        params,
        Box::new(|s: &str| eprintln!("{s}")),
    );
    let input: Box<dyn BufRead> = match &args.prompt_file {
        Some(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p)
                .map_err(|e| format!("cannot open prompt file {}: {e}", p.display()))?,
        )),
        None => Box::new(std::io::stdin().lock()),
    };
    let stops = stop_ids(&loaded);
    let sampling = args.sampling.sampling();
    let poll_every = args.policy.poll_every.max(1);
    let config = loaded.resident.config().clone();
    let mut out = std::io::stdout().lock();
    for (n, line) in input.lines().enumerate() {
        let line = line?;
        let prompt = line.trim();
        if prompt.is_empty() {
            continue;
        }
        follower.poll(&format!("before prompt {}", n + 1))?;
        let ids = loaded.prompt_ids(prompt, !args.raw)?;
        let mut cache = KvCache::new(&config, ids.len() + args.max_tokens);
        let mut rng = SplitMix64::new(args.sampling.seed.wrapping_add(n as u64));
        let mut linears = loaded.linears();
        let t0 = Instant::now();
        let mut logits = step(&loaded, &linears, &ids, &mut cache)?;
        let prefill = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut generated = Vec::new();
        let mut stream = TextStream { printed: 0 };
        let mut resizes = 0;
        loop {
            let tok = sample(&logits, sampling, &mut rng)?;
            if stops.contains(&tok) {
                break;
            }
            generated.push(tok);
            write!(out, "{}", stream.push(&loaded, &generated)?)?;
            out.flush()?;
            if generated.len() == args.max_tokens {
                break;
            }
            if generated.len() % poll_every == 0
                && follower
                    .poll(&format!("prompt {}, token {}", n + 1, generated.len()))?
                    .is_some()
            {
                resizes += 1;
                // Later tokens use the new snapshot; the cache of earlier ones is kept.
                linears = loaded.linears();
            }
            logits = step(&loaded, &linears, &[tok], &mut cache)?;
        }
        let decode = t1.elapsed().as_secs_f64();
        writeln!(out)?;
        eprintln!(
            "[serve] prompt {}: {} prompt tokens, {} new, prefill {:.2} s, decode {:.1} tokens/s, {} resizes during decode, {:.1} MB held",
            n + 1,
            ids.len(),
            generated.len(),
            prefill,
            generated.len().saturating_sub(1) as f64 / decode.max(1e-9),
            resizes,
            mb(loaded.elastic.snapshot().held_bytes())
        );
    }
    Ok(())
}

/// `bitstack pressure-demo`.
#[derive(Args, Debug)]
pub struct PressureArgs {
    /// The stack file.
    pub file: PathBuf,
    /// Available memory per phase, MB (10^6 bytes) unless a unit is given: `300,120,90,200`.
    #[arg(long, default_value = "300,120,90,200")]
    pub schedule: String,
    /// Tokens generated per phase.
    #[arg(long, default_value_t = 48)]
    pub tokens_per_phase: usize,
    /// The prompt (wrapped in the chat template).
    #[arg(
        long,
        default_value = "Tell me a long story about a lighthouse keeper and the sea."
    )]
    pub prompt: String,
    /// Skip timing the reopen-at-the-new-budget alternative.
    #[arg(long)]
    pub no_reopen: bool,
    /// Memory policy options.
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Sampling options.
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Parses a schedule of available memory: comma-separated sizes, plain numbers in MB.
pub fn parse_schedule(s: &str) -> Res<Vec<u64>> {
    let v = s
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| {
            if x.chars().all(|c| c.is_ascii_digit() || c == '.') {
                x.parse::<f64>()
                    .map(|v| (v * MB).round() as u64)
                    .map_err(|e| format!("schedule entry {x:?}: {e}").into())
            } else {
                x.parse::<MemoryBudget>()
                    .map(|b| b.bytes())
                    .map_err(|e| format!("schedule entry {x:?}: {e}").into())
            }
        })
        .collect::<Res<Vec<u64>>>()?;
    if v.is_empty() {
        return Err("empty schedule".into());
    }
    Ok(v)
}

/// The RSS check: the margin is the first phase's overhead (RSS − held) plus `slack`; returns
/// it and, per phase, whether RSS exceeds budget + margin. Phases without an RSS reading pass.
pub fn margin_check(rows: &[(u64, u64, Option<u64>)], slack: u64) -> (Option<u64>, Vec<bool>) {
    let margin = rows
        .first()
        .and_then(|&(_, held, rss)| rss.map(|r| r.saturating_sub(held) + slack));
    let flags = rows
        .iter()
        .map(|&(budget, _, rss)| match (rss, margin) {
            (Some(r), Some(m)) => r > budget + m,
            _ => false,
        })
        .collect();
    (margin, flags)
}

/// Writes `text` to `path` atomically (temporary file and rename), so a reader never sees a
/// half-written value.
fn write_atomic(path: &Path, text: &str) -> Res<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

struct PhaseRow {
    available: u64,
    budget: u64,
    held: u64,
    blocks: usize,
    rss: Option<u64>,
    tokens_per_s: f64,
    prefill_s: Option<f64>,
    resize: Option<ResizeReport>,
    /// Time to drop the last snapshot holding the dropped blocks (they are freed then, not
    /// inside `resize`).
    free_ms: f64,
    reopen_ms: Option<f64>,
    sample: String,
}

fn one_line(s: &str, max_chars: usize) -> String {
    let flat: String = s.replace('\n', "\\n").replace(['\r', '\t'], " ");
    if flat.chars().count() > max_chars {
        format!("{}…", flat.chars().take(max_chars).collect::<String>())
    } else {
        flat
    }
}

/// `bitstack pressure-demo`: see the module docs.
pub fn pressure_demo(args: &PressureArgs) -> Res<()> {
    let schedule = parse_schedule(&args.schedule)?;
    let params = args.policy.params()?;
    let dir = std::env::temp_dir().join(format!("bitstack-pressure-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let avail_file = dir.join("available");
    let result = pressure_inner(args, &schedule, params, &avail_file);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn pressure_inner(
    args: &PressureArgs,
    schedule: &[u64],
    params: PolicyParams,
    avail_file: &Path,
) -> Res<()> {
    let rss0 = memstat::read().rss;
    let t = Instant::now();
    let loaded = LoadedStack::open(&args.file, None)?;
    let open_s = t.elapsed().as_secs_f64();
    let (min, full) = (loaded.elastic.minimum_bytes(), loaded.elastic.full_bytes());
    println!(
        "== pressure demo on {} ==\nmodel minimum {:.1} MB, full {:.1} MB (MB = 10^6 B); opened at the minimum in {:.2} s; process RSS before open {}",
        args.file.display(),
        mb(min),
        mb(full),
        open_s,
        memstat::fmt_bytes(rss0)
    );
    println!(
        "schedule of available memory (MB): {}; policy headroom {:.0} % + {:.1} MB, hysteresis {:.1} MB; poll every {} tokens; {} tokens per phase",
        schedule
            .iter()
            .map(|&b| format!("{:.0}", mb(b)))
            .collect::<Vec<_>>()
            .join(", "),
        params.headroom_fraction * 100.0,
        mb(params.headroom_bytes),
        mb(params.hysteresis_bytes),
        args.policy.poll_every,
        args.tokens_per_phase
    );
    for &a in schedule {
        let target = MemoryPolicy::new(params, min, full).target(a);
        if unclamped_target(a, &params) < min {
            println!(
                "note: {:.1} MB available is below the minimum after headroom; the policy clamps it to {:.1} MB",
                mb(a),
                mb(target)
            );
        }
    }
    println!(
        "available memory is written to {} and read back by a FileSource on every poll",
        avail_file.display()
    );
    write_atomic(avail_file, &schedule[0].to_string())?;
    let source = build_source(&MemorySpec::File(avail_file.to_owned()), full, &params);
    let mut follower = Follower::new(
        &loaded,
        source,
        params,
        Box::new(|s: &str| println!("  {s}")),
    );
    let ids = loaded.prompt_ids(&args.prompt, true)?;
    let total_tokens = ids.len() + schedule.len() * args.tokens_per_phase + 1;
    let config = loaded.resident.config().clone();
    if total_tokens > config.max_seq {
        return Err(format!(
            "{total_tokens} tokens exceed the model's context {}",
            config.max_seq
        )
        .into());
    }
    // One cache and one token stream for the whole demo: resizes never restart generation.
    let mut cache = KvCache::new(&config, total_tokens);
    let mut rng = SplitMix64::new(args.sampling.seed);
    let sampling = args.sampling.sampling();
    // The stream must not end: stop tokens are masked out of the logits.
    let stops = stop_ids(&loaded);
    let poll_every = args.policy.poll_every.max(1);
    println!(
        "prompt: {:?} ({} tokens, chat template)",
        args.prompt,
        ids.len()
    );

    let mut rows: Vec<PhaseRow> = Vec::new();
    let mut linears = loaded.linears();
    let mut logits: Option<Vec<f32>> = None;
    let mut stream_tokens: Vec<u32> = Vec::new();
    for (phase, &available) in schedule.iter().enumerate() {
        println!(
            "-- phase {}: available memory set to {:.1} MB",
            phase + 1,
            mb(available)
        );
        write_atomic(avail_file, &available.to_string())?;
        let event = follower.poll(&format!("phase {} start", phase + 1))?;
        let mut free_ms = 0.0;
        if event.is_some() {
            let t = Instant::now();
            // Later tokens use the new snapshot; the KV cache of earlier tokens is kept.
            linears = loaded.linears();
            free_ms += t.elapsed().as_secs_f64() * 1e3;
        }
        let mut phase_resize = event.map(|e| e.report);
        let mut compute_s = 0.0;
        let mut prefill_s = None;
        let start_len = stream_tokens.len();
        for i in 0..args.tokens_per_phase {
            if i > 0 && i % poll_every == 0 {
                if let Some(e) = follower.poll(&format!("phase {}, token {}", phase + 1, i))? {
                    let t = Instant::now();
                    linears = loaded.linears();
                    free_ms += t.elapsed().as_secs_f64() * 1e3;
                    phase_resize.get_or_insert(e.report);
                }
            }
            let mut l = match logits.take() {
                // The prompt's prefill is the first step of the stream (timed apart).
                None => {
                    let t = Instant::now();
                    let l = step(&loaded, &linears, &ids, &mut cache)?;
                    prefill_s = Some(t.elapsed().as_secs_f64());
                    l
                }
                Some(l) => l,
            };
            let t = Instant::now();
            for &s in &stops {
                if let Some(v) = l.get_mut(s as usize) {
                    *v = f32::NEG_INFINITY;
                }
            }
            let tok = sample(&l, sampling, &mut rng)?;
            stream_tokens.push(tok);
            logits = Some(step(&loaded, &linears, &[tok], &mut cache)?);
            compute_s += t.elapsed().as_secs_f64();
        }
        let text = loaded.tokenizer.decode(&stream_tokens[start_len..])?;
        trim_allocator();
        loaded.model.file().release_pages();
        let rss = memstat::read().rss;
        let snap = loaded.elastic.snapshot();
        let budget = follower.budget().unwrap_or(snap.held_bytes());
        // The alternative a user has today: open the file again at the new budget. Timed after
        // the phase's RSS reading, and dropped before the next phase.
        let reopen_ms = if args.no_reopen {
            None
        } else {
            let t = Instant::now();
            let other = LoadedStack::open(&args.file, Some(MemoryBudget::from_bytes(budget)))?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if other.elastic.snapshot().prefix() != snap.prefix() {
                return Err("reopened model holds a different prefix".into());
            }
            drop(other);
            trim_allocator();
            loaded.model.file().release_pages();
            Some(ms)
        };
        let row = PhaseRow {
            available,
            budget,
            held: snap.held_bytes(),
            blocks: snap.prefix(),
            rss,
            tokens_per_s: args.tokens_per_phase as f64 / compute_s.max(1e-9),
            prefill_s,
            resize: phase_resize,
            free_ms,
            reopen_ms,
            sample: one_line(&text, 100),
        };
        print_phase(&row);
        rows.push(row);
    }
    drop(linears);
    print_summary(&rows, rss0);
    let full_text = loaded.tokenizer.decode(&stream_tokens)?;
    println!(
        "the whole stream ({} tokens, one KV cache across {} phases):\n{}",
        stream_tokens.len(),
        rows.len(),
        full_text.trim()
    );
    Ok(())
}

/// Switching time (resize + freeing the dropped blocks), MB moved (loaded + dropped), and the
/// load rate in MB/s (loaded MB over the resize time; none for pure shrinks, where nothing is
/// read and "moving" is freeing).
fn resize_cols(r: &PhaseRow) -> (f64, f64, Option<f64>) {
    match &r.resize {
        Some(rep) => {
            let resize_ms = rep.elapsed.as_secs_f64() * 1e3;
            let moved = mb(rep.bytes_loaded + rep.bytes_dropped);
            let rate = (rep.bytes_loaded > 0 && resize_ms > 0.0)
                .then(|| mb(rep.bytes_loaded) / (resize_ms / 1e3));
            (resize_ms + r.free_ms, moved, rate)
        }
        None => (0.0, 0.0, None),
    }
}

fn print_phase(r: &PhaseRow) {
    let (ms, moved, rate) = resize_cols(r);
    println!(
        "  available {:.1} MB, budget {:.1} MB, held {:.1} MB ({} blocks), RSS {}, {:.2} tokens/s{}",
        mb(r.available),
        mb(r.budget),
        mb(r.held),
        r.blocks,
        memstat::fmt_bytes(r.rss),
        r.tokens_per_s,
        r.prefill_s
            .map_or(String::new(), |p| format!(" (prompt prefill {p:.2} s, not counted)"))
    );
    match &r.resize {
        Some(rep) => println!(
            "  in-place resize {:.1} ms ({:.1} ms resize + {:.1} ms freeing dropped blocks), {:.1} MB moved ({} blocks loaded, {} dropped){}",
            ms,
            rep.elapsed.as_secs_f64() * 1e3,
            r.free_ms,
            moved,
            rep.blocks_loaded,
            rep.blocks_dropped,
            rate.map_or(String::new(), |x| format!(", loaded at {x:.0} MB/s"))
        ),
        None => println!("  no resize (the policy kept the budget)"),
    }
    if let Some(re) = r.reopen_ms {
        println!(
            "  reopening the file at this budget instead: {:.1} ms{}",
            re,
            if r.resize.is_some() && ms > 0.0 {
                format!(" ({:.1}x the in-place resize)", re / ms)
            } else {
                String::new()
            }
        );
    }
    println!("  sample: {}", r.sample);
}

fn print_summary(rows: &[PhaseRow], rss0: Option<u64>) {
    const SLACK: u64 = 20_000_000;
    let (margin, flags) = margin_check(
        &rows
            .iter()
            .map(|r| (r.budget, r.held, r.rss))
            .collect::<Vec<_>>(),
        SLACK,
    );
    let table: Vec<Vec<String>> = rows
        .iter()
        .zip(&flags)
        .enumerate()
        .map(|(i, (r, &over))| {
            let (ms, moved, rate) = resize_cols(r);
            let f1 = |x: Option<f64>| x.map_or("n/a".into(), |v| format!("{v:.1}"));
            vec![
                (i + 1).to_string(),
                format!("{:.1}", mb(r.available)),
                format!("{:.1}", mb(r.budget)),
                format!("{:.1}", mb(r.held)),
                r.blocks.to_string(),
                f1(r.rss.map(mb)),
                f1(r.rss.map(|x| x as f64 / MB - mb(r.held))),
                format!("{:.2}", r.tokens_per_s),
                if r.resize.is_some() {
                    format!("{ms:.1}")
                } else {
                    "-".into()
                },
                format!("{moved:.1}"),
                rate.map_or("-".into(), |x| format!("{x:.0}")),
                f1(r.reopen_ms),
                match (r.reopen_ms, r.resize.is_some() && ms > 0.0) {
                    (Some(re), true) => format!("{:.1}x", re / ms),
                    _ => "-".into(),
                },
                if over { "OVER".into() } else { "ok".into() },
            ]
        })
        .collect();
    println!(
        "== summary ==\n{}",
        crate::report::markdown_table(
            &[
                "phase",
                "available MB",
                "budget MB",
                "held MB",
                "blocks",
                "RSS MB",
                "RSS - held MB",
                "tokens/s",
                "resize ms",
                "moved MB",
                "load MB/s",
                "reopen ms",
                "reopen / resize",
                "RSS <= budget + margin",
            ],
            &table
        )
    );
    println!(
        "resize ms: the in-place switch (ElasticModel::resize plus freeing the dropped blocks when the old snapshot goes); reopen ms: LoadedStack::open at the phase's budget (what a user without in-place resizing does: map the file, build the resident part and tokenizer, load every block), timed after the phase outside the token stream; tokens/s excludes the prompt prefill. Tokens after a resize are computed with the new snapshot; the KV cache of earlier tokens is kept as the old snapshot computed it."
    );
    match margin {
        Some(m) => {
            let over = flags.iter().filter(|&&f| f).count();
            println!(
                "margin: the first phase's overhead (RSS - held = {:.1} MB: activations, KV cache, tokenizer, code; process RSS before opening the model was {}) + {:.0} MB = {:.1} MB. {}",
                mb(m - SLACK),
                memstat::fmt_bytes(rss0),
                mb(SLACK),
                mb(m),
                if over == 0 {
                    "RSS followed the budget within this margin in every phase.".to_owned()
                } else {
                    format!("{over} phase(s) exceeded budget + margin (marked OVER).")
                }
            );
        }
        None => println!("margin: no RSS readings on this platform; check skipped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_spec_parses() {
        assert_eq!("auto".parse::<MemorySpec>(), Ok(MemorySpec::Auto));
        assert_eq!(
            "fixed:150MB".parse::<MemorySpec>(),
            Ok(MemorySpec::Fixed(MemoryBudget::from_bytes(150_000_000)))
        );
        assert_eq!(
            "file:/tmp/x".parse::<MemorySpec>(),
            Ok(MemorySpec::File("/tmp/x".into()))
        );
        assert!("fixed:lots".parse::<MemorySpec>().is_err());
        assert!("file:".parse::<MemorySpec>().is_err());
        assert!("meminfo".parse::<MemorySpec>().is_err());
    }

    #[test]
    fn schedule_parses() {
        assert_eq!(
            parse_schedule("300,120, 90,200").unwrap(),
            vec![300_000_000, 120_000_000, 90_000_000, 200_000_000]
        );
        assert_eq!(
            parse_schedule("80.5,1MiB").unwrap(),
            vec![80_500_000, 1_048_576]
        );
        assert!(parse_schedule("").is_err());
        assert!(parse_schedule("300,lots").is_err());
    }

    #[test]
    fn fixed_budgets_survive_the_headroom() {
        let p = PolicyParams {
            headroom_fraction: 0.05,
            headroom_bytes: 1_000_000,
            hysteresis_bytes: 4_000_000,
        };
        for b in [80_400_000u64, 150_000_000, 426_000_000] {
            let r = reading_for_budget(b, &p);
            let t = unclamped_target(r, &p);
            assert!(t >= b && t <= b + 2, "{b} -> {r} -> {t}");
        }
    }

    #[test]
    fn smollm2_schedule_fits_and_clamps() {
        // SmolLM2-135M's stack: minimum 80.4 MB, full 426 MB.
        let (min, full) = (80_400_000u64, 426_000_000u64);
        let p = PolicyParams::default();
        let mut pol = MemoryPolicy::new(p, min, full);
        let budgets: Vec<u64> = parse_schedule("300,120,90,70,200,1000")
            .unwrap()
            .into_iter()
            .map(|a| match pol.decide(Ok(a)) {
                Decision::Resize(b) => b.bytes(),
                d => panic!("{d:?}"),
            })
            .collect();
        assert_eq!(
            budgets,
            vec![285_000_000, 114_000_000, 85_500_000, min, 190_000_000, full]
        );
        assert!(unclamped_target(70_000_000, &p) < min);
    }

    #[test]
    fn samples_stay_on_one_line() {
        assert_eq!(one_line("a\nb\tc", 10), "a\\nb c");
        assert_eq!(one_line("abcdef", 3), "abc…");
    }

    #[test]
    fn margin_flags_phases_over_budget() {
        let m = 1_000_000u64;
        let rows = [
            (300 * m, 280 * m, Some(330 * m)), // overhead 50 MB: margin 70 MB
            (120 * m, 110 * m, Some(185 * m)), // 185 <= 190
            (90 * m, 85 * m, Some(161 * m)),   // 161 > 160
            (90 * m, 85 * m, None),
        ];
        let (margin, flags) = margin_check(&rows, 20 * m);
        assert_eq!(margin, Some(70 * m));
        assert_eq!(flags, vec![false, false, true, false]);
        assert_eq!(margin_check(&[], 1), (None, vec![]));
    }

    #[test]
    fn chain_reports_fallbacks() {
        let p = PolicyParams::default();
        let dir = std::env::temp_dir().join(format!("bitstack-serve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("avail");
        let chain = build_source(&MemorySpec::File(f.clone()), 1000, &p);
        let (r, note) = chain.probe(0);
        assert!(r.is_err() && note.contains("no memory source answered"));
        std::fs::write(&f, "120MB").unwrap();
        assert_eq!(chain.probe(0).0, Ok(120_000_000));
        let auto = build_source(&MemorySpec::Auto, 426_000_000, &p);
        let (r, note) = auto.probe(0);
        assert!(r.is_ok(), "{note}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
