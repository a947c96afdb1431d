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
//! use bitstack_core::{testutil::random_block, BlockId, StackMeta, UniversalOrder};
//! use bitstack_format::{write_stack_file, ResidentTensor, StackFile, StackFileContents};
//!
//! let stacks = vec![
//!     StackMeta { name: "q".into(), rows: 8, cols: 64, rank: 2, levels: 2, scale: None },
//!     StackMeta { name: "k".into(), rows: 4, cols: 64, rank: 2, levels: 1, scale: Some(vec![0.5; 64]) },
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
//! # File format, version 1.0
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
//! | 8 | `u16` | major version, `1`. A reader rejects any major version it does not know. |
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
//! The block is `S ⊙ (A Bᵀ)`; the restored weight is the sum of the loaded levels with input
//! column `j` divided by `scale[j]` when a scale is present. Factors must be finite. The size
//! equals [`bitstack_core::block_bytes`].
//!
//! ## Payload placement
//!
//! Sort all payloads (residents and blocks) by `(offset, length)`. The first starts at
//! `align64(64 + H)`; each next one starts at `align64(end of previous)`; the last one ends at
//! the end of the file. Gaps (alignment padding) are zero bytes. Hence payloads never overlap,
//! each is 64-byte aligned, and a page-aligned map can be cast to `u64`/`f16` slices. This
//! crate's writer places residents first (in header order) then blocks by weight and level,
//! but readers accept any placement that satisfies the rule.
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
/// Major format version written and the only one read.
pub const FORMAT_MAJOR: u16 = 1;
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
