//! `BitStackLinear` against a dense `candle_nn::Linear` built from the same stack's restored
//! weight: odd shapes, batches 1, 3 and 17 (the last past the fused kernels' batch limit, so
//! both the look-up-table and the restore-and-GEMM paths are covered), inputs `[n, in]` and
//! `[b, t, in]`, strided inputs, and typed errors for what the op cannot take.

use std::sync::Arc;

use bitstack_candle::BitStackLinear;
use bitstack_core::testutil::{random_block, XorShift};
use bitstack_core::{StackMeta, WeightStack};
use candle_core::{DType, Device, Module, Tensor};

fn stack(rows: usize, cols: usize, rank: usize, levels: usize, seed: u64) -> WeightStack {
    let mut rng = XorShift::new(seed);
    let meta = Arc::new(StackMeta {
        name: format!("test.{rows}x{cols}"),
        rows,
        cols,
        rank,
        levels: levels as u16 + 1, // one level left unloaded, as at a real budget
        scale: Some((0..cols).map(|_| 0.5 + rng.next_f32().abs()).collect()),
        factors: bitstack_core::FactorDtype::F16,
    });
    let blocks = (0..levels)
        .map(|l| Arc::new(random_block(rows, cols, rank, seed * 100 + l as u64)))
        .collect();
    WeightStack::with_blocks(meta, blocks).unwrap()
}

fn input(dims: &[usize], seed: u64) -> Tensor {
    let mut rng = XorShift::new(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.next_f32()).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// Largest |a - b| relative to the largest |b| (the products' scale).
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

const SHAPES: [(usize, usize, usize, usize); 3] = [
    // (rows, cols, rank, levels): odd sizes, cols not a multiple of 4 or 64.
    (37, 45, 3, 2),
    (64, 130, 8, 3),
    (5, 257, 16, 1),
];

#[test]
fn matches_dense_linear_for_every_batch_and_input_rank() {
    for (i, &(rows, cols, rank, levels)) in SHAPES.iter().enumerate() {
        let layer = BitStackLinear::new(stack(rows, cols, rank, levels, i as u64 + 1));
        let exact = layer.clone().exact();
        let w = layer.restored_weight().unwrap();
        assert_eq!(w.dims(), &[rows, cols]);
        let dense = candle_nn::Linear::new(w, None);
        for dims in [
            vec![1, cols],
            vec![3, cols],
            vec![17, cols],
            vec![1, 1, cols],
            vec![1, 3, cols],
            vec![3, 1, cols],
            vec![1, 17, cols],
            vec![17, 3, cols],
        ] {
            let x = input(&dims, 7 + dims.iter().sum::<usize>() as u64);
            let want = dense.forward(&x).unwrap();
            let mut out_dims = dims.clone();
            *out_dims.last_mut().unwrap() = rows;
            assert_eq!(want.dims(), &out_dims[..]);
            let got = exact.forward(&x).unwrap();
            let e = rel_err(&got, &want);
            assert!(
                e < 1e-5,
                "exact tables {rows}x{cols} k{rank} input {dims:?}: {e}"
            );
            // The default int8 tables quantise the per-group partial sums; the error stays a
            // small fraction of the output scale (and is zero past the fused batch limit, where
            // both paths restore Ŵ).
            let got = layer.forward(&x).unwrap();
            let e = rel_err(&got, &want);
            assert!(
                e < 2e-2,
                "int8 tables {rows}x{cols} k{rank} input {dims:?}: {e}"
            );
        }
    }
}

#[test]
fn strided_inputs_are_made_contiguous_and_bad_inputs_are_errors() {
    let (rows, cols) = (37, 45);
    let layer = BitStackLinear::new(stack(rows, cols, 3, 2, 9)).exact();
    let dense = candle_nn::Linear::new(layer.restored_weight().unwrap(), None);
    // [cols, 5] transposed: a non-contiguous [5, cols] view.
    let x = input(&[cols, 5], 3).t().unwrap();
    assert!(!x.is_contiguous());
    let e = rel_err(&layer.forward(&x).unwrap(), &dense.forward(&x).unwrap());
    assert!(e < 1e-5, "{e}");
    // The raw op refuses a strided view instead of reading it wrongly.
    assert!(x.apply_op1_no_bwd(&layer).is_err());

    let wrong_width = input(&[2, cols + 1], 4);
    let msg = layer.forward(&wrong_width).unwrap_err().to_string();
    assert!(msg.contains("does not end in 45"), "{msg}");
    let f64_input = input(&[2, cols], 5).to_dtype(DType::F64).unwrap();
    let msg = layer.forward(&f64_input).unwrap_err().to_string();
    assert!(msg.contains("f32"), "{msg}");
    // An empty batch is an empty result, not a kernel error.
    let empty = Tensor::zeros((0, cols), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(layer.forward(&empty).unwrap().dims(), &[0, rows]);
}

#[test]
fn a_grown_stack_gives_a_different_product() {
    let (rows, cols) = (64, 130);
    let full = stack(rows, cols, 8, 3, 21);
    let mut fewer = full.clone();
    fewer.truncate(1);
    let x = input(&[3, cols], 1);
    let a = BitStackLinear::new(full).exact().forward(&x).unwrap();
    let b = BitStackLinear::new(fewer).exact().forward(&x).unwrap();
    assert!(rel_err(&a, &b) > 1e-2, "levels must matter");
}
