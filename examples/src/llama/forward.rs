//! The forward pass: embedding, decoder blocks, final norm, head, and chunked NLL.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::resident::{LlamaResident, QkvBias};
use super::{
    check_len, ActivationObserver, LinearKind, LinearProvider, LlamaConfig, LlamaError, Result,
};

/// Rows of logits materialised at once by [`Llama::token_nll`]: 128 × 49,152 f32 is 24 MiB,
/// large enough for an efficient head GEMM, small enough never to hold a whole window's logits.
const NLL_CHUNK: usize = 128;
/// Query rows per attention task: keeps the score block (`rows × keys`) in cache and gives
/// rayon enough tasks to balance the causal (triangular) work over the cores.
const ATTN_ROWS: usize = 128;

/// The shape of a forward batch (`n_seqs` whole sequences of `seq_len` tokens, stored one after
/// the other) with its RoPE tables. Build it once and reuse it across calls.
#[derive(Clone, Debug)]
pub struct SeqBatch {
    n_seqs: usize,
    seq_len: usize,
    start: usize,
    half: usize,
    /// `cos[p * half + i]` for position `start + p`, frequency `i`.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl SeqBatch {
    /// `n_seqs` sequences of `seq_len` tokens at positions `0..seq_len`.
    pub fn new(config: &LlamaConfig, n_seqs: usize, seq_len: usize) -> Result<Self> {
        Self::at(config, n_seqs, seq_len, 0)
    }

    /// Sequences whose first token is at position `start` (incremental decoding).
    pub(crate) fn at(
        config: &LlamaConfig,
        n_seqs: usize,
        seq_len: usize,
        start: usize,
    ) -> Result<Self> {
        if n_seqs == 0 || seq_len == 0 {
            return Err(LlamaError::InvalidParameter {
                name: "seq_batch",
                reason: format!("{n_seqs} sequences of {seq_len} tokens is empty"),
            });
        }
        config.validate()?;
        let d = config.head_dim;
        let half = d / 2;
        // Angles in f64: at position 2047 an f32 product would already be off by ~1e-4 rad.
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let f = config
                    .rope_freq_factors
                    .as_ref()
                    .map_or(1.0, |f| f64::from(f[i]));
                f64::from(config.rope_theta).powf(-((2 * i) as f64) / d as f64) / f
            })
            .collect();
        let mut cos = Vec::with_capacity(seq_len * half);
        let mut sin = Vec::with_capacity(seq_len * half);
        for p in start..start + seq_len {
            for &f in &inv_freq {
                let (s, c) = (p as f64 * f).sin_cos();
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
        Ok(Self {
            n_seqs,
            seq_len,
            start,
            half,
            cos,
            sin,
        })
    }

    /// Number of sequences.
    pub fn n_seqs(&self) -> usize {
        self.n_seqs
    }

    /// Tokens per sequence.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Tokens in the batch, `n_seqs · seq_len`.
    pub fn n_tokens(&self) -> usize {
        self.n_seqs * self.seq_len
    }

    /// The RoPE tables: `(cos, sin)`, `seq_len × head_dim / 2` each.
    pub(crate) fn tables(&self) -> (&[f32], &[f32]) {
        (&self.cos, &self.sin)
    }

    fn matches(&self, config: &LlamaConfig) -> bool {
        self.half == config.head_dim / 2
    }
}

/// A Llama model ready to run: borrowed resident weights plus a [`LinearProvider`], with every
/// linear's shape checked once at construction. Cheap to build, so an evaluator can pair the
/// same resident part with many providers.
#[derive(Clone, Copy)]
pub struct Llama<'a> {
    res: &'a LlamaResident,
    lin: &'a dyn LinearProvider,
}

impl std::fmt::Debug for Llama<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("resident", self.res)
            .finish_non_exhaustive()
    }
}

impl<'a> Llama<'a> {
    /// Pairs resident weights with linears, checking that every linear of every layer maps the
    /// dimensions the config implies.
    pub fn new(resident: &'a LlamaResident, linears: &'a dyn LinearProvider) -> Result<Self> {
        let c = &resident.config;
        for layer in 0..c.n_layers {
            for kind in LinearKind::ALL {
                let op = linears.linear(layer, kind);
                let (out, inp) = kind.shape(c);
                if (op.in_features(), op.out_features()) != (inp, out) {
                    return Err(LlamaError::LinearShape {
                        layer,
                        kind,
                        expected_in: inp,
                        expected_out: out,
                        actual_in: op.in_features(),
                        actual_out: op.out_features(),
                    });
                }
            }
        }
        Ok(Self {
            res: resident,
            lin: linears,
        })
    }

    /// The model hyper-parameters.
    pub fn config(&self) -> &'a LlamaConfig {
        &self.res.config
    }

    /// The resident weights.
    pub fn resident(&self) -> &'a LlamaResident {
        self.res
    }

    /// The linear provider.
    pub fn linears(&self) -> &'a dyn LinearProvider {
        self.lin
    }

    /// A [`SeqBatch`] for this model's RoPE.
    pub fn seq_batch(&self, n_seqs: usize, seq_len: usize) -> Result<SeqBatch> {
        SeqBatch::new(self.config(), n_seqs, seq_len)
    }

    /// Token embeddings, `tokens × hidden`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let c = self.config();
        let h = c.hidden;
        let mut x = Vec::with_capacity(tokens.len() * h);
        for &t in tokens {
            let i = t as usize;
            if i >= c.vocab {
                return Err(LlamaError::TokenOutOfRange {
                    token: t,
                    vocab: c.vocab,
                });
            }
            self.res.token_embd.extend_row(i, h, &mut x);
        }
        Ok(x)
    }

    /// Runs decoder block `layer` on `hidden` (`seqs.n_tokens() × hidden`), returning the hidden
    /// states leaving it. `observer` sees the input of each of the block's linears.
    pub fn layer_forward(
        &self,
        layer: usize,
        hidden: &[f32],
        seqs: &SeqBatch,
        observer: Option<&dyn ActivationObserver>,
    ) -> Result<Vec<f32>> {
        self.check_batch(seqs)?;
        let c = self.config();
        if layer >= c.n_layers {
            return Err(LlamaError::NoSuchLayer {
                layer,
                n_layers: c.n_layers,
            });
        }
        check_len("hidden states", seqs.n_tokens() * c.hidden, hidden.len())?;
        if hidden.iter().any(|v| !v.is_finite()) {
            return Err(LlamaError::NonFinite("hidden states".into()));
        }
        let mut x = hidden.to_vec();
        self.block(layer, &mut x, seqs, None, observer)?;
        Ok(x)
    }

    /// Embedding and every decoder block: the hidden states before the final norm,
    /// `seqs.n_tokens() × hidden`.
    pub fn forward_hidden(
        &self,
        tokens: &[u32],
        seqs: &SeqBatch,
        observer: Option<&dyn ActivationObserver>,
    ) -> Result<Vec<f32>> {
        self.check_batch(seqs)?;
        check_len("tokens", seqs.n_tokens(), tokens.len())?;
        let mut x = self.embed(tokens)?;
        for layer in 0..self.config().n_layers {
            self.block(layer, &mut x, seqs, None, observer)?;
        }
        Ok(x)
    }

    /// The final RMSNorm of every row of `hidden` (pre-norm final hidden states): the head's
    /// input.
    pub fn final_norm(&self, hidden: &[f32]) -> Result<Vec<f32>> {
        let c = self.config();
        rows_of(hidden.len(), c.hidden, "hidden states")?;
        Ok(rms_norm(hidden, &self.res.output_norm, c.rms_eps))
    }

    /// Final norm and head: logits (`rows × vocab`) for every row of `hidden`. This
    /// materialises all of them; for likelihoods use [`Llama::token_nll`].
    pub fn logits(&self, hidden: &[f32]) -> Result<Vec<f32>> {
        let c = self.config();
        let rows = rows_of(hidden.len(), c.hidden, "hidden states")?;
        let xn = rms_norm(hidden, &self.res.output_norm, c.rms_eps);
        let mut out = vec![0f32; rows * c.vocab];
        self.head(&xn, &mut out)?;
        Ok(out)
    }

    /// Negative log-likelihood (natural log) of `targets[i]` given row `i` of `hidden`
    /// (pre-norm final hidden states), computed `NLL_CHUNK` rows of logits at a time.
    pub fn token_nll(&self, hidden: &[f32], targets: &[u32]) -> Result<Vec<f32>> {
        let c = self.config();
        check_len("hidden states", targets.len() * c.hidden, hidden.len())?;
        if let Some(&t) = targets.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(LlamaError::TokenOutOfRange {
                token: t,
                vocab: c.vocab,
            });
        }
        let xn = rms_norm(hidden, &self.res.output_norm, c.rms_eps);
        let mut out = Vec::with_capacity(targets.len());
        let mut logits = vec![0f32; NLL_CHUNK.min(targets.len()) * c.vocab];
        for (xs, ts) in xn
            .chunks(NLL_CHUNK * c.hidden)
            .zip(targets.chunks(NLL_CHUNK))
        {
            let lg = &mut logits[..ts.len() * c.vocab];
            self.head(xs, lg)?;
            let nll: Vec<f32> = lg
                .par_chunks(c.vocab)
                .zip(ts.par_iter())
                .map(|(row, &t)| nll_of(row, t as usize))
                .collect();
            out.extend_from_slice(&nll);
        }
        Ok(out)
    }

    /// Next-token distributions of `hidden` (pre-norm final hidden states, one row per
    /// position): `rows × vocab` probabilities, for [`Llama::token_kl`].
    pub fn token_probs(&self, hidden: &[f32]) -> Result<Vec<f32>> {
        let c = self.config();
        if !hidden.len().is_multiple_of(c.hidden) {
            return Err(LlamaError::InvalidParameter {
                name: "hidden states",
                reason: format!("{} values are not rows of {}", hidden.len(), c.hidden),
            });
        }
        let xn = rms_norm(hidden, &self.res.output_norm, c.rms_eps);
        let mut probs = vec![0f32; hidden.len() / c.hidden * c.vocab];
        for (xs, ps) in xn
            .chunks(NLL_CHUNK * c.hidden)
            .zip(probs.chunks_mut(NLL_CHUNK * c.vocab))
        {
            self.head(xs, ps)?;
            ps.par_chunks_mut(c.vocab).for_each(softmax_in_place);
        }
        Ok(probs)
    }

    /// Per-row `KL(p_ref ‖ p)` of the model's next-token distributions at `hidden` against
    /// `reference` (from [`Llama::token_probs`]); `neg_entropy[i] = Σ p_ref ln p_ref` of row `i`
    /// (precomputed: it does not depend on the model).
    pub fn token_kl(
        &self,
        hidden: &[f32],
        reference: &[f32],
        neg_entropy: &[f64],
    ) -> Result<Vec<f32>> {
        let c = self.config();
        let rows = neg_entropy.len();
        check_len("hidden states", rows * c.hidden, hidden.len())?;
        check_len("reference distributions", rows * c.vocab, reference.len())?;
        let xn = rms_norm(hidden, &self.res.output_norm, c.rms_eps);
        let mut out = Vec::with_capacity(rows);
        let mut logits = vec![0f32; NLL_CHUNK.min(rows) * c.vocab];
        for ((xs, ps), hs) in xn
            .chunks(NLL_CHUNK * c.hidden)
            .zip(reference.chunks(NLL_CHUNK * c.vocab))
            .zip(neg_entropy.chunks(NLL_CHUNK))
        {
            let lg = &mut logits[..hs.len() * c.vocab];
            self.head(xs, lg)?;
            let kl: Vec<f32> = lg
                .par_chunks(c.vocab)
                .zip(ps.par_chunks(c.vocab))
                .zip(hs.par_iter())
                .map(|((row, p), &h)| {
                    clear_upper_simd();
                    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let (mut s, mut dot) = (0f64, 0f64);
                    for (&l, &q) in row.iter().zip(p) {
                        s += f64::from((l - m).exp());
                        dot += f64::from(q) * f64::from(l - m);
                    }
                    // Σ p_ref ln p = Σ p_ref (l − m) − ln Σ e^(l − m), as Σ p_ref = 1.
                    (h - (dot - s.ln())) as f32
                })
                .collect();
            out.extend_from_slice(&kl);
        }
        Ok(out)
    }

    /// Per-token NLL of whole sequences: `tokens` is cut into sequences of `seq_len`, each
    /// predicts its tokens `1..seq_len` from their prefixes. Returns `seq_len - 1` values per
    /// sequence, sequence after sequence.
    pub fn sequence_nll(&self, tokens: &[u32], seq_len: usize) -> Result<Vec<f32>> {
        if seq_len < 2 || tokens.is_empty() || !tokens.len().is_multiple_of(seq_len) {
            return Err(LlamaError::InvalidParameter {
                name: "seq_len",
                reason: format!(
                    "{} tokens cannot be cut into sequences of {seq_len} (at least 2) tokens",
                    tokens.len()
                ),
            });
        }
        let seqs = self.seq_batch(tokens.len() / seq_len, seq_len)?;
        let x = self.forward_hidden(tokens, &seqs, None)?;
        let h = self.config().hidden;
        let mut out = Vec::with_capacity(seqs.n_seqs * (seq_len - 1));
        for s in 0..seqs.n_seqs {
            let rows = &x[s * seq_len * h..(s * seq_len + seq_len - 1) * h];
            let targets = &tokens[s * seq_len + 1..(s + 1) * seq_len];
            out.extend(self.token_nll(rows, targets)?);
        }
        Ok(out)
    }

    fn check_batch(&self, seqs: &SeqBatch) -> Result<()> {
        if seqs.matches(self.config()) && seqs.start == 0 {
            Ok(())
        } else {
            Err(LlamaError::InvalidParameter {
                name: "seq_batch",
                reason: "built for a different head width or start position".into(),
            })
        }
    }

    /// `xn · headᵀ` into `out` (`rows × vocab`).
    fn head(&self, xn: &[f32], out: &mut [f32]) -> Result<()> {
        let c = self.config();
        match &self.res.head {
            Some(op) => op.forward(xn, out)?,
            None => {
                self.res
                    .token_embd
                    .matmul_t(xn, c.vocab, c.hidden, self.res.head_activations, out)
            }
        }
        Ok(())
    }

    /// One decoder block in place on `x`. With `kv = Some((k_cache, v_cache))` (a single
    /// sequence starting at `seqs.start`), the new keys/values are appended at rows
    /// `start..start + seq_len` of the caches and attention reads rows `0..start + seq_len`.
    pub(crate) fn block(
        &self,
        layer: usize,
        x: &mut [f32],
        seqs: &SeqBatch,
        kv: Option<(&mut [f32], &mut [f32])>,
        observer: Option<&dyn ActivationObserver>,
    ) -> Result<()> {
        let c = self.config();
        let t = seqs.n_tokens();
        let b = &self.res.blocks[layer];
        let (qw, kvw) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let lin = |kind| self.lin.linear(layer, kind);
        let observe = |kind, a: &[f32]| {
            if let Some(o) = observer {
                o.observe(layer, kind, a);
            }
        };

        let xn = rms_norm(x, &b.attn_norm, c.rms_eps);
        for kind in [LinearKind::Q, LinearKind::K, LinearKind::V] {
            observe(kind, &xn);
        }
        let mut q = vec![0f32; t * qw];
        let mut k = vec![0f32; t * kvw];
        let mut v = vec![0f32; t * kvw];
        lin(LinearKind::Q).forward(&xn, &mut q)?;
        lin(LinearKind::K).forward(&xn, &mut k)?;
        lin(LinearKind::V).forward(&xn, &mut v)?;
        bias_and_rope(&mut q, &mut k, &mut v, b.bias.as_ref(), c, seqs);

        let shape = AttnShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            d: c.head_dim,
        };
        let attn = match kv {
            None => attention(&q, &k, &v, seqs.n_seqs, seqs.seq_len, 0, shape),
            Some((kc, vc)) => {
                let (lo, hi) = (seqs.start * kvw, (seqs.start + t) * kvw);
                kc[lo..hi].copy_from_slice(&k);
                vc[lo..hi].copy_from_slice(&v);
                attention(&q, &kc[..hi], &vc[..hi], 1, t, seqs.start, shape)
            }
        };
        drop((q, k, v));

        observe(LinearKind::O, &attn);
        let mut o = vec![0f32; t * c.hidden];
        lin(LinearKind::O).forward(&attn, &mut o)?;
        add_into(x, &o);

        let xn = rms_norm(x, &b.ffn_norm, c.rms_eps);
        observe(LinearKind::Gate, &xn);
        observe(LinearKind::Up, &xn);
        let mut g = vec![0f32; t * c.ffn];
        let mut u = vec![0f32; t * c.ffn];
        lin(LinearKind::Gate).forward(&xn, &mut g)?;
        lin(LinearKind::Up).forward(&xn, &mut u)?;
        let swiglu = |(g, u): (&mut [f32], &[f32])| {
            clear_upper_simd();
            for (g, u) in g.iter_mut().zip(u) {
                *g = silu(*g) * u;
            }
        };
        if t <= SERIAL_ROWS {
            g.chunks_mut(4096).zip(u.chunks(4096)).for_each(swiglu);
        } else {
            g.par_chunks_mut(4096)
                .zip(u.par_chunks(4096))
                .for_each(swiglu);
        }
        drop(u);
        observe(LinearKind::Down, &g);
        lin(LinearKind::Down).forward(&g, &mut o)?;
        add_into(x, &o);
        Ok(())
    }
}

/// Row counts up to this (a decode step, a short chunk) run the element-wise parts of a block
/// on the calling thread: handing microseconds of work to rayon costs a futex wake-up and keeps
/// its workers spinning on the core the kernel pool's worker needs.
const SERIAL_ROWS: usize = bitstack_core::kernels::FUSED_MAX_BATCH;

fn rows_of(len: usize, width: usize, what: &'static str) -> Result<usize> {
    if len.is_multiple_of(width) {
        Ok(len / width)
    } else {
        Err(LlamaError::ShapeMismatch {
            what,
            expected: len.div_ceil(width) * width,
            actual: len,
        })
    }
}

/// Returns the vector registers' upper halves to the clean state.
///
/// faer's AVX-512 GEMM kernels return without `vzeroupper`; this crate's own loops are compiled
/// for baseline x86-64 (SSE), and on current Xeons every SSE instruction and libm `expf` call
/// that runs while the upper state is dirty is penalised: measured on the SmolLM2 forward, the
/// soft-max and SiLU loops ran ~15x slower (attention 240 ms instead of 16 ms per layer at 512
/// tokens). So every element-wise pass that may follow a GEMM on the same thread starts here.
#[inline]
pub(crate) fn clear_upper_simd() {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: the instruction exists on every AVX CPU (checked just above), and code
            // compiled without AVX never keeps live values in the upper register halves.
            unsafe { std::arch::x86_64::_mm256_zeroupper() }
        }
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `-log softmax(row)[t]`, with max subtraction and an f64 denominator. NaN logits give NaN.
fn nll_of(row: &[f32], t: usize) -> f32 {
    clear_upper_simd();
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = row.iter().map(|&l| f64::from((l - m).exp())).sum();
    (f64::from(m - row[t]) + s.ln()) as f32
}

/// RMSNorm of each row of `x` (width `w.len()`), scaled by `w`.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let h = w.len();
    let mut out = vec![0f32; x.len()];
    let norm = |(o, r): (&mut [f32], &[f32])| {
        clear_upper_simd();
        let ss: f64 = r.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let inv = (1.0 / (ss / h as f64 + f64::from(eps)).sqrt()) as f32;
        for ((o, &v), &g) in o.iter_mut().zip(r).zip(w) {
            *o = g * (v * inv);
        }
    };
    if x.len() <= SERIAL_ROWS * h {
        out.chunks_mut(h).zip(x.chunks(h)).for_each(norm);
    } else {
        out.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(norm);
    }
    out
}

/// What follows the Q/K/V projections of a block, in place: the optional biases, then RoPE on
/// Q and K. One definition for the forward pass and the gradient pass (whose bias step passes
/// gradients through unchanged), so the two cannot drift apart.
pub(crate) fn bias_and_rope(
    q: &mut [f32],
    k: &mut [f32],
    v: &mut [f32],
    bias: Option<&QkvBias>,
    c: &LlamaConfig,
    seqs: &SeqBatch,
) {
    if let Some(bias) = bias {
        add_bias(q, &bias.q);
        add_bias(k, &bias.k);
        add_bias(v, &bias.v);
    }
    rope(q, c.n_heads, c.head_dim, seqs);
    rope(k, c.n_kv_heads, c.head_dim, seqs);
}

fn add_bias(x: &mut [f32], b: &[f32]) {
    clear_upper_simd();
    for row in x.chunks_mut(b.len()) {
        for (v, &bb) in row.iter_mut().zip(b) {
            *v += bb;
        }
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    clear_upper_simd();
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Rotate-half RoPE on every head of every row; row `r` is at position `start + r % seq_len`.
pub(crate) fn rope(x: &mut [f32], n_heads: usize, d: usize, seqs: &SeqBatch) {
    let half = d / 2;
    let rotate = |(r, row): (usize, &mut [f32])| {
        clear_upper_simd();
        let p = r % seqs.seq_len;
        let cos = &seqs.cos[p * half..(p + 1) * half];
        let sin = &seqs.sin[p * half..(p + 1) * half];
        for hd in row.chunks_mut(d) {
            let (lo, hi) = hd.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (lo[i], hi[i]);
                lo[i] = a * cos[i] - b * sin[i];
                hi[i] = b * cos[i] + a * sin[i];
            }
        }
    };
    if x.len() <= SERIAL_ROWS * n_heads * d {
        x.chunks_mut(n_heads * d).enumerate().for_each(rotate);
    } else {
        x.par_chunks_mut(n_heads * d).enumerate().for_each(rotate);
    }
}

/// [`rope`] for the module's property tests.
#[cfg(test)]
pub(crate) fn test_rope(x: &mut [f32], n_heads: usize, d: usize, seqs: &SeqBatch) {
    rope(x, n_heads, d, seqs);
}

#[derive(Clone, Copy)]
struct AttnShape {
    n_heads: usize,
    n_kv_heads: usize,
    d: usize,
}

/// Causal grouped-query attention. `q` is `n_seqs · n_q` rows of `n_heads · d`; `k`, `v` are
/// `n_seqs · (past + n_q)` rows of `n_kv_heads · d`; query `i` of a sequence sits at position
/// `past + i` and sees keys `0..=past + i`. Returns `n_seqs · n_q` rows of `n_heads · d`.
fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n_seqs: usize,
    n_q: usize,
    past: usize,
    s: AttnShape,
) -> Vec<f32> {
    let d = s.d;
    let (qw, kvw) = (s.n_heads * d, s.n_kv_heads * d);
    let n_k = past + n_q;
    let group = s.n_heads / s.n_kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let qm = MatRef::from_row_major_slice(q, n_seqs * n_q, qw);
    let km = MatRef::from_row_major_slice(k, n_seqs * n_k, kvw);
    let vm = MatRef::from_row_major_slice(v, n_seqs * n_k, kvw);

    let tasks: Vec<(usize, usize, usize)> = (0..n_seqs)
        .flat_map(|sq| {
            (0..s.n_heads).flat_map(move |h| (0..n_q).step_by(ATTN_ROWS).map(move |r0| (sq, h, r0)))
        })
        .collect();
    let head_block = |&(sq, h, r0): &(usize, usize, usize)| {
        let nb = ATTN_ROWS.min(n_q - r0);
        let kv_h = h / group;
        // Keys visible to the block's last query; earlier rows mask the tail.
        let kend = past + r0 + nb;
        let qb = qm.submatrix(sq * n_q + r0, h * d, nb, d);
        let kb = km.submatrix(sq * n_k, kv_h * d, kend, d);
        let vb = vm.submatrix(sq * n_k, kv_h * d, kend, d);
        let mut sc = vec![0f32; nb * kend];
        matmul(
            MatMut::from_row_major_slice_mut(&mut sc, nb, kend),
            Accum::Replace,
            qb,
            kb.transpose(),
            scale,
            Par::Seq,
        );
        for (i, row) in sc.chunks_mut(kend).enumerate() {
            let visible = past + r0 + i + 1;
            let (vis, masked) = row.split_at_mut(visible);
            softmax_in_place(vis);
            masked.fill(0.0);
        }
        let mut out = vec![0f32; nb * d];
        matmul(
            MatMut::from_row_major_slice_mut(&mut out, nb, d),
            Accum::Replace,
            MatRef::from_row_major_slice(&sc, nb, kend),
            vb,
            1.0f32,
            Par::Seq,
        );
        out
    };
    // A decode step's attention (one query over a short cache) is microseconds: running it on
    // the calling thread keeps rayon's workers asleep and the kernel pool's worker on its core.
    let parts: Vec<Vec<f32>> = if n_seqs * n_q * n_k * s.n_heads <= 1 << 18 {
        tasks.iter().map(head_block).collect()
    } else {
        tasks.par_iter().map(head_block).collect()
    };

    let mut attn = vec![0f32; n_seqs * n_q * qw];
    for (&(sq, h, r0), part) in tasks.iter().zip(&parts) {
        for (i, src) in part.chunks(d).enumerate() {
            let row = sq * n_q + r0 + i;
            attn[row * qw + h * d..row * qw + (h + 1) * d].copy_from_slice(src);
        }
    }
    attn
}

fn softmax_in_place(row: &mut [f32]) {
    clear_upper_simd();
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0f64;
    for v in row.iter_mut() {
        *v = (*v - m).exp();
        s += f64::from(*v);
    }
    let inv = (1.0 / s) as f32;
    for v in row.iter_mut() {
        *v *= inv;
    }
}
