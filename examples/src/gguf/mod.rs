//! Model input: a bounds-checked GGUF reader with f32 dequantization, a small safetensors
//! reader, and the [`ModelSource`] abstraction over GGUF files and Hugging Face directories.
//!
//! # Layout and RoPE conventions
//!
//! [`GgufFile::tensor_f32`] returns a tensor exactly as stored, with the shape reversed into
//! PyTorch order (`[rows = ne1, cols = ne0]`). For `llama`-architecture GGUF files that raw
//! layout has the Q/K projection rows permuted by llama.cpp's converter so that its
//! interleaved-pairs RoPE (pairs `(2i, 2i+1)`) applies. [`ModelSource::tensor_f32`] undoes that
//! permutation, so every model source hands out Hugging Face layout and the forward pass always
//! uses **rotate-half RoPE** (pairs `(i, i + head_dim/2)`), whatever the file format.
//!
//! # Example
//!
//! ```
//! use bitstack_examples::gguf::{GgufBuilder, GgufFile, GgufValue, GgmlType};
//!
//! // Build a tiny GGUF in memory: one 2x3 f32 tensor and two metadata keys.
//! let mut b = GgufBuilder::new();
//! b.metadata("general.architecture", GgufValue::String("llama".into()));
//! b.metadata("llama.block_count", GgufValue::U32(2));
//! let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
//!     .iter()
//!     .flat_map(|v| v.to_le_bytes())
//!     .collect();
//! b.tensor("w", GgmlType::F32, &[3, 2], data); // GGUF order: ne0 = 3 columns, ne1 = 2 rows
//! let file = GgufFile::from_bytes(b.build()).unwrap();
//!
//! assert_eq!(file.get_u32("llama.block_count").unwrap(), 2);
//! assert!(file.get_u32("llama.missing").is_err());
//! let (shape, values) = file.tensor_f32("w").unwrap();
//! assert_eq!(shape, vec![2, 3]); // PyTorch order
//! assert_eq!(values, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
//! ```

mod builder;
mod dequant;
mod hf_config;
mod reader;
mod safetensors;
mod source;
mod synthetic;

pub use builder::GgufBuilder;
pub use dequant::{dequantize, GgmlType};
pub use reader::{GgufError, GgufFile, GgufTensorInfo, GgufValue, GgufValueType};
pub use safetensors::{SafeDtype, SafeTensorInfo, SafeTensors};
pub use source::{
    hf_config, hf_tensor_name, open_model, unpermute_qk_rows, Architecture, GgufModel, HfModel,
    LlamaConfig, ModelError, ModelSource, MAX_LAYERS,
};
pub use synthetic::{gpt2_byte_tokens, SyntheticGguf, SyntheticVocab};

#[cfg(test)]
mod testdata;
#[cfg(test)]
mod tests;
