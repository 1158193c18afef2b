//! The catalog as a tree: commits that cost what they change however many snapshots the
//! pool holds, names that a new volume of an old name does not inherit, and the format
//! version refused by name.

use snapvol::device::{BlockDevice, MemoryDevice};
use snapvol::{Error, Pool, PoolOptions};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A device in memory that counts the bytes written to it.
struct Counting {
    inner: MemoryDevice,
    written: AtomicU64,
}

impl BlockDevice for Counting {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> snapvol::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> snapvol::Result<()> {
        self.written.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> snapvol::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
}

fn opts() -> PoolOptions {
    PoolOptions::default().commit_interval(None)
}

/// Snapshots a run measures (several of the catalog buffer's spills into the tree).
const RUN: u64 = 64;

/// What one pool shape's commits write: a 4 KiB first write to an unrelated volume + flush,
/// one more snapshot, and the mean and largest of a run of [`RUN`] more snapshots (each
/// after a write, as a volume in use has).
struct Bytes {
    write: u64,
    snapshot: u64,
    run_mean: u64,
    run_max: u64,
}

/// [`Bytes`] in a pool holding `snapshots` snapshots: of `db` alone, or spread over
/// volumes of 10 snapshots each (as a CSI driver's pool holds them).
fn commit_bytes(snapshots: usize, spread: bool) -> Bytes {
    let dev = Arc::new(Counting {
        inner: MemoryDevice::new(1 << 30),
        written: AtomicU64::new(0),
    });
    let pool = Pool::create(dev.clone(), opts()).unwrap();
    let db = pool.create_volume("db", 1 << 30).unwrap();
    db.write_at(&[1u8; 4096], 0).unwrap();
    for i in 0..snapshots {
        let vol = if spread && i >= 10 {
            let v = format!("pvc-{:05}", i / 10);
            if i % 10 == 0 {
                pool.create_volume(&v, 1 << 30).unwrap();
            }
            v
        } else {
            "db".to_string()
        };
        pool.snapshot(&vol, &format!("auto-{i:06}")).unwrap();
    }
    let other = pool.create_volume("other", 1 << 30).unwrap();
    other.write_at(&[2u8; 4096], 1 << 20).unwrap();
    pool.flush().unwrap();
    // Steady state: one more of each first, so both runs measure the same kind of commit.
    other.write_at(&[3u8; 4096], 2 << 20).unwrap();
    pool.flush().unwrap();
    pool.snapshot("db", "warm").unwrap();

    let written = || dev.written.load(Ordering::Relaxed);
    let before = written();
    other.write_at(&[4u8; 4096], 3 << 20).unwrap();
    pool.flush().unwrap();
    let write = written() - before;
    let before = written();
    pool.snapshot("db", "one-more").unwrap();
    let snapshot = written() - before;
    let (mut total, mut run_max) = (0, 0);
    for i in 0..RUN {
        db.write_at(&[5u8; 4096], (i + 1) * 4096).unwrap();
        pool.flush().unwrap();
        let before = written();
        pool.snapshot("db", &format!("run-{i:03}")).unwrap();
        let b = written() - before;
        total += b;
        run_max = run_max.max(b);
    }
    assert!(pool.check().unwrap().is_clean());
    Bytes {
        write,
        snapshot,
        run_mean: total / RUN,
        run_max,
    }
}

/// Deterministic on a counting device. With 20,000 snapshots in the pool, a first write +
/// flush and one more snapshot write at most 1.5× what they write with 10 (the issue's
/// target; the old catalog, rewritten whole at every commit, wrote 89× and 91×): a
/// snapshot's three catalog entries wait in the catalog's one-page write buffer, so its
/// commit writes that page, not three leaf paths of a deeper tree. Averaged over a run of
/// snapshots that includes the buffer's spills into the tree, the snapshot commit stays
/// within 1.5× too; the largest single commit of the run (a spill) is bounded at 6× the largest at 10.
#[test]
fn commit_bytes_do_not_depend_on_the_number_of_snapshots() {
    let small = commit_bytes(10, false);
    let spread = commit_bytes(20_000, true);
    let one = commit_bytes(20_000, false);
    for (what, b) in [
        ("10 snapshots", &small),
        ("20,000 over 2,000 volumes", &spread),
        ("20,000 of one volume", &one),
    ] {
        eprintln!(
            "{what}: write+flush {} B, snapshot {} B, run of {RUN} snapshots mean {} B, max {} B",
            b.write, b.snapshot, b.run_mean, b.run_max
        );
    }
    for (what, big) in [("spread", &spread), ("one volume", &one)] {
        let ratio = |f: fn(&Bytes) -> u64| f(big) as f64 / f(&small) as f64;
        assert!(
            ratio(|b| b.write) <= 1.5,
            "write + flush, {what}: {} bytes with 20,000 snapshots vs {} with 10",
            big.write,
            small.write
        );
        assert!(
            ratio(|b| b.snapshot) <= 1.5,
            "snapshot, {what}: {} bytes with 20,000 snapshots vs {} with 10",
            big.snapshot,
            small.snapshot
        );
        assert!(
            ratio(|b| b.run_mean) <= 1.5,
            "mean snapshot of a run, {what}: {} bytes with 20,000 snapshots vs {} with 10",
            big.run_mean,
            small.run_mean
        );
        assert!(
            ratio(|b| b.run_max) <= 6.0,
            "largest snapshot commit of a run, {what}: {} bytes vs {} with 10",
            big.run_max,
            small.run_max
        );
    }
}

/// Snapshots are indexed under their volume's id: a new volume that takes a deleted one's
/// name starts with no snapshots (no "already exists" for a name it cannot roll back to),
/// and the old volume's snapshots stay reachable by id, listed with their volume's id.
#[test]
fn a_new_volume_of_an_old_name_inherits_no_snapshots() {
    let pool = Pool::create(Arc::new(MemoryDevice::new(64 << 20)), opts()).unwrap();
    let old = pool.create_volume("db", 1 << 20).unwrap();
    old.write_at(&[7u8; 4096], 0).unwrap();
    let old_id = old.id();
    let mon = pool.snapshot("db", "mon").unwrap();
    drop(old);
    pool.delete_volume("db").unwrap();
    let new = pool.create_volume("db", 1 << 20).unwrap();
    assert!(matches!(
        pool.rollback("db", "mon"),
        Err(Error::SnapshotNotFound(_))
    ));
    let mon2 = pool.snapshot("db", "mon").unwrap();
    assert_ne!(mon, mon2);
    pool.rollback("db", "mon").unwrap();
    let mut buf = [0u8; 4096];
    new.read_at(&mut buf, 0).unwrap();
    assert_eq!(
        buf, [0u8; 4096],
        "rolled back to the new volume's own snapshot"
    );
    // The old snapshot: by id, with its volume's id and old name.
    let info = pool.snapshot_info(mon).unwrap();
    assert_eq!((info.volume_id, info.volume_name.as_str()), (old_id, "db"));
    pool.snapshot_by_id(mon)
        .unwrap()
        .read_at(&mut buf, 0)
        .unwrap();
    assert_eq!(buf, [7u8; 4096]);
    assert_eq!(pool.volume_snapshots(old_id).unwrap().len(), 1);
    assert_eq!(pool.volume_snapshots(new.id()).unwrap().len(), 1);
    assert_eq!(pool.snapshots().unwrap().len(), 2);
    pool.delete_snapshot_by_id(mon).unwrap();
    assert!(matches!(
        pool.snapshot_info(mon),
        Err(Error::SnapshotNotFound(_))
    ));
    assert!(pool.check().unwrap().is_clean());
}

/// Listing, renaming and deleting keep every index in step, across a reopen.
#[test]
fn catalog_indexes_survive_renames_deletes_and_reopen() {
    let dev = Arc::new(MemoryDevice::new(256 << 20));
    let pool = Pool::create(dev.clone(), opts()).unwrap();
    for v in 0..30 {
        pool.create_volume(&format!("vol-{v:02}"), 1 << 20).unwrap();
        for s in 0..20 {
            pool.snapshot(&format!("vol-{v:02}"), &format!("s{s:02}"))
                .unwrap();
        }
    }
    pool.bookmark("vol-03", "s05").unwrap();
    pool.rename_volume("vol-03", "renamed").unwrap();
    pool.delete_snapshot("renamed", "s00").unwrap();
    pool.delete_volume("vol-07").unwrap();
    pool.close().unwrap();

    let pool = Pool::open(dev, opts()).unwrap();
    let names: Vec<String> = pool
        .volumes()
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names.len(), 29);
    assert!(
        names.windows(2).all(|w| w[0] < w[1]),
        "listed by name: {names:?}"
    );
    assert!(names.contains(&"renamed".to_string()) && !names.contains(&"vol-03".into()));
    let stats = pool.stats();
    assert_eq!((stats.volumes, stats.snapshots), (29, 30 * 20 - 1));
    let r = pool.volume("renamed").unwrap().id();
    let snaps = pool.volume_snapshots(r).unwrap();
    assert_eq!(snaps.len(), 19);
    assert!(snaps.iter().all(|s| s.volume_name == "renamed"));
    assert!(snaps.windows(2).all(|w| w[0].generation <= w[1].generation));
    assert_eq!(
        pool.snapshot_handle("renamed", "s01").unwrap().id(),
        snaps[0].id
    );
    assert!(matches!(
        pool.snapshot_handle("vol-03", "s01"),
        Err(Error::SnapshotNotFound(_))
    ));
    let bm = pool.bookmark_id("renamed", "s05").unwrap();
    assert_eq!(pool.bookmark_info(bm).unwrap().volume_name, "renamed");
    // The deleted volume's snapshots are still there, by id.
    let all = pool.snapshots().unwrap();
    assert_eq!(all.iter().filter(|s| s.volume_name == "vol-07").count(), 20);
    assert!(all.windows(2).all(|w| w[0].generation <= w[1].generation));
    assert!(pool.check().unwrap().is_clean());
}

/// A pool written by another format version is refused with both versions named.
#[test]
fn another_format_version_is_refused_by_name() {
    let dev = Arc::new(MemoryDevice::new(16 << 20));
    Pool::create(dev.clone(), opts()).unwrap().close().unwrap();
    let mut image = dev.image();
    for slot in 0..2usize {
        let page = &mut image[slot * 4096..(slot + 1) * 4096];
        page[32..36].copy_from_slice(&1u32.to_le_bytes());
        // Reseal: the checksum covers the page except its own four bytes.
        let mut h = crc32fast::Hasher::new();
        h.update(&page[0..4]);
        h.update(&page[8..]);
        let crc = h.finalize();
        page[4..8].copy_from_slice(&crc.to_le_bytes());
    }
    let e = Pool::open(Arc::new(MemoryDevice::from_image(image)), opts())
        .expect_err("a version 1 pool must not open");
    assert!(
        matches!(
            e,
            Error::UnsupportedVersion {
                found: 1,
                supported: snapvol::FORMAT_VERSION
            }
        ),
        "{e:?}"
    );
}
