//! The model contract: what a stack file means *as a language model*, beyond its blocks.
//!
//! A stack file is a generic container (see the crate docs). The `bitstack` tool writes Llama
//! family decoders (Llama, Mistral, Qwen2) into it under the conventions below, and an engine
//! that embeds this crate reads them back, typed, with [`ModelContract::from_file`]. The
//! specification is the crate documentation's section *The model contract*; this module is
//! its one implementation (writers and readers share it, so they cannot drift apart).

use crate::reader::StackFile;
use crate::types::{DType, TensorSpec};
use bitstack_core::kernels::dense::Q8_GROUP;
use bitstack_core::kernels::q4::Q4Matrix;
use bitstack_core::ModelLayout;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Metadata key of the model configuration: a [`ModelConfig`] as a JSON object.
pub const META_CONFIG: &str = "bitstack.llama.config";
/// Metadata key of the Q/K row layout: [`QkLayout::as_str`] as UTF-8. Files without it have
/// [`QkLayout::RotateHalf`].
pub const META_QK_LAYOUT: &str = "bitstack.qk_layout";
/// Name of the U8 resident tensor holding the tokenizer (a Hugging Face `tokenizer.json`
/// document; too large for the header, hence a tensor).
pub const TOKENIZER_TENSOR: &str = "tokenizer.json";
/// The most decoder layers a config may claim (the largest Llama has 126): a guard against
/// corrupt counts that would overflow `7 · n_layers` or allocate without bound.
pub const MAX_LAYERS: usize = 4096;

/// Errors reading or writing the model contract. Each names the metadata key, stack or tensor
/// at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContractError {
    /// The file has no [`META_CONFIG`] metadata: it is not a model written under this contract.
    #[error("no {META_CONFIG} metadata (not a model stack file written by bitstack)")]
    MissingConfig,
    /// [`META_CONFIG`] is not valid UTF-8 JSON of a [`ModelConfig`].
    #[error("model config ({META_CONFIG} metadata): {0}")]
    ConfigJson(#[from] serde_json::Error),
    /// The config parses but is inconsistent.
    #[error("model config ({META_CONFIG} metadata): {0}")]
    InvalidConfig(String),
    /// [`META_QK_LAYOUT`] holds a value this reader does not know.
    #[error("{META_QK_LAYOUT} metadata is {0:?}; expected \"rotate-half\" or \"interleaved\"")]
    UnknownQkLayout(String),
    /// The file's weight stacks are not the config's `7 · n_layers` linears.
    #[error("stack file has {found} weight stacks, the config needs {expected}")]
    StackCount {
        /// Stacks in the file.
        found: usize,
        /// `7 · n_layers`.
        expected: usize,
    },
    /// A stack has the wrong name or shape for its index.
    #[error(
        "stack {index} is {found} ({found_rows}x{found_cols}), expected {expected} ({rows}x{cols})"
    )]
    StackMismatch {
        /// Stack index.
        index: usize,
        /// Name in the file.
        found: String,
        /// Rows in the file.
        found_rows: usize,
        /// Columns in the file.
        found_cols: usize,
        /// The contract's name.
        expected: String,
        /// The contract's rows.
        rows: usize,
        /// The contract's columns.
        cols: usize,
    },
    /// A resident tensor the config needs is absent.
    #[error("resident tensor {0} is missing")]
    MissingResident(String),
    /// A resident tensor has the wrong shape.
    #[error("resident tensor {name} has shape {found:?}, expected {expected:?}")]
    ResidentShape {
        /// Tensor name.
        name: String,
        /// Shape in the file.
        found: Vec<u64>,
        /// The contract's shape.
        expected: Vec<u64>,
    },
    /// A resident tensor has a dtype the contract does not allow for it.
    #[error("resident tensor {name} has dtype {dtype:?}, expected {expected}")]
    ResidentDtype {
        /// Tensor name.
        name: String,
        /// Dtype in the file.
        dtype: DType,
        /// What is allowed.
        expected: &'static str,
    },
}

/// The decoder family. The forward pass is the same Llama block for all three; the name
/// tells an engine which of its model classes to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3, SmolLM (rotary embeddings, RMSNorm, SwiGLU, optional GQA).
    Llama,
    /// Qwen2: Llama with Q/K/V biases and usually an untied head.
    Qwen2,
    /// Mistral (sliding-window attention is not part of the contract: files hold only
    /// models whose window covers the context).
    Mistral,
}

impl Architecture {
    /// The name stored in the config (`llama`, `qwen2`, `mistral`).
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Mistral => "mistral",
        }
    }
}

impl std::str::FromStr for Architecture {
    type Err = ContractError;
    fn from_str(s: &str) -> Result<Self, ContractError> {
        match s {
            "llama" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            "mistral" => Ok(Self::Mistral),
            _ => Err(ContractError::InvalidConfig(format!(
                "architecture {s:?} is not one of llama, qwen2, mistral"
            ))),
        }
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The hyper-parameters of the decoder, stored as JSON under [`META_CONFIG`]. Unknown fields
/// are ignored when reading (a later writer may add some); every field here is required
/// except that the three optional ones may be `null`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Decoder family.
    pub arch: Architecture,
    /// Number of decoder blocks.
    pub n_layers: usize,
    /// Model (embedding) width.
    pub hidden: usize,
    /// MLP inner width.
    pub ffn: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (GQA when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Per-head width (even).
    pub head_dim: usize,
    /// Vocabulary size (rows of `token_embd.weight`).
    pub vocab: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// Per-frequency RoPE divisors (`head_dim / 2` values): the angle of pair `i` at position
    /// `p` is `p · theta^(-2i/head_dim) / f[i]`. `null`: no scaling.
    pub rope_freq_factors: Option<Vec<f32>>,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Whether the output head is `token_embd.weight` (then `output.weight` is absent).
    pub tied_embeddings: bool,
    /// Whether Q/K/V have biases (`blk.{i}.attn_q.bias`, ...), as in Qwen2.
    pub attn_bias: bool,
    /// Trained context length.
    pub max_seq: usize,
    /// Beginning-of-sequence token id.
    pub bos_id: Option<u32>,
    /// End-of-sequence token id.
    pub eos_id: Option<u32>,
}

impl ModelConfig {
    /// Checks the consistency the forward pass relies on, and that every tensor size of the
    /// model is representable (so later shape arithmetic cannot overflow).
    pub fn validate(&self) -> Result<(), ContractError> {
        let bad = |s: String| Err(ContractError::InvalidConfig(s));
        if self.n_layers == 0
            || self.hidden == 0
            || self.ffn == 0
            || self.n_heads == 0
            || self.n_kv_heads == 0
            || self.vocab == 0
        {
            return bad(format!(
                "zero-sized dimension (layers {}, hidden {}, ffn {}, heads {}, KV heads {}, vocab {})",
                self.n_layers, self.hidden, self.ffn, self.n_heads, self.n_kv_heads, self.vocab
            ));
        }
        if self.n_layers > MAX_LAYERS {
            return bad(format!(
                "{} layers is over the limit of {MAX_LAYERS}",
                self.n_layers
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} heads are not a multiple of {} KV heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even and non-zero",
                self.head_dim
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope theta {} must be positive", self.rope_theta));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return bad(format!("rms eps {} must be non-negative", self.rms_eps));
        }
        if let Some(f) = &self.rope_freq_factors {
            if f.len() != self.head_dim / 2 || f.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
                return bad("rope frequency factors must be head_dim/2 positive values".into());
            }
        }
        // The largest products the contract forms: the attention width, a linear and the
        // embedding (in bytes, at 4 per value).
        let q = self.n_heads.checked_mul(self.head_dim);
        let sizes = [
            q.and_then(|q| q.checked_mul(self.hidden)),
            self.ffn.checked_mul(self.hidden),
            self.vocab
                .checked_mul(self.hidden)
                .and_then(|n| n.checked_mul(4)),
        ];
        if sizes.iter().any(Option::is_none) {
            return bad("dimensions overflow the address space".into());
        }
        Ok(())
    }

    /// The shapes of the seven linears.
    pub fn dims(&self) -> LinearDims {
        LinearDims::from(self)
    }

    /// The weight stacks the contract requires, in stack order: `(name, rows, cols)`.
    pub fn stack_shapes(&self) -> Vec<(String, usize, usize)> {
        (0..self.n_layers * LinearKind::ALL.len())
            .map(|i| {
                let (layer, kind) = stack_location(i);
                let (rows, cols) = kind.shape(self);
                (kind.tensor_name(layer), rows, cols)
            })
            .collect()
    }

    /// The resident (never decomposed) tensors the model needs, in the order the `bitstack`
    /// writer stores them, with their PyTorch shapes.
    pub fn residents(&self) -> Vec<ResidentSlot> {
        let (h, v) = (self.hidden as u64, self.vocab as u64);
        let d = self.dims();
        let slot = |role: ResidentRole, shape: Vec<u64>| ResidentSlot { role, shape };
        let mut out = vec![
            slot(ResidentRole::TokenEmbedding, vec![v, h]),
            slot(ResidentRole::OutputNorm, vec![h]),
        ];
        if !self.tied_embeddings {
            out.push(slot(ResidentRole::OutputHead, vec![v, h]));
        }
        for layer in 0..self.n_layers {
            out.push(slot(ResidentRole::AttnNorm { layer }, vec![h]));
            out.push(slot(ResidentRole::FfnNorm { layer }, vec![h]));
            if self.attn_bias {
                for (kind, n) in [
                    (LinearKind::Q, d.q_out),
                    (LinearKind::K, d.kv_out),
                    (LinearKind::V, d.kv_out),
                ] {
                    out.push(slot(ResidentRole::Bias { layer, kind }, vec![n as u64]));
                }
            }
        }
        out
    }

    /// Bytes of the resident part as an engine holds it: the token embedding (and an untied
    /// head) at `embedding` precision, every norm weight and bias as f32. This is the one
    /// accounting behind a budget (see [`ModelContract::held_layout`]); the tokenizer blob is
    /// not held by the model and not counted.
    pub fn held_resident_bytes(&self, embedding: EmbeddingPrecision) -> u64 {
        let (v, h) = (self.vocab as u64, self.hidden as u64);
        let matrix = match embedding {
            EmbeddingPrecision::F32 => 4 * v * h,
            EmbeddingPrecision::F16 => 2 * v * h,
            // int8 values plus one f16 scale per group of a row (`Q8Matrix::bytes`).
            EmbeddingPrecision::Q8 => v * h + 2 * v * h.div_ceil(Q8_GROUP as u64),
            // 4-bit codes plus one f16 scale per group of a row (`Q4Matrix::bytes`).
            EmbeddingPrecision::Q4 => Q4Matrix::bytes_for(self.vocab, self.hidden),
        };
        let matrices = if self.tied_embeddings { 1 } else { 2 };
        let d = self.dims();
        let bias = if self.attn_bias {
            (d.q_out + 2 * d.kv_out) as u64
        } else {
            0
        };
        let f32s = h * (2 * self.n_layers as u64 + 1) + bias * self.n_layers as u64;
        matrices * matrix + 4 * f32s
    }
}

/// How an engine holds the token embedding and an untied output head (norms and biases are
/// always f32). It changes the bytes held, and so the prefix a budget buys.
///
/// The default is [`EmbeddingPrecision::Q8`], what the `bitstack` tool holds unless told
/// otherwise: on validation text (the last 120,000 bytes of the WikiText-2 train excerpt,
/// 4 windows of 1024 tokens, SmolLM2-135M) it beat the stored f16 at every budget from 90 to
/// 200 MB (perplexity 81.0 against 1024.1 at 90 MB, 36.0 against 37.1 at 200 MB), because the
/// 26.6 MB it saves buy blocks; q4 was better still below about 120 MB but worse above it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EmbeddingPrecision {
    /// f32 (4 bytes per value).
    F32,
    /// IEEE half precision (2 bytes per value): what the file stores.
    F16,
    /// int8 with an f16 scale per [`Q8_GROUP`] values of a row (llama.cpp's Q8_0 layout,
    /// 8.5 bits per value). The default.
    #[default]
    Q8,
    /// 4-bit codes with an f16 scale per 32 values of a row (llama.cpp's Q4_0 rule, 4.5 bits
    /// per value; `bitstack_core::kernels::q4::Q4Matrix`).
    Q4,
}

impl std::str::FromStr for EmbeddingPrecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "q8" => Ok(Self::Q8),
            "q4" => Ok(Self::Q4),
            _ => Err(format!("{s:?}: expected f16, q8, q4 or f32")),
        }
    }
}

impl std::fmt::Display for EmbeddingPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8 => "q8",
            Self::Q4 => "q4",
        })
    }
}

/// The widths that fix the seven linears' shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearDims {
    /// Model width.
    pub hidden: usize,
    /// MLP inner width.
    pub ffn: usize,
    /// `n_heads · head_dim`.
    pub q_out: usize,
    /// `n_kv_heads · head_dim`.
    pub kv_out: usize,
}

impl From<&ModelConfig> for LinearDims {
    /// Saturating, so an unvalidated config gives absurd shapes (rejected by the shape checks
    /// that use them) instead of an overflow panic.
    fn from(c: &ModelConfig) -> Self {
        Self {
            hidden: c.hidden,
            ffn: c.ffn,
            q_out: c.n_heads.saturating_mul(c.head_dim),
            kv_out: c.n_kv_heads.saturating_mul(c.head_dim),
        }
    }
}

/// The seven linear layers of a decoder block, in the order they run (and are numbered).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearKind {
    /// Query projection, `hidden → n_heads·head_dim`.
    Q,
    /// Key projection, `hidden → n_kv_heads·head_dim`.
    K,
    /// Value projection, `hidden → n_kv_heads·head_dim`.
    V,
    /// Attention output projection, `n_heads·head_dim → hidden`.
    O,
    /// MLP gate projection, `hidden → ffn`.
    Gate,
    /// MLP up projection, `hidden → ffn`.
    Up,
    /// MLP down projection, `ffn → hidden`.
    Down,
}

impl LinearKind {
    /// All seven, in the order they run within a block.
    pub const ALL: [LinearKind; 7] = [
        LinearKind::Q,
        LinearKind::K,
        LinearKind::V,
        LinearKind::O,
        LinearKind::Gate,
        LinearKind::Up,
        LinearKind::Down,
    ];

    /// Position in [`LinearKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The canonical GGUF tensor stem, e.g. `attn_q` or `ffn_down`.
    pub fn stem(self) -> &'static str {
        match self {
            LinearKind::Q => "attn_q",
            LinearKind::K => "attn_k",
            LinearKind::V => "attn_v",
            LinearKind::O => "attn_output",
            LinearKind::Gate => "ffn_gate",
            LinearKind::Up => "ffn_up",
            LinearKind::Down => "ffn_down",
        }
    }

    /// The Hugging Face module path within a layer, e.g. `self_attn.q_proj`.
    pub fn hf_module(self) -> &'static str {
        match self {
            LinearKind::Q => "self_attn.q_proj",
            LinearKind::K => "self_attn.k_proj",
            LinearKind::V => "self_attn.v_proj",
            LinearKind::O => "self_attn.o_proj",
            LinearKind::Gate => "mlp.gate_proj",
            LinearKind::Up => "mlp.up_proj",
            LinearKind::Down => "mlp.down_proj",
        }
    }

    /// The canonical (GGUF) weight name in `layer`, e.g. `blk.3.attn_q.weight`: the stack's
    /// name in the file.
    pub fn tensor_name(self, layer: usize) -> String {
        format!("blk.{layer}.{}.weight", self.stem())
    }

    /// The Hugging Face weight name in `layer`, e.g. `model.layers.3.self_attn.q_proj.weight`.
    pub fn hf_tensor_name(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.weight", self.hf_module())
    }

    /// `(out_features, in_features)` (PyTorch `[out, in]`, the stack's rows and columns).
    pub fn shape(self, dims: impl Into<LinearDims>) -> (usize, usize) {
        let d = dims.into();
        match self {
            LinearKind::Q => (d.q_out, d.hidden),
            LinearKind::K | LinearKind::V => (d.kv_out, d.hidden),
            LinearKind::O => (d.hidden, d.q_out),
            LinearKind::Gate | LinearKind::Up => (d.ffn, d.hidden),
            LinearKind::Down => (d.hidden, d.ffn),
        }
    }
}

/// Index of the weight stack (and `BlockId::weight`) of linear `kind` in block `layer`:
/// `7 · layer + kind.index()`.
pub fn stack_index(layer: usize, kind: LinearKind) -> usize {
    layer * LinearKind::ALL.len() + kind.index()
}

/// `(layer, kind)` of stack `index` (the inverse of [`stack_index`]).
pub fn stack_location(index: usize) -> (usize, LinearKind) {
    let n = LinearKind::ALL.len();
    (index / n, LinearKind::ALL[index % n])
}

/// Row order of the Q and K projections (and their biases) within each head, i.e. which
/// pairs of rows rotary position embedding rotates together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum QkLayout {
    /// Hugging Face order: within a head of width `d`, row `i` pairs with row `i + d/2`
    /// (`rotate_half`). Every file written by `bitstack` so far, because compress un-permutes
    /// GGUF's interleaved rows; also the meaning of a file without [`META_QK_LAYOUT`].
    #[default]
    RotateHalf,
    /// GGUF / llama.cpp order for the `llama` architecture: row `2i` pairs with row `2i + 1`.
    Interleaved,
}

impl QkLayout {
    /// The metadata value: `rotate-half` or `interleaved`.
    pub fn as_str(self) -> &'static str {
        match self {
            QkLayout::RotateHalf => "rotate-half",
            QkLayout::Interleaved => "interleaved",
        }
    }
}

impl std::str::FromStr for QkLayout {
    type Err = ContractError;
    fn from_str(s: &str) -> Result<Self, ContractError> {
        match s {
            "rotate-half" => Ok(Self::RotateHalf),
            "interleaved" => Ok(Self::Interleaved),
            _ => Err(ContractError::UnknownQkLayout(s.to_owned())),
        }
    }
}

/// What a resident tensor is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResidentRole {
    /// `token_embd.weight`, `[vocab, hidden]` (also the head when tied).
    TokenEmbedding,
    /// `output_norm.weight`, `[hidden]`.
    OutputNorm,
    /// `output.weight`, `[vocab, hidden]`, only when the head is untied.
    OutputHead,
    /// `blk.{layer}.attn_norm.weight`, `[hidden]`.
    AttnNorm {
        /// Decoder block.
        layer: usize,
    },
    /// `blk.{layer}.ffn_norm.weight`, `[hidden]`.
    FfnNorm {
        /// Decoder block.
        layer: usize,
    },
    /// `blk.{layer}.attn_{q,k,v}.bias`, `[out_features]` (Q/K in the file's [`QkLayout`]).
    Bias {
        /// Decoder block.
        layer: usize,
        /// [`LinearKind::Q`], [`LinearKind::K`] or [`LinearKind::V`].
        kind: LinearKind,
    },
}

impl ResidentRole {
    /// The canonical (GGUF) name: the tensor's name in the file.
    pub fn tensor_name(self) -> String {
        match self {
            ResidentRole::TokenEmbedding => "token_embd.weight".into(),
            ResidentRole::OutputNorm => "output_norm.weight".into(),
            ResidentRole::OutputHead => "output.weight".into(),
            ResidentRole::AttnNorm { layer } => format!("blk.{layer}.attn_norm.weight"),
            ResidentRole::FfnNorm { layer } => format!("blk.{layer}.ffn_norm.weight"),
            ResidentRole::Bias { layer, kind } => format!("blk.{layer}.{}.bias", kind.stem()),
        }
    }

    /// The Hugging Face name, e.g. `model.layers.0.input_layernorm.weight`.
    pub fn hf_tensor_name(self) -> String {
        match self {
            ResidentRole::TokenEmbedding => "model.embed_tokens.weight".into(),
            ResidentRole::OutputNorm => "model.norm.weight".into(),
            ResidentRole::OutputHead => "lm_head.weight".into(),
            ResidentRole::AttnNorm { layer } => {
                format!("model.layers.{layer}.input_layernorm.weight")
            }
            ResidentRole::FfnNorm { layer } => {
                format!("model.layers.{layer}.post_attention_layernorm.weight")
            }
            ResidentRole::Bias { layer, kind } => {
                format!("model.layers.{layer}.{}.bias", kind.hf_module())
            }
        }
    }
}

/// A resident tensor the config requires: its role and PyTorch shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResidentSlot {
    /// What it is (and so its names).
    pub role: ResidentRole,
    /// PyTorch shape.
    pub shape: Vec<u64>,
}

/// A resident tensor of a file, checked against its [`ResidentSlot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResidentInfo {
    /// What it is.
    pub role: ResidentRole,
    /// The stored name, dtype (F32, F16 or BF16) and shape.
    pub spec: TensorSpec,
}

/// A stack file's model contract, read and checked by [`ModelContract::from_file`].
#[derive(Clone, Debug, PartialEq)]
pub struct ModelContract {
    config: ModelConfig,
    qk_layout: QkLayout,
    qk_layout_recorded: bool,
    residents: Vec<ResidentInfo>,
    tokenizer: Option<TensorSpec>,
}

impl ModelContract {
    /// Reads the contract of `file`: the config ([`META_CONFIG`]), the Q/K layout
    /// ([`META_QK_LAYOUT`], [`QkLayout::RotateHalf`] when absent), and checks that the weight
    /// stacks are exactly the config's linears (names and shapes, in [`stack_index`] order)
    /// and that every resident tensor the config needs is present with its shape and a float
    /// dtype. The tokenizer ([`TOKENIZER_TENSOR`]) is optional but must be a 1-D U8 blob.
    pub fn from_file(file: &StackFile) -> Result<Self, ContractError> {
        let text = file
            .metadata()
            .get(META_CONFIG)
            .ok_or(ContractError::MissingConfig)?;
        let config: ModelConfig = serde_json::from_slice(text)?;
        config.validate()?;
        let (qk_layout, qk_layout_recorded) = match file.metadata().get(META_QK_LAYOUT) {
            None => (QkLayout::RotateHalf, false),
            Some(v) => (
                std::str::from_utf8(v)
                    .map_err(|_| ContractError::UnknownQkLayout(String::from_utf8_lossy(v).into()))?
                    .parse()?,
                true,
            ),
        };
        let expected = config.stack_shapes();
        let stacks = file.stacks();
        if stacks.len() != expected.len() {
            return Err(ContractError::StackCount {
                found: stacks.len(),
                expected: expected.len(),
            });
        }
        for (index, (meta, (name, rows, cols))) in stacks.iter().zip(expected).enumerate() {
            if meta.name != name || (meta.rows, meta.cols) != (rows, cols) {
                return Err(ContractError::StackMismatch {
                    index,
                    found: meta.name.clone(),
                    found_rows: meta.rows,
                    found_cols: meta.cols,
                    expected: name,
                    rows,
                    cols,
                });
            }
        }
        let residents = config
            .residents()
            .into_iter()
            .map(|slot| {
                let name = slot.role.tensor_name();
                let t = file
                    .resident(&name)
                    .ok_or_else(|| ContractError::MissingResident(name.clone()))?;
                if t.shape() != slot.shape.as_slice() {
                    return Err(ContractError::ResidentShape {
                        name,
                        found: t.shape().to_vec(),
                        expected: slot.shape,
                    });
                }
                if t.dtype() == DType::U8 {
                    return Err(ContractError::ResidentDtype {
                        name,
                        dtype: t.dtype(),
                        expected: "F32, F16 or BF16",
                    });
                }
                Ok(ResidentInfo {
                    role: slot.role,
                    spec: t.spec().clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tokenizer = match file.resident(TOKENIZER_TENSOR) {
            None => None,
            Some(t) if t.dtype() == DType::U8 && t.shape().len() == 1 => Some(t.spec().clone()),
            Some(t) => {
                return Err(ContractError::ResidentDtype {
                    name: TOKENIZER_TENSOR.into(),
                    dtype: t.dtype(),
                    expected: "U8 of one dimension",
                })
            }
        };
        Ok(Self {
            config,
            qk_layout,
            qk_layout_recorded,
            residents,
            tokenizer,
        })
    }

    /// The metadata a writer stores for a model: [`META_CONFIG`] and [`META_QK_LAYOUT`]
    /// (validated first, so a writer cannot produce a file its readers reject).
    pub fn metadata(
        config: &ModelConfig,
        qk_layout: QkLayout,
    ) -> Result<BTreeMap<String, Vec<u8>>, ContractError> {
        config.validate()?;
        Ok([
            (META_CONFIG.to_owned(), serde_json::to_vec(config)?),
            (
                META_QK_LAYOUT.to_owned(),
                qk_layout.as_str().as_bytes().to_vec(),
            ),
        ]
        .into())
    }

    /// The model hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
    /// The Q/K row layout.
    pub fn qk_layout(&self) -> QkLayout {
        self.qk_layout
    }
    /// Whether the file records its Q/K layout (files written before the key existed do
    /// not, and are [`QkLayout::RotateHalf`]).
    pub fn qk_layout_recorded(&self) -> bool {
        self.qk_layout_recorded
    }
    /// The resident tensors, in [`ModelConfig::residents`] order.
    pub fn residents(&self) -> &[ResidentInfo] {
        &self.residents
    }
    /// The resident tensor of `role`, if the config has one.
    pub fn resident(&self, role: ResidentRole) -> Option<&ResidentInfo> {
        self.residents.iter().find(|r| r.role == role)
    }
    /// The tokenizer blob's spec, when the file carries one.
    pub fn tokenizer(&self) -> Option<&TensorSpec> {
        self.tokenizer.as_ref()
    }
    /// Number of weight stacks (`7 · n_layers`).
    pub fn stack_count(&self) -> usize {
        self.config.n_layers * LinearKind::ALL.len()
    }
    /// The stack of `(layer, kind)`; `None` past the last layer.
    pub fn stack_of(&self, layer: usize, kind: LinearKind) -> Option<usize> {
        (layer < self.config.n_layers).then(|| stack_index(layer, kind))
    }
    /// `(layer, kind)` of stack `index`; `None` past the last stack.
    pub fn linear_of(&self, index: usize) -> Option<(usize, LinearKind)> {
        (index < self.stack_count()).then(|| stack_location(index))
    }
    /// Bytes of the resident part as held at `embedding` precision
    /// ([`ModelConfig::held_resident_bytes`]).
    pub fn held_resident_bytes(&self, embedding: EmbeddingPrecision) -> u64 {
        self.config.held_resident_bytes(embedding)
    }
    /// The runtime layout of `file` (which this contract was read from) with the resident
    /// bytes an engine holding the embedding at `embedding` precision really holds: what
    /// [`bitstack_core::ElasticModel::new`] should be given, so a budget buys the same
    /// prefix in every engine and in the `bitstack` tool. (`StackFile::layout` counts the
    /// stored payload bytes instead, tokenizer blob and f16 norms included.)
    pub fn held_layout(&self, file: &StackFile, embedding: EmbeddingPrecision) -> ModelLayout {
        let mut layout = file.layout();
        layout.resident_bytes = self.held_resident_bytes(embedding);
        layout
    }
}

impl StackFile {
    /// [`ModelContract::from_file`] of this file.
    pub fn model_contract(&self) -> Result<ModelContract, ContractError> {
        ModelContract::from_file(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config() -> ModelConfig {
        ModelConfig {
            arch: Architecture::Qwen2,
            n_layers: 2,
            hidden: 40,
            ffn: 24,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 10,
            vocab: 7,
            rope_theta: 1e6,
            rope_freq_factors: None,
            rms_eps: 1e-6,
            tied_embeddings: false,
            attn_bias: true,
            max_seq: 64,
            bos_id: None,
            eos_id: Some(3),
        }
    }

    /// The JSON the `bitstack` tool wrote before this module existed (hand-assembled, f32s
    /// widened to f64) reads into the same config; unknown keys are ignored.
    #[test]
    fn reads_the_historical_json() {
        let text = r#"{"arch":"qwen2","attn_bias":true,"bos_id":null,"eos_id":3,"ffn":24,
            "head_dim":10,"hidden":40,"max_seq":64,"n_heads":4,"n_kv_heads":2,"n_layers":2,
            "rms_eps":9.999999974752427e-7,"rope_freq_factors":null,"rope_theta":1000000.0,
            "tied_embeddings":false,"vocab":7,"later_key":[1,2]}"#;
        let c: ModelConfig = serde_json::from_str(text).unwrap();
        assert_eq!(c, config());
        let back: ModelConfig = serde_json::from_slice(&serde_json::to_vec(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert!(serde_json::from_str::<ModelConfig>(&text.replace("qwen2", "gpt2")).is_err());
        assert!(serde_json::from_str::<ModelConfig>(&text.replace("\"vocab\":7,", "")).is_err());
    }

    #[test]
    fn validation_rejects_inconsistent_configs() {
        assert!(config().validate().is_ok());
        let broken: [fn(&mut ModelConfig); 7] = [
            |c| c.n_heads = 3,
            |c| c.head_dim = 9,
            |c| c.hidden = 0,
            |c| c.n_layers = MAX_LAYERS + 1,
            |c| c.rope_theta = f32::NAN,
            |c| c.rope_freq_factors = Some(vec![1.0; 4]),
            |c| c.vocab = usize::MAX / 2,
        ];
        for f in broken {
            let mut c = config();
            f(&mut c);
            assert!(
                matches!(c.validate(), Err(ContractError::InvalidConfig(_))),
                "{c:?}"
            );
            assert!(ModelContract::metadata(&c, QkLayout::RotateHalf).is_err());
        }
    }

    /// Held bytes by hand: vocab 7 × hidden 40 per matrix (embedding and untied head);
    /// f32 norms 40 · (2·2 + 1); f32 biases 2 layers · (40 + 2·20).
    #[test]
    fn held_bytes_by_hand() {
        let c = config();
        let f32s = 4 * (40 * 5 + 2 * 80);
        assert_eq!(
            c.held_resident_bytes(EmbeddingPrecision::F16),
            2 * 2 * 280 + f32s
        );
        assert_eq!(
            c.held_resident_bytes(EmbeddingPrecision::F32),
            2 * 4 * 280 + f32s
        );
        // Q8: 280 int8 values and 7 rows × ceil(40 / 32) = 2 f16 scales, per matrix.
        assert_eq!(
            c.held_resident_bytes(EmbeddingPrecision::Q8),
            2 * (280 + 2 * 14) + f32s
        );
        // Q4: 7 rows × 40 / 2 = 20 code bytes and 2 f16 scales, per matrix.
        assert_eq!(
            c.held_resident_bytes(EmbeddingPrecision::Q4),
            2 * (7 * 20 + 2 * 14) + f32s
        );
        let tied = ModelConfig {
            tied_embeddings: true,
            attn_bias: false,
            ..c
        };
        assert_eq!(
            tied.held_resident_bytes(EmbeddingPrecision::F16),
            2 * 280 + 4 * 40 * 5
        );
    }

    /// A Qwen2.5-0.5B-shaped config (vocab 151,936 × hidden 896, untied head, Q/K/V biases)
    /// by hand: per matrix f16 2·v·h; q8 v·h + 2·v·28; q4 v·448 + 2·v·28; norms
    /// 896 · 49 and biases 24 · 1152 f32 values.
    #[test]
    fn held_bytes_of_a_qwen2_shape_by_hand() {
        let c = ModelConfig {
            n_layers: 24,
            hidden: 896,
            ffn: 4864,
            n_heads: 14,
            n_kv_heads: 2,
            head_dim: 64,
            vocab: 151_936,
            ..config()
        };
        let f32s = 4 * (896 * 49 + 24 * 1152);
        let v = 151_936u64;
        assert_eq!(
            c.held_resident_bytes(EmbeddingPrecision::F16),
            2 * 2 * v * 896 + f32s
        );
        assert_eq!(
            c.held_resident_bytes(EmbeddingPrecision::Q8),
            2 * (v * 896 + 2 * v * 28) + f32s
        );
        assert_eq!(
            c.held_resident_bytes(EmbeddingPrecision::Q4),
            2 * (v * 448 + 2 * v * 28) + f32s
        );
        assert_eq!(c.held_resident_bytes(EmbeddingPrecision::Q4), 153_437_696);
    }

    /// Every precision reads back from the name it prints (the CLI's `--resident` values);
    /// other names are errors that list the choices.
    #[test]
    fn embedding_precision_names_round_trip() {
        use EmbeddingPrecision::*;
        for p in [F32, F16, Q8, Q4] {
            assert_eq!(p.to_string().parse::<EmbeddingPrecision>(), Ok(p));
        }
        let err = "q2".parse::<EmbeddingPrecision>().unwrap_err();
        assert!(err.contains("q4") && err.contains("q8"), "{err}");
    }

    #[test]
    fn residents_and_names() {
        let c = config();
        let r = c.residents();
        assert_eq!(r.len(), 3 + 2 * 5);
        assert_eq!(r[2].role, ResidentRole::OutputHead);
        assert_eq!(r[2].shape, vec![7, 40]);
        let q_bias = ResidentRole::Bias {
            layer: 1,
            kind: LinearKind::Q,
        };
        let slot = r.iter().find(|s| s.role == q_bias).unwrap();
        assert_eq!(slot.shape, vec![40]);
        assert_eq!(q_bias.tensor_name(), "blk.1.attn_q.bias");
        assert_eq!(
            q_bias.hf_tensor_name(),
            "model.layers.1.self_attn.q_proj.bias"
        );
        assert_eq!(
            ResidentRole::FfnNorm { layer: 0 }.hf_tensor_name(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        let shapes = c.stack_shapes();
        assert_eq!(shapes.len(), 14);
        assert_eq!(shapes[8], ("blk.1.attn_k.weight".into(), 20, 40));
        assert_eq!(shapes[13], ("blk.1.ffn_down.weight".into(), 40, 24));
    }

    #[test]
    fn qk_layout_values() {
        for l in [QkLayout::RotateHalf, QkLayout::Interleaved] {
            assert_eq!(l.as_str().parse::<QkLayout>().unwrap(), l);
        }
        assert!(matches!(
            "rotate_half".parse::<QkLayout>(),
            Err(ContractError::UnknownQkLayout(_))
        ));
        let m = ModelContract::metadata(&config(), QkLayout::Interleaved).unwrap();
        assert_eq!(m[META_QK_LAYOUT], b"interleaved");
        let c: ModelConfig = serde_json::from_slice(&m[META_CONFIG]).unwrap();
        assert_eq!(c, config());
    }

    proptest! {
        /// `stack_location` inverts `stack_index` and the numbering is dense: index `i`
        /// maps to a unique `(layer, kind)` and back.
        #[test]
        fn stack_index_round_trips(layer in 0usize..MAX_LAYERS, k in 0usize..7) {
            let kind = LinearKind::ALL[k];
            let i = stack_index(layer, kind);
            prop_assert_eq!(stack_location(i), (layer, kind));
            prop_assert_eq!(stack_index(stack_location(i + 1).0, stack_location(i + 1).1), i + 1);
        }
    }
}
