//! Speed and accuracy of IAVD with the randomized top-k SVD versus faer's exact thin SVD.
//!
//! Build and run (release, outside cargo so the build lock is not held):
//! ```text
//! cargo build --release -p bitstack-linalg --examples
//! target/release/examples/iavd_speed
//! ```
//! Matrices: Gaussian (σ = 0.02) with three input columns scaled ×8 (the heavy-channel pattern
//! of real LLM weights). 16 levels, k = 16. The exact path on 4096×4096 runs only 2 levels
//! (one exact SVD of a 4096² matrix takes tens of seconds); per-level medians are compared.

use bitstack_core::testutil::heavy_gaussian;
use bitstack_linalg::{decompose_slice, IavdParams, SvdMethod, TruncatedSvdParams};
use std::time::Duration;

fn median(ts: &[Duration]) -> Duration {
    let mut v = ts.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let base = TruncatedSvdParams::default();
    println!(
        "IAVD, 16 levels, k = 16; randomized: oversample {}, power_iters {}; rayon threads {}",
        base.oversample,
        base.power_iters,
        rayon::current_num_threads()
    );
    for (rows, cols, exact_levels) in [(4096usize, 4096usize, 2usize), (1536, 576, 16)] {
        let w = heavy_gaussian(rows, cols, 42);
        let params = |method, levels| IavdParams {
            levels,
            rank: 16,
            svd: TruncatedSvdParams { method, ..base },
            ..IavdParams::default()
        };
        let rand = decompose_slice(&w, rows, cols, None, &params(SvdMethod::Randomized, 16))?;
        let exact = decompose_slice(
            &w,
            rows,
            cols,
            None,
            &params(SvdMethod::Exact, exact_levels),
        )?;
        let (mr, me) = (median(&rand.level_times), median(&exact.level_times));
        println!("\n{rows}×{cols}:");
        if exact_levels < 16 {
            println!(
                "  (exact SVD timed on the first {exact_levels} levels only; medians compared)"
            );
        }
        println!(
            "  per-level median: randomized {:.1} ms, exact {:.1} ms, speed-up {:.1}×",
            mr.as_secs_f64() * 1e3,
            me.as_secs_f64() * 1e3,
            me.as_secs_f64() / mr.as_secs_f64()
        );
        println!(
            "  total: randomized {:.2} s for 16 levels, exact {:.2} s for {exact_levels}",
            rand.level_times.iter().sum::<Duration>().as_secs_f64(),
            exact.level_times.iter().sum::<Duration>().as_secs_f64()
        );
        println!("  level  randomized   exact      rel.gap   t_rand(ms)  t_exact(ms)");
        for l in 0..16 {
            let r = rand.relative_errors[l];
            let tr = rand.level_times[l].as_secs_f64() * 1e3;
            match exact.relative_errors.get(l) {
                Some(&e) => println!(
                    "  {:>5}  {r:.6}   {e:.6}   {:+.4}%   {tr:>9.1}  {:>11.1}",
                    l + 1,
                    (r - e) / e * 100.0,
                    exact.level_times[l].as_secs_f64() * 1e3
                ),
                None => println!("  {:>5}  {r:.6}   -          -          {tr:>9.1}", l + 1),
            }
        }
    }
    Ok(())
}
