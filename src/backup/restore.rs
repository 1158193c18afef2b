//! Restoring a backup by its id into any pool: every chunk verified, written into a hidden
//! volume, and the snapshot shown with its original id in one commit. Onto a local snapshot
//! that is itself a backup of the same lineage, only the chunks that differ are downloaded.

use super::format::{chunk_key, decode_chunk, manifest_key, Hash, ManifestReader};
use super::Repository;
use crate::error::{Error, Result};
use crate::ids::SnapshotId;
use crate::pool::Pool;
use crate::stream::receive::Header;
use crate::volume::Volume;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where a restore goes.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// The volume to restore into (default: the backed-up volume's name). If it exists, its
    /// newest snapshot must be a backup in the repository and unchanged since: the restore
    /// then applies only what differs, as an incremental receive does.
    pub volume: Option<String>,
    /// Also create this writable volume from the restored snapshot (a PVC with a
    /// VolumeSnapshot as its data source).
    pub clone: Option<String>,
}

/// What a restore did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreStats {
    /// The restored snapshot's id (the backup's).
    pub id: SnapshotId,
    /// The volume restored into.
    pub volume: String,
    /// The snapshot's name.
    pub snapshot: String,
    /// The local snapshot the restore started from, if any.
    pub base_id: Option<SnapshotId>,
    /// Chunks holding data in the backup.
    pub chunks: u64,
    /// Chunks downloaded (those the base did not already hold).
    pub downloaded_chunks: u64,
    /// Bytes downloaded, as stored.
    pub downloaded_bytes: u64,
    /// The clone made, if one was asked for.
    pub clone: Option<String>,
}

/// What restoring one chunk takes.
enum Job {
    /// Download the chunk with this hash; `over_data` when the volume holds other data there.
    Fetch(u64, Hash, bool),
    /// The chunk reads as zeros now where the base had data.
    Zero(u64),
}

impl Repository {
    /// Restores backup `id` into `pool` (see [`RestoreOptions`]). Atomic: on any error, or if
    /// the process dies, no part of it is visible (a partial volume is removed at once or at
    /// the next open).
    pub fn restore(
        &self,
        id: SnapshotId,
        pool: &Pool,
        opts: &RestoreOptions,
    ) -> Result<RestoreStats> {
        if pool.snapshot_by_id(id).is_ok() {
            return Err(Error::AlreadyExists {
                kind: "snapshot id",
                name: id.to_string(),
                conflict: String::new(),
            });
        }
        let raw_id = id.as_u128();
        let mut target = ManifestReader::open(&*self.target, raw_id)?;
        let h = target.header.clone();
        let name = opts.volume.clone().unwrap_or_else(|| h.volume.clone());
        crate::catalog::validate_name(&name)?;
        if let Some(c) = &opts.clone {
            crate::catalog::validate_name(c)?;
            if pool.volume(c).is_ok() {
                return Err(Error::AlreadyExists {
                    kind: "volume",
                    name: c.clone(),
                    conflict: String::new(),
                });
            }
        }
        let has_backup =
            |sid: u128| -> Result<bool> { Ok(self.target.head(&manifest_key(sid))?.is_some()) };
        // Into an existing volume: onto its newest snapshot, which must be a backup here.
        // Into a new one: from the backup's base, if this pool holds it.
        let existing = pool.volume(&name).ok();
        let (hidden, base, in_place) = match existing {
            Some(v) => {
                let newest = pool
                    .volume_snapshots(v.id())?
                    .into_iter()
                    .max_by_key(|s| s.generation);
                match newest {
                    Some(s) if has_backup(s.id.as_u128())? => {
                        let sid = s.id.as_u128();
                        let hidden = pool.with(|e| e.hidden_for(&name, sid, s.size))?;
                        (hidden, Some(sid), true)
                    }
                    _ => {
                        return Err(Error::AlreadyExists {
                            kind: "volume",
                            name: name.clone(),
                            conflict: String::new(),
                        })
                    }
                }
            }
            None => {
                let local = h
                    .base_id
                    .and_then(|b| pool.snapshot_info(SnapshotId::from_u128(b)).ok());
                let base = match local {
                    Some(s) if has_backup(s.id.as_u128())? => Some(s),
                    _ => None,
                };
                let hidden = pool.with(|e| match &base {
                    Some(s) => {
                        let root = e.snapshot_rec(s.id.as_u128())?.map_or(0, |r| r.root);
                        e.add_hidden(root, s.size)
                    }
                    None => e.add_hidden(0, h.size),
                })?;
                (hidden, base.map(|s| s.id.as_u128()), false)
            }
        };
        let vol = pool.volume_handle(hidden);
        let result = self.fill_restore(pool, &vol, &mut target, base).and_then(
            |(downloaded_chunks, downloaded_bytes)| {
                let header = Header {
                    size: h.size,
                    target: raw_id,
                    base: if in_place { base.unwrap_or(0) } else { 0 },
                    volume: name.clone(),
                    snapshot: h.snapshot.clone(),
                };
                pool.finish_receive(&header, &name, hidden)?;
                Ok(RestoreStats {
                    id,
                    volume: name.clone(),
                    snapshot: h.snapshot.clone(),
                    base_id: base.map(SnapshotId::from_u128),
                    chunks: h.entries,
                    downloaded_chunks,
                    downloaded_bytes,
                    clone: None,
                })
            },
        );
        drop(vol);
        let mut stats = match result {
            Ok(s) => s,
            Err(e) => {
                pool.abandon_hidden(hidden);
                return Err(e);
            }
        };
        if let Some(c) = &opts.clone {
            pool.clone_snapshot(&name, &h.snapshot, c)?;
            stats.clone = Some(c.clone());
        }
        Ok(stats)
    }

    /// Writes the backup into the hidden volume; returns (chunks, bytes) downloaded.
    fn fill_restore(
        &self,
        pool: &Pool,
        vol: &Volume,
        target: &mut ManifestReader<'_>,
        base: Option<u128>,
    ) -> Result<(u64, u64)> {
        let h = target.header.clone();
        let backup = format!("{:032x}", h.snapshot_id);
        if vol.len()? != h.size {
            pool.resize_hidden(vol.id, h.size)?;
        }
        let mut base_reader = match base {
            Some(b) => Some(ManifestReader::open(&*self.target, b)?),
            None => None,
        };
        if base_reader
            .as_ref()
            .is_some_and(|r| r.header.chunk_size != h.chunk_size)
        {
            // Every manifest of a repository has the repository's chunk size: a base that
            // says otherwise is damaged, and chunks of two sizes cannot be compared.
            return Err(Error::BackupCorrupt {
                backup,
                object: manifest_key(base.unwrap_or(0)),
                detail: "the base backup has another chunk size".into(),
            });
        }
        let chunk = u64::from(h.chunk_size);
        let bs = pool.block_size() as usize;
        let mut t_next = target.next_entry()?;
        let mut b_next = match base_reader.as_mut() {
            Some(r) => r.next_entry()?,
            None => None,
        };
        let downloaded = AtomicU64::new(0);
        let downloaded_bytes = AtomicU64::new(0);
        // Jobs hold an index and a hash; each worker holds one chunk at a time.
        let batch_len = self.parallelism * super::push::BATCH_PER_THREAD;
        let mut jobs: Vec<Job> = Vec::with_capacity(batch_len);
        let total = h.entries.max(1) * chunk;
        let mut done = 0u64;
        loop {
            // Merge the two sorted entry lists: None when both are done, Some(None) for a
            // chunk that needs nothing (unchanged, or past the new end).
            let step: Option<Option<Job>> = match (t_next, b_next) {
                (None, None) => None,
                (Some((ti, th)), Some((bi, bh))) if ti == bi => {
                    t_next = target.next_entry()?;
                    b_next = base_reader.as_mut().expect("base entries").next_entry()?;
                    Some((th != bh).then_some(Job::Fetch(ti, th, true)))
                }
                (Some((ti, th)), b) if b.is_none_or(|(bi, _)| ti < bi) => {
                    t_next = target.next_entry()?;
                    Some(Some(Job::Fetch(ti, th, false)))
                }
                (_, Some((bi, _))) => {
                    b_next = base_reader.as_mut().expect("base entries").next_entry()?;
                    Some((bi < h.chunk_count()).then_some(Job::Zero(bi)))
                }
                // (Some, None) always takes the arm before the last.
                (Some(_), None) => None,
            };
            let finished = step.is_none();
            if let Some(Some(j)) = step {
                jobs.push(j);
            }
            if !finished && jobs.len() < batch_len {
                continue;
            }
            self.parallel(jobs.len(), |k| match &jobs[k] {
                Job::Zero(i) => vol.discard(i * chunk, h.chunk_len(*i) as u64),
                Job::Fetch(i, hash, over_data) => {
                    let len = h.chunk_len(*i);
                    let key = chunk_key(hash);
                    let obj = self
                        .target
                        .get(&key, None)?
                        .ok_or_else(|| Error::BackupCorrupt {
                            backup: backup.clone(),
                            object: key.clone(),
                            detail: format!("missing (chunk {i})"),
                        })?;
                    let content = decode_chunk(&obj, hash, len, &backup)?;
                    downloaded.fetch_add(1, Ordering::Relaxed);
                    downloaded_bytes.fetch_add(obj.len() as u64, Ordering::Relaxed);
                    write_chunk(vol, i * chunk, &content, bs, *over_data)
                }
            })?;
            done += jobs.len() as u64 * chunk;
            self.report("restore", done.min(total), total);
            jobs.clear();
            if finished {
                break;
            }
        }
        // Both manifests were read to their end, so both checksums were verified before the
        // caller makes anything visible.
        vol.flush()?;
        Ok((downloaded.into_inner(), downloaded_bytes.into_inner()))
    }
}

/// Writes a chunk's content at `at`: its data runs, and where other data lay beneath, zeros
/// for the rest (by discard, which costs no space).
fn write_chunk(
    vol: &Volume,
    at: u64,
    content: &[u8],
    granule: usize,
    over_data: bool,
) -> Result<()> {
    let mut covered = 0usize;
    for r in crate::image::data_runs(content, granule) {
        if over_data && r.start > covered {
            vol.discard(at + covered as u64, (r.start - covered) as u64)?;
        }
        vol.write_at(&content[r.clone()], at + r.start as u64)?;
        covered = r.end;
    }
    if over_data && covered < content.len() {
        vol.discard(at + covered as u64, (content.len() - covered) as u64)?;
    }
    Ok(())
}
