//! Random sequences of every operation against a plain in-memory model: after each sequence
//! `check()` is clean and every volume and snapshot equals the model byte for byte, on pools
//! with data checksums and without.

mod common;

use common::{op_strategy, Model, Op};
use proptest::prelude::*;
use snapvol::device::{BlockDevice, MemoryDevice};
use snapvol::{Pool, PoolOptions};
use std::sync::Arc;

fn opts(block_size: u32) -> PoolOptions {
    PoolOptions::default()
        .block_size(block_size)
        .commit_interval(None)
}

fn run(block_size: u32, checksums: bool, ops: &[Op]) {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(96 << 20));
    let mut pool = Pool::create(dev.clone(), opts(block_size).data_checksums(checksums)).unwrap();
    assert_eq!(pool.stats().data_checksums, checksums);
    let mut model = Model::default();
    let reopen = |p: Pool| {
        drop(p);
        Pool::open(dev.clone(), opts(block_size)).unwrap()
    };
    let start = [Op::Create { size: 1 << 20 }, Op::Create { size: 2_500_000 }];
    for op in start.iter().chain(ops) {
        pool = model
            .apply(pool, op, &reopen)
            .unwrap_or_else(|e| panic!("{op:?} failed: {e}"));
    }
    let report = pool.check().unwrap();
    assert!(report.is_clean(), "check found {:?}", report.problems);
    model.verify(&pool);
    // Everything survives a close and reopen.
    pool.close().unwrap();
    let pool = Pool::open(dev.clone(), opts(block_size)).unwrap();
    model.verify(&pool);
    assert!(pool.check().unwrap().is_clean());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn model_4k_blocks(ops in prop::collection::vec(op_strategy(), 1..80)) {
        run(4096, false, &ops);
    }

    #[test]
    fn model_64k_blocks(ops in prop::collection::vec(op_strategy(), 1..40)) {
        run(65536, false, &ops);
    }

    #[test]
    fn model_4k_blocks_data_checksums(ops in prop::collection::vec(op_strategy(), 1..80)) {
        run(4096, true, &ops);
    }

    #[test]
    fn model_64k_blocks_data_checksums(ops in prop::collection::vec(op_strategy(), 1..40)) {
        run(65536, true, &ops);
    }
}

#[test]
fn deleting_everything_returns_every_block() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(64 << 20));
    let pool = Pool::create(dev, opts(4096)).unwrap();
    let empty_used = pool.stats().used;
    let v = pool.create_volume("a", 8 << 20).unwrap();
    v.write_at(&vec![7u8; 4 << 20], 12345).unwrap();
    pool.snapshot("a", "s1").unwrap();
    v.write_at(&vec![8u8; 1 << 20], 0).unwrap();
    pool.clone_snapshot("a", "s1", "b").unwrap();
    pool.volume("b")
        .unwrap()
        .write_at(&[1u8; 100_000], 5)
        .unwrap();
    // Any deletion order works: origin first, then the snapshot, then the clone.
    let s1 = pool.snapshot_handle("a", "s1").unwrap().id();
    pool.delete_volume("a").unwrap();
    assert!(pool.check().unwrap().is_clean());
    // The volume's name no longer reaches its snapshot (a new "a" would have its own);
    // the id does.
    assert!(matches!(
        pool.delete_snapshot("a", "s1"),
        Err(snapvol::Error::SnapshotNotFound(_))
    ));
    pool.delete_snapshot_by_id(s1).unwrap();
    assert!(pool.check().unwrap().is_clean());
    pool.delete_volume("b").unwrap();
    let report = pool.check().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    // Every data block and map node is back; only space map leaves that now exist remain
    // (one per 4 MiB of pool, never more than the 16 of this pool).
    let left = pool.stats().used - empty_used;
    assert!(left <= 16 * 4096, "{left} bytes still used");
}
