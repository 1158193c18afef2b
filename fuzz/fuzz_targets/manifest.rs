//! Hostile manifests: a real manifest with byte edits, a cut and an appended tail, or raw
//! bytes, under a real backup's name. list, info, verify and restore must never panic or
//! allocate by what the manifest claims; a failed restore leaves the pool as it was, and one
//! that succeeds leaves it consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapvol::backup::{BaseChoice, MemoryTarget, RepoOptions, Repository, RestoreOptions, Target};
use snapvol::device::MemoryDevice;
use snapvol::{Pool, PoolOptions};
use std::sync::{Arc, OnceLock};

fn pool() -> Pool {
    let opts = PoolOptions::default().commit_interval(None);
    Pool::create(Arc::new(MemoryDevice::new(16 << 20)), opts).unwrap()
}

/// A repository with two backups (the second incremental); the key and bytes of the
/// second's manifest.
fn seed() -> &'static (Arc<MemoryTarget>, snapvol::SnapshotId, Vec<u8>) {
    static S: OnceLock<(Arc<MemoryTarget>, snapvol::SnapshotId, Vec<u8>)> = OnceLock::new();
    S.get_or_init(|| {
        let t = Arc::new(MemoryTarget::new());
        let r = Repository::create(t.clone(), &RepoOptions { chunk_size: 64 << 10, ..RepoOptions::default() }).unwrap();
        let p = pool();
        let v = p.create_volume("v", 1 << 20).unwrap();
        v.write_at(&[3u8; 100_000], 1000).unwrap();
        let a = p.snapshot("v", "a").unwrap();
        r.push(&p, a, BaseChoice::Auto).unwrap();
        v.write_at(&[4u8; 9_000], 300_000).unwrap();
        let b = p.snapshot("v", "b").unwrap();
        r.push(&p, b, BaseChoice::Auto).unwrap();
        let m = t.get(&format!("manifests/{b:032x}"), None).unwrap().unwrap();
        (t, b, m)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let (seed_target, id, manifest) = seed();
    // A private copy of the repository, so runs do not see each other's edits.
    let t = Arc::new(MemoryTarget::new());
    seed_target
        .list("", &mut |m| {
            let body = seed_target.get(&m.key, None)?.unwrap_or_default();
            t.put(&m.key, &body, false).map(|_| ())
        })
        .unwrap();
    let bytes = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        // Edits (offset, byte) pairs, then a cut and a tail.
        let mut m = manifest.clone();
        let mut it = rest.chunks_exact(3);
        for e in &mut it {
            let at = u16::from_le_bytes([e[0], e[1]]) as usize;
            if at < m.len() {
                m[at] = e[2];
            }
        }
        if mode & 2 != 0 {
            m.truncate(m.len().saturating_sub(1 + (mode as usize >> 2)));
        }
        m.extend_from_slice(it.remainder());
        m
    };
    t.put(&format!("manifests/{id:032x}"), &bytes, false).unwrap();
    let r = Repository::open(t.clone()).unwrap();
    let _ = r.list();
    let _ = r.info(*id);
    let _ = r.verify(None, 100.0);
    let p = pool();
    match r.restore(*id, &p, &RestoreOptions::default()) {
        Ok(_) => assert!(p.check().unwrap().is_clean()),
        Err(_) => {
            assert!(p.volumes().unwrap().is_empty() && p.snapshots().unwrap().is_empty());
            assert!(p.check().unwrap().is_clean());
        }
    }
});
