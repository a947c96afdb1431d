//! The stack-file contract as candle sees it: which Hugging Face tensor name each stack and
//! resident tensor gets, and the candle-transformers config of the file's model.
//!
//! This is the only module that uses `bitstack_examples`' stack-model conventions (weight
//! `w` is linear kind `w % 7` of layer `w / 7`; canonical GGUF-style resident names; the
//! config JSON), so switching to the format crate's copy of the contract is a change here only.
//!
//! Q and K rows in a stack file are already in the Hugging Face rotate-half layout (compress
//! un-permutes GGUF's interleaved rows), which is what candle's Llama expects: no permutation
//! happens here.

use crate::CandleError;
use bitstack_examples::gguf::{LlamaConfig, ModelError};
use bitstack_examples::llama::LinearKind;
use bitstack_examples::stackmodel::{weight_of_index, StackModel};
use candle_transformers::models::llama as cl;

pub use bitstack_examples::gguf::ModelSource;

/// The Hugging Face name of the weight held by stack `index` of a Llama stack file.
pub fn hf_weight_name(index: usize) -> String {
    let (layer, kind) = weight_of_index(index);
    let proj = match kind {
        LinearKind::Q => "self_attn.q_proj",
        LinearKind::K => "self_attn.k_proj",
        LinearKind::V => "self_attn.v_proj",
        LinearKind::O => "self_attn.o_proj",
        LinearKind::Gate => "mlp.gate_proj",
        LinearKind::Up => "mlp.up_proj",
        LinearKind::Down => "mlp.down_proj",
    };
    format!("model.layers.{layer}.{proj}.weight")
}

/// `(name in the stack file, Hugging Face name)` of every resident tensor candle's Llama reads.
/// A tied head has no tensor of its own: candle reuses the embedding.
pub fn hf_resident_names(config: &LlamaConfig) -> Vec<(String, String)> {
    let mut names = vec![
        (
            "token_embd.weight".to_owned(),
            "model.embed_tokens.weight".to_owned(),
        ),
        (
            "output_norm.weight".to_owned(),
            "model.norm.weight".to_owned(),
        ),
    ];
    if !config.tied_embeddings {
        names.push(("output.weight".to_owned(), "lm_head.weight".to_owned()));
    }
    for l in 0..config.n_layers {
        names.push((
            format!("blk.{l}.attn_norm.weight"),
            format!("model.layers.{l}.input_layernorm.weight"),
        ));
        names.push((
            format!("blk.{l}.ffn_norm.weight"),
            format!("model.layers.{l}.post_attention_layernorm.weight"),
        ));
    }
    names
}

/// Weight stacks a stack file of model `c` holds (seven linears per layer).
pub fn weight_count(c: &LlamaConfig) -> usize {
    c.n_layers * LinearKind::ALL.len()
}

/// The model config stored in a stack file.
pub fn model_config(model: &StackModel) -> &LlamaConfig {
    model.config()
}

/// A resident tensor of the stack file as `(shape, f32 values)`.
pub fn resident_f32(model: &StackModel, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
    model.tensor_f32(name)
}

/// candle-transformers' config for `c`, or [`CandleError::Unsupported`] when its Llama cannot
/// express the model (attention biases, per-frequency RoPE factors, a head size other than
/// `hidden / n_heads`): running it anyway would compute a different model.
pub fn candle_config(c: &LlamaConfig) -> Result<cl::Config, CandleError> {
    if c.attn_bias {
        return Err(CandleError::Unsupported(
            "Q/K/V projection biases (candle's Llama has none)".into(),
        ));
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

    fn config() -> LlamaConfig {
        LlamaConfig {
            arch: "llama".into(),
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
        let biased = LlamaConfig {
            attn_bias: true,
            ..c.clone()
        };
        assert!(matches!(
            candle_config(&biased),
            Err(CandleError::Unsupported(_))
        ));
        let factors = LlamaConfig {
            rope_freq_factors: Some(vec![1.0, 2.0]),
            ..c.clone()
        };
        assert!(matches!(
            candle_config(&factors),
            Err(CandleError::Unsupported(_))
        ));
        let wide_heads = LlamaConfig { head_dim: 8, ..c };
        assert!(matches!(
            candle_config(&wide_heads),
            Err(CandleError::Unsupported(_))
        ));
    }
}
