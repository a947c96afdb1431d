//! The exact (f32-table) fused product: tables of f32 partial sums, one per group of four
//! input columns and rank, accumulated in f32. Selected by [`TablePrecision::F32`]; the
//! reference the int8 tables are measured against.
//!
//! [`TablePrecision::F32`]: super::TablePrecision::F32

use super::{FusedCall, ROW_CHUNK};
use crate::block::FactorRef;
use rayon::prelude::*;

/// Scratch floats of [`fused_f32`].
pub(super) fn scratch_len(rows: usize, cols: usize, rank: usize, batch: usize) -> usize {
    let groups = cols.div_ceil(4);
    batch * cols + batch * groups * 16 * rank + rows * batch + rows * batch * rank
}

/// `Y = X Ŵᵀ` with f32 tables; shapes and scratch length are checked by the caller.
pub(super) fn fused_f32(call: FusedCall<'_>, scratch: &mut [f32]) {
    let (rows, cols, rank, batch) = (call.rows, call.cols, call.rank, call.batch);
    let (blocks, inv_scale, x, y) = (call.blocks, call.inv_scale, call.x, call.y);
    let groups = cols.div_ceil(4);
    let lut_per = groups * 16 * rank;
    let (xs, rest) = scratch.split_at_mut(batch * cols);
    let (lut, rest) = rest.split_at_mut(batch * lut_per);
    let (yt, rest) = rest.split_at_mut(rows * batch);
    let acc = &mut rest[..rows * batch * rank];
    // Fold the activation scale into the input once: Ŵx = Ŵ_scaled (x ⊙ inv_scale).
    super::scaled_input_into(xs, x, inv_scale);
    // Tile the groups so the tables touched by one pass over a row chunk stay in L2
    // (~256 KiB across the batch), instead of streaming every batch item's whole table per row.
    let tile = (256 * 1024 / (batch * 16 * rank * 4)).clamp(16, groups.max(16));
    let use_avx2 = avx2_available();
    yt.fill(0.0);
    for blk in blocks {
        lut.par_chunks_mut(lut_per)
            .zip(xs.par_chunks(cols))
            .for_each(|(l, xrow)| match (blk.a, blk.b) {
                (_, FactorRef::F16(b)) => build_lut(|i| b[i].to_f32(), rank, xrow, l),
                // int8: A·Bᵀ = Σ_r qa_r (sa_r·sb_r·qb_r)ᵀ, the scales folded into the table.
                (FactorRef::I8 { scale: sa, .. }, FactorRef::I8 { q, scale: sb }) => build_lut(
                    |i| q[i] as f32 * (sa[i % rank] * sb[i % rank]),
                    rank,
                    xrow,
                    l,
                ),
                (FactorRef::F16(_), FactorRef::I8 { .. }) => {
                    unreachable!("both factors of a block share a dtype (checked at construction)")
                }
            });
        let lut = &*lut;
        acc.fill(0.0);
        yt.par_chunks_mut(ROW_CHUNK * batch)
            .zip(acc.par_chunks_mut(ROW_CHUNK * batch * rank))
            .enumerate()
            .for_each(|(chunk, (ytc, accc))| {
                let nrows = ytc.len() / batch;
                let row0 = chunk * ROW_CHUNK;
                let mut g0 = 0;
                while g0 < groups {
                    let g1 = (g0 + tile).min(groups);
                    for di in 0..nrows {
                        let words = blk.signs.row(row0 + di);
                        for bi in 0..batch {
                            let l = &lut[bi * lut_per..(bi + 1) * lut_per];
                            let a = &mut accc[(di * batch + bi) * rank..][..rank];
                            accumulate_groups(words, l, g0, g1, rank, a, use_avx2);
                        }
                    }
                    g0 = g1;
                }
                for di in 0..nrows {
                    for bi in 0..batch {
                        let s = &accc[(di * batch + bi) * rank..][..rank];
                        ytc[di * batch + bi] += match blk.a {
                            FactorRef::F16(a) => {
                                let a = &a[(row0 + di) * rank..][..rank];
                                s.iter().zip(a).map(|(s, a)| s * a.to_f32()).sum::<f32>()
                            }
                            FactorRef::I8 { q, .. } => {
                                let a = &q[(row0 + di) * rank..][..rank];
                                s.iter().zip(a).map(|(s, &a)| s * a as f32).sum::<f32>()
                            }
                        };
                    }
                }
            });
    }
    for bi in 0..batch {
        for i in 0..rows {
            y[bi * rows + i] = yt[i * batch + bi];
        }
    }
}

/// Table `L[g][v][r]` for one input vector (see module docs). Columns past `cols` count as 0.
/// `b(i)` is the value at flat index `i = j·rank + r` of the `cols × rank` factor.
fn build_lut(b: impl Fn(usize) -> f32 + Copy, rank: usize, x: &[f32], lut: &mut [f32]) {
    let cols = x.len();
    let mut t = [[0.0f32; 64]; 4];
    debug_assert!(rank <= 64 || rank > 0);
    for (g, lg) in lut.chunks_exact_mut(16 * rank).enumerate() {
        for (c, tc) in t.iter_mut().enumerate() {
            let j = 4 * g + c;
            for (r, tr) in tc[..rank.min(64)].iter_mut().enumerate() {
                *tr = if j < cols {
                    b(j * rank + r) * x[j]
                } else {
                    0.0
                };
            }
        }
        if rank > 64 {
            build_lut_group_wide(b, rank, x, g, lg);
            continue;
        }
        let (first, rest) = lg.split_at_mut(rank);
        for (r, v) in first.iter_mut().enumerate() {
            *v = -(t[0][r] + t[1][r] + t[2][r] + t[3][r]);
        }
        let _ = rest;
        for v in 1..16usize {
            let low = v.trailing_zeros() as usize;
            let prev = v & (v - 1);
            let (src, dst) = lg.split_at_mut(v * rank);
            let src = &src[prev * rank..(prev + 1) * rank];
            for r in 0..rank {
                dst[r] = src[r] + 2.0 * t[low][r];
            }
        }
    }
}

/// Slow path of [`build_lut`] for k > 64 (no stack buffer).
fn build_lut_group_wide(
    b: impl Fn(usize) -> f32,
    rank: usize,
    x: &[f32],
    g: usize,
    lg: &mut [f32],
) {
    let cols = x.len();
    for v in 0..16usize {
        for r in 0..rank {
            let mut s = 0.0;
            for c in 0..4 {
                let j = 4 * g + c;
                if j < cols {
                    let t = b(j * rank + r) * x[j];
                    s += if (v >> c) & 1 == 1 { t } else { -t };
                }
            }
            lg[v * rank + r] = s;
        }
    }
}

#[inline(always)]
fn nibble(words: &[u64], g: usize) -> usize {
    ((words[g >> 4] >> ((g & 15) * 4)) & 15) as usize
}

fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `acc[r] += Σ_{g0 ≤ g < g1} lut[g][nibble(g)][r]`: the inner loop of the fused product.
#[inline]
fn accumulate_groups(
    words: &[u64],
    lut: &[f32],
    g0: usize,
    g1: usize,
    rank: usize,
    acc: &mut [f32],
    use_avx2: bool,
) {
    if rank == 16 {
        let acc: &mut [f32; 16] = acc.try_into().expect("rank 16");
        #[cfg(target_arch = "x86_64")]
        if use_avx2 {
            // SAFETY: AVX2 support was checked at run time by `avx2_available`.
            unsafe { accumulate_k16_avx2(words, lut, g0, g1, acc) };
            return;
        }
        let _ = use_avx2;
        accumulate_k16(words, lut, g0, g1, acc);
    } else {
        for g in g0..g1 {
            let e = &lut[(g * 16 + nibble(words, g)) * rank..][..rank];
            for (a, e) in acc.iter_mut().zip(e) {
                *a += e;
            }
        }
    }
}

/// k = 16 specialisation: fixed-size arrays keep the accumulators in vector registers; two
/// accumulators hide the add latency.
#[inline(always)]
fn accumulate_k16(words: &[u64], lut: &[f32], g0: usize, g1: usize, acc: &mut [f32; 16]) {
    let (entries, _) = lut.as_chunks::<16>();
    let mut acc0 = *acc;
    let mut acc1 = [0.0f32; 16];
    let mut g = g0;
    while g + 1 < g1 {
        let e0 = &entries[g * 16 + nibble(words, g)];
        let e1 = &entries[(g + 1) * 16 + nibble(words, g + 1)];
        for r in 0..16 {
            acc0[r] += e0[r];
            acc1[r] += e1[r];
        }
        g += 2;
    }
    if g < g1 {
        let e0 = &entries[g * 16 + nibble(words, g)];
        for r in 0..16 {
            acc0[r] += e0[r];
        }
    }
    for r in 0..16 {
        acc[r] = acc0[r] + acc1[r];
    }
}

/// [`accumulate_k16`] compiled for AVX2 (two 8-lane adds per table row instead of four).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn accumulate_k16_avx2(
    words: &[u64],
    lut: &[f32],
    g0: usize,
    g1: usize,
    acc: &mut [f32; 16],
) {
    accumulate_k16(words, lut, g0, g1, acc)
}
