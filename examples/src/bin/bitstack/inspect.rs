//! `bitstack inspect`: describe a stack file (and, with `--verify`, check every block).

use crate::common::{mb, mib, named, open_loaded, Res};
use bitstack_examples::gguf::ModelSource;
use bitstack_examples::llama::EmbeddingPrecision;
use bitstack_examples::outln;
use bitstack_examples::report::markdown_table;
use bitstack_examples::stackmodel::StackModel;
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args, Debug)]
pub(crate) struct InspectArgs {
    /// The stack file.
    file: PathBuf,
    /// Also read every block and check its checksum and contents (exit 1 naming the
    /// first bad block).
    #[arg(long)]
    verify: bool,
}

/// `bitstack inspect`.
pub(crate) fn run(a: &InspectArgs) -> Res<()> {
    inspect(&a.file)?;
    if a.verify {
        verify_blocks(&a.file)?;
    }
    Ok(())
}

pub(crate) fn inspect(path: &Path) -> Res<()> {
    let sm = StackModel::open(path).map_err(|e| named(path, e))?;
    let c = sm.config();
    let file = sm.file();
    let layout = file.layout();
    outln!(
        "{}: format {}.{}, {:.1} MB on disk",
        path.display(),
        file.version().0,
        file.version().1,
        mb(file.file_len())
    )?;
    outln!(
        "model: {} layers, hidden {}, ffn {}, {} heads / {} KV heads (head dim {}), vocab {}, tied embeddings {}",
        c.n_layers, c.hidden, c.ffn, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab, c.tied_embeddings
    )?;
    if let Some(s) = file.metadata_str(bitstack_examples::stackmodel::META_COMPRESSION) {
        outln!("compression: {s}")?;
    }
    let mut shapes: std::collections::BTreeMap<(usize, usize, usize, &str), (usize, u64)> =
        Default::default();
    for m in file.stacks() {
        let e = shapes
            .entry((m.rows, m.cols, m.rank, m.factors.name()))
            .or_default();
        e.0 += 1;
        e.1 = m.block_bytes();
    }
    let rows: Vec<Vec<String>> = shapes
        .iter()
        .map(|(&(r, cc, k, f), &(n, b))| {
            vec![
                format!("{r}x{cc}"),
                k.to_string(),
                f.to_string(),
                n.to_string(),
                format!("{b}"),
                format!("{:.3}", b as f64 * 8.0 / (r * cc) as f64),
            ]
        })
        .collect();
    outln!(
        "{}",
        markdown_table(
            &[
                "shape",
                "k",
                "factors",
                "weights",
                "bytes per block",
                "bits per weight per block"
            ],
            &rows
        )
    )?;
    let levels = file.stacks().iter().map(|m| m.levels).max().unwrap_or(0);
    let per_level: u64 = file.stacks().iter().map(|m| m.block_bytes()).sum();
    let scales: u64 = file.stacks().iter().map(|m| m.scale_bytes()).sum();
    outln!(
        "{} weights x {levels} levels = {} blocks; one level of every weight: {:.2} MB ({:.2} MiB); scale vectors {:.3} MB",
        file.stacks().len(),
        layout.order.len(),
        mb(per_level),
        mib(per_level),
        mb(scales)
    )?;
    // What a running model holds: the resident part as the runtime keeps it by default (q8
    // embedding, f32 norms; the tokenizer is not counted), scales and blocks.
    let loaded = open_loaded(path, None, EmbeddingPrecision::default())?;
    outln!(
        "resident payloads in the file (f16, tokenizer included): {:.1} MB; held at run time ({} embedding, the default): {:.1} MB; minimum budget {:.1} MB ({:.1} MiB); full stack {:.1} MB ({:.1} MiB)",
        mb(layout.resident_bytes),
        EmbeddingPrecision::default(),
        mb(loaded.elastic.layout().resident_bytes),
        mb(loaded.elastic.minimum_bytes()),
        mib(loaded.elastic.minimum_bytes()),
        mb(loaded.elastic.full_bytes()),
        mib(loaded.elastic.full_bytes())
    )?;
    // The same file at every resident precision `--resident` offers (the contract's
    // accounting, which the runtime checks it holds at load).
    let rows: Vec<Vec<String>> = [
        EmbeddingPrecision::F16,
        EmbeddingPrecision::Q8,
        EmbeddingPrecision::Q4,
    ]
    .into_iter()
    .map(|p| {
        let l = sm.contract().held_layout(file, p);
        vec![
            p.to_string(),
            format!("{:.1}", mb(l.resident_bytes)),
            format!("{:.1}", mb(l.minimum_bytes())),
            format!("{:.1}", mb(l.full_bytes())),
        ]
    })
    .collect();
    outln!(
        "{}",
        markdown_table(
            &[
                "--resident",
                "held resident MB",
                "minimum budget MB",
                "full stack MB"
            ],
            &rows
        )
    )?;
    Ok(())
}

/// `inspect --verify`: reads every block (in stack order) and checks its checksum and
/// contents; the first bad block is an error naming it.
fn verify_blocks(path: &Path) -> Res<()> {
    let t = Instant::now();
    let sm = StackModel::open(path).map_err(|e| named(path, e))?;
    let file = sm.file();
    let mut bytes = 0u64;
    let mut n = 0usize;
    for id in file.order().as_slice() {
        let meta = file
            .stacks()
            .get(id.weight as usize)
            .ok_or_else(|| format!("{}: block {id:?} names no stack", path.display()))?;
        file.block_view(*id).map_err(|e| {
            format!(
                "{}: block {}:{} ({} level {}) is bad: {e}",
                path.display(),
                id.weight,
                id.level,
                meta.name,
                id.level as u32 + 1
            )
        })?;
        bytes += meta.block_bytes();
        n += 1;
    }
    outln!(
        "verified {n} blocks ({:.1} MB) in {:.2} s: every checksum matches",
        mb(bytes),
        t.elapsed().as_secs_f64()
    )?;
    Ok(())
}
