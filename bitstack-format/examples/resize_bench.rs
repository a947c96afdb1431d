//! Measures how fast the elastic runtime grows and shrinks over a memory-mapped stack file.
//!
//! ```text
//! cargo build --release -p bitstack-format --example resize_bench
//! target/release/examples/resize_bench [--reps 5] [--weights 24] [--dim 2048] [--rank 16]
//!                                      [--levels 16]
//! ```
//!
//! Writes a temporary stack file of `weights` random `dim × dim` stacks of `levels` rank-`rank`
//! blocks (defaults: 24 × 16 blocks of 2048×2048, k = 16, 0.66 MB each, 252 MB in all), opens
//! it with [`StackFile::open`] and drives an [`ElasticModel`] between its minimum (one block
//! per weight) and full size `reps` times, reporting medians of:
//!
//! * grow min → full after [`StackFile::release_pages`] (pages refault from the page cache),
//! * grow min → full with the file pages still mapped from the previous grow,
//! * shrink full → min,
//!
//! each in MB/s (MB = 10^6 bytes of block payload moved) both as timed by the runtime
//! ([`ResizeReport::elapsed`]) and as wall time around the call (which for a shrink also
//! includes freeing the dropped blocks, done after the report's clock stops). The baseline is
//! `std::fs::read` of the whole file into fresh memory in the same run. The file was just
//! written, so the page cache is warm throughout: cold-cache (disk) numbers are not measured.

use bitstack_core::testutil::XorShift;
use bitstack_core::{
    BlockId, ElasticModel, MemoryBudget, ResidualBlock, ResizeReport, UniversalOrder,
};
use bitstack_format::{FileDescription, StackFile, StackFileWriter};
use half::f16;
use std::time::{Duration, Instant};

mod common;

struct Args {
    reps: usize,
    weights: usize,
    dim: usize,
    rank: usize,
    levels: u16,
}

fn parse_args() -> Result<Args, Box<dyn std::error::Error>> {
    let mut a = Args {
        reps: 5,
        weights: 24,
        dim: 2048,
        rank: 16,
        levels: 16,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--reps" => a.reps = value()?.parse()?,
            "--weights" => a.weights = value()?.parse()?,
            "--dim" => a.dim = value()?.parse()?,
            "--rank" => a.rank = value()?.parse()?,
            "--levels" => a.levels = value()?.parse()?,
            "-h" | "--help" => {
                println!("resize_bench [--reps N] [--weights N] [--dim N] [--rank N] [--levels N]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    if a.reps == 0 || a.weights == 0 || a.dim == 0 || a.rank == 0 || a.levels < 2 {
        return Err("reps, weights, dim and rank must be positive and levels at least 2".into());
    }
    Ok(a)
}

/// A random block from raw random words: random signs (`dim` is padded to whole words with
/// zeros) and factors uniform in [-1, 1).
fn random_block(rows: usize, cols: usize, rank: usize, rng: &mut XorShift) -> ResidualBlock {
    let wpr = cols.div_ceil(64);
    let tail = cols % 64;
    let signs = (0..rows * wpr)
        .map(|i| {
            let w = rng.next_u64();
            if tail != 0 && i % wpr == wpr - 1 {
                w & ((1u64 << tail) - 1)
            } else {
                w
            }
        })
        .collect();
    let mut f = |n: usize| (0..n).map(|_| f16::from_f32(rng.next_f32())).collect();
    let (a, b) = (f(rows * rank), f(cols * rank));
    ResidualBlock::new(rows, cols, rank, signs, a, b).expect("valid by construction")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn mbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / 1e6 / t.as_secs_f64()
}

/// Per-rep throughputs of one kind of resize: as timed by the runtime and as wall time.
#[derive(Default)]
struct Series {
    reported: Vec<f64>,
    wall: Vec<f64>,
    bytes: u64,
}

impl Series {
    fn record(&mut self, r: &ResizeReport, wall: Duration, grow: bool) {
        let bytes = if grow {
            r.bytes_loaded
        } else {
            r.bytes_dropped
        };
        self.bytes = bytes;
        self.reported.push(mbps(bytes, r.elapsed));
        self.wall.push(mbps(bytes, wall));
    }
    fn print(&self, what: &str, baseline: f64) {
        let (rep, wall) = (median(self.reported.clone()), median(self.wall.clone()));
        println!(
            "{what:<40} {:>8.1} MB moved   median {rep:>9.1} MB/s (runtime clock)   {wall:>9.1} MB/s (wall)   {:.2}x read baseline (wall)",
            self.bytes as f64 / 1e6,
            wall / baseline
        );
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = parse_args()?;
    println!(
        "reproduce: cargo build --release -p bitstack-format --example resize_bench && \
         target/release/examples/resize_bench --reps {} --weights {} --dim {} --rank {} --levels {}",
        a.reps, a.weights, a.dim, a.rank, a.levels
    );
    println!(
        "threads available: {}; page cache warm (file just written; cold-cache I/O not measured)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    let desc = common::f16_description(
        a.weights,
        |w| format!("blk.{w}.w"),
        (a.dim, a.dim),
        a.rank,
        a.levels,
    );
    let dir = std::env::temp_dir().join(format!("bitstack-resize-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("bench.bstk");
    let result = run(&a, &desc, &path);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(
    a: &Args,
    desc: &FileDescription,
    path: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let t = Instant::now();
    let mut writer = StackFileWriter::create(path, desc)?;
    let mut rng = XorShift::new(0x5EED);
    for w in 0..a.weights {
        for l in 0..a.levels {
            let b = random_block(a.dim, a.dim, a.rank, &mut rng);
            writer.write_block(BlockId::new(w as u32, l), b.view())?;
        }
    }
    writer.finish(UniversalOrder::round_robin(vec![a.levels; a.weights])?)?;
    let file_len = std::fs::metadata(path)?.len();
    println!(
        "file: {} weights x {} levels of {d}x{d} k={}, {:.1} MB, generated+written in {:.1} s",
        a.weights,
        a.levels,
        a.rank,
        file_len as f64 / 1e6,
        t.elapsed().as_secs_f64(),
        d = a.dim
    );

    // Baseline: the whole file into fresh memory, as a grow copies blocks into fresh memory.
    let mut reads = Vec::new();
    for _ in 0..a.reps {
        let t = Instant::now();
        let data = std::fs::read(path)?;
        let el = t.elapsed();
        assert_eq!(data.len() as u64, file_len);
        drop(data);
        reads.push(mbps(file_len, el));
    }
    let baseline = median(reads);
    println!(
        "{:<40} {:>8.1} MB moved   median {baseline:>9.1} MB/s",
        "baseline std::fs::read (whole file)",
        file_len as f64 / 1e6
    );

    let file = StackFile::open(path)?;
    let layout = file.layout();
    let (min, full) = (layout.minimum_bytes(), layout.full_bytes());
    let model = ElasticModel::new(file, layout, MemoryBudget::from_bytes(min))?;
    println!(
        "elastic model: minimum {:.1} MB, full {:.1} MB (held bytes incl. residents)",
        min as f64 / 1e6,
        full as f64 / 1e6
    );
    let (mut grow_released, mut grow_mapped, mut shrink) =
        (Series::default(), Series::default(), Series::default());
    let timed = |budget: u64| -> Result<(ResizeReport, Duration), Box<dyn std::error::Error>> {
        let t = Instant::now();
        let r = model.resize(MemoryBudget::from_bytes(budget))?;
        Ok((r, t.elapsed()))
    };
    for _ in 0..a.reps {
        model.source().release_pages();
        let (r, w) = timed(full)?;
        assert_eq!(r.to_bytes, full);
        grow_released.record(&r, w, true);
        let (r, w) = timed(min)?;
        assert_eq!(r.to_bytes, min);
        shrink.record(&r, w, false);
        // The previous grow left the file's pages mapped.
        let (r, w) = timed(full)?;
        grow_mapped.record(&r, w, true);
        let (r, w) = timed(min)?;
        shrink.record(&r, w, false);
    }
    grow_released.print("grow min->full after release_pages", baseline);
    grow_mapped.print("grow min->full, pages still mapped", baseline);
    shrink.print("shrink full->min", baseline);
    println!(
        "(grow = verified copy of each block: XXH64 check + copy into owned memory, in parallel; \
         {} reps, shrink {} samples; MB = 10^6 bytes)",
        a.reps,
        2 * a.reps
    );
    Ok(())
}
