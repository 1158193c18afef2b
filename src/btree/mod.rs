//! Copy-on-write B+tree block maps with reference-counted nodes (Rodeh's scheme).
//!
//! A tree is named by its root unit (0 = empty tree). Taking a second reference to a tree is
//! one increment of its root's count; the first change below a shared node copies that node
//! and moves the sharing one level down (see [`Store::shadow`]). Dropping a reference frees
//! only what no other tree still reaches, so delete costs what it frees.

mod diff;
pub(crate) mod node;

pub(crate) use diff::Change;

use crate::error::{Error, Result};
use crate::store::Store;
pub(crate) use node::Mapping;
use node::{lower_bound, Node, BRANCH_MAX, LEAF_MAX};

/// A mapping found by a range lookup, with whether any node on its path is shared with
/// another tree (then the block is shared too, whatever its own count says).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Found {
    pub map: Mapping,
    pub path_shared: bool,
}

/// What inserting into a node produced: the mapping it replaced, and the first key and
/// unit of a new right sibling when the node split.
type InsertOutcome = (Option<Mapping>, Option<(u64, u64)>);

/// Where the last insert landed (see [`Store::insert_at_hint`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct InsertHint {
    root: u64,
    leaf: u64,
    lo: u64,
    hi: u64,
}

/// Index of the child of a branch that covers `key` (the first child for keys below all).
pub(crate) fn child_index(children: &[(u64, u64)], key: u64) -> usize {
    match key.checked_add(1) {
        Some(k) => lower_bound(children, k, |c| c.0).saturating_sub(1),
        None => children.len().saturating_sub(1),
    }
}

/// Index of the first mapping of a leaf at or after `key`.
pub(crate) fn leaf_index(v: &[Mapping], key: u64) -> usize {
    lower_bound(v, key, |m| m.key)
}

/// `Ok(i)` when the leaf maps `key` at index i, else `Err(where it would go)`.
fn leaf_find(v: &[Mapping], key: u64) -> std::result::Result<usize, usize> {
    let i = leaf_index(v, key);
    match v.get(i) {
        Some(m) if m.key == key => Ok(i),
        _ => Err(i),
    }
}

impl Store {
    /// Every mapping with `lo <= key < hi`, in key order.
    pub(crate) fn lookup_range(
        &mut self,
        root: u64,
        lo: u64,
        hi: u64,
        out: &mut Vec<Found>,
    ) -> Result<()> {
        if root == 0 || lo >= hi {
            return Ok(());
        }
        self.walk_range(root, lo, hi, false, out, 0)
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
        if root == 0 || lo >= hi {
            return Ok(());
        }
        // Marking the root as shared makes the walk skip the count lookups below it.
        let from = out.len();
        self.walk_range(root, lo, hi, true, out, 0)?;
        for f in &mut out[from..] {
            f.path_shared = false;
        }
        Ok(())
    }

    fn walk_range(
        &mut self,
        mut loc: u64,
        lo: u64,
        hi: u64,
        mut shared: bool,
        out: &mut Vec<Found>,
        mut depth: u32,
    ) -> Result<()> {
        // Descend in a loop while a single child covers the range (every lookup of one block),
        // recursing only where the range spans several children.
        let (start, end) = loop {
            if depth > 32 {
                return Err(Error::corrupt(
                    "block map node",
                    loc,
                    "tree deeper than 32 levels (cycle?)",
                ));
            }
            // Below a shared node everything is shared: no need to look at counts.
            shared = shared || self.sm.get(loc)? > 1;
            match self.node(loc)? {
                Node::Leaf(v) => {
                    let start = leaf_index(v, lo);
                    out.extend(v[start..].iter().take_while(|m| m.key < hi).map(|m| Found {
                        map: *m,
                        path_shared: shared,
                    }));
                    return Ok(());
                }
                Node::Branch(v) => {
                    let start = child_index(v, lo);
                    let end = start + v[start..].iter().take_while(|c| c.0 < hi).count();
                    if end - start != 1 {
                        break (start, end);
                    }
                    loc = v[start].1;
                    depth += 1;
                }
            }
        };
        for i in start..end {
            // Looked up again per child: the recursion needs the store mutably.
            let Node::Branch(v) = self.node(loc)? else {
                unreachable!("a branch stays a branch during a lookup")
            };
            let child = v[i].1;
            self.walk_range(child, lo, hi, shared, out, depth + 1)?;
        }
        Ok(())
    }

    /// The smallest mapped key at or after `from`.
    pub(crate) fn next_key(&mut self, root: u64, from: u64) -> Result<Option<u64>> {
        if root == 0 {
            return Ok(None);
        }
        self.next_key_in(root, from, 0)
    }

    fn next_key_in(&mut self, loc: u64, from: u64, depth: u32) -> Result<Option<u64>> {
        if depth > 32 {
            return Err(Error::corrupt(
                "block map node",
                loc,
                "tree deeper than 32 levels",
            ));
        }
        let (start, len) = match self.node(loc)? {
            Node::Leaf(v) => {
                let i = leaf_index(v, from);
                return Ok(v.get(i).map(|m| m.key));
            }
            Node::Branch(v) => (child_index(v, from), v.len()),
        };
        // Nodes are never empty, so the first child with keys at or after `from` answers.
        for i in start..len {
            let Node::Branch(v) = self.node(loc)? else {
                unreachable!("a branch stays a branch during a lookup")
            };
            let child = v[i].1;
            if let Some(k) = self.next_key_in(child, from, depth + 1)? {
                return Ok(Some(k));
            }
        }
        Ok(None)
    }

    /// Maps `m.key` to `m`; returns the new root and the mapping it replaced.
    pub(crate) fn insert(&mut self, root: u64, m: Mapping) -> Result<(u64, Option<Mapping>)> {
        if let Some(old) = self.insert_at_hint(root, m)? {
            return Ok((root, old));
        }
        let (new_root, old) = if root == 0 {
            (self.alloc_node(Node::Leaf(vec![m]))?, None)
        } else {
            let root = self.shadow(root)?;
            let (old, split) = self.insert_into(root, m)?;
            match split {
                None => (root, old),
                Some((key, right)) => {
                    let first = self.node(root)?.first_key().min(m.key);
                    let new_root =
                        self.alloc_node(Node::Branch(vec![(first, root), (key, right)]))?;
                    (new_root, old)
                }
            }
        };
        self.remember_leaf(new_root, m.key)?;
        Ok((new_root, old))
    }

    /// Fast path for runs of inserts (sequential writes, receive): when the key falls in the
    /// key range of the leaf the last insert went to, and that leaf is owned by this
    /// transaction and has room, insert there without descending. An owned leaf's ancestors
    /// are owned too (sharing a map commits first), so nothing else can see the change.
    /// Returns Some(replaced mapping) when it inserted.
    fn insert_at_hint(&mut self, root: u64, m: Mapping) -> Result<Option<Option<Mapping>>> {
        let Some(h) = self.insert_hint else {
            return Ok(None);
        };
        if h.root != root || m.key < h.lo || m.key >= h.hi || !self.is_owned(h.leaf)? {
            return Ok(None);
        }
        let Node::Leaf(v) = self.node_mut(h.leaf) else {
            return Ok(None);
        };
        match leaf_find(v, m.key) {
            Ok(i) => Ok(Some(Some(std::mem::replace(&mut v[i], m)))),
            Err(i) if v.len() < LEAF_MAX => {
                v.insert(i, m);
                Ok(Some(None))
            }
            Err(_) => Ok(None),
        }
    }

    /// Records which leaf of `root` holds `key`, and the key range that leaf may hold.
    fn remember_leaf(&mut self, root: u64, key: u64) -> Result<()> {
        let (mut loc, mut lo, mut hi) = (root, 0u64, u64::MAX);
        loop {
            match self.node(loc)? {
                Node::Leaf(_) => break,
                Node::Branch(v) => {
                    let i = child_index(v, key);
                    if i > 0 {
                        lo = v[i].0;
                    }
                    if let Some(n) = v.get(i + 1) {
                        hi = n.0;
                    }
                    loc = v[i].1;
                }
            }
        }
        self.insert_hint = Some(InsertHint {
            root,
            leaf: loc,
            lo,
            hi,
        });
        Ok(())
    }

    /// Inserts into the owned node `loc`; returns the replaced mapping and, when the node
    /// split, the first key and unit of the new right sibling.
    fn insert_into(&mut self, loc: u64, m: Mapping) -> Result<InsertOutcome> {
        let (idx, child) = match self.node_mut(loc) {
            Node::Leaf(v) => {
                let (old, at) = match leaf_find(v, m.key) {
                    Ok(i) => (Some(std::mem::replace(&mut v[i], m)), i),
                    Err(i) => {
                        v.insert(i, m);
                        (None, i)
                    }
                };
                if v.len() <= LEAF_MAX {
                    return Ok((old, None));
                }
                let right = v.split_off(split_point(at, v.len()));
                let key = right[0].key;
                let r = self.alloc_node(Node::Leaf(right))?;
                return Ok((old, Some((key, r))));
            }
            Node::Branch(v) => {
                let i = child_index(v, m.key);
                if m.key < v[0].0 {
                    v[0].0 = m.key;
                }
                (i, v[i].1)
            }
        };
        let new_child = self.shadow(child)?;
        if new_child != child {
            branch(self.node_mut(loc))[idx].1 = new_child;
        }
        let (old, split) = self.insert_into(new_child, m)?;
        let Some((key, right)) = split else {
            return Ok((old, None));
        };
        let v = branch(self.node_mut(loc));
        v.insert(idx + 1, (key, right));
        if v.len() <= BRANCH_MAX {
            return Ok((old, None));
        }
        let r = v.split_off(split_point(idx + 1, v.len()));
        let key = r[0].0;
        let r = self.alloc_node(Node::Branch(r))?;
        Ok((old, Some((key, r))))
    }

    /// Removes the mapping of `key`; returns the new root (0 when the tree became empty) and
    /// the removed mapping. A missing key changes nothing (no needless copying).
    pub(crate) fn remove(&mut self, root: u64, key: u64) -> Result<(u64, Option<Mapping>)> {
        self.insert_hint = None;
        let mut probe = Vec::new();
        self.lookup_range(root, key, key + 1, &mut probe)?;
        if probe.is_empty() {
            return Ok((root, None));
        }
        let root = self.shadow(root)?;
        let (old, empty) = self.remove_from(root, key)?;
        if empty {
            self.sm.dec(root, 1)?;
            self.release_node(root);
            return Ok((0, old));
        }
        // A branch left with one child hands its reference to that child.
        if let Node::Branch(v) = self.node(root)? {
            if v.len() == 1 {
                let only = v[0].1;
                self.sm.dec(root, 1)?;
                self.release_node(root);
                return Ok((only, old));
            }
        }
        Ok((root, old))
    }

    fn remove_from(&mut self, loc: u64, key: u64) -> Result<(Option<Mapping>, bool)> {
        let (idx, child) = match self.node_mut(loc) {
            Node::Leaf(v) => {
                let old = match leaf_find(v, key) {
                    Ok(i) => Some(v.remove(i)),
                    Err(_) => None,
                };
                return Ok((old, v.is_empty()));
            }
            Node::Branch(v) => {
                let i = child_index(v, key);
                (i, v[i].1)
            }
        };
        let new_child = self.shadow(child)?;
        if new_child != child {
            branch(self.node_mut(loc))[idx].1 = new_child;
        }
        let (old, child_empty) = self.remove_from(new_child, key)?;
        if child_empty {
            self.sm.dec(new_child, 1)?;
            self.release_node(new_child);
            let v = branch(self.node_mut(loc));
            v.remove(idx);
            return Ok((old, v.is_empty()));
        }
        Ok((old, false))
    }

    /// Adds a reference to a whole tree: what a snapshot or clone costs.
    pub(crate) fn share_tree(&mut self, root: u64) -> Result<()> {
        self.insert_hint = None;
        if root != 0 {
            self.sm.inc(root)?;
        }
        Ok(())
    }

    /// Drops a reference to a tree, freeing every node and block nothing else reaches.
    pub(crate) fn drop_tree(&mut self, root: u64) -> Result<()> {
        self.insert_hint = None;
        if root == 0 {
            return Ok(());
        }
        let mut stack = vec![root];
        while let Some(loc) = stack.pop() {
            // Read before dropping the reference: a freed page's contents are still intact
            // (freed units are not reused before the commit), but the cache entry goes.
            let node = self.node(loc)?.clone();
            if self.sm.dec(loc, 1)? > 0 {
                continue;
            }
            self.release_node(loc);
            match node {
                Node::Leaf(v) => {
                    for m in v {
                        self.dec_block(m.unit)?;
                    }
                }
                Node::Branch(v) => stack.extend(v.iter().map(|c| c.1)),
            }
        }
        Ok(())
    }
}

/// Where an overfull node of `len` entries splits after an insert at `at`: appending at the
/// end (sequential writes) leaves the left node full and starts a new one, so a volume
/// written front to back gets full leaves; any other insert splits in the middle.
fn split_point(at: usize, len: usize) -> usize {
    if at + 1 == len {
        len - 1
    } else {
        len / 2
    }
}

fn branch(n: &mut Node) -> &mut Vec<(u64, u64)> {
    match n {
        Node::Branch(v) => v,
        Node::Leaf(_) => unreachable!("child_index came from a branch"),
    }
}

/// Helpers shared by the map tests here and in diff.rs.
#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    use crate::device::MemoryDevice;
    use crate::space::SpaceMap;
    use std::sync::Arc;

    pub(crate) fn store(units: u64) -> Store {
        let dev = Arc::new(MemoryDevice::new(units * 4096));
        let sm = SpaceMap::create(dev.clone(), units);
        Store::new(dev, sm, 1, 4096)
    }

    /// Maps `key` to a fresh block (as a write does); returns the new root and the unit.
    pub(crate) fn put(s: &mut Store, root: u64, key: u64, birth: u64) -> (u64, u64, Option<u64>) {
        let unit = s.alloc_block("t").unwrap();
        let (r, old) = s.insert(root, Mapping { key, unit, birth }).unwrap();
        if let Some(m) = old {
            s.dec_block(m.unit).unwrap();
        }
        (r, unit, old.map(|m| m.unit))
    }

    /// Unmaps `key` (as a discard does); returns the new root and the unit it had.
    pub(crate) fn unmap(s: &mut Store, root: u64, key: u64) -> (u64, Option<u64>) {
        let (r, old) = s.remove(root, key).unwrap();
        if let Some(m) = old {
            s.dec_block(m.unit).unwrap();
        }
        (r, old.map(|m| m.unit))
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{put, store, unmap};
    use super::*;
    use std::collections::BTreeMap;

    fn all(s: &mut Store, root: u64) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        s.lookup_range(root, 0, u64::MAX, &mut v).unwrap();
        v.iter().map(|f| (f.map.key, f.map.unit)).collect()
    }

    #[test]
    fn insert_remove_against_btreemap_with_sharing() {
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
                let (r, old) = unmap(&mut s, root, key);
                root = r;
                assert_eq!(old, model.remove(&key));
            } else {
                let (r, unit, old) = put(&mut s, root, key, 1);
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
        // Dropping every tree returns every unit.
        s.drop_tree(root).unwrap();
        for (r, _) in snaps {
            s.drop_tree(r).unwrap();
        }
        assert_eq!(s.sm.used_units(), 2);
    }

    #[test]
    fn range_lookup_reports_shared_paths() {
        let mut s = store(4096);
        let mut root = 0;
        for key in 0..1000 {
            root = put(&mut s, root, key, 1).0;
        }
        let mut v = Vec::new();
        s.lookup_range(root, 10, 20, &mut v).unwrap();
        assert_eq!(v.len(), 10);
        assert!(v.iter().all(|f| !f.path_shared));
        s.share_tree(root).unwrap();
        v.clear();
        s.lookup_range(root, 10, 20, &mut v).unwrap();
        assert!(v.iter().all(|f| f.path_shared));
    }
}
