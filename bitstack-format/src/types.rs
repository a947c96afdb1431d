//! Owned and borrowed descriptions of what a stack file holds.

use crate::error::{FormatError, Result};
use bitstack_core::{ResidualBlock, StackMeta, UniversalOrder};
use half::{bf16, f16};
use std::collections::BTreeMap;

/// Element type of a resident tensor. The discriminant is the on-disk code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    /// IEEE 754 binary32, little-endian.
    F32 = 0,
    /// IEEE 754 binary16, little-endian.
    F16 = 1,
    /// bfloat16, little-endian.
    BF16 = 2,
    /// Raw bytes: blobs such as a `tokenizer.json`, a vocabulary or quantised data.
    U8 = 3,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }
    /// The on-disk code.
    pub const fn code(self) -> u8 {
        self as u8
    }
    /// Inverse of [`DType::code`]; `None` for unknown codes.
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(DType::F32),
            1 => Some(DType::F16),
            2 => Some(DType::BF16),
            3 => Some(DType::U8),
            _ => None,
        }
    }
}

/// Name, element type and PyTorch-order shape of a resident tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// Unique tensor name, e.g. `token_embd.weight`.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost dimension first (PyTorch order). At most
    /// [`crate::MAX_TENSOR_DIMS`] dimensions; `[]` is a scalar.
    pub shape: Vec<u64>,
}

impl TensorSpec {
    /// Elements implied by the shape, `None` on overflow.
    pub fn num_elements(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }
    /// Payload bytes implied by shape and dtype, `None` on overflow.
    pub fn byte_len(&self) -> Option<u64> {
        self.num_elements()?.checked_mul(self.dtype.size() as u64)
    }
}

/// A resident tensor with its payload (little-endian element bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResidentTensor {
    /// Name, dtype, shape.
    pub spec: TensorSpec,
    /// Raw little-endian payload; its length must equal [`TensorSpec::byte_len`].
    pub data: Vec<u8>,
}

impl ResidentTensor {
    /// An f32 tensor; `values.len()` must match `shape`.
    pub fn from_f32(name: impl Into<String>, shape: Vec<u64>, values: &[f32]) -> Result<Self> {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::new(
            TensorSpec {
                name: name.into(),
                dtype: DType::F32,
                shape,
            },
            data,
        )
    }
    /// An f16 tensor; `values.len()` must match `shape`.
    pub fn from_f16(name: impl Into<String>, shape: Vec<u64>, values: &[f16]) -> Result<Self> {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::new(
            TensorSpec {
                name: name.into(),
                dtype: DType::F16,
                shape,
            },
            data,
        )
    }
    /// A byte blob (dtype U8, shape `[len]`), e.g. the text of a `tokenizer.json`.
    pub fn blob(name: impl Into<String>, bytes: Vec<u8>) -> Self {
        let shape = vec![bytes.len() as u64];
        Self {
            spec: TensorSpec {
                name: name.into(),
                dtype: DType::U8,
                shape,
            },
            data: bytes,
        }
    }
    /// Checks that `data` has the length the spec implies.
    pub fn new(spec: TensorSpec, data: Vec<u8>) -> Result<Self> {
        match spec.byte_len() {
            Some(n) if n == data.len() as u64 => Ok(Self { spec, data }),
            n => Err(FormatError::InvalidInput(format!(
                "tensor {:?}: shape {:?} of {:?} needs {} bytes, got {}",
                spec.name,
                spec.shape,
                spec.dtype,
                n.map_or_else(|| "an overflowing number of".into(), |n| n.to_string()),
                data.len()
            ))),
        }
    }
    /// Borrowed view.
    pub fn view(&self) -> TensorView<'_> {
        TensorView {
            spec: &self.spec,
            data: &self.data,
        }
    }
}

/// Everything in a stack file except payloads and the universal order: what
/// [`crate::StackFileWriter::create`] needs to lay the file out before any block exists.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FileDescription {
    /// Free-form model metadata (architecture config as JSON, tokenizer, provenance, ...).
    /// Values are bytes; UTF-8 text is the common case ([`crate::StackFile::metadata_str`]).
    pub metadata: BTreeMap<String, Vec<u8>>,
    /// Tensors held at every budget (embeddings, norms, untied head, blobs).
    pub residents: Vec<TensorSpec>,
    /// One entry per compressed weight, indexed by `BlockId::weight`.
    pub stacks: Vec<StackMeta>,
}

/// A whole stack file in memory: what [`crate::write_stack_file`] writes and
/// [`crate::StackFile::to_contents`] reads back.
#[derive(Clone, Debug, PartialEq)]
pub struct StackFileContents {
    /// Free-form model metadata.
    pub metadata: BTreeMap<String, Vec<u8>>,
    /// Resident tensors with payloads.
    pub residents: Vec<ResidentTensor>,
    /// One entry per compressed weight.
    pub stacks: Vec<StackMeta>,
    /// `blocks[w][l]` is level `l` of weight `w`; `blocks[w].len() == stacks[w].levels`.
    pub blocks: Vec<Vec<ResidualBlock>>,
    /// The universal stack.
    pub order: UniversalOrder,
}

impl StackFileContents {
    /// The layout description of these contents (payloads dropped).
    pub fn description(&self) -> FileDescription {
        FileDescription {
            metadata: self.metadata.clone(),
            residents: self.residents.iter().map(|t| t.spec.clone()).collect(),
            stacks: self.stacks.clone(),
        }
    }
}

/// A borrowed resident tensor, e.g. a zero-copy view into a memory-mapped file.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    spec: &'a TensorSpec,
    data: &'a [u8],
}

impl<'a> TensorView<'a> {
    pub(crate) fn new(spec: &'a TensorSpec, data: &'a [u8]) -> Self {
        Self { spec, data }
    }
    /// Name.
    pub fn name(&self) -> &'a str {
        &self.spec.name
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.spec.dtype
    }
    /// Shape (PyTorch order).
    pub fn shape(&self) -> &'a [u64] {
        &self.spec.shape
    }
    /// Full spec.
    pub fn spec(&self) -> &'a TensorSpec {
        self.spec
    }
    /// Raw little-endian payload bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.data
    }
    /// Zero-copy `f32` slice when the dtype is F32 and the payload is aligned (always the case
    /// for files opened by [`crate::StackFile`]); `None` otherwise.
    pub fn as_f32(&self) -> Option<&'a [f32]> {
        if self.spec.dtype != DType::F32 {
            return None;
        }
        bytemuck::try_cast_slice(self.data).ok()
    }
    /// Decodes F32, F16 or BF16 elements into a new `f32` vector (copies; works unaligned).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let d = self.data;
        Ok(match self.spec.dtype {
            DType::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F16 => d
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16 => d
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::U8 => {
                return Err(FormatError::InvalidInput(format!(
                    "tensor {:?} has dtype U8, not a float type",
                    self.spec.name
                )))
            }
        })
    }
    /// Copies into an owned tensor.
    pub fn to_owned(&self) -> ResidentTensor {
        ResidentTensor {
            spec: self.spec.clone(),
            data: self.data.to_vec(),
        }
    }
}
