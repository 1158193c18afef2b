//! The translation cache (reads and in-place writes that skip the engine lock) must never
//! answer with what a catalog operation, a write or a discard has changed: each test warms
//! the cache on a volume (reads of every block, overwrites of owned blocks), changes the
//! pool, and checks what the same handles read and write afterwards.

use snapvol::device::{BlockDevice, FaultDevice, FaultKind, MemoryDevice};
use snapvol::{Error, Pool, PoolOptions, Volume};
use std::sync::Arc;

const BS: usize = 4096;
/// Enough blocks for several whole runs of the cache's run answers (256 blocks each).
const BLOCKS: usize = 1024;

fn opts() -> PoolOptions {
    PoolOptions::default().commit_interval(None)
}

fn pool() -> Pool {
    Pool::create(Arc::new(MemoryDevice::new(64 << 20)), opts()).unwrap()
}

/// Reads every block of `v` one at a time (what fills the cache), returning the first byte
/// of each.
fn firsts(read: impl Fn(&mut [u8], u64) -> snapvol::Result<()>) -> Vec<u8> {
    let mut buf = vec![0u8; BS];
    (0..BLOCKS)
        .map(|b| {
            read(&mut buf, (b * BS) as u64).unwrap();
            assert!(
                buf.iter().all(|&x| x == buf[0]),
                "block {b} holds two writes"
            );
            buf[0]
        })
        .collect()
}

/// A volume written sequentially with 0xA0 (its blocks contiguous on the device), read
/// whole block by block and then overwritten at blocks 3 and 700 (owned: in place).
fn warmed(pool: &Pool, name: &str) -> Volume {
    let v = pool.create_volume(name, (BLOCKS * BS) as u64).unwrap();
    v.write_at(&vec![0xA0; BLOCKS * BS], 0).unwrap();
    pool.flush().unwrap();
    firsts(|b, o| v.read_at(b, o));
    for b in [3usize, 700] {
        v.write_at(&[0xA1; BS], (b * BS) as u64).unwrap();
        v.write_at(&[0xA2; BS], (b * BS) as u64).unwrap();
    }
    firsts(|b, o| v.read_at(b, o));
    v
}

fn expect(v: &[u8], base: u8, except: &[(usize, u8)]) {
    for (b, &x) in v.iter().enumerate() {
        let want = except.iter().find(|e| e.0 == b).map_or(base, |e| e.1);
        assert_eq!(x, want, "block {b}");
    }
}

#[test]
fn a_snapshot_keeps_what_it_saw_while_cached_blocks_are_overwritten() {
    let pool = pool();
    let v = warmed(&pool, "v");
    let s = pool.snapshot("v", "s").unwrap();
    let snap = pool.snapshot_by_id(s).unwrap();
    firsts(|b, o| snap.read_at(b, o));
    // Blocks 3 and 700 were owned and cached as such: after the snapshot they are shared
    // and must be redirected, and so must every other block.
    for b in [3usize, 700, 5, 600] {
        v.write_at(&[0xB0; BS], (b * BS) as u64).unwrap();
    }
    expect(
        &firsts(|b, o| snap.read_at(b, o)),
        0xA0,
        &[(3, 0xA2), (700, 0xA2)],
    );
    expect(
        &firsts(|b, o| v.read_at(b, o)),
        0xA0,
        &[(3, 0xB0), (700, 0xB0), (5, 0xB0), (600, 0xB0)],
    );
}

#[test]
fn rollback_clone_and_a_written_clone_each_read_their_own_blocks() {
    let pool = pool();
    let v = warmed(&pool, "v");
    pool.snapshot("v", "s").unwrap();
    v.write_at(&vec![0xC0; 300 * BS], 0).unwrap();
    expect(&firsts(|b, o| v.read_at(b, o))[..300], 0xC0, &[]);
    let c = pool.clone_snapshot("v", "s", "c").unwrap();
    firsts(|b, o| c.read_at(b, o));
    c.write_at(&[0xD0; BS], 10 * BS as u64).unwrap();
    pool.rollback("v", "s").unwrap();
    // The handle held across the rollback reads the snapshot's blocks, not the cached ones.
    expect(
        &firsts(|b, o| v.read_at(b, o)),
        0xA0,
        &[(3, 0xA2), (700, 0xA2)],
    );
    expect(
        &firsts(|b, o| c.read_at(b, o)),
        0xA0,
        &[(3, 0xA2), (700, 0xA2), (10, 0xD0)],
    );
    // Writes after the rollback go where the rolled-back volume says, not where the cache
    // said before it: the clone and the snapshot keep their bytes.
    v.write_at(&vec![0xE0; BLOCKS * BS], 0).unwrap();
    let snap = pool.snapshot_handle("v", "s").unwrap();
    expect(
        &firsts(|b, o| snap.read_at(b, o)),
        0xA0,
        &[(3, 0xA2), (700, 0xA2)],
    );
    expect(
        &firsts(|b, o| c.read_at(b, o)),
        0xA0,
        &[(3, 0xA2), (700, 0xA2), (10, 0xD0)],
    );
    assert!(pool.check().unwrap().is_clean());
}

#[test]
fn discard_resize_and_delete_reach_handles_that_read_from_the_cache() {
    let pool = pool();
    let v = warmed(&pool, "v");
    // A discard of whole blocks inside a run answered as one contiguous run.
    v.discard(20 * BS as u64, 10 * BS as u64).unwrap();
    let after = firsts(|b, o| v.read_at(b, o));
    let zeros: Vec<(usize, u8)> = (20..30).map(|b| (b, 0)).collect();
    let mut want = zeros.clone();
    want.extend([(3, 0xA2), (700, 0xA2)]);
    expect(&after, 0xA0, &want);
    // Shrunk: the cached blocks past the new end are out of range, with the typed error.
    pool.resize_volume("v", 512 * BS as u64).unwrap();
    let mut buf = vec![0u8; BS];
    let e = v.read_at(&mut buf, 700 * BS as u64).unwrap_err();
    assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
    let e = v.write_at(&buf, 700 * BS as u64).unwrap_err();
    assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
    // Grown again: what lies past the old end reads as zeros, not as the cached blocks.
    pool.resize_volume("v", (BLOCKS * BS) as u64).unwrap();
    v.read_at(&mut buf, 700 * BS as u64).unwrap();
    assert!(
        buf.iter().all(|&x| x == 0),
        "a grown volume showed its old blocks"
    );
    // Deleted: the handle's reads and writes are refused, cached or not.
    pool.snapshot("v", "s").unwrap();
    let snap = pool.snapshot_handle("v", "s").unwrap();
    firsts(|b, o| snap.read_at(b, o));
    pool.delete_snapshot("v", "s").unwrap();
    let e = snap.read_at(&mut buf, 0).unwrap_err();
    assert!(matches!(e, Error::SnapshotNotFound(_)), "{e}");
    pool.delete_volume("v").unwrap();
    let e = v.read_at(&mut buf, 0).unwrap_err();
    assert!(matches!(e, Error::VolumeNotFound(_)), "{e}");
    let e = v.write_at(&buf, 3 * BS as u64).unwrap_err();
    assert!(matches!(e, Error::VolumeNotFound(_)), "{e}");
    assert!(pool.check().unwrap().is_clean());
}

#[test]
fn a_failed_write_refuses_cached_reads_and_writes_too() {
    let fault = Arc::new(FaultDevice::new(Arc::new(MemoryDevice::new(64 << 20))));
    let dev: Arc<dyn BlockDevice> = fault.clone();
    let pool = Pool::create(dev, opts()).unwrap();
    let v = warmed(&pool, "v");
    let w = warmed(&pool, "w");
    // The next device write (an in-place overwrite of an owned, cached block) fails.
    fault.fail_nth(FaultKind::Write, 0, false);
    let e = v.write_at(&[1; BS], 3 * BS as u64).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    fault.disarm();
    let mut buf = vec![0u8; BS];
    for (what, r) in [
        ("read", w.read_at(&mut buf, 0)),
        ("write", w.write_at(&buf, 3 * BS as u64)),
    ] {
        let e = r.unwrap_err();
        assert!(
            matches!(e, Error::Poisoned(_)),
            "{what} after a failed write: {e}"
        );
    }
}

#[test]
fn without_a_cache_every_answer_is_the_same() {
    let pool = Pool::create(
        Arc::new(MemoryDevice::new(64 << 20)),
        opts().translation_slots(0),
    )
    .unwrap();
    let v = warmed(&pool, "v");
    pool.snapshot("v", "s").unwrap();
    v.write_at(&[0xB0; BS], 3 * BS as u64).unwrap();
    expect(
        &firsts(|b, o| v.read_at(b, o)),
        0xA0,
        &[(3, 0xB0), (700, 0xA2)],
    );
    let snap = pool.snapshot_handle("v", "s").unwrap();
    expect(
        &firsts(|b, o| snap.read_at(b, o)),
        0xA0,
        &[(3, 0xA2), (700, 0xA2)],
    );
}

/// Readers of a volume whose blocks are cached, racing writers that overwrite them in place
/// and redirect them around snapshots: every read returns one whole write of its block,
/// and every snapshot reads the same before and after the writers stop.
#[test]
fn cached_reads_race_writes_and_snapshots_without_tearing_or_leaking() {
    let pool = pool();
    let v = warmed(&pool, "v");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (v, stop) = (v.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; BS];
                let mut x = 0x9E37_79B9u64 + r;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let b = x % BLOCKS as u64;
                    v.read_at(&mut buf, b * BS as u64).unwrap();
                    assert!(buf.iter().all(|&y| y == buf[0]), "block {b} read torn");
                }
            })
        })
        .collect();
    let mut snaps = Vec::new();
    for round in 0..20u8 {
        for b in (round as usize..BLOCKS).step_by(37) {
            v.write_at(&[round; BS], (b * BS) as u64).unwrap();
        }
        let name = format!("s{round}");
        pool.snapshot("v", &name).unwrap();
        let h = pool.snapshot_handle("v", &name).unwrap();
        snaps.push((firsts(|b, o| h.read_at(b, o)), h));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    for (i, (seen, h)) in snaps.iter().enumerate() {
        assert_eq!(
            &firsts(|b, o| h.read_at(b, o)),
            seen,
            "snapshot s{i} changed"
        );
    }
    assert!(pool.check().unwrap().is_clean());
}

/// Empty requests anywhere, on a warmed volume: inside or at the end they do nothing, past
/// the end they are out of range (the typed error), and nothing panics.
#[test]
fn empty_requests_are_answered_like_any_other() {
    let pool = pool();
    let v = warmed(&pool, "v");
    let size = (BLOCKS * BS) as u64;
    for at in [0, 1, BS as u64, BS as u64 + 17, size - 1, size] {
        v.read_at(&mut [], at).unwrap();
        v.write_at(&[], at).unwrap();
    }
    for at in [size + 1, u64::MAX] {
        let e = v.read_at(&mut [], at).unwrap_err();
        assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
        let e = v.write_at(&[], at).unwrap_err();
        assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
    }
    // A request running past u64 is refused, not wrapped.
    let e = v.read_at(&mut [0u8; 16], u64::MAX - 7).unwrap_err();
    assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
}
