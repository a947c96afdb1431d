//! `bitstack serve`: line-based generation that follows the memory the device has (the flags
//! of [`bitstack_examples::serve::serve`]), and the policy and sampling flags `pressure-demo`
//! shares.

use crate::common::Res;
use bitstack_core::MemoryBudget;
use bitstack_examples::serve::{
    MemorySpec, PolicyOptions, SamplingOptions, ServeConfig, ServeError,
};
use clap::Args;
use std::path::PathBuf;

/// Policy options shared by both commands.
#[derive(Args, Debug, Clone)]
pub(crate) struct PolicyArgs {
    /// Fraction of the available memory left free for everything else.
    #[arg(long, default_value_t = 0.05)]
    pub(crate) headroom: f64,
    /// Bytes always left free on top of the fraction.
    #[arg(long, default_value = "0MB")]
    pub(crate) headroom_bytes: MemoryBudget,
    /// A grow happens only when the target exceeds the current budget by more than this.
    #[arg(long, default_value = "4MB")]
    pub(crate) hysteresis: MemoryBudget,
    /// Poll the memory source every this many decode tokens (at least 1).
    #[arg(long, default_value_t = 16, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub(crate) poll_every: usize,
}

impl PolicyArgs {
    pub(crate) fn options(&self) -> PolicyOptions {
        PolicyOptions {
            headroom: self.headroom,
            headroom_bytes: self.headroom_bytes,
            hysteresis: self.hysteresis,
            poll_every: self.poll_every,
        }
    }
}

/// Sampling options shared by both commands.
#[derive(Args, Debug, Clone)]
pub(crate) struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) temperature: f32,
    /// Nucleus mass for sampling.
    #[arg(long, default_value_t = 0.9)]
    pub(crate) top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
}

impl SamplingArgs {
    pub(crate) fn options(&self) -> SamplingOptions {
        SamplingOptions {
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
        }
    }
}

/// `bitstack serve`.
#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// The stack file.
    pub(crate) file: PathBuf,
    /// Memory source: auto (cgroup v2, then /proc/meminfo, then the full model),
    /// fixed:SIZE (SIZE available; the headroom is kept free of it, as for file:), or
    /// file:PATH (a file holding e.g. `300MB`, re-read on every poll; it must be readable at
    /// start-up).
    #[arg(long, default_value = "auto")]
    pub(crate) memory: MemorySpec,
    /// Read prompts from this file (one per line) instead of stdin.
    #[arg(long)]
    pub(crate) prompt_file: Option<PathBuf>,
    /// Most new tokens per prompt (at least 1; capped by what the model's context leaves after
    /// the prompt).
    #[arg(long, default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub(crate) max_tokens: usize,
    /// Send prompts as they are instead of wrapping them in the model's chat template.
    #[arg(long)]
    pub(crate) raw: bool,
    /// Memory policy options.
    #[command(flatten)]
    pub(crate) policy: PolicyArgs,
    /// Sampling options.
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
}

/// A library error as the command reports it: usage and output-path errors keep their types
/// (the exit status depends on them), the rest is reported as it reads.
pub(crate) fn boxed(e: ServeError) -> Box<dyn std::error::Error> {
    match e {
        ServeError::Usage(u) => Box::new(u),
        ServeError::Output(o) => Box::new(o),
        e => Box::new(e),
    }
}

/// `bitstack serve`.
pub(crate) fn run(a: &ServeArgs) -> Res<()> {
    let config = ServeConfig {
        file: a.file.clone(),
        memory: a.memory.clone(),
        prompt_file: a.prompt_file.clone(),
        max_tokens: a.max_tokens,
        raw: a.raw,
        policy: a.policy.options(),
        sampling: a.sampling.options(),
    };
    bitstack_examples::serve::serve(&config).map_err(boxed)
}
