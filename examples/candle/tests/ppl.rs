//! candle-transformers' Llama over a BitStack snapshot reproduces bitstack's own perplexity on
//! the same windows, on a tiny synthetic model (no shared files needed): a random two-layer
//! GQA Llama with a byte-level vocabulary written as GGUF (so compress un-permutes its Q/K rows
//! as for a real model), compressed into a 3-level stack file, evaluated at three budgets.

use bitstack_candle::{candle_perplexity, BitStackLinear, CandleError, CandleLlama};
use bitstack_core::MemoryBudget;
use bitstack_examples::compress::{compress, write_compressed, CompressParams, RankRule};
use bitstack_examples::gguf::{open_model, GgmlType, GgufBuilder, GgufValue, GgufValueType};
use bitstack_examples::llama::{LinearKind, Llama, LlamaConfig, SplitMix64};
use bitstack_examples::perplexity::{perplexity, PerplexityParams};
use bitstack_examples::stackmodel::{LoadedStack, SnapshotLinears};
use std::path::Path;

const CONTEXT: u32 = 96;

fn config() -> LlamaConfig {
    LlamaConfig {
        arch: "llama".into(),
        n_layers: 2,
        hidden: 32,
        ffn: 48,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
        vocab: 256,
        rope_theta: 10_000.0,
        rope_freq_factors: None,
        rms_eps: 1e-5,
        tied_embeddings: true,
        attn_bias: false,
        max_seq: CONTEXT as usize,
        bos_id: None,
        eos_id: None,
    }
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

fn write_tiny_gguf(path: &Path) {
    let c = config();
    let mut rng = SplitMix64::new(5);
    let mut random = |n: usize, amp: f32, offset: f32| -> Vec<u8> {
        f32_bytes(
            &(0..n)
                .map(|_| offset + amp * rng.next_signed())
                .collect::<Vec<_>>(),
        )
    };
    let strings = |v: Vec<String>| GgufValue::Array {
        elem_type: GgufValueType::String,
        values: v.into_iter().map(GgufValue::String).collect(),
    };
    let u = |v: usize| GgufValue::U32(v as u32);
    let mut b = GgufBuilder::new();
    b.metadata("general.architecture", GgufValue::String("llama".into()))
        .metadata("llama.block_count", u(c.n_layers))
        .metadata("llama.embedding_length", u(c.hidden))
        .metadata("llama.feed_forward_length", u(c.ffn))
        .metadata("llama.attention.head_count", u(c.n_heads))
        .metadata("llama.attention.head_count_kv", u(c.n_kv_heads))
        .metadata(
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(1e-5),
        )
        .metadata("llama.context_length", GgufValue::U32(CONTEXT))
        .metadata("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
        .metadata("tokenizer.ggml.pre", GgufValue::String("gpt2".into()))
        .metadata("tokenizer.ggml.tokens", strings(byte_vocab()))
        .metadata("tokenizer.ggml.merges", strings(vec![]));
    let h = c.hidden as u64;
    b.tensor(
        "token_embd.weight",
        GgmlType::F32,
        &[h, c.vocab as u64],
        random(c.hidden * c.vocab, 1.0, 0.0),
    );
    // Norm weights away from 1 so a mix-up of the two norms (or a missing one) shows.
    b.tensor(
        "output_norm.weight",
        GgmlType::F32,
        &[h],
        random(c.hidden, 0.3, 1.0),
    );
    for l in 0..c.n_layers {
        for norm in ["attn_norm", "ffn_norm"] {
            b.tensor(
                &format!("blk.{l}.{norm}.weight"),
                GgmlType::F32,
                &[h],
                random(c.hidden, 0.3, 1.0),
            );
        }
        for kind in LinearKind::ALL {
            let (rows, cols) = kind.shape(&c);
            let amp = (3.0 / cols as f32).sqrt();
            b.tensor(
                &kind.tensor_name(l),
                GgmlType::F32,
                &[cols as u64, rows as u64],
                random(rows * cols, amp, 0.0),
            );
        }
    }
    std::fs::write(path, b.build()).unwrap();
}

fn text() -> String {
    // Varied bytes so the model's predictions differ position by position.
    let mut rng = SplitMix64::new(17);
    let words = [
        "the ", "lamp ", "of ", "a ", "tower ", "keeps ", "ships ", "off ", "rocks. ",
    ];
    (0..200)
        .map(|_| words[(rng.next_u64() % words.len() as u64) as usize])
        .collect()
}

#[test]
fn candle_llama_matches_bitstack_perplexity_at_three_budgets() {
    let dir = std::env::temp_dir().join(format!("bitstack-candle-ppl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let gguf = dir.join("tiny.gguf");
    write_tiny_gguf(&gguf);
    let source = open_model(&gguf).unwrap();
    let mut params = CompressParams {
        calib_windows: 2,
        calib_seq_len: 32,
        order: bitstack_sort::SortMethod::RoundRobin,
        ..Default::default()
    };
    params.iavd.levels = 3;
    params.rank = RankRule::Fixed(4);
    let out = compress(source.as_ref(), &text(), &params).unwrap();
    let path = dir.join("tiny.bitstack");
    write_compressed(&out, &path).unwrap();

    let loaded = LoadedStack::open(&path, None).unwrap();
    let tokens = loaded.tokenizer.encode(&text(), false).unwrap();
    let ppl_params = PerplexityParams {
        seq_len: 40,
        max_windows: Some(3),
        ..Default::default()
    };
    let (min, full) = (loaded.elastic.minimum_bytes(), loaded.elastic.full_bytes());
    let budgets = [min, (min + full) / 2, full].map(MemoryBudget::from_bytes);
    let mut candle_ppls = vec![];
    for b in budgets {
        loaded.elastic.resize(b).unwrap();
        let snap = loaded.elastic.snapshot();
        let linears = SnapshotLinears(snap.clone());
        let ours = Llama::new(&loaded.resident, &linears).unwrap();
        let want = perplexity(&ours, &tokens, &ppl_params, &mut |_| {}).unwrap();
        let model = CandleLlama::from_snapshot(&loaded.model, &snap).unwrap();
        let mut calls = 0;
        let got =
            candle_perplexity(&model, &tokens, &ppl_params, 2, &mut |_, _| calls += 1).unwrap();
        assert_eq!(calls, 2, "3 windows in groups of 2");
        assert_eq!(
            (got.windows, got.tokens_scored),
            (want.windows, want.tokens_scored)
        );
        let rel = (got.ppl - want.ppl).abs() / want.ppl;
        assert!(
            rel < 1e-4,
            "budget {b}: candle ppl {} vs bitstack {} (relative {rel})",
            got.ppl,
            want.ppl
        );
        // Batching windows side by side does not change candle's numbers.
        let one = candle_perplexity(&model, &tokens, &ppl_params, 1, &mut |_, _| {}).unwrap();
        assert!((one.mean_nll - got.mean_nll).abs() < 1e-5);
        candle_ppls.push(got.ppl);

        // The fused-kernel layer over this snapshot's stacks agrees with candle's dense one.
        let q = BitStackLinear::from_snapshot(&snap, 0).unwrap().exact();
        assert_eq!((q.out_features(), q.in_features()), (32, 32));
        assert!(matches!(
            BitStackLinear::from_snapshot(&snap, 14),
            Err(CandleError::InvalidArgument { .. })
        ));
    }
    // The budgets buy different models, so the check above compared three distinct ones.
    assert!(candle_ppls[0] != candle_ppls[2], "{candle_ppls:?}");

    // Windows past the model's context and ids past the vocabulary are typed errors.
    let snap = loaded.elastic.snapshot();
    let model = CandleLlama::from_snapshot(&loaded.model, &snap).unwrap();
    let long = vec![1u32; CONTEXT as usize + 2];
    assert!(matches!(
        model.windows_nll(&[&long]),
        Err(CandleError::InvalidArgument { .. })
    ));
    assert!(matches!(
        model.windows_nll(&[&[1, 256]]),
        Err(CandleError::InvalidArgument { .. })
    ));
    std::fs::remove_dir_all(&dir).ok();
}
