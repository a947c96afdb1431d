//! BitStack weights on an external engine, Hugging Face's [candle](https://docs.rs/candle-core),
//! through the public API only (issue 14):
//!
//! * [`BitStackLinear`]: a [`candle_core::Module`] (a [`candle_core::CustomOp1`] underneath)
//!   that multiplies CPU f32 tensors by one weight stack at a snapshot with bitstack-core's
//!   fused look-up-table kernel, never materialising `Ŵ` for small batches;
//! * [`CandleLlama`]: candle-transformers' own Llama built from the dense weights restored at
//!   a memory budget, and [`candle_perplexity`], which scores exactly the windows
//!   `bitstack eval` scores, so the two engines' perplexities can be compared number for number.
//!
//! Everything this crate knows about the stack file as a model (tensor names, config, Q/K row
//! layout) comes from the published format crate's model contract, through [`contract`]; the
//! `examples` crate is used only for the reference side of the comparisons (its own forward
//! pass, tokenizer and perplexity windows).
#![deny(missing_docs)]

pub mod contract;
mod error;
mod linear;
mod model;

pub use error::CandleError;
pub use linear::BitStackLinear;
pub use model::{candle_perplexity, CandleLlama, CandlePerplexity};
