//! IAVD accuracy on real weights: per-level relative Frobenius error of randomized versus
//! exact-SVD IAVD on a few SmolLM2-135M matrices (dequantized from the Q4_1 GGUF).
//!
//! ```text
//! cargo build --release -p examples --bin iavd_accuracy
//! target/release/iavd_accuracy [path/to/model.gguf]
//! ```
//! Defaults to `../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf` relative to the workspace
//! root and skips (exit 0) when it is absent. Exits with an error if any error sequence fails
//! to decrease strictly. No activation scaling is applied (no calibration data here), so the
//! errors are plain `‖W − Ŵ‖_F / ‖W‖_F`.

use bitstack_examples::gguf::GgufFile;
use bitstack_linalg::{decompose_slice, IavdParams, SvdMethod, TruncatedSvdParams};
use std::path::PathBuf;

const TENSORS: [&str; 4] = [
    "blk.0.attn_q.weight",
    "blk.0.ffn_up.weight",
    "blk.15.ffn_down.weight",
    "blk.0.attn_k.weight",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if !path.exists() {
        println!("skipped: model file {} not found", path.display());
        return Ok(());
    }
    let file = GgufFile::open(&path)?;
    let params = |method| IavdParams {
        svd: TruncatedSvdParams {
            method,
            ..TruncatedSvdParams::default()
        },
        ..IavdParams::default()
    };
    let mut worst_gap = 0.0f64;
    for name in TENSORS {
        let (shape, w) = file.tensor_f32(name)?;
        let [rows, cols] = shape[..] else {
            return Err(format!("{name}: expected a matrix, got shape {shape:?}").into());
        };
        let rand = decompose_slice(&w, rows, cols, None, &params(SvdMethod::Randomized))?;
        let exact = decompose_slice(&w, rows, cols, None, &params(SvdMethod::Exact))?;
        let secs = |d: &bitstack_linalg::Decomposition| {
            d.level_times.iter().map(|t| t.as_secs_f64()).sum::<f64>()
        };
        println!(
            "\n{name} ({rows}×{cols}), 16 levels, k = 16: randomized {:.2} s, exact {:.2} s",
            secs(&rand),
            secs(&exact)
        );
        if TruncatedSvdParams::default().uses_exact(rows, cols) {
            println!(
                "  (the default SvdMethod::Auto uses the exact SVD for this shape: min dim < {})",
                TruncatedSvdParams::default().exact_below
            );
        }
        println!("  level  randomized  exact      rel.gap");
        for (l, (r, e)) in rand
            .relative_errors
            .iter()
            .zip(&exact.relative_errors)
            .enumerate()
        {
            let gap = (r - e) / e;
            worst_gap = worst_gap.max(gap.abs());
            println!("  {:>5}  {r:.6}    {e:.6}   {:+.3}%", l + 1, gap * 100.0);
        }
        for (label, d) in [("randomized", &rand), ("exact", &exact)] {
            if let Some(l) = d.relative_errors.windows(2).position(|p| p[1] >= p[0]) {
                return Err(format!(
                    "{name}: {label} error did not decrease from level {} to {}",
                    l + 1,
                    l + 2
                )
                .into());
            }
        }
    }
    println!(
        "\nall error sequences strictly decreasing; largest |gap| {:.3}%",
        worst_gap * 100.0
    );
    Ok(())
}
