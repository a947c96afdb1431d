//! candle-transformers' Llama over a BitStack snapshot reproduces bitstack's own perplexity on
//! the same windows, on a tiny synthetic model (no shared files needed): a random two-layer
//! GQA Llama with a byte-level vocabulary written as GGUF (so compress un-permutes its Q/K rows
//! as for a real model), compressed into a 3-level stack file, evaluated at three budgets.

use bitstack_candle::{candle_perplexity, BitStackLinear, CandleError, CandleLlama};
use bitstack_core::MemoryBudget;
use bitstack_examples::compress::{compress, write_compressed, CompressParams, RankRule};
use bitstack_examples::gguf::{open_model, SyntheticGguf};
use bitstack_examples::llama::{EmbeddingPrecision, Llama, SplitMix64};
use bitstack_examples::perplexity::{perplexity, PerplexityParams};
use bitstack_examples::stackmodel::{LoadedStack, SnapshotLinears};

const CONTEXT: usize = 96;

/// The tiny model: a random two-layer GQA Llama with GPT-2's byte vocabulary, written as GGUF
/// (so compress un-permutes its Q/K rows as for a real model). Norm weights away from 1 so a
/// mix-up of the two norms (or a missing one) shows.
fn tiny() -> SyntheticGguf {
    SyntheticGguf {
        context: CONTEXT,
        seed: 5,
        norm_jitter: 0.3,
        ..Default::default()
    }
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
    check_at_three_budgets(bitstack_core::FactorDtype::F16);
}

/// The same with int8 factor vectors (the CLI's default, file format 2.0): candle restores
/// through the public API, which dequantizes them.
#[test]
fn candle_llama_matches_bitstack_perplexity_with_int8_factors() {
    check_at_three_budgets(bitstack_core::FactorDtype::I8);
}

fn check_at_three_budgets(factors: bitstack_core::FactorDtype) {
    let dir = std::env::temp_dir().join(format!(
        "bitstack-candle-ppl-{}-{factors}",
        std::process::id()
    ));
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
    params.iavd.factors = factors;
    params.rank = RankRule::Fixed(4);
    let out = compress(source.as_ref(), &text(), &params).unwrap();
    let path = dir.join("tiny.bitstack");
    write_compressed(&out, &path).unwrap();

    // As stored (f16), which is what candle reads.
    let loaded = LoadedStack::open_with(&path, None, EmbeddingPrecision::F16).unwrap();
    assert_eq!(loaded.model.file().stacks()[0].factors, factors);
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
        let model = CandleLlama::from_snapshot(loaded.model.file(), &snap).unwrap();
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
    let model = CandleLlama::from_snapshot(loaded.model.file(), &snap).unwrap();
    let long = vec![1u32; CONTEXT + 2];
    assert!(matches!(
        model.windows_nll(&[&long]),
        Err(CandleError::InvalidArgument { .. })
    ));
    assert!(matches!(
        model.windows_nll(&[&[1, 256]]),
        Err(CandleError::InvalidArgument { .. })
    ));

    // The same file with its contract saying interleaved (GGUF-order) Q/K rows is refused:
    // candle's Llama would rotate the wrong pairs.
    let mut contents = loaded.model.file().to_contents().unwrap();
    contents.metadata.insert(
        bitstack_format::model::META_QK_LAYOUT.to_owned(),
        b"interleaved".to_vec(),
    );
    let relabelled = dir.join("interleaved.bitstack");
    bitstack_format::write_stack_file(&relabelled, &contents).unwrap();
    let file = bitstack_format::StackFile::open(&relabelled).unwrap();
    match CandleLlama::from_snapshot(&file, &snap) {
        Err(CandleError::Unsupported(why)) => assert!(why.contains("interleaved"), "{why}"),
        other => panic!("expected Unsupported, got {:?}", other.map(|_| ())),
    }
    std::fs::remove_dir_all(&dir).ok();
}
