//! Regular files (created sparse) and raw block devices.

use super::{check_range, BlockDevice};
use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// A pool backed by a regular file or a raw block device (`/dev/sdX`, `/dev/loopN`, ...).
pub struct FileDevice {
    file: File,
    len: u64,
    block_device: bool,
}

impl FileDevice {
    /// Opens an existing file or block device read-write. A block device's size is read from
    /// the kernel (seek to end works for block devices, so no ioctl is needed).
    pub fn open(path: impl AsRef<Path>) -> Result<FileDevice> {
        let path = path.as_ref();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("open", 0, e))?;
        lock(&file, path)?;
        let meta = file.metadata().map_err(|e| Error::io("open", 0, e))?;
        let block_device = meta.file_type().is_block_device();
        let len = if block_device {
            file.seek(SeekFrom::End(0))
                .map_err(|e| Error::io("open", 0, e))?
        } else {
            meta.len()
        };
        Ok(FileDevice {
            file,
            len,
            block_device,
        })
    }

    /// Creates a new sparse file of `len` bytes; fails if `path` exists.
    pub fn create(path: impl AsRef<Path>, len: u64) -> Result<FileDevice> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path.as_ref())
            .map_err(|e| Error::io("create", 0, e))?;
        lock(&file, path.as_ref())?;
        file.set_len(len).map_err(|e| Error::io("create", 0, e))?;
        Ok(FileDevice {
            file,
            len,
            block_device: false,
        })
    }

    /// True when this is a raw block device rather than a regular file.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }
}

impl BlockDevice for FileDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range("read", offset, buf.len(), self.len)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io("read", offset, e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range("write", offset, buf.len(), self.len)?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| Error::io("write", offset, e))
    }

    fn flush(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io("flush", 0, e))
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range("discard", offset, len as usize, self.len)?;
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

/// Takes an exclusive advisory lock so two processes never open one pool: each would
/// allocate from its own idea of free space and overwrite the other's blocks.
fn lock(file: &File, path: &Path) -> Result<()> {
    // SAFETY: flock takes the fd of a file that stays open for the call; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(Error::InUse(path.display().to_string()));
    }
    Err(Error::io("lock", 0, err))
}

/// `_IO(0x12, 119)` from linux/fs.h.
const BLKDISCARD: libc::c_ulong = 0x1277;

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
            matches!(FileDevice::open(&path), Err(Error::InUse(_))),
            "a second opener is refused while the first holds the device"
        );
        drop(dev);
        let reopened = FileDevice::open(&path).unwrap();
        assert_eq!(reopened.len(), 8 << 20);
        assert!(!reopened.is_block_device());
    }
}
