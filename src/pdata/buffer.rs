//! A one-page write buffer in front of a copy-on-write B+tree: the root buffer of a
//! B^ε-tree.
//!
//! A tree whose inserts land in several unrelated places (the catalog: a snapshot's record,
//! its name and its id are three keys far apart) writes one leaf path per place at every
//! commit, and the paths grow with the tree. Here changes wait in memory, and a commit
//! writes them as one buffer page; only when they outgrow the page do they go into the
//! tree, all at once, so entries bound for one leaf (a volume's new snapshot records, the
//! time-ordered ids) share its path. A commit then usually writes one page of the tree,
//! whatever the tree holds.
//!
//! Reads see the buffer over the tree: a buffered value or removal (a tombstone) hides the
//! tree's entry. The buffer page is copy-on-write like any page: each commit that changes
//! the buffer writes it to a fresh unit and frees the old one, and the superblock names it.
//!
//! Values must not hold references the schema counts (`inc_value`/`dec_value`): a value
//! replaced in the buffer never reached the tree. The catalog's values hold none (its
//! operations count the roots they share themselves).

use super::btree::Tree;
use super::codec::{Codec, Reader, Writer};
use super::node::{leaf_entry_len, Schema, MAX_ENTRY, PAYLOAD};
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{self, new_page, Page, PageKind, HEADER_LEN, PAGE_SIZE};
use std::collections::BTreeMap;
use std::ops::ControlFlow;

/// Buffered bytes at which the buffer goes into the tree before the commit (a transaction
/// that changes much, such as deleting a volume with many snapshots).
const SPILL_BYTES: usize = 4 * PAYLOAD;

pub(crate) struct Buffer<S: Schema> {
    kind: PageKind,
    /// Pending changes: a value, or `None` for a removal of a key the tree holds.
    pending: BTreeMap<S::Key, Option<S::Value>>,
    /// Encoded size of `pending` in a buffer page.
    bytes: usize,
    /// Unit of the committed buffer page (0: none).
    page: u64,
    /// `pending` differs from what `page` holds.
    changed: bool,
    /// The page the next commit writes, once prepared.
    sealed: Option<(u64, Box<Page>)>,
}

fn entry_len<S: Schema>(k: &S::Key, v: &Option<S::Value>) -> usize {
    k.encoded_len() + 1 + v.as_ref().map_or(0, |v| v.encoded_len())
}

impl<S: Schema> Buffer<S> {
    /// An empty buffer whose pages are of `kind`.
    pub(crate) fn new(kind: PageKind) -> Buffer<S> {
        Buffer {
            kind,
            pending: BTreeMap::new(),
            bytes: 0,
            page: 0,
            changed: false,
            sealed: None,
        }
    }

    /// The buffer committed at unit `page` (0: an empty buffer), read and verified now.
    pub(crate) fn open(
        dev: &dyn BlockDevice,
        kind: PageKind,
        page: u64,
        total_units: u64,
    ) -> Result<Buffer<S>> {
        let mut b = Buffer::new(kind);
        if page == 0 {
            return Ok(b);
        }
        let what = kind.name();
        if !(format::SUPERBLOCK_UNITS..total_units).contains(&page) {
            return Err(Error::corrupt(what, page, "location outside the pool"));
        }
        let mut p = new_page();
        dev.read_at(&mut p[..], page * PAGE_SIZE as u64)?;
        format::verify(&p, &[kind], page)?;
        let n = format::get_u16(&p[..], 24) as usize;
        let mut r = Reader::new(&p[HEADER_LEN..], what, page);
        for _ in 0..n {
            let k = S::Key::decode(&mut r)?;
            let v = match r.u8()? {
                0 => None,
                1 => {
                    let v = S::Value::decode(&mut r)?;
                    S::check_value(&v, total_units)
                        .map_err(|d| Error::corrupt(what, page, format!("key {k:?}: {d}")))?;
                    Some(v)
                }
                t => return Err(Error::corrupt(what, page, format!("entry tag {t}"))),
            };
            if b.pending
                .last_key_value()
                .is_some_and(|(last, _)| *last >= k)
            {
                return Err(Error::corrupt(what, page, "keys out of order"));
            }
            b.bytes += entry_len::<S>(&k, &v);
            b.pending.insert(k, v);
        }
        b.page = page;
        Ok(b)
    }

    /// Unit of the committed buffer page (0: none), for the superblock.
    pub(crate) fn page(&self) -> u64 {
        self.page
    }

    fn set(&mut self, key: S::Key, v: Option<S::Value>) {
        self.bytes += entry_len::<S>(&key, &v);
        if let Some(old) = self.pending.insert(key.clone(), v) {
            self.bytes -= entry_len::<S>(&key, &old);
        }
        self.changed = true;
    }

    fn unset(&mut self, key: &S::Key) {
        if let Some(old) = self.pending.remove(key) {
            self.bytes -= entry_len::<S>(key, &old);
            self.changed = true;
        }
    }

    /// The value of `key`.
    pub(crate) fn get(
        &self,
        t: &mut Tree<'_, S>,
        root: u64,
        key: &S::Key,
    ) -> Result<Option<S::Value>> {
        match self.pending.get(key) {
            Some(v) => Ok(v.clone()),
            None => t.get(root, key),
        }
    }

    /// Maps `key` to `value`.
    pub(crate) fn insert(
        &mut self,
        t: &mut Tree<'_, S>,
        root: &mut u64,
        key: S::Key,
        value: S::Value,
    ) -> Result<()> {
        // The tree refuses such an entry when it arrives; refuse it now, not at the commit.
        let len = leaf_entry_len::<S>(&key, &value);
        if len > MAX_ENTRY {
            return Err(Error::InvalidArgument(format!(
                "a tree entry of {len} bytes is larger than the {MAX_ENTRY} bytes one may take"
            )));
        }
        self.set(key, Some(value));
        self.spill_if_large(t, root)
    }

    /// Removes `key`; returns the value it had.
    pub(crate) fn remove(
        &mut self,
        t: &mut Tree<'_, S>,
        root: &mut u64,
        key: &S::Key,
    ) -> Result<Option<S::Value>> {
        let old = self.get(t, *root, key)?;
        if old.is_none() {
            return Ok(None);
        }
        if t.get(*root, key)?.is_some() {
            self.set(key.clone(), None);
        } else {
            self.unset(key);
        }
        self.spill_if_large(t, root)?;
        Ok(old)
    }

    fn spill_if_large(&mut self, t: &mut Tree<'_, S>, root: &mut u64) -> Result<()> {
        if self.bytes > SPILL_BYTES {
            self.spill(t, root)?;
        }
        Ok(())
    }

    /// Moves every pending change into the tree, in key order (one path per leaf touched).
    pub(crate) fn spill(&mut self, t: &mut Tree<'_, S>, root: &mut u64) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        self.bytes = 0;
        self.changed = true;
        for (k, v) in pending {
            // Replaced and removed values were handed out when they were buffered.
            *root = match v {
                Some(v) => t.insert(*root, k, v)?.0,
                None => t.remove(*root, &k)?.0,
            };
        }
        Ok(())
    }

    /// Calls `f` on every entry from `from` on, in key order, until it breaks.
    pub(crate) fn scan(
        &self,
        t: &mut Tree<'_, S>,
        root: u64,
        from: &S::Key,
        mut f: impl FnMut(&S::Key, &S::Value) -> ControlFlow<()>,
    ) -> Result<()> {
        let mut p = self.pending.range(from.clone()..).peekable();
        let mut stopped = false;
        t.scan(root, from, |k, v| {
            while let Some((pk, pv)) = p.next_if(|(pk, _)| *pk < k) {
                if let Some(pv) = pv {
                    if f(pk, pv).is_break() {
                        stopped = true;
                        return ControlFlow::Break(());
                    }
                }
            }
            let shown = match p.next_if(|(pk, _)| *pk == k) {
                Some((_, over)) => over.as_ref(),
                None => Some(v),
            };
            if let Some(v) = shown {
                if f(k, v).is_break() {
                    stopped = true;
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        })?;
        if !stopped {
            for (pk, pv) in p {
                if let Some(pv) = pv {
                    if f(pk, pv).is_break() {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// The first key at or after `from`.
    pub(crate) fn next_key(
        &self,
        t: &mut Tree<'_, S>,
        root: u64,
        from: &S::Key,
    ) -> Result<Option<S::Key>> {
        let mut found = None;
        self.scan(t, root, from, |k, _| {
            found = Some(k.clone());
            ControlFlow::Break(())
        })?;
        Ok(found)
    }

    /// The entry with the greatest key below `hi`.
    pub(crate) fn last_below(
        &self,
        t: &mut Tree<'_, S>,
        root: u64,
        hi: &S::Key,
    ) -> Result<Option<(S::Key, S::Value)>> {
        // The tree's candidate, stepping past keys the buffer removed.
        let mut bound = hi.clone();
        let in_tree = loop {
            match t.last_below(root, &bound)? {
                Some((k, _)) if matches!(self.pending.get(&k), Some(None)) => bound = k,
                found => break found,
            }
        };
        let buffered = self
            .pending
            .range(..hi.clone())
            .rev()
            .find_map(|(k, v)| v.as_ref().map(|v| (k.clone(), v.clone())));
        // Equal keys: the buffered value is the newer one. A tree key the buffer overrides
        // with a value is never the greater: the buffered candidate is at least that key.
        Ok(match (in_tree, buffered) {
            (Some(t), Some(b)) if t.0 > b.0 => Some(t),
            (_, Some(b)) => Some(b),
            (t, None) => t,
        })
    }

    /// Readies the commit: changes that outgrow a page go into the tree; otherwise the
    /// buffer is sealed into a fresh page (the old page is freed: it stays intact until
    /// the commit after next, as every freed page does).
    pub(crate) fn prepare_commit(&mut self, t: &mut Tree<'_, S>, root: &mut u64) -> Result<()> {
        if !self.changed {
            return Ok(());
        }
        if self.bytes > PAYLOAD || self.pending.len() > usize::from(u16::MAX) {
            self.spill(t, root)?;
        }
        if self.page != 0 {
            t.sm.dec(self.page, 1)?;
            self.page = 0;
        }
        if !self.pending.is_empty() {
            let loc = t.sm.alloc_page(t.reserve, "catalog commit")?;
            let mut w = Writer(Vec::with_capacity(self.bytes));
            for (k, v) in &self.pending {
                k.encode(&mut w);
                match v {
                    Some(v) => {
                        w.u8(1);
                        v.encode(&mut w);
                    }
                    None => w.u8(0),
                }
            }
            let mut p = new_page();
            p[HEADER_LEN..HEADER_LEN + w.0.len()].copy_from_slice(&w.0);
            format::put_u16(&mut p[..], 24, self.pending.len() as u16);
            format::seal(&mut p, self.kind, loc, t.nodes.cache.generation());
            self.page = loc;
            self.sealed = Some((loc, p));
        }
        self.changed = false;
        Ok(())
    }

    /// The sealed page the commit writes, if the buffer changed.
    pub(crate) fn sealed_page(&self) -> Option<(u64, Box<Page>)> {
        self.sealed.clone()
    }

    /// The commit is durable.
    pub(crate) fn commit_done(&mut self) {
        self.sealed = None;
    }

    /// Whether the buffer holds changes the next commit must write.
    pub(crate) fn changed(&self) -> bool {
        self.changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdata::btree::tests::{Env, Named, Numbers};
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op<K, V> {
        Put(K, V),
        Remove(K),
        /// Commit; with `true`, reopen the buffer from its page as a new process would.
        Commit(bool),
        Spill,
    }

    fn ops<K: Clone + std::fmt::Debug, V: Clone + std::fmt::Debug>(
        key: impl Strategy<Value = K> + Clone,
        value: impl Strategy<Value = V>,
    ) -> impl Strategy<Value = Vec<Op<K, V>>> {
        prop::collection::vec(
            prop_oneof![
                12 => (key.clone(), value).prop_map(|(k, v)| Op::Put(k, v)),
                6 => key.prop_map(Op::Remove),
                2 => any::<bool>().prop_map(Op::Commit),
                1 => Just(Op::Spill),
            ],
            1..800,
        )
    }

    const KIND: PageKind = PageKind::TestBranch;

    /// Runs `ops` on a buffered tree and on a `BTreeMap` and checks, after every step, a
    /// point lookup and, every few steps and at the end, the merged scan, `next_key` and
    /// `last_below` against the model; commits write and reopen the buffer page.
    fn check_against_model<S: Schema>(schema: S, ops: Vec<Op<S::Key, S::Value>>)
    where
        S::Value: PartialEq,
    {
        let units = 1 << 14;
        let mut env = Env::new(schema, units);
        let dev = env.nodes.cache.dev();
        let mut b: Buffer<S> = Buffer::new(KIND);
        let mut root = 0u64;
        let mut model: BTreeMap<S::Key, S::Value> = BTreeMap::new();
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Put(k, v) => {
                    b.insert(&mut env.tree(), &mut root, k.clone(), v.clone())
                        .unwrap();
                    model.insert(k.clone(), v);
                    assert_eq!(
                        b.get(&mut env.tree(), root, &k).unwrap(),
                        model.get(&k).cloned()
                    );
                }
                Op::Remove(k) => {
                    let old = b.remove(&mut env.tree(), &mut root, &k).unwrap();
                    assert_eq!(old, model.remove(&k));
                    assert_eq!(b.get(&mut env.tree(), root, &k).unwrap(), None);
                }
                Op::Spill => b.spill(&mut env.tree(), &mut root).unwrap(),
                Op::Commit(reopen) => {
                    b.prepare_commit(&mut env.tree(), &mut root).unwrap();
                    assert!(b.bytes <= PAYLOAD, "a sealed buffer fits its page");
                    if let Some((loc, p)) = b.sealed_page() {
                        dev.write_at(&p[..], loc * PAGE_SIZE as u64).unwrap();
                    }
                    env.commit();
                    b.commit_done();
                    if reopen {
                        b = Buffer::open(&*dev, KIND, b.page(), units).unwrap();
                    }
                }
            }
            if step % 16 == 0 {
                check_reads(&mut env, &b, root, &model);
            }
        }
        check_reads(&mut env, &b, root, &model);
    }

    fn check_reads<S: Schema>(
        env: &mut Env<S>,
        b: &Buffer<S>,
        root: u64,
        model: &BTreeMap<S::Key, S::Value>,
    ) where
        S::Value: PartialEq,
    {
        let Some(first) = model.keys().next().cloned() else {
            return;
        };
        let mut seen = Vec::new();
        b.scan(&mut env.tree(), root, &first, |k, v| {
            seen.push((k.clone(), v.clone()));
            ControlFlow::Continue(())
        })
        .unwrap();
        let want: Vec<_> = model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        assert!(seen == want, "merged scan differs from the model");
        // A scan that stops early stops where it was told.
        let mut n = 0;
        b.scan(&mut env.tree(), root, &first, |_, _| {
            n += 1;
            if n == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
        assert_eq!(n, model.len().min(3));
        for k in model.keys().step_by(5) {
            let below = model.range(..k.clone()).next_back();
            let got = b.last_below(&mut env.tree(), root, k).unwrap();
            assert!(
                got.as_ref().map(|(a, v)| (a, v)) == below,
                "last_below({k:?})"
            );
            let next = model.range(k.clone()..).next().map(|(a, _)| a.clone());
            assert_eq!(b.next_key(&mut env.tree(), root, k).unwrap(), next);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn fixed_size_buffered_tree_matches_btreemap(ops in ops(0u64..2000, any::<u64>())) {
            check_against_model(Numbers, ops);
        }

        #[test]
        fn variable_size_buffered_tree_matches_btreemap(
            ops in ops((0u64..4, "[a-z]{0,30}"), "[a-z0-9]{0,200}")
        ) {
            check_against_model(Named, ops);
        }
    }

    /// A damaged buffer page is corruption, named as such, and never read as changes.
    #[test]
    fn a_damaged_buffer_page_is_refused() {
        let units = 1 << 10;
        let mut env = Env::new(Numbers, units);
        let dev = env.nodes.cache.dev();
        let mut b: Buffer<Numbers> = Buffer::new(KIND);
        let mut root = 0;
        for k in 0..20u64 {
            b.insert(&mut env.tree(), &mut root, k, k + 1).unwrap();
        }
        b.prepare_commit(&mut env.tree(), &mut root).unwrap();
        let (loc, mut p) = b.sealed_page().unwrap();
        assert_eq!(root, 0, "twenty entries wait in the buffer");
        dev.write_at(&p[..], loc * PAGE_SIZE as u64).unwrap();
        let back: Buffer<Numbers> = Buffer::open(&*dev, KIND, loc, units).unwrap();
        assert_eq!(back.pending.len(), 20);
        p[100] ^= 1;
        dev.write_at(&p[..], loc * PAGE_SIZE as u64).unwrap();
        assert!(matches!(
            Buffer::<Numbers>::open(&*dev, KIND, loc, units),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            Buffer::<Numbers>::open(&*dev, KIND, units + 5, units),
            Err(Error::Corrupt { .. })
        ));
    }
}
