//! The cost model, measured side by side with plain-file pwrite/pread on a file of the same
//! size on the same filesystem (the physical limit). See BENCHMARKS.md for figures.
//!
//! `cargo bench --bench engine` (SNAPVOL_BENCH_BIG_GIB sets the big volume, default 16;
//! SNAPVOL_BENCH_DIR the directory, default the system temp dir).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use snapvol::{Pool, PoolOptions, Volume};
use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::os::unix::fs::FileExt;
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
    PoolOptions {
        block_size: std::env::var("SNAPVOL_BENCH_BLOCK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(snapvol::DEFAULT_BLOCK_SIZE),
        ..PoolOptions::default()
    }
}

/// xorshift: cheap, repeatable offsets.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn fill(vol: &Volume, bytes: u64) {
    let chunk = vec![0x5Au8; 4 * MIB as usize];
    for off in (0..bytes).step_by(chunk.len()) {
        vol.write_at(&chunk, off).unwrap();
    }
    vol.flush().unwrap();
}

fn fill_plain(f: &File, bytes: u64) {
    let chunk = vec![0x5Au8; 4 * MIB as usize];
    for off in (0..bytes).step_by(chunk.len()) {
        f.write_all_at(&chunk, off).unwrap();
    }
    f.sync_data().unwrap();
}

fn plain_file(dir: &tempfile::TempDir, size: u64) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("plain"))
        .unwrap();
    f.set_len(size).unwrap();
    f
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

/// 4 KiB random writes: plain file vs (a) unallocated, (b) owned, (c) shared blocks.
fn random_writes(c: &mut Criterion) {
    let size = 2 * GIB;
    let dir = bench_dir();
    let plain = plain_file(&dir, size);
    let pool = Pool::create_file(dir.path().join("pool"), 8 * GIB, opts()).unwrap();
    let buf = vec![0xA5u8; 4096];
    let blocks = size / 4096;
    let mut g = c.benchmark_group("write-4k-random");
    g.sample_size(20).measurement_time(Duration::from_secs(8));

    let mut rng = Rng(0x1234_5678);
    g.bench_function("plain-file-sparse", |b| {
        b.iter(|| {
            plain
                .write_all_at(&buf, (rng.next() % blocks) * 4096)
                .unwrap()
        })
    });

    // (a) Unallocated: a fresh volume whenever the current one fills up.
    let mut n = 0u64;
    let mut vol: Option<Volume> = None;
    g.bench_function("unallocated", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if vol.is_none() || n % (blocks / 2) == 0 {
                    if let Some(v) = vol.take() {
                        let name = v.name().unwrap();
                        drop(v);
                        pool.delete_volume(&name).unwrap();
                    }
                    vol = Some(pool.create_volume(&format!("u{n}"), size).unwrap());
                }
                // A stride coprime with the block count visits each block once.
                let blk = (n.wrapping_mul(2_654_435_761)) % blocks;
                n += 1;
                let v = vol.as_ref().unwrap();
                let t = Instant::now();
                v.write_at(&buf, blk * 4096).unwrap();
                total += t.elapsed();
            }
            total
        })
    });
    if let Some(v) = vol.take() {
        let name = v.name().unwrap();
        pool.delete_volume(&name).unwrap();
    }

    // The baseline for (b) and (c): a plain file written whole once, like the volumes.
    fill_plain(&plain, size);
    g.bench_function("plain-file-written", |b| {
        b.iter(|| {
            plain
                .write_all_at(&buf, (rng.next() % blocks) * 4096)
                .unwrap()
        })
    });

    // (b) Owned: every block written once before, no snapshot.
    let owned = pool.create_volume("owned", size).unwrap();
    fill(&owned, size);
    g.bench_function("owned", |b| {
        b.iter(|| owned.write_at(&buf, (rng.next() % blocks) * 4096).unwrap())
    });
    pool.delete_volume("owned").unwrap();

    // (c) Shared with a snapshot: a new snapshot whenever half the blocks were rewritten.
    let shared = pool.create_volume("shared", size).unwrap();
    fill(&shared, size);
    let mut k = 0u64;
    let mut snaps = 0u64;
    g.bench_function("shared-with-snapshot", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if k % (blocks / 2) == 0 {
                    if snaps > 0 {
                        pool.delete_snapshot("shared", &format!("s{snaps}"))
                            .unwrap();
                    }
                    snaps += 1;
                    pool.snapshot("shared", &format!("s{snaps}")).unwrap();
                }
                let blk = (k.wrapping_mul(2_654_435_761)) % blocks;
                k += 1;
                let t = Instant::now();
                shared.write_at(&buf, blk * 4096).unwrap();
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
}

/// 1 MiB sequential write and read, plain file vs a volume.
fn sequential(c: &mut Criterion) {
    let size = 2 * GIB;
    let dir = bench_dir();
    let plain = plain_file(&dir, size);
    let pool = Pool::create_file(dir.path().join("pool"), 6 * GIB, opts()).unwrap();
    let vol = pool.create_volume("seq", size).unwrap();
    fill(&vol, size);
    fill_plain(&plain, size);
    let chunk = vec![0x3Cu8; MIB as usize];
    let mut out = vec![0u8; MIB as usize];
    let steps = size / MIB;
    let mut g = c.benchmark_group("sequential-1m");
    g.sample_size(20).measurement_time(Duration::from_secs(8));
    g.throughput(criterion::Throughput::Bytes(MIB));
    let mut i = 0u64;
    g.bench_function("write/plain-file", |b| {
        b.iter(|| {
            i += 1;
            plain.write_all_at(&chunk, (i % steps) * MIB).unwrap()
        })
    });
    g.bench_function("write/volume-owned", |b| {
        b.iter(|| {
            i += 1;
            vol.write_at(&chunk, (i % steps) * MIB).unwrap()
        })
    });
    g.bench_function("read/plain-file", |b| {
        b.iter(|| {
            i += 1;
            plain.read_exact_at(&mut out, (i % steps) * MIB).unwrap();
            black_box(&out);
        })
    });
    g.bench_function("read/volume", |b| {
        b.iter(|| {
            i += 1;
            vol.read_at(&mut out, (i % steps) * MIB).unwrap();
            black_box(&out);
        })
    });
    g.finish();
}

/// 4 KiB random reads at snapshot/clone depth 1 and 64.
fn read_depth(c: &mut Criterion) {
    let size = GIB;
    let dir = bench_dir();
    let plain = plain_file(&dir, size);
    let pool = Pool::create_file(dir.path().join("pool"), 8 * GIB, opts()).unwrap();
    let base = pool.create_volume("d0", size).unwrap();
    fill(&base, size);
    let mut rng = Rng(42);
    let blocks = size / 4096;
    let mut buf = vec![0u8; 4096];
    fill_plain(&plain, size);
    // Depth 64: snapshot, clone the snapshot, write 1/64 of the clone, repeat. Depth 1: one
    // snapshot and clone, then the same number of random writes, so both maps went through
    // the same amount of copy-on-write and differ only in depth.
    pool.snapshot("d0", "s").unwrap();
    let shallow = pool.clone_snapshot("d0", "s", "shallow").unwrap();
    for _ in 0..64 * (blocks / 64) {
        shallow
            .write_at(&buf, (rng.next() % blocks) * 4096)
            .unwrap();
    }
    let mut name = "d0".to_string();
    for d in 1..=64 {
        if d > 1 {
            pool.snapshot(&name, "s").unwrap();
        }
        let next = format!("d{d}");
        let v = pool.clone_snapshot(&name, "s", &next).unwrap();
        for _ in 0..blocks / 64 {
            v.write_at(&buf, (rng.next() % blocks) * 4096).unwrap();
        }
        name = next;
    }
    pool.flush().unwrap();
    let deep = pool.volume(&name).unwrap();
    let mut g = c.benchmark_group("read-4k-random");
    g.sample_size(20).measurement_time(Duration::from_secs(8));
    g.bench_function("plain-file", |b| {
        b.iter(|| {
            plain
                .read_exact_at(&mut buf, (rng.next() % blocks) * 4096)
                .unwrap()
        })
    });
    g.bench_function("depth-1", |b| {
        b.iter(|| {
            shallow
                .read_at(&mut buf, (rng.next() % blocks) * 4096)
                .unwrap()
        })
    });
    g.bench_function("depth-64", |b| {
        b.iter(|| {
            deep.read_at(&mut buf, (rng.next() % blocks) * 4096)
                .unwrap()
        })
    });
    g.finish();
}

/// 4 KiB write + flush vs pwrite + fdatasync.
fn write_flush(c: &mut Criterion) {
    let size = GIB;
    let dir = bench_dir();
    let plain = plain_file(&dir, size);
    let pool = Pool::create_file(dir.path().join("pool"), 4 * GIB, opts()).unwrap();
    let vol = pool.create_volume("wf", size).unwrap();
    fill(&vol, 256 * MIB);
    fill_plain(&plain, 256 * MIB);
    let buf = vec![0x42u8; 4096];
    let blocks = 256 * MIB / 4096;
    let mut rng = Rng(7);
    let mut g = c.benchmark_group("write-4k-flush");
    g.sample_size(20).measurement_time(Duration::from_secs(8));
    g.bench_function("plain-file-fdatasync", |b| {
        b.iter(|| {
            plain
                .write_all_at(&buf, (rng.next() % blocks) * 4096)
                .unwrap();
            plain.sync_data().unwrap();
        })
    });
    g.bench_function("volume-owned-flush", |b| {
        b.iter(|| {
            vol.write_at(&buf, (rng.next() % blocks) * 4096).unwrap();
            vol.flush().unwrap();
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    random_writes,
    sequential,
    read_depth,
    write_flush,
    snapshot_latency
);
criterion_main!(benches);
