//! The reference model code behind the `bitstack` tool: GGUF / Hugging Face model reading,
//! tokenization, a CPU Llama forward pass over any [`bitstack_core::LinearOp`], perplexity
//! evaluation, and the quantization baselines BitStack is compared against.
#![deny(missing_docs)]

pub mod baselines;
pub mod bench;
pub mod compare;
pub mod compress;
pub mod gguf;
pub mod llama;
pub mod llama_cpp;
pub mod memstat;
pub mod output;
pub mod perplexity;
pub mod report;
pub mod serve;
pub mod sorting;
pub mod stackmodel;
pub mod stdout;
pub mod tokenizer;
