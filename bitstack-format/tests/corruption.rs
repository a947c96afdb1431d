//! Hostile input: truncation, byte flips, forged headers, failed writes. Nothing may panic and
//! every corruption must surface as an error at open or at block load.

mod common;

use bitstack_core::testutil::XorShift;
use bitstack_core::{BlockId, StackMeta, UniversalOrder};
use bitstack_format::checksum::xxh64;
use bitstack_format::{
    write_stack_file, FileDescription, FormatError, StackFile, StackFileWriter, PREAMBLE_LEN,
};
use common::{file_bytes, file_bytes_i8, random_contents, random_contents_i8, TempDir};

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().unwrap())
}

/// Recomputes the header and preamble checksums after a deliberate edit, so the edit reaches
/// the structural validation instead of being caught by a checksum.
fn reseal(b: &mut [u8]) {
    let hl = u64_at(b, 24) as usize;
    let h = xxh64(&b[PREAMBLE_LEN..PREAMBLE_LEN + hl], 0);
    b[32..40].copy_from_slice(&h.to_le_bytes());
    let p = xxh64(&b[..56], 0);
    b[56..64].copy_from_slice(&p.to_le_bytes());
}

/// Opens and loads everything; `Err` if anything is wrong anywhere.
fn open_and_load_all(bytes: &[u8]) -> Result<(), FormatError> {
    let f = StackFile::from_bytes(bytes)?;
    f.verify_all()?;
    for id in f.order().as_slice() {
        f.read_block(*id)?;
    }
    Ok(())
}

#[test]
fn truncation_at_every_offset_is_an_error() {
    let dir = TempDir::new("trunc");
    let bytes = file_bytes(&dir, 1, 3);
    assert!(
        bytes.len() > 1000,
        "test file too small to be meaningful: {}",
        bytes.len()
    );
    open_and_load_all(&bytes).unwrap();
    for len in 0..bytes.len() {
        let r = StackFile::from_bytes(&bytes[..len]);
        assert!(
            r.is_err(),
            "truncated to {len} of {} bytes was accepted",
            bytes.len()
        );
    }
    // Through the mmap path as well, at a few interesting lengths (empty, mid-preamble,
    // mid-header, mid-payload).
    let p = dir.join("t.bstk");
    for len in [0, 5, 40, 64, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&p, &bytes[..len]).unwrap();
        assert!(StackFile::open(&p).is_err(), "mmap of {len} bytes accepted");
    }
    // Appended garbage is rejected too.
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 64]);
    assert!(StackFile::from_bytes(&longer).is_err());
}

#[test]
fn random_byte_flips_are_detected() {
    let dir = TempDir::new("flip");
    let bytes = file_bytes(&dir, 2, 4);
    let mut rng = XorShift::new(99);
    let mut at_open = 0;
    for _ in 0..2000 {
        let pos = (rng.next_u64() % bytes.len() as u64) as usize;
        let mask = (rng.next_u64() % 255 + 1) as u8;
        let mut b = bytes.clone();
        b[pos] ^= mask;
        match StackFile::from_bytes(&b) {
            Err(_) => at_open += 1,
            Ok(_) => assert!(
                open_and_load_all(&b).is_err(),
                "flip {mask:#04x} at byte {pos} of {} went undetected",
                bytes.len()
            ),
        }
    }
    println!(
        "{} bytes: {at_open} of 2000 flips caught at open, the rest at block load",
        bytes.len()
    );
    // Blocks dominate this file, so many flips must be caught only at block load.
    assert!(
        at_open < 2000,
        "every flip was caught at open; block checksums untested"
    );
}

#[test]
fn forged_headers_with_valid_checksums_never_panic() {
    let dir = TempDir::new("forge");
    let bytes = file_bytes(&dir, 3, 3);
    let hl = u64_at(&bytes, 24) as usize;
    let mut rng = XorShift::new(7);
    let mut rejected = 0;
    for i in 0..3000 {
        let mut b = bytes.clone();
        // Flip 1-3 header bytes, sometimes writing extreme values, then fix the checksums.
        for _ in 0..1 + i % 3 {
            let pos = PREAMBLE_LEN + (rng.next_u64() % hl as u64) as usize;
            b[pos] = match rng.next_u64() % 3 {
                0 => 0xFF,
                1 => 0,
                _ => b[pos] ^ (rng.next_u64() % 255 + 1) as u8,
            };
        }
        reseal(&mut b);
        if open_and_load_all(&b).is_err() {
            rejected += 1;
        }
    }
    println!("{hl}-byte header: {rejected} of 3000 forged headers rejected");
    // Most header edits change a checked field; a few (e.g. within a metadata value or a
    // scale entry that stays positive) legitimately yield another valid file.
    assert!(
        rejected > 2000,
        "only {rejected} of 3000 forged headers rejected"
    );
}

#[test]
fn huge_counts_do_not_allocate() {
    let dir = TempDir::new("bomb");
    let bytes = file_bytes(&dir, 4, 2);
    // The first header field is the metadata count.
    let mut b = bytes.clone();
    b[PREAMBLE_LEN..PREAMBLE_LEN + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    reseal(&mut b);
    match StackFile::from_bytes(&b) {
        Err(FormatError::Corrupt(msg)) => assert!(msg.contains("count"), "{msg}"),
        other => panic!("expected a corrupt-count error, got {other:?}"),
    }
    // A header length beyond the limit is rejected before anything is read.
    let mut b = bytes.clone();
    b[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
    reseal_preamble_only(&mut b);
    assert!(matches!(
        StackFile::from_bytes(&b),
        Err(FormatError::Corrupt(_))
    ));
}

fn reseal_preamble_only(b: &mut [u8]) {
    let p = xxh64(&b[..56], 0);
    b[56..64].copy_from_slice(&p.to_le_bytes());
}

#[test]
fn versions_and_magic() {
    let dir = TempDir::new("ver");
    let bytes = file_bytes(&dir, 5, 1);
    let mut b = bytes.clone();
    b[8..10].copy_from_slice(&3u16.to_le_bytes());
    reseal_preamble_only(&mut b);
    let err = StackFile::from_bytes(&b).unwrap_err();
    assert!(matches!(
        err,
        FormatError::UnsupportedVersion {
            major: 3,
            supported_major: 2,
            ..
        }
    ));
    assert!(err.to_string().contains("upgrade"), "{err}");
    // A newer minor version is readable.
    let mut b = bytes.clone();
    b[10..12].copy_from_slice(&3u16.to_le_bytes());
    reseal_preamble_only(&mut b);
    assert_eq!(StackFile::from_bytes(&b).unwrap().version(), (1, 3));
    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(matches!(
        StackFile::from_bytes(&b),
        Err(FormatError::BadMagic)
    ));
    assert!(matches!(
        StackFile::from_bytes(b"BITS"),
        Err(FormatError::Truncated { .. })
    ));
}

/// Rewrites one block's payload in place and forges its checksum, so the only remaining
/// defence is content validation at load.
fn forge_block(bytes: &[u8], id: BlockId, edit: impl FnOnce(&mut [u8], &StackMeta)) -> Vec<u8> {
    let f = StackFile::from_bytes(bytes).unwrap();
    let (off, len) = f.block_extent(id).unwrap();
    let (off, len) = (off as usize, len as usize);
    let meta = (*f.stacks()[id.weight as usize]).clone();
    let old = xxh64(&bytes[off..off + len], 0).to_le_bytes();
    let mut b = bytes.to_vec();
    edit(&mut b[off..off + len], &meta);
    let new = xxh64(&b[off..off + len], 0).to_le_bytes();
    let hl = u64_at(&b, 24) as usize;
    let header = &mut b[PREAMBLE_LEN..PREAMBLE_LEN + hl];
    let at = header.windows(8).position(|w| w == old).unwrap();
    header[at..at + 8].copy_from_slice(&new);
    reseal(&mut b);
    b
}

#[test]
fn forged_block_contents_are_rejected() {
    let dir = TempDir::new("content");
    let c = random_contents(6, 3);
    let p = dir.join("c.bstk");
    write_stack_file(&p, &c).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let id = BlockId::new(0, 0);
    // A NaN in factor A.
    let b = forge_block(&bytes, id, |payload, m| {
        let s = m.rows * m.cols.div_ceil(64) * 8;
        payload[s..s + 2].copy_from_slice(&half::f16::NAN.to_le_bytes());
    });
    let f = StackFile::from_bytes(&b).unwrap();
    assert!(matches!(f.block_view(id), Err(FormatError::Core(_))));
    assert!(matches!(
        bitstack_core::BlockSource::load_block(&f, id),
        Err(bitstack_core::CoreError::Source(_))
    ));
    // A set padding bit in the sign words (exists only when cols is not a multiple of 64).
    let w = c
        .stacks
        .iter()
        .position(|m| !m.cols.is_multiple_of(64))
        .expect("seed 6 yields a stack with padded sign rows");
    let id = BlockId::new(w as u32, 0);
    let b = forge_block(&bytes, id, |payload, m| {
        let last_word = (m.cols.div_ceil(64) - 1) * 8;
        payload[last_word + 7] |= 0x80;
    });
    let f = StackFile::from_bytes(&b).unwrap();
    assert!(matches!(f.block_view(id), Err(FormatError::Core(_))));
    // The unforged file's block is fine, so the error above is the padding bit.
    StackFile::from_bytes(&bytes)
        .unwrap()
        .block_view(id)
        .unwrap();
}

#[test]
fn failed_writes_leave_the_old_file_intact() {
    let dir = TempDir::new("atomic");
    let p = dir.join("model.bstk");
    let old = random_contents(8, 3);
    write_stack_file(&p, &old).unwrap();
    let before = std::fs::read(&p).unwrap();

    // Writer dropped midway.
    let new = random_contents(9, 3);
    let mut w = StackFileWriter::create(&p, &new.description()).unwrap();
    w.write_resident(0, &new.residents[0].data).unwrap();
    w.write_block(BlockId::new(0, 0), new.blocks[0][0].view())
        .unwrap();
    assert_eq!(
        dir.entries().len(),
        2,
        "temp file should exist while writing"
    );
    drop(w);
    assert_eq!(std::fs::read(&p).unwrap(), before);
    assert_eq!(dir.entries(), vec!["model.bstk".to_string()]);

    // finish() with a block missing.
    let mut w = StackFileWriter::create(&p, &new.description()).unwrap();
    for (i, t) in new.residents.iter().enumerate() {
        w.write_resident(i, &t.data).unwrap();
    }
    let err = w.finish(new.order.clone()).unwrap_err();
    assert!(err.to_string().contains("never written"), "{err}");
    assert_eq!(std::fs::read(&p).unwrap(), before);
    assert_eq!(dir.entries(), vec!["model.bstk".to_string()]);

    // Invalid contents (blocks missing for a stack) never create anything.
    let mut bad = new.clone();
    bad.blocks[1].pop();
    assert!(write_stack_file(&p, &bad).is_err());
    assert_eq!(std::fs::read(&p).unwrap(), before);

    // A directory that does not exist.
    let missing = dir.join("no/such/dir/model.bstk");
    assert!(matches!(
        write_stack_file(&missing, &new),
        Err(FormatError::Io { .. })
    ));
    assert!(matches!(
        StackFile::open(&missing),
        Err(FormatError::Io { .. })
    ));
    StackFile::open(&p).unwrap().verify_all().unwrap();
}

#[test]
fn invalid_descriptions_are_rejected() {
    let dir = TempDir::new("desc");
    let p = dir.join("d.bstk");
    assert!(StackFileWriter::create(&p, &FileDescription::default()).is_err());
    let meta = |scale| StackMeta {
        name: "w".into(),
        rows: 2,
        cols: 3,
        rank: 1,
        levels: 1,
        scale,
        factors: bitstack_core::FactorDtype::F16,
    };
    let d = |m| FileDescription {
        stacks: vec![m],
        ..Default::default()
    };
    assert!(StackFileWriter::create(&p, &d(meta(Some(vec![1.0, f32::NAN, 1.0])))).is_err());
    assert!(StackFileWriter::create(&p, &d(meta(Some(vec![1.0; 2])))).is_err());
    assert!(StackFileWriter::create(
        &p,
        &d(StackMeta {
            rank: 0,
            ..meta(None)
        })
    )
    .is_err());
    let ok = StackFileWriter::create(&p, &d(meta(None))).unwrap();
    assert!(ok
        .finish(UniversalOrder::round_robin(vec![1]).unwrap())
        .is_err()); // block missing
    assert!(dir.entries().is_empty());
}

/// Format 2 (int8 factors): every truncation is an error, a file relabelled as major 1 (whose
/// header has no factor-dtype bytes) or an f16 file relabelled as 2 is rejected rather than
/// misread, and unknown dtype codes and non-finite scales are typed errors.
#[test]
fn format2_files_are_validated() {
    let dir = TempDir::new("v2");
    let bytes = file_bytes_i8(&dir, 1, 3);
    let f = StackFile::from_bytes(&bytes).unwrap();
    assert_eq!(f.version(), (2, 0));
    open_and_load_all(&bytes).unwrap();
    for len in 0..bytes.len() {
        assert!(
            StackFile::from_bytes(&bytes[..len]).is_err(),
            "truncated to {len} of {} bytes was accepted",
            bytes.len()
        );
    }
    for (file, major) in [(bytes.clone(), 1u16), (file_bytes(&dir, 1, 3), 2)] {
        let mut b = file;
        b[8..10].copy_from_slice(&major.to_le_bytes());
        reseal_preamble_only(&mut b);
        assert!(
            open_and_load_all(&b).is_err(),
            "relabelled as major {major} and accepted"
        );
    }
    // The factor dtype byte of stack 0 (i8, code 1) follows its name and rows/cols/rank/levels.
    let c = random_contents_i8(1, 3);
    let m = &c.stacks[0];
    let hl = u64_at(&bytes, 24) as usize;
    let header = &bytes[PREAMBLE_LEN..PREAMBLE_LEN + hl];
    let mut pat = (m.name.len() as u32).to_le_bytes().to_vec();
    pat.extend_from_slice(m.name.as_bytes());
    for d in [m.rows, m.cols, m.rank] {
        pat.extend_from_slice(&(d as u64).to_le_bytes());
    }
    pat.extend_from_slice(&m.levels.to_le_bytes());
    let at = header.windows(pat.len()).position(|w| w == pat).unwrap() + pat.len();
    assert_eq!(header[at], 1, "stack 0 is int8");
    for code in [0u8, 2, 255] {
        let mut b = bytes.clone();
        b[PREAMBLE_LEN + at] = code;
        reseal(&mut b);
        let r = StackFile::from_bytes(&b);
        match code {
            // f16 needs twice the factor bytes: the region length no longer matches.
            0 => assert!(matches!(r, Err(FormatError::Corrupt(_))), "{r:?}"),
            _ => assert!(
                matches!(&r, Err(FormatError::Corrupt(e)) if e.contains("factor dtype")),
                "{r:?}"
            ),
        }
    }
    // A NaN scale in an int8 block (the A scales follow the sign words).
    let id = BlockId::new(0, 0);
    let b = forge_block(&bytes, id, |payload, m| {
        let s = m.rows * m.cols.div_ceil(64) * 8;
        payload[s..s + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let f = StackFile::from_bytes(&b).unwrap();
    assert!(matches!(f.block_view(id), Err(FormatError::Core(_))));
}
