//! Snapshot and clone latency on a volume with 1 GiB written vs one with 16 GiB written: both
//! are one reference on a map root and one commit, whatever the volume holds. (I/O against
//! plain files is in benches/compare.rs.) See BENCHMARKS.md for figures.
//!
//! `cargo bench --bench engine` (SNAPVOL_BENCH_BIG_GIB sets the big volume, default 16;
//! SNAPVOL_BENCH_DIR the directory, default the system temp dir).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use snapvol::{Pool, PoolOptions, Volume};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn bench_dir() -> tempfile::TempDir {
    let base = std::env::var("SNAPVOL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    tempfile::tempdir_in(base).unwrap()
}

fn opts() -> PoolOptions {
    PoolOptions::default().block_size(
        std::env::var("SNAPVOL_BENCH_BLOCK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(snapvol::DEFAULT_BLOCK_SIZE),
    )
}

fn fill(vol: &Volume, bytes: u64) {
    let chunk = vec![0x5Au8; 4 * MIB as usize];
    for off in (0..bytes).step_by(chunk.len()) {
        vol.write_at(&chunk, off).unwrap();
    }
    vol.flush().unwrap();
}

fn snapshot_latency(c: &mut Criterion) {
    let big: u64 = std::env::var("SNAPVOL_BENCH_BIG_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let dir = bench_dir();
    let pool = Pool::create_file(dir.path().join("pool"), (big + 4) * GIB, opts()).unwrap();
    let mut g = c.benchmark_group("snapshot");
    g.sample_size(30).measurement_time(Duration::from_secs(10));
    for (name, gib) in [("small", 1), ("big", big)] {
        let vol = pool.create_volume(name, gib * GIB).unwrap();
        fill(&vol, gib * GIB);
        let mut i = 0u64;
        g.bench_function(
            BenchmarkId::new("snapshot", format!("{gib}GiB-written")),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        i += 1;
                        let s = format!("s{i}");
                        let t = Instant::now();
                        pool.snapshot(name, &s).unwrap();
                        total += t.elapsed();
                        pool.delete_snapshot(name, &s).unwrap();
                    }
                    total
                })
            },
        );
        g.bench_function(
            BenchmarkId::new("clone", format!("{gib}GiB-written")),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        i += 1;
                        let s = format!("c{i}");
                        let t = Instant::now();
                        pool.clone_volume(name, &s).unwrap();
                        total += t.elapsed();
                        pool.delete_volume(&s).unwrap();
                    }
                    total
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, snapshot_latency);
criterion_main!(benches);
