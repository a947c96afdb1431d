//! `bitstack bench` end to end on a tiny synthetic model (no shared files needed): a random
//! two-layer Llama with a byte-level vocabulary written as GGUF, compressed into a stack file,
//! then benched through the real binary at three budgets and as the dense original; its JSON
//! report is checked field by field, and bad flags must be usage errors (exit 2).

use bitstack_examples::compress::{compress, write_compressed, CompressParams, RankRule};
use bitstack_examples::gguf::{open_model, SyntheticGguf};
use bitstack_examples::llama::LinearKind;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};

/// The tiny model: the library's default synthetic GGUF (a random two-layer GQA Llama with
/// GPT-2's byte vocabulary, so any text encodes).
fn tiny() -> SyntheticGguf {
    SyntheticGguf::default()
}

fn tiny_files() -> (PathBuf, PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("bitstack-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let gguf = dir.join("tiny.gguf");
    tiny().write(&gguf).unwrap();
    let source = open_model(&gguf).unwrap();
    let mut params = CompressParams {
        calib_windows: 2,
        calib_seq_len: 32,
        order: bitstack_sort::SortMethod::RoundRobin,
        ..Default::default()
    };
    params.iavd.levels = 3;
    params.rank = RankRule::Fixed(4);
    let calib = bitstack_examples::bench::PROMPT_TEXT.repeat(2);
    let out = compress(source.as_ref(), &calib, &params).unwrap();
    let stack = dir.join("tiny.bitstack");
    write_compressed(&out, &stack).unwrap();
    (dir, gguf, stack)
}

fn bitstack(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bitstack"))
        .args(args)
        .output()
        .unwrap()
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing or not a number in {v}"))
}

fn check_spread(s: &Value) {
    let (median, min, max) = (num(s, "median"), num(s, "min"), num(s, "max"));
    assert!(
        min > 0.0 && min <= median && median <= max && max.is_finite(),
        "{s}"
    );
}

fn check_row(r: &Value) {
    check_spread(&r["decode_tokens_per_s"]);
    check_spread(&r["prefill_tokens_per_s"]);
    let decode = num(&r["decode_tokens_per_s"], "median");
    let lin = num(r, "linear_bytes");
    let held = num(r, "held_bytes");
    assert!(lin > 0.0 && lin < held, "{r}");
    let gbps = num(r, "decode_linear_gb_per_s");
    assert!(
        (gbps - lin * decode / 1e9).abs() <= 1e-9 * gbps.max(1.0),
        "{r}"
    );
    let held_gbps = num(r, "decode_held_gb_per_s");
    assert!(
        (held_gbps - held * decode / 1e9).abs() <= 1e-9 * held_gbps.max(1.0),
        "{r}"
    );
}

fn usage_error(args: &[&str], flag: &str) {
    let out = bitstack(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(
        stderr.contains(flag),
        "{args:?} should name {flag}: {stderr}"
    );
}

#[test]
fn bench_reports_every_budget_and_rejects_bad_flags() {
    let (dir, gguf, stack) = tiny_files();
    let (gguf_s, stack_s) = (gguf.to_str().unwrap(), stack.to_str().unwrap());
    let json = dir.join("bench.json");
    let json_s = json.to_str().unwrap();
    let common = [
        "--prompt-tokens",
        "24",
        "--gen-tokens",
        "4",
        "--reps",
        "3",
        "--threads",
        "1",
        "--bandwidth-buffer",
        "8MB",
    ];

    // Learn the stack's sizes from a first run at its two ends.
    let mut args = vec!["bench", stack_s, "--budgets", "min,full", "--json", json_s];
    args.extend(common);
    let out = bitstack(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let (min, full) = (num(&doc, "minimum_bytes"), num(&doc, "full_bytes"));
    assert!(0.0 < min && min < full, "{doc}");

    // Then three budgets, one in between, out of order: rows follow the flag.
    let mid = format!("{}B", ((min + full) / 2.0) as u64);
    let budgets = format!("full,min,{mid}");
    let mut args = vec!["bench", stack_s, "--budgets", &budgets, "--json", json_s];
    args.extend(common);
    let out = bitstack(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("| budget |") && stdout.contains("load before"),
        "{stdout}"
    );
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["kind"], "stack");
    assert_eq!(doc["file"], stack_s);
    assert_eq!(
        (
            num(&doc, "prompt_tokens"),
            num(&doc, "gen_tokens"),
            num(&doc, "reps")
        ),
        (24.0, 4.0, 3.0)
    );
    assert_eq!(num(&doc, "threads"), 1.0);
    assert!(
        doc["load_before"].is_string() && doc["load_after"].is_string(),
        "{doc}"
    );
    let bw = &doc["read_bandwidth"];
    assert_eq!(num(bw, "buffer_bytes"), 8e6);
    assert_eq!(num(bw, "threads"), 1.0);
    check_spread(&bw["gb_per_s"]);
    let rows = doc["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let labels: Vec<&str> = rows.iter().map(|r| r["label"].as_str().unwrap()).collect();
    assert_eq!(labels[..2], ["full", "min"]);
    assert!(labels[2].ends_with(" MB"), "{labels:?}");
    for r in rows {
        check_row(r);
        assert!(num(r, "held_bytes") <= num(r, "budget_bytes"), "{r}");
        assert!(num(r, "resize_ms") >= 0.0);
    }
    let blocks: Vec<f64> = rows.iter().map(|r| num(r, "blocks")).collect();
    assert_eq!(
        (blocks[1], blocks[0]),
        (14.0, 42.0),
        "2 layers x 7 weights x 3 levels"
    );
    assert!(blocks[1] < blocks[2] && blocks[2] < blocks[0], "{blocks:?}");
    assert_eq!(num(&rows[0], "held_bytes"), full);
    assert_eq!(num(&rows[1], "held_bytes"), min);
    assert_eq!(num(&rows[1], "budget_bytes"), min);

    // The original model: one dense f32 row, its budget being what it holds.
    let mut args = vec!["bench", gguf_s, "--json", json_s];
    args.extend(common);
    let out = bitstack(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["kind"], "dense f32");
    assert!(doc["minimum_bytes"].is_null());
    let rows = doc["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    check_row(&rows[0]);
    assert_eq!(rows[0]["label"], "dense f32");
    assert_eq!(num(&rows[0], "budget_bytes"), num(&rows[0], "held_bytes"));
    let linear_params: usize = LinearKind::ALL
        .iter()
        .map(|k| {
            let (r, c) = k.shape(&tiny().config());
            r * c * 2
        })
        .sum();
    assert_eq!(num(&rows[0], "linear_bytes"), (4 * linear_params) as f64);

    // Bad input: usage errors naming the flag, and the old JSON report left as it was.
    let before = std::fs::read(&json).unwrap();
    let with = |extra: &[&'static str]| -> Vec<&str> {
        let mut a = vec!["bench", stack_s, "--json", json_s];
        // Small, valid lengths unless the case is about them (a flag may be given once).
        for (flag, v) in [("--prompt-tokens", "24"), ("--gen-tokens", "4")] {
            if !extra.contains(&flag) {
                a.extend([flag, v]);
            }
        }
        a.extend_from_slice(extra);
        a
    };
    usage_error(&with(&["--reps", "0"]), "--reps");
    usage_error(&with(&["--gen-tokens", "0"]), "--gen-tokens");
    usage_error(&with(&["--budgets", "90MB,lots"]), "--budgets");
    usage_error(&with(&["--budgets", "1KB"]), "--budgets");
    usage_error(&with(&["--prompt-tokens", "96"]), "--prompt-tokens");
    usage_error(&with(&["--threads", "0"]), "--threads");
    usage_error(&["bench", gguf_s, "--budgets", "min"], "--budgets");
    assert_eq!(std::fs::read(&json).unwrap(), before);

    // A missing file is an error naming it (not a usage error).
    let missing = dir.join("nope.bitstack");
    let out = bitstack(&["bench", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.bitstack"));
    std::fs::remove_dir_all(&dir).unwrap();
}
