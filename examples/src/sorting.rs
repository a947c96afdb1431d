//! The forward-pass evaluator behind the search-based universal-stack sorts (paper section 2.2,
//! Algorithm 1 lines 24-45): [`LlamaStackEvaluator`] implements
//! [`bitstack_sort::StackEvaluator`] for a Llama model whose `7 · n_layers` linears are BitStack
//! weight stacks, so [`bitstack_sort::sort_average`] and [`bitstack_sort::sort_greedy`] can rank
//! their residual blocks.
//!
//! # Weights and loss
//!
//! Weight `w` is linear `LinearKind::ALL[w % 7]` of layer `w / 7` ([`weight_index`]), the order
//! in which the compressor writes the stacks. The loss of a configuration (`blocks[w]` levels
//! restored for every weight `w`) is the **mean token negative log-likelihood** (natural log) on
//! a fixed scoring set: `n_seqs` windows of `seq_len` tokens, each predicting its tokens
//! `1..seq_len` from their prefixes. That is the log of the perplexity the paper ranks by, so
//! every ordering is the same. The paper scores with 32 samples of WikiText-2 training text
//! (section 3.1.1, at its calibration length of 2048 tokens); on CPU we default to
//! [`DEFAULT_SCORING_SEQS`] × [`DEFAULT_SCORING_SEQ_LEN`] tokens ([`PAPER_SCORING_SEQS`] names
//! the paper's count).
//!
//! # What an evaluation costs
//!
//! The evaluator keeps a **base** configuration fully restored to dense f32 (one
//! [`DenseLinear`] per weight) together with the hidden states entering each layer under it.
//! An evaluation that differs from the base in a single weight of layer `l` (every
//! [`StackEvaluator::loss_plus_one`] call of Average, and every Greedy call once
//! [`LlamaStackEvaluator::prepare_greedy`] has pinned the base) restores only that one weight,
//! re-runs layers `l..L` from the cached hidden state and the head: on average half the
//! decoder plus the head. For `loss_plus_one` the extra block is restored alone and added to
//! the base's dense weight, so the restoration cost is one block. The base changes once per
//! level of Average; that restores every weight from scratch (deterministically, whatever
//! came before) and invalidates the hidden-state cache from the first changed layer on; the
//! cache is then refilled lazily as evaluations need deeper layers.
//!
//! Restoring to dense once per configuration is also what the stack kernels would do anyway at
//! this batch size (anything over [`bitstack_core::kernels::FUSED_MAX_BATCH`] tokens restores
//! `Ŵ` and runs a GEMM), but here it happens once per weight and base rather than on every
//! forward.
//!
//! Memory: the dense base (4 bytes per linear parameter, e.g. ~425 MB for SmolLM2-135M), the
//! blocks, and `n_layers` hidden states of `n_seqs · seq_len × hidden` floats.
//!
//! A configuration whose hidden states become non-finite (a collapsed model) scores NaN, which
//! the sorts rank last with a warning.

use std::sync::Arc;

use rayon::prelude::*;

use bitstack_core::{kernels, DenseLinear, LinearOp, ResidualBlock, StackMeta, WeightStack};
use bitstack_sort::StackEvaluator;

use crate::llama::{
    LinearKind, LinearProvider, Llama, LlamaConfig, LlamaError, LlamaResident, Result, SeqBatch,
};

/// Scoring windows used when the caller has no preference (CPU-friendly; see the module docs).
pub const DEFAULT_SCORING_SEQS: usize = 8;
/// Tokens per default scoring window.
pub const DEFAULT_SCORING_SEQ_LEN: usize = 256;
/// Samples the paper scores each block on (section 3.1.1: 32 WikiText-2 training samples).
pub const PAPER_SCORING_SEQS: usize = 32;

/// Index of linear `kind` of block `layer` in the evaluator's (and the compressor's, and a
/// stack file's) weight numbering, `layer · 7 + kind.index()`, and its inverse: the model
/// contract's one definition.
pub use bitstack_format::model::{stack_index as weight_index, stack_location as weight_location};

/// `n` evenly spaced windows of `seq_len` tokens of `tokens`, concatenated: the scoring set
/// of a [`LlamaStackEvaluator`]. Errors when the text holds fewer than `n` windows.
pub fn scoring_windows(tokens: &[u32], n: usize, seq_len: usize) -> Result<Vec<u32>> {
    let available = tokens.len() / seq_len.max(1);
    if n == 0 || seq_len < 2 || available < n {
        return Err(invalid(
            "scoring windows",
            format!(
                "{n} windows of {seq_len} tokens requested, the text has {} tokens",
                tokens.len()
            ),
        ));
    }
    Ok((0..n)
        .flat_map(|i| {
            let start = i * available / n * seq_len;
            tokens[start..start + seq_len].iter().copied()
        })
        .collect())
}

/// Work counters of a [`LlamaStackEvaluator`], for progress lines and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvaluatorStats {
    /// Losses returned (including ones answered from the cached base loss).
    pub evaluations: u64,
    /// Times the base configuration changed.
    pub base_changes: u64,
    /// Weights restored to dense (whole stacks for the base, or single-weight overrides).
    pub weights_restored: u64,
    /// Residual blocks expanded by those restorations.
    pub blocks_restored: u64,
    /// Decoder layers run (hidden-state cache fills and evaluations).
    pub layers_run: u64,
    /// Output-head passes (one per loss actually computed).
    pub heads_run: u64,
}

/// [`StackEvaluator`] for a Llama model whose linears are weight stacks; see the module docs.
pub struct LlamaStackEvaluator<'a> {
    resident: &'a LlamaResident,
    stacks: Vec<WeightStack>,
    tokens: Vec<u32>,
    /// `targets[i]` is predicted from row `i` of the gathered final hidden states.
    targets: Vec<u32>,
    /// Positions of each window that are context only (not scored).
    skip: usize,
    seqs: SeqBatch,
    /// Level counts of the dense base; all 0 before the first base is set.
    base_levels: Vec<u16>,
    /// One restored weight per index once a base is set, empty before.
    base_dense: Vec<DenseLinear>,
    /// `hidden[l]`: the hidden states entering layer `l` under the base, for `l < hidden.len()`
    /// (a prefix of the layers is valid). An empty entry marks non-finite states.
    hidden: Vec<Vec<f32>>,
    base_loss: Option<f64>,
    /// With a reference, the loss is the mean `KL(p_ref ‖ p)` instead of the cross-entropy.
    reference: Option<Reference>,
    stats: EvaluatorStats,
}

/// The next-token distributions of a reference configuration on the scoring rows.
struct Reference {
    probs: Vec<f32>,
    neg_entropy: Vec<f64>,
}

impl std::fmt::Debug for LlamaStackEvaluator<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaStackEvaluator")
            .field("weights", &self.stacks.len())
            .field("n_seqs", &self.seqs.n_seqs())
            .field("seq_len", &self.seqs.seq_len())
            .field("base_levels", &self.base_levels)
            .field("cached_layers", &self.hidden.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn invalid(name: &'static str, reason: String) -> LlamaError {
    LlamaError::InvalidParameter { name, reason }
}

impl<'a> LlamaStackEvaluator<'a> {
    /// An evaluator for `resident` with `stacks[weight_index(layer, kind)]` as the linears, each
    /// holding **all** its levels (`levels(w)` is the number of loaded blocks, at least 1), and
    /// `tokens` cut into windows of `seq_len ≥ 2` tokens as the scoring set.
    ///
    /// Errors: a stack count other than `7 · n_layers`, a stack whose shape does not fit its
    /// linear or that holds no block, an empty or ragged scoring set, a token outside the
    /// vocabulary.
    pub fn new(
        resident: &'a LlamaResident,
        stacks: Vec<WeightStack>,
        tokens: Vec<u32>,
        seq_len: usize,
    ) -> Result<Self> {
        let c = resident.config();
        let n = c.n_layers * LinearKind::ALL.len();
        if stacks.len() != n {
            return Err(invalid(
                "stacks",
                format!(
                    "{} stacks for {} layers, expected {n}",
                    stacks.len(),
                    c.n_layers
                ),
            ));
        }
        for (w, s) in stacks.iter().enumerate() {
            let (layer, kind) = weight_location(w);
            let (out, inp) = kind.shape(c);
            if (s.in_features(), s.out_features()) != (inp, out) {
                return Err(LlamaError::LinearShape {
                    layer,
                    kind,
                    expected_in: inp,
                    expected_out: out,
                    actual_in: s.in_features(),
                    actual_out: s.out_features(),
                });
            }
            if s.loaded_levels() == 0 || s.loaded_levels() > usize::from(u16::MAX) {
                return Err(invalid(
                    "stacks",
                    format!(
                        "stack {w} ({}) holds {} blocks",
                        s.meta().name,
                        s.loaded_levels()
                    ),
                ));
            }
        }
        if seq_len < 2 || tokens.is_empty() || !tokens.len().is_multiple_of(seq_len) {
            return Err(invalid(
                "scoring tokens",
                format!(
                    "{} tokens cannot be cut into windows of {seq_len} (at least 2) tokens",
                    tokens.len()
                ),
            ));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(LlamaError::TokenOutOfRange {
                token: t,
                vocab: c.vocab,
            });
        }
        let n_seqs = tokens.len() / seq_len;
        let seqs = SeqBatch::new(c, n_seqs, seq_len)?;
        let targets = tokens
            .chunks(seq_len)
            .flat_map(|s| s[1..].iter().copied())
            .collect();
        Ok(Self {
            resident,
            stacks,
            tokens,
            targets,
            skip: 0,
            seqs,
            base_levels: vec![0; n],
            base_dense: Vec::new(),
            hidden: Vec::new(),
            base_loss: None,
            reference: None,
            stats: EvaluatorStats::default(),
        })
    }

    /// [`LlamaStackEvaluator::new`] from the parts a compressor or stack file yields: per weight
    /// its metadata and all its blocks, in level order.
    pub fn from_parts(
        resident: &'a LlamaResident,
        parts: Vec<(Arc<StackMeta>, Vec<Arc<ResidualBlock>>)>,
        tokens: Vec<u32>,
        seq_len: usize,
    ) -> Result<Self> {
        let stacks = parts
            .into_iter()
            .map(|(meta, blocks)| WeightStack::with_blocks(meta, blocks))
            .collect::<bitstack_core::Result<Vec<_>>>()?;
        Self::new(resident, stacks, tokens, seq_len)
    }

    /// The model hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        self.resident.config()
    }

    /// The weight stacks, indexed as in [`weight_index`].
    pub fn stacks(&self) -> &[WeightStack] {
        &self.stacks
    }

    /// Windows in the scoring set.
    pub fn n_seqs(&self) -> usize {
        self.seqs.n_seqs()
    }

    /// Tokens per scoring window.
    pub fn seq_len(&self) -> usize {
        self.seqs.seq_len()
    }

    /// Tokens whose likelihood enters the loss: `n_seqs · (seq_len − 1)`.
    pub fn scored_tokens(&self) -> usize {
        self.targets.len()
    }

    /// Work done so far.
    pub fn stats(&self) -> EvaluatorStats {
        self.stats
    }

    /// The current base configuration (all zeros before the first evaluation).
    pub fn base_levels(&self) -> &[u16] {
        &self.base_levels
    }

    /// The configuration [`bitstack_sort::sort_greedy`] freezes every other weight at,
    /// `max(1, levels(w) / 2)`.
    pub fn greedy_frozen_levels(&self) -> Vec<u16> {
        (0..self.num_weights())
            .map(|w| (self.levels(w) / 2).max(1))
            .collect()
    }

    /// Pins the base to [`LlamaStackEvaluator::greedy_frozen_levels`]: every configuration
    /// Greedy scores then differs from it in one weight, so each evaluation re-runs only the
    /// layers from that weight's on. Call it before `sort_greedy`; without it Greedy is still
    /// correct but every evaluation moves the base.
    pub fn prepare_greedy(&mut self) -> Result<()> {
        let frozen = self.greedy_frozen_levels();
        self.set_base(&frozen)
    }

    /// Makes `levels` the base configuration: restores every weight whose count changed (from
    /// scratch) and drops the cached hidden states from the first changed layer on. Cheap when
    /// nothing changed.
    pub fn set_base(&mut self, levels: &[u16]) -> Result<()> {
        self.check_config(levels)?;
        let changed: Vec<usize> = (0..levels.len())
            .filter(|&w| levels[w] != self.base_levels[w])
            .collect();
        let Some(&first) = changed.first() else {
            return Ok(());
        };
        self.stats.base_changes += 1;
        if self.base_dense.is_empty() {
            self.base_dense = (0..levels.len())
                .map(|w| self.restore(w, levels[w]))
                .collect::<Result<_>>()?;
        } else {
            for &w in &changed {
                self.base_dense[w] = self.restore(w, levels[w])?;
            }
        }
        self.base_levels.copy_from_slice(levels);
        // hidden[l] depends on layers 0..l only.
        self.hidden.truncate(weight_location(first).0 + 1);
        self.base_loss = None;
        Ok(())
    }

    /// Switches the loss to the mean `KL(p_ref ‖ p)` over the scoring positions, with `p_ref`
    /// the next-token distributions of the configuration `levels` (e.g. every block: the
    /// model closest to the original). Each position then contributes its whole
    /// distribution instead of the log-probability of one text token, which makes the small
    /// loss differences sorting compares less noisy at the same scoring set. Costs one forward
    /// pass and `positions · vocab` floats; leaves `levels` as the base.
    pub fn use_kl_reference(&mut self, levels: &[u16]) -> Result<()> {
        self.reference = None;
        self.set_base(levels)?;
        let n_layers = self.config().n_layers;
        self.ensure_hidden(n_layers - 1)?;
        let provider = Provider {
            base: &self.base_dense,
            over: None,
        };
        let model = Llama::new(self.resident, &provider)?;
        let last = &self.hidden[n_layers - 1];
        let x = if last.is_empty() {
            Vec::new()
        } else {
            model.layer_forward(n_layers - 1, last, &self.seqs, None)?
        };
        if x.is_empty() || !x.iter().all(|v| v.is_finite()) {
            return Err(invalid(
                "reference",
                "the reference configuration's hidden states are not finite".into(),
            ));
        }
        let rows = self.scored_rows(&x);
        let probs = model.token_probs(&rows)?;
        let neg_entropy = probs
            .chunks(self.config().vocab)
            .map(|p| {
                p.iter()
                    .filter(|&&q| q > 0.0)
                    .map(|&q| f64::from(q) * f64::from(q).ln())
                    .sum()
            })
            .collect();
        self.reference = Some(Reference { probs, neg_entropy });
        self.base_loss = None;
        Ok(())
    }

    /// First-order loss change of every block at the configuration `levels`: entry `[w][l]`
    /// is `⟨∂L/∂W_w, B_{w,l}⟩`, the derivative of the cross-entropy over every window
    /// position (the default loss; [`Self::score_from_position`] and a KL reference are not
    /// differentiated, and the [`bitstack_sort::FirstOrderEvaluator`] impl refuses them) along block `l` of weight `w` restored alone, for the block indices in `blocks` (`None`
    /// elsewhere). Negative means the block lowers the loss. One forward and one backward pass
    /// over the scoring set ([`crate::llama::weight_gradients`]) plus one single-block
    /// restoration per scored block; leaves `levels` as the base.
    pub fn block_first_order(
        &mut self,
        levels: &[u16],
        blocks: std::ops::Range<u16>,
    ) -> Result<(f64, bitstack_sort::BlockScores)> {
        self.set_base(levels)?;
        let dense: Vec<&[f32]> = self.base_dense.iter().map(|d| d.weights()).collect();
        let g = crate::llama::weight_gradients(self.resident, &dense, &self.tokens, &self.seqs)?;
        let scores = self
            .stacks
            .par_iter()
            .zip(g.grads.par_iter())
            .map(|(s, grad)| {
                let (rows, cols) = (s.out_features(), s.in_features());
                let mut b = vec![0f32; rows * cols];
                (0..s.loaded_levels())
                    .map(|l| {
                        if !blocks.contains(&(l as u16)) {
                            return Ok(None);
                        }
                        kernels::restore_into(
                            &[s.blocks()[l].view()],
                            rows,
                            cols,
                            s.inv_scale(),
                            &mut b,
                        )?;
                        Ok(Some(
                            b.iter()
                                .zip(grad)
                                .map(|(&x, &y)| f64::from(x) * f64::from(y))
                                .sum(),
                        ))
                    })
                    .collect::<Result<Vec<Option<f64>>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((g.loss, scores))
    }

    /// The final hidden states of the scored positions (`skip..seq_len − 1` of each window),
    /// row `i` predicting `targets[i]`.
    fn scored_rows(&self, x: &[f32]) -> Vec<f32> {
        let (h, t) = (self.config().hidden, self.seqs.seq_len());
        x.chunks(t * h)
            .flat_map(|s| s[self.skip * h..(t - 1) * h].iter().copied())
            .collect()
    }

    /// Scores only positions `skip..` of each window; the first `skip` tokens are context.
    /// Early positions see little context and behave unlike text read at full length, so
    /// their loss differences are noise for ranking blocks. Drops a KL reference (set it
    /// again after this call).
    pub fn score_from_position(&mut self, skip: usize) -> Result<()> {
        let t = self.seqs.seq_len();
        if skip + 1 >= t {
            return Err(invalid(
                "skip",
                format!("skipping {skip} of {t} positions leaves nothing to score"),
            ));
        }
        self.skip = skip;
        self.targets = self
            .tokens
            .chunks(t)
            .flat_map(|s| s[1 + skip..].iter().copied())
            .collect();
        self.reference = None;
        self.base_loss = None;
        Ok(())
    }

    fn check_config(&self, levels: &[u16]) -> Result<()> {
        if levels.len() != self.stacks.len() {
            return Err(invalid(
                "blocks_per_weight",
                format!("{} entries for {} weights", levels.len(), self.stacks.len()),
            ));
        }
        if let Some(w) = (0..levels.len()).find(|&w| levels[w] == 0 || levels[w] > self.levels(w)) {
            return Err(invalid(
                "blocks_per_weight",
                format!(
                    "weight {w} asks for {} blocks of {}",
                    levels[w],
                    self.levels(w)
                ),
            ));
        }
        Ok(())
    }

    /// Dense weight of `weight` restored from its first `levels` blocks.
    fn restore(&mut self, weight: usize, levels: u16) -> Result<DenseLinear> {
        let s = &self.stacks[weight];
        let (rows, cols) = (s.out_features(), s.in_features());
        let mut w = vec![0f32; rows * cols];
        s.restore_into(usize::from(levels), &mut w)?;
        self.stats.weights_restored += 1;
        self.stats.blocks_restored += u64::from(levels);
        Ok(DenseLinear::new(rows, cols, w)?)
    }

    /// The base weight of `weight` plus its block at level `base_levels[weight]` (restored
    /// alone, scale included, and added).
    fn restore_plus_one(&mut self, weight: usize) -> Result<DenseLinear> {
        let s = &self.stacks[weight];
        let (rows, cols) = (s.out_features(), s.in_features());
        let level = usize::from(self.base_levels[weight]);
        let block = [s.blocks()[level].view()];
        let mut w = vec![0f32; rows * cols];
        kernels::restore_into(&block, rows, cols, s.inv_scale(), &mut w)?;
        for (x, &b) in w.iter_mut().zip(self.base_dense[weight].weights()) {
            *x += b;
        }
        self.stats.weights_restored += 1;
        self.stats.blocks_restored += 1;
        Ok(DenseLinear::new(rows, cols, w)?)
    }

    /// Fills the hidden-state cache of the base up to and including the input of `layer`.
    fn ensure_hidden(&mut self, layer: usize) -> Result<()> {
        if self.hidden.len() > layer {
            return Ok(());
        }
        let provider = Provider {
            base: &self.base_dense,
            over: None,
        };
        let model = Llama::new(self.resident, &provider)?;
        if self.hidden.is_empty() {
            self.hidden.push(model.embed(&self.tokens)?);
        }
        while self.hidden.len() <= layer {
            let l = self.hidden.len() - 1;
            let prev = &self.hidden[l];
            let next = if prev.is_empty() {
                Vec::new()
            } else {
                self.stats.layers_run += 1;
                let x = model.layer_forward(l, prev, &self.seqs, None)?;
                if x.iter().all(|v| v.is_finite()) {
                    x
                } else {
                    Vec::new()
                }
            };
            self.hidden.push(next);
        }
        Ok(())
    }

    /// Loss of the base with `over` (if any) replacing one weight's linear: layers from the
    /// first affected one are re-run from the cached hidden states.
    fn evaluate(&mut self, over: Option<(usize, DenseLinear)>) -> Result<f64> {
        self.stats.evaluations += 1;
        if over.is_none() {
            if let Some(loss) = self.base_loss {
                return Ok(loss);
            }
        }
        let n_layers = self.config().n_layers;
        let start = over
            .as_ref()
            .map_or(n_layers, |(w, _)| weight_location(*w).0);
        // Without an override everything up to the head is the base: use (and fill) the cache
        // through the last layer's input, then run that layer.
        let start = start.min(n_layers - 1);
        self.ensure_hidden(start)?;
        let provider = Provider {
            base: &self.base_dense,
            over: over.as_ref().map(|(w, op)| (*w, op)),
        };
        let model = Llama::new(self.resident, &provider)?;
        let mut x = std::borrow::Cow::Borrowed(self.hidden[start].as_slice());
        let mut layers_run = 0;
        let mut finite = !x.is_empty();
        for l in start..n_layers {
            if !finite {
                break;
            }
            layers_run += 1;
            let next = model.layer_forward(l, &x, &self.seqs, None)?;
            finite = next.iter().all(|v| v.is_finite());
            x = std::borrow::Cow::Owned(next);
        }
        self.stats.layers_run += layers_run;
        let loss = if finite {
            self.stats.heads_run += 1;
            let rows = self.scored_rows(&x);
            let per_token = match &self.reference {
                None => model.token_nll(&rows, &self.targets)?,
                Some(r) => model.token_kl(&rows, &r.probs, &r.neg_entropy)?,
            };
            per_token.iter().map(|&v| f64::from(v)).sum::<f64>() / per_token.len() as f64
        } else {
            f64::NAN
        };
        if over.is_none() {
            self.base_loss = Some(loss);
        }
        Ok(loss)
    }
}

impl bitstack_sort::FirstOrderEvaluator for LlamaStackEvaluator<'_> {
    fn first_order(
        &mut self,
        base: &[u16],
        levels: std::ops::Range<u16>,
    ) -> Result<bitstack_sort::BlockScores> {
        if self.skip != 0 || self.reference.is_some() {
            return Err(invalid(
                "first_order",
                "gradients are of the plain cross-entropy over every position; \
                 drop the skipped positions and the KL reference"
                    .into(),
            ));
        }
        Ok(self.block_first_order(base, levels)?.1)
    }
}

impl StackEvaluator for LlamaStackEvaluator<'_> {
    type Error = LlamaError;

    fn num_weights(&self) -> usize {
        self.stacks.len()
    }

    fn levels(&self, weight: usize) -> u16 {
        // Checked to fit in `new`.
        self.stacks[weight].loaded_levels() as u16
    }

    /// Answered from the base when `blocks_per_weight` equals it or differs in one weight;
    /// otherwise `blocks_per_weight` becomes the new base.
    fn loss(&mut self, blocks_per_weight: &[u16]) -> Result<f64> {
        self.check_config(blocks_per_weight)?;
        let mut diff =
            (0..blocks_per_weight.len()).filter(|&w| blocks_per_weight[w] != self.base_levels[w]);
        match (diff.next(), diff.next()) {
            (None, _) => self.evaluate(None),
            (Some(w), None) => {
                let op = if blocks_per_weight[w] == self.base_levels[w] + 1 {
                    // Same restoration as `loss_plus_one`, so both agree exactly.
                    self.restore_plus_one(w)?
                } else {
                    self.restore(w, blocks_per_weight[w])?
                };
                self.evaluate(Some((w, op)))
            }
            (Some(_), Some(_)) => {
                self.set_base(blocks_per_weight)?;
                self.evaluate(None)
            }
        }
    }

    fn loss_plus_one(&mut self, base: &[u16], weight: usize) -> Result<f64> {
        if weight >= self.stacks.len() || base.get(weight) >= Some(&self.levels(weight)) {
            return Err(invalid(
                "weight",
                format!("weight {weight} has no block beyond {:?}", base.get(weight)),
            ));
        }
        self.set_base(base)?;
        let op = self.restore_plus_one(weight)?;
        self.evaluate(Some((weight, op)))
    }
}

/// The base's dense weights with at most one replaced.
struct Provider<'b> {
    base: &'b [DenseLinear],
    over: Option<(usize, &'b DenseLinear)>,
}

impl LinearProvider for Provider<'_> {
    fn linear(&self, layer: usize, kind: LinearKind) -> &dyn LinearOp {
        let w = weight_index(layer, kind);
        match self.over {
            Some((o, op)) if o == w => op,
            _ => &self.base[w],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::Architecture;
    use crate::llama::{LinearTable, SplitMix64};
    use bitstack_linalg::{decompose_slice, IavdParams};
    use bitstack_sort::{sort_average, sort_greedy, NoObserver, SortConfig};

    fn tiny_config() -> LlamaConfig {
        LlamaConfig {
            arch: Architecture::Llama,
            n_layers: 2,
            hidden: 32,
            ffn: 48,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            vocab: 64,
            rope_theta: 10_000.0,
            rope_freq_factors: None,
            rms_eps: 1e-5,
            tied_embeddings: true,
            attn_bias: false,
            max_seq: 64,
            bos_id: None,
            eos_id: None,
        }
    }

    /// Every linear of a random model decomposed into `levels` blocks of rank 4, plus the
    /// dense originals (`weight_index` order).
    fn decomposed(c: &LlamaConfig, levels: usize, seed: u64) -> (Vec<WeightStack>, Vec<Vec<f32>>) {
        let mut rng = SplitMix64::new(seed);
        let params = IavdParams {
            levels,
            rank: 4,
            ..IavdParams::default()
        };
        let mut stacks = Vec::new();
        let mut dense = Vec::new();
        for layer in 0..c.n_layers {
            for kind in LinearKind::ALL {
                let (rows, cols) = kind.shape(c);
                let amp = (3.0 / cols as f32).sqrt();
                let w: Vec<f32> = (0..rows * cols).map(|_| amp * rng.next_signed()).collect();
                // A mild activation scale so the inverse-scale path is exercised too.
                let scale: Vec<f32> = (0..cols).map(|j| 1.0 + 0.05 * (j % 7) as f32).collect();
                let d = decompose_slice(&w, rows, cols, Some(&scale), &params).unwrap();
                let meta = Arc::new(d.stack_meta(kind.tensor_name(layer), Some(scale)));
                let blocks = d.blocks.into_iter().map(Arc::new).collect();
                stacks.push(WeightStack::with_blocks(meta, blocks).unwrap());
                dense.push(w);
            }
        }
        (stacks, dense)
    }

    fn scoring_tokens(c: &LlamaConfig, n: usize, seed: u64) -> Vec<u32> {
        let mut rng = SplitMix64::new(seed);
        (0..n)
            .map(|_| ((rng.next_signed() + 1.0) * 0.5 * c.vocab as f32) as u32 % c.vocab as u32)
            .collect()
    }

    fn rel(a: f64, b: f64) -> f64 {
        (a - b).abs() / a.abs().max(b.abs())
    }

    /// Mean NLL through the public forward pass with truncated `WeightStack` linears.
    fn reference_loss(
        res: &LlamaResident,
        stacks: &[WeightStack],
        config: &[u16],
        tokens: &[u32],
        seq_len: usize,
    ) -> f64 {
        let nll = reference_nll(res, stacks, config, tokens, seq_len);
        nll.iter().map(|&v| f64::from(v)).sum::<f64>() / nll.len() as f64
    }

    /// Per-token NLL of a plain forward pass with every stack truncated to `config`.
    fn reference_nll(
        res: &LlamaResident,
        stacks: &[WeightStack],
        config: &[u16],
        tokens: &[u32],
        seq_len: usize,
    ) -> Vec<f32> {
        nll_with(
            res,
            |w| {
                let mut s = stacks[w].clone();
                s.truncate(usize::from(config[w]));
                Box::new(s)
            },
            tokens,
            seq_len,
        )
    }

    /// Per-token NLL of a plain forward pass with `linear(weight_index)` as the linears.
    fn nll_with(
        res: &LlamaResident,
        linear: impl Fn(usize) -> Box<dyn LinearOp>,
        tokens: &[u32],
        seq_len: usize,
    ) -> Vec<f32> {
        let layers = (0..res.config().n_layers)
            .map(|l| LinearKind::ALL.map(|k| linear(weight_index(l, k))))
            .collect();
        let table = LinearTable::new(layers);
        let model = Llama::new(res, &table).unwrap();
        model.sequence_nll(tokens, seq_len).unwrap()
    }

    #[test]
    fn weight_numbering_round_trips() {
        for w in 0..70 {
            let (l, k) = weight_location(w);
            assert_eq!(weight_index(l, k), w);
        }
        assert_eq!(weight_index(3, LinearKind::Down), 27);
    }

    #[test]
    fn loss_matches_reference_forward_and_plus_one_matches_loss() {
        let c = tiny_config();
        let res = LlamaResident::random(&c, 1).unwrap();
        let (stacks, _) = decomposed(&c, 3, 2);
        let seq_len = 24;
        let tokens = scoring_tokens(&c, 3 * seq_len, 3);
        let mut ev =
            LlamaStackEvaluator::new(&res, stacks.clone(), tokens.clone(), seq_len).unwrap();
        assert_eq!(ev.num_weights(), 14);
        assert_eq!(ev.scored_tokens(), 3 * 23);

        // loss() from scratch agrees with the plain forward pass.
        let base: Vec<u16> = (0..14).map(|w| 1 + (w % 2) as u16).collect();
        let direct = ev.loss(&base).unwrap();
        let reference = reference_loss(&res, &stacks, &base, &tokens, seq_len);
        assert!(rel(direct, reference) < 1e-5, "{direct} vs {reference}");
        // Cached base answer.
        assert_eq!(ev.loss(&base).unwrap(), direct);

        for w in [0, 3, 6, 7, 10, 13] {
            let fast = ev.loss_plus_one(&base, w).unwrap();
            let mut plus = base.clone();
            plus[w] += 1;
            // A fresh evaluator restores and runs everything from scratch.
            let mut fresh =
                LlamaStackEvaluator::new(&res, stacks.clone(), tokens.clone(), seq_len).unwrap();
            let slow = fresh.loss(&plus).unwrap();
            assert!(rel(fast, slow) < 1e-5, "weight {w}: {fast} vs {slow}");
            let reference = reference_loss(&res, &stacks, &plus, &tokens, seq_len);
            assert!(
                rel(fast, reference) < 1e-5,
                "weight {w}: {fast} vs {reference}"
            );
            // Through loss() against the same base: the same restoration, bitwise equal.
            assert_eq!(ev.loss(&plus).unwrap(), fast);
            assert_ne!(fast, direct, "the extra block must change the loss");
        }
        // The base never moved and the layer-1 evaluations started at layer 1.
        assert_eq!(ev.base_levels(), base.as_slice());
        assert_eq!(ev.stats().base_changes, 1);
    }

    #[test]
    fn plus_one_reruns_only_the_layers_from_the_weight_on() {
        let c = LlamaConfig {
            n_layers: 3,
            ..tiny_config()
        };
        let res = LlamaResident::random(&c, 4).unwrap();
        let (stacks, _) = decomposed(&c, 2, 5);
        let tokens = scoring_tokens(&c, 32, 6);
        let mut ev = LlamaStackEvaluator::new(&res, stacks, tokens, 16).unwrap();
        let base = vec![1u16; 21];
        ev.loss_plus_one(&base, weight_index(2, LinearKind::Up))
            .unwrap();
        // Cache fill: layers 0 and 1; evaluation: layer 2.
        assert_eq!(ev.stats().layers_run, 3);
        let before = ev.stats();
        ev.loss_plus_one(&base, weight_index(2, LinearKind::Q))
            .unwrap();
        let after = ev.stats();
        assert_eq!(after.layers_run - before.layers_run, 1);
        assert_eq!(after.blocks_restored - before.blocks_restored, 1);
        assert_eq!(after.base_changes, 1);
        ev.loss_plus_one(&base, weight_index(0, LinearKind::O))
            .unwrap();
        assert_eq!(ev.stats().layers_run - after.layers_run, 3);
        // A new base restores every weight and keeps only the embedding.
        ev.loss_plus_one(&[2u16; 21], 0).unwrap_err();
        let before = ev.stats();
        let mut next = base.clone();
        next[20] = 2;
        ev.loss_plus_one(&next, weight_index(2, LinearKind::Gate))
            .unwrap();
        let after = ev.stats();
        assert_eq!(after.base_changes, 2);
        // Only weight 20 (layer 2) changed: the cached inputs of layers 0..=2 survive.
        assert_eq!(after.layers_run - before.layers_run, 1);
    }

    #[test]
    fn more_levels_lower_the_loss() {
        let c = tiny_config();
        let res = LlamaResident::random(&c, 7).unwrap();
        let (stacks, dense) = decomposed(&c, 6, 8);
        let seq_len = 32;
        let tokens = scoring_tokens(&c, 2 * seq_len, 9);
        let mut ev = LlamaStackEvaluator::new(&res, stacks, tokens.clone(), seq_len).unwrap();
        let one = ev.loss(&[1; 14]).unwrap();
        let all = ev.loss(&[6; 14]).unwrap();
        let layers = dense
            .chunks(7)
            .map(|ws| {
                let ops: Vec<Box<dyn LinearOp>> = ws
                    .iter()
                    .zip(LinearKind::ALL)
                    .map(|(w, k)| {
                        let (r, cc) = k.shape(&c);
                        Box::new(DenseLinear::new(r, cc, w.clone()).unwrap()) as Box<dyn LinearOp>
                    })
                    .collect();
                ops.try_into().ok().unwrap()
            })
            .collect();
        let table = LinearTable::new(layers);
        let model = Llama::new(&res, &table).unwrap();
        let nll = model.sequence_nll(&tokens, seq_len).unwrap();
        let original = nll.iter().map(|&v| f64::from(v)).sum::<f64>() / nll.len() as f64;
        assert!(all < one, "all levels {all} vs one level {one}");
        assert!(
            (all - original).abs() < (one - original).abs(),
            "all {all}, one {one}, original {original}"
        );
    }

    #[test]
    fn first_order_scores_are_directional_derivatives_along_blocks() {
        use bitstack_sort::FirstOrderEvaluator;
        let c = tiny_config();
        let res = LlamaResident::random(&c, 11).unwrap();
        let (stacks, _) = decomposed(&c, 4, 12);
        let seq_len = 16;
        let tokens = scoring_tokens(&c, 2 * seq_len, 13);
        let mut ev =
            LlamaStackEvaluator::new(&res, stacks.clone(), tokens.clone(), seq_len).unwrap();
        let base = [2u16; 14];
        let scores = ev.first_order(&base, 2..4).unwrap();
        // The loss of the base with weight `w` moved by `t · B_{w,l}`.
        let loss_along = |w: usize, l: usize, t: f32| {
            let linear = |i: usize| -> Box<dyn LinearOp> {
                let s = &stacks[i];
                let (rows, cols) = (s.out_features(), s.in_features());
                let mut m = vec![0f32; rows * cols];
                s.restore_into(2, &mut m).unwrap();
                if i == w {
                    let mut b = vec![0f32; rows * cols];
                    let block = [s.blocks()[l].view()];
                    kernels::restore_into(&block, rows, cols, s.inv_scale(), &mut b).unwrap();
                    m.iter_mut().zip(&b).for_each(|(x, &y)| *x += t * y);
                }
                Box::new(DenseLinear::new(rows, cols, m).unwrap())
            };
            let nll = nll_with(&res, linear, &tokens, seq_len);
            nll.iter().map(|&v| f64::from(v)).sum::<f64>() / nll.len() as f64
        };
        for w in [0, 4, 8, 13] {
            assert_eq!(scores[w][..2], [None, None]);
            for (l, score) in scores[w].iter().enumerate().skip(2) {
                let fo = score.unwrap();
                let eps = 1e-2;
                let numeric =
                    (loss_along(w, l, eps) - loss_along(w, l, -eps)) / (2.0 * f64::from(eps));
                assert!(
                    (fo - numeric).abs() < 2e-2 * numeric.abs().max(1e-3),
                    "weight {w} block {l}: {fo} vs {numeric}"
                );
            }
        }
        // The first-order evaluator refuses losses it does not differentiate.
        ev.score_from_position(3).unwrap();
        assert!(ev.first_order(&base, 2..4).is_err());
    }

    #[test]
    fn skipped_positions_are_context_only() {
        let c = tiny_config();
        let res = LlamaResident::random(&c, 4).unwrap();
        let (stacks, _) = decomposed(&c, 3, 5);
        let (seq_len, skip) = (20, 8);
        let tokens = scoring_tokens(&c, 2 * seq_len, 6);
        let mut ev =
            LlamaStackEvaluator::new(&res, stacks.clone(), tokens.clone(), seq_len).unwrap();
        assert!(ev.score_from_position(seq_len - 1).is_err());
        ev.score_from_position(skip).unwrap();
        assert_eq!(ev.scored_tokens(), 2 * (seq_len - 1 - skip));
        let cfg: Vec<u16> = (0..14).map(|w| 1 + (w % 3) as u16).collect();
        let loss = ev.loss(&cfg).unwrap();
        // The mean NLL of the later positions of a plain forward pass over whole windows.
        let nll = reference_nll(&res, &stacks, &cfg, &tokens, seq_len);
        let later: Vec<f64> = nll
            .chunks(seq_len - 1)
            .flat_map(|s| s[skip..].iter().map(|&v| f64::from(v)))
            .collect();
        let expected = later.iter().sum::<f64>() / later.len() as f64;
        assert!(rel(loss, expected) < 1e-5, "{loss} vs {expected}");
        // The single-weight path scores the same positions.
        let mut plus = cfg.clone();
        plus[5] = 1;
        let cached = ev.loss(&plus).unwrap();
        let mut fresh = LlamaStackEvaluator::new(&res, stacks, tokens, seq_len).unwrap();
        fresh.score_from_position(skip).unwrap();
        assert!(rel(cached, fresh.loss(&plus).unwrap()) < 1e-5);
    }

    #[test]
    fn kl_loss_is_zero_at_the_reference_and_shrinks_with_levels() {
        let c = tiny_config();
        let res = LlamaResident::random(&c, 7).unwrap();
        let (stacks, _) = decomposed(&c, 6, 8);
        let seq_len = 32;
        let tokens = scoring_tokens(&c, 2 * seq_len, 9);
        let mut ev = LlamaStackEvaluator::new(&res, stacks, tokens, seq_len).unwrap();
        let ce_one = ev.loss(&[1; 14]).unwrap();
        ev.use_kl_reference(&[6; 14]).unwrap();
        let at_reference = ev.loss(&[6; 14]).unwrap();
        assert!(at_reference.abs() < 1e-5, "KL to itself {at_reference}");
        let one = ev.loss(&[1; 14]).unwrap();
        let three = ev.loss(&[3; 14]).unwrap();
        assert!(one > three && three > at_reference, "{one} {three}");
        assert_ne!(one, ce_one);
        // A single-weight override (the cached path) agrees with a moved base.
        let mut cfg = [6u16; 14];
        cfg[9] = 2;
        let cached = ev.loss(&cfg).unwrap();
        ev.set_base(&cfg).unwrap();
        let moved = ev.loss(&cfg).unwrap();
        assert!(
            (cached - moved).abs() < 1e-6 * moved.abs().max(1e-3),
            "{cached} vs {moved}"
        );
        assert!(cached > 0.0);
    }

    #[test]
    fn sorts_run_over_the_evaluator() {
        let c = tiny_config();
        let res = LlamaResident::random(&c, 10).unwrap();
        let (stacks, _) = decomposed(&c, 3, 11);
        let tokens = scoring_tokens(&c, 2 * 16, 12);
        let mut ev = LlamaStackEvaluator::new(&res, stacks, tokens, 16).unwrap();
        let outcome = sort_average(&mut ev, &SortConfig::default(), &mut NoObserver).unwrap();
        assert_eq!(outcome.evaluations, 14 * 2);
        // One base per scored level.
        assert_eq!(ev.stats().base_changes, 2);
        let order = outcome.order.as_slice();
        assert_eq!(order.len(), 14 * 3);
        let n_levels = vec![3u16; 14];
        bitstack_core::UniversalOrder::new(n_levels.clone(), order.to_vec()).unwrap();
        // Floor first, then level 1 before level 2.
        assert!(order[..14].iter().all(|b| b.level == 0));
        assert!(order[14..28].iter().all(|b| b.level == 1));
        assert!(order.iter().all(|b| (b.weight as usize) < 14));

        ev.prepare_greedy().unwrap();
        let before = ev.stats();
        let greedy = sort_greedy(&mut ev, &SortConfig::default(), &mut NoObserver).unwrap();
        assert_eq!(greedy.order.as_slice().len(), 14 * 3);
        // Every Greedy configuration was one weight away from the pinned base.
        assert_eq!(ev.stats().base_changes, before.base_changes);
    }

    #[test]
    fn rejects_bad_inputs() {
        let c = tiny_config();
        let res = LlamaResident::random(&c, 13).unwrap();
        let (stacks, _) = decomposed(&c, 2, 14);
        let tokens = scoring_tokens(&c, 32, 15);
        assert!(LlamaStackEvaluator::new(&res, stacks[..13].to_vec(), tokens.clone(), 16).is_err());
        let mut swapped = stacks.clone();
        swapped.swap(0, 4);
        assert!(matches!(
            LlamaStackEvaluator::new(&res, swapped, tokens.clone(), 16),
            Err(LlamaError::LinearShape { .. })
        ));
        assert!(LlamaStackEvaluator::new(&res, stacks.clone(), tokens.clone(), 15).is_err());
        assert!(LlamaStackEvaluator::new(&res, stacks.clone(), vec![64; 32], 16).is_err());
        let mut ev = LlamaStackEvaluator::new(&res, stacks, tokens, 16).unwrap();
        assert!(ev.loss(&[1; 13]).is_err());
        assert!(ev.loss(&[0; 14]).is_err());
        assert!(ev.loss(&[3; 14]).is_err());
        assert!(ev.loss_plus_one(&[2; 14], 0).is_err());
        assert!(ev.loss_plus_one(&[1; 14], 14).is_err());
    }

    /// Cost of one Average evaluation at SmolLM2-135M shapes (real resident weights, random
    /// 2-level stacks): `cargo test -p examples --lib sorting::tests::smollm2_cost -- --ignored
    /// --nocapture`. Prints the head-only and per-layer cost and the mean over all weights.
    #[test]
    #[ignore]
    fn smollm2_cost_estimate() {
        use bitstack_core::testutil::random_block;
        use std::time::Instant;
        let shared = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared");
        let path = format!("{shared}/models/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !std::path::Path::new(&path).exists() {
            println!("skipped: {path} not present");
            return;
        }
        let src = crate::gguf::open_model(&path).unwrap();
        let res = LlamaResident::from_source(src.as_ref()).unwrap();
        let c = res.config().clone();
        let levels = 2u16;
        let t0 = Instant::now();
        let stacks: Vec<WeightStack> = (0..c.n_layers * 7)
            .map(|w| {
                let (layer, kind) = weight_location(w);
                let (rows, cols) = kind.shape(&c);
                // Random factors give entries of std ~1.3 per level; divide that out.
                let s = 2.0 * (cols as f32).sqrt();
                let meta = Arc::new(StackMeta {
                    name: kind.tensor_name(layer),
                    rows,
                    cols,
                    rank: 16,
                    levels,
                    scale: Some(vec![s; cols]),
                    factors: bitstack_core::FactorDtype::F16,
                });
                let blocks = (0..levels)
                    .map(|l| Arc::new(random_block(rows, cols, 16, (w * 100 + l as usize) as u64)))
                    .collect();
                WeightStack::with_blocks(meta, blocks).unwrap()
            })
            .collect();
        println!("random stacks: {:.1}s", t0.elapsed().as_secs_f64());
        let seq_len = DEFAULT_SCORING_SEQ_LEN;
        let tokens: Vec<u32> = (0..DEFAULT_SCORING_SEQS * seq_len)
            .map(|i| (i as u32 * 7919) % c.vocab as u32)
            .collect();
        let mut ev = LlamaStackEvaluator::new(&res, stacks, tokens, seq_len).unwrap();
        let base = vec![1u16; ev.num_weights()];
        let t = Instant::now();
        ev.set_base(&base).unwrap();
        let t_base = t.elapsed().as_secs_f64();
        let last = weight_index(c.n_layers - 1, LinearKind::Down);
        // First call also fills the hidden-state cache (L - 1 layers).
        let t = Instant::now();
        let l0 = ev.loss_plus_one(&base, last).unwrap();
        let t_fill = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let l1 = ev.loss_plus_one(&base, last - 1).unwrap();
        let t_last = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let l2 = ev.loss_plus_one(&base, 0).unwrap();
        let t_first = t.elapsed().as_secs_f64();
        assert!(l0.is_finite() && l1.is_finite() && l2.is_finite());
        let layer = (t_first - t_last) / (c.n_layers - 1) as f64;
        let head = t_last - layer;
        let mean = head + layer * (c.n_layers + 1) as f64 / 2.0;
        println!(
            "{} layers, {} tokens: base restore at 1 level {t_base:.2}s; cache fill + 1 layer {t_fill:.2}s",
            c.n_layers,
            ev.seqs.n_tokens()
        );
        println!(
            "plus_one last layer {t_last:.2}s, first layer {t_first:.2}s => layer {layer:.3}s, head+NLL {head:.3}s, mean per call {mean:.2}s"
        );
        println!(
            "Average over 16 levels: {} calls ~ {:.1} h (+ {} base rebuilds)",
            ev.num_weights() * 15,
            mean * (ev.num_weights() * 15) as f64 / 3600.0,
            15
        );
    }
}
