//! Data checksums: a flipped byte in a data block is never returned as data, wherever it is
//! read from, and a pool without damage never reports any (in-place writes of the open
//! transaction, partial writes, snapshots and clones, reopen).

use snapvol::{BlockProblem, Error, Pool, PoolOptions, ScrubCursor};
use std::fs::OpenOptions;
use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;
use std::path::Path;

fn opts() -> PoolOptions {
    PoolOptions::default()
        .commit_interval(None)
        .data_checksums(true)
}

fn flip(path: &Path, at: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();
}

fn block(i: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|j| (j as u8).wrapping_mul(i) ^ i)
        .collect()
}

/// Builds a pool file with volume `v` (blocks 0..3 written, block 1 also in snapshot
/// `v@s` and clone `c`), and returns the device byte of block 1.
fn build(path: &Path) -> u64 {
    let pool = Pool::create_file(path, 64 << 20, opts()).unwrap();
    assert!(pool.stats().data_checksums);
    let v = pool.create_volume("v", 1 << 20).unwrap();
    for i in 0..3u8 {
        v.write_at(&block(i + 1), u64::from(i) * 4096).unwrap();
    }
    pool.snapshot("v", "s").unwrap();
    pool.clone_snapshot("v", "s", "c").unwrap();
    let at = v.physical_block(4096).unwrap().unwrap();
    assert_eq!(
        pool.snapshot_handle("v", "s")
            .unwrap()
            .physical_block(4100)
            .unwrap(),
        Some(at),
        "the snapshot shares the block"
    );
    assert_eq!(v.physical_block(8192 * 4).unwrap(), None, "a hole");
    pool.close().unwrap();
    at
}

fn expect_corrupt(r: snapvol::Result<()>, target: &str, physical: u64) {
    match r {
        Err(Error::DataCorrupt {
            target: t,
            offset,
            physical: p,
            expected,
            found,
            ..
        }) => {
            assert_eq!(t, target);
            assert_eq!(offset, 4096);
            assert_eq!(p, physical);
            assert_ne!(expected, found);
        }
        other => panic!("expected DataCorrupt for {target}, got {other:?}"),
    }
}

#[test]
fn a_flipped_byte_is_never_returned() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.img");
    let at = build(&path);
    flip(&path, at + 100);
    let pool = Pool::open_path(&path, opts()).unwrap();
    let v = pool.volume("v").unwrap();
    let s = pool.snapshot_handle("v", "s").unwrap();
    let c = pool.volume("c").unwrap();
    let mut buf = vec![0u8; 3 * 4096];
    // Whole and partial reads of the block, from every map that points at it.
    expect_corrupt(v.read_at(&mut buf, 0), "v", at);
    expect_corrupt(v.read_at(&mut buf[..10], 4096 + 3000), "v", at);
    expect_corrupt(s.read_at(&mut buf[..4096], 4096), "v@s", at);
    expect_corrupt(c.read_at(&mut buf[..4096 + 7], 4090), "c", at);
    assert_eq!(
        v.read_at(&mut buf, 0).unwrap_err().kind(),
        snapvol::ErrorKind::DataLoss
    );
    // Undamaged neighbours still read.
    let mut one = vec![0u8; 4096];
    v.read_at(&mut one, 0).unwrap();
    assert_eq!(one, block(1));
    v.read_at(&mut one, 8192).unwrap();
    assert_eq!(one, block(3));
    // A partial write would carry the bad bytes into a new block with a good checksum.
    expect_corrupt(v.write_at(b"xyz", 4096 + 10), "v", at);
    // A send stream refuses to package it.
    let mut out = Vec::new();
    let sent = pool.send(s.id(), None, &mut out);
    assert!(
        matches!(sent, Err(Error::DataCorrupt { .. })),
        "send: {sent:?}"
    );
    // Scrub reports exactly that block, with every map that points at it, and reads each
    // shared block once (three blocks, referenced by three maps).
    let report = pool.scrub(None, |_| ControlFlow::Continue(())).unwrap();
    assert!(!report.is_clean() && report.checksums);
    assert_eq!((report.blocks, report.shared_skipped), (3, 6));
    assert_eq!(report.bad_count, 1);
    let bad = &report.bad[0];
    assert_eq!(bad.physical, at);
    assert!(matches!(bad.problem, BlockProblem::Mismatch { .. }));
    let mut names: Vec<(&str, u64)> = bad
        .references
        .iter()
        .map(|r| (r.name.as_str(), r.offset))
        .collect();
    names.sort();
    assert_eq!(names, [("c", 4096), ("v", 4096), ("v@s", 4096)]);
    // A backup push refuses it too, and leaves no manifest: the repository has no backup.
    let repo_dir = dir.path().join("repo");
    let repo = snapvol::backup::Repository::open_or_create(
        std::sync::Arc::new(snapvol::backup::DirTarget::new(&repo_dir).unwrap()),
        &Default::default(),
    )
    .unwrap();
    let pushed = repo.push(&pool, s.id(), snapvol::backup::BaseChoice::Auto);
    assert!(
        matches!(pushed, Err(Error::DataCorrupt { .. })),
        "push: {pushed:?}"
    );
    let other = Pool::create(
        std::sync::Arc::new(snapvol::device::MemoryDevice::new(32 << 20)),
        opts(),
    )
    .unwrap();
    let restored = repo.restore(s.id(), &other, &Default::default());
    assert!(
        matches!(restored, Err(Error::BackupNotFound(_))),
        "restore: {restored:?}"
    );
    // Overwriting the whole block replaces it (in the volume; the snapshot keeps its copy).
    v.write_at(&block(9), 4096).unwrap();
    v.read_at(&mut one, 4096).unwrap();
    assert_eq!(one, block(9));
    expect_corrupt(s.read_at(&mut one, 4096), "v@s", at);
    let report = pool.scrub(None, |_| ControlFlow::Continue(())).unwrap();
    let mut names: Vec<&str> = report.bad[0]
        .references
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    names.sort();
    assert_eq!(names, ["c", "v@s"], "the volume no longer points at it");
    pool.close().unwrap();
}

/// A scrub stopped by its callback says where it stood; one resumed there finishes, and
/// between them every block was verified. A clean pool scrubs clean.
#[test]
fn scrub_stops_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.img");
    let pool = Pool::create_file(&path, 128 << 20, opts()).unwrap();
    let blocks = 5000u64;
    for name in ["a", "b"] {
        let v = pool.create_volume(name, blocks * 4096).unwrap();
        let data: Vec<u8> = (0..blocks * 4096).map(|i| (i % 251) as u8).collect();
        v.write_at(&data, 0).unwrap();
    }
    pool.flush().unwrap();
    let mut calls = 0;
    let first = pool
        .scrub(None, |p| {
            calls += 1;
            assert!(p.blocks > 0 && p.maps_total == 2);
            ControlFlow::Break(())
        })
        .unwrap();
    assert_eq!(calls, 1);
    let cursor = first.resume.expect("stopped early");
    assert!(!first.is_clean() && first.bad_count == 0);
    assert!(first.blocks < 2 * blocks);
    let parsed: ScrubCursor = cursor.to_string().parse().unwrap();
    assert_eq!(parsed, cursor);
    assert!(matches!(
        "v:12:3".parse::<ScrubCursor>(),
        Err(Error::BadToken(_))
    ));
    let rest = pool
        .scrub(Some(&parsed), |_| ControlFlow::Continue(()))
        .unwrap();
    assert!(rest.is_clean());
    assert_eq!(first.blocks + rest.blocks, 2 * blocks);
    let all = pool.scrub(None, |_| ControlFlow::Continue(())).unwrap();
    assert!(all.is_clean());
    assert_eq!(all.blocks, 2 * blocks);
    assert_eq!(all.bytes, 2 * blocks * 4096);
}

/// Writes of every shape (partial, unaligned, spanning blocks, into blocks of the open
/// transaction again and again, into shared blocks), commits between some of them, and a
/// reopen: everything reads back as a model says, and nothing reports a mismatch.
#[test]
fn no_false_mismatch_across_writes_commits_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.img");
    let size = 256 << 10;
    let mut model = vec![0u8; size];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    {
        let pool = Pool::create_file(&path, 64 << 20, opts().block_size(16384)).unwrap();
        let v = pool.create_volume("v", size as u64).unwrap();
        for i in 0..400 {
            let off = (next() % size as u64) as usize;
            let len = ((next() % 40000) as usize + 1).min(size - off);
            let fill: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            v.write_at(&fill, off as u64).unwrap();
            model[off..off + len].copy_from_slice(&fill);
            match i % 50 {
                10 => pool.flush().unwrap(),
                20 => drop(pool.snapshot("v", &format!("s{i}")).unwrap()),
                30 => v
                    .discard(off as u64 / 2, 20000)
                    .unwrap_or_else(|e| panic!("{e}")),
                _ => {}
            }
            if i % 50 == 30 {
                let o = off / 2;
                let e = (o + 20000).min(size);
                model[o..e].fill(0);
            }
        }
        let mut got = vec![0u8; size];
        v.read_at(&mut got, 0).unwrap();
        assert!(got == model, "reads before the reopen match the model");
        pool.close().unwrap();
    }
    let pool = Pool::open_path(&path, opts()).unwrap();
    let v = pool.volume("v").unwrap();
    let mut got = vec![0u8; size];
    v.read_at(&mut got, 0).unwrap();
    assert!(got == model, "reads after the reopen match the model");
    for s in pool.snapshots().unwrap() {
        let h = pool.snapshot_by_id(s.id).unwrap();
        h.read_at(&mut got, 0).unwrap();
    }
}

/// The option is chosen at creation and kept by the pool; a pool without it is written in
/// the format older builds read (version 2).
#[test]
fn the_pool_records_the_option() {
    let dir = tempfile::tempdir().unwrap();
    for on in [false, true] {
        let path = dir.path().join(format!("p{on}.img"));
        Pool::create_file(&path, 32 << 20, opts().data_checksums(on))
            .unwrap()
            .close()
            .unwrap();
        // Opening never changes it, whatever the options say.
        let pool = Pool::open_path(&path, opts().data_checksums(!on)).unwrap();
        assert_eq!(pool.stats().data_checksums, on);
        pool.close().unwrap();
        // The superblock of the newest commit is in one of the first two pages.
        let f = std::fs::File::open(&path).unwrap();
        let versions: Vec<u32> = (0..2u64)
            .map(|slot| {
                let mut b = [0u8; 4];
                f.read_exact_at(&mut b, slot * 4096 + 32).unwrap();
                u32::from_le_bytes(b)
            })
            .collect();
        assert!(
            versions.contains(&if on { 3 } else { 2 })
                && !versions.contains(&if on { 2 } else { 3 }),
            "{versions:?}"
        );
    }
}

/// Reads racing writes of the same blocks never report a mismatch: a read outside the
/// engine lock may see a block newer than the checksum it planned with, and must read again
/// under the lock before it calls the block bad.
#[test]
fn reads_racing_writes_of_the_same_blocks_see_no_false_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::create_file(dir.path().join("p.img"), 64 << 20, opts()).unwrap();
    let v = pool.create_volume("v", 1 << 20).unwrap();
    v.write_at(&vec![1u8; 64 << 10], 0).unwrap();
    pool.flush().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (v, pool, stop) = (v.clone(), pool.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Whole blocks and partial ones, in place (this transaction's) and redirected
                // (the first write after each flush).
                v.write_at(&vec![i as u8; 4096], (i % 16) * 4096).unwrap();
                v.write_at(&[i as u8 ^ 0xff; 100], (i % 16) * 4096 + 1000)
                    .unwrap();
                if i % 64 == 63 {
                    pool.flush().unwrap();
                }
                i += 1;
            }
            i
        })
    };
    let mut buf = vec![0u8; 64 << 10];
    for i in 0..20_000u64 {
        let r = if i % 2 == 0 {
            v.read_at(&mut buf, 0)
        } else {
            v.read_at(&mut buf[..4096], (i % 16) * 4096)
        };
        if let Err(e) = r {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            panic!("read {i} racing writes: {e}");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes > 100, "the writer ran alongside ({writes} rounds)");
    let report = pool.scrub(None, |_| ControlFlow::Continue(())).unwrap();
    assert!(report.is_clean());
}

/// A send stream from a pool with data checksums carries the pool's block checksums (each
/// DATA record's CRC is joined from them) and the receiver checks them: full and incremental
/// streams, blocks of 16 KiB at the source and 4 KiB at the receiver, a volume whose size
/// ends inside a block, holes inside records.
#[test]
fn streams_carry_the_block_checksums_to_the_receiver() {
    let mem = |n| std::sync::Arc::new(snapvol::device::MemoryDevice::new(n));
    let src = Pool::create(mem(64 << 20), opts().block_size(16384)).unwrap();
    let size = (1 << 20) + 5000;
    let v = src.create_volume("db", size).unwrap();
    let mut model = vec![0u8; size as usize];
    let put = |model: &mut Vec<u8>, off: usize, len: usize, seed: u8| {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        v.write_at(&data, off as u64).unwrap();
        model[off..off + len].copy_from_slice(&data);
    };
    put(&mut model, 0, 100_000, 1);
    put(&mut model, 300_000, 7, 2); // a block mostly holes
    put(&mut model, size as usize - 3000, 3000, 3); // the partial last block
    let a = src.snapshot("db", "a").unwrap();
    let model_a = model.clone();
    put(&mut model, 50_000, 40_000, 4);
    put(&mut model, 700_000, 16384, 5);
    let b = src.snapshot("db", "b").unwrap();
    let dst = Pool::create(mem(64 << 20), opts().block_size(4096)).unwrap();
    for (id, base, want) in [
        (a, None, &model_a),
        (b, Some(snapvol::Base::Snapshot(a)), &model),
    ] {
        let mut stream = Vec::new();
        src.send(id, base, &mut stream).unwrap();
        dst.receive(&mut &stream[..], None).unwrap();
        let s = dst.snapshot_by_id(id).unwrap();
        let mut got = vec![0u8; size as usize];
        s.read_at(&mut got, 0).unwrap();
        assert!(&got == want, "received snapshot matches");
    }
}
