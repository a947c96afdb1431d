//! Tiny random models written as GGUF, for tests and examples that need a real model file
//! without `../shared`: the same tensor names, dims order and tokenizer keys as llama.cpp's
//! converter writes, so a file goes through [`open_model`](super::open_model), compression,
//! the CLI and the runtimes exactly as a downloaded model does. The head width is left to
//! the reader's default (`embedding_length / head_count`, noted on stderr), so that a test
//! can make the metadata inconsistent by changing the head count alone.
//!
//! Every value comes from one [`SplitMix64`] stream seeded by [`SyntheticGguf::seed`], drawn in
//! a fixed order (embedding, untied head, output norm, then per layer the two norms, the Q/K/V
//! biases and the seven linears in [`LinearKind::ALL`] order), so a file is reproducible from
//! its description alone.
//!
//! # Example
//!
//! ```
//! use bitstack_examples::gguf::{GgufFile, SyntheticGguf, SyntheticVocab};
//!
//! let tiny = SyntheticGguf { n_layers: 1, vocab: SyntheticVocab::Letters, ..Default::default() };
//! let file = GgufFile::from_bytes(tiny.build()).unwrap();
//! assert_eq!(file.get_u32("llama.block_count").unwrap(), 1);
//! assert_eq!(tiny.config().vocab, 32);
//! ```

use super::dequant::GgmlType;
use super::reader::{GgufValue, GgufValueType};
use super::{Architecture, GgufBuilder, LlamaConfig};
use crate::llama::{LinearKind, SplitMix64};
use crate::output::{write_atomic, OutputError};
use std::path::Path;

/// The tokenizer a [`SyntheticGguf`] carries (always GPT-2 style byte-level BPE).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyntheticVocab {
    /// GPT-2's 256 byte tokens and no merges: any text encodes, one token per byte.
    #[default]
    Bytes,
    /// 32 tokens (the 26 letters, `Ġ` (space), `Ċ` (newline), `.`, `,`, and the merges
    /// `Ġt` and `he`), with `.` (id 28) as end of sequence: texts of lowercase words only.
    Letters,
    /// GPT-2's 256 byte tokens padded with `<|extra_i|>` tokens (never produced by encoding)
    /// to this many in all: a real model's vocabulary size (e.g. Qwen2's 151,936) with a
    /// tokenizer that encodes any text. Below 256 it is [`SyntheticVocab::Bytes`].
    BytesPadded(usize),
}

/// The [`SyntheticVocab::Letters`] tokens, in id order.
const LETTERS: &[&str] = &[
    "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q", "r", "s",
    "t", "u", "v", "w", "x", "y", "z", "Ġ", "Ċ", ".", ",", "Ġt", "he",
];

impl SyntheticVocab {
    /// The tokens, in id order.
    pub fn tokens(self) -> Vec<String> {
        match self {
            Self::Bytes => gpt2_byte_tokens(),
            Self::Letters => LETTERS.iter().map(|s| (*s).to_owned()).collect(),
            Self::BytesPadded(n) => {
                let mut t = gpt2_byte_tokens();
                let extra = n.saturating_sub(t.len());
                t.extend((0..extra).map(|i| format!("<|extra_{i}|>")));
                t
            }
        }
    }

    /// The merges, `"left right"`.
    pub fn merges(self) -> Vec<String> {
        match self {
            Self::Bytes | Self::BytesPadded(_) => vec![],
            Self::Letters => vec!["Ġ t".into(), "h e".into()],
        }
    }
}

/// GPT-2's byte-to-character map, as 256 one-character tokens (byte `b` is token `b`):
/// printable bytes stand for themselves, the others for the code points from 256 up.
pub fn gpt2_byte_tokens() -> Vec<String> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            // Every value is below 0x200, a valid scalar value.
            char::from_u32(c).map_or_else(String::new, String::from)
        })
        .collect()
}

/// A random model's shape and the ranges of its values. [`Default`] is a two-layer GQA Llama
/// (hidden 32, 4 heads of 8, 2 KV heads, FFN 48, context 96, tied head, byte vocabulary).
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticGguf {
    /// `general.architecture`: `llama`, `qwen2`, ... (the metadata keys' prefix).
    pub arch: String,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Model width (`embedding_length`).
    pub hidden: usize,
    /// MLP inner width.
    pub ffn: usize,
    /// Query heads (`attention.head_count`); each `hidden / n_heads` wide.
    pub n_heads: usize,
    /// KV heads.
    pub n_kv_heads: usize,
    /// `context_length`.
    pub context: usize,
    /// `rope.freq_base`.
    pub rope_theta: f32,
    /// `attention.layer_norm_rms_epsilon`.
    pub rms_eps: f32,
    /// The head shares the embedding (no `output.weight`).
    pub tied: bool,
    /// Q/K/V carry biases (as Qwen2).
    pub attn_bias: bool,
    /// The tokenizer.
    pub vocab: SyntheticVocab,
    /// Seed of the values.
    pub seed: u64,
    /// Embedding values are uniform in `±embedding_scale`.
    pub embedding_scale: f32,
    /// Untied head values are uniform in `±head_scale`.
    pub head_scale: f32,
    /// Norm weights are uniform in `1 ± norm_jitter` (0: exactly 1, and no values drawn); away
    /// from 1 a mix-up of two norms shows.
    pub norm_jitter: f32,
    /// Bias values are uniform in `±bias_scale`.
    pub bias_scale: f32,
    /// A linear of `cols` inputs is uniform in `±sqrt(linear_variance / cols)`: 3 gives its
    /// values variance `1 / cols`, which keeps activations tame through the layers.
    pub linear_variance: f32,
}

impl Default for SyntheticGguf {
    fn default() -> Self {
        Self {
            arch: "llama".into(),
            n_layers: 2,
            hidden: 32,
            ffn: 48,
            n_heads: 4,
            n_kv_heads: 2,
            context: 96,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            tied: true,
            attn_bias: false,
            vocab: SyntheticVocab::Bytes,
            seed: 7,
            embedding_scale: 1.0,
            head_scale: 0.5,
            norm_jitter: 0.0,
            bias_scale: 0.1,
            linear_variance: 3.0,
        }
    }
}

impl SyntheticGguf {
    /// The configuration a reader derives from the file.
    ///
    /// # Panics
    ///
    /// When [`arch`](Self::arch) is not an architecture of the model contract (`llama`,
    /// `qwen2`, `mistral`). [`builder`](Self::builder) writes any.
    pub fn config(&self) -> LlamaConfig {
        let arch = self
            .arch
            .parse()
            .unwrap_or_else(|e| panic!("SyntheticGguf::config: {e}"));
        self.config_of(arch)
    }

    /// [`config`](Self::config) with the architecture `arch`.
    fn config_of(&self, arch: Architecture) -> LlamaConfig {
        LlamaConfig {
            arch,
            n_layers: self.n_layers,
            hidden: self.hidden,
            ffn: self.ffn,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            // Not in the file: the reader derives it, as here.
            head_dim: self.hidden / self.n_heads.max(1),
            vocab: self.vocab.tokens().len(),
            rope_theta: self.rope_theta,
            rope_freq_factors: None,
            rms_eps: self.rms_eps,
            tied_embeddings: self.tied,
            attn_bias: self.attn_bias,
            max_seq: self.context,
            bos_id: None,
            eos_id: match self.vocab {
                SyntheticVocab::Bytes | SyntheticVocab::BytesPadded(_) => None,
                SyntheticVocab::Letters => Some(28),
            },
        }
    }

    /// The model in a builder, for a test that then changes a key
    /// ([`GgufBuilder::set_metadata`]) or adds a tensor.
    pub fn builder(&self) -> GgufBuilder {
        // Only the shapes are used, and they hold whatever `general.architecture` says (even
        // one no reader accepts).
        let c = self.config_of(Architecture::Llama);
        let strings = |v: Vec<String>| GgufValue::Array {
            elem_type: GgufValueType::String,
            values: v.into_iter().map(GgufValue::String).collect(),
        };
        let u = |v: usize| GgufValue::U32(v as u32);
        let key = |s: &str| format!("{}.{s}", self.arch);
        let mut b = GgufBuilder::new();
        b.metadata("general.architecture", GgufValue::String(self.arch.clone()))
            .metadata(&key("block_count"), u(self.n_layers))
            .metadata(&key("embedding_length"), u(self.hidden))
            .metadata(&key("feed_forward_length"), u(self.ffn))
            .metadata(&key("attention.head_count"), u(self.n_heads))
            .metadata(&key("attention.head_count_kv"), u(self.n_kv_heads))
            .metadata(
                &key("attention.layer_norm_rms_epsilon"),
                GgufValue::F32(self.rms_eps),
            )
            .metadata(&key("rope.freq_base"), GgufValue::F32(self.rope_theta))
            .metadata(&key("context_length"), u(self.context))
            .metadata("tokenizer.ggml.model", GgufValue::String("gpt2".into()));
        match self.vocab {
            SyntheticVocab::Bytes | SyntheticVocab::BytesPadded(_) => {
                b.metadata("tokenizer.ggml.pre", GgufValue::String("gpt2".into()));
            }
            SyntheticVocab::Letters => {
                b.metadata("tokenizer.ggml.pre", GgufValue::String("llama-bpe".into()))
                    .metadata("tokenizer.ggml.eos_token_id", GgufValue::U32(28));
            }
        }
        b.metadata("tokenizer.ggml.tokens", strings(self.vocab.tokens()))
            .metadata("tokenizer.ggml.merges", strings(self.vocab.merges()));

        let mut rng = SplitMix64::new(self.seed);
        let (h, v) = (c.hidden as u64, c.vocab as u64);
        // GGUF dims are [columns, rows]; every tensor is F32.
        let mut tensor = |b: &mut GgufBuilder, name: &str, dims: &[u64], center: f32, amp: f32| {
            let n: u64 = dims.iter().product();
            let data: Vec<u8> = if amp == 0.0 {
                // A constant tensor draws nothing, so adding one keeps the later values.
                (0..n).flat_map(|_| center.to_le_bytes()).collect()
            } else {
                (0..n)
                    .flat_map(|_| (center + amp * rng.next_signed()).to_le_bytes())
                    .collect()
            };
            b.tensor(name, GgmlType::F32, dims, data);
        };
        tensor(
            &mut b,
            "token_embd.weight",
            &[h, v],
            0.0,
            self.embedding_scale,
        );
        if !self.tied {
            tensor(&mut b, "output.weight", &[h, v], 0.0, self.head_scale);
        }
        tensor(&mut b, "output_norm.weight", &[h], 1.0, self.norm_jitter);
        for l in 0..self.n_layers {
            for norm in ["attn_norm", "ffn_norm"] {
                let name = format!("blk.{l}.{norm}.weight");
                tensor(&mut b, &name, &[h], 1.0, self.norm_jitter);
            }
            if self.attn_bias {
                for kind in [LinearKind::Q, LinearKind::K, LinearKind::V] {
                    let rows = kind.shape(&c).0 as u64;
                    let name = format!("blk.{l}.{}.bias", kind.stem());
                    tensor(&mut b, &name, &[rows], 0.0, self.bias_scale);
                }
            }
            for kind in LinearKind::ALL {
                let (rows, cols) = kind.shape(&c);
                let amp = (self.linear_variance / cols as f32).sqrt();
                let dims = [cols as u64, rows as u64];
                tensor(&mut b, &kind.tensor_name(l), &dims, 0.0, amp);
            }
        }
        b
    }

    /// The model as GGUF bytes.
    pub fn build(&self) -> Vec<u8> {
        self.builder().build()
    }

    /// Writes the model to `path` (atomically: an old file survives a failed write).
    pub fn write(&self, path: &Path) -> Result<(), OutputError> {
        write_atomic(path, &self.build())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgufFile, GgufModel, ModelSource};

    #[test]
    fn byte_tokens_are_gpt2s_map() {
        let t = gpt2_byte_tokens();
        assert_eq!(t.len(), 256);
        assert_eq!(
            (t[b'a' as usize].as_str(), t[b' ' as usize].as_str()),
            ("a", "Ġ")
        );
        assert_eq!((t[b'\n' as usize].as_str(), t[0].as_str()), ("Ċ", "Ā"));
        let distinct: std::collections::BTreeSet<&String> = t.iter().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn a_synthetic_file_reads_back_as_its_config() {
        for m in [
            SyntheticGguf::default(),
            SyntheticGguf {
                arch: "qwen2".into(),
                tied: false,
                attn_bias: true,
                vocab: SyntheticVocab::Letters,
                norm_jitter: 0.1,
                rope_theta: 1e6,
                ..Default::default()
            },
        ] {
            let dir = std::env::temp_dir().join(format!(
                "bitstack-synthetic-{}-{}",
                m.arch,
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("m.gguf");
            m.write(&path).unwrap();
            let model = GgufModel::open(&path).unwrap();
            assert_eq!(model.config(), &m.config());
            let (shape, w) = model.tensor_f32(&LinearKind::Down.tensor_name(1)).unwrap();
            assert_eq!(shape, vec![m.hidden, m.ffn]);
            let bound = (m.linear_variance / m.ffn as f32).sqrt();
            assert!(w.iter().all(|x| x.abs() <= bound) && w.iter().any(|&x| x != 0.0));
            assert_eq!(
                model
                    .tokenizer()
                    .unwrap()
                    .encode("he", false)
                    .unwrap()
                    .len(),
                {
                    if m.vocab == SyntheticVocab::Letters {
                        1
                    } else {
                        2
                    }
                }
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
        // The same description gives the same bytes; another seed other values.
        let a = SyntheticGguf::default();
        assert_eq!(a.build(), a.build());
        assert_ne!(
            a.build(),
            SyntheticGguf {
                seed: 8,
                ..a.clone()
            }
            .build()
        );
        assert!(GgufFile::from_bytes(a.build()).is_ok());
    }
}
