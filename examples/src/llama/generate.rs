//! Incremental decoding: the KV cache, sampling and the generation loop.

use std::time::Instant;

use super::forward::{Llama, SeqBatch};
use super::{LlamaConfig, LlamaError, Result};

/// A tiny seeded generator (SplitMix64) for sampling and random test weights.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from any seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[-1, 1)`.
    pub fn next_signed(&mut self) -> f32 {
        (self.next_f64() * 2.0 - 1.0) as f32
    }
}

/// Keys and values of every layer for the positions decoded so far (one sequence).
#[derive(Clone, Debug)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    capacity: usize,
    width: usize,
}

impl KvCache {
    /// An empty cache for `capacity` positions of a model with `config`.
    pub fn new(config: &LlamaConfig, capacity: usize) -> Self {
        let width = config.n_kv_heads * config.head_dim;
        Self {
            k: vec![vec![0f32; capacity * width]; config.n_layers],
            v: vec![vec![0f32; capacity * width]; config.n_layers],
            len: 0,
            capacity,
            width,
        }
    }

    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is filled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions it can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets positions from `len` on (a shorter shared prefix is reused as is).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// How the next token is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Sampling {
    /// The most likely token (the lowest id on ties).
    #[default]
    Greedy,
    /// Nucleus sampling: soft-max of `logits / temperature`, restricted to the most likely
    /// tokens whose probabilities sum to at least `top_p`.
    TopP {
        /// Soft-max temperature, > 0.
        temperature: f32,
        /// Probability mass kept, in `(0, 1]`.
        top_p: f32,
    },
}

/// Parameters of [`Llama::generate`].
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateParams {
    /// Most new tokens to produce.
    pub max_new_tokens: usize,
    /// Token choice.
    pub sampling: Sampling,
    /// Seed of the sampling generator (unused by greedy decoding).
    pub seed: u64,
    /// Tokens that end generation (included in the output).
    pub stop_tokens: Vec<u32>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            sampling: Sampling::Greedy,
            seed: 0,
            stop_tokens: Vec::new(),
        }
    }
}

/// What [`Llama::generate`] produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The new tokens (the prompt not included).
    pub tokens: Vec<u32>,
    /// Whether a stop token ended generation.
    pub stopped: bool,
    /// Seconds spent on the prompt (one batched forward).
    pub prefill_seconds: f64,
    /// Seconds spent on the one-token decode steps.
    pub decode_seconds: f64,
}

impl Generation {
    /// One-token decode steps per second (the first new token comes from the prefill).
    pub fn decode_tokens_per_second(&self) -> f64 {
        let steps = self.tokens.len().saturating_sub(1);
        if self.decode_seconds > 0.0 {
            steps as f64 / self.decode_seconds
        } else {
            0.0
        }
    }
}

/// Picks a token from one row of logits.
pub fn sample(logits: &[f32], sampling: Sampling, rng: &mut SplitMix64) -> Result<u32> {
    if logits.is_empty() {
        return Err(LlamaError::InvalidParameter {
            name: "logits",
            reason: "empty".into(),
        });
    }
    if logits.iter().any(|v| v.is_nan()) {
        return Err(LlamaError::NonFinite("logits".into()));
    }
    match sampling {
        Sampling::Greedy => Ok(argmax(logits) as u32),
        Sampling::TopP { temperature, top_p } => {
            if !(temperature.is_finite() && temperature > 0.0) {
                return Err(LlamaError::InvalidParameter {
                    name: "temperature",
                    reason: format!("{temperature} is not a positive finite number"),
                });
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(LlamaError::InvalidParameter {
                    name: "top_p",
                    reason: format!("{top_p} is not in (0, 1]"),
                });
            }
            let m = logits[argmax(logits)];
            if m == f32::INFINITY {
                return Ok(argmax(logits) as u32);
            }
            let t = f64::from(temperature);
            let p: Vec<f64> = logits
                .iter()
                .map(|&l| ((f64::from(l) - f64::from(m)) / t).exp())
                .collect();
            let total: f64 = p.iter().sum();
            let mut idx: Vec<usize> = (0..p.len()).collect();
            idx.sort_unstable_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let want = f64::from(top_p) * total;
            let mut kept = 0usize;
            let mut mass = 0f64;
            for &i in &idx {
                mass += p[i];
                kept += 1;
                if mass >= want {
                    break;
                }
            }
            let mut r = rng.next_f64() * mass;
            for &i in &idx[..kept] {
                r -= p[i];
                if r < 0.0 {
                    return Ok(i as u32);
                }
            }
            // Rounding left a sliver of mass: it belongs to the last kept token.
            Ok(idx[kept - 1] as u32)
        }
    }
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

impl Llama<'_> {
    /// An empty [`KvCache`] for this model.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(self.config(), capacity)
    }

    /// Feeds `tokens` (one sequence, continuing at position `cache.len()`), appends their keys
    /// and values to `cache`, and returns the logits after the last of them (`vocab` values).
    pub fn forward_cached(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let h = self.config().hidden;
        let x = self.forward_cached_hidden(tokens, cache)?;
        self.logits(&x[(tokens.len() - 1) * h..])
    }

    /// [`Llama::forward_cached`] returning the hidden states of every token (before the final
    /// norm, `tokens × hidden`) instead of the last token's logits: what chunked, cached
    /// likelihood evaluation needs ([`crate::perplexity::cached_window_nll`]).
    pub fn forward_cached_hidden(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let c = self.config();
        let width = c.n_kv_heads * c.head_dim;
        if cache.width != width || cache.k.len() != c.n_layers {
            return Err(LlamaError::InvalidParameter {
                name: "cache",
                reason: "built for a different model shape".into(),
            });
        }
        if tokens.is_empty() {
            return Err(LlamaError::InvalidParameter {
                name: "tokens",
                reason: "needs at least one token".into(),
            });
        }
        let needed = cache.len + tokens.len();
        if needed > cache.capacity {
            return Err(LlamaError::CacheFull {
                needed,
                capacity: cache.capacity,
            });
        }
        let seqs = SeqBatch::at(c, 1, tokens.len(), cache.len)?;
        let mut x = self.embed(tokens)?;
        for layer in 0..c.n_layers {
            let kv = (&mut cache.k[layer][..], &mut cache.v[layer][..]);
            self.block(layer, &mut x, &seqs, Some(kv), None)?;
        }
        cache.len = needed;
        Ok(x)
    }

    /// Continues `prompt` (non-empty) by up to `params.max_new_tokens` tokens, calling
    /// `on_token` with each new token as soon as it is chosen.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(LlamaError::InvalidParameter {
                name: "prompt",
                reason: "needs at least one token".into(),
            });
        }
        let mut out = Generation {
            tokens: Vec::with_capacity(params.max_new_tokens),
            stopped: false,
            prefill_seconds: 0.0,
            decode_seconds: 0.0,
        };
        if params.max_new_tokens == 0 {
            return Ok(out);
        }
        let mut rng = SplitMix64::new(params.seed);
        let mut cache = self.new_cache(prompt.len() + params.max_new_tokens);
        let t0 = Instant::now();
        let mut logits = self.forward_cached(prompt, &mut cache)?;
        out.prefill_seconds = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        loop {
            let tok = sample(&logits, params.sampling, &mut rng)?;
            out.tokens.push(tok);
            on_token(tok);
            if params.stop_tokens.contains(&tok) {
                out.stopped = true;
                break;
            }
            if out.tokens.len() == params.max_new_tokens {
                break;
            }
            logits = self.forward_cached(&[tok], &mut cache)?;
        }
        out.decode_seconds = t1.elapsed().as_secs_f64();
        Ok(out)
    }
}
