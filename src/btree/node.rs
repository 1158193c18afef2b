//! Block map node pages: a leaf maps virtual blocks to (physical unit, birth generation);
//! a branch maps the lowest key of each child to the child's page.

use crate::error::{Error, Result};
use crate::format::{self, new_page, Page, PageKind, HEADER_LEN, PAGE_SIZE};

/// Entries that fit a leaf page (key, physical unit, birth generation: 24 bytes each).
pub(crate) const LEAF_MAX: usize = (PAGE_SIZE - HEADER_LEN) / 24;
/// Entries that fit a branch page (key, child: 16 bytes each).
pub(crate) const BRANCH_MAX: usize = (PAGE_SIZE - HEADER_LEN) / 16;

/// One block mapping: virtual block `key` lives at physical unit `unit` since `birth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Mapping {
    pub key: u64,
    pub unit: u64,
    pub birth: u64,
}

/// Index of the first entry whose key is `>= key` in entries sorted by strictly increasing
/// key (what `partition_point(|e| k(e) < key)` returns).
///
/// Block maps are mostly dense runs of consecutive keys, so a guess interpolated between the
/// first and last key usually lands on the answer: one or two cache lines of a 4 KiB node
/// instead of the eight probes of a binary search. A gallop from the guess bounds the answer
/// when keys are uneven, so the worst case stays logarithmic.
pub(crate) fn lower_bound<T>(v: &[T], key: u64, k: impl Fn(&T) -> u64) -> usize {
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

#[derive(Clone, Debug)]
pub(crate) enum Node {
    Leaf(Vec<Mapping>),
    /// (lowest key of the child, child page)
    Branch(Vec<(u64, u64)>),
}

impl Node {
    pub(crate) fn len(&self) -> usize {
        match self {
            Node::Leaf(v) => v.len(),
            Node::Branch(v) => v.len(),
        }
    }

    pub(crate) fn first_key(&self) -> u64 {
        match self {
            Node::Leaf(v) => v.first().map_or(0, |m| m.key),
            Node::Branch(v) => v.first().map_or(0, |c| c.0),
        }
    }

    pub(crate) fn encode(&self, location: u64, generation: u64) -> Box<Page> {
        let mut p = new_page();
        format::put_u16(&mut p[..], 24, self.len() as u16);
        let kind = match self {
            Node::Leaf(v) => {
                for (i, m) in v.iter().enumerate() {
                    let at = HEADER_LEN + i * 24;
                    format::put_u64(&mut p[..], at, m.key);
                    format::put_u64(&mut p[..], at + 8, m.unit);
                    format::put_u64(&mut p[..], at + 16, m.birth);
                }
                PageKind::MapLeaf
            }
            Node::Branch(v) => {
                for (i, (k, c)) in v.iter().enumerate() {
                    let at = HEADER_LEN + i * 16;
                    format::put_u64(&mut p[..], at, *k);
                    format::put_u64(&mut p[..], at + 8, *c);
                }
                PageKind::MapBranch
            }
        };
        format::seal(&mut p, kind, location, generation);
        p
    }

    /// Decodes and validates a node page: checksum, location, entry count, strictly
    /// increasing keys, and every pointer inside `1..total_units`. Returns the node and the
    /// generation of the commit that wrote it.
    pub(crate) fn decode(p: &Page, location: u64, total_units: u64) -> Result<(Node, u64)> {
        let (kind, written) =
            format::verify(p, &[PageKind::MapLeaf, PageKind::MapBranch], location)?;
        let n = format::get_u16(&p[..], 24) as usize;
        let bad = |d: String| Error::corrupt(kind.name(), location, d);
        let max = if kind == PageKind::MapLeaf {
            LEAF_MAX
        } else {
            BRANCH_MAX
        };
        if n == 0 || n > max {
            return Err(bad(format!("{n} entries")));
        }
        let in_pool = |u: u64| u >= format::SUPERBLOCK_UNITS && u < total_units;
        let node = if kind == PageKind::MapLeaf {
            let mut v = Vec::with_capacity(n);
            for i in 0..n {
                let at = HEADER_LEN + i * 24;
                let m = Mapping {
                    key: format::get_u64(&p[..], at),
                    unit: format::get_u64(&p[..], at + 8),
                    birth: format::get_u64(&p[..], at + 16),
                };
                if !in_pool(m.unit) {
                    return Err(bad(format!("block {} maps outside the pool", m.key)));
                }
                v.push(m);
            }
            Node::Leaf(v)
        } else {
            let mut v = Vec::with_capacity(n);
            for i in 0..n {
                let at = HEADER_LEN + i * 16;
                let c = (format::get_u64(&p[..], at), format::get_u64(&p[..], at + 8));
                if !in_pool(c.1) || c.1 == location {
                    return Err(bad(format!("child {i} points at {}", c.1)));
                }
                v.push(c);
            }
            Node::Branch(v)
        };
        let ordered = match &node {
            Node::Leaf(v) => v.windows(2).all(|w| w[0].key < w[1].key),
            Node::Branch(v) => v.windows(2).all(|w| w[0].0 < w[1].0),
        };
        if !ordered {
            return Err(bad("keys out of order".into()));
        }
        Ok((node, written))
    }
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
            }
        }
    }

    #[test]
    fn round_trip_and_validation() {
        let leaf = Node::Leaf(
            (0..LEAF_MAX as u64)
                .map(|k| Mapping {
                    key: k * 3,
                    unit: 10 + k,
                    birth: 7,
                })
                .collect(),
        );
        let p = leaf.encode(5, 1);
        let (Node::Leaf(back), _) = Node::decode(&p, 5, 1000).unwrap() else {
            panic!("leaf decoded as branch")
        };
        assert_eq!(back.len(), LEAF_MAX);
        assert_eq!(
            back[3],
            Mapping {
                key: 9,
                unit: 13,
                birth: 7
            }
        );
        // A pointer outside the pool is refused even with a valid checksum.
        assert!(Node::decode(&p, 5, 100).is_err());
        // Keys out of order are refused.
        let bad = Node::Branch(vec![(5, 10), (3, 11)]).encode(6, 1);
        assert!(Node::decode(&bad, 6, 1000).is_err());
    }
}
