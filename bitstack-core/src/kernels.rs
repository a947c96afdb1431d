//! CPU restoration kernels.
//!
//! Every fast kernel here has a plain reference next to it ([`restore_reference`],
//! [`matmul_reference`]) and is tested against it.
//!
//! ## The fused product without materialising Ŵ
//! For one level, `(S ⊙ ABᵀ) x = Σ_r a_r ⊙ (S (b_r ⊙ x))`. Evaluating `S t_r` for each of the
//! `k` vectors `t_r = b_r ⊙ x` costs `k·m·n` additions. Instead we group the columns in fours:
//! for group `g` and each of the 16 possible sign patterns `v` of its four columns we tabulate
//! `L[g][v][r] = Σ_{c<4} ±t_r[4g+c]` (a look-up table of `n/4 · 16 · k` floats, built in `4·n·k`
//! operations). Row `i` then needs one table row per group, `acc += L[g][nibble_i(g)]`, and
//! a final `y_i = Σ_r a_ir acc_r`: `m·n/4` vector additions of `k` lanes, a quarter of the
//! naive work, reading the packed signs exactly once. The tables of one level stay in L2.

use crate::block::ResidualBlockRef;
use crate::error::{check_len, CoreError, Result};
use rayon::prelude::*;

/// Rows handled by one parallel task.
const ROW_CHUNK: usize = 32;

/// Batches larger than this restore Ŵ once and run a dense GEMM: the table build and the
/// per-row lookups scale with the batch, the restoration does not.
pub const FUSED_MAX_BATCH: usize = 16;

fn check_blocks(blocks: &[ResidualBlockRef<'_>], rows: usize, cols: usize) -> Result<()> {
    for b in blocks {
        check_len("block rows", rows, b.rows())?;
        check_len("block cols", cols, b.cols())?;
    }
    Ok(())
}

fn check_inv_scale(inv_scale: Option<&[f32]>, cols: usize) -> Result<()> {
    if let Some(s) = inv_scale {
        check_len("inverse scale", cols, s.len())?;
        if s.iter().any(|v| !v.is_finite()) {
            return Err(CoreError::NonFinite("inverse scale"));
        }
    }
    Ok(())
}

/// Plain reference: `out = (Σ_l S_l ⊙ A_l B_lᵀ) · diag(inv_scale)`, entry by entry in f64.
pub fn restore_reference(
    blocks: &[ResidualBlockRef<'_>],
    rows: usize,
    cols: usize,
    inv_scale: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    check_blocks(blocks, rows, cols)?;
    check_inv_scale(inv_scale, cols)?;
    check_len("restore output", rows * cols, out.len())?;
    for i in 0..rows {
        for j in 0..cols {
            let mut acc = 0.0f64;
            for blk in blocks {
                let k = blk.rank;
                let mut d = 0.0f64;
                for r in 0..k {
                    d += blk.a[i * k + r].to_f64() * blk.b[j * k + r].to_f64();
                }
                acc += blk.signs.get(i, j) as f64 * d;
            }
            let s = inv_scale.map_or(1.0, |s| s[j] as f64);
            out[i * cols + j] = (acc * s) as f32;
        }
    }
    Ok(())
}

/// Restores `Ŵ = (Σ_l S_l ⊙ A_l B_lᵀ) · diag(inv_scale)` into `out` (`rows × cols`, row-major),
/// in parallel over rows. Allocates only `k·cols` floats per block for the transposed factor.
pub fn restore_into(
    blocks: &[ResidualBlockRef<'_>],
    rows: usize,
    cols: usize,
    inv_scale: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    check_blocks(blocks, rows, cols)?;
    check_inv_scale(inv_scale, cols)?;
    check_len("restore output", rows * cols, out.len())?;
    // B transposed to rank-major f32 so each row's product is k axpys over contiguous memory.
    let bts: Vec<Vec<f32>> = blocks
        .iter()
        .map(|blk| {
            let k = blk.rank;
            let mut bt = vec![0.0f32; k * cols];
            for j in 0..cols {
                for r in 0..k {
                    bt[r * cols + j] = blk.b[j * k + r].to_f32();
                }
            }
            bt
        })
        .collect();
    out.par_chunks_mut(cols * ROW_CHUNK)
        .enumerate()
        .for_each(|(chunk, out_rows)| {
            let mut c = vec![0.0f32; cols];
            for (di, orow) in out_rows.chunks_exact_mut(cols).enumerate() {
                let i = chunk * ROW_CHUNK + di;
                orow.fill(0.0);
                for (blk, bt) in blocks.iter().zip(&bts) {
                    let k = blk.rank;
                    c.fill(0.0);
                    for r in 0..k {
                        let a = blk.a[i * k + r].to_f32();
                        for (cj, &b) in c.iter_mut().zip(&bt[r * cols..(r + 1) * cols]) {
                            *cj += a * b;
                        }
                    }
                    apply_signs_accumulate(blk.signs.row(i), &c, orow);
                }
                if let Some(s) = inv_scale {
                    for (o, &s) in orow.iter_mut().zip(s) {
                        *o *= s;
                    }
                }
            }
        });
    Ok(())
}

/// `out[j] += sign_j · c[j]`, flipping the IEEE sign bit where the packed bit is clear.
#[inline]
fn apply_signs_accumulate(words: &[u64], c: &[f32], out: &mut [f32]) {
    for (w, (cc, oo)) in words.iter().zip(c.chunks(64).zip(out.chunks_mut(64))) {
        for (t, (cj, oj)) in cc.iter().zip(oo.iter_mut()).enumerate() {
            let negative = (((w >> t) & 1) ^ 1) as u32;
            *oj += f32::from_bits(cj.to_bits() ^ (negative << 31));
        }
    }
}

/// Plain reference for `Y = X Ŵᵀ`: restores with [`restore_reference`] then multiplies in f64.
/// `x` is `batch × cols`, `y` is `batch × rows`, both row-major.
pub fn matmul_reference(
    blocks: &[ResidualBlockRef<'_>],
    rows: usize,
    cols: usize,
    inv_scale: Option<&[f32]>,
    x: &[f32],
    y: &mut [f32],
) -> Result<()> {
    let batch = batch_of(x.len(), cols)?;
    check_len("output", batch * rows, y.len())?;
    let mut w = vec![0.0f32; rows * cols];
    restore_reference(blocks, rows, cols, inv_scale, &mut w)?;
    for b in 0..batch {
        for i in 0..rows {
            let mut acc = 0.0f64;
            for j in 0..cols {
                acc += w[i * cols + j] as f64 * x[b * cols + j] as f64;
            }
            y[b * rows + i] = acc as f32;
        }
    }
    Ok(())
}

pub(crate) fn batch_of(len: usize, cols: usize) -> Result<usize> {
    if cols == 0 || !len.is_multiple_of(cols) {
        return Err(CoreError::ShapeMismatch {
            what: "input length (a multiple of in_features)",
            expected: cols,
            actual: len,
        });
    }
    Ok(len / cols)
}

/// Scratch floats [`fused_matmul_with_scratch`] needs for this shape and batch.
pub fn fused_scratch_len(rows: usize, cols: usize, rank: usize, batch: usize) -> usize {
    if batch > FUSED_MAX_BATCH {
        rows * cols
    } else {
        let groups = cols.div_ceil(4);
        batch * cols + batch * groups * 16 * rank + rows * batch + rows * batch * rank
    }
}

/// `Y = X Ŵᵀ` with `Ŵ = (Σ_l S_l ⊙ A_l B_lᵀ)·diag(inv_scale)`, allocating its scratch.
pub fn fused_matmul(
    blocks: &[ResidualBlockRef<'_>],
    rows: usize,
    cols: usize,
    inv_scale: Option<&[f32]>,
    x: &[f32],
    y: &mut [f32],
) -> Result<()> {
    let batch = batch_of(x.len(), cols)?;
    let rank = blocks.first().map_or(1, |b| b.rank);
    let mut scratch = vec![0.0f32; fused_scratch_len(rows, cols, rank, batch)];
    fused_matmul_with_scratch(blocks, rows, cols, inv_scale, x, y, &mut scratch)
}

/// [`fused_matmul`] into caller-provided scratch (length from [`fused_scratch_len`]); never
/// allocates on the small-batch path, so decode loops can reuse one buffer.
///
/// Small batches (≤ [`FUSED_MAX_BATCH`]) use the look-up-table kernel described in the module
/// docs and never materialise Ŵ; larger batches restore Ŵ into the scratch and run a GEMM.
pub fn fused_matmul_with_scratch(
    blocks: &[ResidualBlockRef<'_>],
    rows: usize,
    cols: usize,
    inv_scale: Option<&[f32]>,
    x: &[f32],
    y: &mut [f32],
    scratch: &mut [f32],
) -> Result<()> {
    check_blocks(blocks, rows, cols)?;
    check_inv_scale(inv_scale, cols)?;
    let batch = batch_of(x.len(), cols)?;
    check_len("output", batch * rows, y.len())?;
    let rank = blocks.first().map_or(1, |b| b.rank);
    if blocks.iter().any(|b| b.rank != rank) {
        return Err(CoreError::InvalidParameter {
            name: "rank",
            reason: "all blocks of one weight must share k".into(),
        });
    }
    let need = fused_scratch_len(rows, cols, rank, batch);
    if scratch.len() < need {
        return Err(CoreError::ShapeMismatch {
            what: "scratch (see fused_scratch_len)",
            expected: need,
            actual: scratch.len(),
        });
    }
    if blocks.is_empty() {
        y.fill(0.0);
        return Ok(());
    }
    if batch > FUSED_MAX_BATCH {
        let w = &mut scratch[..rows * cols];
        restore_into(blocks, rows, cols, inv_scale, w)?;
        crate::linear::gemm_xwt(x, w, rows, cols, y);
        return Ok(());
    }
    let groups = cols.div_ceil(4);
    let lut_per = groups * 16 * rank;
    let (xs, rest) = scratch.split_at_mut(batch * cols);
    let (lut, rest) = rest.split_at_mut(batch * lut_per);
    let (yt, rest) = rest.split_at_mut(rows * batch);
    let acc = &mut rest[..rows * batch * rank];
    // Fold the activation scale into the input once: Ŵx = Ŵ_scaled (x ⊙ inv_scale).
    xs.copy_from_slice(x);
    if let Some(s) = inv_scale {
        for xrow in xs.chunks_exact_mut(cols) {
            for (v, &s) in xrow.iter_mut().zip(s) {
                *v *= s;
            }
        }
    }
    // Tile the groups so the tables touched by one pass over a row chunk stay in L2
    // (~256 KiB across the batch), instead of streaming every batch item's whole table per row.
    let tile = (256 * 1024 / (batch * 16 * rank * 4)).clamp(16, groups.max(16));
    let use_avx2 = avx2_available();
    yt.fill(0.0);
    for blk in blocks {
        lut.par_chunks_mut(lut_per)
            .zip(xs.par_chunks(cols))
            .for_each(|(l, xrow)| build_lut(blk.b, rank, xrow, l));
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
                    let a = &blk.a[(row0 + di) * rank..][..rank];
                    for bi in 0..batch {
                        let s = &accc[(di * batch + bi) * rank..][..rank];
                        ytc[di * batch + bi] +=
                            s.iter().zip(a).map(|(s, a)| s * a.to_f32()).sum::<f32>();
                    }
                }
            });
    }
    for bi in 0..batch {
        for i in 0..rows {
            y[bi * rows + i] = yt[i * batch + bi];
        }
    }
    Ok(())
}

/// Table `L[g][v][r]` for one input vector (see module docs). Columns past `cols` count as 0.
fn build_lut(b: &[half::f16], rank: usize, x: &[f32], lut: &mut [f32]) {
    let cols = x.len();
    let mut t = [[0.0f32; 64]; 4];
    debug_assert!(rank <= 64 || rank > 0);
    for (g, lg) in lut.chunks_exact_mut(16 * rank).enumerate() {
        for (c, tc) in t.iter_mut().enumerate() {
            let j = 4 * g + c;
            for r in 0..rank.min(64) {
                tc[r] = if j < cols {
                    b[j * rank + r].to_f32() * x[j]
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
fn build_lut_group_wide(b: &[half::f16], rank: usize, x: &[f32], g: usize, lg: &mut [f32]) {
    let cols = x.len();
    for v in 0..16usize {
        for r in 0..rank {
            let mut s = 0.0;
            for c in 0..4 {
                let j = 4 * g + c;
                if j < cols {
                    let t = b[j * rank + r].to_f32() * x[j];
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::random_block;

    fn rel_err(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den.max(1e-30)).sqrt()
    }

    #[test]
    fn restore_matches_reference() {
        for &(m, n, k, levels) in &[
            (7, 13, 3, 2),
            (64, 64, 16, 3),
            (33, 130, 5, 4),
            (96, 70, 16, 1),
        ] {
            let blocks: Vec<_> = (0..levels)
                .map(|l| random_block(m, n, k, l as u64 + 7))
                .collect();
            let refs: Vec<_> = blocks.iter().map(|b| b.view()).collect();
            let s: Vec<f32> = (0..n).map(|j| 0.5 + (j % 5) as f32 * 0.3).collect();
            let mut want = vec![0.0; m * n];
            let mut got = vec![0.0; m * n];
            restore_reference(&refs, m, n, Some(&s), &mut want).unwrap();
            restore_into(&refs, m, n, Some(&s), &mut got).unwrap();
            assert!(rel_err(&got, &want) < 1e-5, "{m}x{n}");
        }
    }

    #[test]
    fn fused_matches_reference_all_paths() {
        for &(m, n, k) in &[(40, 64, 16), (17, 29, 16), (50, 70, 3), (8, 12, 80)] {
            let blocks: Vec<_> = (0..3).map(|l| random_block(m, n, k, l + 11)).collect();
            let refs: Vec<_> = blocks.iter().map(|b| b.view()).collect();
            let s: Vec<f32> = (0..n).map(|j| 1.0 / (1.0 + j as f32 * 0.01)).collect();
            for batch in [1, 3, FUSED_MAX_BATCH, FUSED_MAX_BATCH + 3] {
                let x: Vec<f32> = (0..batch * n)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                    .collect();
                let mut want = vec![0.0; batch * m];
                let mut got = vec![0.0; batch * m];
                matmul_reference(&refs, m, n, Some(&s), &x, &mut want).unwrap();
                fused_matmul(&refs, m, n, Some(&s), &x, &mut got).unwrap();
                assert!(
                    rel_err(&got, &want) < 1e-4,
                    "{m}x{n} k{k} batch {batch}: {}",
                    rel_err(&got, &want)
                );
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let b = random_block(8, 8, 2, 1);
        let refs = [b.view()];
        let mut y = vec![0.0; 8];
        assert!(fused_matmul(&refs, 8, 8, None, &[0.0; 7], &mut y).is_err());
        assert!(fused_matmul(&refs, 8, 9, None, &[0.0; 9], &mut y).is_err());
        assert!(fused_matmul(&refs, 8, 8, Some(&[1.0; 3]), &[0.0; 8], &mut y).is_err());
        assert!(fused_matmul(&refs, 8, 8, Some(&[f32::NAN; 8]), &[0.0; 8], &mut y).is_err());
        let mut small = vec![0.0; 1];
        assert!(
            fused_matmul_with_scratch(&refs, 8, 8, None, &[0.0; 8], &mut y, &mut small).is_err()
        );
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use crate::testutil::random_block;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// The fused product equals the dense reference for any shape, rank, level count and batch.
        #[test]
        fn fused_equals_reference(m in 1usize..40, n in 1usize..150, k in 1usize..20,
                                  levels in 1usize..4, batch in 1usize..20, seed in any::<u64>()) {
            let blocks: Vec<_> = (0..levels).map(|l| random_block(m, n, k, seed ^ l as u64)).collect();
            let refs: Vec<_> = blocks.iter().map(|b| b.view()).collect();
            let x: Vec<f32> = (0..batch * n).map(|i| ((i * 7919 % 211) as f32 - 105.0) / 50.0).collect();
            let mut want = vec![0.0; batch * m];
            let mut got = vec![0.0; batch * m];
            matmul_reference(&refs, m, n, None, &x, &mut want).unwrap();
            fused_matmul(&refs, m, n, None, &x, &mut got).unwrap();
            let scale = want.iter().fold(1.0f32, |a, v| a.max(v.abs()));
            for (g, w) in got.iter().zip(&want) {
                prop_assert!((g - w).abs() <= 1e-4 * scale * (n as f32).sqrt(), "{} vs {}", g, w);
            }
        }
    }
}
