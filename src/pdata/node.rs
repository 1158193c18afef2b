//! Tree nodes and their pages. A leaf holds sorted (key, value) entries; a branch holds
//! (lowest key of the child, child page). Both are sized in bytes, so keys and values may
//! vary in length (catalog names) or be fixed (block mappings, counted without summing).
//!
//! Page layout after the common 32-byte header (whose bytes 24..26 hold the entry count):
//! the entries back to back, each key's encoding followed by its value's (or by the child's
//! unit, 8 bytes, in a branch).

use super::codec::{Codec, Reader, Writer};
use crate::error::{Error, Result};
use crate::format::{self, new_page, Page, PageKind, HEADER_LEN, PAGE_SIZE};
use crate::space::SpaceMap;
use std::fmt::Debug;

/// Bytes of entries a node page holds.
pub(crate) const PAYLOAD: usize = PAGE_SIZE - HEADER_LEN;
/// The largest entry a tree accepts: a node that fits plus one more entry then always splits
/// into two halves that fit (see `split_point`).
pub(crate) const MAX_ENTRY: usize = PAYLOAD / 4;

/// Finds entries by key. The default is a binary search; keys with a numeric order may do
/// better (block numbers interpolate, see [`crate::btree`]).
pub(crate) trait SearchKey: Ord + Clone + Debug + Codec {
    /// Index of the first entry whose key is `>= key`.
    fn lower_bound<T>(v: &[T], key: &Self, k: impl Fn(&T) -> &Self) -> usize {
        v.partition_point(|e| k(e) < key)
    }

    /// Index of the first entry whose key is `> key`.
    fn upper_bound<T>(v: &[T], key: &Self, k: impl Fn(&T) -> &Self) -> usize {
        v.partition_point(|e| k(e) <= key)
    }
}

/// What one kind of tree stores, and what its values reference.
///
/// The tree counts references to its own nodes in the space map. What a value references
/// (a data block, say) is the schema's business: when a shared leaf is copied, every value
/// in it is referenced once more, and when a leaf is freed, once less. These calls are the
/// only way the tree touches what values mean (thin-provisioning-tools' `RefCounter`).
pub(crate) trait Schema {
    type Key: SearchKey;
    type Value: Codec + Clone + Debug;
    /// Page kinds of this tree's leaves and branches.
    const LEAF: PageKind;
    const BRANCH: PageKind;

    /// Checks a decoded value (for example that a unit it names is inside the pool).
    fn check_value(_v: &Self::Value, _total_units: u64) -> std::result::Result<(), String> {
        Ok(())
    }

    /// Whether `a` and `b` (adjacent keys) belong to one run of keys that grows at its end,
    /// such as one volume's snapshot records by generation inside a catalog whose other
    /// entries follow. A node that overflows right after the last key of a run splits
    /// there, so runs appended to in order fill their nodes instead of leaving each one
    /// half full. The default, one run per tree, keeps only the append split at the end.
    fn same_run(_a: &Self::Key, _b: &Self::Key) -> bool {
        true
    }

    /// A copy of a shared leaf now holds `v` too.
    fn inc_value(&self, _sm: &mut SpaceMap, _v: &Self::Value) -> Result<()> {
        Ok(())
    }

    /// A leaf holding `v` was freed, or `v` was removed or replaced.
    fn dec_value(&self, _sm: &mut SpaceMap, _v: &Self::Value) -> Result<()> {
        Ok(())
    }
}

pub(crate) enum Node<S: Schema> {
    Leaf(Vec<(S::Key, S::Value)>),
    /// (lowest key of the child, child page)
    Branch(Vec<(S::Key, u64)>),
}

impl<S: Schema> Clone for Node<S> {
    fn clone(&self) -> Self {
        match self {
            Node::Leaf(v) => Node::Leaf(v.clone()),
            Node::Branch(v) => Node::Branch(v.clone()),
        }
    }
}

impl<S: Schema> Debug for Node<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Node::Leaf(v) => f.debug_tuple("Leaf").field(v).finish(),
            Node::Branch(v) => f.debug_tuple("Branch").field(v).finish(),
        }
    }
}

/// Encoded size of a leaf entry.
pub(crate) fn leaf_entry_len<S: Schema>(k: &S::Key, v: &S::Value) -> usize {
    k.encoded_len() + v.encoded_len()
}

fn branch_entry_len<K: Codec>(k: &K) -> usize {
    k.encoded_len() + 8
}

impl<S: Schema> Node<S> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Node::Leaf(v) => v.len(),
            Node::Branch(v) => v.len(),
        }
    }

    /// Whether the node's entries fit its page.
    pub(crate) fn fits(&self) -> bool {
        match self {
            Node::Leaf(v) => match (<S::Key as Codec>::FIXED, <S::Value as Codec>::FIXED) {
                (Some(k), Some(val)) => v.len() * (k + val) <= PAYLOAD,
                _ => {
                    v.iter()
                        .map(|(k, x)| leaf_entry_len::<S>(k, x))
                        .sum::<usize>()
                        <= PAYLOAD
                }
            },
            Node::Branch(v) => match <S::Key as Codec>::FIXED {
                Some(k) => v.len() * (k + 8) <= PAYLOAD,
                None => v.iter().map(|(k, _)| branch_entry_len(k)).sum::<usize>() <= PAYLOAD,
            },
        }
    }

    /// The node's entry sizes in bytes, for choosing a split.
    pub(crate) fn entry_lens(&self) -> Vec<usize> {
        match self {
            Node::Leaf(v) => v.iter().map(|(k, x)| leaf_entry_len::<S>(k, x)).collect(),
            Node::Branch(v) => v.iter().map(|(k, _)| branch_entry_len(k)).collect(),
        }
    }

    pub(crate) fn first_key(&self) -> Option<&S::Key> {
        match self {
            Node::Leaf(v) => v.first().map(|e| &e.0),
            Node::Branch(v) => v.first().map(|e| &e.0),
        }
    }

    pub(crate) fn encode(&self, location: u64, generation: u64) -> Box<Page> {
        let mut w = Writer(Vec::with_capacity(PAYLOAD));
        let kind = match self {
            Node::Leaf(v) => {
                for (k, x) in v {
                    k.encode(&mut w);
                    x.encode(&mut w);
                }
                S::LEAF
            }
            Node::Branch(v) => {
                for (k, c) in v {
                    k.encode(&mut w);
                    w.u64(*c);
                }
                S::BRANCH
            }
        };
        let mut p = new_page();
        // Nodes are split before they outgrow a page; a node that did not would be a bug
        // in this module, and cutting it short here would fail its decode, not pass silently.
        let n = w.0.len().min(PAYLOAD);
        p[HEADER_LEN..HEADER_LEN + n].copy_from_slice(&w.0[..n]);
        format::put_u16(&mut p[..], 24, self.len() as u16);
        format::seal(&mut p, kind, location, generation);
        p
    }

    /// Decodes and validates a node page: checksum, kind, location, entry count, entries
    /// inside the page, strictly increasing keys, child pointers inside the pool and not
    /// the page itself, and the schema's check of every value. Returns the node and the
    /// generation of the commit that wrote it.
    pub(crate) fn decode(p: &Page, location: u64, total_units: u64) -> Result<(Node<S>, u64)> {
        let (kind, written) = format::verify(p, &[S::LEAF, S::BRANCH], location)?;
        let n = format::get_u16(&p[..], 24) as usize;
        let bad = |d: String| Error::corrupt(kind.name(), location, d);
        if n == 0 || n > PAYLOAD {
            return Err(bad(format!("{n} entries")));
        }
        let mut r = Reader::new(&p[HEADER_LEN..], kind.name(), location);
        let node = if kind == S::LEAF {
            let mut v: Vec<(S::Key, S::Value)> = Vec::with_capacity(n);
            // Fixed-size entries (block maps) are bounded once for the whole node, so a
            // cold scan does not pay a bounds check per field of every entry it reads.
            if let (Some(kl), Some(vl)) = (<S::Key as Codec>::FIXED, <S::Value as Codec>::FIXED) {
                let len = n
                    .checked_mul(kl + vl)
                    .filter(|&l| l <= PAYLOAD)
                    .ok_or_else(|| bad(format!("{n} entries do not fit the page")))?;
                r = Reader::new(&p[HEADER_LEN..HEADER_LEN + len], kind.name(), location);
            }
            for _ in 0..n {
                let k = S::Key::decode(&mut r)?;
                let x = S::Value::decode(&mut r)?;
                if v.last().is_some_and(|last| last.0 >= k) {
                    return Err(bad("keys out of order".into()));
                }
                S::check_value(&x, total_units).map_err(|d| bad(format!("key {k:?}: {d}")))?;
                v.push((k, x));
            }
            Node::Leaf(v)
        } else {
            let mut v = Vec::with_capacity(n);
            for i in 0..n {
                let k = S::Key::decode(&mut r)?;
                let c = r.u64()?;
                if c < format::SUPERBLOCK_UNITS || c >= total_units || c == location {
                    return Err(bad(format!("child {i} points at {c}")));
                }
                v.push((k, c));
            }
            if !v.windows(2).all(|w| w[0].0 < w[1].0) {
                return Err(bad("keys out of order".into()));
            }
            Node::Branch(v)
        };
        Ok((node, written))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdata::btree::tests::{Named, Numbers};

    #[test]
    fn pages_round_trip_and_hostile_pages_are_refused() {
        let leaf: Node<Named> = Node::Leaf(
            (0..40u64)
                .map(|i| ((i % 4, format!("name-{i:03}")), "x".repeat(i as usize)))
                .collect::<std::collections::BTreeMap<_, _>>()
                .into_iter()
                .collect(),
        );
        assert!(leaf.fits());
        let p = leaf.encode(7, 3);
        let (back, generation) = Node::<Named>::decode(&p, 7, 100).unwrap();
        assert_eq!(generation, 3);
        assert_eq!(format!("{back:?}"), format!("{leaf:?}"));
        // Another location, another tree's kinds, or a flipped byte: refused.
        assert!(matches!(
            Node::<Named>::decode(&p, 8, 100),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            Node::<Numbers>::decode(&p, 7, 100),
            Err(Error::Corrupt { .. })
        ));
        // Keys out of order, even under a valid checksum.
        let unordered: Node<Numbers> = Node::Branch(vec![(5, 10), (3, 11)]);
        let p = unordered.encode(6, 1);
        assert!(matches!(
            Node::<Numbers>::decode(&p, 6, 1000),
            Err(Error::Corrupt { .. })
        ));
        // A child outside the pool.
        let far: Node<Numbers> = Node::Branch(vec![(1, 10), (3, 5000)]);
        assert!(Node::<Numbers>::decode(&far.encode(6, 1), 6, 1000).is_err());
        // An entry count larger than what the page holds.
        let mut p = Node::<Numbers>::Leaf(vec![(1, 2)]).encode(9, 1);
        format::put_u16(&mut p[..], 24, 300);
        format::seal(&mut p, PageKind::TestLeaf, 9, 1);
        assert!(matches!(
            Node::<Numbers>::decode(&p, 9, 1000),
            Err(Error::Corrupt { .. })
        ));
        // A full fixed-size leaf fits; one more entry does not.
        let full: Node<Numbers> = Node::Leaf((0..PAYLOAD as u64 / 16).map(|k| (k, k)).collect());
        assert!(full.fits());
        let Node::Leaf(mut v) = full else {
            unreachable!()
        };
        v.push((u64::MAX, 0));
        assert!(!Node::<Numbers>::Leaf(v).fits());
    }
}
