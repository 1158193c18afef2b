//! `snapvol serve` against clients nobody here wrote: fio with crc32c verification through
//! its NBD engine (libnbd), ext4 on a served volume through nbdfuse and a loop device, and the
//! NBD project's own conformance client, nbd-tester-client. Each test says SKIPPED, with the
//! reason, when its tool is not installed (scripts/test.sh installs fio, nbdfuse and
//! e2fsprogs; nbd-tester-client is built only from the NBD project's source, which the
//! package registries this project can reach do not carry: point SNAPVOL_NBD_TESTER at a
//! build of it).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[path = "support/served.rs"]
mod served;
use served::{missing, snapvol_cli, Server};

/// A pool file in a fresh directory with one volume of `size`, served on a Unix socket.
fn served_pool(volume: &str, size: &str) -> (tempfile::TempDir, PathBuf, Server) {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("p.img");
    let p = pool.to_str().unwrap();
    assert_eq!(snapvol_cli(&["pool", "create", p, "--size", "512M"]).0, 0);
    let (code, _, err) = snapvol_cli(&["create", p, volume, "--size", size]);
    assert_eq!(code, 0, "{err}");
    let server = Server::start(&pool, &dir.path().join("nbd.sock"));
    let ctl = dir.path().join("p.img.ctl");
    for _ in 0..300 {
        if ctl.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (dir, pool, server)
}

/// The end of a long tool output, for an assertion's message.
fn tail(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    chars[chars.len().saturating_sub(2000)..].iter().collect()
}

fn cli_ok(args: &[&str]) -> String {
    let (code, out, err) = snapvol_cli(args);
    assert_eq!(code, 0, "snapvol {args:?}: {err}");
    out
}

/// fio's verifying write job (4 KiB random writes, each block stamped with a crc32c header
/// and read back and checked at the end) against `uri`; `verify_only` reads and checks what
/// an earlier run of the same job wrote, writing nothing.
fn fio(uri: &str, verify_only: bool) -> std::process::Output {
    let mut c = Command::new("fio");
    c.args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--size=24M",
        "--iodepth=8",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randrepeat=1",
        // fio saves a verify state file in its working directory when a verify fails
        // (which the test provokes once): not in the source tree.
        "--verify_state_save=0",
    ]);
    c.current_dir(std::env::temp_dir());
    if verify_only {
        c.arg("--verify_only=1");
    }
    c.output().unwrap()
}

/// fio writes with crc32c verification through NBD while the CLI snapshots, clones, lists,
/// diffs and sends the volume through the server's control socket; fio finds every block it
/// wrote intact, a snapshot taken after it holds all of it (fio's own verify pass over the
/// read-only export), and a rollback to that snapshot brings it back after other writes.
#[test]
fn fio_verifies_its_writes_while_the_cli_works_on_the_served_volume() {
    if let Some(t) = missing(&["fio"]) {
        eprintln!("SKIPPED fio_verifies_its_writes_while_the_cli_works_on_the_served_volume: {t} is not installed (apt-get install fio)");
        return;
    }
    let engines = Command::new("fio").arg("--enghelp").output().unwrap();
    if !String::from_utf8_lossy(&engines.stdout).contains("nbd") {
        eprintln!("SKIPPED fio_verifies_its_writes_while_the_cli_works_on_the_served_volume: this fio has no nbd engine");
        return;
    }
    let (dir, pool, server) = served_pool("vm", "64M");
    let p = pool.to_str().unwrap();

    let running = Arc::new(AtomicBool::new(true));
    let job = {
        let (uri, running) = (server.uri("vm"), running.clone());
        std::thread::spawn(move || {
            let out = fio(&uri, false);
            running.store(false, Ordering::SeqCst);
            out
        })
    };
    // The catalog commands, forwarded to the server, for as long as fio writes.
    let mut rounds = 0;
    while running.load(Ordering::SeqCst) || rounds < 2 {
        cli_ok(&["snapshot", p, &format!("vm@s{rounds}")]);
        cli_ok(&["list", p, "--json"]);
        if rounds > 0 {
            cli_ok(&[
                "diff",
                p,
                &format!("vm@s{}", rounds - 1),
                &format!("vm@s{rounds}"),
            ]);
        }
        rounds += 1;
    }
    cli_ok(&["clone", p, "vm@s0", "c0"]);
    let stream = dir.path().join("s1.stream");
    cli_ok(&["send", p, "vm@s1", "-o", stream.to_str().unwrap()]);
    assert!(std::fs::metadata(&stream).unwrap().len() > 0);
    let out = job.join().unwrap();
    assert!(
        out.status.success(),
        "fio: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(rounds >= 2, "the CLI ran while fio wrote");

    cli_ok(&["snapshot", p, "vm@done"]);
    let out = fio(&server.uri("vm@done"), true);
    assert!(
        out.status.success(),
        "fio verify of the snapshot: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Other writes over fio's blocks (a second fio job with another seed), then a rollback:
    // fio's verify pass finds its own data again on the live volume.
    let mut other = Command::new("fio");
    other.args([
        "--name=scribble",
        "--ioengine=nbd",
        &format!("--uri={}", server.uri("vm")),
        "--rw=write",
        "--bs=64k",
        "--size=24M",
        "--buffer_pattern=0x5a",
    ]);
    other.current_dir(std::env::temp_dir());
    assert!(other.output().unwrap().status.success());
    let out = fio(&server.uri("vm"), true);
    assert!(
        !out.status.success(),
        "the scribble is seen before the rollback"
    );
    cli_ok(&["rollback", p, "vm@done"]);
    let out = fio(&server.uri("vm"), true);
    assert!(
        out.status.success(),
        "fio verify after the rollback: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, _, err) = snapvol_cli(&["pool", "check", p]);
    assert_eq!(code, 0, "{err}");
    drop(server);
}

/// Unmounts, detaches and stops what the ext4 test set up, also when it fails halfway.
struct Mounted {
    fs: Option<PathBuf>,
    loop_dev: Option<String>,
    fuse: Option<PathBuf>,
    nbdfuse: Option<std::process::Child>,
}

impl Mounted {
    fn teardown(&mut self) {
        let run = |cmd: &str, args: &[&str]| {
            let _ = Command::new("timeout")
                .arg("30")
                .arg(cmd)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        if let Some(m) = self.fs.take() {
            run("umount", &[m.to_str().unwrap()]);
        }
        if let Some(l) = self.loop_dev.take() {
            run("losetup", &["-d", &l]);
        }
        if let Some(f) = self.fuse.take() {
            run("umount", &[f.to_str().unwrap()]);
        }
        if let Some(mut c) = self.nbdfuse.take() {
            for _ in 0..100 {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg("120")
        .arg(cmd)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The bytes of file `i` the test writes: different per file and per position.
fn contents(i: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (j.wrapping_mul(31) ^ i.wrapping_mul(7919)) as u8)
        .collect()
}

/// ext4 on a served volume (nbdfuse makes the export a file, a loop device makes it a disk):
/// while a writer keeps writing files, `sync` and then a snapshot through the control
/// socket; the snapshot, exported to a raw image, checks clean with e2fsck after its journal
/// replays, and every file written and synced before the snapshot reads back whole.
#[test]
fn ext4_checks_clean_in_a_snapshot_taken_while_it_is_written() {
    let name = "ext4_checks_clean_in_a_snapshot_taken_while_it_is_written";
    if let Some(t) = missing(&["nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "debugfs"]) {
        eprintln!(
            "SKIPPED {name}: {t} is not installed (apt-get install nbdfuse e2fsprogs util-linux)"
        );
        return;
    }
    // Loop devices and mounts need root.
    let uid = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" || !Path::new("/dev/fuse").exists() {
        eprintln!("SKIPPED {name}: needs root and /dev/fuse (loop devices and mounts)");
        return;
    }
    let (dir, pool, server) = served_pool("fs", "128M");
    let p = pool.to_str().unwrap();
    let fuse = dir.path().join("fuse");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&fuse).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let pidfile = dir.path().join("nbdfuse.pid");
    let disk = fuse.join("disk");
    let child = Command::new("nbdfuse")
        .args(["-P", pidfile.to_str().unwrap(), disk.to_str().unwrap()])
        .arg(server.uri("fs"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut m = Mounted {
        fs: None,
        loop_dev: None,
        fuse: Some(fuse.clone()),
        nbdfuse: Some(child),
    };
    for _ in 0..200 {
        if std::fs::metadata(&pidfile).is_ok_and(|md| md.len() > 0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let attached = Command::new("losetup")
        .args(["-f", "--show", disk.to_str().unwrap()])
        .output()
        .unwrap();
    if !attached.status.success() {
        eprintln!(
            "SKIPPED {name}: no loop device could be attached here: {}",
            String::from_utf8_lossy(&attached.stderr).trim()
        );
        return;
    }
    let dev = String::from_utf8_lossy(&attached.stdout).trim().to_string();
    m.loop_dev = Some(dev.clone());
    run_ok("mkfs.ext4", &["-q", "-F", &dev]);
    run_ok("mount", &[&dev, mnt.to_str().unwrap()]);
    m.fs = Some(mnt.clone());

    // Files written and fsynced one after another, until told to stop; `done` counts those
    // whose fsync returned.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let (stop, done, mnt) = (stop.clone(), done.clone(), mnt.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) && i < 2000 {
                let mut f = std::fs::File::create(mnt.join(format!("f{i}"))).unwrap();
                f.write_all(&contents(i, 64 << 10)).unwrap();
                f.sync_all().unwrap();
                i += 1;
                done.store(i, Ordering::SeqCst);
            }
        })
    };
    while done.load(Ordering::SeqCst) < 20 {
        std::thread::sleep(Duration::from_millis(5));
    }
    run_ok("sync", &[]);
    let synced = done.load(Ordering::SeqCst);
    cli_ok(&["snapshot", p, "fs@live"]);
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    m.teardown();

    let raw = dir.path().join("live.raw");
    cli_ok(&["export", p, "fs@live", raw.to_str().unwrap()]);
    let r = raw.to_str().unwrap();
    // The first pass replays the journal (a crash-consistent image has one to replay) and
    // may correct the summary counts a mounted ext4 keeps lazily; nothing worse (exit 0 or
    // 1). The second pass must then find nothing at all.
    let first = Command::new("e2fsck").args(["-fy", r]).output().unwrap();
    assert!(
        matches!(first.status.code(), Some(0 | 1)),
        "e2fsck -fy: {:?}\n{}",
        first.status,
        String::from_utf8_lossy(&first.stdout)
    );
    let second = Command::new("e2fsck").args(["-fn", r]).output().unwrap();
    assert_eq!(
        second.status.code(),
        Some(0),
        "the snapshot's ext4 is clean: {}",
        String::from_utf8_lossy(&second.stdout)
    );
    for i in [0, synced / 2, synced - 1] {
        let got = Command::new("debugfs")
            .args(["-R", &format!("cat /f{i}"), r])
            .output()
            .unwrap();
        assert!(
            got.stdout == contents(i, 64 << 10),
            "file f{i}, synced before the snapshot, reads back whole ({} bytes)",
            got.stdout.len()
        );
    }
    let (code, _, err) = snapvol_cli(&["pool", "check", p]);
    assert_eq!(code, 0, "{err}");
    drop(server);
}

/// nbd-tester-client, the NBD reference implementation's test client: its read, write,
/// write-with-flush, handshake and oversized-request tests, a write to a read-only export that
/// must fail, and, when its trace file is beside the binary, its integrity test (a recorded
/// mix of reads, writes and flushes checked block by block).
#[test]
fn nbd_tester_client_passes_against_the_server() {
    let name = "nbd_tester_client_passes_against_the_server";
    let tester = std::env::var_os("SNAPVOL_NBD_TESTER")
        .map(PathBuf::from)
        .or_else(|| {
            missing(&["nbd-tester-client"])
                .is_none()
                .then(|| "nbd-tester-client".into())
        });
    let Some(tester) = tester.filter(|t| Command::new(t).arg("-V").output().is_ok()) else {
        eprintln!("SKIPPED {name}: nbd-tester-client is not installed; it is built only from the NBD project's source (./configure --without-gnutls && make -C tests/run nbd-tester-client) and found through SNAPVOL_NBD_TESTER=PATH");
        return;
    };
    // 50 MiB, the size the integrity trace was recorded for.
    let (_dir, pool, server) = served_pool("export1", "52428800");
    let p = pool.to_str().unwrap();
    cli_ok(&["snapshot", p, "export1@ro"]);
    let sock = server.socket.to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let out = Command::new("timeout")
            .arg("300")
            .arg(&tester)
            .args(args)
            .args(["-u", &sock])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), text)
    };
    if let Some(trace) = tester
        .parent()
        .map(|d| d.join("integrity-test.tr"))
        .filter(|t| t.exists())
    {
        // First, while the export is still all zeros, as the trace expects.
        let (code, err) = run(&["-N", "export1", "-i", "-t", trace.to_str().unwrap()]);
        assert_eq!(code, Some(0), "integrity: {}", tail(&err));
    } else {
        eprintln!(
            "{name}: no integrity-test.tr beside {}: integrity test not run",
            tester.display()
        );
    }
    for (args, what) in [
        (&["-N", "export1"][..], "read throughput"),
        (&["-N", "export1", "-w"][..], "write throughput"),
        (&["-N", "export1", "-w", "-f"][..], "write with flushes"),
        (&["-N", "export1", "-h"][..], "handshake"),
        (&["-N", "export1", "-o"][..], "oversized requests"),
        (
            &["-N", "export1@ro", "-w", "-F"][..],
            "a write to a read-only export fails",
        ),
    ] {
        let (code, err) = run(args);
        assert_eq!(code, Some(0), "{what}: {}", tail(&err));
    }
    let (code, _, err) = snapvol_cli(&["pool", "check", p]);
    assert_eq!(code, 0, "{err}");
    drop(server);
}
