//! Backups: the same suite on a directory repository and on a real S3-compatible server on
//! loopback (moto), then fault injection, races, hostile repositories and deletion orders.

#[cfg(feature = "s3")]
#[path = "support/moto.rs"]
mod moto;
#[cfg(feature = "s3")]
use moto::{create_bucket, start_moto};
use snapvol::backup::{
    BaseChoice, DirTarget, FaultTarget, RepoOptions, Repository, RestoreOptions, Retention, Target,
    TargetFault,
};
use snapvol::device::MemoryDevice;
use snapvol::{Error, Pool, PoolOptions, SnapshotId};
use std::sync::Arc;

const MIB: u64 = 1 << 20;
/// A small chunk size keeps the suite fast while every chunk path is exercised.
const CHUNK: u32 = 256 << 10;

fn pool() -> Pool {
    Pool::create(
        Arc::new(MemoryDevice::new(256 * MIB)),
        PoolOptions::default().commit_interval(None),
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

fn snap_bytes(p: &Pool, id: SnapshotId) -> Vec<u8> {
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
fn sparse_chunks_read_by_one_worker_restore_byte_for_byte() {
    // One worker reuses one buffer for every chunk, which holds zeros between chunks: data
    // from one chunk must never leak into the next one's hash or object.
    let dir = tempfile::tempdir().unwrap();
    let mut r = repo(Arc::new(DirTarget::new(dir.path()).unwrap()));
    r.set_parallelism(1);
    let a = pool();
    // 5 chunks and a short sixth one.
    let size = 5 * u64::from(CHUNK) + 12288;
    let v = a.create_volume("sp", size).unwrap();
    let c = u64::from(CHUNK);
    v.write_at(&pattern(4096, 1), 8192).unwrap();
    v.write_at(&pattern(100_000, 2), c + 50_000).unwrap();
    v.write_at(&pattern(7, 3), 2 * c + c - 7).unwrap();
    // Mapped blocks that hold zeros: a chunk of them is stored as nothing, like a hole.
    v.write_at(&vec![0u8; 8192], 3 * c + 4096).unwrap();
    v.write_at(&pattern(4096, 5), 5 * c + 4096).unwrap();
    let s = a.snapshot("sp", "s").unwrap();
    let p = r.push(&a, s, BaseChoice::Auto).unwrap();
    assert_eq!((p.chunks, p.read_chunks, p.uploaded_chunks), (4, 5, 4));
    let b = pool();
    r.restore(s, &b, &RestoreOptions::default()).unwrap();
    assert_eq!(snap_bytes(&b, s), snap_bytes(&a, s));
    assert!(r.verify(None, 100.0).unwrap().problems.is_empty());
}

#[test]
fn directory_repository_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    suite(Arc::new(DirTarget::new(dir.path()).unwrap()));
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

/// A pool holding volume "db" with three snapshots pushed in turn; returns the pool, the
/// snapshot ids and a clone of each snapshot's bytes.
fn populated(r: &Repository) -> (Pool, Vec<SnapshotId>, Vec<Vec<u8>>) {
    let a = pool();
    let v = a.create_volume("db", 4 * MIB).unwrap();
    let mut ids = Vec::new();
    let mut bytes = Vec::new();
    for round in 0..3u64 {
        v.write_at(&pattern(600_000, round), round * 700_000)
            .unwrap();
        let id = a.snapshot("db", &format!("s{round}")).unwrap();
        r.push(&a, id, BaseChoice::Auto).unwrap();
        bytes.push(snap_bytes(&a, id));
        ids.push(id);
    }
    (a, ids, bytes)
}

/// What must be true of a pool a failed restore touched: nothing of it is visible.
fn untouched(p: &Pool) {
    assert!(
        p.volumes().unwrap().is_empty(),
        "a failed restore left {:?}",
        p.volumes().unwrap()
    );
    assert!(p.snapshots().unwrap().is_empty());
    assert!(p.check().unwrap().is_clean());
}

#[test]
fn every_failing_put_of_a_push_is_a_typed_error_and_a_rerun_uploads_only_what_is_missing() {
    let a = pool();
    let v = a.create_volume("db", 4 * MIB).unwrap();
    v.write_at(&pattern(3 * MIB as usize, 7), 0).unwrap();
    let id = a.snapshot("db", "s").unwrap();
    let faulty = || {
        let dir = tempfile::tempdir().unwrap();
        let fault = Arc::new(FaultTarget::new(Arc::new(
            DirTarget::new(dir.path()).unwrap(),
        )));
        let r = repo(fault.clone());
        (dir, fault, r)
    };
    // Count the puts of a whole push.
    let (_d, counting, rc) = faulty();
    counting.arm(TargetFault::FailPut(u64::MAX));
    let full = rc.push(&a, id, BaseChoice::Full).unwrap();
    let (puts, ..) = counting.calls();
    assert_eq!(
        puts,
        full.uploaded_chunks + 2,
        "the lock, every chunk, the manifest"
    );
    for n in 1..=puts {
        let (dir, fault, r) = faulty();
        fault.arm(TargetFault::FailPut(n));
        match r.push(&a, id, BaseChoice::Full) {
            Err(Error::Target { op: "put", .. }) => {}
            other => panic!("put {n}: expected a target error, got {other:?}"),
        }
        assert_eq!(fault.fired(), 1);
        assert!(
            r.list().unwrap().is_empty(),
            "a failed push shows no backup"
        );
        let before = chunk_files(dir.path()).len() as u64;
        fault.disarm();
        let st = r.push(&a, id, BaseChoice::Full).unwrap();
        assert_eq!(
            before + st.uploaded_chunks,
            full.uploaded_chunks,
            "put {n}: the rerun uploads only what is missing"
        );
        let b = pool();
        r.restore(id, &b, &RestoreOptions::default()).unwrap();
        assert_eq!(snap_bytes(&b, id), snap_bytes(&a, id));
    }
}

#[test]
fn every_failing_truncated_or_corrupted_get_of_a_restore_leaves_the_pool_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let fault = Arc::new(FaultTarget::new(Arc::new(
        DirTarget::new(dir.path()).unwrap(),
    )));
    let r = repo(fault.clone());
    let (a, ids, bytes) = populated(&r);
    drop(a);
    // Gets of a restore of the newest backup onto nothing.
    fault.arm(TargetFault::FailGet(u64::MAX));
    r.restore(ids[2], &pool(), &RestoreOptions::default())
        .unwrap();
    let (_, gets, ..) = fault.calls();
    assert!(gets > 3);
    for n in 1..=gets {
        for f in [
            TargetFault::FailGet(n),
            TargetFault::CorruptGet(n),
            TargetFault::TruncateGet(n),
        ] {
            let b = pool();
            fault.arm(f);
            match r.restore(ids[2], &b, &RestoreOptions::default()) {
                Err(Error::Target { op: "get", .. }) => {
                    assert!(matches!(f, TargetFault::FailGet(_)))
                }
                Err(Error::BackupCorrupt { backup, .. }) => {
                    assert!(!matches!(f, TargetFault::FailGet(_)));
                    assert_eq!(backup, format!("{:032x}", ids[2]), "names the backup");
                }
                // A short ranged read of the manifest is followed by another: no harm.
                Ok(_) => {
                    assert!(
                        matches!(f, TargetFault::TruncateGet(_)),
                        "{f:?} went unnoticed"
                    );
                    assert_eq!(snap_bytes(&b, ids[2]), bytes[2]);
                    continue;
                }
                Err(other) => panic!("{f:?}: unexpected {other:?}"),
            }
            assert_eq!(fault.fired(), 1, "{f:?}");
            untouched(&b);
            fault.disarm();
            r.restore(ids[2], &b, &RestoreOptions::default()).unwrap();
            assert_eq!(snap_bytes(&b, ids[2]), bytes[2]);
        }
    }
}

#[test]
fn verify_and_gc_under_faults() {
    let dir = tempfile::tempdir().unwrap();
    let fault = Arc::new(FaultTarget::new(Arc::new(
        DirTarget::new(dir.path()).unwrap(),
    )));
    let r = repo(fault.clone());
    let (_a, ids, _) = populated(&r);
    // A corrupted body is a finding naming the backup; a failing target is an error.
    fault.arm(TargetFault::CorruptGet(6));
    let rep = r.verify(None, 100.0).unwrap();
    assert_eq!(rep.problems.len(), 1, "{:?}", rep.problems);
    assert!(ids.contains(&rep.problems[0].backup));
    fault.arm(TargetFault::FailGet(3));
    assert!(matches!(
        r.verify(None, 100.0),
        Err(Error::Target { op: "get", .. })
    ));
    fault.disarm();
    assert!(r.verify(None, 100.0).unwrap().is_clean());
    // gc stopped by a failing list or delete removes nothing it should not; a rerun finishes.
    r.delete(ids[0]).unwrap();
    fault.arm(TargetFault::FailDelete(1));
    assert!(matches!(
        r.gc(std::time::Duration::ZERO),
        Err(Error::Target { op: "delete", .. })
    ));
    fault.arm(TargetFault::FailList(2));
    assert!(matches!(
        r.gc(std::time::Duration::ZERO),
        Err(Error::Target { op: "list", .. })
    ));
    fault.disarm();
    r.gc(std::time::Duration::ZERO).unwrap();
    for &id in &ids[1..] {
        r.restore(id, &pool(), &RestoreOptions::default()).unwrap();
    }
    assert!(r.verify(None, 100.0).unwrap().is_clean());
}

/// Paths of a directory repository's objects.
fn chunk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(subs) = std::fs::read_dir(dir.join("chunks")) else {
        return out;
    };
    for sub in subs {
        for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
            let f = f.unwrap().path();
            // Temporary files are not objects.
            if !f.to_string_lossy().contains(".tmp-") {
                out.push(f);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn hostile_repositories_are_typed_errors_and_leave_the_pool_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let r = repo(Arc::new(DirTarget::new(dir.path()).unwrap()));
    let (_a, ids, _) = populated(&r);
    let chunks = chunk_files(dir.path());
    let manifest = |id: SnapshotId| dir.path().join(format!("manifests/{id:032x}"));
    let restore_fails = |id: SnapshotId, what: &str| {
        let b = pool();
        let e = r
            .restore(id, &b, &RestoreOptions::default())
            .expect_err(what);
        untouched(&b);
        e
    };
    // A missing chunk.
    let saved = std::fs::read(&chunks[0]).unwrap();
    std::fs::remove_file(&chunks[0]).unwrap();
    let bad: Vec<SnapshotId> = ids
        .iter()
        .copied()
        .filter(|&id| r.restore(id, &pool(), &RestoreOptions::default()).is_err())
        .collect();
    assert!(!bad.is_empty());
    match restore_fails(bad[0], "missing chunk") {
        Error::BackupCorrupt { object, detail, .. } => {
            assert!(detail.contains("missing"), "{detail}");
            assert!(chunks[0].ends_with(&object), "{object}");
        }
        other => panic!("{other:?}"),
    }
    let rep = r.verify(None, 100.0).unwrap();
    assert!(rep.problems.iter().all(|p| p.detail.contains("missing")));
    assert_eq!(
        rep.problems
            .iter()
            .map(|p| p.backup)
            .collect::<Vec<_>>()
            .len(),
        1,
        "each distinct chunk is checked once"
    );
    // A truncated chunk, then a swapped one (another chunk's bytes under its name).
    std::fs::write(&chunks[0], &saved[..saved.len() / 2]).unwrap();
    assert!(matches!(
        restore_fails(bad[0], "truncated chunk"),
        Error::BackupCorrupt { .. }
    ));
    std::fs::copy(&chunks[1], &chunks[0]).unwrap();
    match restore_fails(bad[0], "swapped chunk") {
        Error::BackupCorrupt { detail, .. } => assert!(detail.contains("hash"), "{detail}"),
        other => panic!("{other:?}"),
    }
    std::fs::write(&chunks[0], &saved).unwrap();
    // A swapped manifest, a truncated one, a flipped byte, a newer format.
    let m0 = std::fs::read(manifest(ids[0])).unwrap();
    let m1 = std::fs::read(manifest(ids[1])).unwrap();
    std::fs::write(manifest(ids[0]), &m1).unwrap();
    match restore_fails(ids[0], "swapped manifest") {
        Error::BackupCorrupt { detail, .. } => assert!(detail.contains("swapped"), "{detail}"),
        other => panic!("{other:?}"),
    }
    std::fs::write(manifest(ids[0]), &m0[..m0.len() - 10]).unwrap();
    assert!(matches!(
        restore_fails(ids[0], "truncated manifest"),
        Error::BackupCorrupt { .. }
    ));
    for at in [20, m0.len() - 40, m0.len() - 1] {
        let mut m = m0.clone();
        m[at] ^= 1;
        std::fs::write(manifest(ids[0]), &m).unwrap();
        assert!(
            matches!(
                restore_fails(ids[0], "flipped byte"),
                Error::BackupCorrupt { .. }
            ),
            "byte {at}"
        );
    }
    let mut m = m0.clone();
    m[4] = 9;
    std::fs::write(manifest(ids[0]), &m).unwrap();
    assert!(matches!(
        restore_fails(ids[0], "newer manifest"),
        Error::UnsupportedBackupVersion { found: 9, .. }
    ));
    // A manifest claiming a volume beyond the largest (its size field, at byte 16) is
    // refused before anything is allocated.
    let mut m = m0.clone();
    m[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let header_len = u32::from_le_bytes(m[8..12].try_into().unwrap()) as usize;
    let crc = crc32fast::hash(&m[..header_len - 4]);
    m[header_len - 4..header_len].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(manifest(ids[0]), &m).unwrap();
    match restore_fails(ids[0], "huge size") {
        Error::BackupCorrupt { detail, .. } => assert!(detail.contains("largest"), "{detail}"),
        other => panic!("{other:?}"),
    }
    std::fs::write(manifest(ids[0]), &m0).unwrap();
    let config = dir.path().join("config");
    let c = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, c.replace("version 1", "version 2")).unwrap();
    assert!(matches!(
        Repository::open(Arc::new(DirTarget::new(dir.path()).unwrap())),
        Err(Error::UnsupportedBackupVersion { found: 2, .. })
    ));
    std::fs::write(&config, c).unwrap();
    for &id in &ids {
        r.restore(id, &pool(), &RestoreOptions::default()).unwrap();
    }
}

/// A small deterministic generator for orders.
fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

#[test]
fn backups_deleted_in_random_orders_leave_the_others_restorable() {
    for seed in 1..=4u64 {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(Arc::new(DirTarget::new(dir.path()).unwrap()));
        let a = pool();
        let v = a.create_volume("db", 3 * MIB).unwrap();
        let mut backups = Vec::new();
        for round in 0..6u64 {
            let at = (round * 400_000 + seed * 1000) % (2 * MIB);
            v.write_at(&pattern(300_000, round + seed * 10), at)
                .unwrap();
            if round == 3 {
                v.discard(0, MIB).unwrap();
            }
            let id = a.snapshot("db", &format!("r{round}")).unwrap();
            r.push(&a, id, BaseChoice::Auto).unwrap();
            backups.push((id, snap_bytes(&a, id)));
            // Local snapshots go too: later pushes run from bookmarks.
            if round % 2 == 1 {
                a.delete_snapshot("db", &format!("r{}", round - 1)).unwrap();
            }
        }
        shuffle(&mut backups, seed);
        while let Some((gone, _)) = backups.pop() {
            r.delete(gone).unwrap();
            r.gc(std::time::Duration::ZERO).unwrap();
            for (id, want) in &backups {
                let b = pool();
                r.restore(*id, &b, &RestoreOptions::default()).unwrap();
                assert_eq!(&snap_bytes(&b, *id), want, "seed {seed}");
            }
        }
        // Nothing is left once every backup is gone.
        assert!(chunk_files(dir.path()).is_empty());
        // Not even what an interrupted put leaves: gc removes old temporary files.
        let left = dir.path().join("chunks/00/leftover.tmp-0123");
        std::fs::create_dir_all(left.parent().unwrap()).unwrap();
        std::fs::write(&left, b"half a chunk").unwrap();
        assert_eq!(
            r.gc(std::time::Duration::ZERO).unwrap().leftovers,
            0,
            "one written moments ago may belong to a put in flight"
        );
        let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        std::fs::File::options()
            .write(true)
            .open(&left)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        assert_eq!(
            r.gc(std::time::Duration::from_secs(3 * 3600))
                .unwrap()
                .leftovers,
            0
        );
        assert_eq!(r.gc(std::time::Duration::ZERO).unwrap().leftovers, 1);
        assert!(!left.exists());
    }
}

#[test]
fn gc_racing_pushes_never_sweeps_what_a_push_references() {
    let dir = tempfile::tempdir().unwrap();
    let r = repo(Arc::new(DirTarget::new(dir.path()).unwrap()));
    let a = pool();
    let v = a.create_volume("db", 8 * MIB).unwrap();
    v.write_at(&pattern(8 * MIB as usize, 1), 0).unwrap();
    for round in 0..6 {
        // The same content backed up before and deleted: its chunks are garbage the next
        // push finds present and reuses, unless gc sweeps them first.
        let old = a.snapshot("db", &format!("old{round}")).unwrap();
        r.push(&a, old, BaseChoice::Full).unwrap();
        r.delete(old).unwrap();
        let new = a.snapshot("db", &format!("new{round}")).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (mut busy, mut ran) = (0, 0);
        let started = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            let gc = s.spawn(|| {
                started.wait();
                // At least one collection, however the threads are scheduled.
                loop {
                    match r.gc(std::time::Duration::ZERO) {
                        Ok(_) => ran += 1,
                        Err(Error::RepositoryBusy(_)) => busy += 1,
                        Err(e) => panic!("{e}"),
                    }
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                }
            });
            // The push starts only once the collector runs, so the two overlap.
            started.wait();
            r.push(&a, new, BaseChoice::Full).unwrap();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            gc.join().unwrap();
        });
        assert!(ran + busy > 0);
        let b = pool();
        r.restore(new, &b, &RestoreOptions::default()).unwrap();
        assert_eq!(snap_bytes(&b, new), snap_bytes(&a, new));
        r.delete(new).unwrap();
    }
}

#[test]
fn prune_keeps_the_newest_per_volume() {
    let dir = tempfile::tempdir().unwrap();
    let r = repo(Arc::new(DirTarget::new(dir.path()).unwrap()));
    let a = pool();
    for vol in ["a", "b"] {
        let v = a.create_volume(vol, MIB).unwrap();
        for i in 0..4u64 {
            v.write_at(&pattern(5000, i), i * 8192).unwrap();
            let id = a.snapshot(vol, &format!("s{i}")).unwrap();
            r.push(&a, id, BaseChoice::Auto).unwrap();
        }
    }
    let keep = Retention {
        last: 2,
        ..Retention::default()
    };
    let dry = r.prune(keep, true).unwrap();
    assert_eq!((dry.kept.len(), dry.removed.len()), (4, 4));
    assert_eq!(r.list().unwrap().len(), 8, "a dry run deletes nothing");
    let done = r.prune(keep, false).unwrap();
    assert_eq!(done, dry);
    let left: Vec<String> = r
        .list()
        .unwrap()
        .iter()
        .map(|b| format!("{}@{}", b.volume, b.snapshot))
        .collect();
    let mut sorted = left.clone();
    sorted.sort();
    assert_eq!(sorted, ["a@s2", "a@s3", "b@s2", "b@s3"]);
}

/// The `snapvol` binary, with S3 credentials for moto in its environment.
fn cli(args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_snapvol"))
        .args(args)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    out
}

fn cli_ok(args: &[&str]) -> String {
    let out = cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn cli_json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&cli_ok(args)).unwrap()
}

/// Push, list, restore by id into another pool, verify, prune, delete and gc through the
/// CLI, on `repo` (a directory or an s3:// URL; `extra` carries the S3 flags).
fn cli_workflow(dir: &std::path::Path, repo: &str, extra: &[&str]) {
    let p = dir.join("a.img").display().to_string();
    let q = dir.join("b.img").display().to_string();
    let data = dir.join("data");
    std::fs::write(&data, pattern(3 << 20, 11)).unwrap();
    cli_ok(&["pool", "create", &p, "--size", "256M"]);
    cli_ok(&["pool", "create", &q, "--size", "256M"]);
    cli_ok(&["create", &p, "db", "--size", "8M"]);
    cli_ok(&["write", &p, "db", data.to_str().unwrap(), "--offset", "1M"]);
    cli_ok(&["snapshot", &p, "db@mon"]);
    let mut args = vec!["backup", "init", repo, "--chunk-size", "256K"];
    args.extend_from_slice(extra);
    cli_ok(&args);
    let mut args = vec!["backup", "push", &p, "db@mon", "--to", repo, "--json"];
    args.extend_from_slice(extra);
    let mon = cli_json(&args);
    assert_eq!(mon["snapshot"], "db@mon");
    assert_eq!(mon["base_id"], serde_json::Value::Null);
    assert_eq!(mon["chunks"], 12);
    assert_eq!(mon["uploaded_chunks"], 12);
    let mon_id = mon["id"].as_str().unwrap().to_string();
    cli_ok(&["write", &p, "db", data.to_str().unwrap(), "--offset", "5M"]);
    cli_ok(&["snapshot", &p, "db@tue"]);
    cli_ok(&["destroy", &p, "db@mon"]);
    let mut args = vec!["backup", "push", &p, "db@tue", "--to", repo, "--json"];
    args.extend_from_slice(extra);
    let tue = cli_json(&args);
    assert_eq!(
        tue["base_id"].as_str(),
        Some(mon_id.as_str()),
        "from bookmark db#mon"
    );
    let tue_id = tue["id"].as_str().unwrap().to_string();
    let mut args = vec!["backup", "list", repo, "--json"];
    args.extend_from_slice(extra);
    let list = cli_json(&args);
    let backups = list["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 2);
    assert_eq!(backups[1]["id"].as_str(), Some(tue_id.as_str()));
    assert_eq!(backups[1]["size"], 8 << 20);
    // Restore by id alone into the other pool, with a clone.
    for id in [&mon_id, &tue_id] {
        let mut args = vec!["backup", "restore", repo, id, &q, "--json"];
        args.extend_from_slice(extra);
        let r = cli_json(&args);
        assert_eq!(r["id"].as_str(), Some(id.as_str()));
    }
    // A snapshot id is unique in a pool: a second copy goes to a third pool.
    let c = dir.join("c.img").display().to_string();
    cli_ok(&["pool", "create", &c, "--size", "256M"]);
    let mut args = vec![
        "backup", "restore", repo, &tue_id, &c, "copy", "--clone", "work",
    ];
    args.extend_from_slice(extra);
    cli_ok(&args);
    let want = cli(&["read", &p, "db@tue"]).stdout;
    assert_eq!(cli(&["read", &q, "db@tue"]).stdout, want);
    assert_eq!(cli(&["read", &c, "copy@tue"]).stdout, want);
    assert_eq!(cli(&["read", &c, "work"]).stdout, want);
    let mut args = vec!["backup", "verify", repo, "--json"];
    args.extend_from_slice(extra);
    assert_eq!(cli_json(&args)["clean"], true);
    let mut args = vec![
        "backup",
        "prune",
        repo,
        "--keep-last",
        "1",
        "--dry-run",
        "--json",
    ];
    args.extend_from_slice(extra);
    let pr = cli_json(&args);
    assert_eq!(pr["removed"][0]["id"].as_str(), Some(mon_id.as_str()));
    let mut args = vec!["backup", "delete", repo, &mon_id];
    args.extend_from_slice(extra);
    cli_ok(&args);
    let mut args = vec!["backup", "gc", repo, "--grace", "0s", "--json"];
    args.extend_from_slice(extra);
    let gc = cli_json(&args);
    assert_eq!(gc["manifests"], 1);
    // A bad id and a missing backup are one-line errors.
    let mut args = vec!["backup", "restore", repo, "xyz", &q];
    args.extend_from_slice(extra);
    let out = cli(&args);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("32 hex digits"));
    let mut args = vec!["backup", "restore", repo, &mon_id, &q, "again"];
    args.extend_from_slice(extra);
    let out = cli(&args);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("already exists") || err.contains("no backup"),
        "{err}"
    );
}

#[test]
fn cli_backup_workflow_on_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo").display().to_string();
    cli_workflow(dir.path(), &repo, &[]);
    // verify exits 1 on a damaged repository.
    let chunk = &chunk_files(&dir.path().join("repo"))[0];
    let mut b = std::fs::read(chunk).unwrap();
    b[20] ^= 1;
    std::fs::write(chunk, b).unwrap();
    let out = cli(&["backup", "verify", &repo]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("does not match its hash"));
}

#[cfg(feature = "s3")]
#[test]
fn cli_backup_workflow_on_s3() {
    let moto = match start_moto() {
        Ok(m) => m,
        Err(why) => {
            eprintln!("SKIPPED cli_backup_workflow_on_s3: {why}");
            return;
        }
    };
    create_bucket(moto.port, "cluster");
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://127.0.0.1:{}", moto.port);
    cli_workflow(
        dir.path(),
        "s3://cluster/snapshots",
        &[
            "--endpoint",
            &endpoint,
            "--region",
            "us-east-1",
            "--path-style",
            "--allow-http",
        ],
    );
}

/// Runs a command and kills it (SIGKILL) `after_ms` milliseconds later; true if it had
/// finished by then.
fn run_and_kill(args: &[&str], after_ms: u64) -> bool {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_snapvol"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(after_ms));
    let finished = child.try_wait().unwrap().is_some();
    let _ = child.kill();
    child.wait().unwrap();
    finished
}

#[test]
fn kill_9_during_push_and_restore_then_rerun_completes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.img").display().to_string();
    let repo_dir = dir.path().join("repo");
    let repo = repo_dir.display().to_string();
    cli_ok(&["pool", "create", &p, "--size", "512M"]);
    cli_ok(&["create", &p, "db", "--size", "96M"]);
    let data = dir.path().join("data");
    std::fs::write(&data, pattern(96 << 20, 3)).unwrap();
    cli_ok(&["write", &p, "db", data.to_str().unwrap()]);
    cli_ok(&["snapshot", &p, "db@s"]);
    cli_ok(&["backup", "init", &repo, "--chunk-size", "64K"]);
    let total = 96 * 16;
    let mut killed = 0;
    for (round, after) in [30u64, 120, 400, 900].into_iter().enumerate() {
        let finished = run_and_kill(&["backup", "push", &p, "db@s", "--to", &repo], after);
        let manifests = std::fs::read_dir(repo_dir.join("manifests"))
            .map(|d| d.count())
            .unwrap_or(0);
        if finished {
            assert_eq!(manifests, 1);
            break;
        }
        killed += 1;
        assert_eq!(manifests, 0, "round {round}: a killed push left a manifest");
        let before = chunk_files(&repo_dir).len() as u64;
        if round < 3 {
            continue;
        }
        let st = cli_json(&["backup", "push", &p, "db@s", "--to", &repo, "--json"]);
        assert_eq!(
            before + st["uploaded_chunks"].as_u64().unwrap(),
            total,
            "the rerun uploaded only what was missing"
        );
    }
    assert!(killed >= 1, "no push was still running when killed");
    if killed < 4 {
        cli_ok(&["backup", "push", &p, "db@s", "--to", &repo]);
    }
    let id = cli_json(&["backup", "list", &repo, "--json"])["backups"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // A restore killed at any moment leaves no volume behind; a rerun completes.
    let q = dir.path().join("b.img").display().to_string();
    cli_ok(&["pool", "create", &q, "--size", "512M"]);
    let mut killed = 0;
    for after in [20u64, 150, 500] {
        if run_and_kill(&["backup", "restore", &repo, &id, &q], after) {
            break;
        }
        killed += 1;
        let list = cli_json(&["list", &q, "--json"]);
        assert_eq!(list["volumes"].as_array().unwrap().len(), 0, "{list}");
        assert_eq!(list["snapshots"].as_array().unwrap().len(), 0, "{list}");
        assert_eq!(cli_json(&["pool", "check", &q, "--json"])["clean"], true);
    }
    assert!(killed >= 1, "no restore was still running when killed");
    if cli_json(&["list", &q, "--json"])["snapshots"]
        .as_array()
        .unwrap()
        .is_empty()
    {
        cli_ok(&["backup", "restore", &repo, &id, &q]);
    }
    assert_eq!(
        cli(&["read", &q, "db@s"]).stdout,
        std::fs::read(&data).unwrap()
    );
}
