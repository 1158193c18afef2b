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
