//! The space map: one reference count per 4 KiB unit of the device.
//!
//! A count of 0 is free; [`CONT`] marks the tail units of a multi-unit data block (its count
//! lives on the first unit); anything else is the number of references (catalog entries,
//! parent nodes or leaf entries) to the page or block starting there.
//!
//! The counts live in leaf pages of 1016 entries, found through a radix of index pages whose
//! root the superblock names. Leaves that are all free are not materialized (index entry 0),
//! so creating a pool writes a handful of pages whatever its size. Leaves load lazily.
//!
//! Invariant 2 (a block freed in a transaction is reused only after that transaction's commit
//! is durable) is enforced here, one commit more strictly than it asks: units freed in
//! transaction N stay out of reach (`freed`, then `cooling`) until commit N+1 is durable, so
//! the pages of *both* superblocks' states stay intact and the fallback to the older
//! superblock always finds a whole tree.

use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{self, new_page, Page, PageKind, HEADER_LEN, PAGE_SIZE, SUPERBLOCK_UNITS};
use crate::unit_hash::UnitSet;
use std::sync::Arc;

/// Counts per space map leaf page.
pub(crate) const LEAF_ENTRIES: u64 = ((PAGE_SIZE - HEADER_LEN) / 4) as u64;
/// Child pointers per space map index page.
pub(crate) const INDEX_ENTRIES: u64 = ((PAGE_SIZE - HEADER_LEN) / 8) as u64;
/// Marks the tail units of a multi-unit data block.
pub(crate) const CONT: u32 = u32::MAX;
/// Loaded clean leaves kept in memory before eviction (32 MiB of counts).
const LEAF_CACHE: usize = 8192;

struct Leaf {
    loc: u64,
    counts: Option<Box<[u32]>>,
    dirty: bool,
    relocated: bool,
    /// Free units, once known (a leaf that was never materialized is all free).
    free: Option<u32>,
}

#[derive(Clone)]
struct IndexPage {
    loc: u64,
    dirty: bool,
    relocated: bool,
}

/// Whether an allocation may dip into the reserve kept for deletes and commits.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Reserve {
    Keep,
    Use,
}

pub(crate) struct SpaceMap {
    dev: Arc<dyn BlockDevice>,
    total_units: u64,
    leaves: Vec<Leaf>,
    /// levels[0] indexes leaves, the last level is the single root page.
    levels: Vec<Vec<IndexPage>>,
    dirty_leaves: Vec<usize>,
    loaded: usize,
    freed: UnitSet,
    /// Units freed by the last commit: the older superblock may still reference them.
    cooling: UnitSet,
    used: u64,
    /// Where the next search starts: [metadata, data]. Data starts further in, so data
    /// blocks written together stay physically contiguous (one device I/O for a run)
    /// instead of being interleaved with map pages.
    cursors: [u64; 2],
    reserve: u64,
}

fn level_sizes(leaves: u64) -> Vec<u64> {
    let mut v = vec![leaves.div_ceil(INDEX_ENTRIES).max(1)];
    while *v.last().unwrap() > 1 {
        v.push(v.last().unwrap().div_ceil(INDEX_ENTRIES));
    }
    v
}

fn initial_cursors(total_units: u64) -> [u64; 2] {
    [SUPERBLOCK_UNITS, (total_units / 16).max(SUPERBLOCK_UNITS)]
}

/// Units held back from ordinary allocations so deletes and commits work on a full pool.
pub(crate) fn reserve_for(total_units: u64) -> u64 {
    (total_units / 32).clamp(48, 16384)
}

impl SpaceMap {
    /// A space map for a fresh pool: only the superblock units are in use.
    pub(crate) fn create(dev: Arc<dyn BlockDevice>, total_units: u64) -> SpaceMap {
        let nleaves = total_units.div_ceil(LEAF_ENTRIES);
        let levels = level_sizes(nleaves)
            .into_iter()
            .map(|n| {
                vec![
                    IndexPage {
                        loc: 0,
                        dirty: true,
                        relocated: false
                    };
                    n as usize
                ]
            })
            .collect();
        let mut sm = SpaceMap {
            dev,
            total_units,
            leaves: (0..nleaves)
                .map(|_| Leaf {
                    loc: 0,
                    counts: None,
                    dirty: false,
                    relocated: false,
                    free: None,
                })
                .collect(),
            levels,
            dirty_leaves: Vec::new(),
            loaded: 0,
            freed: UnitSet::default(),
            cooling: UnitSet::default(),
            used: 0,
            cursors: initial_cursors(total_units),
            reserve: reserve_for(total_units),
        };
        for u in 0..SUPERBLOCK_UNITS {
            sm.set(u, 1).expect("leaf 0 of a new map is in memory");
        }
        sm.used = SUPERBLOCK_UNITS;
        sm
    }

    /// Loads the index pages (about one page per 2 GiB of pool); leaves load on demand.
    pub(crate) fn open(
        dev: Arc<dyn BlockDevice>,
        total_units: u64,
        used: u64,
        root: u64,
        height: u32,
    ) -> Result<SpaceMap> {
        let nleaves = total_units.div_ceil(LEAF_ENTRIES);
        let sizes = level_sizes(nleaves);
        if sizes.len() != height as usize {
            return Err(Error::corrupt(
                "superblock",
                0,
                format!("space map height {height}, expected {}", sizes.len()),
            ));
        }
        let mut levels: Vec<Vec<IndexPage>> = Vec::with_capacity(sizes.len());
        let mut leaves = Vec::with_capacity(nleaves as usize);
        // Walk top-down: each level's locations come from the pages of the level above.
        let mut locs = vec![root];
        for lvl in (0..sizes.len()).rev() {
            let child_count = if lvl == 0 { nleaves } else { sizes[lvl - 1] };
            let mut next = Vec::with_capacity(child_count as usize);
            for (i, &loc) in locs.iter().enumerate() {
                let page = read_page(&*dev, loc, total_units, PageKind::SpaceIndex)?;
                let first = i as u64 * INDEX_ENTRIES;
                let n = INDEX_ENTRIES.min(child_count - first);
                for k in 0..n {
                    let child = format::get_u64(&page[..], HEADER_LEN + 8 * k as usize);
                    let absent_ok = lvl == 0;
                    if (child == 0 && !absent_ok)
                        || (child != 0 && !(SUPERBLOCK_UNITS..total_units).contains(&child))
                    {
                        return Err(Error::corrupt(
                            "space map index",
                            loc,
                            format!("entry {k} points at {child}"),
                        ));
                    }
                    next.push(child);
                }
            }
            levels.push(
                locs.iter()
                    .map(|&loc| IndexPage {
                        loc,
                        dirty: false,
                        relocated: false,
                    })
                    .collect(),
            );
            if lvl == 0 {
                leaves = next
                    .into_iter()
                    .map(|loc| Leaf {
                        loc,
                        counts: None,
                        dirty: false,
                        relocated: false,
                        free: None,
                    })
                    .collect();
            } else {
                locs = next;
            }
        }
        levels.reverse();
        Ok(SpaceMap {
            dev,
            total_units,
            leaves,
            levels,
            dirty_leaves: Vec::new(),
            loaded: 0,
            freed: UnitSet::default(),
            cooling: UnitSet::default(),
            used,
            cursors: initial_cursors(total_units),
            reserve: reserve_for(total_units),
        })
    }

    pub(crate) fn total_units(&self) -> u64 {
        self.total_units
    }

    /// Extends the map to `new_total` units; the new units are free. Every index page is
    /// marked dirty, so the next commit writes the new child lists (and a taller radix when
    /// the pool crossed a level) at fresh locations like any other change.
    pub(crate) fn grow(&mut self, new_total: u64) {
        let old_total = self.total_units;
        if new_total <= old_total {
            return;
        }
        // The old last leaf may gain units; they were never used, so they are free.
        let base = (self.leaves.len() as u64).saturating_sub(1) * LEAF_ENTRIES;
        if let Some(last) = self.leaves.last_mut() {
            let old_valid = (old_total - base).min(LEAF_ENTRIES);
            let new_valid = (new_total - base).min(LEAF_ENTRIES);
            if let Some(f) = last.free.as_mut() {
                *f += (new_valid - old_valid) as u32;
            }
        }
        let nleaves = new_total.div_ceil(LEAF_ENTRIES);
        while (self.leaves.len() as u64) < nleaves {
            self.leaves.push(Leaf {
                loc: 0,
                counts: None,
                dirty: false,
                relocated: false,
                free: None,
            });
        }
        let fresh = IndexPage {
            loc: 0,
            dirty: true,
            relocated: false,
        };
        for (lvl, n) in level_sizes(nleaves).into_iter().enumerate() {
            if lvl == self.levels.len() {
                self.levels.push(Vec::new());
            }
            self.levels[lvl].resize(n as usize, fresh.clone());
        }
        for p in self.levels.iter_mut().flatten() {
            p.dirty = true;
        }
        self.total_units = new_total;
        self.reserve = reserve_for(new_total);
    }

    pub(crate) fn used_units(&self) -> u64 {
        self.used
    }

    /// Units an ordinary allocation may still take (excludes the reserve and units freed in
    /// this transaction, which are not reusable yet).
    pub(crate) fn usable_units(&self) -> u64 {
        self.total_units
            .saturating_sub(self.used + self.held() + self.reserve)
    }

    /// Units free or freed (what `used` does not count).
    pub(crate) fn free_units(&self) -> u64 {
        self.total_units - self.used
    }

    pub(crate) fn root(&self) -> u64 {
        self.levels.last().unwrap()[0].loc
    }

    pub(crate) fn height(&self) -> u32 {
        self.levels.len() as u32
    }

    /// Locations of every space map page (index and materialized leaves), for `check`.
    pub(crate) fn own_pages(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.levels.iter().flatten().map(|p| p.loc).collect();
        v.extend(self.leaves.iter().map(|l| l.loc).filter(|&l| l != 0));
        v
    }

    fn leaf(&mut self, unit: u64) -> Result<&mut Leaf> {
        if unit >= self.total_units {
            return Err(Error::corrupt(
                "block reference",
                unit,
                format!(
                    "unit {unit} is beyond the pool ({} units)",
                    self.total_units
                ),
            ));
        }
        let i = (unit / LEAF_ENTRIES) as usize;
        if self.leaves[i].counts.is_none() {
            let counts: Box<[u32]> = if self.leaves[i].loc == 0 {
                vec![0u32; LEAF_ENTRIES as usize].into()
            } else {
                let loc = self.leaves[i].loc;
                let page = read_page(&*self.dev, loc, self.total_units, PageKind::SpaceLeaf)?;
                (0..LEAF_ENTRIES as usize)
                    .map(|k| format::get_u32(&page[..], HEADER_LEN + 4 * k))
                    .collect()
            };
            let base = i as u64 * LEAF_ENTRIES;
            let valid = (self.total_units - base).min(LEAF_ENTRIES) as usize;
            let free = counts[..valid].iter().filter(|&&c| c == 0).count() as u32;
            let leaf = &mut self.leaves[i];
            leaf.counts = Some(counts);
            leaf.free = Some(free);
            self.loaded += 1;
        }
        Ok(&mut self.leaves[i])
    }

    /// The first unit at or after `from` that is in use, reading only the leaves that were
    /// ever materialized (a leaf never written is all free).
    pub(crate) fn first_used_from(&mut self, from: u64) -> Result<Option<u64>> {
        let mut unit = from;
        while unit < self.total_units {
            let i = (unit / LEAF_ENTRIES) as usize;
            let leaf_end = ((i as u64 + 1) * LEAF_ENTRIES).min(self.total_units);
            if self.leaves[i].loc != 0 || self.leaves[i].counts.is_some() {
                let base = i as u64 * LEAF_ENTRIES;
                let counts = self.leaf(unit)?.counts.as_ref().expect("loaded by leaf()");
                let lo = (unit - base) as usize;
                let hi = (leaf_end - base) as usize;
                if let Some(k) = counts[lo..hi].iter().position(|&c| c != 0) {
                    return Ok(Some(unit + k as u64));
                }
            }
            unit = leaf_end;
        }
        Ok(None)
    }

    /// The raw count of a unit (0 free, [`CONT`] tail of a data block).
    pub(crate) fn get(&mut self, unit: u64) -> Result<u32> {
        // Fast path: the leaf is loaded (the common case on every I/O).
        if unit < self.total_units {
            let i = (unit / LEAF_ENTRIES) as usize;
            if let Some(counts) = &self.leaves[i].counts {
                return Ok(counts[(unit % LEAF_ENTRIES) as usize]);
            }
        }
        let leaf = self.leaf(unit)?;
        Ok(leaf.counts.as_ref().unwrap()[(unit % LEAF_ENTRIES) as usize])
    }

    fn set(&mut self, unit: u64, value: u32) -> Result<()> {
        let i = (unit / LEAF_ENTRIES) as usize;
        let leaf = self.leaf(unit)?;
        let slot = &mut leaf.counts.as_mut().unwrap()[(unit % LEAF_ENTRIES) as usize];
        let old = *slot;
        *slot = value;
        if let Some(f) = leaf.free.as_mut() {
            match (old == 0, value == 0) {
                (true, false) => *f -= 1,
                (false, true) => *f += 1,
                _ => {}
            }
        }
        if !leaf.dirty {
            leaf.dirty = true;
            self.dirty_leaves.push(i);
        }
        Ok(())
    }

    fn free_here(&mut self, unit: u64, n: u64) -> Result<bool> {
        for u in unit..unit + n {
            if u >= self.total_units
                || self.freed.contains(&u)
                || self.cooling.contains(&u)
                || self.get(u)? != 0
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Allocates one unit for a metadata page, with count 1.
    pub(crate) fn alloc_page(&mut self, reserve: Reserve, op: &'static str) -> Result<u64> {
        self.alloc_from(0, 1, reserve, op)
    }

    /// Allocates an aligned run of `n` units (a power of two) for a data block, count 1.
    pub(crate) fn alloc(&mut self, n: u64, reserve: Reserve, op: &'static str) -> Result<u64> {
        self.alloc_from(1, n, reserve, op)
    }

    fn alloc_from(
        &mut self,
        cursor: usize,
        n: u64,
        reserve: Reserve,
        op: &'static str,
    ) -> Result<u64> {
        let usable = match reserve {
            Reserve::Keep => self.usable_units(),
            Reserve::Use => self.total_units.saturating_sub(self.used + self.held()),
        };
        if usable < n {
            return Err(Error::NoSpace {
                op,
                needed: n * crate::format::PAGE_SIZE as u64,
                free: usable * crate::format::PAGE_SIZE as u64,
            });
        }
        let start = self.cursors[cursor].next_multiple_of(n);
        let found = match self.scan(start, self.total_units, n)? {
            Some(u) => Some(u),
            None => self.scan(SUPERBLOCK_UNITS.next_multiple_of(n), start, n)?,
        };
        let Some(u) = found else {
            return Err(Error::NoSpace {
                op,
                needed: n * crate::format::PAGE_SIZE as u64,
                free: usable * crate::format::PAGE_SIZE as u64,
            });
        };
        self.set(u, 1)?;
        for t in u + 1..u + n {
            self.set(t, CONT)?;
        }
        self.used += n;
        self.cursors[cursor] = u + n;
        Ok(u)
    }

    fn scan(&mut self, from: u64, to: u64, n: u64) -> Result<Option<u64>> {
        let mut u = from;
        while u + n <= to.min(self.total_units) {
            let li = (u / LEAF_ENTRIES) as usize;
            let known_full = self.leaves[li].free == Some(0);
            if known_full {
                u = ((li as u64 + 1) * LEAF_ENTRIES).next_multiple_of(n);
                continue;
            }
            if self.free_here(u, n)? {
                return Ok(Some(u));
            }
            u += n;
        }
        Ok(None)
    }

    /// Adds a reference to the page or block starting at `unit`.
    pub(crate) fn inc(&mut self, unit: u64) -> Result<()> {
        let c = self.get(unit)?;
        if c == 0 || c == CONT || c == CONT - 1 {
            return Err(Error::corrupt(
                "space map",
                unit,
                format!("cannot add a reference to unit {unit} with count {c:#x}"),
            ));
        }
        self.set(unit, c + 1)
    }

    /// Drops a reference to the `n`-unit page or block at `unit`; returns the new count.
    /// At zero the units are free, but reusable only after the commit.
    pub(crate) fn dec(&mut self, unit: u64, n: u64) -> Result<u32> {
        let c = self.get(unit)?;
        if c == 0 || c == CONT {
            return Err(Error::corrupt(
                "space map",
                unit,
                format!("cannot drop a reference to unit {unit} with count {c:#x}"),
            ));
        }
        if c > 1 {
            self.set(unit, c - 1)?;
            return Ok(c - 1);
        }
        for u in unit..unit + n {
            if u > unit && self.get(u)? != CONT {
                return Err(Error::corrupt(
                    "space map",
                    u,
                    "data block tail is not marked as part of its block",
                ));
            }
            self.set(u, 0)?;
            self.freed.insert(u);
        }
        self.used -= n;
        Ok(0)
    }

    /// Units freed by the last commit, allocatable after the next one.
    pub(crate) fn cooling_units(&self) -> usize {
        self.cooling.len()
    }

    /// Free units not yet allocatable (freed by this transaction or the last commit).
    fn held(&self) -> u64 {
        (self.freed.len() + self.cooling.len()) as u64
    }

    /// Gives every dirty space map page a fresh location (copy-on-write: the committed pages
    /// are never overwritten) and returns the sealed pages to write. Relocating takes units,
    /// which dirties more counts, so it repeats until nothing new is dirty.
    pub(crate) fn prepare_commit(&mut self, generation: u64) -> Result<Vec<(u64, Box<Page>)>> {
        loop {
            let mut moved = false;
            let mut k = 0;
            while k < self.dirty_leaves.len() {
                let i = self.dirty_leaves[k];
                k += 1;
                if self.leaves[i].relocated {
                    continue;
                }
                self.leaves[i].relocated = true;
                let new = self.alloc_page(Reserve::Use, "commit")?;
                let old = std::mem::replace(&mut self.leaves[i].loc, new);
                if old != 0 {
                    self.dec(old, 1)?;
                }
                self.mark_index(0, i as u64 / INDEX_ENTRIES);
                moved = true;
            }
            for lvl in 0..self.levels.len() {
                for p in 0..self.levels[lvl].len() {
                    let page = &self.levels[lvl][p];
                    if !page.dirty || page.relocated {
                        continue;
                    }
                    self.levels[lvl][p].relocated = true;
                    let new = self.alloc_page(Reserve::Use, "commit")?;
                    let old = std::mem::replace(&mut self.levels[lvl][p].loc, new);
                    if old != 0 {
                        self.dec(old, 1)?;
                    }
                    if lvl + 1 < self.levels.len() {
                        self.mark_index(lvl + 1, p as u64 / INDEX_ENTRIES);
                    }
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
        let mut out = Vec::new();
        for &i in &self.dirty_leaves {
            let leaf = &self.leaves[i];
            let mut page = new_page();
            for (k, c) in leaf.counts.as_ref().unwrap().iter().enumerate() {
                format::put_u32(&mut page[..], HEADER_LEN + 4 * k, *c);
            }
            format::seal(&mut page, PageKind::SpaceLeaf, leaf.loc, generation);
            out.push((leaf.loc, page));
        }
        for lvl in 0..self.levels.len() {
            for p in 0..self.levels[lvl].len() {
                if !self.levels[lvl][p].dirty {
                    continue;
                }
                let mut page = new_page();
                let first = p * INDEX_ENTRIES as usize;
                let children: Vec<u64> = if lvl == 0 {
                    self.leaves
                        .iter()
                        .skip(first)
                        .take(INDEX_ENTRIES as usize)
                        .map(|l| l.loc)
                        .collect()
                } else {
                    self.levels[lvl - 1]
                        .iter()
                        .skip(first)
                        .take(INDEX_ENTRIES as usize)
                        .map(|c| c.loc)
                        .collect()
                };
                for (k, c) in children.iter().enumerate() {
                    format::put_u64(&mut page[..], HEADER_LEN + 8 * k, *c);
                }
                let loc = self.levels[lvl][p].loc;
                format::seal(&mut page, PageKind::SpaceIndex, loc, generation);
                out.push((loc, page));
            }
        }
        Ok(out)
    }

    fn mark_index(&mut self, lvl: usize, page: u64) {
        self.levels[lvl][page as usize].dirty = true;
    }

    /// The commit is durable: nothing is dirty any more, this transaction's freed units start
    /// cooling, and the ones freed by the previous commit are returned: allocatable, and
    /// handed back to the caller to discard on the device.
    pub(crate) fn commit_done(&mut self) -> Vec<u64> {
        for &i in &self.dirty_leaves {
            self.leaves[i].dirty = false;
            self.leaves[i].relocated = false;
        }
        self.dirty_leaves.clear();
        for p in self.levels.iter_mut().flatten() {
            p.dirty = false;
            p.relocated = false;
        }
        let released = std::mem::replace(&mut self.cooling, std::mem::take(&mut self.freed));
        if self.loaded > LEAF_CACHE {
            for leaf in &mut self.leaves {
                if leaf.counts.is_some() {
                    leaf.counts = None;
                }
            }
            self.loaded = 0;
        }
        released.into_iter().collect()
    }

    /// Number of dirty space map leaves (part of the auto-commit bound).
    pub(crate) fn dirty_pages(&self) -> usize {
        self.dirty_leaves.len()
    }
}

fn read_page(dev: &dyn BlockDevice, loc: u64, total: u64, kind: PageKind) -> Result<Box<Page>> {
    if !(SUPERBLOCK_UNITS..total).contains(&loc) {
        return Err(Error::corrupt(
            kind.name(),
            loc,
            "location outside the pool",
        ));
    }
    let mut page = new_page();
    dev.read_at(&mut page[..], loc * PAGE_SIZE as u64)?;
    format::verify(&page, &[kind], loc)?;
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemoryDevice;

    fn commit(sm: &mut SpaceMap, dev: &MemoryDevice, gen: u64) {
        for (loc, page) in sm.prepare_commit(gen).unwrap() {
            dev.write_at(&page[..], loc * PAGE_SIZE as u64).unwrap();
        }
        sm.commit_done();
    }

    #[test]
    fn alloc_inc_dec_and_reuse_only_after_commit() {
        let dev = Arc::new(MemoryDevice::new(4096 * 4096));
        let mut sm = SpaceMap::create(dev.clone(), 4096);
        let a = sm.alloc(1, Reserve::Keep, "t").unwrap();
        let b = sm.alloc(4, Reserve::Keep, "t").unwrap();
        assert_eq!(b % 4, 0, "data blocks are aligned");
        assert_eq!(sm.get(b + 1).unwrap(), CONT);
        sm.inc(a).unwrap();
        assert_eq!(sm.dec(a, 1).unwrap(), 1);
        assert_eq!(sm.dec(a, 1).unwrap(), 0);
        assert_eq!(sm.dec(b, 4).unwrap(), 0);
        assert!(sm.dec(a, 1).is_err(), "double free is caught");
        // Freed units are not handed out again before the next commit is durable.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100 {
            let u = sm.alloc(1, Reserve::Keep, "t").unwrap();
            assert!(u != a && !(b..b + 4).contains(&u));
            seen.insert(u);
        }
        commit(&mut sm, &dev, 1);
        for _ in 0..100 {
            let u = sm.alloc(1, Reserve::Keep, "t").unwrap();
            assert!(
                u != a && !(b..b + 4).contains(&u),
                "still cooling after one commit"
            );
        }
        commit(&mut sm, &dev, 2);
        let used = sm.used_units();
        let reopened = SpaceMap::open(dev.clone(), 4096, used, sm.root(), sm.height());
        let mut re = reopened.unwrap();
        for u in &seen {
            assert_eq!(re.get(*u).unwrap(), 1);
        }
        assert_eq!(re.get(a).unwrap(), 0);
        let mut again = false;
        for _ in 0..5000 {
            match sm.alloc(1, Reserve::Use, "t") {
                Ok(u) => again |= u == a,
                Err(_) => break,
            }
        }
        assert!(again, "a unit is reusable after two commits");
    }

    #[test]
    fn reserve_is_kept_from_ordinary_allocations() {
        let dev = Arc::new(MemoryDevice::new(256 * 4096));
        let mut sm = SpaceMap::create(dev, 256);
        let mut n = 0;
        while sm.alloc(1, Reserve::Keep, "t").is_ok() {
            n += 1;
        }
        assert_eq!(n, 256 - 2 - reserve_for(256));
        assert!(matches!(
            sm.alloc(1, Reserve::Keep, "t"),
            Err(Error::NoSpace { .. })
        ));
        assert!(sm.alloc(1, Reserve::Use, "t").is_ok());
    }

    #[test]
    fn multi_level_index_round_trips() {
        // Enough units for two index levels.
        let total = LEAF_ENTRIES * INDEX_ENTRIES + 10;
        let dev = Arc::new(MemoryDevice::new(total * 4096));
        let mut sm = SpaceMap::create(dev.clone(), total);
        assert_eq!(sm.height(), 2);
        sm.cursors[1] = total - 5;
        let u = sm.alloc(1, Reserve::Keep, "t").unwrap();
        assert!(u >= total - 5);
        commit(&mut sm, &dev, 1);
        let mut re = SpaceMap::open(dev, total, sm.used_units(), sm.root(), 2).unwrap();
        assert_eq!(re.get(u).unwrap(), 1);
        assert_eq!(re.get(u - 1).unwrap(), 0);
    }
}
