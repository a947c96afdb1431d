//! `bitstack compress`: a model (GGUF file or Hugging Face folder) into a stack file.

use crate::common::{mb, mib, named, open_source, print_phases, read_text, usage, Res};
use bitstack_examples::compress::{
    compress, write_compressed, CompressParams, OrderSettings, RankRule,
};
use bitstack_examples::output::check_output;
use bitstack_examples::{noteln, outln};
use bitstack_linalg::ScaleParams;
use bitstack_sort::SortMethod;
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The most residual blocks per weight `compress --levels` accepts.
const MAX_LEVELS: usize = 1024;

#[derive(Args, Debug, Clone)]
pub(crate) struct CalibArgs {
    /// Calibration windows (the paper uses 256 of 2048 tokens; see `compress` docs).
    #[arg(long, default_value_t = 32)]
    calib_windows: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    calib_seq_len: usize,
    /// Residual blocks per weight (n).
    #[arg(long, default_value_t = 16)]
    levels: usize,
    /// Singular vectors per block (k): a number, `auto` (about 0.5 bits per weight per level
    /// of vectors, k in 4..=16, by weight shape) or `auto:BITS`.
    #[arg(long, default_value = "auto")]
    rank: RankRule,
    /// Storage of the factor vectors A, B: `i8` (default: int8 with one f32 scale per
    /// singular vector and factor, half the vector bytes; each level's residual is taken
    /// against the int8 values, so a level loses almost nothing and a budget holds ~20 %
    /// more levels: on SmolLM2-135M perplexity at 110 MB fell from 121.6 to 78.3) or `f16`
    /// (the paper's layout, a format-1.0 file old readers open). Recorded per stack.
    #[arg(long, default_value = "i8")]
    factors: bitstack_core::FactorDtype,
    /// Decompose the raw weights without activation-aware scaling (ablation).
    #[arg(long)]
    no_scaling: bool,
    /// Power α of the activation norms in the scale, `s = norm^α` (1: the paper's rule; 0
    /// is the same as `--no-scaling`). Chosen on validation text, never on reported windows.
    #[arg(long, default_value_t = 1.0)]
    scale_exponent: f32,
    /// Universal order: first-order (default, the best measured: Average's criterion to first
    /// order from 3 gradients of the loss on 4 windows of 256 calibration tokens, about a
    /// minute on 2 cores), proxy-sensitive (the proxy weighted by loss sensitivities from 211
    /// forward evaluations), roundrobin (the best measured with no forward pass), proxy,
    /// random, or the paper's average / greedy (4 windows of 256 tokens, 3150 evaluations at
    /// 16 levels: about an hour; `bitstack sort` runs them resumably on an existing file).
    #[arg(long, default_value = "first-order", value_parser = compress_order)]
    order: SortMethod,
}

/// `--order`: a [`SortMethod`] that computes an order (not `import`, which applies one).
fn compress_order(s: &str) -> Result<SortMethod, String> {
    match s.parse::<SortMethod>().map_err(|e| e.to_string())? {
        SortMethod::Import => Err(
            "import applies an order computed elsewhere: compress with another order, then use `bitstack sort --method import`"
                .into(),
        ),
        m => Ok(m),
    }
}

impl CalibArgs {
    fn params(&self) -> CompressParams {
        let mut p = CompressParams {
            calib_windows: self.calib_windows,
            calib_seq_len: self.calib_seq_len,
            scale: (!self.no_scaling).then_some(ScaleParams {
                exponent: self.scale_exponent,
                ..ScaleParams::default()
            }),
            order: self.order,
            order_settings: OrderSettings::for_method(self.order),
            ..Default::default()
        };
        p.iavd.levels = self.levels;
        p.iavd.factors = self.factors;
        p.rank = self.rank;
        p
    }
}

#[derive(Args, Debug)]
pub(crate) struct CompressArgs {
    /// A `.gguf` file or a Hugging Face model directory.
    pub(crate) model: PathBuf,
    /// Calibration text (e.g. ../shared/data/wikitext2-train-head.txt).
    #[arg(long)]
    pub(crate) calib: PathBuf,
    /// Output stack file.
    #[arg(short, long)]
    pub(crate) output: PathBuf,
    #[command(flatten)]
    pub(crate) calib_args: CalibArgs,
}
/// `compress`'s checks of its flags, before anything is read.
fn check_compress_flags(args: &CalibArgs) -> Res<()> {
    if !(1..=MAX_LEVELS).contains(&args.levels) {
        return Err(usage(format!(
            "--levels {}: expected 1 to {MAX_LEVELS} residual blocks per weight",
            args.levels
        )));
    }
    if args.calib_windows == 0 {
        return Err(usage("--calib-windows must be at least 1"));
    }
    if args.calib_seq_len < 2 {
        return Err(usage("--calib-seq-len must be at least 2 tokens"));
    }
    Ok(())
}

/// `--rank K` against the model's weight shapes: K above min(rows, cols) of a weight is an
/// error (its blocks would hold more vectors than the weight has dimensions); K whose blocks
/// cost more than the dense f16 weight gets a note.
fn check_rank(rule: RankRule, c: &bitstack_examples::gguf::LlamaConfig) -> Res<()> {
    let RankRule::Fixed(k) = rule else {
        return Ok(());
    };
    let kinds = bitstack_examples::llama::LinearKind::ALL;
    for kind in kinds {
        let (r, cc) = kind.shape(c);
        if k > r.min(cc) {
            return Err(usage(format!(
                "--rank {k}: larger than min(rows, cols) = {} of {} ({r}x{cc}); use at most {} or `auto`",
                r.min(cc),
                kind.tensor_name(0),
                kinds
                    .iter()
                    .map(|k| {
                        let (r, c) = k.shape(c);
                        r.min(c)
                    })
                    .min()
                    .unwrap_or(1)
            )));
        }
        // Bits of one block (signs + f16 vectors) against the dense f16 weight.
        let block_bits = (r * cc) as u128 + 16 * (k as u128) * ((r + cc) as u128);
        if block_bits >= 16 * (r * cc) as u128 {
            noteln!(
                "note: --rank {k}: one block of {} ({r}x{cc}) is larger than the dense f16 weight",
                kind.tensor_name(0)
            );
        }
    }
    Ok(())
}

pub(crate) fn run_compress(
    model: &Path,
    calib: &Path,
    output: &Path,
    args: &CalibArgs,
) -> Res<Vec<(String, f64)>> {
    check_compress_flags(args)?;
    check_output(output, &[model, calib])?;
    let text = read_text("--calib", calib)?;
    let t = Instant::now();
    let source = open_source(model)?;
    let mut phases = vec![("open model".to_owned(), t.elapsed().as_secs_f64())];
    check_rank(args.rank, source.config())?;
    let params = args.params();
    noteln!(
        "compressing {} with {} calibration windows of {} tokens, {} levels, k {}, activation scaling {}, order {}",
        model.display(),
        params.calib_windows,
        params.calib_seq_len,
        params.iavd.levels,
        params.rank,
        if params.scale.is_some() { "on" } else { "off" },
        params.order_settings.describe(params.order)
    );
    let out = compress(source.as_ref(), &text, &params)?;
    phases.extend(out.phases.iter().map(|p| (p.name.to_owned(), p.seconds)));
    // The output was checked before the work; check again (it may have changed meanwhile).
    check_output(output, &[model, calib])?;
    let w = write_compressed(&out, output).map_err(|e| named(output, e))?;
    phases.push(("write stack file".to_owned(), w));
    let total: f64 = phases.iter().map(|p| p.1).sum();
    phases.push(("total".to_owned(), total));
    let size = std::fs::metadata(output)
        .map_err(|e| named(output, e))?
        .len();
    outln!(
        "wrote {} ({:.1} MB, {:.1} MiB); mean relative error (scaled space) after level 1 / 4 / 16: {}",
        output.display(),
        mb(size),
        mib(size),
        [0usize, 3, 15]
            .iter()
            .filter_map(|&i| out.mean_relative_errors.get(i))
            .map(|e| format!("{e:.4}"))
            .collect::<Vec<_>>()
            .join(" / ")
    )?;
    print_phases(&phases)?;
    Ok(phases)
}

/// `bitstack compress`.
pub(crate) fn run(a: &CompressArgs) -> Res<()> {
    run_compress(&a.model, &a.calib, &a.output, &a.calib_args).map(|_| ())
}
