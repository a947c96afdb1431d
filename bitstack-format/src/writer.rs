//! Crash-safe, streaming stack-file writing.

use crate::checksum::xxh64;
use crate::error::{io_err, FormatError, Result};
use crate::header::{encode_header, file_major, plan, validate_description, Preamble, Region};
use crate::types::{FileDescription, StackFileContents};
use crate::{FORMAT_MINOR, MAX_HEADER_LEN, PREAMBLE_LEN};
use bitstack_core::FactorRef;
use bitstack_core::{BlockId, ResidualBlockRef, UniversalOrder};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes a stack file without holding all blocks in memory.
///
/// Payload offsets follow from the shapes alone, so the whole file is laid out by
/// [`StackFileWriter::create`]. Blocks and resident tensors may then be written in any order,
/// each exactly once; [`StackFileWriter::finish`] adds the universal order and checksums,
/// fsyncs, and renames the temporary file over `path`. Until then `path` is untouched: a writer
/// dropped early (error, panic, `?`) deletes its temporary file and leaves any existing file
/// intact.
///
/// The temporary file is `.<name>.tmp-<pid>-<n>` next to `path` (same filesystem, so the
/// rename is atomic).
#[derive(Debug)]
pub struct StackFileWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: File,
    desc: FileDescription,
    header_len: u64,
    resident_regions: Vec<Option<Region>>,
    block_regions: Vec<Vec<Option<Region>>>,
    resident_offsets: Vec<u64>,
    block_offsets: Vec<Vec<u64>>,
    finished: bool,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl StackFileWriter {
    /// Validates `desc`, lays the file out and creates the temporary file.
    pub fn create(path: impl AsRef<Path>, desc: &FileDescription) -> Result<Self> {
        validate_description(desc)?;
        let path = path.as_ref().to_path_buf();
        let header_len = encode_header(
            desc,
            &dummy_regions(desc.residents.len()),
            &dummy_blocks(desc),
            None,
            file_major(desc),
        )?
        .len() as u64;
        if header_len > MAX_HEADER_LEN {
            return Err(FormatError::InvalidInput(format!(
                "header would be {header_len} bytes (limit {MAX_HEADER_LEN}); store large blobs as U8 resident tensors"
            )));
        }
        let (resident_offsets, block_offsets, file_len) = plan(desc, header_len)?;
        let name = path.file_name().ok_or_else(|| {
            FormatError::InvalidInput(format!("{} has no file name", path.display()))
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(
            ".tmp-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = path.with_file_name(tmp_name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        let w = Self {
            path,
            tmp,
            file,
            header_len,
            resident_regions: vec![None; desc.residents.len()],
            block_regions: desc
                .stacks
                .iter()
                .map(|m| vec![None; m.levels as usize])
                .collect(),
            resident_offsets,
            block_offsets,
            desc: desc.clone(),
            finished: false,
        };
        // Unwritten bytes (padding, the header until `finish`) read back as zeros.
        w.file.set_len(file_len).map_err(io_err(&w.tmp))?;
        Ok(w)
    }

    /// The path the finished file will have.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        let f = &mut self.file;
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.write_all(bytes))
            .map_err(io_err(&self.tmp))
    }

    /// Writes resident tensor `index` (of `FileDescription::residents`); `data` is its
    /// little-endian payload.
    pub fn write_resident(&mut self, index: usize, data: &[u8]) -> Result<()> {
        let spec = self
            .desc
            .residents
            .get(index)
            .ok_or_else(|| FormatError::InvalidInput(format!("no resident tensor #{index}")))?;
        if spec.byte_len() != Some(data.len() as u64) {
            return Err(FormatError::InvalidInput(format!(
                "tensor {:?}: shape {:?} of {:?} needs {:?} bytes, got {}",
                spec.name,
                spec.shape,
                spec.dtype,
                spec.byte_len(),
                data.len()
            )));
        }
        if self.resident_regions[index].is_some() {
            return Err(FormatError::InvalidInput(format!(
                "tensor {:?} written twice",
                spec.name
            )));
        }
        let offset = self.resident_offsets[index];
        self.write_at(offset, data)?;
        self.resident_regions[index] = Some(Region {
            offset,
            len: data.len() as u64,
            hash: xxh64(data, 0),
        });
        Ok(())
    }

    /// Writes block `id`. Its shape must match the stack meta; it is revalidated (lengths,
    /// sign padding, finite factors) because `ResidualBlockRef`'s fields are public.
    pub fn write_block(&mut self, id: BlockId, block: ResidualBlockRef<'_>) -> Result<()> {
        let (w, l) = (id.weight as usize, id.level as usize);
        let meta = self
            .desc
            .stacks
            .get(w)
            .filter(|m| l < m.levels as usize)
            .ok_or(FormatError::NoSuchBlock {
                weight: id.weight,
                level: id.level,
            })?;
        if (block.rows(), block.cols(), block.rank) != (meta.rows, meta.cols, meta.rank) {
            return Err(FormatError::InvalidInput(format!(
                "block {}:{} is {}x{} rank {}, stack {:?} is {}x{} rank {}",
                id.weight,
                id.level,
                block.rows(),
                block.cols(),
                block.rank,
                meta.name,
                meta.rows,
                meta.cols,
                meta.rank
            )));
        }
        if block.factor_dtype() != meta.factors {
            return Err(FormatError::InvalidInput(format!(
                "block {}:{} has {} factors, stack {:?} {}",
                id.weight,
                id.level,
                block.factor_dtype(),
                meta.name,
                meta.factors
            )));
        }
        let block = ResidualBlockRef::with_factors(
            meta.rows,
            meta.cols,
            meta.rank,
            block.signs.words(),
            block.a,
            block.b,
        )?;
        if self.block_regions[w][l].is_some() {
            return Err(FormatError::InvalidInput(format!(
                "block {}:{} written twice",
                id.weight, id.level
            )));
        }
        // Little-endian target (enforced in lib.rs): the in-memory bytes are the file bytes.
        let payload = block_payload(&block);
        debug_assert_eq!(payload.len() as u64, meta.block_bytes());
        let offset = self.block_offsets[w][l];
        self.write_at(offset, &payload)?;
        self.block_regions[w][l] = Some(Region {
            offset,
            len: payload.len() as u64,
            hash: xxh64(&payload, 0),
        });
        Ok(())
    }

    /// Completes the file: checks that every payload was written and that `order` matches the
    /// stacks, writes header and preamble, fsyncs, renames over `path` and fsyncs the directory.
    pub fn finish(mut self, order: UniversalOrder) -> Result<()> {
        let missing = |what: String| {
            Err(FormatError::InvalidInput(format!(
                "{what} was never written"
            )))
        };
        let mut residents = Vec::with_capacity(self.resident_regions.len());
        for (r, spec) in self.resident_regions.iter().zip(&self.desc.residents) {
            match r {
                Some(r) => residents.push(*r),
                None => return missing(format!("tensor {:?}", spec.name)),
            }
        }
        let mut blocks = Vec::with_capacity(self.block_regions.len());
        for (w, levels) in self.block_regions.iter().enumerate() {
            let mut v = Vec::with_capacity(levels.len());
            for (l, r) in levels.iter().enumerate() {
                match r {
                    Some(r) => v.push(*r),
                    None => return missing(format!("block {w}:{l}")),
                }
            }
            blocks.push(v);
        }
        let levels: Vec<u16> = self.desc.stacks.iter().map(|m| m.levels).collect();
        if order.levels() != levels.as_slice() {
            return Err(FormatError::InvalidInput(format!(
                "universal order is for levels {:?}, stacks have {levels:?}",
                order.levels()
            )));
        }
        let major = file_major(&self.desc);
        let header = encode_header(&self.desc, &residents, &blocks, Some(&order), major)?;
        if header.len() as u64 != self.header_len {
            // Cannot happen (the length depends only on the description); refuse rather than
            // write a file whose payloads overlap the header.
            return Err(FormatError::InvalidInput(
                "header length changed after layout".into(),
            ));
        }
        let file_len = self.file.metadata().map_err(io_err(&self.tmp))?.len();
        let pre = Preamble {
            major,
            minor: FORMAT_MINOR,
            header_len: self.header_len,
            header_hash: xxh64(&header, 0),
            file_len,
        };
        self.write_at(PREAMBLE_LEN as u64, &header)?;
        self.write_at(0, &pre.encode())?;
        self.file.sync_all().map_err(io_err(&self.tmp))?;
        std::fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))?;
        self.finished = true;
        sync_parent_dir(&self.path)
    }
}

impl Drop for StackFileWriter {
    fn drop(&mut self) {
        if !self.finished {
            // Best effort: nothing useful can be done with an error while dropping.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Makes the rename durable: without it a crash can leave the directory entry pointing at the
/// old file (or at nothing) even though the data was fsynced.
fn sync_parent_dir(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

fn dummy_regions(n: usize) -> Vec<Region> {
    vec![
        Region {
            offset: 0,
            len: 0,
            hash: 0
        };
        n
    ]
}

fn dummy_blocks(desc: &FileDescription) -> Vec<Vec<Region>> {
    desc.stacks
        .iter()
        .map(|m| dummy_regions(m.levels as usize))
        .collect()
}

/// Writes `contents` to `path` atomically (temporary file, fsync, rename).
pub fn write_stack_file(path: impl AsRef<Path>, contents: &StackFileContents) -> Result<()> {
    if contents.blocks.len() != contents.stacks.len() {
        return Err(FormatError::InvalidInput(format!(
            "{} block lists for {} stacks",
            contents.blocks.len(),
            contents.stacks.len()
        )));
    }
    for (m, b) in contents.stacks.iter().zip(&contents.blocks) {
        if b.len() != m.levels as usize {
            return Err(FormatError::InvalidInput(format!(
                "stack {:?} has {} levels but {} blocks",
                m.name,
                m.levels,
                b.len()
            )));
        }
    }
    let mut w = StackFileWriter::create(path, &contents.description())?;
    for (i, t) in contents.residents.iter().enumerate() {
        w.write_resident(i, &t.data)?;
    }
    for (wi, levels) in contents.blocks.iter().enumerate() {
        for (l, b) in levels.iter().enumerate() {
            w.write_block(BlockId::new(wi as u32, l as u16), b.view())?;
        }
    }
    w.finish(contents.order.clone())
}

/// The payload bytes of a (validated) block. f16: signs | A | B. int8: signs | A scales |
/// B scales | A codes | B codes (the f32 scales right after the 8-byte-aligned signs, so a
/// mapped payload casts in place). Little-endian target (enforced in lib.rs): the in-memory
/// bytes are the file bytes.
pub(crate) fn block_payload(block: &ResidualBlockRef<'_>) -> Vec<u8> {
    let signs: &[u8] = bytemuck::cast_slice(block.signs.words());
    match (block.a, block.b) {
        (FactorRef::F16(a), FactorRef::F16(b)) => {
            [signs, bytemuck::cast_slice(a), bytemuck::cast_slice(b)].concat()
        }
        (FactorRef::I8 { q: qa, scale: sa }, FactorRef::I8 { q: qb, scale: sb }) => [
            signs,
            bytemuck::cast_slice(sa),
            bytemuck::cast_slice(sb),
            bytemuck::cast_slice(qa),
            bytemuck::cast_slice(qb),
        ]
        .concat(),
        _ => unreachable!("a validated block's factors share a dtype"),
    }
}
