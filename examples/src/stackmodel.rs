//! A Llama model stored as a BitStack stack file: the metadata conventions the `bitstack` tool
//! writes, a [`ModelSource`] over the file's resident tensors (so
//! [`LlamaResident::from_source`](crate::llama::LlamaResident::from_source) works unchanged),
//! and a [`LinearProvider`] over an [`ElasticModel`] snapshot.
//!
//! # File conventions
//!
//! * Weight stack `w` is linear `LinearKind::ALL[w % 7]` of layer `w / 7`, named by its
//!   canonical tensor name (`blk.3.attn_q.weight`).
//! * Resident tensors carry their canonical names (`token_embd.weight`, norms, biases, an
//!   untied `output.weight`), in f16; the tokenizer is the U8 resident [`TOKENIZER_TENSOR`]
//!   (a [`Tokenizer::to_json`] document; it can be megabytes, too large for the header).
//! * Metadata: [`META_CONFIG`] holds the [`LlamaConfig`] as JSON, [`META_COMPRESSION`] the
//!   settings the file was made with (informational).

use crate::gguf::{LlamaConfig, ModelError, ModelSource};
use crate::llama::{EmbeddingPrecision, LinearKind, LinearProvider, LlamaResident};
use crate::tokenizer::Tokenizer;
use bitstack_core::{
    BlockId, BlockSource, CoreError, ElasticModel, LinearOp, MemoryBudget, ModelSnapshot,
    ResidualBlock, UniversalOrder,
};
use bitstack_format::StackFile;
use serde_json::{json, Value};
use std::sync::Arc;

/// Metadata key of the model configuration (JSON).
pub const META_CONFIG: &str = "bitstack.llama.config";
/// Metadata key of the compression settings (JSON, informational).
pub const META_COMPRESSION: &str = "bitstack.compression";
/// Name of the U8 resident tensor holding the tokenizer.
pub const TOKENIZER_TENSOR: &str = "tokenizer.json";

/// Index of the stack of `(layer, kind)`.
pub fn weight_index(layer: usize, kind: LinearKind) -> usize {
    layer * LinearKind::ALL.len() + kind.index()
}

/// `(layer, kind)` of stack `index`.
pub fn weight_of_index(index: usize) -> (usize, LinearKind) {
    let n = LinearKind::ALL.len();
    (index / n, LinearKind::ALL[index % n])
}

/// The canonical names of a model's resident (non-decomposed) tensors.
pub fn resident_tensor_names(c: &LlamaConfig) -> Vec<String> {
    let mut names = vec![
        "token_embd.weight".to_owned(),
        "output_norm.weight".to_owned(),
    ];
    if !c.tied_embeddings {
        names.push("output.weight".to_owned());
    }
    for l in 0..c.n_layers {
        names.push(format!("blk.{l}.attn_norm.weight"));
        names.push(format!("blk.{l}.ffn_norm.weight"));
        if c.attn_bias {
            for p in ["q", "k", "v"] {
                names.push(format!("blk.{l}.attn_{p}.bias"));
            }
        }
    }
    names
}

/// Serialises a config for [`META_CONFIG`].
pub fn config_to_json(c: &LlamaConfig) -> Value {
    json!({
        "arch": c.arch,
        "n_layers": c.n_layers,
        "hidden": c.hidden,
        "ffn": c.ffn,
        "n_heads": c.n_heads,
        "n_kv_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "vocab": c.vocab,
        "rope_theta": c.rope_theta,
        "rope_freq_factors": c.rope_freq_factors,
        "rms_eps": c.rms_eps,
        "tied_embeddings": c.tied_embeddings,
        "attn_bias": c.attn_bias,
        "max_seq": c.max_seq,
        "bos_id": c.bos_id,
        "eos_id": c.eos_id,
    })
}

/// Reads a config written by [`config_to_json`], validating it.
pub fn config_from_json(v: &Value) -> Result<LlamaConfig, ModelError> {
    let bad = |k: &str| {
        ModelError::BadModel(format!(
            "model config ({META_CONFIG} metadata): bad or missing {k:?}"
        ))
    };
    let usize_of = |k: &str| {
        v.get(k)
            .and_then(Value::as_u64)
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| bad(k))
    };
    let f32_of = |k: &str| {
        v.get(k)
            .and_then(Value::as_f64)
            .map(|x| x as f32)
            .ok_or_else(|| bad(k))
    };
    let bool_of = |k: &str| v.get(k).and_then(Value::as_bool).ok_or_else(|| bad(k));
    let id_of = |k: &str| match v.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| bad(k)),
    };
    let rope_freq_factors = match v.get("rope_freq_factors") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|x| {
                    x.as_f64()
                        .map(|x| x as f32)
                        .ok_or_else(|| bad("rope_freq_factors"))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(_) => return Err(bad("rope_freq_factors")),
    };
    let c = LlamaConfig {
        arch: v
            .get("arch")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("arch"))?
            .to_owned(),
        n_layers: usize_of("n_layers")?,
        hidden: usize_of("hidden")?,
        ffn: usize_of("ffn")?,
        n_heads: usize_of("n_heads")?,
        n_kv_heads: usize_of("n_kv_heads")?,
        head_dim: usize_of("head_dim")?,
        vocab: usize_of("vocab")?,
        rope_theta: f32_of("rope_theta")?,
        rope_freq_factors,
        rms_eps: f32_of("rms_eps")?,
        tied_embeddings: bool_of("tied_embeddings")?,
        attn_bias: bool_of("attn_bias")?,
        max_seq: usize_of("max_seq")?,
        bos_id: id_of("bos_id")?,
        eos_id: id_of("eos_id")?,
    };
    if c.n_layers > MAX_LAYERS {
        return Err(ModelError::BadModel(format!(
            "model config ({META_CONFIG} metadata): n_layers {} is over the limit of {MAX_LAYERS}",
            c.n_layers
        )));
    }
    c.validate().map_err(|e| match e {
        ModelError::BadConfig(m) => {
            ModelError::BadModel(format!("model config ({META_CONFIG} metadata): {m}"))
        }
        e => e,
    })?;
    Ok(c)
}

/// The most decoder layers a stack file's config may claim (as for every model config).
pub use crate::gguf::MAX_LAYERS;

/// The message for a file without the stack-file magic: says what it is when it is a GGUF
/// model or a Hugging Face folder.
fn not_a_stack_file(path: &std::path::Path) -> String {
    let mut magic = [0u8; 4];
    let is_gguf = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"GGUF";
    if is_gguf {
        format!(
            "{} is a GGUF model, not a stack file (make one with `bitstack compress`)",
            path.display()
        )
    } else {
        format!(
            "{} is not a stack file (it does not start with the BITSTACK magic bytes)",
            path.display()
        )
    }
}

/// A stack file holding a Llama model, shared between the resident loader and the elastic
/// runtime's block source.
#[derive(Clone, Debug)]
pub struct StackModel {
    file: Arc<StackFile>,
    config: LlamaConfig,
}

impl StackModel {
    /// Checks that `file` holds a Llama model: its config parses and its stacks are exactly
    /// the model's `7 · n_layers` linears with the config's shapes, in [`weight_index`] order.
    pub fn new(file: StackFile) -> Result<Self, ModelError> {
        let text = file.metadata_str(META_CONFIG).ok_or_else(|| {
            ModelError::BadModel(format!(
                "no {META_CONFIG} metadata (not a Llama stack file written by bitstack)"
            ))
        })?;
        let v: Value = serde_json::from_str(text)
            .map_err(|e| ModelError::BadModel(format!("{META_CONFIG} metadata: {e}")))?;
        let config = config_from_json(&v)?;
        let stacks = file.stacks();
        let expected = config
            .n_layers
            .checked_mul(LinearKind::ALL.len())
            .ok_or_else(|| ModelError::BadModel("n_layers overflows".into()))?;
        if stacks.len() != expected {
            return Err(ModelError::BadModel(format!(
                "stack file has {} weight stacks, the config needs {expected}",
                stacks.len()
            )));
        }
        for (i, meta) in stacks.iter().enumerate() {
            let (layer, kind) = weight_of_index(i);
            let (rows, cols) = kind.shape(&config);
            if meta.name != kind.tensor_name(layer) || (meta.rows, meta.cols) != (rows, cols) {
                return Err(ModelError::BadModel(format!(
                    "stack {i} is {} ({}x{}), expected {} ({rows}x{cols})",
                    meta.name,
                    meta.rows,
                    meta.cols,
                    kind.tensor_name(layer)
                )));
            }
        }
        Ok(Self {
            file: Arc::new(file),
            config,
        })
    }

    /// Opens and validates a stack file.
    pub fn open(path: impl AsRef<std::path::Path>) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let file = StackFile::open(path).map_err(|e| {
            ModelError::BadModel(match e {
                // These name the path themselves.
                bitstack_format::FormatError::NotRegularFile { .. }
                | bitstack_format::FormatError::Io { .. } => e.to_string(),
                bitstack_format::FormatError::BadMagic => not_a_stack_file(path),
                e => format!("{}: not a valid stack file: {e}", path.display()),
            })
        })?;
        Self::new(file).map_err(|e| match e {
            ModelError::BadModel(m) => ModelError::BadModel(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    /// The underlying file.
    pub fn file(&self) -> &StackFile {
        &self.file
    }

    /// A cheap handle usable as an [`ElasticModel`](bitstack_core::ElasticModel) block source.
    pub fn block_source(&self) -> SharedStackFile {
        SharedStackFile(self.file.clone())
    }

    /// The universal order stored in the file.
    pub fn order(&self) -> &UniversalOrder {
        self.file.order()
    }
}

impl ModelSource for StackModel {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let t = self
            .file
            .resident(name)
            .filter(|_| name != TOKENIZER_TENSOR)
            .ok_or_else(|| ModelError::MissingTensor(name.to_owned()))?;
        let shape = t
            .shape()
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| ModelError::BadModel(format!("tensor {name} is too large")))?;
        let data = t
            .to_f32()
            .map_err(|e| ModelError::BadModel(format!("tensor {name}: {e}")))?;
        Ok((shape, data))
    }

    fn has_tensor(&self, name: &str) -> bool {
        name != TOKENIZER_TENSOR && self.file.resident(name).is_some()
    }

    fn tokenizer(&self) -> Result<Tokenizer, ModelError> {
        let t = self.file.resident(TOKENIZER_TENSOR).ok_or_else(|| {
            ModelError::MissingTensor(format!("{TOKENIZER_TENSOR} (the stack file's tokenizer)"))
        })?;
        Ok(Tokenizer::from_json(t.bytes())?)
    }
}

/// An `Arc`'d [`StackFile`] as a [`BlockSource`].
#[derive(Clone, Debug)]
pub struct SharedStackFile(pub Arc<StackFile>);

impl BlockSource for SharedStackFile {
    fn load_block(&self, id: BlockId) -> Result<ResidualBlock, CoreError> {
        self.0.load_block(id)
    }
}

/// The linears of one [`ModelSnapshot`] of a stack file's model, for
/// [`Llama::new`](crate::llama::Llama::new). Holding it keeps the snapshot's blocks alive
/// however the model is resized meanwhile.
#[derive(Clone, Debug)]
pub struct SnapshotLinears(pub Arc<ModelSnapshot>);

impl LinearProvider for SnapshotLinears {
    fn linear(&self, layer: usize, kind: LinearKind) -> &dyn LinearOp {
        // Index validity is established by `StackModel::new` (7 stacks per layer) and by
        // `Llama::new`, which asks for every (layer, kind) once and checks shapes.
        &self.0.weights()[weight_index(layer, kind)]
    }
}

/// Errors of [`LoadedStack::open`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file is not a usable model.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Building the resident part failed.
    #[error(transparent)]
    Llama(#[from] crate::llama::LlamaError),
    /// The runtime rejected the budget or the layout.
    #[error(transparent)]
    Core(#[from] CoreError),
}

/// A stack file's model held by the elastic runtime, with its resident part and tokenizer:
/// everything needed to run it at the current budget and to resize it in place.
pub struct LoadedStack {
    /// The file.
    pub model: StackModel,
    /// Embedding (f16, as stored), norms and biases.
    pub resident: LlamaResident,
    /// The tokenizer stored in the file.
    pub tokenizer: Tokenizer,
    /// The resizable weights. Its layout's `resident_bytes` is what `resident` really holds.
    pub elastic: ElasticModel<SharedStackFile>,
    /// Bytes of the same model with every parameter in f16 (compression ratios).
    pub original_f16_bytes: u64,
}

impl std::fmt::Debug for LoadedStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedStack")
            .field("model", &self.model)
            .field("held_bytes", &self.elastic.snapshot().held_bytes())
            .finish_non_exhaustive()
    }
}

impl LoadedStack {
    /// Opens `path` and loads the longest prefix fitting `budget` (the minimum model when
    /// `None`). A budget below the minimum is [`CoreError::BudgetBelowMinimum`].
    pub fn open(
        path: impl AsRef<std::path::Path>,
        budget: Option<MemoryBudget>,
    ) -> Result<Self, LoadError> {
        // The file stores the embedding in f16; keep it so (a tied head reads it in chunks).
        Self::open_with(path, budget, EmbeddingPrecision::F16)
    }

    /// [`LoadedStack::open`] with the resident embedding (and an untied head) held at
    /// `resident` precision, e.g. [`EmbeddingPrecision::Q8`] (8.5 bits per value instead of
    /// 16): the bytes held, and so the prefix a budget buys, follow it.
    pub fn open_with(
        path: impl AsRef<std::path::Path>,
        budget: Option<MemoryBudget>,
        resident: EmbeddingPrecision,
    ) -> Result<Self, LoadError> {
        let model = StackModel::open(path)?;
        let resident = LlamaResident::from_source_with(&model, resident)?;
        let tokenizer = model.tokenizer()?;
        let mut layout = model.file().layout();
        // Count what the process actually holds for the resident part (f16 embedding, f32
        // norms), not the file's payload bytes (which include the tokenizer blob).
        layout.resident_bytes = resident.held_bytes();
        let linear_params: u64 = layout.stacks.iter().map(|m| (m.rows * m.cols) as u64).sum();
        let original_f16_bytes = 2 * (linear_params + resident.param_count() as u64);
        let budget = budget.unwrap_or(MemoryBudget::from_bytes(layout.minimum_bytes()));
        let elastic = ElasticModel::new(model.block_source(), layout, budget)?;
        Ok(Self {
            model,
            resident,
            tokenizer,
            elastic,
            original_f16_bytes,
        })
    }

    /// Token ids of a user prompt: wrapped in the model's chat template when `chat`, with BOS
    /// when the tokenizer asks for it.
    pub fn prompt_ids(
        &self,
        prompt: &str,
        chat: bool,
    ) -> Result<Vec<u32>, crate::tokenizer::TokenizerError> {
        let text = if chat {
            self.tokenizer.apply_chat_template(
                &[crate::tokenizer::ChatMessage {
                    role: "user",
                    content: prompt,
                }],
                true,
            )?
        } else {
            prompt.to_owned()
        };
        self.tokenizer
            .encode(&text, self.tokenizer.add_bos_default())
    }

    /// The linears of the current snapshot, for [`Llama::new`](crate::llama::Llama::new).
    /// Later resizes do not affect them.
    pub fn linears(&self) -> SnapshotLinears {
        SnapshotLinears(self.elastic.snapshot())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_through_json() {
        let c = LlamaConfig {
            arch: "llama".into(),
            n_layers: 3,
            hidden: 16,
            ffn: 40,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 4,
            vocab: 99,
            rope_theta: 100000.0,
            rope_freq_factors: Some(vec![1.0, 2.5]),
            rms_eps: 1e-5,
            tied_embeddings: false,
            attn_bias: true,
            max_seq: 2048,
            bos_id: Some(1),
            eos_id: None,
        };
        let back = config_from_json(&config_to_json(&c)).unwrap();
        assert_eq!(back, c);
        let mut broken = config_to_json(&c);
        broken["n_heads"] = json!(3);
        assert!(config_from_json(&broken).is_err());
        broken["n_heads"] = json!("four");
        assert!(config_from_json(&broken).is_err());
    }

    #[test]
    fn weight_indices_round_trip() {
        for i in 0..70 {
            let (l, k) = weight_of_index(i);
            assert_eq!(weight_index(l, k), i);
        }
    }
}
