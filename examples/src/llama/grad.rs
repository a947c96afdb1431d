//! Reverse mode through the decoder: the gradient of the mean next-token loss with respect to
//! every linear's weight, `G_w = ∂L/∂W_w`, at one configuration of dense weights.
//!
//! Sorting uses it to score a residual block `B` of weight `w` by the first-order loss change
//! `⟨G_w, B⟩` it brings (`bitstack_sort::sort_proxy_gradient`): one forward and one backward
//! pass give that for every block of every weight, where a direct measurement costs one
//! forward pass per block. The forward pass keeps only each layer's input; the backward pass
//! recomputes a layer's internals from it (activation checkpointing), so memory stays at one
//! layer's activations plus the gradients.
//!
//! Only what the first-order scores need is differentiated: norms', biases', embeddings' and
//! the head's own parameters get no gradient, but the pass runs *through* all of them — Q/K/V
//! biases (Qwen2) shift the activations every weight gradient is taken at, and an untied head
//! (Qwen2, Llama-3) is the matrix the loss's gradient flows back through.

use std::borrow::Cow;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::forward::{bias_and_rope, clear_upper_simd, rms_norm, SeqBatch};
use super::resident::{LlamaResident, TokenEmbedding};
use super::{check_len, LinearKind, LlamaError, Result};

/// Rows of logits materialised at once in the head's backward pass.
const HEAD_CHUNK: usize = 128;

/// `∂L/∂W` of every linear (`rows × cols`, row-major, in `weights`' order) and the loss `L`,
/// the mean negative log-likelihood of `targets`.
#[derive(Clone, Debug)]
pub struct WeightGradients {
    /// Mean NLL at the configuration.
    pub loss: f64,
    /// `grads[layer · 7 + kind.index()]`.
    pub grads: Vec<Vec<f32>>,
}

fn par() -> Par {
    faer::get_global_parallelism()
}

/// `y = x · wᵀ` (`x`: `t × cols`, `w`: `rows × cols`).
fn xwt(x: &[f32], w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let t = x.len() / cols;
    let mut y = vec![0f32; t * rows];
    matmul(
        MatMut::from_row_major_slice_mut(&mut y, t, rows),
        Accum::Replace,
        MatRef::from_row_major_slice(x, t, cols),
        MatRef::from_row_major_slice(w, rows, cols).transpose(),
        1.0f32,
        par(),
    );
    y
}

/// Backward of `y = x · wᵀ`: returns `dx = dy · w` and accumulates `g += dyᵀ · x`.
fn linear_backward(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rows: usize,
    cols: usize,
    g: &mut [f32],
) -> Vec<f32> {
    let t = x.len() / cols;
    let dym = MatRef::from_row_major_slice(dy, t, rows);
    matmul(
        MatMut::from_row_major_slice_mut(g, rows, cols),
        Accum::Add,
        dym.transpose(),
        MatRef::from_row_major_slice(x, t, cols),
        1.0f32,
        par(),
    );
    let mut dx = vec![0f32; t * cols];
    matmul(
        MatMut::from_row_major_slice_mut(&mut dx, t, cols),
        Accum::Replace,
        dym,
        MatRef::from_row_major_slice(w, rows, cols),
        1.0f32,
        par(),
    );
    dx
}

/// Backward of `y = rms_norm(x) ⊙ gain`, added into `dx`.
fn rms_norm_backward(x: &[f32], gain: &[f32], eps: f32, dy: &[f32], dx: &mut [f32]) {
    let h = gain.len();
    dx.par_chunks_mut(h)
        .zip(x.par_chunks(h).zip(dy.par_chunks(h)))
        .for_each(|(dx, (x, dy))| {
            clear_upper_simd();
            let ss: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            let r = 1.0 / (ss / h as f64 + f64::from(eps)).sqrt();
            // dx = r·(g⊙dy) − x · r³/h · Σ (g⊙dy⊙x)
            let dot: f64 = (0..h)
                .map(|i| f64::from(gain[i]) * f64::from(dy[i]) * f64::from(x[i]))
                .sum();
            let c = r * r * r * dot / h as f64;
            for i in 0..h {
                dx[i] += (r * f64::from(gain[i]) * f64::from(dy[i]) - f64::from(x[i]) * c) as f32;
            }
        });
}

/// Backward of [`rope`](super::forward::rope) (a rotation: its transpose rotates by the opposite angle), in place.
fn rope_backward(dx: &mut [f32], n_heads: usize, d: usize, seqs: &SeqBatch) {
    let half = d / 2;
    let (cos, sin) = seqs.tables();
    dx.par_chunks_mut(n_heads * d)
        .enumerate()
        .for_each(|(r, row)| {
            clear_upper_simd();
            let p = r % seqs.seq_len();
            let cos = &cos[p * half..(p + 1) * half];
            let sin = &sin[p * half..(p + 1) * half];
            for hd in row.chunks_mut(d) {
                let (lo, hi) = hd.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (lo[i], hi[i]);
                    lo[i] = a * cos[i] + b * sin[i];
                    hi[i] = b * cos[i] - a * sin[i];
                }
            }
        });
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `(dq, dk, dv)` of [`attention_fwd_bwd`].
type QkvGrads = (Vec<f32>, Vec<f32>, Vec<f32>);

/// Attention dimensions.
#[derive(Clone, Copy)]
struct Heads {
    n_heads: usize,
    n_kv_heads: usize,
    d: usize,
}

/// Causal GQA attention of whole sequences and its backward pass in one place: returns the
/// output and, given `d_out`, `(dq, dk, dv)`. Work is split by (sequence, KV head), so the
/// query heads sharing a KV head accumulate into it without races.
fn attention_fwd_bwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    seqs: &SeqBatch,
    s: Heads,
    d_out: Option<&[f32]>,
) -> (Vec<f32>, Option<QkvGrads>) {
    let (n, d) = (seqs.seq_len(), s.d);
    let (qw, kvw) = (s.n_heads * d, s.n_kv_heads * d);
    let group = s.n_heads / s.n_kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let tasks: Vec<(usize, usize)> = (0..seqs.n_seqs())
        .flat_map(|sq| (0..s.n_kv_heads).map(move |kh| (sq, kh)))
        .collect();
    type Part = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);
    let parts: Vec<Part> = tasks
        .par_iter()
        .map(|&(sq, kh)| {
            clear_upper_simd();
            let rows = sq * n..(sq + 1) * n;
            let gather = |src: &[f32], width: usize, col: usize| -> Vec<f32> {
                rows.clone()
                    .flat_map(|r| src[r * width + col..r * width + col + d].iter().copied())
                    .collect()
            };
            let kb = gather(k, kvw, kh * d);
            let vb = gather(v, kvw, kh * d);
            let km = MatRef::from_row_major_slice(&kb, n, d);
            let vm = MatRef::from_row_major_slice(&vb, n, d);
            let mut outs = vec![0f32; group * n * d];
            let mut dqs = vec![0f32; group * n * d];
            let mut dk = vec![0f32; n * d];
            let mut dv = vec![0f32; n * d];
            let mut p = vec![0f32; n * n];
            let mut dp = vec![0f32; n * n];
            for j in 0..group {
                let h = kh * group + j;
                let qb = gather(q, qw, h * d);
                let qm = MatRef::from_row_major_slice(&qb, n, d);
                matmul(
                    MatMut::from_row_major_slice_mut(&mut p, n, n),
                    Accum::Replace,
                    qm,
                    km.transpose(),
                    scale,
                    Par::Seq,
                );
                clear_upper_simd();
                for (i, row) in p.chunks_mut(n).enumerate() {
                    let (vis, masked) = row.split_at_mut(i + 1);
                    let m = vis.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f64;
                    for x in vis.iter_mut() {
                        *x = (*x - m).exp();
                        sum += f64::from(*x);
                    }
                    let inv = (1.0 / sum) as f32;
                    vis.iter_mut().for_each(|x| *x *= inv);
                    masked.fill(0.0);
                }
                let pm = MatRef::from_row_major_slice(&p, n, n);
                matmul(
                    MatMut::from_row_major_slice_mut(&mut outs[j * n * d..(j + 1) * n * d], n, d),
                    Accum::Replace,
                    pm,
                    vm,
                    1.0f32,
                    Par::Seq,
                );
                let Some(d_out) = d_out else { continue };
                let dob = gather(d_out, qw, h * d);
                let dom = MatRef::from_row_major_slice(&dob, n, d);
                // dV += Pᵀ dO; dP = dO Vᵀ; dS = P ⊙ (dP − rowsum(dP ⊙ P)).
                matmul(
                    MatMut::from_row_major_slice_mut(&mut dv, n, d),
                    Accum::Add,
                    pm.transpose(),
                    dom,
                    1.0f32,
                    Par::Seq,
                );
                matmul(
                    MatMut::from_row_major_slice_mut(&mut dp, n, n),
                    Accum::Replace,
                    dom,
                    vm.transpose(),
                    1.0f32,
                    Par::Seq,
                );
                clear_upper_simd();
                for (prow, dprow) in p.chunks(n).zip(dp.chunks_mut(n)) {
                    let dot: f64 = prow
                        .iter()
                        .zip(dprow.iter())
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum();
                    for (x, &pv) in dprow.iter_mut().zip(prow) {
                        *x = pv * (*x - dot as f32);
                    }
                }
                let dsm = MatRef::from_row_major_slice(&dp, n, n);
                matmul(
                    MatMut::from_row_major_slice_mut(&mut dqs[j * n * d..(j + 1) * n * d], n, d),
                    Accum::Replace,
                    dsm,
                    km,
                    scale,
                    Par::Seq,
                );
                matmul(
                    MatMut::from_row_major_slice_mut(&mut dk, n, d),
                    Accum::Add,
                    dsm.transpose(),
                    qm,
                    scale,
                    Par::Seq,
                );
            }
            (outs, dqs, dk, dv)
        })
        .collect();
    let t = seqs.n_tokens();
    let mut out = vec![0f32; t * qw];
    let want_grad = d_out.is_some();
    let (mut dq, mut dk, mut dv) = if want_grad {
        (vec![0f32; t * qw], vec![0f32; t * kvw], vec![0f32; t * kvw])
    } else {
        (Vec::new(), Vec::new(), Vec::new())
    };
    for (&(sq, kh), (outs, dqs, dkb, dvb)) in tasks.iter().zip(&parts) {
        for i in 0..n {
            let r = sq * n + i;
            for j in 0..group {
                let h = kh * group + j;
                let src = (j * n + i) * d..(j * n + i + 1) * d;
                out[r * qw + h * d..r * qw + (h + 1) * d].copy_from_slice(&outs[src.clone()]);
                if want_grad {
                    dq[r * qw + h * d..r * qw + (h + 1) * d].copy_from_slice(&dqs[src]);
                }
            }
            if want_grad {
                dk[r * kvw + kh * d..r * kvw + (kh + 1) * d]
                    .copy_from_slice(&dkb[i * d..(i + 1) * d]);
                dv[r * kvw + kh * d..r * kvw + (kh + 1) * d]
                    .copy_from_slice(&dvb[i * d..(i + 1) * d]);
            }
        }
    }
    (out, want_grad.then_some((dq, dk, dv)))
}

/// The gradient of the mean NLL of `targets` (one per row of each window but its last:
/// window `s` predicts `tokens[s·n + 1 ..= s·n + n − 1]`) with respect to every linear's
/// weight, with the model's linears given as dense row-major matrices in
/// `layer · 7 + kind.index()` order.
///
/// Errors: a weight of the wrong size, a token outside the vocabulary, non-finite activations.
pub fn weight_gradients(
    res: &LlamaResident,
    weights: &[&[f32]],
    tokens: &[u32],
    seqs: &SeqBatch,
) -> Result<WeightGradients> {
    let c = &res.config;
    let n_kinds = LinearKind::ALL.len();
    check_len("dense weights", c.n_layers * n_kinds, weights.len())?;
    for (w, m) in weights.iter().enumerate() {
        let (rows, cols) = LinearKind::ALL[w % n_kinds].shape(c);
        check_len("dense weight", rows * cols, m.len())?;
    }
    let (t, h, n) = (seqs.n_tokens(), c.hidden, seqs.seq_len());
    check_len("tokens", t, tokens.len())?;
    if n < 2 {
        return Err(LlamaError::InvalidParameter {
            name: "seq_len",
            reason: "a window needs at least 2 tokens".into(),
        });
    }
    let heads = Heads {
        n_heads: c.n_heads,
        n_kv_heads: c.n_kv_heads,
        d: c.head_dim,
    };
    let wt = |layer: usize, kind: LinearKind| weights[layer * n_kinds + kind.index()];
    let shape = |kind: LinearKind| kind.shape(c);

    // Forward, keeping each layer's input.
    let mut x = Vec::with_capacity(t * h);
    for &tok in tokens {
        if tok as usize >= c.vocab {
            return Err(LlamaError::TokenOutOfRange {
                token: tok,
                vocab: c.vocab,
            });
        }
        res.token_embd.extend_row(tok as usize, h, &mut x);
    }
    let mut inputs = Vec::with_capacity(c.n_layers);
    for layer in 0..c.n_layers {
        let next = layer_pass(res, layer, &x, seqs, heads, &wt, &shape, None)?.0;
        inputs.push(std::mem::replace(&mut x, next));
    }
    if x.iter().any(|v| !v.is_finite()) {
        return Err(LlamaError::NonFinite("final hidden states".into()));
    }

    // Head: loss and d(final hidden). `head_t` is the head's transpose (`hidden × vocab`).
    let untied_t = res
        .head
        .as_deref()
        .map(|op| head_transpose(op, h))
        .transpose()?;
    let embedding: Cow<'_, [f32]> = match &res.token_embd {
        _ if untied_t.is_some() => Cow::Borrowed(&[]),
        TokenEmbedding::F32(e) => Cow::Borrowed(e),
        TokenEmbedding::F16(e) => {
            let mut out = vec![0f32; e.len()];
            out.par_chunks_mut(1 << 16)
                .zip(e.par_chunks(1 << 16))
                .for_each(|(o, s)| s.convert_to_f32_slice(o));
            Cow::Owned(out)
        }
        TokenEmbedding::Q8(m) => {
            let mut out = vec![0f32; m.rows() * m.cols()];
            m.rows_into(0, m.rows(), &mut out)?;
            Cow::Owned(out)
        }
        TokenEmbedding::Q4(m) => {
            let mut out = vec![0f32; m.rows() * m.cols()];
            m.rows_into(0, m.rows(), &mut out)?;
            Cow::Owned(out)
        }
    };
    let head_t = match &untied_t {
        Some(t) => MatRef::from_row_major_slice(t, h, c.vocab),
        None => MatRef::from_row_major_slice(&embedding, c.vocab, h).transpose(),
    };
    let xn = rms_norm(&x, &res.output_norm, c.rms_eps);
    let scored = seqs.n_seqs() * (n - 1);
    let mut dxn = vec![0f32; t * h];
    let mut loss = 0f64;
    let rows: Vec<usize> = (0..t).filter(|r| r % n != n - 1).collect();
    for chunk in rows.chunks(HEAD_CHUNK) {
        let xs: Vec<f32> = chunk
            .iter()
            .flat_map(|&r| xn[r * h..(r + 1) * h].iter().copied())
            .collect();
        let mut logits = vec![0f32; chunk.len() * c.vocab];
        matmul(
            MatMut::from_row_major_slice_mut(&mut logits, chunk.len(), c.vocab),
            Accum::Replace,
            MatRef::from_row_major_slice(&xs, chunk.len(), h),
            head_t,
            1.0f32,
            par(),
        );
        let nll: Vec<f64> = logits
            .par_chunks_mut(c.vocab)
            .zip(chunk.par_iter())
            .map(|(row, &r)| {
                clear_upper_simd();
                let target = tokens[r + 1] as usize;
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lt = f64::from(row[target] - m);
                let mut sum = 0f64;
                for v in row.iter_mut() {
                    *v = (*v - m).exp();
                    sum += f64::from(*v);
                }
                let nll = sum.ln() - lt;
                let inv = (1.0 / sum / scored as f64) as f32;
                row.iter_mut().for_each(|v| *v *= inv);
                row[target] -= 1.0 / scored as f32;
                nll
            })
            .collect();
        loss += nll.iter().sum::<f64>();
        let mut d = vec![0f32; chunk.len() * h];
        matmul(
            MatMut::from_row_major_slice_mut(&mut d, chunk.len(), h),
            Accum::Replace,
            MatRef::from_row_major_slice(&logits, chunk.len(), c.vocab),
            head_t.transpose(),
            1.0f32,
            par(),
        );
        for (i, &r) in chunk.iter().enumerate() {
            dxn[r * h..(r + 1) * h].copy_from_slice(&d[i * h..(i + 1) * h]);
        }
    }
    drop((embedding, untied_t));
    let mut dx = vec![0f32; t * h];
    rms_norm_backward(&x, &res.output_norm, c.rms_eps, &dxn, &mut dx);
    drop((x, xn, dxn));

    // Backward through the layers, recomputing each from its input.
    let mut grads: Vec<Vec<f32>> = (0..c.n_layers * n_kinds)
        .map(|w| {
            let (rows, cols) = shape(LinearKind::ALL[w % n_kinds]);
            vec![0f32; rows * cols]
        })
        .collect();
    for layer in (0..c.n_layers).rev() {
        let g = &mut grads[layer * n_kinds..(layer + 1) * n_kinds];
        dx = layer_pass(
            res,
            layer,
            &inputs[layer],
            seqs,
            heads,
            &wt,
            &shape,
            Some((&dx, g)),
        )?
        .1
        .unwrap_or_default();
    }
    Ok(WeightGradients {
        loss: loss / scored as f64,
        grads,
    })
}

/// The transpose of an untied head (`hidden × vocab`, row-major), read through the only thing
/// every [`LinearOp`](bitstack_core::LinearOp) offers, its product: row `i` of `I · Wᵀ` is
/// column `i` of `W`. One pass over the head per gradient, whatever it is stored as.
fn head_transpose(op: &dyn bitstack_core::LinearOp, hidden: usize) -> Result<Vec<f32>> {
    let mut eye = vec![0f32; hidden * hidden];
    eye.iter_mut().step_by(hidden + 1).for_each(|v| *v = 1.0);
    let mut t = vec![0f32; hidden * op.out_features()];
    op.forward(&eye, &mut t)?;
    Ok(t)
}

/// One decoder block forward from its input `x`; with `back = Some((d_out, grads))` also its
/// backward pass: accumulates the seven weight gradients and returns `d_in`.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn layer_pass<'w>(
    res: &LlamaResident,
    layer: usize,
    x: &[f32],
    seqs: &SeqBatch,
    heads: Heads,
    wt: &dyn Fn(usize, LinearKind) -> &'w [f32],
    shape: &dyn Fn(LinearKind) -> (usize, usize),
    back: Option<(&[f32], &mut [Vec<f32>])>,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let c = &res.config;
    let b = &res.blocks[layer];
    let lin = |kind: LinearKind, input: &[f32]| {
        let (rows, cols) = shape(kind);
        xwt(input, wt(layer, kind), rows, cols)
    };
    let xn1 = rms_norm(x, &b.attn_norm, c.rms_eps);
    let mut q = lin(LinearKind::Q, &xn1);
    let mut k = lin(LinearKind::K, &xn1);
    let mut v = lin(LinearKind::V, &xn1);
    // The forward pass's bias, then RoPE. A bias passes gradients through unchanged.
    bias_and_rope(&mut q, &mut k, &mut v, b.bias.as_ref(), c, seqs);
    let (attn, _) = attention_fwd_bwd(&q, &k, &v, seqs, heads, None);
    let o = lin(LinearKind::O, &attn);
    let mut x_mid = x.to_vec();
    x_mid.iter_mut().zip(&o).for_each(|(a, &b)| *a += b);
    let xn2 = rms_norm(&x_mid, &b.ffn_norm, c.rms_eps);
    let gate = lin(LinearKind::Gate, &xn2);
    let up = lin(LinearKind::Up, &xn2);
    let act: Vec<f32> = gate
        .par_iter()
        .zip(up.par_iter())
        .map(|(&g, &u)| g * sigmoid(g) * u)
        .collect();
    let down = lin(LinearKind::Down, &act);
    let Some((d_out, grads)) = back else {
        let mut out = x_mid;
        out.iter_mut().zip(&down).for_each(|(a, &b)| *a += b);
        if out.iter().any(|v| !v.is_finite()) {
            return Err(LlamaError::NonFinite(format!(
                "hidden states after layer {layer}"
            )));
        }
        return Ok((out, None));
    };
    let bw = |kind: LinearKind, dy: &[f32], input: &[f32], g: &mut Vec<f32>| {
        let (rows, cols) = shape(kind);
        linear_backward(dy, input, wt(layer, kind), rows, cols, g)
    };
    let [gq, gk, gv, go, gg, gu, gd] = grads else {
        unreachable!("seven linears per layer")
    };
    // MLP.
    let d_act = bw(LinearKind::Down, d_out, &act, gd);
    let (d_gate, d_up): (Vec<f32>, Vec<f32>) = d_act
        .par_iter()
        .zip(gate.par_iter().zip(up.par_iter()))
        .map(|(&da, (&g, &u))| {
            let s = sigmoid(g);
            (da * u * s * (1.0 + g * (1.0 - s)), da * g * s)
        })
        .unzip();
    let mut d_xn2 = bw(LinearKind::Gate, &d_gate, &xn2, gg);
    let d_xn2_up = bw(LinearKind::Up, &d_up, &xn2, gu);
    d_xn2.iter_mut().zip(&d_xn2_up).for_each(|(a, &b)| *a += b);
    let mut d_mid = d_out.to_vec();
    rms_norm_backward(&x_mid, &b.ffn_norm, c.rms_eps, &d_xn2, &mut d_mid);
    // Attention.
    let d_attn = bw(LinearKind::O, &d_mid, &attn, go);
    let (_, grads_qkv) = attention_fwd_bwd(&q, &k, &v, seqs, heads, Some(&d_attn));
    let (mut dq, mut dk, dv) = grads_qkv.unwrap_or_default();
    rope_backward(&mut dq, c.n_heads, c.head_dim, seqs);
    rope_backward(&mut dk, c.n_kv_heads, c.head_dim, seqs);
    let mut d_xn1 = bw(LinearKind::Q, &dq, &xn1, gq);
    for (kind, dy, g) in [(LinearKind::K, &dk, gk), (LinearKind::V, &dv, gv)] {
        let d = bw(kind, dy, &xn1, g);
        d_xn1.iter_mut().zip(&d).for_each(|(a, &b)| *a += b);
    }
    let mut d_in = d_mid;
    rms_norm_backward(x, &b.attn_norm, c.rms_eps, &d_xn1, &mut d_in);
    Ok((Vec::new(), Some(d_in)))
}
