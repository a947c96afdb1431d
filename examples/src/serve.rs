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
//!
//! ## Faults
//!
//! A serving process keeps serving. A grow that hits a block the file cannot deliver (checksum
//! mismatch, I/O error) leaves the current snapshot in place (the runtime swaps snapshots only
//! once every new block has loaded); the [`Follower`] logs it, finds the first bad block,
//! grows up to just below it, and retries the full grow with exponential backoff
//! ([`RetryParams`]), lifting the cap once the block loads again. A prompt line that is not
//! UTF-8 is decoded with U+FFFD replacements and reported; a prompt that cannot be answered
//! (longer than the context, a tokenizer error) is reported and answered with an empty line;
//! answers are capped by what the context leaves after the prompt. Only a failure to read
//! prompts or to write answers ends [`serve_loop`].

use crate::llama::{sample, KvCache, Llama, Sampling, SplitMix64};
use crate::memstat;
use crate::output::UsageError;
use crate::stackmodel::{LoadedStack, SnapshotLinears};
use bitstack_core::policy::{
    CgroupSource, Decision, FallbackChain, FileSource, FixedSource, MemInfoSource, MemoryPolicy,
    MemorySource, PolicyParams, Reading,
};
use bitstack_core::runtime::{trim_allocator, BlockSource};
use bitstack_core::{BlockId, MemoryBudget, ResizeReport, MB};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Errors of [`serve`], [`serve_loop`] and [`pressure_demo`].
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// An option value that cannot work (exit status 2 on the command line); the message
    /// names the flag.
    #[error(transparent)]
    Usage(#[from] UsageError),
    /// The stack file could not be opened.
    #[error("{}: {source}", path.display())]
    Load {
        /// The stack file.
        path: PathBuf,
        /// Why (boxed: a load error is large, and this keeps every `Result` small).
        source: Box<crate::stackmodel::LoadError>,
    },
    /// The `--memory file:` file gave no reading at start-up.
    #[error("--memory file:{}: {reason}", path.display())]
    MemoryFile {
        /// The file.
        path: PathBuf,
        /// The source's reason (a read or parse failure).
        reason: String,
    },
    /// The prompt file could not be opened.
    #[error("cannot open prompt file {}: {source}", path.display())]
    PromptFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Reading a prompt failed.
    #[error("reading prompts (line {line}): {source}")]
    ReadPrompts {
        /// The line being read (from 1).
        line: usize,
        /// Why.
        source: std::io::Error,
    },
    /// Writing an answer failed (the caller is gone).
    #[error("writing the answer: {0}")]
    WriteAnswer(std::io::Error),
    /// A prompt leaves no room for an answer in the model's context.
    #[error("the prompt is {tokens} tokens; the model's context is {context} (it must leave room for an answer)")]
    PromptTooLong {
        /// Tokens of the prompt (with the chat template).
        tokens: usize,
        /// The model's context.
        context: usize,
    },
    /// The pressure demo's prompt and phases need more tokens than the model's context.
    #[error("{tokens} tokens (prompt + phases x --tokens-per-phase + 1) exceed the model's context {context}")]
    ScheduleTooLong {
        /// Tokens the demo would run.
        tokens: usize,
        /// The model's context.
        context: usize,
    },
    /// Opening the file again at a budget loaded another prefix than resizing did (the two
    /// paths' budget rules disagree).
    #[error("reopened at {budget} bytes the model holds prefix {reopened}, resized {resized}")]
    ReopenMismatch {
        /// The budget.
        budget: u64,
        /// Prefix of the reopened model.
        reopened: usize,
        /// Prefix of the resized one.
        resized: usize,
    },
    /// The forward pass or sampling failed.
    #[error(transparent)]
    Llama(#[from] crate::llama::LlamaError),
    /// Tokenizing a prompt or decoding an answer failed.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// The elastic runtime refused a resize.
    #[error(transparent)]
    Core(#[from] bitstack_core::CoreError),
    /// Writing the memory file of `pressure-demo` failed.
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
    /// A scratch folder could not be made.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Results of this module.
pub type Res<T> = Result<T, ServeError>;

/// A usage error: an option value that cannot work.
fn usage(msg: impl Into<String>) -> ServeError {
    ServeError::Usage(UsageError(msg.into()))
}

/// Opens the stack file, naming it on failure.
fn open_stack(path: &Path, budget: Option<MemoryBudget>) -> Res<LoadedStack> {
    LoadedStack::open(path, budget).map_err(|source| ServeError::Load {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / MB
}

/// Where `serve` reads available memory from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemorySpec {
    /// cgroup v2 limit → `/proc/meminfo` `MemAvailable` → the full model.
    Auto,
    /// A fixed amount of available memory: the policy keeps its headroom (fraction and bytes)
    /// free of it, exactly as it does for a `File` reading of the same value.
    Fixed(MemoryBudget),
    /// A file holding the available memory (e.g. `300MB`), re-read on every poll.
    File(PathBuf),
}

impl std::fmt::Display for MemorySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Fixed(b) => write!(f, "fixed:{:.1}MB", b.mb()),
            Self::File(p) => write!(f, "file:{}", p.display()),
        }
    }
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

/// bitstack-core's [`FallbackChain`] with a name per member, so that the member that answered
/// (and why the earlier ones failed, or could not even be built) can be logged when it
/// changes. The polling is the core chain's; this adds only the names.
#[derive(Debug)]
pub struct NamedChain {
    names: Vec<String>,
    chain: FallbackChain,
    /// Reasons members could not even be constructed (e.g. no cgroup v2 entry).
    pub skipped: Vec<String>,
}

impl NamedChain {
    /// Polls the chain ([`FallbackChain::probe`]); returns the reading and a note naming the
    /// member that answered and why the ones before it did not.
    pub fn probe(&self, held: u64) -> (Reading, String) {
        let p = self.chain.probe(held);
        let name = |i: usize| self.names.get(i).map_or("?", String::as_str);
        let why: Vec<String> = self
            .skipped
            .iter()
            .cloned()
            .chain(p.failures.iter().map(|(i, e)| format!("{}: {e}", name(*i))))
            .collect();
        match p.answer {
            Some((i, v)) => {
                let note = if why.is_empty() {
                    format!("source {}", name(i))
                } else {
                    format!("source {} (fell back: {})", name(i), why.join("; "))
                };
                (Ok(v), note)
            }
            None => {
                let e = format!("no memory source answered: {}", why.join("; "));
                (Err(e.clone()), e)
            }
        }
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
            // A constant reading, treated like a file's: the headroom applies to it.
            names.push(format!("fixed {:.1} MB available", b.mb()));
            members.push(Box::new(FixedSource(*b)));
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

/// When a failed grow is tried again: after `initial`, then after twice the previous wait, up
/// to `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryParams {
    /// Wait after the first failure.
    pub initial: Duration,
    /// Longest wait.
    pub max: Duration,
}

impl Default for RetryParams {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

/// A grow that failed: the prefix is capped below the block that could not be loaded until a
/// retry loads it.
#[derive(Clone, Debug)]
pub struct GrowFault {
    /// Longest prefix allowed meanwhile (the bad block's position in the universal order).
    pub cap: usize,
    /// The block that failed to load when the fault was located (`None`: every block loaded
    /// on the second try, a transient fault; the cap is then the prefix held).
    pub block: Option<BlockId>,
    /// The resize's error.
    pub error: String,
    /// Failed attempts in a row.
    pub failures: u32,
    /// The wait before the next retry.
    pub backoff: Duration,
    retry_at: Instant,
}

/// Polls a source, feeds the policy, resizes the model in place and logs what happened.
///
/// A resize never takes the model down: a grow that hits a block the source cannot deliver (a
/// checksum mismatch, an I/O error) leaves the current snapshot in place (the runtime swaps
/// snapshots only after every block loaded), is logged, locates the bad block, grows as far
/// as the blocks before it allow, and is retried with exponential backoff ([`RetryParams`]).
pub struct Follower<'a> {
    loaded: &'a LoadedStack,
    source: NamedChain,
    policy: MemoryPolicy,
    params: PolicyParams,
    retry: RetryParams,
    fault: Option<GrowFault>,
    failed_resizes: usize,
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
            retry: RetryParams::default(),
            fault: None,
            failed_resizes: 0,
            last_note: String::new(),
            log,
        }
    }

    /// The same follower with another retry schedule for failed grows.
    pub fn with_retry(mut self, retry: RetryParams) -> Self {
        self.retry = retry;
        self
    }

    /// The budget currently decided, if any.
    pub fn budget(&self) -> Option<u64> {
        self.policy.current()
    }

    /// The failed grow the prefix is capped by, if any.
    pub fn fault(&self) -> Option<&GrowFault> {
        self.fault.as_ref()
    }

    /// Resizes that failed so far.
    pub fn failed_resizes(&self) -> usize {
        self.failed_resizes
    }

    /// Reads the source, asks the policy, and resizes if it says so (or retries a failed grow
    /// whose backoff has passed). `when` labels the log. Failures are logged, never returned:
    /// the model keeps its current consistent snapshot.
    pub fn poll(&mut self, when: &str) -> Option<ResizeEvent> {
        let snap = self.loaded.elastic.snapshot();
        let (held, held_prefix) = (snap.held_bytes(), snap.prefix());
        drop(snap);
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
                return None;
            }
        };
        let decided = matches!(self.policy.decide(Ok(available)), Decision::Resize(_));
        let budget = MemoryBudget::from_bytes(self.policy.current()?);
        let wanted = match self.loaded.elastic.prefix_for_budget(budget) {
            Ok(p) => p,
            Err(e) => {
                (self.log)(&format!(
                    "[memory] {when}: budget {:.1} MB: {e}",
                    budget.mb()
                ));
                return None;
            }
        };
        let now = Instant::now();
        let retry_due = self.fault.as_ref().is_some_and(|f| now >= f.retry_at);
        let target = match &self.fault {
            Some(f) if !retry_due => wanted.min(f.cap),
            _ => wanted,
        };
        let retry_now = retry_due && held_prefix < wanted;
        if !decided && !retry_now {
            return None;
        }
        if decided {
            self.log_clamp(when, available);
        }
        if target == held_prefix {
            if decided {
                if let Some(f) = &self.fault {
                    (self.log)(&format!(
                        "[memory] {when}: budget {:.1} MB, but the prefix stays capped at {} blocks ({:.1} MB held) until a retry loads the failed block",
                        budget.mb(),
                        f.cap,
                        mb(held)
                    ));
                }
            }
            return None;
        }
        match self.loaded.elastic.resize_to_prefix(target) {
            Ok(report) => {
                if let Some(f) = &self.fault {
                    if target > f.cap {
                        (self.log)(&format!(
                            "[memory] {when}: retry {} succeeded: the blocks past position {} load again; cap lifted",
                            f.failures + 1,
                            f.cap
                        ));
                        self.fault = None;
                    }
                }
                Some(self.log_resize(when, available, budget, report))
            }
            Err(e) => self.grow_failed(when, available, budget, held_prefix, target, e),
        }
    }

    fn log_clamp(&mut self, when: &str, available: u64) {
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
    }

    fn log_resize(
        &mut self,
        when: &str,
        available: u64,
        budget: MemoryBudget,
        report: ResizeReport,
    ) -> ResizeEvent {
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
        ResizeEvent {
            available,
            budget: budget.bytes(),
            report,
        }
    }

    /// A grow from `held_prefix` to `target` failed with `e` (the old snapshot is still in
    /// place): find the first block that does not load, cap the prefix below it, grow up to
    /// the cap, and schedule a retry.
    fn grow_failed(
        &mut self,
        when: &str,
        available: u64,
        budget: MemoryBudget,
        held_prefix: usize,
        target: usize,
        e: bitstack_core::CoreError,
    ) -> Option<ResizeEvent> {
        self.failed_resizes += 1;
        let elastic = &self.loaded.elastic;
        let order = elastic.layout().order.as_slice();
        let bad = (held_prefix..target).find_map(|i| {
            let id = *order.get(i)?;
            elastic.source().load_block(id).err().map(|_| (i, id))
        });
        let (cap, block) = match bad {
            Some((i, id)) => (i, Some(id)),
            None => (held_prefix, None),
        };
        let (failures, backoff) = match &self.fault {
            Some(f) => (
                f.failures + 1,
                (f.backoff.saturating_mul(2)).clamp(self.retry.initial, self.retry.max),
            ),
            None => (1, self.retry.initial.min(self.retry.max)),
        };
        let held = elastic.bytes_at_prefix(held_prefix).unwrap_or(0);
        let cap_bytes = elastic.bytes_at_prefix(cap).unwrap_or(held);
        (self.log)(&format!(
            "[memory] {when}: resize to {:.1} MB ({target} blocks) FAILED: {e}; still serving on the current snapshot ({:.1} MB, {held_prefix} blocks); {}; prefix capped at {cap} blocks ({:.1} MB); retry {} in {:.1} s",
            budget.mb(),
            mb(held),
            match block {
                Some(id) => format!(
                    "bad block: weight {} level {} (position {cap} of the universal order)",
                    id.weight, id.level
                ),
                None => "every block loaded when retried one by one (a transient fault)".into(),
            },
            mb(cap_bytes),
            failures + 1,
            backoff.as_secs_f64()
        ));
        self.fault = Some(GrowFault {
            cap,
            block,
            error: e.to_string(),
            failures,
            backoff,
            retry_at: Instant::now() + backoff,
        });
        if cap <= held_prefix {
            return None;
        }
        // Grow as far as the blocks before the bad one allow.
        match elastic.resize_to_prefix(cap) {
            Ok(report) => Some(self.log_resize(when, available, budget, report)),
            Err(e2) => {
                self.failed_resizes += 1;
                (self.log)(&format!(
                    "[memory] {when}: growing to the cap ({cap} blocks) failed too: {e2}; staying at {held_prefix} blocks"
                ));
                if let Some(f) = &mut self.fault {
                    f.cap = held_prefix;
                }
                None
            }
        }
    }
}

/// Policy options shared by both commands.
#[derive(Debug, Clone)]
pub struct PolicyOptions {
    /// Fraction of the available memory left free for everything else.
    pub headroom: f64,
    /// Bytes always left free on top of the fraction.
    pub headroom_bytes: MemoryBudget,
    /// A grow happens only when the target exceeds the current budget by more than this.
    pub hysteresis: MemoryBudget,
    /// Poll the memory source every this many decode tokens (at least 1).
    pub poll_every: usize,
}

impl PolicyOptions {
    /// The policy parameters; an error naming the flag for a headroom outside [0, 1) or a
    /// poll interval of 0.
    pub fn params(&self) -> Res<PolicyParams> {
        if !(0.0..1.0).contains(&self.headroom) {
            return Err(usage(format!(
                "--headroom {} is not in [0, 1)",
                self.headroom
            )));
        }
        if self.poll_every == 0 {
            return Err(usage("--poll-every 0: poll at least every 1 token"));
        }
        Ok(PolicyParams {
            headroom_fraction: self.headroom,
            headroom_bytes: self.headroom_bytes.bytes(),
            hysteresis_bytes: self.hysteresis.bytes(),
        })
    }
}

/// Sampling options shared by both commands.
#[derive(Debug, Clone)]
pub struct SamplingOptions {
    /// Sampling temperature; 0 is greedy.
    pub temperature: f32,
    /// Nucleus mass for sampling.
    pub top_p: f32,
    /// Sampling seed.
    pub seed: u64,
}

impl SamplingOptions {
    /// The sampling rule; an error naming the flag for a temperature that is negative or not
    /// finite, or a nucleus mass outside (0, 1].
    pub fn sampling(&self) -> Res<Sampling> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(usage(format!(
                "--temperature {}: expected a finite number >= 0 (0 is greedy)",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(usage(format!(
                "--top-p {}: expected a number in (0, 1]",
                self.top_p
            )));
        }
        Ok(if self.temperature > 0.0 {
            Sampling::TopP {
                temperature: self.temperature,
                top_p: self.top_p,
            }
        } else {
            Sampling::Greedy
        })
    }
}

/// `bitstack serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The stack file.
    pub file: PathBuf,
    /// Memory source: auto (cgroup v2, then /proc/meminfo, then the full model),
    /// fixed:SIZE (SIZE available; the headroom is kept free of it, as for file:), or
    /// file:PATH (a file holding e.g. `300MB`, re-read on every poll; it must be readable at
    /// start-up).
    pub memory: MemorySpec,
    /// Read prompts from this file (one per line) instead of stdin.
    pub prompt_file: Option<PathBuf>,
    /// Most new tokens per prompt (at least 1; capped by what the model's context leaves after
    /// the prompt).
    pub max_tokens: usize,
    /// Send prompts as they are instead of wrapping them in the model's chat template.
    pub raw: bool,
    /// Memory policy options.
    pub policy: PolicyOptions,
    /// Sampling options.
    pub sampling: SamplingOptions,
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

/// Settings of [`serve_loop`] (no CLI types).
#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    /// Most new tokens per prompt (at least 1), further capped by the context.
    pub max_tokens: usize,
    /// Send prompts as they are instead of wrapping them in the chat template.
    pub raw: bool,
    /// Poll the memory source every this many decode tokens (0 is taken as 1).
    pub poll_every: usize,
    /// Sampling rule.
    pub sampling: Sampling,
    /// Sampling seed (prompt `n` uses `seed + n`).
    pub seed: u64,
}

/// What a [`serve_loop`] run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServeStats {
    /// Non-empty prompt lines read.
    pub prompts: usize,
    /// Prompts answered.
    pub answered: usize,
    /// Prompts that could not be answered (reported; an empty answer line was written).
    pub failed: usize,
    /// Lines that were not valid UTF-8 (decoded with U+FFFD replacements, and answered).
    pub lossy_lines: usize,
    /// Prompts whose answer was cut short by the model's context.
    pub context_capped: usize,
}

/// Why one prompt had no answer.
enum PromptError {
    /// Writing the answer failed: the caller is gone, stop serving.
    Output(std::io::Error),
    /// The prompt could not be answered: report it and serve the next.
    Prompt(ServeError),
}

impl<E: Into<ServeError>> From<E> for PromptError {
    fn from(e: E) -> Self {
        Self::Prompt(e.into())
    }
}

/// `bitstack serve`: see the module docs.
pub fn serve(args: &ServeConfig) -> Res<()> {
    let params = args.policy.params()?;
    let sampling = args.sampling.sampling()?;
    if args.max_tokens == 0 {
        return Err(usage("--max-tokens 0: generate at least 1 token"));
    }
    // A memory file must answer before anything is loaded: a typo would otherwise serve at
    // the minimum for ever.
    if let MemorySpec::File(p) = &args.memory {
        FileSource { path: p.clone() }
            .available(0)
            .map_err(|reason| ServeError::MemoryFile {
                path: p.clone(),
                reason,
            })?;
    }
    let input: Box<dyn BufRead> = match &args.prompt_file {
        Some(p) => Box::new(std::io::BufReader::new(std::fs::File::open(p).map_err(
            |source| ServeError::PromptFile {
                path: p.clone(),
                source,
            },
        )?)),
        None => Box::new(std::io::stdin().lock()),
    };
    let t = Instant::now();
    let loaded = open_stack(&args.file, None)?;
    let (min, full) = (loaded.elastic.minimum_bytes(), loaded.elastic.full_bytes());
    crate::noteln!(
        "[serve] opened {} at the minimum ({:.1} MB; full {:.1} MB) in {:.2} s; memory {}, headroom {:.0} % + {:.1} MB, hysteresis {:.1} MB, poll every {} tokens",
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
        Box::new(|s: &str| crate::noteln!("{s}")),
    );
    let opts = ServeOptions {
        max_tokens: args.max_tokens,
        raw: args.raw,
        poll_every: args.policy.poll_every,
        sampling,
        seed: args.sampling.seed,
    };
    let mut input = input;
    let stats = serve_loop(
        &loaded,
        &mut follower,
        &opts,
        &mut input,
        &mut std::io::stdout().lock(),
        &mut |s: &str| crate::noteln!("{s}"),
    )?;
    crate::noteln!(
        "[serve] end of input: {} prompts, {} answered, {} failed, {} lines not UTF-8, {} answers cut by the context, {} failed resizes",
        stats.prompts,
        stats.answered,
        stats.failed,
        stats.lossy_lines,
        stats.context_capped,
        follower.failed_resizes()
    );
    Ok(())
}

/// The serving loop: one prompt per line of `input`, one answer line per prompt on `out`,
/// reports on `log`. A line that is not UTF-8 is decoded with U+FFFD replacements (and
/// reported); a prompt that fails (too long for the context, a tokenizer or model error) is
/// reported and answered with an empty line; resizes are the follower's (which never fail the
/// loop). Only reading `input` or writing `out` ends it early, with an error.
pub fn serve_loop(
    loaded: &LoadedStack,
    follower: &mut Follower<'_>,
    opts: &ServeOptions,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    log: &mut dyn FnMut(&str),
) -> Res<ServeStats> {
    let mut stats = ServeStats::default();
    let mut buf = Vec::new();
    for n in 0.. {
        buf.clear();
        let read = input
            .read_until(b'\n', &mut buf)
            .map_err(|source| ServeError::ReadPrompts {
                line: n + 1,
                source,
            })?;
        if read == 0 {
            break;
        }
        let line = match std::str::from_utf8(&buf) {
            Ok(s) => std::borrow::Cow::Borrowed(s),
            Err(e) => {
                stats.lossy_lines += 1;
                log(&format!(
                    "[serve] line {}: not valid UTF-8 ({e}); invalid bytes replaced by U+FFFD",
                    n + 1
                ));
                String::from_utf8_lossy(&buf)
            }
        };
        let prompt = line.trim();
        if prompt.is_empty() {
            continue;
        }
        stats.prompts += 1;
        follower.poll(&format!("before prompt {}", n + 1));
        match answer(loaded, follower, opts, n, prompt, out, log) {
            Ok(capped) => {
                stats.answered += 1;
                stats.context_capped += usize::from(capped);
            }
            Err(PromptError::Output(e)) => return Err(ServeError::WriteAnswer(e)),
            Err(PromptError::Prompt(e)) => {
                stats.failed += 1;
                log(&format!("[serve] prompt {} not answered: {e}", n + 1));
                writeln!(out)
                    .and_then(|()| out.flush())
                    .map_err(ServeError::WriteAnswer)?;
            }
        }
    }
    Ok(stats)
}

/// Answers the prompt of line `n + 1`; `Ok(true)` when the context cut the answer short.
fn answer(
    loaded: &LoadedStack,
    follower: &mut Follower<'_>,
    opts: &ServeOptions,
    n: usize,
    prompt: &str,
    out: &mut dyn Write,
    log: &mut dyn FnMut(&str),
) -> Result<bool, PromptError> {
    let config = loaded.resident.config();
    let stops = stop_ids(loaded);
    let ids = loaded.prompt_ids(prompt, !opts.raw)?;
    let room = config.max_seq.saturating_sub(ids.len());
    if ids.is_empty() || room == 0 {
        return Err(ServeError::PromptTooLong {
            tokens: ids.len(),
            context: config.max_seq,
        }
        .into());
    }
    let max_new = opts.max_tokens.clamp(1, room);
    let capped = max_new < opts.max_tokens;
    if capped {
        log(&format!(
            "[serve] prompt {}: {} prompt tokens leave {room} of the context's {}: at most {max_new} new tokens (not --max-tokens {})",
            n + 1,
            ids.len(),
            config.max_seq,
            opts.max_tokens
        ));
    }
    let poll_every = opts.poll_every.max(1);
    // Prefill + every generated token but the last.
    let mut cache = KvCache::new(config, ids.len() + max_new);
    let mut rng = SplitMix64::new(opts.seed.wrapping_add(n as u64));
    let mut linears = loaded.linears();
    let t0 = Instant::now();
    let mut logits = step(loaded, &linears, &ids, &mut cache)?;
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut generated = Vec::new();
    let mut stream = TextStream { printed: 0 };
    let mut resizes = 0;
    loop {
        let tok = sample(&logits, opts.sampling, &mut rng)?;
        if stops.contains(&tok) {
            break;
        }
        generated.push(tok);
        let text = stream.push(loaded, &generated)?;
        write!(out, "{text}")
            .and_then(|()| out.flush())
            .map_err(PromptError::Output)?;
        if generated.len() >= max_new {
            break;
        }
        if generated.len() % poll_every == 0
            && follower
                .poll(&format!("prompt {}, token {}", n + 1, generated.len()))
                .is_some()
        {
            resizes += 1;
            // Later tokens use the new snapshot; the cache of earlier ones is kept.
            linears = loaded.linears();
        }
        logits = step(loaded, &linears, &[tok], &mut cache)?;
    }
    let decode = t1.elapsed().as_secs_f64();
    writeln!(out)
        .and_then(|()| out.flush())
        .map_err(PromptError::Output)?;
    log(&format!(
        "[serve] prompt {}: {} prompt tokens, {} new, prefill {:.2} s, decode {:.1} tokens/s, {} resizes during decode, {:.1} MB held",
        n + 1,
        ids.len(),
        generated.len(),
        prefill,
        generated.len().saturating_sub(1) as f64 / decode.max(1e-9),
        resizes,
        mb(loaded.elastic.snapshot().held_bytes())
    ));
    Ok(capped)
}

/// `bitstack pressure-demo`.
#[derive(Debug, Clone)]
pub struct PressureConfig {
    /// The stack file.
    pub file: PathBuf,
    /// Available memory per phase, MB (10^6 bytes) unless a unit is given: `300,120,90,200`.
    pub schedule: String,
    /// Tokens generated per phase.
    pub tokens_per_phase: usize,
    /// The prompt (wrapped in the chat template unless `raw`).
    pub prompt: String,
    /// Feed the prompt as plain text, without the chat template.
    pub raw: bool,
    /// Skip timing the reopen-at-the-new-budget alternative.
    pub no_reopen: bool,
    /// Memory policy options.
    pub policy: PolicyOptions,
    /// Sampling options.
    pub sampling: SamplingOptions,
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
                    .map_err(|e| usage(format!("--schedule entry {x:?}: {e}")))
            } else {
                x.parse::<MemoryBudget>()
                    .map(|b| b.bytes())
                    .map_err(|e| usage(format!("--schedule entry {x:?}: {e}")))
            }
        })
        .collect::<Res<Vec<u64>>>()?;
    if v.is_empty() {
        return Err(usage("--schedule: empty schedule"));
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
pub fn pressure_demo(args: &PressureConfig) -> Res<()> {
    let schedule = parse_schedule(&args.schedule)?;
    let params = args.policy.params()?;
    let dir = std::env::temp_dir().join(format!("bitstack-pressure-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let avail_file = dir.join("available");
    let result = pressure_inner(args, &schedule, params, &avail_file);
    let _ = std::fs::remove_dir_all(&dir);
    result.map(|_rows| ())
}

/// The pressure demo with the schedule parsed (bytes per phase) and the file the available
/// memory is written to; returns the phases' rows after printing them.
fn pressure_inner(
    args: &PressureConfig,
    schedule: &[u64],
    params: PolicyParams,
    avail_file: &Path,
) -> Res<Vec<PhaseRow>> {
    let rss0 = memstat::read().rss;
    let t = Instant::now();
    let loaded = open_stack(&args.file, None)?;
    print_pressure_plan(
        args,
        schedule,
        &params,
        &loaded,
        t.elapsed().as_secs_f64(),
        rss0,
    );
    println!(
        "available memory is written to {} and read back by a FileSource on every poll",
        avail_file.display()
    );
    crate::output::write_atomic(avail_file, schedule[0].to_string().as_bytes())?;
    let full = loaded.elastic.full_bytes();
    let source = build_source(&MemorySpec::File(avail_file.to_owned()), full, &params);
    let mut follower = Follower::new(
        &loaded,
        source,
        params,
        Box::new(|s: &str| println!("  {s}")),
    );
    let ids = loaded.prompt_ids(&args.prompt, !args.raw)?;
    let total_tokens = ids.len() + schedule.len() * args.tokens_per_phase + 1;
    let config = loaded.resident.config().clone();
    if total_tokens > config.max_seq {
        return Err(ServeError::ScheduleTooLong {
            tokens: total_tokens,
            context: config.max_seq,
        });
    }
    println!(
        "prompt: {:?} ({} tokens, {})",
        args.prompt,
        ids.len(),
        if args.raw {
            "plain text"
        } else {
            "chat template"
        }
    );
    // One cache and one token stream for the whole demo: resizes never restart generation.
    let mut stream = PressureStream {
        prompt: ids,
        cache: KvCache::new(&config, total_tokens),
        rng: SplitMix64::new(args.sampling.seed),
        sampling: args.sampling.sampling()?,
        // The stream must not end: stop tokens are masked out of the logits.
        stops: stop_ids(&loaded),
        linears: loaded.linears(),
        logits: None,
        tokens: Vec::new(),
    };
    let mut rows: Vec<PhaseRow> = Vec::new();
    for (phase, &available) in schedule.iter().enumerate() {
        let row = run_pressure_phase(
            args,
            &loaded,
            &mut follower,
            &mut stream,
            phase,
            available,
            avail_file,
        )?;
        print_phase(&row);
        rows.push(row);
    }
    let stream_tokens = std::mem::take(&mut stream.tokens);
    drop(stream);
    print_summary(&rows, rss0);
    let full_text = loaded.tokenizer.decode(&stream_tokens)?;
    println!(
        "the whole stream ({} tokens, one KV cache across {} phases):\n{}",
        stream_tokens.len(),
        rows.len(),
        full_text.trim()
    );
    Ok(rows)
}

/// The pressure demo's opening lines: the model's range, the schedule, the policy, and a note
/// for every phase whose memory the policy must clamp to the minimum.
fn print_pressure_plan(
    args: &PressureConfig,
    schedule: &[u64],
    params: &PolicyParams,
    loaded: &LoadedStack,
    open_s: f64,
    rss0: Option<u64>,
) {
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
        let target = MemoryPolicy::new(*params, min, full).target(a);
        if unclamped_target(a, params) < min {
            println!(
                "note: {:.1} MB available is below the minimum after headroom; the policy clamps it to {:.1} MB",
                mb(a),
                mb(target)
            );
        }
    }
}

/// The pressure demo's one token stream, kept across phases and resizes.
struct PressureStream {
    /// The prompt, prefilled as the first step of the first phase.
    prompt: Vec<u32>,
    cache: KvCache,
    rng: SplitMix64,
    sampling: Sampling,
    /// Tokens masked out of the logits so the stream never ends.
    stops: Vec<u32>,
    /// The snapshot the forward steps use; replaced after every resize.
    linears: SnapshotLinears,
    /// The logits of the last step (none before the prompt's prefill).
    logits: Option<Vec<f32>>,
    /// Every generated token.
    tokens: Vec<u32>,
}

/// Timings of one phase's tokens.
struct PhaseTiming {
    /// Seconds of sampling and decode steps (the prompt's prefill excluded).
    compute_s: f64,
    /// Seconds of the prompt's prefill, in the phase that ran it.
    prefill_s: Option<f64>,
    /// Milliseconds spent replacing the snapshot (freeing the dropped blocks).
    free_ms: f64,
    /// The first resize of the phase.
    resize: Option<ResizeReport>,
}

/// One phase of the pressure demo: sets the available memory, follows it, generates
/// `tokens_per_phase` tokens (polling the policy every `poll_every`), measures RSS and, unless
/// `--no-reopen`, the time to open the file afresh at the phase's budget.
fn run_pressure_phase(
    args: &PressureConfig,
    loaded: &LoadedStack,
    follower: &mut Follower<'_>,
    stream: &mut PressureStream,
    phase: usize,
    available: u64,
    avail_file: &Path,
) -> Res<PhaseRow> {
    println!(
        "-- phase {}: available memory set to {:.1} MB",
        phase + 1,
        mb(available)
    );
    crate::output::write_atomic(avail_file, available.to_string().as_bytes())?;
    let start_len = stream.tokens.len();
    let timing = generate_phase_tokens(args, loaded, follower, stream, phase)?;
    let text = loaded.tokenizer.decode(&stream.tokens[start_len..])?;
    trim_allocator();
    loaded.model.file().release_pages();
    let rss = memstat::read().rss;
    let snap = loaded.elastic.snapshot();
    let budget = follower.budget().unwrap_or(snap.held_bytes());
    let reopen_ms = if args.no_reopen {
        None
    } else {
        Some(time_reopen(args, loaded, budget, snap.prefix())?)
    };
    Ok(PhaseRow {
        available,
        budget,
        held: snap.held_bytes(),
        blocks: snap.prefix(),
        rss,
        tokens_per_s: args.tokens_per_phase as f64 / timing.compute_s.max(1e-9),
        prefill_s: timing.prefill_s,
        resize: timing.resize,
        free_ms: timing.free_ms,
        reopen_ms,
        sample: one_line(&text, 100),
    })
}

/// The tokens of one phase: a poll at its start and every `poll_every` tokens (a resize
/// replaces the snapshot; the KV cache of earlier tokens is kept), then sampling and decode.
fn generate_phase_tokens(
    args: &PressureConfig,
    loaded: &LoadedStack,
    follower: &mut Follower<'_>,
    stream: &mut PressureStream,
    phase: usize,
) -> Res<PhaseTiming> {
    let poll_every = args.policy.poll_every.max(1);
    let mut timing = PhaseTiming {
        compute_s: 0.0,
        prefill_s: None,
        free_ms: 0.0,
        resize: None,
    };
    let mut follow = |when: String, stream: &mut PressureStream, timing: &mut PhaseTiming| {
        if let Some(e) = follower.poll(&when) {
            let t = Instant::now();
            // Later tokens use the new snapshot; the KV cache of earlier tokens is kept.
            stream.linears = loaded.linears();
            timing.free_ms += t.elapsed().as_secs_f64() * 1e3;
            timing.resize.get_or_insert(e.report);
        }
    };
    follow(format!("phase {} start", phase + 1), stream, &mut timing);
    for i in 0..args.tokens_per_phase {
        if i > 0 && i % poll_every == 0 {
            follow(
                format!("phase {}, token {}", phase + 1, i),
                stream,
                &mut timing,
            );
        }
        let mut l = match stream.logits.take() {
            // The prompt's prefill is the first step of the stream (timed apart).
            None => {
                let t = Instant::now();
                let l = step(loaded, &stream.linears, &stream.prompt, &mut stream.cache)?;
                timing.prefill_s = Some(t.elapsed().as_secs_f64());
                l
            }
            Some(l) => l,
        };
        let t = Instant::now();
        for &s in &stream.stops {
            if let Some(v) = l.get_mut(s as usize) {
                *v = f32::NEG_INFINITY;
            }
        }
        let tok = sample(&l, stream.sampling, &mut stream.rng)?;
        stream.tokens.push(tok);
        stream.logits = Some(step(loaded, &stream.linears, &[tok], &mut stream.cache)?);
        timing.compute_s += t.elapsed().as_secs_f64();
    }
    Ok(timing)
}

/// The alternative a user has today: open the file again at `budget`. Timed after the phase's
/// RSS reading and dropped before the next phase; the reopened prefix must equal the resized
/// one.
fn time_reopen(
    args: &PressureConfig,
    loaded: &LoadedStack,
    budget: u64,
    resized: usize,
) -> Res<f64> {
    let t = Instant::now();
    let other = open_stack(&args.file, Some(MemoryBudget::from_bytes(budget)))?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let reopened = other.elastic.snapshot().prefix();
    if reopened != resized {
        return Err(ServeError::ReopenMismatch {
            budget,
            reopened,
            resized,
        });
    }
    drop(other);
    trim_allocator();
    loaded.model.file().release_pages();
    Ok(ms)
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
    use crate::compress::{compress, write_compressed, CompressParams, RankRule};
    use crate::gguf::{GgufModel, SyntheticGguf};
    use bitstack_sort::SortMethod;
    use std::cell::RefCell;

    /// A scratch folder removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let d = std::env::temp_dir().join(format!(
                "bitstack-serve-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Self(d)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A tiny random Llama (2 layers, hidden 32, byte-level vocabulary, context 48) as a GGUF
    /// file, compressed into a 4-level stack file with a round-robin order. Returns its path.
    fn tiny_stack_file(dir: &Path) -> PathBuf {
        let tiny = SyntheticGguf {
            context: 48,
            seed: 11,
            embedding_scale: 0.5,
            ..Default::default()
        };
        let gguf = dir.join("tiny.gguf");
        tiny.write(&gguf).unwrap();
        let model = GgufModel::open(&gguf).unwrap();
        let mut params = CompressParams {
            scale: None,
            order: SortMethod::RoundRobin,
            rank: RankRule::Fixed(4),
            ..Default::default()
        };
        params.iavd.levels = 4;
        let out = compress(&model, "calibration is not used without scaling", &params).unwrap();
        let path = dir.join("tiny.bitstack");
        write_compressed(&out, &path).unwrap();
        path
    }

    /// XORs the byte in the middle of the block at `position` of the universal order, in place
    /// (no truncation: the open model's map sees the change). Returns the block.
    fn flip_block_byte(path: &Path, position: usize) -> BlockId {
        use std::io::{Seek, SeekFrom};
        let file = bitstack_format::StackFile::open(path).unwrap();
        let id = file.order().as_slice()[position];
        let (offset, len) = file.block_extent(id).unwrap();
        drop(file);
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let at = offset + len / 2;
        let mut byte = [0u8];
        f.seek(SeekFrom::Start(at)).unwrap();
        std::io::Read::read_exact(&mut f, &mut byte).unwrap();
        byte[0] ^= 0xFF;
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&byte).unwrap();
        f.sync_all().unwrap();
        id
    }

    fn opts(max_tokens: usize) -> ServeOptions {
        ServeOptions {
            max_tokens,
            raw: true,
            poll_every: 1,
            sampling: Sampling::Greedy,
            seed: 0,
        }
    }

    #[test]
    fn serve_survives_a_corrupt_block_and_bad_utf8() {
        let dir = TempDir::new("faults");
        let path = tiny_stack_file(&dir.0);
        let loaded = LoadedStack::open(&path, None).unwrap();
        let floor = loaded.elastic.layout().stacks.len();
        let total = loaded.elastic.layout().order.len();
        let full = loaded.elastic.full_bytes();
        let bad_pos = floor + 5;
        let bad = flip_block_byte(&path, bad_pos);
        let avail = dir.0.join("available");
        std::fs::write(&avail, format!("{}", 2 * full)).unwrap();
        let params = PolicyParams::default();
        let logs = RefCell::new(Vec::<String>::new());
        let push = |s: &str| logs.borrow_mut().push(s.to_owned());

        // Phase 1: a long backoff. The grow fails on the bad block, the model grows up to it,
        // and every prompt is answered, the non-UTF-8 one included.
        let mut follower = Follower::new(
            &loaded,
            build_source(&MemorySpec::File(avail.clone()), full, &params),
            params,
            Box::new(push),
        )
        .with_retry(RetryParams {
            initial: Duration::from_secs(3600),
            max: Duration::from_secs(3600),
        });
        let mut input: &[u8] = b"hello there\n\xff\xfe broken \xc3( bytes\n\n   \nagain\n";
        let mut out = Vec::new();
        let mut log = Vec::new();
        let stats = serve_loop(
            &loaded,
            &mut follower,
            &opts(4),
            &mut input,
            &mut out,
            &mut |s: &str| log.push(s.to_owned()),
        )
        .unwrap();
        let all_logs = logs.borrow().join("\n");
        assert_eq!(
            stats,
            ServeStats {
                prompts: 3,
                answered: 3,
                failed: 0,
                lossy_lines: 1,
                context_capped: 0,
            },
            "{log:?}\n{all_logs}"
        );
        // Every answer ends with a newline (answers themselves may hold some).
        assert!(out.ends_with(b"\n") && out.iter().filter(|&&b| b == b'\n').count() >= 3);
        assert!(
            log.iter().any(|l| l.contains("line 2: not valid UTF-8")),
            "{log:?}"
        );
        let f = follower.fault().expect("the grow failed").clone();
        assert_eq!((f.cap, f.block, f.failures), (bad_pos, Some(bad), 1));
        assert!(f.error.contains("checksum"), "{}", f.error);
        // Backoff: one failed attempt across all polls; the model holds exactly the blocks
        // before the bad one, a consistent prefix.
        assert_eq!(follower.failed_resizes(), 1, "{all_logs}");
        let snap = loaded.elastic.snapshot();
        assert_eq!(snap.prefix(), bad_pos);
        assert!(
            all_logs.contains("FAILED")
                && all_logs.contains(&format!("weight {} level {}", bad.weight, bad.level)),
            "{all_logs}"
        );
        drop(snap);

        // Phase 2: retries due at once. They keep failing (and serving) until the block is
        // repaired; the next retry then loads it and lifts the cap.
        let mut follower = Follower::new(
            &loaded,
            build_source(&MemorySpec::File(avail.clone()), full, &params),
            params,
            Box::new(|_: &str| {}),
        )
        .with_retry(RetryParams {
            initial: Duration::ZERO,
            max: Duration::ZERO,
        });
        let mut input: &[u8] = b"one\ntwo\n";
        let stats = serve_loop(
            &loaded,
            &mut follower,
            &opts(2),
            &mut input,
            &mut Vec::new(),
            &mut |_: &str| {},
        )
        .unwrap();
        assert_eq!(stats.answered, 2);
        assert!(
            follower.failed_resizes() >= 2,
            "{}",
            follower.failed_resizes()
        );
        assert_eq!(loaded.elastic.snapshot().prefix(), bad_pos);
        flip_block_byte(&path, bad_pos);
        let mut input: &[u8] = b"three\n";
        let stats = serve_loop(
            &loaded,
            &mut follower,
            &opts(2),
            &mut input,
            &mut Vec::new(),
            &mut |_: &str| {},
        )
        .unwrap();
        assert_eq!(stats.answered, 1);
        assert!(follower.fault().is_none());
        assert_eq!(loaded.elastic.snapshot().prefix(), total);
    }

    #[test]
    fn serve_bounds_answers_by_the_context() {
        let dir = TempDir::new("context");
        let path = tiny_stack_file(&dir.0);
        let loaded = LoadedStack::open(&path, None).unwrap();
        let params = PolicyParams::default();
        let mut follower = Follower::new(
            &loaded,
            build_source(
                &MemorySpec::Fixed(MemoryBudget::from_bytes(u64::MAX / 4)),
                loaded.elastic.full_bytes(),
                &params,
            ),
            params,
            Box::new(|_: &str| {}),
        );
        // Byte-level tokens, no merges: a prompt of n bytes is n tokens; the context is 48.
        let long = "x".repeat(60);
        let text = format!("ten bytes!\n{long}\nshort\n");
        let mut input = text.as_bytes();
        let mut out = Vec::new();
        let mut log = Vec::new();
        let stats = serve_loop(
            &loaded,
            &mut follower,
            &opts(1000),
            &mut input,
            &mut out,
            &mut |s: &str| log.push(s.to_owned()),
        )
        .unwrap();
        assert_eq!(
            (
                stats.prompts,
                stats.answered,
                stats.failed,
                stats.context_capped
            ),
            (3, 2, 1, 2),
            "{log:?}"
        );
        // An answer per prompt, each ending with a newline (the failed one is empty).
        let out = String::from_utf8_lossy(&out).into_owned();
        assert!(
            out.ends_with('\n') && out.matches('\n').count() >= 3,
            "{out:?}"
        );
        assert!(
            log.iter()
                .any(|l| l.contains("prompt 2 not answered") && l.contains("context is 48")),
            "{log:?}"
        );
        assert!(
            log.iter().any(|l| l.contains("at most 38 new tokens")),
            "{log:?}"
        );
    }

    #[test]
    fn pressure_demo_shrinks_and_grows_one_stream() {
        let dir = TempDir::new("pressure");
        let path = tiny_stack_file(&dir.0);
        let loaded = open_stack(&path, None).unwrap();
        let (min, full) = (loaded.elastic.minimum_bytes(), loaded.elastic.full_bytes());
        drop(loaded);
        assert!(min < full, "{min} {full}");
        let config = PressureConfig {
            file: path.clone(),
            schedule: String::new(),
            tokens_per_phase: 3,
            prompt: "hi".into(),
            raw: true,
            no_reopen: false,
            policy: PolicyOptions {
                headroom: 0.0,
                headroom_bytes: MemoryBudget::from_bytes(0),
                hysteresis: MemoryBudget::from_bytes(0),
                poll_every: 1,
            },
            sampling: SamplingOptions {
                temperature: 0.0,
                top_p: 1.0,
                seed: 0,
            },
        };
        let params = config.policy.params().unwrap();
        let middle = min + (full - min) / 2;
        let schedule = [full, min, middle, full];
        let rows = pressure_inner(&config, &schedule, params, &dir.0.join("available")).unwrap();
        assert_eq!(rows.len(), 4);
        for (row, &available) in rows.iter().zip(&schedule) {
            assert_eq!(row.available, available);
            assert!(
                row.held <= row.budget.max(min),
                "{} > {}",
                row.held,
                row.budget
            );
            // The reopen at the phase's budget ran and picked the same prefix.
            assert!(row.reopen_ms.is_some());
        }
        assert!(
            rows[1].blocks < rows[0].blocks,
            "shrink: {} -> {}",
            rows[0].blocks,
            rows[1].blocks
        );
        assert!(rows[2].blocks > rows[1].blocks && rows[2].blocks < rows[0].blocks);
        assert_eq!(
            rows[3].blocks, rows[0].blocks,
            "grows back to the full stack"
        );
        assert!(rows[1].resize.is_some() && rows[3].resize.is_some());
    }

    #[test]
    fn serve_rejects_bad_flags_before_work() {
        let args = |memory: MemorySpec| ServeConfig {
            file: "/nonexistent/model.bitstack".into(),
            memory,
            prompt_file: None,
            max_tokens: 8,
            raw: true,
            policy: PolicyOptions {
                headroom: 0.05,
                headroom_bytes: MemoryBudget::from_bytes(0),
                hysteresis: MemoryBudget::from_bytes(4_000_000),
                poll_every: 4,
            },
            sampling: SamplingOptions {
                temperature: 0.0,
                top_p: 0.9,
                seed: 0,
            },
        };
        let e = serve(&args(MemorySpec::File("/nonexistent/avail".into())))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/avail"), "{e}");
        let mut a = args(MemorySpec::Auto);
        a.max_tokens = 0;
        assert!(serve(&a)
            .unwrap_err()
            .to_string()
            .contains("--max-tokens 0"));
        for t in [f32::NAN, -1.0, f32::INFINITY] {
            let mut a = args(MemorySpec::Auto);
            a.sampling.temperature = t;
            assert!(
                serve(&a).unwrap_err().to_string().contains("--temperature"),
                "{t}"
            );
        }
        let mut a = args(MemorySpec::Auto);
        a.sampling.top_p = 0.0;
        assert!(serve(&a).unwrap_err().to_string().contains("--top-p"));
        // Past the flags, the missing model is named.
        let e = serve(&args(MemorySpec::Auto)).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/model.bitstack"), "{e}");
    }

    #[test]
    fn fixed_and_file_apply_the_same_headroom() {
        let p = PolicyParams {
            headroom_fraction: 0.05,
            headroom_bytes: 10_000_000,
            hysteresis_bytes: 4_000_000,
        };
        let dir = TempDir::new("headroom");
        let f = dir.0.join("avail");
        std::fs::write(&f, "150MB").unwrap();
        let fixed = build_source(
            &MemorySpec::Fixed(MemoryBudget::from_bytes(150_000_000)),
            426_000_000,
            &p,
        );
        let file = build_source(&MemorySpec::File(f), 426_000_000, &p);
        let (a, b) = (fixed.probe(0).0.unwrap(), file.probe(0).0.unwrap());
        assert_eq!(a, b);
        let mut pol = MemoryPolicy::new(p, 80_000_000, 426_000_000);
        assert_eq!(
            pol.decide(Ok(a)),
            Decision::Resize(MemoryBudget::from_bytes(132_500_000))
        );
        assert_eq!(
            MemorySpec::Fixed(MemoryBudget::from_bytes(150_000_000)).to_string(),
            "fixed:150.0MB"
        );
    }

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
