//! Writing small GGUF images, for tests, examples and converters.

use super::dequant::GgmlType;
use super::reader::GgufValue;

/// Builds a GGUF v3 image in memory.
///
/// Tensor data is written verbatim (it must already be in the given type's encoding) and
/// aligned to 32 bytes.
#[derive(Clone, Debug, Default)]
pub struct GgufBuilder {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<(String, GgmlType, Vec<u64>, Vec<u8>)>,
}

impl GgufBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata entry.
    pub fn metadata(&mut self, key: &str, value: GgufValue) -> &mut Self {
        self.metadata.push((key.to_owned(), value));
        self
    }

    /// Sets a metadata entry: replaces the value of `key` where present (keeping its
    /// position), else adds it. For a test that changes one key of a prepared model.
    pub fn set_metadata(&mut self, key: &str, value: GgufValue) -> &mut Self {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key.to_owned(), value)),
        }
        self
    }

    /// Adds a tensor; `dims` are in GGUF order (ne0 first).
    pub fn tensor(&mut self, name: &str, ty: GgmlType, dims: &[u64], data: Vec<u8>) -> &mut Self {
        self.tensors
            .push((name.to_owned(), ty, dims.to_vec(), data));
        self
    }

    /// Serializes the image.
    pub fn build(&self) -> Vec<u8> {
        const ALIGN: usize = 32;
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            GgufValue::String(k.clone()).write_payload(&mut out);
            out.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            v.write_payload(&mut out);
        }
        let mut offset = 0usize;
        for (name, ty, dims, data) in &self.tensors {
            GgufValue::String(name.clone()).write_payload(&mut out);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += data.len().div_ceil(ALIGN) * ALIGN;
        }
        out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
        for (_, _, _, data) in &self.tensors {
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
        }
        out
    }
}
