//! Read-only opens: nothing is ever written or flushed, every change is refused with
//! `Error::ReadOnly`, read-only opens share a pool file while a read-write open excludes
//! them, and a device shorter than the pool opens when nothing past its end is in use.

use snapvol::device::{CountingDevice, MemoryDevice};
use snapvol::{Error, Pool, PoolOptions};
use std::sync::Arc;

fn ro() -> PoolOptions {
    PoolOptions::default().read_only(true)
}

#[test]
fn a_read_only_pool_reads_everything_and_writes_nothing() {
    let dev = Arc::new(CountingDevice::new(Arc::new(MemoryDevice::new(64 << 20))));
    {
        let pool = Pool::create(dev.clone(), PoolOptions::default()).unwrap();
        let v = pool.create_volume("db", 1 << 20).unwrap();
        v.write_at(&[7u8; 8192], 4096).unwrap();
        pool.snapshot("db", "s").unwrap();
        pool.close().unwrap();
    }
    let (w, f) = (dev.writes(), dev.flushes());
    let pool = Pool::open(dev.clone(), ro()).unwrap();
    let v = pool.volume("db").unwrap();
    let mut b = vec![0u8; 8192];
    v.read_at(&mut b, 4096).unwrap();
    assert_eq!(b, vec![7u8; 8192]);
    assert_eq!(pool.snapshots().unwrap().len(), 1);
    assert!(pool.check().unwrap().is_clean());
    // Every kind of change is refused, by kind.
    assert!(matches!(v.write_at(&[1], 0), Err(Error::ReadOnly(_))));
    assert!(matches!(v.discard(0, 4096), Err(Error::ReadOnly(_))));
    assert!(matches!(pool.snapshot("db", "t"), Err(Error::ReadOnly(_))));
    assert!(matches!(
        pool.create_volume("x", 4096),
        Err(Error::ReadOnly(_))
    ));
    assert!(matches!(
        pool.delete_snapshot("db", "s"),
        Err(Error::ReadOnly(_))
    ));
    pool.flush().unwrap();
    drop(v);
    pool.close().unwrap();
    assert_eq!(dev.writes(), w, "no write reached the device");
    assert_eq!(dev.flushes(), f, "no flush either");
    // The refusals left nothing behind: a read-write open sees the pool as it was.
    let pool = Pool::open(dev, PoolOptions::default()).unwrap();
    assert_eq!(pool.snapshots().unwrap().len(), 1);
    assert!(pool.check().unwrap().is_clean());
}

#[test]
fn read_only_opens_share_a_pool_file_and_exclude_a_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.img");
    Pool::create_file(&path, 64 << 20, PoolOptions::default())
        .unwrap()
        .close()
        .unwrap();
    let a = Pool::open_path(&path, ro()).unwrap();
    let b = Pool::open_path(&path, ro()).unwrap();
    assert!(matches!(
        Pool::open_path(&path, PoolOptions::default()),
        Err(Error::InUse { .. })
    ));
    drop(a);
    drop(b);
    let w = Pool::open_path(&path, PoolOptions::default()).unwrap();
    assert!(matches!(
        Pool::open_path(&path, ro()),
        Err(Error::InUse { .. })
    ));
    drop(w);
}

#[test]
fn a_short_device_opens_read_only_only_while_nothing_past_its_end_is_used() {
    let mem = MemoryDevice::new(64 << 20);
    let dev = Arc::new(mem);
    {
        let pool = Pool::create(dev.clone(), PoolOptions::default()).unwrap();
        let v = pool.create_volume("db", 1 << 20).unwrap();
        v.write_at(&[9u8; 4096], 0).unwrap();
        pool.close().unwrap();
    }
    let image = dev.image();
    let cut = |len: usize| Arc::new(MemoryDevice::from_image(image[..len].to_vec()));
    // The unused tail is gone: a read-write open refuses, a read-only one reads.
    assert!(matches!(
        Pool::open(cut(63 << 20), PoolOptions::default()),
        Err(Error::Corrupt { .. })
    ));
    let pool = Pool::open(cut(63 << 20), ro()).unwrap();
    let mut b = [0u8; 4096];
    pool.volume("db").unwrap().read_at(&mut b, 0).unwrap();
    assert_eq!(b, [9u8; 4096]);
    // Cut into what the pool uses: refused, read-only too.
    match Pool::open(cut(4 << 20), ro()) {
        Err(Error::Corrupt { detail, .. }) => {
            assert!(detail.contains("past its end is in use"), "{detail}")
        }
        Err(e) => panic!("wrong error: {e:?}"),
        Ok(_) => panic!("opened a pool whose data lies past the device's end"),
    }
}
