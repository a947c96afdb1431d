//! `bitstack pressure-demo`: generation under a scripted schedule of available memory (the
//! flags of [`bitstack_examples::serve::pressure_demo`]).

use crate::common::Res;
use crate::serve::{boxed, PolicyArgs, SamplingArgs};
use bitstack_examples::serve::PressureConfig;
use clap::Args;
use std::path::PathBuf;

/// `bitstack pressure-demo`.
#[derive(Args, Debug)]
pub(crate) struct PressureArgs {
    /// The stack file.
    pub(crate) file: PathBuf,
    /// Available memory per phase, MB (10^6 bytes) unless a unit is given: `300,120,90,200`.
    #[arg(long, default_value = "300,120,90,200")]
    pub(crate) schedule: String,
    /// Tokens generated per phase.
    #[arg(long, default_value_t = 48)]
    pub(crate) tokens_per_phase: usize,
    /// The prompt (wrapped in the chat template unless --raw).
    #[arg(
        long,
        default_value = "Tell me a long story about a lighthouse keeper and the sea."
    )]
    pub(crate) prompt: String,
    /// Feed the prompt as plain text, without the chat template (base models have none).
    #[arg(long)]
    pub(crate) raw: bool,
    /// Skip timing the reopen-at-the-new-budget alternative.
    #[arg(long)]
    pub(crate) no_reopen: bool,
    /// Memory policy options.
    #[command(flatten)]
    pub(crate) policy: PolicyArgs,
    /// Sampling options.
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
}

/// `bitstack pressure-demo`.
pub(crate) fn run(a: &PressureArgs) -> Res<()> {
    let config = PressureConfig {
        file: a.file.clone(),
        schedule: a.schedule.clone(),
        tokens_per_phase: a.tokens_per_phase,
        prompt: a.prompt.clone(),
        raw: a.raw,
        no_reopen: a.no_reopen,
        policy: a.policy.options(),
        sampling: a.sampling.options(),
    };
    bitstack_examples::serve::pressure_demo(&config).map_err(boxed)
}
