//! Opening, validating and reading stack files.

use crate::checksum::xxh64;
use crate::error::{corrupt, io_err, FormatError, Result};
use crate::header::{align_up, decode_header, Header, Preamble, Region};
use crate::types::{FileDescription, StackFileContents, TensorView};
use crate::writer::StackFileWriter;
use crate::PREAMBLE_LEN;
use bitstack_core::signs::words_per_row;
use bitstack_core::{
    BlockId, BlockSource, CoreError, Factor, FactorDtype, FactorRef, ModelLayout, ResidualBlock,
    ResidualBlockRef, StackMeta, UniversalOrder,
};
use half::f16;
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

/// 64 bytes aligned to 64, so an owned copy of a file gives payloads the same alignment
/// guarantees as a page-aligned memory map.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct Line([u8; 64]);

enum Storage {
    Mapped(Mmap),
    Owned { lines: Vec<Line>, len: usize },
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned { lines, len } => &bytemuck::cast_slice::<Line, u8>(lines)[..*len],
        }
    }
}

/// A validated stack file, memory-mapped ([`StackFile::open`]) or held in memory
/// ([`StackFile::from_bytes`]).
///
/// Opening checks the preamble and header checksums, every count, offset and length (with
/// checked arithmetic, before allocating), the placement of every payload (aligned, inside the
/// file, non-overlapping, zero padding between), the stack metas, the universal order and the
/// resident tensors' checksums. Block checksums are verified when a block is loaded, so opening
/// a multi-GB file costs only its header and resident tensors.
///
/// `StackFile` is `Send + Sync`; blocks can be loaded from many threads at once.
pub struct StackFile {
    storage: Storage,
    version: (u16, u16),
    header: Header,
}

impl std::fmt::Debug for StackFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackFile")
            .field("version", &self.version)
            .field("file_len", &self.storage.bytes().len())
            .field("stacks", &self.header.stacks.len())
            .field("blocks", &self.header.order.len())
            .field("residents", &self.header.residents.len())
            .finish()
    }
}

impl StackFile {
    /// Memory-maps and validates the file at `path`.
    ///
    /// The map is read-only. As with any memory map, the file must not be truncated or modified
    /// in place while open; this crate's writers never do that (they write a temporary file
    /// and rename it over the old one, which leaves existing maps on the old contents).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(io_err(path))?;
        let meta = file.metadata().map_err(io_err(path))?;
        if !meta.is_file() {
            // A directory opens but cannot be mapped ("No such device"); a device or FIFO
            // may never end. Say what it is instead.
            let what = if meta.is_dir() {
                "is a directory, not a stack file"
            } else {
                "is not a regular file"
            };
            return Err(FormatError::NotRegularFile {
                path: path.to_path_buf(),
                what,
            });
        }
        let len = meta.len();
        if len < PREAMBLE_LEN as u64 {
            // Too short to be valid; read it so the error says exactly why (and because
            // mapping an empty file fails on some platforms).
            let bytes = std::fs::read(path).map_err(io_err(path))?;
            return Self::from_bytes(&bytes);
        }
        // SAFETY: the map is read-only and only ever read through `&[u8]`; the documented
        // contract above (no in-place modification while open) is the usual memmap one.
        let map = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
        Self::from_storage(Storage::Mapped(map))
    }

    /// Validates a copy of `bytes`. The copy is 64-byte aligned, so every zero-copy view works
    /// no matter how `bytes` itself is aligned.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut lines = vec![Line([0; 64]); bytes.len().div_ceil(64)];
        bytemuck::cast_slice_mut::<Line, u8>(&mut lines)[..bytes.len()].copy_from_slice(bytes);
        Self::from_storage(Storage::Owned {
            lines,
            len: bytes.len(),
        })
    }

    fn from_storage(storage: Storage) -> Result<Self> {
        let bytes = storage.bytes();
        let pre = Preamble::decode(bytes)?;
        let header_bytes = &bytes[PREAMBLE_LEN..PREAMBLE_LEN + pre.header_len as usize];
        let computed = xxh64(header_bytes, 0);
        if computed != pre.header_hash {
            return Err(FormatError::ChecksumMismatch {
                what: "header".into(),
                stored: pre.header_hash,
                computed,
            });
        }
        let header = decode_header(header_bytes, pre.major, pre.minor)?;
        check_placement(bytes, PREAMBLE_LEN as u64 + pre.header_len, &header)?;
        for (spec, r) in &header.residents {
            verify(bytes, r, || format!("tensor {:?}", spec.name))?;
        }
        Ok(Self {
            version: (pre.major, pre.minor),
            header,
            storage,
        })
    }

    /// Format version `(major, minor)` the file was written with.
    pub fn version(&self) -> (u16, u16) {
        self.version
    }
    /// Total file length in bytes.
    pub fn file_len(&self) -> u64 {
        self.storage.bytes().len() as u64
    }
    /// The runtime's view of the container: stack metas, universal order and the bytes of
    /// all resident tensors *as stored* (blobs included). For a file holding a model, budget
    /// with [`ModelContract::held_layout`](crate::ModelContract::held_layout) instead: it
    /// counts what an engine holds (f32 norms, the embedding at its precision, no tokenizer),
    /// the accounting the `bitstack` tool uses.
    pub fn layout(&self) -> ModelLayout {
        ModelLayout {
            stacks: self.header.stacks.clone(),
            order: self.header.order.clone(),
            resident_bytes: self.header.residents.iter().map(|(_, r)| r.len).sum(),
        }
    }
    /// Stack metas, indexed by `BlockId::weight`.
    pub fn stacks(&self) -> &[Arc<StackMeta>] {
        &self.header.stacks
    }
    /// The universal stack order.
    pub fn order(&self) -> &UniversalOrder {
        &self.header.order
    }
    /// The free-form metadata map.
    pub fn metadata(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.header.metadata
    }
    /// A metadata value as text; `None` when absent or not valid UTF-8.
    pub fn metadata_str(&self, key: &str) -> Option<&str> {
        self.header
            .metadata
            .get(key)
            .and_then(|v| std::str::from_utf8(v).ok())
    }
    /// All resident tensors (checksums were verified at open), in file order.
    pub fn residents(&self) -> impl ExactSizeIterator<Item = TensorView<'_>> + '_ {
        let bytes = self.storage.bytes();
        self.header
            .residents
            .iter()
            .map(move |(spec, r)| TensorView::new(spec, &bytes[r.range()]))
    }
    /// The resident tensor called `name`.
    pub fn resident(&self, name: &str) -> Option<TensorView<'_>> {
        self.residents().find(|t| t.name() == name)
    }
    /// Byte offset and length of a block's payload within the file, for engines that read
    /// blocks with their own I/O.
    pub fn block_extent(&self, id: BlockId) -> Result<(u64, u64)> {
        let r = self.region(id)?;
        Ok((r.offset, r.len))
    }

    fn region(&self, id: BlockId) -> Result<&Region> {
        self.header
            .blocks
            .get(id.weight as usize)
            .and_then(|levels| levels.get(id.level as usize))
            .ok_or(FormatError::NoSuchBlock {
                weight: id.weight,
                level: id.level,
            })
    }

    fn payload(&self, id: BlockId, verify_checksum: bool) -> Result<(&StackMeta, &[u8])> {
        let r = self.region(id)?;
        let bytes = self.storage.bytes();
        if verify_checksum {
            verify(bytes, r, || format!("block {}:{}", id.weight, id.level))?;
        }
        Ok((&self.header.stacks[id.weight as usize], &bytes[r.range()]))
    }

    /// Zero-copy view of a block, checksum verified (use this unless you have just verified the
    /// file with [`StackFile::verify_all`]). Shapes, sign padding and factor finiteness are
    /// checked as well.
    pub fn block_view(&self, id: BlockId) -> Result<ResidualBlockRef<'_>> {
        let (meta, payload) = self.payload(id, true)?;
        view_payload(meta, payload, id)
    }
    /// [`StackFile::block_view`] without the checksum (structure and finiteness still checked).
    pub fn block_view_unverified(&self, id: BlockId) -> Result<ResidualBlockRef<'_>> {
        let (meta, payload) = self.payload(id, false)?;
        view_payload(meta, payload, id)
    }
    /// Loads a block into owned memory (one copy), checksum verified.
    pub fn read_block(&self, id: BlockId) -> Result<ResidualBlock> {
        let (meta, payload) = self.payload(id, true)?;
        match view_payload(meta, payload, id) {
            Ok(v) => Ok(v.to_owned()),
            Err(FormatError::Misaligned(_)) => copy_payload(meta, payload),
            Err(e) => Err(e),
        }
    }
    /// Tells the kernel that the mapped pages are not needed for now, so blocks already
    /// copied into owned memory ([`StackFile::read_block`], [`BlockSource::load_block`]) stop
    /// being counted twice in the process's resident set (once owned, once as mapped file
    /// pages in `RssFile`). Later reads, including views borrowed before the call, simply
    /// fault the pages back in from the page cache or the file; nothing is lost.
    ///
    /// A hint: failures are ignored, and instances from [`StackFile::from_bytes`] (and
    /// non-Unix platforms) do nothing.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        if let Storage::Mapped(map) = &self.storage {
            // SAFETY: `MADV_DONTNEED` is "unchecked" because on private or anonymous memory it
            // discards the contents (they read back as zeros or as the original file), which
            // would change bytes behind live borrows. This map is a read-only `MAP_SHARED`
            // mapping of a file (`Mmap::map` in `StackFile::open`): it has no private or dirty
            // pages, so the advice only drops this process's page-table entries for clean
            // page-cache pages, and the next access refaults the very same bytes from the page
            // cache or the file. Borrows of the mapping (views handed out earlier) therefore
            // never observe a change, given the contract of `StackFile::open` that the file
            // is not modified in place while open.
            let _ = unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }
    /// Verifies every block's checksum and contents (residents are verified at open).
    pub fn verify_all(&self) -> Result<()> {
        for id in self.header.order.as_slice() {
            self.block_view(*id)?;
        }
        Ok(())
    }
    /// The layout description (metadata, resident specs, stacks), e.g. to start a writer.
    pub fn description(&self) -> FileDescription {
        FileDescription {
            metadata: self.header.metadata.clone(),
            residents: self
                .header
                .residents
                .iter()
                .map(|(s, _)| s.clone())
                .collect(),
            stacks: self.header.stacks.iter().map(|m| (**m).clone()).collect(),
        }
    }
    /// Reads the whole file into memory (every block verified).
    pub fn to_contents(&self) -> Result<StackFileContents> {
        let blocks = self
            .header
            .stacks
            .iter()
            .enumerate()
            .map(|(w, m)| {
                (0..m.levels)
                    .map(|l| self.read_block(BlockId::new(w as u32, l)))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let d = self.description();
        Ok(StackFileContents {
            metadata: d.metadata,
            residents: self.residents().map(|t| t.to_owned()).collect(),
            stacks: d.stacks,
            blocks,
            order: self.header.order.clone(),
        })
    }
    /// Writes a copy of this file with a different universal order (e.g. after sorting the
    /// blocks), streaming one block at a time; every block is verified on the way. `path` may
    /// be this file's own path: the replacement is atomic and this open map keeps the old data.
    pub fn write_with_order(&self, path: impl AsRef<Path>, order: UniversalOrder) -> Result<()> {
        let mut w = StackFileWriter::create(path, &self.description())?;
        for (i, t) in self.residents().enumerate() {
            w.write_resident(i, t.bytes())?;
        }
        for (wi, m) in self.header.stacks.iter().enumerate() {
            for l in 0..m.levels {
                let id = BlockId::new(wi as u32, l);
                w.write_block(id, self.block_view(id)?)?;
            }
        }
        w.finish(order)
    }
}

impl BlockSource for StackFile {
    fn load_block(&self, id: BlockId) -> bitstack_core::Result<ResidualBlock> {
        self.read_block(id).map_err(|e| match e {
            FormatError::NoSuchBlock { weight, level } => CoreError::NoSuchBlock { weight, level },
            other => CoreError::Source(Box::new(other)),
        })
    }
}

fn verify(bytes: &[u8], r: &Region, what: impl FnOnce() -> String) -> Result<()> {
    let computed = xxh64(&bytes[r.range()], 0);
    if computed != r.hash {
        return Err(FormatError::ChecksumMismatch {
            what: what(),
            stored: r.hash,
            computed,
        });
    }
    Ok(())
}

/// Byte lengths of the parts of a block payload: signs, then A and B (f16), or then the A and
/// B scales and the A and B codes (int8). Their sum is the region length the header decoder
/// checked against this shape, so every part lies inside the payload.
fn parts(meta: &StackMeta) -> Vec<usize> {
    // Cannot overflow: the header decoder checked this shape's block size against the file.
    let signs = meta.rows * words_per_row(meta.cols) * 8;
    let (a, b) = (meta.rows * meta.rank, meta.cols * meta.rank);
    match meta.factors {
        FactorDtype::F16 => vec![signs, 2 * a, 2 * b],
        FactorDtype::I8 => vec![signs, 4 * meta.rank, 4 * meta.rank, a, b],
    }
}

/// `payload` cut into the lengths of [`parts`]; a typed error if it is not exactly that long.
fn split_parts<'a>(meta: &StackMeta, payload: &'a [u8]) -> Result<Vec<&'a [u8]>> {
    let lens = parts(meta);
    let total: usize = lens.iter().sum();
    if total != payload.len() {
        return Err(corrupt(format!(
            "stack {:?}: block payload of {} bytes, {}x{} rank {} ({} factors) needs {total}",
            meta.name,
            payload.len(),
            meta.rows,
            meta.cols,
            meta.rank,
            meta.factors
        )));
    }
    let mut out = Vec::with_capacity(lens.len());
    let mut rest = payload;
    for n in lens {
        let (head, tail) = rest.split_at(n);
        out.push(head);
        rest = tail;
    }
    Ok(out)
}

fn view_payload<'a>(
    meta: &StackMeta,
    payload: &'a [u8],
    id: BlockId,
) -> Result<ResidualBlockRef<'a>> {
    let p = split_parts(meta, payload)?;
    let misaligned = |_| FormatError::Misaligned(format!("block {}:{}", id.weight, id.level));
    let signs: &[u64] = bytemuck::try_cast_slice(p[0]).map_err(misaligned)?;
    let (a, b) = match meta.factors {
        FactorDtype::F16 => (
            FactorRef::F16(bytemuck::try_cast_slice(p[1]).map_err(misaligned)?),
            FactorRef::F16(bytemuck::try_cast_slice(p[2]).map_err(misaligned)?),
        ),
        FactorDtype::I8 => (
            FactorRef::I8 {
                q: bytemuck::cast_slice(p[3]),
                scale: bytemuck::try_cast_slice(p[1]).map_err(misaligned)?,
            },
            FactorRef::I8 {
                q: bytemuck::cast_slice(p[4]),
                scale: bytemuck::try_cast_slice(p[2]).map_err(misaligned)?,
            },
        ),
    };
    Ok(ResidualBlockRef::with_factors(
        meta.rows, meta.cols, meta.rank, signs, a, b,
    )?)
}

/// Alignment-independent decode (the fallback when a zero-copy cast is impossible).
pub(crate) fn copy_payload(meta: &StackMeta, payload: &[u8]) -> Result<ResidualBlock> {
    let p = split_parts(meta, payload)?;
    let signs = p[0]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    let half = |r: &[u8]| -> Vec<f16> {
        r.chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]))
            .collect()
    };
    let float = |r: &[u8]| -> Vec<f32> {
        r.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let codes = |r: &[u8]| -> Vec<i8> { r.iter().map(|&v| v as i8).collect() };
    let (a, b) = match meta.factors {
        FactorDtype::F16 => (Factor::F16(half(p[1])), Factor::F16(half(p[2]))),
        FactorDtype::I8 => (
            Factor::I8 {
                q: codes(p[3]),
                scale: float(p[1]),
            },
            Factor::I8 {
                q: codes(p[4]),
                scale: float(p[2]),
            },
        ),
    };
    Ok(ResidualBlock::with_factors(
        meta.rows, meta.cols, meta.rank, signs, a, b,
    )?)
}

/// Checks that the payloads tile the data region exactly: sorted by offset, each starts at the
/// next multiple of [`crate::ALIGN`] after the previous one (the first after the header), the
/// last ends at the end of the file, and the alignment padding between them is zero. This makes
/// every byte of the file either checksummed or checked, and rules out overlap.
fn check_placement(bytes: &[u8], header_end: u64, h: &Header) -> Result<()> {
    // Labels are built only on error: a model has thousands of payloads.
    #[derive(Clone, Copy)]
    enum Owner {
        Tensor(usize),
        Block(usize, usize),
    }
    let label = |o: Owner| match o {
        Owner::Tensor(i) => format!("tensor {:?}", h.residents[i].0.name),
        Owner::Block(w, l) => format!("block {w}:{l}"),
    };
    let mut regions: Vec<(Region, Owner)> = Vec::new();
    for (i, (_, r)) in h.residents.iter().enumerate() {
        regions.push((*r, Owner::Tensor(i)));
    }
    for (w, levels) in h.blocks.iter().enumerate() {
        for (l, r) in levels.iter().enumerate() {
            regions.push((*r, Owner::Block(w, l)));
        }
    }
    regions.sort_by_key(|(r, _)| (r.offset, r.len));
    let file_len = bytes.len() as u64;
    let mut end = header_end;
    for &(ref r, owner) in &regions {
        let expected = align_up(end).ok_or_else(|| corrupt("offset overflow"))?;
        if r.offset != expected {
            return Err(corrupt(format!(
                "{} starts at {} but must start at {expected} (payloads are packed at {}-byte alignment)",
                label(owner),
                r.offset,
                crate::ALIGN
            )));
        }
        let new_end = r
            .offset
            .checked_add(r.len)
            .filter(|&e| e <= file_len)
            .ok_or_else(|| {
                corrupt(format!(
                    "{} ({} bytes at {}) extends past the end of the file",
                    label(owner),
                    r.len,
                    r.offset
                ))
            })?;
        // `expected <= r.offset <= file_len` here, so the padding range is in bounds.
        if bytes[end as usize..r.offset as usize]
            .iter()
            .any(|&b| b != 0)
        {
            return Err(corrupt(format!("non-zero padding before {}", label(owner))));
        }
        end = new_end;
    }
    if end != file_len {
        return Err(corrupt(format!(
            "{} trailing bytes after the last payload",
            file_len - end
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitstack_core::testutil::random_block_with;

    /// A payload at an odd address cannot be viewed zero-copy; the view reports it (no UB, no
    /// panic) and the owned load falls back to an alignment-free copy with the same result.
    #[test]
    fn misaligned_payload_falls_back_to_copy() {
        for factors in [FactorDtype::F16, FactorDtype::I8] {
            let block = random_block_with(5, 70, 3, 42, factors);
            let meta = StackMeta {
                name: "w".into(),
                rows: 5,
                cols: 70,
                rank: 3,
                levels: 1,
                scale: None,
                factors,
            };
            let payload = crate::writer::block_payload(&block.view());
            assert_eq!(payload.len() as u64, meta.block_bytes());
            // Place the payload at an address that is 1 mod 8 (and so misaligned for u64).
            let mut buf = vec![Line([0; 64]); payload.len().div_ceil(64) + 1];
            let bytes = bytemuck::cast_slice_mut::<Line, u8>(&mut buf);
            bytes[1..1 + payload.len()].copy_from_slice(&payload);
            let odd = &bytes[1..1 + payload.len()];
            let id = BlockId::new(0, 0);
            assert!(matches!(
                view_payload(&meta, odd, id),
                Err(FormatError::Misaligned(_))
            ));
            assert_eq!(copy_payload(&meta, odd).unwrap(), block);
            let aligned = payload_aligned(&payload);
            let aligned = &bytemuck::cast_slice(&aligned)[..payload.len()];
            assert_eq!(view_payload(&meta, aligned, id).unwrap().to_owned(), block);
            // A payload one byte short (or long) is a typed error, not a panic.
            assert!(matches!(
                view_payload(&meta, &aligned[..payload.len() - 1], id),
                Err(FormatError::Corrupt(_))
            ));
            assert!(copy_payload(&meta, &odd[..payload.len() - 1]).is_err());
        }
    }

    fn payload_aligned(p: &[u8]) -> Vec<u64> {
        let mut v = vec![0u64; p.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut v)[..p.len()].copy_from_slice(p);
        v
    }
}
