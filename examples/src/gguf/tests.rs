use std::path::PathBuf;

use half::{bf16, f16};
use proptest::prelude::*;

use super::testdata::*;
use super::*;

fn shared() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared"))
}

fn smollm() -> Option<PathBuf> {
    let p = shared().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        println!("skipped: {} is absent", p.display());
        None
    }
}

/// The block the reference vectors in `testdata.rs` were computed from.
fn pattern_block(ty: GgmlType, fields: &[(usize, f32)]) -> Vec<u8> {
    let mut b: Vec<u8> = (0..ty.block_bytes())
        .map(|i| ((i * 73 + 29) & 255) as u8)
        .collect();
    for &(off, v) in fields {
        b[off..off + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
    }
    b
}

fn deq(ty: GgmlType, data: &[u8]) -> Vec<f32> {
    let n = data.len() / ty.block_bytes() * ty.block_elems();
    let mut out = vec![f32::NAN; n];
    dequantize(ty, data, &mut out).unwrap();
    out
}

#[test]
fn quant_blocks_match_reference_vectors() {
    type Case = (GgmlType, &'static [(usize, f32)], &'static [f32]);
    let cases: [Case; 9] = [
        (GgmlType::Q4_0, Q40_FIELDS, Q40_EXPECTED),
        (GgmlType::Q4_1, Q41_FIELDS, Q41_EXPECTED),
        (GgmlType::Q5_0, Q50_FIELDS, Q50_EXPECTED),
        (GgmlType::Q5_1, Q51_FIELDS, Q51_EXPECTED),
        (GgmlType::Q8_0, Q80_FIELDS, Q80_EXPECTED),
        (GgmlType::Q2K, Q2K_FIELDS, Q2K_EXPECTED),
        (GgmlType::Q4K, Q4K_FIELDS, Q4K_EXPECTED),
        (GgmlType::Q5K, Q5K_FIELDS, Q5K_EXPECTED),
        (GgmlType::Q6K, Q6K_FIELDS, Q6K_EXPECTED),
    ];
    for (ty, fields, expected) in cases {
        let got = deq(ty, &pattern_block(ty, fields));
        assert_eq!(got, expected, "{ty:?}");
    }
}

#[test]
fn q4_0_and_q8_0_hand_derived() {
    // Q4_0: d = 2, byte j holds x[j] (low nibble) and x[j + 16] (high nibble), value (q - 8) d.
    let mut b = f16::from_f32(2.0).to_le_bytes().to_vec();
    b.extend((0..16u8).map(|j| (15 - j) << 4 | j));
    let y = deq(GgmlType::Q4_0, &b);
    for j in 0..16 {
        assert_eq!(y[j], (j as f32 - 8.0) * 2.0);
        assert_eq!(y[j + 16], (7.0 - j as f32) * 2.0);
    }
    // Q8_0: value = d * int8.
    let mut b = f16::from_f32(-0.5).to_le_bytes().to_vec();
    b.extend((0..32).map(|j| ((j as i8) * 4 - 64) as u8));
    let y = deq(GgmlType::Q8_0, &b);
    for (j, v) in y.iter().enumerate() {
        assert_eq!(*v, -0.5 * ((j as i8) * 4 - 64) as f32);
    }
}

#[test]
fn q4_1_hand_derived() {
    // value = q d + m
    let mut b = f16::from_f32(0.25).to_le_bytes().to_vec();
    b.extend(f16::from_f32(-1.0).to_le_bytes());
    b.extend((0..16u8).map(|j| (j ^ 5) << 4 | j));
    let y = deq(GgmlType::Q4_1, &b);
    for j in 0..16u8 {
        assert_eq!(y[j as usize], j as f32 * 0.25 - 1.0);
        assert_eq!(y[j as usize + 16], (j ^ 5) as f32 * 0.25 - 1.0);
    }
}

#[test]
fn q4_k_hand_derived() {
    // Sub-block s in 0..4 has scale s + 1 and min 2 s in the low 6 bits of bytes s and s + 4;
    // sub-blocks 4..8 take their low 4 bits from bytes 8..12 and high 2 bits from the top bits of
    // bytes 0..8. Give sub-block 4..8 scale 17 + s (0b01_xxxx) and min 33 + s (0b10_xxxx).
    let (d, dmin) = (0.5f32, 0.125f32);
    let mut scales = [0u8; 12];
    for s in 0..4 {
        let (sc_hi, m_hi) = (17 + s as u8, 33 + s as u8);
        scales[s] = (s as u8 + 1) | (sc_hi >> 4) << 6;
        scales[s + 4] = (2 * s as u8) | (m_hi >> 4) << 6;
        scales[s + 8] = (sc_hi & 0x0F) | (m_hi & 0x0F) << 4;
    }
    let mut b = f16::from_f32(d).to_le_bytes().to_vec();
    b.extend(f16::from_f32(dmin).to_le_bytes());
    b.extend(scales);
    // qs: 4 chunks of 32 bytes; chunk c low nibbles = sub-block 2c, high = sub-block 2c + 1.
    b.extend((0..128).map(|i| ((i % 16) as u8) | ((15 - i % 16) as u8) << 4));
    let y = deq(GgmlType::Q4K, &b);
    let sc = |s: usize| {
        if s < 4 {
            s as f32 + 1.0
        } else {
            17.0 + (s - 4) as f32
        }
    };
    let mn = |s: usize| {
        if s < 4 {
            2.0 * s as f32
        } else {
            33.0 + (s - 4) as f32
        }
    };
    for s in 0..8 {
        for l in 0..32 {
            let q = if s % 2 == 0 { l % 16 } else { 15 - l % 16 } as f32;
            let want = d * sc(s) * q - dmin * mn(s);
            assert_eq!(y[s * 32 + l], want, "sub-block {s}, element {l}");
        }
    }
}

#[test]
fn q6_k_hand_derived() {
    // All ql nibbles 0xA, all qh 2-bit fields 0b01: q = 0x1A - 32 = -6, scales[i] = i - 8.
    let mut b = vec![0xAAu8; 128];
    b.extend(vec![0b0101_0101u8; 64]);
    b.extend((0..16).map(|i| (i as i8 - 8) as u8));
    b.extend(f16::from_f32(0.5).to_le_bytes());
    let y = deq(GgmlType::Q6K, &b);
    for (i, v) in y.iter().enumerate() {
        // Element i lies in sub-block i / 16 (16 scales of 16 elements).
        let scale = (i / 16) as f32 - 8.0;
        assert_eq!(*v, 0.5 * scale * -6.0, "element {i}");
    }
}

#[test]
fn float_types() {
    let vals = [0.0f32, -1.5, 65504.0, 1e-3, f32::INFINITY];
    let f16b: Vec<u8> = vals
        .iter()
        .flat_map(|&v| f16::from_f32(v).to_le_bytes())
        .collect();
    let want: Vec<f32> = vals.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
    assert_eq!(deq(GgmlType::F16, &f16b), want);
    let bf: Vec<u8> = vals
        .iter()
        .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
        .collect();
    let want: Vec<f32> = vals.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    assert_eq!(deq(GgmlType::BF16, &bf), want);
    let f: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(deq(GgmlType::F32, &f), vals);
}

#[test]
fn dequantize_rejects_wrong_sizes() {
    let mut out = vec![0f32; 32];
    assert!(matches!(
        dequantize(GgmlType::Q4_0, &[0u8; 17], &mut out),
        Err(GgufError::BadTensorShape { .. })
    ));
    let mut out = vec![0f32; 31];
    assert!(dequantize(GgmlType::Q4_0, &[0u8; 18], &mut out).is_err());
}

proptest! {
    #[test]
    fn parallel_dequant_equals_per_block(
        seed in any::<u64>(),
        blocks in 1usize..40,
        ty_idx in 0usize..9,
    ) {
        let types = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1,
            GgmlType::Q8_0, GgmlType::Q2K, GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K];
        let ty = types[ty_idx];
        let mut rng = bitstack_core::testutil::XorShift::new(seed | 1);
        let data: Vec<u8> = (0..blocks * ty.block_bytes()).map(|_| rng.next_u64() as u8).collect();
        let whole = deq(ty, &data);
        for (i, block) in data.chunks(ty.block_bytes()).enumerate() {
            let one = deq(ty, block);
            let part = &whole[i * ty.block_elems()..(i + 1) * ty.block_elems()];
            // Compare bit patterns so NaNs from random f16 scales compare equal.
            prop_assert!(one.iter().zip(part).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute(heads in 1usize..5, half_d in 1usize..5, cols in 1usize..4) {
        let rows = heads * 2 * half_d;
        let hf: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        // llama.cpp: reshape(n_head, 2, d/2, cols).swapaxes(1, 2): GGUF row h d + 2 i + s is
        // HF row h d + s d/2 + i.
        let d = 2 * half_d;
        let mut gguf = vec![0f32; rows * cols];
        for h in 0..heads {
            for i in 0..half_d {
                for s in 0..2 {
                    let (g, r) = (h * d + 2 * i + s, h * d + s * half_d + i);
                    gguf[g * cols..(g + 1) * cols].copy_from_slice(&hf[r * cols..(r + 1) * cols]);
                }
            }
        }
        prop_assert_eq!(unpermute_qk_rows(&gguf, heads, rows, cols).unwrap(), hf);
    }
}

#[test]
fn unpermute_hand_example() {
    // One head of width 4: GGUF rows [r0, r1, r2, r3] hold HF rows [0, 2, 1, 3].
    let gguf = [0.0, 2.0, 1.0, 3.0];
    assert_eq!(
        unpermute_qk_rows(&gguf, 1, 4, 1).unwrap(),
        vec![0.0, 1.0, 2.0, 3.0]
    );
    assert!(unpermute_qk_rows(&gguf, 3, 4, 1).is_err());
    assert!(unpermute_qk_rows(&gguf, 1, 4, 2).is_err());
    assert!(
        unpermute_qk_rows(&gguf[..2], 2, 2, 1).is_err(),
        "odd head width"
    );
}

fn sample_file() -> Vec<u8> {
    let mut b = GgufBuilder::new();
    b.metadata("general.architecture", GgufValue::String("llama".into()))
        .metadata("u8", GgufValue::U8(7))
        .metadata("i16", GgufValue::I16(-3))
        .metadata("u64", GgufValue::U64(1 << 40))
        .metadata("f64", GgufValue::F64(0.25))
        .metadata("flag", GgufValue::Bool(true))
        .metadata(
            "list",
            GgufValue::Array {
                elem_type: GgufValueType::String,
                values: vec![
                    GgufValue::String("a".into()),
                    GgufValue::String("bc".into()),
                ],
            },
        );
    let q8: Vec<u8> = pattern_block(GgmlType::Q8_0, Q80_FIELDS).repeat(2);
    b.tensor("q8", GgmlType::Q8_0, &[32, 2], q8);
    b.tensor("f32", GgmlType::F32, &[1], 1.5f32.to_le_bytes().to_vec());
    b.build()
}

#[test]
fn metadata_getters_and_types() {
    let f = GgufFile::from_bytes(sample_file()).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get_u32("u8").unwrap(), 7);
    assert_eq!(f.get_i64("i16").unwrap(), -3);
    assert!(matches!(f.get_u32("i16"), Err(GgufError::WrongType { .. })));
    assert!(matches!(f.get_u32("u64"), Err(GgufError::WrongType { .. })));
    assert_eq!(f.get_u64("u64").unwrap(), 1 << 40);
    assert_eq!(f.get_f32("f64").unwrap(), 0.25);
    assert!(f.get_bool("flag").unwrap());
    assert_eq!(f.get_str_array("list").unwrap(), vec!["a", "bc"]);
    assert!(matches!(f.get_str("u8"), Err(GgufError::WrongType { .. })));
    assert!(matches!(f.get_f32("nope"), Err(GgufError::MissingKey(_))));
    assert_eq!(f.tensors().len(), 2);
    let (shape, v) = f.tensor_f32("q8").unwrap();
    assert_eq!(shape, vec![2, 32]);
    assert_eq!(&v[..32], Q80_EXPECTED);
    assert_eq!(&v[32..], Q80_EXPECTED);
    assert_eq!(f.tensor_f32("f32").unwrap(), (vec![1], vec![1.5]));
    assert!(matches!(
        f.tensor_f32("x"),
        Err(GgufError::MissingTensor(_))
    ));
}

#[test]
fn every_truncation_is_a_typed_error() {
    let full = sample_file();
    for len in 0..full.len() - 1 {
        // Trailing padding after the last tensor is not needed, so only cut into real content.
        let r = GgufFile::from_bytes(full[..len].to_vec());
        if len < full.len() - 28 {
            assert!(r.is_err(), "prefix of {len} bytes parsed");
        }
    }
}

#[test]
fn corrupt_headers_are_rejected() {
    let mut bad = sample_file();
    bad[0] = b'X';
    assert!(matches!(
        GgufFile::from_bytes(bad),
        Err(GgufError::BadMagic(_))
    ));

    let mut bad = sample_file();
    bad[4..8].copy_from_slice(&9u32.to_le_bytes());
    assert!(matches!(
        GgufFile::from_bytes(bad),
        Err(GgufError::UnsupportedVersion(9))
    ));

    let mut bad = sample_file();
    bad[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        GgufFile::from_bytes(bad),
        Err(GgufError::ImplausibleCount { .. })
    ));

    // A string array claiming 2^60 elements.
    let mut b = GgufBuilder::new();
    b.metadata(
        "k",
        GgufValue::Array {
            elem_type: GgufValueType::U8,
            values: vec![GgufValue::U8(1)],
        },
    );
    let mut bytes = b.build();
    let at = 24 + 8 + 1 + 4 + 4; // header, key length, key, value type, element type
    bytes[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(matches!(
        GgufFile::from_bytes(bytes),
        Err(GgufError::ImplausibleCount { .. })
    ));

    // A tensor whose data lies beyond the end of the file.
    let mut b = GgufBuilder::new();
    b.tensor("t", GgmlType::F32, &[8], vec![0u8; 32]);
    let mut bytes = b.build();
    let off_at = 24 + 8 + 1 + 4 + 8 + 4;
    bytes[off_at..off_at + 8].copy_from_slice(&(1u64 << 20).to_le_bytes());
    assert!(matches!(
        GgufFile::from_bytes(bytes),
        Err(GgufError::TensorOutOfBounds { .. })
    ));

    // ne0 not a multiple of the block size.
    let mut b = GgufBuilder::new();
    b.tensor("t", GgmlType::Q4_0, &[16], vec![0u8; 18]);
    assert!(matches!(
        GgufFile::from_bytes(b.build()),
        Err(GgufError::BadTensorShape { .. })
    ));

    // Unknown tensor types open but cannot be read.
    let mut bytes = {
        let mut b = GgufBuilder::new();
        b.tensor("t", GgmlType::F32, &[8], vec![0u8; 32]);
        b.build()
    };
    let ty_at = 24 + 8 + 1 + 4 + 8;
    bytes[ty_at..ty_at + 4].copy_from_slice(&20u32.to_le_bytes());
    let f = GgufFile::from_bytes(bytes).unwrap();
    assert!(matches!(
        f.tensor_f32("t"),
        Err(GgufError::UnsupportedTensorType(20))
    ));

    assert!(matches!(
        GgufFile::open("/nonexistent/x.gguf"),
        Err(GgufError::Io { .. })
    ));
}

#[test]
fn smollm_header_and_config() {
    let Some(path) = smollm() else { return };
    let m = GgufModel::open(&path).unwrap();
    let c = m.config();
    assert_eq!(
        (
            c.n_layers,
            c.hidden,
            c.ffn,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.vocab
        ),
        (30, 576, 1536, 9, 3, 64, 49152)
    );
    assert_eq!(c.rope_theta, 100_000.0);
    assert!((c.rms_eps - 1e-5).abs() < 1e-9);
    assert!(c.tied_embeddings && !c.attn_bias && c.rope_freq_factors.is_none());
    assert_eq!((c.bos_id, c.eos_id, c.max_seq), (Some(1), Some(2), 8192));
    assert!(!m.has_tensor("output.weight"));
    assert_eq!(m.file().tensors().len(), 272);
}

#[test]
fn smollm_tensors_match_gguf_py() {
    let Some(path) = smollm() else { return };
    let f = GgufFile::open(&path).unwrap();
    // (name, PyTorch shape, sum, [(index, value)]) from gguf-py 0.19.0's numpy dequantizers.
    // Values are f64 literals so that the exact f32 values can be written out in full.
    type Case = (&'static str, [usize; 2], f64, [(usize, f64); 4]);
    let cases: [Case; 3] = [
        (
            "token_embd.weight",
            [49152, 576],
            -15353.04449415207,
            [
                (0, -0.106_544_494_628_906_25),
                (1, 0.032_978_057_861_328_125),
                (12345, 0.031_005_859_375),
                (28311551, -0.041_702_270_507_812_5),
            ],
        ),
        (
            "blk.0.attn_q.weight",
            [576, 576],
            59.22322082519531,
            [
                (0, -0.096_313_476_562_5),
                (1, 0.157_348_632_812_5),
                (12345, 0.121_093_75),
                (331775, -0.255_859_375),
            ],
        ),
        (
            "blk.29.ffn_down.weight",
            [576, 1536],
            49.83570861816406,
            [
                (0, -0.273_315_429_687_5),
                (1, 0.186_279_296_875),
                (12345, -0.044_982_910_156_25),
                (884735, 0.056_640_625),
            ],
        ),
    ];
    for (name, shape, sum, points) in cases {
        let (s, v) = f.tensor_f32(name).unwrap();
        assert_eq!(s, shape, "{name}");
        let got: f64 = v.iter().map(|&x| x as f64).sum();
        assert!(
            (got - sum).abs() < 1e-6 * sum.abs().max(1.0),
            "{name}: sum {got} vs {sum}"
        );
        for (i, want) in points {
            assert_eq!(f64::from(v[i]), want, "{name}[{i}]");
        }
    }
}

#[test]
fn smollm_source_unpermutes_q_and_k() {
    let Some(path) = smollm() else { return };
    let m = GgufModel::open(&path).unwrap();
    for (name, heads) in [("blk.3.attn_q.weight", 9), ("blk.3.attn_k.weight", 3)] {
        let (_, raw) = m.file().tensor_f32(name).unwrap();
        let (shape, hf) = m.tensor_f32(name).unwrap();
        let (d, cols) = (64, shape[1]);
        assert_eq!(shape[0], heads * d);
        for h in 0..heads {
            for i in 0..d / 2 {
                for s in 0..2 {
                    let (r_hf, r_gguf) = (h * d + s * d / 2 + i, h * d + 2 * i + s);
                    assert_eq!(
                        hf[r_hf * cols..(r_hf + 1) * cols],
                        raw[r_gguf * cols..(r_gguf + 1) * cols]
                    );
                }
            }
        }
    }
    // Other tensors pass through unchanged.
    assert_eq!(
        m.tensor_f32("blk.3.attn_v.weight").unwrap(),
        m.file().tensor_f32("blk.3.attn_v.weight").unwrap()
    );
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "bitstack-gguf-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Serializes tensors (name, dtype, shape, raw bytes) as safetensors.
fn write_safetensors(path: &std::path::Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            (*name).into(),
            serde_json::json!({"dtype": dtype, "shape": shape,
                "data_offsets": [data.len(), data.len() + bytes.len()]}),
        );
        data.extend_from_slice(bytes);
    }
    let h = serde_json::Value::Object(header).to_string();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn hf_directory_qwen2_style() {
    let dir = TempDir::new("hf");
    let config = serde_json::json!({
        "model_type": "qwen2", "hidden_size": 4, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "vocab_size": 3, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": false, "max_position_embeddings": 32,
        "bos_token_id": null, "eos_token_id": [7, 8]
    });
    std::fs::write(dir.0.join("config.json"), config.to_string()).unwrap();
    let q: Vec<f32> = (0..16).map(|i| i as f32 * 0.5).collect();
    let bias_bf16: Vec<u8> = [1.0f32, -2.0]
        .iter()
        .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
        .collect();
    let emb_f16: Vec<u8> = (0..12)
        .flat_map(|i| f16::from_f32(i as f32 / 4.0).to_le_bytes())
        .collect();
    write_safetensors(
        &dir.0.join("model-00001-of-00002.safetensors"),
        &[
            (
                "model.layers.0.self_attn.q_proj.weight",
                "F32",
                vec![4, 4],
                f32s(&q),
            ),
            (
                "model.layers.0.self_attn.k_proj.bias",
                "BF16",
                vec![2],
                bias_bf16,
            ),
        ],
    );
    write_safetensors(
        &dir.0.join("model-00002-of-00002.safetensors"),
        &[
            ("model.embed_tokens.weight", "F16", vec![3, 4], emb_f16),
            ("lm_head.weight", "F32", vec![3, 4], f32s(&[0.0; 12])),
            (
                "model.layers.0.mlp.up_proj.weight",
                "I8",
                vec![8, 4],
                vec![0; 32],
            ),
        ],
    );
    let m = open_model(&dir.0).unwrap();
    let c = m.config();
    assert_eq!((c.arch.as_str(), c.head_dim, c.n_kv_heads), ("qwen2", 2, 1));
    assert!(c.attn_bias && !c.tied_embeddings);
    assert_eq!((c.bos_id, c.eos_id), (None, Some(7)));
    // HF layout is passed through untouched (no Q/K permutation for HF sources).
    assert_eq!(
        m.tensor_f32("blk.0.attn_q.weight").unwrap(),
        (vec![4, 4], q)
    );
    assert_eq!(
        m.tensor_f32("blk.0.attn_k.bias").unwrap(),
        (vec![2], vec![1.0, -2.0])
    );
    let (s, e) = m.tensor_f32("token_embd.weight").unwrap();
    assert_eq!((s, e[5]), (vec![3, 4], 1.25));
    assert!(m.has_tensor("output.weight"));
    assert!(!m.has_tensor("blk.0.attn_v.weight"));
    assert!(matches!(
        m.tensor_f32("blk.0.attn_v.weight"),
        Err(ModelError::MissingTensor(_))
    ));
    assert!(matches!(
        m.tensor_f32("blk.0.ffn_up.weight"),
        Err(ModelError::Unsupported(_))
    ));
}

#[test]
fn hf_config_rules() {
    let base = serde_json::json!({
        "model_type": "llama", "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 10,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    });
    let mut tied = base.clone();
    tied["tie_word_embeddings"] = true.into();
    let c = hf_config(&tied, false).unwrap();
    assert_eq!((c.n_kv_heads, c.head_dim, c.rope_theta), (2, 4, 10_000.0));
    assert!(c.tied_embeddings);
    // Untied (the class default) with no lm_head tensor is an error, not a silent tie.
    assert!(matches!(
        hf_config(&base, false),
        Err(ModelError::UnsupportedKey { key, .. }) if key == "tie_word_embeddings"
    ));
    // theta^(-0) = 1 rad/token has wavelength 2 pi < 8192 / 4: unscaled; theta^(-1/2) = 0.01
    // has wavelength 628 < 2048: unscaled too.
    assert_eq!(c.rope_freq_factors, Some(vec![1.0, 1.0]));

    let mut arch = base.clone();
    arch["model_type"] = "gpt_neox".into();
    assert!(matches!(
        hf_config(&arch, true),
        Err(ModelError::UnsupportedKey { key, .. }) if key == "model_type"
    ));
    let mut missing = base.clone();
    missing.as_object_mut().unwrap().remove("hidden_size");
    assert!(matches!(
        hf_config(&missing, true),
        Err(ModelError::BadConfig(_))
    ));
    let mut gqa = base;
    gqa["num_key_value_heads"] = 3.into();
    assert!(matches!(
        hf_config(&gqa, true),
        Err(ModelError::BadConfig(_))
    ));
}

#[test]
fn bad_safetensors_are_rejected() {
    let dir = TempDir::new("st");
    let p = dir.0.join("a.safetensors");
    // Offsets past the data.
    write_safetensors(&p, &[("x", "F32", vec![2], f32s(&[1.0, 2.0]))]);
    let mut bytes = std::fs::read(&p).unwrap();
    let text = String::from_utf8_lossy(&bytes).replace("[0,8]", "[0,9]");
    bytes = text.into_bytes();
    std::fs::write(&p, &bytes).unwrap();
    assert!(matches!(
        SafeTensors::open(&p),
        Err(ModelError::BadSafetensors { .. })
    ));
    // A header length beyond the file.
    std::fs::write(&p, u64::MAX.to_le_bytes()).unwrap();
    assert!(matches!(
        SafeTensors::open(&p),
        Err(ModelError::BadSafetensors { .. })
    ));
    // Shape / size mismatch.
    write_safetensors(&p, &[("x", "F32", vec![3], f32s(&[1.0, 2.0]))]);
    assert!(matches!(
        SafeTensors::open(&p),
        Err(ModelError::BadSafetensors { .. })
    ));
    std::fs::write(&p, [1u8, 2]).unwrap();
    assert!(matches!(
        SafeTensors::open(&p),
        Err(ModelError::BadSafetensors { .. })
    ));
}

#[test]
fn smollm_every_canonical_tensor_loads_with_config_shapes() {
    let Some(path) = smollm() else { return };
    let t = std::time::Instant::now();
    let m = open_model(&path).unwrap();
    let c = m.config().clone();
    let (q, kv) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let mut expected = vec![
        ("token_embd.weight".to_owned(), vec![c.vocab, c.hidden]),
        ("output_norm.weight".to_owned(), vec![c.hidden]),
    ];
    for i in 0..c.n_layers {
        for (part, shape) in [
            ("attn_norm", vec![c.hidden]),
            ("ffn_norm", vec![c.hidden]),
            ("attn_q", vec![q, c.hidden]),
            ("attn_k", vec![kv, c.hidden]),
            ("attn_v", vec![kv, c.hidden]),
            ("attn_output", vec![c.hidden, q]),
            ("ffn_gate", vec![c.ffn, c.hidden]),
            ("ffn_up", vec![c.ffn, c.hidden]),
            ("ffn_down", vec![c.hidden, c.ffn]),
        ] {
            expected.push((format!("blk.{i}.{part}.weight"), shape));
        }
    }
    let mut elems = 0usize;
    for (name, shape) in &expected {
        let (s, v) = m.tensor_f32(name).unwrap();
        assert_eq!(&s, shape, "{name}");
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{name} has non-finite values"
        );
        elems += v.len();
    }
    println!(
        "dequantized {} tensors ({elems} values) in {:?}",
        expected.len(),
        t.elapsed()
    );
    // The canonical names cover every tensor in the file (tied: no output.weight).
    assert_eq!(expected.len(), 272);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary byte corruption yields typed errors (or a still-valid file), never a panic.
    #[test]
    fn corrupted_files_never_panic(edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
        let mut bytes = sample_file();
        let n = bytes.len();
        for (at, v) in edits {
            // Bias edits towards the header, where the structure lives.
            bytes[at % (n / 2)] = v;
        }
        if let Ok(f) = GgufFile::from_bytes(bytes) {
            let names: Vec<String> = f.tensors().iter().map(|t| t.name.clone()).collect();
            for name in names {
                let _ = f.tensor_f32(&name);
            }
            let keys: Vec<String> = f.metadata().keys().cloned().collect();
            for k in keys {
                let _ = (f.get_u32(&k), f.get_str(&k), f.get_str_array(&k), f.get_f32(&k));
            }
        }
    }
}

/// A minimal Llama GGUF header (4 heads of 4, 2 KV heads) with `extra` metadata and an optional
/// `rope_freqs.weight`.
fn tiny_gguf(extra: &[(&str, GgufValue)], rope_freqs: Option<&[f32]>) -> GgufFile {
    let mut b = GgufBuilder::new();
    b.metadata("general.architecture", GgufValue::String("llama".into()))
        .metadata("llama.block_count", GgufValue::U32(1))
        .metadata("llama.embedding_length", GgufValue::U32(16))
        .metadata("llama.feed_forward_length", GgufValue::U32(32))
        .metadata("llama.attention.head_count", GgufValue::U32(4))
        .metadata("llama.attention.head_count_kv", GgufValue::U32(2))
        .metadata("llama.attention.key_length", GgufValue::U32(4))
        .metadata("llama.context_length", GgufValue::U32(64))
        .metadata(
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(1e-5),
        );
    for (k, v) in extra {
        b.metadata(k, v.clone());
    }
    b.tensor(
        "token_embd.weight",
        GgmlType::F32,
        &[16, 8],
        f32s(&[0.0; 128]),
    );
    if let Some(f) = rope_freqs {
        b.tensor(
            "rope_freqs.weight",
            GgmlType::F32,
            &[f.len() as u64],
            f32s(f),
        );
    }
    GgufFile::from_bytes(b.build()).unwrap()
}

fn gguf_cfg(extra: &[(&str, GgufValue)]) -> Result<(LlamaConfig, Vec<String>), ModelError> {
    super::source::gguf_config(&tiny_gguf(extra, None), "tiny.gguf")
}

fn gguf_key_of(r: Result<(LlamaConfig, Vec<String>), ModelError>) -> String {
    match r {
        Err(ModelError::UnsupportedKey { file, key, .. }) => {
            assert_eq!(file, "tiny.gguf");
            key
        }
        other => panic!("expected UnsupportedKey, got {other:?}"),
    }
}

#[test]
fn gguf_rope_metadata_rules() {
    let theta = ("llama.rope.freq_base", GgufValue::F32(5e5));
    let dims = ("llama.rope.dimension_count", GgufValue::U32(4));
    // Complete metadata: no defaults taken, nothing logged.
    let (c, notes) = gguf_cfg(&[theta.clone(), dims.clone()]).unwrap();
    assert_eq!((c.rope_theta, c.head_dim, c.n_kv_heads), (5e5, 4, 2));
    assert!(c.rope_freq_factors.is_none());
    assert!(notes.is_empty(), "{notes:?}");

    // Missing freq_base: llama.cpp's 10000, logged with the key.
    let (c, notes) = gguf_cfg(std::slice::from_ref(&dims)).unwrap();
    assert_eq!(c.rope_theta, 10_000.0);
    assert_eq!(notes.len(), 1);
    assert!(
        notes[0].contains("llama.rope.freq_base missing") && notes[0].contains("10000"),
        "{notes:?}"
    );

    // Linear scaling, by type + factor, by factor alone (llama.cpp's default type, logged),
    // and by the older rope.scale_linear key; `none` disables it.
    let factor = ("llama.rope.scaling.factor", GgufValue::F32(4.0));
    let linear = (
        "llama.rope.scaling.type",
        GgufValue::String("linear".into()),
    );
    let (c, _) = gguf_cfg(&[theta.clone(), dims.clone(), factor.clone(), linear]).unwrap();
    assert_eq!(c.rope_freq_factors, Some(vec![4.0, 4.0]));
    let (c, notes) = gguf_cfg(&[theta.clone(), dims.clone(), factor.clone()]).unwrap();
    assert_eq!(c.rope_freq_factors, Some(vec![4.0, 4.0]));
    assert!(notes[0].contains("llama.rope.scaling.type missing"));
    let old = ("llama.rope.scale_linear", GgufValue::F32(2.0));
    let (c, _) = gguf_cfg(&[theta.clone(), dims.clone(), old]).unwrap();
    assert_eq!(c.rope_freq_factors, Some(vec![2.0, 2.0]));
    let none = ("llama.rope.scaling.type", GgufValue::String("none".into()));
    let (c, _) = gguf_cfg(&[theta.clone(), dims.clone(), factor.clone(), none]).unwrap();
    assert!(c.rope_freq_factors.is_none());

    // rope_freqs.weight (Llama 3.1), times a linear factor when both are there.
    let f = tiny_gguf(&[theta.clone(), dims.clone()], Some(&[1.0, 8.0]));
    let (c, _) = super::source::gguf_config(&f, "tiny.gguf").unwrap();
    assert_eq!(c.rope_freq_factors, Some(vec![1.0, 8.0]));
    let f = tiny_gguf(&[theta.clone(), dims.clone(), factor], Some(&[1.0, 8.0]));
    let (c, _) = super::source::gguf_config(&f, "tiny.gguf").unwrap();
    assert_eq!(c.rope_freq_factors, Some(vec![4.0, 32.0]));

    // Unsupported values name their key.
    let yarn = ("llama.rope.scaling.type", GgufValue::String("yarn".into()));
    assert_eq!(
        gguf_key_of(gguf_cfg(&[theta.clone(), dims.clone(), yarn])),
        "llama.rope.scaling.type"
    );
    let partial = ("llama.rope.dimension_count", GgufValue::U32(2));
    assert_eq!(
        gguf_key_of(gguf_cfg(&[theta.clone(), partial])),
        "llama.rope.dimension_count"
    );
    let v = ("llama.attention.value_length", GgufValue::U32(8));
    assert_eq!(
        gguf_key_of(gguf_cfg(&[theta.clone(), dims.clone(), v])),
        "llama.attention.value_length"
    );
    let moe = ("llama.expert_count", GgufValue::U32(8));
    assert_eq!(
        gguf_key_of(gguf_cfg(&[theta.clone(), dims.clone(), moe])),
        "llama.expert_count"
    );
    let neg = ("llama.rope.scaling.factor", GgufValue::F32(-1.0));
    assert_eq!(
        gguf_key_of(gguf_cfg(&[theta, dims, neg])),
        "llama.rope.scaling.factor"
    );
    // A wrongly typed value is a typed GGUF error, not a default.
    let bad = ("llama.rope.freq_base", GgufValue::String("1e4".into()));
    assert!(matches!(gguf_cfg(&[bad]), Err(ModelError::Gguf(_))));
    // Through the public entry point too.
    let mut b = GgufBuilder::new();
    b.metadata("general.architecture", GgufValue::String("gpt2".into()));
    let e = GgufModel::from_file(GgufFile::from_bytes(b.build()).unwrap()).unwrap_err();
    assert!(e.to_string().contains("general.architecture"), "{e}");
}

/// A one-layer Llama directory in transformers 5 form, tensors split over `shards` as
/// (file, tensor names); every tensor is f32 with the config's shape.
fn tiny_hf_tensors() -> Vec<(String, Vec<usize>)> {
    let mut t = vec![
        ("model.embed_tokens.weight".to_owned(), vec![8, 8]),
        ("model.norm.weight".to_owned(), vec![8]),
    ];
    for (n, s) in [
        ("input_layernorm.weight", vec![8]),
        ("post_attention_layernorm.weight", vec![8]),
        ("self_attn.q_proj.weight", vec![8, 8]),
        ("self_attn.k_proj.weight", vec![4, 8]),
        ("self_attn.v_proj.weight", vec![4, 8]),
        ("self_attn.o_proj.weight", vec![8, 8]),
        ("mlp.gate_proj.weight", vec![16, 8]),
        ("mlp.up_proj.weight", vec![16, 8]),
        ("mlp.down_proj.weight", vec![8, 16]),
    ] {
        t.push((format!("model.layers.0.{n}"), s));
    }
    t
}

/// Writes `tiny_hf_tensors` split at `split` into two shards plus an index; tensor `i` is
/// filled with `i` (as f32, bf16 in the second shard).
fn write_sharded(dir: &std::path::Path, split: usize) -> serde_json::Value {
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
        "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 8, "hidden_act": "silu",
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "dtype": "bfloat16"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let tensors = tiny_hf_tensors();
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut map = serde_json::Map::new();
    for (part, range) in [(0, 0..split), (1, split..tensors.len())] {
        let mut list = Vec::new();
        for i in range {
            let (name, shape) = &tensors[i];
            let n: usize = shape.iter().product();
            let bytes = if part == 0 {
                f32s(&vec![i as f32; n])
            } else {
                bf16::from_f32(i as f32).to_le_bytes().repeat(n)
            };
            let dtype = if part == 0 { "F32" } else { "BF16" };
            list.push((name.as_str(), dtype, shape.clone(), bytes));
            map.insert(name.clone(), names[part].into());
        }
        write_safetensors(&dir.join(names[part]), &list);
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    index
}

#[test]
fn sharded_directory_with_index() {
    let dir = TempDir::new("sharded");
    let index = write_sharded(&dir.0, 5);
    // A stray single-file checkpoint beside the shards: the index decides, so it is ignored.
    write_safetensors(
        &dir.0.join("model.safetensors"),
        &[("model.norm.weight", "F32", vec![8], f32s(&[99.0; 8]))],
    );
    let m = HfModel::open(&dir.0).unwrap();
    let c = m.config();
    assert_eq!((c.rope_theta, c.head_dim, c.n_kv_heads), (100_000.0, 4, 1));
    assert!(c.tied_embeddings && !m.has_tensor("output.weight"));
    let tensors = tiny_hf_tensors();
    for (i, (hf, shape)) in tensors.iter().enumerate() {
        let canonical = (0..1)
            .flat_map(|_| {
                [
                    "token_embd.weight",
                    "output_norm.weight",
                    "blk.0.attn_norm.weight",
                    "blk.0.ffn_norm.weight",
                    "blk.0.attn_q.weight",
                    "blk.0.attn_k.weight",
                    "blk.0.attn_v.weight",
                    "blk.0.attn_output.weight",
                    "blk.0.ffn_gate.weight",
                    "blk.0.ffn_up.weight",
                    "blk.0.ffn_down.weight",
                ]
            })
            .nth(i)
            .unwrap();
        assert_eq!(hf_tensor_name(canonical).as_deref(), Some(hf.as_str()));
        let (s, v) = m.tensor_f32(canonical).unwrap();
        assert_eq!(&s, shape, "{canonical}");
        assert!(
            v.iter().all(|&x| x == i as f32),
            "{canonical}: {:?}",
            &v[..2]
        );
    }

    let rewrite = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut j = index.clone();
        f(&mut j);
        std::fs::write(dir.0.join("model.safetensors.index.json"), j.to_string()).unwrap();
        match HfModel::open(&dir.0) {
            Err(ModelError::BadIndex { path, reason }) => {
                assert!(path.ends_with("model.safetensors.index.json"));
                reason
            }
            other => panic!("expected BadIndex, got {other:?}"),
        }
    };
    // A tensor listed in the wrong shard.
    let r = rewrite(&|j| {
        j["weight_map"]["model.norm.weight"] = "model-00002-of-00002.safetensors".into()
    });
    assert!(r.contains("model.norm.weight"), "{r}");
    // A shard that is not there.
    let r = rewrite(&|j| {
        j["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors".into()
    });
    assert!(
        r.contains("model-00009-of-00009.safetensors") && r.contains("missing"),
        "{r}"
    );
    // A path out of the directory.
    let r = rewrite(&|j| j["weight_map"]["model.norm.weight"] = "../x.safetensors".into());
    assert!(r.contains("../x.safetensors"), "{r}");
    // No weight_map, or not JSON.
    rewrite(&|j| *j = serde_json::json!({"metadata": {}}));
    std::fs::write(dir.0.join("model.safetensors.index.json"), "{").unwrap();
    assert!(matches!(
        HfModel::open(&dir.0),
        Err(ModelError::BadIndex { .. })
    ));

    // Without the index, the stray file's duplicate tensor is an error naming both files.
    std::fs::remove_file(dir.0.join("model.safetensors.index.json")).unwrap();
    match HfModel::open(&dir.0) {
        Err(ModelError::BadIndex { reason, .. }) => {
            assert!(reason.contains("model.norm.weight") && reason.contains("model.safetensors"))
        }
        other => panic!("expected BadIndex, got {other:?}"),
    }
    // Without the stray file, the shards are read by listing the directory, as before.
    std::fs::remove_file(dir.0.join("model.safetensors")).unwrap();
    let m = HfModel::open(&dir.0).unwrap();
    assert_eq!(m.tensor_f32("output_norm.weight").unwrap().1, vec![1.0; 8]);
}

#[test]
fn hf_directory_config_errors_name_the_file_and_key() {
    let dir = TempDir::new("cfgerr");
    write_sharded(&dir.0, 5);
    let cfg = dir.0.join("config.json");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    j["rope_parameters"]["rope_type"] = "longrope".into();
    std::fs::write(&cfg, j.to_string()).unwrap();
    let e = HfModel::open(&dir.0).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(&e, ModelError::UnsupportedKey { key, .. } if key == "rope_parameters.rope_type"),
        "{e}"
    );
    assert!(
        msg.contains(&cfg.display().to_string()) && msg.contains("longrope"),
        "{msg}"
    );
    std::fs::write(&cfg, "{not json").unwrap();
    let msg = HfModel::open(&dir.0).unwrap_err().to_string();
    assert!(msg.contains(&cfg.display().to_string()), "{msg}");
}

/// A padded byte vocabulary has the asked size, encodes any text one token per byte (the
/// padding is never produced) and gives the config that size.
#[test]
fn padded_byte_vocabulary_has_the_asked_size() {
    let model = SyntheticGguf {
        n_layers: 1,
        vocab: SyntheticVocab::BytesPadded(300),
        ..Default::default()
    };
    assert_eq!(model.config().vocab, 300);
    let src = GgufModel::from_file(GgufFile::from_bytes(model.build()).unwrap()).unwrap();
    assert_eq!(src.config().vocab, 300);
    let (shape, _) = src.tensor_f32("token_embd.weight").unwrap();
    assert_eq!(shape, vec![300, 32]);
    let tok = src.tokenizer().unwrap();
    let ids = tok.encode("héllo, world", false).unwrap();
    assert_eq!(ids.len(), "héllo, world".len());
    assert!(ids.iter().all(|&i| i < 256), "{ids:?}");
    // Below 256 the padding adds nothing.
    assert_eq!(SyntheticVocab::BytesPadded(10).tokens().len(), 256);
}
