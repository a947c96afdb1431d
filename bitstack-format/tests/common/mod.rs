//! Shared helpers: random stack-file contents and unique temp directories.
#![allow(dead_code)]

use bitstack_core::testutil::{random_block, random_block_with, XorShift};
use bitstack_core::{BlockId, StackMeta, UniversalOrder};
use bitstack_format::{ResidentTensor, StackFileContents};
use half::f16;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// A fresh empty directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "bitstack-format-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    pub fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Random valid contents: `weights` stacks with odd shapes (cols not a multiple of 64 too),
/// optional scales, metadata with text and binary values, residents of every dtype, and a
/// random valid universal order.
pub fn random_contents(seed: u64, weights: usize) -> StackFileContents {
    let mut rng = XorShift::new(seed);
    let mut pick = |n: u64| (rng.next_u64() % n) as usize;
    let mut stacks = Vec::new();
    let mut blocks = Vec::new();
    for w in 0..weights {
        let rows = 1 + pick(20);
        let cols = 1 + pick(150);
        let rank = 1 + pick(4);
        let levels = 1 + pick(3) as u16;
        let scale = (pick(2) == 0).then(|| (0..cols).map(|j| 0.25 + j as f32 * 0.01).collect());
        stacks.push(StackMeta {
            name: format!("blk.{w}.w"),
            rows,
            cols,
            rank,
            levels,
            scale,
            factors: bitstack_core::FactorDtype::F16,
        });
        blocks.push(
            (0..levels)
                .map(|l| random_block(rows, cols, rank, seed ^ ((w as u64) << 20) ^ l as u64))
                .collect(),
        );
    }
    let levels: Vec<u16> = stacks.iter().map(|m| m.levels).collect();
    // Random valid order: the floor, then repeatedly the next level of a random weight.
    let mut order: Vec<BlockId> = (0..weights as u32).map(|w| BlockId::new(w, 0)).collect();
    let mut next = vec![1u16; weights];
    while order.len() < levels.iter().map(|&l| l as usize).sum() {
        let w = pick(weights as u64);
        if next[w] < levels[w] {
            order.push(BlockId::new(w as u32, next[w]));
            next[w] += 1;
        }
    }
    let n = 1 + pick(40);
    let residents = vec![
        ResidentTensor::from_f32(
            "norm",
            vec![n as u64],
            &(0..n).map(|i| i as f32 - 3.5).collect::<Vec<_>>(),
        )
        .unwrap(),
        ResidentTensor::from_f16(
            "emb",
            vec![2, n as u64],
            &(0..2 * n)
                .map(|i| f16::from_f32(i as f32 * 0.5))
                .collect::<Vec<_>>(),
        )
        .unwrap(),
        ResidentTensor::blob(
            "tokenizer.json",
            (0..pick(100)).map(|i| (i * 7) as u8).collect(),
        ),
    ];
    StackFileContents {
        metadata: [
            ("config".to_string(), br#"{"hidden":64}"#.to_vec()),
            ("raw".to_string(), vec![0, 255, 1, 254]),
            (format!("seed-{seed}"), Vec::new()),
        ]
        .into(),
        residents,
        stacks,
        blocks,
        order: UniversalOrder::new(levels, order).unwrap(),
    }
}

/// Bytes of a valid file for `random_contents(seed, weights)`.
pub fn file_bytes(dir: &TempDir, seed: u64, weights: usize) -> Vec<u8> {
    let p = dir.join("f.bstk");
    bitstack_format::write_stack_file(&p, &random_contents(seed, weights)).unwrap();
    std::fs::read(p).unwrap()
}

/// [`random_contents`] with int8 factors on every other stack (0, 2, ...), f16 on the rest:
/// a format-2 file.
#[allow(dead_code)] // not every test binary uses it
pub fn random_contents_i8(seed: u64, weights: usize) -> StackFileContents {
    let mut c = random_contents(seed, weights);
    for (w, (m, blocks)) in c.stacks.iter_mut().zip(&mut c.blocks).enumerate() {
        if w % 2 == 0 {
            m.factors = bitstack_core::FactorDtype::I8;
            for (l, b) in blocks.iter_mut().enumerate() {
                *b = random_block_with(
                    m.rows,
                    m.cols,
                    m.rank,
                    seed ^ ((w as u64) << 24) ^ l as u64,
                    m.factors,
                );
            }
        }
    }
    c
}

/// Bytes of a valid file for `random_contents_i8(seed, weights)`.
#[allow(dead_code)]
pub fn file_bytes_i8(dir: &TempDir, seed: u64, weights: usize) -> Vec<u8> {
    let p = dir.join("f8.bstk");
    bitstack_format::write_stack_file(&p, &random_contents_i8(seed, weights)).unwrap();
    std::fs::read(p).unwrap()
}
