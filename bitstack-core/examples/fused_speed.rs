//! Benchmark: fused `Y = X Ŵᵀ` over 1, 4, 8, 16 levels against a dense f32 GEMV/GEMM of the
//! same shape (faer), measured in the same run. Prints medians and ratios.
//!
//! `cargo run --release -p bitstack-core --example fused_speed [-- --reps 15]`
use bitstack_core::kernels::{fused_matmul_with_scratch, fused_scratch_len};
use bitstack_core::testutil::{random_block, XorShift};
use bitstack_core::{DenseLinear, LinearOp};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    f();
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    println!(
        "threads: {}  reps: {reps}  (median wall time per call)",
        rayon::current_num_threads()
    );
    println!(
        "{:>11} {:>5} {:>6} {:>11} {:>11} {:>9} {:>10}",
        "shape", "batch", "levels", "dense ms", "fused ms", "fused/dense", "MB held"
    );
    let mut rng = XorShift::new(1);
    for &(m, n) in &[(4096usize, 4096usize), (1536, 576), (576, 1536)] {
        let blocks: Vec<_> = (0..16).map(|l| random_block(m, n, 16, 100 + l)).collect();
        let w: Vec<f32> = (0..m * n).map(|_| rng.next_f32()).collect();
        let dense = DenseLinear::new(m, n, w).expect("shape");
        let inv_s: Vec<f32> = (0..n).map(|j| 1.0 + (j % 7) as f32 * 0.1).collect();
        for &batch in &[1usize, 8] {
            let x: Vec<f32> = (0..batch * n).map(|_| rng.next_f32()).collect();
            let mut y = vec![0.0f32; batch * m];
            let t_dense = time(reps, || dense.forward(&x, &mut y).expect("dense"));
            for &levels in &[1usize, 4, 8, 16] {
                let refs: Vec<_> = blocks[..levels].iter().map(|b| b.view()).collect();
                let mut scratch = vec![0.0f32; fused_scratch_len(m, n, 16, batch)];
                let t = time(reps, || {
                    fused_matmul_with_scratch(&refs, m, n, Some(&inv_s), &x, &mut y, &mut scratch)
                        .expect("fused")
                });
                let held: u64 = blocks[..levels].iter().map(|b| b.heap_bytes()).sum();
                println!(
                    "{:>11} {:>5} {:>6} {:>11.3} {:>11.3} {:>9.2}x {:>10.2}",
                    format!("{m}x{n}"),
                    batch,
                    levels,
                    t_dense * 1e3,
                    t * 1e3,
                    t / t_dense,
                    held as f64 / 1e6
                );
            }
        }
    }
}
