//! candle-transformers' Llama over a BitStack snapshot, and its perplexity on `bitstack eval`'s
//! windows.

use std::collections::HashMap;
use std::time::Instant;

use bitstack_core::ModelSnapshot;
use bitstack_examples::perplexity::{select_windows, PerplexityParams};
use bitstack_format::StackFile;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama as cl;

use crate::contract;
use crate::CandleError;

/// candle-transformers' [`Llama`](cl::Llama) built from the dense weights a BitStack snapshot
/// restores (f32, CPU), with the file's resident tensors (embedding, norms, untied head).
///
/// The restored copy is what an engine without BitStack kernels would hold: about
/// `4 · parameters` bytes, independent of the budget. It exists to check that an unmodified
/// external forward pass reproduces the elastic model's numbers.
pub struct CandleLlama {
    model: cl::Llama,
    config: cl::Config,
    device: Device,
}

impl std::fmt::Debug for CandleLlama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CandleLlama")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl CandleLlama {
    /// Builds the model of `file` at `snapshot` (a snapshot of that file's elastic model),
    /// reading the model through the format crate's contract only.
    pub fn from_snapshot(file: &StackFile, snapshot: &ModelSnapshot) -> Result<Self, CandleError> {
        let contract = contract::model_contract(file)?;
        let c = contract.config();
        let config = contract::candle_config(c)?;
        let device = Device::Cpu;
        let expected = contract::weight_count(c);
        if snapshot.weights().len() != expected {
            return Err(CandleError::InvalidArgument {
                name: "snapshot",
                reason: format!(
                    "{} weights, the file's model has {expected} (a snapshot of another file?)",
                    snapshot.weights().len()
                ),
            });
        }
        let mut tensors = HashMap::new();
        for (i, stack) in snapshot.weights().iter().enumerate() {
            let meta = stack.meta();
            let mut w = vec![0f32; meta.rows * meta.cols];
            stack.restore_into(stack.loaded_levels(), &mut w)?;
            tensors.insert(
                contract::hf_weight_name(i),
                Tensor::from_vec(w, (meta.rows, meta.cols), &device)?,
            );
        }
        for (ours, hf) in contract::hf_resident_names(c) {
            let (shape, data) = contract::resident_f32(file, &ours)?;
            tensors.insert(hf, Tensor::from_vec(data, shape, &device)?);
        }
        if c.tied_embeddings {
            // candle reuses the embedding for a tied head; the alias keeps the Hugging Face name
            // set complete for anything else reading this map (a tensor clone shares storage).
            if let Some(e) = tensors.get("model.embed_tokens.weight").cloned() {
                tensors.insert("lm_head.weight".to_owned(), e);
            }
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        // `Llama::load` unwraps each block's load; every tensor it asks for is in the map with
        // the shape the config implies (the stack file's shapes are validated against the same
        // config by `StackModel::new`), so it cannot panic on a valid file.
        let model = cl::Llama::load(vb, &config)?;
        Ok(Self {
            model,
            config,
            device,
        })
    }

    /// The candle config in use.
    pub fn config(&self) -> &cl::Config {
        &self.config
    }

    /// Summed negative log-likelihood (nats) of tokens `1..` of each window, all windows of
    /// one length run side by side as a batch.
    ///
    /// candle-transformers' `Llama::forward` returns the logits of the last position only, so
    /// the windows are fed one position at a time through its KV cache: the same causal
    /// computation as a full-window pass, scored at every position.
    pub fn windows_nll(&self, windows: &[&[u32]]) -> Result<Vec<f64>, CandleError> {
        let Some(first) = windows.first() else {
            return Ok(Vec::new());
        };
        let len = first.len();
        if len < 2 || windows.iter().any(|w| w.len() != len) {
            return Err(CandleError::InvalidArgument {
                name: "windows",
                reason: format!("need equal lengths of at least 2 tokens (first has {len})"),
            });
        }
        if len - 1 > self.config.max_position_embeddings {
            return Err(CandleError::InvalidArgument {
                name: "windows",
                reason: format!(
                    "{len} tokens exceed the model's context of {} positions",
                    self.config.max_position_embeddings
                ),
            });
        }
        let vocab = self.config.vocab_size;
        if let Some(bad) = windows
            .iter()
            .flat_map(|w| w.iter())
            .find(|&&t| t as usize >= vocab)
        {
            return Err(CandleError::InvalidArgument {
                name: "token",
                reason: format!("id {bad} is outside the vocabulary of {vocab}"),
            });
        }
        let b = windows.len();
        let mut cache = cl::Cache::new(true, DType::F32, &self.config, &self.device)?;
        let mut sums = vec![0f64; b];
        let mut column = vec![0u32; b];
        for pos in 0..len - 1 {
            for (c, w) in column.iter_mut().zip(windows) {
                *c = w[pos];
            }
            let input = Tensor::from_slice(&column, (b, 1), &self.device)?;
            let logits = self.model.forward(&input, pos, &mut cache)?;
            let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for ((sum, row), w) in sums.iter_mut().zip(&rows).zip(windows) {
                *sum += nll(row, w[pos + 1] as usize);
            }
        }
        Ok(sums)
    }
}

/// `-log softmax(logits)[target]`, accumulated in f64.
fn nll(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    sum.ln() + max - logits[target] as f64
}

/// The outcome of [`candle_perplexity`].
#[derive(Clone, Debug, PartialEq)]
pub struct CandlePerplexity {
    /// `exp(mean_nll)`.
    pub ppl: f64,
    /// Mean negative log-likelihood (nats) per scored token.
    pub mean_nll: f64,
    /// Tokens scored: `windows · (seq_len - 1)`.
    pub tokens_scored: usize,
    /// Windows evaluated.
    pub windows: usize,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// Perplexity of `model` on `tokens` over exactly the windows
/// [`bitstack_examples::perplexity::perplexity`] evaluates with `params` (same placement by
/// [`select_windows`], same scoring of tokens `1..seq_len` of each window). Windows run
/// `batch_windows` at a time; `progress(done, total)` is called after each group.
pub fn candle_perplexity(
    model: &CandleLlama,
    tokens: &[u32],
    params: &PerplexityParams,
    batch_windows: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<CandlePerplexity, CandleError> {
    if batch_windows == 0 {
        return Err(CandleError::InvalidArgument {
            name: "batch_windows",
            reason: "0".into(),
        });
    }
    let start = Instant::now();
    let windows = select_windows(tokens.len(), params)?;
    let l = params.seq_len;
    let mut total = 0f64;
    let mut done = 0;
    for group in windows.chunks(batch_windows) {
        let slices: Vec<&[u32]> = group.iter().map(|&w| &tokens[w * l..(w + 1) * l]).collect();
        let sums = model.windows_nll(&slices)?;
        for (&w, s) in group.iter().zip(&sums) {
            if s.is_nan() {
                return Err(CandleError::NanLikelihood { window: w });
            }
            total += s;
        }
        done += group.len();
        progress(done, windows.len());
    }
    let scored = windows.len() * (l - 1);
    let mean_nll = total / scored as f64;
    Ok(CandlePerplexity {
        ppl: mean_nll.exp(),
        mean_nll,
        tokens_scored: scored,
        windows: windows.len(),
        seconds: start.elapsed().as_secs_f64(),
    })
}
