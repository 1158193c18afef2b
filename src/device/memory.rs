use super::{check_range, BlockDevice};
use crate::error::Result;
use parking_lot::RwLock;

/// A device in RAM: for tests, fuzzing and throwaway pools. `flush` is a no-op.
pub struct MemoryDevice {
    bytes: RwLock<Vec<u8>>,
}

impl MemoryDevice {
    /// A zero-filled device of `len` bytes.
    pub fn new(len: u64) -> MemoryDevice {
        MemoryDevice::from_image(vec![0; len as usize])
    }

    /// A device holding `image` (for example a pool image to open).
    pub fn from_image(image: Vec<u8>) -> MemoryDevice {
        MemoryDevice {
            bytes: RwLock::new(image),
        }
    }

    /// A copy of the whole device.
    pub fn image(&self) -> Vec<u8> {
        self.bytes.read().clone()
    }
}

impl BlockDevice for MemoryDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let bytes = self.bytes.read();
        check_range("read", offset, buf.len(), bytes.len() as u64)?;
        let o = offset as usize;
        buf.copy_from_slice(&bytes[o..o + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut bytes = self.bytes.write();
        check_range("write", offset, buf.len(), bytes.len() as u64)?;
        let o = offset as usize;
        bytes[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn len(&self) -> u64 {
        self.bytes.read().len() as u64
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn grow(&self, new_len: u64) -> Result<()> {
        let mut bytes = self.bytes.write();
        if new_len <= bytes.len() as u64 {
            return Ok(());
        }
        let too_big = || {
            crate::Error::InvalidArgument(format!("cannot grow a memory device to {new_len} bytes"))
        };
        let more = usize::try_from(new_len).map_err(|_| too_big())? - bytes.len();
        bytes.try_reserve_exact(more).map_err(|_| too_big())?;
        let len = bytes.len();
        bytes.resize(len + more, 0);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let mut bytes = self.bytes.write();
        check_range("discard", offset, len as usize, bytes.len() as u64)?;
        bytes[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn conformance() {
        super::super::conformance::run(&super::MemoryDevice::new(4 << 20));
    }
}
