//! Write → read round trips, byte-exact rewrites, re-ordering and runtime integration.

mod common;

use bitstack_core::{BlockId, BlockSource, ElasticModel, MemoryBudget, UniversalOrder};
use bitstack_format::{
    write_stack_file, DType, FormatError, StackFile, StackFileContents, StackFileWriter,
};
use common::{random_contents, random_contents_i8, TempDir};
use proptest::prelude::*;

fn assert_matches(file: &StackFile, c: &StackFileContents) {
    assert_eq!(file.metadata(), &c.metadata);
    assert_eq!(file.order(), &c.order);
    let metas: Vec<_> = file.stacks().iter().map(|m| (**m).clone()).collect();
    assert_eq!(metas, c.stacks);
    for (w, levels) in c.blocks.iter().enumerate() {
        for (l, b) in levels.iter().enumerate() {
            let id = BlockId::new(w as u32, l as u16);
            assert_eq!(&file.block_view(id).unwrap().to_owned(), b);
            assert_eq!(&file.read_block(id).unwrap(), b);
            assert_eq!(&file.load_block(id).unwrap(), b);
        }
    }
    let residents: Vec<_> = file.residents().map(|t| t.to_owned()).collect();
    assert_eq!(residents, c.residents);
    let layout = file.layout();
    assert_eq!(
        layout.resident_bytes,
        c.residents.iter().map(|t| t.data.len() as u64).sum::<u64>()
    );
    assert_eq!(layout.order, c.order);
    layout.validate().unwrap();
}

#[test]
fn round_trip_mmap_and_bytes() {
    let dir = TempDir::new("rt");
    let c = random_contents(7, 5);
    let p = dir.join("m.bstk");
    write_stack_file(&p, &c).unwrap();
    let mapped = StackFile::open(&p).unwrap();
    assert_eq!(mapped.version(), (1, 0));
    assert_matches(&mapped, &c);
    assert_eq!(mapped.to_contents().unwrap(), c);
    let bytes = std::fs::read(&p).unwrap();
    assert_matches(&StackFile::from_bytes(&bytes).unwrap(), &c);
    // A deliberately misaligned source buffer still parses (from_bytes copies to alignment).
    let mut shifted = vec![0u8; bytes.len() + 3];
    shifted[3..].copy_from_slice(&bytes);
    assert_matches(&StackFile::from_bytes(&shifted[3..]).unwrap(), &c);
    // Only the final file is left behind.
    assert_eq!(dir.entries(), vec!["m.bstk".to_string()]);
}

/// Int8-factor stacks (mixed with f16 ones) round-trip through a format-2 file, mapped and
/// from bytes, with payloads of exactly `block_bytes` (codes plus scales), and re-encode
/// byte for byte.
#[test]
fn i8_factor_round_trip_is_format_2() {
    let dir = TempDir::new("rt8");
    let c = random_contents_i8(7, 5);
    assert!(c
        .stacks
        .iter()
        .any(|m| m.factors == bitstack_core::FactorDtype::I8));
    assert!(c
        .stacks
        .iter()
        .any(|m| m.factors == bitstack_core::FactorDtype::F16));
    let p = dir.join("m8.bstk");
    write_stack_file(&p, &c).unwrap();
    let mapped = StackFile::open(&p).unwrap();
    assert_eq!(mapped.version(), (2, 0));
    assert_matches(&mapped, &c);
    assert_eq!(mapped.to_contents().unwrap(), c);
    for (w, m) in c.stacks.iter().enumerate() {
        let (_, len) = mapped.block_extent(BlockId::new(w as u32, 0)).unwrap();
        assert_eq!(len, m.block_bytes());
        assert_eq!(
            len,
            bitstack_core::block_bytes(m.rows, m.cols, m.rank, m.factors)
        );
    }
    let bytes = std::fs::read(&p).unwrap();
    assert_matches(&StackFile::from_bytes(&bytes).unwrap(), &c);
    let q = dir.join("again.bstk");
    write_stack_file(&q, &mapped.to_contents().unwrap()).unwrap();
    assert_eq!(std::fs::read(&q).unwrap(), bytes);
    // The same contents with every stack f16 are a 1.0 file, as before.
    let c16 = random_contents(7, 5);
    write_stack_file(&q, &c16).unwrap();
    assert_eq!(StackFile::open(&q).unwrap().version(), (1, 0));
}

#[test]
fn resident_views_decode() {
    let dir = TempDir::new("res");
    let c = random_contents(3, 2);
    let p = dir.join("r.bstk");
    write_stack_file(&p, &c).unwrap();
    let f = StackFile::open(&p).unwrap();
    let norm = f.resident("norm").unwrap();
    assert_eq!(norm.dtype(), DType::F32);
    let expected: Vec<f32> = (0..norm.shape()[0]).map(|i| i as f32 - 3.5).collect();
    assert_eq!(norm.to_f32().unwrap(), expected);
    assert_eq!(norm.as_f32().unwrap(), expected.as_slice()); // zero-copy: aligned by the format
    let emb = f.resident("emb").unwrap();
    assert_eq!(emb.to_f32().unwrap()[3], 1.5);
    assert!(f.resident("tokenizer.json").unwrap().to_f32().is_err());
    assert!(f.resident("missing").is_none());
    assert_eq!(f.metadata_str("config"), Some(r#"{"hidden":64}"#));
    assert_eq!(f.metadata_str("raw"), None); // not UTF-8
    assert_eq!(f.metadata()["raw"], vec![0, 255, 1, 254]);
}

#[test]
fn every_payload_is_64_byte_aligned() {
    let dir = TempDir::new("align");
    let c = random_contents(11, 6);
    let p = dir.join("a.bstk");
    write_stack_file(&p, &c).unwrap();
    let f = StackFile::open(&p).unwrap();
    for id in f.order().as_slice() {
        let (off, len) = f.block_extent(*id).unwrap();
        assert_eq!(off % 64, 0);
        assert_eq!(len, f.stacks()[id.weight as usize].block_bytes());
        let v = f.block_view(*id).unwrap();
        assert_eq!(v.signs.words().as_ptr() as usize % 64, 0);
    }
    assert!(matches!(
        f.block_view(BlockId::new(99, 0)),
        Err(FormatError::NoSuchBlock {
            weight: 99,
            level: 0
        })
    ));
    assert!(matches!(
        f.load_block(BlockId::new(0, 50)),
        Err(bitstack_core::CoreError::NoSuchBlock { .. })
    ));
}

#[test]
fn streaming_writer_accepts_any_block_order() {
    let dir = TempDir::new("stream");
    let c = random_contents(5, 4);
    let (p1, p2) = (dir.join("a.bstk"), dir.join("b.bstk"));
    write_stack_file(&p1, &c).unwrap();
    let mut w = StackFileWriter::create(&p2, &c.description()).unwrap();
    // Reverse order of everything: blocks, then residents.
    for (wi, levels) in c.blocks.iter().enumerate().rev() {
        for (l, b) in levels.iter().enumerate().rev() {
            w.write_block(BlockId::new(wi as u32, l as u16), b.view())
                .unwrap();
        }
    }
    for (i, t) in c.residents.iter().enumerate().rev() {
        w.write_resident(i, &t.data).unwrap();
    }
    // Misuse is rejected without spoiling the writer.
    assert!(w
        .write_block(BlockId::new(0, 0), c.blocks[0][0].view())
        .is_err());
    assert!(w.write_resident(0, &[1, 2, 3]).is_err());
    w.finish(c.order.clone()).unwrap();
    assert_eq!(std::fs::read(&p1).unwrap(), std::fs::read(&p2).unwrap());
}

#[test]
fn writer_rejects_wrong_shapes_and_orders() {
    let dir = TempDir::new("shape");
    let c = random_contents(9, 2);
    let p = dir.join("s.bstk");
    let mut w = StackFileWriter::create(&p, &c.description()).unwrap();
    let wrong = bitstack_core::testutil::random_block(
        c.stacks[0].rows + 1,
        c.stacks[0].cols,
        c.stacks[0].rank,
        1,
    );
    assert!(matches!(
        w.write_block(BlockId::new(0, 0), wrong.view()),
        Err(FormatError::InvalidInput(_))
    ));
    drop(w);
    // An order for different levels is rejected at finish.
    let mut w = StackFileWriter::create(&p, &c.description()).unwrap();
    for (i, t) in c.residents.iter().enumerate() {
        w.write_resident(i, &t.data).unwrap();
    }
    for (wi, levels) in c.blocks.iter().enumerate() {
        for (l, b) in levels.iter().enumerate() {
            w.write_block(BlockId::new(wi as u32, l as u16), b.view())
                .unwrap();
        }
    }
    let mut levels = c.order.levels().to_vec();
    levels[0] += 1;
    assert!(w
        .finish(UniversalOrder::round_robin(levels).unwrap())
        .is_err());
    assert!(dir.entries().is_empty(), "{:?}", dir.entries());
    // Duplicate stack names are rejected up front.
    let mut d = c.description();
    d.stacks[1].name = d.stacks[0].name.clone();
    assert!(StackFileWriter::create(&p, &d).is_err());
}

#[test]
fn rewrite_with_new_order_keeps_blocks() {
    let dir = TempDir::new("reorder");
    let c = random_contents(21, 4);
    let p = dir.join("o.bstk");
    write_stack_file(&p, &c).unwrap();
    let f = StackFile::open(&p).unwrap();
    let rr = UniversalOrder::round_robin(c.order.levels().to_vec()).unwrap();
    // Same path: atomic replacement while `f` still maps the old file.
    f.write_with_order(&p, rr.clone()).unwrap();
    let g = StackFile::open(&p).unwrap();
    assert_eq!(g.order(), &rr);
    let mut expected = c.clone();
    expected.order = rr;
    assert_matches(&g, &expected);
    assert_matches(&f, &c);
}

#[test]
fn drives_the_elastic_runtime() {
    let dir = TempDir::new("elastic");
    let c = random_contents(13, 3);
    let p = dir.join("e.bstk");
    write_stack_file(&p, &c).unwrap();
    let f = StackFile::open(&p).unwrap();
    let layout = f.layout();
    let full = layout.full_bytes();
    let model = ElasticModel::new(f, layout, MemoryBudget::from_bytes(full)).unwrap();
    let snap = model.snapshot();
    for (w, levels) in c.blocks.iter().enumerate() {
        let ws = snap.weight(w).unwrap();
        assert_eq!(ws.loaded_levels(), levels.len());
        for (b, loaded) in levels.iter().zip(ws.blocks()) {
            assert_eq!(b, loaded.as_ref());
        }
    }
}

/// Releasing the mapped pages (with a view still borrowed) loses nothing: every block, the
/// earlier view and the residents read back identical, and releasing again or on an in-memory
/// file is harmless.
#[test]
fn reads_after_release_pages_are_identical() {
    let dir = TempDir::new("release");
    let c = random_contents(23, 5);
    let p = dir.join("r.bstk");
    write_stack_file(&p, &c).unwrap();
    let f = StackFile::open(&p).unwrap();
    let first = *f.order().as_slice().first().unwrap();
    let view = f.block_view(first).unwrap();
    let before: Vec<_> = f
        .order()
        .as_slice()
        .iter()
        .map(|id| f.read_block(*id).unwrap())
        .collect();
    f.release_pages();
    assert_eq!(view.to_owned(), before[0]);
    for round in 0..2 {
        for (id, b) in f.order().as_slice().iter().zip(&before) {
            assert_eq!(&f.read_block(*id).unwrap(), b, "round {round}");
            assert_eq!(b, &c.blocks[id.weight as usize][id.level as usize]);
        }
        f.release_pages();
    }
    assert_matches(&f, &c);
    f.verify_all().unwrap();

    let owned = StackFile::from_bytes(&std::fs::read(&p).unwrap()).unwrap();
    owned.release_pages();
    assert_matches(&owned, &c);
}

#[test]
fn concurrent_loads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<StackFile>();
    let dir = TempDir::new("threads");
    let c = random_contents(17, 6);
    let p = dir.join("t.bstk");
    write_stack_file(&p, &c).unwrap();
    let f = StackFile::open(&p).unwrap();
    std::thread::scope(|s| {
        for t in 0..4 {
            let (f, c) = (&f, &c);
            s.spawn(move || {
                for id in f.order().as_slice().iter().skip(t) {
                    assert_eq!(
                        f.read_block(*id).unwrap(),
                        c.blocks[id.weight as usize][id.level as usize]
                    );
                }
            });
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Writing what was read back reproduces the file byte for byte (the encoding is canonical).
    #[test]
    fn rewrite_is_byte_identical(seed in any::<u64>(), weights in 1usize..5) {
        let dir = TempDir::new("prop");
        let c = random_contents(seed, weights);
        let (a, b) = (dir.join("a.bstk"), dir.join("b.bstk"));
        write_stack_file(&a, &c).unwrap();
        let bytes = std::fs::read(&a).unwrap();
        let back = StackFile::from_bytes(&bytes).unwrap().to_contents().unwrap();
        prop_assert_eq!(&back, &c);
        write_stack_file(&b, &back).unwrap();
        prop_assert_eq!(std::fs::read(&b).unwrap(), bytes);
    }
}
