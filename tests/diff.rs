//! `allocated` and `delta` against brute force: a delta equals a byte comparison of the two
//! snapshots, applying it to the base gives the target, and pages glued together equal one
//! unpaged call. A delta from a bookmark (base snapshot deleted) has exactly the data blocks
//! of the delta from the snapshot, at least its zero blocks, and zeros only where the target
//! reads zeros.

use proptest::prelude::*;
use snapvol::device::MemoryDevice;
use snapvol::{Base, DiffTarget, Extent, ExtentKind, Pool, PoolOptions, SnapshotId, TupleLength};
use std::sync::Arc;

fn opts(block_size: u32) -> PoolOptions {
    PoolOptions::default()
        .block_size(block_size)
        .commit_interval(None)
}

#[derive(Clone, Debug)]
enum Change {
    Write(u64, u64, u8),
    Discard(u64, u64),
    Resize(u64),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        4 => (0u64..3_000_000, 1u64..60_000, any::<u8>()).prop_map(|(o, l, s)| Change::Write(o, l, s)),
        1 => (0u64..3_000_000, 1u64..200_000).prop_map(|(o, l)| Change::Discard(o, l)),
        1 => (500_000u64..3_000_000).prop_map(Change::Resize),
    ]
}

fn read(pool: &Pool, target: DiffTarget) -> Vec<u8> {
    match target {
        DiffTarget::Snapshot(id) => {
            let s = pool.snapshot_by_id(id).unwrap();
            let mut b = vec![0u8; s.len().unwrap() as usize];
            s.read_at(&mut b, 0).unwrap();
            b
        }
        DiffTarget::Volume(id) => {
            let v = pool.volume_by_id(id).unwrap();
            let mut b = vec![0u8; v.len().unwrap() as usize];
            v.read_at(&mut b, 0).unwrap();
            b
        }
    }
}

/// `id` as a delta's base: the snapshot while it exists, then its bookmark.
fn base_of(pool: &Pool, id: SnapshotId) -> Base {
    match pool.snapshot_info(id) {
        Ok(_) => Base::Snapshot(id),
        Err(_) => Base::Bookmark(id.into()),
    }
}

fn all_pages(
    pool: &Pool,
    base: Option<SnapshotId>,
    target: DiffTarget,
    max: usize,
    tuples: TupleLength,
) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    let mut from = 0;
    loop {
        let page = match base {
            Some(b) => pool
                .delta(base_of(pool, b), target, from, max, tuples)
                .unwrap(),
            None => pool.allocated(target, from, max, tuples).unwrap(),
        };
        assert!(max == 0 || page.extents.len() <= max);
        if let Some(first) = page.extents.first() {
            assert!(
                first.offset + first.length > from,
                "first extent ends after starting_offset"
            );
        }
        // Glue: a variable-length extent split across pages joins back.
        for e in page.extents {
            match out.last_mut() {
                Some(l)
                    if tuples == TupleLength::Variable
                        && l.kind == e.kind
                        && l.offset + l.length == e.offset =>
                {
                    l.length += e.length
                }
                _ => out.push(e),
            }
        }
        match page.next_offset {
            Some(n) => from = n,
            None => return out,
        }
    }
}

fn check_order(ext: &[Extent]) {
    for w in ext.windows(2) {
        assert!(
            w[0].offset + w[0].length <= w[1].offset,
            "strictly increasing, no overlap"
        );
    }
}

/// The blocks of `kind` in `ext`, by block index.
fn blocks(ext: &[Extent], kind: ExtentKind, bs: u64) -> std::collections::BTreeSet<u64> {
    ext.iter()
        .filter(|e| e.kind == kind)
        .flat_map(|e| e.offset / bs..(e.offset + e.length).div_ceil(bs))
        .collect()
}

/// Applies `delta`, read from the target's bytes `new`, to a copy of the base's bytes `old`.
fn rebuild(old: &[u8], new: &[u8], delta: &[Extent]) -> Vec<u8> {
    let mut rebuilt = old.to_vec();
    rebuilt.resize(new.len(), 0);
    for e in delta {
        let r = e.offset as usize..(e.offset + e.length) as usize;
        match e.kind {
            ExtentKind::Data => rebuilt[r.clone()].copy_from_slice(&new[r]),
            ExtentKind::Zero => rebuilt[r].fill(0),
        }
    }
    rebuilt
}

fn run(block_size: u32, first: Vec<Change>, second: Vec<Change>, max: usize) {
    let pool = Pool::create(Arc::new(MemoryDevice::new(64 << 20)), opts(block_size)).unwrap();
    let v = pool.create_volume("v", 3_000_000).unwrap();
    let apply = |changes: &[Change]| {
        for c in changes {
            let size = v.len().unwrap();
            match *c {
                Change::Write(o, l, s) if o < size => v
                    .write_at(&vec![s | 1; l.min(size - o) as usize], o)
                    .unwrap(),
                Change::Discard(o, l) if o < size => v.discard(o, l.min(size - o)).unwrap(),
                Change::Resize(n) => pool.resize_volume("v", n).unwrap(),
                _ => {}
            }
        }
    };
    apply(&first);
    let base = pool.snapshot("v", "base").unwrap();
    apply(&second);
    let snap = pool.snapshot("v", "next").unwrap();
    let bs = block_size as u64;
    for target in [
        DiffTarget::Snapshot(snap),
        DiffTarget::Volume(pool.volume("v").unwrap().id()),
    ] {
        let old = read(&pool, DiffTarget::Snapshot(base));
        let new = read(&pool, target);
        let whole = all_pages(&pool, Some(base), target, 0, TupleLength::Variable);
        check_order(&whole);
        assert_eq!(
            whole,
            all_pages(&pool, Some(base), target, max, TupleLength::Variable)
        );
        // Every block that differs is covered; applying the delta to the base gives the target.
        assert!(rebuild(&old, &new, &whole) == new, "base + delta != target");
        // Fixed-length tuples: one per block, same coverage.
        let fixed = all_pages(&pool, Some(base), target, max, TupleLength::Fixed);
        check_order(&fixed);
        assert!(fixed
            .iter()
            .all(|e| e.length == bs || e.offset + e.length == new.len() as u64));
        assert_eq!(
            fixed.iter().map(|e| e.length).sum::<u64>(),
            whole.iter().map(|e| e.length).sum::<u64>()
        );
        // Allocated: exactly the blocks holding non-zero data are inside Data extents.
        let alloc = all_pages(&pool, None, target, max, TupleLength::Variable);
        check_order(&alloc);
        for (i, chunk) in new.chunks(bs as usize).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                let off = i as u64 * bs;
                assert!(
                    alloc
                        .iter()
                        .any(|e| e.offset <= off && off < e.offset + e.length),
                    "block {i} missing"
                );
            }
        }
    }
    // The same deltas from a bookmark once the base snapshot is gone.
    let targets = [
        DiffTarget::Snapshot(snap),
        DiffTarget::Volume(pool.volume("v").unwrap().id()),
    ];
    let exact: Vec<Vec<Extent>> = targets
        .iter()
        .map(|&t| all_pages(&pool, Some(base), t, 0, TupleLength::Variable))
        .collect();
    let old = read(&pool, DiffTarget::Snapshot(base));
    assert_eq!(pool.bookmark("v", "base").unwrap(), base.into());
    pool.delete_snapshot("v", "base").unwrap();
    for (target, exact) in targets.into_iter().zip(exact) {
        let new = read(&pool, target);
        let from_mark = all_pages(&pool, Some(base), target, 0, TupleLength::Variable);
        check_order(&from_mark);
        assert_eq!(
            from_mark,
            all_pages(&pool, Some(base), target, max, TupleLength::Variable)
        );
        assert_eq!(
            blocks(&from_mark, ExtentKind::Data, bs),
            blocks(&exact, ExtentKind::Data, bs),
            "data blocks differ from the snapshot delta"
        );
        let zeros = blocks(&from_mark, ExtentKind::Zero, bs);
        assert!(blocks(&exact, ExtentKind::Zero, bs).is_subset(&zeros));
        for e in from_mark.iter().filter(|e| e.kind == ExtentKind::Zero) {
            let r = e.offset as usize..(e.offset + e.length) as usize;
            assert!(
                new[r].iter().all(|&b| b == 0),
                "zeros where the target has data"
            );
        }
        assert!(
            rebuild(&old, &new, &from_mark) == new,
            "base + bookmark delta != target"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn delta_matches_brute_force(
        first in prop::collection::vec(change(), 1..20),
        second in prop::collection::vec(change(), 0..20),
        max in 0usize..5,
        big in any::<bool>(),
    ) {
        run(if big { 16384 } else { 4096 }, first, second, max);
    }
}

#[test]
fn delta_of_a_large_sparse_change_touches_few_nodes() {
    // 4 GiB volume fully mapped, 100 scattered blocks changed: the delta finds exactly them.
    let pool = Pool::create(Arc::new(MemoryDevice::new(5 << 30)), opts(65536)).unwrap();
    let v = pool.create_volume("v", 4 << 30).unwrap();
    let chunk = vec![1u8; 8 << 20];
    for off in (0..4u64 << 30).step_by(chunk.len()) {
        v.write_at(&chunk, off).unwrap();
    }
    let base = pool.snapshot("v", "a").unwrap();
    for i in 0..100u64 {
        v.write_at(&[2u8; 10], i * 40_000_000).unwrap();
    }
    let page = pool
        .delta(
            Base::Snapshot(base),
            DiffTarget::Volume(pool.volume("v").unwrap().id()),
            0,
            0,
            TupleLength::Variable,
        )
        .unwrap();
    assert_eq!(page.extents.len(), 100);
    assert!(page
        .extents
        .iter()
        .all(|e| e.kind == ExtentKind::Data && e.length == 65536));
    assert_eq!(page.next_offset, None);
}

#[test]
fn huge_sparse_volumes_are_walked_by_their_entries_not_their_size() {
    // 1 PiB volume, three written blocks far apart: both calls return at once.
    let pool = Pool::create(Arc::new(MemoryDevice::new(16 << 20)), opts(4096)).unwrap();
    let v = pool.create_volume("huge", 1 << 50).unwrap();
    v.write_at(b"a", 0).unwrap();
    v.write_at(b"b", 1 << 40).unwrap();
    let base = pool.snapshot("huge", "s").unwrap();
    v.write_at(b"c", (1 << 50) - 1).unwrap();
    let alloc = pool
        .allocated(
            DiffTarget::Volume(pool.volume("huge").unwrap().id()),
            0,
            0,
            TupleLength::Variable,
        )
        .unwrap();
    let offsets: Vec<u64> = alloc.extents.iter().map(|e| e.offset).collect();
    assert_eq!(offsets, [0, 1 << 40, (1 << 50) - 4096]);
    let delta = pool
        .delta(
            Base::Snapshot(base),
            DiffTarget::Volume(pool.volume("huge").unwrap().id()),
            0,
            0,
            TupleLength::Variable,
        )
        .unwrap();
    assert_eq!(delta.extents.len(), 1);
    assert_eq!(delta.extents[0].offset, (1 << 50) - 4096);
    // Resuming from the middle finds the next entry.
    let page = pool
        .allocated(
            DiffTarget::Volume(pool.volume("huge").unwrap().id()),
            4096,
            1,
            TupleLength::Fixed,
        )
        .unwrap();
    assert_eq!(page.extents[0].offset, 1 << 40);
    assert_eq!(
        page.next_offset,
        Some((1 << 40) + 4096),
        "a further extent remains"
    );
}

/// A leaf emptied after the bookmark is removed, and its old key range falls to a neighbour
/// that may be unchanged since: the bookmark delta must still report that range as zeros.
/// Discards of whole leaves starting at every block of the first leaves make sure one starts
/// exactly where a leaf does.
#[test]
fn a_delta_from_a_bookmark_sees_leaves_removed_since() {
    let bs = 4096u64;
    for start in 0..200u64 {
        let pool = Pool::create(Arc::new(MemoryDevice::new(16 << 20)), opts(4096)).unwrap();
        let v = pool.create_volume("v", 4 << 20).unwrap();
        v.write_at(&vec![9u8; 3 << 20], 0).unwrap();
        let base = pool.snapshot("v", "base").unwrap();
        let old = read(&pool, DiffTarget::Snapshot(base));
        pool.bookmark("v", "base").unwrap();
        pool.delete_snapshot("v", "base").unwrap();
        v.discard(start * bs, 300 * bs).unwrap();
        let new = read(&pool, DiffTarget::Volume(pool.volume("v").unwrap().id()));
        let delta = all_pages(
            &pool,
            Some(base),
            DiffTarget::Volume(pool.volume("v").unwrap().id()),
            0,
            TupleLength::Variable,
        );
        assert!(
            rebuild(&old, &new, &delta) == new,
            "discard from block {start}: base + bookmark delta != target"
        );
        // Cost follows the change: the untouched data after the discard is not reported.
        let reported: u64 = delta.iter().map(|e| e.length).sum();
        assert!(
            reported < (300 + 2 * 169 + 256) * bs,
            "discard from block {start}: {reported} bytes reported"
        );
    }
}

/// From a bookmark, holes the target shares with the base are not reported: subtrees written
/// before the bookmark are skipped with the holes inside them, so the answer stays near the
/// change instead of listing every unmapped block of the volume.
#[test]
fn a_delta_from_a_bookmark_follows_the_change() {
    let pool = Pool::create(Arc::new(MemoryDevice::new(128 << 20)), opts(4096)).unwrap();
    let v = pool.create_volume("v", 256 << 20).unwrap();
    // 64 KiB of data every 256 KiB: three quarters of the volume are holes.
    for off in (0..256u64 << 20).step_by(256 << 10) {
        v.write_at(&[5u8; 64 << 10], off).unwrap();
    }
    let base = pool.snapshot("v", "base").unwrap();
    pool.bookmark("v", "base").unwrap();
    pool.delete_snapshot("v", "base").unwrap();
    v.write_at(&[6u8; 4096], 100 << 20).unwrap();
    let delta = all_pages(
        &pool,
        Some(base),
        DiffTarget::Volume(pool.volume("v").unwrap().id()),
        0,
        TupleLength::Variable,
    );
    let data = blocks(&delta, ExtentKind::Data, 4096);
    assert_eq!(data.into_iter().collect::<Vec<_>>(), [(100 << 20) / 4096]);
    let zeros: u64 = delta
        .iter()
        .filter(|e| e.kind == ExtentKind::Zero)
        .map(|e| e.length)
        .sum();
    // Holes inside the changed leaf and between leaves of changed branches (a removed leaf
    // could have been there): a few MiB, not the 192 MiB of holes in the volume.
    assert!(zeros < 32 << 20, "{zeros} bytes of zeros reported");
}
