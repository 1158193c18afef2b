//! The handles users hold: a writable [`Volume`], a read-only [`Snapshot`], and a
//! `std::io` view of a volume. Each points at the pool's shared state ([`crate::io::Handle`]),
//! where the I/O path lives.

use crate::error::Result;
use crate::io::{Handle, Target};
use std::io::{self, Read, Seek, SeekFrom, Write};

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume").field("id", &self.id()).finish()
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").field("id", &self.id()).finish()
    }
}

/// A writable thin volume. Cheap to clone; `Send + Sync`, so many threads may do I/O at once.
#[derive(Clone)]
pub struct Volume {
    pub(crate) h: Handle,
    pub(crate) id: u128,
}

impl Volume {
    /// The volume's stable id.
    pub fn id(&self) -> crate::VolumeId {
        crate::VolumeId::from_u128(self.id)
    }

    /// The volume's current name.
    pub fn name(&self) -> Result<String> {
        self.h
            .with(|e| e.target(Target::Volume(self.id)).map(|t| t.2))
    }

    /// Logical size in bytes.
    pub fn len(&self) -> Result<u64> {
        self.h
            .with(|e| e.target(Target::Volume(self.id)).map(|t| t.1))
    }

    /// True when the volume has size 0.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Reads exactly `buf.len()` bytes at `offset`. Never-written ranges read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.h.read(Target::Volume(self.id), offset, buf)
    }

    /// Writes all of `data` at `offset`. Visible to reads on return; durable after `flush`.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.h.write(self.id, offset, data)
    }

    /// Where the data block holding byte `offset` lives on the pool's device: its first
    /// byte there, or `None` for a hole (the bytes read as zeros). For tools that check or
    /// repair media, and for what [`crate::Pool::scrub`] reports.
    pub fn physical_block(&self, offset: u64) -> Result<Option<u64>> {
        self.h
            .with(|e| e.physical_block(Target::Volume(self.id), offset))
    }

    /// Makes a range read as zeros and returns its whole blocks to the pool.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.h.with(|e| e.discard(self.id, offset, len))
    }

    /// Makes a range read as zeros (as [`Volume::discard`]: zeros need no space).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.discard(offset, len)
    }

    /// Makes every completed write durable (one commit).
    pub fn flush(&self) -> Result<()> {
        self.h.flush()
    }

    /// A `std::io::{Read, Write, Seek}` view with its own cursor.
    pub fn io(&self) -> VolumeIo {
        VolumeIo {
            vol: self.clone(),
            pos: 0,
        }
    }
}

/// A read-only snapshot.
#[derive(Clone)]
pub struct Snapshot {
    pub(crate) h: Handle,
    pub(crate) id: u128,
}

impl Snapshot {
    /// The snapshot's stable 128-bit id (kept across send/receive).
    pub fn id(&self) -> crate::SnapshotId {
        crate::SnapshotId::from_u128(self.id)
    }

    /// `volume@snapshot`.
    pub fn name(&self) -> Result<String> {
        self.h
            .with(|e| e.target(Target::Snapshot(self.id)).map(|t| t.2))
    }

    /// Logical size in bytes (the volume's size when the snapshot was taken).
    pub fn len(&self) -> Result<u64> {
        self.h
            .with(|e| e.target(Target::Snapshot(self.id)).map(|t| t.1))
    }

    /// True when the snapshot has size 0.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.h.read(Target::Snapshot(self.id), offset, buf)
    }

    /// Where the data block holding byte `offset` lives on the pool's device (see
    /// [`Volume::physical_block`]).
    pub fn physical_block(&self, offset: u64) -> Result<Option<u64>> {
        self.h
            .with(|e| e.physical_block(Target::Snapshot(self.id), offset))
    }

    /// Reads `buf.len()` bytes at `offset` and returns their CRC-32, built from the pool's
    /// block checksums where it has them (see `Handle::read_crc`).
    pub(crate) fn read_at_crc(
        &self,
        buf: &mut [u8],
        offset: u64,
        shift: &crate::checksum::Shift,
    ) -> Result<u32> {
        self.h
            .read_crc(Target::Snapshot(self.id), offset, buf, shift)
    }

    /// Reads the mapped parts of `buf.len()` bytes at `offset`, leaving the bytes of holes
    /// untouched, and appends the ranges of `buf` that were read to `filled` (see
    /// `Handle::read_data`).
    pub(crate) fn read_data_at(
        &self,
        buf: &mut [u8],
        offset: u64,
        filled: &mut Vec<std::ops::Range<usize>>,
    ) -> Result<()> {
        self.h
            .read_data(Target::Snapshot(self.id), offset, buf, filled)
    }
}

/// `std::io` adapter for a [`Volume`].
#[derive(Debug)]
pub struct VolumeIo {
    vol: Volume,
    pos: u64,
}

impl Read for VolumeIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let len = self.vol.len()?;
        let n = (len.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        self.vol.read_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for VolumeIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let len = self.vol.len()?;
        let n = (len.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "end of volume"));
        }
        self.vol.write_at(&buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(self.vol.flush()?)
    }
}

impl Seek for VolumeIo {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let len = self.vol.len()?;
        let new = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos =
            new.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before start"))?;
        Ok(self.pos)
    }
}
