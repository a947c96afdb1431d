//! The quantized weight type, its configuration, and round-to-nearest (RTN) quantization.

use bitstack_core::{CoreError, LinearOp};
use half::f16;
use rayon::prelude::*;

use super::error::{check_finite, check_len, BaselineError, Result};
use super::pack::{check_bits, pack_into, packed_words, unpack_into};

/// A borrowed dense weight, PyTorch layout `[out = rows, in = cols]`, row-major, all finite.
#[derive(Clone, Copy, Debug)]
pub struct WeightView<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
}

impl<'a> WeightView<'a> {
    /// Checks the length against `rows × cols` and that every value is finite.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        if rows == 0 || cols == 0 {
            return Err(BaselineError::InvalidParameter {
                name: "shape",
                reason: format!("{rows}×{cols} weight is empty"),
            });
        }
        check_len("weight", rows * cols, data.len())?;
        check_finite("weight", data)?;
        Ok(Self { data, rows, cols })
    }
    /// The values, row-major.
    pub fn data(&self) -> &'a [f32] {
        self.data
    }
    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub(crate) fn to_f64(self) -> Vec<f64> {
        self.data.iter().map(|&v| v as f64).collect()
    }
}

/// How input columns share a scale and zero point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grouping {
    /// One scale and zero per output row ("w4" in the paper's tables).
    PerChannel,
    /// One scale and zero per run of this many consecutive input columns ("w4g128").
    Groups(usize),
}

impl Default for Grouping {
    fn default() -> Self {
        Grouping::Groups(128)
    }
}

/// Bit width and grouping shared by RTN, GPTQ and AWQ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantConfig {
    /// Bits per code: 2, 3 or 4.
    pub bits: u8,
    /// Scale/zero sharing.
    pub grouping: Grouping,
}

impl Default for QuantConfig {
    fn default() -> Self {
        Self {
            bits: 4,
            grouping: Grouping::default(),
        }
    }
}

impl QuantConfig {
    /// The paper's table label: `w3` or `w3g128`.
    pub fn label(&self) -> String {
        match self.grouping {
            Grouping::PerChannel => format!("w{}", self.bits),
            Grouping::Groups(g) => format!("w{}g{g}", self.bits),
        }
    }

    /// Validates the configuration for a weight with `cols` input columns and returns the
    /// effective group length (`cols` for per-channel; a group longer than the row is clamped
    /// to it, which is the same quantizer).
    pub fn group_len(&self, cols: usize) -> Result<usize> {
        check_bits(self.bits)?;
        match self.grouping {
            Grouping::PerChannel => Ok(cols),
            Grouping::Groups(0) => Err(BaselineError::InvalidParameter {
                name: "group size",
                reason: "must be positive".into(),
            }),
            Grouping::Groups(g) => Ok(g.min(cols)),
        }
    }

    pub(crate) fn maxq(&self) -> f64 {
        ((1u32 << self.bits) - 1) as f64
    }
}

/// Asymmetric min/max parameters of one group, already rounded to their stored f16 values.
///
/// As in the GPTQ reference quantizer the range is widened to include 0 so the zero point is an
/// integer in `[0, maxq]` (exact in f16) and 0.0 is representable; an all-zero group gets the
/// range [-1, 1] so the step is never 0.
pub(crate) fn group_params(
    min: f64,
    max: f64,
    maxq: f64,
    row: usize,
    group: usize,
) -> Result<(f16, f16)> {
    let (mut lo, mut hi) = (min.min(0.0), max.max(0.0));
    if lo == hi {
        lo = -1.0;
        hi = 1.0;
    }
    let step = (hi - lo) / maxq;
    let s16 = f16::from_f64(step);
    if !s16.is_finite() {
        return Err(BaselineError::ScaleOutOfRange {
            row,
            group,
            scale: step,
        });
    }
    // A step below f16's smallest subnormal would round to 0; the smallest step keeps every
    // code finite and such a group's values are below 1e-7 anyway.
    let s16 = if s16.to_f64() == 0.0 {
        f16::from_bits(1)
    } else {
        s16
    };
    let zero = (-lo / s16.to_f64()).round_ties_even().clamp(0.0, maxq);
    Ok((s16, f16::from_f64(zero)))
}

/// `clamp(round(w / s) + z, 0, maxq)`, ties to even as `torch.round`.
#[inline]
pub(crate) fn quantize_value(w: f64, scale: f64, zero: f64, maxq: f64) -> u8 {
    ((w / scale).round_ties_even() + zero).clamp(0.0, maxq) as u8
}

#[inline]
pub(crate) fn dequantize_value(code: u8, scale: f64, zero: f64) -> f64 {
    scale * (code as f64 - zero)
}

/// Bytes a [`QuantizedLinear`] holds, by tensor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuantBytes {
    /// Packed integer codes (each row padded to whole `u32` words).
    pub codes: u64,
    /// f16 scales, one per row and group.
    pub scales: u64,
    /// f16 zero points, one per row and group.
    pub zeros: u64,
    /// AWQ's f16 per-input-column `1/s` (0 for RTN and GPTQ).
    pub input_scale: u64,
}

impl QuantBytes {
    /// Sum of all tensors.
    pub fn total(&self) -> u64 {
        self.codes + self.scales + self.zeros + self.input_scale
    }
}

/// A group-quantized linear weight: densely packed 2/3/4-bit codes, f16 per-group scales and
/// zero points, and optionally (AWQ) an f16 scale per input column applied after dequantizing:
/// `Ŵ[r, j] = scale[r, g] · (code[r, j] − zero[r, g]) · input_scale[j]` with `g = j / group_len`.
#[derive(Clone, Debug)]
pub struct QuantizedLinear {
    rows: usize,
    cols: usize,
    bits: u8,
    group_len: usize,
    words_per_row: usize,
    codes: Vec<u32>,
    scales: Vec<f16>,
    zeros: Vec<f16>,
    input_scale: Option<Vec<f16>>,
}

/// Rows dequantized at once in `forward`: big enough for an efficient GEMM, small enough that
/// the f32 scratch stays in cache-sized pieces instead of a whole dense copy of the weight.
const PANEL_ROWS: usize = 64;

impl QuantizedLinear {
    /// Builds from unpacked codes (`rows × cols`, each `< 2^bits`), `rows × groups` scales and
    /// zeros and an optional per-column input scale.
    #[allow(clippy::too_many_arguments)]
    pub fn from_codes(
        rows: usize,
        cols: usize,
        bits: u8,
        group_len: usize,
        codes: &[u8],
        scales: Vec<f16>,
        zeros: Vec<f16>,
        input_scale: Option<Vec<f16>>,
    ) -> Result<Self> {
        check_bits(bits)?;
        if rows == 0 || cols == 0 || group_len == 0 || group_len > cols {
            return Err(BaselineError::InvalidParameter {
                name: "shape",
                reason: format!("{rows}×{cols} with group length {group_len}"),
            });
        }
        check_len("codes", rows * cols, codes.len())?;
        let groups = cols.div_ceil(group_len);
        check_len("scales", rows * groups, scales.len())?;
        check_len("zeros", rows * groups, zeros.len())?;
        if let Some(s) = &input_scale {
            check_len("input scale", cols, s.len())?;
        }
        let all_finite = scales
            .iter()
            .chain(zeros.iter())
            .chain(input_scale.iter().flatten())
            .all(|v| v.is_finite());
        if !all_finite {
            return Err(BaselineError::NonFinite("quantization parameters"));
        }
        let maxq = (1u8 << bits) - 1;
        if codes.iter().any(|&c| c > maxq) {
            return Err(BaselineError::InvalidParameter {
                name: "codes",
                reason: format!("a code does not fit in {bits} bits"),
            });
        }
        let words_per_row = packed_words(cols, bits);
        let mut packed = vec![0u32; rows * words_per_row];
        packed
            .par_chunks_mut(words_per_row)
            .zip(codes.par_chunks(cols))
            .for_each(|(w, c)| pack_into(c, bits, w));
        Ok(Self {
            rows,
            cols,
            bits,
            group_len,
            words_per_row,
            codes: packed,
            scales,
            zeros,
            input_scale,
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bits per code.
    pub fn bits(&self) -> u8 {
        self.bits
    }
    /// Input columns per group (`cols` for per-channel quantization).
    pub fn group_len(&self) -> usize {
        self.group_len
    }
    /// Groups per row.
    pub fn groups_per_row(&self) -> usize {
        self.cols.div_ceil(self.group_len)
    }
    /// Packed codes, `rows × packed_words(cols, bits)` words.
    pub fn packed_codes(&self) -> &[u32] {
        &self.codes
    }
    /// Per-group steps, `rows × groups_per_row`.
    pub fn scales(&self) -> &[f16] {
        &self.scales
    }
    /// Per-group zero points, `rows × groups_per_row`.
    pub fn zeros(&self) -> &[f16] {
        &self.zeros
    }
    /// AWQ's per-input-column `1/s`, if any.
    pub fn input_scale(&self) -> Option<&[f16]> {
        self.input_scale.as_deref()
    }
    /// Unpacked codes, `rows × cols`.
    pub fn codes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .zip(self.codes.par_chunks(self.words_per_row))
            .for_each(|(o, w)| unpack_into(w, self.bits, o));
        out
    }
    /// Bytes held, by tensor.
    pub fn bytes(&self) -> QuantBytes {
        QuantBytes {
            codes: (self.codes.len() * 4) as u64,
            scales: (self.scales.len() * 2) as u64,
            zeros: (self.zeros.len() * 2) as u64,
            input_scale: self
                .input_scale
                .as_ref()
                .map_or(0, |s| (s.len() * 2) as u64),
        }
    }

    /// The input scale widened once per call: converting f16 per element would dominate.
    fn input_scale_f32(&self) -> Option<Vec<f32>> {
        self.input_scale
            .as_ref()
            .map(|s| s.iter().map(|v| v.to_f32()).collect())
    }

    fn dequantize_row(
        &self,
        r: usize,
        input_scale: Option<&[f32]>,
        code_buf: &mut [u8],
        out: &mut [f32],
    ) {
        let words = &self.codes[r * self.words_per_row..(r + 1) * self.words_per_row];
        unpack_into(words, self.bits, code_buf);
        let g = self.groups_per_row();
        for (gi, (oc, cc)) in out
            .chunks_mut(self.group_len)
            .zip(code_buf.chunks(self.group_len))
            .enumerate()
        {
            let s = self.scales[r * g + gi].to_f32();
            let z = self.zeros[r * g + gi].to_f32();
            for (o, &c) in oc.iter_mut().zip(cc) {
                *o = s * (c as f32 - z);
            }
        }
        if let Some(is) = input_scale {
            for (o, s) in out.iter_mut().zip(is) {
                *o *= s;
            }
        }
    }

    /// The dense f32 weight this layer represents, `rows × cols` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        let is = self.input_scale_f32();
        out.par_chunks_mut(self.cols).enumerate().for_each_init(
            || vec![0u8; self.cols],
            |buf, (r, o)| self.dequantize_row(r, is.as_deref(), buf, o),
        );
        out
    }
}

impl LinearOp for QuantizedLinear {
    fn in_features(&self) -> usize {
        self.cols
    }
    fn out_features(&self) -> usize {
        self.rows
    }
    fn forward(&self, x: &[f32], y: &mut [f32]) -> bitstack_core::Result<()> {
        if !x.len().is_multiple_of(self.cols) {
            return Err(CoreError::ShapeMismatch {
                what: "input (multiple of in_features)",
                expected: self.cols,
                actual: x.len(),
            });
        }
        let batch = x.len() / self.cols;
        if y.len() != batch * self.rows {
            return Err(CoreError::ShapeMismatch {
                what: "output",
                expected: batch * self.rows,
                actual: y.len(),
            });
        }
        if batch == 0 {
            return Ok(());
        }
        let xm = faer::MatRef::from_row_major_slice(x, batch, self.cols);
        let is = self.input_scale_f32();
        // Each panel of rows is dequantized and multiplied independently; panels run in
        // parallel, each GEMM sequentially, so the cores are not oversubscribed.
        let panels: Vec<(usize, Vec<f32>)> = (0..self.rows.div_ceil(PANEL_ROWS))
            .into_par_iter()
            .map(|p| {
                let r0 = p * PANEL_ROWS;
                let pr = PANEL_ROWS.min(self.rows - r0);
                let mut wbuf = vec![0f32; pr * self.cols];
                let mut cbuf = vec![0u8; self.cols];
                for (i, o) in wbuf.chunks_mut(self.cols).enumerate() {
                    self.dequantize_row(r0 + i, is.as_deref(), &mut cbuf, o);
                }
                let wm = faer::MatRef::from_row_major_slice(&wbuf, pr, self.cols);
                let mut out = vec![0f32; batch * pr];
                let om = faer::MatMut::from_row_major_slice_mut(&mut out, batch, pr);
                faer::linalg::matmul::matmul(
                    om,
                    faer::Accum::Replace,
                    xm,
                    wm.transpose(),
                    1.0f32,
                    faer::Par::Seq,
                );
                (r0, out)
            })
            .collect();
        for (r0, out) in panels {
            let pr = out.len() / batch;
            for (yrow, orow) in y.chunks_mut(self.rows).zip(out.chunks(pr)) {
                yrow[r0..r0 + pr].copy_from_slice(orow);
            }
        }
        Ok(())
    }
    fn weight_bytes(&self) -> u64 {
        self.bytes().total()
    }
}

/// Per-row group parameters and codes of `w` (`rows × cols`, f64) by plain min/max RTN.
pub(crate) fn rtn_parts(
    w: &[f64],
    rows: usize,
    cols: usize,
    cfg: &QuantConfig,
) -> Result<(Vec<u8>, Vec<f16>, Vec<f16>)> {
    let gl = cfg.group_len(cols)?;
    let groups = cols.div_ceil(gl);
    let maxq = cfg.maxq();
    let mut codes = vec![0u8; rows * cols];
    let mut scales = vec![f16::ZERO; rows * groups];
    let mut zeros = vec![f16::ZERO; rows * groups];
    codes
        .par_chunks_mut(cols)
        .zip(w.par_chunks(cols))
        .zip(
            scales
                .par_chunks_mut(groups)
                .zip(zeros.par_chunks_mut(groups)),
        )
        .enumerate()
        .try_for_each(|(r, ((crow, wrow), (srow, zrow)))| -> Result<()> {
            for (g, (cg, wg)) in crow.chunks_mut(gl).zip(wrow.chunks(gl)).enumerate() {
                let (mn, mx) = wg
                    .iter()
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                        (a.min(v), b.max(v))
                    });
                let (s, z) = group_params(mn, mx, maxq, r, g)?;
                srow[g] = s;
                zrow[g] = z;
                let (s, z) = (s.to_f64(), z.to_f64());
                for (c, &v) in cg.iter_mut().zip(wg) {
                    *c = quantize_value(v, s, z, maxq);
                }
            }
            Ok(())
        })?;
    Ok((codes, scales, zeros))
}

/// Round-to-nearest: asymmetric min/max quantization of every group independently.
pub fn rtn(w: WeightView<'_>, cfg: &QuantConfig) -> Result<QuantizedLinear> {
    let (rows, cols) = (w.rows(), w.cols());
    let gl = cfg.group_len(cols)?;
    let (codes, scales, zeros) = rtn_parts(&w.to_f64(), rows, cols, cfg)?;
    QuantizedLinear::from_codes(rows, cols, cfg.bits, gl, &codes, scales, zeros, None)
}
