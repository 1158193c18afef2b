//! Delta cost follows the change, not the volume: a 64 GiB volume with every block mapped,
//! then 4 MiB changed in scattered 4 KiB writes, and 4 GiB changed; from the base snapshot,
//! then from a bookmark of it once it is deleted; the snapshot deltas also as the first call
//! after opening the pool (cold).
//!
//! `cargo bench --bench delta` (SNAPVOL_BENCH_DIR picks the filesystem). The pool uses 64 KiB
//! blocks and writes 4 KiB into each so the 64 GiB volume maps every block while the sparse
//! pool file holds 4 GiB.

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkGroup, Criterion};
use snapvol::{Base, DiffTarget, ExtentKind, Pool, PoolOptions, SnapshotId, TupleLength};
use std::path::PathBuf;
use std::time::Duration;

const GIB: u64 = 1 << 30;

fn delta(c: &mut Criterion) {
    let base = std::env::var("SNAPVOL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let dir = tempfile::tempdir_in(base).unwrap();
    let bs: u64 = 65536;
    let pool = Pool::create_file(
        dir.path().join("pool"),
        80 * GIB,
        PoolOptions::default().block_size(bs as u32),
    )
    .unwrap();
    let size = 64 * GIB;
    let blocks = size / bs;
    let v = pool.create_volume("big", size).unwrap();
    let page = vec![0x11u8; 4096];
    for b in 0..blocks {
        v.write_at(&page, b * bs).unwrap();
    }
    let a = pool.snapshot("big", "a").unwrap();
    // 4 MiB in 1024 scattered 4 KiB writes.
    for i in 0..1024u64 {
        v.write_at(&page, (i * 1_000_003 % blocks) * bs + 8192)
            .unwrap();
    }
    let b = pool.snapshot("big", "b").unwrap();
    // 4 GiB changed: 65,536 blocks.
    for i in 0..65_536u64 {
        v.write_at(&page, (i * 7 % blocks) * bs + 16384).unwrap();
    }
    let cc = pool.snapshot("big", "c").unwrap();
    let count = |pool: &Pool, x: Base, y| {
        pool.delta(x, DiffTarget::Snapshot(y), 0, 0, TupleLength::Fixed)
            .unwrap()
            .extents
            .iter()
            .filter(|e| e.kind == ExtentKind::Data)
            .count()
    };
    assert_eq!(count(&pool, Base::Snapshot(a), b), 1024);
    assert_eq!(count(&pool, Base::Snapshot(b), cc), 65_536);
    let mut g = c.benchmark_group("delta-64GiB-volume");
    g.sample_size(20).measurement_time(Duration::from_secs(10));
    fn bench(
        g: &mut BenchmarkGroup<'_, WallTime>,
        pool: &Pool,
        name: &str,
        x: Base,
        y: SnapshotId,
    ) {
        g.bench_function(name, |bch| {
            bch.iter(|| {
                pool.delta(x, DiffTarget::Snapshot(y), 0, 0, TupleLength::Variable)
                    .unwrap()
            })
        });
    }
    bench(&mut g, &pool, "4MiB-changed", Base::Snapshot(a), b);
    bench(&mut g, &pool, "4GiB-changed", Base::Snapshot(b), cc);
    // The same deltas as the first call after opening the pool (an empty node cache, the
    // OS page cache warm): how a CLI call or a new CSI process meets them.
    drop(pool);
    let path = dir.path().join("pool");
    let ro = || Pool::open_path(&path, PoolOptions::default().read_only(true)).unwrap();
    for (name, x, y) in [("4MiB-changed-cold", a, b), ("4GiB-changed-cold", b, cc)] {
        g.bench_function(name, |bch| {
            bch.iter_batched(
                ro,
                |p| {
                    p.delta(
                        Base::Snapshot(x),
                        DiffTarget::Snapshot(y),
                        0,
                        0,
                        TupleLength::Variable,
                    )
                    .unwrap()
                },
                BatchSize::PerIteration,
            )
        });
    }
    let pool = Pool::open_path(&path, PoolOptions::default()).unwrap();
    // The same deltas once the bases are bookmarks (their snapshots deleted).
    pool.bookmark("big", "a").unwrap();
    pool.delete_snapshot("big", "a").unwrap();
    assert_eq!(count(&pool, Base::Bookmark(a.into()), b), 1024);
    bench(
        &mut g,
        &pool,
        "4MiB-changed-from-bookmark",
        Base::Bookmark(a.into()),
        b,
    );
    pool.bookmark("big", "b").unwrap();
    pool.delete_snapshot("big", "b").unwrap();
    assert_eq!(count(&pool, Base::Bookmark(b.into()), cc), 65_536);
    bench(
        &mut g,
        &pool,
        "4GiB-changed-from-bookmark",
        Base::Bookmark(b.into()),
        cc,
    );
    g.finish();
}

criterion_group!(benches, delta);
criterion_main!(benches);
