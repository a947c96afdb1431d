//! Helpers every subcommand shares: the error type, usage errors, errors that name their
//! file, reading a text input, opening a model or a stack file, and byte formatting.

use bitstack_core::{MemoryBudget, MB, MIB};
use bitstack_examples::gguf::{open_model, ModelSource};
use bitstack_examples::llama::EmbeddingPrecision;
use bitstack_examples::outln;
use bitstack_examples::output::UsageError;
use bitstack_examples::perplexity::WindowSelection;
use bitstack_examples::report::markdown_table;
use bitstack_examples::stackmodel::LoadedStack;
use std::path::Path;

/// The error of a subcommand: any error, reported by `main` with its exit status.
pub(crate) type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// A usage error (exit status 2): a flag value or combination that cannot work.
pub(crate) fn usage(msg: impl Into<String>) -> Box<dyn std::error::Error> {
    Box::new(UsageError(msg.into()))
}

/// `--windows`' parser: the selections' names, each with its help line (so a bad value's
/// error lists them).
pub(crate) fn window_selections() -> impl clap::builder::TypedValueParser<Value = WindowSelection> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    PossibleValuesParser::new(
        WindowSelection::ALL.map(|w| PossibleValue::new(w.name()).help(w.help())),
    )
    .try_map(|s| s.parse::<WindowSelection>())
}

/// `e` as a message that names `path` (prefixed when the message does not already).
pub(crate) fn named(path: &Path, e: impl std::fmt::Display) -> Box<dyn std::error::Error> {
    let (m, p) = (e.to_string(), path.display().to_string());
    if m.contains(&p) {
        m.into()
    } else {
        format!("{p}: {m}").into()
    }
}

/// Reads a text input, naming the flag and the file on failure.
pub(crate) fn read_text(flag: &str, path: &Path) -> Res<String> {
    let bytes = std::fs::read(path).map_err(|e| {
        let what = if path.is_dir() {
            "is a directory".to_owned()
        } else {
            e.to_string()
        };
        format!("cannot read {flag} {}: {what}", path.display())
    })?;
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "{flag} {}: not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
        .into()
    })
}

/// Opens an original model (GGUF file or Hugging Face folder); errors name the path.
pub(crate) fn open_source(path: &Path) -> Res<Box<dyn ModelSource>> {
    if is_stack_file(path) {
        return Err(usage(format!(
            "{} is a stack file, not an original model (a .gguf file or a Hugging Face folder)",
            path.display()
        )));
    }
    open_model(path).map_err(|e| named(path, e))
}

/// Opens a stack file through the elastic runtime; errors name the path.
pub(crate) fn open_loaded(
    path: &Path,
    budget: Option<MemoryBudget>,
    resident: EmbeddingPrecision,
) -> Res<LoadedStack> {
    LoadedStack::open_with(path, budget, resident).map_err(|e| match e {
        bitstack_examples::stackmodel::LoadError::Core(
            c @ bitstack_core::CoreError::BudgetBelowMinimum { .. },
        ) => usage(format!("{}: {c}", path.display())),
        e => named(path, e),
    })
}

pub(crate) fn mb(bytes: u64) -> f64 {
    bytes as f64 / MB
}

pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB
}

pub(crate) fn print_phases(phases: &[(String, f64)]) -> Res<()> {
    let rows: Vec<Vec<String>> = phases
        .iter()
        .map(|(n, s)| vec![n.clone(), format!("{s:.1}")])
        .collect();
    outln!("{}", markdown_table(&["phase", "seconds"], &rows))?;
    Ok(())
}

pub(crate) fn is_stack_file(path: &Path) -> bool {
    let mut magic = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == bitstack_format::MAGIC
}
