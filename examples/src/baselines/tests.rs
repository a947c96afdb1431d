use bitstack_core::testutil::XorShift;
use bitstack_core::{CoreError, DenseLinear, LinearOp};
use half::f16;
use proptest::prelude::*;

use super::*;

fn random_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = XorShift::new(seed);
    (0..n).map(|_| rng.next_f32() * scale).collect()
}

/// Activations with strongly correlated channels and very unequal magnitudes: `tokens × cols`
/// drawn from a `cols / 8`-dimensional latent space plus a little noise, a few outlier columns.
fn correlated_activations(tokens: usize, cols: usize, seed: u64) -> Vec<f32> {
    let k = (cols / 8).max(1);
    let z = random_vec(tokens * k, seed, 1.0);
    let m = random_vec(k * cols, seed + 1, 1.0);
    let noise = random_vec(tokens * cols, seed + 2, 0.05);
    let mut x = vec![0f32; tokens * cols];
    for t in 0..tokens {
        for j in 0..cols {
            let mut v = noise[t * cols + j];
            for l in 0..k {
                v += z[t * k + l] * m[l * cols + j];
            }
            let gain = if j % 37 == 0 {
                8.0
            } else {
                0.5 + (j % 5) as f32 * 0.3
            };
            x[t * cols + j] = v * gain;
        }
    }
    x
}

fn stats_of(x: &[f32], cols: usize) -> HessianAccumulator {
    let mut s = HessianAccumulator::new(cols).unwrap();
    // Two batches, so accumulation across calls is exercised.
    let half = (x.len() / cols / 2) * cols;
    s.observe(&x[..half]).unwrap();
    s.observe(&x[half..]).unwrap();
    s
}

/// Plain per-element RTN, written independently of the library: f32 arithmetic, no packing.
fn rtn_reference(w: &[f32], rows: usize, cols: usize, bits: u8, gl: usize) -> Vec<f32> {
    let maxq = ((1u32 << bits) - 1) as f32;
    let mut out = vec![0f32; w.len()];
    for r in 0..rows {
        let mut j0 = 0;
        while j0 < cols {
            let j1 = (j0 + gl).min(cols);
            let seg = &w[r * cols + j0..r * cols + j1];
            let mut lo = seg.iter().cloned().fold(0f32, f32::min);
            let mut hi = seg.iter().cloned().fold(0f32, f32::max);
            if lo == hi {
                lo = -1.0;
                hi = 1.0;
            }
            let step = f16::from_f32((hi - lo) / maxq).to_f32();
            let zero = (-lo / step).round_ties_even().clamp(0.0, maxq);
            for j in j0..j1 {
                let q = ((w[r * cols + j] / step).round_ties_even() + zero).clamp(0.0, maxq);
                out[r * cols + j] = step * (q - zero);
            }
            j0 = j1;
        }
    }
    out
}

fn configs() -> Vec<QuantConfig> {
    let mut v = Vec::new();
    for bits in SUPPORTED_BITS {
        for grouping in [Grouping::PerChannel, Grouping::Groups(128)] {
            v.push(QuantConfig { bits, grouping });
        }
    }
    v
}

proptest! {
    #[test]
    fn pack_round_trip(bits in prop::sample::select(SUPPORTED_BITS.to_vec()),
                       raw in prop::collection::vec(any::<u8>(), 0..300)) {
        let codes: Vec<u8> = raw.iter().map(|c| c & ((1u8 << bits) - 1)).collect();
        let words = pack_codes(&codes, bits).unwrap();
        prop_assert_eq!(words.len(), (codes.len() * bits as usize).div_ceil(32));
        prop_assert_eq!(unpack_codes(&words, bits, codes.len()).unwrap(), codes);
    }

    #[test]
    fn quantized_layer_round_trips_codes(bits in prop::sample::select(SUPPORTED_BITS.to_vec()),
                                          rows in 1usize..5, cols in 1usize..90, seed in any::<u64>()) {
        let mut rng = XorShift::new(seed);
        let codes: Vec<u8> = (0..rows * cols).map(|_| (rng.next_u64() % (1 << bits)) as u8).collect();
        let gl = cols.min(32);
        let g = cols.div_ceil(gl);
        let q = QuantizedLinear::from_codes(rows, cols, bits, gl, &codes,
            vec![f16::ONE; rows * g], vec![f16::ZERO; rows * g], None).unwrap();
        prop_assert_eq!(q.codes(), codes.clone());
        // scale 1, zero 0: dequantizing gives the codes back as floats.
        let expect: Vec<f32> = codes.iter().map(|&c| c as f32).collect();
        prop_assert_eq!(q.dequantize(), expect);
    }

    /// RTN's error never exceeds half a step (plus f16 rounding of the step), in any group.
    #[test]
    fn rtn_error_within_half_step(bits in prop::sample::select(SUPPORTED_BITS.to_vec()),
                                  seed in any::<u64>(), scale in 1e-3f32..1e3) {
        let (rows, cols) = (3, 70);
        let w = random_vec(rows * cols, seed, scale);
        let q = rtn(WeightView::new(&w, rows, cols).unwrap(),
                    &QuantConfig { bits, grouping: Grouping::Groups(32) }).unwrap();
        let d = q.dequantize();
        for r in 0..rows {
            for j in 0..cols {
                let step = q.scales()[r * 3 + j / 32].to_f32();
                let err = (w[r * cols + j] - d[r * cols + j]).abs();
                // f16 rounds the step by at most 2^-11 relative; codes span 2^bits steps.
                prop_assert!(err <= step * (0.5 + (1u32 << bits) as f32 / 2048.0) + 1e-6 * scale,
                             "err {} step {}", err, step);
            }
        }
    }
}

#[test]
fn pack_rejects_bad_input() {
    assert!(matches!(
        pack_codes(&[4], 2),
        Err(BaselineError::InvalidParameter { .. })
    ));
    assert!(matches!(
        pack_codes(&[1], 5),
        Err(BaselineError::InvalidParameter { .. })
    ));
    assert!(matches!(
        unpack_codes(&[0], 3, 20),
        Err(BaselineError::ShapeMismatch { .. })
    ));
}

#[test]
fn rtn_matches_plain_reference() {
    let (rows, cols) = (9, 300);
    let mut w = random_vec(rows * cols, 7, 0.2);
    // Row 1 all-positive, row 2 constant, row 3 all zero: the range must still include 0 and
    // the step must never be 0.
    for j in 0..cols {
        w[cols + j] = w[cols + j].abs() + 0.1;
        w[2 * cols + j] = 0.37;
        w[3 * cols + j] = 0.0;
    }
    for cfg in configs() {
        let q = rtn(WeightView::new(&w, rows, cols).unwrap(), &cfg).unwrap();
        let gl = cfg.group_len(cols).unwrap();
        let reference = rtn_reference(&w, rows, cols, cfg.bits, gl);
        let d = q.dequantize();
        for (i, (a, b)) in d.iter().zip(&reference).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                "{}: element {i}: {a} vs {b}",
                cfg.label()
            );
        }
        assert!(d.iter().all(|v| v.is_finite()));
        // A constant row is reproduced (its value lies on the grid up to f16 step rounding).
        let maxq = ((1u32 << cfg.bits) - 1) as f32;
        for j in 0..cols {
            assert!((d[2 * cols + j] - 0.37).abs() <= 0.37 / maxq);
            assert_eq!(d[3 * cols + j], 0.0);
        }
    }
}

#[test]
fn weight_bytes_count_codes_scales_and_zeros() {
    let (rows, cols) = (5, 300);
    let w = random_vec(rows * cols, 3, 1.0);
    let wv = WeightView::new(&w, rows, cols).unwrap();
    for cfg in configs() {
        let q = rtn(wv, &cfg).unwrap();
        let groups = match cfg.grouping {
            Grouping::PerChannel => 1,
            Grouping::Groups(g) => cols.div_ceil(g),
        };
        let words = (cols * cfg.bits as usize).div_ceil(32);
        let b = q.bytes();
        assert_eq!(b.codes, (rows * words * 4) as u64);
        assert_eq!(b.scales, (rows * groups * 2) as u64);
        assert_eq!(b.zeros, (rows * groups * 2) as u64);
        assert_eq!(b.input_scale, 0);
        assert_eq!(q.weight_bytes(), b.total());
    }
}

#[test]
fn forward_equals_dense_matmul_of_dequantized() {
    // 70 rows: more than one forward panel, the last one partial; 300 columns: a partial group.
    let (rows, cols, batch) = (70, 300, 5);
    let w = random_vec(rows * cols, 11, 0.5);
    let x = correlated_activations(batch, cols, 12);
    let wv = WeightView::new(&w, rows, cols).unwrap();
    let stats = stats_of(&correlated_activations(64, cols, 13), cols);
    let awq_cfg = AwqConfig {
        quant: QuantConfig {
            bits: 3,
            grouping: Grouping::Groups(128),
        },
        ..AwqConfig::default()
    };
    let layers = [
        rtn(wv, &QuantConfig::default()).unwrap(),
        awq(wv, &stats, &awq_cfg).unwrap().layer,
    ];
    for q in layers {
        let dense = DenseLinear::new(rows, cols, q.dequantize()).unwrap();
        let mut y = vec![0f32; batch * rows];
        let mut y_ref = vec![0f32; batch * rows];
        q.forward(&x, &mut y).unwrap();
        dense.forward(&x, &mut y_ref).unwrap();
        for (a, b) in y.iter().zip(&y_ref) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
        assert!(matches!(
            q.forward(&x[1..], &mut y),
            Err(CoreError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            q.forward(&x, &mut y[1..]),
            Err(CoreError::ShapeMismatch { .. })
        ));
    }
}

#[test]
fn hessian_output_error_equals_direct_error() {
    let (rows, cols, tokens) = (16, 64, 200);
    let w = random_vec(rows * cols, 21, 1.0);
    let x = correlated_activations(tokens, cols, 22);
    let wv = WeightView::new(&w, rows, cols).unwrap();
    let stats = stats_of(&x, cols);
    let q = rtn(
        wv,
        &QuantConfig {
            bits: 2,
            grouping: Grouping::PerChannel,
        },
    )
    .unwrap();
    let d = q.dequantize();
    let a = stats.output_error(wv, &d).unwrap();
    let b = output_error(&x, wv, &d).unwrap();
    assert!(a > 0.0);
    assert!((a - b).abs() <= 1e-9 * b, "{a} vs {b}");
}

fn errors_for(cfg: QuantConfig, seed: u64) -> (f64, f64, f64, f64) {
    let (rows, cols, tokens) = (48, 256, 512);
    let w = random_vec(rows * cols, seed, 1.0);
    let x = correlated_activations(tokens, cols, seed + 100);
    let wv = WeightView::new(&w, rows, cols).unwrap();
    let stats = stats_of(&x, cols);
    let err = |q: &QuantizedLinear| stats.output_error(wv, &q.dequantize()).unwrap();
    let e_rtn = err(&rtn(wv, &cfg).unwrap());
    let e_gptq = err(&gptq(
        wv,
        &stats,
        &GptqConfig {
            quant: cfg,
            ..GptqConfig::default()
        },
    )
    .unwrap());
    let e_gptq_act = err(&gptq(
        wv,
        &stats,
        &GptqConfig {
            quant: cfg,
            act_order: true,
            ..GptqConfig::default()
        },
    )
    .unwrap());
    let res = awq(
        wv,
        &stats,
        &AwqConfig {
            quant: cfg,
            ..AwqConfig::default()
        },
    )
    .unwrap();
    let e_awq = err(&res.layer);
    assert!((e_awq - res.error).abs() <= 1e-9 * e_awq.max(1e-30));
    (e_rtn, e_gptq, e_gptq_act, e_awq)
}

#[test]
fn gptq_and_awq_beat_rtn_on_correlated_calibration_data() {
    for (i, cfg) in configs().into_iter().enumerate() {
        let (rtn, gptq, gptq_act, awq) = errors_for(cfg, 40 + i as u64);
        eprintln!(
            "{}: rtn {rtn:.4e} gptq {gptq:.4e} ({:.3}x) gptq+act {gptq_act:.4e} awq {awq:.4e} ({:.3}x)",
            cfg.label(),
            gptq / rtn,
            awq / rtn
        );
        // GPTQ has to win by a clear margin, not by noise.
        assert!(gptq < 0.8 * rtn, "{}: gptq {gptq} rtn {rtn}", cfg.label());
        assert!(
            gptq_act < 0.8 * rtn,
            "{}: gptq act-order {gptq_act} rtn {rtn}",
            cfg.label()
        );
        assert!(awq <= rtn, "{}: awq {awq} rtn {rtn}", cfg.label());
    }
}

#[test]
fn awq_scales_protect_salient_channels() {
    // A few input channels carry activations 50x larger than the rest: scaling them up before
    // quantization is exactly what AWQ is for, so it must pick α > 0 and win clearly.
    let (rows, cols, tokens) = (32, 256, 256);
    let w = random_vec(rows * cols, 5, 1.0);
    let mut x = random_vec(tokens * cols, 6, 1.0);
    for t in 0..tokens {
        for j in (0..cols).step_by(16) {
            x[t * cols + j] *= 50.0;
        }
    }
    let wv = WeightView::new(&w, rows, cols).unwrap();
    let stats = stats_of(&x, cols);
    let quant = QuantConfig {
        bits: 3,
        grouping: Grouping::Groups(128),
    };
    let e_rtn = stats
        .output_error(wv, &rtn(wv, &quant).unwrap().dequantize())
        .unwrap();
    let res = awq(
        wv,
        &stats,
        &AwqConfig {
            quant,
            ..AwqConfig::default()
        },
    )
    .unwrap();
    assert!(res.alpha > 0.0);
    assert!(res.error < 0.7 * e_rtn, "awq {} rtn {e_rtn}", res.error);
    assert_eq!(res.layer.bytes().input_scale, (cols * 2) as u64);
}

#[test]
fn gptq_lazy_batches_are_exact() {
    // Lazy batching only reorders the error-feedback arithmetic; the block size must not
    // change the result beyond floating-point noise.
    let (rows, cols, tokens) = (8, 96, 300);
    let w = random_vec(rows * cols, 31, 1.0);
    let x = correlated_activations(tokens, cols, 32);
    let wv = WeightView::new(&w, rows, cols).unwrap();
    let stats = stats_of(&x, cols);
    let run = |block_size| {
        let q = gptq(
            wv,
            &stats,
            &GptqConfig {
                quant: QuantConfig {
                    bits: 3,
                    grouping: Grouping::Groups(32),
                },
                block_size,
                ..GptqConfig::default()
            },
        )
        .unwrap();
        (q.codes(), stats.output_error(wv, &q.dequantize()).unwrap())
    };
    let (c1, e1) = run(1);
    for bs in [7, 32, 128] {
        let (c, e) = run(bs);
        let same = c.iter().zip(&c1).filter(|(a, b)| a == b).count();
        assert!(
            same * 1000 >= c.len() * 998,
            "block {bs}: {same}/{}",
            c.len()
        );
        assert!((e - e1).abs() <= 1e-3 * e1, "block {bs}: {e} vs {e1}");
    }
}

#[test]
fn gptq_handles_dead_columns() {
    let (rows, cols, tokens) = (6, 40, 100);
    let w = random_vec(rows * cols, 51, 1.0);
    let mut x = correlated_activations(tokens, cols, 52);
    let dead = [0usize, 13, 39];
    for t in 0..tokens {
        for &j in &dead {
            x[t * cols + j] = 0.0;
        }
    }
    let wv = WeightView::new(&w, rows, cols).unwrap();
    let stats = stats_of(&x, cols);
    for act_order in [false, true] {
        let q = gptq(
            wv,
            &stats,
            &GptqConfig {
                quant: QuantConfig {
                    bits: 2,
                    grouping: Grouping::Groups(16),
                },
                act_order,
                ..GptqConfig::default()
            },
        )
        .unwrap();
        let d = q.dequantize();
        assert!(d.iter().all(|v| v.is_finite()));
        // As in the reference, weights of never-active inputs are zeroed.
        for r in 0..rows {
            for &j in &dead {
                assert_eq!(d[r * cols + j], 0.0);
            }
        }
    }
    // An all-zero Hessian (only zero activations) still quantizes.
    let mut zeros = HessianAccumulator::new(cols).unwrap();
    zeros.observe(&vec![0.0; 10 * cols]).unwrap();
    let q = gptq(wv, &zeros, &GptqConfig::default()).unwrap();
    assert!(q.dequantize().iter().all(|&v| v == 0.0));
    assert!(awq(wv, &zeros, &AwqConfig::default()).is_ok());
}

#[test]
fn non_finite_and_bad_shapes_are_typed_errors() {
    let (rows, cols) = (2, 8);
    let mut w = random_vec(rows * cols, 1, 1.0);
    w[3] = f32::NAN;
    assert!(matches!(
        WeightView::new(&w, rows, cols),
        Err(BaselineError::NonFinite(_))
    ));
    w[3] = f32::INFINITY;
    assert!(matches!(
        WeightView::new(&w, rows, cols),
        Err(BaselineError::NonFinite(_))
    ));
    assert!(matches!(
        WeightView::new(&w[1..], rows, cols),
        Err(BaselineError::ShapeMismatch { .. })
    ));
    assert!(WeightView::new(&[], 0, 4).is_err());

    let mut stats = HessianAccumulator::new(cols).unwrap();
    let mut x = vec![1.0f32; 3 * cols];
    x[5] = f32::NAN;
    assert!(matches!(
        stats.observe(&x),
        Err(BaselineError::NonFinite(_))
    ));
    assert!(matches!(
        stats.observe(&x[1..]),
        Err(BaselineError::ShapeMismatch { .. })
    ));
    assert_eq!(stats.tokens(), 0);

    let w = random_vec(rows * cols, 2, 1.0);
    let wv = WeightView::new(&w, rows, cols).unwrap();
    assert!(matches!(
        gptq(wv, &stats, &GptqConfig::default()),
        Err(BaselineError::NoCalibration)
    ));
    assert!(matches!(
        awq(wv, &stats, &AwqConfig::default()),
        Err(BaselineError::NoCalibration)
    ));
    let other = HessianAccumulator::new(cols + 1).unwrap();
    assert!(matches!(
        gptq(wv, &other, &GptqConfig::default()),
        Err(BaselineError::ShapeMismatch { .. })
    ));
    let bad_bits = QuantConfig {
        bits: 8,
        grouping: Grouping::PerChannel,
    };
    assert!(rtn(wv, &bad_bits).is_err());
    let bad_group = QuantConfig {
        bits: 4,
        grouping: Grouping::Groups(0),
    };
    assert!(rtn(wv, &bad_group).is_err());
    // Weights beyond f16's range cannot get a finite step.
    let huge = vec![1e9f32; rows * cols];
    assert!(matches!(
        rtn(
            WeightView::new(&huge, rows, cols).unwrap(),
            &QuantConfig::default()
        ),
        Err(BaselineError::ScaleOutOfRange { .. })
    ));
}

/// Wall time of each method on SmolLM2-135M's two linear shapes (576→1536 and 1536→576),
/// 2048 calibration tokens with correlated channels. Not a correctness test; run with
/// `cargo test -p examples --lib baselines::tests::timing_smollm_shapes -- --ignored --nocapture`.
#[test]
#[ignore = "timing report, not a correctness test"]
fn timing_smollm_shapes() {
    use std::time::Instant;
    for (rows, cols) in [(1536usize, 576usize), (576, 1536)] {
        let w = random_vec(rows * cols, 77, 0.05);
        let x = correlated_activations(2048, cols, 78);
        let wv = WeightView::new(&w, rows, cols).unwrap();
        let t = Instant::now();
        let stats = stats_of(&x, cols);
        let t_stats = t.elapsed().as_secs_f64();
        for cfg in [
            QuantConfig {
                bits: 3,
                grouping: Grouping::PerChannel,
            },
            QuantConfig {
                bits: 3,
                grouping: Grouping::Groups(128),
            },
        ] {
            let t = Instant::now();
            let q_rtn = rtn(wv, &cfg).unwrap();
            let t_rtn = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let q_gptq = gptq(
                wv,
                &stats,
                &GptqConfig {
                    quant: cfg,
                    ..GptqConfig::default()
                },
            )
            .unwrap();
            let t_gptq = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let res = awq(
                wv,
                &stats,
                &AwqConfig {
                    quant: cfg,
                    ..AwqConfig::default()
                },
            )
            .unwrap();
            let t_awq = t.elapsed().as_secs_f64();
            let mut y = vec![0f32; 2048 * rows];
            let t = Instant::now();
            q_gptq.forward(&x, &mut y).unwrap();
            let t_fwd = t.elapsed().as_secs_f64();
            let err = |d: &[f32]| stats.output_error(wv, d).unwrap();
            println!(
                "{rows}x{cols} {}: stats {t_stats:.3}s rtn {t_rtn:.3}s gptq {t_gptq:.3}s awq {t_awq:.3}s \
                 (alpha {:.2}, clipped {}) forward(2048 tok) {t_fwd:.3}s | rel. output error \
                 rtn 1 gptq {:.3} awq {:.3} | bytes {} ({:.3} bits/weight)",
                cfg.label(),
                res.alpha,
                res.clipped,
                err(&q_gptq.dequantize()) / err(&q_rtn.dequantize()),
                res.error / err(&q_rtn.dequantize()),
                q_rtn.weight_bytes(),
                q_rtn.weight_bytes() as f64 * 8.0 / (rows * cols) as f64,
            );
        }
    }
}

#[test]
fn baseline_dispatch_matches_direct_calls() {
    let (rows, cols) = (4, 64);
    let w = random_vec(rows * cols, 61, 1.0);
    let wv = WeightView::new(&w, rows, cols).unwrap();
    let stats = stats_of(&correlated_activations(80, cols, 62), cols);
    let quant = QuantConfig {
        bits: 2,
        grouping: Grouping::Groups(32),
    };
    for m in Baseline::ALL {
        let via = m.quantize(wv, Some(&stats), quant).unwrap();
        let direct = match m {
            Baseline::Rtn => rtn(wv, &quant).unwrap(),
            Baseline::Gptq | Baseline::GptqActOrder => gptq(
                wv,
                &stats,
                &GptqConfig {
                    quant,
                    act_order: m == Baseline::GptqActOrder,
                    ..GptqConfig::default()
                },
            )
            .unwrap(),
            Baseline::Awq => {
                awq(
                    wv,
                    &stats,
                    &AwqConfig {
                        quant,
                        ..AwqConfig::default()
                    },
                )
                .unwrap()
                .layer
            }
        };
        assert_eq!(via.dequantize(), direct.dequantize(), "{}", m.name());
        assert_eq!(m.needs_calibration(), m != Baseline::Rtn);
        if m.needs_calibration() {
            assert!(matches!(
                m.quantize(wv, None, quant),
                Err(BaselineError::NoCalibration)
            ));
        }
    }
}

/// Layer output errors on SmolLM2-135M's first attention projections with their real inputs
/// (`RMSNorm(embedding) · attn_norm` of WikiText-2 training text): 2048 calibration tokens,
/// and 2048 later tokens held out. Needs `../shared`; run with
/// `cargo test -p examples --release --lib baselines::tests::real_layer0_report -- --ignored --nocapture`.
#[test]
#[ignore = "measurement report on the shared model"]
fn real_layer0_report() {
    use crate::gguf::GgufFile;
    use crate::tokenizer::Tokenizer;
    let shared = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared");
    let model = format!("{shared}/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let text = format!("{shared}/data/wikitext2-train-head.txt");
    if !std::path::Path::new(&model).exists() || !std::path::Path::new(&text).exists() {
        println!("skipped: {model} or {text} is absent");
        return;
    }
    let file = GgufFile::open(&model).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let text = std::fs::read_to_string(&text).unwrap();
    let ids = tok.encode(&text[..60_000], false).unwrap();
    assert!(ids.len() >= 4096, "only {} tokens", ids.len());
    let (eshape, emb) = file.tensor_f32("token_embd.weight").unwrap();
    let hidden = eshape[1];
    let (_, norm) = file.tensor_f32("blk.0.attn_norm.weight").unwrap();
    let eps = 1e-5f32;
    let acts = |ids: &[u32]| -> Vec<f32> {
        let mut x = Vec::with_capacity(ids.len() * hidden);
        for &t in ids {
            let e = &emb[t as usize * hidden..(t as usize + 1) * hidden];
            let ms = e.iter().map(|v| v * v).sum::<f32>() / hidden as f32;
            let r = 1.0 / (ms + eps).sqrt();
            x.extend(e.iter().zip(&norm).map(|(v, g)| v * r * g));
        }
        x
    };
    let (x_cal, x_test) = (acts(&ids[..2048]), acts(&ids[2048..4096]));
    let mut stats = HessianAccumulator::new(hidden).unwrap();
    stats.observe(&x_cal).unwrap();
    let mut held_out = HessianAccumulator::new(hidden).unwrap();
    held_out.observe(&x_test).unwrap();
    println!("| layer | config | bits/w | RTN cal | GPTQ cal | GPTQ-act cal | AWQ cal | RTN test | GPTQ test | GPTQ-act test | AWQ test |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for name in ["attn_q", "attn_k", "attn_v"] {
        let (shape, w) = file.tensor_f32(&format!("blk.0.{name}.weight")).unwrap();
        let wv = WeightView::new(&w, shape[0], shape[1]).unwrap();
        let zero = vec![0f32; w.len()];
        // Errors relative to the layer's output energy ‖X Wᵀ‖².
        let (e_cal, e_test) = (
            stats.output_error(wv, &zero).unwrap(),
            held_out.output_error(wv, &zero).unwrap(),
        );
        for cfg in configs() {
            let mut cal = Vec::new();
            let mut test = Vec::new();
            let mut bpw = 0.0;
            for m in Baseline::ALL {
                let q = m.quantize(wv, Some(&stats), cfg).unwrap();
                let d = q.dequantize();
                cal.push(stats.output_error(wv, &d).unwrap() / e_cal);
                test.push(held_out.output_error(wv, &d).unwrap() / e_test);
                if m == Baseline::Rtn {
                    bpw = q.weight_bytes() as f64 * 8.0 / w.len() as f64;
                }
            }
            let f = |v: &[f64]| {
                v.iter()
                    .map(|e| format!("{e:.4}"))
                    .collect::<Vec<_>>()
                    .join(" | ")
            };
            println!(
                "| {name} | {} | {bpw:.3} | {} | {} |",
                cfg.label(),
                f(&cal),
                f(&test)
            );
            assert!(
                cal[1] < cal[0] && cal[3] <= cal[0],
                "{name} {}",
                cfg.label()
            );
        }
    }
}
