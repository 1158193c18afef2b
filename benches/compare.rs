//! Side-by-side comparison with plain-file I/O, for the ratios in BENCHMARKS.md.
//!
//! Page-cache and writeback state swing per-operation times by 10x between moments on a
//! shared machine, so each scenario alternates rounds: a round of plain-file operations and
//! the same operations on a volume, repeated; the ratio of the medians is reported. For the
//! write scenarios the order within a round alternates too (see `abba`).
//!
//! `cargo bench --bench compare` (SNAPVOL_BENCH_DIR picks the filesystem, default the temp
//! dir; SNAPVOL_BENCH_ROUNDS the rounds, default 8).

use snapvol::{Pool, PoolOptions, Volume};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

#[path = "support/mod.rs"]
mod support;
use support::{median, plain_file, rounds, run_scenarios, time, Rng};

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// Prints each row's median and its ratio to the baseline's median, then the same for the
/// best round of each. On this VM a large buffered write is bimodal (the same 1 GiB write takes
/// ~0.3 s or ~2.4 s, see BENCHMARKS.md), so a median of 8 can land in either mode; the best
/// round shows the cost without the host's share.
fn report(name: &str, base: &str, base_us: &[f64], rows: &[(&str, Vec<f64>)]) {
    let b = median(base_us.to_vec());
    let bb = best(base_us);
    println!(
        "{name}: {base} {b:.2} us/op (median of {}, best {bb:.2})",
        base_us.len()
    );
    for (label, us) in rows {
        let m = median(us.clone());
        let mb = best(us);
        println!(
            "  {label:<28} {m:>9.2} us/op   ratio to {base}: {:.2}x   (best {mb:.2}: {:.2}x)",
            b / m,
            bb / mb
        );
    }
}

/// Lets writeback and discards from the previous step finish before the next is timed.
fn settle() {
    let _ = std::process::Command::new("sync").status();
    std::thread::sleep(std::time::Duration::from_millis(200));
}

/// Runs the plain-file side and the volume side of round `r`, plain first in even rounds and
/// the volume first in odd ones: whichever runs second inherits the first one's dirty pages
/// and writeback, so a fixed order biases every round the same way.
fn abba(r: usize, plain: impl FnOnce() -> f64, vol: impl FnOnce() -> f64) -> (f64, f64) {
    if r % 2 == 0 {
        let p = plain();
        (p, vol())
    } else {
        let v = vol();
        (plain(), v)
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

fn setup(dir: &tempfile::TempDir, size: u64, pool_size: u64) -> (File, Pool) {
    let plain = plain_file(dir, size);
    let pool =
        Pool::create_file(dir.path().join("pool"), pool_size, PoolOptions::default()).unwrap();
    (plain, pool)
}

/// The plain file and a volume of `size` bytes, both written whole.
fn setup_filled(
    dir: &tempfile::TempDir,
    size: u64,
    pool_size: u64,
    name: &str,
) -> (File, Pool, Volume) {
    let (plain, pool) = setup(dir, size, pool_size);
    fill_plain(&plain, size);
    let vol = pool.create_volume(name, size).unwrap();
    fill(&vol, size);
    (plain, pool, vol)
}

fn random_writes(dir: &tempfile::TempDir) {
    let size = 2 * GIB;
    let blocks = size / 4096;
    let n = 100_000;
    let (plain, pool, owned) = setup_filled(dir, size, 16 * GIB, "owned");
    let shared = pool.create_volume("shared", size).unwrap();
    fill(&shared, size);
    let buf = vec![0xA5u8; 4096];
    let (mut p, mut o, mut s, mut u) = (vec![], vec![], vec![], vec![]);
    for r in 0..rounds() {
        let plain_round = || {
            let mut rng = Rng(0x9E37_79B9 + r as u64);
            time(n, |_| {
                plain
                    .write_all_at(&buf, (rng.next() % blocks) * 4096)
                    .unwrap()
            })
        };
        let owned_round = || {
            let mut rng = Rng(0x9E37_79B9 + r as u64);
            time(n, |_| {
                owned.write_at(&buf, (rng.next() % blocks) * 4096).unwrap()
            })
        };
        let (pt, ot) = abba(r, plain_round, owned_round);
        p.push(pt);
        o.push(ot);
        // Every block shared again: a fresh snapshot, the previous one deleted.
        pool.snapshot("shared", &format!("s{r}")).unwrap();
        if r > 0 {
            pool.delete_snapshot("shared", &format!("s{}", r - 1))
                .unwrap();
        }
        let mut rng = Rng(0x9E37_79B9 + r as u64);
        s.push(time(n, |_| {
            shared.write_at(&buf, (rng.next() % blocks) * 4096).unwrap()
        }));
        // Unallocated: a fresh volume, each block written once (a stride permutation).
        let fresh = pool.create_volume("fresh", size).unwrap();
        u.push(time(n, |i| {
            let blk = i.wrapping_mul(2_654_435_761) % blocks;
            fresh.write_at(&buf, blk * 4096).unwrap()
        }));
        drop(fresh);
        pool.delete_volume("fresh").unwrap();
    }
    report(
        "4 KiB random writes (2 GiB)",
        "plain file (written once)",
        &p,
        &[
            ("(a) unallocated blocks", u),
            ("(b) owned blocks", o),
            ("(c) blocks shared with a snapshot", s),
        ],
    );
}

fn sequential(dir: &tempfile::TempDir) {
    let size = 2 * GIB;
    let steps = size / MIB;
    let (plain, _pool, vol) = setup_filled(dir, size, 8 * GIB, "seq");
    let chunk = vec![0x3Cu8; MIB as usize];
    let mut out = vec![0u8; MIB as usize];
    let n = 2 * steps;
    let (mut pw, mut vw, mut pr, mut vr) = (vec![], vec![], vec![], vec![]);
    for r in 0..rounds() {
        let (p, v) = abba(
            r,
            || {
                time(n, |i| {
                    plain.write_all_at(&chunk, (i % steps) * MIB).unwrap()
                })
            },
            || time(n, |i| vol.write_at(&chunk, (i % steps) * MIB).unwrap()),
        );
        pw.push(p);
        vw.push(v);
        let out = std::cell::RefCell::new(&mut out);
        let (p, v) = abba(
            r,
            || {
                time(n, |i| {
                    plain
                        .read_exact_at(&mut out.borrow_mut()[..], (i % steps) * MIB)
                        .unwrap()
                })
            },
            || {
                time(n, |i| {
                    vol.read_at(&mut out.borrow_mut()[..], (i % steps) * MIB)
                        .unwrap()
                })
            },
        );
        pr.push(p);
        vr.push(v);
    }
    report(
        "1 MiB sequential writes (owned blocks)",
        "plain file",
        &pw,
        &[("volume", vw)],
    );
    report(
        "1 MiB sequential reads",
        "plain file",
        &pr,
        &[("volume", vr)],
    );
}

fn read_depth(dir: &tempfile::TempDir) {
    let size = GIB;
    let blocks = size / 4096;
    let (plain, pool, _base) = setup_filled(dir, size, 8 * GIB, "d0");
    let buf = vec![7u8; 4096];
    let mut rng = Rng(42);
    // Depth 1 and depth 64 get the same number of copy-on-write writes, so their maps
    // differ only in how deep the chain of snapshots and clones behind them is.
    pool.snapshot("d0", "s").unwrap();
    let shallow = pool.clone_snapshot("d0", "s", "shallow").unwrap();
    for _ in 0..blocks {
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
    let mut out = vec![0u8; 4096];
    let n = 200_000;
    let (mut p, mut s1, mut s64) = (vec![], vec![], vec![]);
    for r in 0..rounds() {
        let mut rng = Rng(77 + r as u64);
        p.push(time(n, |_| {
            plain
                .read_exact_at(&mut out, (rng.next() % blocks) * 4096)
                .unwrap()
        }));
        let mut rng = Rng(77 + r as u64);
        s1.push(time(n, |_| {
            shallow
                .read_at(&mut out, (rng.next() % blocks) * 4096)
                .unwrap()
        }));
        let mut rng = Rng(77 + r as u64);
        s64.push(time(n, |_| {
            deep.read_at(&mut out, (rng.next() % blocks) * 4096)
                .unwrap()
        }));
    }
    let d1 = median(s1.clone());
    let d64 = median(s64.clone());
    report(
        "4 KiB random reads (1 GiB)",
        "plain file",
        &p,
        &[("volume at depth 1", s1), ("volume at depth 64", s64)],
    );
    println!("  depth 64 vs depth 1: {:.2}x", d1 / d64);
}

/// Threads doing 4 KiB random reads and owned overwrites at once: the device transfers run
/// outside the engine lock, so the volume should scale with threads as the plain file does.
fn parallel(dir: &tempfile::TempDir) {
    let size = GIB;
    let blocks = size / 4096;
    let (plain, _pool, vol) = setup_filled(dir, size, 4 * GIB, "par");
    let n = 100_000u64;
    let threads = 2u64;
    // Each thread does n/threads operations; the figure is wall time per operation.
    let run = |op: &(dyn Fn(u64, &mut [u8]) + Sync), t: u64| {
        let start = Instant::now();
        std::thread::scope(|s| {
            for th in 0..t {
                s.spawn(move || {
                    let mut rng = Rng(0xC0FFEE + th);
                    let mut buf = vec![0x42u8; 4096];
                    for _ in 0..n / t {
                        op((rng.next() % blocks) * 4096, &mut buf);
                    }
                });
            }
        });
        start.elapsed().as_secs_f64() * 1e6 / n as f64
    };
    let plain_read = |at: u64, b: &mut [u8]| plain.read_exact_at(b, at).unwrap();
    let vol_read = |at: u64, b: &mut [u8]| vol.read_at(b, at).unwrap();
    let plain_write = |at: u64, b: &mut [u8]| plain.write_all_at(b, at).unwrap();
    let vol_write = |at: u64, b: &mut [u8]| vol.write_at(b, at).unwrap();
    let (mut pr1, mut vr1, mut prn, mut vrn, mut pwn, mut vwn) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for r in 0..rounds() {
        let (p, v) = abba(r, || run(&plain_read, 1), || run(&vol_read, 1));
        pr1.push(p);
        vr1.push(v);
        let (p, v) = abba(r, || run(&plain_read, threads), || run(&vol_read, threads));
        prn.push(p);
        vrn.push(v);
        let (p, v) = abba(
            r,
            || run(&plain_write, threads),
            || run(&vol_write, threads),
        );
        pwn.push(p);
        vwn.push(v);
    }
    let scale = |one: &[f64], many: &[f64]| median(one.to_vec()) / median(many.to_vec());
    println!(
        "  read scaling 1 -> {threads} threads: plain {:.2}x, volume {:.2}x",
        scale(&pr1, &prn),
        scale(&vr1, &vrn)
    );
    report(
        "4 KiB random reads, 2 threads (1 GiB)",
        "plain file",
        &prn,
        &[("volume", vrn)],
    );
    report(
        "4 KiB random owned overwrites, 2 threads (1 GiB)",
        "plain file",
        &pwn,
        &[("volume", vwn)],
    );
}

fn write_flush(dir: &tempfile::TempDir) {
    let size = 256 * MIB;
    let blocks = size / 4096;
    let (plain, _pool, vol) = setup_filled(dir, size, 4 * GIB, "wf");
    let buf = vec![0x42u8; 4096];
    let n = 2000;
    let (mut p, mut v) = (vec![], vec![]);
    for r in 0..rounds() {
        let mut rng = Rng(5 + r as u64);
        p.push(time(n, |_| {
            plain
                .write_all_at(&buf, (rng.next() % blocks) * 4096)
                .unwrap();
            plain.sync_data().unwrap();
        }));
        let mut rng = Rng(5 + r as u64);
        v.push(time(n, |_| {
            vol.write_at(&buf, (rng.next() % blocks) * 4096).unwrap();
            vol.flush().unwrap();
        }));
    }
    report(
        "4 KiB write + flush",
        "plain pwrite + fdatasync",
        &p,
        &[("volume write + flush", v)],
    );
}

/// Send throughput against a sequential raw-file read of the same bytes, and receive
/// throughput against a sequential raw-file write.
fn stream(dir: &tempfile::TempDir) {
    let size = GIB;
    let (plain, pool, _vol) = setup_filled(dir, size, 4 * GIB, "src");
    let snap = pool.snapshot("src", "s").unwrap();
    let mut stream = Vec::with_capacity(size as usize + (64 << 20));
    pool.send(snap, None, &mut stream).unwrap();
    let dest = Pool::create_file(dir.path().join("dest"), 4 * GIB, PoolOptions::default()).unwrap();
    let out = std::cell::RefCell::new(vec![0u8; MIB as usize]);
    let handle = pool.snapshot_by_id(snap).unwrap();
    let chunk = vec![0x5Au8; MIB as usize];
    let fresh = dir.path().join("fresh");
    let round = std::cell::Cell::new(0usize);
    let per_mib = |op: &dyn Fn(u64)| time(size / MIB, op) * (size / MIB) as f64;
    // Each measurement of a round, run in this order in even rounds and reversed in odd ones,
    // each after the filesystem has settled (the receive's delete punches a gigabyte of holes,
    // whose discards would otherwise land in whatever runs next).
    let mut steps: Vec<Box<dyn FnMut() -> f64 + '_>> = vec![
        Box::new(|| per_mib(&|i| plain.read_exact_at(&mut out.borrow_mut(), i * MIB).unwrap())),
        Box::new(|| {
            time(1, |_| {
                pool.send(snap, None, &mut std::io::sink()).unwrap();
            })
        }),
        // What send adds to reading the snapshot: checksums and the record framing.
        Box::new(|| per_mib(&|i| handle.read_at(&mut out.borrow_mut(), i * MIB).unwrap())),
        Box::new(|| per_mib(&|i| plain.write_all_at(&chunk, i * MIB).unwrap())),
        // A receive is durable when it returns, so it is also compared with write + fdatasync.
        Box::new(|| {
            time(1, |_| {
                for i in 0..size / MIB {
                    plain.write_all_at(&chunk, i * MIB).unwrap();
                }
                plain.sync_data().unwrap();
            })
        }),
        // A receive fills blocks the pool had not used (fresh pages for the filesystem too),
        // so the like-for-like file baseline writes a new file and makes it durable.
        Box::new(|| {
            let t = time(1, |_| {
                let f = File::create(&fresh).unwrap();
                for i in 0..size / MIB {
                    f.write_all_at(&chunk, i * MIB).unwrap();
                }
                f.sync_data().unwrap();
            });
            std::fs::remove_file(&fresh).unwrap();
            t
        }),
        Box::new(|| {
            let name = format!("r{}", round.get());
            let t = time(1, |_| {
                dest.receive(&mut &stream[..], Some(&name)).unwrap();
            });
            // Each round needs a fresh snapshot id: delete the copy again.
            let rs = dest
                .snapshots()
                .unwrap()
                .into_iter()
                .find(|s| s.volume_name == name)
                .unwrap();
            dest.delete_snapshot(&rs.volume_name, &rs.name).unwrap();
            dest.delete_volume(&name).unwrap();
            t
        }),
    ];
    let mut results = vec![Vec::new(); steps.len()];
    for r in 0..rounds() {
        round.set(r);
        let mut order: Vec<usize> = (0..steps.len()).collect();
        if r % 2 == 1 {
            order.reverse();
        }
        for i in order {
            settle();
            results[i].push(steps[i]());
        }
    }
    drop(steps);
    let [pr, sr, vr, pw, pws, pns, rw]: [Vec<f64>; 7] = results.try_into().unwrap();
    report(
        "send 1 GiB snapshot (full stream, to a sink)",
        "plain sequential read",
        &pr,
        &[("send", sr), ("snapshot read (no stream)", vr)],
    );
    report(
        "receive 1 GiB full stream (from memory)",
        "plain sequential write",
        &pw,
        &[("receive", rw.clone())],
    );
    report(
        "receive 1 GiB full stream (from memory), durable on return",
        "plain sequential write + fdatasync",
        &pws,
        &[("receive", rw.clone())],
    );
    report(
        "receive 1 GiB full stream (from memory), durable on return",
        "plain write of a new file + fdatasync",
        &pns,
        &[("receive", rw)],
    );
}

fn main() {
    run_scenarios(&[
        ("random-writes", random_writes),
        ("sequential", sequential),
        ("read-depth", read_depth),
        ("parallel", parallel),
        ("write-flush", write_flush),
        ("stream", stream),
    ]);
}
