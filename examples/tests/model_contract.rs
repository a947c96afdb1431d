//! The model contract of a stack file (issue 14) on a file written *before* the contract was
//! part of the published crates: `fixtures/stack-v1.0-synthetic.bitstack` was written by
//! commit 609b5b8 (format 1.0, no Q/K layout key) from the tiny synthetic Qwen2-style model
//! below (biases, untied head, byte-level vocabulary). Today's reader must still open it, read
//! its contract (Q/K layout `RotateHalf`, the layout every file of that time has) and run it.
//!
//! `write_fixture` (ignored) regenerates a file of the same model with the *current* writer;
//! the committed fixture must not be replaced by it, since the point is an old file.

use bitstack_examples::compress::{
    compress, write_compressed, CompressParams, OrderMethod, RankRule,
};
use bitstack_examples::gguf::{open_model, GgmlType, GgufBuilder, GgufValue, GgufValueType};
use bitstack_examples::llama::{LinearKind, SplitMix64};
use std::path::{Path, PathBuf};

const LAYERS: usize = 2;
const HIDDEN: usize = 16;
const FFN: usize = 24;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 8;
const CONTEXT: u32 = 64;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stack-v1.0-synthetic.bitstack")
}

/// GPT-2's byte-to-character map: every byte is one token, so any text encodes.
fn byte_vocab() -> Vec<String> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap().to_string()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap().to_string()
            }
        })
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The tiny Qwen2-style model as GGUF bytes (f32 tensors, GGUF's reversed dims).
fn tiny_qwen2_gguf() -> Vec<u8> {
    let mut rng = SplitMix64::new(14);
    let mut random = |n: usize, amp: f32| -> Vec<u8> {
        f32_bytes(&(0..n).map(|_| amp * rng.next_signed()).collect::<Vec<_>>())
    };
    let strings = |v: Vec<String>| GgufValue::Array {
        elem_type: GgufValueType::String,
        values: v.into_iter().map(GgufValue::String).collect(),
    };
    let u = |v: usize| GgufValue::U32(v as u32);
    let vocab = 256;
    let mut b = GgufBuilder::new();
    b.metadata("general.architecture", GgufValue::String("qwen2".into()))
        .metadata("qwen2.block_count", u(LAYERS))
        .metadata("qwen2.embedding_length", u(HIDDEN))
        .metadata("qwen2.feed_forward_length", u(FFN))
        .metadata("qwen2.attention.head_count", u(HEADS))
        .metadata("qwen2.attention.head_count_kv", u(KV_HEADS))
        .metadata(
            "qwen2.attention.layer_norm_rms_epsilon",
            GgufValue::F32(1e-6),
        )
        .metadata("qwen2.rope.freq_base", GgufValue::F32(1_000_000.0))
        .metadata("qwen2.context_length", GgufValue::U32(CONTEXT))
        .metadata("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
        .metadata("tokenizer.ggml.pre", GgufValue::String("gpt2".into()))
        .metadata("tokenizer.ggml.tokens", strings(byte_vocab()))
        .metadata("tokenizer.ggml.merges", strings(vec![]));
    let h = HIDDEN as u64;
    b.tensor(
        "token_embd.weight",
        GgmlType::F32,
        &[h, vocab],
        random(HIDDEN * vocab as usize, 1.0),
    );
    b.tensor(
        "output.weight",
        GgmlType::F32,
        &[h, vocab],
        random(HIDDEN * vocab as usize, 0.5),
    );
    b.tensor(
        "output_norm.weight",
        GgmlType::F32,
        &[h],
        f32_bytes(&[1.0; HIDDEN]),
    );
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    for l in 0..LAYERS {
        for norm in ["attn_norm", "ffn_norm"] {
            b.tensor(
                &format!("blk.{l}.{norm}.weight"),
                GgmlType::F32,
                &[h],
                f32_bytes(&[1.0; HIDDEN]),
            );
        }
        for (p, n) in [("q", q), ("k", kv), ("v", kv)] {
            b.tensor(
                &format!("blk.{l}.attn_{p}.bias"),
                GgmlType::F32,
                &[n as u64],
                random(n, 0.1),
            );
        }
        for kind in LinearKind::ALL {
            let (rows, cols) = match kind {
                LinearKind::Q => (q, HIDDEN),
                LinearKind::K | LinearKind::V => (kv, HIDDEN),
                LinearKind::O => (HIDDEN, q),
                LinearKind::Gate | LinearKind::Up => (FFN, HIDDEN),
                LinearKind::Down => (HIDDEN, FFN),
            };
            let amp = (3.0 / cols as f32).sqrt();
            b.tensor(
                &kind.tensor_name(l),
                GgmlType::F32,
                &[cols as u64, rows as u64],
                random(rows * cols, amp),
            );
        }
    }
    b.build()
}

/// Compresses the tiny model (3 levels of rank 2, round-robin order) into `out`.
fn write_tiny_stack(dir: &Path, out: &Path) {
    let gguf = dir.join("tiny-qwen2.gguf");
    std::fs::write(&gguf, tiny_qwen2_gguf()).unwrap();
    let source = open_model(&gguf).unwrap();
    let mut params = CompressParams {
        calib_windows: 2,
        calib_seq_len: 16,
        order: OrderMethod::RoundRobin,
        ..Default::default()
    };
    params.iavd.levels = 3;
    params.rank = RankRule::Fixed(2);
    let calib = "The quick brown fox jumps over the lazy dog. ".repeat(4);
    let compressed = compress(source.as_ref(), &calib, &params).unwrap();
    write_compressed(&compressed, out).unwrap();
}

/// Regenerates the model with the current writer into `$BITSTACK_FIXTURE_OUT` (ignored: the
/// committed fixture is deliberately an old file).
#[test]
#[ignore]
fn write_fixture() {
    let out =
        PathBuf::from(std::env::var_os("BITSTACK_FIXTURE_OUT").expect("set BITSTACK_FIXTURE_OUT"));
    let dir = std::env::temp_dir().join(format!("bitstack-fixture-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_tiny_stack(&dir, &out);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The old file opens through today's loader, has no Q/K layout key, and runs at its minimum
/// and full budgets (finite losses that differ, so both prefixes really ran).
#[test]
fn old_fixture_opens_and_runs() {
    use bitstack_examples::llama::Llama;
    use bitstack_examples::stackmodel::{LoadedStack, SnapshotLinears};
    let loaded = LoadedStack::open(fixture(), None).unwrap();
    let file = loaded.model.file();
    assert_eq!(file.version(), (1, 0));
    assert!(file.metadata_str("bitstack.qk_layout").is_none());
    let c = bitstack_examples::gguf::ModelSource::config(&loaded.model).clone();
    assert_eq!(c.arch, "qwen2");
    assert!(c.attn_bias && !c.tied_embeddings);
    assert_eq!(file.stacks().len(), 7 * LAYERS);
    let tokens = loaded.prompt_ids("The lazy dog", false).unwrap();
    assert!(tokens.len() >= 8);
    let nll_at = |levels_loaded: usize| {
        loaded.elastic.resize_to_prefix(levels_loaded).unwrap();
        let linears = SnapshotLinears(loaded.elastic.snapshot());
        let model = Llama::new(&loaded.resident, &linears).unwrap();
        let nll = model.sequence_nll(&tokens, tokens.len()).unwrap();
        assert!(nll.iter().all(|v| v.is_finite()), "{nll:?}");
        nll.iter().sum::<f32>()
    };
    let (min, full) = (nll_at(7 * LAYERS), nll_at(3 * 7 * LAYERS));
    assert_ne!(min, full);
}
