//! Benchmark: the fused `Y = X Ŵᵀ` at 1, 2, 4, 8, 16 levels against a dense f32 GEMV/GEMM of
//! the same shape (faer) and against the exact f32-table kernel (the previous default),
//! measured in the same run. Prints medians, ratios, the kernel that ran and the load.
//!
//! `cargo run --release -p bitstack-core --example fused_speed [-- --reps 15 --quick]`
//!
//! `--quick` keeps the 4096×4096 shape at k = 16 and the SmolLM2 shapes at their
//! `--rank auto` ranks only. `--isa portable|avx2|avx512-vbmi|amx-int8` forces the table
//! kernel's instruction set (default: the best this CPU has).
use bitstack_core::kernels::{
    fused_matmul_with, fused_scratch_len_with, FusedParams, KernelIsa, TablePrecision,
};
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

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let quick = args.iter().any(|a| a == "--quick");
    // `--no-exact` skips the f32-table kernel (e.g. to profile the int8 one alone).
    let no_exact = args.iter().any(|a| a == "--no-exact");
    // `--shape 576x576` runs one shape only (e.g. under a profiler).
    let only: Option<String> = args
        .iter()
        .position(|a| a == "--shape")
        .and_then(|i| args.get(i + 1))
        .cloned();
    // `--isa a,b,...`: each listed kernel timed in this run, one row each, beside the same
    // dense baseline.
    let isas: Vec<KernelIsa> = match args.iter().position(|a| a == "--isa") {
        None => vec![KernelIsa::Auto],
        Some(i) => args
            .get(i + 1)
            .map_or("", String::as_str)
            .split(',')
            .map(|name| match name.parse::<KernelIsa>() {
                Ok(isa) if isa.is_available() => isa,
                Ok(_) => {
                    eprintln!("--isa {name}: not available on this CPU");
                    std::process::exit(2);
                }
                Err(e) => {
                    eprintln!("--isa: {e}");
                    std::process::exit(2);
                }
            })
            .collect(),
    };
    let names: Vec<&str> = isas.iter().map(|i| i.resolve().name()).collect();
    println!(
        "threads: {}  reps: {reps}  table kernels: {}  load before: {}",
        rayon::current_num_threads(),
        names.join(", "),
        loadavg()
    );
    println!("median wall time per call; ratios < 1 mean the table kernel is faster");
    println!(
        "| shape | k | batch | levels | kernel | dense f32 ms | exact f32-table ms | int16 (default) ms | int16/dense | int16/exact | int8 ms | int8/dense | MB held |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut rng = XorShift::new(1);
    // (rows, cols, ranks): 4096² at the paper's k = 16 (and the auto ranks), SmolLM2's shapes.
    let big_ranks: &[usize] = if quick { &[16] } else { &[5, 9, 13, 16] };
    let small_ranks: &[usize] = if quick { &[9] } else { &[5, 9, 13, 16] };
    let shapes: Vec<(usize, usize, &[usize])> = vec![
        (4096, 4096, big_ranks),
        (576, 576, small_ranks),
        (192, 576, if quick { &[5] } else { small_ranks }),
        (1536, 576, if quick { &[13] } else { small_ranks }),
        (576, 1536, if quick { &[13] } else { small_ranks }),
    ];
    for (m, n, ranks) in shapes {
        if only.as_ref().is_some_and(|o| *o != format!("{m}x{n}")) {
            continue;
        }
        let w: Vec<f32> = (0..m * n).map(|_| rng.next_f32()).collect();
        let dense = DenseLinear::new(m, n, w).expect("shape");
        let inv_s: Vec<f32> = (0..n).map(|j| 1.0 + (j % 7) as f32 * 0.1).collect();
        for &k in ranks {
            let blocks: Vec<_> = (0..16).map(|l| random_block(m, n, k, 100 + l)).collect();
            for &batch in &[1usize, 8] {
                let x: Vec<f32> = (0..batch * n).map(|_| rng.next_f32()).collect();
                let mut y = vec![0.0f32; batch * m];
                let t_dense = time(reps, || dense.forward(&x, &mut y).expect("dense"));
                for &levels in &[1usize, 2, 4, 8, 16] {
                    let refs: Vec<_> = blocks[..levels].iter().map(|b| b.view()).collect();
                    let mut run = |p: FusedParams| {
                        let mut scratch =
                            vec![0.0f32; fused_scratch_len_with(m, n, k, levels, batch, p)];
                        time(reps, || {
                            fused_matmul_with(
                                &refs,
                                m,
                                n,
                                Some(&inv_s),
                                &x,
                                &mut y,
                                p,
                                &mut scratch,
                            )
                            .expect("fused")
                        })
                    };
                    let t_exact = if no_exact {
                        f64::NAN
                    } else {
                        run(FusedParams {
                            tables: TablePrecision::F32,
                            isa: KernelIsa::Auto,
                        })
                    };
                    let held: u64 = blocks[..levels].iter().map(|b| b.heap_bytes()).sum();
                    for &isa in &isas {
                        let t_int16 = run(FusedParams {
                            tables: TablePrecision::Int16,
                            isa,
                        });
                        let t_i8 = run(FusedParams {
                            tables: TablePrecision::Int8,
                            isa,
                        });
                        println!(
                            "| {m}x{n} | {k} | {batch} | {levels} | {} | {:.3} | {:.3} | {:.3} | {:.2}x | {:.2}x | {:.3} | {:.2}x | {:.2} |",
                            isa.resolve().name(),
                            t_dense * 1e3,
                            t_exact * 1e3,
                            t_int16 * 1e3,
                            t_int16 / t_dense,
                            t_int16 / t_exact,
                            t_i8 * 1e3,
                            t_i8 / t_dense,
                            held as f64 / 1e6
                        );
                    }
                }
            }
        }
    }
    println!("load after: {}", loadavg());
}
