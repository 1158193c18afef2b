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
use crate::unit_hash::UnitMap;
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
}

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

    /// The generation of the commit that wrote page `loc` (the open one for a page written
    /// in this transaction).
    pub(crate) fn written(&mut self, loc: u64, total_units: u64) -> Result<u64> {
        self.load(loc, total_units).map(|c| c.written)
    }

    fn load(&mut self, loc: u64, total_units: u64) -> Result<&Cached<N>> {
        if !self.pages.contains_key(&loc) {
            let (node, written) = self.read_uncached(loc, total_units)?;
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
        let mut page = new_page();
        self.dev.read_at(&mut page[..], loc * PAGE_SIZE as u64)?;
        self.reads += 1;
        N::decode(&page, loc, total_units)
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
    }

    /// Forgets every clean page (tests use it to start cold).
    #[cfg(test)]
    pub(crate) fn drop_clean(&mut self) {
        self.pages.retain(|_, c| c.dirty);
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
