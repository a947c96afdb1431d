//! GGML tensor types and their dequantization to f32, following `ggml-quants.c` semantics.

use half::{bf16, f16};
use rayon::prelude::*;

use super::reader::GgufError;

/// Elements per super-block of the K-quant formats.
const QK_K: usize = 256;

/// A GGML tensor element type, as stored in GGUF tensor infos.
///
/// Only the types this crate can read are listed; any other id read from a file is reported as
/// [`GgufError::UnsupportedTensorType`] with its raw number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// IEEE f32.
    F32,
    /// IEEE f16.
    F16,
    /// bfloat16.
    BF16,
    /// 32-element blocks: f16 scale, 4-bit values offset by 8.
    Q4_0,
    /// 32-element blocks: f16 scale and minimum, 4-bit values.
    Q4_1,
    /// 32-element blocks: f16 scale, 5-bit values offset by 16.
    Q5_0,
    /// 32-element blocks: f16 scale and minimum, 5-bit values.
    Q5_1,
    /// 32-element blocks: f16 scale, signed 8-bit values.
    Q8_0,
    /// 256-element super-blocks of 16 sub-blocks, 2-bit values with 4-bit scales/minimums.
    Q2K,
    /// 256-element super-blocks of 8 sub-blocks, 4-bit values with 6-bit scales/minimums.
    Q4K,
    /// 256-element super-blocks of 8 sub-blocks, 5-bit values with 6-bit scales/minimums.
    Q5K,
    /// 256-element super-blocks of 16 sub-blocks, 6-bit values with signed 8-bit scales.
    Q6K,
}

impl GgmlType {
    /// Maps a GGML type id (the `type` field of a GGUF tensor info).
    pub fn from_id(id: u32) -> Result<Self, GgufError> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            other => return Err(GgufError::UnsupportedTensorType(other)),
        })
    }

    /// The GGML type id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2K => 10,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::BF16 => 30,
        }
    }

    /// Elements per block (1 for the plain float types).
    pub fn block_elems(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => 32,
            Self::Q2K | Self::Q4K | Self::Q5K | Self::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q2K => 84,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Bytes needed to store `elems` elements, or `None` when `elems` is not a whole number of
    /// blocks or the size overflows.
    pub fn bytes_for(self, elems: usize) -> Option<usize> {
        if !elems.is_multiple_of(self.block_elems()) {
            return None;
        }
        (elems / self.block_elems()).checked_mul(self.block_bytes())
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantizes `data` (exactly `ty.bytes_for(out.len())` bytes) into `out`.
///
/// Blocks are processed in parallel; the result is bit-identical to a sequential pass.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    let expected = ty.bytes_for(out.len()).ok_or(GgufError::BadTensorShape {
        reason: format!(
            "{} elements is not a multiple of the {ty:?} block size {}",
            out.len(),
            ty.block_elems()
        ),
    })?;
    if data.len() != expected {
        return Err(GgufError::BadTensorShape {
            reason: format!("{ty:?} data is {} bytes, expected {expected}", data.len()),
        });
    }
    let be = ty.block_elems();
    let bb = ty.block_bytes();
    // Blocks are independent; chunks of many blocks keep rayon overhead negligible.
    let blocks_per_task = (4096 / be).max(1);
    out.par_chunks_mut(be * blocks_per_task)
        .zip(data.par_chunks(bb * blocks_per_task))
        .for_each(|(o, d)| {
            for (ob, db) in o.chunks_exact_mut(be).zip(d.chunks_exact(bb)) {
                dequant_block(ty, db, ob);
            }
        });
    Ok(())
}

fn dequant_block(ty: GgmlType, b: &[u8], y: &mut [f32]) {
    match ty {
        GgmlType::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => y[0] = f16_at(b, 0),
        GgmlType::BF16 => y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => {
            let d = f16_at(b, 0);
            let qs = &b[2..18];
            for j in 0..16 {
                y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
                y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
            }
        }
        GgmlType::Q4_1 => {
            let d = f16_at(b, 0);
            let m = f16_at(b, 2);
            let qs = &b[4..20];
            for j in 0..16 {
                y[j] = (qs[j] & 0x0F) as f32 * d + m;
                y[j + 16] = (qs[j] >> 4) as f32 * d + m;
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let (d, m, rest) = if ty == GgmlType::Q5_0 {
                (f16_at(b, 0), None, &b[2..])
            } else {
                (f16_at(b, 0), Some(f16_at(b, 2)), &b[4..])
            };
            let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
            let qs = &rest[4..20];
            for j in 0..16 {
                let h0 = (((qh >> j) << 4) & 0x10) as u8;
                let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                let q0 = ((qs[j] & 0x0F) | h0) as i32;
                let q1 = ((qs[j] >> 4) | h1) as i32;
                match m {
                    None => {
                        y[j] = (q0 - 16) as f32 * d;
                        y[j + 16] = (q1 - 16) as f32 * d;
                    }
                    Some(m) => {
                        y[j] = q0 as f32 * d + m;
                        y[j + 16] = q1 as f32 * d + m;
                    }
                }
            }
        }
        GgmlType::Q8_0 => {
            let d = f16_at(b, 0);
            for j in 0..32 {
                y[j] = (b[2 + j] as i8) as f32 * d;
            }
        }
        GgmlType::Q2K => dequant_q2k(b, y),
        GgmlType::Q4K => dequant_q4k(b, y),
        GgmlType::Q5K => dequant_q5k(b, y),
        GgmlType::Q6K => dequant_q6k(b, y),
    }
}

/// The 6-bit scale and minimum of sub-block `j` packed in the 12 `scales` bytes of Q4_K/Q5_K.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The `(scale, min)` of the two 32-value halves of 64-value chunk `chunk` of a Q4_K/Q5_K
/// super-block: its two packed 6-bit pairs times the block's `d` and `dmin`.
fn chunk_scales_k4(d: f32, dmin: f32, scales: &[u8], chunk: usize) -> [(f32, f32); 2] {
    [2 * chunk, 2 * chunk + 1].map(|j| {
        let (sc, m) = scale_min_k4(j, scales);
        (d * sc as f32, dmin * m as f32)
    })
}

fn dequant_q2k(b: &[u8], y: &mut [f32]) {
    // Layout: scales[16], qs[64], d: f16, dmin: f16.
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    let mut out = 0;
    let mut is = 0;
    for half in 0..2 {
        let q = &qs[half * 32..half * 32 + 32];
        for shift in [0u32, 2, 4, 6] {
            for sub in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * (sc & 0x0F) as f32;
                let ml = dmin * (sc >> 4) as f32;
                for l in 0..16 {
                    y[out] = dl * ((q[sub * 16 + l] >> shift) & 3) as f32 - ml;
                    out += 1;
                }
            }
        }
    }
}

fn dequant_q4k(b: &[u8], y: &mut [f32]) {
    // Layout: d: f16, dmin: f16, scales[12], qs[128].
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (chunk, (q, ys)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let [(d1, m1), (d2, m2)] = chunk_scales_k4(d, dmin, scales, chunk);
        for l in 0..32 {
            ys[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            ys[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

fn dequant_q5k(b: &[u8], y: &mut [f32]) {
    // Layout: d: f16, dmin: f16, scales[12], qh[32], qs[128].
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (chunk, (q, ys)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let [(d1, m1), (d2, m2)] = chunk_scales_k4(d, dmin, scales, chunk);
        let u1 = 1u8 << (2 * chunk);
        let u2 = 2u8 << (2 * chunk);
        for l in 0..32 {
            let hi1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let hi2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            ys[l] = d1 * ((q[l] & 0x0F) + hi1) as f32 - m1;
            ys[l + 32] = d2 * ((q[l] >> 4) + hi2) as f32 - m2;
        }
    }
}

fn dequant_q6k(b: &[u8], y: &mut [f32]) {
    // Layout: ql[128], qh[64], scales: i8[16], d: f16.
    let d = f16_at(b, 208);
    for n in 0..2 {
        let ql = &b[n * 64..n * 64 + 64];
        let qh = &b[128 + n * 32..128 + n * 32 + 32];
        let sc = &b[192 + n * 8..192 + n * 8 + 8];
        let ys = &mut y[n * 128..n * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            ys[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            ys[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            ys[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            ys[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}
