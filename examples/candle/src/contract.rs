//! The stack-file contract as candle sees it: which Hugging Face tensor name each stack and
//! resident tensor gets, and the candle-transformers config of the file's model.
//!
//! Everything here comes from the published format crate's model contract
//! ([`bitstack_format::model`]): the typed config, the stack ↔ tensor mapping, the resident
//! roles and the Q/K row layout recorded in the file. Nothing of `bitstack_examples`'
//! conventions is used, so any engine can do what this module does with `bitstack-format`
//! alone.
//!
//! candle's Llama applies rotary embeddings in the Hugging Face rotate-half layout; a file
//! whose contract records interleaved (GGUF-order) Q/K rows is refused rather than run with
//! RoPE on the wrong pairs.

use crate::CandleError;
use bitstack_format::model::{
    stack_location, LinearKind, ModelConfig, ModelContract, QkLayout, ResidentRole,
};
use bitstack_format::StackFile;
use candle_transformers::models::llama as cl;

/// The Hugging Face name of the weight held by stack `index` of a stack file.
pub fn hf_weight_name(index: usize) -> String {
    let (layer, kind) = stack_location(index);
    kind.hf_tensor_name(layer)
}

/// `(name in the stack file, Hugging Face name)` of every resident tensor candle's Llama reads:
/// the contract's residents without biases (which candle's Llama has not; [`candle_config`]
/// refuses such models). A tied head has no tensor of its own: candle reuses the embedding.
pub fn hf_resident_names(config: &ModelConfig) -> Vec<(String, String)> {
    config
        .residents()
        .into_iter()
        .filter(|slot| !matches!(slot.role, ResidentRole::Bias { .. }))
        .map(|slot| (slot.role.tensor_name(), slot.role.hf_tensor_name()))
        .collect()
}

/// Weight stacks a stack file of model `c` holds (seven linears per layer).
pub fn weight_count(c: &ModelConfig) -> usize {
    c.n_layers * LinearKind::ALL.len()
}

/// The model contract of `file`, refused when candle's Llama would compute a different model
/// from it: Q/K rows in the interleaved layout (see the module docs).
pub fn model_contract(file: &StackFile) -> Result<ModelContract, CandleError> {
    let contract = ModelContract::from_file(file)?;
    if contract.qk_layout() != QkLayout::RotateHalf {
        return Err(CandleError::Unsupported(format!(
            "Q/K rows in the {} layout (candle's Llama rotates halves)",
            contract.qk_layout().as_str()
        )));
    }
    Ok(contract)
}

/// A resident tensor of `file` as `(shape, f32 values)`, or an error naming it when absent.
pub fn resident_f32(file: &StackFile, name: &str) -> Result<(Vec<usize>, Vec<f32>), CandleError> {
    let view = file
        .resident(name)
        .ok_or_else(|| CandleError::InvalidArgument {
            name: "stack file",
            reason: format!("resident tensor {name} is missing"),
        })?;
    let shape = view.shape().iter().map(|&d| d as usize).collect();
    Ok((shape, view.to_f32()?))
}

/// candle-transformers' config for `c`, or [`CandleError::Unsupported`] when its Llama cannot
/// express the model (attention biases, per-frequency RoPE factors, a head size other than
/// `hidden / n_heads`): running it anyway would compute a different model.
pub fn candle_config(c: &ModelConfig) -> Result<cl::Config, CandleError> {
    if c.attn_bias {
        return Err(CandleError::Unsupported(format!(
            "Q/K/V projection biases ({} model; candle's Llama has none)",
            c.arch
        )));
    }
    if c.rope_freq_factors.is_some() {
        return Err(CandleError::Unsupported(
            "per-frequency RoPE factors (candle's Llama takes only Llama 3 scaling parameters)"
                .into(),
        ));
    }
    if c.head_dim * c.n_heads != c.hidden {
        return Err(CandleError::Unsupported(format!(
            "head_dim {} x {} heads != hidden {} (candle's Llama derives head_dim = hidden / heads)",
            c.head_dim, c.n_heads, c.hidden
        )));
    }
    // Mistral files hold no sliding window below the context (the contract's promise) and a
    // Qwen2 without biases is the Llama computation, so the architecture itself is no obstacle.
    Ok(cl::Config {
        hidden_size: c.hidden,
        intermediate_size: c.ffn,
        vocab_size: c.vocab,
        num_hidden_layers: c.n_layers,
        num_attention_heads: c.n_heads,
        num_key_value_heads: c.n_kv_heads,
        use_flash_attn: false,
        rms_norm_eps: f64::from(c.rms_eps),
        rope_theta: c.rope_theta,
        bos_token_id: c.bos_id,
        eos_token_id: c.eos_id.map(cl::LlamaEosToks::Single),
        rope_scaling: None,
        max_position_embeddings: c.max_seq,
        tie_word_embeddings: c.tied_embeddings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitstack_format::model::Architecture;

    fn config() -> ModelConfig {
        ModelConfig {
            arch: Architecture::Llama,
            n_layers: 2,
            hidden: 16,
            ffn: 24,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 4,
            vocab: 30,
            rope_theta: 10_000.0,
            rope_freq_factors: None,
            rms_eps: 1e-5,
            tied_embeddings: true,
            attn_bias: false,
            max_seq: 128,
            bos_id: Some(1),
            eos_id: Some(2),
        }
    }

    #[test]
    fn stack_names_follow_the_seven_kinds_per_layer() {
        assert_eq!(hf_weight_name(0), "model.layers.0.self_attn.q_proj.weight");
        assert_eq!(hf_weight_name(3), "model.layers.0.self_attn.o_proj.weight");
        assert_eq!(hf_weight_name(7), "model.layers.1.self_attn.q_proj.weight");
        assert_eq!(hf_weight_name(13), "model.layers.1.mlp.down_proj.weight");
        assert_eq!(hf_weight_name(214), "model.layers.30.mlp.gate_proj.weight");
    }

    #[test]
    fn resident_names_cover_norms_and_an_untied_head() {
        let mut c = config();
        let tied = hf_resident_names(&c);
        assert_eq!(tied.len(), 2 + 2 * c.n_layers);
        assert!(!tied.iter().any(|(_, hf)| hf == "lm_head.weight"));
        c.tied_embeddings = false;
        let untied = hf_resident_names(&c);
        assert!(untied
            .iter()
            .any(|(ours, hf)| ours == "output.weight" && hf == "lm_head.weight"));
        assert!(untied
            .iter()
            .any(|(ours, hf)| ours == "blk.1.ffn_norm.weight"
                && hf == "model.layers.1.post_attention_layernorm.weight"));
    }

    #[test]
    fn config_maps_fields_and_rejects_what_candle_cannot_run() {
        let c = config();
        let cc = candle_config(&c).unwrap();
        assert_eq!(
            (
                cc.hidden_size,
                cc.intermediate_size,
                cc.num_key_value_heads,
                cc.max_position_embeddings
            ),
            (16, 24, 2, 128)
        );
        assert!(cc.tie_word_embeddings && !cc.use_flash_attn);
        let biased = ModelConfig {
            attn_bias: true,
            ..c.clone()
        };
        assert!(matches!(
            candle_config(&biased),
            Err(CandleError::Unsupported(_))
        ));
        let factors = ModelConfig {
            rope_freq_factors: Some(vec![1.0, 2.0]),
            ..c.clone()
        };
        assert!(matches!(
            candle_config(&factors),
            Err(CandleError::Unsupported(_))
        ));
        let wide_heads = ModelConfig { head_dim: 8, ..c };
        assert!(matches!(
            candle_config(&wide_heads),
            Err(CandleError::Unsupported(_))
        ));
    }
}
