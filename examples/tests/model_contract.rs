//! The model contract of a stack file (issue 14) on a file written *before* the contract was
//! part of the published crates: `fixtures/stack-v1.0-synthetic.bitstack` was written by
//! commit 609b5b8 (format 1.0, no Q/K layout key) from the tiny synthetic Qwen2-style model
//! below (biases, untied head, byte-level vocabulary). Today's reader must still open it, read
//! its contract (Q/K layout `RotateHalf`, the layout every file of that time has) and run it.
//!
//! `write_fixture` (ignored) regenerates a file of the same model with the *current* writer;
//! the committed fixture must not be replaced by it, since the point is an old file.

use bitstack_examples::compress::{compress, write_compressed, CompressParams, RankRule};
use bitstack_examples::gguf::{open_model, SyntheticGguf};
use bitstack_examples::llama::LinearKind;
use std::path::{Path, PathBuf};

const LAYERS: usize = 2;
const HIDDEN: usize = 16;
const FFN: usize = 24;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 8;
const CONTEXT: usize = 64;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stack-v1.0-synthetic.bitstack")
}

/// The tiny Qwen2-style model (biases, untied head, byte-level vocabulary; f32 tensors).
fn tiny_qwen2() -> SyntheticGguf {
    SyntheticGguf {
        arch: "qwen2".into(),
        n_layers: LAYERS,
        hidden: HIDDEN,
        ffn: FFN,
        n_heads: HEADS,
        n_kv_heads: KV_HEADS,
        context: CONTEXT,
        rope_theta: 1_000_000.0,
        rms_eps: 1e-6,
        tied: false,
        attn_bias: true,
        seed: 14,
        ..Default::default()
    }
}

/// Compresses the tiny model (3 levels of rank 2, round-robin order) into `out`.
fn write_tiny_stack(dir: &Path, out: &Path) {
    write_tiny_stack_with(dir, out, bitstack_core::FactorDtype::F16)
}

/// [`write_tiny_stack`] with factors of type `factors`.
fn write_tiny_stack_with(dir: &Path, out: &Path, factors: bitstack_core::FactorDtype) {
    let gguf = dir.join("tiny-qwen2.gguf");
    tiny_qwen2().write(&gguf).unwrap();
    let source = open_model(&gguf).unwrap();
    let mut params = CompressParams {
        calib_windows: 2,
        calib_seq_len: 16,
        order: bitstack_sort::SortMethod::RoundRobin,
        ..Default::default()
    };
    params.iavd.levels = 3;
    params.iavd.factors = factors;
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

fn fixture_i8() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/stack-v2.0-i8-synthetic.bitstack")
}

/// Regenerates the int8-factor fixture (format 2.0) into `$BITSTACK_FIXTURE_OUT` (ignored:
/// the committed file is what later readers must keep opening).
#[test]
#[ignore]
fn write_fixture_i8() {
    let out =
        PathBuf::from(std::env::var_os("BITSTACK_FIXTURE_OUT").expect("set BITSTACK_FIXTURE_OUT"));
    let dir = std::env::temp_dir().join(format!("bitstack-fixture8-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_tiny_stack_with(&dir, &out, bitstack_core::FactorDtype::I8);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The committed int8-factor file (format 2.0, written by the commit that added int8
/// factors) opens, has int8 blocks of exactly `block_bytes` (codes + scales), the f16
/// file's contract, and runs at its minimum and full budgets; a fresh int8 compress of the
/// same model is a 2.0 file whose blocks round-trip through a rewrite byte for byte, and a
/// fresh f16 one is still 1.0.
#[test]
fn i8_fixture_opens_runs_and_new_files_round_trip() {
    use bitstack_core::FactorDtype;
    use bitstack_examples::llama::Llama;
    use bitstack_examples::stackmodel::{LoadedStack, SnapshotLinears};
    use bitstack_format::model::ModelContract;
    use bitstack_format::{write_stack_file, StackFile};
    let loaded = LoadedStack::open(fixture_i8(), None).unwrap();
    let file = loaded.model.file();
    assert_eq!(file.version(), (2, 0));
    assert!(file.stacks().iter().all(|m| m.factors == FactorDtype::I8));
    for (w, m) in file.stacks().iter().enumerate() {
        let b = file
            .read_block(bitstack_core::BlockId::new(w as u32, 0))
            .unwrap();
        assert_eq!(b.factor_dtype(), FactorDtype::I8);
        assert_eq!(b.heap_bytes(), m.block_bytes());
        assert_eq!(
            m.block_bytes(),
            bitstack_core::block_bytes(m.rows, m.cols, m.rank, FactorDtype::I8)
        );
    }
    let old = StackFile::open(fixture()).unwrap();
    let (nc, oc) = (
        ModelContract::from_file(file).unwrap(),
        ModelContract::from_file(&old).unwrap(),
    );
    assert_eq!(nc.config(), oc.config());
    assert_eq!(nc.residents(), oc.residents());
    let tokens = loaded.prompt_ids("The lazy dog", false).unwrap();
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

    let dir = std::env::temp_dir().join(format!("bitstack-i8rt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p8 = dir.join("new8.bitstack");
    write_tiny_stack_with(&dir, &p8, FactorDtype::I8);
    let new8 = StackFile::open(&p8).unwrap();
    assert_eq!(new8.version(), (2, 0));
    let again = dir.join("again8.bitstack");
    write_stack_file(&again, &new8.to_contents().unwrap()).unwrap();
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&p8).unwrap());
    let p16 = dir.join("new16.bitstack");
    write_tiny_stack(&dir, &p16);
    let new16 = StackFile::open(&p16).unwrap();
    assert_eq!(new16.version(), (1, 0));
    // Same shapes, half the factor bytes (plus two f32 scales per rank).
    for (m8, m16) in new8.stacks().iter().zip(new16.stacks()) {
        let values = (m8.rank * (m8.rows + m8.cols)) as u64;
        assert_eq!(
            m16.block_bytes() - m8.block_bytes(),
            values - 8 * m8.rank as u64
        );
    }
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
    assert_eq!(c.arch, bitstack_examples::gguf::Architecture::Qwen2);
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

/// The published contract reads the old file: config, Q/K layout `RotateHalf` (not recorded),
/// the stack ↔ linear ↔ tensor-name mapping, the resident tensors with their stored dtypes
/// and shapes, and the tokenizer blob.
#[test]
fn old_fixture_has_a_contract() {
    use bitstack_format::model::{
        stack_location, Architecture, ModelContract, QkLayout, ResidentRole, TOKENIZER_TENSOR,
    };
    use bitstack_format::{DType, StackFile};
    let file = StackFile::open(fixture()).unwrap();
    let contract = ModelContract::from_file(&file).unwrap();
    let c = contract.config();
    assert_eq!(c.arch, Architecture::Qwen2);
    assert_eq!((c.n_layers, c.hidden, c.ffn), (LAYERS, HIDDEN, FFN));
    assert_eq!(
        (c.n_heads, c.n_kv_heads, c.head_dim),
        (HEADS, KV_HEADS, HEAD_DIM)
    );
    assert!(c.attn_bias && !c.tied_embeddings);
    assert_eq!(contract.qk_layout(), QkLayout::RotateHalf);
    assert!(!contract.qk_layout_recorded());
    assert_eq!(contract.stack_count(), 7 * LAYERS);
    for (i, meta) in file.stacks().iter().enumerate() {
        let (layer, kind) = contract.linear_of(i).unwrap();
        assert_eq!((layer, kind), stack_location(i));
        assert_eq!(contract.stack_of(layer, kind), Some(i));
        assert_eq!(meta.name, kind.tensor_name(layer));
        assert_eq!((meta.rows, meta.cols), kind.shape(c));
    }
    assert_eq!(contract.linear_of(7 * LAYERS), None);
    assert_eq!(contract.stack_of(LAYERS, LinearKind::Q), None);
    assert_eq!(
        LinearKind::Q.hf_tensor_name(1),
        "model.layers.1.self_attn.q_proj.weight"
    );
    // Embedding, output norm, untied head, then per layer two norms and three biases.
    assert_eq!(contract.residents().len(), 3 + LAYERS * 5);
    for r in contract.residents() {
        assert_eq!(r.spec.dtype, DType::F16, "{}", r.spec.name);
        assert_eq!(r.spec.name, r.role.tensor_name());
        assert_eq!(file.resident(&r.spec.name).unwrap().shape(), r.spec.shape);
    }
    let bias = contract
        .resident(ResidentRole::Bias {
            layer: 1,
            kind: LinearKind::K,
        })
        .unwrap();
    assert_eq!(bias.spec.shape, vec![(KV_HEADS * HEAD_DIM) as u64]);
    assert_eq!(
        bias.role.hf_tensor_name(),
        "model.layers.1.self_attn.k_proj.bias"
    );
    let tok = contract.tokenizer().unwrap();
    assert_eq!(
        (tok.name.as_str(), tok.dtype),
        (TOKENIZER_TENSOR, DType::U8)
    );
}

/// A file written by today's writer from the same model records its Q/K layout and has the
/// same contract otherwise; a file claiming the interleaved layout reads as such and is
/// refused by this crate's (rotate-half) forward pass; an unknown layout is a typed error.
#[test]
fn new_files_record_the_qk_layout() {
    use bitstack_examples::stackmodel::StackModel;
    use bitstack_format::model::{ContractError, ModelContract, QkLayout, META_QK_LAYOUT};
    use bitstack_format::{write_stack_file, StackFile};
    let dir = std::env::temp_dir().join(format!("bitstack-contract-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let new_path = dir.join("new.bitstack");
    write_tiny_stack(&dir, &new_path);
    let new = StackFile::open(&new_path).unwrap();
    let old = StackFile::open(fixture()).unwrap();
    let (nc, oc) = (
        ModelContract::from_file(&new).unwrap(),
        ModelContract::from_file(&old).unwrap(),
    );
    assert_eq!(new.metadata_str(META_QK_LAYOUT), Some("rotate-half"));
    assert!(nc.qk_layout_recorded());
    assert_eq!(nc.qk_layout(), QkLayout::RotateHalf);
    assert_eq!(nc.config(), oc.config());
    assert_eq!(nc.residents(), oc.residents());

    let mut contents = new.to_contents().unwrap();
    let mut rewrite = |value: &str| {
        contents
            .metadata
            .insert(META_QK_LAYOUT.into(), value.as_bytes().to_vec());
        let p = dir.join(format!("{value}.bitstack"));
        write_stack_file(&p, &contents).unwrap();
        StackFile::open(&p).unwrap()
    };
    let interleaved = rewrite("interleaved");
    assert_eq!(
        ModelContract::from_file(&interleaved).unwrap().qk_layout(),
        QkLayout::Interleaved
    );
    let err = StackModel::new(interleaved).unwrap_err().to_string();
    assert!(err.contains("interleaved"), "{err}");
    assert!(matches!(
        ModelContract::from_file(&rewrite("sideways")),
        Err(ContractError::UnknownQkLayout(v)) if v == "sideways"
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

/// One byte accounting: the contract's resident bytes equal what `LlamaResident` holds at
/// every precision, and a loaded model's held bytes are those plus its blocks and scales.
#[test]
fn contract_accounting_equals_what_the_loader_holds() {
    use bitstack_core::LinearOp;
    use bitstack_examples::llama::{EmbeddingPrecision, LlamaResident};
    use bitstack_examples::stackmodel::{LoadedStack, StackModel};
    let model = StackModel::open(fixture()).unwrap();
    for p in [
        EmbeddingPrecision::F32,
        EmbeddingPrecision::F16,
        EmbeddingPrecision::Q8,
        EmbeddingPrecision::Q4,
    ] {
        let res = LlamaResident::from_source_with(&model, p).unwrap();
        assert_eq!(
            model.contract().held_resident_bytes(p),
            res.held_bytes(),
            "{p}"
        );
        let loaded = LoadedStack::open_with(fixture(), None, p).unwrap();
        loaded.elastic.resize_to_prefix(2 * 7 * LAYERS).unwrap();
        let snap = loaded.elastic.snapshot();
        let blocks: u64 = snap.weights().iter().map(|w| w.weight_bytes()).sum();
        assert_eq!(snap.held_bytes(), res.held_bytes() + blocks, "{p}");
    }
    // The stored payload bytes (tokenizer blob, f16 norms) are another number: the reason
    // the contract defines the held one.
    assert_ne!(
        model.file().layout().resident_bytes,
        model
            .contract()
            .held_resident_bytes(EmbeddingPrecision::F16)
    );
}

/// An engine using only bitstack-core + bitstack-format picks the same prefix and held bytes
/// for a budget as `bitstack eval` (the built binary, `--json`), at several budgets and the
/// f16, q8 and q4 resident precisions the CLI offers, for f16 and int8 factors.
#[test]
fn engine_and_cli_pick_the_same_prefix() {
    use bitstack_core::{ElasticModel, MemoryBudget};
    use bitstack_format::{EmbeddingPrecision, ModelContract, StackFile};
    let dir = std::env::temp_dir().join(format!("bitstack-budget-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        "A budget is the whole model, as held in memory. ".repeat(8),
    )
    .unwrap();
    // The f16 file at every precision, the int8-factor file at f16 and q4; `None`: no
    // --resident flag, against the engine's `EmbeddingPrecision::default()`.
    for (path, flag) in [
        (fixture(), Some(EmbeddingPrecision::F16)),
        (fixture(), Some(EmbeddingPrecision::Q8)),
        (fixture(), Some(EmbeddingPrecision::Q4)),
        (fixture(), None),
        (fixture_i8(), Some(EmbeddingPrecision::F16)),
        (fixture_i8(), Some(EmbeddingPrecision::Q4)),
        (fixture_i8(), None),
    ] {
        let precision = flag.unwrap_or_default();
        let file = StackFile::open(&path).unwrap();
        let factors = file.stacks()[0].factors;
        let contract = ModelContract::from_file(&file).unwrap();
        let layout = contract.held_layout(&file, precision);
        let (min, full) = (layout.minimum_bytes(), layout.full_bytes());
        let cum = layout.cumulative_bytes();
        // The minimum, the full model, points between, and one byte short of a block edge.
        let budgets = [
            min,
            min + (full - min) / 3,
            min + 2 * (full - min) / 3,
            cum[cum.len() - 2] - 1,
            full,
        ];
        let engine = ElasticModel::new(file, layout, MemoryBudget::from_bytes(min)).unwrap();
        let json = dir.join(format!(
            "eval-{precision}-{factors}-{}.json",
            flag.is_some()
        ));
        let list = budgets.map(|b| b.to_string()).join(",");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_bitstack"))
            .args(["eval", path.to_str().unwrap(), "--text"])
            .arg(&text)
            .args(["--budgets", &list, "--seq-len", "16", "--max-windows", "1"])
            .args(
                flag.map(|p| vec!["--resident".to_owned(), p.to_string()])
                    .unwrap_or_default(),
            )
            .arg("--json")
            .arg(&json)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert_eq!(doc["minimum_bytes"].as_u64(), Some(min));
        assert_eq!(doc["full_bytes"].as_u64(), Some(full));
        let rows = doc["rows"].as_array().unwrap();
        assert_eq!(rows.len(), budgets.len());
        for (b, row) in budgets.iter().zip(rows) {
            engine.resize(MemoryBudget::from_bytes(*b)).unwrap();
            let snap = engine.snapshot();
            assert_eq!(row["budget_bytes"].as_u64(), Some(*b));
            assert_eq!(row["blocks"].as_u64(), Some(snap.prefix() as u64), "{row}");
            assert_eq!(row["held_bytes"].as_u64(), Some(snap.held_bytes()), "{row}");
            assert!(snap.held_bytes() <= *b);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
