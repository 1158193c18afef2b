//! Changed-block tracking from a cold start (issue 18's scenario): a 64 GiB thin volume with
//! 4 KiB blocks, 8 GiB written as 8,192 × 1 MiB one every 8 MiB, snapshot A, 1,000 scattered
//! 4 KiB writes, snapshot B.
//!
//! Measures, side by side in one run:
//! - the first `Pool::delta(A, B)` after opening the pool (node cache empty, the OS page
//!   cache warm, as a new CSI or CLI process meets it), the second (which fills the cache),
//!   and a warm one (the third) in the same process;
//! - `snapvol diff pool d@A d@B` as a whole process (start, open, walk, print, exit), against
//!   `qemu-img map` of a qcow2 overlay holding the same 1,000 writes, opened without its
//!   backing file (the cheapest question qcow2 can answer about what changed).
//!
//! `cargo bench --bench cold_delta` (SNAPVOL_BENCH_DIR picks the filesystem, default the temp
//! dir; SNAPVOL_BENCH_ROUNDS the number of rounds, default 20). The `snapvol` binary must be
//! built (`cargo build --release`); qemu-img is skipped, saying so, when it is not installed.
//! SNAPVOL_BENCH_POOL=PATH keeps the built pool at PATH for later runs.

use snapvol::{Base, DiffTarget, Pool, PoolOptions, TupleLength};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const VOLUME: u64 = 64 * GIB;
const CHANGES: u64 = 1000;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Offsets of the scattered 4 KiB changes: spread over the whole volume, inside and outside
/// the written megabytes alike, aligned to 4 KiB.
fn changes() -> impl Iterator<Item = u64> {
    (0..CHANGES).map(|i| (i * 16_769_023 * 4096) % VOLUME)
}

fn build(path: &Path) {
    let pool =
        Pool::create_file(path, 16 * GIB, PoolOptions::default().commit_interval(None)).unwrap();
    let v = pool.create_volume("d", VOLUME).unwrap();
    let mib = vec![0x5au8; MIB as usize];
    for i in 0..8192u64 {
        v.write_at(&mib, i * 8 * MIB).unwrap();
    }
    pool.snapshot("d", "A").unwrap();
    let page = vec![0xa5u8; 4096];
    for off in changes() {
        v.write_at(&page, off).unwrap();
    }
    pool.snapshot("d", "B").unwrap();
    pool.flush().unwrap();
}

fn snapvol_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/release/deps/cold_delta-… → target/release/snapvol
    exe.parent().unwrap().parent().unwrap().join("snapvol")
}

fn time_process(cmd: &mut Command) -> Duration {
    let t = Instant::now();
    let out = cmd.output().unwrap();
    let d = t.elapsed();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d
}

/// Builds base.qcow2 with the 8 GiB of data and overlay.qcow2 with the 1,000 changes, through
/// qemu-io scripts read from stdin. None when qemu-img or qemu-io is missing.
fn build_qcow2(dir: &Path) -> Option<PathBuf> {
    let have = |t: &str| Command::new(t).arg("--version").output().is_ok();
    if !have("qemu-img") || !have("qemu-io") {
        println!("qemu-img or qemu-io not installed: the qcow2 comparison is skipped");
        return None;
    }
    let base = dir.join("base.qcow2");
    let overlay = dir.join("overlay.qcow2");
    let run = |args: &[&str], script: String| {
        use std::io::Write;
        let mut child = Command::new(args[0])
            .args(&args[1..])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "{args:?} failed");
    };
    let b = base.to_str().unwrap();
    let o = overlay.to_str().unwrap();
    run(
        &["qemu-img", "create", "-q", "-f", "qcow2", b, "64G"],
        String::new(),
    );
    let script: String = (0..8192u64)
        .map(|i| format!("write -P 90 {} 1M\n", i * 8 * MIB))
        .collect();
    run(&["qemu-io", "-f", "qcow2", b], script);
    run(
        &[
            "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", b, o,
        ],
        String::new(),
    );
    let script: String = changes()
        .map(|off| format!("write -P 165 {off} 4k\n"))
        .collect();
    run(&["qemu-io", "-f", "qcow2", o], script);
    Some(overlay)
}

fn main() {
    let base = std::env::var("SNAPVOL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let rounds: usize = std::env::var("SNAPVOL_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir_in(&base).unwrap();
    // SNAPVOL_BENCH_POOL keeps the scenario's pool at that path between runs (it is built
    // when missing), which saves a minute per run while tuning.
    let path = match std::env::var("SNAPVOL_BENCH_POOL") {
        Ok(p) => PathBuf::from(p),
        Err(_) => dir.path().join("pool.img"),
    };
    println!("directory: {}, {rounds} rounds", base.display());
    if !path.exists() {
        build(&path);
    }

    let ro = || PoolOptions::default().read_only(true);
    let (mut first, mut second, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    let mut extents = 0;
    for _ in 0..rounds {
        let pool = Pool::open_path(&path, ro()).unwrap();
        let a = pool.snapshot_handle("d", "A").unwrap().id();
        let b = pool.snapshot_handle("d", "B").unwrap().id();
        let run = || {
            pool.delta(
                Base::Snapshot(a),
                DiffTarget::Snapshot(b),
                0,
                0,
                TupleLength::Variable,
            )
            .unwrap()
        };
        let t = Instant::now();
        extents = run().extents.len();
        first.push(t.elapsed());
        // The second call keeps the leaves the first one read and passed (the cache keeps
        // a page asked for twice); from the third on the walk is warm.
        let t = Instant::now();
        run();
        second.push(t.elapsed());
        let t = Instant::now();
        run();
        warm.push(t.elapsed());
    }
    let (f, s, w) = (median(first), median(second), median(warm));
    println!("delta(A, B): {extents} extents");
    println!(
        "first delta in a process {} / second {} / warm (third) {}: first = {:.2}x warm",
        ms(f),
        ms(s),
        ms(w),
        f.as_secs_f64() / w.as_secs_f64()
    );

    let bin = snapvol_bin();
    if !bin.exists() {
        println!(
            "{} not built: run cargo build --release first",
            bin.display()
        );
        return;
    }
    let qcow = build_qcow2(dir.path());
    let (mut diff, mut map) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        diff.push(time_process(
            Command::new(&bin)
                .arg("diff")
                .arg(&path)
                .args(["d@A", "d@B"])
                .stdout(std::process::Stdio::null()),
        ));
        if let Some(o) = &qcow {
            let spec = format!(
                "json:{{\"driver\":\"qcow2\",\"backing\":null,\"file\":{{\"driver\":\"file\",\"filename\":\"{}\"}}}}",
                o.display()
            );
            map.push(time_process(
                Command::new("qemu-img")
                    .args(["map", &spec])
                    .stdout(std::process::Stdio::null()),
            ));
        }
    }
    println!("snapvol diff, whole process: {}", ms(median(diff.clone())));
    if !map.is_empty() {
        let (d, m) = (median(diff), median(map));
        println!(
            "qemu-img map of the overlay alone: {} (snapvol diff takes {:.2}x of it)",
            ms(m),
            d.as_secs_f64() / m.as_secs_f64()
        );
    }
}
