//! The crate's typed errors.

use bitstack_core::CoreError;
use std::path::PathBuf;
use thiserror::Error;

/// Everything that can go wrong reading or writing a stack file.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FormatError {
    /// An operating-system I/O call failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The path names a directory, a device or a FIFO, not a file.
    #[error("{path} {what}")]
    NotRegularFile {
        /// The path.
        path: PathBuf,
        /// What it is (`is a directory, not a stack file`).
        what: &'static str,
    },
    /// The first 8 bytes are not `BITSTACK`.
    #[error("not a BitStack stack file (bad magic bytes)")]
    BadMagic,
    /// The file was written by an incompatible (newer major) version of the format.
    #[error("stack file format version {major}.{minor} is not supported (this reader supports major version {supported_major}); upgrade bitstack-format")]
    UnsupportedVersion {
        /// Major version found in the file.
        major: u16,
        /// Minor version found in the file.
        minor: u16,
        /// The only major version this reader understands.
        supported_major: u16,
    },
    /// The data ends before a structure it promises.
    #[error("truncated stack file: {what} needs {needed} bytes, {available} available")]
    Truncated {
        /// The structure being read.
        what: &'static str,
        /// Bytes required.
        needed: u64,
        /// Bytes present.
        available: u64,
    },
    /// A stored checksum does not match the data it covers.
    #[error("checksum mismatch in {what}: stored {stored:#018x}, computed {computed:#018x}")]
    ChecksumMismatch {
        /// The region (preamble, header, block or tensor name).
        what: String,
        /// Value stored in the file.
        stored: u64,
        /// Value computed from the data.
        computed: u64,
    },
    /// The file is structurally invalid (bad count, offset, overlap, shape, UTF-8, ...).
    #[error("corrupt stack file: {0}")]
    Corrupt(String),
    /// A caller-supplied description, block or tensor was invalid for writing.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A block id that the file does not contain.
    #[error("block {weight}:{level} does not exist in this file")]
    NoSuchBlock {
        /// Weight index.
        weight: u32,
        /// Level index (0-based).
        level: u16,
    },
    /// A zero-copy view was requested over a buffer that is not aligned for `u64`/`f16`.
    #[error("payload of {0} is not aligned for a zero-copy view; use an owned load instead")]
    Misaligned(String),
    /// A bitstack-core validation failed (order, stack meta, block contents).
    #[error(transparent)]
    Core(#[from] CoreError),
}

/// Shorthand for results in this crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;

pub(crate) fn corrupt(msg: impl Into<String>) -> FormatError {
    FormatError::Corrupt(msg.into())
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> FormatError {
    let path = path.into();
    move |source| FormatError::Io { path, source }
}
