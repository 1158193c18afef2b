//! The translation cache: the block map's answers (which device unit holds block `b` of a
//! volume or snapshot, and whether the volume may write it in place), kept where a read or
//! an in-place write finds them without the engine lock.
//!
//! Why: finding a block's unit under the engine lock costs a mutex every thread contends
//! for, a catalog lookup and a descent of the volume's map from its root, about 2,100
//! instructions and several cache misses per 4 KiB read (BENCHMARKS.md, "The data path"),
//! as much again as the `pread` it plans. The answers change rarely: only a write that
//! redirects, a discard and a catalog operation change them, all under the engine lock. A
//! table the engine fills and corrects as it goes lets I/O skip the lock, the catalog and
//! the descent whenever it hits.
//!
//! How it stays true:
//!
//! - One writer: slots are written only by the engine, under its lock, as seqlocks (the
//!   sequence is odd while a slot is being written; a reader that sees it change retries
//!   the slow way), so a reader never takes half of one answer and half of another.
//! - A write that redirects a block, and a discard, rewrite that block's slot before the
//!   engine lock is let go: an I/O that starts after they return sees the new answer.
//! - A catalog operation (snapshot, clone, rollback, resize, delete, receive) bumps the
//!   epoch before it drains the I/O gate: every slot of an earlier epoch is a miss, so a
//!   write that finds a slot saying "owned" started before the drain and is waited for,
//!   exactly as the planned in-place writes of the locked path are.
//! - A stale answer that a reader took before a change is still safe to act on: the reader
//!   holds the I/O gate, and a unit is reused only after a commit drains the gate (invariant
//!   2), so it reads what the block held a moment ago, as if it had run first.
//! - A poisoned pool disables the table (every lookup misses, so the locked path reports the
//!   poison); a reload of the engine bumps the epoch.
//!
//! Two direct-mapped tables: one slot per block, and one per aligned run of [`RUN_BLOCKS`]
//! blocks that answers for the whole run when it is contiguous on the device or all holes
//! ([`RunAnswer`]; pools without data checksums, reads only). Block `b` of a target goes to
//! slot `(b + spread(target)) mod n`, so the consecutive blocks of one volume never push each
//! other out until the volume has more blocks than the table has slots. The tables start
//! small and grow with the blocks the pool holds, up to `PoolOptions::translation_slots`, at
//! a commit (when the gate is drained anyway); 64 bytes a slot, one cache line. A redirect
//! or discard of a block marks its run mixed, so a run answer never outlives a change to
//! one of its blocks.

use crate::io::Target;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};

/// Slots of a new table: grown at commits as the pool fills (see [`Translations::wanted`]).
const INITIAL_SLOTS: usize = 1 << 10;

/// `unit` of a slot whose block is not mapped (reads as zeros).
const HOLE: u64 = u64::MAX;
/// Bit of `key` naming a snapshot rather than a volume.
const SNAPSHOT: u64 = 1 << 63;
/// Bit of `meta`: the volume may write the block in place (see [`Entry::owned`]).
const OWNED: u64 = 1 << 32;

/// One answer, as a seqlock: every field is an atomic, so a torn read is impossible and
/// detected by `seq` instead of being undefined.
#[derive(Default)]
#[repr(align(64))]
struct Slot {
    /// Odd while the engine writes the slot; bumped by two each time it does.
    seq: AtomicU64,
    id_lo: AtomicU64,
    id_hi: AtomicU64,
    /// Block number, with [`SNAPSHOT`].
    key: AtomicU64,
    /// The device unit holding the block, or [`HOLE`].
    unit: AtomicU64,
    /// The block's checksum (low 32 bits, pools with data checksums) and [`OWNED`].
    meta: AtomicU64,
    /// The table's epoch when the slot was written; 0 for a slot never written.
    epoch: AtomicU64,
}

/// What a slot says about one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The device unit holding the block; None: a hole.
    pub(crate) unit: Option<u64>,
    /// Its checksum, in a pool with data checksums.
    pub(crate) sum: u32,
    /// The volume may write the block in place, as the locked path decided when it last
    /// wrote it (invariant 3: count 1, no shared node on its path, born after the volume's
    /// last snapshot). Only a catalog operation can take that away, and it bumps the epoch.
    pub(crate) owned: bool,
}

/// What the cache says of an aligned run of [`RUN_BLOCKS`] blocks, in a pool without data
/// checksums: one answer for all of them, so a volume written sequentially (an image, a
/// restore, a file system's large files) is answered from a table small enough to stay in
/// the CPU's caches, where a table of one slot per block misses to memory on every random
/// read (BENCHMARKS.md, "The data path").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RunAnswer {
    /// Every block is mapped, block `k` of the run at `unit + k * units per block`.
    Contiguous(u64),
    /// No block is mapped.
    Hole,
    /// Anything else: ask the per-block slots.
    Mixed,
}

/// log2 of [`RUN_BLOCKS`].
pub(crate) const RUN_SHIFT: u32 = 8;
/// Blocks in one run answer (1 MiB of 4 KiB blocks).
pub(crate) const RUN_BLOCKS: u64 = 1 << RUN_SHIFT;
/// Bit of `meta` in a run slot: [`RunAnswer::Mixed`].
const MIXED: u64 = 1 << 33;

/// A direct-mapped array of slots.
struct Table {
    slots: Box<[Slot]>,
    mask: u64,
}

impl Table {
    fn new(n: usize) -> Table {
        // A table of no slots still has one, never written: lookups compare its epoch 0.
        let n = n.max(1).next_power_of_two();
        Table {
            slots: (0..n).map(|_| Slot::default()).collect(),
            mask: n as u64 - 1,
        }
    }

    /// The slot for `key` of `t`, and what it must hold to answer for them.
    fn slot(&self, t: Target, key: u64) -> (&Slot, u64, u64, u64) {
        let (id, k) = match t {
            Target::Volume(id) => (id, key),
            Target::Snapshot(id) => (id, key | SNAPSHOT),
        };
        let (lo, hi) = (id as u64, (id >> 64) as u64);
        // Consecutive keys of one target take consecutive slots; targets start at
        // scattered offsets.
        let spread = (lo ^ hi.rotate_left(32) ^ (k & SNAPSHOT))
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
        let i = (key.wrapping_add(spread) & self.mask) as usize;
        (&self.slots[i], lo, hi, k)
    }

    /// The slot's `(unit, meta)` if it holds a current answer for `key` of `t`.
    fn get(&self, t: Target, key: u64, epoch: u64) -> Option<(u64, u64)> {
        let (s, lo, hi, k) = self.slot(t, key);
        let seq = s.seq.load(Ordering::Acquire);
        if seq & 1 == 1 {
            return None;
        }
        let (slo, shi, sk) = (
            s.id_lo.load(Ordering::Relaxed),
            s.id_hi.load(Ordering::Relaxed),
            s.key.load(Ordering::Relaxed),
        );
        let (unit, meta, sepoch) = (
            s.unit.load(Ordering::Relaxed),
            s.meta.load(Ordering::Relaxed),
            s.epoch.load(Ordering::Relaxed),
        );
        // Orders the field loads before the second look at the sequence.
        fence(Ordering::Acquire);
        let current = s.seq.load(Ordering::Relaxed) == seq
            && sepoch == epoch
            && (slo, shi, sk) == (lo, hi, k);
        current.then_some((unit, meta))
    }

    /// Writes the answer for `key` of `t`. One writer (the engine, under its lock).
    fn put(&self, t: Target, key: u64, unit: u64, meta: u64, epoch: u64) {
        let (s, lo, hi, k) = self.slot(t, key);
        let seq = s.seq.load(Ordering::Relaxed);
        s.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        // Orders the odd sequence before the field stores (a reader that sees any new
        // field then sees the sequence changed).
        fence(Ordering::Release);
        s.id_lo.store(lo, Ordering::Relaxed);
        s.id_hi.store(hi, Ordering::Relaxed);
        s.key.store(k, Ordering::Relaxed);
        s.unit.store(unit, Ordering::Relaxed);
        s.meta.store(meta, Ordering::Relaxed);
        s.epoch.store(epoch, Ordering::Relaxed);
        s.seq.store(seq.wrapping_add(2), Ordering::Release);
    }
}

/// The cache. Read by any thread holding the I/O gate; written by the engine only.
pub(crate) struct Translations {
    /// One slot per block.
    blocks: Table,
    /// One slot per run of [`RUN_BLOCKS`] blocks.
    runs: Table,
    epoch: AtomicU64,
    /// False once the pool is poisoned: every lookup misses.
    usable: AtomicBool,
    /// Most block slots the cache may grow to (0: no cache at all).
    limit: usize,
    /// Block answers written since the table was made (the engine's only: one writer).
    fills: AtomicU64,
}

impl Translations {
    /// An empty cache that may grow to `limit` block slots (rounded down to a power of
    /// two; 0 keeps no answers at all).
    pub(crate) fn new(limit: usize) -> Translations {
        let limit = match limit {
            0 => 0,
            n => 1 << n.ilog2(),
        };
        Translations::with_slots(INITIAL_SLOTS.min(limit), limit, 1)
    }

    fn with_slots(n: usize, limit: usize, epoch: u64) -> Translations {
        Translations {
            blocks: Table::new(n),
            runs: Table::new(n >> RUN_SHIFT),
            epoch: AtomicU64::new(epoch),
            usable: AtomicBool::new(limit > 0),
            limit,
            fills: AtomicU64::new(0),
        }
    }

    /// Block slots in the cache.
    #[cfg(test)]
    pub(crate) fn slots(&self) -> usize {
        self.blocks.slots.len()
    }

    /// The cache to grow to for a pool holding `blocks` data blocks, if it is larger than
    /// this one: the next power of two, within the limit. A cache of the pool's size keeps
    /// every block of a volume that fills the pool. Only once the engine has written as
    /// many answers as the table has slots: a pool opened for a moment (a CLI command, a
    /// check) keeps its first small table instead of zeroing megabytes it never uses.
    pub(crate) fn wanted(&self, blocks: u64) -> Option<Translations> {
        if self.fills.load(Ordering::Relaxed) < self.blocks.slots.len() as u64 {
            return None;
        }
        let want = usize::try_from(blocks.max(1).next_power_of_two())
            .unwrap_or(usize::MAX)
            .min(self.limit);
        (want > self.blocks.slots.len()).then(|| {
            let mut t = Translations::with_slots(want, self.limit, self.epoch() + 1);
            t.usable = AtomicBool::new(self.usable.load(Ordering::Acquire));
            t
        })
    }

    /// The current epoch, read once per request: slots of another epoch are misses.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Whether lookups may hit (not once the pool is poisoned).
    pub(crate) fn usable(&self) -> bool {
        self.usable.load(Ordering::Acquire)
    }

    /// What the cache says of block `key` of `t`, if it has a current answer.
    pub(crate) fn get(&self, t: Target, key: u64, epoch: u64) -> Option<Entry> {
        let (unit, meta) = self.blocks.get(t, key, epoch)?;
        Some(Entry {
            unit: (unit != HOLE).then_some(unit),
            sum: meta as u32,
            owned: meta & OWNED != 0,
        })
    }

    /// Records the answer for block `key` of `t`. The caller holds the engine lock: the
    /// seqlocks have one writer.
    pub(crate) fn put(&self, t: Target, key: u64, e: Entry) {
        if self.limit == 0 {
            return;
        }
        let owned = if e.owned { OWNED } else { 0 };
        let meta = u64::from(e.sum) | owned;
        let epoch = self.epoch.load(Ordering::Relaxed);
        self.blocks.put(t, key, e.unit.unwrap_or(HOLE), meta, epoch);
        // One writer: a load and a store, not a locked add.
        let fills = self.fills.load(Ordering::Relaxed);
        self.fills.store(fills.saturating_add(1), Ordering::Relaxed);
    }

    /// What the cache says of run `run` (blocks `run << RUN_SHIFT..`) of `t`, if it has a
    /// current answer.
    pub(crate) fn get_run(&self, t: Target, run: u64, epoch: u64) -> Option<RunAnswer> {
        let (unit, meta) = self.runs.get(t, run, epoch)?;
        Some(match (unit, meta & MIXED != 0) {
            (_, true) => RunAnswer::Mixed,
            (HOLE, false) => RunAnswer::Hole,
            (u, false) => RunAnswer::Contiguous(u),
        })
    }

    /// Records the answer for run `run` of `t` (the caller holds the engine lock).
    pub(crate) fn put_run(&self, t: Target, run: u64, a: RunAnswer) {
        if self.limit == 0 {
            return;
        }
        let (unit, meta) = match a {
            RunAnswer::Contiguous(u) => (u, 0),
            RunAnswer::Hole => (HOLE, 0),
            RunAnswer::Mixed => (HOLE, MIXED),
        };
        let epoch = self.epoch.load(Ordering::Relaxed);
        self.runs.put(t, run, unit, meta, epoch);
    }

    /// Forgets every answer (a catalog operation is about to change what they say). The
    /// caller holds the engine lock, and drains the I/O gate after this.
    pub(crate) fn invalidate(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Forgets every answer for good: the pool is poisoned.
    pub(crate) fn disable(&self) {
        self.usable.store(false, Ordering::Release);
        self.invalidate();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped(unit: u64) -> Entry {
        Entry {
            unit: Some(unit),
            sum: 0xDEAD_BEEF,
            owned: true,
        }
    }

    #[test]
    fn an_answer_is_found_for_its_own_target_and_block_only() {
        let t = Translations::new(1 << 12);
        let e = t.epoch();
        t.put(Target::Volume(7), 3, mapped(100));
        assert_eq!(t.get(Target::Volume(7), 3, e), Some(mapped(100)));
        assert_eq!(t.get(Target::Volume(7), 4, e), None);
        assert_eq!(t.get(Target::Snapshot(7), 3, e), None);
        assert_eq!(t.get(Target::Volume(8), 3, e), None);
        assert_eq!(t.get(Target::Volume(7 | 1 << 64), 3, e), None);
        let hole = Entry {
            unit: None,
            sum: 0,
            owned: false,
        };
        t.put(Target::Snapshot(7), 3, hole);
        assert_eq!(t.get(Target::Snapshot(7), 3, e), Some(hole));
    }

    #[test]
    fn consecutive_blocks_of_one_volume_do_not_evict_each_other() {
        let t = Translations::new(1 << 10);
        let e = t.epoch();
        for b in 5000..5000 + 1024 {
            t.put(Target::Volume(42), b, mapped(b));
        }
        for b in 5000..5000 + 1024 {
            assert_eq!(
                t.get(Target::Volume(42), b, e),
                Some(mapped(b)),
                "block {b}"
            );
        }
    }

    #[test]
    fn invalidating_forgets_every_answer_and_disabling_keeps_them_forgotten() {
        let t = Translations::new(1 << 10);
        t.put(Target::Volume(1), 0, mapped(9));
        t.invalidate();
        assert_eq!(t.get(Target::Volume(1), 0, t.epoch()), None);
        t.put(Target::Volume(1), 0, mapped(9));
        assert_eq!(t.get(Target::Volume(1), 0, t.epoch()), Some(mapped(9)));
        t.disable();
        assert!(!t.usable());
        assert_eq!(t.get(Target::Volume(1), 0, t.epoch()), None);
    }

    #[test]
    fn a_grown_table_starts_empty_in_a_later_epoch_and_stops_at_its_limit() {
        let t = Translations::new(1 << 14);
        assert_eq!(t.slots(), INITIAL_SLOTS);
        assert!(t.wanted(100).is_none());
        assert!(t.wanted(5000).is_none(), "grew before it was used");
        for b in 0..INITIAL_SLOTS as u64 {
            t.put(Target::Volume(3), b, mapped(b));
        }
        let g = t.wanted(5000).expect("grows");
        assert_eq!(g.slots(), 8192);
        assert!(g.epoch() > t.epoch());
        for b in 0..8192 {
            g.put(Target::Volume(3), b, mapped(b));
        }
        assert_eq!(g.wanted(1 << 40).expect("grows").slots(), 1 << 14);
        let off = Translations::new(0);
        off.put(Target::Volume(1), 0, mapped(9));
        assert_eq!(off.get(Target::Volume(1), 0, off.epoch()), None);
        assert!(off.wanted(1 << 20).is_none());
    }

    #[test]
    fn readers_never_see_half_of_one_answer_and_half_of_another() {
        // The writer alternates two answers whose fields all differ; readers on other
        // threads must only ever see one or the other (or a miss).
        let t = std::sync::Arc::new(Translations::new(1 << 10));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (t, stop) = (t.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut seen = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(e) = t.get(Target::Volume(5), 77, t.epoch()) {
                            let u = e.unit.expect("mapped");
                            assert_eq!(e.sum, u as u32 ^ 0xFFFF, "torn answer");
                            assert_eq!(e.owned, u % 2 == 0, "torn answer");
                            seen += 1;
                        }
                    }
                    seen
                })
            })
            .collect();
        for i in 0..200_000u64 {
            let u = 1000 + i % 2;
            t.put(
                Target::Volume(5),
                77,
                Entry {
                    unit: Some(u),
                    sum: u as u32 ^ 0xFFFF,
                    owned: u % 2 == 0,
                },
            );
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().expect("reader");
        }
    }
}
