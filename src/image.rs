//! Raw images into volumes: [`Pool::import`] reads any `Read` (a file, a block device, a pipe)
//! into a new volume that is invisible until the last byte is in and durable.
//!
//! The volume is built as a hidden volume (the same mechanism receive uses), so an import that
//! fails, is interrupted or is killed leaves nothing visible: a failure removes it at once, and
//! a process that dies leaves it for the next open to remove. Blocks that read as zeros are
//! not written, so a sparse image stays thin.

use crate::error::{Error, Result};
use crate::format::MAX_VOLUME_BYTES;
use crate::pool::Pool;
use crate::volume::Volume;
use std::io::Read;

/// Bytes read and written per step: bounds the memory of an import whatever the image size.
const STEP: usize = 1 << 20;

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImportStats {
    /// The new volume's id.
    pub volume_id: u128,
    /// The volume's size: the image's length.
    pub size: u64,
    /// Bytes written (everything but the blocks that read as zeros).
    pub data_bytes: u64,
}

/// The runs of `buf` that are not all zeros, at `granule` granularity, as byte ranges:
/// what an image copy writes so that zeros stay unallocated (import) or holes (export).
pub fn data_runs(buf: &[u8], granule: usize) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, g) in buf.chunks(granule.max(1)).enumerate() {
        if g.iter().all(|&b| b == 0) {
            continue;
        }
        let (s, e) = (i * granule, i * granule + g.len());
        match runs.last_mut() {
            Some(r) if r.end == s => r.end = e,
            _ => runs.push(s..e),
        }
    }
    runs
}

/// Fills `buf` from `r` as far as the input goes; returns the bytes read (less than
/// `buf.len()` only at the end of the input).
pub(crate) fn read_full(r: &mut dyn Read, buf: &mut [u8], at: u64) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("import read", at + n as u64, e)),
        }
    }
    Ok(n)
}

impl Pool {
    /// Creates volume `name` from the raw image `input`. With `size`, exactly that many bytes
    /// are read and an input that ends sooner or goes on longer is refused; without it the
    /// input is read to its end (a pipe) and its length is the volume's size. The volume
    /// becomes visible, durable, in one commit after the last byte; on any error the pool is
    /// left as it was.
    pub fn import(
        &self,
        name: &str,
        input: &mut dyn Read,
        size: Option<u64>,
    ) -> Result<ImportStats> {
        self.import_with(name, size, |vol| self.fill(vol, input, size))
    }

    /// As [`Pool::import`] from a regular file, reading only its data: the holes the
    /// filesystem reports (`SEEK_DATA`/`SEEK_HOLE`) are skipped without being read, so a
    /// sparse 64 GiB image holding 1 GiB costs 1 GiB of reading, not 64 (a filesystem that
    /// cannot tell is read whole). The volume's size is the file's length.
    pub fn import_file(&self, name: &str, file: &std::fs::File) -> Result<ImportStats> {
        let len = file
            .metadata()
            .map_err(|e| Error::io("import stat", 0, e))?
            .len();
        self.import_with(name, Some(len), |vol| self.fill_extents(vol, file, len))
    }

    /// The import around `fill`, which copies the image into the hidden volume it is
    /// given and returns (image length, bytes written).
    fn import_with(
        &self,
        name: &str,
        size: Option<u64>,
        fill: impl FnOnce(&Volume) -> Result<(u64, u64)>,
    ) -> Result<ImportStats> {
        crate::catalog::validate_name(name)?;
        if let Some(s) = size {
            crate::format::check_volume_size(s)?;
        }
        if self.volume(name).is_ok() {
            return Err(Error::AlreadyExists {
                kind: "volume",
                name: name.into(),
                conflict: String::new(),
            });
        }
        // An image of unknown length starts at the largest size and is cut to its length at
        // the end; nothing past the data is ever mapped, so that costs nothing.
        let hidden = self.with(|e| e.add_hidden(0, size.unwrap_or(MAX_VOLUME_BYTES)))?;
        let vol = self.volume_handle(hidden);
        let result = fill(&vol).and_then(|(len, data_bytes)| {
            if size.is_none() {
                self.resize_hidden(hidden, len)?;
            }
            self.with(|e| e.reveal_hidden(hidden, name))?;
            Ok(ImportStats {
                volume_id: hidden,
                size: len,
                data_bytes,
            })
        });
        drop(vol);
        if result.is_err() {
            self.abandon_hidden(hidden);
        }
        result
    }

    /// Copies the data extents of `file` (`len` bytes) into the hidden volume; returns
    /// (image length, bytes written).
    fn fill_extents(&self, vol: &Volume, file: &std::fs::File, len: u64) -> Result<(u64, u64)> {
        use std::os::unix::fs::FileExt;
        let granule = u64::from(self.block_size());
        let mut buf = vec![0u8; STEP];
        let (mut pos, mut data) = (0u64, 0u64);
        while pos < len {
            let Some((start, end)) = crate::device::data_extent(file, pos, len)
                .map_err(|e| Error::io("import seek", pos, e))?
            else {
                break;
            };
            // From the start of its block, so blocks are written whole where they can be.
            let mut off = (start - start % granule).max(pos);
            while off < end {
                let want = (end - off).min(STEP as u64) as usize;
                file.read_exact_at(&mut buf[..want], off)
                    .map_err(|e| Error::io("import read", off, e))?;
                for r in data_runs(&buf[..want], granule as usize) {
                    vol.write_at(&buf[r.clone()], off + r.start as u64)?;
                    data += r.len() as u64;
                }
                off += want as u64;
            }
            pos = end;
        }
        vol.flush()?;
        Ok((len, data))
    }

    /// Copies the input into the hidden volume; returns (image length, bytes written).
    fn fill(&self, vol: &Volume, input: &mut dyn Read, size: Option<u64>) -> Result<(u64, u64)> {
        let granule = self.block_size() as usize;
        let limit = size.unwrap_or(MAX_VOLUME_BYTES);
        let mut buf = vec![0u8; STEP];
        let (mut off, mut data) = (0u64, 0u64);
        loop {
            let want = (limit - off).min(STEP as u64) as usize;
            let n = read_full(input, &mut buf[..want], off)?;
            for r in data_runs(&buf[..n], granule) {
                vol.write_at(&buf[r.clone()], off + r.start as u64)?;
                data += r.len() as u64;
            }
            off += n as u64;
            if n < want {
                if let Some(s) = size {
                    return Err(Error::InvalidArgument(format!(
                        "the image ended after {off} bytes; {s} were expected"
                    )));
                }
                break;
            }
            if off == limit {
                let mut extra = [0u8; 1];
                if read_full(input, &mut extra, off)? > 0 {
                    return Err(Error::InvalidArgument(match size {
                        Some(s) => format!("the image is longer than the {s} bytes expected"),
                        None => format!("the image is longer than {MAX_VOLUME_BYTES} bytes"),
                    }));
                }
                break;
            }
        }
        vol.flush()?;
        Ok((off, data))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn runs() {
        let mut b = vec![0u8; 16];
        b[5] = 1;
        b[6] = 1;
        b[13] = 1;
        assert_eq!(super::data_runs(&b, 4), vec![4..8, 12..16]);
        b[9] = 1;
        assert_eq!(super::data_runs(&b, 4), vec![4..16]);
        assert_eq!(super::data_runs(&b[..6], 4), vec![4..6]);
    }
}
