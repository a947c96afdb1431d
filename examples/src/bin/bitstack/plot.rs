//! `bitstack plot`: several `eval --json` results as perplexity against budget in one SVG.

use crate::common::{read_text, usage, Res};
use bitstack_examples::outln;
use bitstack_examples::output::check_output;
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub(crate) struct PlotArgs {
    /// `LABEL=FILE.json` per line, FILE written by `bitstack eval --json`.
    #[arg(required = true)]
    series: Vec<String>,
    /// Output SVG.
    #[arg(short, long)]
    output: PathBuf,
    /// Plot title.
    #[arg(long, default_value = "Perplexity against memory budget")]
    title: String,
    /// Original model's perplexity, drawn as a horizontal line.
    #[arg(long)]
    original_ppl: Option<f64>,
    /// Label of the vertical axis (e.g. for series of perplexity ratios).
    #[arg(long, default_value = "perplexity (log scale)")]
    y_label: String,
}

/// `bitstack plot`.
pub(crate) fn run(args: &PlotArgs) -> Res<()> {
    let mut items = Vec::new();
    for item in &args.series {
        let (name, path) = item
            .split_once('=')
            .ok_or_else(|| usage(format!("{item:?}: expected LABEL=FILE.json")))?;
        items.push((name, Path::new(path)));
    }
    if let Some(p) = args.original_ppl.filter(|p| !(p.is_finite() && *p > 0.0)) {
        return Err(usage(format!(
            "--original-ppl {p}: expected a positive number"
        )));
    }
    let inputs: Vec<&Path> = items.iter().map(|(_, p)| *p).collect();
    check_output(&args.output, &inputs)?;
    let mut series = Vec::new();
    for (name, path) in items {
        let json: serde_json::Value = serde_json::from_str(&read_text("series", path)?)
            .map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
        let rows = json["rows"].as_array().ok_or_else(|| {
            format!(
                "{}: no \"rows\" array (not an eval --json file)",
                path.display()
            )
        })?;
        let points = rows
            .iter()
            .map(|r| match (r["budget_bytes"].as_f64(), r["ppl"].as_f64()) {
                (Some(b), Some(p)) => Ok((b / 1e6, p)),
                _ => Err(format!(
                    "{}: a row lacks budget_bytes or ppl",
                    path.display()
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        series.push(bitstack_examples::report::Series {
            name: name.to_owned(),
            points,
        });
    }
    let hlines: Vec<(String, f64)> = args
        .original_ppl
        .map(|p| ("original".to_owned(), p))
        .into_iter()
        .collect();
    let svg = bitstack_examples::report::svg_plot(
        &args.title,
        "budget (MB, 10^6 bytes)",
        &args.y_label,
        &series,
        &hlines,
    )?;
    bitstack_examples::output::write_atomic(&args.output, svg.as_bytes())?;
    outln!("wrote {}", args.output.display())?;
    Ok(())
}
