//! [`ModelSource`]: one interface over GGUF files and Hugging Face directories, with canonical
//! GGUF-style tensor names and Hugging Face (rotate-half RoPE) tensor layout.

use std::collections::BTreeMap;
use std::f32::consts::PI;
use std::path::{Path, PathBuf};

use super::reader::{GgufError, GgufFile};
use super::safetensors::SafeTensors;
use crate::tokenizer::{Tokenizer, TokenizerError};

/// Errors from opening a model or reading its tensors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A GGUF-level error.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A tokenizer error.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A malformed safetensors file.
    #[error("bad safetensors file {path}: {reason}")]
    BadSafetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A malformed or incomplete `config.json`.
    #[error("bad config.json: {0}")]
    BadConfig(String),
    /// A stack file that cannot be opened or does not hold a usable model (the message
    /// names the file and what was expected).
    #[error("{0}")]
    BadModel(String),
    /// An architecture, dtype or feature this crate does not handle.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// No tensor with this canonical name.
    #[error("tensor {0:?} not found")]
    MissingTensor(String),
}

/// The most decoder layers a config may have (the largest Llama has 126): a guard against
/// corrupt counts that would overflow `7 · n_layers` or allocate without bound.
pub const MAX_LAYERS: usize = 4096;

/// The hyper-parameters of a Llama-family decoder (Llama 2/3, Mistral, SmolLM, Qwen2).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Source architecture name (`llama`, `mistral` or `qwen2`).
    pub arch: String,
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
    /// Per-head width.
    pub head_dim: usize,
    /// Vocabulary size (rows of `token_embd.weight`).
    pub vocab: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// Per-frequency RoPE divisors (length `head_dim / 2`), for linear or Llama-3.1-style
    /// scaling: the angle of pair `i` at position `p` is `p * theta^(-2i/head_dim) / f[i]`.
    /// `None` means no scaling.
    pub rope_freq_factors: Option<Vec<f32>>,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Whether the output projection reuses `token_embd.weight` (then `output.weight` is absent).
    pub tied_embeddings: bool,
    /// Whether Q/K/V have biases (`blk.{i}.attn_q.bias` ...), as in Qwen2.
    pub attn_bias: bool,
    /// Trained context length.
    pub max_seq: usize,
    /// Beginning-of-sequence token id.
    pub bos_id: Option<u32>,
    /// End-of-sequence token id.
    pub eos_id: Option<u32>,
}

impl LlamaConfig {
    /// Checks the internal consistency the forward pass relies on.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |s: String| Err(ModelError::BadConfig(s));
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
        Ok(())
    }
}

/// A model's weights, config and tokenizer, whatever the file format.
///
/// Tensor names are canonical GGUF names: `token_embd.weight`, `output_norm.weight`,
/// `output.weight` (absent when embeddings are tied), and per block `blk.{i}.` +
/// `attn_norm.weight`, `attn_q.weight`, `attn_k.weight`, `attn_v.weight`, `attn_output.weight`,
/// `ffn_norm.weight`, `ffn_gate.weight`, `ffn_up.weight`, `ffn_down.weight`, and when
/// [`LlamaConfig::attn_bias`] `attn_q.bias`, `attn_k.bias`, `attn_v.bias`.
///
/// Tensors come in PyTorch shape (`[out, in]` for projections) and **Hugging Face layout**:
/// Q/K rows are ordered for rotate-half RoPE (pairs `(i, i + head_dim/2)` within each head).
pub trait ModelSource: Send + Sync {
    /// The model hyper-parameters.
    fn config(&self) -> &LlamaConfig;
    /// A tensor by canonical name, converted to f32, with its PyTorch shape.
    fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError>;
    /// Whether a tensor with this canonical name exists.
    fn has_tensor(&self, name: &str) -> bool;
    /// The model's tokenizer.
    fn tokenizer(&self) -> Result<Tokenizer, ModelError>;
}

/// Opens a `.gguf` file or a Hugging Face model directory.
pub fn open_model(path: impl AsRef<Path>) -> Result<Box<dyn ModelSource>, ModelError> {
    let path = path.as_ref();
    if path.is_dir() {
        Ok(Box::new(HfModel::open(path)?))
    } else {
        Ok(Box::new(GgufModel::open(path)?))
    }
}

/// Reorders the rows of a Q or K projection (or bias) from llama.cpp's interleaved-pairs layout
/// to Hugging Face's rotate-half layout: within each head of width `d`, HF row `half * d/2 + i`
/// is GGUF row `2 i + half`. This inverts the `permute` in llama.cpp's `convert_hf_to_gguf.py`.
///
/// `data` is `rows x cols` row-major; `rows` must split into `n_heads` heads of even width.
pub fn unpermute_qk_rows(
    data: &[f32],
    n_heads: usize,
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>, ModelError> {
    if n_heads == 0
        || !rows.is_multiple_of(n_heads)
        || !(rows / n_heads).is_multiple_of(2)
        || rows.checked_mul(cols) != Some(data.len())
    {
        return Err(ModelError::Unsupported(format!(
            "cannot split a {rows}x{cols} Q/K tensor ({} values) into {n_heads} heads of even width",
            data.len()
        )));
    }
    let d = rows / n_heads;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_heads {
        for half in 0..2 {
            for i in 0..d / 2 {
                let dst = h * d + half * (d / 2) + i;
                let src = h * d + 2 * i + half;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// Llama-3.1-style RoPE scaling turned into per-frequency divisors (see
/// [`LlamaConfig::rope_freq_factors`]), following the Hugging Face `_compute_llama3_parameters`.
fn llama3_freq_factors(
    head_dim: usize,
    theta: f32,
    factor: f32,
    low: f32,
    high: f32,
    orig_ctx: f32,
) -> Vec<f32> {
    let low_wavelen = orig_ctx / low;
    let high_wavelen = orig_ctx / high;
    (0..head_dim / 2)
        .map(|i| {
            let inv = theta.powf(-((2 * i) as f32) / head_dim as f32);
            let wavelen = 2.0 * PI / inv;
            let scaled = if wavelen < high_wavelen {
                inv
            } else if wavelen > low_wavelen {
                inv / factor
            } else {
                let smooth = (orig_ctx / wavelen - low) / (high - low);
                (1.0 - smooth) * inv / factor + smooth * inv
            };
            inv / scaled
        })
        .collect()
}

/// A GGUF file as a [`ModelSource`].
#[derive(Debug)]
pub struct GgufModel {
    file: GgufFile,
    config: LlamaConfig,
}

impl GgufModel {
    /// Opens a GGUF file and reads its Llama-family config.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        Self::from_file(GgufFile::open(path)?)
    }

    /// Wraps an already opened GGUF file.
    pub fn from_file(file: GgufFile) -> Result<Self, ModelError> {
        let config = gguf_config(&file)?;
        Ok(Self { file, config })
    }

    /// The underlying GGUF file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }
}

fn gguf_config(f: &GgufFile) -> Result<LlamaConfig, ModelError> {
    let arch = f.architecture()?.to_owned();
    if !matches!(arch.as_str(), "llama" | "qwen2") {
        return Err(ModelError::Unsupported(format!(
            "GGUF architecture {arch:?} (supported: llama, qwen2)"
        )));
    }
    let k = |s: &str| format!("{arch}.{s}");
    if f.get_u32(&k("expert_count")).is_ok_and(|n| n > 0) {
        return Err(ModelError::Unsupported("mixture-of-experts models".into()));
    }
    let usize_of = |key: &str| f.get_u32(key).map(|v| v as usize);
    let n_heads = usize_of(&k("attention.head_count"))?;
    let hidden = usize_of(&k("embedding_length"))?;
    let n_kv_heads = match f.get_u32(&k("attention.head_count_kv")) {
        Err(GgufError::MissingKey(_)) => n_heads,
        r => r? as usize,
    };
    let head_dim = match f.get_u32(&k("attention.key_length")) {
        Err(GgufError::MissingKey(_)) => hidden / n_heads.max(1),
        r => r? as usize,
    };
    let rope_theta = match f.get_f32(&k("rope.freq_base")) {
        Err(GgufError::MissingKey(_)) => 10_000.0,
        r => r?,
    };
    let vocab = f
        .tensor_info("token_embd.weight")?
        .shape()
        .first()
        .copied()
        .unwrap_or(0);
    let rope_freq_factors = if f.has_tensor("rope_freqs.weight") {
        Some(f.tensor_f32("rope_freqs.weight")?.1)
    } else {
        match f.get_str(&k("rope.scaling.type")) {
            Err(GgufError::MissingKey(_)) => None,
            Ok("none") => None,
            Ok("linear") => Some(vec![f.get_f32(&k("rope.scaling.factor"))?; head_dim / 2]),
            Ok(other) => {
                return Err(ModelError::Unsupported(format!(
                    "RoPE scaling type {other:?}"
                )))
            }
            Err(e) => return Err(e.into()),
        }
    };
    let opt_id = |key: &str| match f.get_u32(key) {
        Err(GgufError::MissingKey(_)) => Ok(None),
        r => r.map(Some),
    };
    let config = LlamaConfig {
        n_layers: usize_of(&k("block_count"))?,
        hidden,
        ffn: usize_of(&k("feed_forward_length"))?,
        n_heads,
        n_kv_heads,
        head_dim,
        vocab,
        rope_theta,
        rope_freq_factors,
        rms_eps: f.get_f32(&k("attention.layer_norm_rms_epsilon"))?,
        tied_embeddings: !f.has_tensor("output.weight"),
        attn_bias: f.has_tensor("blk.0.attn_q.bias"),
        max_seq: usize_of(&k("context_length"))?,
        bos_id: opt_id("tokenizer.ggml.bos_token_id")?,
        eos_id: opt_id("tokenizer.ggml.eos_token_id")?,
        arch,
    };
    // validate() speaks of config.json; here the values come from the GGUF metadata.
    config.validate().map_err(|e| match e {
        ModelError::BadConfig(m) => {
            ModelError::BadModel(format!("GGUF metadata ({}.*): {m}", config.arch))
        }
        e => e,
    })?;
    Ok(config)
}

/// Which Q/K head count a canonical tensor name needs for un-permuting, if any.
fn qk_heads(name: &str, c: &LlamaConfig) -> Option<usize> {
    let rest = name.strip_prefix("blk.")?;
    let (_, suffix) = rest.split_once('.')?;
    match suffix {
        "attn_q.weight" | "attn_q.bias" => Some(c.n_heads),
        "attn_k.weight" | "attn_k.bias" => Some(c.n_kv_heads),
        _ => None,
    }
}

impl ModelSource for GgufModel {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let (shape, data) = self.file.tensor_f32(name)?;
        // Only llama.cpp's `llama` architecture is written with permuted Q/K; `qwen2` uses the
        // NEOX (rotate-half) RoPE and is stored in HF order already.
        match qk_heads(name, &self.config) {
            Some(heads) if self.config.arch == "llama" => {
                let rows = shape.first().copied().unwrap_or(1);
                let cols = data.len().checked_div(rows).unwrap_or(0);
                let hf = unpermute_qk_rows(&data, heads, rows, cols)?;
                Ok((shape, hf))
            }
            _ => Ok((shape, data)),
        }
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.file.has_tensor(name)
    }

    fn tokenizer(&self) -> Result<Tokenizer, ModelError> {
        Ok(Tokenizer::from_gguf(&self.file)?)
    }
}

/// A Hugging Face model directory (`config.json`, `*.safetensors`, `tokenizer.json`) as a
/// [`ModelSource`].
#[derive(Debug)]
pub struct HfModel {
    dir: PathBuf,
    files: Vec<SafeTensors>,
    /// HF tensor name -> index into `files`.
    index: BTreeMap<String, usize>,
    config: LlamaConfig,
}

/// Maps a canonical GGUF-style name to the Hugging Face Llama/Qwen2 name.
pub fn hf_tensor_name(canonical: &str) -> Option<String> {
    match canonical {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = canonical.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (part, kind) = suffix.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

impl HfModel {
    /// Opens a Hugging Face model directory.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        let dir = dir.as_ref().to_owned();
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| ModelError::Io { path, source }
        };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io(&dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(ModelError::Unsupported(format!(
                "{} has no *.safetensors files",
                dir.display()
            )));
        }
        let mut files = Vec::with_capacity(paths.len());
        let mut index = BTreeMap::new();
        for p in &paths {
            let st = SafeTensors::open(p)?;
            for name in st.tensors().keys() {
                index.insert(name.clone(), files.len());
            }
            files.push(st);
        }
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(io(&cfg_path))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::BadConfig(e.to_string()))?;
        let has_lm_head = index.contains_key("lm_head.weight");
        let config = hf_config(&json, has_lm_head)?;
        Ok(Self {
            dir,
            files,
            index,
            config,
        })
    }
}

/// Builds a [`LlamaConfig`] from a Hugging Face `config.json`.
pub fn hf_config(json: &serde_json::Value, has_lm_head: bool) -> Result<LlamaConfig, ModelError> {
    let get = |k: &str| json.get(k).filter(|v| !v.is_null());
    let req = |k: &str| -> Result<usize, ModelError> {
        get(k)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| ModelError::BadConfig(format!("{k} missing or not an integer")))
    };
    let float = |k: &str, default: f32| -> Result<f32, ModelError> {
        match get(k) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .map(|v| v as f32)
                .ok_or_else(|| ModelError::BadConfig(format!("{k} is not a number"))),
        }
    };
    let arch = get("model_type")
        .and_then(|v| v.as_str())
        .ok_or_else(|| ModelError::BadConfig("model_type missing".into()))?
        .to_owned();
    if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
        return Err(ModelError::Unsupported(format!(
            "model_type {arch:?} (supported: llama, mistral, qwen2)"
        )));
    }
    let hidden = req("hidden_size")?;
    let n_heads = req("num_attention_heads")?;
    let n_kv_heads =
        get("num_key_value_heads").map_or(Ok(n_heads), |_| req("num_key_value_heads"))?;
    let head_dim = get("head_dim").map_or(Ok(hidden / n_heads.max(1)), |_| req("head_dim"))?;
    let rope_theta = float("rope_theta", 10_000.0)?;
    let rope_freq_factors = match get("rope_scaling") {
        None => None,
        Some(rs) => {
            let ty = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            let f = |k: &str| {
                rs.get(k)
                    .and_then(|v| v.as_f64())
                    .map(|v| v as f32)
                    .ok_or_else(|| ModelError::BadConfig(format!("rope_scaling.{k} missing")))
            };
            match ty {
                "default" => None,
                "linear" => Some(vec![f("factor")?; head_dim / 2]),
                "llama3" => Some(llama3_freq_factors(
                    head_dim,
                    rope_theta,
                    f("factor")?,
                    f("low_freq_factor")?,
                    f("high_freq_factor")?,
                    f("original_max_position_embeddings")?,
                )),
                other => {
                    return Err(ModelError::Unsupported(format!(
                        "rope_scaling type {other:?}"
                    )))
                }
            }
        }
    };
    let id = |k: &str| -> Option<u32> {
        let v = get(k)?;
        let v = v.as_array().and_then(|a| a.first()).unwrap_or(v);
        v.as_u64().and_then(|v| u32::try_from(v).ok())
    };
    let tie = get("tie_word_embeddings").and_then(|v| v.as_bool());
    let attn_bias = arch == "qwen2"
        || get("attention_bias")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
    let config = LlamaConfig {
        n_layers: req("num_hidden_layers")?,
        hidden,
        ffn: req("intermediate_size")?,
        n_heads,
        n_kv_heads,
        head_dim,
        vocab: req("vocab_size")?,
        rope_theta,
        rope_freq_factors,
        rms_eps: float("rms_norm_eps", 1e-6)?,
        // Llama/Qwen2 configs default to untied; a missing lm_head means tied regardless.
        tied_embeddings: tie.unwrap_or(false) || !has_lm_head,
        attn_bias,
        max_seq: get("max_position_embeddings")
            .map_or(Ok(4096), |_| req("max_position_embeddings"))?,
        bos_id: id("bos_token_id"),
        eos_id: id("eos_token_id"),
        arch,
    };
    config.validate()?;
    Ok(config)
}

impl ModelSource for HfModel {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        if name == "output.weight" && self.config.tied_embeddings {
            return Err(ModelError::MissingTensor(name.to_owned()));
        }
        let hf = hf_tensor_name(name).ok_or_else(|| ModelError::MissingTensor(name.to_owned()))?;
        let &file = self
            .index
            .get(&hf)
            .ok_or_else(|| ModelError::MissingTensor(name.to_owned()))?;
        self.files[file].tensor_f32(&hf)
    }

    fn has_tensor(&self, name: &str) -> bool {
        if name == "output.weight" && self.config.tied_embeddings {
            return false;
        }
        hf_tensor_name(name).is_some_and(|hf| self.index.contains_key(&hf))
    }

    fn tokenizer(&self) -> Result<Tokenizer, ModelError> {
        Ok(Tokenizer::from_hf_dir(
            &self.dir,
            self.config.bos_id,
            self.config.eos_id,
        )?)
    }
}
