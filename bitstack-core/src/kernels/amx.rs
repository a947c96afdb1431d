//! The small-batch fused product on Intel AMX-INT8 tile units.
//!
//! One level contributes `Σ_r a_r ⊙ (S (b_r ⊙ x))`: a `rows × cols` ±1 matrix times the `N =
//! batch · k ≤ 16` columns `t_n = b_r ⊙ x_item`. That is a small GEMM, and one AMX
//! `tdpbssd` multiplies a 16 × 64 int8 tile by a 64 × 16 one (16,384 multiply-adds, all `k`
//! ranks of 16 rows × 64 columns at once), where the look-up-table kernels need `k` lookups per
//! group of four columns. So:
//!
//! * **Activations in 16 bits.** Each column `t_n` of each level is rounded to integers
//!   `Q = round(t · 32767 / max|t|)` (one scale per level and column) and split exactly into
//!   `Q = 256·H + L`, `H` signed, `L` unsigned bytes, stored in the VNNI tile layout (row `i`
//!   of a 64-column block holds, for each `n`, the four bytes of columns `4i..4i+4`). Int8
//!   activations were tried and dropped: one scale per column vector leaves 2–7 % error per
//!   product on real inputs, worse than the grouped int8 tables.
//! * **Signs as bytes, never stored.** A 64-column sign word becomes 64 bytes with one
//!   `vpmovm2b` (`-1` where the bit is set, `0` elsewhere) into a 1 KB buffer the tile load
//!   reads; with `b` the sign bits, `S·Q = Σ(2b − 1)·Q = −2·Σ(−b)·Q − ΣQ`, so the tile
//!   products `C' = Σ(−b)·H` (`tdpbssd`) and `Σ(−b)·L` (`tdpbsud`) and one column sum per
//!   (level, n) give the exact integer `S·Q`.
//! * Row tiles of 16 run as pool tasks; each task configures its thread's tiles once.
//!
//! Everything the tiles compute is an exact integer, so the only rounding is that of `Q`,
//! as in the int16 tables (whose scale is per 256 columns rather than per column vector).
//! `AMX` needs the kernel's permission (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), requested once by
//! [`available`].

use super::pool;
use super::{FusedCall, SyncPtr};
use crate::block::{FactorRef, ResidualBlockRef};
use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Columns (`batch · rank`) one tile product serves.
pub(super) const MAX_N: usize = 16;
/// Rows of one tile.
const TILE_ROWS: usize = 16;
/// Bytes of one tile (16 rows × 64 bytes).
const TILE_BYTES: usize = 1024;
/// Rows of one pass over a level's columns (two row tiles share each activation tile load).
const PASS_ROWS: usize = 32;
/// Most passes one pool task runs (its accumulators live on the stack: 64 B per row).
const MAX_TASK_PASSES: usize = 8;

/// Passes per pool task for `passes` 32-row passes on `slots` threads: the largest count (at
/// most [`MAX_TASK_PASSES`]) whose round-robin share of the busiest thread is the least.
/// Fewer, longer tasks pay the tile configuration once and keep a level's activation tiles
/// in L1 across their passes; an uneven split would leave a core idle at the end.
fn passes_per_task(passes: usize, slots: usize) -> usize {
    let slots = slots.max(1);
    let busiest = |g: usize| passes.div_ceil(g).div_ceil(slots) * g;
    (1..=MAX_TASK_PASSES.min(passes.max(1)))
        .rev()
        .min_by_key(|&g| busiest(g))
        .unwrap_or(1)
}

/// Whether this CPU and OS run AMX-INT8 tiles (plus AVX-512 BW for the sign expansion and
/// VBMI for the activation tiles, which every AMX CPU has);
/// requests the tile-data permission from Linux on first use.
pub(super) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let avx512 = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vbmi");
        if !avx512 {
            return false;
        }
        // cpuid is always available on x86-64; leaf 7 is checked against the maximum.
        if __cpuid(0).eax < 7 {
            return false;
        }
        let edx = __cpuid_count(7, 0).edx;
        let (tile, int8) = ((edx >> 24) & 1 == 1, (edx >> 25) & 1 == 1);
        tile && int8 && request_tile_permission()
    })
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: Linux (5.16+) faults on AMX tile
/// use until the process has asked for it; older kernels or other systems answer an error.
#[cfg(target_os = "linux")]
fn request_tile_permission() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a plain system call with integer arguments; it only changes this process's
    // permission to use the AMX state. rcx and r11 are clobbered by `syscall`.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_permission() -> bool {
    false
}

/// Scratch floats of one call: the scaled input, the activation tiles and per (level, n) scales and column sums.
#[derive(Clone, Copy, Debug)]
pub(super) struct AmxLayout {
    pub xs: usize,
    pub tiles: usize,
    pub scales: usize,
    pub colsums: usize,
    blocks: usize,
}

impl AmxLayout {
    pub(super) fn new(cols: usize, levels: usize, batch: usize) -> Self {
        let blocks = cols.div_ceil(64);
        Self {
            xs: batch * cols,
            tiles: levels * blocks * HALVES * TILE_BYTES / 4,
            scales: levels * MAX_N,
            colsums: levels * MAX_N,
            blocks,
        }
    }
    pub(super) fn total(&self) -> usize {
        self.xs + ALIGN_SLACK + self.tiles + self.scales + self.colsums
    }
}

/// Floats of slack in the scratch so the activation tiles can start 64-byte aligned.
const ALIGN_SLACK: usize = 16;

/// The 64-byte tile configuration: palette 1, tiles 0..8 of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    const fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
            c[48 + t] = TILE_ROWS as u8;
            t += 1;
        }
        Self(c)
    }
}

static TILE_CONFIG: TileConfig = TileConfig::new();

/// A 64-byte-aligned tile buffer.
#[repr(C, align(64))]
struct TileBuf([u8; TILE_BYTES]);

/// `y (batch × rows) = x Ŵᵀ`, the fused product of `blocks` on AMX (every entry of `y` is
/// written). `x` is the raw input (`batch × cols`); `inv_scale` is folded in here. `batch · rank ≤ MAX_N`; callers check
/// [`available`].
pub(super) fn fused_amx(call: FusedCall<'_>, scratch: &mut [f32]) {
    let (rows, cols, rank, batch) = (call.rows, call.cols, call.rank, call.batch);
    let (blocks, inv_scale, x, y) = (call.blocks, call.inv_scale, call.x, call.y);
    debug_assert!(batch * rank <= MAX_N && available());
    let levels = blocks.len();
    let lay = AmxLayout::new(cols, levels, batch);
    let (xs, rest) = scratch.split_at_mut(lay.xs);
    // Tile rows are 64 bytes: a row that straddles two cache lines costs two accesses per
    // tile load, so the tiles start on a 64-byte boundary (the scratch is only f32-aligned).
    let skip = rest.as_ptr().align_offset(64).min(ALIGN_SLACK);
    let (tiles, rest) = rest[skip..].split_at_mut(lay.tiles);
    let (scales, rest) = rest.split_at_mut(lay.scales);
    let colsums: &mut [i32] = bytemuck::cast_slice_mut(&mut rest[..lay.colsums]);
    super::scaled_input_into(xs, x, inv_scale);
    let tiles: &mut [i8] = bytemuck::cast_slice_mut(tiles);
    let per_level = lay.blocks * HALVES * TILE_BYTES;
    {
        // Phase 1: one task per level quantizes its activation columns into its own tiles.
        let tiles_ptr = SyncPtr(tiles.as_mut_ptr());
        let sc_ptr = SyncPtr(scales.as_mut_ptr());
        let cs_ptr = SyncPtr(colsums.as_mut_ptr());
        let xs = &*xs;
        pool::run(levels, &|l, _slot| {
            // SAFETY: task `l` alone writes level `l`'s tiles, scales and column sums; every
            // region lies inside the scratch carved by `AmxLayout`.
            let (t, sc, cs) = unsafe {
                (
                    std::slice::from_raw_parts_mut(tiles_ptr.get().add(l * per_level), per_level),
                    std::slice::from_raw_parts_mut(sc_ptr.get().add(l * MAX_N), MAX_N),
                    std::slice::from_raw_parts_mut(cs_ptr.get().add(l * MAX_N), MAX_N),
                )
            };
            // SAFETY: `available()` (checked by the caller) includes AVX-512 F, BW and VBMI.
            unsafe { quantize_level_avx512(&blocks[l], xs, cols, batch, t, sc, cs) };
        });
    }
    let tiles = &*tiles;
    let (scales, colsums) = (&*scales, &*colsums);
    let y_ptr = SyncPtr(y.as_mut_ptr());
    let task_rows = PASS_ROWS * passes_per_task(rows.div_ceil(PASS_ROWS), pool::slots());
    let tasks = rows.div_ceil(task_rows);
    pool::run(tasks, &|task, _slot| {
        let row0 = task * task_rows;
        let nrows = task_rows.min(rows - row0);
        // SAFETY: `available()` holds (checked by the caller); task `task` alone writes rows
        // row0..row0 + nrows of every batch item of `y`; the tiles were sized by `AmxLayout`.
        unsafe {
            rows_amx(
                blocks, rows, rank, batch, &lay, tiles, scales, colsums, row0, nrows, y_ptr,
            )
        }
    });
}

/// The plain reference of [`quantize_level_avx512`] (tests compare their bytes): one
/// level's activation tiles. For each `n = item·rank + r`, `t = bf[·, r] ⊙ xs[item]` is
/// rounded at `max|t| / QMAX` into the VNNI layout (high bytes, then low bytes); `scales[n]`
/// gets `max|t| / QMAX` and `colsums[n]` the codes' integer sum.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
fn quantize_level(
    bf: &[f32],
    xs: &[f32],
    cols: usize,
    rank: usize,
    batch: usize,
    tiles: &mut [i8],
    scales: &mut [f32],
    colsums: &mut [i32],
) {
    let qmax = QMAX;
    tiles.fill(0);
    scales.fill(0.0);
    colsums.fill(0);
    for bi in 0..batch {
        let xr = &xs[bi * cols..(bi + 1) * cols];
        for r in 0..rank {
            let n = bi * rank + r;
            let t = |c: usize| bf[c * rank + r] * xr[c];
            let maxabs = (0..cols).fold(0.0f32, |m, c| m.max(t(c).abs()));
            if !(maxabs > 0.0 && maxabs.is_finite()) {
                continue;
            }
            let inv = qmax / maxabs;
            scales[n] = maxabs / qmax;
            let mut sum = 0i32;
            for c in 0..cols {
                let q = (t(c) * inv).round_ties_even() as i32;
                sum += q;
                // Block `c / 64`, tile row `(c % 64) / 4`, byte `4n + c % 4`.
                let at = (c / 64) * HALVES * TILE_BYTES + ((c % 64) / 4) * 64 + 4 * n + c % 4;
                tiles[at] = (q >> 8) as i8;
                tiles[at + TILE_BYTES] = (q & 0xFF) as u8 as i8;
            }
            colsums[n] = sum;
        }
    }
}

/// Largest code of an activation (16-bit, split into a signed high and an unsigned low byte).
const QMAX: f32 = 32767.0;
/// Bytes per activation code: one tile of high bytes and one of low bytes per column block.
const HALVES: usize = 2;

/// [`quantize_level`] in AVX-512, all `n` at once in the 16 lanes of one register, writing
/// the same bytes (a proptest checks it): per column `c`, lane `n` holds
/// `bf[c][n % rank] · xs[n / rank][c]`; one pass finds the lanes' maxima, a second rounds
/// (ties to even, like the reference) and writes four columns' codes per 64-byte tile row.
/// Padding columns and lanes `n ≥ batch · rank` are written as zeros, so nothing is filled
/// first.
///
/// # Safety
/// AVX-512 F, BW and VBMI; the slices sized as for [`quantize_level`], `batch · rank ≤ 16`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn quantize_level_avx512(
    blk: &ResidualBlockRef<'_>,
    xs: &[f32],
    cols: usize,
    batch: usize,
    tiles: &mut [i8],
    scales: &mut [f32],
    colsums: &mut [i32],
) {
    let rank = blk.rank;
    let n_used = batch * rank;
    debug_assert!(n_used <= MAX_N && blk.cols() == cols && xs.len() >= batch * cols);
    let blocks = cols.div_ceil(64);
    debug_assert!(tiles.len() >= blocks * HALVES * TILE_BYTES);
    let lanes: __mmask16 = if n_used == 16 {
        !0
    } else {
        (1u16 << n_used) - 1
    };
    let rank_mask: __mmask16 = if rank >= 16 { !0 } else { (1u16 << rank) - 1 };
    let mut r_idx = [0i32; 16];
    let mut x_idx = [0i32; 16];
    for n in 0..n_used {
        r_idx[n] = (n % rank) as i32;
        x_idx[n] = ((n / rank) * cols) as i32;
    }
    let r_idx = _mm512_loadu_si512(r_idx.as_ptr().cast());
    let x_idx = _mm512_loadu_si512(x_idx.as_ptr().cast());
    // Row c of B as the kernels read it (`ResidualBlockRef::kernel_b_into`: the f16 values,
    // or the int8 codes times `sa·sb`), straight from the block: lanes r < rank.
    let (f16_b, i8_b, fold) = match (blk.a, blk.b) {
        (FactorRef::I8 { scale: sa, .. }, FactorRef::I8 { q, scale: sb }) => {
            let mut fold = [0.0f32; 16];
            for (r, f) in fold.iter_mut().enumerate().take(rank) {
                *f = sa[r] * sb[r];
            }
            (None, Some(q), _mm512_loadu_ps(fold.as_ptr()))
        }
        (_, FactorRef::F16(b)) => (Some(b), None, _mm512_setzero_ps()),
        (_, FactorRef::I8 { q, scale: sb }) => {
            // (Not built by this crate: callers reject mixed factor types.)
            let mut fold = [0.0f32; 16];
            fold[..rank].copy_from_slice(&sb[..rank]);
            (None, Some(q), _mm512_loadu_ps(fold.as_ptr()))
        }
    };
    let mask32 = u32::from(rank_mask);
    let mask64 = u64::from(rank_mask);
    let b_at = |c: usize| match (f16_b, i8_b) {
        (Some(b), _) => _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_maskz_loadu_epi16(
            mask32,
            b.as_ptr().add(c * rank).cast(),
        ))),
        (_, Some(q)) => {
            let codes = _mm512_maskz_loadu_epi8(mask64, q.as_ptr().add(c * rank));
            let codes = _mm512_cvtepi8_epi32(_mm512_castsi512_si128(codes));
            _mm512_mul_ps(_mm512_cvtepi32_ps(codes), fold)
        }
        _ => _mm512_setzero_ps(),
    };
    // t for column c (c < cols), lanes beyond n_used zero.
    let t_at = |c: usize| {
        // At batch 1 lane n is rank n: no permutation (masked loads zero the lanes ≥ rank).
        let b = if batch == 1 {
            b_at(c)
        } else {
            _mm512_permutexvar_ps(r_idx, b_at(c))
        };
        // Batch 1 (decode): every lane reads the same x, a broadcast, not a gather.
        let x = if batch == 1 {
            _mm512_set1_ps(*xs.get_unchecked(c))
        } else {
            _mm512_mask_i32gather_ps::<4>(
                _mm512_setzero_ps(),
                lanes,
                x_idx,
                xs.as_ptr().add(c).cast(),
            )
        };
        _mm512_maskz_mul_ps(lanes, b, x)
    };
    // Four running maxima, so the loop is not one chain of dependent `vmaxps`.
    let mut maxs = [_mm512_setzero_ps(); 4];
    let quads = cols / 4;
    for q in 0..quads {
        for (j, m) in maxs.iter_mut().enumerate() {
            *m = _mm512_max_ps(*m, _mm512_abs_ps(t_at(4 * q + j)));
        }
    }
    for c in 4 * quads..cols {
        maxs[0] = _mm512_max_ps(maxs[0], _mm512_abs_ps(t_at(c)));
    }
    let maxv = _mm512_max_ps(
        _mm512_max_ps(maxs[0], maxs[1]),
        _mm512_max_ps(maxs[2], maxs[3]),
    );
    let mut maxabs = [0.0f32; 16];
    _mm512_storeu_ps(maxabs.as_mut_ptr(), maxv);
    let qmax = QMAX;
    let mut inv = [0.0f32; 16];
    for n in 0..MAX_N {
        let m = maxabs[n];
        let ok = n < n_used && m > 0.0 && m.is_finite();
        scales[n] = if ok { m / qmax } else { 0.0 };
        inv[n] = if ok { qmax / m } else { 0.0 };
    }
    let invv = _mm512_loadu_ps(inv.as_ptr());
    // Codes of columns 4i..4i+4 in one tile row: the 16-bit codes of two columns share a
    // dword (`w01`, `w23`), and one `vpermt2b` each gathers the four low bytes and the four
    // high bytes of every lane into place.
    let mut lo_idx = [0u8; 64];
    for (b, v) in lo_idx.iter_mut().enumerate() {
        let (n, j) = (b / 4, b % 4);
        *v = (4 * n + 2 * (j % 2) + 64 * (j / 2)) as u8;
    }
    let lo_idx = _mm512_loadu_si512(lo_idx.as_ptr().cast());
    let hi_idx = _mm512_add_epi8(lo_idx, _mm512_set1_epi8(1));
    let low16 = _mm512_set1_epi32(0xFFFF);
    let code = |c: usize| {
        if c < cols {
            _mm512_cvtps_epi32(_mm512_mul_ps(t_at(c), invv))
        } else {
            _mm512_setzero_si512()
        }
    };
    let mut sum = _mm512_setzero_si512();
    for cb in 0..blocks {
        let out = tiles.as_mut_ptr().add(cb * HALVES * TILE_BYTES);
        for i in 0..16 {
            let c = cb * 64 + 4 * i;
            let (q0, q1, q2, q3) = (code(c), code(c + 1), code(c + 2), code(c + 3));
            sum = _mm512_add_epi32(
                sum,
                _mm512_add_epi32(_mm512_add_epi32(q0, q1), _mm512_add_epi32(q2, q3)),
            );
            let w01 = _mm512_or_si512(_mm512_and_si512(q0, low16), _mm512_slli_epi32::<16>(q1));
            let w23 = _mm512_or_si512(_mm512_and_si512(q2, low16), _mm512_slli_epi32::<16>(q3));
            let hi = _mm512_permutex2var_epi8(w01, hi_idx, w23);
            let lo = _mm512_permutex2var_epi8(w01, lo_idx, w23);
            _mm512_storeu_si512(out.add(i * 64).cast(), hi);
            _mm512_storeu_si512(out.add(TILE_BYTES + i * 64).cast(), lo);
        }
    }
    _mm512_storeu_si512(colsums.as_mut_ptr().cast(), sum);
}

/// Rows `row0..row0 + nrows` (at most [`MAX_TASK_PASSES`] · [`PASS_ROWS`]) of every item
/// of `y` (`batch × rows`).
///
/// Levels run outermost, so one level's activation tiles are read from L1 by every 32-row
/// pass of the task. In a pass, two 16-row tiles share each activation tile load:
/// tmm0/tmm1 (high / low products) and tmm2/tmm3 accumulate the two row tiles, tmm4 and tmm7
/// hold their sign bytes (two buffers, so one tile's stores do not wait on the other's
/// load), tmm5/tmm6 the level's activation tiles of one 64-column block. The epilogue turns
/// each row's 16 integer products into f32 in one register, `S·Q = −2·(256·C_hi + C_lo) −
/// ΣQ`, times the column scales and the row of `A`, added to the row's accumulator.
///
/// # Safety
/// AMX-INT8 and AVX-512 BW available with the tile permission granted ([`available`]); the
/// caller owns those rows of `y` exclusively; `tiles`, `scales`, `colsums` laid out by
/// `lay` for `blocks`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn rows_amx(
    blocks: &[ResidualBlockRef<'_>],
    rows: usize,
    rank: usize,
    batch: usize,
    lay: &AmxLayout,
    tiles: &[i8],
    scales: &[f32],
    colsums: &[i32],
    row0: usize,
    nrows: usize,
    y: SyncPtr<f32>,
) {
    const MAX_ROWS: usize = MAX_TASK_PASSES * PASS_ROWS;
    debug_assert!(nrows <= MAX_ROWS && batch * rank <= MAX_N);
    // Two stages of two tiles' sign bytes: block cb + 1 is expanded while block cb's tile
    // products run, so a tile load never waits on the stores just before it.
    let new_buf = || TileBuf([0; TILE_BYTES]);
    let mut signs = [[new_buf(), new_buf()], [new_buf(), new_buf()]];
    // c[0], c[1]: high / low products of row tile 0; c[2], c[3]: of row tile 1.
    let mut c = [[[0i32; MAX_N]; TILE_ROWS]; 4];
    let mut acc = [_mm512_setzero_ps(); MAX_ROWS];
    let mut r_idx = [0i32; MAX_N];
    for (n, v) in r_idx.iter_mut().enumerate() {
        *v = (n % rank) as i32;
    }
    let r_idx = _mm512_loadu_si512(r_idx.as_ptr().cast());
    let n_used = batch * rank;
    let lanes: __mmask16 = if n_used == 16 {
        !0
    } else {
        (1u16 << n_used) - 1
    };
    let rank_mask: __mmask16 = if rank >= 16 { !0 } else { (1u16 << rank) - 1 };
    let (a_mask32, a_mask64) = (u32::from(rank_mask), u64::from(rank_mask));
    let hi_weight = _mm512_set1_ps(256.0);
    let minus_two = _mm512_set1_ps(-2.0);
    let per_level = lay.blocks * HALVES * TILE_BYTES;
    let wpr = lay.blocks;
    let stride = 64usize;
    asm!("ldtilecfg [{}]", in(reg) TILE_CONFIG.0.as_ptr(), options(nostack, readonly));
    for (l, blk) in blocks.iter().enumerate() {
        let words = blk.signs.words();
        let lt = tiles.as_ptr().add(l * per_level);
        let sc = _mm512_loadu_ps(scales.as_ptr().add(l * MAX_N));
        let cs = _mm512_cvtepi32_ps(_mm512_loadu_si512(colsums.as_ptr().add(l * MAX_N).cast()));
        // Row i of A as the kernels read it (`ResidualBlockRef::kernel_a_row`), loaded straight
        // into a register: going through a stored array stalled on store forwarding.
        let a_row = |i: usize| match blk.a {
            FactorRef::F16(a) => _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_maskz_loadu_epi16(
                a_mask32,
                a.as_ptr().add(i * rank).cast(),
            ))),
            FactorRef::I8 { q, .. } => {
                let codes = _mm512_maskz_loadu_epi8(a_mask64, q.as_ptr().add(i * rank));
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(codes)))
            }
        };
        for p0 in (0..nrows).step_by(PASS_ROWS) {
            let prow0 = row0 + p0;
            let prows = PASS_ROWS.min(nrows - p0);
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
            // The pass's 32 rows' sign words of block cb as bytes (-1: bit set).
            let expand = |cb: usize, stage: &mut [TileBuf; 2]| {
                for (t, buf) in stage.iter_mut().enumerate() {
                    for m in 0..TILE_ROWS {
                        let r = 16 * t + m;
                        let w = if r < prows {
                            *words.get_unchecked((prow0 + r) * wpr + cb)
                        } else {
                            0
                        };
                        let bytes = _mm512_movm_epi8(w);
                        _mm512_store_si512(buf.0.as_mut_ptr().add(m * 64).cast(), bytes);
                    }
                }
            };
            expand(0, &mut signs[0]);
            for cb in 0..lay.blocks {
                let hi = lt.add(cb * HALVES * TILE_BYTES);
                asm!(
                    "tileloadd tmm5, [{h} + {st}]",
                    "tileloadd tmm6, [{lo} + {st}]",
                    h = in(reg) hi,
                    lo = in(reg) hi.add(TILE_BYTES),
                    st = in(reg) stride,
                    options(nostack, readonly)
                );
                let (cur, next) = signs.split_at_mut(1);
                let (cur, next) = if cb % 2 == 0 {
                    (&cur[0], &mut next[0])
                } else {
                    (&next[0], &mut cur[0])
                };
                asm!(
                    "tileloadd tmm4, [{s0} + {st}]",
                    "tdpbssd tmm0, tmm4, tmm5",
                    "tdpbsud tmm1, tmm4, tmm6",
                    "tileloadd tmm7, [{s1} + {st}]",
                    "tdpbssd tmm2, tmm7, tmm5",
                    "tdpbsud tmm3, tmm7, tmm6",
                    s0 = in(reg) cur[0].0.as_ptr(),
                    s1 = in(reg) cur[1].0.as_ptr(),
                    st = in(reg) stride,
                    options(nostack, readonly)
                );
                if cb + 1 < lay.blocks {
                    expand(cb + 1, next);
                }
            }
            asm!(
                "tilestored [{c0} + {st}], tmm0",
                "tilestored [{c1} + {st}], tmm1",
                "tilestored [{c2} + {st}], tmm2",
                "tilestored [{c3} + {st}], tmm3",
                c0 = in(reg) c[0].as_mut_ptr(),
                c1 = in(reg) c[1].as_mut_ptr(),
                c2 = in(reg) c[2].as_mut_ptr(),
                c3 = in(reg) c[3].as_mut_ptr(),
                st = in(reg) stride,
                options(nostack)
            );
            for r in 0..prows {
                let (t, m) = (r / TILE_ROWS, r % TILE_ROWS);
                let c_hi = _mm512_cvtepi32_ps(_mm512_loadu_si512(c[2 * t][m].as_ptr().cast()));
                let c_lo = _mm512_cvtepi32_ps(_mm512_loadu_si512(c[2 * t + 1][m].as_ptr().cast()));
                // −2·(w·C_hi + C_lo) − ΣQ (exact below 2^24 per part; the sum rounds in f32).
                let neg_bq = _mm512_fmadd_ps(hi_weight, c_hi, c_lo);
                let sq = _mm512_fmsub_ps(minus_two, neg_bq, cs);
                let a = _mm512_permutexvar_ps(r_idx, a_row(prow0 + r));
                let acc_r = acc.get_unchecked_mut(p0 + r);
                *acc_r = _mm512_mask3_fmadd_ps(_mm512_mul_ps(a, sc), sq, *acc_r, lanes);
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
    let mut out = [0.0f32; MAX_N];
    for (r, acc_r) in acc.iter().enumerate().take(nrows) {
        _mm512_storeu_ps(out.as_mut_ptr(), *acc_r);
        for bi in 0..batch {
            let v: f32 = out[bi * rank..(bi + 1) * rank].iter().sum();
            *y.get().add(bi * rows + row0 + r) = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::FactorDtype;
    use crate::testutil::{random_block_with, XorShift};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The AVX-512 quantization writes exactly the reference's tiles, scales and sums.
        #[test]
        fn simd_quantization_equals_reference(cols in 1usize..300, rank in 1usize..=16,
                                              batch_pick in 0usize..16,
                                              seed: u64) {
            if !available() {
                return Ok(());
            }
            let batch = 1 + batch_pick % (16 / rank);
            let mut rng = XorShift::new(seed);
            let dt = if seed % 2 == 0 { FactorDtype::F16 } else { FactorDtype::I8 };
            let blk = random_block_with(3, cols, rank, seed, dt);
            let mut bf = vec![0.0f32; cols * rank];
            blk.view().kernel_b_into(&mut bf);
            let mut xs: Vec<f32> = (0..batch * cols).map(|_| rng.next_gaussian()).collect();
            xs[0] = 0.0;
            let len = cols.div_ceil(64) * HALVES * TILE_BYTES;
            let (mut t1, mut t2) = (vec![0x55i8; len], vec![0x33i8; len]);
            let (mut s1, mut s2) = (vec![f32::NAN; MAX_N], vec![f32::NAN; MAX_N]);
            let (mut c1, mut c2) = (vec![7i32; MAX_N], vec![9i32; MAX_N]);
            quantize_level(&bf, &xs, cols, rank, batch, &mut t1, &mut s1, &mut c1);
            // SAFETY: `available()` holds; the buffers have the documented sizes.
            unsafe {
                quantize_level_avx512(&blk.view(), &xs, cols, batch, &mut t2, &mut s2, &mut c2)
            };
            prop_assert_eq!(t1, t2);
            prop_assert_eq!(s1, s2);
            prop_assert_eq!(c1, c2);
        }
    }
}
