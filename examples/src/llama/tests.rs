//! The forward pass against a plain one-token-at-a-time reference, the KV cache against the
//! full forward, sampling, loading, and a smoke test on the real model when it is present.

use std::collections::HashMap;
use std::sync::Mutex;

use bitstack_core::{DenseLinear, LinearOp};
use proptest::prelude::*;

use super::*;
use crate::gguf::{Architecture, ModelError, ModelSource};
use crate::tokenizer::Tokenizer;

fn config(n_heads: usize, n_kv_heads: usize, tied: bool, bias: bool) -> LlamaConfig {
    LlamaConfig {
        arch: Architecture::Llama,
        n_layers: 2,
        hidden: 24,
        ffn: 40,
        n_heads,
        n_kv_heads,
        head_dim: 8,
        vocab: 50,
        rope_theta: 10_000.0,
        rope_freq_factors: None,
        rms_eps: 1e-5,
        tied_embeddings: tied,
        attn_bias: bias,
        max_seq: 512,
        bos_id: None,
        eos_id: None,
    }
}

/// Dense linears from raw weights, per layer in [`LinearKind::ALL`] order.
fn dense_table(c: &LlamaConfig, w: &[[Vec<f32>; 7]]) -> LinearTable {
    LinearTable::new(
        w.iter()
            .map(|ws| {
                LinearKind::ALL.map(|k| {
                    let (o, i) = k.shape(c);
                    Box::new(DenseLinear::new(o, i, ws[k.index()].clone()).unwrap())
                        as Box<dyn LinearOp>
                })
            })
            .collect(),
    )
}

/// A random model whose raw weights the reference can read.
struct Fixture {
    res: LlamaResident,
    w: Vec<[Vec<f32>; 7]>,
    head: Option<Vec<f32>>,
    table: LinearTable,
}

fn fixture(c: &LlamaConfig, seed: u64) -> Fixture {
    let mut res = LlamaResident::random(c, seed).unwrap();
    let mut rng = SplitMix64::new(seed ^ 0xABCD);
    let w: Vec<[Vec<f32>; 7]> = (0..c.n_layers)
        .map(|_| {
            LinearKind::ALL.map(|k| {
                let (o, i) = k.shape(c);
                let amp = (3.0 / i as f32).sqrt();
                (0..o * i).map(|_| amp * rng.next_signed()).collect()
            })
        })
        .collect();
    let table = dense_table(c, &w);
    let head = (!c.tied_embeddings).then(|| {
        let h: Vec<f32> = (0..c.vocab * c.hidden)
            .map(|_| 0.5 * rng.next_signed())
            .collect();
        res.set_head(Box::new(
            DenseLinear::new(c.vocab, c.hidden, h.clone()).unwrap(),
        ))
        .unwrap();
        h
    });
    Fixture {
        res,
        w,
        head,
        table,
    }
}

fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
    w.chunks(x.len())
        .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn ref_rms(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * inv * g).collect()
}

/// Rotate-half RoPE of one head vector at position `p`, written from the formula.
fn ref_rope(v: &mut [f32], p: usize, c: &LlamaConfig) {
    let d = v.len();
    for i in 0..d / 2 {
        let f = c.rope_freq_factors.as_ref().map_or(1.0, |f| f[i] as f64);
        let ang = p as f64 * (c.rope_theta as f64).powf(-(2.0 * i as f64) / d as f64) / f;
        let (s, co) = (ang.sin() as f32, ang.cos() as f32);
        let (a, b) = (v[i], v[i + d / 2]);
        v[i] = a * co - b * s;
        v[i + d / 2] = b * co + a * s;
    }
}

/// Logits for every position of one sequence, computed plainly token by token.
fn reference_logits(f: &Fixture, c: &LlamaConfig, tokens: &[u32]) -> Vec<Vec<f32>> {
    let (h, d) = (c.hidden, c.head_dim);
    let mut xs: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&t| {
            let e = f.res.token_embd.as_f32().unwrap();
            e[t as usize * h..(t as usize + 1) * h].to_vec()
        })
        .collect();
    for (l, w) in f.w.iter().enumerate() {
        let blk = &f.res.blocks[l];
        let (mut qs, mut ks, mut vs) = (vec![], vec![], vec![]);
        for (p, x) in xs.iter().enumerate() {
            let xn = ref_rms(x, &blk.attn_norm, c.rms_eps);
            let mut q = matvec(&w[0], &xn);
            let mut k = matvec(&w[1], &xn);
            let mut v = matvec(&w[2], &xn);
            if let Some(b) = &blk.bias {
                q.iter_mut().zip(&b.q).for_each(|(a, b)| *a += b);
                k.iter_mut().zip(&b.k).for_each(|(a, b)| *a += b);
                v.iter_mut().zip(&b.v).for_each(|(a, b)| *a += b);
            }
            q.chunks_mut(d).for_each(|hv| ref_rope(hv, p, c));
            k.chunks_mut(d).for_each(|hv| ref_rope(hv, p, c));
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        for (t, x) in xs.iter_mut().enumerate() {
            let mut att = vec![0f32; c.n_heads * d];
            for hq in 0..c.n_heads {
                let hk = hq * c.n_kv_heads / c.n_heads;
                let qv = &qs[t][hq * d..(hq + 1) * d];
                let scores: Vec<f32> = (0..=t)
                    .map(|j| {
                        let kv = &ks[j][hk * d..(hk + 1) * d];
                        qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for i in 0..d {
                        att[hq * d + i] += ej / z * vs[j][hk * d + i];
                    }
                }
            }
            let o = matvec(&w[3], &att);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let xn = ref_rms(x, &blk.ffn_norm, c.rms_eps);
            let g = matvec(&w[4], &xn);
            let u = matvec(&w[5], &xn);
            let a: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let dn = matvec(&w[6], &a);
            x.iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
        }
    }
    let head = f
        .head
        .as_deref()
        .unwrap_or_else(|| f.res.token_embd.as_f32().unwrap());
    xs.iter()
        .map(|x| matvec(head, &ref_rms(x, &f.res.output_norm, c.rms_eps)))
        .collect()
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut r = SplitMix64::new(seed);
    (0..n)
        .map(|_| (r.next_u64() % vocab as u64) as u32)
        .collect()
}

fn check_against_reference(c: &LlamaConfig, seq_len: usize, n_seqs: usize) {
    let f = fixture(c, 7);
    let model = Llama::new(&f.res, &f.table).unwrap();
    let toks = tokens(seq_len * n_seqs, c.vocab, 3);
    let seqs = model.seq_batch(n_seqs, seq_len).unwrap();
    let hidden = model.forward_hidden(&toks, &seqs, None).unwrap();
    let logits = model.logits(&hidden).unwrap();
    for s in 0..n_seqs {
        let want = reference_logits(&f, c, &toks[s * seq_len..(s + 1) * seq_len]);
        for (p, w) in want.iter().enumerate() {
            let row = s * seq_len + p;
            let got = &logits[row * c.vocab..(row + 1) * c.vocab];
            assert_close(got, w, 2e-4, &format!("seq {s} pos {p} logits"));
        }
    }
}

#[test]
fn forward_matches_reference_gqa_tied() {
    check_against_reference(&config(6, 2, true, false), 9, 2);
}

#[test]
fn forward_matches_reference_mha_untied_with_bias() {
    check_against_reference(&config(3, 3, false, true), 7, 1);
}

#[test]
fn forward_matches_reference_mqa_rope_factors() {
    let mut c = config(4, 1, true, false);
    c.rope_freq_factors = Some(vec![1.0, 2.0, 4.0, 8.0]);
    c.rope_theta = 500.0;
    check_against_reference(&c, 6, 1);
}

#[test]
fn forward_matches_reference_across_attention_blocks() {
    // Longer than one attention task (128 query rows) so the causal block split is exercised.
    let mut c = config(2, 1, true, false);
    c.n_layers = 1;
    c.hidden = 16;
    check_against_reference(&c, 300, 1);
}

#[test]
fn token_nll_is_negative_log_softmax_over_chunks() {
    let mut c = config(2, 1, false, false);
    c.n_layers = 1;
    let f = fixture(&c, 11);
    let model = Llama::new(&f.res, &f.table).unwrap();
    // 300 rows: three logit chunks, the last one partial.
    let toks = tokens(301, c.vocab, 5);
    let nll = model.sequence_nll(&toks, 301).unwrap();
    assert_eq!(nll.len(), 300);
    let want = reference_logits(&f, &c, &toks);
    for (p, row) in want.iter().take(300).enumerate() {
        let m = row.iter().cloned().fold(f32::MIN, f32::max);
        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f32>().ln();
        let expect = lse - row[toks[p + 1] as usize];
        assert!(
            (nll[p] - expect).abs() < 1e-3,
            "pos {p}: {} vs {expect}",
            nll[p]
        );
    }
}

#[test]
fn kv_cache_decode_equals_full_forward() {
    for c in [config(6, 2, true, true), config(2, 2, false, false)] {
        let f = fixture(&c, 21);
        let model = Llama::new(&f.res, &f.table).unwrap();
        let toks = tokens(12, c.vocab, 9);
        let seqs = model.seq_batch(1, toks.len()).unwrap();
        let full = model
            .logits(&model.forward_hidden(&toks, &seqs, None).unwrap())
            .unwrap();
        let mut cache = model.new_cache(toks.len());
        // A 4-token prefill, a 3-token chunk, then single tokens.
        let mut pos = 0;
        for n in [4, 3, 1, 1, 1, 1, 1] {
            let got = model
                .forward_cached(&toks[pos..pos + n], &mut cache)
                .unwrap();
            pos += n;
            let want = &full[(pos - 1) * c.vocab..pos * c.vocab];
            assert_close(&got, want, 1e-4, &format!("decode after {pos} tokens"));
        }
        assert_eq!(cache.len(), 12);
        assert!(matches!(
            model.forward_cached(&toks[..1], &mut cache),
            Err(LlamaError::CacheFull {
                needed: 13,
                capacity: 12
            })
        ));
        // Rewinding reuses the prefix.
        cache.truncate(5);
        let again = model.forward_cached(&toks[5..6], &mut cache).unwrap();
        assert_close(
            &again,
            &full[5 * c.vocab..6 * c.vocab],
            1e-4,
            "after truncate",
        );
    }
}

#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<(usize, LinearKind, usize, f32)>>,
}

impl ActivationObserver for Recorder {
    fn observe(&self, layer: usize, kind: LinearKind, x: &[f32]) {
        let s = x.iter().map(|v| v.abs()).sum();
        self.calls.lock().unwrap().push((layer, kind, x.len(), s));
    }
}

#[test]
fn layer_by_layer_equals_full_forward_and_observer_sees_every_linear() {
    let c = config(6, 2, true, false);
    let f = fixture(&c, 31);
    let model = Llama::new(&f.res, &f.table).unwrap();
    let toks = tokens(10, c.vocab, 1);
    let seqs = model.seq_batch(2, 5).unwrap();
    let rec = Recorder::default();
    let full = model.forward_hidden(&toks, &seqs, Some(&rec)).unwrap();
    let mut x = model.embed(&toks).unwrap();
    for l in 0..c.n_layers {
        x = model.layer_forward(l, &x, &seqs, None).unwrap();
    }
    assert_eq!(x, full);

    let calls = rec.calls.into_inner().unwrap();
    assert_eq!(calls.len(), 7 * c.n_layers);
    for (i, &(layer, kind, len, _)) in calls.iter().enumerate() {
        assert_eq!((layer, kind), (i / 7, LinearKind::ALL[i % 7]));
        assert_eq!(len, 10 * kind.shape(&c).1, "{kind:?} input size");
    }
    // Q/K/V share one input, as do Gate/Up.
    assert_eq!(calls[0].3, calls[1].3);
    assert_eq!(calls[0].3, calls[2].3);
    assert_eq!(calls[4].3, calls[5].3);
}

#[test]
fn typed_errors_on_bad_input() {
    let c = config(6, 2, true, false);
    let f = fixture(&c, 41);
    let model = Llama::new(&f.res, &f.table).unwrap();
    assert!(matches!(
        model.embed(&[1, 50]),
        Err(LlamaError::TokenOutOfRange {
            token: 50,
            vocab: 50
        })
    ));
    let seqs = model.seq_batch(1, 3).unwrap();
    let mut h = vec![0.5f32; 3 * c.hidden];
    assert!(matches!(
        model.layer_forward(2, &h, &seqs, None),
        Err(LlamaError::NoSuchLayer { layer: 2, .. })
    ));
    assert!(matches!(
        model.layer_forward(0, &h[1..], &seqs, None),
        Err(LlamaError::ShapeMismatch { .. })
    ));
    h[4] = f32::NAN;
    assert!(matches!(
        model.layer_forward(0, &h, &seqs, None),
        Err(LlamaError::NonFinite(_))
    ));
    assert!(model.sequence_nll(&[1, 2, 3], 2).is_err());
    assert!(model.sequence_nll(&[1, 2, 3], 1).is_err());
    assert!(model.seq_batch(0, 4).is_err());
    assert!(model.token_nll(&h[..c.hidden], &[99]).is_err());
    assert!(model
        .generate(&[], &GenerateParams::default(), &mut |_| {})
        .is_err());

    // A provider with too few layers, or a mis-shaped linear, is caught at construction.
    let short = LinearTable::random(
        &LlamaConfig {
            n_layers: 1,
            ..c.clone()
        },
        1,
    )
    .unwrap();
    assert!(matches!(
        Llama::new(&f.res, &short),
        Err(LlamaError::LinearShape { layer: 1, .. })
    ));
    let mut table = LinearTable::random(&c, 2).unwrap();
    let bad = Box::new(DenseLinear::new(3, c.hidden, vec![0.0; 3 * c.hidden]).unwrap());
    assert!(matches!(
        table.replace(0, LinearKind::K, bad),
        Err(LlamaError::LinearShape { .. })
    ));
    let good = Box::new(DenseLinear::new(16, c.hidden, vec![0.0; 16 * c.hidden]).unwrap());
    assert!(table.replace(1, LinearKind::K, good).is_ok());
    assert!(matches!(
        table.replace(
            2,
            LinearKind::K,
            Box::new(DenseLinear::new(1, 1, vec![0.0]).unwrap())
        ),
        Err(LlamaError::NoSuchLayer { .. })
    ));
    let mut res = LlamaResident::random(&c, 3).unwrap();
    assert!(res
        .set_head(Box::new(
            DenseLinear::new(c.vocab, 3, vec![0.0; 3 * c.vocab]).unwrap()
        ))
        .is_err());
}

#[test]
fn swapping_a_linear_changes_only_what_follows() {
    let c = config(6, 2, true, false);
    let f = fixture(&c, 51);
    let toks = tokens(8, c.vocab, 2);
    let mut table = LinearTable::new(
        f.w.iter()
            .map(|ws| {
                LinearKind::ALL.map(|k| {
                    let (o, i) = k.shape(&c);
                    Box::new(DenseLinear::new(o, i, ws[k.index()].clone()).unwrap())
                        as Box<dyn LinearOp>
                })
            })
            .collect(),
    );
    let before = {
        let m = Llama::new(&f.res, &table).unwrap();
        let seqs = m.seq_batch(1, 8).unwrap();
        let x0 = m.embed(&toks).unwrap();
        let x1 = m.layer_forward(0, &x0, &seqs, None).unwrap();
        (x1.clone(), m.layer_forward(1, &x1, &seqs, None).unwrap())
    };
    let (o, i) = LinearKind::Down.shape(&c);
    table
        .replace(
            1,
            LinearKind::Down,
            Box::new(DenseLinear::new(o, i, vec![0.0; o * i]).unwrap()),
        )
        .unwrap();
    let m = Llama::new(&f.res, &table).unwrap();
    let seqs = m.seq_batch(1, 8).unwrap();
    let x1 = m
        .layer_forward(0, &m.embed(&toks).unwrap(), &seqs, None)
        .unwrap();
    assert_eq!(x1, before.0, "layer 0 does not depend on layer 1's weights");
    assert_ne!(m.layer_forward(1, &x1, &seqs, None).unwrap(), before.1);
}

#[test]
fn greedy_generation_follows_argmax_and_is_deterministic_when_sampled() {
    let c = config(6, 2, true, false);
    let f = fixture(&c, 61);
    let model = Llama::new(&f.res, &f.table).unwrap();
    let prompt = tokens(4, c.vocab, 4);
    let mut seen = vec![];
    let params = GenerateParams {
        max_new_tokens: 6,
        ..Default::default()
    };
    let g = model
        .generate(&prompt, &params, &mut |t| seen.push(t))
        .unwrap();
    assert_eq!(g.tokens, seen);
    // Each greedy token is the argmax of a full (cache-free) forward over everything before it.
    let mut all = prompt.clone();
    for &t in &g.tokens {
        let seqs = model.seq_batch(1, all.len()).unwrap();
        let x = model.forward_hidden(&all, &seqs, None).unwrap();
        let lg = model.logits(&x[(all.len() - 1) * c.hidden..]).unwrap();
        let best = (0..c.vocab)
            .max_by(|&a, &b| lg[a].total_cmp(&lg[b]))
            .unwrap();
        assert_eq!(t as usize, best);
        all.push(t);
    }

    let sampled = GenerateParams {
        max_new_tokens: 8,
        sampling: Sampling::TopP {
            temperature: 1.5,
            top_p: 0.95,
        },
        seed: 5,
        stop_tokens: vec![],
    };
    let a = model.generate(&prompt, &sampled, &mut |_| {}).unwrap();
    let b = model.generate(&prompt, &sampled, &mut |_| {}).unwrap();
    assert_eq!(a.tokens, b.tokens);
    let stop = GenerateParams {
        stop_tokens: vec![g.tokens[1]],
        ..params
    };
    let s = model.generate(&prompt, &stop, &mut |_| {}).unwrap();
    assert!(s.stopped);
    let first = g.tokens.iter().position(|&t| t == g.tokens[1]).unwrap();
    assert_eq!(s.tokens, g.tokens[..=first]);
}

#[test]
fn top_p_sampling_frequencies() {
    // Probabilities 0.5, 0.3, 0.2 (as logits): top_p 0.7 keeps the first two, renormalised.
    let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
    let mut rng = SplitMix64::new(1);
    let s = Sampling::TopP {
        temperature: 1.0,
        top_p: 0.7,
    };
    let mut counts = [0usize; 3];
    for _ in 0..20_000 {
        counts[sample(&logits, s, &mut rng).unwrap() as usize] += 1;
    }
    assert_eq!(counts[2], 0);
    let f0 = counts[0] as f64 / 20_000.0;
    assert!((f0 - 0.625).abs() < 0.02, "{f0}");
    assert_eq!(sample(&logits, Sampling::Greedy, &mut rng).unwrap(), 0);
    assert!(sample(&[0.0, f32::NAN], Sampling::Greedy, &mut rng).is_err());
    assert!(sample(
        &logits,
        Sampling::TopP {
            temperature: 0.0,
            top_p: 0.5
        },
        &mut rng
    )
    .is_err());
    assert!(sample(
        &logits,
        Sampling::TopP {
            temperature: 1.0,
            top_p: 1.5
        },
        &mut rng
    )
    .is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Sampled tokens always come from the nucleus: the smallest top set reaching `top_p`.
    #[test]
    fn sampled_token_is_in_nucleus(
        logits in prop::collection::vec(-5.0f32..5.0, 2..40),
        top_p in 0.05f32..1.0,
        temperature in 0.2f32..3.0,
        seed in any::<u64>(),
    ) {
        let mut rng = SplitMix64::new(seed);
        let t = sample(&logits, Sampling::TopP { temperature, top_p }, &mut rng).unwrap() as usize;
        let p: Vec<f64> = logits.iter().map(|&l| (l as f64 / temperature as f64).exp()).collect();
        let z: f64 = p.iter().sum();
        // Mass strictly above the sampled token's probability must not already reach top_p.
        let above: f64 = p.iter().filter(|&&q| q > p[t]).sum::<f64>() / z;
        prop_assert!(above < top_p as f64 + 1e-9);
    }

    /// RoPE is a rotation: attention scores depend only on the distance between positions.
    #[test]
    fn rope_scores_depend_on_relative_position(
        q in prop::collection::vec(-1.0f32..1.0, 8),
        k in prop::collection::vec(-1.0f32..1.0, 8),
        p in 0usize..200,
        delta in 0usize..50,
        shift in 1usize..100,
    ) {
        let mut c = config(1, 1, true, false);
        c.head_dim = 8;
        let score = |pq: usize, pk: usize| {
            let batch = SeqBatch::new(&c, 1, pq.max(pk) + 1).unwrap();
            let mut qq = q.clone();
            let mut kk = k.clone();
            let qrow = qq.len() * pq;
            let krow = kk.len() * pk;
            let mut qa = vec![0f32; qrow];
            qa.append(&mut qq);
            let mut ka = vec![0f32; krow];
            ka.append(&mut kk);
            qa.resize(8 * (pq.max(pk) + 1), 0.0);
            ka.resize(8 * (pq.max(pk) + 1), 0.0);
            super::forward::test_rope(&mut qa, 1, 8, &batch);
            super::forward::test_rope(&mut ka, 1, 8, &batch);
            qa[qrow..qrow + 8].iter().zip(&ka[krow..krow + 8]).map(|(a, b)| a * b).sum::<f32>()
        };
        let a = score(p + delta, p);
        let b = score(p + delta + shift, p + shift);
        prop_assert!((a - b).abs() < 1e-4 * (1.0 + a.abs()), "{} vs {}", a, b);
    }
}

/// A [`ModelSource`] over in-memory tensors.
struct MapSource {
    config: LlamaConfig,
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl ModelSource for MapSource {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }
    fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| ModelError::MissingTensor(name.into()))
    }
    fn has_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn tokenizer(&self) -> Result<Tokenizer, ModelError> {
        Err(ModelError::Unsupported(
            "no tokenizer in a test source".into(),
        ))
    }
}

#[test]
fn loads_from_a_model_source_by_canonical_names() {
    let c = config(6, 2, false, true);
    let f = fixture(&c, 71);
    let mut t = HashMap::new();
    t.insert(
        "token_embd.weight".to_owned(),
        (
            vec![c.vocab, c.hidden],
            f.res.token_embd.as_f32().unwrap().to_vec(),
        ),
    );
    t.insert(
        "output_norm.weight".to_owned(),
        (vec![c.hidden], f.res.output_norm.clone()),
    );
    t.insert(
        "output.weight".to_owned(),
        (vec![c.vocab, c.hidden], f.head.clone().unwrap()),
    );
    for (l, b) in f.res.blocks.iter().enumerate() {
        t.insert(
            format!("blk.{l}.attn_norm.weight"),
            (vec![c.hidden], b.attn_norm.clone()),
        );
        t.insert(
            format!("blk.{l}.ffn_norm.weight"),
            (vec![c.hidden], b.ffn_norm.clone()),
        );
        let bias = b.bias.as_ref().unwrap();
        t.insert(
            format!("blk.{l}.attn_q.bias"),
            (vec![bias.q.len()], bias.q.clone()),
        );
        t.insert(
            format!("blk.{l}.attn_k.bias"),
            (vec![bias.k.len()], bias.k.clone()),
        );
        t.insert(
            format!("blk.{l}.attn_v.bias"),
            (vec![bias.v.len()], bias.v.clone()),
        );
        for k in LinearKind::ALL {
            let (o, i) = k.shape(&c);
            t.insert(k.tensor_name(l), (vec![o, i], f.w[l][k.index()].clone()));
        }
    }
    assert_eq!(LinearKind::Down.tensor_name(1), "blk.1.ffn_down.weight");
    let mut src = MapSource {
        config: c.clone(),
        tensors: t,
    };
    let res = LlamaResident::from_source(&src).unwrap();
    let table = LinearTable::dense_from_source(&src).unwrap();
    let toks = tokens(6, c.vocab, 8);
    let a = Llama::new(&res, &table)
        .unwrap()
        .sequence_nll(&toks, 6)
        .unwrap();
    let b = Llama::new(&f.res, &f.table)
        .unwrap()
        .sequence_nll(&toks, 6)
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(res.param_count(), f.res.param_count());

    // Loading straight to f16 stores the embedding and the untied head at half the bytes and
    // matches converting after loading.
    let half = LlamaResident::from_source_with(&src, EmbeddingPrecision::F16).unwrap();
    assert_eq!(half.token_embd().precision(), EmbeddingPrecision::F16);
    assert_eq!(
        half.head().unwrap().weight_bytes(),
        (c.vocab * c.hidden * 2) as u64
    );
    assert_eq!(
        half.token_embd().as_f16(),
        LlamaResident::from_source(&src)
            .unwrap()
            .into_f16_embeddings()
            .token_embd()
            .as_f16()
    );
    let hn = Llama::new(&half, &table)
        .unwrap()
        .sequence_nll(&toks, 6)
        .unwrap();
    assert_close(&hn, &b, 2e-2, "f16 nll");

    // Loading straight to q4 holds the embedding and the untied head as 4-bit codes with f16
    // scales (the contract's byte count) and stays near the f32 NLL.
    let q4 = LlamaResident::from_source_with(&src, EmbeddingPrecision::Q4).unwrap();
    let q4_matrix = bitstack_core::kernels::q4::Q4Matrix::bytes_for(c.vocab, c.hidden);
    assert_eq!(q4.token_embd().precision(), EmbeddingPrecision::Q4);
    assert_eq!(q4.token_embd().bytes(), q4_matrix);
    assert_eq!(q4.head().unwrap().weight_bytes(), q4_matrix);
    let q4n = Llama::new(&q4, &table)
        .unwrap()
        .sequence_nll(&toks, 6)
        .unwrap();
    assert_close(&q4n, &b, 0.15, "q4 nll");
    let mut y = vec![0f32; c.vocab];
    assert!(q4.head().unwrap().forward(&[0.0; 3], &mut y).is_err());

    let w = src.tensors.get_mut("blk.1.ffn_up.weight").unwrap();
    w.1[3] = f32::INFINITY;
    assert!(matches!(
        LinearTable::dense_from_source(&src),
        Err(LlamaError::NonFinite(n)) if n == "blk.1.ffn_up.weight"
    ));
    src.tensors.insert(
        "output_norm.weight".into(),
        (vec![c.hidden + 1], vec![1.0; c.hidden + 1]),
    );
    assert!(matches!(
        LlamaResident::from_source(&src),
        Err(LlamaError::TensorShape { .. })
    ));
    src.tensors.remove("blk.0.attn_k.bias");
    assert!(LlamaResident::from_source(&src).is_err());
}

#[test]
fn real_model_short_text_perplexity_is_sane() {
    let shared = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared");
    let model_path = format!("{shared}/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let text_path = format!("{shared}/data/wikitext2-test.raw");
    if !std::path::Path::new(&model_path).exists() || !std::path::Path::new(&text_path).exists() {
        println!("skipped: {model_path} or {text_path} not present");
        return;
    }
    let src = crate::gguf::open_model(&model_path).unwrap();
    let res = LlamaResident::from_source(src.as_ref()).unwrap();
    let table = LinearTable::dense_from_source(src.as_ref()).unwrap();
    let model = Llama::new(&res, &table).unwrap();
    let text = std::fs::read_to_string(&text_path).unwrap();
    let tok = src.tokenizer().unwrap();
    let ids = tok.encode(&text[..4000], false).unwrap();
    let ids = &ids[..512];
    let nll = model.sequence_nll(ids, 256).unwrap();
    let ppl = (nll.iter().map(|&v| v as f64).sum::<f64>() / nll.len() as f64).exp();
    println!("SmolLM2 short-text perplexity (2 x 256 tokens): {ppl:.3}");
    assert!(ppl.is_finite() && ppl > 2.0 && ppl < 100.0, "ppl {ppl}");

    // The f16 embedding (as a stack file stores it) holds half the bytes and barely moves the
    // perplexity.
    let c = res.config();
    let res16 = LlamaResident::from_source_with(src.as_ref(), EmbeddingPrecision::F16).unwrap();
    assert_eq!(
        res.held_bytes() - res16.held_bytes(),
        (c.vocab * c.hidden * 2) as u64
    );
    let nll16 = Llama::new(&res16, &table)
        .unwrap()
        .sequence_nll(ids, 256)
        .unwrap();
    let ppl16 = (nll16.iter().map(|&v| v as f64).sum::<f64>() / nll16.len() as f64).exp();
    println!(
        "with an f16 embedding: {ppl16:.3} ({:.1} MB resident instead of {:.1} MB)",
        res16.held_bytes() as f64 / 1e6,
        res.held_bytes() as f64 / 1e6
    );
    assert!((ppl16 / ppl - 1.0).abs() < 0.01, "f16 ppl {ppl16} vs {ppl}");

    // Greedy generation through the KV cache agrees with the batched forward on real weights.
    let g = model
        .generate(
            &ids[..16],
            &GenerateParams {
                max_new_tokens: 3,
                ..Default::default()
            },
            &mut |_| {},
        )
        .unwrap();
    let mut all = ids[..16].to_vec();
    all.extend(&g.tokens[..2]);
    let seqs = model.seq_batch(1, all.len()).unwrap();
    let x = model.forward_hidden(&all, &seqs, None).unwrap();
    let lg = model
        .logits(&x[(all.len() - 1) * res.config().hidden..])
        .unwrap();
    let best = (0..lg.len())
        .max_by(|&a, &b| lg[a].total_cmp(&lg[b]))
        .unwrap();
    assert_eq!(g.tokens[2] as usize, best);
}

/// f16 and f32 embeddings (tied and untied heads) give nearly the same logits, and
/// `held_bytes` counts exactly the tensors held.
#[test]
fn f16_embeddings_match_f32_and_halve_the_bytes() {
    for (tied, bias) in [(true, false), (false, true)] {
        let mut c = config(6, 2, tied, bias);
        // More vocabulary rows than one f16 chunk, with a partial last chunk.
        c.vocab = 2048 + 77;
        let f32res = LlamaResident::random(&c, 91).unwrap();
        let table = LinearTable::random(&c, 92).unwrap();
        let mut f16res = LlamaResident::random(&c, 91).unwrap().into_f16_embeddings();
        if !tied {
            let w = f32res.head().unwrap();
            let mut dense = vec![0f32; c.vocab * c.hidden];
            // Recover the dense head by multiplying with the identity.
            let mut eye = vec![0f32; c.hidden * c.hidden];
            (0..c.hidden).for_each(|i| eye[i * c.hidden + i] = 1.0);
            let mut cols = vec![0f32; c.hidden * c.vocab];
            w.forward(&eye, &mut cols).unwrap();
            for i in 0..c.hidden {
                for v in 0..c.vocab {
                    dense[v * c.hidden + i] = cols[i * c.vocab + v];
                }
            }
            let old = f16res
                .set_head(Box::new(
                    HalfLinear::from_f32(c.vocab, c.hidden, &dense).unwrap(),
                ))
                .unwrap();
            assert_eq!(old.unwrap().weight_bytes(), (c.vocab * c.hidden * 4) as u64);
        }
        assert_eq!(f16res.token_embd().precision(), EmbeddingPrecision::F16);
        assert_eq!(f32res.token_embd().precision(), EmbeddingPrecision::F32);

        let toks = tokens(12, c.vocab, 5);
        let run = |res: &LlamaResident| {
            let m = Llama::new(res, &table).unwrap();
            let seqs = m.seq_batch(1, toks.len()).unwrap();
            let x = m.forward_hidden(&toks, &seqs, None).unwrap();
            (m.logits(&x).unwrap(), m.sequence_nll(&toks, 6).unwrap())
        };
        let (l32, n32) = run(&f32res);
        let (l16, n16) = run(&f16res);
        assert_close(&l16, &l32, 1e-2, "f16 logits");
        assert_close(&n16, &n32, 1e-2, "f16 nll");

        let (v, h, l) = (c.vocab as u64, c.hidden as u64, c.n_layers as u64);
        let q = (c.n_heads * c.head_dim) as u64;
        let kv = (c.n_kv_heads * c.head_dim) as u64;
        let norms_biases = 4 * (h + l * 2 * h + if bias { l * (q + 2 * kv) } else { 0 });
        let head32 = if tied { 0 } else { 4 * v * h };
        let head16 = if tied { 0 } else { 2 * v * h };
        assert_eq!(f32res.held_bytes(), 4 * v * h + norms_biases + head32);
        assert_eq!(f16res.held_bytes(), 2 * v * h + norms_biases + head16);
        assert_eq!(f16res.param_count(), f32res.param_count());

        // Round-tripping back to f32 is exact on the already-rounded values.
        let back = f16res.with_embedding_precision(EmbeddingPrecision::F32);
        assert_eq!(back.token_embd().bytes(), 4 * v * h);

        // q8 embedding (int8 + f16 scale per 32): close to f32 logits, 8.5 bits per value.
        let q8res = LlamaResident::random(&c, 91)
            .unwrap()
            .with_embedding_precision(EmbeddingPrecision::Q8);
        assert_eq!(q8res.token_embd().precision(), EmbeddingPrecision::Q8);
        let groups = (h as usize).div_ceil(32) as u64;
        assert_eq!(q8res.token_embd().bytes(), v * h + 2 * v * groups);
        let (l8, n8) = run(&q8res);
        // Relative (Frobenius) error: int8 rounding is ~0.2 % of each group's largest value.
        let rel = |a: &[f32], b: &[f32]| {
            let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
            let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
            (num / den).sqrt()
        };
        assert!(rel(&l8, &l32) < 2e-2, "q8 logits: {}", rel(&l8, &l32));
        assert!(rel(&n8, &n32) < 2e-2, "q8 nll: {}", rel(&n8, &n32));

        // q4 embedding (4-bit codes + f16 scale per 32): 4.5 bits per value, held bytes
        // counted exactly, logits further from f32 than q8's but still close (a step of
        // |max| / 8 on uniform values is ~6 % of their RMS).
        let q4res = LlamaResident::random(&c, 91)
            .unwrap()
            .with_embedding_precision(EmbeddingPrecision::Q4);
        assert_eq!(q4res.token_embd().precision(), EmbeddingPrecision::Q4);
        let q4_bytes = v * h.div_ceil(2) + 2 * v * groups;
        assert_eq!(q4res.token_embd().bytes(), q4_bytes);
        assert_eq!(q4res.held_bytes(), q4_bytes + norms_biases + head32);
        let (l4, n4) = run(&q4res);
        let (e4, e8) = (rel(&l4, &l32), rel(&l8, &l32));
        assert!(e4 < 0.15, "q4 logits: {e4}");
        assert!(e4 > e8, "q4 logits ({e4}) closer than q8's ({e8})");
        assert!(rel(&n4, &n32) < 0.15, "q4 nll: {}", rel(&n4, &n32));
        // From f16 (a stack file's storage) the q4 codes are those of the widened values.
        let from16 = LlamaResident::random(&c, 91)
            .unwrap()
            .into_f16_embeddings()
            .with_embedding_precision(EmbeddingPrecision::Q4);
        let from32 = LlamaResident::random(&c, 91)
            .unwrap()
            .into_f16_embeddings()
            .with_embedding_precision(EmbeddingPrecision::F32)
            .with_embedding_precision(EmbeddingPrecision::Q4);
        assert_eq!(run(&from16), run(&from32));
        // And back to f16: the dequantized values, at f16's bytes.
        let back16 = q4res.with_embedding_precision(EmbeddingPrecision::F16);
        assert_eq!(back16.token_embd().bytes(), 2 * v * h);
    }
}

/// Mean NLL of whole windows with the given dense weights (the reference for the gradients).
fn mean_nll(
    c: &LlamaConfig,
    res: &LlamaResident,
    w: &[[Vec<f32>; 7]],
    tokens: &[u32],
    n: usize,
) -> f64 {
    let table = dense_table(c, w);
    let nll = Llama::new(res, &table)
        .unwrap()
        .sequence_nll(tokens, n)
        .unwrap();
    nll.iter().map(|&v| f64::from(v)).sum::<f64>() / nll.len() as f64
}

#[test]
fn weight_gradients_match_central_differences() {
    // Grouped-query attention (4 query heads over 2 KV heads), two windows: the Llama shape
    // (tied head, no biases) and the Qwen2 / Llama-3 shape (untied head, Q/K/V biases).
    for (tied, bias) in [(true, false), (false, true)] {
        check_gradients_against_central_differences(&config(4, 2, tied, bias));
    }
}

fn check_gradients_against_central_differences(c: &LlamaConfig) {
    let f = fixture(c, 21);
    let (n_seqs, n) = (2, 12);
    let mut rng = SplitMix64::new(5);
    let tokens: Vec<u32> = (0..n_seqs * n)
        .map(|_| (rng.next_u64() % c.vocab as u64) as u32)
        .collect();
    let seqs = SeqBatch::new(c, n_seqs, n).unwrap();
    let flat: Vec<&[f32]> =
        f.w.iter()
            .flat_map(|ws| ws.iter().map(|v| v.as_slice()))
            .collect();
    let g = weight_gradients(&f.res, &flat, &tokens, &seqs).unwrap();
    let base = mean_nll(c, &f.res, &f.w, &tokens, n);
    let shape = (c.tied_embeddings, c.attn_bias);
    assert!(
        (g.loss - base).abs() < 1e-4 * base,
        "{shape:?}: {} vs {base}",
        g.loss
    );
    for layer in 0..c.n_layers {
        for kind in LinearKind::ALL {
            let grad = &g.grads[layer * 7 + kind.index()];
            // A random direction: ⟨G, D⟩ against (L(W + εD) − L(W − εD)) / 2ε.
            let dir: Vec<f32> = (0..grad.len()).map(|_| rng.next_signed()).collect();
            let analytic: f64 = grad.iter().zip(&dir).map(|(&a, &b)| f64::from(a * b)).sum();
            let eps = 1e-2f32;
            let at = |s: f32| {
                let mut w = f.w.clone();
                w[layer][kind.index()]
                    .iter_mut()
                    .zip(&dir)
                    .for_each(|(x, &d)| *x += s * eps * d);
                mean_nll(c, &f.res, &w, &tokens, n)
            };
            let numeric = (at(1.0) - at(-1.0)) / (2.0 * f64::from(eps));
            assert!(
                (analytic - numeric).abs() < 2e-2 * numeric.abs().max(1e-2),
                "{shape:?} layer {layer} {kind:?}: analytic {analytic}, numeric {numeric}"
            );
        }
    }
}
