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
//!
//! ## Kernels and their dispatch
//! [`KernelIsa::Auto`] resolves once per call to the best this CPU runs: AMX-INT8 tile
//! products (`amx`, 16-bit activations; `batch · k ≤ 16` in one call, larger batches in chunks
//! of items), else the AVX-512 VBMI + VNNI table kernel (`x86`), else the AVX2 table
//! kernel (`avx2`, `vpshufb` look-ups), else the portable one (`int8`). All table kernels
//! compute the same integer sums from the same tables; batches above [`FUSED_MAX_BATCH`]
//! restore `Ŵ` and call a GEMM. `unsafe` stays inside those modules behind the safe entry
//! points here.

use crate::block::ResidualBlockRef;
use crate::error::{check_len, CoreError, Result};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
pub mod dense;
mod exact;
mod int8;
mod pool;
pub mod q4;
mod q8_i16;
mod restore;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Rows handled by one parallel task.
const ROW_CHUNK: usize = 32;

/// Batches larger than this always restore Ŵ once and run a dense GEMM: the table build and
/// the per-row lookups scale with the batch, the restoration does not (the switch can sit
/// lower for a kernel, see [`FusedParams::max_fused_batch`]).
pub const FUSED_MAX_BATCH: usize = 16;

fn check_blocks(blocks: &[ResidualBlockRef<'_>], rows: usize, cols: usize) -> Result<()> {
    for b in blocks {
        check_len("block rows", rows, b.rows())?;
        check_len("block cols", cols, b.cols())?;
        // The fields are public: a hand-built view could pair an f16 A with an int8 B.
        if b.a.dtype() != b.b.dtype() {
            return Err(CoreError::InvalidParameter {
                name: "factor dtype",
                reason: format!("A is {} but B is {}", b.a.dtype(), b.b.dtype()),
            });
        }
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

/// The checks both restores start with: blocks of this shape, a finite `cols`-entry scale
/// and an `out` of `rows · cols` elements.
fn check_restore(
    blocks: &[ResidualBlockRef<'_>],
    rows: usize,
    cols: usize,
    inv_scale: Option<&[f32]>,
    out_len: usize,
) -> Result<()> {
    check_blocks(blocks, rows, cols)?;
    check_inv_scale(inv_scale, cols)?;
    check_len("restore output", rows * cols, out_len)
}

/// Plain reference: `out = (Σ_l S_l ⊙ A_l B_lᵀ) · diag(inv_scale)`, entry by entry in f64.
pub fn restore_reference(
    blocks: &[ResidualBlockRef<'_>],
    rows: usize,
    cols: usize,
    inv_scale: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    check_restore(blocks, rows, cols, inv_scale, out.len())?;
    for i in 0..rows {
        for j in 0..cols {
            let mut acc = 0.0f64;
            for blk in blocks {
                let k = blk.rank;
                let mut d = 0.0f64;
                for r in 0..k {
                    d += blk.a.get(i, r, k) as f64 * blk.b.get(j, r, k) as f64;
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
    restore_into_as(blocks, rows, cols, inv_scale, out)
}

/// An element type [`restore_into_as`] can write: `f32`, `half::f16`, `half::bf16` (what
/// BLAS libraries and GPU engines take).
pub trait RestoreElement: Copy + Send + Sync + sealed::Sealed {
    /// Rounds an f32 to this type (to nearest).
    fn from_f32(v: f32) -> Self;
}
mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}
impl RestoreElement for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}
impl RestoreElement for half::f16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}
impl RestoreElement for half::bf16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

/// [`restore_into`] into a caller buffer of any [`RestoreElement`]: rows are computed in f32
/// and rounded once, so an f16/bf16 restore differs from the f32 one only by that rounding.
pub fn restore_into_as<T: RestoreElement>(
    blocks: &[ResidualBlockRef<'_>],
    rows: usize,
    cols: usize,
    inv_scale: Option<&[f32]>,
    out: &mut [T],
) -> Result<()> {
    check_restore(blocks, rows, cols, inv_scale, out.len())?;
    // B transposed to rank-major f32 so each row's product is k axpys over contiguous memory.
    // Both factors are dequantized (int8: `q·s` in f32), the values the decomposition took
    // its residuals against, so this restore reproduces its measured error.
    let bts: Vec<Vec<f32>> = blocks.iter().map(|blk| transposed_b(blk, cols)).collect();
    let inp = restore::RestoreInput {
        blocks,
        bts: &bts,
        cols,
        inv_scale,
    };
    out.par_chunks_mut(cols * ROW_CHUNK)
        .enumerate()
        .for_each(|(chunk, out_rows)| {
            let mut rows_f32 = vec![0.0f32; out_rows.len()];
            restore::rows_into(&inp, chunk * ROW_CHUNK, &mut rows_f32);
            for (d, &v) in out_rows.iter_mut().zip(&rows_f32) {
                *d = T::from_f32(v);
            }
        });
    Ok(())
}

/// `out[j·k + r] = q[j·k + r] · fold[r]` for the `k = fold.len()` columns of a row-major
/// int8 factor (`out.len() == q.len()`, a multiple of `k`): the int8 factor as the table
/// build reads it. The AVX-512 path converts 16 codes per step against a `16·k`-long repeat
/// of `fold` (the pattern's period in 16-value steps) and writes the same products.
pub(crate) fn scale_codes_into(q: &[i8], fold: &[f32], out: &mut [f32]) {
    let k = fold.len();
    debug_assert!(k > 0 && q.len() == out.len() && q.len().is_multiple_of(k));
    #[cfg(target_arch = "x86_64")]
    if k <= 64 && q.len() >= 16 * k && std::arch::is_x86_feature_detected!("avx512f") {
        let mut rep = [0.0f32; 16 * 64];
        for (t, v) in rep[..16 * k].iter_mut().enumerate() {
            *v = fold[t % k];
        }
        // SAFETY: AVX-512F was detected; `rep[..16k]` is a multiple of 16 long and the
        // lengths match.
        unsafe { x86::scale_codes_avx512(q, &rep[..16 * k], out) };
        return;
    }
    for (orow, qrow) in out.chunks_exact_mut(k).zip(q.chunks_exact(k)) {
        for ((o, &q), &f) in orow.iter_mut().zip(qrow).zip(fold) {
            *o = q as f32 * f;
        }
    }
}

/// `B` of one level transposed to rank-major f32 (`k × cols`), dequantized.
fn transposed_b(blk: &ResidualBlockRef<'_>, cols: usize) -> Vec<f32> {
    let k = blk.rank;
    let mut bt = vec![0.0f32; k * cols];
    for j in 0..cols {
        for r in 0..k {
            bt[r * cols + j] = blk.b.get(j, r, k);
        }
    }
    bt
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

/// How the small-batch fused product tabulates its partial sums.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TablePrecision {
    /// Tables with 16-bit precision stored as two int8 halves (`254·H + L`), one scale per
    /// 256 input columns and rank, summed exactly in int32: the default. Two lookups per
    /// entry; measured on SmolLM2 it leaves perplexity within the README's 0.1 % bound, which
    /// plain int8 tables do not.
    #[default]
    Int16,
    /// Split 16-bit tables for the leading [`MIXED_SPLIT_RANKS`] ranks of each level, plain
    /// grouped int8 (as [`TablePrecision::Int8`]) for the others: the `r`-th singular pair of `|W|`
    /// carries less of the product the larger `r` is, so the cheap tables go where their
    /// rounding matters least. One lookup per entry beyond the leading ranks.
    Mixed,
    /// Grouped int8 tables (one lookup per entry): one scale per 256 input columns and rank
    /// and one unsigned multiplier (1..=255) per group of four columns, applied by
    /// `vpdpbusd`'s unsigned operand, so each group is rounded at about its own range / 127.
    /// The fastest path; 2.1–3.7e-3 relative error per product on SmolLM2 (README, kernel
    /// section), still above the 0.1 % perplexity bound at some budgets.
    Int8,
    /// Tables kept in f32 and summed in f32: the exact path, slower, kept selectable so the
    /// quantization error of [`TablePrecision::Int8`] can be measured against it.
    F32,
}

impl TablePrecision {
    /// Lower-case name (`int16`, `mixed`, `int8`, `exact`), as [`FromStr`](std::str::FromStr) reads it.
    pub fn name(self) -> &'static str {
        match self {
            TablePrecision::Int16 => "int16",
            TablePrecision::Mixed => "mixed",
            TablePrecision::Int8 => "int8",
            TablePrecision::F32 => "exact",
        }
    }
}

impl std::fmt::Display for TablePrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for TablePrecision {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "int16" => Ok(TablePrecision::Int16),
            "mixed" => Ok(TablePrecision::Mixed),
            "int8" => Ok(TablePrecision::Int8),
            "exact" | "f32" => Ok(TablePrecision::F32),
            _ => Err(CoreError::InvalidParameter {
                name: "table precision",
                reason: format!("{s:?}: expected int16, mixed, int8 or exact"),
            }),
        }
    }
}

/// Instruction set of the int8-table kernel. [`KernelIsa::Auto`] picks the best this CPU has
/// at run time; the others force one (for tests and benchmarks) and fall back to
/// [`KernelIsa::Portable`] where the CPU lacks it (see [`KernelIsa::resolve`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelIsa {
    /// The fastest available kernel.
    #[default]
    Auto,
    /// Plain Rust, any CPU.
    Portable,
    /// x86-64 AVX-512 F, BW, VBMI and VNNI (byte permutes and int8 dot-product adds).
    Avx512Vbmi,
    /// x86-64 AVX2 and FMA (16-entry `vpshufb` look-ups, 16/32-bit integer sums): the kernel
    /// for x86 CPUs without AVX-512 VBMI.
    Avx2,
    /// x86-64 AMX-INT8 tile products (Intel Xeon from Sapphire Rapids on): the ±1 sign tiles
    /// times all `batch · k ≤ 16` activation columns of a level at once, activations in 16
    /// bits; for [`TablePrecision::Int16`] and [`TablePrecision::Mixed`] (int8 tables and
    /// larger `batch · k` run the AVX-512 kernel).
    Amx,
}

impl KernelIsa {
    /// Whether this CPU can run the kernel (`Auto` and `Portable` always can).
    pub fn is_available(self) -> bool {
        match self {
            KernelIsa::Auto | KernelIsa::Portable => true,
            KernelIsa::Avx512Vbmi => avx512_available(),
            KernelIsa::Avx2 => avx2_available(),
            KernelIsa::Amx => amx_available(),
        }
    }
    /// The kernel that will actually run for this request.
    pub fn resolve(self) -> KernelIsa {
        match self {
            KernelIsa::Auto if amx_available() => KernelIsa::Amx,
            KernelIsa::Auto if avx512_available() => KernelIsa::Avx512Vbmi,
            KernelIsa::Auto if avx2_available() => KernelIsa::Avx2,
            KernelIsa::Auto => KernelIsa::Portable,
            isa if isa.is_available() => isa,
            _ => KernelIsa::Portable,
        }
    }
    /// Short lower-case name, e.g. for benchmark tables.
    pub fn name(self) -> &'static str {
        match self {
            KernelIsa::Auto => "auto",
            KernelIsa::Portable => "portable",
            KernelIsa::Avx512Vbmi => "avx512-vbmi",
            KernelIsa::Avx2 => "avx2",
            KernelIsa::Amx => "amx-int8",
        }
    }
}

impl std::str::FromStr for KernelIsa {
    type Err = CoreError;
    /// The names [`KernelIsa::name`] prints: `auto`, `portable`, `avx2`, `avx512-vbmi`,
    /// `amx-int8`.
    fn from_str(s: &str) -> Result<Self> {
        [
            KernelIsa::Auto,
            KernelIsa::Portable,
            KernelIsa::Avx2,
            KernelIsa::Avx512Vbmi,
            KernelIsa::Amx,
        ]
        .into_iter()
        .find(|i| i.name() == s)
        .ok_or_else(|| CoreError::InvalidParameter {
            name: "kernel isa",
            reason: format!("{s:?}: expected auto, portable, avx2, avx512-vbmi or amx-int8"),
        })
    }
}

fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        x86::avx512_available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn amx_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The largest batch the AVX-512 VBMI table kernel takes under [`KernelIsa::Auto`]; larger
/// ones restore `Ŵ` and call a GEMM. That kernel repeats its work per batch item (prompts of
/// 2–12 tokens prefilled at 36–38 tokens/s, flat, on a Zen 4 at 105.5 MB), while the
/// restore costs one fixed ~0.25 s there (58 tokens/s at 17 tokens): the two meet at about
/// nine items (README, "Short prompts"). AMX amortizes the batch in its tiles and keeps
/// [`FUSED_MAX_BATCH`].
pub const VBMI_AUTO_MAX_BATCH: usize = 8;

/// [`VBMI_AUTO_MAX_BATCH`] for the AVX2 table kernel: measured on the Zen 4 with AVX2 forced
/// for both the kernel and the restore, prompts of 1–16 tokens prefilled at a flat 10–18
/// tokens/s and 17 tokens through the restore at 38–45, so the paths meet at about six.
pub const AVX2_AUTO_MAX_BATCH: usize = 6;

/// [`VBMI_AUTO_MAX_BATCH`] for the portable kernel: forced on the Zen 4 (portable kernel and
/// portable restore), one token took 0.55–0.6 s through the tables and 17 tokens 0.98 s
/// through the restore, so from two tokens on the restore is faster.
pub const PORTABLE_AUTO_MAX_BATCH: usize = 1;

/// Leading ranks per level that [`TablePrecision::Mixed`] looks up in 16-bit precision.
pub const MIXED_SPLIT_RANKS: usize = 1;

/// Parameters of the fused product.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FusedParams {
    /// Table precision (int8 by default).
    pub tables: TablePrecision,
    /// Kernel instruction set for the int8 tables.
    pub isa: KernelIsa,
}

impl FusedParams {
    /// These table precision with the best kernel this CPU has.
    pub fn with_tables(tables: TablePrecision) -> Self {
        Self {
            tables,
            isa: KernelIsa::Auto,
        }
    }
    /// The exact f32-table path.
    pub fn exact() -> Self {
        Self {
            tables: TablePrecision::F32,
            isa: KernelIsa::Auto,
        }
    }
    /// The largest batch the small-batch kernels take with these parameters (≤
    /// [`FUSED_MAX_BATCH`]); larger batches restore `Ŵ` and call a GEMM. Under
    /// [`KernelIsa::Auto`] the switch sits where the restore was measured to become the faster
    /// path ([`VBMI_AUTO_MAX_BATCH`], [`AVX2_AUTO_MAX_BATCH`], [`PORTABLE_AUTO_MAX_BATCH`];
    /// AMX keeps [`FUSED_MAX_BATCH`]); a forced ISA and the exact f32
    /// tables keep the kernels up to [`FUSED_MAX_BATCH`], so benchmarks and accuracy checks
    /// measure the kernel they name.
    pub fn max_fused_batch(&self) -> usize {
        if self.isa != KernelIsa::Auto || self.tables == TablePrecision::F32 {
            return FUSED_MAX_BATCH;
        }
        match self.isa.resolve() {
            KernelIsa::Avx512Vbmi => VBMI_AUTO_MAX_BATCH,
            KernelIsa::Avx2 => AVX2_AUTO_MAX_BATCH,
            KernelIsa::Portable => PORTABLE_AUTO_MAX_BATCH,
            KernelIsa::Amx | KernelIsa::Auto => FUSED_MAX_BATCH,
        }
    }
    /// Whether the int8 kernel serves this rank (it keeps `k ≤ 64` accumulators in registers
    /// and on the stack); larger ranks use the f32 tables.
    fn int8_for(&self, rank: usize) -> bool {
        self.tables != TablePrecision::F32 && rank <= 64
    }
    /// Whether the AMX kernel serves this call: 16-bit precision asked, AMX resolved and
    /// `rank ≤ 16`. Batches whose `batch · rank` columns do not fit one tile run as chunks of
    /// [`FusedParams::amx_chunk`] items; chunks re-expand the signs and dispatch once each,
    /// and still measured 1.5–2.4× faster than the AVX-512 table kernel at batch 8 on
    /// SmolLM2's 576-column weights once the batch-1 path stopped gathering (README).
    fn amx_for(&self, rank: usize, batch: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            matches!(self.tables, TablePrecision::Int16 | TablePrecision::Mixed)
                && self.isa.resolve() == KernelIsa::Amx
                && rank <= amx::MAX_N
                && batch <= FUSED_MAX_BATCH
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (rank, batch);
            false
        }
    }
    /// Items per AMX call: as many as fit their `rank` columns into one 16-column tile.
    #[cfg(target_arch = "x86_64")]
    fn amx_chunk(rank: usize, batch: usize) -> usize {
        (amx::MAX_N / rank.max(1)).clamp(1, batch.max(1))
    }
    /// Table halves of the lookup kernels: 1 (int8) or 2 (split 16-bit).
    fn halves(&self) -> usize {
        match self.tables {
            TablePrecision::Int16 | TablePrecision::Mixed => 2,
            TablePrecision::Int8 | TablePrecision::F32 => 1,
        }
    }
    /// Ranks (of `rank`) whose lookups use both halves of the split tables.
    fn split_ranks(&self, rank: usize) -> usize {
        match self.tables {
            TablePrecision::Int16 => rank,
            TablePrecision::Mixed => rank.min(MIXED_SPLIT_RANKS),
            TablePrecision::Int8 | TablePrecision::F32 => 0,
        }
    }
}

/// Scratch floats [`fused_matmul_with`] needs for `levels` blocks of this shape and batch
/// with the default parameters.
pub fn fused_scratch_len(
    rows: usize,
    cols: usize,
    rank: usize,
    levels: usize,
    batch: usize,
) -> usize {
    fused_scratch_len_with(rows, cols, rank, levels, batch, FusedParams::default())
}

/// Scratch floats [`fused_matmul_with`] needs for these parameters.
pub fn fused_scratch_len_with(
    rows: usize,
    cols: usize,
    rank: usize,
    levels: usize,
    batch: usize,
    params: FusedParams,
) -> usize {
    if batch > params.max_fused_batch() {
        rows * cols
    } else if params.amx_for(rank, batch) {
        #[cfg(target_arch = "x86_64")]
        let batch = FusedParams::amx_chunk(rank, batch);
        amx_scratch_len(cols, levels.max(1), batch)
    } else if params.int8_for(rank) {
        int8::Int8Layout::new(rows, cols, rank, levels.max(1), batch, params.halves()).total()
    } else {
        exact::scratch_len(rows, cols, rank, batch)
    }
}

fn amx_scratch_len(cols: usize, levels: usize, batch: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        amx::AmxLayout::new(cols, levels, batch).total()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (cols, levels, batch);
        0
    }
}

/// `Y = X Ŵᵀ` with `Ŵ = (Σ_l S_l ⊙ A_l B_lᵀ)·diag(inv_scale)` and default parameters,
/// allocating its scratch.
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
    let mut scratch = vec![0.0f32; fused_scratch_len(rows, cols, rank, blocks.len(), batch)];
    fused_matmul_with_scratch(blocks, rows, cols, inv_scale, x, y, &mut scratch)
}

/// [`fused_matmul_with`] with default parameters.
pub fn fused_matmul_with_scratch(
    blocks: &[ResidualBlockRef<'_>],
    rows: usize,
    cols: usize,
    inv_scale: Option<&[f32]>,
    x: &[f32],
    y: &mut [f32],
    scratch: &mut [f32],
) -> Result<()> {
    fused_matmul_with(
        blocks,
        rows,
        cols,
        inv_scale,
        x,
        y,
        FusedParams::default(),
        scratch,
    )
}

/// `Y = X Ŵᵀ` into caller-provided scratch (length from [`fused_scratch_len_with`]); never
/// allocates on the small-batch path, so decode loops can reuse one buffer.
///
/// Small batches (≤ [`FusedParams::max_fused_batch`], at most [`FUSED_MAX_BATCH`]) use the
/// look-up-table kernels described in the module docs and never materialise Ŵ; larger
/// batches restore Ŵ into the scratch and run a GEMM.
#[allow(clippy::too_many_arguments)]
pub fn fused_matmul_with(
    blocks: &[ResidualBlockRef<'_>],
    rows: usize,
    cols: usize,
    inv_scale: Option<&[f32]>,
    x: &[f32],
    y: &mut [f32],
    params: FusedParams,
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
    let need = fused_scratch_len_with(rows, cols, rank, blocks.len(), batch, params);
    if scratch.len() < need {
        return Err(CoreError::ShapeMismatch {
            what: "scratch (see fused_scratch_len_with)",
            expected: need,
            actual: scratch.len(),
        });
    }
    if blocks.is_empty() {
        y.fill(0.0);
        return Ok(());
    }
    if batch > params.max_fused_batch() {
        let w = &mut scratch[..rows * cols];
        restore_into(blocks, rows, cols, inv_scale, w)?;
        crate::linear::gemm_xwt(x, w, rows, cols, y);
    } else {
        let call = FusedCall {
            blocks,
            rows,
            cols,
            rank,
            batch,
            inv_scale,
            x,
            y,
        };
        if params.amx_for(rank, batch) {
            #[cfg(target_arch = "x86_64")]
            {
                // Chunks of items whose columns fit one tile, each a complete AMX product
                // (each re-expands the signs it reads: measured faster than the AVX-512
                // kernel's shared unpacking for batch · k > 16, see the README).
                let chunk = FusedParams::amx_chunk(rank, batch);
                let FusedCall { x, y, .. } = call;
                for (xc, yc) in x.chunks(chunk * cols).zip(y.chunks_mut(chunk * rows)) {
                    let part = FusedCall {
                        blocks,
                        rows,
                        cols,
                        rank,
                        batch: xc.len() / cols,
                        inv_scale,
                        x: xc,
                        y: yc,
                    };
                    amx::fused_amx(part, scratch);
                }
            }
        } else if params.int8_for(rank) {
            fused_int8(call, params, scratch);
        } else {
            exact::fused_f32(call, scratch);
        }
    }
    Ok(())
}

/// One small-batch fused product as [`fused_matmul_with`] hands it to a kernel, shapes and
/// blocks already checked: one value, so the f32, int8 and AMX kernels share one parameter
/// list.
pub(super) struct FusedCall<'a> {
    /// The levels, all of rank `rank`.
    blocks: &'a [ResidualBlockRef<'a>],
    /// Output features.
    rows: usize,
    /// Input features.
    cols: usize,
    /// Rank of every level.
    rank: usize,
    /// Input rows, at most [`FUSED_MAX_BATCH`].
    batch: usize,
    /// Activation scale, `cols` entries.
    inv_scale: Option<&'a [f32]>,
    /// Input, `batch × cols`.
    x: &'a [f32],
    /// Output, `batch × rows`.
    y: &'a mut [f32],
}

/// `xs = x ⊙ inv_scale` row by row (`xs` and `x` of one length): the activation scale folded
/// into the input once, since `Ŵx = Ŵ_scaled (x ⊙ inv_scale)`.
#[inline]
fn scaled_input_into(xs: &mut [f32], x: &[f32], inv_scale: Option<&[f32]>) {
    xs.copy_from_slice(x);
    if let Some(s) = inv_scale {
        for xrow in xs.chunks_exact_mut(s.len()) {
            for (v, &s) in xrow.iter_mut().zip(s) {
                *v *= s;
            }
        }
    }
}

/// Rows per parallel task of the int8 kernel for weights of fewer than
/// [`INT8_WIDE_MIN_ROWS`] rows: 32 keeps ≥ 6 tasks on a 192-row weight (load balance on few
/// cores).
const INT8_TASK_ROWS: usize = 32;
/// From this many rows tasks (and SIMD tiles) are 64 rows: each table load then serves 64
/// rows instead of 32.
const INT8_WIDE_MIN_ROWS: usize = 512;

/// A raw pointer shared by the tasks of one pool job, each of which touches a disjoint
/// region of the buffer behind it.
#[derive(Clone, Copy)]
struct SyncPtr<T>(*mut T);
// SAFETY: only used to hand disjoint regions of one buffer to concurrent tasks (see uses).
unsafe impl<T> Sync for SyncPtr<T> {}
unsafe impl<T> Send for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    /// A method (not field access) so closures capture the whole `Sync` wrapper.
    fn get(self) -> *mut T {
        self.0
    }
}

fn fused_int8(call: FusedCall<'_>, params: FusedParams, scratch: &mut [f32]) {
    let (rows, cols, rank, batch) = (call.rows, call.cols, call.rank, call.batch);
    let (blocks, inv_scale, x, y) = (call.blocks, call.inv_scale, call.x, call.y);
    let levels = blocks.len();
    let halves = params.halves();
    let split_ranks = params.split_ranks(rank);
    let lay = int8::Int8Layout::new(rows, cols, rank, levels, batch, halves);
    let (xs, rest) = scratch.split_at_mut(lay.xs);
    let (t, rest) = rest.split_at_mut(lay.t);
    let (bf, rest) = rest.split_at_mut(lay.bf);
    let (scales, rest) = rest.split_at_mut(lay.scales);
    let (tables, rest) = rest.split_at_mut(lay.table_floats);
    let (mults, rest) = rest.split_at_mut(lay.mult_floats);
    let yt = &mut rest[..lay.yt];
    // Fold the activation scale into the input once: Ŵx = Ŵ_scaled (x ⊙ inv_scale).
    scaled_input_into(xs, x, inv_scale);
    // AMX calls that do not fit one tile (`batch · k > 16`) run the AVX-512 tiles.
    let isa = match params.isa.resolve() {
        KernelIsa::Amx if avx512_available() => KernelIsa::Avx512Vbmi,
        KernelIsa::Amx if avx2_available() => KernelIsa::Avx2,
        KernelIsa::Amx => KernelIsa::Portable,
        isa => isa,
    };
    // The AVX-512 table build serves the AVX-512 and AMX kernels only, so a forced AVX2 or
    // portable kernel runs as it would on a CPU without AVX-512 (benchmarks compare them).
    let simd_build = matches!(isa, KernelIsa::Avx512Vbmi);
    let tables: &mut [i8] = bytemuck::cast_slice_mut(tables);
    let per = lay.words * rank;
    let stride = int8::TABLE_BYTES * halves;
    let tables = &mut tables[..batch * levels * per * stride];
    let mults: &mut [u8] = bytemuck::cast_slice_mut(mults);
    let mults = &mut mults[..batch * levels * per * int8::GROUPS];
    let slots = pool::slots();
    let (t_per, bf_per) = (lay.t / slots, lay.bf / slots);
    {
        // Phase 1: one task per (item, level) builds its tables into its own region, with the
        // `t`/`bf` scratch of the slot it runs on.
        let tab_ptr = SyncPtr(tables.as_mut_ptr());
        let sc_ptr = SyncPtr(scales.as_mut_ptr());
        let m_ptr = SyncPtr(mults.as_mut_ptr());
        let t_ptr = SyncPtr(t.as_mut_ptr());
        let bf_ptr = SyncPtr(bf.as_mut_ptr());
        let xs = &*xs;
        pool::run(batch * levels, &|i, slot| {
            let (bi, l) = (i / levels, i % levels);
            let xr = &xs[bi * cols..(bi + 1) * cols];
            // SAFETY: task `i` alone writes tables/scales region `i`; slot `slot` runs one task
            // at a time, so its t/bf region is not shared; all regions lie within the carved
            // scratch (sizes from `Int8Layout`).
            unsafe {
                let tab = std::slice::from_raw_parts_mut(
                    tab_ptr.get().add(i * per * stride),
                    per * stride,
                );
                let sc = std::slice::from_raw_parts_mut(sc_ptr.get().add(i * per), per);
                let groups = per * int8::GROUPS;
                let mu = std::slice::from_raw_parts_mut(m_ptr.get().add(i * groups), groups);
                let t = std::slice::from_raw_parts_mut(t_ptr.get().add(slot * t_per), t_per);
                let bf = std::slice::from_raw_parts_mut(bf_ptr.get().add(slot * bf_per), bf_per);
                let out = int8::TableBuild {
                    t,
                    tables: tab,
                    scales: sc,
                    mults: mu,
                    halves,
                    split_ranks,
                };
                int8::build_tables(&blocks[l], rank, xr, bf, out, simd_build);
            }
        });
    }
    let inp = int8::TileInput {
        blocks,
        rows,
        rank,
        words: lay.words,
        batch,
        tables,
        scales,
        mults,
        halves,
        split_ranks,
    };
    let task_rows = if rows >= INT8_WIDE_MIN_ROWS {
        2 * INT8_TASK_ROWS
    } else {
        INT8_TASK_ROWS
    };
    // Phase 2: one task per row chunk, each writing its own rows of `yt`.
    let tasks = rows.div_ceil(task_rows);
    let yt_ptr = SyncPtr(yt.as_mut_ptr());
    pool::run(tasks, &|chunk, _slot| {
        let row0 = chunk * task_rows;
        let nrows = task_rows.min(rows - row0);
        // SAFETY: chunk `chunk` alone owns rows row0..row0 + nrows of `yt`.
        let ytc = unsafe {
            std::slice::from_raw_parts_mut(yt_ptr.get().add(row0 * batch), nrows * batch)
        };
        ytc.fill(0.0);
        match isa {
            #[cfg(target_arch = "x86_64")]
            KernelIsa::Avx512Vbmi => {
                // SAFETY: `resolve` returns this ISA only when the CPU supports it; `inp`'s
                // buffers were sized by `Int8Layout` and the blocks checked by the caller.
                unsafe {
                    match (task_rows == 2 * INT8_TASK_ROWS, halves == 2) {
                        (true, true) => x86::tile_avx512::<8, true>(&inp, row0, nrows, ytc),
                        (true, false) => x86::tile_avx512::<8, false>(&inp, row0, nrows, ytc),
                        (false, true) => x86::tile_avx512::<4, true>(&inp, row0, nrows, ytc),
                        (false, false) => x86::tile_avx512::<4, false>(&inp, row0, nrows, ytc),
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            KernelIsa::Avx2 => {
                // SAFETY: as above (`resolve` checked AVX2 and FMA).
                unsafe {
                    if halves == 2 {
                        avx2::tile_avx2::<true>(&inp, row0, nrows, ytc)
                    } else {
                        avx2::tile_avx2::<false>(&inp, row0, nrows, ytc)
                    }
                }
            }
            _ => int8::tile_portable(&inp, row0, nrows, ytc),
        }
    });
    for bi in 0..batch {
        for i in 0..rows {
            y[bi * rows + i] = yt[i * batch + bi];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::FactorDtype;
    use crate::testutil::random_block_with;

    pub(super) fn rel_err(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den.max(1e-30)).sqrt()
    }

    proptest::proptest! {
        /// The int8 factor as the table build reads it: every path writes `q · fold` exactly.
        #[test]
        fn scale_codes_equal_the_plain_products(k in 1usize..70, n in 1usize..60, seed in 0u64..1000) {
            let q: Vec<i8> = (0..n * k).map(|i| ((i as u64 * 37 + seed) % 255) as i8).collect();
            let fold: Vec<f32> = (0..k).map(|r| 0.01 + r as f32 * 0.37 + seed as f32 * 1e-3).collect();
            let mut got = vec![f32::NAN; n * k];
            scale_codes_into(&q, &fold, &mut got);
            for (c, g) in got.iter().enumerate() {
                proptest::prop_assert_eq!(g.to_bits(), (q[c] as f32 * fold[c % k]).to_bits());
            }
        }
    }

    #[test]
    fn auto_hands_large_batches_to_the_restore_only_where_measured_faster() {
        let auto = FusedParams::with_tables(TablePrecision::Int16);
        let want = match KernelIsa::Auto.resolve() {
            KernelIsa::Avx512Vbmi => VBMI_AUTO_MAX_BATCH,
            KernelIsa::Avx2 => AVX2_AUTO_MAX_BATCH,
            KernelIsa::Portable => PORTABLE_AUTO_MAX_BATCH,
            _ => FUSED_MAX_BATCH,
        };
        assert_eq!(auto.max_fused_batch(), want);
        // A forced kernel and the exact tables keep every small batch.
        let forced = FusedParams {
            tables: TablePrecision::Int16,
            isa: KernelIsa::Auto.resolve(),
        };
        assert_eq!(forced.max_fused_batch(), FUSED_MAX_BATCH);
        assert_eq!(FusedParams::exact().max_fused_batch(), FUSED_MAX_BATCH);
        // Either path gives the product: batch 12 under Auto against the reference.
        let blocks: Vec<_> = (0..2)
            .map(|l| random_block_with(40, 70, 5, l + 3, FactorDtype::I8))
            .collect();
        let refs: Vec<_> = blocks.iter().map(|b| b.view()).collect();
        let x: Vec<f32> = (0..12 * 70).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        let mut want = vec![0.0; 12 * 40];
        matmul_reference(&refs, 40, 70, None, &x, &mut want).unwrap();
        let mut got = vec![0.0; 12 * 40];
        let mut scratch = vec![0.0; fused_scratch_len_with(40, 70, 5, 2, 12, auto)];
        fused_matmul_with(&refs, 40, 70, None, &x, &mut got, auto, &mut scratch).unwrap();
        assert!(rel_err(&got, &want) < 1e-3);
    }

    #[test]
    fn restore_matches_reference() {
        for &(m, n, k, levels) in &[
            (7, 13, 3, 2),
            (64, 64, 16, 3),
            (33, 130, 5, 4),
            (96, 70, 16, 1),
        ] {
            for dt in [FactorDtype::F16, FactorDtype::I8] {
                let blocks: Vec<_> = (0..levels)
                    .map(|l| random_block_with(m, n, k, l as u64 + 7, dt))
                    .collect();
                let refs: Vec<_> = blocks.iter().map(|b| b.view()).collect();
                let s: Vec<f32> = (0..n).map(|j| 0.5 + (j % 5) as f32 * 0.3).collect();
                let mut want = vec![0.0; m * n];
                let mut got = vec![0.0; m * n];
                restore_reference(&refs, m, n, Some(&s), &mut want).unwrap();
                restore_into(&refs, m, n, Some(&s), &mut got).unwrap();
                assert!(rel_err(&got, &want) < 1e-5, "{m}x{n} {dt}");
            }
        }
    }

    pub(super) fn all_params() -> Vec<FusedParams> {
        let mut v = vec![FusedParams::exact()];
        let mut isas = vec![KernelIsa::Portable];
        if KernelIsa::Avx512Vbmi.is_available() {
            isas.push(KernelIsa::Avx512Vbmi);
        }
        if KernelIsa::Avx2.is_available() {
            isas.push(KernelIsa::Avx2);
        } else {
            println!("AVX2 not on this CPU: its kernel is not tested here");
        }
        if KernelIsa::Amx.is_available() {
            isas.push(KernelIsa::Amx);
        } else {
            println!("AMX-INT8 not on this CPU (or not permitted): its kernel is not tested here");
        }
        for isa in isas {
            for tables in [
                TablePrecision::Int8,
                TablePrecision::Mixed,
                TablePrecision::Int16,
            ] {
                v.push(FusedParams { tables, isa });
            }
        }
        if !KernelIsa::Avx512Vbmi.is_available() {
            println!("AVX-512 VBMI not on this CPU: its kernel is not tested here");
        }
        v
    }

    /// Frobenius-relative tolerance of each path against the f64 reference: f32 rounding for
    /// the exact tables, int8 table rounding (≈ 0.4 % per entry, averaging down) otherwise.
    pub(super) fn tolerance(p: FusedParams) -> f64 {
        match p.tables {
            TablePrecision::F32 => 1e-4,
            // Random test blocks have no decaying spectrum, so mixed tables are held to the
            // int8 bound; on real weights they sit between (README, kernel section).
            TablePrecision::Int8 | TablePrecision::Mixed => 1.5e-2,
            TablePrecision::Int16 => 2e-4,
        }
    }

    /// [`tolerance`] for blocks with `dt` factors. The random int8 test blocks' per-rank
    /// scales differ by up to 3× (testutil), so fewer ranks dominate each output and the int8
    /// tables' rounding averages down less: their bound is a third wider.
    pub(super) fn tolerance_for(p: FusedParams, dt: FactorDtype) -> f64 {
        match (p.tables, dt) {
            (TablePrecision::Int8 | TablePrecision::Mixed, FactorDtype::I8) => 2e-2,
            _ => tolerance(p),
        }
    }

    pub(super) fn run_with(
        refs: &[ResidualBlockRef<'_>],
        m: usize,
        n: usize,
        s: Option<&[f32]>,
        x: &[f32],
        p: FusedParams,
    ) -> Vec<f32> {
        let batch = x.len() / n;
        let rank = refs[0].rank;
        let mut y = vec![f32::NAN; batch * m];
        let mut scratch = vec![f32::NAN; fused_scratch_len_with(m, n, rank, refs.len(), batch, p)];
        fused_matmul_with(refs, m, n, s, x, &mut y, p, &mut scratch).unwrap();
        y
    }

    #[test]
    fn fused_matches_reference_all_paths() {
        for &(m, n, k) in &[
            (40, 64, 16),
            (17, 29, 16),
            (50, 70, 3),
            (8, 12, 80),
            (9, 200, 64),
        ] {
            for dt in [FactorDtype::F16, FactorDtype::I8] {
                let blocks: Vec<_> = (0..3)
                    .map(|l| random_block_with(m, n, k, l + 11, dt))
                    .collect();
                let refs: Vec<_> = blocks.iter().map(|b| b.view()).collect();
                let s: Vec<f32> = (0..n).map(|j| 1.0 / (1.0 + j as f32 * 0.01)).collect();
                for batch in [1, 3, FUSED_MAX_BATCH, FUSED_MAX_BATCH + 3] {
                    let x: Vec<f32> = (0..batch * n)
                        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                        .collect();
                    let mut want = vec![0.0; batch * m];
                    matmul_reference(&refs, m, n, Some(&s), &x, &mut want).unwrap();
                    for p in all_params() {
                        let got = run_with(&refs, m, n, Some(&s), &x, p);
                        let tol = if batch > FUSED_MAX_BATCH {
                            1e-4
                        } else {
                            tolerance_for(p, dt)
                        };
                        let e = rel_err(&got, &want);
                        assert!(e < tol, "{m}x{n} k{k} {dt} batch {batch} {p:?}: {e}");
                    }
                }
            }
        }
    }

    /// The SIMD kernels compute the same integer table sums as the portable one: they may
    /// differ only by f32 summation order.
    #[test]
    fn simd_int8_equals_portable_int8() {
        let isas: Vec<KernelIsa> = [KernelIsa::Avx512Vbmi, KernelIsa::Avx2]
            .into_iter()
            .filter(|isa| {
                let ok = isa.is_available();
                if !ok {
                    println!("skipped {}: not on this CPU", isa.name());
                }
                ok
            })
            .collect();
        for &(m, n, k, batch) in &[
            (1, 1, 1, 1),
            (13, 65, 7, 2),
            (100, 576, 9, 1),
            (64, 130, 64, 5),
            (33, 191, 13, 3),
            (97, 64, 5, 17),
        ] {
            for dt in [FactorDtype::F16, FactorDtype::I8] {
                let blocks: Vec<_> = (0..2)
                    .map(|l| random_block_with(m, n, k, l + 5, dt))
                    .collect();
                let refs: Vec<_> = blocks.iter().map(|b| b.view()).collect();
                let x: Vec<f32> = (0..batch * n)
                    .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
                    .collect();
                for tables in [
                    TablePrecision::Int8,
                    TablePrecision::Mixed,
                    TablePrecision::Int16,
                ] {
                    let port = FusedParams {
                        tables,
                        isa: KernelIsa::Portable,
                    };
                    let a = run_with(&refs, m, n, None, &x, port);
                    // Integer sums are exact in every kernel: only the f32 order differs.
                    for &isa in &isas {
                        let b = run_with(&refs, m, n, None, &x, FusedParams { tables, isa });
                        let e = rel_err(&b, &a);
                        assert!(e < 1e-5, "{} {tables} {m}x{n} k{k} {dt}: {e}", isa.name());
                    }
                }
            }
        }
    }

    /// Mixed tables are the split tables on the leading ranks and the int8 tables on the
    /// rest, so with `k ≤ MIXED_SPLIT_RANKS` they are the int16 path, bit for bit.
    #[test]
    fn mixed_tables_equal_int16_up_to_the_split_ranks() {
        for isa in [KernelIsa::Portable, KernelIsa::Auto] {
            let blocks: Vec<_> = (0..3)
                .map(|l| random_block_with(37, 200, MIXED_SPLIT_RANKS, l + 11, FactorDtype::I8))
                .collect();
            let refs: Vec<_> = blocks.iter().map(|b| b.view()).collect();
            let x: Vec<f32> = (0..2 * 200)
                .map(|i| ((i * 7 % 31) as f32 - 15.0) / 9.0)
                .collect();
            let with = |tables| run_with(&refs, 37, 200, None, &x, FusedParams { tables, isa });
            assert_eq!(
                with(TablePrecision::Mixed),
                with(TablePrecision::Int16),
                "{isa:?}"
            );
        }
    }

    #[test]
    fn restore_into_half_types_rounds_the_f32_restore() {
        for dt in [FactorDtype::F16, FactorDtype::I8] {
            let blocks: Vec<_> = (0..3)
                .map(|l| random_block_with(19, 70, 5, l + 3, dt))
                .collect();
            let refs: Vec<_> = blocks.iter().map(|b| b.view()).collect();
            let s: Vec<f32> = (0..70).map(|j| 0.5 + j as f32 * 0.01).collect();
            let mut want = vec![0.0f32; 19 * 70];
            restore_into(&refs, 19, 70, Some(&s), &mut want).unwrap();
            let mut h = vec![half::f16::ZERO; 19 * 70];
            let mut b = vec![half::bf16::ZERO; 19 * 70];
            restore_into_as(&refs, 19, 70, Some(&s), &mut h).unwrap();
            restore_into_as(&refs, 19, 70, Some(&s), &mut b).unwrap();
            for ((w, h), b) in want.iter().zip(&h).zip(&b) {
                assert_eq!(*h, half::f16::from_f32(*w));
                assert_eq!(*b, half::bf16::from_f32(*w));
            }
            let mut short = vec![half::f16::ZERO; 5];
            assert!(restore_into_as(&refs, 19, 70, None, &mut short).is_err());
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let b = random_block_with(8, 8, 2, 1, FactorDtype::F16);
        let refs = [b.view()];
        let mut y = vec![0.0; 8];
        assert!(fused_matmul(&refs, 8, 8, None, &[0.0; 7], &mut y).is_err());
        assert!(fused_matmul(&refs, 8, 9, None, &[0.0; 9], &mut y).is_err());
        assert!(fused_matmul(&refs, 8, 8, Some(&[1.0; 3]), &[0.0; 8], &mut y).is_err());
        assert!(fused_matmul(&refs, 8, 8, Some(&[f32::NAN; 8]), &[0.0; 8], &mut y).is_err());
        let i8 = random_block_with(8, 8, 2, 1, FactorDtype::I8);
        let mixed = [ResidualBlockRef {
            a: i8.view().a,
            ..b.view()
        }];
        assert!(fused_matmul(&mixed, 8, 8, None, &[0.0; 8], &mut y).is_err());
        let mut w = vec![0.0; 64];
        assert!(restore_into(&mixed, 8, 8, None, &mut w).is_err());
        let mut small = vec![0.0; 1];
        assert!(
            fused_matmul_with_scratch(&refs, 8, 8, None, &[0.0; 8], &mut y, &mut small).is_err()
        );
    }
}

#[cfg(test)]
mod proptests {
    use super::tests::{all_params, run_with, tolerance_for};
    use super::*;
    use crate::block::FactorDtype;
    use crate::testutil::random_block_with;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        /// Every path equals the dense reference for any shape, rank 1..=64, level count and
        /// batch 1..=17 (17 takes the restore + GEMM path): the exact tables to f32 rounding,
        /// the int8 tables to their quantization error; f16 and int8 factors alike.
        #[test]
        fn fused_equals_reference(m in 1usize..40, n in 1usize..150, k in 1usize..=64,
                                  levels in 1usize..4, batch in 1usize..=17, seed in any::<u64>(),
                                  i8_factors in any::<bool>()) {
            let dt = if i8_factors { FactorDtype::I8 } else { FactorDtype::F16 };
            let blocks: Vec<_> = (0..levels).map(|l| random_block_with(m, n, k, seed ^ l as u64, dt)).collect();
            let refs: Vec<_> = blocks.iter().map(|b| b.view()).collect();
            let x: Vec<f32> = (0..batch * n).map(|i| ((i * 7919 % 211) as f32 - 105.0) / 50.0).collect();
            let mut want = vec![0.0; batch * m];
            matmul_reference(&refs, m, n, None, &x, &mut want).unwrap();
            let scale = want.iter().fold(1.0f32, |a, v| a.max(v.abs()));
            for p in all_params() {
                let got = run_with(&refs, m, n, None, &x, p);
                let tol = if batch > FUSED_MAX_BATCH { 1e-4 } else { tolerance_for(p, dt) } as f32;
                for (g, w) in got.iter().zip(&want) {
                    prop_assert!((g - w).abs() <= tol * scale * (n as f32).sqrt(), "{:?} {}: {} vs {}", p, dt, g, w);
                }
            }
        }

        /// Batches whose columns do not fit one tile, which the AMX kernel takes in chunks
        /// of items, against the reference.
        #[test]
        fn amx_chunked_batches_equal_reference(m in 1usize..40, extra in 0usize..80,
                                               k in 2usize..=16, batch in 2usize..=16,
                                               seed in any::<u64>()) {
            let n = 1 + extra;
            if !KernelIsa::Amx.is_available() || batch * k <= 16 {
                return Ok(());
            }
            let blocks: Vec<_> = (0..2).map(|l| random_block_with(m, n, k, seed ^ l, FactorDtype::I8)).collect();
            let refs: Vec<_> = blocks.iter().map(|b| b.view()).collect();
            let x: Vec<f32> = (0..batch * n).map(|i| ((i * 7919 % 211) as f32 - 105.0) / 50.0).collect();
            let mut want = vec![0.0; batch * m];
            matmul_reference(&refs, m, n, None, &x, &mut want).unwrap();
            let mut w = vec![0.0; m * n];
            restore_reference(&refs, m, n, None, &mut w).unwrap();
            for tables in [TablePrecision::Int16, TablePrecision::Mixed] {
                let p = FusedParams { tables, isa: KernelIsa::Amx };
                prop_assert!(p.amx_for(k, batch));
                let got = run_with(&refs, m, n, None, &x, p);
                let (mut num, mut den) = (0f64, 0f64);
                for o in 0..batch * m {
                    let (b, i) = (o / m, o % m);
                    let mag: f32 = (0..n).map(|j| (w[i * n + j] * x[b * n + j]).abs()).sum();
                    num += f64::from(got[o] - want[o]).powi(2);
                    den += f64::from(mag).powi(2);
                }
                let e = (num / den.max(1e-30)).sqrt();
                prop_assert!(e < 2e-4, "{}x{} k{} batch {} {}: {}", m, n, k, batch, tables, e);
            }
        }

        /// The AMX kernel (where this CPU has it) on the calls one tile serves, `batch · k ≤ 16`:
        /// several 16-row tiles and 64-column blocks, ragged edges, 1–3 levels; 16-bit
        /// activations to the int16 tables' bound, 8-bit ones to the int8 bound.
        #[test]
        fn amx_equals_reference(m in 1usize..80, n in 1usize..300, k in 1usize..=16,
                                levels in 1usize..4, batch_pick in 0usize..16, seed in any::<u64>(),
                                i8_factors in any::<bool>()) {
            if !KernelIsa::Amx.is_available() {
                return Ok(());
            }
            let batch = 1 + batch_pick % (16 / k);
            let dt = if i8_factors { FactorDtype::I8 } else { FactorDtype::F16 };
            let blocks: Vec<_> = (0..levels).map(|l| random_block_with(m, n, k, seed ^ l as u64, dt)).collect();
            let refs: Vec<_> = blocks.iter().map(|b| b.view()).collect();
            let x: Vec<f32> = (0..batch * n).map(|i| ((i * 7919 % 211) as f32 - 105.0) / 50.0).collect();
            let s: Vec<f32> = (0..n).map(|j| 1.0 / (1.0 + j as f32 * 0.01)).collect();
            let mut want = vec![0.0; batch * m];
            matmul_reference(&refs, m, n, Some(&s), &x, &mut want).unwrap();
            // The error is measured against the size of the terms, Σ_j |Ŵ_ij x_j| per output
            // (a 1-row product whose terms cancel has a tiny result but not a tiny error).
            let mut w = vec![0.0; m * n];
            restore_reference(&refs, m, n, Some(&s), &mut w).unwrap();
            let mag: Vec<f32> = (0..batch * m)
                .map(|o| {
                    let (b, i) = (o / m, o % m);
                    (0..n).map(|j| (w[i * n + j] * x[b * n + j]).abs()).sum()
                })
                .collect();
            for (tables, tol) in [(TablePrecision::Int16, 2e-4), (TablePrecision::Mixed, 2e-4)] {
                let p = FusedParams { tables, isa: KernelIsa::Amx };
                prop_assert!(p.amx_for(k, batch));
                let got = run_with(&refs, m, n, Some(&s), &x, p);
                let num: f64 = got.iter().zip(&want).map(|(g, w)| f64::from(g - w).powi(2)).sum();
                let den: f64 = mag.iter().map(|v| f64::from(*v).powi(2)).sum();
                let e = (num / den.max(1e-30)).sqrt();
                prop_assert!(e < tol, "{}x{} k{} batch {} {} {}: {}", m, n, k, batch, tables, dt, e);
            }
        }
    }
}
