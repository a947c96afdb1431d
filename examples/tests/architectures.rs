//! The default path on every architecture the README claims, on synthetic models with the
//! real models' *structure* (scaled-down widths, same head ratios and options), no `../shared`
//! needed: `bitstack compress` with default flags (`--levels 16 --rank auto --order
//! first-order`, 32 calibration windows of 512 tokens) must finish, and the file must load and
//! come within 1 % of the original's perplexity at the full stack.
//!
//! * Qwen2 (Qwen2.5-0.5B's structure): Q/K/V biases, untied head, 7 query heads per KV head.
//! * Llama-3 (Llama-3.2-1B's structure): untied head, no biases, 4 query heads per KV head,
//!   RoPE θ = 500,000.
//! * Llama / SmolLM2 and Mistral (a Llama GGUF in llama.cpp's layout): tied head, no biases.

use bitstack_examples::gguf::{SyntheticGguf, SyntheticVocab};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The shape of one synthetic model.
struct Arch {
    name: &'static str,
    gguf_arch: &'static str,
    layers: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    ffn: u32,
    tied: bool,
    bias: bool,
    rope_theta: f32,
}

const ARCHS: &[Arch] = &[
    Arch {
        name: "qwen2",
        gguf_arch: "qwen2",
        layers: 2,
        heads: 14,
        kv_heads: 2,
        head_dim: 8,
        ffn: 96,
        tied: false,
        bias: true,
        rope_theta: 1_000_000.0,
    },
    Arch {
        name: "llama3",
        gguf_arch: "llama",
        layers: 2,
        heads: 8,
        kv_heads: 2,
        head_dim: 8,
        ffn: 128,
        tied: false,
        bias: false,
        rope_theta: 500_000.0,
    },
    Arch {
        name: "llama-tied",
        gguf_arch: "llama",
        layers: 2,
        heads: 9,
        kv_heads: 3,
        head_dim: 8,
        ffn: 96,
        tied: true,
        bias: false,
        rope_theta: 100_000.0,
    },
];

/// A deterministic xorshift generator (the texts).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The synthetic model of `a`, with the letters vocabulary (GPT-2 style byte-level BPE);
/// weights ~ U(-1, 1)/sqrt(cols) keep activations tame.
fn gguf(a: &Arch) -> Vec<u8> {
    let hidden = (a.heads * a.head_dim) as usize;
    SyntheticGguf {
        arch: a.gguf_arch.into(),
        n_layers: a.layers as usize,
        hidden,
        ffn: a.ffn as usize,
        n_heads: a.heads as usize,
        n_kv_heads: a.kv_heads as usize,
        context: 1024,
        rope_theta: a.rope_theta,
        rms_eps: 1e-6,
        tied: a.tied,
        attn_bias: a.bias,
        vocab: SyntheticVocab::Letters,
        seed: 0x9E37_79B9_7F4A_7C15,
        embedding_scale: 1.0,
        head_scale: (1.0 / hidden as f32).sqrt(),
        norm_jitter: 0.1,
        bias_scale: 0.3,
        linear_variance: 1.0,
    }
    .build()
}

/// A text of the vocabulary's letters, long enough for 32 windows of 512 tokens.
fn text(words: usize, seed: u64) -> String {
    let mut rng = Rng(seed);
    let mut s = String::new();
    for i in 0..words {
        for _ in 0..1 + rng.next() % 6 {
            s.push((b'a' + (rng.next() % 26) as u8) as char);
        }
        s.push(if i % 13 == 12 { '.' } else { ' ' });
        if i % 40 == 39 {
            s.push('\n');
        }
    }
    s
}

fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bitstack"))
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .expect("the bitstack binary runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "bitstack {:?} failed ({}):\n{stdout}\n{stderr}",
        args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
        out.status
    );
    (stdout, stderr)
}

fn temp_dir(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("bitstack-arch-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn perplexities(json: &Path) -> Vec<(f64, f64)> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let rows = v["rows"].as_array().expect("eval JSON has rows");
    rows.iter()
        .map(|r| {
            (
                r["held_bytes"].as_f64().expect("held_bytes"),
                r["ppl"].as_f64().expect("ppl"),
            )
        })
        .collect()
}

#[test]
fn default_compress_finishes_on_every_claimed_architecture() {
    for a in ARCHS {
        let dir = temp_dir(a.name);
        let (model, calib, test) = (
            dir.join("model.gguf"),
            dir.join("calib.txt"),
            dir.join("test.txt"),
        );
        std::fs::write(&model, gguf(a)).unwrap();
        std::fs::write(&calib, text(5_000, 7)).unwrap();
        std::fs::write(&test, text(2_000, 99)).unwrap();
        let stack = dir.join("model.bitstack");
        // Default flags only: the order is first-order, which must handle biases and an
        // untied head rather than refuse them after the decomposition.
        let (stdout, stderr) = run(&[&"compress", &model, &"--calib", &calib, &"-o", &stack]);
        let said = format!("{stdout}{stderr}");
        assert!(
            said.contains("order first-order"),
            "{}: compress did not run the first-order order:\n{said}",
            a.name
        );
        run(&[&"inspect", &stack, &"--verify"]);
        let json = dir.join("eval.json");
        run(&[
            &"eval",
            &stack,
            &"--text",
            &test,
            &"--seq-len",
            &"128",
            &"--max-windows",
            &"2",
            &"--points",
            &"3",
            &"--json",
            &json,
        ]);
        let rows = perplexities(&json);
        assert_eq!(rows.len(), 3, "{}: {rows:?}", a.name);
        assert!(
            rows.windows(2).all(|w| w[0].0 < w[1].0),
            "{}: budgets not increasing: {rows:?}",
            a.name
        );
        // Random weights on random text sit near uniform perplexity at every size, so "falls as
        // it grows" is not a property of these models; approaching the original is.
        // The original model's eval prints a table row `| original | memory | ppl | ...`.
        let (orig_out, _) = run(&[
            &"eval",
            &model,
            &"--text",
            &test,
            &"--seq-len",
            &"128",
            &"--max-windows",
            &"2",
        ]);
        let orig: f64 = orig_out
            .lines()
            .find(|l| l.starts_with("| original"))
            .and_then(|l| l.split('|').nth(3))
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or_else(|| panic!("{}: no original ppl in:\n{orig_out}", a.name));
        let (min, full) = (rows[0].1, rows[rows.len() - 1].1);
        assert!(
            (full - orig).abs() <= (min - orig).abs() && (full / orig - 1.0).abs() < 0.01,
            "{}: the full stack ({full}) is not the closest to the original ({orig}): {rows:?}",
            a.name
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
