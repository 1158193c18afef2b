//! What one NBD connection serves: a volume (read-write) or a snapshot (read-only), named as
//! on the command line: `VOL` or `VOL@SNAP`.

use super::wire::{STATE_HOLE, STATE_ZERO};
use crate::diff::{DiffTarget, TupleLength};
use crate::error::{Error, Result};
use crate::pool::Pool;
use crate::volume::{Snapshot, Volume};

pub(crate) enum Export {
    Volume(Volume),
    Snapshot(Snapshot),
}

/// Which export a connection serves, whatever name it used: a volume's or a snapshot's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ExportKey {
    Volume(crate::VolumeId),
    Snapshot(crate::SnapshotId),
}

/// The exports a server offers: the pool's volumes and snapshots, less those it closed.
pub(crate) struct Exports<'a> {
    pub pool: &'a Pool,
    pub closed: Option<&'a parking_lot::Mutex<std::collections::HashSet<ExportKey>>>,
    /// Called when a client chooses an export, before the reply that lets it start: the
    /// server registers the connection under the export there, so a `close_export` that
    /// runs after the client saw its choice accepted always finds it. `false`: the export
    /// was closed meanwhile and is refused as unknown.
    pub claim: Option<&'a dyn Fn(ExportKey) -> bool>,
}

impl Exports<'_> {
    /// The export called `name`, unless it is closed.
    pub(crate) fn open(&self, name: &str) -> Option<Export> {
        let e = Export::open(self.pool, name)?;
        match self.closed {
            Some(c) if c.lock().contains(&e.key()) => None,
            _ => Some(e),
        }
    }

    /// The names of the exports offered.
    /// Claims `export` for the connection (see [`Exports::claim`]).
    pub(crate) fn claim(&self, export: &Export) -> bool {
        self.claim.is_none_or(|c| c(export.key()))
    }

    pub(crate) fn names(&self) -> Result<Vec<String>> {
        let names = Export::names(self.pool)?;
        Ok(match self.closed {
            Some(c) if !c.lock().is_empty() => names
                .into_iter()
                .filter(|n| self.open(n).is_some())
                .collect(),
            _ => names,
        })
    }
}

impl Export {
    /// The export's identity.
    pub(crate) fn key(&self) -> ExportKey {
        match self {
            Export::Volume(v) => ExportKey::Volume(v.id()),
            Export::Snapshot(s) => ExportKey::Snapshot(s.id()),
        }
    }

    /// The export called `name`; the empty name (a client that asked for none) is the
    /// pool's only volume when it has exactly one.
    pub(crate) fn open(pool: &Pool, name: &str) -> Option<Export> {
        if name.is_empty() {
            let vols = pool.volumes().ok()?;
            return match vols.as_slice() {
                [only] => pool.volume(&only.name).ok().map(Export::Volume),
                _ => None,
            };
        }
        match name.parse::<crate::ObjectName>().ok()? {
            crate::ObjectName::Volume(v) => pool.volume(&v).ok().map(Export::Volume),
            crate::ObjectName::Snapshot { volume, snapshot } => pool
                .snapshot_handle(&volume, &snapshot)
                .ok()
                .map(Export::Snapshot),
            // `@ID`: also a snapshot of a deleted volume, which has no `VOL@SNAP` name.
            crate::ObjectName::SnapshotId(id) => pool.snapshot_by_id(id).ok().map(Export::Snapshot),
            _ => None,
        }
    }

    /// Every export name the pool offers, volumes first, then each volume's snapshots.
    /// (Snapshots of deleted volumes have no `vol@snap` name to open them by.)
    pub(crate) fn names(pool: &Pool) -> Result<Vec<String>> {
        let vols = pool.volumes()?;
        let mut names: Vec<String> = vols.iter().map(|v| v.name.clone()).collect();
        for v in &vols {
            names.extend(
                pool.volume_snapshots(v.id)?
                    .into_iter()
                    .map(|s| format!("{}@{}", v.name, s.name)),
            );
        }
        Ok(names)
    }

    pub(crate) fn read_only(&self) -> bool {
        matches!(self, Export::Snapshot(_))
    }

    pub(crate) fn len(&self) -> Result<u64> {
        match self {
            Export::Volume(v) => v.len(),
            Export::Snapshot(s) => s.len(),
        }
    }

    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self {
            Export::Volume(v) => v.read_at(buf, offset),
            Export::Snapshot(s) => s.read_at(buf, offset),
        }
    }

    /// The volume to change; a snapshot export refuses (checked before any change).
    pub(crate) fn writable(&self) -> Result<&Volume> {
        match self {
            Export::Volume(v) => Ok(v),
            Export::Snapshot(s) => Err(Error::ReadOnly(format!(
                "snapshot export {}",
                s.name().unwrap_or_else(|_| s.id().to_string())
            ))),
        }
    }

    pub(crate) fn flush(&self) -> Result<()> {
        match self {
            Export::Volume(v) => v.flush(),
            // Nothing of a snapshot is ever unflushed.
            Export::Snapshot(_) => Ok(()),
        }
    }

    /// NBD block status for `from..to` (non-empty, inside the export) from the block map
    /// alone: runs of data (flags 0) and of unmapped blocks, which read as zeros (hole and
    /// zero flags), starting at `from`. At most `max` runs; fewer than reach `to` when the
    /// map has more extents than that (the client asks again from where they end).
    pub(crate) fn block_status(&self, from: u64, to: u64, max: usize) -> Result<Vec<(u32, u32)>> {
        let (pool, target) = match self {
            Export::Volume(v) => (v.pool(), DiffTarget::Volume(v.id())),
            Export::Snapshot(s) => (s.pool(), DiffTarget::Snapshot(s.id())),
        };
        let page = pool.allocated(target, from, max, TupleLength::Variable)?;
        let mut runs = Vec::new();
        let mut at = from;
        // Whether the map is known up to `to`: an extent starting at or past it was seen, or
        // the page holds every extent that is left.
        let mut known = page.next_offset.is_none();
        for e in &page.extents {
            let (start, end) = (e.offset.max(at), (e.offset + e.length).min(to));
            if start >= to {
                known = true;
                break;
            }
            if start > at {
                runs.push(((start - at) as u32, STATE_HOLE | STATE_ZERO));
            }
            runs.push(((end - start) as u32, 0));
            at = end;
        }
        if known && at < to {
            runs.push(((to - at) as u32, STATE_HOLE | STATE_ZERO));
        }
        runs.truncate(max);
        Ok(runs)
    }
}
