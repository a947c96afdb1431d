//! Measures checksum and block-load throughput of a stack file.
//!
//! `cargo run --release -p bitstack-format --example throughput [BLOCKS]`
//!
//! Writes a temporary file of `BLOCKS` (default 96) 4096×4096 rank-16 blocks (2.36 MB each, a
//! LLaMA-7B attention projection), then times, with the file in the page cache:
//! XXH64 over the whole file, owned block loads with and without checksum verification, and
//! verified zero-copy views.

use bitstack_core::testutil::random_block;
use bitstack_core::{BlockId, UniversalOrder};
use bitstack_format::checksum::xxh64;
use bitstack_format::{StackFile, StackFileWriter};
use std::time::Instant;

mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let total: usize = std::env::args().nth(1).map_or(Ok(96), |s| s.parse())?;
    let (rows, cols, rank, weights) = (4096, 4096, 16, 8usize);
    let levels = total.div_ceil(weights) as u16;
    let desc = common::f16_description(weights, |w| format!("w{w}"), (rows, cols), rank, levels);
    let path =
        std::env::temp_dir().join(format!("bitstack-throughput-{}.bstk", std::process::id()));

    // One random block per weight, reused for every level: generation is not what we measure.
    let proto: Vec<_> = (0..weights)
        .map(|w| random_block(rows, cols, rank, w as u64))
        .collect();
    let t = Instant::now();
    let mut writer = StackFileWriter::create(&path, &desc)?;
    for (w, block) in proto.iter().enumerate() {
        for l in 0..levels {
            writer.write_block(BlockId::new(w as u32, l), block.view())?;
        }
    }
    writer.finish(UniversalOrder::round_robin(vec![levels; weights])?)?;
    let write_s = t.elapsed().as_secs_f64();

    let file = StackFile::open(&path)?;
    let bytes = file.file_len() as f64;
    let gbps = |secs: f64| bytes / secs / 1e9;
    println!(
        "file: {} blocks of {rows}x{cols} k={rank}, {:.1} MB; write+fsync {:.2} s ({:.2} GB/s)",
        file.order().len(),
        bytes / 1e6,
        write_s,
        gbps(write_s)
    );

    let data = std::fs::read(&path)?;
    let best = |f: &mut dyn FnMut()| {
        (0..5)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let mut sink = 0u64;
    let s = best(&mut || sink ^= xxh64(&data, 0));
    println!("xxh64 over the file:            {:6.2} GB/s", gbps(s));

    let ids: Vec<BlockId> = file.order().as_slice().to_vec();
    let s = best(&mut || {
        for id in &ids {
            sink ^= file
                .block_view_unverified(*id)
                .unwrap()
                .to_owned()
                .sign_words()[0];
        }
    });
    println!("owned load, no checksum:        {:6.2} GB/s", gbps(s));
    let s = best(&mut || {
        for id in &ids {
            sink ^= file.read_block(*id).unwrap().sign_words()[0];
        }
    });
    println!("owned load, checksum verified:  {:6.2} GB/s", gbps(s));
    let s = best(&mut || {
        for id in &ids {
            sink ^= file.block_view(*id).unwrap().signs.words()[0];
        }
    });
    println!("zero-copy view, verified:       {:6.2} GB/s", gbps(s));
    std::hint::black_box(sink);
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(())
}
