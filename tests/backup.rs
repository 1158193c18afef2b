//! Backups: the same suite on a directory repository and on a real S3-compatible server on
//! loopback (moto), then fault injection, races, hostile repositories and deletion orders.

use snapvol::backup::{
    BaseChoice, DirTarget, FaultTarget, RepoOptions, Repository, RestoreOptions, Retention, Target,
    TargetFault,
};
use snapvol::device::MemoryDevice;
use snapvol::{Error, Pool, PoolOptions};
use std::sync::Arc;

const MIB: u64 = 1 << 20;
/// A small chunk size keeps the suite fast while every chunk path is exercised.
const CHUNK: u32 = 256 << 10;

fn pool() -> Pool {
    Pool::create(
        Arc::new(MemoryDevice::new(256 * MIB)),
        PoolOptions {
            commit_interval: None,
            ..PoolOptions::default()
        },
    )
    .unwrap()
}

fn repo(target: Arc<dyn Target>) -> Repository {
    Repository::create(
        target,
        &RepoOptions {
            chunk_size: CHUNK,
            ..RepoOptions::default()
        },
    )
    .unwrap()
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn snap_bytes(p: &Pool, id: u128) -> Vec<u8> {
    let s = p.snapshot_by_id(id).unwrap();
    let mut b = vec![0u8; s.len().unwrap() as usize];
    s.read_at(&mut b, 0).unwrap();
    b
}

/// The whole lifecycle on one target: full and incremental pushes, restores by id alone
/// into a second pool (full, then only what differs), pushes from a bookmark after the base
/// snapshot is deleted, clones that dedup, verify, delete in any order, gc.
fn suite(target: Arc<dyn Target>) {
    let r = repo(target);
    let a = pool();
    let v = a.create_volume("db", 16 * MIB).unwrap();
    v.write_at(&pattern(6 * MIB as usize, 1), 0).unwrap();
    v.write_at(&pattern(MIB as usize, 2), 10 * MIB).unwrap();
    let s1 = a.snapshot("db", "mon").unwrap();
    let p1 = r.push(&a, s1, BaseChoice::Auto).unwrap();
    assert_eq!(p1.base_id, None);
    // 6 MiB + 1 MiB of data at 256 KiB chunks, nothing else read.
    assert_eq!(
        (p1.chunks, p1.read_chunks, p1.uploaded_chunks),
        (28, 28, 28)
    );
    // A second push of the same snapshot does nothing.
    assert!(r.push(&a, s1, BaseChoice::Auto).unwrap().already_present);

    // Scattered change: three chunks touched.
    v.write_at(b"changed", 3).unwrap();
    v.write_at(&pattern(4096, 3), 5 * MIB + 8192).unwrap();
    v.write_at(&pattern(4096, 4), 14 * MIB).unwrap();
    let s2 = a.snapshot("db", "tue").unwrap();
    let p2 = r.push(&a, s2, BaseChoice::Auto).unwrap();
    assert_eq!(p2.base_id, Some(s1));
    assert_eq!((p2.read_chunks, p2.uploaded_chunks), (3, 3));
    assert_eq!(p2.chunks, 29);

    // Restore by id alone into another pool.
    let b = pool();
    let st = r.restore(s1, &b, &RestoreOptions::default()).unwrap();
    assert_eq!((st.volume.as_str(), st.snapshot.as_str()), ("db", "mon"));
    assert_eq!(st.downloaded_chunks, 28);
    assert_eq!(snap_bytes(&b, s1), snap_bytes(&a, s1));
    // The newer one onto it downloads only what differs.
    let st = r.restore(s2, &b, &RestoreOptions::default()).unwrap();
    assert_eq!(st.base_id, Some(s1));
    assert_eq!(st.downloaded_chunks, 3);
    assert_eq!(snap_bytes(&b, s2), snap_bytes(&a, s2));
    assert_eq!(
        b.volume("db").unwrap().len().unwrap(),
        16 * MIB,
        "the volume follows its newest restored snapshot"
    );
    // Restoring again is refused: the snapshot id is there.
    assert!(matches!(
        r.restore(s2, &b, &RestoreOptions::default()),
        Err(Error::AlreadyExists { .. })
    ));

    // The local base goes; the bookmark each push keeps makes the next push incremental.
    a.delete_snapshot("db", "tue").unwrap();
    v.discard(MIB, MIB).unwrap();
    a.resize_volume("db", 20 * MIB).unwrap();
    v.write_at(&pattern(8192, 5), 19 * MIB).unwrap();
    let s3 = a.snapshot("db", "wed").unwrap();
    let p3 = r.push(&a, s3, BaseChoice::Auto).unwrap();
    assert_eq!(p3.base_id, Some(s2), "incremental from bookmark db#tue");
    // Whole chunks that read as zeros now (the discard, the grown range, the ranges a
    // bookmark cannot vouch for) are known without reading. Read: the written chunk, and the
    // chunk at 14 MiB, whose never-written blocks the bookmark cannot vouch for next to data.
    assert_eq!(p3.read_chunks, 2);
    // Into a new volume name in a third pool, with a writable clone.
    let c = pool();
    let st = r
        .restore(
            s3,
            &c,
            &RestoreOptions {
                volume: Some("db-copy".into()),
                clone: Some("db-work".into()),
            },
        )
        .unwrap();
    assert_eq!(st.clone.as_deref(), Some("db-work"));
    assert_eq!(snap_bytes(&c, s3), snap_bytes(&a, s3));
    let mut head = vec![0u8; 7];
    c.volume("db-work").unwrap().read_at(&mut head, 3).unwrap();
    assert_eq!(&head, b"changed");
    // Onto b's restored s2: only what differs from s2.
    let st = r.restore(s3, &b, &RestoreOptions::default()).unwrap();
    assert_eq!(st.base_id, Some(s2));
    assert!(st.downloaded_chunks <= 3, "{st:?}");
    assert_eq!(snap_bytes(&b, s3), snap_bytes(&a, s3));

    // Two clones of one template: the second uploads nothing new.
    let t = a.create_volume("template", 8 * MIB).unwrap();
    t.write_at(&pattern(8 * MIB as usize, 9), 0).unwrap();
    a.snapshot("template", "gold").unwrap();
    a.clone_snapshot("template", "gold", "w1").unwrap();
    a.clone_snapshot("template", "gold", "w2").unwrap();
    let w1 = a.snapshot("w1", "first").unwrap();
    let w2 = a.snapshot("w2", "first").unwrap();
    let q1 = r.push(&a, w1, BaseChoice::Auto).unwrap();
    let q2 = r.push(&a, w2, BaseChoice::Auto).unwrap();
    assert_eq!(q1.uploaded_chunks, 32);
    assert_eq!(q2.uploaded_chunks, 0);

    let list = r.list().unwrap();
    assert_eq!(list.len(), 5);
    assert!(r.verify(None, 100.0).unwrap().is_clean());

    // Delete the oldest, gc, and every other backup still restores byte for byte.
    r.delete(s1).unwrap();
    assert!(matches!(r.delete(s1), Err(Error::BackupNotFound(_))));
    let gc = r.gc(std::time::Duration::ZERO).unwrap();
    assert!(gc.removed > 0, "{gc:?}");
    for id in [s2, s3, w1, w2] {
        let d = pool();
        r.restore(id, &d, &RestoreOptions::default()).unwrap();
        let want = match id {
            x if x == s2 => snap_bytes(&b, s2),
            x => snap_bytes(&a, x),
        };
        assert_eq!(snap_bytes(&d, id), want);
        assert!(d.check().unwrap().is_clean());
    }
    assert!(r.verify(None, 100.0).unwrap().is_clean());
    assert!(a.check().unwrap().is_clean() && b.check().unwrap().is_clean());
}

#[test]
fn directory_repository_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    suite(Arc::new(DirTarget::new(dir.path()).unwrap()));
}

/// A moto S3 server on a free loopback port, stopped when dropped.
struct Moto {
    child: std::process::Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_moto() -> Result<Moto, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let child = std::process::Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("moto_server: {e} (pip install 'moto[server]')"))?;
    let moto = Moto { child, port };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(moto);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Err("moto_server did not start listening".into())
}

/// Creates a bucket with a plain HTTP request (moto takes unsigned requests).
fn create_bucket(port: u16, bucket: &str) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "create bucket: {reply}");
}

#[cfg(feature = "s3")]
fn s3_target(port: u16, bucket: &str, prefix: &str) -> Arc<dyn Target> {
    use snapvol::backup::{S3Options, S3Target};
    Arc::new(
        S3Target::new(&S3Options {
            bucket: bucket.into(),
            prefix: prefix.into(),
            endpoint: Some(format!("http://127.0.0.1:{port}")),
            region: Some("us-east-1".into()),
            path_style: true,
            allow_http: true,
            max_retries: 2,
            access_key_id: Some("testing".into()),
            secret_access_key: Some("testing".into()),
        })
        .unwrap(),
    )
}

#[cfg(feature = "s3")]
#[test]
fn s3_repository_lifecycle_on_moto() {
    let moto = match start_moto() {
        Ok(m) => m,
        Err(why) => {
            eprintln!("SKIPPED s3_repository_lifecycle_on_moto: {why}");
            return;
        }
    };
    create_bucket(moto.port, "backups");
    suite(s3_target(moto.port, "backups", "cluster-a/pool-1"));
    // Create-only puts are real on the server: a second repository cannot replace the first.
    let t = s3_target(moto.port, "backups", "cluster-a/pool-1");
    assert!(!t.put("config", b"other", true).unwrap());
    assert!(matches!(
        Repository::create(t, &RepoOptions::default()),
        Err(Error::AlreadyExists { .. })
    ));
}
