//! A pool filled to the brim: every operation that needs space fails with a typed no-space
//! error and changes nothing; deleting always works and frees space; `check()` stays clean.

use snapvol::device::{BlockDevice, MemoryDevice};
use snapvol::{Error, Pool, PoolOptions};
use std::sync::Arc;

fn opts() -> PoolOptions {
    PoolOptions::default()
        .block_size(4096)
        .commit_interval(None)
}

fn fill(vol: &snapvol::Volume, seed: u8) -> u64 {
    let chunk = vec![seed; 64 << 10];
    let len = vol.len().unwrap();
    let mut off = 0;
    while off < len {
        let n = (len - off).min(chunk.len() as u64) as usize;
        match vol.write_at(&chunk[..n], off) {
            Ok(()) => off += n as u64,
            Err(Error::NoSpace { .. }) => {
                // Finish block by block to fill every last unit.
                match vol.write_at(&chunk[..4096.min(n)], off) {
                    Ok(()) => off += 4096.min(n) as u64,
                    Err(Error::NoSpace { .. }) => return off,
                    Err(e) => panic!("{e}"),
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
    off
}

#[test]
fn full_pool_fails_cleanly_and_delete_always_works() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(8 << 20));
    let pool = Pool::create(dev.clone(), opts()).unwrap();
    let a = pool.create_volume("a", 16 << 20).unwrap();
    let written = fill(&a, 1);
    assert!(
        written > 4 << 20 && written < 8 << 20,
        "filled {written} bytes"
    );
    assert!(pool.check().unwrap().is_clean());

    // A snapshot needs only a few metadata pages: it works, or fails with no space and
    // leaves no snapshot behind; then a little room (a discard) lets it through.
    match pool.snapshot("a", "s1") {
        Ok(_) => {}
        Err(Error::NoSpace { .. }) => {
            assert!(matches!(
                pool.snapshot_handle("a", "s1"),
                Err(Error::SnapshotNotFound(_))
            ));
            a.discard(written - (1 << 20), 1 << 20).unwrap();
            pool.flush().unwrap();
            pool.snapshot("a", "s1").unwrap();
        }
        Err(e) => panic!("snapshot on a full pool: {e}"),
    }
    // Overwriting the blocks shared with the snapshot needs new blocks, more than are left:
    // no space, and nothing changed.
    let span = (written - (1 << 20)) as usize;
    let before = read_all(&a, span);
    let e = a.write_at(&vec![9u8; span], 0).unwrap_err();
    assert!(matches!(e, Error::NoSpace { .. }), "{e}");
    assert_eq!(read_all(&a, span), before, "failed write changed nothing");
    let e = pool
        .create_volume("b", 1 << 20)
        .and_then(|b| b.write_at(&[1u8; 65536], 0));
    assert!(matches!(e, Err(Error::NoSpace { .. }) | Ok(())));
    assert!(pool.check().unwrap().is_clean());

    // Deleting works on the full pool and frees space for new writes.
    let used_full = pool.stats().used;
    pool.delete_snapshot("a", "s1").unwrap();
    pool.delete_volume("a").unwrap();
    assert!(pool.stats().used < used_full / 4, "delete freed the data");
    let c = pool.create_volume("c", 16 << 20).unwrap();
    let again = fill(&c, 2);
    assert!(
        again >= written - (256 << 10),
        "space came back: {again} vs {written}"
    );
    assert!(pool.check().unwrap().is_clean());
    drop(c);
    drop(pool);
    let pool = Pool::open(dev, opts()).unwrap();
    assert!(pool.check().unwrap().is_clean());
    assert_eq!(read_all(&pool.volume("c").unwrap(), 4096), vec![2u8; 4096]);
}

#[test]
fn snapshots_and_clones_on_a_full_pool_then_delete_in_any_order() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(6 << 20));
    let pool = Pool::create(dev, opts()).unwrap();
    let a = pool.create_volume("a", 2 << 20).unwrap();
    fill(&a, 3);
    let mut snaps = 0;
    let mut clones = 0;
    // Keep alternating snapshot, clone and overwrite until nothing fits.
    for round in 0..200u32 {
        let s = format!("s{round}");
        match pool.snapshot("a", &s) {
            Ok(_) => snaps += 1,
            Err(Error::NoSpace { .. }) => break,
            Err(e) => panic!("{e}"),
        }
        match pool.clone_snapshot("a", &s, &format!("c{round}")) {
            Ok(c) => {
                clones += 1;
                let _ = c.write_at(&[round as u8; 4096], 4096 * round as u64);
            }
            Err(Error::NoSpace { .. }) => break,
            Err(e) => panic!("{e}"),
        }
        match a.write_at(&[round as u8; 65536], 0) {
            Ok(()) | Err(Error::NoSpace { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        snaps > 3 && clones > 3,
        "{snaps} snapshots, {clones} clones"
    );
    let r = pool.check().unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
    // Delete the origin first, then snapshots, then clones: every step works.
    pool.delete_volume("a").unwrap();
    for s in pool.snapshots().unwrap() {
        // The volume is gone: its snapshots are reached by id.
        pool.delete_snapshot_by_id(s.id).unwrap();
        assert!(pool.check().unwrap().is_clean());
    }
    for v in pool.volumes().unwrap() {
        pool.delete_volume(&v.name).unwrap();
    }
    assert!(pool.check().unwrap().is_clean());
    assert!(
        pool.stats().used < 200 << 10,
        "everything freed: {}",
        pool.stats().used
    );
}

fn read_all(v: &snapvol::Volume, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    v.read_at(&mut b, 0).unwrap();
    b
}
