//! Perplexity over a token stream, the way the paper, GPTQ and AWQ measure it: the text is
//! tokenized once, cut into non-overlapping windows of `seq_len` tokens (an incomplete last
//! window is dropped, as Hugging Face / GPTQ evaluation does), every window predicts its tokens
//! `1..seq_len` from their prefixes, and the perplexity is `exp` of the mean negative
//! log-likelihood over all predicted tokens of all windows. Since every window scores the same
//! number of tokens, this equals `exp` of the mean of per-window mean NLLs.
//!
//! With `seq_len = 2048`, the 301,948 SmolLM2 tokens of WikiText-2 test give 147 windows.
//!
//! # Example
//!
//! ```
//! use bitstack_examples::gguf::{Architecture, LlamaConfig};
//! use bitstack_examples::llama::{LinearTable, Llama, LlamaResident};
//! use bitstack_examples::perplexity::{perplexity, PerplexityParams};
//!
//! let config = LlamaConfig {
//!     arch: Architecture::Llama, n_layers: 1, hidden: 8, ffn: 16, n_heads: 2, n_kv_heads: 1,
//!     head_dim: 4, vocab: 20, rope_theta: 10_000.0, rope_freq_factors: None, rms_eps: 1e-5,
//!     tied_embeddings: true, attn_bias: false, max_seq: 64, bos_id: None, eos_id: None,
//! };
//! let resident = LlamaResident::random(&config, 1)?;
//! let linears = LinearTable::random(&config, 2)?;
//! let model = Llama::new(&resident, &linears)?;
//!
//! let tokens: Vec<u32> = (0..100).map(|i| (i * 7 % 20) as u32).collect();
//! let params = PerplexityParams { seq_len: 16, ..Default::default() };
//! let r = perplexity(&model, &tokens, &params, &mut |_| {})?;
//! assert_eq!(r.windows, 6); // 100 / 16, the last 4 tokens dropped
//! assert_eq!(r.tokens_scored, 6 * 15);
//! assert!((r.ppl - r.mean_nll.exp()).abs() < 1e-9);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::time::{Duration, Instant};

use crate::llama::{Llama, LlamaError};

/// Errors of a perplexity run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PerplexityError {
    /// The forward pass failed.
    #[error(transparent)]
    Llama(#[from] LlamaError),
    /// Not even one window fits in the text.
    #[error("{tokens} tokens do not fill one window of {seq_len}")]
    TooFewTokens {
        /// Tokens given.
        tokens: usize,
        /// Window length.
        seq_len: usize,
    },
    /// A parameter was outside its allowed range.
    #[error("invalid parameter {name}: {reason}")]
    InvalidParameter {
        /// Parameter name.
        name: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// The model produced a NaN likelihood (e.g. a degenerate compressed weight).
    #[error("NaN negative log-likelihood in window {window}")]
    NanLikelihood {
        /// Index of the window (in the full list of windows).
        window: usize,
    },
}

/// Which windows a run with [`PerplexityParams::max_windows`] evaluates. Its names (for a
/// command line's `--windows` and for JSON reports) are `spread` and `first`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub enum WindowSelection {
    /// `max_windows` windows spread evenly over the text (window `⌊i · total / n⌋` for
    /// `i < n`), so a short run samples the whole text rather than its beginning.
    #[default]
    #[serde(rename = "spread")]
    EvenlySpaced,
    /// The first `max_windows` windows: what the paper, GPTQ / AWQ and llama.cpp's
    /// `llama-perplexity --chunks N` report for a bounded run.
    #[serde(rename = "first")]
    First,
}

impl WindowSelection {
    /// Every selection, in the order a help text lists them.
    pub const ALL: [Self; 2] = [Self::EvenlySpaced, Self::First];

    /// The selection's name: `spread` or `first`.
    pub fn name(self) -> &'static str {
        match self {
            Self::EvenlySpaced => "spread",
            Self::First => "first",
        }
    }

    /// One line saying which windows the name picks (for a help text).
    pub fn help(self) -> &'static str {
        match self {
            Self::EvenlySpaced => "windows spread evenly over the text",
            Self::First => "the first windows of the text (as the paper and llama.cpp)",
        }
    }

    /// How a report describes `n` windows picked this way (`"4 evenly spaced"`, `"the first 4"`).
    pub fn describe(self, n: usize) -> String {
        match self {
            Self::EvenlySpaced => format!("{n} evenly spaced"),
            Self::First => format!("the first {n}"),
        }
    }
}

impl std::str::FromStr for WindowSelection {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| format!("{s:?}: expected spread or first"))
    }
}

impl std::fmt::Display for WindowSelection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Parameters of [`perplexity`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PerplexityParams {
    /// Window length in tokens (the paper uses 2048).
    pub seq_len: usize,
    /// Evaluate at most this many windows (`None`: all of them).
    pub max_windows: Option<usize>,
    /// Which windows when `max_windows` is below the number available.
    pub selection: WindowSelection,
    /// Tokens per forward pass: short windows are batched up to this many tokens so the matrix
    /// products stay large; a window longer than this runs alone.
    pub batch_tokens: usize,
}

impl Default for PerplexityParams {
    fn default() -> Self {
        Self {
            seq_len: 2048,
            max_windows: None,
            selection: WindowSelection::EvenlySpaced,
            batch_tokens: 2048,
        }
    }
}

/// Progress reported after each forward batch.
#[derive(Clone, Debug, PartialEq)]
pub struct PerplexityProgress {
    /// Windows finished.
    pub windows_done: usize,
    /// Windows this run evaluates.
    pub windows_total: usize,
    /// Time since the run started.
    pub elapsed: Duration,
    /// Estimated time to finish, from the mean time per window so far.
    pub eta: Duration,
    /// Perplexity over the windows finished so far.
    pub running_ppl: f64,
}

/// The outcome of [`perplexity`].
#[derive(Clone, Debug, PartialEq)]
pub struct Perplexity {
    /// `exp(mean_nll)`.
    pub ppl: f64,
    /// Mean negative log-likelihood (nats) over the tokens scored.
    pub mean_nll: f64,
    /// Tokens whose likelihood was scored: `windows · (seq_len - 1)`.
    pub tokens_scored: usize,
    /// Windows evaluated.
    pub windows: usize,
    /// Complete windows in the text.
    pub windows_available: usize,
    /// Window length.
    pub seq_len: usize,
    /// Wall time of the run.
    pub seconds: f64,
}

/// The indices of the windows a run evaluates, ascending.
pub fn select_windows(
    n_tokens: usize,
    params: &PerplexityParams,
) -> Result<Vec<usize>, PerplexityError> {
    if params.seq_len < 2 {
        return Err(PerplexityError::InvalidParameter {
            name: "seq_len",
            reason: format!("{} (a window needs at least 2 tokens)", params.seq_len),
        });
    }
    if params.max_windows == Some(0) {
        return Err(PerplexityError::InvalidParameter {
            name: "max_windows",
            reason: "0 windows".into(),
        });
    }
    let total = n_tokens / params.seq_len;
    if total == 0 {
        return Err(PerplexityError::TooFewTokens {
            tokens: n_tokens,
            seq_len: params.seq_len,
        });
    }
    let n = params.max_windows.map_or(total, |m| m.min(total));
    Ok(match params.selection {
        WindowSelection::First => (0..n).collect(),
        WindowSelection::EvenlySpaced => (0..n).map(|i| i * total / n).collect(),
    })
}

/// Summed negative log-likelihood of one window scored the way a decoder runs it: the tokens
/// are fed through a KV cache `chunk` at a time (1 = token-by-token decode; ≤ 16 keeps the
/// linears on the fused small-batch kernels), and token `i + 1` is scored from the hidden
/// state of token `i`. Equals [`Llama::sequence_nll`]'s sum up to kernel rounding; used to
/// measure what the decode kernels change.
pub fn cached_window_nll(
    model: &Llama<'_>,
    window: &[u32],
    chunk: usize,
) -> Result<f64, PerplexityError> {
    if chunk == 0 || window.len() < 2 {
        return Err(PerplexityError::InvalidParameter {
            name: "chunk",
            reason: format!("chunk {chunk} over a window of {} tokens", window.len()),
        });
    }
    let inputs = &window[..window.len() - 1];
    let mut cache = model.new_cache(inputs.len());
    let mut sum = 0f64;
    for (i, part) in inputs.chunks(chunk).enumerate() {
        let hidden = model.forward_cached_hidden(part, &mut cache)?;
        let start = i * chunk;
        let targets = &window[start + 1..start + 1 + part.len()];
        let nll = model.token_nll(&hidden, targets)?;
        sum += nll.iter().map(|&v| f64::from(v)).sum::<f64>();
    }
    if sum.is_nan() {
        return Err(PerplexityError::NanLikelihood { window: 0 });
    }
    Ok(sum)
}

/// Perplexity of `model` on `tokens` (see the module docs for the convention).
/// `progress` is called after every forward batch.
pub fn perplexity(
    model: &Llama<'_>,
    tokens: &[u32],
    params: &PerplexityParams,
    progress: &mut dyn FnMut(&PerplexityProgress),
) -> Result<Perplexity, PerplexityError> {
    let windows = select_windows(tokens.len(), params)?;
    let l = params.seq_len;
    let per_batch = (params.batch_tokens / l).max(1);
    let start = Instant::now();
    let mut nll_sum = 0f64;
    let mut scored = 0usize;
    let mut done = 0usize;
    for group in windows.chunks(per_batch) {
        let mut batch = Vec::with_capacity(group.len() * l);
        for &w in group {
            batch.extend_from_slice(&tokens[w * l..(w + 1) * l]);
        }
        let nll = model.sequence_nll(&batch, l)?;
        for (&w, per_window) in group.iter().zip(nll.chunks(l - 1)) {
            let s: f64 = per_window.iter().map(|&v| f64::from(v)).sum();
            if s.is_nan() {
                return Err(PerplexityError::NanLikelihood { window: w });
            }
            nll_sum += s;
        }
        scored += nll.len();
        done += group.len();
        let elapsed = start.elapsed();
        let eta = elapsed.mul_f64((windows.len() - done) as f64 / done as f64);
        progress(&PerplexityProgress {
            windows_done: done,
            windows_total: windows.len(),
            elapsed,
            eta,
            running_ppl: (nll_sum / scored as f64).exp(),
        });
    }
    let mean_nll = nll_sum / scored as f64;
    Ok(Perplexity {
        ppl: mean_nll.exp(),
        mean_nll,
        tokens_scored: scored,
        windows: windows.len(),
        windows_available: tokens.len() / l,
        seq_len: l,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{Architecture, LlamaConfig};
    use crate::llama::{LinearTable, LlamaResident};

    fn config() -> LlamaConfig {
        LlamaConfig {
            arch: Architecture::Llama,
            n_layers: 2,
            hidden: 16,
            ffn: 24,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 4,
            vocab: 30,
            rope_theta: 10_000.0,
            rope_freq_factors: None,
            rms_eps: 1e-5,
            tied_embeddings: true,
            attn_bias: false,
            max_seq: 128,
            bos_id: None,
            eos_id: None,
        }
    }

    #[test]
    fn window_selection() {
        let p = |max, selection| PerplexityParams {
            seq_len: 10,
            max_windows: max,
            selection,
            ..Default::default()
        };
        assert_eq!(
            select_windows(105, &p(None, WindowSelection::First)).unwrap(),
            (0..10).collect::<Vec<_>>()
        );
        assert_eq!(
            select_windows(105, &p(Some(3), WindowSelection::First)).unwrap(),
            vec![0, 1, 2]
        );
        assert_eq!(
            select_windows(105, &p(Some(4), WindowSelection::EvenlySpaced)).unwrap(),
            vec![0, 2, 5, 7]
        );
        assert_eq!(
            select_windows(105, &p(Some(50), WindowSelection::EvenlySpaced)).unwrap(),
            (0..10).collect::<Vec<_>>()
        );
        // The paper's setting: 301,948 tokens in 2048-token windows.
        let full = PerplexityParams::default();
        assert_eq!(select_windows(301_948, &full).unwrap().len(), 147);
        assert!(matches!(
            select_windows(9, &p(None, WindowSelection::First)),
            Err(PerplexityError::TooFewTokens { .. })
        ));
        assert!(select_windows(100, &p(Some(0), WindowSelection::First)).is_err());
        let short = PerplexityParams {
            seq_len: 1,
            ..Default::default()
        };
        assert!(select_windows(100, &short).is_err());
    }

    #[test]
    fn first_takes_the_leading_windows_and_spread_samples_the_whole_text() {
        // 1000 tokens in windows of 10: 100 windows, 5 of them asked for.
        let p = |selection| PerplexityParams {
            seq_len: 10,
            max_windows: Some(5),
            selection,
            ..Default::default()
        };
        assert_eq!(
            select_windows(1000, &p(WindowSelection::First)).unwrap(),
            vec![0, 1, 2, 3, 4]
        );
        assert_eq!(
            select_windows(1000, &p(WindowSelection::EvenlySpaced)).unwrap(),
            vec![0, 20, 40, 60, 80]
        );
        // With every window asked for, both are all windows in order.
        let all = |selection| PerplexityParams {
            max_windows: None,
            ..p(selection)
        };
        assert_eq!(
            select_windows(1000, &all(WindowSelection::First)).unwrap(),
            select_windows(1000, &all(WindowSelection::EvenlySpaced)).unwrap()
        );
    }

    #[test]
    fn window_selection_names_round_trip_and_bad_names_are_refused() {
        for w in WindowSelection::ALL {
            assert_eq!(w.name().parse::<WindowSelection>().unwrap(), w);
            assert_eq!(w.to_string(), w.name());
            assert_eq!(
                serde_json::to_value(w).unwrap(),
                serde_json::Value::String(w.name().into())
            );
        }
        assert_eq!(WindowSelection::default(), WindowSelection::EvenlySpaced);
        let e = "last".parse::<WindowSelection>().unwrap_err();
        assert!(
            e.contains("\"last\"") && e.contains("spread") && e.contains("first"),
            "{e}"
        );
        assert!("First".parse::<WindowSelection>().is_err());
    }

    #[test]
    fn perplexity_is_exp_of_mean_window_nll_and_batching_does_not_change_it() {
        let c = config();
        let res = LlamaResident::random(&c, 3).unwrap();
        let lin = LinearTable::random(&c, 4).unwrap();
        let model = Llama::new(&res, &lin).unwrap();
        let tokens: Vec<u32> = (0..107u32).map(|i| (i * i + 3 * i) % 30).collect();
        let one = PerplexityParams {
            seq_len: 20,
            batch_tokens: 1,
            selection: WindowSelection::First,
            ..Default::default()
        };
        let mut reports = vec![];
        let a = perplexity(&model, &tokens, &one, &mut |p| reports.push(p.clone())).unwrap();
        assert_eq!(
            (a.windows, a.windows_available, a.tokens_scored),
            (5, 5, 95)
        );
        assert_eq!(reports.len(), 5);
        assert_eq!(reports.last().unwrap().windows_done, 5);
        assert!((reports.last().unwrap().running_ppl - a.ppl).abs() < 1e-9);

        // Independent computation: mean over windows of the per-window mean NLL.
        let mut per_window = vec![];
        for w in 0..5 {
            let nll = model
                .sequence_nll(&tokens[w * 20..(w + 1) * 20], 20)
                .unwrap();
            per_window.push(nll.iter().map(|&v| v as f64).sum::<f64>() / 19.0);
        }
        let want = per_window.iter().sum::<f64>() / 5.0;
        assert!((a.mean_nll - want).abs() < 1e-6, "{} vs {want}", a.mean_nll);
        assert!((a.ppl - want.exp()).abs() < 1e-6 * want.exp());

        let batched = PerplexityParams {
            batch_tokens: 60,
            ..one.clone()
        };
        let mut calls = 0;
        let b = perplexity(&model, &tokens, &batched, &mut |_| calls += 1).unwrap();
        assert_eq!(calls, 2); // 3 + 2 windows
        assert!((a.mean_nll - b.mean_nll).abs() < 1e-5);

        let sub = PerplexityParams {
            max_windows: Some(2),
            ..one
        };
        let s = perplexity(&model, &tokens, &sub, &mut |_| {}).unwrap();
        let want2 = (per_window[0] + per_window[1]) / 2.0;
        assert!((s.mean_nll - want2).abs() < 1e-6);
        assert_eq!((s.windows, s.tokens_scored), (2, 38));
    }

    #[test]
    fn out_of_vocabulary_tokens_are_an_error() {
        let c = config();
        let res = LlamaResident::random(&c, 3).unwrap();
        let lin = LinearTable::random(&c, 4).unwrap();
        let model = Llama::new(&res, &lin).unwrap();
        let tokens = vec![31u32; 40];
        let p = PerplexityParams {
            seq_len: 20,
            ..Default::default()
        };
        assert!(matches!(
            perplexity(&model, &tokens, &p, &mut |_| {}),
            Err(PerplexityError::Llama(LlamaError::TokenOutOfRange { .. }))
        ));
    }
}
