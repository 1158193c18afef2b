//! A wrapper that fails chosen I/Os, to prove every error path returns a typed error and
//! leaves committed data alone.

use super::BlockDevice;
use crate::error::{Error, Result};
use parking_lot::Mutex;
use std::sync::Arc;

/// Which kind of I/O to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// `read_at`.
    Read,
    /// `write_at`.
    Write,
    /// `flush`.
    Flush,
    /// `discard`.
    Discard,
}

/// Fails the Nth read, write or flush (counting from 0 after [`FaultDevice::fail_nth`]), and
/// optionally every later one of that kind.
pub struct FaultDevice {
    inner: Arc<dyn BlockDevice>,
    plan: Mutex<Plan>,
}

#[derive(Default)]
struct Plan {
    armed: Option<(FaultKind, u64, bool)>,
    /// The OS error an injected failure carries (`None`: a plain I/O error).
    errno: Option<i32>,
    seen: [u64; 4],
    fired: u64,
}

impl FaultDevice {
    /// Wraps `inner`; nothing fails until armed.
    pub fn new(inner: Arc<dyn BlockDevice>) -> FaultDevice {
        FaultDevice {
            inner,
            plan: Mutex::new(Plan::default()),
        }
    }

    /// Fails the `n`th I/O of `kind` from now on; with `sticky`, every later one too.
    pub fn fail_nth(&self, kind: FaultKind, n: u64, sticky: bool) {
        let mut p = self.plan.lock();
        p.armed = Some((kind, n, sticky));
        p.errno = None;
        p.seen = [0; 4];
    }

    /// As [`FaultDevice::fail_nth`], the failure carrying OS error `errno` (for example
    /// `libc::ENOSPC`, a host filesystem that is full).
    pub fn fail_nth_with(&self, kind: FaultKind, n: u64, sticky: bool, errno: i32) {
        self.fail_nth(kind, n, sticky);
        self.plan.lock().errno = Some(errno);
    }

    /// Stops failing.
    pub fn disarm(&self) {
        self.plan.lock().armed = None;
    }

    /// How many injected failures fired so far.
    pub fn fired(&self) -> u64 {
        self.plan.lock().fired
    }

    /// I/Os of `kind` seen since the last arming.
    pub fn seen(&self, kind: FaultKind) -> u64 {
        self.plan.lock().seen[kind as usize]
    }

    fn gate(&self, kind: FaultKind, offset: u64) -> Result<()> {
        let mut p = self.plan.lock();
        let count = p.seen[kind as usize];
        p.seen[kind as usize] += 1;
        if let Some((k, n, sticky)) = p.armed {
            if k == kind && (count == n || (sticky && count > n)) {
                p.fired += 1;
                return Err(Error::io(
                    match kind {
                        FaultKind::Read => "read",
                        FaultKind::Write => "write",
                        FaultKind::Flush => "flush",
                        FaultKind::Discard => "discard",
                    },
                    offset,
                    match p.errno {
                        Some(errno) => std::io::Error::from_raw_os_error(errno),
                        None => std::io::Error::other("injected fault"),
                    },
                ));
            }
        }
        Ok(())
    }
}

impl BlockDevice for FaultDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.gate(FaultKind::Read, offset)?;
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.gate(FaultKind::Write, offset)?;
        self.inner.write_at(buf, offset)
    }

    fn flush(&self) -> Result<()> {
        self.gate(FaultKind::Flush, 0)?;
        self.inner.flush()
    }

    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn supports_discard(&self) -> bool {
        self.inner.supports_discard()
    }

    /// Forwarded, and a fault point like the others: the engine treats a failed discard as
    /// harmless (the units stay allocated-looking on the device, nothing is lost).
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.gate(FaultKind::Discard, offset)?;
        self.inner.discard(offset, len)
    }

    /// Not a fault point: a grow is tested through the writes and flushes of the commit
    /// that follows it.
    fn grow(&self, new_len: u64) -> Result<()> {
        self.inner.grow(new_len)
    }
}
