//! The pool and its catalog operations: volumes, snapshots, clones, rollback, delete.
//!
//! Every catalog operation is its own transaction and is durable when it returns. Snapshots
//! and clones add one reference to a block map root: O(1) whatever the volume holds.

use crate::catalog::{BookmarkRec, SnapshotRec, VolumeRec};
use crate::device::{BlockDevice, FileDevice, FileOptions};
use crate::error::{Error, Result};
use crate::ids::{BookmarkId, Origin, PoolId, SnapshotId, VolumeId};
use crate::io::{Handle, Target};
use crate::space::Reserve;
use crate::txn::Engine;
use crate::volume::{Snapshot, Volume};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// How to create or open a pool. Built from the default with the setters, so options added
/// later do not break callers:
///
/// ```
/// let opts = snapvol::PoolOptions::default().block_size(64 << 10).commit_interval(None);
/// assert_eq!(opts.block_size, 64 << 10);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PoolOptions {
    /// Allocation unit for data, 4 KiB to 1 MiB, power of two (used by `create` only).
    pub block_size: u32,
    /// Commit on its own when dirty data is this old (None: only on flush, catalog operations
    /// and the dirty-page bound).
    pub commit_interval: Option<Duration>,
    /// Open files and block devices with `O_DIRECT` (bypass the page cache) in
    /// [`Pool::create_file`] and [`Pool::open_path`].
    pub direct_io: bool,
    /// Open without ever writing (used by `open` and `open_path` only): every change is
    /// `Error::ReadOnly`, closing commits nothing, a pool file is opened read-only under a
    /// shared lock (other read-only opens may share it; a read-write open may not), and a
    /// device shorter than the pool opens when nothing past its end is in use.
    pub read_only: bool,
    /// Reserve the pool file's whole size on the host when creating it (used by
    /// [`Pool::create_file`] only), so a thin pool on a filesystem that fills up never meets
    /// `Error::HostFull`; the pool keeps its space reserved (freed blocks are not punched
    /// out, growing reserves the new space too).
    pub preallocate: bool,
    /// Keep a CRC32 of every data block in the block map and verify it on every read (used
    /// by `create` only; the pool records it). A block that does not match is never
    /// returned: the read fails with [`crate::Error::DataCorrupt`]. Off by default: random
    /// reads and sequential writes cost within a few percent, but an overwrite of a block an
    /// earlier commit points at is redirected instead of written in place (3× for random
    /// 4 KiB overwrites, 5–6× for 4 KiB overwrites each followed by a flush) and cached
    /// sequential reads pay 14–17% for the CRC (BENCHMARKS.md). Off writes the pool in
    /// format version 2, which older builds read.
    pub data_checksums: bool,
    /// Most answers of the block map the translation cache keeps, where reads and in-place
    /// writes find them without the engine lock (64 bytes each; 0: none, every I/O plans
    /// under the lock). The cache starts small and grows with the blocks the pool holds.
    /// The default, 262,144, covers 1 GiB of 4 KiB blocks in 16 MiB (BENCHMARKS.md, "The
    /// data path").
    pub translation_slots: usize,
    /// Multiple-host protection, ZFS's `multihost` (used by `create` only; the pool records
    /// it): the writer commits at least once per interval (a heartbeat: one superblock
    /// write and two flushes when idle), and every read-write open first watches the
    /// superblocks for three intervals and fails with [`crate::Error::ConcurrentWriter`] if
    /// one changes, so a second host sharing the disk is refused before it writes anything.
    /// 100 ms to 60 s; `None` (the default) for a pool only one host can reach, where the
    /// file lock and `O_EXCL` already keep a second writer out. Across hosts the reads must
    /// reach the disk: open with [`PoolOptions::direct_io`].
    pub multihost: Option<Duration>,
}

impl PoolOptions {
    /// Sets [`PoolOptions::data_checksums`].
    #[must_use]
    pub fn data_checksums(mut self, on: bool) -> Self {
        self.data_checksums = on;
        self
    }

    /// Sets [`PoolOptions::translation_slots`].
    #[must_use]
    pub fn translation_slots(mut self, slots: usize) -> Self {
        self.translation_slots = slots;
        self
    }

    /// Sets [`PoolOptions::multihost`].
    #[must_use]
    pub fn multihost(mut self, heartbeat: Option<Duration>) -> Self {
        self.multihost = heartbeat;
        self
    }

    /// Sets [`PoolOptions::preallocate`].
    #[must_use]
    pub fn preallocate(mut self, on: bool) -> Self {
        self.preallocate = on;
        self
    }

    /// Sets [`PoolOptions::block_size`].
    #[must_use]
    pub fn block_size(mut self, bytes: u32) -> Self {
        self.block_size = bytes;
        self
    }

    /// Sets [`PoolOptions::commit_interval`].
    #[must_use]
    pub fn commit_interval(mut self, interval: Option<Duration>) -> Self {
        self.commit_interval = interval;
        self
    }

    /// Sets [`PoolOptions::direct_io`].
    #[must_use]
    pub fn direct_io(mut self, on: bool) -> Self {
        self.direct_io = on;
        self
    }

    /// Sets [`PoolOptions::read_only`].
    #[must_use]
    pub fn read_only(mut self, on: bool) -> Self {
        self.read_only = on;
        self
    }
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            block_size: crate::format::DEFAULT_BLOCK_SIZE,
            commit_interval: Some(Duration::from_secs(5)),
            direct_io: false,
            read_only: false,
            preallocate: false,
            data_checksums: false,
            translation_slots: 1 << 18,
            multihost: None,
        }
    }
}

/// A pool of thin volumes on one device. Cheap to clone; all clones share the pool.
#[derive(Clone)]
pub struct Pool {
    pub(crate) h: Handle,
}

/// Space used by a volume or snapshot, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Size as seen by readers.
    pub logical: u64,
    /// Bytes of blocks mapped.
    pub allocated: u64,
    /// Bytes only this volume or snapshot references: what deleting it would free.
    pub exclusive: u64,
    /// Bytes shared with other volumes or snapshots.
    pub shared: u64,
}

/// A volume as listed.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct VolumeInfo {
    /// Its id, kept for life (renames keep it).
    pub id: VolumeId,
    /// Its current name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// What it was cloned from, if it is a clone.
    pub origin: Option<Origin>,
    /// When it was created (seconds since the Unix epoch).
    pub created_unix: u64,
}

/// A snapshot as listed.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SnapshotInfo {
    /// Its id, kept for life (also after its volume is deleted, and across sends).
    pub id: SnapshotId,
    /// The volume it is a snapshot of (which may have been deleted since).
    pub volume_id: VolumeId,
    /// That volume's name (its name when it was deleted, if it was).
    pub volume_name: String,
    /// The snapshot's name, unique among its volume's snapshots.
    pub name: String,
    /// The volume's size when the snapshot was taken, in bytes.
    pub size: u64,
    /// The pool generation it was taken in: later snapshots have larger ones.
    pub generation: u64,
    /// When it was taken (seconds since the Unix epoch).
    pub created_unix: u64,
}

/// A bookmark as listed: what is kept of a snapshot for incremental sends.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BookmarkInfo {
    /// The id of the snapshot it was made from.
    pub id: BookmarkId,
    /// The volume that snapshot was of.
    pub volume_id: VolumeId,
    /// That volume's name.
    pub volume_name: String,
    /// The bookmark's name (the snapshot's name).
    pub name: String,
    /// The snapshot's size in bytes.
    pub size: u64,
    /// The snapshot's generation.
    pub generation: u64,
    /// When the bookmark was made (seconds since the Unix epoch).
    pub created_unix: u64,
}

impl From<SnapshotRec> for SnapshotInfo {
    fn from(s: SnapshotRec) -> SnapshotInfo {
        SnapshotInfo {
            id: SnapshotId::from_u128(s.id),
            volume_id: VolumeId::from_u128(s.volume),
            volume_name: s.volume_name,
            name: s.name,
            size: s.size,
            generation: s.generation,
            created_unix: s.created,
        }
    }
}

impl From<VolumeRec> for VolumeInfo {
    fn from(v: VolumeRec) -> VolumeInfo {
        VolumeInfo {
            id: VolumeId::from_u128(v.id),
            name: v.name,
            size: v.size,
            origin: v.origin,
            created_unix: v.created,
        }
    }
}

impl From<BookmarkRec> for BookmarkInfo {
    fn from(b: BookmarkRec) -> BookmarkInfo {
        BookmarkInfo {
            id: BookmarkId::from_u128(b.id),
            volume_id: VolumeId::from_u128(b.volume),
            volume_name: b.volume_name,
            name: b.name,
            size: b.size,
            generation: b.generation,
            created_unix: b.created,
        }
    }
}

/// Pool-wide figures, in bytes.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PoolStats {
    /// The pool's id.
    pub id: PoolId,
    /// Data block size.
    pub block_size: u32,
    /// The pool's size.
    pub size: u64,
    /// Bytes in use (data and metadata).
    pub used: u64,
    /// Bytes not in use.
    pub free: u64,
    /// What writes may still use: `free` less the reserve kept so that deletes and commits
    /// work on a full pool, and less units freed but not yet reusable.
    pub available: u64,
    /// Number of volumes.
    pub volumes: usize,
    /// Number of snapshots (also those of deleted volumes).
    pub snapshots: usize,
    /// Generation of the last commit.
    pub generation: u64,
    /// Data blocks carry checksums that reads verify ([`PoolOptions::data_checksums`]).
    pub data_checksums: bool,
    /// The multihost heartbeat interval the pool records ([`PoolOptions::multihost`]).
    pub multihost: Option<Duration>,
}

impl std::fmt::Debug for Pool {
    /// Prints no figures: they need the engine lock, which the printing thread may be
    /// waiting for or holding. `stats()` has them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

/// [`PoolOptions::multihost`] as the superblock records it (0 = off), validated.
fn heartbeat_ms(multihost: Option<Duration>) -> Result<u32> {
    use crate::format::{MAX_HEARTBEAT_MS, MIN_HEARTBEAT_MS};
    let Some(d) = multihost else { return Ok(0) };
    match u32::try_from(d.as_millis()) {
        Ok(ms) if (MIN_HEARTBEAT_MS..=MAX_HEARTBEAT_MS).contains(&ms) => Ok(ms),
        _ => Err(Error::InvalidArgument(format!(
            "multihost heartbeat {d:?}: expected {MIN_HEARTBEAT_MS} ms to {} s",
            MAX_HEARTBEAT_MS / 1000
        ))),
    }
}

impl Pool {
    /// Formats `dev` as a new, empty pool.
    pub fn create(dev: Arc<dyn BlockDevice>, opts: PoolOptions) -> Result<Pool> {
        let beat = heartbeat_ms(opts.multihost)?;
        let mut engine = Engine::create(dev, opts.block_size, opts.data_checksums)?;
        if beat > 0 {
            engine.sb.heartbeat_ms = beat;
            engine.force_commit = true;
            engine.commit()?;
        }
        Ok(Pool {
            h: Handle::start(engine, opts.commit_interval, opts.translation_slots),
        })
    }

    /// Opens the pool on `dev` at its last commit.
    pub fn open(dev: Arc<dyn BlockDevice>, opts: PoolOptions) -> Result<Pool> {
        if opts.read_only {
            let engine = Engine::open_read_only(dev)?;
            // No committer: there is nothing to commit. Hidden volumes (interrupted
            // receives) stay; they are not listed and a read-write open removes them.
            return Ok(Pool {
                h: Handle::start(engine, None, opts.translation_slots),
            });
        }
        let engine = Engine::open(dev)?;
        // A pool that may be shared by hosts: watch for another writer's heartbeat before
        // writing anything (three intervals: its committer beats at least once per interval
        // and a quarter).
        if let Some(beat) = engine.heartbeat() {
            std::thread::sleep(beat * 3);
            engine.check_sole_writer()?;
        }
        let pool = Pool {
            h: Handle::start(engine, opts.commit_interval, opts.translation_slots),
        };
        // A receive interrupted by a crash leaves a hidden volume: remove it.
        pool.with(|e| e.drop_hidden())?;
        Ok(pool)
    }

    /// Creates a sparse file of `size` bytes at `path` and formats it.
    /// Nothing is created when the size or block size is refused, and a file whose
    /// formatting fails (a full host filesystem, say) is removed again.
    pub fn create_file(path: impl AsRef<Path>, size: u64, opts: PoolOptions) -> Result<Pool> {
        let path = path.as_ref();
        Engine::validate_create(size, opts.block_size)?;
        let fo = FileOptions {
            direct: opts.direct_io,
            read_only: false,
        };
        let dev = Arc::new(FileDevice::create_with(path, size, fo)?);
        let preallocate = opts.preallocate;
        let made = if preallocate {
            dev.preallocate(0, size)
        } else {
            Ok(())
        }
        .and_then(|()| Pool::create(dev, opts))
        .and_then(|pool| {
            if preallocate {
                pool.with(|e| {
                    e.sb.preallocated = true;
                    e.force_commit = true;
                    e.commit()
                })?;
            }
            Ok(pool)
        });
        match made {
            Ok(pool) => Ok(pool),
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(e)
            }
        }
    }

    /// Opens the pool in a file or raw block device.
    pub fn open_path(path: impl AsRef<Path>, opts: PoolOptions) -> Result<Pool> {
        let fo = FileOptions {
            direct: opts.direct_io,
            read_only: opts.read_only,
        };
        Pool::open(Arc::new(FileDevice::open_with(path, fo)?), opts)
    }

    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut Engine) -> Result<T>) -> Result<T> {
        self.h.with(f)
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<()> {
        self.h.flush()
    }

    /// Commits and releases this handle. Other clones of the pool stay usable.
    pub fn close(self) -> Result<()> {
        self.flush()
    }

    /// Pool-wide figures.
    pub fn stats(&self) -> PoolStats {
        let e = self.h.lock();
        let unit = crate::format::PAGE_SIZE as u64;
        PoolStats {
            id: PoolId::from_u128(e.sb.pool_id),
            block_size: e.sb.block_size,
            size: e.store.sm.total_units() * unit,
            used: e.store.sm.used_units() * unit,
            free: e.store.sm.free_units() * unit,
            available: e.store.sm.usable_units() * unit,
            volumes: e.catalog.counts().volumes as usize,
            snapshots: e.catalog.counts().snapshots as usize,
            generation: e.sb.generation,
            data_checksums: e.sb.data_checksums,
            multihost: e.heartbeat(),
        }
    }

    /// The pool's block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.h.lock().sb.block_size
    }

    pub(crate) fn volume_handle(&self, id: u128) -> Volume {
        Volume {
            h: self.h.clone(),
            id,
        }
    }

    /// Opens a volume by name.
    pub fn volume(&self, name: &str) -> Result<Volume> {
        let id = self.with(|e| Ok(e.volume_named(name)?.id))?;
        Ok(self.volume_handle(id))
    }

    /// Opens a volume by its id (what CSI keeps as the `volume_id`).
    pub fn volume_by_id(&self, id: VolumeId) -> Result<Volume> {
        // Hidden volumes (a receive, restore or import under way) are not found by id
        // either.
        self.with(|e| e.visible_volume(id).map(drop))?;
        Ok(self.volume_handle(id.as_u128()))
    }

    /// Opens a snapshot `vol@snap` (or a snapshot of a deleted volume that had that name).
    pub fn snapshot_handle(&self, vol: &str, snap: &str) -> Result<Snapshot> {
        let id = self.with(|e| Ok(e.snapshot_named(vol, snap)?.id))?;
        Ok(Snapshot {
            h: self.h.clone(),
            id,
        })
    }

    /// Opens a snapshot by its id.
    pub fn snapshot_by_id(&self, id: SnapshotId) -> Result<Snapshot> {
        let id = id.as_u128();
        self.with(|e| e.target(Target::Snapshot(id)).map(|_| ()))?;
        Ok(Snapshot {
            h: self.h.clone(),
            id,
        })
    }

    /// Every bookmark.
    pub fn bookmarks(&self) -> Result<Vec<BookmarkInfo>> {
        let mut e = self.h.lock();
        let (c, sm) = e.cat();
        Ok(c.bookmarks(sm)?.into_iter().map(Into::into).collect())
    }

    /// The bookmark with id `id` (the id of the snapshot it was made from).
    pub fn bookmark_info(&self, id: BookmarkId) -> Result<BookmarkInfo> {
        self.with(|e| {
            let (c, sm) = e.cat();
            c.bookmark(sm, id.as_u128())?
                .map(Into::into)
                .ok_or_else(|| Error::BookmarkNotFound(id.into()))
        })
    }

    /// The snapshot with id `id` (also of a deleted volume).
    pub fn snapshot_info(&self, id: SnapshotId) -> Result<SnapshotInfo> {
        self.with(|e| {
            e.snapshot_rec(id.as_u128())?
                .map(Into::into)
                .ok_or_else(|| Error::SnapshotNotFound(id.into()))
        })
    }

    /// The snapshots of the volume with id `volume_id` (also a deleted one), oldest first.
    pub fn volume_snapshots(&self, volume_id: VolumeId) -> Result<Vec<SnapshotInfo>> {
        self.with(|e| {
            let (c, sm) = e.cat();
            Ok(c.snapshots_of(sm, volume_id.as_u128())?
                .into_iter()
                .map(Into::into)
                .collect())
        })
    }

    /// The bookmarks of the volume with id `volume_id`, oldest first.
    pub fn volume_bookmarks(&self, volume_id: VolumeId) -> Result<Vec<BookmarkInfo>> {
        self.with(|e| {
            let (c, sm) = e.cat();
            let mut v = c.bookmarks_of(sm, volume_id.as_u128())?;
            v.sort_by_key(|b| (b.generation, b.id));
            Ok(v.into_iter().map(Into::into).collect())
        })
    }

    /// Grows the pool to `new_size` bytes of its device. A pool file is extended (sparse); a
    /// block device must have been enlarged underneath first (its size is read again). The
    /// new space is free at once; like every catalog operation this is durable on return and
    /// atomic across a crash (before the commit the pool simply ignores the extra bytes).
    pub fn grow(&self, new_size: u64) -> Result<()> {
        let unit = crate::format::PAGE_SIZE as u64;
        self.with(|e| {
            let old = e.store.sm.total_units();
            if new_size / unit <= old {
                return Err(Error::InvalidArgument(format!(
                    "the pool is {} bytes; it can only grow (asked for {new_size})",
                    old * unit
                )));
            }
            if new_size > crate::format::MAX_POOL_BYTES {
                return Err(Error::InvalidArgument(format!(
                    "{new_size} bytes is more than the {} bytes a pool can use",
                    crate::format::MAX_POOL_BYTES
                )));
            }
            e.catalog_op(Reserve::Keep, |e, _| {
                let old = e.store.dev.len();
                e.store.dev.grow(new_size)?;
                if e.sb.preallocated && new_size > old {
                    e.store.dev.preallocate(old, new_size - old)?;
                }
                let units = (new_size.min(e.store.dev.len())) / unit;
                // The new size must be durable before a superblock counts on it. A failed
                // flush poisons (the device latches it): what the device kept is unknown.
                e.store.dev.flush()?;
                e.store.sm.grow(units);
                e.sb.total_units = units;
                e.auto_commit_space_pages = (crate::space::reserve_for(units) as usize / 3).max(8);
                e.force_commit = true;
                Ok(())
            })
        })
    }

    /// [`Pool::resize_volume`] of volume `id`, visible or hidden.
    pub(crate) fn resize_by_id(&self, id: u128, size: u64) -> Result<()> {
        crate::format::check_volume_size(size)?;
        self.with(|e| {
            let v = e
                .volume_rec(id)?
                .ok_or_else(|| Error::VolumeNotFound(VolumeId::from_u128(id).into()))?;
            let name = v.name.clone();
            let set_size = |e: &mut Engine, _: Reserve| {
                let (c, sm) = e.cat();
                match c.volume_mut(sm, v.id)? {
                    Some(rec) => {
                        rec.size = size;
                        Ok(())
                    }
                    None => Err(Error::VolumeNotFound(name.clone().into())),
                }
            };
            if size >= v.size {
                return e.catalog_op(Reserve::Keep, set_size);
            }
            let bs = e.store.block_size as u64;
            e.catalog_op(Reserve::Use, |e, r| {
                // The tail of the new last block must read as zeros if the volume grows
                // again. Zeroed inside the operation so a failure leaves the volume whole.
                let tail_end = size.next_multiple_of(bs).min(v.size);
                if tail_end > size {
                    e.write_with(v.id, size, &vec![0u8; (tail_end - size) as usize], true)?;
                }
                e.unmap(v.id, size.div_ceil(bs), v.size.div_ceil(bs))?;
                set_size(e, r)
            })
        })
    }

    /// Every volume.
    pub fn volumes(&self) -> Result<Vec<VolumeInfo>> {
        let mut e = self.h.lock();
        let (c, sm) = e.cat();
        Ok(c.volumes(sm)?.into_iter().map(VolumeInfo::from).collect())
    }

    /// Every snapshot, oldest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let mut e = self.h.lock();
        let (c, sm) = e.cat();
        Ok(c.all_snapshots(sm)?.into_iter().map(Into::into).collect())
    }

    /// `id` as a delta's base: the snapshot if it still exists, else its bookmark (for
    /// callers that hold a raw id from a manifest or a stream, which does not say which).
    pub(crate) fn base_of(&self, id: u128) -> crate::Base {
        let snapshot = SnapshotId::from_u128(id);
        match self.with(|e| e.snapshot_rec(id)) {
            Ok(None) => crate::Base::Bookmark(snapshot.into()),
            _ => crate::Base::Snapshot(snapshot),
        }
    }

    /// Walks everything and verifies it; see [`crate::CheckReport`]. Commits first, so the
    /// check covers exactly what is on the device.
    pub fn check(&self) -> Result<crate::CheckReport> {
        self.with(|e| {
            e.commit()?;
            crate::check::check(e)
        })
    }
}

impl Volume {
    /// The pool this volume is in.
    pub(crate) fn pool(&self) -> Pool {
        Pool { h: self.h.clone() }
    }
}

impl Snapshot {
    /// The pool this snapshot is in.
    pub(crate) fn pool(&self) -> Pool {
        Pool { h: self.h.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemoryDevice;
    use std::time::Instant;

    /// Generation after a write made when the last commit is an hour old.
    fn generation_after_stale_write(interval: Option<Duration>) -> (u64, u64) {
        let pool = Pool::create(
            Arc::new(MemoryDevice::new(64 << 20)),
            PoolOptions {
                commit_interval: interval,
                ..PoolOptions::default()
            },
        )
        .unwrap();
        let v = pool.create_volume("v", 1 << 20).unwrap();
        v.write_at(&[1u8; 4096], 0).unwrap();
        let before = pool.stats().generation;
        pool.with(|e| {
            e.last_commit = Instant::now() - Duration::from_secs(3600);
            Ok(())
        })
        .unwrap();
        v.write_at(&[2u8; 4096], 8192).unwrap();
        (before, pool.stats().generation)
    }

    /// `commit_interval: None` means no commit by age on the I/O path (it used to commit
    /// after a hard-coded 5 s); with an interval, a write after it commits.
    #[test]
    fn commit_interval_is_honoured_on_the_write_path() {
        let (before, after) = generation_after_stale_write(None);
        assert_eq!(before, after, "no interval: the write must not commit");
        let (before, after) = generation_after_stale_write(Some(Duration::from_secs(60)));
        assert!(
            after > before,
            "an hour-old transaction must commit on the next write"
        );
    }
}
