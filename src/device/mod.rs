//! The device layer: where bytes meet storage. Everything above talks to a [`BlockDevice`]
//! and never to a file or block device directly, so tests can put a crash-simulating or
//! fault-injecting device underneath the real engine.

mod checked;
#[cfg(any(test, feature = "testing"))]
mod counting;
#[cfg(any(test, feature = "testing"))]
mod crash;
#[cfg(any(test, feature = "testing"))]
mod fault;
mod file;
mod memory;
mod probe;

pub(crate) use checked::Checked;
#[cfg(any(test, feature = "testing"))]
pub use counting::CountingDevice;
#[cfg(any(test, feature = "testing"))]
pub use crash::{CrashDevice, CrashPoint, History};
#[cfg(any(test, feature = "testing"))]
pub use fault::{FaultDevice, FaultKind};
pub use file::{data_extent, FileDevice, FileOptions};
pub use memory::MemoryDevice;
pub use probe::existing_format;

use crate::error::Result;

/// Positional storage with a durability barrier, like a disk with a volatile write cache.
///
/// `write_at` makes data visible to later reads; only `flush` makes completed writes durable.
/// Implementations must be safe to call from many threads at once.
pub trait BlockDevice: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`. Reading past the end is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes all of `buf` at `offset`. Writing past the end is an error.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Size in bytes.
    fn len(&self) -> u64;
    /// True when the device has no bytes at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether [`BlockDevice::discard`] releases space (punch hole, BLKDISCARD).
    fn supports_discard(&self) -> bool {
        false
    }
    /// Hints that a range holds nothing of value; its contents become unspecified.
    /// A device without the capability does nothing.
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    /// Reserves the host's space for `len` bytes at `offset` (`fallocate`), so writes there
    /// cannot fail for want of room on a thin filesystem. A device without the capability
    /// refuses with a typed error.
    fn preallocate(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Err(crate::Error::InvalidArgument(
            "this device cannot reserve space (only pool files can be preallocated)".into(),
        ))
    }
    /// Makes the device at least `new_len` bytes long; the new bytes read as zeros. A device
    /// without the capability refuses with a typed error.
    fn grow(&self, new_len: u64) -> Result<()> {
        Err(crate::Error::InvalidArgument(format!(
            "this device cannot grow (asked for {new_len} bytes)"
        )))
    }
}

pub(crate) fn check_range(what: &'static str, offset: u64, len: usize, size: u64) -> Result<()> {
    let end = offset.checked_add(len as u64);
    match end {
        Some(end) if end <= size => Ok(()),
        _ => Err(crate::Error::io(
            what,
            offset,
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{len} bytes at {offset} exceed device size {size}"),
            ),
        )),
    }
}

#[cfg(test)]
pub(crate) mod conformance {
    //! One suite every `BlockDevice` implementation must pass.
    use super::BlockDevice;

    pub fn run(dev: &dyn BlockDevice) {
        let len = dev.len();
        assert!(len >= 1 << 20, "conformance needs at least 1 MiB");
        // Fresh devices read as zeros.
        let mut buf = vec![0xAAu8; 8192];
        dev.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "fresh device must read zeros");
        // Writes are visible to reads at any alignment.
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        dev.write_at(&data, 4093).unwrap();
        let mut back = vec![0u8; data.len()];
        dev.read_at(&mut back, 4093).unwrap();
        assert_eq!(back, data);
        dev.flush().unwrap();
        // The last byte is addressable, one past it is not.
        dev.write_at(&[9], len - 1).unwrap();
        let mut one = [0u8; 1];
        dev.read_at(&mut one, len - 1).unwrap();
        assert_eq!(one, [9]);
        assert!(dev.write_at(&[1, 2], len - 1).is_err());
        assert!(dev.read_at(&mut [0u8; 2], len - 1).is_err());
        assert!(dev.read_at(&mut [0u8; 1], u64::MAX).is_err());
        // Discard never corrupts data outside its range.
        dev.write_at(&[5u8; 8192], 65536).unwrap();
        dev.discard(65536, 4096).unwrap();
        let mut after = vec![0u8; 4096];
        dev.read_at(&mut after, 65536 + 4096).unwrap();
        assert!(after.iter().all(|&b| b == 5));
        dev.flush().unwrap();
    }
}
