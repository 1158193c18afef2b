//! A repository's life: listing, verifying, deleting and pruning backups, and the garbage
//! collection that sweeps chunks no manifest references.
//!
//! Garbage collection and pushes exclude each other through lock objects, in the order that
//! makes at least one of them see the other (each writes its own lock, then looks for the
//! other's): a gc that finds a push lock gives up (`RepositoryBusy`), a push waits for the gc
//! locks it found (later ones belong to gcs that will see the push and give up). So a gc never
//! sweeps a chunk a running push has found present and is about to reference. Chunks younger
//! than the grace period are never swept either.

use super::format::{decode_chunk, manifest_key, parse_chunk_key, Hash, ManifestReader};
use super::{lock_body, BackupInfo, Repository};
use crate::error::{Error, Result};
use crate::ids::{PoolId, SnapshotId, VolumeId};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// One thing wrong with a backup, found by [`Repository::verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyProblem {
    /// The backup (snapshot id) the problem breaks.
    pub backup: SnapshotId,
    /// The object's key.
    pub object: String,
    /// What is wrong with it.
    pub detail: String,
}

impl std::fmt::Display for VerifyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "backup {}: {}: {}",
            self.backup, self.object, self.detail
        )
    }
}

/// What a verification found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Backups (manifests) checked.
    pub backups: u64,
    /// Distinct chunks downloaded and re-hashed.
    pub chunks_checked: u64,
    /// Bytes of chunks downloaded, as stored.
    pub bytes_checked: u64,
    /// Everything found wrong; empty when all is well.
    pub problems: Vec<VerifyProblem>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Which backups [`Repository::prune`] keeps, per volume (restic's and borg's rules): the
/// newest `last`, the newest of each of the `daily` most recent days with backups, the
/// newest of each of the `weekly` most recent weeks. A backup any rule keeps is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep this many newest backups.
    pub last: usize,
    /// Keep the newest backup of each of this many most recent days that have one.
    pub daily: usize,
    /// Keep the newest backup of each of this many most recent weeks that have one.
    pub weekly: usize,
}

/// What a prune kept and removed (or would, in a dry run).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PruneReport {
    /// The backups kept.
    pub kept: Vec<BackupInfo>,
    /// The backups deleted (or that would be, in a dry run).
    pub removed: Vec<BackupInfo>,
}

/// What a garbage collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcStats {
    /// Manifests read.
    pub manifests: u64,
    /// Chunks referenced by some manifest.
    pub referenced: u64,
    /// Chunks removed.
    pub removed: u64,
    /// Bytes of the chunks removed, as stored.
    pub removed_bytes: u64,
    /// Unreferenced chunks kept because they are younger than the grace period.
    pub young: u64,
    /// Leftovers of interrupted puts (temporary files) older than the grace period, removed.
    pub leftovers: u64,
}

impl Repository {
    /// Every backup, oldest first.
    pub fn list(&self) -> Result<Vec<BackupInfo>> {
        let mut out = Vec::new();
        for id in self.manifest_ids()? {
            match self.info(SnapshotId::from_u128(id)) {
                Ok(b) => out.push(b),
                // Deleted since it was listed.
                Err(Error::BackupNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by_key(|b| (b.created_unix, b.generation, b.id));
        Ok(out)
    }

    fn manifest_ids(&self) -> Result<Vec<u128>> {
        let mut ids = Vec::new();
        self.target.list("manifests/", &mut |m| {
            // Anything else in the folder is not a backup: ignored, as gc ignores it.
            if let Some(id) = m
                .key
                .strip_prefix("manifests/")
                .filter(|n| n.len() == 32)
                .and_then(|n| u128::from_str_radix(n, 16).ok())
            {
                ids.push(id);
            }
            Ok(())
        })?;
        ids.sort_unstable();
        Ok(ids)
    }

    /// Re-reads backups and checks them: every manifest's structure and checksum, and every
    /// chunk it lists (or `sample_percent` of them, chosen at random each run) against its
    /// hash. Each distinct chunk is downloaded once. `id`: only that backup.
    pub fn verify(&self, id: Option<SnapshotId>, sample_percent: f64) -> Result<VerifyReport> {
        let id = id.map(SnapshotId::as_u128);
        let only = id;
        let ids = match id {
            Some(id) => {
                if self.target.head(&manifest_key(id))?.is_none() {
                    return Err(Error::BackupNotFound(format!("{id:032x}")));
                }
                vec![id]
            }
            None => self.manifest_ids()?,
        };
        let sample = (sample_percent.clamp(0.0, 100.0) * 100.0) as u64;
        let seed = crate::ids::new_id() as u64;
        let mut report = VerifyReport::default();
        let mut seen: HashSet<Hash> = HashSet::new();
        let problems = Mutex::new(Vec::new());
        let checked = AtomicU64::new(0);
        let checked_bytes = AtomicU64::new(0);
        for id in ids {
            report.backups += 1;
            let mut reader = match ManifestReader::open(&*self.target, id) {
                Ok(r) => r,
                // Deleted since it was listed (only a backup asked for by id must exist).
                Err(Error::BackupNotFound(_)) if only.is_none() => {
                    report.backups -= 1;
                    continue;
                }
                Err(e) => {
                    push_problem(&problems, id, &manifest_key(id), e);
                    continue;
                }
            };
            let header = reader.header.clone();
            let mut batch: Vec<(u64, Hash)> = Vec::new();
            loop {
                let next = match reader.next_entry() {
                    Ok(n) => n,
                    Err(e) => {
                        push_problem(&problems, id, &manifest_key(id), e);
                        None
                    }
                };
                if let Some((index, hash)) = next {
                    let pick = u64::from_le_bytes(hash[..8].try_into().expect("8")) ^ seed;
                    if pick % 10_000 < sample && seen.insert(hash) {
                        batch.push((index, hash));
                    }
                    if batch.len() < self.parallelism * super::push::BATCH_PER_THREAD {
                        continue;
                    }
                }
                let backup = format!("{id:032x}");
                self.parallel(batch.len(), |k| {
                    let (index, hash) = batch[k];
                    let key = super::format::chunk_key(&hash);
                    let got = self.target.get(&key, None).and_then(|obj| {
                        let obj = obj.ok_or_else(|| Error::BackupCorrupt {
                            backup: backup.clone(),
                            object: key.clone(),
                            detail: format!("missing (chunk {index})"),
                        })?;
                        decode_chunk(&obj, &hash, header.chunk_len(index), &backup)
                            .map(|_| obj.len())
                    });
                    match got {
                        Ok(n) => {
                            checked.fetch_add(1, Ordering::Relaxed);
                            checked_bytes.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        // A failing target is not a finding about the backup: stop.
                        Err(e @ Error::Target { .. }) => return Err(e),
                        Err(e) => push_problem(&problems, id, &key, e),
                    }
                    Ok(())
                })?;
                batch.clear();
                self.report("verify", checked_bytes.load(Ordering::Relaxed), 0);
                if next.is_none() {
                    break;
                }
            }
        }
        report.chunks_checked = checked.into_inner();
        report.bytes_checked = checked_bytes.into_inner();
        report.problems = problems.into_inner().unwrap_or_else(|p| p.into_inner());
        Ok(report)
    }

    /// Deletes backup `id`. Every other backup stays restorable (each lists all its chunks);
    /// the space its chunks alone held comes back with the next [`Repository::gc`].
    pub fn delete(&self, id: SnapshotId) -> Result<()> {
        let key = manifest_key(id.as_u128());
        if self.target.head(&key)?.is_none() {
            return Err(Error::BackupNotFound(id.to_string()));
        }
        self.target.delete(&key)
    }

    /// Deletes the backups `keep` does not keep (see [`Retention`]); with `dry_run`, only
    /// says which.
    pub fn prune(&self, keep: Retention, dry_run: bool) -> Result<PruneReport> {
        let mut all = self.list()?;
        // Newest first, grouped by the volume they came from.
        // Within one second, a volume's generations still tell which came first.
        all.sort_by_key(|b| std::cmp::Reverse((b.created_unix, b.generation, b.id)));
        let mut groups: Vec<((PoolId, VolumeId), Vec<BackupInfo>)> = Vec::new();
        for b in all {
            let k = (b.pool_id, b.volume_id);
            match groups.iter_mut().find(|g| g.0 == k) {
                Some(g) => g.1.push(b),
                None => groups.push((k, vec![b])),
            }
        }
        let mut report = PruneReport::default();
        for (_, backups) in groups {
            let mut keep_set = vec![false; backups.len()];
            for k in keep_set.iter_mut().take(keep.last) {
                *k = true;
            }
            for (period, n) in [(86_400u64, keep.daily), (7 * 86_400, keep.weekly)] {
                let mut periods: Vec<u64> = Vec::new();
                for (i, b) in backups.iter().enumerate() {
                    // Weeks start on Monday: the Unix epoch was a Thursday.
                    let p =
                        (b.created_unix + if period > 86_400 { 3 * 86_400 } else { 0 }) / period;
                    if !periods.contains(&p) {
                        if periods.len() == n {
                            break;
                        }
                        periods.push(p);
                        keep_set[i] = true;
                    }
                }
            }
            for (b, k) in backups.into_iter().zip(keep_set) {
                if k {
                    report.kept.push(b);
                } else {
                    report.removed.push(b);
                }
            }
        }
        if !dry_run {
            for b in &report.removed {
                match self.delete(b.id) {
                    Ok(()) | Err(Error::BackupNotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(report)
    }

    /// Removes every chunk no manifest references that is older than `grace`. Refuses with
    /// `RepositoryBusy` while a push runs; a push that starts meanwhile waits for it. A
    /// manifest that cannot be read stops the collection before anything is removed.
    pub fn gc(&self, grace: Duration) -> Result<GcStats> {
        let lock = format!("locks/gc-{:032x}", crate::ids::new_id());
        self.target.put(&lock, lock_body("gc").as_bytes(), false)?;
        let r = self.gc_locked(grace);
        let _ = self.target.delete(&lock);
        r
    }

    fn gc_locked(&self, grace: Duration) -> Result<GcStats> {
        if let Some(push) = self.fresh_locks("locks/push-")?.into_iter().next() {
            return Err(Error::RepositoryBusy(format!(
                "a push holds {push}; run gc again when it is done"
            )));
        }
        let mut stats = GcStats::default();
        let mut marked: HashSet<Hash> = HashSet::new();
        for id in self.manifest_ids()? {
            let mut r = match ManifestReader::open(&*self.target, id) {
                Ok(r) => r,
                // Deleted since it was listed: its chunks need no mark.
                Err(Error::BackupNotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            while let Some((_, h)) = r.next_entry()? {
                marked.insert(h);
            }
            stats.manifests += 1;
        }
        stats.referenced = marked.len() as u64;
        let now = SystemTime::now();
        let mut doomed = Vec::new();
        self.target.list("chunks/", &mut |m| {
            let Some(h) = parse_chunk_key(&m.key) else {
                return Ok(());
            };
            if marked.contains(&h) {
                return Ok(());
            }
            if now.duration_since(m.modified).unwrap_or(Duration::ZERO) < grace {
                stats.young += 1;
            } else {
                doomed.push((m.key, m.size));
            }
            Ok(())
        })?;
        for (key, size) in doomed {
            self.target.delete(&key)?;
            stats.removed += 1;
            stats.removed_bytes += size;
        }
        // No push runs (its lock would have stopped us), so an old temporary file belongs to
        // a put that was interrupted and will never finish.
        stats.leftovers = self.target.sweep_leftovers(grace)?;
        Ok(stats)
    }
}

fn push_problem(problems: &Mutex<Vec<VerifyProblem>>, backup: u128, key: &str, e: Error) {
    let (object, detail) = match e {
        Error::BackupCorrupt { object, detail, .. } => (object, detail),
        other => (key.to_string(), other.to_string()),
    };
    problems
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(VerifyProblem {
            backup: SnapshotId::from_u128(backup),
            object,
            detail,
        });
}
