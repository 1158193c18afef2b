//! The catalog: volumes, snapshots and the roots of their block maps. Small (a few hundred
//! bytes per entry), so it is rewritten whole, copy-on-write, into a chain of catalog pages in
//! the commits that change it.

use crate::error::{Error, Result};
use crate::format::{self, HEADER_LEN, PAGE_SIZE};
use std::collections::HashMap;

/// Catalog payload bytes per page (after the header and the next-page pointer).
pub(crate) const PAYLOAD: usize = PAGE_SIZE - HEADER_LEN - 8;
const CATALOG_VERSION: u32 = 1;
/// Longest volume or snapshot name in bytes.
pub const MAX_NAME: usize = 200;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VolumeRec {
    pub id: u128,
    pub name: String,
    pub size: u64,
    pub root: u64,
    pub created: u64,
    /// Snapshot or volume this one was cloned from.
    pub origin: Option<u128>,
    /// Generation of the newest snapshot or clone taken of this volume: blocks born at or
    /// before it may be in a snapshot, so they are never overwritten in place.
    pub frozen_gen: u64,
    /// Rollbacks as (generation done, generation of the snapshot returned to): a bookmark
    /// older than such a return no longer describes an ancestor of the volume.
    pub rollbacks: Vec<(u64, u64)>,
}

/// What is left of a deleted snapshot for incremental sends: its id and generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BookmarkRec {
    pub id: u128,
    pub volume: u128,
    pub volume_name: String,
    pub name: String,
    pub size: u64,
    pub generation: u64,
    pub created: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SnapshotRec {
    pub id: u128,
    pub volume: u128,
    /// The volume's name when the snapshot was taken (kept if the volume is deleted).
    pub volume_name: String,
    pub name: String,
    pub size: u64,
    pub root: u64,
    pub generation: u64,
    pub created: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Catalog {
    pub volumes: Vec<VolumeRec>,
    pub snapshots: Vec<SnapshotRec>,
    pub bookmarks: Vec<BookmarkRec>,
    /// Where each id was last found, so every I/O finds its volume or snapshot in O(1)
    /// however many a pool holds.
    positions: Positions,
}

/// Positions of volume and snapshot records by id. Only a hint: each use checks the record
/// at the remembered position and scans on a miss, so the many places that add, remove and
/// reorder records need not keep it up to date. Not part of the catalog's value.
#[derive(Clone, Debug, Default)]
struct Positions(std::cell::RefCell<HashMap<u128, usize>>);

impl PartialEq for Positions {
    fn eq(&self, _: &Positions) -> bool {
        true
    }
}

impl Eq for Positions {}

impl Positions {
    fn find<T>(&self, list: &[T], id: u128, id_of: impl Fn(&T) -> u128) -> Option<usize> {
        if let Some(&i) = self.0.borrow().get(&id) {
            if list.get(i).is_some_and(|r| id_of(r) == id) {
                return Some(i);
            }
        }
        let i = list.iter().position(|r| id_of(r) == id)?;
        let mut map = self.0.borrow_mut();
        // Ids of deleted records linger; start over before they outnumber the live ones.
        if map.len() > 2 * list.len() + 64 {
            map.clear();
        }
        map.insert(id, i);
        Some(i)
    }
}

/// Checks a volume or snapshot name: non-empty, at most [`MAX_NAME`] bytes, none of the
/// separators `@ # /`, no control characters.
/// One rule for volume, snapshot and bookmark names, as zfs has: 1 to 200 bytes of ASCII
/// letters, digits and `_ . : -`, not starting with `-` (it would read as an option) and not
/// `.` or `..`. So `vol@snap` and `vol#bm` always split one way, and a name is safe in a
/// path, a URL (NBD export names) and a shell word.
pub(crate) fn validate_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > MAX_NAME {
        "longer than 200 bytes"
    } else if name.starts_with('-') {
        "starts with '-'"
    } else if name == "." || name == ".." {
        "is '.' or '..'"
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
    {
        "may hold only letters, digits and _ . : - (no spaces, '/', '@' or '#')"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        name: name.to_string(),
        reason,
    })
}

struct Writer(Vec<u8>);
impl Writer {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u128(&mut self, v: u128) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s.as_bytes());
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}
impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| Error::corrupt("catalog", 0, "truncated"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn u128(&mut self) -> Result<u128> {
        Ok(u128::from_le_bytes(self.take(16)?.try_into().unwrap()))
    }
    fn str(&mut self) -> Result<String> {
        let n = self.u32()? as usize;
        if n > MAX_NAME {
            return Err(Error::corrupt("catalog", 0, format!("name of {n} bytes")));
        }
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| Error::corrupt("catalog", 0, "name is not UTF-8"))
    }
}

impl Catalog {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        w.u32(CATALOG_VERSION);
        w.u32(self.volumes.len() as u32);
        w.u32(self.snapshots.len() as u32);
        w.u32(self.bookmarks.len() as u32);
        for v in &self.volumes {
            w.u128(v.id);
            w.str(&v.name);
            w.u64(v.size);
            w.u64(v.root);
            w.u64(v.created);
            w.u128(v.origin.unwrap_or(0));
            w.u64(v.frozen_gen);
            w.u32(v.rollbacks.len() as u32);
            for (at, to) in &v.rollbacks {
                w.u64(*at);
                w.u64(*to);
            }
        }
        for s in &self.snapshots {
            w.u128(s.id);
            w.u128(s.volume);
            w.str(&s.volume_name);
            w.str(&s.name);
            w.u64(s.size);
            w.u64(s.root);
            w.u64(s.generation);
            w.u64(s.created);
        }
        for b in &self.bookmarks {
            w.u128(b.id);
            w.u128(b.volume);
            w.str(&b.volume_name);
            w.str(&b.name);
            w.u64(b.size);
            w.u64(b.generation);
            w.u64(b.created);
        }
        w.0
    }

    /// Decodes and validates the catalog: every root inside the pool, ids unique.
    pub(crate) fn decode(bytes: &[u8], total_units: u64) -> Result<Catalog> {
        let mut r = Reader { b: bytes, at: 0 };
        let version = r.u32()?;
        if version != CATALOG_VERSION {
            return Err(Error::corrupt("catalog", 0, format!("version {version}")));
        }
        let nv = r.u32()? as usize;
        let ns = r.u32()? as usize;
        let nb = r.u32()? as usize;
        // Each record takes at least 40 bytes: a count larger than the bytes is corrupt.
        if nv.saturating_add(ns).saturating_add(nb).saturating_mul(40) > bytes.len() {
            return Err(Error::corrupt(
                "catalog",
                0,
                "record counts exceed its size",
            ));
        }
        let root_ok =
            |root: u64| root == 0 || (format::SUPERBLOCK_UNITS..total_units).contains(&root);
        let mut c = Catalog::default();
        for _ in 0..nv {
            let v = VolumeRec {
                id: r.u128()?,
                name: r.str()?,
                size: r.u64()?,
                root: r.u64()?,
                created: r.u64()?,
                origin: Some(r.u128()?).filter(|&o| o != 0),
                frozen_gen: r.u64()?,
                rollbacks: Vec::new(),
            };
            let n = r.u32()? as usize;
            if n.saturating_mul(16) > bytes.len() {
                return Err(Error::corrupt(
                    "catalog",
                    0,
                    "rollback count exceeds its size",
                ));
            }
            let mut v = v;
            for _ in 0..n {
                v.rollbacks.push((r.u64()?, r.u64()?));
            }
            if !root_ok(v.root) {
                return Err(Error::corrupt(
                    "catalog",
                    0,
                    format!("volume {:?} root {}", v.name, v.root),
                ));
            }
            if v.size > format::MAX_VOLUME_BYTES {
                return Err(Error::corrupt(
                    "catalog",
                    0,
                    format!("volume {:?} size {}", v.name, v.size),
                ));
            }
            c.volumes.push(v);
        }
        for _ in 0..ns {
            let s = SnapshotRec {
                id: r.u128()?,
                volume: r.u128()?,
                volume_name: r.str()?,
                name: r.str()?,
                size: r.u64()?,
                root: r.u64()?,
                generation: r.u64()?,
                created: r.u64()?,
            };
            if !root_ok(s.root) || s.size > format::MAX_VOLUME_BYTES {
                return Err(Error::corrupt(
                    "catalog",
                    0,
                    format!("snapshot {:?} root {} size {}", s.name, s.root, s.size),
                ));
            }
            c.snapshots.push(s);
        }
        for _ in 0..nb {
            c.bookmarks.push(BookmarkRec {
                id: r.u128()?,
                volume: r.u128()?,
                volume_name: r.str()?,
                name: r.str()?,
                size: r.u64()?,
                generation: r.u64()?,
                created: r.u64()?,
            });
        }
        Ok(c)
    }

    pub(crate) fn volume(&self, name: &str) -> Result<&VolumeRec> {
        self.volumes
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| Error::VolumeNotFound(name.to_string()))
    }

    pub(crate) fn volume_mut(&mut self, name: &str) -> Result<&mut VolumeRec> {
        self.volumes
            .iter_mut()
            .find(|v| v.name == name)
            .ok_or_else(|| Error::VolumeNotFound(name.to_string()))
    }

    pub(crate) fn volume_by_id(&self, id: u128) -> Option<&VolumeRec> {
        let i = self.positions.find(&self.volumes, id, |v| v.id)?;
        self.volumes.get(i)
    }

    pub(crate) fn volume_by_id_mut(&mut self, id: u128) -> Option<&mut VolumeRec> {
        let i = self.positions.find(&self.volumes, id, |v| v.id)?;
        self.volumes.get_mut(i)
    }

    /// Finds `vol@snap`: a snapshot of the live volume named `vol`, or else of a deleted
    /// volume that had that name.
    pub(crate) fn snapshot(&self, vol: &str, snap: &str) -> Result<&SnapshotRec> {
        let live = self.volumes.iter().find(|v| v.name == vol).map(|v| v.id);
        self.snapshots
            .iter()
            .find(|s| s.name == snap && Some(s.volume) == live)
            .or_else(|| {
                self.snapshots.iter().find(|s| {
                    s.name == snap && s.volume_name == vol && self.volume_by_id(s.volume).is_none()
                })
            })
            .ok_or_else(|| Error::SnapshotNotFound(format!("{vol}@{snap}")))
    }

    pub(crate) fn snapshot_by_id(&self, id: u128) -> Option<&SnapshotRec> {
        let i = self.positions.find(&self.snapshots, id, |s| s.id)?;
        self.snapshots.get(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(id: u128) -> VolumeRec {
        VolumeRec {
            id,
            name: format!("v{id}"),
            size: 4096,
            root: 0,
            created: 0,
            origin: None,
            frozen_gen: 0,
            rollbacks: Vec::new(),
        }
    }

    /// Lookups by id stay right while records are added, removed and reordered behind the
    /// position hints' back.
    #[test]
    fn lookups_by_id_survive_any_change_to_the_lists() {
        let mut c = Catalog::default();
        c.volumes.extend((1..=100).map(vol));
        for id in 1..=100 {
            assert_eq!(c.volume_by_id(id).unwrap().id, id);
        }
        c.volumes.retain(|v| v.id % 3 != 0);
        c.volumes.reverse();
        c.volumes.push(vol(1000));
        for id in 1..=100 {
            assert_eq!(
                c.volume_by_id(id).map(|v| v.id),
                (id % 3 != 0).then_some(id)
            );
        }
        c.volume_by_id_mut(1000).unwrap().size = 8192;
        assert_eq!(c.volume_by_id(1000).unwrap().size, 8192);
        assert!(c.volume_by_id(0).is_none());
        // Deleted ids do not pile up in the hints forever.
        for round in 0..50u128 {
            c.volumes.clear();
            c.volumes.push(vol(5000 + round));
            assert!(c.volume_by_id(5000 + round).is_some());
        }
        assert!(c.positions.0.borrow().len() <= 2 + 64 + 1);
    }

    #[test]
    fn round_trip_and_hostile_bytes() {
        let c = Catalog {
            volumes: vec![VolumeRec {
                id: 7,
                name: "db".into(),
                size: 1 << 30,
                root: 9,
                created: 1,
                origin: Some(3),
                frozen_gen: 4,
                rollbacks: vec![(9, 2)],
            }],
            snapshots: vec![SnapshotRec {
                id: 3,
                volume: 7,
                volume_name: "db".into(),
                name: "before-upgrade".into(),
                size: 1 << 30,
                root: 10,
                generation: 4,
                created: 2,
            }],
            bookmarks: vec![BookmarkRec {
                id: 5,
                volume: 7,
                volume_name: "db".into(),
                name: "old".into(),
                size: 10,
                generation: 3,
                created: 1,
            }],
            ..Catalog::default()
        };
        let bytes = c.encode();
        assert_eq!(Catalog::decode(&bytes, 100).unwrap(), c);
        assert!(Catalog::decode(&bytes, 10).is_err(), "root beyond the pool");
        for cut in 0..bytes.len() {
            assert!(Catalog::decode(&bytes[..cut], 100).is_err());
        }
        assert!(validate_name("a@b").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name(&"x".repeat(201)).is_err());
        assert!(validate_name("pvc-1234_ok.v2").is_ok());
    }
}
