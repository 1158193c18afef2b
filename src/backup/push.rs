//! Pushing a snapshot: only the chunks covering the change since the base backup are read,
//! hashed and (if the repository lacks them) uploaded; the manifest goes last.

use super::format::CHUNK_HEADER;
use super::format::{
    chunk_key, manifest_key, seal_chunk, Hash, ManifestHeader, ManifestReader, ManifestWriter,
};
use super::{is_zero, sparse_hash, Repository};
use crate::diff::{DiffTarget, Extent, TupleLength};
use crate::error::{Error, Result};
use crate::ids::{Base, SnapshotId};
use crate::pool::{Pool, SnapshotInfo};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

/// Which backup a push is computed against.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BaseChoice {
    /// The newest earlier snapshot or bookmark of the same volume that has a backup in the
    /// repository; a full push if there is none.
    #[default]
    Auto,
    /// A full push: every allocated chunk is read (chunks the repository has are still not
    /// uploaded).
    Full,
    /// This snapshot or bookmark, which must have a backup in the repository.
    From(Base),
}

/// What a push did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PushStats {
    /// The backup's id: the snapshot's.
    pub id: SnapshotId,
    /// The snapshot's volume.
    pub volume: String,
    /// The snapshot's name.
    pub snapshot: String,
    /// The backup it was computed against.
    pub base_id: Option<SnapshotId>,
    /// Chunks holding data in the backup.
    pub chunks: u64,
    /// Chunks read from the pool and hashed (those covering the change).
    pub read_chunks: u64,
    /// Chunks uploaded (read chunks the repository did not have).
    pub uploaded_chunks: u64,
    /// Bytes uploaded, as stored.
    pub uploaded_bytes: u64,
    /// The backup was already in the repository: nothing was done.
    pub already_present: bool,
}

/// Chunks dealt out together. A batch holds only indices and hashes (each worker reuses its
/// own buffers, so memory is `parallelism` chunks whatever this is), and workers wait for
/// each other only at a batch's end: large batches keep that wait rare (with 4 per thread,
/// about a fifth of a 1 GiB push was spent in it).
pub(crate) const BATCH_PER_THREAD: usize = 64;
/// What a push worker reuses from chunk to chunk.
#[derive(Default)]
struct ChunkBuffers {
    /// A chunk header's room, then the chunk's bytes: zeros between chunks.
    buf: Vec<u8>,
    /// Where the chunk object is compressed into.
    spare: Vec<u8>,
    /// The ranges of the chunk that a read filled.
    filled: Vec<std::ops::Range<usize>>,
}

/// Extents fetched from the pool per delta page.
const EXTENTS_PER_PAGE: usize = 4096;

/// The chunk indices, in increasing order, that a set of extents touches, plus a few
/// extra indices (the chunks at a size change), read a page of extents at a time.
struct DirtyChunks<'a> {
    pool: &'a Pool,
    base: Option<Base>,
    target: SnapshotId,
    chunk: u64,
    count: u64,
    /// The target's size in bytes.
    size: u64,
    page: VecDeque<Extent>,
    next_offset: Option<u64>,
    started: bool,
    /// Chunk range of the extent being walked, and the part of it the extent covers wholly
    /// if it is a zero extent (those chunks read as zeros without being read).
    range: std::ops::Range<u64>,
    zero_whole: std::ops::Range<u64>,
    extra: VecDeque<u64>,
    last: Option<u64>,
    /// The next chunk from the extents, looked at but not yet returned.
    pending: Option<(u64, bool)>,
}

impl<'a> DirtyChunks<'a> {
    fn new(pool: &'a Pool, base: Option<(u128, u64)>, info: &SnapshotInfo, chunk: u64) -> Self {
        let count = info.size.div_ceil(chunk);
        let mut extra = VecDeque::new();
        if let Some((_, base_size)) = base {
            // Chunks whose length changed with the volume's size differ even where the
            // block maps agree.
            if base_size != info.size {
                let mut e: Vec<u64> = [base_size, info.size]
                    .iter()
                    .filter(|s| *s % chunk != 0)
                    .map(|s| s / chunk)
                    .filter(|&i| i < count)
                    .collect();
                e.sort_unstable();
                e.dedup();
                extra.extend(e);
            }
        }
        DirtyChunks {
            pool,
            base: base.map(|b| pool.base_of(b.0)),
            target: info.id,
            chunk,
            count,
            size: info.size,
            page: VecDeque::new(),
            next_offset: None,
            started: false,
            range: 0..0,
            zero_whole: 0..0,
            extra,
            last: None,
            pending: None,
        }
    }

    /// The next chunk the extents touch (ignoring the extras), and whether it is wholly
    /// inside a zero extent.
    fn next_from_extents(&mut self) -> Result<Option<(u64, bool)>> {
        loop {
            if let Some(i) = self.range.next() {
                if self.last.is_some_and(|l| i <= l) {
                    continue;
                }
                return Ok(Some((i, self.zero_whole.contains(&i))));
            }
            if let Some(e) = self.page.pop_front() {
                if e.length == 0 {
                    continue;
                }
                let end = e.offset + e.length;
                let lo = e.offset / self.chunk;
                let hi = ((end - 1) / self.chunk + 1).min(self.count);
                self.range = lo..hi;
                // Extents never overlap, so no other extent touches a chunk this one covers
                // from its start to its end (or to the volume's end).
                self.zero_whole = if e.kind == crate::diff::ExtentKind::Zero {
                    let first = e.offset.div_ceil(self.chunk);
                    let last = if end == self.size {
                        hi
                    } else {
                        end / self.chunk
                    };
                    first..last.max(first)
                } else {
                    0..0
                };
                continue;
            }
            if self.started && self.next_offset.is_none() {
                return Ok(None);
            }
            let from = self.next_offset.unwrap_or(0);
            let t = DiffTarget::Snapshot(self.target);
            let page = match self.base {
                Some(b) => self
                    .pool
                    .delta(b, t, from, EXTENTS_PER_PAGE, TupleLength::Variable)?,
                None => self
                    .pool
                    .allocated(t, from, EXTENTS_PER_PAGE, TupleLength::Variable)?,
            };
            self.started = true;
            self.next_offset = page.next_offset;
            self.page.extend(page.extents);
        }
    }

    /// The next dirty chunk: (index, reads as zeros without being read).
    fn next(&mut self) -> Result<Option<(u64, bool)>> {
        if self.pending.is_none() {
            self.pending = self.next_from_extents()?;
        }
        let pending = &mut self.pending;
        let pick = match (self.extra.front().copied(), *pending) {
            (Some(x), Some((p, _))) if x < p => {
                self.extra.pop_front();
                Some((x, false))
            }
            (Some(x), Some((p, _))) if x == p => {
                self.extra.pop_front();
                pending.take().map(|(i, _)| (i, false))
            }
            (Some(x), None) => {
                self.extra.pop_front();
                Some((x, false))
            }
            (_, Some(_)) => pending.take(),
            (None, None) => None,
        };
        if let Some((i, _)) = pick {
            self.last = Some(i);
        }
        Ok(pick)
    }
}

impl Repository {
    /// Backs up snapshot `snapshot` of `pool` (see the module docs). Idempotent: a backup that
    /// is already in the repository is left as it is. The pool keeps a bookmark of the pushed
    /// snapshot (named like it) so later pushes stay incremental after it is deleted.
    pub fn push(&self, pool: &Pool, snapshot: SnapshotId, base: BaseChoice) -> Result<PushStats> {
        let info = pool.snapshot_info(snapshot)?;
        let mut lock = self.lock_push(snapshot.as_u128())?;
        let stats = self.push_locked(pool, &info, base, &mut lock)?;
        drop(lock);
        // Keep what a later incremental push needs, whatever happens to the snapshot.
        if pool.bookmark_info(snapshot.into()).is_err() {
            match pool.bookmark(&info.volume_name, &info.name) {
                Ok(_) | Err(Error::AlreadyExists { .. }) | Err(Error::SnapshotNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(stats)
    }

    /// The base to push against, with its size: a local snapshot or bookmark with a backup.
    fn choose_base(
        &self,
        pool: &Pool,
        info: &SnapshotInfo,
        base: BaseChoice,
    ) -> Result<Option<(u128, u64)>> {
        match base {
            BaseChoice::Full => Ok(None),
            BaseChoice::From(b) => {
                let size = match b {
                    Base::Snapshot(s) => pool.snapshot_info(s)?.size,
                    Base::Bookmark(b) => pool.bookmark_info(b)?.size,
                };
                let id = b.as_u128();
                if self.target.head(&manifest_key(id))?.is_none() {
                    return Err(Error::BackupNotFound(format!(
                        "{id:032x} (the base must be backed up first)"
                    )));
                }
                Ok(Some((id, size)))
            }
            BaseChoice::Auto => {
                let mut candidates: Vec<(u64, u128, u64)> = pool
                    .volume_snapshots(info.volume_id)?
                    .into_iter()
                    .filter(|s| s.generation < info.generation)
                    .map(|s| (s.generation, s.id.as_u128(), s.size))
                    .chain(
                        pool.volume_bookmarks(info.volume_id)?
                            .into_iter()
                            .filter(|b| b.generation < info.generation)
                            .map(|b| (b.generation, b.id.as_u128(), b.size)),
                    )
                    .collect();
                candidates.sort_unstable_by(|a, b| b.cmp(a));
                candidates.dedup_by_key(|c| c.1);
                // The newest few are enough: older ones are only reached when newer ones were
                // never pushed.
                for (_, id, size) in candidates.into_iter().take(16) {
                    if self.target.head(&manifest_key(id))?.is_some() {
                        return Ok(Some((id, size)));
                    }
                }
                Ok(None)
            }
        }
    }

    fn push_locked(
        &self,
        pool: &Pool,
        info: &SnapshotInfo,
        base: BaseChoice,
        lock: &mut super::PushLock<'_>,
    ) -> Result<PushStats> {
        let key = manifest_key(info.id.as_u128());
        let mut stats = PushStats {
            id: info.id,
            volume: info.volume_name.clone(),
            snapshot: info.name.clone(),
            base_id: None,
            chunks: 0,
            read_chunks: 0,
            uploaded_chunks: 0,
            uploaded_bytes: 0,
            already_present: false,
        };
        if self.target.head(&key)?.is_some() {
            let h = super::format::read_header(&*self.target, info.id.as_u128())?;
            stats.base_id = h.base_id.map(SnapshotId::from_u128);
            stats.chunks = h.entries;
            stats.already_present = true;
            return Ok(stats);
        }
        let chunk = u64::from(self.config.chunk_size);
        let mut base_pick = self.choose_base(pool, info, base)?;
        let mut base_reader = match base_pick {
            Some((id, _)) => {
                let r = ManifestReader::open(&*self.target, id)?;
                if r.header.chunk_size != self.config.chunk_size {
                    None
                } else {
                    Some(r)
                }
            }
            None => None,
        };
        if base_reader.is_none() {
            base_pick = None;
        }
        // An automatic base that turns out not to be an ancestor (a bookmark from before a
        // rollback) is no base: the push is full instead, and says so.
        let total;
        let count = |pick: Option<(u128, u64)>| -> Result<u64> {
            let mut d = DirtyChunks::new(pool, pick, info, chunk);
            let mut n = 0;
            while d.next()?.is_some() {
                n += 1;
            }
            Ok(n)
        };
        match count(base_pick) {
            Ok(n) => total = n,
            Err(Error::NotAncestor { .. }) if base == BaseChoice::Auto && base_pick.is_some() => {
                base_pick = None;
                base_reader = None;
                total = count(None)?;
            }
            Err(e) => return Err(e),
        }
        stats.base_id = base_pick.map(|b| SnapshotId::from_u128(b.0));
        let snap = pool.snapshot_by_id(info.id)?;
        let header = ManifestHeader {
            snapshot_id: info.id.as_u128(),
            base_id: base_pick.map(|b| b.0),
            pool_id: pool.stats().id.as_u128(),
            volume_id: info.volume_id.as_u128(),
            volume: info.volume_name.clone(),
            snapshot: info.name.clone(),
            size: info.size,
            chunk_size: self.config.chunk_size,
            created_unix: info.created_unix,
            generation: info.generation,
            entries: 0,
        };
        let mut writer = ManifestWriter::new(header.clone());
        let mut dirty = DirtyChunks::new(pool, base_pick, info, chunk);
        let mut base_next = match base_reader.as_mut() {
            Some(r) => r.next_entry()?,
            None => None,
        };
        let uploaded = AtomicU64::new(0);
        let buffers: parking_lot::Mutex<Vec<ChunkBuffers>> = parking_lot::Mutex::new(Vec::new());
        let zeros = sparse_hash::ZeroSubtrees::new(chunk as usize);
        let uploaded_bytes = AtomicU64::new(0);
        let batch_len = self.parallelism * BATCH_PER_THREAD;
        let mut batch = Vec::with_capacity(batch_len);
        let mut done = 0u64;
        let count_total = header.chunk_count();
        loop {
            let d = dirty.next()?;
            if let Some(i) = d {
                batch.push(i);
                if batch.len() < batch_len {
                    continue;
                }
            }
            let read = batch.iter().filter(|b: &&(u64, bool)| !b.1).count();
            let results = self.parallel(batch.len(), |k| {
                let (index, zero) = batch[k];
                if zero {
                    return Ok(None);
                }
                let len = header.chunk_len(index);
                // Buffers are reused: a fresh 4 MiB allocation per chunk costs a page fault
                // per 4 KiB, more than the copy it holds. A worker's chunk buffer is all
                // zeros past its header between chunks, so a read fills only what is mapped
                // and the holes cost nothing: no zero-fill, no scan, no hashing
                // (`sparse_hash`).
                let ChunkBuffers {
                    mut buf,
                    mut spare,
                    mut filled,
                } = buffers.lock().pop().unwrap_or_default();
                if buf.len() != CHUNK_HEADER + len {
                    buf.clear();
                    buf.resize(CHUNK_HEADER + len, 0);
                }
                filled.clear();
                let r = (|| {
                    snap.read_data_at(&mut buf[CHUNK_HEADER..], index * chunk, &mut filled)?;
                    let data = &buf[CHUNK_HEADER..];
                    if filled.iter().all(|f| is_zero(&data[f.clone()])) {
                        return Ok(None);
                    }
                    let hash: Hash = *sparse_hash::hash(data, &filled, &zeros).as_bytes();
                    let ck = chunk_key(&hash);
                    if self.target.head(&ck)?.is_none() {
                        let compressed = seal_chunk(&mut buf, &mut spare, self.config.compression);
                        let object = if compressed { &spare } else { &buf };
                        if self.target.put_batched(&ck, object)? {
                            uploaded.fetch_add(1, Ordering::Relaxed);
                            uploaded_bytes.fetch_add(object.len() as u64, Ordering::Relaxed);
                        }
                    }
                    Ok(Some(hash))
                })();
                // Back to all zeros for the next chunk.
                for f in &filled {
                    buf[CHUNK_HEADER + f.start..CHUNK_HEADER + f.end].fill(0);
                }
                buffers.lock().push(ChunkBuffers { buf, spare, filled });
                r
            })?;
            for (&(index, _), result) in batch.iter().zip(results) {
                // Base entries before this chunk are unchanged; the one at it is replaced.
                while let Some((bi, bh)) = base_next {
                    if bi > index {
                        break;
                    }
                    if bi < index {
                        writer.push(bi, &bh);
                    }
                    base_next = base_reader
                        .as_mut()
                        .expect("entries come from it")
                        .next_entry()?;
                }
                if let Some(h) = result {
                    writer.push(index, &h);
                }
            }
            stats.read_chunks += read as u64;
            done += batch.len() as u64;
            self.report("push", done * chunk, total * chunk);
            batch.clear();
            // Make the batch's chunks durable and visible: a rerun after a failure or a kill
            // finds them and uploads only the rest.
            self.target.sync()?;
            lock.refresh()?;
            if d.is_none() {
                break;
            }
        }
        // The rest of the base is unchanged, up to the new size. Reading it to its end also
        // verifies the base manifest's checksum before anything derived from it is stored.
        while let Some((bi, bh)) = base_next {
            if bi < count_total {
                writer.push(bi, &bh);
            }
            base_next = base_reader
                .as_mut()
                .expect("entries come from it")
                .next_entry()?;
        }
        let (header, bytes) = writer.finish();
        // Every chunk durable before the manifest that makes them a backup.
        self.target.sync()?;
        if !self.target.put(&key, &bytes, true)? {
            // Someone else pushed the same snapshot meanwhile: theirs stands (it is the same).
            stats.already_present = true;
        }
        stats.chunks = header.entries;
        stats.uploaded_chunks = uploaded.into_inner();
        stats.uploaded_bytes = uploaded_bytes.into_inner();
        Ok(stats)
    }
}
