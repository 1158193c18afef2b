//! Data checksums on against off, side by side, for the ratios in BENCHMARKS.md: two pools
//! on the same filesystem, one with `data_checksums`, the same operations on each in
//! alternating rounds (which pool goes first alternates too), the ratio of the medians
//! reported. And scrub against a sequential read of the same bytes.
//!
//! `cargo bench --bench checksums` (SNAPVOL_BENCH_DIR picks the filesystem, default the
//! temp dir; SNAPVOL_BENCH_ROUNDS the rounds, default 8).

use snapvol::{Pool, PoolOptions, Volume};
use std::ops::ControlFlow;
use std::time::Instant;

const MIB: u64 = 1 << 20;
/// Volume size: fits the page cache, so the figures are the engine's own cost.
const SIZE: u64 = 256 * MIB;

#[path = "support/mod.rs"]
mod support;
use support::{median, rounds, time, Rng};

struct Side {
    pool: Pool,
    vol: Volume,
}

fn side(dir: &std::path::Path, checksums: bool) -> Side {
    let path = dir.join(format!("pool-{checksums}"));
    let _ = std::fs::remove_file(&path);
    let pool = Pool::create_file(
        &path,
        4 * SIZE,
        PoolOptions::default()
            .commit_interval(None)
            .data_checksums(checksums),
    )
    .unwrap();
    let vol = pool.create_volume("v", SIZE).unwrap();
    let chunk: Vec<u8> = (0..4 * MIB).map(|i| (i % 251) as u8).collect();
    for off in (0..SIZE).step_by(chunk.len()) {
        vol.write_at(&chunk, off).unwrap();
    }
    pool.flush().unwrap();
    Side { pool, vol }
}

/// Runs `op` on both sides for every round, the order alternating; prints off, on, on/off.
fn compare(name: &str, sides: &[Side; 2], mut op: impl FnMut(&Side, usize) -> f64) {
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for r in 0..rounds() {
        if r % 2 == 0 {
            off.push(op(&sides[0], r));
            on.push(op(&sides[1], r));
        } else {
            on.push(op(&sides[1], r));
            off.push(op(&sides[0], r));
        }
    }
    let (a, b) = (median(off), median(on));
    println!(
        "{name:<44} off {a:>9.2} us  on {b:>9.2} us  on/off {:.2}x",
        b / a
    );
}

fn main() {
    let base = std::env::var("SNAPVOL_BENCH_DIR")
        .unwrap_or_else(|_| std::env::temp_dir().display().to_string());
    let dir = tempfile::tempdir_in(base).unwrap();
    let sides = [side(dir.path(), false), side(dir.path(), true)];
    let blocks = SIZE / 4096;
    let n = 20_000;

    compare("4 KiB random reads (cached)", &sides, |s, r| {
        let mut rng = Rng(0x1234 + r as u64);
        let mut buf = vec![0u8; 4096];
        time(n, |_| {
            s.vol
                .read_at(&mut buf, (rng.next() % blocks) * 4096)
                .unwrap()
        })
    });
    compare("1 MiB sequential reads (cached)", &sides, |s, _| {
        let mut buf = vec![0u8; MIB as usize];
        time(SIZE / MIB, |i| s.vol.read_at(&mut buf, i * MIB).unwrap())
    });
    // From the disk: the page cache dropped before each side's pass (root only).
    if std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok() {
        compare(
            "1 MiB sequential reads (cold, caches dropped)",
            &sides,
            |s, _| {
                let _ = std::process::Command::new("sync").status();
                std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
                let mut buf = vec![0u8; MIB as usize];
                time(SIZE / MIB, |i| s.vol.read_at(&mut buf, i * MIB).unwrap())
            },
        );
    } else {
        println!(
            "1 MiB sequential reads (cold): SKIPPED, /proc/sys/vm/drop_caches is not writable"
        );
    }
    // Owned blocks a commit already points at: with checksums the first write of each per
    // transaction redirects (a new block and a map change); a flush ends every round.
    compare("4 KiB random writes, owned (+ flush)", &sides, |s, r| {
        let mut rng = Rng(0x777 + r as u64);
        let data = vec![r as u8; 4096];
        let us = time(n, |_| {
            s.vol.write_at(&data, (rng.next() % blocks) * 4096).unwrap()
        });
        let t = Instant::now();
        s.pool.flush().unwrap();
        us + t.elapsed().as_secs_f64() * 1e6 / n as f64
    });
    // Owned blocks the open transaction wrote: in place on both sides.
    compare(
        "4 KiB rewrites of one 4 MiB range, owned",
        &sides,
        |s, r| {
            let data = vec![r as u8; 4096];
            s.vol.write_at(&vec![1u8; 4 * MIB as usize], 0).unwrap();
            let us = time(n, |i| s.vol.write_at(&data, (i % 1024) * 4096).unwrap());
            s.pool.flush().unwrap();
            us
        },
    );
    // A database's pattern: each write made durable at once. Without checksums the write
    // goes in place and the flush is one device barrier; with them the write redirects and
    // the flush is a commit (map and space pages, superblock, two barriers).
    compare("4 KiB random write + flush each, owned", &sides, |s, r| {
        let mut rng = Rng(0x555 + r as u64);
        let data = vec![r as u8; 4096];
        time(500, |_| {
            s.vol.write_at(&data, (rng.next() % blocks) * 4096).unwrap();
            s.vol.flush().unwrap();
        })
    });
    compare("4 KiB random writes, shared (+ flush)", &sides, |s, r| {
        let snap = format!("s{r}");
        s.pool.snapshot("v", &snap).unwrap();
        let mut rng = Rng(0x999 + r as u64);
        let data = vec![r as u8; 4096];
        let us = time(n, |_| {
            s.vol.write_at(&data, (rng.next() % blocks) * 4096).unwrap()
        });
        let t = Instant::now();
        s.pool.flush().unwrap();
        let us = us + t.elapsed().as_secs_f64() * 1e6 / n as f64;
        s.pool.delete_snapshot("v", &snap).unwrap();
        us
    });
    compare(
        "1 MiB sequential writes, new volume (+ flush)",
        &sides,
        |s, r| {
            let name = format!("w{r}");
            let v = s.pool.create_volume(&name, 64 * MIB).unwrap();
            let data = vec![r as u8 | 1; MIB as usize];
            let us = time(64, |i| v.write_at(&data, i * MIB).unwrap());
            let t = Instant::now();
            s.pool.flush().unwrap();
            let us = us + t.elapsed().as_secs_f64() * 1e6 / 64.0;
            drop(v);
            s.pool.delete_volume(&name).unwrap();
            us
        },
    );

    // Scrub of the checksummed pool against reading the same volume sequentially in 1 MiB
    // requests (both from the page cache after a warm-up read).
    let s = &sides[1];
    let mut buf = vec![0u8; MIB as usize];
    let (mut read, mut scrub) = (Vec::new(), Vec::new());
    for r in 0..rounds() {
        let mut seq = || {
            let t = Instant::now();
            for i in 0..SIZE / MIB {
                s.vol.read_at(&mut buf, i * MIB).unwrap();
            }
            t.elapsed().as_secs_f64()
        };
        let sc = || {
            let t = Instant::now();
            let rep = s.pool.scrub(None, |_| ControlFlow::Continue(())).unwrap();
            assert!(rep.is_clean() && rep.bytes >= SIZE);
            t.elapsed().as_secs_f64()
        };
        if r % 2 == 0 {
            let x = seq();
            read.push(x);
            scrub.push(sc());
        } else {
            scrub.push(sc());
            read.push(seq());
        }
    }
    let (a, b) = (median(read), median(scrub));
    let mb = SIZE as f64 / MIB as f64;
    println!(
        "{:<44} read {:>7.0} MiB/s  scrub {:>7.0} MiB/s  scrub/read {:.2}x",
        "scrub vs sequential read of 256 MiB",
        mb / a,
        mb / b,
        a / b
    );
}
