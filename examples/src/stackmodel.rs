//! A Llama model stored as a BitStack stack file under the published model contract
//! ([`bitstack_format::model`], whose config is this crate's [`LlamaConfig`]): a [`ModelSource`]
//! over the file's resident tensors (so
//! [`LlamaResident::from_source`](crate::llama::LlamaResident::from_source) works unchanged),
//! and a [`LinearProvider`] over an [`ElasticModel`] snapshot.
//!
//! # File conventions
//!
//! The model contract in `bitstack_format::model` defines them (stack `w` is linear
//! `LinearKind::ALL[w % 7]` of layer `w / 7`, the config JSON under [`META_CONFIG`], the Q/K
//! row layout, the resident tensors, the tokenizer blob [`TOKENIZER_TENSOR`]); this module
//! adds only [`META_COMPRESSION`], the settings a file was made with (informational).

use crate::gguf::{LlamaConfig, ModelError, ModelSource};
use crate::llama::{
    EmbeddingPrecision, HeadActivations, LinearKind, LinearProvider, LlamaResident,
};
use crate::tokenizer::Tokenizer;
use bitstack_core::{
    BlockId, BlockSource, CoreError, ElasticModel, LinearOp, MemoryBudget, ModelSnapshot,
    ResidualBlock, UniversalOrder,
};
use bitstack_format::model::{ModelContract, QkLayout};
use bitstack_format::StackFile;
use std::sync::Arc;

pub use bitstack_format::model::{
    stack_index as weight_index, stack_location as weight_of_index, META_CONFIG, META_QK_LAYOUT,
    TOKENIZER_TENSOR,
};

/// Metadata key of the compression settings (JSON, informational).
pub const META_COMPRESSION: &str = "bitstack.compression";

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
    contract: ModelContract,
}

impl StackModel {
    /// Checks that `file` holds a Llama model under the model contract
    /// ([`ModelContract::from_file`]: config, stacks, resident tensors) with the Q/K layout
    /// this crate's forward pass uses ([`QkLayout::RotateHalf`]).
    pub fn new(file: StackFile) -> Result<Self, ModelError> {
        let contract =
            ModelContract::from_file(&file).map_err(|e| ModelError::BadModel(e.to_string()))?;
        if contract.qk_layout() != QkLayout::RotateHalf {
            return Err(ModelError::BadModel(format!(
                "{META_QK_LAYOUT} is {}: this forward pass applies rotate-half RoPE and needs Hugging Face (rotate-half) Q/K rows",
                contract.qk_layout().as_str()
            )));
        }
        Ok(Self {
            file: Arc::new(file),
            contract,
        })
    }

    /// The file's model contract.
    pub fn contract(&self) -> &ModelContract {
        &self.contract
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
        self.contract.config()
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
    /// The resident part holds other bytes than the model contract counts for it (a bug:
    /// budgets would buy a different prefix here than in other engines).
    #[error("resident tensors hold {held} bytes but the model contract counts {contract} bytes")]
    Accounting {
        /// [`ModelContract::held_resident_bytes`].
        contract: u64,
        /// [`LlamaResident::held_bytes`].
        held: u64,
    },
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
    /// The resizable weights. Its layout is the contract's [`ModelContract::held_layout`]:
    /// `resident_bytes` is what `resident` really holds.
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
    /// Sets the decode kernels: `params` for every weight's fused product, and for a q8
    /// tied head int16 activations, unless `params` ask for the exact f32 tables, which
    /// multiply the head's f32 inputs too (so the exact path is exact end to end).
    pub fn set_fused_params(&mut self, params: bitstack_core::kernels::FusedParams) {
        self.elastic.set_fused_params(params);
        self.resident.set_head_activations(
            if params.tables == bitstack_core::kernels::TablePrecision::F32 {
                HeadActivations::F32
            } else {
                HeadActivations::Int16
            },
        );
    }
    /// Opens `path` and loads the longest prefix fitting `budget` (the minimum model when
    /// `None`). A budget below the minimum is [`CoreError::BudgetBelowMinimum`].
    pub fn open(
        path: impl AsRef<std::path::Path>,
        budget: Option<MemoryBudget>,
    ) -> Result<Self, LoadError> {
        // The default resident precision (q8; see `EmbeddingPrecision`), as the CLI holds it.
        Self::open_with(path, budget, EmbeddingPrecision::default())
    }

    /// [`LoadedStack::open`] with the resident embedding (and an untied head) held at
    /// `resident` precision, e.g. [`EmbeddingPrecision::Q8`] (8.5 bits per value instead of
    /// 16) or [`EmbeddingPrecision::Q4`] (4.5 bits): the bytes held, and so the prefix a
    /// budget buys, follow it.
    pub fn open_with(
        path: impl AsRef<std::path::Path>,
        budget: Option<MemoryBudget>,
        resident: EmbeddingPrecision,
    ) -> Result<Self, LoadError> {
        let model = StackModel::open(path)?;
        let precision = resident;
        let resident = LlamaResident::from_source_with(&model, precision)?;
        let tokenizer = model.tokenizer()?;
        // The contract's accounting (what an engine holding the embedding at `precision`
        // holds; no tokenizer blob), so a budget picks the same prefix here as in any engine.
        let layout = model.contract().held_layout(model.file(), precision);
        if layout.resident_bytes != resident.held_bytes() {
            return Err(LoadError::Accounting {
                contract: layout.resident_bytes,
                held: resident.held_bytes(),
            });
        }
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
    fn invalid_configs_are_bad_config() {
        let c = LlamaConfig {
            arch: crate::gguf::Architecture::Llama,
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
        assert!(c.validate().is_ok());
        let odd = LlamaConfig {
            n_heads: 3,
            ..c.clone()
        };
        let e = ModelError::from(odd.validate().unwrap_err());
        assert_eq!(
            e.to_string(),
            "bad config.json: 3 heads are not a multiple of 2 KV heads"
        );
        // Unvalidated dimensions give absurd shapes rather than an overflow.
        let huge = LlamaConfig {
            n_heads: usize::MAX,
            ..c
        };
        assert_eq!(LinearKind::Q.shape(&huge), (usize::MAX, 16));
    }

    #[test]
    fn weight_indices_round_trip() {
        for i in 0..70 {
            let (l, k) = weight_of_index(i);
            assert_eq!(weight_index(l, k), i);
        }
    }
}
