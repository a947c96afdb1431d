//! The elastic runtime under injected faults: one thread resizes to random budgets through a
//! [`FaultySource`] that fails or corrupts a chosen fraction of block loads, while other
//! threads run fused products on snapshots. Checked throughout:
//!
//! - every snapshot is a consistent prefix of the universal order (each weight holds exactly
//!   the levels the prefix assigns it);
//! - every product equals the dense reference (`kernels::matmul_reference`) of the blocks its
//!   snapshot holds, computed from the pristine blocks (so no corrupted data ever got in);
//! - a failed grow returns an error and leaves the very same snapshot in place (`Arc::ptr_eq`);
//! - nothing leaks: after shrinking back to the floor with no reader left, every block is held
//!   once (`Arc::strong_count == 1`) and the live heap (a counting global allocator) is back
//!   to its baseline.
//!
//! The wrapper lives in this file: it is a test device, not part of the crate's API.

use bitstack_core::kernels::matmul_reference;
use bitstack_core::runtime::BlockSource;
use bitstack_core::testutil::{random_block, XorShift};
use bitstack_core::{
    BlockId, CoreError, ElasticModel, InMemorySource, LinearOp, MemoryBudget, ModelLayout,
    ModelSnapshot, ResidualBlock, StackMeta, UniversalOrder,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counts live heap bytes (the whole test binary: this file holds one test).
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// 64-bit FNV-1a over a block's sign words and f16 factors: the checksum a verifying source
/// keeps beside each block.
fn checksum(b: &ResidualBlock) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut eat = |x: u64| {
        for byte in x.to_le_bytes() {
            h ^= u64::from(byte);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    b.sign_words().iter().for_each(|&w| eat(w));
    let (a, bb) = (b.a(), b.b());
    for (f, n) in [(a, b.rows()), (bb, b.cols())] {
        for i in 0..n {
            for r in 0..b.rank() {
                eat(u64::from(f.get(i, r, b.rank()).to_bits()));
            }
        }
    }
    h
}

/// SplitMix64 finaliser: a deterministic hash of the fault decision's inputs.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A [`BlockSource`] wrapper that fails `fail_per_mille` and corrupts `corrupt_per_mille` of
/// the loads. The decision for a load is a hash of (seed, block, how many times this block was
/// loaded before), so a run is reproducible whatever order the parallel loads run in.
/// "Fail" is an I/O-like error; "corrupt" flips one bit of the delivered block, which the
/// wrapper's own checksum verification (as every source must verify) turns into an error.
struct FaultySource<S> {
    inner: S,
    seed: u64,
    fail_per_mille: u64,
    corrupt_per_mille: u64,
    levels: u16,
    sums: Vec<u64>,
    attempts: Vec<AtomicU32>,
    failed: AtomicUsize,
    corrupted: AtomicUsize,
    loads: AtomicUsize,
}

impl<S: BlockSource> FaultySource<S> {
    fn new(inner: S, ids: &[BlockId], levels: u16, seed: u64, fail: u64, corrupt: u64) -> Self {
        let n = ids.len();
        let mut sums = vec![0; n];
        for &id in ids {
            let b = inner.load_block(id).expect("pristine source loads");
            sums[Self::slot(levels, id)] = checksum(&b);
        }
        Self {
            inner,
            seed,
            fail_per_mille: fail,
            corrupt_per_mille: corrupt,
            levels,
            sums,
            attempts: (0..n).map(|_| AtomicU32::new(0)).collect(),
            failed: AtomicUsize::new(0),
            corrupted: AtomicUsize::new(0),
            loads: AtomicUsize::new(0),
        }
    }
    fn slot(levels: u16, id: BlockId) -> usize {
        id.weight as usize * levels as usize + id.level as usize
    }
    fn injected(&self) -> usize {
        self.failed.load(Ordering::Relaxed) + self.corrupted.load(Ordering::Relaxed)
    }
}

impl<S: BlockSource> BlockSource for FaultySource<S> {
    fn load_block(&self, id: BlockId) -> Result<ResidualBlock, CoreError> {
        self.loads.fetch_add(1, Ordering::Relaxed);
        let slot = Self::slot(self.levels, id);
        let attempt = self.attempts[slot].fetch_add(1, Ordering::Relaxed);
        let roll = mix(self.seed ^ mix(slot as u64) ^ mix(u64::from(attempt) << 32)) % 1000;
        if roll < self.fail_per_mille {
            self.failed.fetch_add(1, Ordering::Relaxed);
            return Err(CoreError::Source(
                format!(
                    "injected I/O error reading block {}:{}",
                    id.weight, id.level
                )
                .into(),
            ));
        }
        let mut block = self.inner.load_block(id)?;
        if roll < self.fail_per_mille + self.corrupt_per_mille {
            self.corrupted.fetch_add(1, Ordering::Relaxed);
            let mut signs = block.sign_words().to_vec();
            // One sign of the matrix (not a padding bit, which the block's own validation
            // would reject before the checksum is even looked at).
            let (rows, cols) = (block.rows(), block.cols());
            let cell = (mix(u64::from(attempt) ^ self.seed) % (rows * cols) as u64) as usize;
            let (r, c) = (cell / cols, cell % cols);
            signs[r * cols.div_ceil(64) + c / 64] ^= 1 << (c % 64);
            block = ResidualBlock::with_factors(
                block.rows(),
                block.cols(),
                block.rank(),
                signs,
                block.a().to_owned(),
                block.b().to_owned(),
            )?;
        }
        let got = checksum(&block);
        if got != self.sums[slot] {
            return Err(CoreError::Source(
                format!(
                    "checksum mismatch in block {}:{} (stored {:016x}, computed {got:016x})",
                    id.weight, id.level, self.sums[slot]
                )
                .into(),
            ));
        }
        Ok(block)
    }
}

/// Levels per weight that a prefix of `order` assigns.
fn levels_of_prefix(order: &UniversalOrder, weights: usize, prefix: usize) -> Vec<usize> {
    let mut v = vec![0; weights];
    for id in &order.as_slice()[..prefix] {
        v[id.weight as usize] += 1;
    }
    v
}

/// Checks one snapshot against the order and the pristine blocks; returns the mismatches.
fn check_snapshot(
    snap: &ModelSnapshot,
    order: &UniversalOrder,
    pristine: &InMemorySource,
    rng: &mut XorShift,
) -> usize {
    let weights = snap.weights().len();
    let mut bad = 0;
    let held: Vec<usize> = snap.weights().iter().map(|w| w.loaded_levels()).collect();
    if held != levels_of_prefix(order, weights, snap.prefix()) {
        bad += 1;
    }
    let w = (rng.next_u64() % weights as u64) as usize;
    let Some(stack) = snap.weight(w) else {
        return bad + 1;
    };
    let (m, n) = (stack.out_features(), stack.in_features());
    let batch = 1 + (rng.next_u64() % 3) as usize;
    let x: Vec<f32> = (0..batch * n).map(|_| rng.next_f32() - 0.5).collect();
    let mut y = vec![0.0; batch * m];
    if stack.forward(&x, &mut y).is_err() {
        return bad + 1;
    }
    let l = stack.loaded_levels();
    let refs: Vec<_> = pristine.blocks[w][..l].iter().map(|b| b.view()).collect();
    let mut want = vec![0.0; batch * m];
    if matmul_reference(&refs, m, n, stack.inv_scale(), &x, &mut want).is_err() {
        return bad + 1;
    }
    let err = y
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let scale = want.iter().map(|v| v.abs()).fold(1e-3f32, f32::max);
    bad + usize::from(err > 1e-3 * scale)
}

#[test]
fn resize_under_injected_faults() {
    let shapes = [(48usize, 64usize), (64, 128), (32, 64), (80, 64), (40, 96)];
    let levels = 8u16;
    let mut pristine = InMemorySource::default();
    let mut stacks = vec![];
    for (w, &(m, n)) in shapes.iter().enumerate() {
        pristine.blocks.push(
            (0..levels)
                .map(|l| random_block(m, n, 8, (w * 131 + l as usize + 7) as u64))
                .collect(),
        );
        stacks.push(Arc::new(StackMeta {
            name: format!("w{w}"),
            rows: m,
            cols: n,
            rank: 8,
            levels,
            scale: Some((0..n).map(|j| 0.5 + (j % 5) as f32 * 0.25).collect()),
            factors: bitstack_core::FactorDtype::F16,
        }));
    }
    // The floor (level 0 of every weight), then a shuffled level-ordered rest (not round
    // robin), from a fixed seed.
    let mut rng = XorShift::new(2025);
    let mut next = vec![1u16; shapes.len()];
    let mut ids: Vec<BlockId> = (0..shapes.len() as u32)
        .map(|weight| BlockId { weight, level: 0 })
        .collect();
    while ids.len() < shapes.len() * levels as usize {
        let w = (rng.next_u64() % shapes.len() as u64) as usize;
        if next[w] < levels {
            ids.push(BlockId {
                weight: w as u32,
                level: next[w],
            });
            next[w] += 1;
        }
    }
    let order = UniversalOrder::new(vec![levels; shapes.len()], ids.clone()).unwrap();
    let layout = ModelLayout {
        stacks,
        order: order.clone(),
        resident_bytes: 0,
    };
    let cum = layout.cumulative_bytes();
    let floor = shapes.len();
    let total = ids.len();
    // 4 % of loads fail, 4 % come back corrupted: most grows of a few dozen blocks fail.
    let faulty = FaultySource::new(pristine.clone(), &ids, levels, 0xfa17, 40, 40);
    // The floor itself must load: retry the open until it does (each try draws new faults).
    let model = {
        let mut tries = 0;
        let faulty = Arc::new(faulty);
        loop {
            tries += 1;
            match ElasticModel::new(
                ArcSource(faulty.clone()),
                layout.clone(),
                MemoryBudget::from_bytes(cum[floor]),
            ) {
                Ok(m) => break Arc::new(m),
                Err(e) => assert!(tries < 50, "open keeps failing: {e}"),
            }
        }
    };
    let src = model.source().0.clone();
    let mut rrng = XorShift::new(99);
    let lo = cum[floor].saturating_sub(1000);
    let hi = cum[total] + 1000;
    let mut random_budget = move || MemoryBudget::from_bytes(lo + rrng.next_u64() % (hi - lo));
    // Warm up: rayon's pool and its queues are allocated once and keep their capacity, so
    // bring them to their steady state with a few hundred resizes before the baseline.
    for _ in 0..300 {
        let _ = model.resize(random_budget());
    }
    model.resize_to_prefix(floor).unwrap();
    // One product starts the kernels' thread pool (allocated once, for the process); the
    // main thread's product scratch is released before each heap reading.
    {
        let snap = model.snapshot();
        let w = snap.weight(0).unwrap();
        let mut y = vec![0.0; w.out_features()];
        w.forward(&vec![0.5; w.in_features()], &mut y).unwrap();
    }
    bitstack_core::release_thread_scratch();
    let baseline = LIVE.load(Ordering::SeqCst);

    let stop = Arc::new(AtomicBool::new(false));
    let checks = Arc::new(AtomicUsize::new(0));
    let mismatches = Arc::new(AtomicUsize::new(0));
    let mut readers = vec![];
    for t in 0..2u64 {
        let (model, stop, checks, mismatches, pristine, order) = (
            model.clone(),
            stop.clone(),
            checks.clone(),
            mismatches.clone(),
            pristine.clone(),
            order.clone(),
        );
        readers.push(std::thread::spawn(move || {
            let mut rng = XorShift::new(t + 77);
            while !stop.load(Ordering::Relaxed) {
                let snap = model.snapshot();
                let bad = check_snapshot(&snap, &order, &pristine, &mut rng);
                mismatches.fetch_add(bad, Ordering::Relaxed);
                checks.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    let deadline = Instant::now() + Duration::from_secs(4);
    let (mut ok, mut failed, mut below_min, mut grows, mut shrinks, mut kept_wrong) =
        (0, 0, 0, 0, 0, 0);
    let mut resizer_checks = 0;
    let mut crng = XorShift::new(7);
    while Instant::now() < deadline && ok + failed + below_min < 20_000 {
        // A random budget anywhere from below the minimum to above the full model.
        let budget = random_budget();
        let before = model.snapshot();
        match model.resize(budget) {
            Ok(r) => {
                ok += 1;
                let p = model.prefix_for_budget(budget).unwrap();
                assert_eq!(r.to_prefix, p);
                if p > before.prefix() {
                    grows += 1;
                } else if p < before.prefix() {
                    shrinks += 1;
                }
            }
            Err(e) => {
                if matches!(e, CoreError::BudgetBelowMinimum { .. }) {
                    below_min += 1;
                } else {
                    assert!(
                        e.to_string().contains("injected") || e.to_string().contains("checksum"),
                        "{e}"
                    );
                    failed += 1;
                }
                // A failed grow (or a budget below the minimum): the old snapshot stays.
                if !Arc::ptr_eq(&before, &model.snapshot()) {
                    kept_wrong += 1;
                }
            }
        }
        drop(before);
        mismatches.fetch_add(
            check_snapshot(&model.snapshot(), &order, &pristine, &mut crng),
            Ordering::Relaxed,
        );
        resizer_checks += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for h in readers {
        h.join().unwrap();
    }
    // Back to the floor: every block beyond it must be freed once no reader holds it.
    model.resize_to_prefix(floor).unwrap();
    let snap = model.snapshot();
    let shared_blocks = snap
        .weights()
        .iter()
        .flat_map(|w| w.blocks())
        .filter(|b| Arc::strong_count(b) != 1)
        .count();
    drop(snap);
    bitstack_core::release_thread_scratch();
    let leaked = LIVE.load(Ordering::SeqCst) - baseline;
    let smallest = pristine
        .blocks
        .iter()
        .map(|w| w[0].heap_bytes())
        .min()
        .unwrap_or(0) as isize;
    let checks = checks.load(Ordering::Relaxed) + resizer_checks;
    let mismatches = mismatches.load(Ordering::Relaxed);
    println!(
        "fault stress: {} resizes ({ok} succeeded: {grows} grows, {shrinks} shrinks; {failed} grows failed on an injected fault; {below_min} budgets below the minimum rejected), {} block loads, {} injected faults ({} I/O errors, {} corrupt blocks caught by checksum), {checks} snapshot checks (products vs dense reference + prefix consistency), {mismatches} mismatches, {kept_wrong} failed resizes that replaced the snapshot, {shared_blocks} blocks still shared at the floor, live heap after shrinking {leaked:+} bytes vs baseline (smallest block {smallest} bytes)",
        ok + failed + below_min,
        src.loads.load(Ordering::Relaxed),
        src.injected(),
        src.failed.load(Ordering::Relaxed),
        src.corrupted.load(Ordering::Relaxed),
    );
    assert!(ok > 20 && failed > 20, "{ok} ok, {failed} failed");
    assert!(src.injected() > 20);
    assert!(checks > 100);
    assert_eq!(mismatches, 0);
    assert_eq!(kept_wrong, 0);
    assert_eq!(shared_blocks, 0);
    // Every block freed: the heap is back to the baseline, within less than the smallest
    // block (so one leaked block, or one leaked scratch buffer, fails the test).
    assert!(
        leaked.abs() < smallest,
        "live heap {leaked:+} bytes vs baseline (smallest block {smallest} bytes)"
    );
}

/// `Arc<FaultySource>` as a source, so the test keeps a handle on the counters.
struct ArcSource<S>(Arc<FaultySource<S>>);

impl<S: BlockSource> BlockSource for ArcSource<S> {
    fn load_block(&self, id: BlockId) -> Result<ResidualBlock, CoreError> {
        self.0.load_block(id)
    }
}
