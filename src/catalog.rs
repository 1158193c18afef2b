//! The catalog: volumes, snapshots, bookmarks and the roots of their block maps, kept as one
//! copy-on-write B+tree ([`crate::pdata::btree`]). Everything about one volume sits in one
//! contiguous key range, so the entries a catalog operation changes (a snapshot's record, its
//! name, the volume's record) usually share a leaf:
//!
//! | key                                | value                 | what for                     |
//! |------------------------------------|-----------------------|------------------------------|
//! | `Vol(volume, Record)`              | volume record         | I/O, lookups by id           |
//! | `Vol(volume, Snapshot(gen, id))`   | snapshot record       | a volume's snapshots in order |
//! | `Vol(volume, SnapshotName(name))`  | where the snapshot is | `vol@snap`                   |
//! | `Vol(volume, BookmarkName(name))`  | bookmark id           | `vol#name`                   |
//! | `Vol(volume, Rollback(gen done))`  | gen returned to       | bookmark lineage (diff)      |
//! | `SnapshotId(id)`                   | where the snapshot is | lookups by snapshot id       |
//! | `Bookmark(id)`                     | bookmark record       | incremental bases            |
//! | `VolumeName(name)`                 | volume id             | `vol` (visible volumes)      |
//! | `Hidden(volume)`                   | –                     | receives and imports in flight |
//!
//! Lookups by id or name are O(log n), and a commit writes only the catalog pages on the
//! paths of what changed, however many snapshots the pool holds. Ids are time-ordered
//! ([`crate::ids`]), so new records append at the end of their range. Names are indexed under
//! the volume's id, so the snapshots of a deleted volume never collide with a new volume of
//! the same name (they stay reachable by id, with their volume's id and old name).
//!
//! Volume records change on every redirected write (the map root moves). Those changes go to
//! an in-memory record ([`Catalog::volume_mut`]) and into the tree at the commit, so the
//! write path never touches catalog pages.

use crate::error::{Error, Result};
use crate::format::{self, PageKind};
use crate::pdata::btree::{Nodes, Tree};
use crate::pdata::buffer::Buffer;
use crate::pdata::codec::{Codec, Reader, Writer};
use crate::pdata::node::{Schema, SearchKey};
use crate::pdata::page_cache::PageCache;
use crate::space::{Reserve, SpaceMap};
use std::collections::HashMap;
use std::ops::ControlFlow;

/// Longest volume or snapshot name in bytes.
pub const MAX_NAME: usize = 200;
/// Catalog pages kept in memory (16 MiB): the catalog's pages are read on demand, and a
/// pool with 100,000 snapshots does not hold them all.
const CATALOG_CACHE: usize = 4096;
/// Clean volume and snapshot records kept for I/O lookups before the cache is emptied.
const HOT_RECORDS: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VolumeRec {
    pub id: u128,
    pub name: String,
    pub size: u64,
    pub root: u64,
    pub created: u64,
    /// Snapshot or volume this one was cloned from.
    pub origin: Option<crate::Origin>,
    /// Generation of the newest snapshot or clone taken of this volume: blocks born at or
    /// before it may be in a snapshot, so they are never overwritten in place. The stored
    /// record keeps it for clones, rollbacks and receives; a snapshot does not rewrite the
    /// record (one leaf path less per snapshot commit), so the catalog raises the loaded
    /// record's value to its newest snapshot's generation ([`Catalog::volume_ref`]).
    pub frozen_gen: u64,
    /// Being built by a receive, restore or import: not listed, not found by name, and
    /// removed when the pool opens (an interrupted operation).
    pub hidden: bool,
}

impl VolumeRec {
    /// Completes a record being decoded with its origin id and flags byte (bit 0: hidden,
    /// bit 1: the origin is a volume). Unknown flags are refused.
    fn decode_origin(mut self, origin: u128, flags: u8) -> std::result::Result<VolumeRec, u8> {
        if flags & !0b11 != 0 {
            return Err(flags);
        }
        self.hidden = flags & 1 != 0;
        self.origin = (origin != 0).then(|| {
            if flags & 2 != 0 {
                crate::Origin::Volume(crate::VolumeId::from_u128(origin))
            } else {
                crate::Origin::Snapshot(crate::SnapshotId::from_u128(origin))
            }
        });
        Ok(self)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SnapshotRec {
    pub id: u128,
    pub volume: u128,
    /// The volume's name (kept when the volume is deleted).
    pub volume_name: String,
    pub name: String,
    pub size: u64,
    pub root: u64,
    pub generation: u64,
    pub created: u64,
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

/// Where a catalog entry lives. The derived order is the key order: variants first, then
/// fields, so each kind of entry is one contiguous range, and a volume's entries are too.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Key {
    /// Volume `.0`'s record and everything indexed under it.
    Vol(u128, Part),
    SnapshotId(u128),
    Bookmark(u128),
    VolumeName(String),
    Hidden(u128),
}

/// The entries under one volume, in key order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Part {
    Record,
    /// A snapshot's record, by (generation, id): oldest first.
    Snapshot(u64, u128),
    SnapshotName(String),
    BookmarkName(String),
    /// A rollback done at this generation.
    Rollback(u64),
}

/// What a catalog entry holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Value {
    Volume(VolumeRec),
    Snapshot(SnapshotRec),
    Bookmark(BookmarkRec),
    Id(u128),
    Generation(u64),
    /// Where a snapshot's record is: `Vol(volume, Snapshot(generation, id))`.
    At {
        volume: u128,
        generation: u64,
        id: u128,
    },
    Nothing,
}

fn name_len(s: &str) -> usize {
    1 + s.len()
}

fn put_name(w: &mut Writer, s: &str) {
    // Names are validated to at most MAX_NAME (200) bytes before they reach the catalog.
    let n = s.len().min(MAX_NAME);
    w.u8(n as u8);
    w.0.extend_from_slice(&s.as_bytes()[..n]);
}

fn get_name(r: &mut Reader<'_>) -> Result<String> {
    let n = r.u8()? as usize;
    if n > MAX_NAME {
        return Err(r.corrupt(format!("a name of {n} bytes")));
    }
    let b = r.take(n)?;
    String::from_utf8(b.to_vec()).map_err(|_| r.corrupt("a name is not UTF-8"))
}

impl Codec for Key {
    fn encoded_len(&self) -> usize {
        1 + match self {
            Key::Vol(_, part) => {
                17 + match part {
                    Part::Record => 0,
                    Part::Snapshot(..) => 24,
                    Part::SnapshotName(n) | Part::BookmarkName(n) => name_len(n),
                    Part::Rollback(_) => 8,
                }
            }
            Key::SnapshotId(_) | Key::Bookmark(_) | Key::Hidden(_) => 16,
            Key::VolumeName(n) => name_len(n),
        }
    }

    fn encode(&self, w: &mut Writer) {
        match self {
            Key::Vol(v, part) => {
                w.u8(1);
                w.u128(*v);
                match part {
                    Part::Record => w.u8(0),
                    Part::Snapshot(g, id) => {
                        w.u8(1);
                        w.u64(*g);
                        w.u128(*id);
                    }
                    Part::SnapshotName(n) => {
                        w.u8(2);
                        put_name(w, n);
                    }
                    Part::BookmarkName(n) => {
                        w.u8(3);
                        put_name(w, n);
                    }
                    Part::Rollback(g) => {
                        w.u8(4);
                        w.u64(*g);
                    }
                }
            }
            Key::SnapshotId(id) => {
                w.u8(2);
                w.u128(*id);
            }
            Key::Bookmark(id) => {
                w.u8(3);
                w.u128(*id);
            }
            Key::VolumeName(n) => {
                w.u8(4);
                put_name(w, n);
            }
            Key::Hidden(id) => {
                w.u8(5);
                w.u128(*id);
            }
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Key> {
        Ok(match r.u8()? {
            1 => {
                let v = r.u128()?;
                let part = match r.u8()? {
                    0 => Part::Record,
                    1 => Part::Snapshot(r.u64()?, r.u128()?),
                    2 => Part::SnapshotName(get_name(r)?),
                    3 => Part::BookmarkName(get_name(r)?),
                    4 => Part::Rollback(r.u64()?),
                    t => return Err(r.corrupt(format!("unknown volume entry kind {t}"))),
                };
                Key::Vol(v, part)
            }
            2 => Key::SnapshotId(r.u128()?),
            3 => Key::Bookmark(r.u128()?),
            4 => Key::VolumeName(get_name(r)?),
            5 => Key::Hidden(r.u128()?),
            t => return Err(r.corrupt(format!("unknown catalog key kind {t}"))),
        })
    }
}

impl SearchKey for Key {}

impl Codec for Value {
    fn encoded_len(&self) -> usize {
        1 + match self {
            Value::Volume(v) => 16 + name_len(&v.name) + 8 * 4 + 16 + 1,
            Value::Snapshot(s) => 32 + name_len(&s.volume_name) + name_len(&s.name) + 32,
            Value::Bookmark(b) => 32 + name_len(&b.volume_name) + name_len(&b.name) + 24,
            Value::Id(_) => 16,
            Value::Generation(_) => 8,
            Value::At { .. } => 40,
            Value::Nothing => 0,
        }
    }

    fn encode(&self, w: &mut Writer) {
        match self {
            Value::Volume(v) => {
                w.u8(1);
                w.u128(v.id);
                put_name(w, &v.name);
                w.u64(v.size);
                w.u64(v.root);
                w.u64(v.created);
                w.u64(v.frozen_gen);
                // The origin's id, and in the flags byte whether it is a volume's.
                let (origin, from_volume) = match v.origin {
                    None => (0, false),
                    Some(crate::Origin::Snapshot(s)) => (s.as_u128(), false),
                    Some(crate::Origin::Volume(v)) => (v.as_u128(), true),
                };
                w.u128(origin);
                w.u8(v.hidden as u8 | (from_volume as u8) << 1);
            }
            Value::Snapshot(s) => {
                w.u8(2);
                w.u128(s.id);
                w.u128(s.volume);
                put_name(w, &s.volume_name);
                put_name(w, &s.name);
                w.u64(s.size);
                w.u64(s.root);
                w.u64(s.generation);
                w.u64(s.created);
            }
            Value::Bookmark(b) => {
                w.u8(3);
                w.u128(b.id);
                w.u128(b.volume);
                put_name(w, &b.volume_name);
                put_name(w, &b.name);
                w.u64(b.size);
                w.u64(b.generation);
                w.u64(b.created);
            }
            Value::Id(id) => {
                w.u8(4);
                w.u128(*id);
            }
            Value::Generation(g) => {
                w.u8(5);
                w.u64(*g);
            }
            Value::Nothing => w.u8(6),
            Value::At {
                volume,
                generation,
                id,
            } => {
                w.u8(7);
                w.u128(*volume);
                w.u64(*generation);
                w.u128(*id);
            }
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Value> {
        Ok(match r.u8()? {
            1 => {
                let rec = VolumeRec {
                    id: r.u128()?,
                    name: get_name(r)?,
                    size: r.u64()?,
                    root: r.u64()?,
                    created: r.u64()?,
                    frozen_gen: r.u64()?,
                    origin: None,
                    hidden: false,
                };
                let (origin, flags) = (r.u128()?, r.u8()?);
                let rec = rec
                    .decode_origin(origin, flags)
                    .map_err(|f| r.corrupt(format!("volume flags {f:#x}")))?;
                Value::Volume(rec)
            }
            2 => Value::Snapshot(SnapshotRec {
                id: r.u128()?,
                volume: r.u128()?,
                volume_name: get_name(r)?,
                name: get_name(r)?,
                size: r.u64()?,
                root: r.u64()?,
                generation: r.u64()?,
                created: r.u64()?,
            }),
            3 => Value::Bookmark(BookmarkRec {
                id: r.u128()?,
                volume: r.u128()?,
                volume_name: get_name(r)?,
                name: get_name(r)?,
                size: r.u64()?,
                generation: r.u64()?,
                created: r.u64()?,
            }),
            4 => Value::Id(r.u128()?),
            5 => Value::Generation(r.u64()?),
            6 => Value::Nothing,
            7 => Value::At {
                volume: r.u128()?,
                generation: r.u64()?,
                id: r.u128()?,
            },
            t => return Err(r.corrupt(format!("unknown catalog value kind {t}"))),
        })
    }
}

/// The catalog tree's schema. Its values name map roots, but those references are taken
/// and dropped by the catalog operations themselves (a snapshot shares a root as it adds
/// its record), and catalog nodes are never shared, so the tree never counts them.
pub(crate) struct CatalogSchema;

impl Schema for CatalogSchema {
    type Key = Key;
    type Value = Value;
    const LEAF: PageKind = PageKind::CatalogLeaf;
    const BRANCH: PageKind = PageKind::CatalogBranch;

    /// A run is one kind of entry (of one volume, for the entries under a volume): each
    /// volume's snapshot records grow at the end of their run, and so do the time-ordered
    /// snapshot ids, so their leaves fill instead of staying half full.
    fn same_run(a: &Key, b: &Key) -> bool {
        use std::mem::discriminant as d;
        match (a, b) {
            (Key::Vol(va, pa), Key::Vol(vb, pb)) => va == vb && d(pa) == d(pb),
            _ => d(a) == d(b),
        }
    }

    fn check_value(v: &Value, total_units: u64) -> std::result::Result<(), String> {
        let root_ok = |r: u64| r == 0 || (format::SUPERBLOCK_UNITS..total_units).contains(&r);
        match v {
            Value::Volume(v) if !root_ok(v.root) => Err(format!("volume root {}", v.root)),
            Value::Volume(v) if v.size > format::MAX_VOLUME_BYTES => {
                Err(format!("volume size {}", v.size))
            }
            Value::Snapshot(s) if !root_ok(s.root) => Err(format!("snapshot root {}", s.root)),
            Value::Snapshot(s) if s.size > format::MAX_VOLUME_BYTES => {
                Err(format!("snapshot size {}", s.size))
            }
            _ => Ok(()),
        }
    }
}

/// A volume record as I/O uses it, with whether the tree has yet to take its changes.
struct Hot {
    rec: VolumeRec,
    dirty: bool,
}

pub(crate) struct Catalog {
    nodes: Nodes<CatalogSchema>,
    /// Root of the catalog tree (0: empty).
    root: u64,
    /// Changes not yet in the tree, committed as one page (see [`crate::pdata::buffer`]):
    /// a snapshot's three entries cost one page at its commit instead of three leaf paths.
    buffer: Buffer<CatalogSchema>,
    /// Volume records used by I/O; dirty ones hold changes the tree takes at the commit.
    hot: HashMap<u128, Hot>,
    /// Snapshot records used by I/O (clean copies of the tree's).
    hot_snapshots: HashMap<u128, SnapshotRec>,
    /// Visible volumes and snapshots (kept in the superblock).
    counts: Counts,
}

/// How many visible volumes and snapshots the catalog holds.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Counts {
    pub volumes: u64,
    pub snapshots: u64,
}

fn tree<'a>(
    nodes: &'a mut Nodes<CatalogSchema>,
    sm: &'a mut SpaceMap,
    reserve: Reserve,
) -> Tree<'a, CatalogSchema> {
    Tree {
        nodes,
        sm,
        schema: &CatalogSchema,
        reserve,
    }
}

/// The name in an index key, for messages.
fn n_of(k: &Key) -> &str {
    match k {
        Key::Vol(_, Part::SnapshotName(n) | Part::BookmarkName(n)) | Key::VolumeName(n) => n,
        _ => "",
    }
}

fn mismatch(key: &Key, value: &Value) -> Error {
    Error::corrupt(
        "catalog leaf",
        0,
        format!("entry {key:?} holds a value of the wrong kind ({value:?})"),
    )
}

impl Catalog {
    /// The catalog whose tree has root `root` and whose write buffer is page `buffer`
    /// (0: empty); the buffer is read now, the tree when used.
    pub(crate) fn open(
        dev: std::sync::Arc<dyn crate::device::BlockDevice>,
        root: u64,
        buffer: u64,
        total_units: u64,
        generation: u64,
        counts: Counts,
    ) -> Result<Catalog> {
        let buffer = Buffer::open(&*dev, PageKind::CatalogBuffer, buffer, total_units)?;
        Ok(Catalog {
            nodes: Nodes::new(PageCache::new(dev, generation, CATALOG_CACHE)),
            root,
            buffer,
            hot: HashMap::new(),
            hot_snapshots: HashMap::new(),
            counts,
        })
    }

    pub(crate) fn counts(&self) -> Counts {
        self.counts
    }

    pub(crate) fn root(&self) -> u64 {
        self.root
    }

    /// Unit of the committed write buffer page (0: none), for the superblock.
    pub(crate) fn buffer_page(&self) -> u64 {
        self.buffer.page()
    }

    fn get(&mut self, sm: &mut SpaceMap, key: &Key) -> Result<Option<Value>> {
        let mut t = tree(&mut self.nodes, sm, Reserve::Keep);
        self.buffer.get(&mut t, self.root, key)
    }

    fn put(&mut self, sm: &mut SpaceMap, reserve: Reserve, key: Key, value: Value) -> Result<()> {
        let mut t = tree(&mut self.nodes, sm, reserve);
        self.buffer.insert(&mut t, &mut self.root, key, value)
    }

    fn del(&mut self, sm: &mut SpaceMap, reserve: Reserve, key: &Key) -> Result<Option<Value>> {
        let mut t = tree(&mut self.nodes, sm, reserve);
        self.buffer.remove(&mut t, &mut self.root, key)
    }

    /// Calls `f` on every entry (buffered changes over the tree's) from `from` on.
    fn scan(
        &mut self,
        sm: &mut SpaceMap,
        from: &Key,
        f: impl FnMut(&Key, &Value) -> ControlFlow<()>,
    ) -> Result<()> {
        let mut t = tree(&mut self.nodes, sm, Reserve::Keep);
        self.buffer.scan(&mut t, self.root, from, f)
    }

    /// Every entry from `from` on while `within` holds, in key order.
    fn range(
        &mut self,
        sm: &mut SpaceMap,
        from: &Key,
        within: impl Fn(&Key) -> bool,
    ) -> Result<Vec<(Key, Value)>> {
        let mut out = Vec::new();
        self.scan(sm, from, |k, v| {
            if !within(k) {
                return ControlFlow::Break(());
            }
            out.push((k.clone(), v.clone()));
            ControlFlow::Continue(())
        })?;
        Ok(out)
    }

    fn id_at(&mut self, sm: &mut SpaceMap, key: Key) -> Result<Option<u128>> {
        match self.get(sm, &key)? {
            None => Ok(None),
            Some(Value::Id(id)) => Ok(Some(id)),
            Some(v) => Err(mismatch(&key, &v)),
        }
    }

    fn trim_hot(&mut self) {
        if self.hot.len() >= HOT_RECORDS {
            self.hot.retain(|_, h| h.dirty);
        }
        if self.hot_snapshots.len() >= HOT_RECORDS {
            self.hot_snapshots.clear();
        }
    }

    // ---- volumes

    /// The record of volume `id` as I/O sees it (with the open transaction's changes).
    pub(crate) fn volume_ref(&mut self, sm: &mut SpaceMap, id: u128) -> Result<Option<&VolumeRec>> {
        if !self.hot.contains_key(&id) {
            let key = Key::Vol(id, Part::Record);
            let mut rec = match self.get(sm, &key)? {
                None => return Ok(None),
                Some(Value::Volume(v)) => v,
                Some(v) => return Err(mismatch(&key, &v)),
            };
            if let Some(s) = self.newest_snapshot(sm, id)? {
                rec.frozen_gen = rec.frozen_gen.max(s.generation);
            }
            self.trim_hot();
            self.hot.insert(id, Hot { rec, dirty: false });
        }
        Ok(self.hot.get(&id).map(|h| &h.rec))
    }

    pub(crate) fn volume(&mut self, sm: &mut SpaceMap, id: u128) -> Result<Option<VolumeRec>> {
        Ok(self.volume_ref(sm, id)?.cloned())
    }

    /// Volume `id`'s record to change; the tree takes the change at the commit. Not for its
    /// name or hidden flag, which the indexes follow ([`Catalog::rename_volume`]).
    pub(crate) fn volume_mut(
        &mut self,
        sm: &mut SpaceMap,
        id: u128,
    ) -> Result<Option<&mut VolumeRec>> {
        if self.volume_ref(sm, id)?.is_none() {
            return Ok(None);
        }
        Ok(self.hot.get_mut(&id).map(|h| {
            h.dirty = true;
            &mut h.rec
        }))
    }

    /// The id of the visible volume named `name`.
    pub(crate) fn volume_id(&mut self, sm: &mut SpaceMap, name: &str) -> Result<Option<u128>> {
        self.id_at(sm, Key::VolumeName(name.to_string()))
    }

    /// The visible volume named `name`.
    pub(crate) fn volume_named(&mut self, sm: &mut SpaceMap, name: &str) -> Result<VolumeRec> {
        let missing = || Error::VolumeNotFound(name.into());
        let id = self.volume_id(sm, name)?.ok_or_else(missing)?;
        self.volume(sm, id)?.ok_or_else(|| {
            Error::corrupt(
                "catalog leaf",
                0,
                format!("volume name {name:?} names no volume"),
            )
        })
    }

    /// Adds a volume record with its name (or, hidden, its entry among the hidden ones).
    /// The caller checked that the name is free.
    pub(crate) fn add_volume(
        &mut self,
        sm: &mut SpaceMap,
        reserve: Reserve,
        rec: VolumeRec,
    ) -> Result<()> {
        let index = if rec.hidden {
            (Key::Hidden(rec.id), Value::Nothing)
        } else {
            self.counts.volumes += 1;
            (Key::VolumeName(rec.name.clone()), Value::Id(rec.id))
        };
        self.put(sm, reserve, index.0, index.1)?;
        self.put(
            sm,
            reserve,
            Key::Vol(rec.id, Part::Record),
            Value::Volume(rec.clone()),
        )?;
        self.trim_hot();
        self.hot.insert(rec.id, Hot { rec, dirty: false });
        Ok(())
    }

    /// Writes volume `rec`'s current record into the tree now.
    fn store_volume(&mut self, sm: &mut SpaceMap, reserve: Reserve, rec: VolumeRec) -> Result<()> {
        self.put(
            sm,
            reserve,
            Key::Vol(rec.id, Part::Record),
            Value::Volume(rec.clone()),
        )?;
        self.hot.insert(rec.id, Hot { rec, dirty: false });
        Ok(())
    }

    /// Removes volume `id` with its name and rollback entries; returns its last record.
    pub(crate) fn remove_volume(
        &mut self,
        sm: &mut SpaceMap,
        reserve: Reserve,
        id: u128,
    ) -> Result<Option<VolumeRec>> {
        let Some(rec) = self.volume(sm, id)? else {
            return Ok(None);
        };
        if rec.hidden {
            self.del(sm, reserve, &Key::Hidden(id))?;
        } else {
            self.del(sm, reserve, &Key::VolumeName(rec.name.clone()))?;
            self.counts.volumes = self.counts.volumes.saturating_sub(1);
        }
        for (at, _) in self.rollbacks(sm, id)? {
            self.del(sm, reserve, &Key::Vol(id, Part::Rollback(at)))?;
        }
        self.del(sm, reserve, &Key::Vol(id, Part::Record))?;
        self.hot.remove(&id);
        Ok(Some(rec))
    }

    /// Gives volume `id` the visible name `name` (also what reveals a hidden volume); its
    /// snapshots and bookmarks follow. The caller checked that the name is free.
    pub(crate) fn rename_volume(
        &mut self,
        sm: &mut SpaceMap,
        reserve: Reserve,
        id: u128,
        name: &str,
    ) -> Result<()> {
        let Some(mut rec) = self.volume(sm, id)? else {
            return Err(Error::VolumeNotFound(crate::VolumeId::from_u128(id).into()));
        };
        if rec.hidden {
            self.del(sm, reserve, &Key::Hidden(id))?;
            self.counts.volumes += 1;
        } else {
            self.del(sm, reserve, &Key::VolumeName(rec.name.clone()))?;
        }
        self.put(
            sm,
            reserve,
            Key::VolumeName(name.to_string()),
            Value::Id(id),
        )?;
        rec.name = name.to_string();
        rec.hidden = false;
        self.store_volume(sm, reserve, rec)?;
        for mut s in self.snapshots_of(sm, id)? {
            s.volume_name = name.to_string();
            self.hot_snapshots.remove(&s.id);
            let key = Key::Vol(id, Part::Snapshot(s.generation, s.id));
            self.put(sm, reserve, key, Value::Snapshot(s))?;
        }
        for mut b in self.bookmarks_of(sm, id)? {
            b.volume_name = name.to_string();
            self.put(sm, reserve, Key::Bookmark(b.id), Value::Bookmark(b))?;
        }
        Ok(())
    }

    /// Every visible volume, by name.
    pub(crate) fn volumes(&mut self, sm: &mut SpaceMap) -> Result<Vec<VolumeRec>> {
        let names = self.range(sm, &Key::VolumeName(String::new()), |k| {
            matches!(k, Key::VolumeName(_))
        })?;
        let mut out = Vec::with_capacity(names.len());
        for (k, v) in names {
            let Value::Id(id) = v else {
                return Err(mismatch(&k, &v));
            };
            let rec = self.volume(sm, id)?.ok_or_else(|| {
                Error::corrupt("catalog leaf", 0, format!("{k:?} names no volume"))
            })?;
            out.push(rec);
        }
        Ok(out)
    }

    /// Every volume record, visible and hidden, by id (with the open transaction's changes).
    pub(crate) fn all_volumes(&mut self, sm: &mut SpaceMap) -> Result<Vec<VolumeRec>> {
        let ids = self.volume_ids(sm)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.extend(self.volume(sm, id)?);
        }
        Ok(out)
    }

    /// The id of every volume that has entries (a record, or snapshots and bookmarks left
    /// by a deleted volume), in id order. One descent per volume: the walk jumps over each
    /// volume's entries instead of reading them, so it costs the number of volumes, not
    /// the number of snapshots.
    fn volume_ids(&mut self, sm: &mut SpaceMap) -> Result<Vec<u128>> {
        let mut ids = Vec::new();
        let mut from = Key::Vol(0, Part::Record);
        let mut t = tree(&mut self.nodes, sm, Reserve::Keep);
        while let Some(Key::Vol(id, _)) = self.buffer.next_key(&mut t, self.root, &from)? {
            ids.push(id);
            match id.checked_add(1) {
                Some(next) => from = Key::Vol(next, Part::Record),
                None => break,
            }
        }
        Ok(ids)
    }

    /// Ids of the hidden volumes.
    pub(crate) fn hidden_volumes(&mut self, sm: &mut SpaceMap) -> Result<Vec<u128>> {
        let found = self.range(sm, &Key::Hidden(0), |k| matches!(k, Key::Hidden(_)))?;
        Ok(found
            .into_iter()
            .filter_map(|(k, _)| match k {
                Key::Hidden(id) => Some(id),
                _ => None,
            })
            .collect())
    }

    /// Records that volume `id` returned at generation `at` to a snapshot of generation `to`.
    pub(crate) fn add_rollback(
        &mut self,
        sm: &mut SpaceMap,
        reserve: Reserve,
        id: u128,
        at: u64,
        to: u64,
    ) -> Result<()> {
        self.put(
            sm,
            reserve,
            Key::Vol(id, Part::Rollback(at)),
            Value::Generation(to),
        )
    }

    /// Volume `id`'s rollbacks as (generation done, generation returned to), oldest first.
    pub(crate) fn rollbacks(&mut self, sm: &mut SpaceMap, id: u128) -> Result<Vec<(u64, u64)>> {
        let found = self.range(
            sm,
            &Key::Vol(id, Part::Rollback(0)),
            |k| matches!(k, Key::Vol(v, Part::Rollback(_)) if *v == id),
        )?;
        found
            .into_iter()
            .map(|(k, v)| match (&k, &v) {
                (Key::Vol(_, Part::Rollback(at)), Value::Generation(to)) => Ok((*at, *to)),
                _ => Err(mismatch(&k, &v)),
            })
            .collect()
    }

    /// Writes every changed volume record into the tree (the commit does, first).
    pub(crate) fn flush(&mut self, sm: &mut SpaceMap) -> Result<()> {
        let mut dirty: Vec<VolumeRec> = self
            .hot
            .values()
            .filter(|h| h.dirty)
            .map(|h| h.rec.clone())
            .collect();
        // Sorted so the tree sees its keys in order (one path per leaf).
        dirty.sort_by_key(|r| r.id);
        for rec in dirty {
            self.store_volume(sm, Reserve::Use, rec)?;
        }
        let mut t = tree(&mut self.nodes, sm, Reserve::Use);
        self.buffer.prepare_commit(&mut t, &mut self.root)
    }

    /// Records and pages the commit has to write.
    pub(crate) fn dirty_count(&self) -> usize {
        self.nodes.cache.dirty_count()
            + self.hot.values().filter(|h| h.dirty).count()
            + usize::from(self.buffer.changed())
    }

    /// Sealed images of the catalog pages this transaction wrote (after [`Catalog::flush`]).
    pub(crate) fn dirty_pages(&self) -> Vec<(u64, Box<format::Page>)> {
        let mut pages = self.nodes.cache.sealed_dirty();
        pages.extend(self.buffer.sealed_page());
        pages
    }

    pub(crate) fn commit_done(&mut self) {
        self.buffer.commit_done();
        self.nodes.commit_done();
    }

    /// Checks that every record and index agree (for `check`); returns what does not.
    pub(crate) fn verify_indexes(&mut self, sm: &mut SpaceMap) -> Result<Vec<String>> {
        let mut all: std::collections::BTreeMap<Key, Value> = std::collections::BTreeMap::new();
        self.scan(sm, &Key::Vol(0, Part::Record), |k, v| {
            all.insert(k.clone(), v.clone());
            ControlFlow::Continue(())
        })?;
        let mut bad = Vec::new();
        let at_matches = |all: &std::collections::BTreeMap<Key, Value>, want: (u128, u64, u128)| matches!(all.get(&Key::Vol(want.0, Part::Snapshot(want.1, want.2))), Some(Value::Snapshot(s)) if s.id == want.2);
        let (mut visible, mut snapshots) = (0u64, 0u64);
        for (k, v) in &all {
            match (k, v) {
                (Key::Vol(id, Part::Record), Value::Volume(r)) => {
                    let indexed = if r.hidden {
                        all.contains_key(&Key::Hidden(*id))
                    } else {
                        visible += 1;
                        all.get(&Key::VolumeName(r.name.clone())) == Some(&Value::Id(*id))
                    };
                    if r.id != *id || !indexed {
                        bad.push(format!(
                            "volume {id:032x} ({:?}) is not indexed as itself",
                            r.name
                        ));
                    }
                }
                (Key::Vol(vol, Part::Snapshot(g, id)), Value::Snapshot(s)) => {
                    snapshots += 1;
                    let here = Value::At {
                        volume: *vol,
                        generation: *g,
                        id: *id,
                    };
                    let by_name = all.get(&Key::Vol(*vol, Part::SnapshotName(s.name.clone())));
                    if s.id != *id
                        || s.volume != *vol
                        || s.generation != *g
                        || all.get(&Key::SnapshotId(*id)) != Some(&here)
                        || by_name != Some(&here)
                    {
                        bad.push(format!(
                            "snapshot {id:032x} ({:?}) is not indexed as itself",
                            s.name
                        ));
                    }
                }
                (
                    Key::Vol(_, Part::SnapshotName(_)) | Key::SnapshotId(_),
                    Value::At {
                        volume,
                        generation,
                        id,
                    },
                ) => {
                    if !at_matches(&all, (*volume, *generation, *id)) {
                        bad.push(format!(
                            "{k:?} points at a snapshot that is not there ({n:?})",
                            n = n_of(k)
                        ));
                    }
                }
                (Key::Vol(vol, Part::BookmarkName(n)), Value::Id(b)) => {
                    let ok = matches!(all.get(&Key::Bookmark(*b)), Some(Value::Bookmark(r)) if r.volume == *vol && &r.name == n);
                    if !ok {
                        bad.push(format!(
                            "bookmark name {n:?} points at a bookmark that is not there"
                        ));
                    }
                }
                (Key::Bookmark(b), Value::Bookmark(r)) => {
                    if all.get(&Key::Vol(r.volume, Part::BookmarkName(r.name.clone())))
                        != Some(&Value::Id(*b))
                        || r.id != *b
                    {
                        bad.push(format!(
                            "bookmark {b:032x} ({:?}) is not indexed as itself",
                            r.name
                        ));
                    }
                }
                (Key::VolumeName(n), Value::Id(id)) => {
                    let ok = matches!(all.get(&Key::Vol(*id, Part::Record)), Some(Value::Volume(r)) if &r.name == n && !r.hidden);
                    if !ok {
                        bad.push(format!(
                            "volume name {n:?} points at a volume that is not there"
                        ));
                    }
                }
                (Key::Hidden(id), Value::Nothing) => {
                    if !matches!(all.get(&Key::Vol(*id, Part::Record)), Some(Value::Volume(r)) if r.hidden)
                    {
                        bad.push(format!("hidden volume {id:032x} is not there"));
                    }
                }
                (Key::Vol(_, Part::Rollback(_)), Value::Generation(_)) => {}
                (k, v) => bad.push(format!("{k:?} holds a value of the wrong kind ({v:?})")),
            }
        }
        if (visible, snapshots) != (self.counts.volumes, self.counts.snapshots) {
            bad.push(format!(
                "the superblock counts {} volumes and {} snapshots, the catalog holds {visible} and {snapshots}",
                self.counts.volumes, self.counts.snapshots
            ));
        }
        Ok(bad)
    }

    /// Every page of the catalog tree (for `check`).
    pub(crate) fn pages(&mut self, sm: &mut SpaceMap) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        tree(&mut self.nodes, sm, Reserve::Keep).visit_nodes(self.root, |loc, _| {
            out.push(loc);
            Ok(())
        })?;
        if self.buffer.page() != 0 {
            out.push(self.buffer.page());
        }
        Ok(out)
    }

    // ---- snapshots

    /// Where the snapshot that `key` points at is, if it exists.
    fn locate(&mut self, sm: &mut SpaceMap, key: Key) -> Result<Option<(u128, u64, u128)>> {
        match self.get(sm, &key)? {
            None => Ok(None),
            Some(Value::At {
                volume,
                generation,
                id,
            }) => Ok(Some((volume, generation, id))),
            Some(v) => Err(mismatch(&key, &v)),
        }
    }

    /// The record at `Vol(volume, Snapshot(generation, id))`.
    fn snapshot_at(
        &mut self,
        sm: &mut SpaceMap,
        (volume, generation, id): (u128, u64, u128),
    ) -> Result<SnapshotRec> {
        let key = Key::Vol(volume, Part::Snapshot(generation, id));
        match self.get(sm, &key)? {
            Some(Value::Snapshot(s)) => Ok(s),
            None => Err(Error::corrupt(
                "catalog leaf",
                0,
                format!("an index points at {key:?}, which is missing"),
            )),
            Some(v) => Err(mismatch(&key, &v)),
        }
    }

    /// The record of snapshot `id`.
    pub(crate) fn snapshot_ref(
        &mut self,
        sm: &mut SpaceMap,
        id: u128,
    ) -> Result<Option<&SnapshotRec>> {
        if !self.hot_snapshots.contains_key(&id) {
            let Some(at) = self.locate(sm, Key::SnapshotId(id))? else {
                return Ok(None);
            };
            let rec = self.snapshot_at(sm, at)?;
            self.trim_hot();
            self.hot_snapshots.insert(id, rec);
        }
        Ok(self.hot_snapshots.get(&id))
    }

    pub(crate) fn snapshot(&mut self, sm: &mut SpaceMap, id: u128) -> Result<Option<SnapshotRec>> {
        Ok(self.snapshot_ref(sm, id)?.cloned())
    }

    /// Snapshot `name` of volume `volume` (by id).
    pub(crate) fn snapshot_named(
        &mut self,
        sm: &mut SpaceMap,
        volume: u128,
        name: &str,
    ) -> Result<Option<SnapshotRec>> {
        match self.locate(sm, Key::Vol(volume, Part::SnapshotName(name.to_string())))? {
            None => Ok(None),
            Some(at) => self.snapshot_at(sm, at).map(Some),
        }
    }

    /// Adds a snapshot record with its name and its id. The caller took the reference to
    /// its map root and checked that the name is free.
    pub(crate) fn add_snapshot(
        &mut self,
        sm: &mut SpaceMap,
        reserve: Reserve,
        rec: SnapshotRec,
    ) -> Result<()> {
        let at = Value::At {
            volume: rec.volume,
            generation: rec.generation,
            id: rec.id,
        };
        let (v, g, id) = (rec.volume, rec.generation, rec.id);
        // The volume's frozen generation follows its newest snapshot without a record
        // rewrite: a loaded record takes it here, a record loaded later from its snapshots.
        if let Some(h) = self.hot.get_mut(&v) {
            h.rec.frozen_gen = h.rec.frozen_gen.max(g);
        }
        self.put(
            sm,
            reserve,
            Key::Vol(v, Part::SnapshotName(rec.name.clone())),
            at.clone(),
        )?;
        self.put(
            sm,
            reserve,
            Key::Vol(v, Part::Snapshot(g, id)),
            Value::Snapshot(rec),
        )?;
        self.put(sm, reserve, Key::SnapshotId(id), at)?;
        self.counts.snapshots += 1;
        Ok(())
    }

    /// Removes snapshot `id` and its index entries; returns its record.
    pub(crate) fn remove_snapshot(
        &mut self,
        sm: &mut SpaceMap,
        reserve: Reserve,
        id: u128,
    ) -> Result<Option<SnapshotRec>> {
        let Some(rec) = self.snapshot(sm, id)? else {
            return Ok(None);
        };
        let v = rec.volume;
        self.del(
            sm,
            reserve,
            &Key::Vol(v, Part::SnapshotName(rec.name.clone())),
        )?;
        self.del(
            sm,
            reserve,
            &Key::Vol(v, Part::Snapshot(rec.generation, id)),
        )?;
        self.del(sm, reserve, &Key::SnapshotId(id))?;
        self.hot_snapshots.remove(&id);
        self.counts.snapshots = self.counts.snapshots.saturating_sub(1);
        Ok(Some(rec))
    }

    /// Volume `volume`'s snapshots (by id, also of a deleted volume), oldest first.
    pub(crate) fn snapshots_of(
        &mut self,
        sm: &mut SpaceMap,
        volume: u128,
    ) -> Result<Vec<SnapshotRec>> {
        Ok(self.snapshots_after(sm, Some(volume), None, usize::MAX)?.0)
    }

    /// The newest snapshot of volume `volume` (highest generation).
    pub(crate) fn newest_snapshot(
        &mut self,
        sm: &mut SpaceMap,
        volume: u128,
    ) -> Result<Option<SnapshotRec>> {
        let mut t = tree(&mut self.nodes, sm, Reserve::Keep);
        let last = self.buffer.last_below(
            &mut t,
            self.root,
            &Key::Vol(volume, Part::Snapshot(u64::MAX, u128::MAX)),
        )?;
        match last {
            Some((Key::Vol(v, Part::Snapshot(..)), Value::Snapshot(s))) if v == volume => {
                Ok(Some(s))
            }
            _ => Ok(None),
        }
    }

    /// Every snapshot, oldest first. Each volume's snapshot records are one run of keys,
    /// read alone: the name indexes between them are skipped.
    pub(crate) fn all_snapshots(&mut self, sm: &mut SpaceMap) -> Result<Vec<SnapshotRec>> {
        let mut out = Vec::new();
        for volume in self.volume_ids(sm)? {
            out.extend(self.snapshots_of(sm, volume)?);
        }
        out.sort_by_key(|s| (s.generation, s.created, s.id));
        Ok(out)
    }

    // ---- bookmarks

    pub(crate) fn bookmark(&mut self, sm: &mut SpaceMap, id: u128) -> Result<Option<BookmarkRec>> {
        let key = Key::Bookmark(id);
        match self.get(sm, &key)? {
            None => Ok(None),
            Some(Value::Bookmark(b)) => Ok(Some(b)),
            Some(v) => Err(mismatch(&key, &v)),
        }
    }

    /// The id of bookmark `name` of volume `volume`.
    pub(crate) fn bookmark_id(
        &mut self,
        sm: &mut SpaceMap,
        volume: u128,
        name: &str,
    ) -> Result<Option<u128>> {
        self.id_at(sm, Key::Vol(volume, Part::BookmarkName(name.to_string())))
    }

    /// Adds a bookmark; the caller checked that neither its id nor its name is taken.
    pub(crate) fn add_bookmark(
        &mut self,
        sm: &mut SpaceMap,
        reserve: Reserve,
        rec: BookmarkRec,
    ) -> Result<()> {
        self.put(
            sm,
            reserve,
            Key::Vol(rec.volume, Part::BookmarkName(rec.name.clone())),
            Value::Id(rec.id),
        )?;
        self.put(sm, reserve, Key::Bookmark(rec.id), Value::Bookmark(rec))
    }

    pub(crate) fn remove_bookmark(
        &mut self,
        sm: &mut SpaceMap,
        reserve: Reserve,
        id: u128,
    ) -> Result<Option<BookmarkRec>> {
        let Some(rec) = self.bookmark(sm, id)? else {
            return Ok(None);
        };
        self.del(
            sm,
            reserve,
            &Key::Vol(rec.volume, Part::BookmarkName(rec.name.clone())),
        )?;
        self.del(sm, reserve, &Key::Bookmark(id))?;
        Ok(Some(rec))
    }

    /// Every bookmark, oldest first.
    pub(crate) fn bookmarks(&mut self, sm: &mut SpaceMap) -> Result<Vec<BookmarkRec>> {
        let found = self.range(sm, &Key::Bookmark(0), |k| matches!(k, Key::Bookmark(_)))?;
        let mut out = Vec::with_capacity(found.len());
        for (k, v) in found {
            match v {
                Value::Bookmark(b) => out.push(b),
                v => return Err(mismatch(&k, &v)),
            }
        }
        out.sort_by_key(|b| (b.generation, b.id));
        Ok(out)
    }

    pub(crate) fn bookmarks_of(
        &mut self,
        sm: &mut SpaceMap,
        volume: u128,
    ) -> Result<Vec<BookmarkRec>> {
        let first = Key::Vol(volume, Part::BookmarkName(String::new()));
        let names = self.range(
            sm,
            &first,
            |k| matches!(k, Key::Vol(v, Part::BookmarkName(_)) if *v == volume),
        )?;
        let mut out = Vec::new();
        for (k, v) in names {
            let Value::Id(id) = v else {
                return Err(mismatch(&k, &v));
            };
            if let Some(b) = self.bookmark(sm, id)? {
                out.push(b);
            }
        }
        Ok(out)
    }

    // ---- pages of listings (see listing.rs)

    /// Scans from `from`, appending what `classify` takes to `out` until `out` holds `max`
    /// (then returns true: more follow) or `classify` says the run ended. An entry of the
    /// run with a value of the wrong kind is corruption.
    fn scan_page<T>(
        &mut self,
        sm: &mut SpaceMap,
        from: &Key,
        max: usize,
        out: &mut Vec<T>,
        mut classify: impl FnMut(&Key, &Value) -> Seen<T>,
    ) -> Result<bool> {
        let (mut more, mut bad) = (false, None);
        self.scan(sm, from, |k, v| match classify(k, v) {
            Seen::Skip => ControlFlow::Continue(()),
            Seen::Take(_) if out.len() == max => {
                more = true;
                ControlFlow::Break(())
            }
            Seen::Take(t) => {
                out.push(t);
                ControlFlow::Continue(())
            }
            Seen::Wrong => {
                bad = Some(mismatch(k, v));
                ControlFlow::Break(())
            }
            Seen::End => ControlFlow::Break(()),
        })?;
        match bad {
            Some(e) => Err(e),
            None => Ok(more),
        }
    }

    /// Up to `max` visible volumes in name order after `after` (exclusive), and whether
    /// more follow. Costs the page, not the catalog: one descent to the first name.
    pub(crate) fn volumes_after(
        &mut self,
        sm: &mut SpaceMap,
        after: Option<&str>,
        max: usize,
    ) -> Result<(Vec<VolumeRec>, bool)> {
        let from = Key::VolumeName(after.unwrap_or("").to_string());
        let mut ids = Vec::new();
        let more = self.scan_page(sm, &from, max, &mut ids, |k, v| match (k, v) {
            (Key::VolumeName(n), _) if Some(n.as_str()) == after => Seen::Skip,
            (Key::VolumeName(_), Value::Id(id)) => Seen::Take(*id),
            (Key::VolumeName(_), _) => Seen::Wrong,
            _ => Seen::End,
        })?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(self.volume(sm, id)?.ok_or_else(|| {
                Error::corrupt(
                    "catalog leaf",
                    0,
                    format!("a name names no volume {id:032x}"),
                )
            })?);
        }
        Ok((out, more))
    }

    /// Up to `max` snapshots in key order (volume id, then oldest first) after the one at
    /// `after` = (volume, generation, id), exclusive; only volume `only`'s when given. And
    /// whether more follow. Each volume's snapshot run is read alone.
    pub(crate) fn snapshots_after(
        &mut self,
        sm: &mut SpaceMap,
        only: Option<u128>,
        after: Option<(u128, u64, u128)>,
        max: usize,
    ) -> Result<(Vec<SnapshotRec>, bool)> {
        let mut out = Vec::new();
        let (mut volume, mut from) = match after {
            Some((v, g, i)) => (v, Part::Snapshot(g, i)),
            None => (only.unwrap_or(0), Part::Snapshot(0, 0)),
        };
        loop {
            if only.is_some_and(|o| o != volume) {
                return Ok((out, false));
            }
            let more =
                self.scan_page(sm, &Key::Vol(volume, from), max, &mut out, |k, v| {
                    match (k, v) {
                        (Key::Vol(id, Part::Snapshot(g, i)), _)
                            if *id == volume && after == Some((volume, *g, *i)) =>
                        {
                            Seen::Skip
                        }
                        (Key::Vol(id, Part::Snapshot(..)), Value::Snapshot(s)) if *id == volume => {
                            Seen::Take(s.clone())
                        }
                        (Key::Vol(id, Part::Snapshot(..)), _) if *id == volume => Seen::Wrong,
                        _ => Seen::End,
                    }
                })?;
            if more || only.is_some() {
                return Ok((out, more));
            }
            // The next volume that has entries (records, or snapshots of a deleted one).
            let Some(next) = volume.checked_add(1) else {
                return Ok((out, false));
            };
            let mut t = tree(&mut self.nodes, sm, Reserve::Keep);
            match self
                .buffer
                .next_key(&mut t, self.root, &Key::Vol(next, Part::Record))?
            {
                Some(Key::Vol(id, _)) => {
                    volume = id;
                    from = Part::Snapshot(0, 0);
                }
                _ => return Ok((out, false)),
            }
        }
    }

    /// Up to `max` bookmarks in id order after id `after` (exclusive), and whether more
    /// follow.
    pub(crate) fn bookmarks_after(
        &mut self,
        sm: &mut SpaceMap,
        after: Option<u128>,
        max: usize,
    ) -> Result<(Vec<BookmarkRec>, bool)> {
        let mut out = Vec::new();
        let from = Key::Bookmark(after.unwrap_or(0));
        let more = self.scan_page(sm, &from, max, &mut out, |k, v| match (k, v) {
            (Key::Bookmark(id), _) if Some(*id) == after => Seen::Skip,
            (Key::Bookmark(_), Value::Bookmark(b)) => Seen::Take(b.clone()),
            (Key::Bookmark(_), _) => Seen::Wrong,
            _ => Seen::End,
        })?;
        Ok((out, more))
    }
}

/// What a page scan makes of one catalog entry.
enum Seen<T> {
    /// Not part of the page (the entry the page continues after).
    Skip,
    /// The page's next entry.
    Take(T),
    /// In the run, but its value is of the wrong kind: corruption.
    Wrong,
    /// Past the run: the scan ends.
    End,
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

impl crate::txn::Engine {
    /// The record of volume `id`, visible or hidden.
    pub(crate) fn volume_rec(&mut self, id: u128) -> Result<Option<VolumeRec>> {
        let (c, sm) = self.cat();
        c.volume(sm, id)
    }

    /// The visible volume named `name`.
    pub(crate) fn volume_named(&mut self, name: &str) -> Result<VolumeRec> {
        let (c, sm) = self.cat();
        c.volume_named(sm, name)
    }

    /// Whether a visible volume is named `name`.
    pub(crate) fn volume_exists(&mut self, name: &str) -> Result<bool> {
        let (c, sm) = self.cat();
        Ok(c.volume_id(sm, name)?.is_some())
    }

    pub(crate) fn snapshot_rec(&mut self, id: u128) -> Result<Option<SnapshotRec>> {
        let (c, sm) = self.cat();
        c.snapshot(sm, id)
    }

    /// `vol@snap`: snapshot `snap` of the visible volume `vol`.
    pub(crate) fn snapshot_named(&mut self, vol: &str, snap: &str) -> Result<SnapshotRec> {
        let missing = || Error::SnapshotNotFound(format!("{vol}@{snap}").into());
        let (c, sm) = self.cat();
        let Some(vid) = c.volume_id(sm, vol)? else {
            return Err(missing());
        };
        c.snapshot_named(sm, vid, snap)?.ok_or_else(missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdata::codec::{Reader, Writer};

    fn keys() -> Vec<Key> {
        vec![
            Key::Vol(7, Part::Record),
            Key::Vol(7, Part::Snapshot(3, 9)),
            Key::Vol(7, Part::SnapshotName("mon".into())),
            Key::Vol(7, Part::BookmarkName("old".into())),
            Key::Vol(7, Part::Rollback(12)),
            Key::SnapshotId(9),
            Key::Bookmark(9),
            Key::VolumeName("pvc-1234_ok.v2".into()),
            Key::Hidden(8),
        ]
    }

    fn values() -> Vec<Value> {
        vec![
            Value::Volume(VolumeRec {
                id: 7,
                name: "db".into(),
                size: 1 << 30,
                root: 9,
                created: 1,
                origin: Some(crate::Origin::Volume(crate::VolumeId::from_u128(3))),
                frozen_gen: 4,
                hidden: true,
            }),
            Value::Snapshot(SnapshotRec {
                id: 3,
                volume: 7,
                volume_name: "db".into(),
                name: "before-upgrade".into(),
                size: 1 << 30,
                root: 10,
                generation: 4,
                created: 2,
            }),
            Value::Bookmark(BookmarkRec {
                id: 5,
                volume: 7,
                volume_name: "db".into(),
                name: "old".into(),
                size: 10,
                generation: 3,
                created: 1,
            }),
            Value::Id(u128::MAX),
            Value::Generation(u64::MAX),
            Value::At {
                volume: 7,
                generation: 4,
                id: 3,
            },
            Value::Nothing,
        ]
    }

    /// Every key and value round-trips with the length it claims; any cut of its bytes is
    /// a corruption error, never a panic or a wrong entry.
    #[test]
    fn entries_round_trip_and_truncation_is_corruption() {
        for k in keys() {
            let mut w = Writer(Vec::new());
            k.encode(&mut w);
            assert_eq!(w.0.len(), k.encoded_len(), "{k:?}");
            assert_eq!(Key::decode(&mut Reader::new(&w.0, "t", 1)).unwrap(), k);
            for cut in 0..w.0.len() {
                let r = Key::decode(&mut Reader::new(&w.0[..cut], "t", 1));
                assert!(matches!(r, Err(Error::Corrupt { .. })), "{k:?} cut {cut}");
            }
        }
        for v in values() {
            let mut w = Writer(Vec::new());
            v.encode(&mut w);
            assert_eq!(w.0.len(), v.encoded_len(), "{v:?}");
            assert_eq!(Value::decode(&mut Reader::new(&w.0, "t", 1)).unwrap(), v);
            for cut in 0..w.0.len() {
                let r = Value::decode(&mut Reader::new(&w.0[..cut], "t", 1));
                assert!(matches!(r, Err(Error::Corrupt { .. })), "{v:?} cut {cut}");
            }
        }
        // Unknown kinds, a name longer than the rule allows, a bad flag.
        for bad in [
            &[0u8][..],
            &[6],
            &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
        ] {
            assert!(matches!(
                Key::decode(&mut Reader::new(bad, "t", 1)),
                Err(Error::Corrupt { .. })
            ));
        }
        let mut long = vec![4u8, 201];
        long.extend(std::iter::repeat_n(b'a', 201));
        assert!(matches!(
            Key::decode(&mut Reader::new(&long, "t", 1)),
            Err(Error::Corrupt { .. })
        ));
        let mut w = Writer(Vec::new());
        values()[0].encode(&mut w);
        let last = w.0.len() - 1;
        // Bits 0 and 1 of the flags byte are defined (hidden, origin is a volume).
        w.0[last] = 4;
        assert!(matches!(
            Value::decode(&mut Reader::new(&w.0, "t", 1)),
            Err(Error::Corrupt { .. })
        ));
    }

    /// The key order keeps a volume's entries together and in the documented order, so a
    /// volume's snapshots are one range, oldest first.
    #[test]
    fn key_order_groups_each_volume() {
        let mut ks = keys();
        ks.push(Key::Vol(6, Part::Rollback(u64::MAX)));
        ks.push(Key::Vol(8, Part::Record));
        ks.push(Key::Vol(7, Part::Snapshot(2, u128::MAX)));
        ks.sort();
        let vol7: Vec<usize> = (0..ks.len())
            .filter(|&i| matches!(ks[i], Key::Vol(7, _)))
            .collect();
        assert!(vol7.windows(2).all(|w| w[1] == w[0] + 1), "{ks:?}");
        assert_eq!(ks[vol7[0]], Key::Vol(7, Part::Record));
        assert_eq!(ks[vol7[1]], Key::Vol(7, Part::Snapshot(2, u128::MAX)));
        assert_eq!(ks[vol7[2]], Key::Vol(7, Part::Snapshot(3, 9)));
        assert!(matches!(ks.last(), Some(Key::Hidden(_))));
    }

    /// `check` finds an index entry that leads nowhere and a record its index lost.
    #[test]
    fn verify_indexes_finds_what_disagrees() {
        let dev = std::sync::Arc::new(crate::device::MemoryDevice::new(4 << 20));
        let mut sm = SpaceMap::create(dev.clone(), 1024);
        let mut c = Catalog::open(dev, 0, 0, 1024, 1, Counts::default()).unwrap();
        let r = Reserve::Keep;
        let Value::Volume(vol) = values()[0].clone() else {
            unreachable!()
        };
        let vol = VolumeRec {
            hidden: false,
            ..vol
        };
        c.add_volume(&mut sm, r, vol.clone()).unwrap();
        let Value::Snapshot(snap) = values()[1].clone() else {
            unreachable!()
        };
        c.add_snapshot(&mut sm, r, snap.clone()).unwrap();
        let Value::Bookmark(bm) = values()[2].clone() else {
            unreachable!()
        };
        c.add_bookmark(&mut sm, r, bm).unwrap();
        assert_eq!(c.verify_indexes(&mut sm).unwrap(), Vec::<String>::new());
        // The id index of the snapshot goes: its record is no longer indexed as itself.
        c.del(&mut sm, r, &Key::SnapshotId(snap.id)).unwrap();
        let bad = c.verify_indexes(&mut sm).unwrap();
        assert!(bad.iter().any(|b| b.contains("before-upgrade")), "{bad:?}");
        // A name pointing at a volume that is not there.
        c.put(&mut sm, r, Key::VolumeName("ghost".into()), Value::Id(99))
            .unwrap();
        let bad = c.verify_indexes(&mut sm).unwrap();
        assert!(bad.iter().any(|b| b.contains("ghost")), "{bad:?}");
        // Counts that do not add up.
        c.counts.snapshots += 5;
        let bad = c.verify_indexes(&mut sm).unwrap();
        assert!(bad.iter().any(|b| b.contains("counts")), "{bad:?}");
    }

    /// A value naming a map root outside the pool, or a size past the largest volume, is
    /// refused when its page is decoded.
    #[test]
    fn records_pointing_outside_the_pool_are_corrupt() {
        let v = |root, size| {
            Value::Volume(VolumeRec {
                id: 1,
                name: "v".into(),
                size,
                root,
                created: 0,
                origin: None,
                frozen_gen: 0,
                hidden: false,
            })
        };
        assert!(CatalogSchema::check_value(&v(9, 1), 100).is_ok());
        assert!(CatalogSchema::check_value(&v(0, 1), 100).is_ok());
        assert!(CatalogSchema::check_value(&v(100, 1), 100).is_err());
        assert!(CatalogSchema::check_value(&v(1, 1), 100).is_err());
        assert!(CatalogSchema::check_value(&v(9, format::MAX_VOLUME_BYTES + 1), 100).is_err());
    }
}
