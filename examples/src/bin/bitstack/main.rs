//! `bitstack`: compress a Llama-family model into a BitStack stack file once, then run and
//! measure it at any memory budget by resizing one loaded model.
//!
//! ```text
//! bitstack demo                                   # the whole pipeline on SmolLM2-135M
//! bitstack compress MODEL --calib TEXT -o out.bitstack
//! bitstack inspect out.bitstack
//! bitstack eval out.bitstack --text TEXT --budgets 90MB,120MB --max-windows 8
//! bitstack eval MODEL --text TEXT                 # the original model's row
//! bitstack generate out.bitstack --budget 150MB --prompt "..." [--chat]
//! ```

mod bench;
mod common;
mod compare;
mod compress;
mod demo;
mod eval;
mod generate;
mod inspect;
mod plot;
mod pressure;
mod serve;
mod sort;

use bitstack_examples::output::{OutputError, UsageError};
use bitstack_examples::stdout::StdoutError;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use common::Res;
use std::io::Write;
use std::process::ExitCode;

const EXIT_CODES: &str = "\
Exit status:
  0    success
  1    runtime error (a file that cannot be read or is corrupt, a failed write, a
       budget of an eval that failed, ...), with a message on stderr naming the file
  2    usage error (a bad flag value or combination, an output path that cannot be
       written or names an input), reported before any work starts
  141  stdout closed by its reader (`bitstack inspect F | head -1`): the command stops
       quietly, as a tool killed by SIGPIPE would report

Output files are never written through a symbolic link, onto a device (/dev/full,
/dev/stdout) or over one of the command's inputs; they are written to a temporary file,
fsynced and renamed, so a failure leaves the old file untouched.";

/// BitStack: any-size compression of large language models.
#[derive(Parser, Debug)]
#[command(version, about, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The end-to-end demo on SmolLM2-135M: obtain, compress, evaluate at several budgets,
    /// generate at a small and a large budget.
    Demo(demo::DemoArgs),
    /// Compress a model (GGUF file or Hugging Face directory) into a stack file.
    Compress(compress::CompressArgs),
    /// Describe a stack file: model, shapes, per-level sizes, minimum and full budgets.
    Inspect(inspect::InspectArgs),
    /// Perplexity at several budgets by resizing one loaded model (or of an original model).
    Eval(eval::EvalArgs),
    /// Generate text at a budget.
    Generate(generate::GenerateArgs),
    /// Line-based generation that follows the memory the device has, resizing in place.
    Serve(serve::ServeArgs),
    /// Generate continuously under a scripted schedule of available memory.
    PressureDemo(pressure::PressureArgs),
    /// Reorder a stack file's universal stack: average, greedy, random, roundrobin, proxy,
    /// proxy-sensitive, first-order, or an imported order.
    Sort(sort::SortArgs),
    /// The paper's Table 1: RTN / GPTQ / AWQ at w2..w4 (g128) vs BitStack at equal memory.
    Compare(compare::CompareArgs),
    /// Plot several `eval --json` results as perplexity against budget in one SVG.
    Plot(plot::PlotArgs),
    /// Decode and prefill tokens/s at several budgets, next to the machine's read bandwidth.
    Bench(bench::BenchArgs),
}
fn run(cli: Cli, matches: &clap::ArgMatches) -> Res<()> {
    match cli.command {
        Command::Demo(a) => demo::run(&a),
        Command::Compress(a) => compress::run(&a),
        Command::Inspect(a) => inspect::run(&a),
        Command::Eval(a) => {
            let sub = matches.subcommand_matches("eval");
            eval::run(&a, sub.unwrap_or(matches))
        }
        Command::Generate(a) => generate::run(&a),
        Command::Serve(a) => serve::run(&a),
        Command::PressureDemo(a) => pressure::run(&a),
        Command::Sort(a) => sort::run(&a),
        Command::Compare(a) => compare::run(&a),
        Command::Plot(a) => plot::run(&a),
        Command::Bench(a) => bench::run(&a),
    }
}

/// Code paths outside this file that still print with `println!` (which panics with "failed
/// printing to stdout" when stdout is closed or full) end like the checked ones: quietly on a
/// closed pipe, with exit status 1 and a message on any other write error. A failing stderr
/// ends the same way, without a message.
fn install_stdout_panic_backstop() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied());
        if let Some(rest) = msg.and_then(|m| m.strip_prefix("failed printing to stdout: ")) {
            if rest.contains("Broken pipe") {
                std::process::exit(EXIT_STDOUT_CLOSED);
            }
            let _ = writeln!(std::io::stderr(), "error: writing to stdout: {rest}");
            std::process::exit(1);
        }
        // Progress and notes go to stderr with `eprintln!`; when stderr itself is closed or
        // full nothing can be reported: end with status 1 (141 for a closed pipe), no panic.
        if let Some(rest) = msg.and_then(|m| m.strip_prefix("failed printing to stderr: ")) {
            std::process::exit(if rest.contains("Broken pipe") {
                EXIT_STDOUT_CLOSED
            } else {
                1
            });
        }
        default(info)
    }));
}

/// Exit status when the reader of stdout went away (128 + SIGPIPE, as a shell reports a tool
/// killed by SIGPIPE).
const EXIT_STDOUT_CLOSED: i32 = 141;

/// The exit status of an error: 2 for usage errors (bad flags, unusable output paths), 141
/// for a closed stdout (nothing printed), 1 for the rest; prints the message.
fn exit_status(e: &(dyn std::error::Error + 'static)) -> u8 {
    if matches!(e.downcast_ref::<StdoutError>(), Some(StdoutError::Closed)) {
        return EXIT_STDOUT_CLOSED as u8;
    }
    let usage_error = e.downcast_ref::<UsageError>().is_some()
        || e.downcast_ref::<OutputError>()
            .is_some_and(OutputError::is_usage);
    // Never panic on a closed or full stderr either.
    let _ = writeln!(std::io::stderr(), "error: {e}");
    if usage_error {
        2
    } else {
        1
    }
}

fn main() -> ExitCode {
    install_stdout_panic_backstop();
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        // Help and version go to stdout through the checked writer (clap ignores a failed
        // write and exits 0); usage errors keep clap's own report and status 2.
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            let text = e.render().to_string();
            return match bitstack_examples::out!("{text}")
                .and_then(|()| bitstack_examples::stdout::flush())
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => ExitCode::from(exit_status(&e)),
            };
        }
        Err(e) => e.exit(),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let result = run(cli, &matches).and_then(|()| Ok(bitstack_examples::stdout::flush()?));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => ExitCode::from(exit_status(e.as_ref())),
    }
}
