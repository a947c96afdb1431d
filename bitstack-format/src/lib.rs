//! # bitstack-format
//!
//! The BitStack *stack file*: one self-describing, versioned, checksummed file holding a
//! compressed model's residual blocks, its resident tensors (embeddings, norms, tokenizer
//! blobs), free-form metadata and the universal stack order. Block payloads use
//! `bitstack-core`'s in-memory layout and are 64-byte aligned, so a memory-mapped file yields
//! zero-copy [`ResidualBlockRef`](bitstack_core::ResidualBlockRef)s and an owned load is one
//! `memcpy`.
//!
//! * [`StackFileWriter`]: streaming, crash-safe writer (temporary file, fsync, rename);
//!   [`write_stack_file`] for in-memory contents; [`StackFile::write_with_order`] to re-order.
//! * [`StackFile`]: validating reader over a memory map or a byte buffer; implements
//!   [`BlockSource`](bitstack_core::BlockSource) for the elastic runtime.
//!
//! ```
//! use bitstack_core::{testutil::random_block, BlockId, FactorDtype, StackMeta, UniversalOrder};
//! use bitstack_format::{write_stack_file, ResidentTensor, StackFile, StackFileContents};
//!
//! let stacks = vec![
//!     StackMeta { name: "q".into(), rows: 8, cols: 64, rank: 2, levels: 2, scale: None, factors: FactorDtype::F16 },
//!     StackMeta { name: "k".into(), rows: 4, cols: 64, rank: 2, levels: 1, scale: Some(vec![0.5; 64]), factors: FactorDtype::F16 },
//! ];
//! let blocks = vec![
//!     vec![random_block(8, 64, 2, 1), random_block(8, 64, 2, 2)],
//!     vec![random_block(4, 64, 2, 3)],
//! ];
//! let contents = StackFileContents {
//!     metadata: [("architecture".to_string(), b"llama".to_vec())].into(),
//!     residents: vec![ResidentTensor::from_f32("norm.weight", vec![64], &[1.0; 64])?],
//!     stacks,
//!     blocks,
//!     order: UniversalOrder::round_robin(vec![2, 1])?,
//! };
//! let path = std::env::temp_dir().join(format!("bitstack-doc-{}.bstk", std::process::id()));
//! write_stack_file(&path, &contents)?;
//!
//! let file = StackFile::open(&path)?;
//! assert_eq!(file.metadata_str("architecture"), Some("llama"));
//! assert_eq!(file.resident("norm.weight").unwrap().to_f32()?, vec![1.0; 64]);
//! let view = file.block_view(BlockId::new(0, 1))?; // zero-copy, checksum verified
//! assert_eq!(view.to_owned(), contents.blocks[0][1]);
//! assert_eq!(file.layout().full_bytes(), contents.stacks.iter()
//!     .map(|m| m.block_bytes() * m.levels as u64 + m.scale_bytes()).sum::<u64>() + 256);
//! std::fs::remove_file(&path)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # File format, versions 1.0 and 2.0
//!
//! Version 2.0 adds int8 factors ([`bitstack_core::FactorDtype::I8`]): one more header byte
//! per stack and a second block payload layout, marked below. A writer writes 1.0, byte for
//! byte as before, when every stack has f16 factors, and 2.0 otherwise; a reader reads both.
//! The major version changes because a 1.x reader must not open a 2.0 file: it would read the
//! dtype byte as the scale flag and the int8 payloads as f16. 1.x readers reject major 2
//! with their "upgrade" error.
//!
//! All integers are little-endian. `str` is a `u32` byte length followed by that many bytes of
//! UTF-8; `bytes` is a `u32` length followed by raw bytes. `xxh64(x)` is XXH64 with seed 0
//! ([`checksum::xxh64`]). A reader must reject anything this section does not allow; every byte
//! of a valid file is either covered by a checksum or required to have one exact value.
//!
//! ## Preamble: bytes `0..64`
//!
//! | offset | type | field |
//! |---|---|---|
//! | 0 | `[u8; 8]` | magic `BITSTACK` (`42 49 54 53 54 41 43 4B`) |
//! | 8 | `u16` | major version, `1` or `2`. A reader rejects any major version it does not know. |
//! | 10 | `u16` | minor version, `0`. Minor versions only append header fields (below). |
//! | 12 | `u32` | flags, must be `0` |
//! | 16 | `u64` | header offset, must be `64` |
//! | 24 | `u64` | header length `H`, at most [`MAX_HEADER_LEN`] (1 GiB) |
//! | 32 | `u64` | `xxh64` of the header bytes `64..64+H` |
//! | 40 | `u64` | total file length; must equal the actual length (detects truncation) |
//! | 48 | `u64` | reserved, must be `0` |
//! | 56 | `u64` | `xxh64` of preamble bytes `0..56` |
//!
//! ## Header: bytes `64..64+H`
//!
//! A `region` is `{ offset: u64, length: u64, xxh64: u64 }` (24 bytes): a payload's absolute
//! file offset, byte length and checksum.
//!
//! ```text
//! u32 metadata_count
//! metadata_count × { key: str, value: bytes }          keys strictly increasing (bytewise)
//! u32 resident_count
//! resident_count × {
//!     name: str                                         unique among residents
//!     dtype: u8                                         0 F32, 1 F16, 2 BF16, 3 U8
//!     ndim: u8                                          ≤ 8
//!     shape: ndim × u64                                 PyTorch order (outermost first)
//!     payload: region                                   length = Π shape × dtype size
//! }
//! u32 stack_count                                       ≥ 1; stack i is BlockId::weight i
//! stack_count × {
//!     name: str                                         unique among stacks
//!     rows: u64, cols: u64, rank: u64                   m (out), n (in), k; all ≥ 1
//!     levels: u16                                       ≥ 1
//!     factors: u8                                       2.0 only: 0 f16, 1 i8 (1.0: f16)
//!     has_scale: u8                                     0 or 1
//!     scale: cols × f32                                 only if has_scale; finite and > 0
//!     blocks: levels × region                           level 0 first; length = block size
//! }
//! u64 order_count                                       = Σ levels
//! order_count × { weight: u32, level: u16 }             the universal order
//! ```
//!
//! The order must list every block once, each weight's levels ascending, and start with
//! level 0 of every weight (see [`bitstack_core::UniversalOrder`]). With minor version 0 the
//! header ends exactly after the order; a reader seeing a *newer* minor version ignores extra
//! trailing header bytes.
//!
//! ## Block payload (`rows × cols`, rank `k`, `w = ceil(cols / 64)`)
//!
//! | part | bytes | content |
//! |---|---|---|
//! | signs | `8·rows·w` | `u64` words, row-major, each row starting on a new word; column `j` of row `i` is bit `j % 64` of word `i·w + j/64`; set = `+1`; padding bits past `cols` are `0` |
//! | A | `2·rows·k` | f16, `rows × k` row-major, `√σ·u` |
//! | B | `2·cols·k` | f16, `cols × k` row-major, `√σ·v` |
//!
//! With int8 factors (2.0, `factors = 1`) the parts after the signs are:
//!
//! | part | bytes | content |
//! |---|---|---|
//! | A scales | `4·k` | f32 `sa[r]`, finite |
//! | B scales | `4·k` | f32 `sb[r]`, finite |
//! | A codes | `rows·k` | i8, `rows × k` row-major: `A[i][r] = qa[i][r]·sa[r]` |
//! | B codes | `cols·k` | i8, `cols × k` row-major: `B[j][r] = qb[j][r]·sb[r]` |
//!
//! (the products taken in f32). The scales follow the 8-byte sign words, so they are 4-byte
//! aligned in a mapped file.
//!
//! The block is `S ⊙ (A Bᵀ)`; the restored weight is the sum of the loaded levels with input
//! column `j` divided by `scale[j]` when a scale is present. Factors (f16) and scales (int8)
//! must be finite. The size equals [`bitstack_core::block_bytes`] of the stack's dtype.
//!
//! ## Payload placement
//!
//! Sort all payloads (residents and blocks) by `(offset, length)`. The first starts at
//! `align64(64 + H)`; each next one starts at `align64(end of previous)`; the last one ends at
//! the end of the file. Gaps (alignment padding) are zero bytes. Hence payloads never overlap,
//! each is 64-byte aligned, and a page-aligned map can be cast to `u64`/`f16` slices. This
//! crate's writer places residents first (in header order) then blocks by weight and level,
//! but readers accept any placement that satisfies the rule.
//!
//! # The model contract
//!
//! The container above is model-agnostic. A file holding a Llama-family decoder (Llama,
//! Mistral, Qwen2) follows these conventions, read typed by
//! [`ModelContract::from_file`] (module [`model`]) and written by the `bitstack` tool through
//! [`ModelContract::metadata`]. They need no format version: they are metadata keys and
//! names, and a file without the newer key keeps the meaning it had.
//!
//! **Metadata.**
//!
//! | key | value |
//! |---|---|
//! | `bitstack.llama.config` ([`model::META_CONFIG`]) | a JSON object, [`ModelConfig`]: `arch` (`"llama"`, `"qwen2"` or `"mistral"`), `n_layers`, `hidden`, `ffn`, `n_heads`, `n_kv_heads`, `head_dim`, `vocab`, `rope_theta`, `rope_freq_factors` (`null` or `head_dim/2` numbers), `rms_eps`, `tied_embeddings`, `attn_bias`, `max_seq`, `bos_id`, `eos_id` (`null` or a token id). Unknown keys are ignored. It must pass [`ModelConfig::validate`] (heads a multiple of KV heads, even `head_dim`, ...). Required. |
//! | `bitstack.qk_layout` ([`model::META_QK_LAYOUT`]) | `rotate-half` or `interleaved` ([`QkLayout`]): the row order of `attn_q` / `attn_k` weights and biases within each head. **Absent means `rotate-half`**: every file written before the key existed has Hugging Face rows, because `bitstack compress` un-permutes GGUF's interleaved ones. A llama.cpp-style engine must permute them back (or apply rotate-half RoPE). |
//!
//! **Stacks.** Exactly `7 · n_layers` weight stacks; stack `w` ([`model::stack_index`],
//! [`model::stack_location`]) is linear `LinearKind::ALL[w % 7]` — `attn_q`, `attn_k`,
//! `attn_v`, `attn_output`, `ffn_gate`, `ffn_up`, `ffn_down` — of layer `w / 7`, named by its
//! GGUF name `blk.{layer}.{stem}.weight` (Hugging Face:
//! `model.layers.{layer}.self_attn.q_proj.weight`, ..., [`LinearKind::hf_tensor_name`]), with
//! PyTorch shape `[out, in]` ([`LinearKind::shape`]): Q `[n_heads·head_dim, hidden]`, K and V
//! `[n_kv_heads·head_dim, hidden]`, O `[hidden, n_heads·head_dim]`, gate and up
//! `[ffn, hidden]`, down `[hidden, ffn]`.
//!
//! **Resident tensors** ([`model::ResidentRole`]), float dtype (the tool writes F16), PyTorch
//! shapes: `token_embd.weight` `[vocab, hidden]`, `output_norm.weight` `[hidden]`,
//! `output.weight` `[vocab, hidden]` unless `tied_embeddings`, and per layer
//! `blk.{l}.attn_norm.weight` and `blk.{l}.ffn_norm.weight` `[hidden]`, plus when `attn_bias`
//! `blk.{l}.attn_q.bias` `[n_heads·head_dim]`, `blk.{l}.attn_k.bias` and
//! `blk.{l}.attn_v.bias` `[n_kv_heads·head_dim]`. The tokenizer is the optional U8 tensor
//! `tokenizer.json` ([`model::TOKENIZER_TENSOR`]), a Hugging Face `tokenizer.json` document.
//! Other residents may exist and are ignored.
//!
//! **Budgets.** A memory budget is the whole model as an engine holds it: the token embedding
//! and an untied head at the engine's [`EmbeddingPrecision`] (f32, f16 as stored, Q8:
//! int8 plus an f16 scale per 32 values of a row, or Q4: 4-bit codes, two per byte, plus an
//! f16 scale per 32 values of a row), every norm and bias as **f32**, the scale
//! vectors, and the loaded blocks; the tokenizer blob is not counted.
//! [`ModelContract::held_layout`] is that accounting and is what `bitstack` itself uses, so
//! the same budget loads the same prefix everywhere. ([`StackFile::layout`] counts the stored
//! payload bytes instead, as a container knows nothing of models.)
//!
//! ```
//! # fn demo(path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
//! use bitstack_core::{ElasticModel, MemoryBudget};
//! use bitstack_format::{EmbeddingPrecision, LinearKind, ModelContract, QkLayout, StackFile};
//!
//! let file = StackFile::open(path)?;
//! let contract = ModelContract::from_file(&file)?;
//! assert_eq!(contract.qk_layout(), QkLayout::RotateHalf);
//! let layout = contract.held_layout(&file, EmbeddingPrecision::F16);
//! let q0 = contract.stack_of(0, LinearKind::Q).ok_or("no layer 0")?;
//! let model = ElasticModel::new(file, layout, "200MB".parse::<MemoryBudget>()?)?;
//! let q_proj = model.linear(q0)?; // follows every later resize
//! # let _ = q_proj; Ok(()) }
//! ```
#![deny(missing_docs)]

#[cfg(target_endian = "big")]
compile_error!(
    "bitstack-format maps little-endian payloads directly and supports only little-endian targets"
);

pub mod checksum;
mod error;
mod header;
pub mod model;
mod reader;
mod types;
mod writer;

pub use error::{FormatError, Result};
pub use model::{
    Architecture, ContractError, EmbeddingPrecision, LinearKind, ModelConfig, ModelContract,
    QkLayout,
};
pub use reader::StackFile;
pub use types::{
    DType, FileDescription, ResidentTensor, StackFileContents, TensorSpec, TensorView,
};
pub use writer::{write_stack_file, StackFileWriter};

/// The 8 magic bytes at offset 0.
pub const MAGIC: [u8; 8] = *b"BITSTACK";
/// Newest major format version: written when a stack has int8 factors (its header records
/// each stack's factor dtype). Read, as is [`FORMAT_MAJOR_F16`].
pub const FORMAT_MAJOR: u16 = 2;
/// Major version 1: every stack has f16 factors. Still written for such files (byte for byte
/// what 1.x writers wrote, so 1.x readers open them) and read.
pub const FORMAT_MAJOR_F16: u16 = 1;
/// Minor format version written.
pub const FORMAT_MINOR: u16 = 0;
/// Preamble length; the header starts here.
pub const PREAMBLE_LEN: usize = 64;
/// Alignment of every payload.
pub const ALIGN: u64 = 64;
/// Largest header accepted or written.
pub const MAX_HEADER_LEN: u64 = 1 << 30;
/// Most dimensions a resident tensor may have.
pub const MAX_TENSOR_DIMS: usize = 8;
