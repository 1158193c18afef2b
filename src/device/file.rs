//! Regular files (created sparse) and raw block devices, through the page cache or with
//! `O_DIRECT`.

use super::{check_range, BlockDevice};
use crate::error::{Error, Result};
use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// A pool backed by a regular file or a raw block device (`/dev/sdX`, `/dev/loopN`, ...).
pub struct FileDevice {
    file: File,
    /// Changes only in `grow`.
    len: AtomicU64,
    block_device: bool,
    /// Set when opened with `O_DIRECT`: I/O must be aligned, so unaligned requests go through
    /// an aligned bounce buffer.
    direct: Option<Direct>,
    /// For a loop device, its backing file, held under the same lock as the pool would be:
    /// the same bytes reached through the file and through the loop device are one pool.
    _backing: Option<File>,
}

struct Direct {
    /// Alignment of buffers, offsets and lengths (the device's logical sector size, at least
    /// 4 KiB).
    align: usize,
    /// Serializes writes: an unaligned write is a read-modify-write of its edge sectors, and
    /// a concurrent write into the same sector would otherwise be lost.
    writes: Mutex<()>,
}

/// Bounce buffers are filled and drained in pieces of this size, whatever the request.
const BOUNCE: usize = 1 << 20;

/// How to open a [`FileDevice`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// Bypass the page cache (`O_DIRECT`). Data goes straight to the device; the pool's
    /// flush still issues the device cache flush. Unaligned I/O is handled inside the device
    /// layer with aligned bounce buffers.
    pub direct: bool,
    /// Open for reading only, under a shared lock: read-only opens may share a file, and a
    /// read-write open (which takes the lock exclusively) excludes them. Writes fail.
    pub read_only: bool,
}

impl FileDevice {
    /// Opens an existing file or block device read-write through the page cache.
    pub fn open(path: impl AsRef<Path>) -> Result<FileDevice> {
        FileDevice::open_with(path, FileOptions::default())
    }

    /// Opens an existing file or block device read-write. A block device's size comes from
    /// the `BLKGETSIZE64` ioctl.
    pub fn open_with(path: impl AsRef<Path>, opts: FileOptions) -> Result<FileDevice> {
        let path = path.as_ref();
        let is_block = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
        let mut o = open_options(opts);
        if is_block && !opts.read_only {
            // Linux: O_EXCL on a block device fails with EBUSY while it is mounted or opened
            // with O_EXCL by anyone else (another pool, a filesystem, device-mapper).
            o.custom_flags(libc::O_EXCL | if opts.direct { libc::O_DIRECT } else { 0 });
        }
        let file = o.open(path).map_err(|e| {
            if is_block && e.raw_os_error() == Some(libc::EBUSY) {
                Error::InUse {
                    what: format!("{} (mounted, or opened exclusively)", path.display()),
                    pid: None,
                }
            } else {
                open_error("open", opts, e)
            }
        })?;
        lock(&file, path, opts.read_only)?;
        let meta = file.metadata().map_err(|e| Error::io("open", 0, e))?;
        let block_device = meta.file_type().is_block_device();
        let backing = if block_device {
            lock_loop_backing(&meta, opts.read_only)?
        } else {
            None
        };
        let len = if block_device {
            block_device_size(&file)?
        } else {
            meta.len()
        };
        let mut dev = FileDevice::assemble(file, len, block_device, opts)?;
        dev._backing = backing;
        Ok(dev)
    }

    /// Creates a new sparse file of `len` bytes; fails if `path` exists. A file it created
    /// but could not size is removed again.
    pub fn create(path: impl AsRef<Path>, len: u64) -> Result<FileDevice> {
        FileDevice::create_with(path, len, FileOptions::default())
    }

    /// As [`FileDevice::create`], with options.
    pub fn create_with(path: impl AsRef<Path>, len: u64, opts: FileOptions) -> Result<FileDevice> {
        let file = open_options(opts)
            .create_new(true)
            .open(path.as_ref())
            .map_err(|e| open_error("create", opts, e))?;
        // The file is new: if it cannot be made into a device, it goes again.
        let made = lock(&file, path.as_ref(), false)
            .and_then(|_| file.set_len(len).map_err(|e| Error::io("create", 0, e)))
            .and_then(|_| FileDevice::assemble(file, len, false, opts));
        if made.is_err() {
            let _ = std::fs::remove_file(path.as_ref());
        }
        made
    }

    fn assemble(file: File, len: u64, block_device: bool, opts: FileOptions) -> Result<FileDevice> {
        let direct = if opts.direct {
            let sector = if block_device {
                logical_sector_size(&file)?
            } else {
                4096
            };
            Some(Direct {
                align: sector.max(4096),
                writes: Mutex::new(()),
            })
        } else {
            None
        };
        let mut dev = FileDevice {
            file,
            len: AtomicU64::new(0),
            block_device,
            direct,
            _backing: None,
        };
        dev.len = AtomicU64::new(dev.usable(len));
        Ok(dev)
    }

    /// The bytes of a file or device of `len` bytes the pool may use: with O_DIRECT a partial
    /// last sector cannot be written, so the device ends before it.
    fn usable(&self, len: u64) -> u64 {
        match &self.direct {
            Some(d) => len - len % d.align as u64,
            None => len,
        }
    }

    fn size(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// True when this is a raw block device rather than a regular file.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// True when opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }
}

fn open_options(opts: FileOptions) -> OpenOptions {
    let mut o = OpenOptions::new();
    o.read(true).write(!opts.read_only);
    if opts.direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o
}

fn open_error(what: &'static str, opts: FileOptions, e: std::io::Error) -> Error {
    if opts.direct && e.raw_os_error() == Some(libc::EINVAL) {
        return Error::InvalidArgument(
            "this filesystem does not support direct I/O (O_DIRECT)".into(),
        );
    }
    Error::io(what, 0, e)
}

fn aligned(d: &Direct, ptr: *const u8, offset: u64, len: usize) -> bool {
    let a = d.align;
    (ptr as usize) % a == 0 && offset % a as u64 == 0 && len % a == 0
}

/// A zeroed buffer of `len` bytes starting at an `align`-byte boundary, carved out of a
/// slightly larger allocation (no unsafe allocation API needed).
struct Bounce {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl Bounce {
    fn new(len: usize, align: usize) -> Bounce {
        let mem = vec![0u8; len + align];
        let start = mem.as_ptr().align_offset(align);
        Bounce { mem, start, len }
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.len]
    }
}

impl FileDevice {
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io("read", offset, e))
    }

    fn pwrite(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| Error::io("write", offset, e))
    }

    /// An unaligned direct read: whole sectors into the bounce buffer, the asked bytes out.
    fn bounce_read(&self, d: &Direct, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut bounce = Bounce::new(BOUNCE + 2 * d.align, d.align);
        for w in Window::cover(offset, buf.len(), d.align as u64) {
            let b = &mut bounce.buf()[..w.sectors_len()];
            self.pread(b, w.lo)?;
            buf[w.done..w.done + w.n].copy_from_slice(&b[w.skip()..w.skip() + w.n]);
        }
        Ok(())
    }

    /// An unaligned direct write: the edge sectors are read, patched and written whole.
    fn bounce_write(&self, d: &Direct, buf: &[u8], offset: u64) -> Result<()> {
        let a = d.align as u64;
        let mut bounce = Bounce::new(BOUNCE + 2 * d.align, d.align);
        for w in Window::cover(offset, buf.len(), a) {
            let b = &mut bounce.buf()[..w.sectors_len()];
            let sector = d.align;
            let end = w.off + w.n as u64;
            if w.lo < w.off {
                self.pread(&mut b[..sector], w.lo)?;
            }
            // The last sector, unless it is the first one and was just read.
            if w.hi > end && (w.hi - a > w.lo || w.lo == w.off) {
                let at = b.len() - sector;
                self.pread(&mut b[at..], w.hi - a)?;
            }
            b[w.skip()..w.skip() + w.n].copy_from_slice(&buf[w.done..w.done + w.n]);
            self.pwrite(b, w.lo)?;
        }
        Ok(())
    }
}

/// One bounce-buffer step of an unaligned request: `n` bytes at device offset `off`, which
/// are bytes `done..done + n` of the request, inside the aligned sectors `lo..hi`.
struct Window {
    done: usize,
    n: usize,
    off: u64,
    lo: u64,
    hi: u64,
}

impl Window {
    fn cover(offset: u64, len: usize, align: u64) -> impl Iterator<Item = Window> {
        (0..len).step_by(BOUNCE).map(move |done| {
            let n = (len - done).min(BOUNCE);
            let off = offset + done as u64;
            Window {
                done,
                n,
                off,
                lo: off - off % align,
                hi: (off + n as u64).div_ceil(align) * align,
            }
        })
    }
    fn sectors_len(&self) -> usize {
        (self.hi - self.lo) as usize
    }
    fn skip(&self) -> usize {
        (self.off - self.lo) as usize
    }
}

impl BlockDevice for FileDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range("read", offset, buf.len(), self.size())?;
        match &self.direct {
            Some(d) if !aligned(d, buf.as_ptr(), offset, buf.len()) => {
                self.bounce_read(d, buf, offset)
            }
            _ => self.pread(buf, offset),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range("write", offset, buf.len(), self.size())?;
        match &self.direct {
            Some(d) => {
                let _serial = d.writes.lock();
                if aligned(d, buf.as_ptr(), offset, buf.len()) {
                    self.pwrite(buf, offset)
                } else {
                    self.bounce_write(d, buf, offset)
                }
            }
            None => self.pwrite(buf, offset),
        }
    }

    fn flush(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io("flush", 0, e))
    }

    fn len(&self) -> u64 {
        self.size()
    }

    /// A pool file is extended (sparse). A block device cannot be enlarged from here: its
    /// size is read again, so a device grown underneath (LVM, a cloud disk) can be used.
    fn grow(&self, new_len: u64) -> Result<()> {
        let len = if self.block_device {
            let now = block_device_size(&self.file)?;
            if self.usable(now) < new_len {
                return Err(Error::InvalidArgument(format!(
                    "the block device is {now} bytes; enlarge it to {new_len} first"
                )));
            }
            now
        } else {
            if new_len > self.size() {
                self.file
                    .set_len(new_len)
                    .map_err(|e| Error::io("grow", new_len, e))?;
            }
            new_len.max(self.size())
        };
        self.len.store(self.usable(len), Ordering::Release);
        Ok(())
    }

    fn supports_discard(&self) -> bool {
        true
    }

    /// A regular file's blocks are allocated on the host; a block device's space is its own
    /// already.
    fn preallocate(&self, offset: u64, len: u64) -> Result<()> {
        if self.block_device || len == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(Error::InvalidArgument(format!(
                "{len} bytes at {offset}: too large to preallocate"
            )));
        };
        // SAFETY: fallocate takes plain integers; the fd stays open while `self` lives.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, off, n) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => Err(Error::HostFull {
                op: "preallocate",
                offset,
            }),
            Some(libc::EOPNOTSUPP) => Err(Error::InvalidArgument(
                "the filesystem holding the pool file cannot preallocate (fallocate)".into(),
            )),
            _ => Err(Error::io("preallocate", offset, err)),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range("discard", offset, len as usize, self.size())?;
        if len == 0 {
            return Ok(());
        }
        let fd = self.file.as_raw_fd();
        let rc = if self.block_device {
            let range: [u64; 2] = [offset, len];
            // SAFETY: BLKDISCARD reads a [u64; 2] (start, length) from the pointer, which
            // points at a live local array for the duration of the call.
            unsafe { libc::ioctl(fd, BLKDISCARD, range.as_ptr()) }
        } else {
            // SAFETY: fallocate takes plain integers; the fd stays open while `self` lives.
            unsafe {
                libc::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            }
        };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        // A filesystem or device without discard support simply keeps the bytes.
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL) => Ok(()),
            _ => Err(Error::io("discard", offset, err)),
        }
    }
}

/// Takes an advisory lock, exclusive for a read-write open, so two processes never open one pool
/// to change it: each would allocate from its own idea of free space and overwrite the other's
/// blocks. A read-only open takes it shared: readers may share the pool, never with a writer.
///
/// A refusal is retried for a moment before it is reported: a lock belongs to the open file,
/// which a child process forked by this one shares until it execs, so a pool closed just as
/// the embedding program spawns a command can look held for a few milliseconds.
fn lock(file: &File, path: &Path, shared: bool) -> Result<()> {
    let mode = if shared { libc::LOCK_SH } else { libc::LOCK_EX };
    let mut tries = 0;
    loop {
        // SAFETY: flock takes the fd of a file that stays open for the call; no memory is
        // passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(Error::io("lock", 0, err));
        }
        tries += 1;
        if tries == LOCK_TRIES {
            return Err(Error::InUse {
                what: path.display().to_string(),
                pid: lock_holder(file),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The next extent of data in `file` at or after byte `from` and before `len`, as the
/// filesystem reports it (`SEEK_DATA`, then `SEEK_HOLE`): `None` when only holes remain. A
/// filesystem that cannot tell has one extent, the rest of the file. The file's offset
/// moves; callers read with `pread` (`FileExt::read_at`).
pub fn data_extent(file: &File, from: u64, len: u64) -> std::io::Result<Option<(u64, u64)>> {
    if from >= len {
        return Ok(None);
    }
    let fd = file.as_raw_fd();
    let seek = |whence: libc::c_int, at: u64| -> std::io::Result<Option<u64>> {
        let at =
            libc::off_t::try_from(at).map_err(|_| std::io::Error::other("offset too large"))?;
        // SAFETY: lseek takes plain integers and changes only the offset of a descriptor
        // that stays open for the call.
        let r = unsafe { libc::lseek(fd, at, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // Nothing but holes from `at` on.
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    };
    let start = match seek(libc::SEEK_DATA, from) {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Some((from, len))),
        Err(e) => return Err(e),
    };
    if start >= len {
        return Ok(None);
    }
    let end = seek(libc::SEEK_HOLE, start)?.unwrap_or(len).min(len);
    // A hole right at a data offset cannot be; if a filesystem said so, read on to the end
    // rather than ask again forever.
    Ok(Some((start, if end > start { end } else { len })))
}

/// When the block device `meta` describes is a loop device, opens its backing file and takes
/// the pool lock on it too, so a pool file held by one process cannot be opened by another
/// through `losetup` (each would commit over the other). The backing file is found in sysfs
/// (`/sys/dev/block/MAJ:MIN/loop/backing_file`); a device that is not a loop device, or a
/// backing file that is gone, has nothing to lock.
fn lock_loop_backing(meta: &std::fs::Metadata, shared: bool) -> Result<Option<File>> {
    use std::os::unix::fs::MetadataExt;
    let (major, minor) = split_dev(meta.rdev());
    let sys = format!("/sys/dev/block/{major}:{minor}/loop/backing_file");
    let Ok(backing) = std::fs::read_to_string(&sys) else {
        return Ok(None);
    };
    let backing = Path::new(backing.trim_end_matches('\n'));
    let Ok(file) = File::open(backing) else {
        return Ok(None);
    };
    lock(&file, backing, shared).map_err(|e| match e {
        Error::InUse { what, pid } => Error::InUse {
            what: format!("{what} (the backing file of this loop device)"),
            pid,
        },
        e => e,
    })?;
    Ok(Some(file))
}

/// glibc's major()/minor() split of a dev_t.
fn split_dev(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major, minor)
}

/// The process holding the flock on `file`, from /proc/locks (Linux), if it can be told:
/// an entry `N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE ...` for the file's device and inode.
fn lock_holder(file: &File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().ok()?;
    let (major, minor) = split_dev(meta.dev());
    let want = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Blocked waiters are listed with "->"; the holder's line has the fields in place.
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()))
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
}

/// Attempts at the pool lock, 10 ms apart, before a pool is reported in use.
const LOCK_TRIES: u32 = 30;

/// `_IO(0x12, 119)` from linux/fs.h.
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `_IOR(0x12, 114, size_t)` from linux/fs.h: the device size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 104)` from linux/fs.h: the logical sector size.
const BLKSSZGET: libc::c_ulong = 0x1268;

fn block_device_size(file: &File) -> Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live local.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc != 0 {
        return Err(Error::io(
            "block device size",
            0,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(size)
}

fn logical_sector_size(file: &File) -> Result<usize> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at a live local.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut size as *mut libc::c_int) };
    if rc != 0 || size <= 0 || !(size as usize).is_power_of_two() {
        return Err(Error::io(
            "block device sector size",
            0,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(size as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance_on_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        let dev = FileDevice::create(&path, 8 << 20).unwrap();
        super::super::conformance::run(&dev);
        // Created sparse: almost nothing allocated on the host filesystem.
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&path).unwrap().blocks();
        assert!(blocks * 512 < 1 << 20, "file should be sparse");
        assert!(
            FileDevice::create(&path, 1 << 20).is_err(),
            "create must not clobber"
        );
        assert!(
            matches!(
                FileDevice::open(&path),
                Err(Error::InUse { pid: Some(p), .. }) if p == std::process::id()
            ),
            "a second opener is refused while the first holds the device"
        );
        drop(dev);
        let reopened = FileDevice::open(&path).unwrap();
        assert_eq!(reopened.len(), 8 << 20);
        assert!(!reopened.is_block_device());
    }

    /// A direct file device in the temp dir, or None (with the reason printed) where the
    /// filesystem refuses O_DIRECT.
    fn direct_device(dir: &Path, len: u64) -> Option<FileDevice> {
        match FileDevice::create_with(
            dir.join("direct"),
            len,
            FileOptions {
                direct: true,
                read_only: false,
            },
        ) {
            Ok(d) => Some(d),
            Err(Error::InvalidArgument(why)) => {
                eprintln!("SKIPPED direct I/O test: {why}");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn conformance_with_direct_io() {
        let dir = tempfile::tempdir().unwrap();
        let Some(dev) = direct_device(dir.path(), (8 << 20) + 1000) else {
            return;
        };
        assert!(dev.is_direct());
        assert_eq!(
            dev.len(),
            8 << 20,
            "a partial last sector is not part of the device"
        );
        super::super::conformance::run(&dev);
    }

    #[test]
    fn direct_io_handles_every_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let Some(dev) = direct_device(dir.path(), 4 << 20) else {
            return;
        };
        // A byte model of the device; writes of assorted sizes at assorted offsets (inside a
        // sector, across sector edges, longer than the bounce buffer) must all land exactly.
        let mut model = vec![0u8; 4 << 20];
        let mut x = 0x1234_5678u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..200u64 {
            let len = match i % 4 {
                0 => (next() % 16) as usize + 1,
                1 => (next() % 20_000) as usize + 1,
                2 => 4096,
                _ => BOUNCE + (next() % 9000) as usize,
            };
            let off = next() % (model.len() - len) as u64;
            let data: Vec<u8> = (0..len).map(|j| (j as u64 ^ i) as u8).collect();
            dev.write_at(&data, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
            let mut back = vec![0u8; len];
            dev.read_at(&mut back, off).unwrap();
            assert!(back == data, "write {i} of {len} bytes at {off} reads back");
        }
        let mut all = vec![0u8; model.len()];
        dev.read_at(&mut all, 0).unwrap();
        assert!(all == model, "no write disturbed bytes outside its range");
    }
}
