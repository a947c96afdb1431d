//! The forward-pass-free proxy on synthetic stacks.

use bitstack_core::signs::{pack_row_bools, words_per_row};
use bitstack_core::testutil::{random_block, XorShift};
use bitstack_core::{kernels, ResidualBlock, UniversalOrder};
use bitstack_sort::{
    sort_proxy, sort_proxy_sensitive, ActivationStats, ProxyConfig, ProxyNormalisation,
    ProxyWeight, Sensitivity, SortError,
};
use half::f16;

/// A rank-1 block with all signs positive: every row equals `col_values`.
fn column_block(rows: usize, col_values: &[f32]) -> ResidualBlock {
    let cols = col_values.len();
    let wpr = words_per_row(cols);
    let mut signs = vec![0u64; rows * wpr];
    for r in 0..rows {
        pack_row_bools(
            col_values.iter().map(|_| true),
            &mut signs[r * wpr..(r + 1) * wpr],
        );
    }
    let a = vec![f16::ONE; rows];
    let b = col_values.iter().map(|&v| f16::from_f32(v)).collect();
    ResidualBlock::new(rows, cols, 1, signs, a, b).unwrap()
}

fn dense(blocks: &[ResidualBlock], rows: usize, cols: usize) -> Vec<f32> {
    let views: Vec<_> = blocks.iter().map(|b| b.view()).collect();
    let mut out = vec![0.0; rows * cols];
    kernels::restore_into(&views, rows, cols, None, &mut out).unwrap();
    out
}

fn weight<'a>(original: &'a [f32], blocks: &'a [ResidualBlock], cols: usize) -> ProxyWeight<'a> {
    ProxyWeight {
        original,
        rows: original.len() / cols,
        cols,
        blocks,
        scale: None,
        stats: ActivationStats::Uniform,
    }
}

#[test]
fn block_removing_more_weighted_error_ranks_first() {
    let (rows, cols) = (4, 8);
    let floor = column_block(rows, &[1.0; 8]);
    // Weight 0: a small level-1 correction; weight 1: a large one. Both stacks are exact.
    let small = [floor.clone(), column_block(rows, &[0.1; 8])];
    let large = [floor.clone(), column_block(rows, &[0.8; 8])];
    let w0 = dense(&small, rows, cols);
    let w1 = dense(&large, rows, cols);
    let weights = [weight(&w0, &small, cols), weight(&w1, &large, cols)];
    let out = sort_proxy(&weights, &ProxyConfig::default()).unwrap();
    let ids: Vec<_> = out
        .order
        .as_slice()
        .iter()
        .map(|b| (b.weight, b.level))
        .collect();
    assert_eq!(ids, vec![(0, 0), (1, 0), (1, 1), (0, 1)]);
    assert!(out.gains[1][1].unwrap() > out.gains[0][1].unwrap());
    // Exact stacks: the last error is (numerically) zero.
    assert!(out.errors[1][2] < 1e-6 * out.errors[1][0]);
}

#[test]
fn activation_statistics_decide_the_order() {
    let (rows, cols) = (3, 4);
    let floor = column_block(rows, &[1.0; 4]);
    // Equal-size corrections in different input channels.
    let s0 = [floor.clone(), column_block(rows, &[0.5, 0.0, 0.0, 0.0])];
    let s1 = [floor.clone(), column_block(rows, &[0.0, 0.5, 0.0, 0.0])];
    let (w0, w1) = (dense(&s0, rows, cols), dense(&s1, rows, cols));
    let order_with = |d: &[f32]| -> Vec<u32> {
        let ws = [
            ProxyWeight {
                stats: ActivationStats::Diagonal(d),
                ..weight(&w0, &s0, cols)
            },
            ProxyWeight {
                stats: ActivationStats::Diagonal(d),
                ..weight(&w1, &s1, cols)
            },
        ];
        let out = sort_proxy(&ws, &ProxyConfig::default()).unwrap();
        out.order.as_slice()[2..].iter().map(|b| b.weight).collect()
    };
    // Channel 0 carries the activation energy: weight 0's correction matters more.
    assert_eq!(order_with(&[10.0, 0.1, 1.0, 1.0]), vec![0, 1]);
    assert_eq!(order_with(&[0.1, 10.0, 1.0, 1.0]), vec![1, 0]);
}

/// Brute force: E_l from a full restoration of the first l+1 levels, Gram form.
fn brute_errors(
    w: &[f32],
    blocks: &[ResidualBlock],
    cols: usize,
    inv: &[f32],
    g: &[f32],
) -> Vec<f64> {
    let rows = w.len() / cols;
    let err = |r: &[f32]| -> f64 {
        let mut e = 0.0;
        for i in 0..rows {
            for j in 0..cols {
                for k in 0..cols {
                    e += r[i * cols + j] as f64 * g[j * cols + k] as f64 * r[i * cols + k] as f64;
                }
            }
        }
        e
    };
    let mut out = vec![err(w)];
    for l in 1..=blocks.len() {
        let views: Vec<_> = blocks[..l].iter().map(|b| b.view()).collect();
        let mut hat = vec![0.0; rows * cols];
        kernels::restore_reference(&views, rows, cols, Some(inv), &mut hat).unwrap();
        let r: Vec<f32> = w.iter().zip(&hat).map(|(a, b)| a - b).collect();
        out.push(err(&r));
    }
    out
}

#[test]
fn incremental_errors_match_full_restoration_with_scale() {
    let (rows, cols, k) = (24, 70, 3);
    let mut rng = XorShift::new(9);
    let blocks: Vec<_> = (0..4)
        .map(|l| random_block(rows, cols, k, 100 + l))
        .collect();
    let original: Vec<f32> = (0..rows * cols).map(|_| 3.0 * rng.next_f32()).collect();
    let scale: Vec<f32> = (0..cols).map(|_| 0.5 + rng.next_f32().abs()).collect();
    let inv: Vec<f32> = scale.iter().map(|s| 1.0 / s).collect();
    let d: Vec<f32> = (0..cols).map(|_| rng.next_f32().abs()).collect();
    // A symmetric positive semi-definite Gram matrix from random activations.
    let x: Vec<f32> = (0..16 * cols).map(|_| rng.next_f32()).collect();
    let mut g = vec![0.0f32; cols * cols];
    for s in 0..16 {
        for j in 0..cols {
            for kk in 0..cols {
                g[j * cols + kk] += x[s * cols + j] * x[s * cols + kk] / 16.0;
            }
        }
    }
    let diag_g: Vec<f32> = (0..cols * cols)
        .map(|i| {
            if i / cols == i % cols {
                d[i / cols]
            } else {
                0.0
            }
        })
        .collect();
    let base = ProxyWeight {
        scale: Some(&scale),
        ..weight(&original, &blocks, cols)
    };
    let cfg = ProxyConfig::default();
    for (stats, gram) in [
        (ActivationStats::Gram(&g), &g),
        (ActivationStats::Diagonal(&d), &diag_g),
    ] {
        let out = sort_proxy(&[ProxyWeight { stats, ..base }], &cfg).unwrap();
        let expected = brute_errors(&original, &blocks, cols, &inv, gram);
        for (a, b) in out.errors[0].iter().zip(&expected) {
            assert!((a - b).abs() <= 1e-4 * expected[0], "{a} vs {b}");
        }
        // Relative gains telescope: Σ_l g_l = (E_{-1} − E_last) / E_{-1}.
        let sum: f64 = out.gains[0].iter().flatten().sum();
        let e = &out.errors[0];
        assert!((sum - (e[0] - e[4]) / e[0]).abs() < 1e-9);
    }
    // FromScale uses d_j = s_j².
    let s2: Vec<f32> = scale.iter().map(|s| s * s).collect();
    let a = sort_proxy(
        &[ProxyWeight {
            stats: ActivationStats::FromScale,
            ..base
        }],
        &cfg,
    )
    .unwrap();
    let b = sort_proxy(
        &[ProxyWeight {
            stats: ActivationStats::Diagonal(&s2),
            ..base
        }],
        &cfg,
    )
    .unwrap();
    assert_eq!(a.errors, b.errors);
}

#[test]
fn normalisation_and_per_byte_change_the_comparison_as_documented() {
    let (rows, cols) = (4, 8);
    // Weight 0: big weight, correction removes 0.5² per entry out of a big energy.
    let s0 = [column_block(rows, &[4.0; 8]), column_block(rows, &[0.5; 8])];
    // Weight 1: small weight, correction 0.3 per entry, relatively larger.
    let s1 = [column_block(rows, &[0.5; 8]), column_block(rows, &[0.3; 8])];
    let (w0, w1) = (dense(&s0, rows, cols), dense(&s1, rows, cols));
    let ws = [weight(&w0, &s0, cols), weight(&w1, &s1, cols)];
    let first = |normalisation| {
        let cfg = ProxyConfig {
            normalisation,
            per_byte: false,
        };
        sort_proxy(&ws, &cfg).unwrap().order.as_slice()[2].weight
    };
    assert_eq!(first(ProxyNormalisation::Absolute), 0);
    assert_eq!(first(ProxyNormalisation::Relative), 1);
    let per_byte = sort_proxy(
        &ws,
        &ProxyConfig {
            per_byte: true,
            ..Default::default()
        },
    )
    .unwrap();
    let plain = sort_proxy(&ws, &ProxyConfig::default()).unwrap();
    let bytes = bitstack_core::block_bytes(rows, cols, 1, bitstack_core::FactorDtype::F16) as f64;
    let (a, b) = (per_byte.gains[1][1].unwrap(), plain.gains[1][1].unwrap());
    assert!((a * bytes - b).abs() < 1e-12);
}

#[test]
fn measured_sensitivity_overrides_the_energy_normalisation() {
    let (rows, cols) = (4, 8);
    // The same two weights as above: relative normalisation loads weight 1's block first.
    let s0 = [column_block(rows, &[4.0; 8]), column_block(rows, &[0.5; 8])];
    let s1 = [column_block(rows, &[0.5; 8]), column_block(rows, &[0.3; 8])];
    let (w0, w1) = (dense(&s0, rows, cols), dense(&s1, rows, cols));
    let ws = [weight(&w0, &s0, cols), weight(&w1, &s1, cols)];
    let sens = |d0: f64, d1: f64| Sensitivity {
        base_blocks: vec![2, 2],
        probe_blocks: vec![1, 1],
        base_loss: 2.0,
        losses: vec![2.0 + d0, 2.0 + d1],
        evaluations: 3,
        elapsed: std::time::Duration::ZERO,
    };
    let run = |s: &Sensitivity| sort_proxy_sensitive(&ws, s, &ProxyConfig::default()).unwrap();
    // Equal loss increases for both cuts: the same loss per unit of error removed, so the
    // block removing more raw error (weight 0's, 0.5² vs 0.3² per entry) ranks first.
    let equal = run(&sens(1.0, 1.0));
    assert_eq!(equal.order.as_slice()[2].weight, 0);
    // Weight 1 ten times as sensitive: its block first. The gain is c_w · ΔE with
    // c_w = ΔL / (E_probe − E_full) = ΔL / ΔE for a two-level stack: exactly ΔL.
    let skewed = run(&sens(1.0, 10.0));
    assert_eq!(skewed.order.as_slice()[2].weight, 1);
    assert!((skewed.gains[1][1].unwrap() - 10.0).abs() < 1e-9);
    assert!((skewed.gains[0][1].unwrap() - 1.0).abs() < 1e-9);
    // A collapsed model without weight 0 makes it the most sensitive; noise (a loss drop)
    // makes a weight insensitive rather than negative.
    let collapsed = run(&sens(f64::NAN, 10.0));
    assert_eq!(collapsed.order.as_slice()[2].weight, 0);
    let noisy = run(&sens(-0.5, 0.1));
    assert_eq!(noisy.gains[0][1], Some(0.0));
    assert_eq!(noisy.order.as_slice()[2].weight, 1);
    // An addition probe (base 1, each weight in turn given its second block) measures the
    // same sensitivity with the signs of both changes flipped: the same order and gains.
    let added = |d0: f64, d1: f64| Sensitivity {
        base_blocks: vec![1, 1],
        probe_blocks: vec![2, 2],
        base_loss: 5.0,
        losses: vec![5.0 - d0, 5.0 - d1],
        evaluations: 3,
        elapsed: std::time::Duration::ZERO,
    };
    let by_addition = run(&added(1.0, 10.0));
    assert_eq!(by_addition.order.as_slice(), skewed.order.as_slice());
    assert!((by_addition.gains[1][1].unwrap() - 10.0).abs() < 1e-9);
    // A block that raised the loss is worth nothing, as is a collapse after an addition.
    let hurt = run(&added(-0.5, f64::NAN));
    assert_eq!(hurt.gains[0][1], Some(0.0));
    assert_eq!(hurt.gains[1][1], Some(0.0));
    // A sensitivity for another model is an error.
    let mut wrong = sens(1.0, 1.0);
    wrong.losses.pop();
    assert!(matches!(
        sort_proxy_sensitive(&ws, &wrong, &ProxyConfig::default()),
        Err(SortError::InvalidInput(_))
    ));
}

#[test]
fn ragged_stacks_give_valid_orders() {
    let blocks: Vec<Vec<ResidualBlock>> = [3usize, 1, 5, 2]
        .iter()
        .enumerate()
        .map(|(w, &n)| {
            (0..n)
                .map(|l| random_block(8, 16, 2, (w * 10 + l) as u64))
                .collect()
        })
        .collect();
    let originals: Vec<Vec<f32>> = blocks.iter().map(|b| dense(b, 8, 16)).collect();
    let ws: Vec<_> = originals
        .iter()
        .zip(&blocks)
        .map(|(o, b)| weight(o, b, 16))
        .collect();
    let out = sort_proxy(&ws, &ProxyConfig::default()).unwrap();
    assert_eq!(out.order.levels(), &[3, 1, 5, 2]);
    assert!(UniversalOrder::new(vec![3, 1, 5, 2], out.order.as_slice().to_vec()).is_ok());
}

#[test]
fn bad_inputs_are_typed_errors() {
    let blocks = [random_block(4, 8, 1, 1)];
    let good = dense(&blocks, 4, 8);
    let mut nan = good.clone();
    nan[3] = f32::NAN;
    let cfg = ProxyConfig::default();
    let run = |w: ProxyWeight<'_>| sort_proxy(&[w], &cfg).map(|_| ()).unwrap_err();
    assert!(matches!(
        run(weight(&nan, &blocks, 8)),
        SortError::NonFinite(_)
    ));
    assert!(matches!(
        run(weight(&good[..31], &blocks, 8)),
        SortError::InvalidInput(_)
    ));
    assert!(matches!(
        run(ProxyWeight {
            cols: 4,
            rows: 8,
            ..weight(&good, &blocks, 8)
        }),
        SortError::InvalidInput(_)
    ));
    assert!(matches!(
        run(weight(&good, &[], 8)),
        SortError::InvalidInput(_)
    ));
    let zero_scale = [0.0f32; 8];
    assert!(matches!(
        run(ProxyWeight {
            scale: Some(&zero_scale),
            ..weight(&good, &blocks, 8)
        }),
        SortError::NonFinite(_)
    ));
    let neg = [-1.0f32; 8];
    assert!(matches!(
        run(ProxyWeight {
            stats: ActivationStats::Diagonal(&neg),
            ..weight(&good, &blocks, 8)
        }),
        SortError::NonFinite(_)
    ));
    let short = [1.0f32; 7];
    assert!(matches!(
        run(ProxyWeight {
            stats: ActivationStats::Gram(&short),
            ..weight(&good, &blocks, 8)
        }),
        SortError::InvalidInput(_)
    ));
    assert!(matches!(
        sort_proxy(&[], &cfg),
        Err(SortError::InvalidInput(_))
    ));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// rows, cols, blocks, original weight, second moments.
    type Stack = (usize, usize, Vec<ResidualBlock>, Vec<f32>, Vec<f32>);

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// For any stacks: errors are non-negative, relative gains telescope to the total
        /// relative error removed, and within each level the order is by decreasing gain.
        #[test]
        fn gains_telescope_and_order_follows_them(
            seed in any::<u64>(),
            shape in prop::collection::vec((1usize..20, 1usize..80, 1usize..4, 1usize..5), 1..6),
        ) {
            let mut rng = XorShift::new(seed);
            let stacks: Vec<Stack> = shape
                .iter()
                .enumerate()
                .map(|(w, &(rows, cols, k, n))| {
                    let blocks = (0..n)
                        .map(|l| random_block(rows, cols, k, seed ^ (w * 31 + l) as u64))
                        .collect();
                    let original = (0..rows * cols).map(|_| 2.0 * rng.next_f32()).collect();
                    let d = (0..cols).map(|_| rng.next_f32().abs()).collect();
                    (rows, cols, blocks, original, d)
                })
                .collect();
            let ws: Vec<ProxyWeight<'_>> = stacks
                .iter()
                .map(|(rows, cols, blocks, original, d)| ProxyWeight {
                    original,
                    rows: *rows,
                    cols: *cols,
                    blocks,
                    scale: None,
                    stats: ActivationStats::Diagonal(d),
                })
                .collect();
            let out = sort_proxy(&ws, &ProxyConfig::default()).unwrap();
            for (e, g) in out.errors.iter().zip(&out.gains) {
                prop_assert!(e.iter().all(|&v| v >= 0.0));
                if e[0] > 0.0 {
                    let sum: f64 = g.iter().flatten().sum();
                    let expected = (e[0] - e[e.len() - 1]) / e[0];
                    prop_assert!((sum - expected).abs() <= 1e-9 * (1.0 + expected.abs()));
                }
            }
            let ids = out.order.as_slice();
            let n = ws.len();
            for pair in ids[n..].windows(2) {
                let (a, b) = (pair[0], pair[1]);
                if a.level == b.level {
                    let ga = out.gains[a.weight as usize][a.level as usize].unwrap();
                    let gb = out.gains[b.weight as usize][b.level as usize].unwrap();
                    prop_assert!(ga > gb || (ga == gb && a.weight < b.weight));
                } else {
                    prop_assert_eq!(b.level, a.level + 1);
                }
            }
        }
    }
}
