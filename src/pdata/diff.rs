//! Diffing two trees of one schema. Both are walked together and any pair of identical node
//! pointers is skipped whole: two trees of one lineage (a volume and its snapshot) share
//! every unchanged subtree, so the cost follows the number of changed entries, not the size
//! of the trees.

use super::btree::Tree;
use super::node::{Node, Schema, SearchKey};
use crate::error::{Error, Result};

/// A key whose entry differs: `now` is its value in the target tree, or None when the
/// target does not hold the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Change<K, V> {
    pub key: K,
    pub now: Option<V>,
}

/// A child of a branch with the part of the key range it covers: `lo..hi` (`None`: no
/// upper bound).
pub(crate) type ChildRange<K> = (K, Option<K>, u64);

fn below<K: Ord>(k: &K, hi: Option<&K>) -> bool {
    hi.is_none_or(|h| k < h)
}

impl<S: Schema> Tree<'_, S>
where
    S::Value: PartialEq,
{
    /// Every key in `lo..hi` whose entry differs between the trees rooted at `base` and
    /// `target` (0 = the empty tree), in key order.
    pub(crate) fn diff(
        &mut self,
        base: u64,
        target: u64,
        lo: &S::Key,
        hi: Option<&S::Key>,
        out: &mut Vec<Change<S::Key, S::Value>>,
    ) -> Result<()> {
        if base == target {
            return Ok(());
        }
        let (ha, hb) = (self.height(base)?, self.height(target)?);
        self.diff_rec((base, ha), (target, hb), lo, hi, out, 0)
    }

    /// Levels below `loc` (0: a leaf or the empty tree), by its leftmost path. Only the two
    /// roots are measured: every child is one level below its parent (all leaves of a
    /// B+tree are at one depth), so the walk never reads a node just to learn its height,
    /// and a child shared by both trees is skipped unread.
    fn height(&mut self, loc: u64) -> Result<u32> {
        if loc == 0 {
            return Ok(0);
        }
        let (mut cur, mut h) = (loc, 0u32);
        while let Node::Branch(v) = self.node(cur)? {
            cur = v[0].1;
            h += 1;
            if h > 32 {
                return Err(Error::corrupt(
                    "tree node",
                    loc,
                    "tree deeper than 32 levels",
                ));
            }
        }
        Ok(h)
    }

    /// `a` and `b` are (node, height) pairs.
    fn diff_rec(
        &mut self,
        (a, ha): (u64, u32),
        (b, hb): (u64, u32),
        lo: &S::Key,
        hi: Option<&S::Key>,
        out: &mut Vec<Change<S::Key, S::Value>>,
        depth: u32,
    ) -> Result<()> {
        if a == b || hi.is_some_and(|h| h <= lo) {
            return Ok(());
        }
        if depth > 80 {
            return Err(Error::corrupt("tree node", b, "diff recursion too deep"));
        }
        if ha == 0 && hb == 0 {
            return self.diff_leaves(a, b, lo, hi, out);
        }
        // Split the taller side by its children; the other side is compared, restricted to
        // each child's range, until equal pointers meet.
        if ha >= hb {
            for (c_lo, c_hi, child) in self.children_in(a, lo, hi)? {
                let c = (child, ha - 1);
                self.diff_rec(c, (b, hb), &c_lo, c_hi.as_ref(), out, depth + 1)?;
            }
        } else {
            for (c_lo, c_hi, child) in self.children_in(b, lo, hi)? {
                let c = (child, hb - 1);
                self.diff_rec((a, ha), c, &c_lo, c_hi.as_ref(), out, depth + 1)?;
            }
        }
        Ok(())
    }

    /// The changes between leaves `a` and `b` (0: none) within `lo..hi`. Leaves the cache
    /// does not hold are read without being kept ([`PageCache::get_passing`]): a diff visits
    /// each leaf once, and keeping them would cost a cold process more than reading them.
    ///
    /// [`PageCache::get_passing`]: crate::pdata::page_cache::PageCache::get_passing
    fn diff_leaves(
        &mut self,
        a: u64,
        b: u64,
        lo: &S::Key,
        hi: Option<&S::Key>,
        out: &mut Vec<Change<S::Key, S::Value>>,
    ) -> Result<()> {
        let total = self.total();
        for loc in [a, b] {
            if loc != 0 {
                self.nodes.cache.get_passing(loc, total)?;
            }
        }
        let cache = &self.nodes.cache;
        let entries = |loc: u64| -> Result<&[(S::Key, S::Value)]> {
            if loc == 0 {
                return Ok(&[]);
            }
            match cache.peek(loc) {
                Some(Node::Leaf(v)) => {
                    let s = S::Key::lower_bound(v, lo, |e| &e.0);
                    let n = v[s..].partition_point(|e| below(&e.0, hi));
                    Ok(&v[s..s + n])
                }
                Some(Node::Branch(_)) => Err(Error::corrupt("tree node", loc, "expected a leaf")),
                None => Err(Error::corrupt(
                    "tree node",
                    loc,
                    "leaf read for a diff went missing",
                )),
            }
        };
        let (ea, eb) = (entries(a)?, entries(b)?);
        let (mut i, mut j) = (0, 0);
        loop {
            match (ea.get(i), eb.get(j)) {
                (Some(x), Some(y)) if x.0 == y.0 => {
                    if x.1 != y.1 {
                        out.push(Change {
                            key: y.0.clone(),
                            now: Some(y.1.clone()),
                        });
                    }
                    i += 1;
                    j += 1;
                }
                (Some(x), Some(y)) if x.0 < y.0 => {
                    out.push(Change {
                        key: x.0.clone(),
                        now: None,
                    });
                    i += 1;
                }
                (Some(x), None) => {
                    out.push(Change {
                        key: x.0.clone(),
                        now: None,
                    });
                    i += 1;
                }
                (_, Some(y)) => {
                    out.push(Change {
                        key: y.0.clone(),
                        now: Some(y.1.clone()),
                    });
                    j += 1;
                }
                (None, None) => return Ok(()),
            }
        }
    }
}

impl<S: Schema> Tree<'_, S> {
    /// The children of branch `loc` overlapping `lo..hi`, each with its key range clipped.
    pub(crate) fn children_in(
        &mut self,
        loc: u64,
        lo: &S::Key,
        hi: Option<&S::Key>,
    ) -> Result<Vec<ChildRange<S::Key>>> {
        let Node::Branch(v) = self.node(loc)? else {
            return Err(Error::corrupt("tree node", loc, "expected a branch"));
        };
        let start = S::Key::upper_bound(v, lo, |c| &c.0).saturating_sub(1);
        let mut out = Vec::new();
        for i in start..v.len() {
            let c_lo = if i == 0 || v[i].0 < *lo {
                lo.clone()
            } else {
                v[i].0.clone()
            };
            if !below(&c_lo, hi) {
                break;
            }
            let c_hi = match (v.get(i + 1), hi) {
                (Some(n), Some(h)) => Some(if n.0 < *h { n.0.clone() } else { h.clone() }),
                (Some(n), None) => Some(n.0.clone()),
                (None, h) => h.cloned(),
            };
            if c_hi.as_ref().is_none_or(|h| c_lo < *h) {
                out.push((c_lo, c_hi, v[i].1));
            }
        }
        Ok(out)
    }

    /// The entries of leaf `loc` (0: none) with keys in `lo..hi`.
    pub(crate) fn leaf_entries(
        &mut self,
        loc: u64,
        lo: &S::Key,
        hi: Option<&S::Key>,
    ) -> Result<Vec<(S::Key, S::Value)>> {
        if loc == 0 {
            return Ok(Vec::new());
        }
        match self.node(loc)? {
            Node::Leaf(v) => {
                let s = S::Key::lower_bound(v, lo, |e| &e.0);
                Ok(v[s..]
                    .iter()
                    .take_while(|e| below(&e.0, hi))
                    .cloned()
                    .collect())
            }
            Node::Branch(_) => Err(Error::corrupt("tree node", loc, "expected a leaf")),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::pdata::btree::tests::{Env, Named, Numbers};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// Changes a shared copy of a tree and checks the diff against a brute-force
    /// comparison of the two models, whole and in windows.
    fn check<S: crate::pdata::node::Schema>(
        schema: S,
        start: Vec<(S::Key, S::Value)>,
        edits: Vec<(S::Key, Option<S::Value>)>,
        window: (S::Key, S::Key),
    ) where
        S::Value: PartialEq,
    {
        let mut env = Env::new(schema, 1 << 15);
        let mut t = env.tree();
        let mut root = 0;
        let mut model = BTreeMap::new();
        for (k, v) in start {
            root = t.insert(root, k.clone(), v.clone()).unwrap().0;
            model.insert(k, v);
        }
        let base = root;
        t.share(base).unwrap();
        let base_model = model.clone();
        for (k, v) in edits {
            match v {
                Some(v) => {
                    root = t.insert(root, k.clone(), v.clone()).unwrap().0;
                    model.insert(k, v);
                }
                None => {
                    root = t.remove(root, &k).unwrap().0;
                    model.remove(&k);
                }
            }
        }
        let keys: std::collections::BTreeSet<_> =
            base_model.keys().chain(model.keys()).cloned().collect();
        let want: Vec<_> = keys
            .iter()
            .filter(|k| base_model.get(*k) != model.get(*k))
            .map(|k| (k.clone(), model.get(k).cloned()))
            .collect();
        let Some(first) = keys.iter().next().cloned() else {
            return;
        };
        let mut got = Vec::new();
        t.diff(base, root, &first, None, &mut got).unwrap();
        let got: Vec<_> = got.into_iter().map(|c| (c.key, c.now)).collect();
        assert_eq!(got, want);
        let (lo, hi) = if window.0 <= window.1 {
            window
        } else {
            (window.1, window.0)
        };
        let mut win = Vec::new();
        t.diff(base, root, &lo, Some(&hi), &mut win).unwrap();
        let win: Vec<_> = win.into_iter().map(|c| (c.key, c.now)).collect();
        let want_win: Vec<_> = want.into_iter().filter(|w| w.0 >= lo && w.0 < hi).collect();
        assert_eq!(win, want_win);
        let mut none = Vec::new();
        t.diff(root, root, &first, None, &mut none).unwrap();
        assert!(none.is_empty());
    }

    /// A diff keeps in the cache only the leaves it is asked for a second time: the first
    /// diff of a pair reads its leaves and passes them (the cache then holds about the
    /// branches only), the second keeps them, the third reads nothing. Every answer is the
    /// same.
    #[test]
    fn a_diff_keeps_the_leaves_it_reads_only_when_asked_again() {
        let mut env = Env::new(Numbers, 1 << 16);
        let mut root = 0;
        for k in 0..100_000u64 {
            root = env.tree().insert(root, k, k).unwrap().0;
        }
        env.commit();
        let base = root;
        env.tree().share(base).unwrap();
        for i in 0..200u64 {
            root = env.tree().insert(root, i * 487 % 100_000, 7).unwrap().0;
        }
        env.commit();
        env.nodes.cache.drop_clean();
        let run = |env: &mut Env<Numbers>| {
            let before = (env.nodes.cache.reads(), env.nodes.cache.len());
            let mut out = Vec::new();
            env.tree().diff(base, root, &0, None, &mut out).unwrap();
            let after = (env.nodes.cache.reads(), env.nodes.cache.len());
            (out, after.0 - before.0, after.1 - before.1)
        };
        let (first, read1, kept1) = run(&mut env);
        assert_eq!(first.len(), 200);
        // About 2 leaves per change were read; only branches and the roots' leftmost
        // paths stayed.
        assert!(read1 >= 300, "{read1} reads");
        assert!(
            kept1 * 10 < read1 as usize,
            "kept {kept1} of {read1} pages read"
        );
        let (second, read2, kept2) = run(&mut env);
        assert_eq!(second, first);
        // The second diff reads the leaves again (less the few still kept aside) and keeps
        // every page it reads.
        assert!(
            read2 <= read1 && read2 * 10 >= read1 * 9 && kept2 as u64 == read2,
            "first read {read1}, second read {read2} and kept {kept2}"
        );
        let (third, read3, _) = run(&mut env);
        assert_eq!(third, first);
        assert_eq!(read3, 0);
    }

    /// A cold diff reads only what differs: the nodes on the changed paths of both trees
    /// (every node one tree has and the other does not) and the two roots' leftmost paths,
    /// never a node the trees share. Deterministic: the page cache counts its reads.
    #[test]
    fn a_cold_diff_reads_only_the_changed_paths() {
        let mut env = Env::new(Numbers, 1 << 16);
        let mut root = 0;
        {
            let mut t = env.tree();
            for k in 0..200_000u64 {
                root = t.insert(root, k, k).unwrap().0;
            }
        }
        env.commit();
        let base = root;
        env.tree().share(base).unwrap();
        let mut x = 7u64;
        for _ in 0..150 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let k = (x >> 16) % 200_000;
            root = env.tree().insert(root, k, k + 1).unwrap().0;
        }
        env.commit();
        // The nodes each tree has that the other does not.
        let nodes = |env: &mut Env<Numbers>, r: u64| {
            let mut v = std::collections::HashSet::new();
            env.tree()
                .visit_nodes(r, |loc, _| {
                    v.insert(loc);
                    Ok(())
                })
                .unwrap();
            v
        };
        let (a, b) = (nodes(&mut env, base), nodes(&mut env, root));
        let changed = a.symmetric_difference(&b).count() as u64;
        let leaves = a.len() as u64;
        env.nodes.cache.drop_clean();
        let before = env.nodes.cache.reads();
        let mut out = Vec::new();
        env.tree().diff(base, root, &0, None, &mut out).unwrap();
        let reads = env.nodes.cache.reads() - before;
        assert!(!out.is_empty() && out.len() <= 150);
        // Slack for the roots' leftmost paths, read to learn the trees' heights.
        assert!(
            reads as f64 <= 1.5 * changed as f64,
            "{reads} node reads for {changed} nodes on the changed paths ({leaves} per tree)"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        #[test]
        fn fixed_size_diff_matches_brute_force(
            start in prop::collection::vec((0u64..20_000, any::<u64>()), 0..6000),
            edits in prop::collection::vec((0u64..25_000, prop::option::of(any::<u64>())), 0..400),
            window in (0u64..25_000, 0u64..25_000),
        ) {
            check(Numbers, start, edits, window);
        }

        #[test]
        fn variable_size_diff_matches_brute_force(
            start in prop::collection::vec(((0u64..3, "[a-z]{1,12}"), "[a-z]{0,80}"), 0..800),
            edits in prop::collection::vec(((0u64..3, "[a-z]{1,12}"), prop::option::of("[a-z]{0,80}")), 0..100),
            window in ((0u64..3, "[a-m]{1,3}"), (0u64..3, "[n-z]{1,3}")),
        ) {
            check(Named, start, edits, window);
        }
    }
}
