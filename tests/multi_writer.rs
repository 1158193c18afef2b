//! Two writers reaching one pool by two paths (the same bytes under two handles, as a loop
//! device over a held pool file or a disk shared by two hosts gives): the one that would
//! commit over the other's commit is refused before it writes anything, and nothing either
//! reported as committed is lost.

use snapvol::device::{BlockDevice, MemoryDevice};
use snapvol::{Error, Pool, PoolOptions};
use std::sync::Arc;

fn opts() -> PoolOptions {
    PoolOptions::default().commit_interval(None)
}

#[test]
fn a_writer_whose_pool_was_committed_by_another_refuses_to_commit_over_it() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(64 << 20));
    let first = Pool::create(dev.clone(), opts()).unwrap();
    let v = first.create_volume("vm", 1 << 20).unwrap();
    v.write_at(b"flushed by the first", 0).unwrap();
    v.flush().unwrap();

    // A second path to the same bytes: it commits a snapshot and a volume.
    let second = Pool::open(dev.clone(), opts()).unwrap();
    let s = second.snapshot("vm", "vialoop").unwrap();
    second.create_volume("w", 1 << 20).unwrap();
    second.close().unwrap();

    // The first writer's next commit finds a newer superblock and refuses, naming it.
    v.write_at(b"unflushed", 4096).unwrap();
    match first.snapshot("vm", "later") {
        Err(Error::ConcurrentWriter {
            ours,
            found: Some(found),
            pid,
            host: _,
        }) => {
            assert!(found > ours, "found {found}, ours {ours}");
            assert_eq!(pid, std::process::id());
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert_eq!(
        Error::ConcurrentWriter {
            ours: 1,
            found: None,
            pid: 0,
            host: String::new()
        }
        .kind(),
        snapvol::ErrorKind::Unavailable
    );
    // And it stays refused: nothing more of it reaches the device.
    assert!(first.create_volume("x", 1 << 20).is_err());
    drop(v);
    drop(first);

    // Everything both reported as committed is there.
    let p = Pool::open(dev, opts()).unwrap();
    assert!(p.volume("w").is_ok(), "the second writer's volume survives");
    assert!(p.volume("x").is_err());
    let snap = p.snapshot_by_id(s).unwrap();
    let mut b = [0u8; 20];
    snap.read_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"flushed by the first");
    assert!(p.snapshot_by_id(s).is_ok());
    assert!(p.check().unwrap().is_clean());
}

#[test]
fn a_writer_that_commits_repeatedly_alone_is_never_refused() {
    // The check compares with what this engine itself last wrote: its own commits, in both
    // slots, over many generations (and after a reopen) never look like another writer's.
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(64 << 20));
    let p = Pool::create(dev.clone(), opts()).unwrap();
    let v = p.create_volume("v", 1 << 20).unwrap();
    for i in 0..20u8 {
        v.write_at(&[i; 4096], u64::from(i) * 4096).unwrap();
        v.flush().unwrap();
    }
    drop(v);
    p.close().unwrap();
    let p = Pool::open(dev, opts()).unwrap();
    p.snapshot("v", "s").unwrap();
    p.close().unwrap();
}

/// Multihost (ZFS's idea, `PoolOptions::multihost`): a pool recorded as shared by hosts
/// beats a heartbeat (a superblock at least once per interval, also when idle), and a
/// read-write open watches for three intervals first, so a second writer is refused at its
/// open, before it writes a byte, not only at the first writer's next commit. Once the holder
/// is gone the pool opens (after the same wait), and read-only opens never wait.
#[test]
fn a_multihost_pool_refuses_a_second_writer_at_its_open() {
    use std::time::{Duration, Instant};
    let beat = Duration::from_millis(100);
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(64 << 20));
    let holder = Pool::create(dev.clone(), opts().multihost(Some(beat))).unwrap();
    assert_eq!(holder.stats().multihost, Some(beat), "the pool records it");
    let v = holder.create_volume("vm", 1 << 20).unwrap();
    v.write_at(b"the holder's", 0).unwrap();
    v.flush().unwrap();

    // Idle, the holder still commits: the generation moves without any change.
    let g = holder.stats().generation;
    std::thread::sleep(beat * 4);
    assert!(
        holder.stats().generation > g,
        "heartbeats while idle: {} -> {}",
        g,
        holder.stats().generation
    );

    // A second writer (the same bytes by another path; its options do not mention
    // multihost: the pool's record is what counts) is refused after watching.
    let started = Instant::now();
    let second = Pool::open(dev.clone(), opts());
    assert!(
        matches!(second, Err(Error::ConcurrentWriter { .. })),
        "{second:?}"
    );
    assert!(started.elapsed() >= beat * 3, "it watched three intervals");
    // The holder goes on committing and its data is intact.
    v.write_at(b"still here", 4096).unwrap();
    v.flush().unwrap();
    let mut buf = [0u8; 12];
    v.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"the holder's");

    // A read-only open does not wait and does not count as a writer.
    let started = Instant::now();
    let reader = Pool::open(dev.clone(), opts().read_only(true)).unwrap();
    assert!(started.elapsed() < beat * 3);
    drop(reader);

    drop(v);
    holder.close().unwrap();
    let started = Instant::now();
    let next = Pool::open(dev.clone(), opts()).unwrap();
    assert!(started.elapsed() >= beat * 3);
    let mut buf = [0u8; 10];
    next.volume("vm").unwrap().read_at(&mut buf, 4096).unwrap();
    assert_eq!(&buf, b"still here");
    drop(next);

    // Out-of-range intervals are refused with the reason.
    for bad in [Duration::from_millis(10), Duration::from_secs(61)] {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(64 << 20));
        match Pool::create(dev, opts().multihost(Some(bad))) {
            Err(Error::InvalidArgument(msg)) => assert!(msg.contains("multihost"), "{msg}"),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
}
