//! Diffing two block maps. Both maps are walked together and any pair of identical node
//! pointers is skipped whole: two maps of one lineage share every unchanged subtree, so the
//! cost follows the number of changed entries, not the size of the volume.
//!
//! When the older map is gone (a bookmark keeps only its generation), the newer map alone
//! still tells what stayed the same: nodes are copy-on-write and record the generation that
//! wrote them, so a subtree written at or before the bookmark is exactly as it was then.

use super::node::Node;
use super::{child_index, leaf_index, Mapping};
use crate::error::{Error, Result};
use crate::store::Store;
use crate::unit_hash::UnitMap;

/// A block whose mapping differs: `now` is its mapping in the target, or None when the target
/// does not map it (it reads as zeros there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Change {
    pub key: u64,
    pub now: Option<Mapping>,
}

impl Store {
    /// Every key in `lo..hi` whose mapping differs between the maps rooted at `base` and
    /// `target` (0 = empty map), in key order.
    pub(crate) fn diff_maps(
        &mut self,
        base: u64,
        target: u64,
        lo: u64,
        hi: u64,
        out: &mut Vec<Change>,
    ) -> Result<()> {
        let mut heights = UnitMap::default();
        self.diff_rec(base, target, lo, hi, out, &mut heights, 0)
    }

    fn height(&mut self, loc: u64, memo: &mut UnitMap<u32>) -> Result<u32> {
        if loc == 0 {
            return Ok(0);
        }
        if let Some(h) = memo.get(&loc) {
            return Ok(*h);
        }
        let (mut cur, mut h) = (loc, 0u32);
        while let Node::Branch(v) = self.node(cur)? {
            cur = v[0].1;
            h += 1;
            if h > 32 {
                return Err(Error::corrupt(
                    "block map node",
                    loc,
                    "tree deeper than 32 levels",
                ));
            }
        }
        memo.insert(loc, h);
        Ok(h)
    }

    /// The children of branch `loc` overlapping `lo..hi`, each with its key range clipped.
    fn children_in(&mut self, loc: u64, lo: u64, hi: u64) -> Result<Vec<(u64, u64, u64)>> {
        let Node::Branch(v) = self.node(loc)? else {
            return Err(Error::corrupt("block map node", loc, "expected a branch"));
        };
        let start = child_index(v, lo);
        let mut out = Vec::new();
        for i in start..v.len() {
            let c_lo = if i == 0 { lo } else { v[i].0.max(lo) };
            if c_lo >= hi {
                break;
            }
            let c_hi = v.get(i + 1).map_or(hi, |n| n.0.min(hi));
            if c_lo < c_hi {
                out.push((c_lo, c_hi, v[i].1));
            }
        }
        Ok(out)
    }

    fn leaf_entries(&mut self, loc: u64, lo: u64, hi: u64) -> Result<Vec<Mapping>> {
        if loc == 0 {
            return Ok(Vec::new());
        }
        match self.node(loc)? {
            Node::Leaf(v) => {
                let s = leaf_index(v, lo);
                Ok(v[s..].iter().take_while(|m| m.key < hi).copied().collect())
            }
            Node::Branch(_) => Err(Error::corrupt("block map node", loc, "expected a leaf")),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn diff_rec(
        &mut self,
        a: u64,
        b: u64,
        lo: u64,
        hi: u64,
        out: &mut Vec<Change>,
        memo: &mut UnitMap<u32>,
        depth: u32,
    ) -> Result<()> {
        if a == b || lo >= hi {
            return Ok(());
        }
        if depth > 80 {
            return Err(Error::corrupt(
                "block map node",
                b,
                "diff recursion too deep",
            ));
        }
        let (ha, hb) = (self.height(a, memo)?, self.height(b, memo)?);
        if ha == 0 && hb == 0 {
            let ea = self.leaf_entries(a, lo, hi)?;
            let eb = self.leaf_entries(b, lo, hi)?;
            let (mut i, mut j) = (0, 0);
            while i < ea.len() || j < eb.len() {
                match (ea.get(i), eb.get(j)) {
                    (Some(x), Some(y)) if x.key == y.key => {
                        if x.unit != y.unit {
                            out.push(Change {
                                key: y.key,
                                now: Some(*y),
                            });
                        }
                        i += 1;
                        j += 1;
                    }
                    (Some(x), Some(y)) if x.key < y.key => {
                        out.push(Change {
                            key: x.key,
                            now: None,
                        });
                        i += 1;
                    }
                    (Some(x), None) => {
                        out.push(Change {
                            key: x.key,
                            now: None,
                        });
                        i += 1;
                    }
                    (_, Some(y)) => {
                        out.push(Change {
                            key: y.key,
                            now: Some(*y),
                        });
                        j += 1;
                    }
                    (None, None) => break,
                }
            }
            return Ok(());
        }
        // Split the taller side by its children; the other side is compared, restricted to
        // each child's range, until equal pointers meet.
        if ha >= hb {
            for (c_lo, c_hi, child) in self.children_in(a, lo, hi)? {
                self.diff_rec(child, b, c_lo, c_hi, out, memo, depth + 1)?;
            }
        } else {
            for (c_lo, c_hi, child) in self.children_in(b, lo, hi)? {
                self.diff_rec(a, child, c_lo, c_hi, out, memo, depth + 1)?;
            }
        }
        Ok(())
    }
}

impl Store {
    /// The keys in `lo..hi` of the map at `root` that may differ from the same lineage's map
    /// at generation `since`, in key order, judged from this map alone: keys born after
    /// `since` (with their mapping), and keys this map does not hold that may have been
    /// discarded since (`now: None`; some of them may have been unmapped then too).
    ///
    /// A subtree written at or before `since` is unchanged within its own first..last key,
    /// holes included, so it is skipped. Not within the range its parent's separators give
    /// it: a leaf emptied since `since` is removed and its old range falls to a neighbour
    /// that may be unchanged, so only the real key span counts.
    pub(crate) fn changed_since(
        &mut self,
        root: u64,
        since: u64,
        lo: u64,
        hi: u64,
        out: &mut Vec<Change>,
    ) -> Result<()> {
        let mut settled = lo;
        if root != 0 {
            self.changed_rec(root, since, lo, hi, &mut settled, out, 0)?;
        }
        unmapped(settled, hi, out);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn changed_rec(
        &mut self,
        loc: u64,
        since: u64,
        lo: u64,
        hi: u64,
        settled: &mut u64,
        out: &mut Vec<Change>,
        depth: u32,
    ) -> Result<()> {
        if depth > 32 {
            return Err(Error::corrupt(
                "block map node",
                loc,
                "tree deeper than 32 levels",
            ));
        }
        if self.node_written(loc)? <= since {
            let (first, last) = self.key_span(loc)?;
            let (a, b) = (first.max(lo), last.saturating_add(1).min(hi));
            if a < b {
                unmapped(*settled, a, out);
                *settled = (*settled).max(b);
            }
            return Ok(());
        }
        if let Node::Leaf(_) = self.node(loc)? {
            for m in self.leaf_entries(loc, lo, hi)? {
                unmapped(*settled, m.key, out);
                if m.birth > since {
                    out.push(Change {
                        key: m.key,
                        now: Some(m),
                    });
                }
                *settled = m.key + 1;
            }
            return Ok(());
        }
        for (c_lo, c_hi, child) in self.children_in(loc, lo, hi)? {
            self.changed_rec(child, since, c_lo, c_hi, settled, out, depth + 1)?;
        }
        Ok(())
    }

    /// The first and last key held in the subtree at `loc`.
    fn key_span(&mut self, loc: u64) -> Result<(u64, u64)> {
        Ok((self.end_key(loc, false)?, self.end_key(loc, true)?))
    }

    /// The first (or, with `last`, the last) key held in the subtree at `loc`.
    fn end_key(&mut self, mut loc: u64, last: bool) -> Result<u64> {
        for _ in 0..=32 {
            let empty = || Error::corrupt("block map node", loc, "no entries");
            loc = match self.node(loc)? {
                Node::Leaf(v) => {
                    let m = if last { v.last() } else { v.first() };
                    return m.map(|m| m.key).ok_or_else(empty);
                }
                Node::Branch(v) => {
                    let c = if last { v.last() } else { v.first() };
                    c.map(|c| c.1).ok_or_else(empty)?
                }
            };
        }
        Err(Error::corrupt(
            "block map node",
            loc,
            "tree deeper than 32 levels",
        ))
    }
}

/// Keys `from..to`, none mapped, reported as possibly discarded.
fn unmapped(from: u64, to: u64, out: &mut Vec<Change>) {
    out.extend((from..to).map(|key| Change { key, now: None }));
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{put, store, unmap};
    use std::collections::BTreeMap;

    #[test]
    fn diff_equals_brute_force_and_skips_shared_subtrees() {
        let mut s = store(1 << 18);
        let mut root = 0;
        let mut model = BTreeMap::new();
        for key in 0..20_000u64 {
            let (r, unit, _) = put(&mut s, root, key, 1);
            root = r;
            model.insert(key, unit);
        }
        s.share_tree(root).unwrap();
        let base = root;
        let base_model = model.clone();
        let mut x = 7u64;
        for _ in 0..300 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            let key = (x >> 33) % 25_000;
            if x % 3 == 0 {
                root = unmap(&mut s, root, key).0;
                model.remove(&key);
            } else {
                let (r, unit, _) = put(&mut s, root, key, 2);
                root = r;
                model.insert(key, unit);
            }
        }
        let mut want = Vec::new();
        for key in 0..25_000u64 {
            match (base_model.get(&key), model.get(&key)) {
                (a, b) if a == b => {}
                (_, Some(u)) => want.push((key, Some(*u))),
                (_, None) => want.push((key, None)),
            }
        }
        let mut got = Vec::new();
        s.diff_maps(base, root, 0, u64::MAX, &mut got).unwrap();
        let got: Vec<(u64, Option<u64>)> =
            got.iter().map(|c| (c.key, c.now.map(|m| m.unit))).collect();
        assert_eq!(got, want);
        // A window gives exactly the changes inside it.
        let mut win = Vec::new();
        s.diff_maps(base, root, 5000, 9000, &mut win).unwrap();
        assert!(win.iter().all(|c| (5000..9000).contains(&c.key)));
        assert_eq!(
            win.len(),
            want.iter().filter(|w| (5000..9000).contains(&w.0)).count()
        );
        // Identical maps: nothing.
        let mut none = Vec::new();
        s.diff_maps(base, base, 0, u64::MAX, &mut none).unwrap();
        assert!(none.is_empty());
    }
}
