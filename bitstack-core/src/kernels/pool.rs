//! A small spinning task pool for the decode kernels.
//!
//! A decode step of a 135M model makes ~210 products of a few microseconds each. Through
//! rayon, every product wakes sleeping workers with a futex and they fall asleep again before
//! the next one: measured on SmolLM2 at 105 MB, a fifth of the decode time went to
//! `futex_wake`/`futex_wait`. This pool's workers spin on a generation counter between jobs
//! (parking after [`SPIN`] without work), so a dispatch costs an atomic store and a cache-line
//! transfer, as in llama.cpp's thread pool.
//!
//! One job runs at a time; a caller that finds the pool busy (another thread's product, or a
//! task calling back in) runs its tasks itself, so the pool never deadlocks. Each task learns
//! which of the [`slots`] it runs on, so callers can give every slot its own scratch.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_micros(500);

/// The job being run: tasks `0..n` of `f`, handed out by `next`.
struct Job<'a> {
    f: &'a (dyn Fn(usize, usize) + Sync),
    n: usize,
    next: AtomicUsize,
    finished: AtomicUsize,
}

struct Pool {
    workers: usize,
    /// Bumped once per job; workers wait for it to change.
    generation: AtomicUsize,
    /// The generation whose job the caller has closed: workers arriving late skip it.
    closed: AtomicUsize,
    /// Workers inside the current job (they may be reading `job`).
    in_job: AtomicUsize,
    /// Workers waiting on `wake` (the caller notifies only when some are).
    parked: AtomicUsize,
    job: AtomicPtr<Job<'static>>,
    busy: AtomicBool,
    park: Mutex<()>,
    wake: Condvar,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let workers = rayon::current_num_threads().saturating_sub(1);
        let p: &'static Pool = Box::leak(Box::new(Pool {
            workers,
            generation: AtomicUsize::new(0),
            closed: AtomicUsize::new(0),
            in_job: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            busy: AtomicBool::new(false),
            park: Mutex::new(()),
            wake: Condvar::new(),
        }));
        for i in 0..workers {
            let spawned = std::thread::Builder::new()
                .name(format!("bitstack-kernel-{i}"))
                .spawn(move || worker(p, i + 1));
            if spawned.is_err() {
                // Fewer workers only means less parallelism: the caller runs every task
                // it does not see taken.
                break;
            }
        }
        p
    })
}

fn worker(p: &'static Pool, slot: usize) {
    let mut seen = p.generation.load(SeqCst);
    loop {
        let start = Instant::now();
        let mut gen = p.generation.load(SeqCst);
        let mut spins = 0u32;
        while gen == seen {
            spins = spins.wrapping_add(1);
            // Reading the clock costs ~20 ns (a vDSO call): look at it every 256 spins only.
            if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                let guard = p.park.lock().unwrap_or_else(|e| e.into_inner());
                // Announce, then re-check under the lock: the caller bumps the generation
                // before reading `parked`, and notifies holding the lock, so a wake-up
                // cannot fall between check and wait.
                p.parked.fetch_add(1, SeqCst);
                if p.generation.load(SeqCst) == seen {
                    let _g = p
                        .wake
                        .wait_timeout(guard, Duration::from_millis(50))
                        .unwrap_or_else(|e| e.into_inner());
                }
                p.parked.fetch_sub(1, SeqCst);
            } else if spins < 128 {
                std::hint::spin_loop();
            } else {
                // Keep polling but let other runnable threads (rayon's, the caller's) have
                // the core: on 2 cores a pure spin would stretch every parallel section that
                // runs between two products.
                std::thread::yield_now();
            }
            gen = p.generation.load(SeqCst);
        }
        seen = gen;
        p.in_job.fetch_add(1, SeqCst);
        if p.closed.load(SeqCst) != gen {
            let job = p.job.load(SeqCst);
            // SAFETY: the job outlives every worker counted in `in_job` whose generation is
            // not yet closed: `run` closes the generation, then waits for `in_job` to reach
            // 0 before its `Job` (on its stack) goes out of scope.
            if let Some(job) = unsafe { job.as_ref() } {
                run_tasks(job, slot);
            }
        }
        p.in_job.fetch_sub(1, SeqCst);
    }
}

fn run_tasks(job: &Job<'_>, slot: usize) {
    loop {
        let i = job.next.fetch_add(1, SeqCst);
        if i >= job.n {
            break;
        }
        (job.f)(i, slot);
        job.finished.fetch_add(1, SeqCst);
    }
}

/// Threads a job can run on: the caller (slot 0) and the workers (slots `1..`). A task's
/// slot is below this, and no two tasks run on one slot at once.
pub(crate) fn slots() -> usize {
    pool().workers + 1
}

/// Runs `f(0, slot)`, ..., `f(n - 1, slot)` on the calling thread and the pool's workers;
/// returns when all are done. Tasks must not panic (the kernels' tasks index checked buffers
/// only).
pub(crate) fn run(n: usize, f: &(dyn Fn(usize, usize) + Sync)) {
    if n == 0 {
        return;
    }
    let p = pool();
    if n == 1
        || p.workers == 0
        || p.busy
            .compare_exchange(false, true, SeqCst, SeqCst)
            .is_err()
    {
        (0..n).for_each(|i| f(i, 0));
        return;
    }
    let job = Job {
        f,
        n,
        next: AtomicUsize::new(0),
        finished: AtomicUsize::new(0),
    };
    // The pointer is only dereferenced while this call waits below (see `worker`).
    p.job
        .store((&job as *const Job<'_>).cast_mut().cast(), SeqCst);
    let gen = p.generation.fetch_add(1, SeqCst) + 1;
    if p.parked.load(SeqCst) > 0 {
        let _guard = p.park.lock().unwrap_or_else(|e| e.into_inner());
        p.wake.notify_all();
    }
    run_tasks(&job, 0);
    while job.finished.load(SeqCst) < n {
        std::hint::spin_loop();
    }
    p.closed.store(gen, SeqCst);
    while p.in_job.load(SeqCst) != 0 {
        std::hint::spin_loop();
    }
    p.job.store(std::ptr::null_mut(), SeqCst);
    p.busy.store(false, SeqCst);
}

/// A small-batch GEMV split into tiles of `tile_rows` output rows on the pool: `tile(r0, out)`
/// writes rows `r0..r0 + out.len() / batch` row-major (`out[i · batch + β]` is row `r0 + i`
/// of item `β`), and the tiles are then laid out item-major into `y` (`y[β · rows + r]`).
/// One token writes `y` in place; a batch goes through a row-major buffer and one transpose.
/// `y` must hold `rows · batch` values (callers check shapes first).
pub(crate) fn gemv_row_tiles(
    rows: usize,
    batch: usize,
    tile_rows: usize,
    y: &mut [f32],
    tile: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    debug_assert_eq!(y.len(), rows * batch);
    let mut yt = if batch == 1 {
        Vec::new()
    } else {
        vec![0.0f32; rows * batch]
    };
    let out_ptr = super::SyncPtr(if batch == 1 {
        y.as_mut_ptr()
    } else {
        yt.as_mut_ptr()
    });
    run(rows.div_ceil(tile_rows), &|task, _slot| {
        let r0 = task * tile_rows;
        let n = tile_rows.min(rows - r0);
        // SAFETY: task `task` alone owns rows r0..r0 + n of the rows × batch output (`y`
        // itself when batch is 1, else `yt`), which holds rows · batch floats.
        let out =
            unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(r0 * batch), n * batch) };
        tile(r0, out);
    });
    if batch > 1 {
        for (i, row) in yt.chunks_exact(batch).enumerate() {
            for (bi, v) in row.iter().enumerate() {
                y[bi * rows + i] = *v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_every_task_once_including_concurrent_and_nested_callers() {
        let hits: Vec<AtomicUsize> = (0..97).map(|_| AtomicUsize::new(0)).collect();
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..200 {
                        run(hits.len(), &|i, slot| {
                            assert!(slot < slots());
                            hits[i].fetch_add(1, SeqCst);
                            if i == 5 {
                                // A task calling back in runs its tasks itself: no deadlock.
                                run(3, &|_, _| {});
                            }
                        });
                    }
                });
            }
        });
        for h in &hits {
            assert_eq!(h.load(SeqCst), 600);
        }
    }

    #[test]
    fn row_tiles_land_item_major_for_every_batch_and_ragged_last_tile() {
        for batch in [1usize, 2, 5] {
            let rows = 37;
            let mut y = vec![f32::NAN; rows * batch];
            gemv_row_tiles(rows, batch, 8, &mut y, &|r0, out| {
                for (i, row) in out.chunks_exact_mut(batch).enumerate() {
                    for (b, v) in row.iter_mut().enumerate() {
                        *v = ((r0 + i) * 10 + b) as f32;
                    }
                }
            });
            for b in 0..batch {
                for r in 0..rows {
                    assert_eq!(y[b * rows + r], (r * 10 + b) as f32, "batch {batch}");
                }
            }
        }
    }
}
