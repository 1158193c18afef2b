//! On-disk constants and the page envelope every metadata page shares.
//!
//! The device is cut into 4 KiB units. Units 0 and 1 hold the two superblocks; every other
//! unit is allocated through the space map as a metadata page or as part of a data block
//! (an aligned run of `block_size / 4096` units). See docs/format.md.

mod superblock;

pub(crate) use superblock::{Superblock, MAX_HEARTBEAT_MS, MIN_HEARTBEAT_MS};

use crate::error::{Error, Result};

/// Size of a metadata page and of the space map's allocation unit.
pub const PAGE_SIZE: usize = 4096;
/// The newest on-disk format version this build reads and writes. Version 2: the catalog
/// is a B+tree. Version 3 is version 2 with data checksums in the block map values; a pool
/// without data checksums is still written as version 2, so older builds go on opening it,
/// and refuse (by version) a pool whose map values they would misread.
pub const FORMAT_VERSION: u32 = 3;
/// The version of a pool without data checksums (see [`FORMAT_VERSION`]).
pub(crate) const FORMAT_VERSION_PLAIN: u32 = 2;
/// Bytes of the common page header.
pub(crate) const HEADER_LEN: usize = 32;
/// Units holding the superblocks (slot = generation % 2).
pub(crate) const SUPERBLOCK_UNITS: u64 = 2;

/// Smallest and largest pool block size.
pub const MIN_BLOCK_SIZE: u32 = 4096;
/// See [`MIN_BLOCK_SIZE`].
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
/// Default block size: 4 KiB keeps copy-on-write of a 4 KiB guest write a single 4 KiB write
/// (see docs/architecture.md for the measurements behind the choice).
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Largest pool, in bytes (64 TiB). The space map keeps a small descriptor per 4 MiB of pool
/// in memory (about 10 MiB per TiB), so the bound keeps that memory bounded too.
pub const MAX_POOL_BYTES: u64 = 64 << 40;
pub(crate) const MAX_UNITS: u64 = MAX_POOL_BYTES / PAGE_SIZE as u64;
/// Largest volume, in bytes (1 EiB). Volumes are thin, so this is far above any pool; the
/// bound exists so that every byte and block computation on offsets inside a volume (block
/// number + 1, times the block size; offset + length) fits in a `u64` with room to spare,
/// and so that every NBD client (which keep sizes as signed 64-bit numbers) can address it.
/// Sizes need not be multiples of 512: the engine is byte-granular, so an image of any
/// length imports and exports unchanged; NBD advertises the exact size.
pub const MAX_VOLUME_BYTES: u64 = 1 << 60;

/// Refuses a volume size the engine cannot address (see [`MAX_VOLUME_BYTES`]).
pub(crate) fn check_volume_size(size: u64) -> Result<()> {
    if size > MAX_VOLUME_BYTES {
        return Err(Error::InvalidArgument(format!(
            "volume size {size} bytes is larger than the largest volume, {MAX_VOLUME_BYTES} bytes (1 EiB)"
        )));
    }
    Ok(())
}

/// The kind of a metadata page, stored as its magic number. The magic is part of the
/// checksummed bytes, so a page of one kind can never validate as another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum PageKind {
    Superblock = u32::from_le_bytes(*b"SVSB"),
    MapLeaf = u32::from_le_bytes(*b"SVML"),
    MapBranch = u32::from_le_bytes(*b"SVMB"),
    SpaceLeaf = u32::from_le_bytes(*b"SVSL"),
    SpaceIndex = u32::from_le_bytes(*b"SVSI"),
    Catalog = u32::from_le_bytes(*b"SVCT"),
    CatalogLeaf = u32::from_le_bytes(*b"SVCL"),
    CatalogBranch = u32::from_le_bytes(*b"SVCB"),
    CatalogBuffer = u32::from_le_bytes(*b"SVCW"),
    /// Pages of the generic tree's own tests.
    #[cfg(test)]
    TestLeaf = u32::from_le_bytes(*b"SVTL"),
    #[cfg(test)]
    TestBranch = u32::from_le_bytes(*b"SVTB"),
}

impl PageKind {
    pub(crate) const fn name(self) -> &'static str {
        match self {
            PageKind::Superblock => "superblock",
            PageKind::MapLeaf => "block map leaf",
            PageKind::MapBranch => "block map branch",
            PageKind::SpaceLeaf => "space map leaf",
            PageKind::SpaceIndex => "space map index",
            PageKind::Catalog => "catalog page",
            PageKind::CatalogLeaf => "catalog leaf",
            PageKind::CatalogBranch => "catalog branch",
            PageKind::CatalogBuffer => "catalog write buffer",
            #[cfg(test)]
            PageKind::TestLeaf => "test leaf",
            #[cfg(test)]
            PageKind::TestBranch => "test branch",
        }
    }

    fn from_magic(m: u32) -> Option<PageKind> {
        [
            PageKind::Superblock,
            PageKind::MapLeaf,
            PageKind::MapBranch,
            PageKind::SpaceLeaf,
            PageKind::SpaceIndex,
            PageKind::Catalog,
            PageKind::CatalogLeaf,
            PageKind::CatalogBranch,
            PageKind::CatalogBuffer,
            #[cfg(test)]
            PageKind::TestLeaf,
            #[cfg(test)]
            PageKind::TestBranch,
        ]
        .into_iter()
        .find(|k| *k as u32 == m)
    }
}

/// A page buffer.
pub(crate) type Page = [u8; PAGE_SIZE];

pub(crate) fn new_page() -> Box<Page> {
    Box::new([0u8; PAGE_SIZE])
}

fn page_crc(page: &Page) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&page[0..4]);
    h.update(&page[8..]);
    h.finalize()
}

/// Stamps kind, location and generation into the header and seals the page with its checksum.
pub(crate) fn seal(page: &mut Page, kind: PageKind, location: u64, generation: u64) {
    page[0..4].copy_from_slice(&(kind as u32).to_le_bytes());
    page[8..16].copy_from_slice(&location.to_le_bytes());
    page[16..24].copy_from_slice(&generation.to_le_bytes());
    let crc = page_crc(page);
    page[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Verifies a page read from `location`: checksum, kind, and that it was written for this
/// location (a misdirected or stale write fails here). Returns the page's generation.
pub(crate) fn verify(page: &Page, expected: &[PageKind], location: u64) -> Result<(PageKind, u64)> {
    let want_name = expected.first().map(|k| k.name()).unwrap_or("page");
    let crc = u32::from_le_bytes(page[4..8].try_into().unwrap());
    if crc != page_crc(page) {
        return Err(Error::corrupt(want_name, location, "checksum mismatch"));
    }
    let magic = u32::from_le_bytes(page[0..4].try_into().unwrap());
    let kind = PageKind::from_magic(magic)
        .ok_or_else(|| Error::corrupt(want_name, location, format!("unknown magic {magic:#x}")))?;
    if !expected.contains(&kind) {
        return Err(Error::corrupt(
            want_name,
            location,
            format!("found a {} instead", kind.name()),
        ));
    }
    let loc = get_u64(page, 8);
    if loc != location {
        return Err(Error::corrupt(
            want_name,
            location,
            format!("page was written for location {loc}"),
        ));
    }
    Ok((kind, get_u64(page, 16)))
}

pub(crate) fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
pub(crate) fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
pub(crate) fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
pub(crate) fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_page_verifies_and_any_flip_is_caught() {
        let mut p = new_page();
        p[100] = 7;
        seal(&mut p, PageKind::MapLeaf, 42, 9);
        assert_eq!(
            verify(&p, &[PageKind::MapLeaf], 42).unwrap(),
            (PageKind::MapLeaf, 9)
        );
        assert!(
            verify(&p, &[PageKind::MapLeaf], 43).is_err(),
            "wrong location"
        );
        assert!(verify(&p, &[PageKind::Catalog], 42).is_err(), "wrong kind");
        for byte in [0usize, 4, 8, 16, 24, 100, 4095] {
            let mut q = p.clone();
            q[byte] ^= 0x10;
            assert!(
                verify(&q, &[PageKind::MapLeaf], 42).is_err(),
                "flip at {byte}"
            );
        }
    }
}
