//! The engine's persistent state below the catalog: the device, the space map and the
//! pages of every block map, with the block-map operations the volume and diff code use.
//! The tree logic itself is generic ([`crate::pdata::btree`]); this is where its block-map
//! instance meets the space map.

use crate::device::BlockDevice;
use crate::error::Result;
use crate::format::{Page, PAGE_SIZE};
use crate::map::{BlockMap, Change, Found, MapValue};
use crate::pdata::btree::{Nodes, Tree};
use crate::pdata::page_cache::PageCache;
use crate::space::{Reserve, SpaceMap};
use std::sync::Arc;

/// Clean block map nodes kept in memory before the cache is trimmed (64 MiB of pages).
const NODE_CACHE: usize = 16384;

pub(crate) struct Store {
    pub(crate) dev: Arc<dyn BlockDevice>,
    pub(crate) sm: SpaceMap,
    maps: Nodes<BlockMap>,
    schema: BlockMap,
    /// Generation of the open transaction (the last commit's + 1).
    pub(crate) generation: u64,
    pub(crate) block_size: usize,
    pub(crate) block_units: u64,
    /// Data checksums are on: every map value carries its block's CRC32 (see `crate::io`).
    pub(crate) checksums: bool,
}

impl Store {
    pub(crate) fn new(
        dev: Arc<dyn BlockDevice>,
        sm: SpaceMap,
        generation: u64,
        block_size: usize,
    ) -> Store {
        let block_units = (block_size / PAGE_SIZE) as u64;
        Store {
            maps: Nodes::new(PageCache::new(dev.clone(), generation, NODE_CACHE)),
            dev,
            sm,
            schema: BlockMap { block_units },
            generation,
            block_size,
            block_units,
            checksums: false,
        }
    }

    /// The block maps, for one operation; `reserve` says whether what it allocates may
    /// come from the reserve (unmapping and deleting may; writes may not).
    pub(crate) fn map(&mut self, reserve: Reserve) -> Tree<'_, BlockMap> {
        Tree {
            nodes: &mut self.maps,
            sm: &mut self.sm,
            schema: &self.schema,
            reserve,
        }
    }

    /// The block maps, for lookups and for changes that allocate nothing.
    fn map_keep(&mut self) -> Tree<'_, BlockMap> {
        self.map(Reserve::Keep)
    }

    /// Every mapping with `lo <= key < hi`, in key order, with whether its path is shared.
    pub(crate) fn lookup_range(
        &mut self,
        root: u64,
        lo: u64,
        hi: u64,
        out: &mut Vec<Found>,
    ) -> Result<()> {
        self.map_keep().range(root, &lo, Some(&hi), true, out)
    }

    /// As [`Store::lookup_range`] for readers, who do not care about sharing: skips the
    /// reference count lookups (`path_shared` is always false).
    pub(crate) fn lookup_range_for_read(
        &mut self,
        root: u64,
        lo: u64,
        hi: u64,
        out: &mut Vec<Found>,
    ) -> Result<()> {
        self.map_keep().range(root, &lo, Some(&hi), false, out)
    }

    /// The smallest mapped key at or after `from`.
    pub(crate) fn next_key(&mut self, root: u64, from: u64) -> Result<Option<u64>> {
        self.map_keep().next_key(root, &from)
    }

    /// Maps block `key`; returns the new root and the mapping it replaced (whose block
    /// reference the caller now holds).
    pub(crate) fn insert(
        &mut self,
        root: u64,
        key: u64,
        value: MapValue,
        reserve: Reserve,
    ) -> Result<(u64, Option<MapValue>)> {
        self.map(reserve).insert(root, key, value)
    }

    /// Unmaps block `key`; returns the new root and the removed mapping.
    pub(crate) fn remove(
        &mut self,
        root: u64,
        key: u64,
        reserve: Reserve,
    ) -> Result<(u64, Option<MapValue>)> {
        self.map(reserve).remove(root, &key)
    }

    /// Adds a reference to a whole map: what a snapshot or clone costs.
    pub(crate) fn share_tree(&mut self, root: u64) -> Result<()> {
        self.map_keep().share(root)
    }

    /// Drops a reference to a map, freeing every node and block nothing else reaches.
    pub(crate) fn drop_tree(&mut self, root: u64) -> Result<()> {
        self.map_keep().drop_tree(root)
    }

    /// Every block in `lo..hi` whose mapping differs between two maps.
    pub(crate) fn diff_maps(
        &mut self,
        base: u64,
        target: u64,
        lo: u64,
        hi: u64,
        out: &mut Vec<Change>,
    ) -> Result<()> {
        self.map_keep().diff(base, target, &lo, Some(&hi), out)
    }

    /// See [`Tree::changed_since`].
    pub(crate) fn changed_since(
        &mut self,
        root: u64,
        since: u64,
        lo: u64,
        hi: u64,
        out: &mut Vec<Change>,
    ) -> Result<()> {
        self.map_keep().changed_since(root, since, lo, hi, out)
    }

    /// Reads map node `loc` from the device, bypassing the cache (for `check`).
    pub(crate) fn read_node(&mut self, loc: u64) -> Result<crate::pdata::node::Node<BlockMap>> {
        let total = self.sm.total_units();
        self.maps.cache.read_uncached(loc, total).map(|(n, _)| n)
    }

    pub(crate) fn dec_block(&mut self, unit: u64) -> Result<u32> {
        self.sm.dec(unit, self.block_units)
    }

    pub(crate) fn alloc_block(&mut self, op: &'static str, reserve: Reserve) -> Result<u64> {
        self.sm.alloc(self.block_units, reserve, op)
    }

    /// Byte offset of a unit on the device.
    pub(crate) fn byte(unit: u64) -> u64 {
        unit * PAGE_SIZE as u64
    }

    /// Pages changed in this transaction (drives the automatic commit).
    pub(crate) fn dirty_pages(&self) -> usize {
        self.maps.cache.dirty_count() + self.sm.dirty_pages()
    }

    /// Sealed images of every map node written in this transaction and still alive.
    pub(crate) fn dirty_node_pages(&self) -> Vec<(u64, Box<Page>)> {
        self.maps.cache.sealed_dirty()
    }

    /// The commit is durable: every node is clean, the next transaction begins. Returns the
    /// units that just became allocatable.
    pub(crate) fn commit_done(&mut self) -> Vec<u64> {
        self.maps.commit_done();
        self.generation += 1;
        self.sm.commit_done()
    }

    /// Clean map nodes kept before the cache is trimmed (small in tests).
    #[cfg(test)]
    pub(crate) fn set_cache_limit(&mut self, limit: usize) {
        self.maps.cache.set_limit(limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemoryDevice;
    use std::collections::BTreeMap;

    fn store(units: u64) -> Store {
        let dev = Arc::new(MemoryDevice::new(units * 4096));
        let sm = SpaceMap::create(dev.clone(), units);
        Store::new(dev, sm, 1, 4096)
    }

    /// Maps `key` to a fresh block (as a write does); returns the new root and the unit.
    fn put(s: &mut Store, root: u64, key: u64) -> (u64, u64, Option<u64>) {
        let unit = s.alloc_block("t", Reserve::Keep).unwrap();
        let birth = s.generation;
        let (r, old) = s
            .insert(
                root,
                key,
                MapValue {
                    unit,
                    birth,
                    sum: 0,
                },
                Reserve::Keep,
            )
            .unwrap();
        if let Some(m) = old {
            s.dec_block(m.unit).unwrap();
        }
        (r, unit, old.map(|m| m.unit))
    }

    fn all(s: &mut Store, root: u64) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        s.lookup_range(root, 0, u64::MAX, &mut v).unwrap();
        v.iter().map(|f| (f.key, f.value.unit)).collect()
    }

    /// Writes, discards and snapshots of block maps agree with a model, and dropping every
    /// map returns every unit, data blocks included (the schema's reference counting).
    #[test]
    fn block_maps_against_btreemap_with_sharing_free_every_block() {
        let mut s = store(1 << 16);
        let mut model = BTreeMap::new();
        let mut root = 0;
        let mut x = 12345u64;
        let mut snaps = Vec::new();
        for i in 0..20000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let key = (x >> 33) % 5000;
            if x % 7 == 0 {
                let (r, old) = s.remove(root, key, Reserve::Keep).unwrap();
                root = r;
                if let Some(m) = old {
                    s.dec_block(m.unit).unwrap();
                }
                assert_eq!(old.map(|m| m.unit), model.remove(&key));
            } else {
                let (r, unit, old) = put(&mut s, root, key);
                root = r;
                assert_eq!(old, model.insert(key, unit));
            }
            if i % 5000 == 0 {
                // A snapshot: a second reference to the root, frozen from here on.
                s.share_tree(root).unwrap();
                snaps.push((root, model.clone()));
            }
        }
        assert_eq!(all(&mut s, root), model.into_iter().collect::<Vec<_>>());
        for (r, m) in &snaps {
            assert_eq!(&all(&mut s, *r), &m.clone().into_iter().collect::<Vec<_>>());
        }
        s.drop_tree(root).unwrap();
        for (r, _) in snaps {
            s.drop_tree(r).unwrap();
        }
        assert_eq!(s.sm.used_units(), 2, "only the superblocks are left");
    }

    /// A map larger than the cache reads back correctly while the cache stays bounded.
    #[test]
    fn node_cache_stays_bounded() {
        let mut s = store(1 << 16);
        let mut root = 0;
        let mut units = Vec::new();
        for key in 0..20_000u64 {
            let (r, unit, _) = put(&mut s, root, key);
            root = r;
            units.push(unit);
        }
        for (loc, page) in s.dirty_node_pages() {
            s.dev.write_at(&page[..], Store::byte(loc)).unwrap();
        }
        s.maps.commit_done();
        s.maps.cache.drop_clean();
        s.set_cache_limit(64);
        let mut found = Vec::new();
        let mut max_len = 0;
        for _ in 0..3 {
            for key in (0..20_000u64).step_by(97) {
                found.clear();
                s.lookup_range(root, key, key + 1, &mut found).unwrap();
                assert_eq!(found.len(), 1);
                assert_eq!(found[0].value.unit, units[key as usize]);
                max_len = max_len.max(s.maps.cache.len());
            }
        }
        assert!(max_len <= 65, "cache grew to {max_len} nodes");
    }
}
