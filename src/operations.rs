//! The catalog operations: create, snapshot, clone, rollback, delete, bookmark, rename,
//! resize and usage, each by name (how operators and the CLI say it) and by id (how CSI
//! keeps it: `volume_id`, `snapshot_id`). Each is its own transaction, durable when it
//! returns; snapshots and clones add one reference to a block map root, O(1) whatever the
//! volume holds.
//!
//! Creation is idempotent as CSI asks: creating a volume, snapshot or clone under a name
//! that already holds the same thing (same size and no source, the same snapshot, the same
//! origin) returns what is there; a different one under that name is
//! [`Error::AlreadyExists`] saying how it differs. A retried request after a lost reply thus
//! never makes a second object or fails.
//!
//! The name-based calls resolve names to records and run the same engine code as the id
//! calls, inside one lock, so a rename between the two steps cannot redirect them.

use crate::catalog::{validate_name, BookmarkRec, SnapshotRec, VolumeRec};
use crate::error::{Error, Result};
use crate::ids::{new_id, now_unix, BookmarkId, Origin, SnapshotId, VolumeId};
use crate::pool::{Pool, Usage, VolumeInfo};
use crate::space::Reserve;
use crate::txn::Engine;
use crate::volume::{Snapshot, Volume};

impl Pool {
    /// Creates a thin volume of `size` bytes (no space is used until written). If a volume
    /// `name` of that size exists and is no clone, it is returned (see the module docs).
    pub fn create_volume(&self, name: &str, size: u64) -> Result<Volume> {
        validate_name(name)?;
        crate::format::check_volume_size(size)?;
        let id = self.with(|e| e.new_volume_from(name, 0, size, None))?;
        Ok(self.volume_handle(id))
    }

    /// Takes a read-only snapshot `vol@name`; returns its id. Every write completed before
    /// the call is in it; none after. If `vol@name` exists, its id is returned.
    pub fn snapshot(&self, vol: &str, name: &str) -> Result<SnapshotId> {
        Ok(self.snapshot_group(&[(vol, name)])?[0])
    }

    /// Snapshots several volumes in one atomic commit (a consistency group). If every
    /// snapshot named exists (a retried request), their ids are returned; if only some do,
    /// nothing is taken and the error names one that exists.
    pub fn snapshot_group(&self, items: &[(&str, &str)]) -> Result<Vec<SnapshotId>> {
        for (vol, name) in items {
            validate_name(vol)?;
            validate_name(name)?;
        }
        self.with(|e| {
            let mut resolved = Vec::with_capacity(items.len());
            for (vol, name) in items {
                resolved.push((e.volume_named(vol)?, *name));
            }
            e.snapshot_volumes(&resolved)
        })
    }

    /// [`Pool::snapshot_group`] of volumes given by id.
    pub fn snapshot_group_by_id(&self, items: &[(VolumeId, &str)]) -> Result<Vec<SnapshotId>> {
        for (_, name) in items {
            validate_name(name)?;
        }
        self.with(|e| {
            let mut resolved = Vec::with_capacity(items.len());
            for (vol, name) in items {
                resolved.push((e.visible_volume(*vol)?, *name));
            }
            e.snapshot_volumes(&resolved)
        })
    }

    /// A writable clone of snapshot `vol@snap`, sharing every block with it. If volume
    /// `new_name` exists as a clone of that snapshot, it is returned.
    pub fn clone_snapshot(&self, vol: &str, snap: &str, new_name: &str) -> Result<Volume> {
        validate_name(new_name)?;
        let id = self.with(|e| {
            let s = e.snapshot_named(vol, snap)?;
            e.clone_from_snapshot(&s, new_name)
        })?;
        Ok(self.volume_handle(id))
    }

    /// [`Pool::clone_snapshot`] of a snapshot given by id (also one of a deleted volume).
    pub fn clone_snapshot_by_id(&self, snap: SnapshotId, new_name: &str) -> Result<Volume> {
        validate_name(new_name)?;
        let id = self.with(|e| {
            let s = e.snapshot_by(snap)?;
            e.clone_from_snapshot(&s, new_name)
        })?;
        Ok(self.volume_handle(id))
    }

    /// A writable clone of the live volume `vol`, frozen at this instant. If volume
    /// `new_name` exists as a clone of `vol`, it is returned.
    pub fn clone_volume(&self, vol: &str, new_name: &str) -> Result<Volume> {
        validate_name(new_name)?;
        let id = self.with(|e| {
            let v = e.volume_named(vol)?;
            e.clone_from_volume(&v, new_name)
        })?;
        Ok(self.volume_handle(id))
    }

    /// [`Pool::clone_volume`] of a volume given by id.
    pub fn clone_volume_by_id(&self, vol: VolumeId, new_name: &str) -> Result<Volume> {
        validate_name(new_name)?;
        let id = self.with(|e| {
            let v = e.visible_volume(vol)?;
            e.clone_from_volume(&v, new_name)
        })?;
        Ok(self.volume_handle(id))
    }

    /// Returns volume `vol` to snapshot `vol@snap` in O(1), keeping every snapshot.
    pub fn rollback(&self, vol: &str, snap: &str) -> Result<()> {
        self.with(|e| {
            let v = e.volume_named(vol)?;
            let s = e.snapshot_named(vol, snap)?;
            e.rollback_to(&v, &s)
        })
    }

    /// Returns volume `vol` to its snapshot `snap` in O(1), keeping every snapshot. A
    /// snapshot of another volume is [`Error::InvalidArgument`].
    pub fn rollback_by_id(&self, vol: VolumeId, snap: SnapshotId) -> Result<()> {
        self.with(|e| {
            let v = e.visible_volume(vol)?;
            let s = e.snapshot_by(snap)?;
            e.rollback_to(&v, &s)
        })
    }

    /// Deletes a volume, freeing the blocks nothing else references. Its snapshots stay
    /// (addressable as before, by `oldname@snap` or id); clones of it are not affected.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        self.with(|e| {
            let v = e.volume_named(name)?;
            e.delete_volume_rec(v.id)
        })
    }

    /// [`Pool::delete_volume`] by id.
    pub fn delete_volume_by_id(&self, id: VolumeId) -> Result<()> {
        self.with(|e| {
            let v = e.visible_volume(id)?;
            e.delete_volume_rec(v.id)
        })
    }

    /// Deletes snapshot `vol@snap`, freeing the blocks nothing else references. Clones of
    /// it are not affected.
    pub fn delete_snapshot(&self, vol: &str, snap: &str) -> Result<()> {
        self.with(|e| {
            let s = e.snapshot_named(vol, snap)?;
            e.delete_snapshot(s.id)
        })
    }

    /// Deletes the snapshot with id `id` (also one of a deleted volume, which has no
    /// `vol@snap` name any more), freeing the blocks nothing else references.
    pub fn delete_snapshot_by_id(&self, id: SnapshotId) -> Result<()> {
        self.with(|e| {
            let s = e.snapshot_by(id)?;
            e.delete_snapshot(s.id)
        })
    }

    /// Keeps snapshot `vol@snap`'s id and generation as bookmark `vol#snap`, so incremental
    /// sends and deltas can start from it after the snapshot is deleted (ZFS's idea). Costs
    /// one catalog entry and no space.
    pub fn bookmark(&self, vol: &str, snap: &str) -> Result<BookmarkId> {
        self.with(|e| {
            let s = e.snapshot_named(vol, snap)?;
            e.bookmark_snapshot(&s)
        })
    }

    /// [`Pool::bookmark`] of a snapshot given by id.
    pub fn bookmark_by_id(&self, snap: SnapshotId) -> Result<BookmarkId> {
        self.with(|e| {
            let s = e.snapshot_by(snap)?;
            e.bookmark_snapshot(&s)
        })
    }

    /// Finds bookmark `vol#name`; returns its id.
    pub fn bookmark_id(&self, vol: &str, name: &str) -> Result<BookmarkId> {
        self.with(|e| e.bookmark_named(vol, name).map(BookmarkId::from_u128))
    }

    /// Deletes bookmark `vol#name`.
    pub fn delete_bookmark(&self, vol: &str, name: &str) -> Result<()> {
        self.with(|e| {
            let id = e.bookmark_named(vol, name)?;
            e.delete_bookmark_rec(id)
        })
    }

    /// Deletes the bookmark with id `id`.
    pub fn delete_bookmark_by_id(&self, id: BookmarkId) -> Result<()> {
        self.with(|e| {
            let (c, sm) = e.cat();
            if c.bookmark(sm, id.as_u128())?.is_none() {
                return Err(Error::BookmarkNotFound(id.into()));
            }
            e.delete_bookmark_rec(id.as_u128())
        })
    }

    /// Renames a volume; its snapshots follow it.
    pub fn rename_volume(&self, name: &str, new_name: &str) -> Result<()> {
        validate_name(new_name)?;
        self.with(|e| {
            let v = e.volume_named(name)?;
            e.rename_rec(v.id, new_name)
        })
    }

    /// [`Pool::rename_volume`] by id.
    pub fn rename_volume_by_id(&self, id: VolumeId, new_name: &str) -> Result<()> {
        validate_name(new_name)?;
        self.with(|e| {
            let v = e.visible_volume(id)?;
            e.rename_rec(v.id, new_name)
        })
    }

    /// Grows or shrinks a volume. Shrinking frees the blocks past the new end; growing
    /// adds a range that reads as zeros.
    pub fn resize_volume(&self, name: &str, size: u64) -> Result<()> {
        let id = self.with(|e| Ok(e.volume_named(name)?.id))?;
        self.resize_by_id(id, size)
    }

    /// [`Pool::resize_volume`] by id.
    pub fn resize_volume_by_id(&self, id: VolumeId, size: u64) -> Result<()> {
        let raw = self.with(|e| Ok(e.visible_volume(id)?.id))?;
        self.resize_by_id(raw, size)
    }

    /// The volume with id `id`, as listed.
    pub fn volume_info(&self, id: VolumeId) -> Result<VolumeInfo> {
        self.with(|e| e.visible_volume(id).map(VolumeInfo::from))
    }

    /// Space used by a volume. Walks its block map.
    pub fn volume_usage(&self, name: &str) -> Result<Usage> {
        self.with(|e| {
            let v = e.volume_named(name)?;
            e.usage(v.root, v.size)
        })
    }

    /// [`Pool::volume_usage`] by id.
    pub fn volume_usage_by_id(&self, id: VolumeId) -> Result<Usage> {
        self.with(|e| {
            let v = e.visible_volume(id)?;
            e.usage(v.root, v.size)
        })
    }

    /// Space used by snapshot `vol@snap`. Walks its block map.
    pub fn snapshot_usage(&self, vol: &str, snap: &str) -> Result<Usage> {
        self.with(|e| {
            let s = e.snapshot_named(vol, snap)?;
            e.usage(s.root, s.size)
        })
    }

    /// Space used by a snapshot, by id. Walks its block map.
    pub fn snapshot_usage_by_id(&self, id: SnapshotId) -> Result<Usage> {
        self.with(|e| {
            let s = e.snapshot_by(id)?;
            e.usage(s.root, s.size)
        })
    }
}

impl Volume {
    /// Takes a snapshot of this volume named `name` (see [`Pool::snapshot`]).
    pub fn snapshot(&self, name: &str) -> Result<SnapshotId> {
        Ok(self.pool().snapshot_group_by_id(&[(self.id(), name)])?[0])
    }

    /// Grows or shrinks this volume (see [`Pool::resize_volume`]).
    pub fn resize(&self, size: u64) -> Result<()> {
        self.pool().resize_volume_by_id(self.id(), size)
    }

    /// Space this volume uses. Walks its block map.
    pub fn usage(&self) -> Result<Usage> {
        self.pool().volume_usage_by_id(self.id())
    }

    /// This volume as listed.
    pub fn info(&self) -> Result<VolumeInfo> {
        self.pool().volume_info(self.id())
    }
}

impl Snapshot {
    /// Space this snapshot uses. Walks its block map.
    pub fn usage(&self) -> Result<Usage> {
        self.pool().snapshot_usage_by_id(self.id())
    }

    /// This snapshot as listed.
    pub fn info(&self) -> Result<crate::SnapshotInfo> {
        self.pool().snapshot_info(self.id())
    }
}

impl Engine {
    /// The visible volume with id `id`.
    pub(crate) fn visible_volume(&mut self, id: VolumeId) -> Result<VolumeRec> {
        self.volume_rec(id.as_u128())?
            .filter(|v| !v.hidden)
            .ok_or_else(|| Error::VolumeNotFound(id.into()))
    }

    /// The snapshot with id `id`.
    pub(crate) fn snapshot_by(&mut self, id: SnapshotId) -> Result<SnapshotRec> {
        self.snapshot_rec(id.as_u128())?
            .ok_or_else(|| Error::SnapshotNotFound(id.into()))
    }

    fn bookmark_named(&mut self, vol: &str, name: &str) -> Result<u128> {
        let missing = || Error::BookmarkNotFound(format!("{vol}#{name}").into());
        let (c, sm) = self.cat();
        let vid = c.volume_id(sm, vol)?.ok_or_else(missing)?;
        c.bookmark_id(sm, vid, name)?.ok_or_else(missing)
    }

    /// A new volume: empty (root 0, no origin), or sharing map `root` of `origin` (a
    /// snapshot, or a live volume, which is then frozen: its blocks are no longer written in
    /// place). A volume `name` that is already this one (same origin; same size when it has
    /// none) is returned instead.
    fn new_volume_from(
        &mut self,
        name: &str,
        root: u64,
        size: u64,
        origin: Option<Origin>,
    ) -> Result<u128> {
        if self.volume_exists(name)? {
            let v = self.volume_named(name)?;
            let conflict = match (v.origin, origin) {
                (a, b) if a != b => match a {
                    None => "it is not a clone".to_string(),
                    Some(o) => format!("it is a clone of {}", describe_origin(o)),
                },
                (_, None) if v.size != size => {
                    format!("it is {} bytes, not {size}", v.size)
                }
                _ => return Ok(v.id),
            };
            return Err(Error::AlreadyExists {
                kind: "volume",
                name: name.into(),
                conflict,
            });
        }
        self.catalog_op(Reserve::Keep, |e, r| {
            e.store.share_tree(root)?;
            let id = new_id();
            let generation = e.store.generation;
            let (c, sm) = e.cat();
            if let Some(Origin::Volume(o)) = origin {
                if let Some(v) = c.volume_mut(sm, o.as_u128())? {
                    v.frozen_gen = generation;
                }
            }
            c.add_volume(
                sm,
                r,
                VolumeRec {
                    id,
                    name: name.into(),
                    size,
                    root,
                    created: now_unix(),
                    origin,
                    frozen_gen: generation,
                    hidden: false,
                },
            )?;
            Ok(id)
        })
    }

    fn clone_from_snapshot(&mut self, s: &SnapshotRec, new_name: &str) -> Result<u128> {
        let origin = Origin::Snapshot(SnapshotId::from_u128(s.id));
        self.new_volume_from(new_name, s.root, s.size, Some(origin))
    }

    fn clone_from_volume(&mut self, v: &VolumeRec, new_name: &str) -> Result<u128> {
        let origin = Origin::Volume(VolumeId::from_u128(v.id));
        self.new_volume_from(new_name, v.root, v.size, Some(origin))
    }

    /// Snapshots `items` (volume, snapshot name) in one commit, or returns the ids of the
    /// snapshots if all of them exist already.
    fn snapshot_volumes(&mut self, items: &[(VolumeRec, &str)]) -> Result<Vec<SnapshotId>> {
        let mut existing = Vec::new();
        let mut seen: Vec<(u128, &str)> = Vec::new();
        for (v, name) in items {
            if seen.contains(&(v.id, *name)) {
                return Err(Error::InvalidArgument(format!(
                    "snapshot {}@{name} is asked for twice",
                    v.name
                )));
            }
            seen.push((v.id, name));
            let (c, sm) = self.cat();
            if let Some(sid) = c.snapshot_named(sm, v.id, name)?.map(|s| s.id) {
                existing.push((format!("{}@{name}", v.name), SnapshotId::from_u128(sid)));
            }
        }
        if !existing.is_empty() {
            if existing.len() == items.len() {
                return Ok(existing.into_iter().map(|(_, id)| id).collect());
            }
            return Err(Error::AlreadyExists {
                kind: "snapshot",
                name: existing.swap_remove(0).0,
                conflict: "the other snapshots of the group do not exist".into(),
            });
        }
        self.catalog_op(Reserve::Keep, |e, r| {
            let generation = e.store.generation;
            let mut ids = Vec::new();
            for (vol, name) in items {
                let (c, sm) = e.cat();
                // The record is not rewritten: adding the snapshot raises the volume's
                // frozen generation (see `Catalog::add_snapshot`).
                let Some(v) = c.volume_ref(sm, vol.id)? else {
                    return Err(Error::VolumeNotFound(VolumeId::from_u128(vol.id).into()));
                };
                let rec = SnapshotRec {
                    id: new_id(),
                    volume: v.id,
                    volume_name: v.name.clone(),
                    name: name.to_string(),
                    size: v.size,
                    root: v.root,
                    generation,
                    created: now_unix(),
                };
                e.store.share_tree(rec.root)?;
                ids.push(SnapshotId::from_u128(rec.id));
                let (c, sm) = e.cat();
                c.add_snapshot(sm, r, rec)?;
            }
            Ok(ids)
        })
    }

    fn rollback_to(&mut self, v: &VolumeRec, s: &SnapshotRec) -> Result<()> {
        if s.volume != v.id {
            return Err(Error::InvalidArgument(format!(
                "snapshot {}@{} is not a snapshot of volume {:?}",
                s.volume_name, s.name, v.name
            )));
        }
        let (vid, name) = (v.id, v.name.clone());
        let (root, size, to) = (s.root, s.size, s.generation);
        let old_root = v.root;
        self.catalog_op(Reserve::Use, |e, r| {
            e.store.share_tree(root)?;
            e.store.drop_tree(old_root)?;
            let generation = e.store.generation;
            let (c, sm) = e.cat();
            let Some(rec) = c.volume_mut(sm, vid)? else {
                return Err(Error::VolumeNotFound(name.as_str().into()));
            };
            rec.root = root;
            rec.size = size;
            rec.frozen_gen = generation;
            c.add_rollback(sm, r, vid, generation, to)
        })
    }

    fn delete_volume_rec(&mut self, id: u128) -> Result<()> {
        self.catalog_op(Reserve::Use, |e, r| {
            let (c, sm) = e.cat();
            if let Some(rec) = c.remove_volume(sm, r, id)? {
                e.store.drop_tree(rec.root)?;
            }
            Ok(())
        })
    }

    fn delete_snapshot(&mut self, id: u128) -> Result<()> {
        self.catalog_op(Reserve::Use, |e, r| {
            let (c, sm) = e.cat();
            if let Some(s) = c.remove_snapshot(sm, r, id)? {
                e.store.drop_tree(s.root)?;
            }
            Ok(())
        })
    }

    fn bookmark_snapshot(&mut self, s: &SnapshotRec) -> Result<BookmarkId> {
        let (c, sm) = self.cat();
        if c.bookmark(sm, s.id)?.is_some() || c.bookmark_id(sm, s.volume, &s.name)?.is_some() {
            return Err(Error::AlreadyExists {
                kind: "bookmark",
                name: format!("{}#{}", s.volume_name, s.name),
                conflict: String::new(),
            });
        }
        let rec = BookmarkRec {
            id: s.id,
            volume: s.volume,
            volume_name: s.volume_name.clone(),
            name: s.name.clone(),
            size: s.size,
            generation: s.generation,
            created: now_unix(),
        };
        self.catalog_op(Reserve::Keep, |e, r| {
            let (c, sm) = e.cat();
            c.add_bookmark(sm, r, rec.clone())?;
            Ok(BookmarkId::from_u128(rec.id))
        })
    }

    fn delete_bookmark_rec(&mut self, id: u128) -> Result<()> {
        self.catalog_op(Reserve::Use, |e, r| {
            let (c, sm) = e.cat();
            c.remove_bookmark(sm, r, id)?;
            Ok(())
        })
    }

    fn rename_rec(&mut self, id: u128, new_name: &str) -> Result<()> {
        if self.volume_exists(new_name)? {
            return Err(Error::AlreadyExists {
                kind: "volume",
                name: new_name.into(),
                conflict: String::new(),
            });
        }
        self.catalog_op(Reserve::Use, |e, r| {
            let (c, sm) = e.cat();
            c.rename_volume(sm, r, id, new_name)
        })
    }

    fn usage(&mut self, root: u64, size: u64) -> Result<Usage> {
        let mut found = Vec::new();
        self.store.lookup_range(root, 0, u64::MAX, &mut found)?;
        let bs = self.store.block_size as u64;
        let mut u = Usage {
            logical: size,
            ..Usage::default()
        };
        for f in found {
            u.allocated += bs;
            if !f.path_shared && self.store.sm.get(f.value.unit)? == 1 {
                u.exclusive += bs;
            } else {
                u.shared += bs;
            }
        }
        Ok(u)
    }
}

/// "snapshot <id>" or "volume <id>".
fn describe_origin(o: Origin) -> String {
    match o {
        Origin::Snapshot(s) => format!("snapshot {s}"),
        Origin::Volume(v) => format!("volume {v}"),
    }
}
