//! BLAKE3 of a chunk that is mostly holes, without hashing the holes.
//!
//! An incremental push after small scattered writes reads chunks that are almost all zeros
//! (4 KiB written in a 4 MiB chunk of a thin volume), and hashing those zeros was the largest
//! cost of such a push. BLAKE3 is a tree: the chaining value of a whole, aligned subtree depends
//! only on its bytes and its position in the input. So the chaining values of all-zero
//! subtrees are computed once per chunk size ([`ZeroSubtrees`]) and a chunk's hash is assembled
//! from those and from hashing only the subtrees that hold data. The result is exactly
//! `blake3::hash` of the chunk (the tests check it), so chunk names do not depend on how the
//! chunk was hashed.

use blake3::hazmat::{left_subtree_len, merge_subtrees_non_root, merge_subtrees_root};
use blake3::hazmat::{ChainingValue, HasherExt, Mode};
use std::ops::Range;

/// The smallest subtree looked up rather than hashed: 16 BLAKE3 chunks, as many as the
/// widest SIMD implementation hashes at once, so hashing data stays at full speed.
const LEAF: usize = 16 * blake3::CHUNK_LEN;

/// Chaining values of the all-zero subtrees of `LEAF << level` bytes at each aligned
/// position of a chunk.
pub(crate) struct ZeroSubtrees {
    /// `levels[k][j]`: the subtree of `LEAF << k` zero bytes starting at byte
    /// `j * (LEAF << k)`.
    levels: Vec<Vec<ChainingValue>>,
}

impl ZeroSubtrees {
    /// The table for chunks of at most `chunk_size` bytes: hashes `chunk_size` zero bytes
    /// once (0.6 ms for 4 MiB).
    pub(crate) fn new(chunk_size: usize) -> Self {
        let zeros = [0u8; LEAF];
        let count = chunk_size.div_ceil(LEAF);
        let mut level: Vec<ChainingValue> = (0..count)
            .map(|j| {
                blake3::Hasher::new()
                    .set_input_offset((j * LEAF) as u64)
                    .update(&zeros)
                    .finalize_non_root()
            })
            .collect();
        let mut levels = Vec::new();
        while level.len() > 1 {
            let up = level
                .chunks_exact(2)
                .map(|p| merge_subtrees_non_root(&p[0], &p[1], Mode::Hash))
                .collect();
            levels.push(std::mem::replace(&mut level, up));
        }
        levels.push(level);
        ZeroSubtrees { levels }
    }

    /// The chaining value of the zero subtree of `len` bytes at `offset`, if the table has it
    /// (`len` is `LEAF` times a power of two and `offset` a multiple of `len`).
    fn get(&self, offset: usize, len: usize) -> Option<&ChainingValue> {
        if len < LEAF || !len.is_power_of_two() || offset % len != 0 {
            return None;
        }
        let k = (len / LEAF).trailing_zeros() as usize;
        self.levels.get(k)?.get(offset / len)
    }
}

/// `blake3::hash(data)`, where every byte of `data` outside the ranges in `filled` (sorted,
/// not overlapping) is zero. Subtrees wholly outside `filled` are taken from `zeros`, which
/// must have been built for at least `data.len()` bytes to save anything (a smaller table is
/// only slower).
pub(crate) fn hash(data: &[u8], filled: &[Range<usize>], zeros: &ZeroSubtrees) -> blake3::Hash {
    if data.len() <= blake3::CHUNK_LEN {
        return blake3::hash(data);
    }
    let left = left_subtree_len(data.len() as u64) as usize;
    let l = subtree(data, 0, left, filled, zeros);
    let r = subtree(data, left, data.len(), filled, zeros);
    merge_subtrees_root(&l, &r, Mode::Hash)
}

/// The chaining value of the (non-root) subtree `data[lo..hi]`.
fn subtree(
    data: &[u8],
    lo: usize,
    hi: usize,
    filled: &[Range<usize>],
    zeros: &ZeroSubtrees,
) -> ChainingValue {
    // The ranges this subtree meets: those ending after `lo` and starting before `hi`.
    let first = filled.partition_point(|r| r.end <= lo);
    let meets = filled[first..].iter().take_while(|r| r.start < hi);
    let mut covered = 0;
    let mut any = false;
    for r in meets {
        any = true;
        covered += r.end.min(hi) - r.start.max(lo);
    }
    if !any {
        if let Some(cv) = zeros.get(lo, hi - lo) {
            return *cv;
        }
    }
    // Hashed whole when it is small or all data (nothing to skip).
    if hi - lo <= LEAF || covered == hi - lo {
        return blake3::Hasher::new()
            .set_input_offset(lo as u64)
            .update(&data[lo..hi])
            .finalize_non_root();
    }
    let mid = lo + left_subtree_len((hi - lo) as u64) as usize;
    let l = subtree(data, lo, mid, &filled[first..], zeros);
    let r = subtree(data, mid, hi, &filled[first..], zeros);
    merge_subtrees_non_root(&l, &r, Mode::Hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A buffer of `len` zero bytes with random bytes in `ranges` (clipped to it), the
    /// ranges sorted and merged as a read reports them.
    fn sparse(len: usize, ranges: &[(usize, usize)], seed: u8) -> (Vec<u8>, Vec<Range<usize>>) {
        let mut data = vec![0u8; len];
        let mut filled: Vec<Range<usize>> = ranges
            .iter()
            .map(|&(s, l)| s.min(len)..(s + l).min(len))
            .filter(|r| !r.is_empty())
            .collect();
        filled.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<usize>> = Vec::new();
        for r in filled {
            match merged.last_mut() {
                Some(m) if r.start <= m.end => m.end = m.end.max(r.end),
                _ => merged.push(r),
            }
        }
        for r in &merged {
            for (i, b) in data[r.clone()].iter_mut().enumerate() {
                *b = (i as u8).wrapping_mul(31).wrapping_add(seed) | 1;
            }
        }
        (data, merged)
    }

    #[test]
    fn a_sparse_chunk_hashes_as_blake3_does() {
        let zeros = ZeroSubtrees::new(4 << 20);
        for (len, ranges) in [
            (4 << 20, vec![]),
            (4 << 20, vec![(4096 * 700, 4096)]),
            (4 << 20, vec![(0, 1), ((4 << 20) - 1, 1)]),
            (4 << 20, vec![(0, 4 << 20)]),
            (4 << 20, vec![(1 << 20, 1 << 20), (3 << 20, 5)]),
            // A short last chunk of a volume: the tree's right edge is not a whole subtree.
            ((4 << 20) - 4096, vec![(100_000, 4096)]),
            (3 * LEAF + 17, vec![(LEAF + 5, 10)]),
            (1024, vec![(3, 4)]),
            (1025, vec![(1024, 1)]),
            (0, vec![]),
        ] {
            let (data, filled) = sparse(len, &ranges, 7);
            assert_eq!(
                hash(&data, &filled, &zeros),
                blake3::hash(&data),
                "{len} bytes, data at {filled:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn any_sparse_buffer_hashes_as_blake3_does(
            len in 0usize..300_000,
            ranges in proptest::collection::vec((0usize..300_000, 0usize..40_000), 0..6),
            seed: u8,
            table in prop_oneof![Just(64usize << 10), Just(256usize << 10), Just(1usize << 20)],
        ) {
            let (data, filled) = sparse(len, &ranges, seed);
            prop_assert_eq!(hash(&data, &filled, &ZeroSubtrees::new(table)), blake3::hash(&data));
        }
    }
}
