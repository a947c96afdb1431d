//! The fused kernels on real SmolLM2 blocks (skipped with a message when `../shared` is
//! absent): one weight of each shape is decomposed at its `--rank auto` k (5, 9, 13) into three
//! levels, and every kernel path (exact f32 tables, int8 and split-16-bit tables on each instruction set this
//! CPU has) is checked against the f64 reference at batch 1, 5 and 16.

use bitstack_core::kernels::{
    fused_matmul_with, fused_scratch_len_with, matmul_reference, FusedParams, KernelIsa,
    TablePrecision,
};
use bitstack_core::testutil::XorShift;
use bitstack_examples::gguf::open_model;
use bitstack_linalg::{decompose_slice, IavdParams};
use std::path::PathBuf;

fn shared(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared")
        .join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: {} not found", p.display());
        None
    }
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

#[test]
fn fused_kernels_match_reference_on_smollm2_blocks() {
    let Some(model) = shared("models/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let source = open_model(&model).unwrap();
    let mut paths = vec![FusedParams::exact()];
    let mut isas = vec![KernelIsa::Portable];
    for isa in [KernelIsa::Avx512Vbmi, KernelIsa::Avx2, KernelIsa::Amx] {
        if isa.is_available() {
            isas.push(isa);
        } else {
            println!("{} not on this CPU: not tested here", isa.name());
        }
    }
    for isa in isas {
        for tables in [
            TablePrecision::Int8,
            TablePrecision::Mixed,
            TablePrecision::Int16,
        ] {
            paths.push(FusedParams { tables, isa });
        }
    }
    let mut rng = XorShift::new(17);
    for (name, rank) in [
        ("blk.3.attn_k.weight", 5),
        ("blk.3.attn_q.weight", 9),
        ("blk.3.ffn_down.weight", 13),
    ] {
        let (shape, w) = source.tensor_f32(name).unwrap();
        let (rows, cols) = (shape[0], shape[1]);
        let params = IavdParams {
            levels: 3,
            rank,
            ..Default::default()
        };
        let dec = decompose_slice(&w, rows, cols, None, &params).unwrap();
        let refs: Vec<_> = dec.blocks.iter().map(|b| b.view()).collect();
        for batch in [1, 5, 16] {
            // Activation-like inputs: Gaussian with a few large channels.
            let x: Vec<f32> = (0..batch * cols)
                .map(|i| {
                    let g = rng.next_gaussian();
                    if i % cols % 97 == 3 {
                        8.0 * g
                    } else {
                        g
                    }
                })
                .collect();
            let mut want = vec![0.0; batch * rows];
            matmul_reference(&refs, rows, cols, None, &x, &mut want).unwrap();
            for &p in &paths {
                let mut y = vec![f32::NAN; batch * rows];
                let mut scratch = vec![0.0; fused_scratch_len_with(rows, cols, rank, 3, batch, p)];
                fused_matmul_with(&refs, rows, cols, None, &x, &mut y, p, &mut scratch).unwrap();
                let e = rel_err(&y, &want);
                let tol = match p.tables {
                    TablePrecision::F32 => 1e-5,
                    TablePrecision::Int8 | TablePrecision::Mixed => 2e-2,
                    TablePrecision::Int16 => 2e-4,
                };
                println!("{name} ({rows}x{cols}, k {rank}) batch {batch} {p:?}: rel err {e:.2e}");
                assert!(e < tol, "{name} batch {batch} {p:?}: {e}");
            }
        }
    }
}
