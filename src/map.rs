//! Block maps: each volume's and snapshot's map from virtual block number to (physical
//! unit, birth generation), an instance of the generic copy-on-write tree
//! ([`crate::pdata::btree`]). What is specific to blocks lives here: the value's encoding,
//! how a value's reference to its data block is counted, the interpolating search that dense
//! runs of block numbers allow, and the bookmark diff that reads birth generations.

use crate::error::{Error, Result};
use crate::format::{self, PageKind};
use crate::pdata::btree::{self, Tree};
use crate::pdata::codec::{Codec, Reader, Writer};
use crate::pdata::node::{Node, Schema, SearchKey};
use crate::space::SpaceMap;

/// Where a virtual block lives, since when, and what it holds: in a pool with data
/// checksums, the CRC32 of the block's contents, kept beside the pointer (as ZFS keeps it
/// in the block pointer) so a block and its checksum are committed together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MapValue {
    /// First unit of the data block (below 2^48).
    pub unit: u64,
    /// Generation of the transaction that wrote the block (below 2^48).
    pub birth: u64,
    /// CRC32 of the whole block (0 and unused in a pool without data checksums).
    pub sum: u32,
}

/// Bits of a unit number and of a generation in a map value's two words; the checksum
/// takes the 16 bits above each. A pool holds at most 2^34 units and a generation passes
/// 2^48 after 2^48 commits, so neither is ever cut; and a pool without data checksums has
/// zeros there, which is how values were laid out before checksums existed.
pub(crate) const VALUE_BITS: u32 = 48;
const VALUE_MASK: u64 = (1 << VALUE_BITS) - 1;

impl Codec for MapValue {
    const FIXED: Option<usize> = Some(16);
    fn encoded_len(&self) -> usize {
        16
    }
    fn encode(&self, w: &mut Writer) {
        let (hi, lo) = (u64::from(self.sum >> 16), u64::from(self.sum & 0xffff));
        w.u64(self.unit & VALUE_MASK | hi << VALUE_BITS);
        w.u64(self.birth & VALUE_MASK | lo << VALUE_BITS);
    }
    #[inline]
    fn decode(r: &mut Reader<'_>) -> Result<MapValue> {
        let (a, b) = (r.u64()?, r.u64()?);
        Ok(MapValue {
            unit: a & VALUE_MASK,
            birth: b & VALUE_MASK,
            sum: ((a >> VALUE_BITS) << 16 | b >> VALUE_BITS) as u32,
        })
    }
}

pub(crate) use crate::checksum::block_sum;

/// Block numbers. Block maps are mostly dense runs of consecutive keys, so a guess
/// interpolated between the first and last key usually lands on the answer: one or two
/// cache lines of a 4 KiB node instead of the eight probes of a binary search. A gallop from
/// the guess bounds the answer when keys are uneven, so the worst case stays logarithmic.
impl SearchKey for u64 {
    fn lower_bound<T>(v: &[T], key: &u64, k: impl Fn(&T) -> &u64) -> usize {
        lower_bound(v, *key, |e| *k(e))
    }

    fn upper_bound<T>(v: &[T], key: &u64, k: impl Fn(&T) -> &u64) -> usize {
        match key.checked_add(1) {
            Some(next) => lower_bound(v, next, |e| *k(e)),
            None => v.len(),
        }
    }
}

/// Index of the first entry whose key is `>= key` in entries sorted by strictly increasing
/// key (what `partition_point(|e| k(e) < key)` returns).
fn lower_bound<T>(v: &[T], key: u64, k: impl Fn(&T) -> u64) -> usize {
    let n = v.len();
    let (Some(first), Some(last)) = (v.first(), v.last()) else {
        return 0;
    };
    let (first, last) = (k(first), k(last));
    if key <= first {
        return 0;
    }
    if key > last {
        return n;
    }
    // first < key <= last, so n >= 2, last > first, and the guess is in 0..n.
    let guess = ((key - first) as u128 * (n - 1) as u128 / (last - first) as u128) as usize;
    // Find lo < hi with k(v[lo]) < key <= k(v[hi]); the answer is in lo+1..=hi.
    let (mut lo, mut hi) = (guess, guess);
    let mut step = 1;
    if k(&v[guess]) < key {
        loop {
            hi = (lo + step).min(n - 1);
            if k(&v[hi]) >= key {
                break;
            }
            lo = hi;
            step *= 2;
        }
    } else {
        loop {
            lo = hi.saturating_sub(step);
            if k(&v[lo]) < key {
                break;
            }
            hi = lo;
            step *= 2;
        }
    }
    lo + 1 + v[lo + 1..hi].partition_point(|e| k(e) < key)
}

/// The block map schema. A leaf entry holds one reference to its data block: copying a
/// shared leaf adds one, freeing a leaf drops one (freeing the block's units at zero).
pub(crate) struct BlockMap {
    /// Units per data block.
    pub block_units: u64,
}

impl Schema for BlockMap {
    type Key = u64;
    type Value = MapValue;
    const LEAF: PageKind = PageKind::MapLeaf;
    const BRANCH: PageKind = PageKind::MapBranch;

    fn check_value(v: &MapValue, total_units: u64) -> std::result::Result<(), String> {
        if v.unit < format::SUPERBLOCK_UNITS || v.unit >= total_units {
            return Err(format!("maps to unit {} outside the pool", v.unit));
        }
        Ok(())
    }

    fn inc_value(&self, sm: &mut SpaceMap, v: &MapValue) -> Result<()> {
        sm.inc(v.unit)
    }

    fn dec_value(&self, sm: &mut SpaceMap, v: &MapValue) -> Result<()> {
        sm.dec(v.unit, self.block_units).map(|_| ())
    }
}

/// A mapping found by a lookup, with whether a node on its path is shared.
pub(crate) type Found = btree::Found<u64, MapValue>;
/// A block whose mapping differs between two maps.
pub(crate) type Change = crate::pdata::diff::Change<u64, MapValue>;

impl Tree<'_, BlockMap> {
    /// The keys in `lo..hi` of the map at `root` that may differ from the same lineage's map
    /// at generation `since`, in key order, judged from this map alone: keys born after
    /// `since` (with their mapping), and keys this map does not hold that may have been
    /// discarded since (`now: None`; some of them may have been unmapped then too).
    ///
    /// Nodes are copy-on-write and record the generation that wrote them, so a subtree
    /// written at or before `since` is unchanged within its own first..last key, holes
    /// included, and is skipped. Not within the range its parent's separators give it: a
    /// leaf emptied since `since` is removed and its old range falls to a neighbour that may
    /// be unchanged, so only the real key span counts.
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
            for (key, m) in self.leaf_entries(loc, &lo, Some(&hi))? {
                unmapped(*settled, key, out);
                if m.birth > since {
                    out.push(Change { key, now: Some(m) });
                }
                *settled = key + 1;
            }
            return Ok(());
        }
        for (c_lo, c_hi, child) in self.children_in(loc, &lo, Some(&hi))? {
            let c_hi = c_hi.unwrap_or(hi);
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
                    return m.map(|m| m.0).ok_or_else(empty);
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
    use super::*;

    #[test]
    fn lower_bound_equals_partition_point() {
        let mut x = 7u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for case in 0..2000 {
            let n = (next() % 300) as usize;
            // Dense runs, sparse keys and mixtures of both.
            let mut keys = Vec::with_capacity(n);
            let mut k = next() % 1000;
            for _ in 0..n {
                keys.push(k);
                k += match case % 3 {
                    0 => 1,
                    1 => 1 + next() % 1000,
                    _ => {
                        if next() % 10 == 0 {
                            1 + next() % 100_000
                        } else {
                            1
                        }
                    }
                };
            }
            let probes = [0, 1, u64::MAX, next() % (k + 10)];
            let extra: Vec<u64> = keys
                .iter()
                .flat_map(|&k| [k, k + 1, k.saturating_sub(1)])
                .collect();
            for &q in probes.iter().chain(extra.iter().take(60)) {
                assert_eq!(
                    lower_bound(&keys, q, |&k| k),
                    keys.partition_point(|&k| k < q),
                    "keys {keys:?} probe {q}"
                );
                assert_eq!(
                    <u64 as SearchKey>::upper_bound(&keys, &q, |k| k),
                    keys.partition_point(|&k| k <= q),
                );
            }
        }
    }
}
