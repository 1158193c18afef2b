//! Transactions and the commit protocol.
//!
//! All changes of a transaction live in memory (dirty nodes, dirty space map pages, the
//! catalog) at units that the last commit does not reference. A commit:
//!
//! 1. writes the catalog, dirty nodes and space map pages to their new units;
//! 2. flushes the device (the pages, and every data block written before, are durable);
//! 3. writes the superblock into slot `generation % 2`, the slot of the older commit;
//! 4. flushes again. The new state exists from this point. Units freed in the transaction
//!    become allocatable (and are discarded on the device) only after the *next* commit, so
//!    the older superblock's state stays whole too.
//!
//! A crash before step 4 completes leaves the other slot's superblock, whose pages were never
//! touched; a torn superblock fails its checksum and the other one is used. Nothing is replayed.

use crate::catalog::{Catalog, Counts};
use crate::device::{BlockDevice, Checked};
use crate::error::{Error, Result};
use crate::format::{self, new_page, Page, PageKind, Superblock, PAGE_SIZE, SUPERBLOCK_UNITS};
use crate::ids::{new_id, now_unix};
use crate::space::{Reserve, SpaceMap};
use crate::store::Store;
use crate::translation::Translations;
use parking_lot::RwLock;
use std::sync::Arc;
use std::time::Instant;

/// Dirty metadata pages held in memory before a commit is forced (256 MiB): the memory
/// bound of a transaction. Node pages already own their units, so the bound is not tied to
/// the reserve.
const MAX_DIRTY_PAGES: usize = 65536;

/// Smallest pool: room for the superblocks, the reserve and a little data.
pub(crate) const MIN_UNITS: u64 = 256;

pub(crate) struct Engine {
    pub(crate) store: Store,
    pub(crate) catalog: Catalog,
    /// The last committed superblock.
    pub(crate) sb: Superblock,
    pub(crate) last_commit: Instant,
    /// When this engine last wrote a superblock (the multihost heartbeat's clock: a flush
    /// with nothing to commit moves `last_commit` but writes none).
    pub(crate) last_superblock: Instant,
    /// `PoolOptions::commit_interval`: commit dirty state this old on the next I/O or tick.
    pub(crate) commit_interval: Option<std::time::Duration>,
    poisoned: Option<String>,
    /// Dirty space map pages that trigger a commit: relocating them at commit draws on the
    /// reserve, so they stay well below it.
    pub(crate) auto_commit_space_pages: usize,
    /// The next commit writes a superblock even with nothing dirty (a new pool, a grown one).
    pub(crate) force_commit: bool,
    /// Inside a catalog operation: no automatic commit may expose half of it.
    in_catalog_op: bool,
    /// Volume writes completed so far, counted once their device writes returned: under
    /// the engine lock for redirects and writes made by catalog operations, after it for
    /// in-place writes (`Handle::write`). For group commit (`Handle::flush`).
    pub(crate) writes_done: Arc<std::sync::atomic::AtomicU64>,
    /// How many of them the last flush's commit made durable.
    pub(crate) durable_writes: u64,
    /// A flush's device barrier is running outside the engine lock (`Handle::flush`).
    pub(crate) flush_in_flight: bool,
    /// Reused lookup buffer for reads (saves an allocation per I/O).
    pub(crate) scratch: Vec<crate::map::Found>,
    /// Held shared by volume I/O running outside the engine lock (reads, in-place writes);
    /// taken exclusively to wait for that I/O to finish before units it may address can be
    /// reused or discarded, and before blocks it may write become shared (see
    /// [`Engine::drain_io`]). It guards the translation cache, which is replaced (grown)
    /// only while the gate is drained.
    pub(crate) io_gate: Arc<RwLock<Translations>>,
    /// The superblock page this engine last wrote or opened, as it is on the device (none
    /// before a new pool's first commit). Every commit first checks the device still holds
    /// it and nothing newer: another writer reaching the same bytes by another path (a loop
    /// device, another host on a shared disk) is refused before its commit is overwritten.
    disk_sb: Option<Box<Page>>,
    /// The device below every path (the store's, and the transfers outside the lock): it
    /// latches the first failed write or flush and refuses later ones.
    checked: Arc<Checked>,
}

impl Engine {
    /// Refuses a block size or a device size a pool cannot be created with, before anything
    /// is written (or, for a pool file, created).
    pub(crate) fn validate_create(len: u64, block_size: u32) -> Result<()> {
        if !block_size.is_power_of_two()
            || !(format::MIN_BLOCK_SIZE..=format::MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(Error::InvalidArgument(format!(
                "block size {block_size} must be a power of two from 4 KiB to 1 MiB"
            )));
        }
        let total_units = len / PAGE_SIZE as u64;
        if total_units > format::MAX_UNITS {
            return Err(Error::InvalidArgument(format!(
                "device of {} bytes is larger than the {} bytes a pool can use",
                len,
                format::MAX_POOL_BYTES
            )));
        }
        let block_units = block_size as u64 / PAGE_SIZE as u64;
        if total_units < MIN_UNITS.max(64 * block_units) {
            return Err(Error::InvalidArgument(format!(
                "device of {} bytes is too small: a pool needs at least {} bytes",
                len,
                MIN_UNITS.max(64 * block_units) * PAGE_SIZE as u64
            )));
        }
        Ok(())
    }

    /// Formats `dev` as an empty pool.
    pub(crate) fn create(
        dev: Arc<dyn BlockDevice>,
        block_size: u32,
        data_checksums: bool,
    ) -> Result<Engine> {
        Engine::validate_create(dev.len(), block_size)?;
        let checked = Arc::new(Checked::new(dev));
        let dev: Arc<dyn BlockDevice> = checked.clone();
        let total_units = dev.len() / PAGE_SIZE as u64;
        // Wipe both slots so an older pool's superblock cannot win over the new one.
        let zero = new_page();
        for slot in 0..SUPERBLOCK_UNITS {
            dev.write_at(&zero[..], slot * PAGE_SIZE as u64)?;
        }
        dev.flush()?;
        let sm = SpaceMap::create(dev.clone(), total_units);
        let sb = Superblock {
            generation: 0,
            block_size,
            pool_id: new_id(),
            total_units,
            used_units: 0,
            space_root: 0,
            space_height: 0,
            catalog_root: 0,
            catalog_buffer: 0,
            volumes: 0,
            snapshots: 0,
            created_unix: now_unix(),
            preallocated: false,
            data_checksums,
            heartbeat_ms: 0,
        };
        let catalog = Catalog::open(dev.clone(), 0, 0, total_units, 1, Counts::default())?;
        let mut store = Store::new(dev, sm, 1, block_size as usize);
        store.checksums = data_checksums;
        let mut engine = Engine::assemble(store, catalog, sb, checked);
        // The first commit writes the space map and the superblocks.
        engine.force_commit = true;
        engine.commit()?;
        Ok(engine)
    }

    fn assemble(store: Store, catalog: Catalog, sb: Superblock, checked: Arc<Checked>) -> Engine {
        let reserve = crate::space::reserve_for(sb.total_units) as usize;
        Engine {
            store,
            catalog,
            force_commit: false,
            sb,
            last_commit: Instant::now(),
            last_superblock: Instant::now(),
            commit_interval: None,
            poisoned: None,
            in_catalog_op: false,
            scratch: Vec::new(),
            io_gate: Arc::new(RwLock::new(Translations::new(0))),
            checked,
            disk_sb: None,
            writes_done: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            durable_writes: 0,
            flush_in_flight: false,
            auto_commit_space_pages: (reserve / 3).max(8),
        }
    }

    /// Opens the newest valid commit on `dev`: reads both superblocks, the space map index
    /// and the catalog. Nothing else is read until used.
    pub(crate) fn open(dev: Arc<dyn BlockDevice>) -> Result<Engine> {
        Engine::open_checked(Arc::new(Checked::new(dev)))
    }

    /// Opens the newest commit without ever writing to `dev`: every change is refused with
    /// `Error::ReadOnly`, and closing commits nothing. A device shorter than the pool (a
    /// pool file that lost its unused tail) opens as long as no unit past its end is in use.
    pub(crate) fn open_read_only(dev: Arc<dyn BlockDevice>) -> Result<Engine> {
        Engine::open_checked(Arc::new(Checked::read_only(dev)))
    }

    /// [`Engine::open`] on a device already wrapped (a reload keeps its latch).
    fn open_checked(checked: Arc<Checked>) -> Result<Engine> {
        let dev: Arc<dyn BlockDevice> = checked.clone();
        if dev.len() < MIN_UNITS * PAGE_SIZE as u64 {
            return Err(Error::NotAPool(format!(
                "device of {} bytes is too small",
                dev.len()
            )));
        }
        // Read-only, a device shorter than the pool is let through here and checked below
        // against what the pool uses.
        let room = if checked.is_read_only() {
            format::MAX_POOL_BYTES
        } else {
            dev.len()
        };
        let mut candidates = Vec::new();
        let mut errors = Vec::new();
        let mut any_magic = false;
        for slot in 0..SUPERBLOCK_UNITS {
            let mut page = new_page();
            dev.read_at(&mut page[..], slot * PAGE_SIZE as u64)?;
            any_magic |= format::get_u32(&page[..], 0) == PageKind::Superblock as u32;
            match Superblock::decode(&page, slot, room) {
                Ok(sb) => candidates.push((sb, page)),
                Err(e) => errors.push(e),
            }
        }
        candidates.sort_by_key(|(sb, _)| std::cmp::Reverse(sb.generation));
        let Some((sb, sb_page)) = candidates.into_iter().next() else {
            if !any_magic {
                return Err(Error::NotAPool(
                    "no snapvol superblock in either slot".into(),
                ));
            }
            let pick = errors
                .iter()
                .position(|e| matches!(e, Error::UnsupportedVersion { .. }))
                .unwrap_or(0);
            return Err(errors.swap_remove(pick));
        };
        let mut sm = SpaceMap::open(
            dev.clone(),
            sb.total_units,
            sb.used_units,
            sb.space_root,
            sb.space_height,
        )?;
        let device_units = dev.len() / PAGE_SIZE as u64;
        if sb.total_units > device_units {
            let pool_bytes = sb.total_units * PAGE_SIZE as u64;
            if let Some(unit) = sm.first_used_from(device_units)? {
                return Err(Error::corrupt(
                    "superblock",
                    0,
                    format!(
                        "the pool is {pool_bytes} bytes but the device holds {}, and unit {unit} \
                         (byte {}) past its end is in use: extend the device to {pool_bytes} \
                         bytes to read the pool (e.g. truncate -s {pool_bytes})",
                        dev.len(),
                        unit * PAGE_SIZE as u64
                    ),
                ));
            }
        }
        let counts = Counts {
            volumes: sb.volumes,
            snapshots: sb.snapshots,
        };
        let catalog = Catalog::open(
            dev.clone(),
            sb.catalog_root,
            sb.catalog_buffer,
            sb.total_units,
            sb.generation + 1,
            counts,
        )?;
        let mut store = Store::new(dev, sm, sb.generation + 1, sb.block_size as usize);
        store.checksums = sb.data_checksums;
        let mut engine = Engine::assemble(store, catalog, sb, checked);
        engine.disk_sb = Some(sb_page);
        Ok(engine)
    }

    /// Throws away the open transaction and returns to the last commit.
    pub(crate) fn reload(&mut self) -> Result<()> {
        let mut fresh = Engine::open_checked(self.checked.clone())?;
        // Handles hold the gate: it outlives the transaction state; so do the options.
        fresh.io_gate = self.io_gate.clone();
        // The fresh engine's maps are the last commit's: no answer of the old one holds.
        fresh.io_gate.read().invalidate();
        fresh.commit_interval = self.commit_interval;
        // The count is the pool's, shared with the handles: it goes on across a reload.
        fresh.writes_done = self.writes_done.clone();
        fresh.durable_writes = self.durable_writes;
        fresh.flush_in_flight = self.flush_in_flight;
        *self = fresh;
        Ok(())
    }

    /// The catalog with what its changes need: the space map.
    pub(crate) fn cat(&mut self) -> (&mut Catalog, &mut SpaceMap) {
        (&mut self.catalog, &mut self.store.sm)
    }

    /// Refuses changes once the pool is poisoned: by a failed device write or flush
    /// (latched by the device wrapper, whatever path it came from), or by a change that
    /// failed halfway.
    pub(crate) fn check_usable(&self) -> Result<()> {
        match self.poisoned.as_deref().or(self.checked.failure()) {
            Some(why) => Err(Error::Poisoned(why.to_string())),
            None => Ok(()),
        }
    }

    /// As [`Engine::check_usable`], for a change: refused on a pool opened read-only.
    pub(crate) fn check_writable(&self) -> Result<()> {
        self.check_usable()?;
        if self.checked.is_read_only() {
            return Err(Error::ReadOnly("the pool (opened read-only)".into()));
        }
        Ok(())
    }

    /// Pages and records changed in the open transaction (drives the automatic commit).
    pub(crate) fn dirty_pages(&self) -> usize {
        self.store.dirty_pages() + self.catalog.dirty_count()
    }

    /// Refuses every later change until the pool is reopened; the first reason is kept.
    pub(crate) fn poison(&mut self, why: String) {
        if self.poisoned.is_none() {
            self.poisoned = Some(why);
        }
        // I/O that skips the engine lock must now take it, to be refused.
        self.io_gate.read().disable();
    }

    /// Runs a change that may leave memory half-updated if it fails midway: any error
    /// poisons the pool (committed data stays intact; reopening returns to the last commit).
    pub(crate) fn mutate<T>(&mut self, f: impl FnOnce(&mut Engine) -> Result<T>) -> Result<T> {
        self.check_writable()?;
        let r = self.guard_panic(f);
        if let Err(e) = &r {
            self.poisoned = None;
            self.poison(e.to_string());
        }
        r
    }

    /// Runs a catalog operation as its own durable transaction: earlier writes are committed
    /// first, and if the operation fails the pool returns to that commit (nothing is lost).
    /// `f` gets `reserve` to pass to what it allocates: operations that free space (deletes,
    /// rollbacks) may dip into the reserve, so they work on a full pool; the rest may not.
    pub(crate) fn catalog_op<T>(
        &mut self,
        reserve: Reserve,
        f: impl FnOnce(&mut Engine, Reserve) -> Result<T>,
    ) -> Result<T> {
        self.check_writable()?;
        // A snapshot or clone must not share a block an in-place write is still changing:
        // answers of the translation cache are dropped first, so no such write starts
        // after the drain (see `crate::translation`).
        self.io_gate.read().invalidate();
        self.drain_io();
        self.commit()?;
        self.in_catalog_op = true;
        let r = self.guard_panic(|e| f(e, reserve));
        self.in_catalog_op = false;
        // What the operation's own writes put in the cache is dropped too (a resize's
        // redirected tail, say): answers start afresh from the changed catalog.
        self.io_gate.read().invalidate();
        let r = r.and_then(|v| self.commit().map(|_| v));
        // Operations that free space commit once more so what they freed is usable at once
        // (freed units wait for the commit after the one that freed them).
        let r = match (r, reserve) {
            (Ok(v), Reserve::Use) => self.commit().map(|_| v),
            (r, _) => r,
        };
        if r.is_err() && self.check_usable().is_ok() {
            if let Err(e) = self.reload() {
                self.poison(e.to_string());
            }
        }
        r
    }

    /// Runs `f`; if it panics, the engine is poisoned before the panic goes on, so no later
    /// commit (another thread's flush, the last handle's drop) can make a half-applied change
    /// durable. Reopening returns to the last commit.
    pub(crate) fn guard_panic<T>(&mut self, f: impl FnOnce(&mut Engine) -> Result<T>) -> Result<T> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self))) {
            Ok(r) => r,
            Err(payload) => {
                self.poison("a change was interrupted by a panic".into());
                std::panic::resume_unwind(payload)
            }
        }
    }

    /// Commits when enough pages are dirty or, with a commit interval, when the dirty
    /// state is older than it (like ZFS's txgs). Without one, only flushes, catalog
    /// operations and the dirty-page bound commit.
    pub(crate) fn maybe_commit(&mut self) -> Result<()> {
        if self.in_catalog_op {
            return Ok(());
        }
        let too_old = self
            .commit_interval
            .is_some_and(|max_age| self.last_commit.elapsed() >= max_age);
        if self.dirty_pages() >= MAX_DIRTY_PAGES
            || self.store.sm.dirty_pages() >= self.auto_commit_space_pages
            || (self.dirty_pages() > 0 && too_old)
        {
            self.commit()?;
        } else if self
            .heartbeat()
            .is_some_and(|beat| self.last_superblock.elapsed() >= beat)
            && !self.checked.is_read_only()
        {
            // The multihost heartbeat: a superblock even with nothing to commit, so an
            // opener on another host sees this pool is held.
            self.force_commit = true;
            self.commit()?;
        }
        Ok(())
    }

    /// The interval of the pool's multihost heartbeat, if it has one.
    pub(crate) fn heartbeat(&self) -> Option<std::time::Duration> {
        (self.sb.heartbeat_ms > 0)
            .then(|| std::time::Duration::from_millis(self.sb.heartbeat_ms.into()))
    }

    /// Makes everything done so far durable (see the module docs for the protocol).
    pub(crate) fn commit(&mut self) -> Result<()> {
        self.check_usable()?;
        if self.checked.is_read_only() {
            // Nothing can have changed (every change is refused), so nothing to make durable.
            return Ok(());
        }
        let r = self.commit_inner();
        match &r {
            // The commit's pages go to units no committed state references, and nothing was
            // marked clean: the state stays dirty and the next commit writes it again (the
            // space map's relocations are kept, `prepare_commit` skips them).
            Err(Error::HostFull { .. }) => {}
            Err(e) => self.poison(format!("commit failed: {e}")),
            Ok(()) => {}
        }
        r
    }

    /// Fails with [`Error::ConcurrentWriter`] when the device's superblocks are no longer the
    /// ones this engine last wrote (or opened): another writer committed to the pool through
    /// another path. Costs two page reads per commit, against the commit's two flushes.
    ///
    /// The reads go through the device as every read does: on one host the page cache is
    /// shared by every path to the bytes, so they see another process's commit; a disk shared
    /// by several hosts needs the device opened with `O_DIRECT` for them to see one.
    pub(crate) fn check_sole_writer(&self) -> Result<()> {
        let Some(ours) = &self.disk_sb else {
            return Ok(());
        };
        let dev = &self.store.dev;
        let ours_gen = self.sb.generation;
        for slot in 0..SUPERBLOCK_UNITS {
            let mut page = new_page();
            dev.read_at(&mut page[..], slot * PAGE_SIZE as u64)?;
            let found = Superblock::decode(&page, slot, format::MAX_POOL_BYTES).ok();
            let changed = if slot == Superblock::slot(ours_gen) {
                page[..] != ours[..]
            } else {
                // The other slot holds an older commit of ours, or a torn or wiped page:
                // only a newer valid commit there is someone else's.
                found.as_ref().is_some_and(|sb| sb.generation > ours_gen)
            };
            if changed {
                let (pid, host) = Superblock::writer(&page);
                return Err(Error::ConcurrentWriter {
                    ours: ours_gen,
                    found: found.map(|sb| sb.generation),
                    pid,
                    host,
                });
            }
        }
        Ok(())
    }

    /// The device wrapper, whose latched failure I/O outside the engine lock checks.
    pub(crate) fn checked(&self) -> Arc<Checked> {
        self.checked.clone()
    }

    /// Whether the pool was opened read-only (a flush then has nothing to do but say so).
    pub(crate) fn checked_is_read_only(&self) -> bool {
        self.checked.is_read_only()
    }

    /// Whether anything changed since the last commit is not durable yet: dirty pages or a
    /// forced superblock. (Units cooling after a free are not: the next commit releases them
    /// whenever it comes, and nothing a flush promises depends on it.)
    pub(crate) fn has_uncommitted(&self) -> bool {
        self.force_commit || self.dirty_pages() > 0
    }

    fn commit_inner(&mut self) -> Result<()> {
        let dev = self.store.dev.clone();
        if !self.force_commit && self.dirty_pages() == 0 && self.store.sm.cooling_units() == 0 {
            // Data written in place still needs the barrier.
            dev.flush()?;
            self.last_commit = Instant::now();
            return Ok(());
        }
        let generation = self.store.generation;
        if generation >> crate::map::VALUE_BITS != 0 {
            // Map values keep 48 bits of a birth; 2^48 commits is centuries of them.
            return Err(Error::Internal(format!(
                "generation {generation} is past what a block map records (2^48)"
            )));
        }
        // Before this commit's pages overwrite anything: nobody else committed meanwhile.
        self.check_sole_writer()?;
        // Volume records changed by I/O go into the catalog tree first: that allocates
        // catalog pages, which the space map pages below then count.
        self.catalog.flush(&mut self.store.sm)?;
        let mut pages = self.catalog.dirty_pages();
        pages.extend(self.store.dirty_node_pages());
        pages.extend(self.store.sm.prepare_commit(generation)?);
        pages.sort_by_key(|p| p.0);
        write_runs(&*dev, &pages)?;
        dev.flush()?;
        let sb = Superblock {
            generation,
            used_units: self.store.sm.used_units(),
            space_root: self.store.sm.root(),
            space_height: self.store.sm.height(),
            catalog_root: self.catalog.root(),
            catalog_buffer: self.catalog.buffer_page(),
            volumes: self.catalog.counts().volumes,
            snapshots: self.catalog.counts().snapshots,
            ..self.sb.clone()
        };
        let slot = Superblock::slot(generation);
        let page = sb.encode();
        // Again right before the commit point: the pages above went to units this engine
        // owns, the superblock would replace another writer's commit.
        self.check_sole_writer()?;
        dev.write_at(&page[..], slot * PAGE_SIZE as u64)?;
        dev.flush()?;
        self.disk_sb = Some(page);
        self.last_superblock = Instant::now();
        // Units freed two commits ago become allocatable (and are discarded) now: a read or
        // in-place write planned before they were freed may still be running. With the gate
        // drained, the translation cache grows if the pool has outgrown it. A commit that
        // releases nothing and grows nothing does not drain: reads and in-place writes that
        // skip the engine lock then never wait for it (a drain parks every new one until
        // the ones in flight end, which costs each of them a futex round trip).
        let blocks = self.store.sm.used_units() / self.store.block_units.max(1);
        let grown = self.io_gate.read().wanted(blocks);
        if self.store.sm.cooling_units() > 0 || grown.is_some() {
            let mut gate = self.io_gate.write();
            if let Some(grown) = grown {
                *gate = grown;
            }
        }
        let released = self.store.commit_done();
        self.catalog.commit_done();
        if dev.supports_discard() && !sb.preallocated {
            release_freed(&self.store, released);
        }
        self.force_commit = false;
        self.sb = sb;
        self.last_commit = Instant::now();
        Ok(())
    }
}

/// Writes sorted pages, one device write per run of adjacent units.
fn write_runs(dev: &dyn BlockDevice, pages: &[(u64, Box<format::Page>)]) -> Result<()> {
    let mut i = 0;
    let mut buf = Vec::new();
    while i < pages.len() {
        let start = pages[i].0;
        let mut j = i;
        buf.clear();
        while j < pages.len() && pages[j].0 == start + (j - i) as u64 {
            buf.extend_from_slice(&pages[j].1[..]);
            j += 1;
        }
        dev.write_at(&buf, start * PAGE_SIZE as u64)?;
        i = j;
    }
    Ok(())
}

/// Tells the device that units freed by a durable commit hold nothing (punches holes in a
/// sparse file). Best effort: a failure here loses nothing.
fn release_freed(store: &Store, mut units: Vec<u64>) {
    units.sort_unstable();
    let mut i = 0;
    while i < units.len() {
        let mut j = i + 1;
        while j < units.len() && units[j] == units[j - 1] + 1 {
            j += 1;
        }
        let _ = store
            .dev
            .discard(Store::byte(units[i]), (j - i) as u64 * PAGE_SIZE as u64);
        i = j;
    }
}
