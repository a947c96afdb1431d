//! The GGUF container: header, metadata, tensor infos, bounds-checked tensor data.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::dequant::{dequantize, GgmlType};

const MAGIC: [u8; 4] = *b"GGUF";
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// Nested arrays deeper than this are rejected rather than risking deep recursion.
const MAX_ARRAY_DEPTH: usize = 8;
const DEFAULT_ALIGNMENT: u64 = 32;

/// Errors from reading a GGUF file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The first four bytes are not `GGUF`.
    #[error("not a GGUF file (magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// A GGUF version this reader does not understand (only 2 and 3 are).
    #[error("unsupported GGUF version {0}")]
    UnsupportedVersion(u32),
    /// The file ended inside the header.
    #[error("truncated GGUF header: {what} at byte {offset} runs past the end of the file")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Where it started.
        offset: usize,
    },
    /// A count that cannot possibly fit in the rest of the file.
    #[error("implausible {what} count {count} at byte {offset}")]
    ImplausibleCount {
        /// What was being counted.
        what: &'static str,
        /// The count read.
        count: u64,
        /// Where it was read.
        offset: usize,
    },
    /// A string is not UTF-8.
    #[error("string at byte {offset} is not valid UTF-8")]
    InvalidUtf8 {
        /// Where the string starts.
        offset: usize,
    },
    /// An unknown metadata value type id.
    #[error("unknown metadata value type {type_id} at byte {offset}")]
    BadValueType {
        /// The type id read.
        type_id: u32,
        /// Where it was read.
        offset: usize,
    },
    /// Arrays nested deeper than this reader accepts.
    #[error("metadata arrays nested deeper than {MAX_ARRAY_DEPTH} levels")]
    NestingTooDeep,
    /// A metadata key or tensor name occurs twice.
    #[error("duplicate {what} {name:?}")]
    Duplicate {
        /// "metadata key" or "tensor".
        what: &'static str,
        /// The repeated name.
        name: String,
    },
    /// `general.alignment` is zero or not a power of two.
    #[error("invalid general.alignment {0}")]
    BadAlignment(u64),
    /// A required metadata key is absent.
    #[error("metadata key {0:?} is missing")]
    MissingKey(String),
    /// A metadata key has a type other than the one asked for (or a value out of range).
    #[error("metadata key {key:?} is {found}, expected {expected}")]
    WrongType {
        /// The key.
        key: String,
        /// What the caller asked for.
        expected: &'static str,
        /// What the file holds.
        found: String,
    },
    /// No tensor has this name.
    #[error("tensor {0:?} not found")]
    MissingTensor(String),
    /// A GGML tensor type this reader cannot dequantize.
    #[error("unsupported GGML tensor type id {0}")]
    UnsupportedTensorType(u32),
    /// Dimensions that are invalid for the tensor type, or data of the wrong size.
    #[error("bad tensor shape: {reason}")]
    BadTensorShape {
        /// What is wrong.
        reason: String,
    },
    /// A tensor's data lies (partly) outside the file or is misaligned.
    #[error("tensor {name:?}: data at offset {offset} (+{size} bytes) is outside the {file_len}-byte file or misaligned")]
    TensorOutOfBounds {
        /// The tensor.
        name: String,
        /// Absolute byte offset of its data.
        offset: u64,
        /// Its data size in bytes.
        size: u64,
        /// The file length.
        file_len: u64,
    },
}

/// The type of a metadata value, as numbered by the GGUF spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)] // The variant names are the spec's type names.
pub enum GgufValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl GgufValueType {
    /// Every type, at the index of its spec number (the discriminants above).
    const BY_ID: [Self; 13] = {
        use GgufValueType::*;
        [
            U8, I8, U16, I16, U32, I32, F32, Bool, String, Array, U64, I64, F64,
        ]
    };

    fn from_id(id: u32) -> Option<Self> {
        // Checked when compiling: the table is in spec order.
        const _: () = {
            let mut i = 0;
            while i < GgufValueType::BY_ID.len() {
                assert!(GgufValueType::BY_ID[i] as usize == i);
                i += 1;
            }
        };
        Self::BY_ID.get(usize::try_from(id).ok()?).copied()
    }

    /// The smallest encoded size of one value of this type, used to reject absurd array counts
    /// before allocating.
    fn min_size(self) -> usize {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// A metadata value of any GGUF type.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)] // The variant names are the spec's type names.
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// An array; GGUF arrays are homogeneous, so every element has the type `elem_type`.
    Array {
        elem_type: GgufValueType,
        values: Vec<GgufValue>,
    },
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The value's type.
    pub fn value_type(&self) -> GgufValueType {
        match self {
            Self::U8(_) => GgufValueType::U8,
            Self::I8(_) => GgufValueType::I8,
            Self::U16(_) => GgufValueType::U16,
            Self::I16(_) => GgufValueType::I16,
            Self::U32(_) => GgufValueType::U32,
            Self::I32(_) => GgufValueType::I32,
            Self::F32(_) => GgufValueType::F32,
            Self::Bool(_) => GgufValueType::Bool,
            Self::String(_) => GgufValueType::String,
            Self::Array { .. } => GgufValueType::Array,
            Self::U64(_) => GgufValueType::U64,
            Self::I64(_) => GgufValueType::I64,
            Self::F64(_) => GgufValueType::F64,
        }
    }

    /// Any integer value widened to i128 (so every GGUF integer fits), else `None`.
    pub fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            Self::U8(v) => v.into(),
            Self::I8(v) => v.into(),
            Self::U16(v) => v.into(),
            Self::I16(v) => v.into(),
            Self::U32(v) => v.into(),
            Self::I32(v) => v.into(),
            Self::U64(v) => v.into(),
            Self::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// An F32 or F64 value as f32, else `None`.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Self::F32(v) => Some(v),
            Self::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    /// A string value, else `None`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Array { elem_type, values } => {
                format!("an array of {} {elem_type:?}", values.len())
            }
            other => format!("{:?}", other.value_type()),
        }
    }

    /// Encodes the value (without its type tag) in GGUF's little-endian format.
    pub(crate) fn write_payload(&self, out: &mut Vec<u8>) {
        match self {
            Self::U8(v) => out.push(*v),
            Self::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
            Self::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
            Self::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
            Self::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Self::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Self::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Self::Bool(v) => out.push(u8::from(*v)),
            Self::String(s) => {
                out.extend_from_slice(&(s.len() as u64).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Self::Array { elem_type, values } => {
                out.extend_from_slice(&(*elem_type as u32).to_le_bytes());
                out.extend_from_slice(&(values.len() as u64).to_le_bytes());
                for v in values {
                    v.write_payload(out);
                }
            }
            Self::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Self::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Self::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        }
    }
}

/// One tensor's header entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// The tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// The raw GGML type id; see [`GgufTensorInfo::dtype`].
    pub type_id: u32,
    /// Dimensions in GGUF order: `dims[0]` (ne0) is the contiguous one (PyTorch's last).
    pub dims: Vec<u64>,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// The element type, or [`GgufError::UnsupportedTensorType`].
    pub fn dtype(&self) -> Result<GgmlType, GgufError> {
        GgmlType::from_id(self.type_id)
    }

    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape in PyTorch order (GGUF dims reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

enum Storage {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Mapped(m) => m,
            Self::Owned(v) => v,
        }
    }
}

/// An opened GGUF file: the memory-mapped bytes plus the parsed and validated header.
///
/// Every tensor's data range was checked against the file length when the file was opened, so
/// tensor reads can only fail for unsupported types.
pub struct GgufFile {
    storage: Storage,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    index: BTreeMap<String, usize>,
    data_start: usize,
    alignment: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("len", &self.storage.bytes().len())
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], GgufError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(GgufError::Truncated {
                what,
                offset: self.pos,
            })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        self.arr(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        self.arr(what).map(u64::from_le_bytes)
    }

    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }

    /// Reads a count and rejects it when `count * min_size` cannot fit in the rest of the file,
    /// so a corrupt count never triggers a huge allocation.
    fn count(&mut self, what: &'static str, min_size: usize) -> Result<usize, GgufError> {
        let offset = self.pos;
        let count = self.u64(what)?;
        let fits = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(min_size))
            .is_some_and(|need| need <= self.remaining());
        if !fits {
            return Err(GgufError::ImplausibleCount {
                what,
                count,
                offset,
            });
        }
        Ok(count as usize)
    }

    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let len = self.count(what, 1)?;
        let offset = self.pos;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| GgufError::InvalidUtf8 { offset })
    }

    fn value_type(&mut self) -> Result<GgufValueType, GgufError> {
        let offset = self.pos;
        let type_id = self.u32("value type")?;
        GgufValueType::from_id(type_id).ok_or(GgufError::BadValueType { type_id, offset })
    }

    fn value(&mut self, ty: GgufValueType, depth: usize) -> Result<GgufValue, GgufError> {
        use GgufValueType as T;
        const W: &str = "metadata value";
        Ok(match ty {
            T::U8 => GgufValue::U8(self.arr::<1>(W)?[0]),
            T::I8 => GgufValue::I8(i8::from_le_bytes(self.arr(W)?)),
            T::U16 => GgufValue::U16(u16::from_le_bytes(self.arr(W)?)),
            T::I16 => GgufValue::I16(i16::from_le_bytes(self.arr(W)?)),
            T::U32 => GgufValue::U32(u32::from_le_bytes(self.arr(W)?)),
            T::I32 => GgufValue::I32(i32::from_le_bytes(self.arr(W)?)),
            T::F32 => GgufValue::F32(f32::from_le_bytes(self.arr(W)?)),
            T::Bool => GgufValue::Bool(self.arr::<1>(W)?[0] != 0),
            T::String => GgufValue::String(self.string("metadata string")?),
            T::U64 => GgufValue::U64(u64::from_le_bytes(self.arr(W)?)),
            T::I64 => GgufValue::I64(i64::from_le_bytes(self.arr(W)?)),
            T::F64 => GgufValue::F64(f64::from_le_bytes(self.arr(W)?)),
            T::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::NestingTooDeep);
                }
                let elem_type = self.value_type()?;
                let n = self.count("array element", elem_type.min_size())?;
                let mut values = Vec::with_capacity(n);
                for _ in 0..n {
                    values.push(self.value(elem_type, depth + 1)?);
                }
                GgufValue::Array { elem_type, values }
            }
        })
    }
}

impl GgufFile {
    /// Opens and memory-maps a GGUF file, parsing and validating its header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this struct. Like every mmap-based model
        // loader we rely on the file not being truncated or rewritten while it is open; all
        // offsets were validated against the length seen at open time.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(Storage::Mapped(map))
    }

    /// Parses a GGUF image held in memory (used for tests and generated files).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(Storage::Owned(bytes))
    }

    fn parse(storage: Storage) -> Result<Self, GgufError> {
        let b = storage.bytes();
        let mut c = Cursor { b, pos: 0 };
        let magic = c.arr::<4>("magic")?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        // A tensor info is at least 8 (name) + 4 (n_dims) + 4 (type) + 8 (offset) bytes and a
        // metadata entry at least 8 (key) + 4 (type) + 1 bytes.
        let n_tensors = c.count("tensor", 24)?;
        let n_kv = c.count("metadata", 13)?;

        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.value_type()?;
            let value = c.value(ty, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(GgufError::Duplicate {
                    what: "metadata key",
                    name: key,
                });
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_integer() {
                Some(a) if a > 0 && (a as u64).is_power_of_two() && a <= u32::MAX as i128 => {
                    a as u64
                }
                Some(a) => {
                    return Err(GgufError::BadAlignment(a.clamp(0, u64::MAX as i128) as u64))
                }
                None => {
                    return Err(GgufError::WrongType {
                        key: "general.alignment".into(),
                        expected: "an integer",
                        found: v.describe(),
                    })
                }
            },
        };

        let mut tensors = Vec::with_capacity(n_tensors);
        let mut index = BTreeMap::new();
        for i in 0..n_tensors {
            let name = c.string("tensor name")?;
            let dims_at = c.pos;
            let n_dims = c.u32("tensor dimension count")?;
            if n_dims > MAX_DIMS {
                return Err(GgufError::ImplausibleCount {
                    what: "tensor dimension",
                    count: n_dims.into(),
                    offset: dims_at,
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64("tensor dimension")?);
            }
            let type_id = c.u32("tensor type")?;
            let offset = c.u64("tensor offset")?;
            if index.insert(name.clone(), i).is_some() {
                return Err(GgufError::Duplicate {
                    what: "tensor",
                    name,
                });
            }
            tensors.push(GgufTensorInfo {
                name,
                type_id,
                dims,
                offset,
            });
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = b.len() as u64;
        for t in &tensors {
            let out_of_bounds = |size| GgufError::TensorOutOfBounds {
                name: t.name.clone(),
                offset: data_start.saturating_add(t.offset),
                size,
                file_len,
            };
            if !t.offset.is_multiple_of(alignment) {
                return Err(out_of_bounds(0));
            }
            // Types we cannot decode are still listed; their size is checked when read.
            let Ok(ty) = t.dtype() else { continue };
            let size = Self::data_size(t, ty)?;
            let end = data_start
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(size));
            if end.is_none_or(|e| e > file_len) {
                return Err(out_of_bounds(size));
            }
        }
        let data_start = usize::try_from(data_start).unwrap_or(usize::MAX);
        Ok(Self {
            storage,
            version,
            metadata,
            tensors,
            index,
            data_start,
            alignment,
        })
    }

    fn data_size(t: &GgufTensorInfo, ty: GgmlType) -> Result<u64, GgufError> {
        let bad = |reason: String| GgufError::BadTensorShape {
            reason: format!("tensor {:?}: {reason}", t.name),
        };
        let n = t
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("dims {:?} overflow", t.dims)))?;
        let ne0 = t.dims.first().copied().unwrap_or(1);
        if !ne0.is_multiple_of(ty.block_elems() as u64) {
            return Err(bad(format!(
                "ne0 = {ne0} is not a multiple of the {ty:?} block size {}",
                ty.block_elems()
            )));
        }
        (n / ty.block_elems() as u64)
            .checked_mul(ty.block_bytes() as u64)
            .ok_or_else(|| bad("byte size overflows".into()))
    }

    /// The GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data-section alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// A metadata value, or [`GgufError::MissingKey`].
    pub fn get(&self, key: &str) -> Result<&GgufValue, GgufError> {
        self.metadata
            .get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_owned()))
    }

    fn wrong(&self, key: &str, expected: &'static str, v: &GgufValue) -> GgufError {
        GgufError::WrongType {
            key: key.to_owned(),
            expected,
            found: v.describe(),
        }
    }

    fn get_int<T: TryFrom<i128>>(&self, key: &str, expected: &'static str) -> Result<T, GgufError> {
        let v = self.get(key)?;
        v.as_integer()
            .and_then(|i| T::try_from(i).ok())
            .ok_or_else(|| self.wrong(key, expected, v))
    }

    /// An integer metadata value that fits in u32 (any GGUF integer type is accepted, since
    /// writers differ in which width they use).
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        self.get_int(key, "an integer fitting in u32")
    }

    /// An integer metadata value that fits in u64.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get_int(key, "an integer fitting in u64")
    }

    /// An integer metadata value that fits in i64.
    pub fn get_i64(&self, key: &str) -> Result<i64, GgufError> {
        self.get_int(key, "an integer fitting in i64")
    }

    /// An F32 (or F64, narrowed) metadata value.
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        let v = self.get(key)?;
        v.as_f32().ok_or_else(|| self.wrong(key, "a float", v))
    }

    /// A Bool metadata value.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.get(key)? {
            GgufValue::Bool(b) => Ok(*b),
            v => Err(self.wrong(key, "a bool", v)),
        }
    }

    /// A String metadata value.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.get(key)?;
        v.as_str().ok_or_else(|| self.wrong(key, "a string", v))
    }

    /// The elements of an Array metadata value.
    pub fn get_array(&self, key: &str) -> Result<&[GgufValue], GgufError> {
        match self.get(key)? {
            GgufValue::Array { values, .. } => Ok(values),
            v => Err(self.wrong(key, "an array", v)),
        }
    }

    /// An array of strings (e.g. `tokenizer.ggml.tokens`).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let v = self.get(key)?;
        let values = self.get_array(key)?;
        values
            .iter()
            .map(|e| {
                e.as_str()
                    .ok_or_else(|| self.wrong(key, "an array of strings", v))
            })
            .collect()
    }

    /// An array of integers, each fitting in i32 (e.g. `tokenizer.ggml.token_type`).
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        let v = self.get(key)?;
        let values = self.get_array(key)?;
        values
            .iter()
            .map(|e| {
                e.as_integer()
                    .and_then(|i| i32::try_from(i).ok())
                    .ok_or_else(|| self.wrong(key, "an array of i32", v))
            })
            .collect()
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str("general.architecture")
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The info of the tensor called `name`.
    pub fn tensor_info(&self, name: &str) -> Result<&GgufTensorInfo, GgufError> {
        self.index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| GgufError::MissingTensor(name.to_owned()))
    }

    /// Whether a tensor called `name` exists.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The raw stored bytes of a tensor, with its type.
    pub fn tensor_bytes(&self, name: &str) -> Result<(GgmlType, &[u8]), GgufError> {
        let t = self.tensor_info(name)?;
        let ty = t.dtype()?;
        let size = Self::data_size(t, ty)?;
        // Validated at open time for every decodable tensor, so these conversions and the
        // slice cannot fail; checked anyway to keep this function panic-free.
        let start = usize::try_from(t.offset)
            .ok()
            .and_then(|o| o.checked_add(self.data_start));
        let range = start.and_then(|s| Some(s..s.checked_add(usize::try_from(size).ok()?)?));
        let bytes = range
            .and_then(|r| self.storage.bytes().get(r))
            .ok_or_else(|| GgufError::TensorOutOfBounds {
                name: name.to_owned(),
                offset: t.offset,
                size,
                file_len: self.storage.bytes().len() as u64,
            })?;
        Ok((ty, bytes))
    }

    /// A tensor dequantized to f32, with its shape in PyTorch order (GGUF dims reversed, so a
    /// matrix is `[rows = ne1, cols = ne0]`, row-major). No layout change is applied; see the
    /// module docs for the Q/K permutation of `llama` files.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), GgufError> {
        let (ty, bytes) = self.tensor_bytes(name)?;
        let t = self.tensor_info(name)?;
        let n = usize::try_from(t.n_elements()).map_err(|_| GgufError::BadTensorShape {
            reason: format!("tensor {name:?} is too large for this platform"),
        })?;
        let mut out = vec![0f32; n];
        dequantize(ty, bytes, &mut out)?;
        Ok((t.shape(), out))
    }
}
