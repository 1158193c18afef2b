//! The data path's own cost, side by side with the plain file (issue 17's targets):
//! cached 4 KiB random reads from one and two threads, owned and shared 4 KiB writes, and
//! 4 KiB first writes from one and four threads.
//!
//! `cargo bench --bench io_path [SCENARIO...]` (SNAPVOL_BENCH_DIR picks the filesystem,
//! default the temp dir; SNAPVOL_BENCH_ROUNDS the rounds, default 8). Scenarios: `reads`,
//! `overwrites`, `first-writes`, `reads-during-commits`.
//!
//! Instruction counts: with SNAPVOL_COUNT_OPS=N each scenario sets up as usual, then runs
//! only N volume operations of each kind inside `counted` (on the pool without the
//! translation cache with SNAPVOL_COUNT_LOCKED=1; of the writes, only those into shared
//! blocks with SNAPVOL_COUNT_SHARED=1), for
//! `valgrind --tool=callgrind --toggle-collect='*counted*'`; instructions per operation are
//! the difference of two such runs (N and 2N) divided by N.

use snapvol::{Pool, PoolOptions, Volume};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

#[path = "support/mod.rs"]
mod support;
use support::{median, plain_file, rounds, run_scenarios, time, Rng};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

/// Runs `op` `n` times with its own name in the stack, for callgrind's toggle.
#[inline(never)]
fn counted(n: u64, op: &mut dyn FnMut(u64)) {
    for i in 0..n {
        op(i);
    }
}

/// In count mode, whether to count the pool without the translation cache
/// (SNAPVOL_COUNT_LOCKED=1) instead of the one with it.
fn count_locked() -> bool {
    std::env::var_os("SNAPVOL_COUNT_LOCKED").is_some()
}

fn count_ops() -> Option<u64> {
    std::env::var("SNAPVOL_COUNT_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
}

/// The plain file, written whole as the volumes are.
fn filled_plain(dir: &tempfile::TempDir, size: u64) -> File {
    let f = plain_file(dir, size);
    let chunk = vec![0x5Au8; 4 * MIB as usize];
    for off in (0..size).step_by(chunk.len()) {
        f.write_all_at(&chunk, off).unwrap();
    }
    f.sync_data().unwrap();
    f
}

/// A pool with the translation cache and one without, each holding a filled volume `name`
/// of `size` bytes.
fn both_filled(
    dir: &tempfile::TempDir,
    bytes: u64,
    name: &str,
    size: u64,
) -> (Pool, Volume, Pool, Volume) {
    let pool = pool(dir, bytes);
    let vol = filled(&pool, name, size);
    let locked = locked_pool(dir, bytes);
    let lvol = filled(&locked, name, size);
    (pool, vol, locked, lvol)
}

fn pool(dir: &tempfile::TempDir, bytes: u64) -> Pool {
    Pool::create_file(dir.path().join("pool"), bytes, PoolOptions::default()).unwrap()
}

/// A pool without the translation cache: every I/O plans under the engine lock, as before
/// the cache (the side-by-side baseline for it).
fn locked_pool(dir: &tempfile::TempDir, bytes: u64) -> Pool {
    let opts = PoolOptions::default().translation_slots(0);
    Pool::create_file(dir.path().join("locked"), bytes, opts).unwrap()
}

fn filled(pool: &Pool, name: &str, size: u64) -> Volume {
    let vol = pool.create_volume(name, size).unwrap();
    let chunk = vec![0x5Au8; 4 * MIB as usize];
    for off in (0..size).step_by(chunk.len()) {
        vol.write_at(&chunk, off).unwrap();
    }
    vol.flush().unwrap();
    vol
}

/// Wall time per operation of `n` operations split over `threads` threads, each drawing
/// its own random block numbers below `blocks`.
fn threaded(n: u64, threads: u64, blocks: u64, op: &(dyn Fn(u64, &mut [u8]) + Sync)) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for th in 0..threads {
            s.spawn(move || {
                let mut rng = Rng(0xC0FFEE + th);
                let mut buf = vec![0x42u8; BLOCK as usize];
                for _ in 0..n / threads {
                    op((rng.next() % blocks) * BLOCK, &mut buf);
                }
            });
        }
    });
    start.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn line(label: &str, base: f64, us: f64) {
    println!("  {label:<36} {us:>8.3} us/op   ratio {:.2}x", base / us);
}

/// Cached 4 KiB random reads: pread against a volume, one thread and two.
fn reads(dir: &tempfile::TempDir) {
    let size = GIB;
    let blocks = size / BLOCK;
    let (_pool, vol, _locked, lvol) = both_filled(dir, 4 * GIB, "r", size);
    // Every block read once: the page cache and the pool's caches hold the whole volume.
    let warm = |read: &dyn Fn(u64, &mut [u8])| {
        let mut buf = vec![0u8; BLOCK as usize];
        for b in 0..blocks {
            read(b * BLOCK, &mut buf);
        }
    };
    warm(&|at, b| vol.read_at(b, at).unwrap());
    warm(&|at, b| lvol.read_at(b, at).unwrap());
    if let Some(n) = count_ops() {
        let mut buf = vec![0u8; BLOCK as usize];
        let v = if count_locked() { &lvol } else { &vol };
        {
            let mut rng = Rng(7);
            counted(n, &mut |_| {
                v.read_at(&mut buf, (rng.next() % blocks) * BLOCK).unwrap()
            });
        }
        return;
    }
    let plain = filled_plain(dir, size);
    let n = 200_000;
    let plain_read = |at: u64, b: &mut [u8]| plain.read_exact_at(b, at).unwrap();
    let vol_read = |at: u64, b: &mut [u8]| vol.read_at(b, at).unwrap();
    let locked_read = |at: u64, b: &mut [u8]| lvol.read_at(b, at).unwrap();
    warm(&plain_read);
    let (mut p1, mut v1, mut l1, mut p2, mut v2, mut l2) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..rounds() {
        p1.push(threaded(n, 1, blocks, &plain_read));
        v1.push(threaded(n, 1, blocks, &vol_read));
        l1.push(threaded(n, 1, blocks, &locked_read));
        p2.push(threaded(n, 2, blocks, &plain_read));
        v2.push(threaded(n, 2, blocks, &vol_read));
        l2.push(threaded(n, 2, blocks, &locked_read));
    }
    let [p1, v1, l1, p2, v2, l2] = [p1, v1, l1, p2, v2, l2].map(median);
    println!(
        "4 KiB random reads of cached data (1 GiB), medians of {}:",
        rounds()
    );
    line("pread, 1 thread", p1, p1);
    line("volume, 1 thread (vs pread)", p1, v1);
    line("volume, no cache, 1 thread (vs pread)", p1, l1);
    line("pread, 2 threads", p2, p2);
    line("volume, 2 threads (vs pread, 2)", p2, v2);
    line("volume, no cache, 2 threads", p2, l2);
    println!(
        "  scaling 1 -> 2 threads: pread {:.2}x, volume {:.2}x, no cache {:.2}x",
        p1 / p2,
        v1 / v2,
        l1 / l2
    );
}

/// 4 KiB random writes into owned blocks and into blocks shared with a snapshot, against
/// pwrite into a file written once.
fn overwrites(dir: &tempfile::TempDir) {
    let size = GIB;
    let blocks = size / BLOCK;
    let (pool, vol, locked, lvol) = both_filled(dir, 8 * GIB, "w", size);
    let buf = vec![0xA5u8; BLOCK as usize];
    let n = 50_000;
    if let Some(n) = count_ops() {
        // Owned overwrites (each block written once first, so the cache knows it owned),
        // then writes into blocks shared with a snapshot.
        let (p, v) = match count_locked() {
            true => (&locked, &lvol),
            false => (&pool, &vol),
        };
        {
            let offsets: Vec<u64> = {
                let mut rng = Rng(9);
                (0..n).map(|_| (rng.next() % blocks) * BLOCK).collect()
            };
            for &o in &offsets {
                v.write_at(&buf, o).unwrap();
            }
            // SNAPVOL_COUNT_SHARED=1 counts only the shared writes.
            let shared = std::env::var_os("SNAPVOL_COUNT_SHARED").is_some();
            let mut write = |i: u64| v.write_at(&buf, offsets[i as usize]).unwrap();
            if !shared {
                counted(n, &mut write);
            }
            p.snapshot("w", "count").unwrap();
            if shared {
                counted(n, &mut write);
            }
        }
        return;
    }
    let plain = filled_plain(dir, size);
    let (mut p, mut o, mut s, mut lo) = (vec![], vec![], vec![], vec![]);
    for r in 0..rounds() {
        let mut rng = Rng(0x51 + r as u64);
        p.push(time(n, |_| {
            plain
                .write_all_at(&buf, (rng.next() % blocks) * BLOCK)
                .unwrap()
        }));
        // Owned: the same offsets twice, the first pass making every one owned again after
        // the previous round's snapshot.
        let mut rng = Rng(0x52 + r as u64);
        let offsets: Vec<u64> = (0..n).map(|_| (rng.next() % blocks) * BLOCK).collect();
        pool.snapshot("w", &format!("s{r}")).unwrap();
        s.push(time(n, |i| {
            vol.write_at(&buf, offsets[i as usize]).unwrap()
        }));
        o.push(time(n, |i| {
            vol.write_at(&buf, offsets[i as usize]).unwrap()
        }));
        pool.delete_snapshot("w", &format!("s{r}")).unwrap();
        vol.flush().unwrap();
        locked.snapshot("w", &format!("s{r}")).unwrap();
        time(n, |i| lvol.write_at(&buf, offsets[i as usize]).unwrap());
        lo.push(time(n, |i| {
            lvol.write_at(&buf, offsets[i as usize]).unwrap()
        }));
        locked.delete_snapshot("w", &format!("s{r}")).unwrap();
        lvol.flush().unwrap();
    }
    let [p, o, s, lo] = [p, o, s, lo].map(median);
    println!("4 KiB random writes (1 GiB), medians of {}:", rounds());
    line("pwrite", p, p);
    line("volume, owned blocks (vs pwrite)", p, o);
    line("volume, no cache, owned (vs pwrite)", p, lo);
    line("volume, shared blocks (vs pwrite)", p, s);
}

/// 4 KiB first writes (each into a block not mapped yet) from one thread and from four.
fn first_writes(dir: &tempfile::TempDir) {
    let size = 4 * GIB;
    let blocks = size / BLOCK;
    let pool = pool(dir, 8 * GIB);
    let n = 100_000u64;
    let buf = vec![0x3Cu8; BLOCK as usize];
    if let Some(n) = count_ops() {
        let vol = pool.create_volume("c", size).unwrap();
        let mut rng = Rng(11);
        counted(n, &mut |_| {
            vol.write_at(&buf, (rng.next() % blocks) * BLOCK).unwrap()
        });
        return;
    }
    // Each thread writes its own stride of distinct blocks, so every write is a first write.
    let run = |vol: &Volume, threads: u64| {
        let start = Instant::now();
        std::thread::scope(|s| {
            for th in 0..threads {
                let buf = &buf;
                s.spawn(move || {
                    for i in 0..n / threads {
                        let b = (i * threads + th).wrapping_mul(0x9E37_79B9) % blocks;
                        // Distinct for i*threads+th below blocks: 0x9E3779B9 is odd and
                        // blocks a power of two, so the multiplication permutes them.
                        vol.write_at(buf, b * BLOCK).unwrap();
                    }
                });
            }
        });
        start.elapsed().as_secs_f64() * 1e6 / n as f64
    };
    let (mut one, mut four) = (vec![], vec![]);
    for r in 0..rounds() {
        let a = pool.create_volume(&format!("a{r}"), size).unwrap();
        one.push(run(&a, 1));
        drop(a);
        pool.delete_volume(&format!("a{r}")).unwrap();
        let b = pool.create_volume(&format!("b{r}"), size).unwrap();
        four.push(run(&b, 4));
        drop(b);
        pool.delete_volume(&format!("b{r}")).unwrap();
        pool.flush().unwrap();
    }
    let (one, four) = (median(one), median(four));
    println!(
        "4 KiB first writes (4 GiB volume), medians of {}:",
        rounds()
    );
    println!("  1 thread   {one:>8.3} us/op");
    println!(
        "  4 threads  {four:>8.3} us/op   throughput {:.2}x one thread",
        one / four
    );
}

/// Latency of cached 4 KiB reads of one volume while another thread commits over and over
/// (a first write into another volume, then a flush: dirty map pages, two device flushes):
/// with the cache the reads do not wait for the commit's engine lock; without it they do.
fn reads_during_commits(dir: &tempfile::TempDir) {
    let size = 256 * MIB;
    let blocks = size / BLOCK;
    for (label, pool) in [
        ("with the cache", pool(dir, 4 * GIB)),
        ("without (locked path)", locked_pool(dir, 4 * GIB)),
    ] {
        let hot = filled(&pool, "hot", size);
        let mut buf = vec![0u8; BLOCK as usize];
        for b in 0..blocks {
            hot.read_at(&mut buf, b * BLOCK).unwrap();
        }
        let cold = pool.create_volume("cold", 2 * GIB).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (lat, commits) = std::thread::scope(|s| {
            let writer = s.spawn(|| {
                let data = vec![0x77u8; BLOCK as usize];
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Spread over the volume: each commit has map pages of its own to write.
                    cold.write_at(&data, (n * 4099 % (2 * GIB / BLOCK)) * BLOCK)
                        .unwrap();
                    cold.flush().unwrap();
                    n += 1;
                }
                n
            });
            let mut rng = Rng(0xD1);
            let mut lat = Vec::with_capacity(1 << 20);
            let start = Instant::now();
            while start.elapsed().as_secs_f64() < 3.0 {
                let t = Instant::now();
                hot.read_at(&mut buf, (rng.next() % blocks) * BLOCK)
                    .unwrap();
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            (lat, writer.join().unwrap())
        });
        let mut lat = lat;
        lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let q = |f: f64| lat[((lat.len() - 1) as f64 * f) as usize];
        println!(
            "cached 4 KiB reads during {commits} commits in 3 s, {label}: {} reads, median {:.2} us, p99 {:.1} us, p99.9 {:.1} us, max {:.0} us",
            lat.len(),
            q(0.5),
            q(0.99),
            q(0.999),
            lat[lat.len() - 1]
        );
    }
}

fn main() {
    run_scenarios(&[
        ("reads", reads),
        ("overwrites", overwrites),
        ("first-writes", first_writes),
        ("reads-during-commits", reads_during_commits),
    ]);
}
