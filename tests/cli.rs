//! The real `snapvol` binary over every command and flag.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn pool(&self) -> String {
        self.path("pool.img").display().to_string()
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_snapvol"))
            .args(args)
            // The tests name their pools; one set in the caller's shell must not move them.
            .env_remove("SNAPVOL_POOL")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        out
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail; returns its one-line message.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(!err.trim().is_empty(), "{args:?} failed silently");
        err
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) | 1)
        .collect()
}

#[test]
fn pool_lifecycle_and_json() {
    let t = Env::new();
    let p = t.pool();
    t.ok(&[
        "pool",
        "create",
        &p,
        "--size",
        "256M",
        "--block-size",
        "16K",
    ]);
    let info = t.json(&["pool", "info", &p, "--json"]);
    assert_eq!(info["size"], 256 << 20);
    assert_eq!(info["block_size"], 16384);
    assert_eq!(info["volumes"], 0);
    assert!(t.ok(&["pool", "info", &p]).contains("256.0 MiB"));
    assert!(t.ok(&["pool", "info", &p, "--bytes"]).contains("268435456"));

    t.ok(&["create", &p, "db", "--size", "64M"]);
    t.ok(&["snapshot", &p, "db@s1"]);
    let ids = &t.json(&["snapshot", &p, "db@s2", "--json"])["snapshots"];
    assert_eq!(ids[0]["name"], "db@s2");
    assert_eq!(ids[0]["id"].as_str().unwrap().len(), 32);
    t.ok(&["create", &p, "logs", "--size", "1G"]);
    // A group snapshot: several arguments, one atomic commit.
    t.ok(&["snapshot", &p, "db@g", "logs@g"]);
    t.ok(&["clone", &p, "db@s1", "db-clone"]);
    t.ok(&["clone", &p, "logs", "logs-clone"]);
    t.ok(&["rename", &p, "logs-clone", "logs2"]);
    t.ok(&["resize", &p, "logs2", "--size", "2G"]);

    let list = t.json(&["list", &p, "--json"]);
    let vols = list["volumes"].as_array().unwrap();
    let names: Vec<&str> = vols.iter().map(|v| v["name"].as_str().unwrap()).collect();
    // Sorted by name (a volume's snapshots follow it, oldest first).
    assert_eq!(names, ["db", "db-clone", "logs", "logs2"]);
    let logs2 = &vols[3];
    assert_eq!(logs2["size"], 2u64 << 30);
    assert_eq!(logs2["origin"], vols[2]["id"], "a clone names its origin");
    let snaps = list["snapshots"].as_array().unwrap();
    let snames: Vec<&str> = snaps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(snames, ["db@s1", "db@s2", "db@g", "logs@g"]);
    for key in [
        "id",
        "size",
        "allocated",
        "exclusive",
        "shared",
        "created",
        "generation",
    ] {
        assert!(!snaps[0][key].is_null(), "snapshot field {key}");
    }
    assert!(t.ok(&["list", &p]).contains("db-clone"));
    // Human sizes by default, bytes with --bytes.
    assert!(t.ok(&["list", &p]).contains("64.0 MiB"));
    assert!(t
        .ok(&["list", &p, "--bytes"])
        .contains(&(64u64 << 20).to_string()));

    t.ok(&["destroy", &p, "db@s2"]);
    // A volume with snapshots goes only with -r, and a dry run changes nothing.
    assert_msg(&t.fails(&["destroy", &p, "db"]), "-r destroys them");
    let dry = t.ok(&["destroy", &p, "db", "-r", "-n"]);
    assert!(
        dry.contains("would destroy db@") && dry.contains("would free"),
        "{dry}"
    );
    assert!(t.ok(&["list", &p]).contains("db@"));
    t.ok(&["destroy", &p, "-r", "db"]);
    let list = t.json(&["list", &p, "--json"]);
    assert_eq!(list["volumes"].as_array().unwrap().len(), 3);
    assert!(list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| !s["name"].as_str().unwrap().starts_with("db@")));
    // Several targets at once; a missing one stops all before anything is destroyed.
    assert_msg(
        &t.fails(&["destroy", &p, "db-clone", "nope"]),
        "no volume named \"nope\"",
    );
    assert_eq!(
        t.json(&["list", &p, "--json"])["volumes"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    // resize refuses to shrink without --shrink.
    assert_msg(
        &t.fails(&["resize", &p, "logs2", "--size", "1M"]),
        "--shrink",
    );
    t.ok(&["resize", &p, "logs2", "--size", "1M", "--shrink"]);
    let check = t.json(&["pool", "check", &p, "--json"]);
    assert_eq!(check["clean"], true);
    assert!(t.ok(&["pool", "check", &p]).contains("0 problems"));
}

#[test]
fn import_export_round_trip_keeps_holes_and_clones_are_independent() {
    let t = Env::new();
    let p = t.pool();
    t.ok(&["pool", "create", &p, "--size", "1G"]);
    // A 40 MiB image with data at both ends and a 30 MiB hole between.
    let img = t.path("in.raw");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(40 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&pattern(5 << 20, 1), 0).unwrap();
    f.write_all_at(&pattern(3 << 20, 2), 37 << 20).unwrap();
    drop(f);
    t.ok(&["import", &p, "disk", img.to_str().unwrap()]);
    let list = t.json(&["list", &p, "--json"]);
    let alloc = list["volumes"][0]["allocated"].as_u64().unwrap();
    assert_eq!(alloc, 8 << 20, "zeros stay unallocated");

    t.ok(&["snapshot", &p, "disk@golden"]);
    let out = t.path("out.raw");
    t.ok(&["export", &p, "disk@golden", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
    let meta = std::fs::metadata(&out).unwrap();
    assert!(meta.blocks() * 512 < 12 << 20, "exported image is sparse");

    // Writing into a clone leaves the origin snapshot unchanged.
    t.ok(&["clone", &p, "disk@golden", "work"]);
    let patch = t.path("patch");
    std::fs::write(&patch, pattern(100_000, 9)).unwrap();
    t.ok(&[
        "write",
        &p,
        "work",
        patch.to_str().unwrap(),
        "--offset",
        "4K",
    ]);
    let back = t.path("back");
    t.ok(&[
        "read",
        &p,
        "work",
        "--offset",
        "4096",
        "--length",
        "100000",
        "-o",
        back.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&back).unwrap(), pattern(100_000, 9));
    let golden = t.run(&[
        "read",
        &p,
        "disk@golden",
        "--offset",
        "4096",
        "--length",
        "100000",
    ]);
    assert_eq!(golden.stdout, pattern(5 << 20, 1)[4096..104_096].to_vec());
    t.ok(&["export", &p, "disk@golden", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());

    // Rollback undoes the write.
    t.ok(&["snapshot", &p, "work@base"]);
    t.ok(&[
        "write",
        &p,
        "work",
        patch.to_str().unwrap(),
        "--offset",
        "0",
    ]);
    t.ok(&["rollback", &p, "work@base"]);
    let head = t.run(&["read", &p, "work", "--length", "4096"]);
    assert_eq!(head.stdout, pattern(5 << 20, 1)[..4096].to_vec());
}

#[test]
fn pool_grow_extends_the_file_and_refuses_to_shrink() {
    let t = Env::new();
    let p = t.pool();
    t.ok(&["pool", "create", &p, "--size", "64M"]);
    let out = t.ok(&["pool", "grow", &p, "--size", "1G"]);
    assert!(out.contains("is now 1.0 GiB"), "{out}");
    let info = t.json(&["pool", "info", &p, "--json"]);
    assert_eq!(info["size"], 1u64 << 30);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 30);
    assert_msg(
        &t.fails(&["pool", "grow", &p, "--size", "512M"]),
        "can only grow",
    );
    t.ok(&["pool", "check", &p]);
}

#[test]
fn direct_flag_bypasses_the_page_cache_with_the_same_results() {
    let t = Env::new();
    let p = t.pool();
    let created = t.run(&["--direct", "pool", "create", &p, "--size", "256M"]);
    if !created.status.success() {
        let err = String::from_utf8_lossy(&created.stderr);
        assert!(err.contains("direct I/O"), "unexpected failure: {err}");
        eprintln!("SKIPPED direct_flag...: {err}");
        return;
    }
    t.ok(&["create", &p, "disk", "--size", "8M", "--direct"]);
    let data = t.path("data");
    std::fs::write(&data, pattern(70_001, 3)).unwrap();
    t.ok(&[
        "--direct",
        "write",
        &p,
        "disk",
        data.to_str().unwrap(),
        "--offset",
        "777",
    ]);
    // Read back with and without O_DIRECT.
    for direct in [true, false] {
        let mut args = vec!["read", &p, "disk", "--offset", "777", "--length", "70001"];
        if direct {
            args.insert(0, "--direct");
        }
        assert_eq!(t.run(&args).stdout, pattern(70_001, 3));
    }
    t.ok(&["--direct", "pool", "check", &p]);
}

fn assert_msg(err: &str, needle: &str) {
    assert!(err.contains(needle), "expected {needle:?} in {err:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
}

#[test]
fn bad_input_gets_one_line_and_a_failure_status() {
    let t = Env::new();
    let p = t.pool();
    t.ok(&["pool", "create", &p, "--size", "64M"]);
    t.ok(&["create", &p, "vol", "--size", "1M"]);
    assert_msg(
        &t.fails(&["create", &p, "vol", "--size", "1M"]),
        "already exists",
    );
    assert_msg(
        &t.fails(&["resize", &p, "nope", "--size", "1M"]),
        "no volume named \"nope\"",
    );
    assert_msg(
        &t.fails(&["destroy", &p, "vol@nope"]),
        "no snapshot named \"vol@nope\"",
    );
    assert_msg(&t.fails(&["rollback", &p, "vol"]), "expected VOL@SNAP");
    assert_msg(
        &t.fails(&["create", &p, "a@b", "--size", "1M"]),
        "invalid name",
    );
    // One name rule for volumes, snapshots and bookmarks, as zfs has.
    for bad in ["a b", "a/b", "ü", "..", "-x"] {
        assert_msg(
            &t.fails(&["create", &p, "--size", "1M", "--", bad]),
            "invalid name",
        );
    }
    assert_msg(&t.fails(&["snapshot", &p, "vol@x y"]), "invalid name");
    t.ok(&["create", &p, "ok_name-1.2:3", "--size", "1M"]);
    assert!(t
        .fails(&["create", &p, "x", "--size", "12Q"])
        .contains("unknown unit"));
    assert!(t
        .fails(&["create", &p, "x", "--size=-5"])
        .contains("bad size"));
    assert_msg(
        &t.fails(&["read", &p, "vol", "--offset", "1M", "--length", "1"]),
        "beyond the end",
    );
    // Not a pool, missing file, too small, bad block size, existing file.
    let junk = t.path("junk");
    std::fs::write(&junk, vec![7u8; 2 << 20]).unwrap();
    assert_msg(
        &t.fails(&["pool", "info", junk.to_str().unwrap()]),
        "not a snapvol pool",
    );
    assert_msg(
        &t.fails(&["list", t.path("missing").to_str().unwrap()]),
        "No such file",
    );
    let small = t.path("small");
    assert_msg(
        &t.fails(&["pool", "create", small.to_str().unwrap(), "--size", "64K"]),
        "too small",
    );
    assert_msg(
        &t.fails(&[
            "pool",
            "create",
            t.path("bs").to_str().unwrap(),
            "--size",
            "64M",
            "--block-size",
            "3000",
        ]),
        "block size",
    );
    assert_msg(
        &t.fails(&["pool", "create", &p, "--size", "64M"]),
        "already exists",
    );
    // A full pool is a clean error.
    t.ok(&["create", &p, "big", "--size", "1G"]);
    let big = t.path("big.raw");
    std::fs::write(&big, pattern(80 << 20, 3)).unwrap();
    assert_msg(
        &t.fails(&["write", &p, "big", big.to_str().unwrap()]),
        "pool is full",
    );
    assert!(t.json(&["pool", "check", &p, "--json"])["clean"] == true);
}

#[test]
fn check_exits_1_on_a_damaged_pool() {
    let t = Env::new();
    let p = t.pool();
    t.ok(&["pool", "create", &p, "--size", "64M"]);
    t.ok(&["create", &p, "vol", "--size", "8M"]);
    let data = t.path("d");
    std::fs::write(&data, pattern(4 << 20, 5)).unwrap();
    t.ok(&["write", &p, "vol", data.to_str().unwrap()]);
    // Corrupt every block map leaf in the image.
    damage(Path::new(&p), b"SVML");
    let out = t.run(&["pool", "check", &p]);
    assert_eq!(out.status.code(), Some(3), "problems found: exit status 3");
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        report.contains("is damaged"),
        "problems as sentences: {report}"
    );
}

/// With data checksums: `read` and `export` of a flipped data byte fail naming the block,
/// `pool scrub` reports it with its references and exits 1, a clean pool scrubs to 0, and
/// `pool info` says checksums are on.
#[test]
fn data_checksums_from_the_command_line() {
    let t = Env::new();
    let p = t.pool();
    let created = t.json(&[
        "pool",
        "create",
        &p,
        "--size",
        "64M",
        "--data-checksums",
        "on",
        "--json",
    ]);
    assert_eq!(created["data_checksums"], true);
    let plain = t.path("plain.img").display().to_string();
    let off = t.json(&["pool", "create", &plain, "--size", "64M", "--json"]);
    assert_eq!(off["data_checksums"], false, "off by default");
    let bad = t.fails(&[
        "pool",
        "create",
        &plain,
        "--size",
        "64M",
        "--data-checksums",
        "maybe",
    ]);
    assert!(bad.contains("say on or off"), "{bad}");
    assert_eq!(
        t.json(&["pool", "info", &p, "--json"])["data_checksums"],
        true
    );
    t.ok(&["create", &p, "vol", "--size", "1M"]);
    let data = t.path("d");
    std::fs::write(&data, pattern(64 << 10, 9)).unwrap();
    t.ok(&["write", &p, "vol", data.to_str().unwrap()]);
    t.ok(&["snapshot", &p, "vol@s"]);
    let clean = t.json(&["pool", "scrub", &p, "--json"]);
    assert_eq!(clean["clean"], true);
    assert_eq!(clean["blocks"], 16);
    assert_eq!(
        clean["shared_skipped"], 16,
        "the snapshot's blocks are the volume's"
    );
    let at = {
        let pool = snapvol::Pool::open_path(&p, snapvol::PoolOptions::default()).unwrap();
        let at = pool
            .volume("vol")
            .unwrap()
            .physical_block(5 * 4096)
            .unwrap();
        pool.close().unwrap();
        at.unwrap()
    };
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .open(&p)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at + 7).unwrap();
        f.write_all_at(&[b[0] ^ 1], at + 7).unwrap();
    }
    let err = t.fails(&["read", &p, "vol", "--offset", "20480", "--length", "4096"]);
    assert_msg(&err, "data checksum mismatch");
    assert_msg(&err, &format!("device byte {at}"));
    let out = t.path("out.img");
    assert_msg(
        &t.fails(&["export", &p, "vol@s", out.to_str().unwrap()]),
        "vol@s at byte 20480",
    );
    let run = t.run(&["pool", "scrub", &p, "--json"]);
    assert_eq!(run.status.code(), Some(1), "damage: exit status 1");
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(report["bad_count"], 1);
    assert_eq!(report["bad"][0]["physical"], at);
    let mut refs: Vec<String> = report["bad"][0]["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{}@{}", r["name"].as_str().unwrap(), r["offset"]))
        .collect();
    refs.sort();
    assert_eq!(refs, ["vol@20480", "vol@s@20480"]);
    let text = t.run(&["pool", "scrub", &p]);
    assert_eq!(text.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&text.stdout).contains("vol@s at byte 20480"));
    assert_msg(
        &t.fails(&["pool", "scrub", &p, "--resume", "nonsense"]),
        "not a scrub position",
    );
}

fn damage(path: &Path, magic: &[u8; 4]) {
    let mut img = std::fs::read(path).unwrap();
    for u in 0..img.len() / 4096 {
        if &img[u * 4096..u * 4096 + 4] == magic {
            img[u * 4096 + 200] ^= 0xFF;
        }
    }
    std::fs::write(path, img).unwrap();
}

#[test]
fn demo_runs_the_three_workflows() {
    let t = Env::new();
    let out = t.ok(&["demo", t.path("demo").to_str().unwrap()]);
    for needle in [
        "1. Template",
        "2. Snapshot",
        "3. Consistent",
        "byte for byte",
        "0 problems",
    ] {
        assert!(out.contains(needle), "demo output lacks {needle:?}:\n{out}");
    }
}

#[test]
fn diff_send_receive_between_pools() {
    let t = Env::new();
    let a = t.pool();
    let b = t.path("b.img").display().to_string();
    t.ok(&["pool", "create", &a, "--size", "256M"]);
    t.ok(&["pool", "create", &b, "--size", "256M"]);
    t.ok(&["create", &a, "vol", "--size", "16M"]);
    let d1 = t.path("d1");
    std::fs::write(&d1, pattern(3 << 20, 1)).unwrap();
    t.ok(&["write", &a, "vol", d1.to_str().unwrap(), "--offset", "1M"]);
    t.ok(&["snapshot", &a, "vol@s1"]);
    let d2 = t.path("d2");
    std::fs::write(&d2, pattern(8192, 2)).unwrap();
    t.ok(&["write", &a, "vol", d2.to_str().unwrap(), "--offset", "8M"]);
    t.ok(&["snapshot", &a, "vol@s2"]);

    let diff = t.json(&["diff", &a, "vol@s1", "vol@s2", "--json"]);
    let ext = diff["extents"].as_array().unwrap();
    assert_eq!(ext.len(), 1);
    assert_eq!(ext[0]["offset"], 8 << 20);
    assert_eq!(ext[0]["length"], 8192);
    assert_eq!(ext[0]["kind"], "data");
    assert!(t.ok(&["diff", &a, "vol@s1", "vol"]).contains("1 extents"));

    // Full stream through a file, incremental through a pipe.
    let full = t.path("full.stream");
    t.ok(&["send", &a, "vol@s1", "-o", full.to_str().unwrap()]);
    let got = t.json(&["receive", &b, "-i", full.to_str().unwrap(), "--json"]);
    assert_eq!(got["snapshot"], "vol@s1");
    let sent = t.run(&["send", &a, "vol@s2", "--from", "vol@s1"]);
    assert!(sent.status.success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_snapvol"))
        .args(["receive", &b])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&sent.stdout).unwrap();
    assert!(child.wait_with_output().unwrap().status.success());

    let ids = |p: &str| -> Vec<String> {
        t.json(&["list", p, "--json"])["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&a), ids(&b), "received snapshots keep their ids");
    let ea = t.path("ea");
    let eb = t.path("eb");
    t.ok(&["export", &a, "vol@s2", ea.to_str().unwrap()]);
    t.ok(&["export", &b, "vol@s2", eb.to_str().unwrap()]);
    assert_eq!(std::fs::read(&ea).unwrap(), std::fs::read(&eb).unwrap());
    // A damaged stream is refused and leaves the pool as it was.
    let mut bad = std::fs::read(&full).unwrap();
    let n = bad.len();
    bad[n / 2] ^= 1;
    let badf = t.path("bad.stream");
    std::fs::write(&badf, &bad).unwrap();
    let c = t.path("c.img").display().to_string();
    t.ok(&["pool", "create", &c, "--size", "64M"]);
    assert_msg(
        &t.fails(&["receive", &c, "-i", badf.to_str().unwrap()]),
        "invalid stream",
    );
    assert!(ids(&c).is_empty());
    assert_eq!(t.json(&["pool", "check", &c, "--json"])["clean"], true);
    // The same snapshot id twice is refused.
    assert_msg(
        &t.fails(&["receive", &b, "other", "-i", full.to_str().unwrap()]),
        "already exists",
    );
}

#[test]
fn bookmark_then_incremental_after_deleting_the_base() {
    let t = Env::new();
    let a = t.pool();
    let b = t.path("b.img").display().to_string();
    t.ok(&["pool", "create", &a, "--size", "64M"]);
    t.ok(&["pool", "create", &b, "--size", "64M"]);
    t.ok(&["create", &a, "v", "--size", "4M"]);
    let d = t.path("d");
    std::fs::write(&d, pattern(1 << 20, 4)).unwrap();
    t.ok(&["write", &a, "v", d.to_str().unwrap()]);
    t.ok(&["snapshot", &a, "v@base"]);
    let full = t.path("full");
    t.ok(&["send", &a, "v@base", "-o", full.to_str().unwrap()]);
    t.ok(&["receive", &b, "-i", full.to_str().unwrap()]);
    t.ok(&["bookmark", &a, "v@base"]);
    t.ok(&["destroy", &a, "v@base"]);
    let list = t.json(&["list", &a, "--json"]);
    assert_eq!(list["bookmarks"][0]["name"], "v#base");
    t.ok(&["write", &a, "v", d.to_str().unwrap(), "--offset", "2M"]);
    t.ok(&["snapshot", &a, "v@next"]);
    let inc = t.path("inc");
    t.ok(&[
        "send",
        &a,
        "v@next",
        "--from",
        "v#base",
        "-o",
        inc.to_str().unwrap(),
    ]);
    t.ok(&["receive", &b, "-i", inc.to_str().unwrap()]);
    let (ea, eb) = (t.path("ea"), t.path("eb"));
    t.ok(&["export", &a, "v@next", ea.to_str().unwrap()]);
    t.ok(&["export", &b, "v@next", eb.to_str().unwrap()]);
    assert_eq!(std::fs::read(&ea).unwrap(), std::fs::read(&eb).unwrap());
    t.ok(&["destroy", &a, "v#base"]);
    assert!(t.json(&["list", &a, "--json"])["bookmarks"]
        .as_array()
        .unwrap()
        .is_empty());
}

/// A send on one core (no helper threads: the caller reads every piece) writes the same
/// stream, byte for byte, as a send spread over all cores.
#[test]
fn send_on_one_core_writes_the_same_stream() {
    let t = Env::new();
    let a = t.pool();
    t.ok(&["pool", "create", &a, "--size", "256M"]);
    t.ok(&["create", &a, "vol", "--size", "64M"]);
    let d = t.path("d");
    for (i, off) in ["0", "5M", "17M", "40M"].iter().enumerate() {
        std::fs::write(&d, pattern((3 << 20) + 4096 * i, i as u8)).unwrap();
        t.ok(&["write", &a, "vol", d.to_str().unwrap(), "--offset", off]);
    }
    t.ok(&["snapshot", &a, "vol@s"]);
    let everywhere = t.run(&["send", &a, "vol@s"]);
    assert!(everywhere.status.success());
    let one_core = Command::new("taskset")
        .args([
            "-c",
            "0",
            env!("CARGO_BIN_EXE_snapvol"),
            "send",
            &a,
            "vol@s",
        ])
        .output()
        .unwrap();
    assert!(one_core.status.success(), "{one_core:?}");
    assert!(everywhere.stdout.len() > 12 << 20);
    assert!(everywhere.stdout == one_core.stdout);
}

/// Runs a command with `input` on its stdin; returns its output.
fn run_with_stdin(args: &[&str], input: &[u8]) -> Output {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_snapvol"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    out
}

#[test]
fn volume_sizes_beyond_the_engine_are_refused_and_the_largest_works_to_its_last_byte() {
    let t = Env::new();
    let p = t.pool();
    t.ok(&["pool", "create", &p, "--size", "64M"]);
    for size in ["18446744073709551615", "1025P"] {
        assert_msg(
            &t.fails(&["create", &p, "huge", "--size", size]),
            "larger than the largest volume",
        );
    }
    // The largest volume takes a write at its very end, and nothing leaks.
    t.ok(&["create", &p, "max", "--size", "1E"]);
    let block = t.path("block");
    std::fs::write(&block, pattern(4096, 9)).unwrap();
    let last = ((1u64 << 60) - 4096).to_string();
    t.ok(&[
        "write",
        &p,
        "max",
        block.to_str().unwrap(),
        "--offset",
        &last,
    ]);
    let back = t.path("back");
    t.ok(&[
        "read",
        &p,
        "max",
        "--offset",
        &last,
        "-o",
        back.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&back).unwrap(), pattern(4096, 9));
    assert_msg(
        &t.fails(&["resize", &p, "max", "--size", "2E"]),
        "larger than the largest volume",
    );
    assert!(t.json(&["pool", "check", &p, "--json"])["clean"] == true);
}

#[test]
fn import_reads_pipes_and_stdin_and_export_writes_stdout() {
    let t = Env::new();
    let p = t.pool();
    t.ok(&["pool", "create", &p, "--size", "64M"]);
    // An odd length round-trips exactly: sizes are byte-granular.
    let mut img = pattern(3 << 20, 4);
    img.extend_from_slice(&[0u8; 1 << 20]);
    img.extend_from_slice(&pattern(12345, 5));
    let out = run_with_stdin(&["import", &p, "piped", "-"], &img);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = t.json(&["list", &p, "--json"]);
    let vol = &list["volumes"][0];
    assert_eq!(vol["name"], "piped");
    assert_eq!(vol["size"], img.len() as u64);
    // The zero MiB stays unallocated.
    assert_eq!(vol["allocated"], ((3 << 20) + 16384) as u64);
    // --size takes exactly that many bytes and refuses an input that is longer or shorter.
    let out = run_with_stdin(
        &["import", &p, "sized", "-", "--size", "1M"],
        &img[..1 << 20],
    );
    assert!(out.status.success());
    let out = run_with_stdin(&["import", &p, "long", "-", "--size", "1M"], &img);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("longer than"));
    let out = run_with_stdin(&["import", &p, "short", "-", "--size", "8M"], &img);
    assert!(String::from_utf8_lossy(&out.stderr).contains("ended after"));
    // Neither refused import left a volume behind.
    let names: Vec<String> = t.json(&["list", &p, "--json"])["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["piped", "sized"]);
    // Export to stdout gives every byte, and read without --length reads to the end.
    assert_eq!(t.run(&["export", &p, "piped", "-"]).stdout, img);
    assert_eq!(t.run(&["read", &p, "piped"]).stdout, img);
    assert_eq!(
        t.run(&["read", &p, "piped", "--offset", "3M"]).stdout,
        &img[3 << 20..]
    );
    // write takes stdin, too.
    let out = run_with_stdin(&["write", &p, "sized", "-", "--offset", "4096"], b"hello");
    assert!(out.status.success());
    assert_eq!(
        t.run(&["read", &p, "sized", "--offset", "4096", "--length", "5"])
            .stdout,
        b"hello"
    );
    assert_msg(
        &t.fails(&["write", &p, "sized@x", "-"]),
        "snapshots are read-only",
    );
    assert!(t.json(&["pool", "check", &p, "--json"])["clean"] == true);
}

#[test]
fn read_streams_in_bounded_memory() {
    let t = Env::new();
    let p = t.pool();
    t.ok(&["pool", "create", &p, "--size", "64M"]);
    t.ok(&["create", &p, "thin", "--size", "8G"]);
    // With 512 MiB of address space a read that held its range in memory could not run.
    let cmd = format!(
        "ulimit -v 524288; exec {} read {p} thin --length 4G -o /dev/null",
        env!("CARGO_BIN_EXE_snapvol")
    );
    let out = Command::new("bash").args(["-c", &cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_killed_import_leaves_no_volume() {
    use std::io::Write as _;
    let t = Env::new();
    let p = t.pool();
    t.ok(&["pool", "create", &p, "--size", "256M"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_snapvol"))
        .args(["import", &p, "partial", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // Enough data that a background commit has made some of it durable.
    let chunk = pattern(1 << 20, 7);
    for _ in 0..64 {
        stdin.write_all(&chunk).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    for _ in 0..16 {
        stdin.write_all(&chunk).unwrap();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let list = t.json(&["list", &p, "--json"]);
    assert_eq!(list["volumes"].as_array().unwrap().len(), 0, "{list}");
    let check = t.json(&["pool", "check", &p, "--json"]);
    assert!(check["clean"] == true, "{check}");
    // The space the hidden volume held is back.
    assert!(
        t.json(&["pool", "info", &p, "--json"])["used"]
            .as_u64()
            .unwrap()
            < 4 << 20
    );
}

#[test]
fn failed_commands_leave_nothing_behind() {
    let t = Env::new();
    // A refused pool create creates no file; a retry with good arguments works.
    let p = t.pool();
    assert_msg(
        &t.fails(&[
            "pool",
            "create",
            &p,
            "--size",
            "64M",
            "--block-size",
            "3000",
        ]),
        "block size",
    );
    assert!(!Path::new(&p).exists());
    assert_msg(
        &t.fails(&["pool", "create", &p, "--size", "64K"]),
        "too small",
    );
    assert!(!Path::new(&p).exists());
    t.ok(&["pool", "create", &p, "--size", "64M"]);
    // A send that fails midway removes the partial stream it created.
    t.ok(&["create", &p, "v", "--size", "8M"]);
    let data = t.path("data");
    std::fs::write(&data, pattern(8 << 20, 1)).unwrap();
    t.ok(&["write", &p, "v", data.to_str().unwrap()]);
    t.ok(&["snapshot", &p, "v@s"]);
    damage(Path::new(&p), b"SVML");
    let stream = t.path("s.stream");
    t.fails(&["send", &p, "v@s", "-o", stream.to_str().unwrap()]);
    assert!(!stream.exists(), "a partial stream was left behind");
    // A failed export leaves no partial image either.
    let image = t.path("v.raw");
    t.fails(&["export", &p, "v@s", image.to_str().unwrap()]);
    assert!(!image.exists());
}

#[test]
fn demo_refuses_a_directory_holding_its_files() {
    let t = Env::new();
    let existing = t.path("pool.img");
    std::fs::write(&existing, b"someone's data").unwrap();
    let err = t.fails(&["demo", t.dir.path().to_str().unwrap()]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&existing).unwrap(), b"someone's data");
}

struct Loop(String);
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A loop device over a new sparse file of `len` bytes, or why there is none.
fn loop_device(t: &Env, name: &str, len: u64) -> Result<Loop, String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        });
    if uid.as_deref() != Some("0") {
        return Err("needs root".into());
    }
    let backing = t.path(name);
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(len)
        .unwrap();
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&backing)
        .output()
        .map_err(|e| format!("losetup: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(Loop(
        String::from_utf8(out.stdout).unwrap().trim().to_string(),
    ))
}

#[test]
fn block_devices_pool_create_refuses_to_destroy_and_import_export_work() {
    let t = Env::new();
    let (dev, img) = match (
        loop_device(&t, "pooldev", 128 << 20),
        loop_device(&t, "imgdev", 8 << 20),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(why), _) | (_, Err(why)) => {
            eprintln!("SKIPPED block_devices_pool_create_refuses_to_destroy_and_import_export_work: {why}");
            return;
        }
    };
    let d = dev.0.as_str();
    assert_msg(
        &t.fails(&["pool", "create", d, "--size", "64M"]),
        "--size is for a pool file",
    );
    t.ok(&["pool", "create", d]);
    t.ok(&["create", d, "keep", "--size", "1M"]);
    // A device holding a pool, or a filesystem, is not reformatted without --force.
    assert_msg(&t.fails(&["pool", "create", d]), "holds a snapvol pool");
    assert_eq!(t.json(&["list", d, "--json"])["volumes"][0]["name"], "keep");
    let i = img.0.as_str();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(i).unwrap();
        f.write_all_at(&[0x53, 0xef], 1080).unwrap();
        f.sync_all().unwrap();
    }
    assert_msg(&t.fails(&["pool", "create", i]), "ext2/3/4 filesystem");
    // Import from a block device takes its whole size; export to one overwrites every byte.
    let data = pattern(8 << 20, 2);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(i).unwrap();
        f.write_all_at(&data, 0).unwrap();
        f.sync_all().unwrap();
    }
    t.ok(&["import", d, "fromdev", i]);
    assert_eq!(
        t.json(&["list", d, "--json"])["volumes"][0]["size"],
        8u64 << 20
    );
    t.ok(&["create", d, "blank", "--size", "8M"]);
    t.ok(&["export", d, "blank", i]);
    assert_eq!(std::fs::read(i).unwrap(), vec![0u8; 8 << 20]);
    t.ok(&["export", d, "fromdev", i]);
    assert_eq!(std::fs::read(i).unwrap(), data);
    t.ok(&["create", d, "toobig", "--size", "9M"]);
    assert_msg(&t.fails(&["export", d, "toobig", i]), "too small");
    t.ok(&["pool", "create", d, "--force"]);
    assert_eq!(
        t.json(&["list", d, "--json"])["volumes"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

#[test]
fn json_on_creating_commands_bookmark_diffs_typos_and_messages() {
    let t = Env::new();
    let p = t.pool();
    t.ok(&["pool", "create", &p, "--size", "64M"]);
    let info = t.json(&["pool", "info", &p, "--json"]);
    assert!(info["available"].as_u64().unwrap() < info["free"].as_u64().unwrap());
    let v = t.json(&["create", &p, "db", "--size", "4M", "--json"]);
    assert_eq!(
        (v["name"].as_str(), v["size"].as_u64()),
        (Some("db"), Some(4 << 20))
    );
    let data = t.path("d");
    std::fs::write(&data, pattern(1 << 20, 2)).unwrap();
    t.ok(&["write", &p, "db", data.to_str().unwrap()]);
    let s = &t.json(&["snapshot", &p, "db@a", "--json"])["snapshots"][0];
    let b = t.json(&["bookmark", &p, "db@a", "--json"]);
    assert_eq!((b["name"].as_str(), &b["id"]), (Some("db#a"), &s["id"]));
    let c = t.json(&["clone", &p, "db@a", "copy", "--json"]);
    assert_eq!(c["origin"], s["id"]);
    assert_eq!(c["name"], "copy");
    t.ok(&["write", &p, "db", data.to_str().unwrap(), "--offset", "2M"]);
    t.ok(&["destroy", &p, "db@a"]);
    // diff from the bookmark: the second MiB written since.
    let d = t.json(&["diff", &p, "db#a", "db", "--json"]);
    let data_bytes: u64 = d["extents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["kind"] == "data")
        .map(|x| x["length"].as_u64().unwrap())
        .sum();
    assert_eq!(data_bytes, 1 << 20, "{d}");
    t.ok(&["snapshot", &p, "db@b"]);
    let r = t.json(&["rollback", &p, "db@b", "--json"]);
    assert_eq!(r["snapshot"], "db@b");
    // A destroyed base snapshot with a bookmark: the error says which bookmark to use.
    let err = t.fails(&["diff", &p, "db@a", "db"]);
    assert_msg(&err, "its bookmark db#a can be the base");
    // JSON from the commands that create or remove something.
    let pc = t.json(&[
        "pool",
        "create",
        t.path("q.img").to_str().unwrap(),
        "--size",
        "64M",
        "--json",
    ]);
    assert_eq!(pc["size"], 64u64 << 20);
    let im = t.json(&["import", &p, "img", data.to_str().unwrap(), "--json"]);
    assert_eq!(
        (im["size"].as_u64(), im["data_bytes"].as_u64()),
        (Some(1 << 20), Some(1 << 20))
    );
    let stream = t.path("s.stream");
    let se = t.json(&["send", &p, "db@b", "-o", stream.to_str().unwrap(), "--json"]);
    assert_eq!(se["name"], "db@b");
    assert!(se["stream_bytes"].as_u64().unwrap() > 2 << 20);
    let de = t.json(&["destroy", &p, "-r", "img", "copy", "--json"]);
    assert_eq!(de["destroyed"], serde_json::json!(["img", "copy"]));
    // A typo gets a suggestion; an open failure names the file without "at byte" noise.
    let err = t.fails(&["snapshto", &p, "db@c"]);
    assert!(err.contains("snapshot"), "{err}");
    let err = t.fails(&["list", t.path("missing").to_str().unwrap()]);
    assert!(!err.contains("at byte"), "{err}");
    // A full pool speaks in bytes.
    t.ok(&["create", &p, "big", "--size", "1G"]);
    let big = t.path("big.raw");
    std::fs::write(&big, pattern(80 << 20, 3)).unwrap();
    let err = t.fails(&["write", &p, "big", big.to_str().unwrap()]);
    assert!(err.contains("bytes are usable"), "{err}");
}

#[test]
fn send_refuses_to_write_a_stream_to_a_terminal() {
    let t = Env::new();
    let p = t.pool();
    t.ok(&["pool", "create", &p, "--size", "64M"]);
    t.ok(&["create", &p, "db", "--size", "1M"]);
    t.ok(&["snapshot", &p, "db@a"]);
    // `script` runs the command with a pseudo-terminal as its stdout.
    let cmd = format!("{} send {p} db@a", env!("CARGO_BIN_EXE_snapvol"));
    let out = match Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIPPED send_refuses_to_write_a_stream_to_a_terminal: script: {e}");
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("refusing to write a binary stream to a terminal"),
        "{text}"
    );
}

/// A pool file that lost its unused tail: commands that change nothing open it read-only
/// and work; a change is refused with what is missing and how to restore it; extending the
/// file restores everything. Cut into what the pool uses, even a read-only open refuses,
/// naming the unit past the end.
#[test]
fn a_pool_file_cut_short_reads_read_only_and_extending_it_restores_it() {
    let t = Env::new();
    let p = t.pool();
    t.ok(&["pool", "create", &p, "--size", "64M"]);
    t.ok(&["create", &p, "db", "--size", "1M"]);
    let data = t.path("d");
    std::fs::write(&data, pattern(1 << 20, 8)).unwrap();
    t.ok(&["write", &p, "db", data.to_str().unwrap()]);
    t.ok(&["snapshot", &p, "db@s"]);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(63 << 20).unwrap();
    // Read-only commands: the data lies far below the cut.
    assert!(t.ok(&["list", &p]).contains("db@s"));
    assert_eq!(t.run(&["read", &p, "db@s"]).stdout, pattern(1 << 20, 8));
    assert!(t.json(&["pool", "check", &p, "--json"])["clean"] == true);
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        63 << 20,
        "a read-only command does not extend or write the file"
    );
    // A change needs the whole pool.
    let err = t.fails(&["snapshot", &p, "db@t"]);
    assert!(err.contains("1048576 bytes are missing"), "{err}");
    assert!(err.contains("truncate -s 67108864"), "{err}");
    f.set_len(64 << 20).unwrap();
    t.ok(&["snapshot", &p, "db@t"]);
    assert_eq!(t.run(&["read", &p, "db"]).stdout, pattern(1 << 20, 8));
    assert!(t.json(&["pool", "check", &p, "--json"])["clean"] == true);
    // Cut below the data: nothing opens, and the message says why.
    f.set_len(4 << 20).unwrap();
    let err = t.fails(&["list", &p]);
    assert!(err.contains("past its end is in use"), "{err}");
    assert!(err.contains("truncate -s 67108864"), "{err}");
}

#[test]
fn shell_completions_cover_the_commands() {
    let t = Env::new();
    for shell in ["bash", "zsh", "fish"] {
        let script = t.ok(&["completions", shell]);
        for cmd in ["snapshot", "rollback", "backup", "destroy"] {
            assert!(script.contains(cmd), "{shell} completions lack {cmd}");
        }
    }
}

#[test]
fn list_filters_sorts_marks_and_speaks_to_scripts() {
    let t = Env::new();
    let p = t.pool();
    t.ok(&["pool", "create", &p, "--size", "64M"]);
    t.ok(&["create", &p, "web", "--size", "2M"]);
    t.ok(&["create", &p, "db", "--size", "1M"]);
    t.ok(&["snapshot", &p, "db@a", "web@a"]);
    t.ok(&["bookmark", &p, "db@a"]);
    t.ok(&["snapshot", &p, "db@b"]);
    // web goes; its snapshot stays, marked.
    t.ok(&["create", &p, "gone", "--size", "1M"]);
    t.ok(&["snapshot", &p, "gone@last"]);
    t.ok(&["rename", &p, "gone", "gone2"]);
    let rows = t.ok(&["list", &p, "-H"]);
    let names: Vec<&str> = rows
        .lines()
        .map(|l| l.split('\t').nth(2).unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "db",
            "db#a",
            "db@a",
            "db@b",
            "gone2",
            "gone2@last",
            "web",
            "web@a"
        ]
    );
    assert!(rows.lines().all(|l| l.split('\t').count() == 9), "{rows}");
    // -H gives bytes and Unix seconds.
    let db: Vec<&str> = rows.lines().next().unwrap().split('\t').collect();
    assert_eq!(db[3], "1048576");
    assert!(db[7].parse::<u64>().unwrap() > 1_700_000_000);
    let only = t.ok(&["list", &p, "db", "-t", "snapshot", "-H"]);
    assert_eq!(only.lines().count(), 2, "{only}");
    assert_msg(&t.fails(&["list", &p, "nope"]), "no volume named");
    assert_msg(&t.fails(&["list", &p, "-t", "disk"]), "expected volume");
    // A snapshot whose volume is gone is marked in the table and the JSON.
    t.ok(&[
        "pool",
        "create",
        t.path("q.img").to_str().unwrap(),
        "--size",
        "64M",
    ]);
    let q = t.path("q.img").display().to_string();
    t.ok(&["create", &q, "v", "--size", "1M"]);
    t.ok(&["snapshot", &q, "v@s"]);
    t.ok(&["bookmark", &q, "v@s"]);
    t.ok(&["destroy", &q, "-r", "v"]);
    // The bookmark outlives both.
    let table = t.ok(&["list", &q]);
    assert!(table.contains("v#s (volume deleted)"), "{table}");
    assert!(table.contains("CREATED"), "{table}");
}

#[test]
fn a_held_pool_names_the_process_holding_it() {
    let t = Env::new();
    let p = t.pool();
    t.ok(&["pool", "create", &p, "--size", "64M"]);
    // An import from a pipe that stays open holds the pool.
    let mut child = Command::new(env!("CARGO_BIN_EXE_snapvol"))
        .args(["import", &p, "slow", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let err = (0..100)
        .find_map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let out = t.run(&["list", &p]);
            (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).to_string())
        })
        .expect("the import never held the pool");
    let _ = child.kill();
    let _ = child.wait();
    assert_msg(&err, &format!("is in use by process {}", child.id()));
}

/// A snapshot whose volume was deleted (through the library, which keeps snapshots) has no
/// `vol@snap` name any more, and a new volume of the old name does not see it; the CLI
/// reaches it by id.
#[test]
fn snapshots_of_a_deleted_volume_are_destroyed_by_id() {
    let t = Env::new();
    let p = t.pool();
    {
        let pool = snapvol::Pool::create_file(&p, 64 << 20, Default::default()).unwrap();
        pool.create_volume("v", 1 << 20).unwrap();
        pool.snapshot("v", "s").unwrap();
        pool.delete_volume("v").unwrap();
        // A new volume under the old name starts with no snapshots.
        pool.create_volume("v", 1 << 20).unwrap();
        pool.snapshot("v", "s").unwrap();
        pool.close().unwrap();
    }
    let rows = t.ok(&["list", &p, "-t", "snapshot", "-H"]);
    let orphan: Vec<&str> = rows
        .lines()
        .find(|l| l.contains("(volume deleted)"))
        .unwrap_or_else(|| panic!("{rows}"))
        .split('\t')
        .collect();
    let id = orphan[0];
    assert_msg(
        &t.fails(&["destroy", &p, "@nothex"]),
        "expected @ and a 32-digit hex id",
    );
    assert_msg(
        &t.fails(&["destroy", &p, &format!("@{}", "0".repeat(32))]),
        "no snapshot",
    );
    t.ok(&["destroy", &p, &format!("@{id}")]);
    let rows = t.ok(&["list", &p, "-t", "snapshot", "-H"]);
    assert_eq!(rows.lines().count(), 1, "{rows}");
    assert!(rows.contains("v@s") && !rows.contains("deleted"), "{rows}");
    assert!(t.ok(&["pool", "check", &p]).contains(" 0 problems"));
}

/// The pool given once: `--pool PATH` or `SNAPVOL_POOL` stands in for every command's pool
/// argument; the flag wins; a pool given twice is a usage error (exit 2) that changes
/// nothing, so `destroy other.img db` never reads as two volume names.
#[test]
fn the_pool_can_come_from_a_flag_or_the_environment() {
    let t = Env::new();
    let p = t.pool();
    let run_env = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_snapvol"))
            .args(args)
            .env("SNAPVOL_POOL", &p)
            .output()
            .unwrap()
    };
    let ok = |o: &Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    ok(&run_env(&["pool", "create", "--size", "64M"]));
    ok(&run_env(&["create", "db", "--size", "1M"]));
    ok(&run_env(&["snapshot", "db@s"]));
    assert!(ok(&run_env(&["list", "-t", "snapshot"])).contains("db@s"));
    assert!(t.ok(&["--pool", &p, "list"]).contains("db@s"));
    assert!(t.ok(&["list", "--pool", &p, "db"]).contains("db"));
    // The flag wins over the environment.
    let q = t.path("q.img").display().to_string();
    t.ok(&["pool", "create", &q, "--size", "64M"]);
    let o = Command::new(env!("CARGO_BIN_EXE_snapvol"))
        .args(["--pool", &q, "list", "--json"])
        .env("SNAPVOL_POOL", &p)
        .output()
        .unwrap();
    assert!(!ok(&o).contains("db"), "listed the environment's pool");
    // Given twice: refused as a usage error, and nothing changed.
    let o = run_env(&["destroy", &q, "db"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("given twice"));
    assert!(t.ok(&["list", &p]).contains("db@s"));
    let o = run_env(&["--pool", &q, "demo"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "a command without a pool refuses --pool"
    );
}

/// Every command's --help has an example, and every argument and option says what it is.
#[test]
fn every_command_has_an_example_and_every_argument_a_description() {
    let t = Env::new();
    let commands: &[&[&str]] = &[
        &["create"],
        &["resize"],
        &["rename"],
        &["destroy"],
        &["list"],
        &["snapshot"],
        &["clone"],
        &["rollback"],
        &["import"],
        &["export"],
        &["write"],
        &["read"],
        &["diff"],
        &["send"],
        &["receive"],
        &["bookmark"],
        &["nbd"],
        &["serve"],
        &["demo"],
        &["pool", "create"],
        &["pool", "grow"],
        &["pool", "info"],
        &["pool", "check"],
        &["backup", "init"],
        &["backup", "push"],
        &["backup", "list"],
        &["backup", "restore"],
        &["backup", "verify"],
        &["backup", "delete"],
        &["backup", "prune"],
        &["backup", "gc"],
    ];
    for cmd in commands {
        let mut args = cmd.to_vec();
        args.push("--help");
        let help = t.ok(&args);
        let own: String = help
            .lines()
            .filter(|l| !l.contains("SNAPVOL_POOL=pool.img"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            own.contains("Example: snapvol"),
            "{cmd:?} --help has no example"
        );
        // Clap prints an argument or option with no text as its name alone on the line.
        for l in help.lines() {
            let l = l.trim();
            let undocumented = (l.starts_with('<') || l.starts_with('[') || l.starts_with('-'))
                && !l.contains("  ");
            assert!(!undocumented, "{cmd:?}: {l:?} is not described");
        }
    }
}

/// Runs `snapvol args` under strace; returns the syscalls it made, or None (with a message)
/// where strace cannot be had.
fn traced(t: &Env, args: &[&str], calls: &str) -> Option<String> {
    let log = t.path("strace.log");
    let out = Command::new("strace")
        .args(["-f", "-qq", "-e", &format!("trace={calls}"), "-o"])
        .arg(&log)
        .arg(env!("CARGO_BIN_EXE_snapvol"))
        .args(args)
        .env_remove("SNAPVOL_POOL")
        .stdout(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => Some(std::fs::read_to_string(&log).unwrap()),
        Ok(o) => panic!("{args:?} failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            eprintln!("SKIPPED: strace is not available ({e})");
            None
        }
    }
}

/// Commands that change nothing write and flush nothing: the pool file keeps its bytes and
/// its modification time, and (where strace is at hand) no write or sync reaches it.
#[test]
fn read_only_commands_write_and_flush_nothing() {
    let t = Env::new();
    let p = t.pool();
    t.ok(&["pool", "create", &p, "--size", "64M"]);
    t.ok(&["create", &p, "db", "--size", "2M"]);
    let data = t.path("d");
    std::fs::write(&data, pattern(1 << 20, 3)).unwrap();
    t.ok(&["write", &p, "db", data.to_str().unwrap()]);
    t.ok(&["snapshot", &p, "db@a"]);
    t.ok(&[
        "write",
        &p,
        "db",
        data.to_str().unwrap(),
        "--offset",
        "4096",
    ]);
    t.ok(&["snapshot", &p, "db@b"]);
    let before = std::fs::read(&p).unwrap();
    let mtime = std::fs::metadata(&p).unwrap().mtime_nsec();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let out = t.path("out.raw").display().to_string();
    let commands: &[&[&str]] = &[
        &["list", &p],
        &["pool", "info", &p],
        &["pool", "check", &p],
        &["read", &p, "db@a", "--length", "8K"],
        &["export", &p, "db@a", &out],
        &["diff", &p, "db@a", "db@b"],
        &["send", &p, "db@b", "--from", "db@a"],
    ];
    for args in commands {
        let o = t.run(args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert!(
        std::fs::read(&p).unwrap() == before,
        "a read-only command changed the pool"
    );
    assert_eq!(std::fs::metadata(&p).unwrap().mtime_nsec(), mtime);
    // No sync and no positioned write at all (export's output file aside).
    for args in commands.iter().filter(|a| a[0] != "export") {
        let Some(log) = traced(&t, args, "pwrite64,pwritev,fsync,fdatasync,sync_file_range") else {
            return;
        };
        assert!(log.trim().is_empty(), "{args:?} wrote or synced:\n{log}");
    }
}

/// Text output is buffered (a long listing is a few writes, not one per line), and a reader
/// that goes away ends the command quietly with status 0.
#[test]
fn output_is_buffered_and_a_closed_pipe_ends_quietly() {
    let t = Env::new();
    let p = t.pool();
    t.ok(&["pool", "create", &p, "--size", "64M"]);
    t.ok(&["create", &p, "db", "--size", "1M"]);
    // 300 snapshots in one group: 300 lines to list.
    let names: Vec<String> = (0..300).map(|i| format!("db@s{i:03}")).collect();
    let mut args = vec!["snapshot", p.as_str()];
    args.extend(names.iter().map(String::as_str));
    t.ok(&args);
    let list = ["list", p.as_str(), "-t", "snapshot", "-H"];
    assert_eq!(t.ok(&list).lines().count(), 300);
    if let Some(log) = traced(&t, &list, "write") {
        let writes = log.lines().filter(|l| l.contains("write(1,")).count();
        assert!(writes <= 2, "{writes} writes for 300 lines");
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_snapvol"))
        .args(list)
        .env_remove("SNAPVOL_POOL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "status {:?}", o.status);
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `pool create --multihost MS`: the pool records it (`pool info` shows it), a read-write
/// command waits three intervals before it touches the pool, and a bad interval is refused
/// before any file is made.
#[test]
fn multihost_from_the_command_line() {
    let t = Env::new();
    let p = t.pool();
    t.ok(&["pool", "create", &p, "--size", "64M", "--multihost", "100"]);
    let info = t.json(&["pool", "info", &p, "--json"]);
    assert_eq!(info["multihost_ms"], 100);
    assert!(t
        .ok(&["pool", "info", &p])
        .contains("heartbeat every 100 ms"));
    let started = std::time::Instant::now();
    t.ok(&["create", &p, "vm", "--size", "1M"]);
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    let plain = t.path("plain.img");
    let plain_s = plain.display().to_string();
    let info = t.json(&["pool", "create", &plain_s, "--size", "64M", "--json"]);
    assert!(info.get("id").is_some());
    assert_eq!(
        t.json(&["pool", "info", &plain_s, "--json"])["multihost_ms"],
        serde_json::Value::Null
    );
    let bad = t.path("bad.img");
    let err = t.fails(&[
        "pool",
        "create",
        &bad.display().to_string(),
        "--size",
        "64M",
        "--multihost",
        "5",
    ]);
    assert_msg(&err, "multihost heartbeat");
    assert!(!bad.exists(), "nothing created");
}
