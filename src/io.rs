//! The I/O path, in one place: what a read or write addresses, its planning under the
//! engine lock, its device transfers outside it, and the gate whose drain keeps blocks a
//! transfer still addresses from being freed and reused. A [`Handle`] is what the pool and
//! every `Volume` and `Snapshot` hold: the engine behind its lock, the gate and the device.
//!
//! A write to a block the volume owns alone (invariant 3: count 1, no shared node on its
//! path, born after the volume's last snapshot or clone) goes in place with no metadata
//! change, outside the engine lock. Any other write goes to a newly allocated block and the
//! map is updated; the old block, possibly part of a snapshot, is never touched.

use crate::device::{BlockDevice, Checked};
use crate::error::{Error, Result};
use crate::map::{block_sum, Found, MapValue};
use crate::space::Reserve;
use crate::store::Store;
use crate::translation::{Entry, RunAnswer, Translations, RUN_BLOCKS, RUN_SHIFT};
use crate::txn::Engine;
use parking_lot::{Mutex, MutexGuard};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// The shared pool state every pool, volume and snapshot handle points at. Cloning counts
/// a handle; the last one to go stops the background committer, and then the state's own
/// drop commits.
pub(crate) struct Handle {
    shared: Arc<Shared>,
}

struct Shared {
    engine: Mutex<Engine>,
    /// The engine's I/O gate (see `Engine::drain_io`) and the translation cache it guards,
    /// reachable without the engine lock.
    io_gate: Arc<parking_lot::RwLock<Translations>>,
    /// The device wrapper, whose latched failure refuses I/O outside the engine lock as
    /// `Engine::check_usable` refuses it inside.
    checked: Arc<Checked>,
    /// The pool's block size and whether it keeps data checksums (fixed at creation).
    block_size: u64,
    checksums: bool,
    /// The engine's device (it never changes, not even on reload), for transfers outside
    /// the engine lock.
    dev: Arc<dyn BlockDevice>,
    /// Live handles (each `Pool`, `Volume` and `Snapshot` holds one). The background committer
    /// holds the pool only for a moment at a time and is not counted.
    handles: std::sync::atomic::AtomicUsize,
    committer: Option<Committer>,
    /// The engine's count of completed volume writes (`Engine::writes_done`), reachable
    /// without the engine lock.
    writes_done: Arc<std::sync::atomic::AtomicU64>,
    /// Signalled when a device flush run outside the engine lock ends (group commit).
    flushed: parking_lot::Condvar,
}

/// The background commit thread and the means to stop it.
struct Committer {
    stop: Arc<(Mutex<bool>, parking_lot::Condvar)>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Clone for Handle {
    fn clone(&self) -> Handle {
        self.shared
            .handles
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Handle {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Handle {
    /// When the last handle goes, the committer is stopped and joined first: it may be
    /// holding the pool at that moment, and the device (and its lock on the file) must be
    /// released by the time the last handle is gone, so the pool can be opened again at once.
    fn drop(&mut self) {
        if self
            .shared
            .handles
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            != 1
        {
            return;
        }
        if let Some(c) = &self.shared.committer {
            *c.stop.0.lock() = true;
            c.stop.1.notify_all();
            if let Some(t) = c.thread.lock().take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Shared {
    /// The last handle going away commits what it can, as closing a file keeps its writes;
    /// `Pool::close` is the way to see an error.
    fn drop(&mut self) {
        let e = self.engine.get_mut();
        // A panic may have interrupted a change halfway (it also poisons the engine where it
        // happened, see `Engine::mutate`): what memory holds is then not a state to commit.
        if e.check_usable().is_ok() && !std::thread::panicking() {
            let _ = e.commit();
        }
    }
}

impl Handle {
    /// Starts serving `engine`: the shared state, and the background committer when the
    /// options ask for one.
    pub(crate) fn start(
        mut engine: Engine,
        commit_interval: Option<Duration>,
        translation_slots: usize,
    ) -> Handle {
        engine.commit_interval = commit_interval;
        *engine.io_gate.write() = Translations::new(translation_slots);
        // The committer also beats the multihost heartbeat; read-only pools write none.
        let beat = engine
            .heartbeat()
            .filter(|_| !engine.checked_is_read_only());
        let tick = match (commit_interval, beat) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let stop = Arc::new((Mutex::new(false), parking_lot::Condvar::new()));
        let writes_done = engine.writes_done.clone();
        let shared = Arc::new(Shared {
            io_gate: engine.io_gate.clone(),
            dev: engine.store.dev.clone(),
            checked: engine.checked(),
            block_size: engine.store.block_size as u64,
            checksums: engine.store.checksums,
            engine: Mutex::new(engine),
            handles: std::sync::atomic::AtomicUsize::new(1),
            writes_done,
            flushed: parking_lot::Condvar::new(),
            committer: tick.map(|_| Committer {
                stop: stop.clone(),
                thread: Mutex::new(None),
            }),
        });
        if let (Some(interval), Some(c)) = (tick, &shared.committer) {
            *c.thread.lock() = spawn_committer(Arc::downgrade(&shared), stop, interval);
        }
        Handle { shared }
    }

    /// The I/O gate, held for reading: no unit is reused until it is let go.
    pub(crate) fn io_gate(&self) -> parking_lot::RwLockReadGuard<'_, Translations> {
        self.shared.io_gate.read()
    }

    /// The pool's device, for transfers outside the engine lock.
    pub(crate) fn device(&self) -> &dyn BlockDevice {
        &*self.shared.dev
    }

    /// The engine, locked.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Engine> {
        self.shared.engine.lock()
    }

    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut Engine) -> Result<T>) -> Result<T> {
        f(&mut self.shared.engine.lock())
    }

    /// Reads through a plan made under the engine lock; the device reads run outside it,
    /// holding the I/O gate so nothing they address is reused meanwhile.
    ///
    /// In a pool with data checksums every block read is verified. A block that does not
    /// match is read again with the engine lock held before it is called corrupt: every
    /// write of a checksummed pool changes data under that lock, so a read outside it may
    /// have met a write in progress to the same block (legal, its result unspecified), but
    /// one under it sees the block and its checksum as one.
    ///
    /// A read whose blocks the translation cache knows skips the engine lock altogether
    /// (see [`Handle::read_fast`]).
    pub(crate) fn read(&self, t: Target, offset: u64, buf: &mut [u8]) -> Result<()> {
        if let Some(r) = self.read_fast(t, offset, buf) {
            return r;
        }
        self.read_verified(t, offset, buf, None).map(drop)
    }

    /// The block numbers `first..=last` a request of `len` bytes at `offset` spans, if it
    /// is one the fast paths take: not empty, not past `u64`, at most [`FAST_BLOCKS`].
    fn fast_span(&self, offset: u64, len: usize) -> Option<(u64, u64)> {
        if len == 0 {
            return None;
        }
        let end = offset.checked_add(len as u64)?;
        let bs = self.shared.block_size;
        // end > offset, so last >= first.
        let (first, last) = (offset / bs, (end - 1) / bs);
        (last - first < FAST_BLOCKS).then_some((first, last))
    }

    /// The translation cache, if I/O may skip the engine lock now: held for reading (the
    /// I/O gate), with its epoch. Not once the pool is poisoned or its device failed.
    fn fast_gate(&self) -> Option<(parking_lot::RwLockReadGuard<'_, Translations>, u64)> {
        let gate = self.shared.io_gate.read();
        if !gate.usable() || self.shared.checked.failure().is_some() {
            return None;
        }
        let epoch = gate.epoch();
        Some((gate, epoch))
    }

    /// A read planned from the translation cache, without the engine lock: None (nothing
    /// read that counts) unless every block it spans has a current answer, the request
    /// lies inside the target (the cache keeps only blocks wholly inside it) and, with data
    /// checksums, every mapped block is read whole and verifies; a block that does not is
    /// left to the locked path, which reads it again under the lock before calling it bad.
    fn read_fast(&self, t: Target, offset: u64, buf: &mut [u8]) -> Option<Result<()>> {
        let (first, last) = self.fast_span(offset, buf.len())?;
        let (gate, epoch) = self.fast_gate()?;
        let (bs, len, checksums) = (self.shared.block_size, buf.len(), self.shared.checksums);
        // Every answer first, so a miss costs no device read.
        for b in first..=last {
            if !checksums {
                self.cached_unit(&gate, t, b, epoch)?;
            } else if gate.get(t, b, epoch)?.unit.is_some()
                && span(b, bs, offset, len).1.len() as u64 != bs
            {
                return None;
            }
        }
        let mut b = first;
        while b <= last {
            let (inner, src) = span(b, bs, offset, len);
            let Some(unit) = self.cached_unit(&gate, t, b, epoch)? else {
                buf[src].fill(0);
                b += 1;
                continue;
            };
            // A run: this block and those after it that follow it on the device.
            let (run, at, start) = (b, Store::byte(unit), src.start);
            let mut stop = src.end;
            b += 1;
            while b <= last {
                let next = self.cached_unit(&gate, t, b, epoch)?.map(Store::byte);
                if next != Some(at + (b - run) * bs) {
                    break;
                }
                stop = span(b, bs, offset, len).1.end;
                b += 1;
            }
            if let Err(err) = self.shared.dev.read_at(&mut buf[start..stop], at + inner) {
                return Some(Err(err));
            }
            if checksums {
                // Whole blocks (checked above): block `k` is bytes `start + (k-run)*bs..`.
                for k in run..b {
                    let e = gate.get(t, k, epoch)?;
                    let from = start + ((k - run) * bs) as usize;
                    let same = e.unit.map(Store::byte) == Some(at + (k - run) * bs);
                    if !same || block_sum(&buf[from..from + bs as usize]) != e.sum {
                        return None;
                    }
                }
            }
        }
        drop(gate);
        Some(Ok(()))
    }

    /// Where block `b` of `t` is, as the cache says: None a miss, Some(None) a hole. In a
    /// pool without data checksums its run's answer comes first (see `RunAnswer`).
    fn cached_unit(
        &self,
        gate: &Translations,
        t: Target,
        b: u64,
        epoch: u64,
    ) -> Option<Option<u64>> {
        if !self.shared.checksums {
            match gate.get_run(t, b >> RUN_SHIFT, epoch) {
                Some(RunAnswer::Contiguous(u)) => {
                    let units = self.shared.block_size / crate::format::PAGE_SIZE as u64;
                    return Some(Some(u + (b & (RUN_BLOCKS - 1)) * units));
                }
                Some(RunAnswer::Hole) => return Some(None),
                Some(RunAnswer::Mixed) | None => {}
            }
        }
        gate.get(t, b, epoch).map(|e| e.unit)
    }

    /// An in-place write planned from the translation cache, without the engine lock: None
    /// (nothing written) unless every block it spans is one the volume may write in place
    /// (an answer the locked path recorded, see `translation::Entry::owned`). Pools with
    /// data checksums always take the locked path: their map takes each write's checksums.
    fn write_fast(&self, id: u128, offset: u64, data: &[u8]) -> Option<Result<()>> {
        if self.shared.checksums {
            return None;
        }
        let (first, last) = self.fast_span(offset, data.len())?;
        let (gate, epoch) = self.fast_gate()?;
        let (t, bs, len) = (Target::Volume(id), self.shared.block_size, data.len());
        for b in first..=last {
            let e = gate.get(t, b, epoch)?;
            if !e.owned || e.unit.is_none() {
                return None;
            }
        }
        let mut b = first;
        while b <= last {
            let (inner, src) = span(b, bs, offset, len);
            let at = Store::byte(gate.get(t, b, epoch)?.unit?);
            let (run, start) = (b, src.start);
            let mut stop = src.end;
            b += 1;
            while b <= last {
                let next = gate.get(t, b, epoch)?;
                if !next.owned || next.unit.map(Store::byte) != Some(at + (b - run) * bs) {
                    break;
                }
                stop = span(b, bs, offset, len).1.end;
                b += 1;
            }
            // A failed write poisons the pool until it is reopened (the device wrapper
            // latches it), as on the locked path; what ran before it stays written.
            if let Err(err) = self.shared.dev.write_at(&data[start..stop], at + inner) {
                return Some(Err(err));
            }
        }
        drop(gate);
        self.shared.writes_done.fetch_add(1, Ordering::AcqRel);
        Some(Ok(()))
    }

    /// The read of [`Handle::read`] (with `filled`, of [`Handle::read_data`]), returning
    /// the plan it was read by.
    fn read_verified(
        &self,
        t: Target,
        offset: u64,
        buf: &mut [u8],
        mut filled: Option<&mut Vec<std::ops::Range<usize>>>,
    ) -> Result<ReadPlan> {
        let start = filled.as_ref().map_or(0, |f| f.len());
        let mut e = self.shared.engine.lock();
        let plan = e.plan_read(t, offset, buf.len())?;
        let gate = self.shared.io_gate.read();
        drop(e);
        if run_read(&*self.shared.dev, &plan, buf, filled.as_deref_mut())?.is_none() {
            return Ok(plan);
        }
        drop(gate);
        if let Some(f) = filled.as_deref_mut() {
            f.truncate(start);
        }
        let mut e = self.shared.engine.lock();
        let plan = e.plan_read(t, offset, buf.len())?;
        match run_read(&*self.shared.dev, &plan, buf, filled)? {
            None => Ok(plan),
            Some(bad) => Err(e.data_corrupt(t, &bad)),
        }
    }

    /// As [`Handle::read`], returning the CRC-32 of what was read. In a pool with data
    /// checksums it is built from the committed checksums of the whole blocks read (joined
    /// with `shift`, the map for appending one block), hashing only the rest (holes, parts
    /// of blocks): it says what the media held, not what the buffer holds by the time it is
    /// sent on, so a stream record carries the pool's own checksums end to end.
    pub(crate) fn read_crc(
        &self,
        t: Target,
        offset: u64,
        buf: &mut [u8],
        shift: &crate::checksum::Shift,
    ) -> Result<u32> {
        let plan = self.read_verified(t, offset, buf, None)?;
        Ok(plan.crc(buf, shift))
    }

    /// Reads only what is mapped: bytes of `buf` that no block backs are left as they are
    /// (the caller keeps them zero), and the ranges of `buf` that were read are appended to
    /// `filled`, in order, adjacent ones merged. A backup push reads mostly-hole chunks this
    /// way, without zero-filling and then scanning the holes.
    pub(crate) fn read_data(
        &self,
        t: Target,
        offset: u64,
        buf: &mut [u8],
        filled: &mut Vec<std::ops::Range<usize>>,
    ) -> Result<()> {
        self.read_verified(t, offset, buf, Some(filled)).map(drop)
    }

    /// Writes; a write wholly into owned blocks runs outside the engine lock like a read.
    /// Anything else (redirects, map changes) completes under the lock.
    ///
    /// A write into blocks the translation cache knows the volume owns skips the engine
    /// lock altogether (see [`Handle::write_fast`]).
    pub(crate) fn write(&self, id: u128, offset: u64, data: &[u8]) -> Result<()> {
        if let Some(r) = self.write_fast(id, offset, data) {
            return r;
        }
        let mut e = self.shared.engine.lock();
        let WritePlan::InPlace(runs) = e.plan_write(id, offset, data)? else {
            // Done under the lock, and counted there.
            return Ok(());
        };
        let _gate = self.shared.io_gate.read();
        drop(e);
        // A failed write poisons the pool until it is reopened: the device wrapper latches
        // it, as it does every failed write and flush.
        write_runs(&*self.shared.dev, &runs, data)?;
        self.shared.writes_done.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Makes every completed write durable (one commit), with group commit: one device
    /// flush at a time, and flushers that arrive while it runs wait for it and are then
    /// served together by the next one, so N threads flushing at once cost about two
    /// device flushes, not N.
    ///
    /// `want` counts the writes completed before this flush was called. A flush that
    /// reads the count (`upto`) under the engine lock and then flushes the device makes
    /// durable every write completed before that device flush, so afterwards the first
    /// `upto` writes are durable (`durable_writes`). A flush with `want <= durable_writes`
    /// and no dirty pages (catalog changes commit on their own; a redirected write's map
    /// change is made before it is counted) has nothing left to do. When nothing is dirty
    /// the commit is only the device barrier, and that runs outside the engine lock, so
    /// reads and writes go on meanwhile; with dirty pages the commit runs under the lock.
    pub(crate) fn flush(&self) -> Result<()> {
        let want = self.shared.writes_done.load(Ordering::Acquire);
        let mut e = self.shared.engine.lock();
        loop {
            if want <= e.durable_writes && !e.has_uncommitted() {
                return e.check_usable();
            }
            if !e.flush_in_flight {
                break;
            }
            self.shared.flushed.wait(&mut e);
        }
        let upto = self.shared.writes_done.load(Ordering::Acquire);
        // Units cooling after a free are released by a full commit, as before; a flush
        // with nothing new to make durable (above) leaves them to the next one.
        if e.has_uncommitted() || e.store.sm.cooling_units() > 0 || e.checked_is_read_only() {
            e.commit()?;
            e.durable_writes = e.durable_writes.max(upto);
            return Ok(());
        }
        e.check_usable()?;
        e.flush_in_flight = true;
        let dev = self.shared.dev.clone();
        drop(e);
        let r = dev.flush();
        let mut e = self.shared.engine.lock();
        e.flush_in_flight = false;
        if r.is_ok() {
            e.durable_writes = e.durable_writes.max(upto);
            e.last_commit = std::time::Instant::now();
        }
        self.shared.flushed.notify_all();
        r
    }
}

impl Engine {
    /// Waits until no volume I/O runs outside the engine lock. The caller holds the engine
    /// lock, and I/O starts only under it, so none can start until the caller lets go.
    pub(crate) fn drain_io(&self) {
        drop(self.io_gate.write());
    }
}

/// Most blocks one request may span to be served from the translation cache; larger ones
/// plan under the engine lock, whose cost they amortize anyway.
const FAST_BLOCKS: u64 = 1024;

/// What an I/O addresses: a writable volume or a read-only snapshot, by id.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Target {
    Volume(u128),
    Snapshot(u128),
}

/// One device transfer of a request: bytes `src` of the caller's buffer at device byte `at`.
pub(crate) struct Run {
    at: u64,
    src: std::ops::Range<usize>,
}

/// The part of a request of `len` bytes at `offset` that falls in block `b`: its offset
/// inside the block and its range in the request's buffer.
fn span(b: u64, bs: u64, offset: u64, len: usize) -> (u64, std::ops::Range<usize>) {
    let lo = (b * bs).max(offset);
    let hi = ((b + 1) * bs).min(offset + len as u64);
    (lo - b * bs, (lo - offset) as usize..(hi - offset) as usize)
}

/// Appends a transfer, extending the last one when both sides are contiguous.
fn push_run(runs: &mut Vec<Run>, at: u64, src: std::ops::Range<usize>) {
    match runs.last_mut() {
        Some(r) if r.src.end == src.start && r.at + r.src.len() as u64 == at => r.src.end = src.end,
        _ => runs.push(Run { at, src }),
    }
}

/// The device reads a read needs (see `Engine::plan_read`).
#[derive(Default)]
pub(crate) struct ReadPlan {
    /// Transfers straight into the caller's buffer.
    runs: Vec<Run>,
    /// With data checksums: the blocks the runs read whole, to verify in the buffer.
    checks: Vec<BlockRead>,
    /// With data checksums: blocks the request covers in part, read whole on their own.
    partial: Vec<BlockRead>,
    /// The pool's block size.
    block_size: usize,
}

/// A mapped block of a read, in a pool with data checksums: bytes `src` of the buffer are
/// bytes `inner..` of the block.
struct BlockRead {
    key: u64,
    value: MapValue,
    inner: u64,
    src: std::ops::Range<usize>,
}

impl ReadPlan {
    /// The CRC-32 of `buf` as this plan read it (see `Handle::read_crc`): the verified
    /// blocks' own checksums, joined, and the other bytes hashed.
    fn crc(&self, buf: &[u8], shift: &crate::checksum::Shift) -> u32 {
        if self.checks.is_empty() {
            return crc32fast::hash(buf);
        }
        let (mut crc, mut at) = (0u32, 0usize);
        for c in &self.checks {
            if c.src.start > at {
                crc = crate::checksum::extend(crc, &buf[at..c.src.start]);
            }
            crc = shift.apply(crc) ^ c.value.sum;
            at = c.src.end;
        }
        crate::checksum::extend(crc, &buf[at..])
    }
}

impl BlockRead {
    /// The mismatch, if the block's contents `data` do not match its checksum.
    fn verify(&self, data: &[u8]) -> Option<Mismatch> {
        Mismatch::find(self.key, self.value, data)
    }
}

/// A block whose contents do not match its checksum.
pub(crate) struct Mismatch {
    key: u64,
    value: MapValue,
    found: u32,
}

impl Mismatch {
    /// The mismatch, if `data`, block `key` as `value` maps it, does not match its checksum.
    fn find(key: u64, value: MapValue, data: &[u8]) -> Option<Mismatch> {
        let found = block_sum(data);
        (found != value.sum).then_some(Mismatch { key, value, found })
    }
}

/// Runs a planned read into `buf`: bytes no block backs are zero-filled, or, with
/// `filled`, left as they are and the ranges that were read appended to it (in order,
/// adjacent ones merged). The first block that fails its checksum is returned.
pub(crate) fn run_read(
    dev: &dyn BlockDevice,
    plan: &ReadPlan,
    buf: &mut [u8],
    mut filled: Option<&mut Vec<std::ops::Range<usize>>>,
) -> Result<Option<Mismatch>> {
    for r in &plan.runs {
        dev.read_at(&mut buf[r.src.clone()], r.at)?;
    }
    for c in &plan.checks {
        if let Some(bad) = c.verify(&buf[c.src.clone()]) {
            return Ok(Some(bad));
        }
    }
    if !plan.partial.is_empty() {
        let mut block = vec![0u8; plan.block_size];
        for p in &plan.partial {
            dev.read_at(&mut block, Store::byte(p.value.unit))?;
            if let Some(bad) = p.verify(&block) {
                return Ok(Some(bad));
            }
            let o = p.inner as usize;
            buf[p.src.clone()].copy_from_slice(&block[o..o + p.src.len()]);
        }
    }
    // What was read, in buffer order (at most one partial block each side of the runs),
    // adjacent ranges merged: zero-fill around it, or report it.
    let mut covered = 0;
    let mut emit = |r: std::ops::Range<usize>| match filled.as_deref_mut() {
        Some(f) => match f.last_mut() {
            Some(l) if l.end == r.start => l.end = r.end,
            _ => f.push(r),
        },
        None => {
            buf[covered..r.start].fill(0);
            covered = r.end;
        }
    };
    let mut partial = plan.partial.iter().peekable();
    for r in &plan.runs {
        while let Some(p) = partial.next_if(|p| p.src.start < r.src.start) {
            emit(p.src.clone());
        }
        emit(r.src.clone());
    }
    partial.for_each(|p| emit(p.src.clone()));
    if filled.is_none() {
        buf[covered..].fill(0);
    }
    Ok(None)
}

/// Runs planned in-place writes of `data`.
pub(crate) fn write_runs(dev: &dyn BlockDevice, runs: &[Run], data: &[u8]) -> Result<()> {
    for r in runs {
        dev.write_at(&data[r.src.clone()], r.at)?;
    }
    Ok(())
}

/// What a write planned: done under the lock, or in-place transfers for the caller to run.
pub(crate) enum WritePlan {
    Done,
    InPlace(Vec<Run>),
}

/// A device write planned for one block of a request.
enum Piece {
    /// Bytes `src` of the request go to device byte `at`.
    Direct {
        at: u64,
        src: std::ops::Range<usize>,
    },
    /// A whole block assembled in memory (partial write into a new block).
    Assembled { at: u64, data: Vec<u8> },
}

impl Engine {
    /// Root, size and display name of an I/O target.
    pub(crate) fn target(&mut self, t: Target) -> Result<(u64, u64, String)> {
        let (c, sm) = self.cat();
        match t {
            Target::Volume(id) => c
                .volume_ref(sm, id)?
                .map(|v| (v.root, v.size, v.name.clone()))
                .ok_or_else(|| Error::VolumeNotFound(crate::VolumeId::from_u128(id).into())),
            Target::Snapshot(id) => c
                .snapshot_ref(sm, id)?
                .map(|s| (s.root, s.size, format!("{}@{}", s.volume_name, s.name)))
                .ok_or_else(|| Error::SnapshotNotFound(crate::SnapshotId::from_u128(id).into())),
        }
    }

    /// Map root and size of an I/O target (without copying its names: every I/O asks).
    pub(crate) fn root_and_size_of(&mut self, t: Target) -> Result<Option<(u64, u64)>> {
        let (c, sm) = self.cat();
        Ok(match t {
            Target::Volume(id) => c.volume_ref(sm, id)?.map(|v| (v.root, v.size)),
            Target::Snapshot(id) => c.snapshot_ref(sm, id)?.map(|s| (s.root, s.size)),
        })
    }

    fn check_range(&mut self, t: Target, offset: u64, len: usize) -> Result<(u64, u64)> {
        let Some((root, size)) = self.root_and_size_of(t)? else {
            return Err(self
                .target(t)
                .err()
                .unwrap_or_else(|| Error::VolumeNotFound("a volume that just went away".into())));
        };
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(Error::OutOfRange {
                what: self.target(t)?.2,
                offset,
                len: len as u64,
                size,
            });
        }
        Ok((root, size))
    }

    /// Plans a read of `len` bytes at `offset`: the device reads to make, one per run of
    /// physically contiguous blocks, in buffer order. Bytes no run covers read as zeros.
    /// With data checksums, the blocks the runs read whole are listed for verifying, and a
    /// block the request covers only in part is read whole on its own (its checksum is
    /// over all of it).
    pub(crate) fn plan_read(&mut self, t: Target, offset: u64, len: usize) -> Result<ReadPlan> {
        self.check_usable()?;
        let (root, size) = self.check_range(t, offset, len)?;
        let mut plan = ReadPlan {
            block_size: self.store.block_size,
            ..ReadPlan::default()
        };
        if len == 0 {
            return Ok(plan);
        }
        let checksums = self.store.checksums;
        let bs = self.store.block_size as u64;
        let first = offset / bs;
        let end = (offset + len as u64).div_ceil(bs);
        let mut found = std::mem::take(&mut self.scratch);
        found.clear();
        let r = self
            .store
            .lookup_range_for_read(root, first, end, &mut found);
        if r.is_ok() {
            self.remember_read(t, size, first, end, &found);
        }
        if r.is_ok() && !checksums {
            self.probe_runs(t, root, size, first, end);
        }
        for f in found.drain(..) {
            let (inner, src) = span(f.key, bs, offset, len);
            if !checksums {
                push_run(&mut plan.runs, Store::byte(f.value.unit) + inner, src);
            } else if src.len() as u64 == bs {
                plan.checks.push(BlockRead {
                    key: f.key,
                    value: f.value,
                    inner,
                    src: src.clone(),
                });
                push_run(&mut plan.runs, Store::byte(f.value.unit), src);
            } else {
                plan.partial.push(BlockRead {
                    key: f.key,
                    value: f.value,
                    inner,
                    src,
                });
            }
        }
        self.scratch = found;
        r.map(|_| plan)
    }

    /// The device byte where the block holding byte `offset` of `t` starts (None: a hole).
    pub(crate) fn physical_block(&mut self, t: Target, offset: u64) -> Result<Option<u64>> {
        let (root, _) = self.check_range(t, offset, 1)?;
        let b = offset / self.store.block_size as u64;
        let mut found = Vec::new();
        self.store
            .lookup_range_for_read(root, b, b + 1, &mut found)?;
        Ok(found.first().map(|f| Store::byte(f.value.unit)))
    }

    /// The error for a block of `t` that failed its checksum.
    pub(crate) fn data_corrupt(&mut self, t: Target, bad: &Mismatch) -> Error {
        let target = match self.target(t) {
            Ok((_, _, name)) => name,
            Err(_) => format!("{t:?} (gone since)"),
        };
        Error::DataCorrupt {
            pool: crate::PoolId::from_u128(self.sb.pool_id),
            target,
            offset: bad.key.saturating_mul(self.store.block_size as u64),
            physical: Store::byte(bad.value.unit),
            expected: bad.value.sum,
            found: bad.found,
        }
    }

    /// Reads block `f` of `t` whole into `block`, verifying it in a pool with data checksums
    /// (what a partial write carries into its new block must not launder a bad one).
    fn read_block_verified(&mut self, t: Target, f: &Found, block: &mut [u8]) -> Result<()> {
        self.store.dev.read_at(block, Store::byte(f.value.unit))?;
        if !self.store.checksums {
            return Ok(());
        }
        match Mismatch::find(f.key, f.value, block) {
            Some(bad) => Err(self.data_corrupt(t, &bad)),
            None => Ok(()),
        }
    }

    /// Writes `data` at `offset` of volume `id` (see the module docs for where it lands).
    pub(crate) fn write(&mut self, id: u128, offset: u64, data: &[u8]) -> Result<()> {
        self.write_with(id, offset, data, false)
    }

    /// As [`Engine::write`], except that a write going wholly in place is returned as
    /// transfers for the caller to run after letting go of the engine lock (holding the I/O
    /// gate), so writes to owned blocks and reads proceed in parallel.
    pub(crate) fn plan_write(&mut self, id: u128, offset: u64, data: &[u8]) -> Result<WritePlan> {
        self.write_planned(id, offset, data, false)
    }

    /// As [`Engine::write`]; with `redirect_all`, no block is written in place, so the write
    /// becomes visible only with the next commit. Catalog operations that write (resize
    /// zeroing the tail of its new last block) use it to stay atomic across a crash.
    pub(crate) fn write_with(
        &mut self,
        id: u128,
        offset: u64,
        data: &[u8],
        redirect_all: bool,
    ) -> Result<()> {
        match self.write_planned(id, offset, data, redirect_all)? {
            WritePlan::Done => Ok(()),
            WritePlan::InPlace(runs) => self.mutate(|e| {
                write_runs(&*e.store.dev, &runs, data)?;
                e.writes_done.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }),
        }
    }

    /// Plans a write and carries it out, except a write wholly into owned blocks, which is
    /// returned as device transfers (no map change) for the caller to run.
    fn write_planned(
        &mut self,
        id: u128,
        offset: u64,
        data: &[u8],
        redirect_all: bool,
    ) -> Result<WritePlan> {
        self.check_writable()?;
        let (root, size) = self.check_range(Target::Volume(id), offset, data.len())?;
        if data.is_empty() {
            return Ok(WritePlan::Done);
        }
        let (c, sm) = self.cat();
        let frozen = c.volume_ref(sm, id)?.map_or(u64::MAX, |v| v.frozen_gen);
        let bs = self.store.block_size as u64;
        let first = offset / bs;
        let end = (offset + data.len() as u64).div_ceil(bs);
        let mut found = Vec::new();
        self.store.lookup_range(root, first, end, &mut found)?;
        // Decide in place or redirect for every block before changing anything, so a full
        // pool is reported before any state changes.
        let mut plan: Vec<(u64, Option<Found>, bool)> = Vec::with_capacity((end - first) as usize);
        let mut fi = found.into_iter().peekable();
        let mut redirects = 0u64;
        // With data checksums a block goes in place only if the open transaction wrote it:
        // then no commit points at it, and whatever a crash leaves in it is never read.
        // A block an earlier commit points at keeps the contents its committed checksum
        // describes until that commit is gone (see docs/format.md, "Data checksums").
        let born_after = if self.store.checksums {
            frozen.max(self.store.generation - 1)
        } else {
            frozen
        };
        for b in first..end {
            let f = fi.next_if(|f| f.key == b);
            let in_place = match &f {
                Some(_) if redirect_all => false,
                Some(f) => {
                    !f.path_shared
                        && f.value.birth > born_after
                        && self.store.sm.get(f.value.unit)? == 1
                }
                None => false,
            };
            redirects += u64::from(!in_place);
            plan.push((b, f, in_place));
        }
        self.remember_owned(id, size, &plan);
        if redirects == 0 && !self.store.checksums {
            // Every block is mapped and owned (an unmapped one counts as a redirect). With
            // data checksums the map takes the blocks' new checksums, under the lock.
            let mut runs: Vec<Run> = Vec::with_capacity(1);
            for f in plan.iter().filter_map(|p| p.1) {
                let (inner, src) = span(f.key, bs, offset, data.len());
                push_run(&mut runs, Store::byte(f.value.unit) + inner, src);
            }
            self.maybe_commit_after_io()?;
            return Ok(WritePlan::InPlace(runs));
        }
        if redirects > 0 {
            let need = redirects * self.store.block_units + 16 + redirects / 4;
            let usable = self.store.sm.usable_units();
            if usable < need {
                return Err(Error::NoSpace {
                    op: "write",
                    needed: need * crate::format::PAGE_SIZE as u64,
                    free: usable * crate::format::PAGE_SIZE as u64,
                });
            }
        }
        self.apply_write(id, (root, size), offset, data, plan)?;
        self.maybe_commit_after_io()?;
        Ok(WritePlan::Done)
    }

    /// A write that redirects: new blocks are allocated and written first, and only once
    /// every byte is on the device does the map change. So a write the device refuses
    /// (the host filesystem full: `Error::HostFull`) gives its blocks back and leaves the
    /// volume as it was, and the pool goes on without being poisoned; any other failure
    /// poisons as a half-done change does.
    fn apply_write(
        &mut self,
        id: u128,
        (root, size): (u64, u64),
        offset: u64,
        data: &[u8],
        plan: Vec<(u64, Option<Found>, bool)>,
    ) -> Result<()> {
        self.check_writable()?;
        let mut fresh: Vec<u64> = Vec::with_capacity(plan.len());
        let mut sums: Vec<u32> = Vec::new();
        let mut wrote = false;
        // A panic here poisons like one in `mutate`: blocks taken must not leak into a commit.
        let placed = self.guard_panic(|e| {
            let pieces = e.place_write(id, offset, data, &plan, &mut fresh, &mut sums)?;
            wrote = true;
            e.write_pieces(data, &pieces)?;
            e.writes_done.fetch_add(1, Ordering::AcqRel);
            Ok(())
        });
        if let Err(e) = placed {
            // Nothing points at the new blocks yet: they go back as they came.
            let undone = fresh
                .iter()
                .try_for_each(|&u| self.store.dec_block(u).map(|_| ()));
            // A block written in place may now hold what its checksum does not describe: its
            // checksum follows what the device holds now (the write failed, so the block's
            // contents are undefined, as a failed write's are on a disk).
            let stale_sums = wrote
                && self.store.checksums
                && plan.iter().any(|p| p.2)
                && self
                    .mutate(|e| e.resum_in_place(id, (root, size), &plan))
                    .is_err();
            if let Err(u) = undone {
                self.poison(format!("giving back the blocks of a failed write: {u}"));
            } else if !(matches!(e, Error::HostFull { .. })
                // A bad old block found before anything was written changed nothing.
                || matches!(e, Error::DataCorrupt { .. }) && !wrote)
                || stale_sums
            {
                self.poison(e.to_string());
            }
            return Err(e);
        }
        self.mutate(|e| e.map_write(id, (root, size), plan, &fresh, &sums))
    }

    /// Gives the blocks of `plan` that went in place the checksum of what the device holds
    /// for them now (after a failed write, in a pool with data checksums).
    fn resum_in_place(
        &mut self,
        id: u128,
        (mut root, size): (u64, u64),
        plan: &[(u64, Option<Found>, bool)],
    ) -> Result<()> {
        let mut block = vec![0u8; self.store.block_size];
        for &(b, f, in_place) in plan {
            let (true, Some(f)) = (in_place, f) else {
                continue;
            };
            self.store
                .dev
                .read_at(&mut block, Store::byte(f.value.unit))?;
            let m = MapValue {
                sum: block_sum(&block),
                ..f.value
            };
            root = self.store.insert(root, b, m, Reserve::Keep)?.0;
            self.remember(Target::Volume(id), size, b, Some(m), false);
        }
        self.set_root(id, root)
    }

    /// Allocates the new blocks of a redirecting write (into `fresh`, in plan order) and
    /// lays out its device writes. With data checksums, `sums` gets every planned block's
    /// new checksum, in plan order; a block written in part then needs its other bytes
    /// too, so it is assembled whole in memory, in place as well as redirected.
    fn place_write(
        &mut self,
        id: u128,
        offset: u64,
        data: &[u8],
        plan: &[(u64, Option<Found>, bool)],
        fresh: &mut Vec<u64>,
        sums: &mut Vec<u32>,
    ) -> Result<Vec<Piece>> {
        let bs = self.store.block_size as u64;
        let checksums = self.store.checksums;
        let mut pieces = Vec::with_capacity(plan.len());
        for &(b, f, in_place) in plan {
            let (inner, src) = span(b, bs, offset, data.len());
            let whole = src.len() as u64 == bs;
            if checksums && whole {
                sums.push(block_sum(&data[src.clone()]));
            }
            if let (true, Some(f)) = (in_place, &f) {
                let at = Store::byte(f.value.unit);
                if checksums && !whole {
                    let block = self.whole_block(id, Some(f), inner, &data[src])?;
                    sums.push(block_sum(&block));
                    pieces.push(Piece::Assembled { at, data: block });
                } else {
                    pieces.push(Piece::Direct {
                        at: at + inner,
                        src,
                    });
                }
                continue;
            }
            let unit = self.store.alloc_block("write", Reserve::Keep)?;
            fresh.push(unit);
            let at = Store::byte(unit);
            if whole {
                pieces.push(Piece::Direct { at, src });
            } else {
                // A partial write into a new block carries the rest of the old one along.
                let block = self.whole_block(id, f.as_ref(), inner, &data[src])?;
                if checksums {
                    sums.push(block_sum(&block));
                }
                pieces.push(Piece::Assembled { at, data: block });
            }
        }
        Ok(pieces)
    }

    /// A whole block in memory: `part` at byte `inner` of what block `old` holds (verified;
    /// zeros for a block not mapped yet).
    fn whole_block(
        &mut self,
        id: u128,
        old: Option<&Found>,
        inner: u64,
        part: &[u8],
    ) -> Result<Vec<u8>> {
        let mut block = vec![0u8; self.store.block_size];
        if let Some(f) = old {
            self.read_block_verified(Target::Volume(id), f, &mut block)?;
        }
        let o = inner as usize;
        block[o..o + part.len()].copy_from_slice(part);
        Ok(block)
    }

    /// Points the blocks of a written redirect at their new units (`fresh`, in plan order)
    /// and, with data checksums, every written block at its new checksum (`sums`, one per
    /// block of the plan).
    fn map_write(
        &mut self,
        id: u128,
        (mut root, size): (u64, u64),
        plan: Vec<(u64, Option<Found>, bool)>,
        fresh: &[u64],
        sums: &[u32],
    ) -> Result<()> {
        let mut units = fresh.iter();
        let mut sums = sums.iter();
        let checksums = self.store.checksums;
        for (b, f, in_place) in plan {
            let sum = match checksums {
                true => *sums.next().ok_or_else(|| {
                    Error::Internal("a written block without its checksum".into())
                })?,
                false => 0,
            };
            if let (true, Some(f)) = (in_place, f) {
                if checksums && f.value.sum != sum {
                    // The same unit, born in this transaction: only its checksum changes.
                    let m = MapValue { sum, ..f.value };
                    root = self.store.insert(root, b, m, Reserve::Keep)?.0;
                    self.remember(Target::Volume(id), size, b, Some(m), false);
                }
                continue;
            }
            let unit = *units
                .next()
                .ok_or_else(|| Error::Internal("a redirect without its block".into()))?;
            let m = MapValue {
                unit,
                birth: self.store.generation,
                sum,
            };
            let (r, old) = self.store.insert(root, b, m, Reserve::Keep)?;
            root = r;
            // A redirected block is owned at once in a pool without checksums: count 1, its
            // path just shadowed, born in the open transaction, after any snapshot.
            self.remember(Target::Volume(id), size, b, Some(m), !checksums);
            if let Some(old) = old {
                self.store.dec_block(old.unit)?;
            }
        }
        self.set_root(id, root)
    }

    /// Issues the device writes, merging neighbours that are contiguous on both sides.
    fn write_pieces(&self, data: &[u8], pieces: &[Piece]) -> Result<()> {
        let dev = &self.store.dev;
        let mut i = 0;
        while i < pieces.len() {
            match &pieces[i] {
                Piece::Assembled { at, data: block } => {
                    dev.write_at(block, *at)?;
                    i += 1;
                }
                Piece::Direct { at, src } => {
                    let (start_at, start_src) = (*at, src.start);
                    let mut end_src = src.end;
                    i += 1;
                    while let Some(Piece::Direct { at, src }) = pieces.get(i) {
                        if src.start != end_src || *at != start_at + (end_src - start_src) as u64 {
                            break;
                        }
                        end_src = src.end;
                        i += 1;
                    }
                    dev.write_at(&data[start_src..end_src], start_at)?;
                }
            }
        }
        Ok(())
    }

    /// Points volume `id` at map root `root` (the catalog tree takes it at the commit).
    pub(crate) fn set_root(&mut self, id: u128, root: u64) -> Result<()> {
        let (c, sm) = self.cat();
        if c.volume_ref(sm, id)?.is_some_and(|v| v.root != root) {
            if let Some(v) = c.volume_mut(sm, id)? {
                v.root = root;
            }
        }
        Ok(())
    }

    /// Makes `offset..offset+len` of volume `id` read as zeros, returning whole blocks to
    /// the pool and zero-filling partial ones.
    pub(crate) fn discard(&mut self, id: u128, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let size =
            usize::try_from(len).map_err(|_| Error::InvalidArgument("length too large".into()))?;
        self.check_range(Target::Volume(id), offset, size)?;
        if len == 0 {
            return Ok(());
        }
        let bs = self.store.block_size as u64;
        let end = offset + len;
        let first_whole = offset.div_ceil(bs);
        let end_whole = end / bs;
        // Partial blocks at the edges are zero-filled through the normal write path.
        if first_whole > end_whole {
            return self.write(id, offset, &vec![0u8; len as usize]);
        }
        if offset < first_whole * bs {
            self.write(id, offset, &vec![0u8; (first_whole * bs - offset) as usize])?;
        }
        if end_whole * bs < end {
            self.write(
                id,
                end_whole * bs,
                &vec![0u8; (end - end_whole * bs) as usize],
            )?;
        }
        self.unmap(id, first_whole, end_whole)?;
        self.maybe_commit_after_io()
    }

    /// Removes the mappings of blocks `first..end` of volume `id`.
    pub(crate) fn unmap(&mut self, id: u128, first: u64, end: u64) -> Result<()> {
        let (root, size, _) = self.target(Target::Volume(id))?;
        let mut found = Vec::new();
        self.store.lookup_range(root, first, end, &mut found)?;
        if found.is_empty() {
            return Ok(());
        }
        // Unmapping frees blocks, so it may use the reserve: it must work on a full pool.
        self.mutate(|e| {
            let mut root = root;
            for f in found {
                let (r, old) = e.store.remove(root, f.key, Reserve::Use)?;
                e.remember(Target::Volume(id), size, f.key, None, false);
                root = r;
                if let Some(old) = old {
                    e.store.dec_block(old.unit)?;
                }
            }
            e.set_root(id, root)?;
            Ok(())
        })
    }

    /// Tells the translation cache what block `key` of `t` (of `size` bytes) maps to now
    /// that a write or a discard changed it.
    /// A block not wholly inside the target is never kept: a request all of whose blocks
    /// the cache answers then lies inside the target, so the fast paths need no size.
    fn remember(&self, t: Target, size: u64, key: u64, value: Option<MapValue>, owned: bool) {
        let bs = self.store.block_size as u64;
        if key >= size / bs {
            return;
        }
        let gate = self.io_gate.read();
        gate.put(
            t,
            key,
            Entry {
                unit: value.map(|v| v.unit),
                sum: value.map_or(0, |v| v.sum),
                owned,
            },
        );
        // The block's run no longer has one answer (if it ever had one).
        gate.put_run(t, key >> RUN_SHIFT, RunAnswer::Mixed);
    }

    /// Keeps what a read's lookup of blocks `first..end` of `t` found (`found`, in key
    /// order; blocks between are holes). A block the cache already knows as owned, at the
    /// same unit, stays owned: a read does not learn ownership, and does not take it away.
    fn remember_read(&self, t: Target, size: u64, first: u64, end: u64, found: &[Found]) {
        let gate = self.io_gate.read();
        if !gate.usable() {
            return;
        }
        let bs = self.store.block_size as u64;
        let epoch = gate.epoch();
        let mut fi = found.iter().peekable();
        for b in first..end.min(size / bs) {
            let f = fi.next_if(|f| f.key == b);
            let unit = f.map(|f| f.value.unit);
            let owned = gate
                .get(t, b, epoch)
                .is_some_and(|e| e.owned && e.unit == unit);
            gate.put(
                t,
                b,
                Entry {
                    unit,
                    sum: f.map_or(0, |f| f.value.sum),
                    owned,
                },
            );
        }
    }

    /// Gives each run of blocks `first..end` of `t` that lies wholly inside the target and
    /// has no current answer its [`RunAnswer`], from one lookup of the run's blocks. A run
    /// found mixed stays so until the epoch changes, so a fragmented volume is probed once
    /// per run, not on every read. A run whose lookup fails (a damaged node beside the
    /// ones this read needs) is left without an answer: the read itself does not fail for
    /// blocks it does not cover.
    fn probe_runs(&mut self, t: Target, root: u64, size: u64, first: u64, end: u64) {
        let whole_runs = (size / self.store.block_size as u64) >> RUN_SHIFT;
        let epoch = {
            let gate = self.io_gate.read();
            if !gate.usable() {
                return;
            }
            gate.epoch()
        };
        let mut found = Vec::new();
        for run in first >> RUN_SHIFT..end.div_ceil(RUN_BLOCKS).min(whole_runs) {
            if self.io_gate.read().get_run(t, run, epoch).is_some() {
                continue;
            }
            found.clear();
            let lo = run << RUN_SHIFT;
            if self
                .store
                .lookup_range_for_read(root, lo, lo + RUN_BLOCKS, &mut found)
                .is_err()
            {
                continue;
            }
            let units = self.store.block_units;
            let answer = match found.first() {
                None => RunAnswer::Hole,
                Some(f0)
                    if found.len() as u64 == RUN_BLOCKS
                        && found
                            .iter()
                            .enumerate()
                            .all(|(k, f)| f.value.unit == f0.value.unit + k as u64 * units) =>
                {
                    RunAnswer::Contiguous(f0.value.unit)
                }
                Some(_) => RunAnswer::Mixed,
            };
            self.io_gate.read().put_run(t, run, answer);
        }
    }

    /// Records the blocks a write found it may write in place (pools without data
    /// checksums: theirs go under the lock), so the next write to them skips the lock.
    fn remember_owned(&self, id: u128, size: u64, plan: &[(u64, Option<Found>, bool)]) {
        if self.store.checksums || !self.io_gate.read().usable() {
            return;
        }
        let bs = self.store.block_size as u64;
        let gate = self.io_gate.read();
        for &(b, f, in_place) in plan {
            if let (true, Some(f), true) = (in_place, f, b < size / bs) {
                let e = Entry {
                    unit: Some(f.value.unit),
                    sum: f.value.sum,
                    owned: true,
                };
                gate.put(Target::Volume(id), b, e);
            }
        }
    }

    fn maybe_commit_after_io(&mut self) -> Result<()> {
        self.maybe_commit()
    }
}

fn spawn_committer(
    pool: Weak<Shared>,
    stop: Arc<(Mutex<bool>, parking_lot::Condvar)>,
    interval: Duration,
) -> Option<std::thread::JoinHandle<()>> {
    let tick = (interval / 4).max(Duration::from_millis(50));
    std::thread::Builder::new()
        .name("snapvol-commit".into())
        .spawn(move || loop {
            {
                let mut stopped = stop.0.lock();
                if !*stopped {
                    stop.1.wait_for(&mut stopped, tick);
                }
                if *stopped {
                    return;
                }
            }
            let Some(shared) = pool.upgrade() else { return };
            let mut e = shared.engine.lock();
            if e.check_usable().is_ok() {
                // A failure poisons the pool; the next caller sees the error.
                let _ = e.maybe_commit();
            }
        })
        .ok()
}
