//! Concurrent flushers (issue 11's group commit): `threads` writers each write 4 KiB into
//! their own region and flush, over and over, on a pool file (SNAPVOL_BENCH_DIR, default
//! the temp directory). Prints flushes per second and device flushes (fdatasync) per flush,
//! side by side for 1, 2, 4 and 8 threads.
//!
//!     cargo bench --features testing --bench flush
//!
//! Each thread count runs on a pool without data checksums (the writes go in place, so a
//! flush is a device barrier) and on one with them (each write after a commit redirects,
//! so a flush is a commit with dirty pages).
//!
//! No criterion: the figure is a throughput of several threads, measured over a fixed time.

use snapvol::device::{CountingDevice, FileDevice};
use snapvol::{Pool, PoolOptions};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let base = std::env::var("SNAPVOL_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let secs: u64 = std::env::var("SNAPVOL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    for (threads, checksums) in [1usize, 2, 4, 8]
        .into_iter()
        .flat_map(|t| [(t, false), (t, true)])
    {
        let dir = tempfile::tempdir_in(&base).unwrap();
        let dev = Arc::new(CountingDevice::new(Arc::new(
            FileDevice::create(dir.path().join("pool"), 1 << 30).unwrap(),
        )));
        let pool = Pool::create(
            dev.clone(),
            PoolOptions::default()
                .commit_interval(None)
                .data_checksums(checksums),
        )
        .unwrap();
        let vol = pool.create_volume("v", 256 << 20).unwrap();
        // Every region written once and committed: the timed writes go in place, as a
        // guest's rewrites of its own blocks do.
        for t in 0..threads as u64 {
            vol.write_at(&vec![1u8; 1 << 20], t << 20).unwrap();
        }
        vol.flush().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let before = dev.flushes();
        let start = Instant::now();
        let workers: Vec<_> = (0..threads as u64)
            .map(|t| {
                let (vol, stop, done) = (vol.clone(), stop.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        vol.write_at(&[i as u8; 4096], (t << 20) + (i % 256) * 4096)
                            .unwrap();
                        vol.flush().unwrap();
                        done.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(secs));
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        let elapsed = start.elapsed().as_secs_f64();
        let n = done.load(Ordering::Relaxed);
        let dev_flushes = dev.flushes() - before;
        println!(
            "{threads} threads, data checksums {}: {:.0} flushes/s, {:.2} device flushes per flush",
            if checksums { "on " } else { "off" },
            n as f64 / elapsed,
            dev_flushes as f64 / n as f64
        );
    }
}
