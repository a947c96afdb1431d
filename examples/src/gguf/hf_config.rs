//! Hugging Face `config.json` → [`LlamaConfig`], for the configs transformers 4 and 5 write.
//!
//! # The two generations
//!
//! transformers 4 keeps the RoPE base at the top level (`"rope_theta"`) and any scaling in
//! `"rope_scaling": {"rope_type" | "type": …, "factor": …}`. transformers 5 writes both inside
//! `"rope_parameters": {"rope_theta": …, "rope_type": …, …}` and no longer writes `rope_theta` at
//! the top level; it also renamed `torch_dtype` to `dtype`. Both are read here, with
//! transformers 5's own precedence (`rope_scaling`, when non-empty, stands for
//! `rope_parameters`; a `rope_theta` inside the RoPE dict wins over a top-level one) except that
//! two sources that *disagree* are an error rather than a silent pick.
//!
//! # No silent defaults for the forward pass
//!
//! - A key whose value would change the forward pass in a way this crate does not implement is a
//!   [`ModelError::UnsupportedKey`] naming the key: a `rope_type` other than `default`, `linear`
//!   or `llama3` (`dynamic`, `yarn`, `longrope`, …), a `partial_rotary_factor` other than 1,
//!   sliding-window attention (Mistral's `sliding_window` below `max_position_embeddings`,
//!   Qwen2's `use_sliding_window` / `layer_types`), a `hidden_act` other than SiLU, Llama's
//!   `attention_bias` (which also puts a bias on `o_proj`) or `mlp_bias`, a
//!   `quantization_config`, and `tie_word_embeddings: false` with no `lm_head.weight`.
//! - A key that is missing but has a well-defined default in transformers' own config class
//!   (`LlamaConfig`, `MistralConfig`, `Qwen2Config` of transformers 5) is taken with that default,
//!   and one line naming the key and the value is logged to stderr. Sizes (`hidden_size`,
//!   `num_hidden_layers`, …) are required: transformers' defaults for them describe a 7B model
//!   and could only fail against the tensors.
//! - Keys that do not change the math are ignored: `pretraining_tp` (a tensor-parallel slicing
//!   of the same products), `attention_dropout`, `initializer_range`, `use_cache`, ….

use serde_json::{Map, Value};

use super::source::{LlamaConfig, ModelError};

/// The defaults of one transformers config class (transformers 5.x).
struct ClassDefaults {
    class: &'static str,
    max_position_embeddings: usize,
    /// `None`: `num_key_value_heads` defaults to `num_attention_heads`.
    num_key_value_heads: Option<usize>,
}

fn class_defaults(model_type: &str) -> Option<ClassDefaults> {
    Some(match model_type {
        "llama" => ClassDefaults {
            class: "LlamaConfig",
            max_position_embeddings: 2048,
            num_key_value_heads: None,
        },
        "mistral" => ClassDefaults {
            class: "MistralConfig",
            max_position_embeddings: 4096 * 32,
            num_key_value_heads: Some(8),
        },
        "qwen2" => ClassDefaults {
            class: "Qwen2Config",
            max_position_embeddings: 32768,
            num_key_value_heads: Some(32),
        },
        _ => return None,
    })
}

/// The RoPE base of every one of these classes (`RotaryEmbeddingConfigMixin.default_theta`).
const DEFAULT_THETA: f32 = 10_000.0;
/// `rms_norm_eps` of every one of these classes.
const DEFAULT_RMS_EPS: f32 = 1e-6;
/// Mistral's and Qwen2's `sliding_window` default.
const DEFAULT_SLIDING_WINDOW: u64 = 4096;
/// Qwen2's `max_window_layers` default.
const DEFAULT_MAX_WINDOW_LAYERS: u64 = 28;

/// Reads `config.json` values, recording the defaults it takes.
struct Reader<'a> {
    json: &'a Map<String, Value>,
    file: &'a str,
    class: &'static str,
    notes: Vec<String>,
}

fn show(v: &Value) -> String {
    v.to_string()
}

impl<'a> Reader<'a> {
    /// A present, non-null top-level value.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    /// A present, non-empty object value (`None` when absent, null or `{}`).
    fn dict(&self, key: &str) -> Result<Option<&'a Map<String, Value>>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(o)) if o.is_empty() => Ok(None),
            Some(Value::Object(o)) => Ok(Some(o)),
            Some(_) => Err(self.bad(key, "is not an object")),
        }
    }

    fn bad(&self, key: &str, what: &str) -> ModelError {
        ModelError::BadConfig(format!("{}: {key} {what}", self.file))
    }

    fn unsupported(&self, key: &str, value: &Value, reason: &str) -> ModelError {
        ModelError::UnsupportedKey {
            file: self.file.to_owned(),
            key: key.to_owned(),
            value: show(value),
            reason: reason.to_owned(),
        }
    }

    fn note(&mut self, key: &str, value: impl std::fmt::Display) {
        self.notes.push(format!(
            "{}: {key} missing; using {}'s default {value}",
            self.file, self.class
        ));
    }

    fn as_usize(&self, key: &str, v: &Value) -> Result<usize, ModelError> {
        v.as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| self.bad(key, &format!("= {} is not a non-negative integer", show(v))))
    }

    fn as_f32(&self, key: &str, v: &Value) -> Result<f32, ModelError> {
        v.as_f64()
            .map(|v| v as f32)
            .filter(|v| v.is_finite())
            .ok_or_else(|| self.bad(key, &format!("= {} is not a finite number", show(v))))
    }

    fn as_bool(&self, key: &str, v: &Value) -> Result<bool, ModelError> {
        v.as_bool()
            .ok_or_else(|| self.bad(key, &format!("= {} is not true or false", show(v))))
    }

    fn required(&self, key: &str) -> Result<usize, ModelError> {
        match self.get(key) {
            Some(v) => self.as_usize(key, v),
            None => Err(self.bad(key, "is missing")),
        }
    }

    fn usize_or(&mut self, key: &str, default: usize) -> Result<usize, ModelError> {
        match self.get(key) {
            Some(v) => self.as_usize(key, v),
            None => {
                self.note(key, default);
                Ok(default)
            }
        }
    }

    fn f32_or(&mut self, key: &str, default: f32) -> Result<f32, ModelError> {
        match self.get(key) {
            Some(v) => self.as_f32(key, v),
            None => {
                self.note(key, default);
                Ok(default)
            }
        }
    }

    fn bool_or(&mut self, key: &str, default: bool) -> Result<bool, ModelError> {
        match self.get(key) {
            Some(v) => self.as_bool(key, v),
            None => {
                self.note(key, default);
                Ok(default)
            }
        }
    }
}

/// Builds a [`LlamaConfig`] from a Hugging Face `config.json` (either transformers generation),
/// logging each default it takes to stderr (one line each).
///
/// `has_lm_head` says whether the safetensors files hold `lm_head.weight`.
pub fn hf_config(json: &Value, has_lm_head: bool) -> Result<LlamaConfig, ModelError> {
    let (config, notes) = read_hf_config(json, has_lm_head, "config.json")?;
    for n in notes {
        crate::noteln!("{n}");
    }
    Ok(config)
}

/// [`hf_config`] without the logging: the config and the lines it would log. `file` names the
/// file in errors and in those lines.
pub(crate) fn read_hf_config(
    json: &Value,
    has_lm_head: bool,
    file: &str,
) -> Result<(LlamaConfig, Vec<String>), ModelError> {
    let obj = json
        .as_object()
        .ok_or_else(|| ModelError::BadConfig(format!("{file}: not a JSON object")))?;
    let arch = obj
        .get("model_type")
        .and_then(|v| v.as_str())
        .ok_or_else(|| ModelError::BadConfig(format!("{file}: model_type missing")))?
        .to_owned();
    let Some(defaults) = class_defaults(&arch) else {
        return Err(ModelError::UnsupportedKey {
            file: file.to_owned(),
            key: "model_type".into(),
            value: format!("{arch:?}"),
            reason: "supported: llama, mistral, qwen2".into(),
        });
    };
    let mut r = Reader {
        json: obj,
        file,
        class: defaults.class,
        notes: Vec::new(),
    };

    if let Some(q) = r.get("quantization_config") {
        let method = q.get("quant_method").unwrap_or(q);
        return Err(r.unsupported(
            "quantization_config",
            method,
            "quantized checkpoints are not read; use the unquantized weights",
        ));
    }
    for key in ["dtype", "torch_dtype"] {
        if let Some(v) = r.get(key) {
            if !matches!(v.as_str(), Some("float32" | "float16" | "bfloat16")) {
                return Err(r.unsupported(key, v, "supported: float32, float16, bfloat16"));
            }
        }
    }
    match r.get("hidden_act") {
        None => r.note("hidden_act", "\"silu\""),
        Some(v) if matches!(v.as_str(), Some("silu" | "swish")) => {}
        Some(v) => {
            return Err(r.unsupported(
                "hidden_act",
                v,
                "the MLP is down(silu(gate(x)) * up(x)); only silu is implemented",
            ))
        }
    }

    let hidden = r.required("hidden_size")?;
    let n_heads = r.required("num_attention_heads")?;
    let n_layers = r.required("num_hidden_layers")?;
    let ffn = r.required("intermediate_size")?;
    let vocab = r.required("vocab_size")?;
    let n_kv_heads = match defaults.num_key_value_heads {
        Some(d) if !r.json.contains_key("num_key_value_heads") => {
            r.note("num_key_value_heads", d);
            d
        }
        _ => match r.get("num_key_value_heads") {
            Some(v) => r.as_usize("num_key_value_heads", v)?,
            None => {
                r.note(
                    "num_key_value_heads",
                    format!("num_attention_heads = {n_heads}"),
                );
                n_heads
            }
        },
    };
    let head_dim = match r.get("head_dim") {
        Some(v) => r.as_usize("head_dim", v)?,
        None => {
            let d = hidden / n_heads.max(1);
            r.note(
                "head_dim",
                format!("hidden_size / num_attention_heads = {d}"),
            );
            d
        }
    };
    let max_seq = r.usize_or("max_position_embeddings", defaults.max_position_embeddings)?;
    let rms_eps = r.f32_or("rms_norm_eps", DEFAULT_RMS_EPS)?;

    let attn_bias = match arch.as_str() {
        // Qwen2Attention: q/k/v always have biases, o_proj never; no config key.
        "qwen2" => true,
        // MistralAttention: no biases whatever the config says.
        "mistral" => false,
        _ => {
            if r.bool_or("attention_bias", false)? {
                let v = Value::Bool(true);
                return Err(r.unsupported(
                    "attention_bias",
                    &v,
                    "Llama's attention_bias also puts a bias on o_proj, which is not implemented",
                ));
            }
            if r.bool_or("mlp_bias", false)? {
                return Err(r.unsupported(
                    "mlp_bias",
                    &Value::Bool(true),
                    "MLP biases are not implemented",
                ));
            }
            false
        }
    };
    sliding_window(&mut r, &arch, n_layers, max_seq)?;
    let (rope_theta, rope_freq_factors) = rope(&mut r, head_dim, max_seq)?;

    let tie = r.bool_or("tie_word_embeddings", false)?;
    if !tie && !has_lm_head {
        return Err(r.unsupported(
            "tie_word_embeddings",
            &Value::Bool(false),
            "the output head is untied but no safetensors file holds lm_head.weight",
        ));
    }

    let id = |k: &str| -> Option<u32> {
        let v = r.get(k)?;
        let v = v.as_array().and_then(|a| a.first()).unwrap_or(v);
        v.as_u64().and_then(|v| u32::try_from(v).ok())
    };
    let config = LlamaConfig {
        n_layers,
        hidden,
        ffn,
        n_heads,
        n_kv_heads,
        head_dim,
        vocab,
        rope_theta,
        rope_freq_factors,
        rms_eps,
        tied_embeddings: tie,
        attn_bias,
        max_seq,
        bos_id: id("bos_token_id"),
        eos_id: id("eos_token_id"),
        // One of the contract's names: `class_defaults` knows no others.
        arch: arch.parse()?,
    };
    config.validate()?;
    Ok((config, r.notes))
}

/// Rejects sliding-window attention, which the forward pass does not implement.
fn sliding_window(
    r: &mut Reader<'_>,
    arch: &str,
    n_layers: usize,
    max_seq: usize,
) -> Result<(), ModelError> {
    let window = |r: &mut Reader<'_>| -> Result<Option<u64>, ModelError> {
        match r.json.get("sliding_window") {
            // An explicit null disables the window.
            Some(Value::Null) => Ok(None),
            Some(v) => Ok(Some(r.as_usize("sliding_window", v)? as u64)),
            None => {
                r.note("sliding_window", DEFAULT_SLIDING_WINDOW);
                Ok(Some(DEFAULT_SLIDING_WINDOW))
            }
        }
    };
    match arch {
        "mistral" => {
            if let Some(w) = window(r)? {
                if w < max_seq as u64 {
                    return Err(r.unsupported(
                        "sliding_window",
                        &Value::from(w),
                        &format!(
                            "sliding-window attention (window below max_position_embeddings = \
                             {max_seq}) is not implemented"
                        ),
                    ));
                }
            }
        }
        "qwen2" => {
            // Qwen2Config.__post_init__: the window only exists with use_sliding_window, and
            // then covers the layers from max_window_layers on, unless layer_types says otherwise.
            if let Some(types) = r.get("layer_types") {
                let list = types
                    .as_array()
                    .ok_or_else(|| r.bad("layer_types", "is not a list"))?;
                if let Some(t) = list.iter().find(|t| t.as_str() != Some("full_attention")) {
                    return Err(r.unsupported(
                        "layer_types",
                        t,
                        "only full_attention layers are implemented",
                    ));
                }
            } else if r.bool_or("use_sliding_window", false)? {
                let first = match r.get("max_window_layers") {
                    Some(v) => r.as_usize("max_window_layers", v)? as u64,
                    None => {
                        r.note("max_window_layers", DEFAULT_MAX_WINDOW_LAYERS);
                        DEFAULT_MAX_WINDOW_LAYERS
                    }
                };
                if let Some(w) = window(r)? {
                    if first < n_layers as u64 && w < max_seq as u64 {
                        return Err(r.unsupported(
                            "use_sliding_window",
                            &Value::Bool(true),
                            &format!(
                                "sliding-window attention ({w} tokens from layer {first} on) is \
                                 not implemented"
                            ),
                        ));
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// The RoPE base and per-frequency divisors from `rope_parameters` / `rope_scaling` /
/// `rope_theta`.
fn rope(
    r: &mut Reader<'_>,
    head_dim: usize,
    max_seq: usize,
) -> Result<(f32, Option<Vec<f32>>), ModelError> {
    let params = r.dict("rope_parameters")?;
    let legacy = r.dict("rope_scaling")?;
    let type_of = |o: &Map<String, Value>| {
        o.get("rope_type")
            .or_else(|| o.get("type"))
            .filter(|v| !v.is_null())
            .cloned()
    };
    // transformers 5: `rope_scaling or rope_parameters`; refuse when both say different things.
    let (name, rp) = match (legacy, params) {
        (Some(l), Some(p)) => {
            for (k, v) in l {
                let k = if k == "type" { "rope_type" } else { k.as_str() };
                let pv = if k == "rope_type" {
                    type_of(p)
                } else {
                    p.get(k).cloned()
                };
                if pv.as_ref().is_some_and(|pv| pv != v) {
                    return Err(r.unsupported(
                        &format!("rope_scaling.{k}"),
                        v,
                        &format!(
                            "disagrees with rope_parameters.{k} = {}",
                            show(pv.as_ref().unwrap_or(&Value::Null))
                        ),
                    ));
                }
            }
            ("rope_scaling", Some(l))
        }
        (Some(l), None) => ("rope_scaling", Some(l)),
        (None, Some(p)) => ("rope_parameters", Some(p)),
        (None, None) => ("rope_parameters", None),
    };
    if let Some(p) = rp {
        // transformers 5 may nest the dict by layer type; these models have one RoPE.
        if let Some((k, _)) = p.iter().find(|(_, v)| v.is_object()) {
            return Err(r.unsupported(
                &format!("{name}.{k}"),
                &p[k],
                "per-layer-type RoPE parameters are not implemented",
            ));
        }
    }
    let inner = |k: &str| rp.and_then(|p| p.get(k)).filter(|v| !v.is_null());

    // The base: inside the dict, else top level, else the default; disagreement is an error.
    let inner_theta = inner("rope_theta")
        .map(|v| r.as_f32(&format!("{name}.rope_theta"), v))
        .transpose()?;
    let top_theta = r
        .get("rope_theta")
        .map(|v| r.as_f32("rope_theta", v))
        .transpose()?;
    let theta = match (inner_theta, top_theta) {
        (Some(a), Some(b)) if a != b => {
            return Err(r.unsupported(
                "rope_theta",
                &Value::from(b),
                &format!("disagrees with {name}.rope_theta = {a}"),
            ))
        }
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => {
            r.note("rope_theta", DEFAULT_THETA);
            DEFAULT_THETA
        }
    };

    for (key, v) in [
        (
            format!("{name}.partial_rotary_factor"),
            inner("partial_rotary_factor"),
        ),
        (
            "partial_rotary_factor".to_owned(),
            r.get("partial_rotary_factor"),
        ),
    ] {
        if let Some(v) = v {
            if r.as_f32(&key, v)? != 1.0 {
                return Err(r.unsupported(
                    &key,
                    v,
                    "partial rotary embeddings are not implemented",
                ));
            }
        }
    }

    let Some(p) = rp else {
        return Ok((theta, None));
    };
    let ty_value = type_of(p);
    let ty = match &ty_value {
        None => {
            r.notes.push(format!(
                "{}: {name}.rope_type missing; using {}'s default \"default\"",
                r.file, r.class
            ));
            "default".to_owned()
        }
        Some(v) => v
            .as_str()
            .ok_or_else(|| r.bad(&format!("{name}.rope_type"), "is not a string"))?
            .to_owned(),
    };
    let num = |r: &Reader<'_>, k: &str| -> Result<f32, ModelError> {
        let key = format!("{name}.{k}");
        match inner(k) {
            Some(v) => r.as_f32(&key, v),
            None => Err(r.bad(&key, &format!("is missing (required by rope_type {ty:?})"))),
        }
    };
    let factors = match ty.as_str() {
        "default" => None,
        "linear" => {
            let f = num(r, "factor")?;
            if f <= 0.0 {
                return Err(r.bad(&format!("{name}.factor"), "must be positive"));
            }
            Some(vec![f; head_dim / 2])
        }
        "llama3" => {
            let factor = num(r, "factor")?;
            let low = num(r, "low_freq_factor")?;
            let high = num(r, "high_freq_factor")?;
            // standardize_rope_params: a top-level original_max_position_embeddings wins, else
            // the dict's, else max_position_embeddings.
            let top = r.get("original_max_position_embeddings");
            let orig = match (inner("original_max_position_embeddings"), top) {
                (Some(a), Some(b)) if a != b => {
                    return Err(r.unsupported(
                        "original_max_position_embeddings",
                        b,
                        &format!(
                            "disagrees with {name}.original_max_position_embeddings = {}",
                            show(a)
                        ),
                    ))
                }
                (Some(v), _) => r.as_f32(&format!("{name}.original_max_position_embeddings"), v)?,
                (None, Some(v)) => r.as_f32("original_max_position_embeddings", v)?,
                (None, None) => {
                    r.notes.push(format!(
                        "{}: {name}.original_max_position_embeddings missing; using {}'s \
                         default max_position_embeddings = {max_seq}",
                        r.file, r.class
                    ));
                    max_seq as f32
                }
            };
            if !(factor > 0.0 && low > 0.0 && high > low && orig > 0.0) {
                return Err(r.bad(
                    name,
                    &format!(
                        "llama3 needs factor > 0, 0 < low_freq_factor < high_freq_factor and \
                         original_max_position_embeddings > 0 (got {factor}, {low}, {high}, {orig})"
                    ),
                ));
            }
            Some(llama3_freq_factors(
                head_dim, theta, factor, low, high, orig,
            ))
        }
        _ => {
            return Err(r.unsupported(
                &format!("{name}.rope_type"),
                ty_value.as_ref().unwrap_or(&Value::Null),
                "supported: default, linear, llama3",
            ))
        }
    };
    Ok((theta, factors))
}

/// Llama-3.1-style RoPE scaling turned into per-frequency divisors (see
/// [`LlamaConfig::rope_freq_factors`]), following transformers' `_compute_llama3_parameters`
/// (frequencies with a wavelength below `orig_ctx / high` are kept, above `orig_ctx / low`
/// divided by `factor`, and smoothly interpolated in between).
pub(crate) fn llama3_freq_factors(
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
            let wavelen = 2.0 * std::f32::consts::PI / inv;
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::gguf::Architecture;

    /// `config.json` exactly as transformers 5.24.0 `save_pretrained` writes it for SmolLM2-135M
    /// loaded from the shared GGUF (scripts/hf_save.py).
    const SMOLLM2_TF5: &str = r#"{
      "_model_name_or_path": "Smollm2 135M 8k Lc100K Mix1 Ep2",
      "architectures": ["LlamaForCausalLM"],
      "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 1, "dtype": "float32",
      "eos_token_id": 2, "head_dim": 64, "hidden_act": "silu", "hidden_size": 576,
      "initializer_range": 0.02, "intermediate_size": 1536, "max_position_embeddings": 8192,
      "mlp_bias": false, "model_type": "llama", "num_attention_heads": 9,
      "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2,
      "pretraining_tp": 1, "rms_norm_eps": 9.999999747378752e-06,
      "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
      "tie_word_embeddings": true, "transformers_version": "5.24.0", "unk_token_id": 0,
      "use_cache": true, "vocab_size": 49152
    }"#;

    fn smollm2() -> LlamaConfig {
        LlamaConfig {
            arch: Architecture::Llama,
            n_layers: 30,
            hidden: 576,
            ffn: 1536,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            vocab: 49152,
            rope_theta: 100_000.0,
            rope_freq_factors: None,
            rms_eps: 1e-5,
            tied_embeddings: true,
            attn_bias: false,
            max_seq: 8192,
            bos_id: Some(1),
            eos_id: Some(2),
        }
    }

    fn read(j: &Value, lm_head: bool) -> Result<(LlamaConfig, Vec<String>), ModelError> {
        read_hf_config(j, lm_head, "config.json")
    }

    fn tf5() -> Value {
        serde_json::from_str(SMOLLM2_TF5).unwrap()
    }

    /// The transformers 4 form of the same model.
    fn tf4() -> Value {
        let mut j = tf5();
        let o = j.as_object_mut().unwrap();
        o.remove("rope_parameters");
        o.remove("dtype");
        o.insert("rope_theta".into(), json!(100000.0));
        o.insert("rope_scaling".into(), Value::Null);
        o.insert("torch_dtype".into(), json!("bfloat16"));
        j
    }

    /// The key an [`ModelError::UnsupportedKey`] names (panics on any other outcome).
    fn key_of(r: Result<(LlamaConfig, Vec<String>), ModelError>) -> String {
        match r {
            Err(ModelError::UnsupportedKey { key, .. }) => key,
            other => panic!("expected UnsupportedKey, got {other:?}"),
        }
    }

    #[test]
    fn both_generations_of_smollm2_map_to_the_same_config() {
        let (c5, notes5) = read(&tf5(), false).unwrap();
        assert_eq!(c5, smollm2());
        assert!(notes5.is_empty(), "{notes5:?}");
        let (c4, notes4) = read(&tf4(), false).unwrap();
        assert_eq!(c4, smollm2());
        assert!(notes4.is_empty(), "{notes4:?}");
        // The 25.37-vs-21.20 bug: without the rope_parameters reading, theta was 10,000.
        assert_ne!(c5.rope_theta, DEFAULT_THETA);
    }

    #[test]
    fn missing_keys_take_transformers_defaults_and_say_so() {
        let mut j = tf5();
        let o = j.as_object_mut().unwrap();
        for k in [
            "rope_parameters",
            "rms_norm_eps",
            "max_position_embeddings",
            "head_dim",
            "hidden_act",
        ] {
            o.remove(k);
        }
        let (c, notes) = read(&j, false).unwrap();
        let mut want = smollm2();
        want.rope_theta = 10_000.0;
        want.rms_eps = 1e-6;
        want.max_seq = 2048;
        assert_eq!(c, want);
        assert_eq!(notes.len(), 5, "{notes:?}");
        for (key, value) in [
            ("rope_theta", "10000"),
            ("rms_norm_eps", "0.000001"),
            ("max_position_embeddings", "2048"),
            ("head_dim", "= 64"),
            ("hidden_act", "\"silu\""),
        ] {
            assert!(
                notes.iter().any(|n| n.contains(&format!("{key} missing"))
                    && n.contains(value)
                    && n.contains("LlamaConfig")),
                "no note for {key} = {value} in {notes:?}"
            );
        }
        // Mistral's class defaults differ: 8 KV heads, 131072 positions.
        let mut m = tf5();
        let o = m.as_object_mut().unwrap();
        o.insert("model_type".into(), json!("mistral"));
        o.insert("num_attention_heads".into(), json!(16));
        o.insert("head_dim".into(), json!(36));
        o.insert("sliding_window".into(), Value::Null);
        o.remove("num_key_value_heads");
        o.remove("max_position_embeddings");
        let (c, notes) = read(&m, false).unwrap();
        assert_eq!((c.n_kv_heads, c.max_seq), (8, 131072));
        assert!(notes.iter().any(|n| n.contains("MistralConfig")));
    }

    #[test]
    fn llama3_scaling_matches_transformers_in_both_generations() {
        // Factors = default inv_freq / transformers 5.24 `_compute_llama3_parameters` inv_freq
        // for head_dim 16, theta 500000, factor 8, low 1, high 4, original 256 (all three
        // regimes: kept, smoothed, divided).
        let want = [1.0, 1.0, 3.568_533_7, 8.0, 8.0, 8.0, 8.0, 8.0];
        let rp = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256});
        let base = json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 4, "head_dim": 16,
            "vocab_size": 10, "max_position_embeddings": 1024, "tie_word_embeddings": true});
        let mut v5 = base.clone();
        v5["rope_parameters"] = rp.clone();
        let mut v4 = base.clone();
        v4["rope_theta"] = json!(500000.0);
        let mut scaling = rp.clone();
        scaling.as_object_mut().unwrap().remove("rope_theta");
        v4["rope_scaling"] = scaling;
        for j in [v5, v4] {
            let (c, _) = read(&j, false).unwrap();
            assert_eq!(c.rope_theta, 500_000.0);
            let got = c.rope_freq_factors.unwrap();
            assert_eq!(got.len(), 8);
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-5 * w, "{got:?} vs {want:?}");
            }
        }
        // original_max_position_embeddings missing: max_position_embeddings, logged.
        let mut j = base.clone();
        let mut p = rp.clone();
        p.as_object_mut()
            .unwrap()
            .remove("original_max_position_embeddings");
        j["rope_parameters"] = p;
        let (c, notes) = read(&j, false).unwrap();
        assert_eq!(
            c.rope_freq_factors.unwrap(),
            llama3_freq_factors(16, 500_000.0, 8.0, 1.0, 4.0, 1024.0)
        );
        assert!(notes
            .iter()
            .any(|n| n.contains("original_max_position_embeddings missing")));
        // low >= high would divide by zero.
        let mut j = base;
        let mut p = rp;
        p["high_freq_factor"] = json!(1.0);
        j["rope_parameters"] = p;
        assert!(matches!(read(&j, false), Err(ModelError::BadConfig(_))));
    }

    #[test]
    fn linear_scaling_in_both_generations() {
        let mut v5 = tf5();
        v5["rope_parameters"] =
            json!({"rope_type": "linear", "rope_theta": 100000.0, "factor": 4.0});
        let mut v4 = tf4();
        v4["rope_scaling"] = json!({"type": "linear", "factor": 4.0});
        for j in [v5, v4] {
            let (c, _) = read(&j, false).unwrap();
            assert_eq!(c.rope_theta, 100_000.0);
            assert_eq!(c.rope_freq_factors, Some(vec![4.0; 32]));
        }
        let mut j = tf5();
        j["rope_parameters"] = json!({"rope_type": "linear", "rope_theta": 100000.0});
        let e = read(&j, false).unwrap_err();
        assert!(e.to_string().contains("rope_parameters.factor"), "{e}");
    }

    #[test]
    fn qwen2_biases_and_tied_flags() {
        let j = json!({"model_type": "qwen2", "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "vocab_size": 10, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
            "use_sliding_window": false, "sliding_window": null, "max_window_layers": 2,
            "layer_types": ["full_attention", "full_attention"], "tie_word_embeddings": true,
            "attention_bias": false, "dtype": "bfloat16", "hidden_act": "silu"});
        let (c, notes) = read(&j, false).unwrap();
        // Qwen2Config has no head_dim; the model derives it.
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("head_dim missing") && notes[0].contains("= 4"));
        assert_eq!(c.rope_theta, 1_000_000.0);
        assert!(c.attn_bias, "Qwen2 always has q/k/v biases");
        assert!(c.tied_embeddings);
        // Untied with the head present.
        let mut u = j.clone();
        u["tie_word_embeddings"] = json!(false);
        assert!(!read(&u, true).unwrap().0.tied_embeddings);
        // Tied wins over a present lm_head (transformers ties it to the embedding).
        assert!(read(&j, true).unwrap().0.tied_embeddings);
        // Untied with no head: transformers would initialise one randomly.
        assert_eq!(key_of(read(&u, false)), "tie_word_embeddings");
        // Qwen2's window: use_sliding_window, or sliding layer_types.
        let mut s = j.clone();
        s.as_object_mut().unwrap().remove("layer_types");
        s["use_sliding_window"] = json!(true);
        s["sliding_window"] = json!(4096);
        s["max_window_layers"] = json!(1);
        assert_eq!(key_of(read(&s, false)), "use_sliding_window");
        // ... but not when no layer reaches max_window_layers.
        s["max_window_layers"] = json!(2);
        assert!(read(&s, false).is_ok());
        let mut t = j;
        t["layer_types"] = json!(["full_attention", "sliding_attention"]);
        assert_eq!(key_of(read(&t, false)), "layer_types");
    }

    #[test]
    fn mistral_sliding_window() {
        let j = json!({"model_type": "mistral", "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 4, "vocab_size": 10, "max_position_embeddings": 32768,
            "rope_theta": 1000000.0, "sliding_window": null, "attention_bias": true});
        let (c, _) = read(&j, true).unwrap();
        assert!(
            !c.attn_bias,
            "MistralAttention has no biases whatever the key says"
        );
        let mut w = j.clone();
        w["sliding_window"] = json!(4096);
        let e = read(&w, true).unwrap_err();
        assert!(e.to_string().contains("sliding_window = 4096"), "{e}");
        // Missing: MistralConfig's default 4096, which is a window.
        let mut m = j.clone();
        m.as_object_mut().unwrap().remove("sliding_window");
        assert_eq!(key_of(read(&m, true)), "sliding_window");
        // A window as long as the context changes nothing.
        let mut l = j;
        l["sliding_window"] = json!(32768);
        assert!(read(&l, true).is_ok());
    }

    #[test]
    fn math_changing_values_name_their_key() {
        type Edit = fn(&mut Value);
        let cases: [(&str, Edit); 14] = [
            ("rope_parameters.rope_type", |j| {
                j["rope_parameters"] = json!({"rope_type": "yarn", "rope_theta": 1e5,
                    "factor": 4.0, "original_max_position_embeddings": 2048});
            }),
            ("rope_scaling.rope_type", |j| {
                j["rope_scaling"] = json!({"type": "dynamic", "factor": 2.0});
            }),
            ("rope_parameters.partial_rotary_factor", |j| {
                j["rope_parameters"]["partial_rotary_factor"] = json!(0.5);
            }),
            ("partial_rotary_factor", |j| {
                j["partial_rotary_factor"] = json!(0.25)
            }),
            ("rope_parameters.full_attention", |j| {
                j["rope_parameters"] = json!({"full_attention": {"rope_type": "default"}});
            }),
            ("rope_theta", |j| j["rope_theta"] = json!(10000.0)),
            ("rope_scaling.rope_type", |j| {
                j["rope_scaling"] = json!({"rope_type": "linear", "factor": 2.0});
            }),
            ("hidden_act", |j| j["hidden_act"] = json!("gelu")),
            ("attention_bias", |j| j["attention_bias"] = json!(true)),
            ("mlp_bias", |j| j["mlp_bias"] = json!(true)),
            ("model_type", |j| j["model_type"] = json!("gemma")),
            ("quantization_config", |j| {
                j["quantization_config"] = json!({"quant_method": "gptq", "bits": 4});
            }),
            ("dtype", |j| j["dtype"] = json!("float8_e4m3fn")),
            ("tie_word_embeddings", |j| {
                j["tie_word_embeddings"] = json!(false)
            }),
        ];
        for (want, edit) in cases {
            let mut j = tf5();
            edit(&mut j);
            let r = read(&j, false);
            let msg = r.as_ref().map_err(|e| e.to_string()).err();
            assert_eq!(key_of(r), want, "{msg:?}");
            assert!(msg.is_some_and(|m| m.starts_with("config.json: ") && m.contains(want)));
        }
        // Bad types are BadConfig errors naming the key.
        let mut j = tf5();
        j["rope_parameters"]["rope_theta"] = json!("100000");
        let e = read(&j, false).unwrap_err();
        assert!(
            matches!(&e, ModelError::BadConfig(m) if m.contains("rope_parameters.rope_theta")),
            "{e}"
        );
        let mut j = tf5();
        j["hidden_size"] = json!(-1);
        assert!(read(&j, false)
            .unwrap_err()
            .to_string()
            .contains("hidden_size"));
    }

    #[test]
    fn agreeing_duplicates_are_accepted() {
        // A top-level rope_theta equal to the dict's, and rope_scaling equal to rope_parameters.
        let mut j = tf5();
        j["rope_theta"] = json!(100000.0);
        j["rope_scaling"] = json!({"rope_type": "default"});
        assert_eq!(read(&j, false).unwrap().0, smollm2());
    }
}
