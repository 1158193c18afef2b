//! The engine in a child process, killed with SIGKILL at random moments during writes,
//! flushes and snapshots: after each kill the pool opens, `check()` is clean, every write
//! flushed before the kill is there, and every reported snapshot holds exactly its records.

use snapvol::{Pool, PoolOptions};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RECORD: usize = 10_000;
const SLOTS: u64 = 300;
const VOL_SIZE: u64 = SLOTS * RECORD as u64;

fn record(n: u64) -> Vec<u8> {
    let word = (n as u32) | 0x8000_0000;
    word.to_le_bytes()
        .iter()
        .copied()
        .cycle()
        .take(RECORD)
        .collect()
}

fn slot(n: u64) -> u64 {
    (n * 7919) % SLOTS * RECORD as u64
}

fn opts() -> PoolOptions {
    PoolOptions::default()
        .block_size(4096)
        .commit_interval(Some(Duration::from_millis(200)))
}

/// The child: writes numbered records forever, flushing and snapshotting now and then, and
/// reports on stdout what is durable ("flushed N") and which snapshots exist ("snap NAME N").
fn child(path: &str, round: u64, start: u64) {
    let pool = Pool::open_path(path, opts()).unwrap();
    let vol = pool.volume("v").unwrap();
    let mut n = start;
    loop {
        n += 1;
        vol.write_at(&record(n), slot(n)).unwrap();
        if n % 17 == 0 {
            vol.flush().unwrap();
            println!("flushed {n}");
        }
        if n % 61 == 0 {
            let name = format!("s{round}-{n}");
            pool.snapshot("v", &name).unwrap();
            println!("snap {name} {n}");
        }
        if n % 97 == 0 {
            // Keep the snapshot count bounded: delete an older one.
            if let Some(s) = pool
                .snapshots()
                .unwrap()
                .first()
                .filter(|_| pool.snapshots().unwrap().len() > 4)
            {
                // Announced first: a kill may land between the two.
                println!("deleting {}", s.name);
                pool.delete_snapshot("v", &s.name).unwrap();
            }
        }
    }
}

/// What the pool must hold: for every slot, the newest record at or below `upto` that maps
/// to it, or a record written later (unflushed writes may be there too).
fn verify_volume(read: impl Fn(&mut [u8], u64), at_least: u64, at_most: u64) {
    let mut newest = vec![0u64; SLOTS as usize];
    for n in 1..=at_least {
        newest[(slot(n) / RECORD as u64) as usize] = n;
    }
    for s in 0..SLOTS {
        let mut buf = vec![0u8; RECORD];
        read(&mut buf, s * RECORD as u64);
        let word = u32::from_le_bytes(buf[..4].try_into().unwrap());
        let want = newest[s as usize];
        if word == 0 {
            assert_eq!(want, 0, "slot {s}: flushed record {want} lost");
            continue;
        }
        assert!(
            buf.chunks(4).all(|c| c == &word.to_le_bytes()[..]),
            "slot {s} is torn"
        );
        let got = u64::from(word & 0x7FFF_FFFF);
        assert_eq!(
            slot(got) / RECORD as u64,
            s,
            "record {got} in the wrong slot"
        );
        assert!(
            got >= want && got <= at_most,
            "slot {s}: record {got}, flushed {want}"
        );
    }
}

#[test]
fn sigkill_during_writes_flushes_and_snapshots() {
    if let Ok(args) = std::env::var("SNAPVOL_KILL_CHILD") {
        let v: Vec<&str> = args.split(' ').collect();
        child(v[0], v[1].parse().unwrap(), v[2].parse().unwrap());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.img");
    let pool = Pool::create_file(&path, 64 << 20, opts()).unwrap();
    pool.create_volume("v", VOL_SIZE).unwrap();
    pool.close().unwrap();
    // Record numbers restart after the last durable one each round; rewriting record n is
    // idempotent (same bytes, same slot). Unflushed records of a killed round may have
    // landed, so any record up to `ceiling` may be found.
    let mut next = 0u64;
    let mut ceiling = 0u64;
    let mut seen_snaps: std::collections::HashMap<String, Vec<u8>> = Default::default();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let rounds = 12;
    let mut snaps_total = 0;
    for round in 0..rounds {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sigkill_during_writes_flushes_and_snapshots",
                "--nocapture",
            ])
            .env(
                "SNAPVOL_KILL_CHILD",
                format!("{} {round} {next}", path.display()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let kill_after = Duration::from_millis(50 + rng % 400);
        // Read the child's reports until the kill time, then SIGKILL it mid-flight.
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => lines.push(l),
                    Err(_) => break,
                }
            }
            lines
        });
        let t = Instant::now();
        while t.elapsed() < kill_after {
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        let mut flushed = next;
        let mut snaps: Vec<(String, u64)> = Vec::new();
        let mut last = next;
        for l in &lines {
            let parts: Vec<&str> = l.split_whitespace().collect();
            match parts.as_slice() {
                ["flushed", n] => flushed = flushed.max(n.parse().unwrap()),
                // A snapshot is a commit: everything written before it is durable.
                ["snap", name, n] => {
                    let n: u64 = n.parse().unwrap();
                    flushed = flushed.max(n);
                    snaps.push((name.to_string(), n));
                }
                ["deleting", name] => {
                    snaps.retain(|s| s.0 != *name);
                    seen_snaps.remove(*name);
                }
                _ => {}
            }
        }
        last = last.max(flushed);
        // A generous bound on records written after the last report before the kill.
        ceiling = ceiling.max(last + 2000);
        let pool = Pool::open_path(&path, opts()).unwrap();
        let report = pool.check().unwrap();
        assert!(report.is_clean(), "round {round}: {:?}", report.problems);
        let vol = pool.volume("v").unwrap();
        verify_volume(|b, o| vol.read_at(b, o).unwrap(), flushed, ceiling);
        for (name, n) in &snaps {
            let s = pool.snapshot_handle("v", name).unwrap();
            verify_volume(|b, o| s.read_at(b, o).unwrap(), *n, ceiling);
            let mut all = vec![0u8; VOL_SIZE as usize];
            s.read_at(&mut all, 0).unwrap();
            // A snapshot never changes, across kills and reopen.
            let first = seen_snaps
                .entry(name.clone())
                .or_insert_with(|| all.clone());
            assert!(*first == all, "snapshot {name} changed");
        }
        for name in seen_snaps.keys() {
            assert!(
                pool.snapshot_handle("v", name).is_ok(),
                "snapshot {name} vanished"
            );
        }
        snaps_total += snaps.len();
        next = flushed;
        drop(vol);
        pool.close().unwrap();
    }
    assert!(snaps_total > 0, "no snapshot was taken before a kill");
}
