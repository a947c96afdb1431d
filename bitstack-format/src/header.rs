//! Byte-level encoding of the preamble and header (the specification is in the crate docs).

use crate::checksum::xxh64;
use crate::error::{corrupt, FormatError, Result};
use crate::types::{DType, FileDescription, TensorSpec};
use crate::{
    ALIGN, FORMAT_MAJOR, FORMAT_MAJOR_F16, FORMAT_MINOR, MAGIC, MAX_HEADER_LEN, MAX_TENSOR_DIMS,
    PREAMBLE_LEN,
};
use bitstack_core::{BlockId, FactorDtype, StackMeta, UniversalOrder};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// Where a payload lives and what it hashes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Region {
    pub offset: u64,
    pub len: u64,
    pub hash: u64,
}

impl Region {
    pub fn range(&self) -> std::ops::Range<usize> {
        // Valid regions lie inside a buffer that exists in memory, so they fit in usize.
        self.offset as usize..(self.offset + self.len) as usize
    }
}

/// The fixed 64-byte preamble.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Preamble {
    pub major: u16,
    pub minor: u16,
    pub header_len: u64,
    pub header_hash: u64,
    pub file_len: u64,
}

impl Preamble {
    pub fn encode(&self) -> [u8; PREAMBLE_LEN] {
        let mut p = [0u8; PREAMBLE_LEN];
        p[0..8].copy_from_slice(&MAGIC);
        p[8..10].copy_from_slice(&self.major.to_le_bytes());
        p[10..12].copy_from_slice(&self.minor.to_le_bytes());
        // 12..16 flags = 0
        p[16..24].copy_from_slice(&(PREAMBLE_LEN as u64).to_le_bytes());
        p[24..32].copy_from_slice(&self.header_len.to_le_bytes());
        p[32..40].copy_from_slice(&self.header_hash.to_le_bytes());
        p[40..48].copy_from_slice(&self.file_len.to_le_bytes());
        // 48..56 reserved = 0
        let h = xxh64(&p[..56], 0);
        p[56..64].copy_from_slice(&h.to_le_bytes());
        p
    }

    /// Validates the preamble of `bytes` (the whole file) against its length.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let avail = bytes.len() as u64;
        if bytes.len() < 8 {
            return Err(FormatError::Truncated {
                what: "magic",
                needed: 8,
                available: avail,
            });
        }
        if bytes[..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        if bytes.len() < PREAMBLE_LEN {
            return Err(FormatError::Truncated {
                what: "preamble",
                needed: PREAMBLE_LEN as u64,
                available: avail,
            });
        }
        let p = &bytes[..PREAMBLE_LEN];
        let u16_at = |i: usize| u16::from_le_bytes([p[i], p[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&p[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let (major, minor) = (u16_at(8), u16_at(10));
        // The version is checked before the checksum so that a file from a newer writer gets
        // the actionable "upgrade" error even if that writer changed the preamble.
        if major != FORMAT_MAJOR && major != FORMAT_MAJOR_F16 {
            return Err(FormatError::UnsupportedVersion {
                major,
                minor,
                supported_major: FORMAT_MAJOR,
            });
        }
        let stored = u64_at(56);
        let computed = xxh64(&p[..56], 0);
        if stored != computed {
            return Err(FormatError::ChecksumMismatch {
                what: "preamble".into(),
                stored,
                computed,
            });
        }
        if u32_at(12) != 0 {
            return Err(corrupt(format!("unknown flags {:#x}", u32_at(12))));
        }
        if u64_at(16) != PREAMBLE_LEN as u64 {
            return Err(corrupt(format!(
                "header offset {} (must be {PREAMBLE_LEN})",
                u64_at(16)
            )));
        }
        if u64_at(48) != 0 {
            return Err(corrupt("reserved preamble field is not zero"));
        }
        let pre = Self {
            major,
            minor,
            header_len: u64_at(24),
            header_hash: u64_at(32),
            file_len: u64_at(40),
        };
        if pre.file_len != avail {
            return Err(if pre.file_len > avail {
                FormatError::Truncated {
                    what: "file",
                    needed: pre.file_len,
                    available: avail,
                }
            } else {
                corrupt(format!(
                    "{avail} bytes present, preamble says {}",
                    pre.file_len
                ))
            });
        }
        if pre.header_len > MAX_HEADER_LEN {
            return Err(corrupt(format!(
                "header length {} exceeds the {MAX_HEADER_LEN}-byte limit",
                pre.header_len
            )));
        }
        let header_end = PREAMBLE_LEN as u64 + pre.header_len;
        if header_end > avail {
            return Err(FormatError::Truncated {
                what: "header",
                needed: header_end,
                available: avail,
            });
        }
        Ok(pre)
    }
}

/// The decoded header.
#[derive(Clone, Debug)]
pub(crate) struct Header {
    pub metadata: BTreeMap<String, Vec<u8>>,
    pub residents: Vec<(TensorSpec, Region)>,
    pub stacks: Vec<Arc<StackMeta>>,
    /// `blocks[w][l]`.
    pub blocks: Vec<Vec<Region>>,
    pub order: UniversalOrder,
}

pub(crate) const REGION_LEN: usize = 24;
const ORDER_ENTRY_LEN: usize = 6;

fn put_u32_len(out: &mut Vec<u8>, n: usize, what: &str) -> Result<()> {
    let n = u32::try_from(n)
        .map_err(|_| FormatError::InvalidInput(format!("{what}: {n} exceeds u32::MAX")))?;
    out.extend_from_slice(&n.to_le_bytes());
    Ok(())
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8], what: &str) -> Result<()> {
    put_u32_len(out, b.len(), what)?;
    out.extend_from_slice(b);
    Ok(())
}

fn put_region(out: &mut Vec<u8>, r: &Region) {
    out.extend_from_slice(&r.offset.to_le_bytes());
    out.extend_from_slice(&r.len.to_le_bytes());
    out.extend_from_slice(&r.hash.to_le_bytes());
}

/// Encodes the header. `order` is `None` while only the length is wanted (the writer sizes
/// the header before the order exists; every order of the same stacks encodes equally long).
/// The major version a file of `desc` is written with: [`FORMAT_MAJOR_F16`] (1, readable by
/// every reader) when every stack has f16 factors, else [`FORMAT_MAJOR`] (2), which a 1.x
/// reader rejects instead of misreading the int8 payloads.
pub(crate) fn file_major(desc: &FileDescription) -> u16 {
    if desc.stacks.iter().all(|m| m.factors == FactorDtype::F16) {
        FORMAT_MAJOR_F16
    } else {
        FORMAT_MAJOR
    }
}

/// Header code of a factor dtype (major version 2).
pub(crate) fn factor_code(d: FactorDtype) -> u8 {
    match d {
        FactorDtype::F16 => 0,
        FactorDtype::I8 => 1,
    }
}

pub(crate) fn encode_header(
    desc: &FileDescription,
    resident_regions: &[Region],
    block_regions: &[Vec<Region>],
    order: Option<&UniversalOrder>,
    major: u16,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    put_u32_len(&mut out, desc.metadata.len(), "metadata count")?;
    for (k, v) in &desc.metadata {
        put_bytes(&mut out, k.as_bytes(), "metadata key")?;
        put_bytes(&mut out, v, "metadata value")?;
    }
    put_u32_len(&mut out, desc.residents.len(), "resident tensor count")?;
    for (t, r) in desc.residents.iter().zip(resident_regions) {
        put_bytes(&mut out, t.name.as_bytes(), "tensor name")?;
        out.push(t.dtype.code());
        out.push(t.shape.len() as u8); // bounded by MAX_TENSOR_DIMS in validate_description
        for d in &t.shape {
            out.extend_from_slice(&d.to_le_bytes());
        }
        put_region(&mut out, r);
    }
    put_u32_len(&mut out, desc.stacks.len(), "stack count")?;
    for (m, regions) in desc.stacks.iter().zip(block_regions) {
        put_bytes(&mut out, m.name.as_bytes(), "stack name")?;
        for d in [m.rows, m.cols, m.rank] {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&m.levels.to_le_bytes());
        if major >= 2 {
            out.push(factor_code(m.factors));
        } else if m.factors != FactorDtype::F16 {
            return Err(FormatError::InvalidInput(format!(
                "stack {:?}: {} factors need format major version 2",
                m.name, m.factors
            )));
        }
        match &m.scale {
            None => out.push(0),
            Some(s) => {
                out.push(1);
                for v in s {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        for r in regions {
            put_region(&mut out, r);
        }
    }
    let total: u64 = desc.stacks.iter().map(|m| u64::from(m.levels)).sum();
    out.extend_from_slice(&total.to_le_bytes());
    match order {
        Some(o) => {
            for id in o.as_slice() {
                out.extend_from_slice(&id.weight.to_le_bytes());
                out.extend_from_slice(&id.level.to_le_bytes());
            }
        }
        None => out.resize(out.len() + total as usize * ORDER_ENTRY_LEN, 0),
    }
    Ok(out)
}

/// Checks a description before anything is written.
pub(crate) fn validate_description(desc: &FileDescription) -> Result<()> {
    let bad = |s: String| Err(FormatError::InvalidInput(s));
    if desc.stacks.is_empty() {
        return bad("a stack file needs at least one weight stack".into());
    }
    let mut names = HashSet::new();
    for t in &desc.residents {
        if t.shape.len() > MAX_TENSOR_DIMS {
            return bad(format!(
                "tensor {:?} has {} dims (max {MAX_TENSOR_DIMS})",
                t.name,
                t.shape.len()
            ));
        }
        if t.byte_len().is_none() {
            return bad(format!(
                "tensor {:?}: shape {:?} overflows",
                t.name, t.shape
            ));
        }
        if !names.insert(t.name.as_str()) {
            return bad(format!("duplicate resident tensor name {:?}", t.name));
        }
    }
    let mut names = HashSet::new();
    for m in &desc.stacks {
        m.validate()?;
        if !names.insert(m.name.as_str()) {
            return bad(format!("duplicate stack name {:?}", m.name));
        }
    }
    Ok(())
}

/// Payload placement: residents in order, then blocks weight-major, level-minor, each at the
/// next multiple of [`ALIGN`]. Returns (resident offsets, block offsets, file length).
pub(crate) fn plan(
    desc: &FileDescription,
    header_len: u64,
) -> Result<(Vec<u64>, Vec<Vec<u64>>, u64)> {
    let overflow = || FormatError::InvalidInput("file size overflows u64".into());
    let mut cursor = PREAMBLE_LEN as u64 + header_len;
    let mut place = |len: u64| -> Result<u64> {
        let off = align_up(cursor).ok_or_else(overflow)?;
        cursor = off.checked_add(len).ok_or_else(overflow)?;
        Ok(off)
    };
    let mut res = Vec::with_capacity(desc.residents.len());
    for t in &desc.residents {
        res.push(place(t.byte_len().ok_or_else(overflow)?)?);
    }
    let mut blocks = Vec::with_capacity(desc.stacks.len());
    for m in &desc.stacks {
        let len = checked_block_bytes(m.rows as u64, m.cols as u64, m.rank as u64, m.factors)
            .ok_or_else(overflow)?;
        blocks.push(
            (0..m.levels)
                .map(|_| place(len))
                .collect::<Result<Vec<_>>>()?,
        );
    }
    Ok((res, blocks, cursor))
}

pub(crate) fn align_up(x: u64) -> Option<u64> {
    Some(x.checked_add(ALIGN - 1)? & !(ALIGN - 1))
}

/// `bitstack_core::block_bytes` with overflow checks (the core version trusts its input).
pub(crate) fn checked_block_bytes(
    rows: u64,
    cols: u64,
    rank: u64,
    factors: FactorDtype,
) -> Option<u64> {
    let signs = rows.checked_mul(cols.div_ceil(64))?.checked_mul(8)?;
    let values = rank.checked_mul(rows.checked_add(cols)?)?;
    let factors = match factors {
        FactorDtype::F16 => values.checked_mul(2)?,
        // One byte per value plus an f32 scale per rank for A and one for B.
        FactorDtype::I8 => values.checked_add(rank.checked_mul(8)?)?,
    };
    signs.checked_add(factors)
}

/// Little-endian reader over the header bytes; every read is bounds-checked.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(corrupt(format!(
                "header ends inside {what} (needs {n} bytes, {} left)",
                self.remaining()
            )));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16> {
        let s = self.take(2, what)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64> {
        let mut w = [0u8; 8];
        w.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(w))
    }
    /// A count of entries each at least `min_entry` bytes long, bounded by the bytes left so a
    /// corrupt count can never trigger a huge allocation.
    fn bounded(&self, n: u64, min_entry: usize, what: &'static str) -> Result<usize> {
        let need = n.checked_mul(min_entry as u64);
        match need {
            Some(need) if need <= self.remaining() as u64 => Ok(n as usize),
            _ => Err(corrupt(format!(
                "{what} count {n} cannot fit in the {} header bytes left",
                self.remaining()
            ))),
        }
    }
    fn bytes(&mut self, what: &'static str) -> Result<&'a [u8]> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }
    fn string(&mut self, what: &'static str) -> Result<String> {
        let b = self.bytes(what)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|e| corrupt(format!("{what} is not valid UTF-8: {e}")))
    }
    fn region(&mut self, what: &'static str) -> Result<Region> {
        Ok(Region {
            offset: self.u64(what)?,
            len: self.u64(what)?,
            hash: self.u64(what)?,
        })
    }
}

/// Decodes and validates the header bytes. Regions are checked for shape consistency here and
/// for placement by the caller (which knows the file).
pub(crate) fn decode_header(bytes: &[u8], major: u16, minor: u16) -> Result<Header> {
    let mut c = Cursor { b: bytes, pos: 0 };
    let n = c.u32("metadata count")?;
    let n = c.bounded(n.into(), 8, "metadata")?;
    let mut metadata = BTreeMap::new();
    let mut prev: Option<String> = None;
    for _ in 0..n {
        let key = c.string("metadata key")?;
        let value = c.bytes("metadata value")?.to_vec();
        // Strictly increasing keys: no duplicates, and one canonical byte encoding per map.
        if prev.as_ref().is_some_and(|p| p.as_str() >= key.as_str()) {
            return Err(corrupt(format!(
                "metadata key {key:?} out of order or duplicated"
            )));
        }
        prev = Some(key.clone());
        metadata.insert(key, value);
    }

    let n = c.u32("resident count")?;
    let n = c.bounded(n.into(), 4 + 2 + REGION_LEN, "resident tensor")?;
    let mut residents = Vec::with_capacity(n);
    let mut names = HashSet::new();
    for _ in 0..n {
        let name = c.string("tensor name")?;
        let code = c.u8("tensor dtype")?;
        let dtype = DType::from_code(code)
            .ok_or_else(|| corrupt(format!("tensor {name:?}: unknown dtype code {code}")))?;
        let ndim = c.u8("tensor ndim")? as usize;
        if ndim > MAX_TENSOR_DIMS {
            return Err(corrupt(format!(
                "tensor {name:?}: {ndim} dims (max {MAX_TENSOR_DIMS})"
            )));
        }
        let shape = (0..ndim)
            .map(|_| c.u64("tensor shape"))
            .collect::<Result<Vec<_>>>()?;
        let region = c.region("tensor region")?;
        let spec = TensorSpec { name, dtype, shape };
        if spec.byte_len() != Some(region.len) {
            return Err(corrupt(format!(
                "tensor {:?}: shape {:?} of {dtype:?} does not match payload length {}",
                spec.name, spec.shape, region.len
            )));
        }
        if !names.insert(spec.name.clone()) {
            return Err(corrupt(format!(
                "duplicate resident tensor {:?}",
                spec.name
            )));
        }
        residents.push((spec, region));
    }

    let n = c.u32("stack count")?;
    let n = c.bounded(n.into(), 4 + 3 * 8 + 2 + 1, "stack")?;
    let mut stacks = Vec::with_capacity(n);
    let mut blocks = Vec::with_capacity(n);
    let mut names = HashSet::new();
    for _ in 0..n {
        let name = c.string("stack name")?;
        let rows = c.u64("stack rows")?;
        let cols = c.u64("stack cols")?;
        let rank = c.u64("stack rank")?;
        let levels = c.u16("stack levels")?;
        let factors = if major >= 2 {
            match c.u8("stack factor dtype")? {
                0 => FactorDtype::F16,
                1 => FactorDtype::I8,
                code => {
                    return Err(corrupt(format!(
                        "stack {name:?}: unknown factor dtype code {code} (0 f16, 1 i8)"
                    )))
                }
            }
        } else {
            FactorDtype::F16
        };
        let block_len = checked_block_bytes(rows, cols, rank, factors)
            .ok_or_else(|| corrupt(format!("stack {name:?}: block size overflows")))?;
        let to_usize = |v: u64| {
            usize::try_from(v)
                .map_err(|_| corrupt(format!("stack {name:?}: dimension {v} too large")))
        };
        let (rows, cols, rank) = (to_usize(rows)?, to_usize(cols)?, to_usize(rank)?);
        let scale = match c.u8("scale flag")? {
            0 => None,
            1 => {
                let n = c.bounded(cols as u64, 4, "scale")?;
                let raw = c.take(n * 4, "scale vector")?;
                Some(
                    raw.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                )
            }
            f => {
                return Err(corrupt(format!(
                    "stack {name:?}: scale flag {f} (must be 0 or 1)"
                )))
            }
        };
        let nl = c.bounded(levels.into(), REGION_LEN, "block region")?;
        let regions = (0..nl)
            .map(|_| c.region("block region"))
            .collect::<Result<Vec<_>>>()?;
        if let Some(r) = regions.iter().find(|r| r.len != block_len) {
            return Err(corrupt(format!(
                "stack {name:?}: block payload length {} but {rows}x{cols} rank {rank} ({factors} factors) needs {block_len}",
                r.len
            )));
        }
        let meta = StackMeta {
            name,
            rows,
            cols,
            rank,
            levels,
            scale,
            factors,
        };
        meta.validate()?;
        if !names.insert(meta.name.clone()) {
            return Err(corrupt(format!("duplicate stack name {:?}", meta.name)));
        }
        stacks.push(Arc::new(meta));
        blocks.push(regions);
    }

    let n = c.u64("order length")?;
    let n = c.bounded(n, ORDER_ENTRY_LEN, "order entry")?;
    let mut order = Vec::with_capacity(n);
    for _ in 0..n {
        order.push(BlockId::new(c.u32("order entry")?, c.u16("order entry")?));
    }
    let levels = stacks.iter().map(|m| m.levels).collect();
    let order = UniversalOrder::new(levels, order)?;

    // A newer minor version may append fields this reader does not know; they are covered by
    // the header checksum and ignored. Otherwise the header must be consumed exactly.
    // Always true while FORMAT_MINOR is 0, but the comparison is the rule once it grows.
    #[allow(clippy::absurd_extreme_comparisons)]
    let known_minor = minor <= FORMAT_MINOR;
    if c.remaining() != 0 && known_minor {
        return Err(corrupt(format!(
            "{} unexpected bytes after the header",
            c.remaining()
        )));
    }
    Ok(Header {
        metadata,
        residents,
        stacks,
        blocks,
        order,
    })
}
