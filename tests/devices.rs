//! The engine on real devices: a sparse file and, when run as root with losetup, a raw block
//! device (a loop device).

use snapvol::device::{BlockDevice, FileDevice, FileOptions};
use snapvol::{Pool, PoolOptions};
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::Arc;

fn workload(pool: &Pool) -> Vec<u8> {
    let vol = pool.create_volume("disk", 32 << 20).unwrap();
    let data: Vec<u8> = (0..(3 << 20) + 777).map(|i| (i % 251) as u8).collect();
    vol.write_at(&data, 4096 * 5 + 3).unwrap();
    pool.snapshot("disk", "s").unwrap();
    vol.write_at(&[0xEE; 8192], 4096 * 5).unwrap();
    vol.discard(1 << 20, 1 << 20).unwrap();
    vol.flush().unwrap();
    data
}

fn verify(pool: &Pool, data: &[u8]) {
    let snap = pool.snapshot_handle("disk", "s").unwrap();
    let mut buf = vec![0u8; data.len()];
    snap.read_at(&mut buf, 4096 * 5 + 3).unwrap();
    assert!(buf == data, "snapshot changed");
    let vol = pool.volume("disk").unwrap();
    let mut head = [0u8; 8192];
    vol.read_at(&mut head, 4096 * 5).unwrap();
    assert_eq!(head, [0xEE; 8192]);
    let mut hole = vec![1u8; 1 << 20];
    vol.read_at(&mut hole, 1 << 20).unwrap();
    assert!(hole.iter().all(|&b| b == 0), "discarded range reads zeros");
    let report = pool.check().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}

#[test]
fn sparse_file_pool_round_trip_and_space_returns_to_host() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.img");
    let pool = Pool::create_file(&path, 1 << 30, PoolOptions::default()).unwrap();
    let data = workload(&pool);
    pool.close().unwrap();
    let host_used = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(
        host_used < 16 << 20,
        "a 1 GiB pool with 3 MiB written uses {host_used} bytes"
    );

    let pool = Pool::open_path(&path, PoolOptions::default()).unwrap();
    verify(&pool, &data);
    // Deleting returns space to the pool and, through hole punching, to the host.
    pool.delete_snapshot("disk", "s").unwrap();
    pool.delete_volume("disk").unwrap();
    pool.flush().unwrap();
    pool.flush().unwrap();
    let after = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(after < host_used / 2, "host usage {host_used} -> {after}");
    assert!(pool.check().unwrap().is_clean());
}

#[test]
fn direct_io_pool_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.img");
    let direct = PoolOptions::default().direct_io(true);
    let pool = match Pool::create_file(&path, 1 << 30, direct.clone()) {
        Ok(p) => p,
        Err(snapvol::Error::InvalidArgument(why)) => {
            eprintln!("SKIPPED direct_io_pool_round_trip: {why}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let data = workload(&pool);
    pool.close().unwrap();
    // Written around the page cache, read back both ways.
    let pool = Pool::open_path(&path, direct).unwrap();
    verify(&pool, &data);
    pool.close().unwrap();
    let pool = Pool::open_path(&path, PoolOptions::default()).unwrap();
    verify(&pool, &data);
}

#[test]
fn opening_garbage_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk");
    std::fs::write(&path, vec![0x5Au8; 4 << 20]).unwrap();
    match Pool::open_path(&path, PoolOptions::default()) {
        Err(snapvol::Error::NotAPool(_)) => {}
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("garbage opened as a pool"),
    }
    assert!(matches!(
        Pool::open_path(dir.path().join("missing"), PoolOptions::default()),
        Err(snapvol::Error::Io { .. })
    ));
    assert!(matches!(
        Pool::create_file(dir.path().join("tiny"), 4096, PoolOptions::default()),
        Err(snapvol::Error::InvalidArgument(_))
    ));
}

struct Loop(String);
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn raw_block_device_on_a_loop_device() {
    let is_root = effective_uid() == 0;
    let have_losetup = Command::new("losetup").arg("--version").output().is_ok();
    if !is_root || !have_losetup {
        eprintln!("SKIPPED raw_block_device_on_a_loop_device: needs root and losetup (root={is_root}, losetup={have_losetup})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&backing)
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "SKIPPED raw_block_device_on_a_loop_device: losetup failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return;
    }
    let loopdev = Loop(String::from_utf8(out.stdout).unwrap().trim().to_string());
    let dev = FileDevice::open(&loopdev.0).unwrap();
    assert!(dev.is_block_device());
    assert_eq!(dev.len(), 256 << 20, "size comes from the block device");
    let pool = Pool::create(Arc::new(dev), PoolOptions::default()).unwrap();
    let data = workload(&pool);
    pool.close().unwrap();
    let pool = open_device(&loopdev.0);
    verify(&pool, &data);
    pool.close().unwrap();
    // The same pool through O_DIRECT: aligned to the device's logical sector size.
    let direct = FileDevice::open_with(
        &loopdev.0,
        FileOptions {
            direct: true,
            read_only: false,
        },
    )
    .unwrap();
    assert!(direct.is_direct());
    let pool = Pool::open(Arc::new(direct), PoolOptions::default()).unwrap();
    verify(&pool, &data);
    let vol = pool.volume("disk").unwrap();
    vol.write_at(&[0x77; 5000], 12345).unwrap();
    drop(vol);
    pool.close().unwrap();
    let pool = open_device(&loopdev.0);
    let mut back = [0u8; 5000];
    pool.volume("disk")
        .unwrap()
        .read_at(&mut back, 12345)
        .unwrap();
    assert_eq!(back, [0x77; 5000]);
    assert!(pool.check().unwrap().is_clean());

    // Growing onto a block device: refused until the device itself is larger, then the new
    // size is read from the device again.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .unwrap()
        .set_len(384 << 20)
        .unwrap();
    assert!(matches!(
        pool.grow(384 << 20),
        Err(snapvol::Error::InvalidArgument(_))
    ));
    let refreshed = Command::new("losetup")
        .args(["-c", &loopdev.0])
        .status()
        .unwrap();
    assert!(refreshed.success(), "losetup -c failed");
    pool.grow(384 << 20).unwrap();
    assert_eq!(pool.stats().size, 384 << 20);
    let vol = pool.volume("disk").unwrap();
    vol.write_at(&vec![0x42; 8 << 20], 20 << 20).unwrap();
    drop(vol);
    pool.close().unwrap();
    let pool = open_device(&loopdev.0);
    assert_eq!(pool.stats().size, 384 << 20);
    verify(&pool, &data);
}

/// Root and a working losetup, or why the test cannot run.
fn loop_over(backing: &std::path::Path, test: &str) -> Option<Loop> {
    let is_root = effective_uid() == 0;
    let have_losetup = Command::new("losetup").arg("--version").output().is_ok();
    if !is_root || !have_losetup {
        eprintln!(
            "SKIPPED {test}: needs root and losetup (root={is_root}, losetup={have_losetup})"
        );
        return None;
    }
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(backing)
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "SKIPPED {test}: losetup failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    Some(Loop(
        String::from_utf8(out.stdout).unwrap().trim().to_string(),
    ))
}

#[test]
fn a_pool_held_through_its_file_cannot_be_opened_through_a_loop_device_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.img");
    let pool = Pool::create_file(&file, 64 << 20, PoolOptions::default()).unwrap();
    pool.create_volume("v", 1 << 20).unwrap();
    let Some(loopdev) = loop_over(
        &file,
        "a_pool_held_through_its_file_cannot_be_opened_through_a_loop_device_and_back",
    ) else {
        return;
    };
    // While the file is held, the loop device over it is refused, for writing and reading:
    // a second writer would commit over the first (the CLI once reported snapshots that
    // vanished at the server's next commit).
    for read_only in [false, true] {
        let opened = FileDevice::open_with(
            &loopdev.0,
            FileOptions {
                direct: false,
                read_only,
            },
        );
        match opened {
            Err(snapvol::Error::InUse { what, pid }) => {
                assert!(what.contains("backing file"), "{what}");
                assert_eq!(pid, Some(std::process::id()));
            }
            other => panic!("read_only={read_only}: {:?}", other.map(|_| ())),
        }
    }
    pool.close().unwrap();
    // A device another user opened exclusively (as a filesystem's mount or device-mapper
    // does) is refused: the open uses O_EXCL. O_EXCL is 0o200 on Linux.
    {
        use std::os::unix::fs::OpenOptionsExt;
        let _other = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(0o200)
            .open(&loopdev.0)
            .unwrap();
        match FileDevice::open(&loopdev.0) {
            Err(snapvol::Error::InUse { what, .. }) => {
                assert!(what.contains("exclusively"), "{what}")
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
    }
    // Free now; and while the loop device holds it, the file is refused in turn.
    let dev = FileDevice::open(&loopdev.0).unwrap();
    assert!(matches!(
        Pool::open_path(&file, PoolOptions::default()),
        Err(snapvol::Error::InUse { .. })
    ));
    // A second writable open of the block device itself: refused as well (O_EXCL).
    assert!(matches!(
        FileDevice::open(&loopdev.0),
        Err(snapvol::Error::InUse { .. })
    ));
    let pool = Pool::open(Arc::new(dev), PoolOptions::default()).unwrap();
    assert_eq!(pool.volume("v").unwrap().len().unwrap(), 1 << 20);
    pool.close().unwrap();
    Pool::open_path(&file, PoolOptions::default())
        .unwrap()
        .close()
        .unwrap();
}

fn open_device(path: &str) -> Pool {
    Pool::open(
        Arc::new(FileDevice::open(path).unwrap()),
        PoolOptions::default(),
    )
    .unwrap()
}

/// The effective uid, read from /proc so the test needs no unsafe code.
fn effective_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2))
                .and_then(|u| u.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

/// A pool file grows in place: a full 64 MiB pool grown to 3 GiB (its space map index gains
/// a level at 2 GiB) takes new writes at once, keeps everything it had, and reopens clean.
#[test]
fn pool_file_grows_across_a_space_map_level() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.img");
    let pool = Pool::create_file(&path, 64 << 20, PoolOptions::default()).unwrap();
    let vol = pool.create_volume("disk", 4 << 30).unwrap();
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
    let mut filled = 0u64;
    while vol.write_at(&chunk, filled).is_ok() {
        filled += chunk.len() as u64;
    }
    assert!(filled >= 48 << 20, "filled only {filled} bytes");
    let old = pool.stats();
    assert!(matches!(
        pool.grow(32 << 20),
        Err(snapvol::Error::InvalidArgument(_))
    ));
    for huge in [u64::MAX, snapvol::MAX_POOL_BYTES + 4096] {
        assert!(matches!(
            pool.grow(huge),
            Err(snapvol::Error::InvalidArgument(_))
        ));
    }
    assert_eq!(
        pool.stats().size,
        old.size,
        "a refused grow changes nothing"
    );
    pool.grow(3 << 30).unwrap();
    let st = pool.stats();
    assert_eq!(st.size, 3 << 30);
    assert!(st.free > old.free + (2 << 30));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 << 30);
    // 128 MiB more, far past the old end of the pool.
    for i in 0..128u64 {
        vol.write_at(&chunk, filled + (i << 20)).unwrap();
    }
    drop(vol);
    pool.close().unwrap();

    let pool = Pool::open_path(&path, PoolOptions::default()).unwrap();
    assert_eq!(pool.stats().size, 3 << 30);
    let vol = pool.volume("disk").unwrap();
    let mut back = vec![0u8; chunk.len()];
    for off in (0..filled + (128 << 20)).step_by(chunk.len() * 7) {
        vol.read_at(&mut back, off).unwrap();
        assert!(back == chunk, "data at {off} after growing");
    }
    let report = pool.check().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    // A device that cannot grow says so.
    let mem = Pool::create(
        Arc::new(FailsToGrow(snapvol::device::MemoryDevice::new(4 << 20))),
        PoolOptions::default(),
    )
    .unwrap();
    assert!(matches!(
        mem.grow(8 << 20),
        Err(snapvol::Error::InvalidArgument(_))
    ));
    assert_eq!(mem.stats().size, 4 << 20);
    assert!(mem.check().unwrap().is_clean());
}

/// A device without the grow capability (the trait's default).
struct FailsToGrow(snapvol::device::MemoryDevice);

impl BlockDevice for FailsToGrow {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> snapvol::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> snapvol::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> snapvol::Result<()> {
        self.0.flush()
    }
    fn len(&self) -> u64 {
        self.0.len()
    }
}

/// Closing the last handle releases the pool file at once, even while the background
/// committer is running: reopening right away never finds it in use.
#[test]
fn close_then_reopen_never_finds_the_pool_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.img");
    let fast = PoolOptions::default().commit_interval(Some(std::time::Duration::from_millis(1)));
    let pool = Pool::create_file(&path, 64 << 20, fast.clone()).unwrap();
    pool.create_volume("v", 1 << 20).unwrap();
    pool.close().unwrap();
    for i in 0..200u32 {
        let pool =
            Pool::open_path(&path, fast.clone()).unwrap_or_else(|e| panic!("reopen {i}: {e}"));
        let vol = pool.volume("v").unwrap();
        // A new block each time: the map changes, so the committer has a real commit to
        // make (with its fdatasyncs) just as the handles go.
        vol.write_at(&i.to_le_bytes(), u64::from(i) * 4096).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1));
        if i % 2 == 0 {
            drop(vol);
            pool.close().unwrap();
        } else {
            // Dropping handles in either order releases the file too.
            drop(pool);
            drop(vol);
        }
    }
    let pool = Pool::open_path(&path, PoolOptions::default()).unwrap();
    let mut back = [0u8; 4];
    pool.volume("v")
        .unwrap()
        .read_at(&mut back, 199 * 4096)
        .unwrap();
    assert_eq!(u32::from_le_bytes(back), 199);
}

/// A small tmpfs mounted for the test (root only), unmounted on drop.
struct SmallFs(std::path::PathBuf);
impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn small_fs(dir: &std::path::Path, size: &str, test: &str) -> Option<SmallFs> {
    if effective_uid() != 0 {
        eprintln!("SKIPPED {test}: needs root to mount a small tmpfs");
        return None;
    }
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED {test}: mount -t tmpfs failed");
        return None;
    }
    Some(SmallFs(dir.to_path_buf()))
}

/// Writes filler into `dir` until the filesystem is full; returns the filler's path.
fn fill_up(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xAAu8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    path
}

#[test]
fn a_full_host_filesystem_refuses_writes_until_it_has_room_and_loses_nothing() {
    let test = "a_full_host_filesystem_refuses_writes_until_it_has_room_and_loses_nothing";
    let dir = tempfile::tempdir().unwrap();
    let Some(_fs) = small_fs(dir.path(), "16m", test) else {
        return;
    };
    let file = dir.path().join("p.img");
    let pool = Pool::create_file(
        &file,
        64 << 20,
        PoolOptions::default().commit_interval(None),
    )
    .unwrap();
    let vol = pool.create_volume("vm", 32 << 20).unwrap();
    vol.write_at(&vec![0x11; 1 << 20], 0).unwrap();
    vol.flush().unwrap();
    let snap = pool.snapshot("vm", "s").unwrap();
    let filler = fill_up(dir.path());

    // The pool has room, its file cannot grow: a typed error naming the host, nothing more.
    let big = vec![0x22; 4 << 20];
    match vol.write_at(&big, 8 << 20) {
        Err(snapvol::Error::HostFull { op, .. }) => assert_eq!(op, "write"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        snapvol::Error::HostFull {
            op: "write",
            offset: 0
        }
        .kind(),
        snapvol::ErrorKind::ResourceExhausted
    );
    // Reads of committed data and of the snapshot go on.
    let mut b = vec![0u8; 1 << 20];
    vol.read_at(&mut b, 0).unwrap();
    assert_eq!(b, vec![0x11; 1 << 20]);
    pool.snapshot_by_id(snap)
        .unwrap()
        .read_at(&mut b, 0)
        .unwrap();
    assert_eq!(b, vec![0x11; 1 << 20]);

    // Room again: the same write goes through without reopening anything.
    std::fs::remove_file(&filler).unwrap();
    vol.write_at(&big, 8 << 20).unwrap();
    vol.flush().unwrap();
    drop(vol);
    pool.close().unwrap();
    let pool = Pool::open_path(&file, PoolOptions::default()).unwrap();
    let mut b = vec![0u8; 4 << 20];
    pool.volume("vm").unwrap().read_at(&mut b, 8 << 20).unwrap();
    assert_eq!(b, big);
    assert!(pool.check().unwrap().is_clean());
    pool.close().unwrap();
    std::fs::remove_file(&file).unwrap();

    // A preallocated pool has its space already: the host filling up does not reach it.
    let pre = dir.path().join("pre.img");
    let opts = PoolOptions::default().preallocate(true);
    let pool = Pool::create_file(&pre, 8 << 20, opts.clone()).unwrap();
    let filler = fill_up(dir.path());
    let vol = pool.create_volume("vm", 4 << 20).unwrap();
    vol.write_at(&vec![0x33; 3 << 20], 0).unwrap();
    vol.flush().unwrap();
    drop(vol);
    pool.close().unwrap();
    // And a preallocation the host cannot hold is refused, leaving no file behind.
    std::fs::remove_file(&filler).unwrap();
    let huge = dir.path().join("huge.img");
    match Pool::create_file(&huge, 64 << 20, opts) {
        Err(snapvol::Error::HostFull { op, .. }) => assert_eq!(op, "preallocate"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert!(!huge.exists());
}

#[test]
fn importing_a_sparse_file_reads_its_data_and_skips_its_holes() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let f = std::fs::File::create(&img).unwrap();
    // 4 GiB and a ragged tail, data at the start, in the middle (unaligned), at the end,
    // and a run of written zeros (allocated on the host, still nothing to store).
    let len = (4u64 << 30) + 1000;
    f.set_len(len).unwrap();
    let pieces: [(u64, Vec<u8>); 3] = [
        (0, vec![0x5A; 8192]),
        (
            (3 << 30) + 12345,
            (0..70_000u32).map(|i| (i % 251) as u8 + 1).collect(),
        ),
        (len - 700, vec![0xC3; 700]),
    ];
    for (at, bytes) in &pieces {
        f.write_all_at(bytes, *at).unwrap();
    }
    f.write_all_at(&vec![0u8; 1 << 20], 1 << 30).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let pool =
        Pool::create_file(dir.path().join("p.img"), 256 << 20, PoolOptions::default()).unwrap();
    let st = pool
        .import_file("disk", &std::fs::File::open(&img).unwrap())
        .unwrap();
    assert_eq!(st.size, len);
    // Only the blocks holding data were written: 8 KiB, the 18 blocks the middle piece
    // touches, and the last, partial block.
    assert_eq!(st.data_bytes, 8192 + 18 * 4096 + (len % 4096).max(700));
    let vol = pool.volume("disk").unwrap();
    for (at, bytes) in &pieces {
        let mut got = vec![0u8; bytes.len()];
        vol.read_at(&mut got, *at).unwrap();
        assert_eq!(&got, bytes, "data at {at}");
    }
    let mut zeros = vec![1u8; 1 << 20];
    vol.read_at(&mut zeros, 1 << 30).unwrap();
    assert!(zeros.iter().all(|&b| b == 0));
    // Importing under a taken name is refused, and nothing else appears.
    assert!(matches!(
        pool.import_file("disk", &std::fs::File::open(&img).unwrap()),
        Err(snapvol::Error::AlreadyExists { .. })
    ));
    assert_eq!(pool.volumes().unwrap().len(), 1);
    assert!(pool.check().unwrap().is_clean());
}
