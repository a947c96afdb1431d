//! A small, validating safetensors reader (f32 / f16 / bf16 tensors).
//!
//! Format: an 8-byte little-endian header length `N`, an `N`-byte JSON object mapping tensor
//! names to `{dtype, shape, data_offsets: [begin, end]}` (offsets relative to the end of the
//! header), optionally a `__metadata__` entry, then the data.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use super::source::ModelError;

/// Headers larger than this are rejected (the reference implementation uses the same bound)
/// so that a corrupt length cannot trigger a huge allocation.
const MAX_HEADER: u64 = 100 * 1024 * 1024;

/// A safetensors element type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SafeDtype {
    /// IEEE f32.
    F32,
    /// IEEE f16.
    F16,
    /// bfloat16.
    BF16,
    /// Any other dtype; listed, but reading it is an error.
    Other(String),
}

impl SafeDtype {
    fn parse(s: &str) -> Self {
        match s {
            "F32" => Self::F32,
            "F16" => Self::F16,
            "BF16" => Self::BF16,
            other => Self::Other(other.to_owned()),
        }
    }

    /// Bytes per element, when known.
    fn size(&self) -> Option<usize> {
        match self {
            Self::F32 => Some(4),
            Self::F16 | Self::BF16 => Some(2),
            Self::Other(s) => match s.as_str() {
                "F64" | "I64" | "U64" => Some(8),
                "I32" | "U32" => Some(4),
                "I16" | "U16" => Some(2),
                "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => Some(1),
                _ => None,
            },
        }
    }
}

/// One tensor's header entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SafeTensorInfo {
    /// Element type.
    pub dtype: SafeDtype,
    /// Shape (PyTorch order).
    pub shape: Vec<usize>,
    /// Absolute byte range of the data within the file.
    pub range: std::ops::Range<usize>,
}

/// A memory-mapped safetensors file with a validated header.
pub struct SafeTensors {
    path: PathBuf,
    map: memmap2::Mmap,
    tensors: BTreeMap<String, SafeTensorInfo>,
}

impl std::fmt::Debug for SafeTensors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafeTensors")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl SafeTensors {
    /// Opens, maps and validates a safetensors file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref().to_owned();
        let io = |source| ModelError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: read-only private map; as with any mmap loader the file must not be modified
        // while open. All ranges are validated against the length seen here.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let tensors = parse_header(&map).map_err(|reason| ModelError::BadSafetensors {
            path: path.clone(),
            reason,
        })?;
        Ok(Self { path, map, tensors })
    }

    /// The tensor headers, by name.
    pub fn tensors(&self) -> &BTreeMap<String, SafeTensorInfo> {
        &self.tensors
    }

    /// A tensor converted to f32, with its shape.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_owned()))?;
        let bytes = &self.map[t.range.clone()];
        let data = match &t.dtype {
            SafeDtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            SafeDtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            SafeDtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            SafeDtype::Other(d) => {
                return Err(ModelError::Unsupported(format!(
                    "safetensors dtype {d} of tensor {name:?} in {}",
                    self.path.display()
                )))
            }
        };
        Ok((t.shape.clone(), data))
    }
}

/// Parses and validates the header of a safetensors image.
pub(crate) fn parse_header(b: &[u8]) -> Result<BTreeMap<String, SafeTensorInfo>, String> {
    let len_bytes: [u8; 8] = b
        .get(..8)
        .and_then(|s| s.try_into().ok())
        .ok_or("file shorter than the 8-byte header length")?;
    let n = u64::from_le_bytes(len_bytes);
    if n > MAX_HEADER || n > (b.len() as u64 - 8) {
        return Err(format!(
            "header length {n} exceeds the file ({} bytes) or the {MAX_HEADER}-byte limit",
            b.len()
        ));
    }
    let data_start = 8 + n as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&b[8..data_start]).map_err(|e| format!("header JSON: {e}"))?;
    let obj = header.as_object().ok_or("header is not a JSON object")?;
    let data_len = b.len() - data_start;
    let mut out = BTreeMap::new();
    for (name, v) in obj {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| format!("tensor {name:?}: {what}");
        let dtype = SafeDtype::parse(
            v.get("dtype")
                .and_then(|d| d.as_str())
                .ok_or_else(|| bad("missing dtype"))?,
        );
        let shape = v
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("missing shape"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad("shape entries must be non-negative integers"))?;
        let offs = v
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| bad("data_offsets must be two integers"))?;
        let (begin, end) = offs;
        if begin > end || end > data_len as u64 {
            return Err(bad(&format!(
                "data_offsets [{begin}, {end}] outside the {data_len}-byte data section"
            )));
        }
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad("shape overflows"))?;
        if let Some(size) = dtype.size() {
            if numel.checked_mul(size) != Some((end - begin) as usize) {
                return Err(bad(&format!(
                    "{} bytes of data for shape {shape:?} of {dtype:?}",
                    end - begin
                )));
            }
        }
        let range = data_start + begin as usize..data_start + end as usize;
        out.insert(
            name.clone(),
            SafeTensorInfo {
                dtype,
                shape,
                range,
            },
        );
    }
    Ok(out)
}
