//! The page store of one open transaction: the node cache, the space map and the rules for
//! changing a page that the last commit (or another tree) may still reference.
//!
//! A node is *owned* by the open transaction when it was allocated in it (dirty) and nothing
//! else references it (count 1): only then is it changed in place. Everything else is
//! shadowed first: copied to a new unit, which is what keeps invariant 1 (committed metadata is
//! never overwritten) and makes snapshots and clones O(1) (Rodeh's refcounted CoW B-trees).

use crate::btree::node::Node;
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{new_page, PAGE_SIZE};
use crate::space::{Reserve, SpaceMap};
use crate::unit_hash::UnitMap;
use std::sync::Arc;

struct Cached {
    node: Node,
    dirty: bool,
    /// Generation of the commit that wrote (or will write) the node. Nodes are never changed
    /// after their transaction commits, so a subtree written at or before generation g is
    /// exactly as it was at g.
    written: u64,
}

/// Clean nodes kept in memory before the cache is trimmed (64 MiB of pages).
const NODE_CACHE: usize = 16384;

pub(crate) struct Store {
    pub(crate) dev: Arc<dyn BlockDevice>,
    pub(crate) sm: SpaceMap,
    nodes: UnitMap<Cached>,
    dirty: Vec<u64>,
    /// Cache trims so far (varies which half of the clean nodes a trim drops).
    trims: u64,
    /// Clean nodes kept before a trim (`NODE_CACHE`; small in tests).
    cache_limit: usize,
    /// Generation of the open transaction (the last commit's + 1).
    pub(crate) generation: u64,
    pub(crate) block_size: usize,
    pub(crate) block_units: u64,
    /// Whether allocations may use the reserve (deletes and commits may; writes may not).
    pub(crate) reserve: Reserve,
    /// The leaf the last insert went to (an owned leaf; see `Store::insert_at_hint`).
    pub(crate) insert_hint: Option<crate::btree::InsertHint>,
}

impl Store {
    pub(crate) fn new(
        dev: Arc<dyn BlockDevice>,
        sm: SpaceMap,
        generation: u64,
        block_size: usize,
    ) -> Store {
        Store {
            dev,
            sm,
            nodes: UnitMap::default(),
            dirty: Vec::new(),
            trims: 0,
            cache_limit: NODE_CACHE,
            generation,
            block_size,
            block_units: (block_size / PAGE_SIZE) as u64,
            reserve: Reserve::Keep,
            insert_hint: None,
        }
    }

    /// Reads a node, from the cache or the device (validated).
    pub(crate) fn node(&mut self, loc: u64) -> Result<&Node> {
        self.cached(loc).map(|c| &c.node)
    }

    /// The generation of the commit that wrote node `loc` (the open one for a node written
    /// in this transaction).
    pub(crate) fn node_written(&mut self, loc: u64) -> Result<u64> {
        self.cached(loc).map(|c| c.written)
    }

    fn cached(&mut self, loc: u64) -> Result<&Cached> {
        if !self.nodes.contains_key(&loc) {
            let (node, written) = self.read_node_written(loc)?;
            // Dirty nodes must stay; only clean ones count against the bound (otherwise a
            // transaction with many dirty nodes would trim on every miss).
            if self.nodes.len() >= self.cache_limit + self.dirty.len() {
                self.trim_cache();
            }
            self.nodes.insert(
                loc,
                Cached {
                    node,
                    dirty: false,
                    written,
                },
            );
        }
        Ok(&self.nodes[&loc])
    }

    /// Reads a node from the device, bypassing the cache.
    pub(crate) fn read_node(&self, loc: u64) -> Result<Node> {
        self.read_node_written(loc).map(|(node, _)| node)
    }

    fn read_node_written(&self, loc: u64) -> Result<(Node, u64)> {
        let total = self.sm.total_units();
        if loc < crate::format::SUPERBLOCK_UNITS || loc >= total {
            return Err(Error::corrupt(
                "block map node",
                loc,
                "location outside the pool",
            ));
        }
        let mut page = new_page();
        self.dev.read_at(&mut page[..], loc * PAGE_SIZE as u64)?;
        Node::decode(&page, loc, total)
    }

    /// Drops about half of the clean nodes, a different pseudo-random half each time: a
    /// working set somewhat larger than the cache keeps half its hits instead of starting
    /// cold after every trim, and the cost of a trim is spread over the misses that follow.
    fn trim_cache(&mut self) {
        self.trims = self.trims.wrapping_add(1);
        let salt = self.trims.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.nodes.retain(|loc, c| {
            c.dirty || ((loc ^ salt).wrapping_mul(0xD6E8_FEB8_6659_FD93) >> 63) == 0
        });
    }

    pub(crate) fn node_mut(&mut self, loc: u64) -> &mut Node {
        let c = self.nodes.get_mut(&loc).expect("owned nodes stay cached");
        debug_assert!(c.dirty);
        &mut c.node
    }

    /// Allocates a unit for a new node, owned by the open transaction.
    pub(crate) fn alloc_node(&mut self, node: Node) -> Result<u64> {
        let loc = self.sm.alloc_page(self.reserve, "block map update")?;
        let written = self.generation;
        self.nodes.insert(
            loc,
            Cached {
                node,
                dirty: true,
                written,
            },
        );
        self.dirty.push(loc);
        Ok(loc)
    }

    /// Returns a location where `loc`'s node may be changed in place: `loc` itself when the
    /// transaction owns it, else a fresh copy. Copying a shared node adds a reference to each
    /// of its children (the copy now points at them too) and drops one from the original.
    pub(crate) fn shadow(&mut self, loc: u64) -> Result<u64> {
        let count = self.sm.get(loc)?;
        self.node(loc)?;
        let dirty = self.nodes[&loc].dirty;
        if dirty && count == 1 {
            return Ok(loc);
        }
        let node = self.nodes[&loc].node.clone();
        if count > 1 {
            match &node {
                Node::Leaf(v) => {
                    for m in v {
                        self.sm.inc(m.unit)?;
                    }
                }
                Node::Branch(v) => {
                    for (_, c) in v {
                        self.sm.inc(*c)?;
                    }
                }
            }
        }
        let new = self.alloc_node(node)?;
        if self.sm.dec(loc, 1)? == 0 {
            self.nodes.remove(&loc);
        }
        Ok(new)
    }

    /// True when `loc` was written in this transaction and nothing else references it.
    pub(crate) fn is_owned(&mut self, loc: u64) -> Result<bool> {
        let dirty = self.nodes.get(&loc).is_some_and(|c| c.dirty);
        Ok(dirty && self.sm.get(loc)? == 1)
    }

    /// Forgets a node whose count reached zero.
    pub(crate) fn release_node(&mut self, loc: u64) {
        self.nodes.remove(&loc);
    }

    pub(crate) fn dec_block(&mut self, unit: u64) -> Result<u32> {
        self.sm.dec(unit, self.block_units)
    }

    pub(crate) fn alloc_block(&mut self, op: &'static str) -> Result<u64> {
        self.sm.alloc(self.block_units, self.reserve, op)
    }

    /// Byte offset of a unit on the device.
    pub(crate) fn byte(unit: u64) -> u64 {
        unit * PAGE_SIZE as u64
    }

    /// Pages changed in this transaction (drives the automatic commit).
    pub(crate) fn dirty_pages(&self) -> usize {
        self.dirty.len() + self.sm.dirty_pages()
    }

    /// Sealed images of every node written in this transaction and still alive.
    pub(crate) fn dirty_node_pages(&self) -> Vec<(u64, Box<crate::format::Page>)> {
        self.dirty
            .iter()
            .filter_map(|loc| {
                let c = self.nodes.get(loc)?;
                c.dirty
                    .then(|| (*loc, c.node.encode(*loc, self.generation)))
            })
            .collect()
    }

    /// The commit is durable: every node is clean, the next transaction begins. Returns the
    /// units that just became allocatable.
    pub(crate) fn commit_done(&mut self) -> Vec<u64> {
        for loc in std::mem::take(&mut self.dirty) {
            if let Some(c) = self.nodes.get_mut(&loc) {
                c.dirty = false;
            }
        }
        self.generation += 1;
        // Nothing is owned after a commit.
        self.insert_hint = None;
        self.sm.commit_done()
    }
}

#[cfg(test)]
mod tests {
    use crate::btree::testutil::{put, store};
    use crate::btree::Found;

    /// A map larger than the cache reads back correctly while the cache stays bounded and,
    /// after a trim, still holds part of what it had (it is not emptied).
    #[test]
    fn node_cache_stays_bounded_and_keeps_part_of_its_working_set() {
        let mut s = store(1 << 16);
        let mut root = 0;
        let mut units = Vec::new();
        for key in 0..20_000u64 {
            let (r, unit, _) = put(&mut s, root, key, 1);
            root = r;
            units.push(unit);
        }
        // Make every node clean and on the device, as a commit does.
        for (loc, page) in s.dirty_node_pages() {
            s.dev.write_at(&page[..], super::Store::byte(loc)).unwrap();
        }
        s.commit_done();
        s.nodes.clear();
        s.cache_limit = 64;
        let mut found: Vec<Found> = Vec::new();
        let mut max_len = 0;
        let mut fewest_after_trim = usize::MAX;
        for round in 0..3 {
            for key in (0..20_000u64).step_by(97) {
                let trims = s.trims;
                found.clear();
                s.lookup_range(root, key, key + 1, &mut found).unwrap();
                assert_eq!(found.len(), 1, "round {round} key {key}");
                assert_eq!(found[0].map.unit, units[key as usize]);
                max_len = max_len.max(s.nodes.len());
                if s.trims != trims {
                    fewest_after_trim = fewest_after_trim.min(s.nodes.len());
                }
            }
        }
        assert!(max_len <= 65, "cache grew to {max_len} nodes");
        assert!(s.trims > 2, "the walk should have trimmed the cache");
        // A lookup loads at most two nodes of this two-level map; a trim keeps about half of
        // the 64 clean ones, so right after a trim the cache still holds far more.
        assert!(
            fewest_after_trim >= 16,
            "a trim left only {fewest_after_trim} nodes (the cache was emptied)"
        );
    }
}
