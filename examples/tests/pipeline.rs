//! End to end on the real SmolLM2 (skipped with a message when `../shared` is absent):
//! compress with tiny settings, write, reopen through the elastic runtime, and check that the
//! model runs, gets better as it grows, and carries its tokenizer.

use bitstack_core::MemoryBudget;
use bitstack_examples::compress::{
    compress, write_compressed, CompressParams, OrderSettings, RankRule,
};
use bitstack_examples::gguf::{open_model, ModelSource};
use bitstack_examples::llama::Llama;
use bitstack_examples::stackmodel::{LoadedStack, StackModel};
use bitstack_sort::SortMethod;
use std::path::PathBuf;

fn shared(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared")
        .join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: {} not found", p.display());
        None
    }
}

#[test]
fn compress_write_reopen_resize_on_smollm2() {
    let (Some(model), Some(calib), Some(test)) = (
        shared("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        shared("data/wikitext2-train-head.txt"),
        shared("data/wikitext2-test.raw"),
    ) else {
        return;
    };
    let source = open_model(&model).unwrap();
    let calib_text: String = std::fs::read_to_string(calib)
        .unwrap()
        .chars()
        .take(20_000)
        .collect();
    let mut params = CompressParams {
        calib_windows: 2,
        calib_seq_len: 64,
        order: SortMethod::Proxy,
        ..Default::default()
    };
    params.iavd.levels = 2;
    params.rank = RankRule::Fixed(4);
    let out = compress(source.as_ref(), &calib_text, &params).unwrap();
    assert_eq!(out.contents.stacks.len(), 210);
    assert!(out.mean_relative_errors[1] < out.mean_relative_errors[0]);

    // The sensitivity-weighted proxy: one evaluation per weight on a tiny scoring set gives a
    // valid level-major order (floor first) that is not plain round robin.
    let sensitive = compress(
        source.as_ref(),
        &calib_text,
        &CompressParams {
            order: SortMethod::ProxySensitive,
            order_settings: OrderSettings {
                scoring_seqs: 1,
                seq_len: 16,
                probe: bitstack_sort::SensitivityProbe::default(),
                ..OrderSettings::for_method(SortMethod::ProxySensitive)
            },
            ..params.clone()
        },
    )
    .unwrap();
    let order = &sensitive.contents.order;
    assert_eq!(order.len(), 420);
    assert!(order.as_slice()[..210].iter().all(|b| b.level == 0));
    assert!(order.as_slice()[210..].iter().all(|b| b.level == 1));
    let round_robin = bitstack_core::UniversalOrder::round_robin(vec![2; 210]).unwrap();
    assert_ne!(order.as_slice(), round_robin.as_slice());
    drop(sensitive);
    // The paper's Average straight from compress: level-major as well, and its own order.
    let average = compress(
        source.as_ref(),
        &calib_text,
        &CompressParams {
            order: SortMethod::Average,
            order_settings: OrderSettings {
                scoring_seqs: 1,
                seq_len: 16,
                ..OrderSettings::for_method(SortMethod::Average)
            },
            ..params.clone()
        },
    )
    .unwrap();
    let avg = average.contents.order.as_slice();
    assert!(avg[..210].iter().all(|b| b.level == 0));
    assert!(avg[210..].iter().all(|b| b.level == 1));
    assert_ne!(avg, round_robin.as_slice());
    drop(average);
    // The first-order order from compress: one gradient (at the floor, Average's own base for
    // the second blocks), level-major and not round robin.
    let first = compress(
        source.as_ref(),
        &calib_text,
        &CompressParams {
            order: SortMethod::FirstOrder,
            order_settings: OrderSettings {
                scoring_seqs: 1,
                seq_len: 16,
                bases: vec![1],
                ..OrderSettings::for_method(SortMethod::FirstOrder)
            },
            ..params.clone()
        },
    )
    .unwrap();
    let fo = first.contents.order.as_slice();
    assert!(fo[..210].iter().all(|b| b.level == 0));
    assert!(fo[210..].iter().all(|b| b.level == 1));
    assert_ne!(fo, round_robin.as_slice());
    drop(first);

    let dir = std::env::temp_dir().join(format!("bitstack-pipeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.bitstack");
    write_compressed(&out, &path).unwrap();

    // The stored tokenizer encodes exactly like the GGUF's.
    let text: String = std::fs::read_to_string(test)
        .unwrap()
        .chars()
        .take(4_000)
        .collect();
    let sm = StackModel::open(&path).unwrap();
    let want = source.tokenizer().unwrap().encode(&text, false).unwrap();
    assert_eq!(sm.tokenizer().unwrap().encode(&text, false).unwrap(), want);

    let loaded = LoadedStack::open(&path, None).unwrap();
    let min = loaded.elastic.minimum_bytes();
    assert!(matches!(
        LoadedStack::open(&path, Some(MemoryBudget::from_bytes(min - 1))),
        Err(bitstack_examples::stackmodel::LoadError::Core(
            bitstack_core::CoreError::BudgetBelowMinimum { .. }
        ))
    ));
    let nll = |l: &LoadedStack| -> f64 {
        let lin = l.linears();
        let m = Llama::new(&l.resident, &lin).unwrap();
        let v = m.sequence_nll(&want[..256], 128).unwrap();
        v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64
    };
    let at_min = nll(&loaded);
    let r = loaded
        .elastic
        .resize(MemoryBudget::from_bytes(loaded.elastic.full_bytes()))
        .unwrap();
    assert_eq!(r.blocks_loaded, 210);
    let at_full = nll(&loaded);
    assert!(at_min.is_finite() && at_full.is_finite());
    assert!(at_full < at_min, "full {at_full} vs minimum {at_min}");

    // A truncated copy is a typed error.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.join("cut.bitstack");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert!(StackModel::open(&cut).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
