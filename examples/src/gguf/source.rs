//! [`ModelSource`]: one interface over GGUF files and Hugging Face directories, with canonical
//! GGUF-style tensor names and Hugging Face (rotate-half RoPE) tensor layout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use super::hf_config::hf_config;
use super::hf_config::read_hf_config;
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
    /// A config key (Hugging Face `config.json` or GGUF metadata) whose value would change the
    /// forward pass in a way this crate does not implement, or that contradicts another key.
    #[error("{file}: {key} = {value}: {reason}")]
    UnsupportedKey {
        /// The file (or `GGUF metadata` when the file has no path).
        file: String,
        /// The key, dotted for nested ones (`rope_parameters.rope_type`).
        key: String,
        /// Its value as written (JSON for `config.json`).
        value: String,
        /// Why it cannot be honoured.
        reason: String,
    },
    /// A malformed `model.safetensors.index.json`, or shards that disagree with it or each other.
    #[error("bad safetensors index {path}: {reason}")]
    BadIndex {
        /// The index file (or the directory when there is no index).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The most decoder layers a config may have (the model contract's limit).
pub use bitstack_format::model::MAX_LAYERS;

/// The hyper-parameters of a Llama-family decoder (Llama 2/3, Mistral, SmolLM, Qwen2): the
/// model contract's config, one definition for models read from GGUF, Hugging Face and stack
/// files. Its [`validate`](bitstack_format::ModelConfig::validate) is the contract's checks;
/// `?` turns their errors into [`ModelError::BadConfig`].
pub type LlamaConfig = bitstack_format::ModelConfig;

/// The decoder family of a [`LlamaConfig`].
pub use bitstack_format::Architecture;

impl From<bitstack_format::ContractError> for ModelError {
    /// A config the model contract rejects: [`ModelError::BadConfig`] with the contract's
    /// message.
    fn from(e: bitstack_format::ContractError) -> Self {
        match e {
            bitstack_format::ContractError::InvalidConfig(m) => ModelError::BadConfig(m),
            e => ModelError::BadConfig(e.to_string()),
        }
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

/// A GGUF file as a [`ModelSource`].
#[derive(Debug)]
pub struct GgufModel {
    file: GgufFile,
    config: LlamaConfig,
}

impl GgufModel {
    /// Opens a GGUF file and reads its Llama-family config (see [`GgufModel::from_file`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let file = GgufFile::open(path)?;
        let (config, notes) = gguf_config(&file, &path.display().to_string())?;
        for n in notes {
            crate::noteln!("{n}");
        }
        Ok(Self { file, config })
    }

    /// Wraps an already opened GGUF file.
    ///
    /// Metadata is read as llama.cpp reads it: a missing optional key
    /// (`{arch}.rope.freq_base`, `{arch}.attention.head_count_kv`, `{arch}.attention.key_length`,
    /// `{arch}.rope.dimension_count`) takes llama.cpp's default and one line naming it is logged
    /// to stderr; a value the forward pass cannot honour (a `{arch}.rope.scaling.type` other
    /// than `none` / `linear`, a `rope.dimension_count` below the head width, value heads of
    /// another width, experts) is a [`ModelError::UnsupportedKey`] naming the key. Linear
    /// scaling (`{arch}.rope.scaling.factor`, or the older `{arch}.rope.scale_linear`) and the
    /// per-frequency `rope_freqs.weight` tensor (Llama 3.1) are applied, multiplied when both
    /// are present as llama.cpp does.
    pub fn from_file(file: GgufFile) -> Result<Self, ModelError> {
        let (config, notes) = gguf_config(&file, "GGUF metadata")?;
        for n in notes {
            crate::noteln!("{n}");
        }
        Ok(Self { file, config })
    }

    /// The underlying GGUF file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }
}

/// The config of a GGUF file and the defaults it took (one line each); `label` names the file.
pub(crate) fn gguf_config(
    f: &GgufFile,
    label: &str,
) -> Result<(LlamaConfig, Vec<String>), ModelError> {
    let arch = f.architecture()?.to_owned();
    let unsupported = |key: &str, value: String, reason: &str| ModelError::UnsupportedKey {
        file: label.to_owned(),
        key: key.to_owned(),
        value,
        reason: reason.to_owned(),
    };
    let architecture = match arch.as_str() {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        _ => {
            return Err(unsupported(
                "general.architecture",
                format!("{arch:?}"),
                "supported: llama, qwen2",
            ))
        }
    };
    let mut notes = Vec::new();
    let mut note = |key: &str, value: String| {
        notes.push(format!(
            "{label}: {key} missing; using llama.cpp's default {value}"
        ));
    };
    let k = |s: &str| format!("{arch}.{s}");
    match f.get_u32(&k("expert_count")) {
        Ok(n) if n > 0 => {
            return Err(unsupported(
                &k("expert_count"),
                n.to_string(),
                "mixture-of-experts models are not implemented",
            ))
        }
        Err(GgufError::MissingKey(_)) | Ok(_) => {}
        Err(e) => return Err(e.into()),
    }
    let usize_of = |key: &str| f.get_u32(key).map(|v| v as usize);
    let opt_usize = |key: &str| match f.get_u32(key) {
        Err(GgufError::MissingKey(_)) => Ok(None),
        r => r.map(|v| Some(v as usize)),
    };
    let opt_f32 = |key: &str| match f.get_f32(key) {
        Err(GgufError::MissingKey(_)) => Ok(None),
        r => r.map(Some),
    };
    let n_heads = usize_of(&k("attention.head_count"))?;
    let hidden = usize_of(&k("embedding_length"))?;
    let n_kv_heads = match opt_usize(&k("attention.head_count_kv"))? {
        Some(v) => v,
        None => {
            note(
                &k("attention.head_count_kv"),
                format!("attention.head_count = {n_heads}"),
            );
            n_heads
        }
    };
    let head_dim = match opt_usize(&k("attention.key_length"))? {
        Some(v) => v,
        None => {
            let d = hidden / n_heads.max(1);
            note(
                &k("attention.key_length"),
                format!("embedding_length / attention.head_count = {d}"),
            );
            d
        }
    };
    if let Some(v) = opt_usize(&k("attention.value_length"))? {
        if v != head_dim {
            return Err(unsupported(
                &k("attention.value_length"),
                v.to_string(),
                &format!("value heads must be as wide as key heads ({head_dim})"),
            ));
        }
    }
    match opt_usize(&k("rope.dimension_count"))? {
        Some(v) if v != head_dim => {
            return Err(unsupported(
                &k("rope.dimension_count"),
                v.to_string(),
                &format!("RoPE on part of a head ({v} of {head_dim}) is not implemented"),
            ))
        }
        Some(_) => {}
        None => note(
            &k("rope.dimension_count"),
            format!("the head width {head_dim}"),
        ),
    }
    let rope_theta = match opt_f32(&k("rope.freq_base"))? {
        Some(v) => v,
        None => {
            note(&k("rope.freq_base"), "10000".into());
            10_000.0
        }
    };
    let vocab = f
        .tensor_info("token_embd.weight")?
        .shape()
        .first()
        .copied()
        .unwrap_or(0);

    // llama.cpp: the factor is `rope.scaling.factor`, else the older `rope.scale_linear`,
    // 0 or absent meaning 1; the type defaults to linear, and `none` disables the factor.
    let factor_key = k("rope.scaling.factor");
    let old_key = k("rope.scale_linear");
    let (factor_key, factor) = match opt_f32(&factor_key)? {
        Some(v) => (factor_key, v),
        None => match opt_f32(&old_key)? {
            Some(v) => (old_key, v),
            None => (factor_key, 0.0),
        },
    };
    if !(factor.is_finite() && factor >= 0.0) {
        return Err(unsupported(
            &factor_key,
            factor.to_string(),
            "a RoPE scaling factor must be positive (or 0 for none)",
        ));
    }
    let type_key = k("rope.scaling.type");
    let linear = match f.get_str(&type_key) {
        Err(GgufError::MissingKey(_)) => {
            if factor != 0.0 && factor != 1.0 {
                note(&type_key, "\"linear\"".into());
            }
            factor
        }
        Ok("none") => 0.0,
        Ok("linear") => factor,
        Ok(other) => {
            return Err(unsupported(
                &type_key,
                format!("{other:?}"),
                "supported: none, linear (Llama 3.1 scaling comes as rope_freqs.weight)",
            ))
        }
        Err(e) => return Err(e.into()),
    };
    let linear = (linear != 0.0 && linear != 1.0).then_some(linear);
    let rope_freq_factors = if f.has_tensor("rope_freqs.weight") {
        let mut v = f.tensor_f32("rope_freqs.weight")?.1;
        if let Some(s) = linear {
            v.iter_mut().for_each(|x| *x *= s);
        }
        Some(v)
    } else {
        linear.map(|s| vec![s; head_dim / 2])
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
        arch: architecture,
    };
    // validate() speaks of config.json; here the values come from the GGUF metadata.
    config.validate().map_err(|e| match ModelError::from(e) {
        ModelError::BadConfig(m) => {
            ModelError::BadModel(format!("GGUF metadata ({}.*): {m}", config.arch))
        }
        e => e,
    })?;
    Ok((config, notes))
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
            Some(heads) if self.config.arch == Architecture::Llama => {
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

/// The name of the index transformers writes beside sharded safetensors files.
pub(crate) const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

impl HfModel {
    /// Opens a Hugging Face model directory: `config.json` (see [`hf_config`]) and either the
    /// shards listed in `model.safetensors.index.json` (each tensor read from the shard its
    /// `weight_map` names, which must hold it) or, without an index, every `*.safetensors`
    /// file (a tensor name in two files is an error). The defaults taken for missing
    /// `config.json` keys are logged to stderr.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        let dir = dir.as_ref().to_owned();
        let (files, index) = open_safetensors(&dir)?;
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|source| ModelError::Io {
            path: cfg_path.clone(),
            source,
        })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::BadConfig(format!("{}: {e}", cfg_path.display())))?;
        let has_lm_head = index.contains_key("lm_head.weight");
        let (config, notes) = read_hf_config(&json, has_lm_head, &cfg_path.display().to_string())?;
        for n in notes {
            crate::noteln!("{n}");
        }
        Ok(Self {
            dir,
            files,
            index,
            config,
        })
    }
}

/// The safetensors files of a directory and the file each tensor lives in.
type SafetensorsSet = (Vec<SafeTensors>, BTreeMap<String, usize>);

fn open_safetensors(dir: &Path) -> Result<SafetensorsSet, ModelError> {
    let index_path = dir.join(SAFETENSORS_INDEX);
    if index_path.exists() {
        return open_indexed(&index_path, dir);
    }
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| ModelError::Io {
            path: dir.to_owned(),
            source,
        })?
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
    let mut files: Vec<SafeTensors> = Vec::with_capacity(paths.len());
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for p in &paths {
        let st = SafeTensors::open(p)?;
        for name in st.tensors().keys() {
            if let Some(&prev) = index.get(name) {
                return Err(ModelError::BadIndex {
                    path: dir.to_owned(),
                    reason: format!(
                        "tensor {name:?} is in both {} and {}, and there is no {SAFETENSORS_INDEX} \
                         to say which one counts",
                        paths[prev].display(),
                        p.display()
                    ),
                });
            }
            index.insert(name.clone(), files.len());
        }
        files.push(st);
    }
    Ok((files, index))
}

/// Reads `model.safetensors.index.json` and opens the shards it names.
fn open_indexed(index_path: &Path, dir: &Path) -> Result<SafetensorsSet, ModelError> {
    let bad = |reason: String| ModelError::BadIndex {
        path: index_path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(index_path).map_err(|source| ModelError::Io {
        path: index_path.to_owned(),
        source,
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no weight_map object".into()))?;
    if map.is_empty() {
        return Err(bad("weight_map is empty".into()));
    }
    let mut shard_names: Vec<&str> = Vec::new();
    let mut wanted: Vec<(&String, &str)> = Vec::with_capacity(map.len());
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map[{tensor:?}] is not a file name")))?;
        // A shard is a plain file name beside the index: no folders, no way out of `dir`.
        let plain = Path::new(file)
            .file_name()
            .is_some_and(|n| n == std::ffi::OsStr::new(file));
        if !plain {
            return Err(bad(format!(
                "weight_map[{tensor:?}] = {file:?} is not a file name in {}",
                dir.display()
            )));
        }
        if !shard_names.contains(&file) {
            shard_names.push(file);
        }
        wanted.push((tensor, file));
    }
    shard_names.sort_unstable();
    let mut files = Vec::with_capacity(shard_names.len());
    for name in &shard_names {
        let p = dir.join(name);
        if !p.is_file() {
            return Err(bad(format!("shard {} is missing", p.display())));
        }
        files.push(SafeTensors::open(&p)?);
    }
    let mut index = BTreeMap::new();
    for (tensor, file) in wanted {
        let i = shard_names
            .binary_search(&file)
            .map_err(|_| bad(format!("shard {file} not opened")))?;
        if !files[i].tensors().contains_key(tensor) {
            return Err(bad(format!(
                "weight_map puts {tensor:?} in {file}, which does not hold it"
            )));
        }
        index.insert(tensor.clone(), i);
    }
    Ok((files, index))
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
