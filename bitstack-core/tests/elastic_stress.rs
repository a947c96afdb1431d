//! Resizing while other threads run fused products: every product must equal the dense
//! reference of the snapshot it ran on (no torn reads, no gaps). Bounded in time and count.

use bitstack_core::kernels::matmul_reference;
use bitstack_core::testutil::{random_block, XorShift};
use bitstack_core::{
    ElasticModel, InMemorySource, LinearOp, ModelLayout, StackMeta, UniversalOrder,
};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn resize_under_concurrent_products() {
    let shapes = [(48usize, 64usize), (64, 128), (32, 64), (80, 64)];
    let levels = 6u16;
    let mut src = InMemorySource::default();
    let mut stacks = vec![];
    for (w, &(m, n)) in shapes.iter().enumerate() {
        src.blocks.push(
            (0..levels)
                .map(|l| random_block(m, n, 8, (w * 31 + l as usize) as u64))
                .collect(),
        );
        stacks.push(Arc::new(StackMeta {
            name: format!("w{w}"),
            rows: m,
            cols: n,
            rank: 8,
            levels,
            scale: Some((0..n).map(|j| 0.5 + (j % 3) as f32).collect()),
            factors: bitstack_core::FactorDtype::F16,
        }));
    }
    let layout = ModelLayout {
        stacks,
        order: UniversalOrder::round_robin(vec![levels; shapes.len()]).unwrap(),
        resident_bytes: 0,
    };
    let total = layout.order.len();
    let floor = shapes.len();
    let model = Arc::new(
        ElasticModel::new(
            src.clone(),
            layout,
            bitstack_core::MemoryBudget::from_bytes(u64::MAX / 4),
        )
        .unwrap(),
    );
    // This test checks snapshot consistency to f32 rounding, so it runs the exact f32-table
    // kernel; the int8 tables' own accuracy is tested in `kernels`.
    model.set_fused_params(bitstack_core::kernels::FusedParams::exact());
    let stop = Arc::new(AtomicBool::new(false));
    let checks = Arc::new(AtomicUsize::new(0));
    let mismatches = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(3);

    let mut handles = vec![];
    for t in 0..3u64 {
        let (model, stop, checks, mismatches, src) = (
            model.clone(),
            stop.clone(),
            checks.clone(),
            mismatches.clone(),
            src.clone(),
        );
        handles.push(std::thread::spawn(move || {
            let mut rng = XorShift::new(t + 99);
            while !stop.load(Ordering::Relaxed) {
                let snap = model.snapshot();
                let w = (rng.next_u64() % 4) as usize;
                let stack = snap.weight(w).unwrap();
                let (m, n) = (stack.out_features(), stack.in_features());
                let batch = 1 + (rng.next_u64() % 3) as usize;
                let x: Vec<f32> = (0..batch * n).map(|_| rng.next_f32()).collect();
                let mut y = vec![0.0; batch * m];
                stack.forward(&x, &mut y).unwrap();
                // Reference built from the source blocks for the levels this snapshot holds.
                let l = stack.loaded_levels();
                let refs: Vec<_> = src.blocks[w][..l].iter().map(|b| b.view()).collect();
                let mut want = vec![0.0; batch * m];
                matmul_reference(&refs, m, n, stack.inv_scale(), &x, &mut want).unwrap();
                let err: f32 = y
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                let scale: f32 = want.iter().map(|v| v.abs()).fold(1e-3, f32::max);
                if err > 1e-3 * scale {
                    mismatches.fetch_add(1, Ordering::Relaxed);
                }
                // Level counts across weights always come from one prefix of the order.
                let levels: Vec<usize> = snap.weights().iter().map(|w| w.loaded_levels()).collect();
                let (lo, hi) = (levels.iter().min().unwrap(), levels.iter().max().unwrap());
                if hi - lo > 1 || *lo == 0 {
                    mismatches.fetch_add(1, Ordering::Relaxed);
                }
                checks.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut rng = XorShift::new(5);
    let mut resizes = 0;
    while Instant::now() < deadline {
        let p = floor + (rng.next_u64() as usize) % (total - floor + 1);
        let r = model.resize_to_prefix(p).unwrap();
        assert_eq!(r.to_prefix, p);
        resizes += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    let checks = checks.load(Ordering::Relaxed);
    println!("{resizes} resizes, {checks} checked products");
    assert!(resizes > 10 && checks > 10);
    assert_eq!(mismatches.load(Ordering::Relaxed), 0);
}
