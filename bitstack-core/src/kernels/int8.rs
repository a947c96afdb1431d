//! The int8-table fused product (the default): T-MAC-style look-up tables quantized to int8.
//!
//! For batch item `β`, level `l` and rank `r`, the scaled input `t_r = b_r ⊙ (x ⊙ 1/s)` is cut
//! into groups of four columns; group `g` gets a 16-entry table `T[g][v] = Σ_c ±t_r[4g+c]`
//! (`+` where bit `c` of `v` is set), exactly the partial sums a row with sign nibble `v`
//! needs. The tables of the groups of [`SCALE_WORDS`] 64-column sign words share one scale
//! (`max_g Σ_c |t_r[4g+c]| / 127`) and are rounded to int8, so one row's contribution for
//! such a block of words is an *exact* integer sum of table bytes times one float. That sum is what the
//! SIMD kernels compute 64 rows × groups at a time with byte permutes (see [`super::x86`]);
//! the portable kernel here computes the same integers one row at a time.
//!
//! ## Layout (built per call, in the caller's scratch)
//! `tables[(β·L + l)·W·k + slot(w, r)][g][v]`: 256 bytes per (item, level, word, rank):
//! the 16 groups of word `w`, 16 entries each, group-major; [`slot`] orders (word, rank)
//! so one rank's tables for a block of words are contiguous. `scales` has the same index
//! without `[g][v]`. The sign words are read straight from the blocks (row-major, as stored), once
//! per row tile and word for all `k` ranks.

use crate::block::{FactorRef, ResidualBlockRef};
use crate::signs::words_per_row;
use half::slice::HalfFloatSliceExt;

/// Sign words (of 64 columns) whose tables share one scale per rank. Larger blocks let the
/// SIMD kernel sum more words in int32 before one convert-and-scale, at the cost of a scale
/// set by the largest group over more columns (measured in the README's kernel section).
pub(super) const SCALE_WORDS: usize = 4;

/// Bytes of one (item, level, word, rank) table: 16 groups × 16 entries.
pub(super) const TABLE_BYTES: usize = 256;

/// Groups of four columns per 64-column sign word (one multiplier each in grouped tables).
pub(super) const GROUPS: usize = 16;

/// Largest per-group multiplier of a grouped int8 table: `vpdpbusd` multiplies the looked-up
/// signed bytes by *unsigned* bytes, so a per-byte multiplier of up to 255 costs nothing.
pub(super) const MAX_MULT: f32 = 255.0;

/// Scale and multipliers of the grouped int8 tables of one (block of words, rank) whose
/// largest group range (`Σ_c |t_c|` over a group's four columns) is `maxabs`: the unit is
/// `maxabs / (127·255)`, and a group of range `R` gets the smallest multiplier
/// `m = ⌈255·R / maxabs⌉` (1..=255) with `R ≤ 127·m·unit`, so its entries are rounded at a
/// step of `m·unit ≈ R / 127` instead of `maxabs / 127`. Groups far below the block's largest
/// one (small activations, small singular-vector entries) keep their precision; the kernel's
/// integer sum `Σ_g m_g·q_g` stays exact in int32 (at most 64·255·127 per block of words).
#[derive(Clone, Copy, Debug)]
pub(super) struct GroupScale {
    /// The unit (`scales[...]` of the table): `maxabs / (127·255)`, or 0 for an all-zero block.
    pub unit: f32,
    k: f32,
}

impl GroupScale {
    #[inline(always)]
    pub(super) fn new(maxabs: f32) -> Self {
        if maxabs > 0.0 {
            Self {
                unit: maxabs / (127.0 * MAX_MULT),
                k: MAX_MULT / maxabs,
            }
        } else {
            Self { unit: 0.0, k: 0.0 }
        }
    }
    /// The multiplier of a group of range `range` and the factor that turns its entries into
    /// codes (`1 / (m·unit)`; 0 for an all-zero block). Written once, used by the generic and
    /// the SIMD builds, so both round the same way.
    #[inline(always)]
    pub(super) fn group(&self, range: f32) -> (u8, f32) {
        if self.unit == 0.0 {
            return (1, 0.0);
        }
        #[allow(clippy::manual_clamp)]
        let m = (range * self.k).ceil().max(1.0).min(MAX_MULT);
        (m as u8, 1.0 / (m * self.unit))
    }
}

/// `(|g0| + |g1|) + (|g2| + |g3|)`: a group's range, paired as the SIMD max loop pairs it.
#[inline(always)]
pub(super) fn group_range(g: &[f32]) -> f32 {
    (g[0].abs() + g[1].abs()) + (g[2].abs() + g[3].abs())
}

/// Weight of the high table in a split (16-bit) table: an entry is `s·(254·H + L)/254`, with
/// `H = round(T/s)` and `L = round(254·(T/s − H))`, both in −127..=127. `vpdpbusd` multiplies
/// the looked-up bytes by an unsigned byte, so the kernel adds `254·H + L` into one int32
/// accumulator with the same instruction count per half as the plain int8 tables.
pub(super) const SPLIT_WEIGHT: i32 = 254;

/// Sizes of the regions [`super::fused_matmul_with`] carves out of its scratch for this path.
#[derive(Clone, Copy, Debug)]
pub(super) struct Int8Layout {
    pub words: usize,
    pub xs: usize,
    pub t: usize,
    pub bf: usize,
    pub scales: usize,
    pub table_floats: usize,
    /// Per-group multipliers of the grouped int8 tables ([`GROUPS`] bytes per table slot).
    pub mult_floats: usize,
    pub yt: usize,
}

impl Int8Layout {
    /// `t` and `bf` are per pool slot (see [`super::pool::slots`]): one table build runs on
    /// each slot at a time. `halves` is 1 for int8 tables, 2 for split 16-bit ones.
    pub(super) fn new(
        rows: usize,
        cols: usize,
        rank: usize,
        levels: usize,
        batch: usize,
        halves: usize,
    ) -> Self {
        let words = words_per_row(cols);
        let tables = batch * levels * words * rank;
        let slots = super::pool::slots();
        Self {
            words,
            xs: batch * cols,
            t: slots * rank * words * 64,
            bf: slots * cols * rank,
            scales: tables,
            table_floats: (tables * TABLE_BYTES * halves).div_ceil(4),
            mult_floats: (tables * GROUPS).div_ceil(4),
            yt: rows * batch,
        }
    }
    pub(super) fn total(&self) -> usize {
        self.xs + self.t + self.bf + self.scales + self.table_floats + self.mult_floats + self.yt
    }
}

/// `SIGN[c][v]`: the sign column `c` takes in table entry `v`.
pub(super) const SIGN: [[f32; 16]; 4] = {
    let mut s = [[0.0f32; 16]; 4];
    let mut c = 0;
    while c < 4 {
        let mut v = 0;
        while v < 16 {
            s[c][v] = if (v >> c) & 1 == 1 { 1.0 } else { -1.0 };
            v += 1;
        }
        c += 1;
    }
    s
};

/// The buffers and layout one table build writes, their sizes as [`build_tables`] documents
/// them: one value, so the build's three entry points (dispatch, AVX-512, portable) share
/// one parameter list instead of repeating six.
pub(super) struct TableBuild<'a> {
    /// Scratch of `rank · words · 64` floats (the scaled factor, rank-major).
    pub(super) t: &'a mut [f32],
    /// `words · rank · 256 · halves` table bytes.
    pub(super) tables: &'a mut [i8],
    /// `words · rank` table scales.
    pub(super) scales: &'a mut [f32],
    /// `words · rank · 16` per-group multipliers.
    pub(super) mults: &'a mut [u8],
    /// Table halves: 1 (int8) or 2 (split 16-bit).
    pub(super) halves: usize,
    /// Ranks `0..split_ranks` get their low halves written.
    pub(super) split_ranks: usize,
}

/// Builds the int8 tables and scales of one (item, level): `blk` is the level's block (its
/// `cols × rank` factor `B` is read), `xs` the scaled input row, `t` scratch of
/// `rank · words · 64` floats, `bf` of `cols · rank`, `tables` `words · rank · 256 · halves`
/// bytes, `scales` `words · rank` floats and `mults` `words · rank · 16` per-group multipliers
/// (see [`GroupScale`]; 1 for split ranks). With split tables (`halves == 2`) only ranks
/// `0..split_ranks` get their low halves written: the kernels read nothing else (see
/// [`TileInput::split_ranks`]). For int8 factors the tables are built over
/// `qb ⊙ (sa·sb) ⊙ xs` ([`ResidualBlockRef::kernel_b_into`]), so the tiles multiply by the
/// raw codes of `A`. `simd` allows the AVX-512 build where the CPU has it (byte for byte
/// the same tables).
pub(super) fn build_tables(
    blk: &ResidualBlockRef<'_>,
    rank: usize,
    xs: &[f32],
    bf: &mut [f32],
    out: TableBuild<'_>,
    simd: bool,
) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = simd;
    let cols = xs.len();
    match blk.b {
        FactorRef::F16(b) => {
            #[cfg(target_arch = "x86_64")]
            if simd && super::x86::avx512_available() {
                // SAFETY: the CPU supports the features `build_tables_avx512` is compiled for.
                unsafe {
                    super::x86::build_tables_avx512::<false>(
                        b.as_ptr().cast(),
                        b.len(),
                        rank,
                        xs,
                        out,
                    )
                };
                return;
            }
            // One vectorized widening of the whole factor.
            b.convert_to_f32_slice(&mut bf[..cols * rank]);
        }
        FactorRef::I8 { .. } => blk.kernel_b_into(&mut bf[..cols * rank]),
    }
    let bf = &bf[..cols * rank];
    #[cfg(target_arch = "x86_64")]
    if simd && super::x86::avx512_available() {
        // SAFETY: as above; `bf` holds `cols · rank` f32 values.
        unsafe {
            super::x86::build_tables_avx512::<true>(bf.as_ptr().cast(), bf.len(), rank, xs, out)
        };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::avx2::available() {
        // SAFETY: the CPU supports AVX2 and FMA.
        unsafe { super::avx2::build_tables_generic_avx2(bf, rank, xs, out) };
        return;
    }
    build_tables_generic(bf, rank, xs, out)
}

/// [`build_tables`] in plain Rust from the widened factor `bf` (`cols × rank` f32).
#[inline(always)]
pub(super) fn build_tables_generic(bf: &[f32], rank: usize, xs: &[f32], out: TableBuild<'_>) {
    let (t, tables, scales, mults) = (out.t, out.tables, out.scales, out.mults);
    let (halves, split_ranks) = (out.halves, out.split_ranks);
    let cols = xs.len();
    let words = words_per_row(cols);
    let padded = words * 64;
    // t in rank-major order (t[r·padded + j] = b[j][r]·xs[j]) so each word's 64 columns of
    // one rank are contiguous; padding columns are zero and contribute nothing.
    for (j, (bj, &xj)) in bf.chunks_exact(rank).zip(xs).enumerate() {
        for (r, v) in bj.iter().enumerate() {
            t[r * padded + j] = v * xj;
        }
    }
    for r in 0..rank {
        t[r * padded + cols..(r + 1) * padded].fill(0.0);
    }
    for w0 in (0..words).step_by(SCALE_WORDS) {
        let w1 = (w0 + SCALE_WORDS).min(words);
        for r in 0..rank {
            let block = &t[r * padded + w0 * 64..r * padded + w1 * 64];
            // Finite inputs (checked upstream) make a plain comparison a correct max.
            // Sums paired as the SIMD build pairs them, so both give the same bytes.
            let mut maxabs = 0.0f32;
            for g in block.chunks_exact(4) {
                let s = group_range(g);
                maxabs = if s > maxabs { s } else { maxabs };
            }
            // Split ranks: one scale for the block (their low halves carry the precision);
            // the others: grouped int8 tables (see [`GroupScale`]).
            let split = halves == 2 && r < split_ranks;
            let (scale, inv) = if maxabs > 0.0 {
                (maxabs / 127.0, 127.0 / maxabs)
            } else {
                (0.0, 0.0)
            };
            let grouped = GroupScale::new(maxabs);
            for (w, tw) in (w0..w1).zip(block.chunks_exact(64)) {
                let idx = slot(w, r, rank, words);
                scales[idx] = if split { scale } else { grouped.unit };
                let stride = TABLE_BYTES * halves;
                let out = &mut tables[idx * stride..(idx + 1) * stride];
                let (hi, lo) = out.split_at_mut(TABLE_BYTES);
                let m_out = &mut mults[idx * GROUPS..(idx + 1) * GROUPS];
                for (gi, g) in tw.chunks_exact(4).enumerate() {
                    let inv = if split {
                        m_out[gi] = 1;
                        inv
                    } else {
                        let (m, inv_g) = grouped.group(group_range(g));
                        m_out[gi] = m;
                        inv_g
                    };
                    // The signed sum first, then the scale: the order the SIMD build uses
                    // (products by ±1 are exact, so its fused adds round the same way).
                    let mut e = [0.0f32; 16];
                    for (v, ev) in e.iter_mut().enumerate() {
                        *ev = (((g[0] * SIGN[0][v] + g[1] * SIGN[1][v]) + g[2] * SIGN[2][v])
                            + g[3] * SIGN[3][v])
                            * inv;
                    }
                    let h = &mut hi[gi * 16..gi * 16 + 16];
                    for (hv, ev) in h.iter_mut().zip(&e) {
                        *hv = round_to_i8(*ev);
                    }
                    if split {
                        let l = &mut lo[gi * 16..gi * 16 + 16];
                        for ((lv, ev), hv) in l.iter_mut().zip(&e).zip(h.iter()) {
                            *lv = round_to_i8((*ev - f32::from(*hv)) * SPLIT_WEIGHT as f32);
                        }
                    }
                }
            }
        }
    }
}

/// Position of (word, rank) among one (item, level)'s `words · rank` tables: blocks of
/// [`SCALE_WORDS`] words in order, rank-major inside a block, so the tables one rank needs
/// for a block are contiguous (the SIMD kernel walks them in that order).
#[inline(always)]
pub(super) fn slot(word: usize, r: usize, rank: usize, words: usize) -> usize {
    let w0 = word - word % SCALE_WORDS;
    let nw = (words - w0).min(SCALE_WORDS);
    w0 * rank + r * nw + (word - w0)
}

/// Rounds `e`, clamped to ±127, to the nearest integer, ties to even, as `i8`: adding
/// 1.5·2²³ leaves the rounded integer in the low mantissa bits. Unlike `round_ties_even`
/// (a libm call per entry) this is plain float and integer arithmetic, which vectorizes.
#[inline(always)]
fn round_to_i8(e: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0;
    #[allow(clippy::manual_clamp)] // max/min vectorize to vmaxps/vminps; clamp adds NaN checks
    let e = e.max(-127.0).min(127.0);
    ((e + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32) as i8
}

/// Everything a row-tile kernel reads, shared by the portable and SIMD kernels.
pub(super) struct TileInput<'a> {
    pub blocks: &'a [ResidualBlockRef<'a>],
    pub rows: usize,
    pub rank: usize,
    pub words: usize,
    pub batch: usize,
    pub tables: &'a [i8],
    pub scales: &'a [f32],
    /// [`GROUPS`] multipliers per table slot (same index as `scales`): 1 for split ranks.
    pub mults: &'a [u8],
    /// 1: int8 tables; 2: split 16-bit tables (high then low half per slot).
    pub halves: usize,
    /// With split tables, ranks `0..split_ranks` use both halves; the others only the high
    /// half, which is the plain int8 table (same scale).
    pub split_ranks: usize,
}

impl TileInput<'_> {
    /// Index (in tables, and in scales) of (item, level, word, rank).
    #[inline(always)]
    pub(super) fn table_index(&self, item: usize, level: usize, word: usize, r: usize) -> usize {
        (item * self.blocks.len() + level) * self.words * self.rank
            + slot(word, r, self.rank, self.words)
    }
}

/// Portable kernel: rows `row0..row0 + nrows`, accumulating into `yt` (`nrows × batch`).
pub(super) fn tile_portable(inp: &TileInput<'_>, row0: usize, nrows: usize, yt: &mut [f32]) {
    let rank = inp.rank;
    let mut acc = [0.0f32; 64];
    for di in 0..nrows {
        let i = row0 + di;
        for (l, blk) in inp.blocks.iter().enumerate() {
            let words = blk.signs.row(i);
            let mut a = [0.0f32; 64];
            blk.kernel_a_row(i, &mut a);
            for bi in 0..inp.batch {
                acc[..rank].fill(0.0);
                for (w, &word) in words.iter().enumerate() {
                    for (r, acc_r) in acc[..rank].iter_mut().enumerate() {
                        let at = inp.table_index(bi, l, w, r);
                        let stride = TABLE_BYTES * inp.halves;
                        let tab = &inp.tables[at * stride..][..stride];
                        let split = inp.halves == 2 && r < inp.split_ranks;
                        let mult = &inp.mults[at * GROUPS..][..GROUPS];
                        let mut s = 0i32;
                        for (g, &m) in mult.iter().enumerate() {
                            let v = g * 16 + ((word >> (4 * g)) & 15) as usize;
                            s += if split {
                                SPLIT_WEIGHT * tab[v] as i32 + tab[TABLE_BYTES + v] as i32
                            } else {
                                i32::from(m) * tab[v] as i32
                            };
                        }
                        let unit = if split {
                            inp.scales[at] / SPLIT_WEIGHT as f32
                        } else {
                            inp.scales[at]
                        };
                        *acc_r += s as f32 * unit;
                    }
                }
                let dot: f32 = acc[..rank].iter().zip(&a).map(|(s, a)| s * a).sum();
                yt[di * inp.batch + bi] += dot;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_to_i8_is_round_ties_even() {
        for i in -1275..=1275 {
            let e = i as f32 / 10.0;
            let want = e.round_ties_even().clamp(-127.0, 127.0) as i8;
            assert_eq!(super::round_to_i8(e), want, "{e}");
        }
        for e in [
            0.5f32, 1.5, 2.5, -0.5, -1.5, 126.5, -126.5, 127.0, -127.0, 0.0, -0.0,
        ] {
            assert_eq!(super::round_to_i8(e), e.round_ties_even() as i8, "{e}");
        }
    }
}
