//! A bounded cache of decoded pages for one kind of node, and the record of which pages the
//! open transaction wrote.
//!
//! The cache knows nothing of what its pages hold: it reads a page, has it decoded and
//! verified, keeps it, hands out `&mut` to pages the transaction wrote (dirty), and at a
//! commit seals every dirty page for writing. Whether a page may be changed in place also
//! depends on its reference count, which lives in the space map; see
//! [`crate::pdata::btree::Tree::shadow`].

use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{new_page, Page, PAGE_SIZE, SUPERBLOCK_UNITS};
use crate::unit_hash::{UnitMap, UnitSet};
use std::borrow::Cow;
use std::sync::Arc;

/// What a page cache holds: something decoded from, and encoded into, one page.
pub(crate) trait PageNode: Clone {
    /// What the page is, for errors ("block map node").
    const WHAT: &'static str;
    fn encode(&self, location: u64, generation: u64) -> Box<Page>;
    /// Decodes and verifies the page read from `location`; returns the node and the
    /// generation of the commit that wrote it.
    fn decode(page: &Page, location: u64, total_units: u64) -> Result<(Self, u64)>;
}

struct Cached<N> {
    node: N,
    dirty: bool,
    /// Generation of the commit that wrote (or will write) the page. Pages are never
    /// changed after their transaction commits, so a subtree written at or before
    /// generation g is exactly as it was at g.
    written: u64,
}

pub(crate) struct PageCache<N> {
    dev: Arc<dyn BlockDevice>,
    pages: UnitMap<Cached<N>>,
    /// Pages written in the open transaction (some may have been freed again since).
    dirty: Vec<u64>,
    /// Clean pages kept before the cache is trimmed.
    limit: usize,
    /// Trims so far (varies which half of the clean pages a trim drops).
    trims: u64,
    /// Generation of the open transaction.
    generation: u64,
    /// Pages read from the device so far (tests count them).
    reads: u64,
    /// The last few pages a scan looked at without keeping them (see
    /// [`PageCache::get_passing`]), newest last.
    passing: Vec<(u64, N, u64)>,
    /// Units [`PageCache::get_passing`] read without keeping (2Q's "A1out" ghost list): a
    /// page asked for again after it passed is worth keeping, so the second diff of a pair
    /// fills the cache and the third runs warm. Cleared when it reaches `GHOSTS`.
    ghosts: UnitSet,
    /// The buffer pages are read into before they are decoded (one per cache rather than a
    /// fresh zeroed page per read).
    buf: Box<Page>,
}

/// Bound of [`PageCache::ghosts`] (8 bytes each, against 4 KiB per page kept).
const GHOSTS: usize = 1 << 16;

/// Pages [`PageCache::get_passing`] keeps aside: enough for the two leaves a diff compares
/// and the two before them, which a diff's next key window starts with when they straddle
/// the windows' boundary.
const PASSING: usize = 4;

impl<N: PageNode> PageCache<N> {
    pub(crate) fn new(dev: Arc<dyn BlockDevice>, generation: u64, limit: usize) -> PageCache<N> {
        PageCache {
            dev,
            pages: UnitMap::default(),
            dirty: Vec::new(),
            limit,
            trims: 0,
            generation,
            reads: 0,
            passing: Vec::with_capacity(PASSING),
            ghosts: UnitSet::default(),
            buf: new_page(),
        }
    }

    #[cfg(test)]
    pub(crate) fn dev(&self) -> Arc<dyn BlockDevice> {
        self.dev.clone()
    }

    /// Generation of the open transaction (what its pages are sealed with).
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// The page at `loc`, from the cache or read from the device and verified.
    pub(crate) fn get(&mut self, loc: u64, total_units: u64) -> Result<&N> {
        self.load(loc, total_units).map(|c| &c.node)
    }

    /// The page at `loc` for a long scan: a cached page as it is; a missing one is read and
    /// kept only while the cache has room. One scan over more pages than the cache holds
    /// (listing 100,000 snapshots) then neither pushes out the working set nor pays for
    /// the trims and frees of pages it will not visit again.
    pub(crate) fn get_scanning(&mut self, loc: u64, total_units: u64) -> Result<Cow<'_, N>> {
        if !self.pages.contains_key(&loc) && self.pages.len() >= self.limit + self.dirty.len() {
            return Ok(Cow::Owned(self.read_uncached(loc, total_units)?.0));
        }
        self.get(loc, total_units).map(Cow::Borrowed)
    }

    /// The page at `loc` for a scan that visits it once (a diff's leaves): a cached page as
    /// it is; a missing one is read, verified and kept aside among the last few such pages
    /// instead of in the cache. A page asked for again after it passed is kept.
    ///
    /// Why: a page the cache keeps is fresh heap memory, and in a new process (a CLI call, a
    /// CSI request after a restart) first-touching that memory costs more than reading and
    /// verifying the page (about 1.6 µs against 0.4 µs per 4 KiB page on the benchmark
    /// machine; BENCHMARKS.md, "Cold deltas"). Pages kept aside are dropped as new ones
    /// arrive, so their memory is reused at once.
    pub(crate) fn get_passing(&mut self, loc: u64, total_units: u64) -> Result<&N> {
        if self.pages.contains_key(&loc) {
            return self.get(loc, total_units);
        }
        match self.passing.iter().position(|(l, ..)| *l == loc) {
            Some(i) => {
                let hit = self.passing.remove(i);
                self.passing.push(hit);
            }
            None if self.ghosts.remove(&loc) => return self.get(loc, total_units),
            None => {
                let (node, written) = self.read_uncached(loc, total_units)?;
                if self.ghosts.len() >= GHOSTS {
                    self.ghosts.clear();
                }
                self.ghosts.insert(loc);
                if self.passing.len() >= PASSING {
                    self.passing.remove(0);
                }
                self.passing.push((loc, node, written));
            }
        }
        self.passing
            .last()
            .map(|(_, n, _)| n)
            .ok_or_else(|| Error::corrupt(N::WHAT, loc, "page kept aside went missing"))
    }

    /// The page at `loc` if the cache holds it or [`PageCache::get_passing`] kept it aside.
    pub(crate) fn peek(&self, loc: u64) -> Option<&N> {
        match self.pages.get(&loc) {
            Some(c) => Some(&c.node),
            None => self
                .passing
                .iter()
                .find(|(l, ..)| *l == loc)
                .map(|(_, n, _)| n),
        }
    }

    /// The generation of the commit that wrote page `loc` (the open one for a page written
    /// in this transaction).
    pub(crate) fn written(&mut self, loc: u64, total_units: u64) -> Result<u64> {
        self.load(loc, total_units).map(|c| c.written)
    }

    fn load(&mut self, loc: u64, total_units: u64) -> Result<&Cached<N>> {
        if !self.pages.contains_key(&loc) {
            // A page a scan just passed is taken over rather than read again.
            let (node, written) = match self.passing.iter().position(|(l, ..)| *l == loc) {
                Some(i) => {
                    let (_, node, written) = self.passing.remove(i);
                    (node, written)
                }
                None => self.read_uncached(loc, total_units)?,
            };
            // Dirty pages must stay; only clean ones count against the bound (otherwise a
            // transaction with many dirty pages would trim on every miss).
            if self.pages.len() >= self.limit + self.dirty.len() {
                self.trim();
            }
            self.pages.insert(
                loc,
                Cached {
                    node,
                    dirty: false,
                    written,
                },
            );
        }
        Ok(&self.pages[&loc])
    }

    /// Reads and verifies page `loc` from the device, bypassing the cache.
    pub(crate) fn read_uncached(&mut self, loc: u64, total_units: u64) -> Result<(N, u64)> {
        if loc < SUPERBLOCK_UNITS || loc >= total_units {
            return Err(Error::corrupt(N::WHAT, loc, "location outside the pool"));
        }
        self.dev
            .read_at(&mut self.buf[..], loc * PAGE_SIZE as u64)?;
        self.reads += 1;
        N::decode(&self.buf, loc, total_units)
    }

    /// Drops about half of the clean pages, a different pseudo-random half each time: a
    /// working set somewhat larger than the cache keeps half its hits instead of starting
    /// cold after every trim, and the cost of a trim is spread over the misses that follow.
    fn trim(&mut self) {
        self.trims = self.trims.wrapping_add(1);
        let salt = self.trims.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.pages.retain(|loc, c| {
            c.dirty || ((loc ^ salt).wrapping_mul(0xD6E8_FEB8_6659_FD93) >> 63) == 0
        });
    }

    /// Whether page `loc` was written in the open transaction (and not freed since).
    pub(crate) fn is_dirty(&self, loc: u64) -> bool {
        self.pages.get(&loc).is_some_and(|c| c.dirty)
    }

    /// The page the transaction wrote at `loc`, to change in place. `None` for a page that
    /// is not dirty (a caller's bug: it must shadow first).
    pub(crate) fn get_mut(&mut self, loc: u64) -> Option<&mut N> {
        self.pages
            .get_mut(&loc)
            .filter(|c| c.dirty)
            .map(|c| &mut c.node)
    }

    /// Places a new page at `loc`, a unit the caller just allocated; it is dirty.
    pub(crate) fn insert_new(&mut self, loc: u64, node: N) {
        // A page kept aside at this unit is the freed page's old contents.
        self.passing.retain(|(l, ..)| *l != loc);
        let written = self.generation;
        self.pages.insert(
            loc,
            Cached {
                node,
                dirty: true,
                written,
            },
        );
        self.dirty.push(loc);
    }

    /// Forgets page `loc` (its unit was freed).
    pub(crate) fn forget(&mut self, loc: u64) {
        self.pages.remove(&loc);
        self.passing.retain(|(l, ..)| *l != loc);
    }

    /// Forgets every clean page (tests use it to start cold).
    #[cfg(test)]
    pub(crate) fn drop_clean(&mut self) {
        self.pages.retain(|_, c| c.dirty);
        self.passing.clear();
    }

    #[cfg(test)]
    pub(crate) fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.pages.len()
    }

    #[cfg(test)]
    pub(crate) fn reads(&self) -> u64 {
        self.reads
    }

    /// Dirty pages that are still alive (drives the automatic commit).
    pub(crate) fn dirty_count(&self) -> usize {
        self.dirty.len()
    }

    /// Sealed images of every page written in this transaction and still alive.
    pub(crate) fn sealed_dirty(&self) -> Vec<(u64, Box<Page>)> {
        self.dirty
            .iter()
            .filter_map(|loc| {
                let c = self.pages.get(loc)?;
                c.dirty
                    .then(|| (*loc, c.node.encode(*loc, self.generation)))
            })
            .collect()
    }

    /// The commit is durable: every page is clean, the next transaction begins.
    pub(crate) fn commit_done(&mut self) {
        for loc in std::mem::take(&mut self.dirty) {
            if let Some(c) = self.pages.get_mut(&loc) {
                c.dirty = false;
            }
        }
        self.generation += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemoryDevice;
    use crate::pdata::btree::tests::Numbers;
    use crate::pdata::node::Node;

    fn leaf(v: u64) -> Node<Numbers> {
        Node::Leaf(vec![(1, v)])
    }

    fn value(n: &Node<Numbers>) -> u64 {
        match n {
            Node::Leaf(v) => v[0].1,
            Node::Branch(_) => unreachable!(),
        }
    }

    /// A page kept aside by a scan is the unit's old contents once the unit is freed and
    /// written again: it must never be handed out after that, even when the cache later
    /// drops the new page and reads again.
    #[test]
    fn a_page_kept_aside_never_outlives_a_rewrite_of_its_unit() {
        let dev = Arc::new(MemoryDevice::new(64 * 4096));
        for loc in 2..64u64 {
            dev.write_at(&leaf(loc).encode(loc, 1)[..], loc * 4096)
                .unwrap();
        }
        let mut c: PageCache<Node<Numbers>> = PageCache::new(dev.clone(), 2, 4);
        assert_eq!(value(c.get_passing(10, 64).unwrap()), 10);
        assert!(c.peek(10).is_some());
        // Unit 10 is freed and reused for a new page, which is then written and committed.
        c.forget(10);
        c.insert_new(10, leaf(1000));
        dev.write_at(&leaf(1000).encode(10, 2)[..], 10 * 4096)
            .unwrap();
        c.commit_done();
        // Push the new page out of the cache (the limit is 4 clean pages).
        let mut loc = 20;
        while c.pages.contains_key(&10) {
            c.get(loc, 64).unwrap();
            loc += 1;
        }
        assert_eq!(value(c.get_passing(10, 64).unwrap()), 1000);
        assert_eq!(value(c.get(10, 64).unwrap()), 1000);
        // Without a forget (a unit written straight away), the same holds.
        c.get_passing(30, 64).unwrap();
        c.insert_new(30, leaf(3000));
        assert_eq!(value(c.get_passing(30, 64).unwrap()), 3000);
        assert!(c.passing.iter().all(|(l, ..)| *l != 30));
    }

    /// A page passed once and asked for again is kept; one asked for by the cache's own
    /// path while kept aside is taken over, not read again.
    #[test]
    fn a_page_asked_for_twice_is_kept_and_never_read_twice() {
        let dev = Arc::new(MemoryDevice::new(64 * 4096));
        for loc in 2..64u64 {
            dev.write_at(&leaf(loc).encode(loc, 1)[..], loc * 4096)
                .unwrap();
        }
        let mut c: PageCache<Node<Numbers>> = PageCache::new(dev, 2, 1000);
        c.get_passing(5, 64).unwrap();
        assert_eq!((c.reads(), c.len()), (1, 0));
        // Kept aside: a second look reads nothing.
        c.get_passing(5, 64).unwrap();
        assert_eq!((c.reads(), c.len()), (1, 0));
        // Pushed out of the few kept aside, then asked for again: read and kept.
        for loc in 6..6 + PASSING as u64 {
            c.get_passing(loc, 64).unwrap();
        }
        assert!(c.peek(5).is_none());
        c.get_passing(5, 64).unwrap();
        assert_eq!(c.len(), 1);
        // The cache's own path takes over a page kept aside.
        let reads = c.reads();
        assert!(c.peek(9).is_some() && !c.pages.contains_key(&9));
        assert_eq!(value(c.get(9, 64).unwrap()), 9);
        assert_eq!(c.reads(), reads);
    }
}
