//! Changed-block tracking in the shape of the Kubernetes CSI SnapshotMetadata service:
//! `allocated` (GetMetadataAllocated) and `delta` (GetMetadataDelta) return extents
//! `(byte offset, length)` in strictly increasing, non-overlapping order, resumable from a
//! `starting_offset` and pageable with `max_results`, so a CSI driver can serve those RPCs
//! directly. Neither ever reads a data block: `delta` walks both block maps and skips every
//! subtree they share, so its cost follows the change.

use crate::error::{Error, Result};
use crate::ids::{Base, BookmarkId, SnapshotId, VolumeId};
use crate::map::{Change, Found};
use crate::pool::Pool;
use crate::txn::Engine;

/// What an extent reads as in the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// Written data (allocated blocks).
    Data,
    /// Reads as zeros: discarded, zeroed or never written (in a delta: since the base).
    Zero,
}

/// A byte range of a volume or snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Where it starts, in bytes.
    pub offset: u64,
    /// Its length in bytes.
    pub length: u64,
    /// What it reads as in the target.
    pub kind: ExtentKind,
}

/// CSI's BlockMetadataType: one tuple per block, or runs merged into variable-length tuples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TupleLength {
    /// One extent per block (CSI's FIXED_LENGTH).
    Fixed,
    /// Adjacent blocks of one kind merged into one extent (CSI's VARIABLE_LENGTH).
    Variable,
}

/// One page of results.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentPage {
    /// The extents, in increasing offset order, not overlapping.
    pub extents: Vec<Extent>,
    /// Size of the target in bytes (CSI's volume_capacity_bytes).
    pub volume_size: u64,
    /// The block size tuples are made of.
    pub block_size: u64,
    /// Where the next page starts, or None when this page reaches the end.
    pub next_offset: Option<u64>,
}

/// The newer side of a diff: a snapshot, or the live volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiffTarget {
    /// A snapshot (also one of a deleted volume).
    Snapshot(SnapshotId),
    /// A live volume, as it is at the call.
    Volume(VolumeId),
}

/// Blocks looked at per window: bounds the work of one page when the limit is small.
const WINDOW: u64 = 1 << 16;

impl Engine {
    fn diff_target(&mut self, t: DiffTarget) -> Result<(u64, u64)> {
        match t {
            DiffTarget::Snapshot(id) => self
                .snapshot_rec(id.as_u128())?
                .map(|s| (s.root, s.size))
                .ok_or_else(|| Error::SnapshotNotFound(id.into())),
            DiffTarget::Volume(id) => self
                .volume_rec(id.as_u128())?
                .filter(|v| !v.hidden)
                .map(|v| (v.root, v.size))
                .ok_or_else(|| Error::VolumeNotFound(id.into())),
        }
    }

    /// Runs `collect(lo, hi, out)` over key windows from `starting_offset`, turning the
    /// changed blocks it reports into extents, until `max_results` extents are complete.
    /// `collect` returns the first key at or after `hi` that may matter.
    fn page(
        &mut self,
        size: u64,
        starting_offset: u64,
        max_results: usize,
        tuples: TupleLength,
        mut collect: impl FnMut(&mut Engine, u64, u64, &mut Vec<(u64, ExtentKind)>) -> Result<u64>,
    ) -> Result<ExtentPage> {
        let bs = self.store.block_size as u64;
        let end_key = size.div_ceil(bs);
        let limit = if max_results == 0 {
            usize::MAX
        } else {
            max_results
        };
        let mut extents: Vec<Extent> = Vec::new();
        let mut key = starting_offset / bs;
        let mut blocks = Vec::new();
        let mut complete = false;
        while key < end_key {
            let hi = key.saturating_add(WINDOW).min(end_key);
            blocks.clear();
            // `collect` says where the next block of interest may be, so empty stretches of a
            // huge sparse volume are skipped in one step instead of window by window.
            let next = collect(self, key, hi, &mut blocks)?.max(hi);
            for &(k, kind) in &blocks {
                let offset = k * bs;
                let length = bs.min(size - offset);
                match extents.last_mut() {
                    Some(e)
                        if tuples == TupleLength::Variable
                            && e.kind == kind
                            && e.offset + e.length == offset =>
                    {
                        e.length += length;
                    }
                    _ => {
                        if extents.len() == limit {
                            // The page is full and its last extent can grow no more.
                            complete = true;
                            break;
                        }
                        extents.push(Extent {
                            offset,
                            length,
                            kind,
                        });
                    }
                }
            }
            if complete {
                break;
            }
            key = next;
        }
        let next_offset = if complete {
            extents.last().map(|e| e.offset + e.length)
        } else {
            None
        };
        Ok(ExtentPage {
            extents,
            volume_size: size,
            block_size: bs,
            next_offset,
        })
    }
}

impl Pool {
    /// The allocated (written) extents of a snapshot or volume from `starting_offset` on: the
    /// first extent ends after `starting_offset`. At most `max_results` extents (0 = all).
    pub fn allocated(
        &self,
        target: DiffTarget,
        starting_offset: u64,
        max_results: usize,
        tuples: TupleLength,
    ) -> Result<ExtentPage> {
        self.with(|e| {
            e.check_usable()?;
            let (root, size) = e.diff_target(target)?;
            let mut found: Vec<Found> = Vec::new();
            e.page(
                size,
                starting_offset,
                max_results,
                tuples,
                |e, lo, hi, out| {
                    found.clear();
                    e.store.lookup_range_for_read(root, lo, hi, &mut found)?;
                    out.extend(found.iter().map(|f| (f.key, ExtentKind::Data)));
                    Ok(e.store.next_key(root, hi)?.unwrap_or(u64::MAX))
                },
            )
        })
    }

    /// The extents that differ between snapshot `base` and `target` (a later snapshot or
    /// the live volume), from `starting_offset` on; each is Data (written since the base) or
    /// Zero (discarded or zeroed since the base). Reading the target at these extents and
    /// applying them to a copy of the base gives the target.
    pub fn delta(
        &self,
        base: Base,
        target: DiffTarget,
        starting_offset: u64,
        max_results: usize,
        tuples: TupleLength,
    ) -> Result<ExtentPage> {
        self.with(|e| {
            e.check_usable()?;
            let (root, size) = e.diff_target(target)?;
            if let Base::Snapshot(id) = base {
                let base_root = e
                    .snapshot_rec(id.as_u128())?
                    .ok_or_else(|| Error::SnapshotNotFound(id.into()))?
                    .root;
                let mut changes: Vec<Change> = Vec::new();
                return e.page(
                    size,
                    starting_offset,
                    max_results,
                    tuples,
                    |e, lo, hi, out| {
                        changes.clear();
                        e.store.diff_maps(base_root, root, lo, hi, &mut changes)?;
                        out.extend(changes.iter().map(block_kind));
                        // Nothing can differ where neither map has an entry.
                        let a = e.store.next_key(base_root, hi)?.unwrap_or(u64::MAX);
                        let b = e.store.next_key(root, hi)?.unwrap_or(u64::MAX);
                        Ok(a.min(b))
                    },
                );
            }
            let Base::Bookmark(base) = base else {
                unreachable!("a snapshot base returned above")
            };
            let since = e.bookmark_base(base, target)?;
            // From a bookmark the base map is gone: the target's map alone says what may have
            // changed since (Store::changed_since). Unmapped blocks it cannot vouch for are
            // reported as zeros, which is correct whatever the base held there.
            let mut changes: Vec<Change> = Vec::new();
            e.page(
                size,
                starting_offset,
                max_results,
                tuples,
                |e, lo, hi, out| {
                    changes.clear();
                    e.store.changed_since(root, since, lo, hi, &mut changes)?;
                    out.extend(changes.iter().map(block_kind));
                    Ok(hi)
                },
            )
        })
    }
}

/// A changed block is data where the target maps it and reads as zeros where it does not.
fn block_kind(c: &Change) -> (u64, ExtentKind) {
    let kind = if c.now.is_some() {
        ExtentKind::Data
    } else {
        ExtentKind::Zero
    };
    (c.key, kind)
}

impl Engine {
    /// Checks that bookmark `id` describes an ancestor of `target`; returns its generation.
    fn bookmark_base(&mut self, id: BookmarkId, target: DiffTarget) -> Result<u64> {
        let (c, sm) = self.cat();
        let bm = c
            .bookmark(sm, id.as_u128())?
            .ok_or_else(|| Error::BookmarkNotFound(id.into()))?;
        let (volume, at) = match target {
            DiffTarget::Snapshot(s) => {
                let rec = self
                    .snapshot_rec(s.as_u128())?
                    .ok_or_else(|| Error::SnapshotNotFound(s.into()))?;
                (rec.volume, rec.generation)
            }
            DiffTarget::Volume(v) => (v.as_u128(), u64::MAX),
        };
        let not_ancestor = |why: &str| Error::NotAncestor {
            base: format!("bookmark {}#{}", bm.volume_name, bm.name),
            reason: why.to_string(),
        };
        if volume != bm.volume || at < bm.generation {
            return Err(not_ancestor("another volume, or an older state"));
        }
        // Follow the state at `at` back through the rollbacks that happened after the
        // bookmark: a rollback done at generation d to a snapshot of generation g makes the
        // state after d the state at g. The bookmark is an ancestor if that walk never goes
        // back before it (rolling back to the bookmarked snapshot itself, or forward again
        // to a later one, keeps it an ancestor).
        let (c, sm) = self.cat();
        let rollbacks = c.rollbacks(sm, volume)?;
        let mut t = at;
        while let Some(&(_, to)) = rollbacks
            .iter()
            .rev()
            .find(|&&(done, _)| done > bm.generation && done <= t)
        {
            if to < bm.generation {
                return Err(not_ancestor("the volume was rolled back past it"));
            }
            t = to;
        }
        Ok(bm.generation)
    }
}
