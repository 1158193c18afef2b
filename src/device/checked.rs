//! The device as the engine sees it: the first failed write or flush is latched here, once,
//! for every path that reaches the device (commits, in-place writes outside the engine
//! lock, growing), and every later write or flush is refused without touching the device.
//! A failed write leaves the device's contents unknown (a torn page, a half-written block),
//! and a failed flush leaves unknown what reached the media; nothing may then be built on
//! top of that state, least of all a superblock. Reads still pass: they change nothing.
//! One failure is not latched: a write the host filesystem refused for want of room
//! (ENOSPC, EDQUOT) is `Error::HostFull`, since none of it entered the page cache to be lost
//! later; the engine only writes where nothing committed lives before its commit point, so
//! it gives the refused operation back and goes on (see `Engine::apply_write`).
//! (redb's checked backend latches I/O errors the same way.)

use super::BlockDevice;
use crate::error::{Error, Result};
use std::sync::{Arc, OnceLock};

pub(crate) struct Checked {
    inner: Arc<dyn BlockDevice>,
    /// What failed first; set once.
    failure: OnceLock<String>,
    /// Every write, flush, discard and grow is refused (a pool opened read-only).
    read_only: bool,
}

impl Checked {
    pub(crate) fn new(inner: Arc<dyn BlockDevice>) -> Checked {
        Checked {
            inner,
            failure: OnceLock::new(),
            read_only: false,
        }
    }

    /// A device nothing is written to: the guarantee of a read-only open, kept here at the
    /// boundary rather than by every caller.
    pub(crate) fn read_only(inner: Arc<dyn BlockDevice>) -> Checked {
        Checked {
            read_only: true,
            ..Checked::new(inner)
        }
    }

    pub(crate) fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The first write or flush that failed, if one did.
    pub(crate) fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    fn refuse_if_failed(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly("the pool (opened read-only)".into()));
        }
        match self.failure() {
            Some(why) => Err(Error::Poisoned(why.to_string())),
            None => Ok(()),
        }
    }

    fn latch<T>(&self, what: impl FnOnce() -> String, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            let _ = self.failure.set(format!("{} failed: {e}", what()));
        }
        r
    }
}

impl BlockDevice for Checked {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.refuse_if_failed()?;
        let r = self.inner.write_at(buf, offset);
        if let Err(Error::Io { source, .. }) = &r {
            // A write the filesystem refused for want of room is not latched: no data of it
            // entered the page cache to be lost later (unlike a failed flush), so nothing
            // unknown is left behind but the refused range itself, and the engine only
            // writes where nothing committed lives or where the caller accepts that (see
            // `Error::HostFull`).
            if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
                return Err(Error::HostFull {
                    op: "write",
                    offset,
                });
            }
        }
        self.latch(
            || format!("write of {} bytes at byte {offset}", buf.len()),
            r,
        )
    }

    fn flush(&self) -> Result<()> {
        self.refuse_if_failed()?;
        let r = self.inner.flush();
        self.latch(|| "flush".to_string(), r)
    }

    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn supports_discard(&self) -> bool {
        self.inner.supports_discard()
    }

    /// Best effort, and not latched: a discard only releases units nothing references, and
    /// a failed one leaves them holding old bytes, which nothing reads.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.refuse_if_failed()?;
        self.inner.discard(offset, len)
    }

    /// Not latched: a failed reservation changes no byte.
    fn preallocate(&self, offset: u64, len: u64) -> Result<()> {
        self.refuse_if_failed()?;
        self.inner.preallocate(offset, len)
    }

    /// Not latched: a failed grow leaves the device as it was (the new size becomes durable
    /// only with the flush that follows, which is).
    fn grow(&self, new_len: u64) -> Result<()> {
        self.refuse_if_failed()?;
        self.inner.grow(new_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{FaultDevice, FaultKind, MemoryDevice};

    /// The first failed write is latched: later writes and flushes are refused without
    /// reaching the device, naming what failed; reads still work.
    #[test]
    fn the_first_failure_is_latched_and_refuses_later_writes() {
        let fault = Arc::new(FaultDevice::new(Arc::new(MemoryDevice::new(1 << 20))));
        let dev = Checked::new(fault.clone());
        dev.write_at(&[1; 4096], 0).unwrap();
        dev.flush().unwrap();
        assert!(dev.failure().is_none());
        fault.fail_nth(FaultKind::Write, 0, false);
        assert!(matches!(
            dev.write_at(&[2; 4096], 4096),
            Err(Error::Io { .. })
        ));
        let why = dev.failure().unwrap().to_string();
        assert!(why.contains("write of 4096 bytes at byte 4096"), "{why}");
        let writes = fault.seen(FaultKind::Write);
        assert!(matches!(dev.write_at(&[3; 4096], 8192), Err(Error::Poisoned(w)) if w == why));
        assert!(matches!(dev.flush(), Err(Error::Poisoned(_))));
        assert_eq!(
            fault.seen(FaultKind::Write),
            writes,
            "nothing reached the device"
        );
        assert_eq!(fault.seen(FaultKind::Flush), 0, "nor a flush");
        let mut b = [0u8; 4096];
        dev.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [1; 4096]);
    }
}
