//! A copy-on-write B+tree with reference-counted nodes (Rodeh's scheme), generic over its
//! key and value types.
//!
//! A tree is named by its root unit (0 = the empty tree). Taking a second reference to a
//! tree is one increment of its root's count; the first change below a shared node copies
//! that node and moves the sharing one level down (see [`Tree::shadow`]). Dropping a
//! reference frees only what no other tree still reaches, so a delete costs what it frees.
//! A node is changed in place only when the open transaction wrote it and nothing else
//! references it: committed pages are never overwritten.
//!
//! Removal does not rebalance: a node is freed when it empties, and a root left with one
//! child hands its reference to that child. Trees that shrink keep some half-empty nodes,
//! which costs space, never correctness.

use super::node::{leaf_entry_len, Node, Schema, SearchKey, MAX_ENTRY, PAYLOAD};
use super::page_cache::{PageCache, PageNode};
use crate::error::{Error, Result};
use crate::space::{Reserve, SpaceMap};
use std::ops::ControlFlow;

/// Trees are far shallower than this; a deeper walk means a cycle in corrupt pages.
const MAX_DEPTH: u32 = 32;

impl<S: Schema> PageNode for Node<S> {
    const WHAT: &'static str = S::LEAF.name();
    fn encode(&self, location: u64, generation: u64) -> Box<crate::format::Page> {
        Node::encode(self, location, generation)
    }
    fn decode(page: &crate::format::Page, location: u64, total: u64) -> Result<(Self, u64)> {
        Node::decode(page, location, total)
    }
}

/// An entry found by a range lookup, with whether any node on its path is shared with
/// another tree (then what the value references is shared too, whatever its own count).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Found<K, V> {
    pub key: K,
    pub value: V,
    pub path_shared: bool,
}

/// Where the last insert landed: an owned leaf of `root` that holds keys in `lo..hi`.
struct InsertHint<K> {
    root: u64,
    leaf: u64,
    lo: Option<K>,
    hi: Option<K>,
}

/// The pages of one kind of tree: the cache and the insert hint. Several trees of the same
/// schema (every volume's block map) share one.
pub(crate) struct Nodes<S: Schema> {
    pub(crate) cache: PageCache<Node<S>>,
    hint: Option<InsertHint<S::Key>>,
}

impl<S: Schema> Nodes<S> {
    pub(crate) fn new(cache: PageCache<Node<S>>) -> Nodes<S> {
        Nodes { cache, hint: None }
    }

    /// The commit is durable: nothing is owned any more.
    pub(crate) fn commit_done(&mut self) {
        self.hint = None;
        self.cache.commit_done();
    }
}

/// The result of inserting into a node: the value it replaced, and the first key and unit
/// of a new right sibling when the node split.
type InsertOutcome<S> = (
    Option<<S as Schema>::Value>,
    Option<(<S as Schema>::Key, u64)>,
);

/// Operations on the trees of one schema, borrowing what they need for one call.
pub(crate) struct Tree<'a, S: Schema> {
    pub(crate) nodes: &'a mut Nodes<S>,
    pub(crate) sm: &'a mut SpaceMap,
    pub(crate) schema: &'a S,
    /// Whether new nodes may use the space kept for deletes and commits.
    pub(crate) reserve: Reserve,
}

/// Index of the child of a branch that covers `key` (the first child for keys below all).
fn child_index<K: SearchKey>(children: &[(K, u64)], key: &K) -> usize {
    K::upper_bound(children, key, |c| &c.0).saturating_sub(1)
}

/// `Ok(i)` when the leaf holds `key` at index i, else `Err(where it would go)`.
fn leaf_find<K: SearchKey, V>(v: &[(K, V)], key: &K) -> std::result::Result<usize, usize> {
    let i = K::lower_bound(v, key, |e| &e.0);
    match v.get(i) {
        Some(e) if e.0 == *key => Ok(i),
        _ => Err(i),
    }
}

fn too_deep(loc: u64) -> Error {
    Error::corrupt("tree node", loc, "tree deeper than 32 levels (a cycle?)")
}

/// Where an overfull node splits after an insert at `at`. An append at the end (sequential
/// writes, time-ordered ids) leaves the left node full and starts a new one, so a tree
/// filled in order gets full nodes. An insert that ends a run of keys (`ends_run`: the next
/// entry belongs to another run, see [`Schema::same_run`]) splits right after it when the
/// left part then holds at least half and fits: the next key of the run goes to the left
/// node's successor, and the run fills nodes as an append does. Any other insert splits in
/// the middle by bytes. Both halves fit a page because no entry exceeds `MAX_ENTRY`.
fn split_point(at: usize, lens: &[usize], ends_run: bool) -> usize {
    let n = lens.len();
    if at + 1 == n {
        return n - 1;
    }
    let total: usize = lens.iter().sum();
    if ends_run {
        let left: usize = lens[..=at].iter().sum();
        if left <= PAYLOAD && 2 * left >= total {
            return at + 1;
        }
    }
    let mut left = 0;
    for (i, l) in lens.iter().enumerate() {
        if left + l > total / 2 && i > 0 {
            return i;
        }
        left += l;
    }
    n - 1
}

impl<S: Schema> Tree<'_, S> {
    pub(crate) fn total(&self) -> u64 {
        self.sm.total_units()
    }

    /// The node at `loc`.
    pub(crate) fn node(&mut self, loc: u64) -> Result<&Node<S>> {
        let total = self.total();
        self.nodes.cache.get(loc, total)
    }

    /// The generation of the commit that wrote node `loc`.
    pub(crate) fn node_written(&mut self, loc: u64) -> Result<u64> {
        let total = self.total();
        self.nodes.cache.written(loc, total)
    }

    fn node_mut(&mut self, loc: u64) -> Result<&mut Node<S>> {
        self.nodes
            .cache
            .get_mut(loc)
            .ok_or_else(|| Error::corrupt("tree node", loc, "changed without being owned"))
    }

    /// Allocates a unit for a new node, owned by the open transaction.
    fn alloc_node(&mut self, node: Node<S>) -> Result<u64> {
        let loc = self.sm.alloc_page(self.reserve, "tree update")?;
        self.nodes.cache.insert_new(loc, node);
        Ok(loc)
    }

    /// True when the open transaction wrote `loc` and nothing else references it.
    pub(crate) fn is_owned(&mut self, loc: u64) -> Result<bool> {
        Ok(self.nodes.cache.is_dirty(loc) && self.sm.get(loc)? == 1)
    }

    /// Returns a location where `loc`'s node may be changed in place: `loc` itself when the
    /// transaction owns it, else a fresh copy. Copying a shared node adds a reference to
    /// each of its children (the copy points at them too) and drops one from the original.
    pub(crate) fn shadow(&mut self, loc: u64) -> Result<u64> {
        let count = self.sm.get(loc)?;
        self.node(loc)?;
        if count == 1 && self.nodes.cache.is_dirty(loc) {
            return Ok(loc);
        }
        let node = self.node(loc)?.clone();
        if count > 1 {
            match &node {
                Node::Leaf(v) => {
                    for (_, x) in v {
                        self.schema.inc_value(self.sm, x)?;
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
            self.nodes.cache.forget(loc);
        }
        Ok(new)
    }

    /// Child `i` of branch `loc` (None past its last child), for walks that hold no
    /// borrow of the branch while they descend.
    fn child(&mut self, loc: u64, i: usize) -> Result<Option<u64>> {
        match self.node(loc)? {
            Node::Branch(v) => Ok(v.get(i).map(|c| c.1)),
            Node::Leaf(_) => Err(Error::corrupt(
                "tree node",
                loc,
                "changed kind during a walk",
            )),
        }
    }

    /// The value of `key`.
    pub(crate) fn get(&mut self, root: u64, key: &S::Key) -> Result<Option<S::Value>> {
        if root == 0 {
            return Ok(None);
        }
        let mut loc = root;
        for _ in 0..=MAX_DEPTH {
            match self.node(loc)? {
                Node::Leaf(v) => return Ok(leaf_find(v, key).ok().map(|i| v[i].1.clone())),
                Node::Branch(v) => loc = v[child_index(v, key)].1,
            }
        }
        Err(too_deep(root))
    }

    /// Every entry with `lo <= key < hi` (no upper bound for `None`), in key order. With
    /// `want_sharing`, each entry says whether a node on its path is shared; without, the
    /// reference counts are not looked at (readers do not care) and `path_shared` is false.
    pub(crate) fn range(
        &mut self,
        root: u64,
        lo: &S::Key,
        hi: Option<&S::Key>,
        want_sharing: bool,
        out: &mut Vec<Found<S::Key, S::Value>>,
    ) -> Result<()> {
        if root == 0 || hi.is_some_and(|h| h <= lo) {
            return Ok(());
        }
        let from = out.len();
        // Starting as "shared" makes the walk skip the count lookups below.
        self.walk_range(root, lo, hi, !want_sharing, out, 0)?;
        if !want_sharing {
            for f in &mut out[from..] {
                f.path_shared = false;
            }
        }
        Ok(())
    }

    fn walk_range(
        &mut self,
        mut loc: u64,
        lo: &S::Key,
        hi: Option<&S::Key>,
        mut shared: bool,
        out: &mut Vec<Found<S::Key, S::Value>>,
        mut depth: u32,
    ) -> Result<()> {
        // Descend in a loop while a single child covers the range (every lookup of one
        // key), recursing only where the range spans several children.
        let below = |k: &S::Key| hi.is_none_or(|h| k < h);
        let (start, end) =
            loop {
                if depth > MAX_DEPTH {
                    return Err(too_deep(loc));
                }
                // Below a shared node everything is shared: no need to look at counts.
                shared = shared || self.sm.get(loc)? > 1;
                match self.node(loc)? {
                    Node::Leaf(v) => {
                        let start = S::Key::lower_bound(v, lo, |e| &e.0);
                        out.extend(v[start..].iter().take_while(|e| below(&e.0)).map(|(k, x)| {
                            Found {
                                key: k.clone(),
                                value: x.clone(),
                                path_shared: shared,
                            }
                        }));
                        return Ok(());
                    }
                    Node::Branch(v) => {
                        let start = child_index(v, lo);
                        let end =
                            start + 1 + v[start + 1..].iter().take_while(|c| below(&c.0)).count();
                        if end - start != 1 {
                            break (start, end);
                        }
                        loc = v[start].1;
                        depth += 1;
                    }
                }
            };
        for i in start..end {
            // Looked up again per child: the recursion needs the cache mutably.
            let Some(child) = self.child(loc, i)? else {
                break;
            };
            self.walk_range(child, lo, hi, shared, out, depth + 1)?;
        }
        Ok(())
    }

    /// Calls `f` on every entry with key `>= from`, in key order, until it breaks.
    pub(crate) fn scan(
        &mut self,
        root: u64,
        from: &S::Key,
        mut f: impl FnMut(&S::Key, &S::Value) -> ControlFlow<()>,
    ) -> Result<()> {
        if root == 0 {
            return Ok(());
        }
        // The path from the root: (branch, index of the child being visited).
        let mut path: Vec<(u64, usize)> = Vec::new();
        let mut loc = root;
        let mut first = true;
        loop {
            if path.len() as u32 > MAX_DEPTH {
                return Err(too_deep(root));
            }
            let total = self.total();
            match &*self.nodes.cache.get_scanning(loc, total)? {
                Node::Branch(v) => {
                    let i = if first { child_index(v, from) } else { 0 };
                    let child = v[i].1;
                    path.push((loc, i));
                    loc = child;
                    continue;
                }
                Node::Leaf(v) => {
                    let start = if first {
                        S::Key::lower_bound(v, from, |e| &e.0)
                    } else {
                        0
                    };
                    first = false;
                    for (k, x) in &v[start..] {
                        if f(k, x).is_break() {
                            return Ok(());
                        }
                    }
                }
            }
            // Up to the nearest branch with a child left, then down its next child.
            loop {
                let Some((b, i)) = path.pop() else {
                    return Ok(());
                };
                if let Some(c) = self.child(b, i + 1)? {
                    loc = c;
                    path.push((b, i + 1));
                    break;
                }
            }
        }
    }

    /// The smallest key at or after `from`.
    pub(crate) fn next_key(&mut self, root: u64, from: &S::Key) -> Result<Option<S::Key>> {
        let mut found = None;
        self.scan(root, from, |k, _| {
            found = Some(k.clone());
            ControlFlow::Break(())
        })?;
        Ok(found)
    }

    /// The entry with the greatest key below `hi`.
    pub(crate) fn last_below(
        &mut self,
        root: u64,
        hi: &S::Key,
    ) -> Result<Option<(S::Key, S::Value)>> {
        if root == 0 {
            return Ok(None);
        }
        self.last_below_in(root, hi, 0)
    }

    fn last_below_in(
        &mut self,
        loc: u64,
        hi: &S::Key,
        depth: u32,
    ) -> Result<Option<(S::Key, S::Value)>> {
        if depth > MAX_DEPTH {
            return Err(too_deep(loc));
        }
        let end = match self.node(loc)? {
            Node::Leaf(v) => {
                let i = S::Key::lower_bound(v, hi, |e| &e.0);
                return Ok(i.checked_sub(1).map(|i| v[i].clone()));
            }
            Node::Branch(v) => S::Key::lower_bound(v, hi, |c| &c.0),
        };
        // A child's first key is a lower bound of its keys, not always one of them (removes
        // do not update it), so a child may hold nothing below `hi`: then the one before.
        for i in (0..end).rev() {
            let Some(child) = self.child(loc, i)? else {
                continue;
            };
            if let Some(found) = self.last_below_in(child, hi, depth + 1)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// Maps `key` to `value`; returns the new root and the value it replaced. The caller
    /// owns the replaced value's reference (the tree does not drop it).
    pub(crate) fn insert(
        &mut self,
        root: u64,
        key: S::Key,
        value: S::Value,
    ) -> Result<(u64, Option<S::Value>)> {
        if leaf_entry_len::<S>(&key, &value) > MAX_ENTRY {
            return Err(Error::InvalidArgument(format!(
                "a tree entry of {} bytes is larger than the {MAX_ENTRY} bytes one may take",
                leaf_entry_len::<S>(&key, &value)
            )));
        }
        let (key, value) = match self.insert_at_hint(root, key, value)? {
            Ok(old) => return Ok((root, old)),
            Err(kv) => kv,
        };
        let hint_key = key.clone();
        let (new_root, old) = if root == 0 {
            (self.alloc_node(Node::Leaf(vec![(key, value)]))?, None)
        } else {
            let root = self.shadow(root)?;
            let (old, split) = self.insert_into(root, key, value, 0)?;
            match split {
                None => (root, old),
                Some((k, right)) => {
                    let Some(first) = self.node(root)?.first_key().cloned() else {
                        return Err(Error::corrupt("tree node", root, "empty after a split"));
                    };
                    let first = first.min(hint_key.clone());
                    let new_root =
                        self.alloc_node(Node::Branch(vec![(first, root), (k, right)]))?;
                    (new_root, old)
                }
            }
        };
        self.remember_leaf(new_root, &hint_key)?;
        Ok((new_root, old))
    }

    /// Fast path for runs of inserts (sequential writes, receive): when the key falls in
    /// the key range of the leaf the last insert went to, and that leaf is owned by this
    /// transaction and has room, insert there without descending. An owned leaf's ancestors
    /// are owned too (sharing a tree commits first), so nothing else can see the change.
    /// Returns `Ok(replaced value)` when it inserted, else hands the entry back.
    #[allow(clippy::type_complexity)]
    fn insert_at_hint(
        &mut self,
        root: u64,
        key: S::Key,
        value: S::Value,
    ) -> Result<std::result::Result<Option<S::Value>, (S::Key, S::Value)>> {
        let usable = match &self.nodes.hint {
            Some(h) => {
                h.root == root
                    && h.lo.as_ref().is_none_or(|lo| *lo <= key)
                    && h.hi.as_ref().is_none_or(|hi| key < *hi)
            }
            None => false,
        };
        let leaf = match &self.nodes.hint {
            Some(h) if usable => h.leaf,
            _ => return Ok(Err((key, value))),
        };
        if !self.is_owned(leaf)? {
            return Ok(Err((key, value)));
        }
        let Some(Node::Leaf(v)) = self.nodes.cache.get_mut(leaf) else {
            return Ok(Err((key, value)));
        };
        match leaf_find(v, &key) {
            Ok(i) => Ok(Ok(Some(std::mem::replace(&mut v[i].1, value)))),
            Err(i) => {
                v.insert(i, (key, value));
                let node = Node::<S>::Leaf(std::mem::take(v));
                let fits = node.fits();
                let Node::Leaf(back) = node else {
                    unreachable!("built as a leaf above")
                };
                *v = back;
                if fits {
                    Ok(Ok(None))
                } else {
                    let (k, x) = v.remove(i);
                    Ok(Err((k, x)))
                }
            }
        }
    }

    /// Records which leaf of `root` holds `key`, and the key range that leaf may hold.
    fn remember_leaf(&mut self, root: u64, key: &S::Key) -> Result<()> {
        let (mut loc, mut lo, mut hi) = (root, None, None);
        for _ in 0..=MAX_DEPTH {
            match self.node(loc)? {
                Node::Leaf(_) => {
                    self.nodes.hint = Some(InsertHint {
                        root,
                        leaf: loc,
                        lo,
                        hi,
                    });
                    return Ok(());
                }
                Node::Branch(v) => {
                    let i = child_index(v, key);
                    if i > 0 {
                        lo = Some(v[i].0.clone());
                    }
                    if let Some(n) = v.get(i + 1) {
                        hi = Some(n.0.clone());
                    }
                    loc = v[i].1;
                }
            }
        }
        Err(too_deep(root))
    }

    /// Inserts into the owned node `loc`; returns the replaced value and, when the node
    /// split, the first key and unit of the new right sibling.
    fn insert_into(
        &mut self,
        loc: u64,
        key: S::Key,
        value: S::Value,
        depth: u32,
    ) -> Result<InsertOutcome<S>> {
        if depth > MAX_DEPTH {
            return Err(too_deep(loc));
        }
        let (idx, child) = match self.node_mut(loc)? {
            Node::Leaf(v) => {
                let (old, at) = match leaf_find(v, &key) {
                    Ok(i) => (Some(std::mem::replace(&mut v[i].1, value)), i),
                    Err(i) => {
                        v.insert(i, (key, value));
                        (None, i)
                    }
                };
                return self.split_if_full(loc, at).map(|s| (old, s));
            }
            Node::Branch(v) => {
                let i = child_index(v, &key);
                if key < v[0].0 {
                    v[0].0 = key.clone();
                }
                (i, v[i].1)
            }
        };
        let new_child = self.shadow(child)?;
        if new_child != child {
            set_child(self.node_mut(loc)?, idx, new_child);
        }
        let (old, split) = self.insert_into(new_child, key, value, depth + 1)?;
        let Some((k, right)) = split else {
            return Ok((old, None));
        };
        if let Node::Branch(v) = self.node_mut(loc)? {
            v.insert(idx + 1, (k, right));
        }
        self.split_if_full(loc, idx + 1).map(|s| (old, s))
    }

    /// Splits the owned node `loc` when it outgrew its page after an insert at `at`.
    fn split_if_full(&mut self, loc: u64, at: usize) -> Result<Option<(S::Key, u64)>> {
        let node = self.node_mut(loc)?;
        if node.fits() {
            return Ok(None);
        }
        let ends_run = match &*node {
            Node::Leaf(v) => v.get(at + 1).is_some_and(|n| !S::same_run(&v[at].0, &n.0)),
            Node::Branch(v) => v.get(at + 1).is_some_and(|n| !S::same_run(&v[at].0, &n.0)),
        };
        let cut = split_point(at, &node.entry_lens(), ends_run);
        let right = match node {
            Node::Leaf(v) => Node::Leaf(v.split_off(cut)),
            Node::Branch(v) => Node::Branch(v.split_off(cut)),
        };
        let Some(key) = right.first_key().cloned() else {
            return Err(Error::corrupt("tree node", loc, "split into an empty node"));
        };
        let r = self.alloc_node(right)?;
        Ok(Some((key, r)))
    }

    /// Removes `key`; returns the new root (0 when the tree became empty) and the removed
    /// value, whose reference the caller now owns. A missing key changes nothing (no
    /// needless copying).
    pub(crate) fn remove(&mut self, root: u64, key: &S::Key) -> Result<(u64, Option<S::Value>)> {
        self.nodes.hint = None;
        if self.get(root, key)?.is_none() {
            return Ok((root, None));
        }
        let root = self.shadow(root)?;
        let (old, empty) = self.remove_from(root, key, 0)?;
        if empty {
            self.free_node(root)?;
            return Ok((0, old));
        }
        // A branch left with one child hands its reference to that child.
        if let Node::Branch(v) = self.node(root)? {
            if v.len() == 1 {
                let only = v[0].1;
                self.free_node(root)?;
                return Ok((only, old));
            }
        }
        Ok((root, old))
    }

    /// Drops the single reference to an owned, emptied (or bypassed) node.
    fn free_node(&mut self, loc: u64) -> Result<()> {
        self.sm.dec(loc, 1)?;
        self.nodes.cache.forget(loc);
        Ok(())
    }

    fn remove_from(
        &mut self,
        loc: u64,
        key: &S::Key,
        depth: u32,
    ) -> Result<(Option<S::Value>, bool)> {
        if depth > MAX_DEPTH {
            return Err(too_deep(loc));
        }
        let (idx, child) = match self.node_mut(loc)? {
            Node::Leaf(v) => {
                let old = leaf_find(v, key).ok().map(|i| v.remove(i).1);
                return Ok((old, v.is_empty()));
            }
            Node::Branch(v) => {
                let i = child_index(v, key);
                (i, v[i].1)
            }
        };
        let new_child = self.shadow(child)?;
        if new_child != child {
            set_child(self.node_mut(loc)?, idx, new_child);
        }
        let (old, child_empty) = self.remove_from(new_child, key, depth + 1)?;
        if child_empty {
            self.free_node(new_child)?;
            if let Node::Branch(v) = self.node_mut(loc)? {
                v.remove(idx);
                return Ok((old, v.is_empty()));
            }
        }
        Ok((old, false))
    }

    /// Adds a reference to a whole tree: what a snapshot or clone costs.
    pub(crate) fn share(&mut self, root: u64) -> Result<()> {
        self.nodes.hint = None;
        if root != 0 {
            self.sm.inc(root)?;
        }
        Ok(())
    }

    /// Drops a reference to a tree, freeing every node (and, through the schema, every
    /// value's reference) that nothing else reaches.
    pub(crate) fn drop_tree(&mut self, root: u64) -> Result<()> {
        self.nodes.hint = None;
        if root == 0 {
            return Ok(());
        }
        let mut stack = vec![root];
        while let Some(loc) = stack.pop() {
            // Read before dropping the reference: a freed page's contents stay intact until
            // the commit after next, but its cache entry goes.
            let node = self.node(loc)?.clone();
            if self.sm.dec(loc, 1)? > 0 {
                continue;
            }
            self.nodes.cache.forget(loc);
            match node {
                Node::Leaf(v) => {
                    for (_, x) in &v {
                        self.schema.dec_value(self.sm, x)?;
                    }
                }
                Node::Branch(v) => stack.extend(v.iter().map(|c| c.1)),
            }
        }
        Ok(())
    }

    /// Calls `f(node, depth)` on every node of the tree once per path that reaches it, so
    /// a shared subtree is visited as often as it is referenced from this tree (once).
    pub(crate) fn visit_nodes(
        &mut self,
        root: u64,
        mut f: impl FnMut(u64, &Node<S>) -> Result<()>,
    ) -> Result<()> {
        if root == 0 {
            return Ok(());
        }
        let mut stack = vec![(root, 0u32)];
        while let Some((loc, depth)) = stack.pop() {
            if depth > MAX_DEPTH {
                return Err(too_deep(loc));
            }
            let node = self.node(loc)?;
            if let Node::Branch(v) = node {
                stack.extend(v.iter().map(|c| (c.1, depth + 1)));
            }
            let node = node.clone();
            f(loc, &node)?;
        }
        Ok(())
    }
}

fn set_child<S: Schema>(n: &mut Node<S>, idx: usize, child: u64) {
    if let Node::Branch(v) = n {
        v[idx].1 = child;
    }
}

/// The bytes of entries a leaf can take (for tests that size trees).
#[cfg(test)]
pub(crate) const LEAF_PAYLOAD: usize = super::node::PAYLOAD;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::device::MemoryDevice;
    use crate::format::PageKind;
    use crate::pdata::codec::{Codec, Reader, Writer};
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    /// Fixed-size entries: u64 → u64.
    pub(crate) struct Numbers;
    impl Schema for Numbers {
        type Key = u64;
        type Value = u64;
        const LEAF: PageKind = PageKind::TestLeaf;
        const BRANCH: PageKind = PageKind::TestBranch;
    }

    impl Codec for (u64, String) {
        fn encoded_len(&self) -> usize {
            8 + self.1.encoded_len()
        }
        fn encode(&self, w: &mut Writer) {
            w.u64(self.0);
            self.1.encode(w);
        }
        fn decode(r: &mut Reader<'_>) -> Result<Self> {
            Ok((r.u64()?, String::decode(r)?))
        }
    }
    impl SearchKey for (u64, String) {}

    /// Variable-size keys and values, as the catalog's: (number, name) → text.
    pub(crate) struct Named;
    impl Schema for Named {
        type Key = (u64, String);
        type Value = String;
        const LEAF: PageKind = PageKind::TestLeaf;
        const BRANCH: PageKind = PageKind::TestBranch;
    }

    pub(crate) struct Env<S: Schema> {
        pub nodes: Nodes<S>,
        pub sm: SpaceMap,
        pub schema: S,
    }

    impl<S: Schema> Env<S> {
        pub(crate) fn new(schema: S, units: u64) -> Env<S> {
            let dev = Arc::new(MemoryDevice::new(units * 4096));
            let sm = SpaceMap::create(dev.clone(), units);
            Env {
                nodes: Nodes::new(PageCache::new(dev, 1, 1 << 20)),
                sm,
                schema,
            }
        }
        pub(crate) fn tree(&mut self) -> Tree<'_, S> {
            Tree {
                nodes: &mut self.nodes,
                sm: &mut self.sm,
                schema: &self.schema,
                reserve: Reserve::Keep,
            }
        }
        /// Writes every dirty page and makes it clean, as a commit does.
        pub(crate) fn commit(&mut self) {
            let dev = self.nodes.cache_dev();
            for (loc, page) in self.nodes.cache.sealed_dirty() {
                dev.write_at(&page[..], loc * 4096).unwrap();
            }
            for (loc, page) in self
                .sm
                .prepare_commit(self.nodes.cache.generation())
                .unwrap()
            {
                dev.write_at(&page[..], loc * 4096).unwrap();
            }
            self.nodes.commit_done();
            self.sm.commit_done();
        }
    }

    impl<S: Schema> Nodes<S> {
        fn cache_dev(&self) -> Arc<dyn crate::device::BlockDevice> {
            self.cache.dev()
        }
    }

    fn all<S: Schema>(t: &mut Tree<'_, S>, root: u64, from: &S::Key) -> Vec<(S::Key, S::Value)> {
        let mut v = Vec::new();
        t.scan(root, from, |k, x| {
            v.push((k.clone(), x.clone()));
            ControlFlow::Continue(())
        })
        .unwrap();
        v
    }

    #[derive(Clone, Debug)]
    enum Op<K, V> {
        Put(K, V),
        Remove(K),
        Snapshot,
        DropSnapshot(usize),
        Commit,
    }

    fn ops<K: Clone + std::fmt::Debug, V: Clone + std::fmt::Debug>(
        key: impl Strategy<Value = K> + Clone,
        value: impl Strategy<Value = V>,
    ) -> impl Strategy<Value = Vec<Op<K, V>>> {
        prop::collection::vec(
            prop_oneof![
                12 => (key.clone(), value).prop_map(|(k, v)| Op::Put(k, v)),
                5 => key.prop_map(Op::Remove),
                1 => Just(Op::Snapshot),
                1 => (0usize..8).prop_map(Op::DropSnapshot),
                1 => Just(Op::Commit),
            ],
            1..1500,
        )
    }

    /// Runs `ops` on a tree and on a `BTreeMap`, with snapshots (shared roots) frozen along
    /// the way, and checks after every step that the live tree, every frozen snapshot and
    /// range lookups all agree with the model, and at the end that dropping every tree
    /// returns every page.
    fn check_against_model<S: Schema>(schema: S, ops: Vec<Op<S::Key, S::Value>>)
    where
        S::Value: PartialEq,
    {
        let mut env = Env::new(schema, 1 << 14);
        // The space map's own pages come and go with commits; count only the rest.
        let other_units = |sm: &SpaceMap| {
            sm.used_units() - sm.own_pages().iter().filter(|&&l| l != 0).count() as u64
        };
        let base = other_units(&env.sm);
        let mut model: BTreeMap<S::Key, S::Value> = BTreeMap::new();
        let mut root = 0u64;
        // (root, the model it was frozen with)
        type Frozen<S> = (u64, BTreeMap<<S as Schema>::Key, <S as Schema>::Value>);
        let mut snaps: Vec<Frozen<S>> = Vec::new();
        for op in ops {
            let mut t = env.tree();
            match op {
                Op::Put(k, v) => {
                    let (r, old) = t.insert(root, k.clone(), v.clone()).unwrap();
                    root = r;
                    assert_eq!(old, model.insert(k, v));
                }
                Op::Remove(k) => {
                    let (r, old) = t.remove(root, &k).unwrap();
                    root = r;
                    assert_eq!(old, model.remove(&k));
                }
                Op::Snapshot => {
                    t.share(root).unwrap();
                    snaps.push((root, model.clone()));
                }
                Op::DropSnapshot(i) => {
                    if !snaps.is_empty() {
                        let (r, _) = snaps.remove(i % snaps.len());
                        t.drop_tree(r).unwrap();
                    }
                }
                Op::Commit => env.commit(),
            }
        }
        let mut t = env.tree();
        let want: Vec<_> = model.clone().into_iter().collect();
        let first = model.keys().next().cloned();
        if let Some(first) = &first {
            assert_eq!(all(&mut t, root, first), want);
            // A range lookup from the middle sees exactly the model's tail.
            let mid = model.keys().nth(model.len() / 2).unwrap().clone();
            let mut found = Vec::new();
            t.range(root, &mid, None, true, &mut found).unwrap();
            let tail: Vec<_> = model.range(mid.clone()..).map(|(k, _)| k.clone()).collect();
            assert_eq!(
                found.iter().map(|f| f.key.clone()).collect::<Vec<_>>(),
                tail
            );
            for (k, v) in model.iter().step_by(7) {
                assert_eq!(t.get(root, k).unwrap().as_ref(), Some(v));
                let below = model.range(..k.clone()).next_back();
                let got = t.last_below(root, k).unwrap();
                assert_eq!(got.as_ref().map(|(a, b)| (a, b)), below);
            }
        }
        for (r, m) in &snaps {
            if let Some(first) = m.keys().next() {
                assert_eq!(
                    all(&mut t, *r, first),
                    m.clone().into_iter().collect::<Vec<_>>()
                );
            } else {
                assert_eq!(*r, 0);
            }
        }
        t.drop_tree(root).unwrap();
        for (r, _) in snaps {
            t.drop_tree(r).unwrap();
        }
        assert_eq!(
            other_units(&env.sm),
            base,
            "dropping every tree returns every page"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn fixed_size_tree_matches_btreemap(ops in ops(0u64..3000, any::<u64>())) {
            check_against_model(Numbers, ops);
        }

        #[test]
        fn variable_size_tree_matches_btreemap(
            ops in ops((0u64..4, "[a-z]{0,40}"), "[a-z0-9]{0,300}")
        ) {
            check_against_model(Named, ops);
        }
    }

    /// Sequential inserts fill leaves completely (the append split), and every node of a
    /// big tree round-trips through the device after a commit, read cold.
    #[test]
    fn sequential_inserts_fill_leaves_and_read_back_cold() {
        let mut env = Env::new(Numbers, 1 << 14);
        let mut root = 0;
        for k in 0..20_000u64 {
            root = env.tree().insert(root, k, k * 3).unwrap().0;
        }
        let per_leaf = LEAF_PAYLOAD / 16;
        let mut leaves = 0;
        env.tree()
            .visit_nodes(root, |_, n| {
                if let Node::Leaf(_) = n {
                    leaves += 1;
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(leaves, 20_000usize.div_ceil(per_leaf));
        env.commit();
        env.nodes.cache.drop_clean();
        let reads = env.nodes.cache.reads();
        let mut t = env.tree();
        assert_eq!(t.get(root, &12_345).unwrap(), Some(12_345 * 3));
        assert_eq!(t.next_key(root, &20_000).unwrap(), None);
        assert_eq!(t.next_key(root, &19_999).unwrap(), Some(19_999));
        // One lookup reads one path: root, branch level, leaf.
        assert!(env.nodes.cache.reads() - reads <= 3);
        let mut t = env.tree();
        assert_eq!(all(&mut t, root, &0).len(), 20_000);
    }

    /// A change below a shared root copies only the path to the change; the other tree
    /// keeps every old page, and range lookups say which entries sit under shared nodes.
    #[test]
    fn shadowing_copies_one_path_and_reports_sharing() {
        let mut env = Env::new(Numbers, 1 << 14);
        let mut root = 0;
        for k in 0..5000u64 {
            root = env.tree().insert(root, k, k).unwrap().0;
        }
        env.commit();
        let snap = root;
        env.tree().share(snap).unwrap();
        let used = env.sm.used_units();
        let (new_root, old) = env.tree().insert(root, 77, 1).unwrap();
        assert_eq!(old, Some(77));
        assert_ne!(new_root, snap);
        // Root and one leaf copied (the tree has two levels).
        assert_eq!(env.sm.used_units() - used, 2);
        let mut t = env.tree();
        assert_eq!(t.get(snap, &77).unwrap(), Some(77));
        assert_eq!(t.get(new_root, &77).unwrap(), Some(1));
        let mut found = Vec::new();
        t.range(new_root, &70, Some(&80), true, &mut found).unwrap();
        assert_eq!(found.len(), 10);
        assert!(
            found.iter().all(|f| !f.path_shared),
            "the copied leaf is owned"
        );
        found.clear();
        t.range(new_root, &4000, Some(&4010), true, &mut found)
            .unwrap();
        assert!(
            found.iter().all(|f| f.path_shared),
            "other leaves are still shared"
        );
    }

    /// An entry larger than a quarter page is refused with a typed error, nothing changed.
    #[test]
    fn oversized_entries_are_refused() {
        let mut env = Env::new(Named, 1 << 10);
        let mut t = env.tree();
        let (root, _) = t.insert(0, (1, "a".into()), "x".into()).unwrap();
        let e = t
            .insert(root, (1, "b".into()), "y".repeat(MAX_ENTRY))
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        assert_eq!(t.get(root, &(1, "b".into())).unwrap(), None);
    }
}
