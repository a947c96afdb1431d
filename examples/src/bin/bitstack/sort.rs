//! `bitstack sort`: reorder a stack file's universal stack.

use crate::common::{named, read_text, usage, Res};
use bitstack_core::{BlockId, ResidualBlock, UniversalOrder};
use bitstack_examples::gguf::{open_model, ModelSource};
use bitstack_examples::llama::LlamaResident;
use bitstack_examples::output::check_output;
use bitstack_examples::stackmodel::StackModel;
use bitstack_examples::{note, noteln, outln};
use bitstack_format::StackFile;
use bitstack_sort::{
    sort_average, sort_greedy, splice_orders, LevelCap, ProxyConfig, SortConfig, SortMethod,
    SortProgress, StackEvaluator,
};
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args, Debug)]
pub(crate) struct SortArgs {
    /// The stack file to reorder (its blocks are reused; only the order changes).
    file: PathBuf,
    /// average | greedy | random | roundrobin | proxy | proxy-sensitive | first-order | import.
    #[arg(long, value_parser = clap::value_parser!(SortMethod))]
    method: SortMethod,
    /// Output stack file.
    #[arg(short, long)]
    output: PathBuf,
    /// Scoring text for average / greedy (e.g. ../shared/data/wikitext2-train-head.txt).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// The original model, for proxy (it needs the uncompressed weights).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Scoring windows for average / greedy (the paper uses 32 of 2048 tokens).
    #[arg(long, default_value_t = 8)]
    scoring_seqs: usize,
    /// Tokens per scoring window.
    #[arg(long, default_value_t = 256)]
    scoring_seq_len: usize,
    /// Score only the first N levels with average / greedy; the rest keeps the input
    /// file's order (which must be level-major, as proxy, roundrobin and average are).
    #[arg(long)]
    max_level: Option<u16>,
    /// proxy-sensitive: blocks each weight is set to when its loss sensitivity is measured:
    /// fewer than --probe-base cuts it (1 = the floor), more adds blocks to it.
    #[arg(long, default_value_t = 1)]
    probe_blocks: u16,
    /// proxy-sensitive: blocks every weight holds while each is probed (65535: all of them).
    #[arg(long, default_value_t = 2)]
    probe_base: u16,
    /// Checkpoint file for resumable average / greedy sorts.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Seed for random.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Proxy: rank a block by the share of its layer's output energy it restores (relative,
    /// default) or by the raw activation-weighted error it removes (absolute).
    #[arg(long, default_value = "relative")]
    proxy_normalisation: String,
    /// proxy / proxy-sensitive: also write the numbers behind the order as JSON (per weight:
    /// name, the activation-weighted errors `E_l`, the measured loss sensitivity, the block
    /// scores), for analysis.
    #[arg(long)]
    dump_scores: Option<PathBuf>,
    /// import: the order as a JSON list of `[weight, level]` pairs (0-based; every block
    /// once, each weight's blocks in level order), e.g. computed by another engine.
    #[arg(long)]
    order_json: Option<PathBuf>,
    /// average / greedy / proxy-sensitive: what an evaluation measures on the scoring text:
    /// `ce` (the cross-entropy, the paper's perplexity) or `kl` (the mean KL divergence from
    /// the full stack's next-token distributions).
    #[arg(long, default_value = "ce")]
    scoring_loss: String,
    /// average / greedy / proxy-sensitive: the first N tokens of each scoring window are
    /// context only, not scored.
    #[arg(long, default_value_t = 0)]
    scoring_skip: usize,
    /// first-order: blocks per weight at which a gradient is taken (comma-separated); each
    /// block is scored with the gradient at the nearest of them.
    #[arg(long, default_value = "2,3,4")]
    first_order_bases: String,
}

/// `sort`'s checks of its flags and outputs, before the file is read.
fn check_sort_flags(args: &SortArgs) -> Res<()> {
    if !["relative", "absolute"].contains(&args.proxy_normalisation.as_str()) {
        return Err(usage(format!(
            "--proxy-normalisation {:?}: expected relative or absolute",
            args.proxy_normalisation
        )));
    }
    if !["ce", "kl"].contains(&args.scoring_loss.as_str()) {
        return Err(usage(format!(
            "--scoring-loss {:?}: expected ce or kl",
            args.scoring_loss
        )));
    }
    if args.scoring_seqs == 0 || args.scoring_seq_len < 2 {
        return Err(usage(
            "--scoring-seqs must be at least 1 and --scoring-seq-len at least 2",
        ));
    }
    if args.scoring_skip >= args.scoring_seq_len {
        return Err(usage(format!(
            "--scoring-skip {} leaves no scored token in windows of {}",
            args.scoring_skip, args.scoring_seq_len
        )));
    }
    if args.method == SortMethod::FirstOrder
        && args
            .first_order_bases
            .split(',')
            .any(|b| b.trim().parse::<u16>().map_or(true, |b| b == 0))
    {
        return Err(usage(format!(
            "--first-order-bases {:?}: expected comma-separated block counts >= 1",
            args.first_order_bases
        )));
    }
    let needs = |flag: &str, present: bool, methods: &[SortMethod]| {
        if !present && methods.contains(&args.method) {
            Err(usage(format!("--method {} needs {flag}", args.method)))
        } else {
            Ok(())
        }
    };
    needs(
        "--order-json FILE",
        args.order_json.is_some(),
        &[SortMethod::Import],
    )?;
    needs(
        "--calib TEXT",
        args.calib.is_some(),
        &[
            SortMethod::Average,
            SortMethod::Greedy,
            SortMethod::ProxySensitive,
            SortMethod::FirstOrder,
        ],
    )?;
    needs(
        "--model (the original weights)",
        args.model.is_some(),
        &[SortMethod::Proxy, SortMethod::ProxySensitive],
    )?;
    let mut inputs = vec![args.file.as_path()];
    for p in [&args.calib, &args.model, &args.order_json, &args.checkpoint]
        .into_iter()
        .flatten()
    {
        inputs.push(p.as_path());
    }
    check_output(&args.output, &inputs)?;
    if let Some(d) = &args.dump_scores {
        inputs.push(args.output.as_path());
        check_output(d, &inputs)?;
    }
    Ok(())
}

/// `bitstack sort`: checks the flags, computes the order with the chosen method, writes the
/// reordered file.
pub(crate) fn run(args: &SortArgs) -> Res<()> {
    check_sort_flags(args)?;
    let sm = StackModel::open(&args.file).map_err(|e| named(&args.file, e))?;
    let t = Instant::now();
    let (order, detail) = match args.method {
        SortMethod::RoundRobin => (
            UniversalOrder::round_robin(stack_levels(sm.file()))?,
            String::new(),
        ),
        SortMethod::Import => order_import(args, sm.file())?,
        SortMethod::Random => (
            bitstack_sort::sort_random(&stack_levels(sm.file()), args.seed)?,
            format!("seed {}", args.seed),
        ),
        SortMethod::Proxy => order_proxy(args, sm.file())?,
        SortMethod::ProxySensitive => order_proxy_sensitive(args, &sm)?,
        SortMethod::FirstOrder => order_first_order(args, &sm)?,
        SortMethod::Average | SortMethod::Greedy => order_by_evaluation(args, &sm)?,
    };
    write_sorted(args, sm.file(), order, &detail, t.elapsed().as_secs_f64())
}

/// Blocks per weight of `file`, in stack order.
fn stack_levels(file: &StackFile) -> Vec<u16> {
    file.stacks().iter().map(|m| m.levels).collect()
}

/// Every block of weight `w`, read from `args.file`.
fn read_all_blocks(args: &SortArgs, file: &StackFile, w: usize) -> Res<Vec<ResidualBlock>> {
    (0..file.stacks()[w].levels)
        .map(|l| {
            file.read_block(BlockId {
                weight: w as u32,
                level: l,
            })
            .map_err(|e| named(&args.file, e))
        })
        .collect()
}

/// The f16 resident tensors the evaluation-based methods run the model with.
fn f16_resident(sm: &StackModel) -> Res<LlamaResident> {
    Ok(LlamaResident::from_source_with(
        sm,
        bitstack_examples::llama::EmbeddingPrecision::F16,
    )?)
}

/// `import`: the order from `--order-json`.
fn order_import(args: &SortArgs, file: &StackFile) -> Res<(UniversalOrder, String)> {
    let path = args
        .order_json
        .as_ref()
        .ok_or("--method import needs --order-json FILE")?;
    let pairs: Vec<(u32, u16)> =
        serde_json::from_str(&read_text("--order-json", path)?).map_err(|e| {
            format!(
                "{}: expected a JSON list of [weight, level] pairs: {e}",
                path.display()
            )
        })?;
    let ids = pairs
        .into_iter()
        .map(|(weight, level)| BlockId { weight, level })
        .collect();
    Ok((
        UniversalOrder::new(stack_levels(file), ids)?,
        format!("imported from {}", path.display()),
    ))
}

/// `proxy`: blocks ranked by the activation-weighted error they remove.
fn order_proxy(args: &SortArgs, file: &StackFile) -> Res<(UniversalOrder, String)> {
    let (originals, blocks) = proxy_inputs(args, file)?;
    let weights = proxy_weights(file, &originals, &blocks);
    let t = Instant::now();
    let normalisation = match args.proxy_normalisation.as_str() {
        "relative" => bitstack_sort::ProxyNormalisation::Relative,
        "absolute" => bitstack_sort::ProxyNormalisation::Absolute,
        other => {
            return Err(
                format!("--proxy-normalisation {other:?}: expected relative or absolute").into(),
            )
        }
    };
    let config = ProxyConfig {
        normalisation,
        ..Default::default()
    };
    let out = bitstack_sort::sort_proxy(&weights, &config)?;
    if let Some(path) = &args.dump_scores {
        dump_scores(path, file, &out, None)?;
    }
    Ok((
        out.order,
        format!("proxy itself {:.2} s", t.elapsed().as_secs_f64()),
    ))
}

/// `proxy-sensitive`: the proxy weighted by each weight's measured loss sensitivity.
fn order_proxy_sensitive(args: &SortArgs, sm: &StackModel) -> Res<(UniversalOrder, String)> {
    let file = sm.file();
    let (originals, blocks) = proxy_inputs(args, file)?;
    let weights = proxy_weights(file, &originals, &blocks);
    let resident = f16_resident(sm)?;
    let (calib, mut ev) = sort_evaluator(args, sm, &resident)?;
    let (n, l) = (args.scoring_seqs, args.scoring_seq_len);
    let mut last = Instant::now();
    let mut observer = |p: &SortProgress| {
        if last.elapsed().as_secs_f64() > 2.0 || p.done == p.total {
            last = Instant::now();
            note!("\rsensitivity: {p}   ");
        }
    };
    let sens = bitstack_sort::measure_sensitivity(
        &mut ev,
        bitstack_sort::SensitivityProbe {
            base_blocks: args.probe_base,
            probe_blocks: args.probe_blocks,
        },
        &mut observer,
    )?;
    noteln!();
    drop(ev);
    let out = bitstack_sort::sort_proxy_sensitive(&weights, &sens, &ProxyConfig::default())?;
    if let Some(path) = &args.dump_scores {
        dump_scores(path, file, &out, Some(&sens))?;
    }
    Ok((
        out.order,
        format!(
            "{} evaluations of {n} x {l} tokens of {} (each weight moved from {} to {} block(s)) in {:.1} s, then the proxy in {:.2} s",
            sens.evaluations,
            calib.display(),
            args.probe_base,
            args.probe_blocks,
            sens.elapsed.as_secs_f64(),
            out.elapsed.as_secs_f64()
        ),
    ))
}

/// `first-order`: blocks ranked by the loss change a gradient predicts.
fn order_first_order(args: &SortArgs, sm: &StackModel) -> Res<(UniversalOrder, String)> {
    let resident = f16_resident(sm)?;
    let (calib, mut ev) = sort_evaluator(args, sm, &resident)?;
    let bases = args
        .first_order_bases
        .split(',')
        .map(|b| b.trim().parse::<u16>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("--first-order-bases {:?}: {e}", args.first_order_bases))?;
    let config = bitstack_sort::FirstOrderConfig { bases };
    let mut observer = |p: &SortProgress| note!("\rfirst-order: {p}   ");
    let out = bitstack_sort::sort_first_order(&mut ev, &config, &mut observer)?;
    noteln!();
    if let Some(path) = &args.dump_scores {
        let doc = FirstOrderDump {
            bases: &config.bases,
            weights: sm
                .file()
                .stacks()
                .iter()
                .zip(&out.scores)
                .map(|(m, f)| FirstOrderWeight {
                    name: &m.name,
                    first_order: f,
                })
                .collect(),
        };
        bitstack_examples::output::write_atomic(
            path,
            serde_json::to_string_pretty(&doc)?.as_bytes(),
        )?;
    }
    Ok((
        out.order,
        format!(
            "{} gradient(s) (bases {}) on {} x {} tokens of {} in {:.1} s",
            out.evaluations,
            args.first_order_bases,
            args.scoring_seqs,
            args.scoring_seq_len,
            calib.display(),
            out.elapsed.as_secs_f64()
        ),
    ))
}

/// `average` / `greedy`: the paper's search, each candidate block scored by an evaluation.
fn order_by_evaluation(args: &SortArgs, sm: &StackModel) -> Res<(UniversalOrder, String)> {
    let file = sm.file();
    let levels = stack_levels(file);
    let resident = f16_resident(sm)?;
    let (calib, ev) = sort_evaluator(args, sm, &resident)?;
    let (n, l) = (args.scoring_seqs, args.scoring_seq_len);
    let cap = args.max_level.unwrap_or(u16::MAX);
    let mut ev = LevelCap { inner: ev, cap };
    let config = SortConfig {
        checkpoint: args.checkpoint.clone(),
        // Old checkpoints (plain cross-entropy, every position) keep their key.
        problem_key: format!(
            "{} {} {}x{} cap {cap}{}",
            args.file.display(),
            calib.display(),
            n,
            l,
            if args.scoring_loss == "ce" && args.scoring_skip == 0 {
                String::new()
            } else {
                format!(" loss {} skip {}", args.scoring_loss, args.scoring_skip)
            }
        ),
    };
    let mut last = Instant::now();
    let mut observer = |p: &SortProgress| {
        if last.elapsed().as_secs_f64() > 2.0 || p.done == p.total {
            last = Instant::now();
            note!(
                "\r{}: level {}/{} evaluation {}/{}, {:.0}s elapsed, ETA {}   ",
                args.method,
                p.level,
                p.last_level,
                p.done,
                p.total,
                p.elapsed.as_secs_f64(),
                p.eta
                    .map_or("?".into(), |e| format!("{:.0}s", e.as_secs_f64()))
            );
        }
    };
    let out = if args.method == SortMethod::Average {
        sort_average(&mut ev, &config, &mut observer)?
    } else {
        ev.inner.prepare_greedy()?;
        sort_greedy(&mut ev, &config, &mut observer)?
    };
    noteln!();
    let scored_levels = (0..ev.num_weights())
        .map(|w| ev.levels(w))
        .max()
        .unwrap_or(0);
    let order = if out.order.levels() == levels.as_slice() {
        out.order
    } else {
        splice_orders(&out.order, file.order())?
    };
    Ok((
        order,
        format!(
            "{} evaluations of {n} x {l} tokens; blocks 2..={scored_levels} of each weight scored{}",
            out.evaluations,
            if scored_levels < *levels.iter().max().unwrap_or(&0) {
                ", later blocks in the input file's order"
            } else {
                ""
            }
        ),
    ))
}

/// Writes `file` with `order` to `--output` (checked again: the path may have changed during
/// the work) and reports.
fn write_sorted(
    args: &SortArgs,
    file: &StackFile,
    order: UniversalOrder,
    detail: &str,
    secs: f64,
) -> Res<()> {
    let mut inputs = vec![args.file.as_path()];
    inputs.extend(
        [&args.calib, &args.model, &args.order_json, &args.checkpoint]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path),
    );
    check_output(&args.output, &inputs)?;
    file.write_with_order(&args.output, order)
        .map_err(|e| named(&args.output, e))?;
    outln!(
        "{}: ordered {} blocks in {secs:.1} s ({detail}); wrote {}",
        args.method,
        file.order().len(),
        args.output.display()
    )?;
    Ok(())
}

/// `--dump-scores` of the first-order method: the gradient bases and each weight's scores.
#[derive(serde::Serialize)]
struct FirstOrderDump<'a> {
    bases: &'a [u16],
    weights: Vec<FirstOrderWeight<'a>>,
}

/// One weight of [`FirstOrderDump`].
#[derive(serde::Serialize)]
struct FirstOrderWeight<'a> {
    name: &'a str,
    first_order: &'a [Option<f64>],
}

/// `--dump-scores` of a proxy method: the sensitivity probe's base loss (when one ran) and
/// each weight's numbers.
#[derive(serde::Serialize)]
struct ProxyDump<'a> {
    base_loss: Option<f64>,
    weights: Vec<ProxyWeightDump<'a>>,
}

/// One weight of [`ProxyDump`]; the probe's fields only when a sensitivity probe ran.
#[derive(serde::Serialize)]
struct ProxyWeightDump<'a> {
    name: &'a str,
    rows: usize,
    cols: usize,
    errors: &'a [f64],
    scores: &'a [Option<f64>],
    #[serde(skip_serializing_if = "Option::is_none")]
    base_blocks: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    probe_blocks: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    probe_loss: Option<f64>,
}

/// `--dump-scores`: the per-weight numbers a proxy order was computed from, as JSON.
fn dump_scores(
    path: &Path,
    file: &StackFile,
    out: &bitstack_sort::ProxyOutcome,
    sens: Option<&bitstack_sort::Sensitivity>,
) -> Res<()> {
    let weights: Vec<ProxyWeightDump<'_>> = file
        .stacks()
        .iter()
        .enumerate()
        .map(|(w, m)| ProxyWeightDump {
            name: &m.name,
            rows: m.rows,
            cols: m.cols,
            errors: &out.errors[w],
            scores: &out.gains[w],
            base_blocks: sens.map(|s| s.base_blocks[w]),
            probe_blocks: sens.map(|s| s.probe_blocks[w]),
            probe_loss: sens.map(|s| s.losses[w]),
        })
        .collect();
    let doc = ProxyDump {
        base_loss: sens.map(|s| s.base_loss),
        weights,
    };
    Ok(bitstack_examples::output::write_atomic(
        path,
        serde_json::to_string_pretty(&doc)?.as_bytes(),
    )?)
}

/// The original weights and every block of every stack, for the proxies.
#[allow(clippy::type_complexity)]
fn proxy_inputs(
    args: &SortArgs,
    file: &StackFile,
) -> Res<(Vec<Vec<f32>>, Vec<Vec<ResidualBlock>>)> {
    let model = args
        .model
        .as_ref()
        .ok_or("the proxies need --model (the original weights)")?;
    let source = open_model(model)?;
    let mut originals = Vec::new();
    let mut blocks = Vec::new();
    for (w, m) in file.stacks().iter().enumerate() {
        originals.push(source.tensor_f32(&m.name)?.1);
        blocks.push(read_all_blocks(args, file, w)?);
    }
    Ok((originals, blocks))
}

fn proxy_weights<'a>(
    file: &'a StackFile,
    originals: &'a [Vec<f32>],
    blocks: &'a [Vec<ResidualBlock>],
) -> Vec<bitstack_sort::ProxyWeight<'a>> {
    file.stacks()
        .iter()
        .enumerate()
        .map(|(w, m)| bitstack_sort::ProxyWeight {
            original: &originals[w],
            rows: m.rows,
            cols: m.cols,
            blocks: &blocks[w],
            scale: m.scale.as_deref(),
            stats: bitstack_sort::ActivationStats::FromScale,
        })
        .collect()
}

/// The evaluator `average`, `greedy` and `proxy-sensitive` sort with: `--scoring-seqs`
/// evenly spaced windows of the `--calib` text, every stack's blocks, `--scoring-skip` and
/// `--scoring-loss` applied. Returns the scoring text's path too, for the report.
fn sort_evaluator<'a, 'r>(
    args: &'a SortArgs,
    sm: &StackModel,
    resident: &'r LlamaResident,
) -> Res<(
    &'a Path,
    bitstack_examples::sorting::LlamaStackEvaluator<'r>,
)> {
    let calib = args
        .calib
        .as_ref()
        .ok_or("average, greedy and proxy-sensitive need --calib TEXT")?;
    let tokens = sm
        .tokenizer()?
        .encode(&read_text("--calib", calib)?, false)?;
    let scoring = bitstack_examples::sorting::scoring_windows(
        &tokens,
        args.scoring_seqs,
        args.scoring_seq_len,
    )?;
    let mut parts = Vec::new();
    for (w, m) in sm.file().stacks().iter().enumerate() {
        parts.push((
            m.clone(),
            read_all_blocks(args, sm.file(), w)?
                .into_iter()
                .map(std::sync::Arc::new)
                .collect::<Vec<_>>(),
        ));
    }
    let mut ev = bitstack_examples::sorting::LlamaStackEvaluator::from_parts(
        resident,
        parts,
        scoring,
        args.scoring_seq_len,
    )?;
    ev.score_from_position(args.scoring_skip)?;
    match args.scoring_loss.as_str() {
        "ce" => {}
        "kl" => {
            let full: Vec<u16> = (0..ev.num_weights()).map(|w| ev.levels(w)).collect();
            ev.use_kl_reference(&full)?;
        }
        other => return Err(format!("--scoring-loss {other:?}: expected ce or kl").into()),
    }
    Ok((calib.as_path(), ev))
}
