//! Scrub: reads every data block the pool's maps point at and verifies it against the
//! checksum its map keeps, reporting each bad block with every volume and snapshot that
//! references it.
//!
//! The walk goes map by map (volumes and snapshots in id order) and key by key, in batches:
//! a batch's mappings are looked up under the engine lock, and its blocks are read and
//! verified outside it, holding the I/O gate (so no block of the batch is reused meanwhile)
//! while reads and writes of every volume carry on. A block a batch finds bad is looked up
//! and read again under the lock before it counts: a write may have replaced it meanwhile.
//!
//! Memory is bounded: one batch of mappings and its read buffer, plus the set of shared
//! blocks already verified (so a block shared by a volume and its snapshots is read once),
//! which stops growing at [`SEEN_CAP`] entries; past it a shared block may be read once per
//! map that points at it, never missed. The position is a [`ScrubCursor`]: a scrub stopped by
//! its progress callback resumes there.

use crate::error::{Error, Result};
use crate::io::Target;
use crate::map::{block_sum, Found};
use crate::store::Store;
use crate::{Pool, SnapshotId, VolumeId};
use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;

/// Bytes of data a batch reads at most (and blocks per batch at least one).
const BATCH_BYTES: usize = 8 << 20;
/// Shared blocks remembered as verified, at most (about 40 MiB of set).
pub const SEEN_CAP: usize = 2 << 20;
/// Bad blocks a scrub records, at most; more are counted but not listed.
const BAD_CAP: usize = 10_000;

/// Where a scrub stands: the map it is in (a volume or snapshot id) and the next block
/// number in it. Prints and parses as `v:<32 hex digits>:<block>` or `s:…:<block>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScrubCursor {
    target: CursorTarget,
    key: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum CursorTarget {
    Volume(u128),
    Snapshot(u128),
}

impl CursorTarget {
    fn io(self) -> Target {
        match self {
            CursorTarget::Volume(id) => Target::Volume(id),
            CursorTarget::Snapshot(id) => Target::Snapshot(id),
        }
    }
}

impl std::fmt::Display for ScrubCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.target {
            CursorTarget::Volume(id) => write!(f, "v:{id:032x}:{}", self.key),
            CursorTarget::Snapshot(id) => write!(f, "s:{id:032x}:{}", self.key),
        }
    }
}

impl std::str::FromStr for ScrubCursor {
    type Err = Error;
    fn from_str(s: &str) -> Result<ScrubCursor> {
        let bad = || Error::BadToken(format!("{s:?} is not a scrub position"));
        let mut parts = s.trim().split(':');
        let (Some(kind), Some(id), Some(key), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        if id.len() != 32 {
            return Err(bad());
        }
        let id = u128::from_str_radix(id, 16).map_err(|_| bad())?;
        let key = key.parse::<u64>().map_err(|_| bad())?;
        let target = match kind {
            "v" => CursorTarget::Volume(id),
            "s" => CursorTarget::Snapshot(id),
            _ => return Err(bad()),
        };
        Ok(ScrubCursor { target, key })
    }
}

/// What is wrong with a bad block.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BlockProblem {
    /// Its contents do not match the checksum its map keeps.
    Mismatch {
        /// The checksum the map keeps.
        expected: u32,
        /// The checksum of what was read.
        found: u32,
    },
    /// The device failed to read it.
    Unreadable(String),
}

/// A volume's or snapshot's reference to a block.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BlockRef {
    /// `vol` or `vol@snap`.
    pub name: String,
    /// The volume, when a volume references it.
    pub volume: Option<VolumeId>,
    /// The snapshot, when a snapshot references it.
    pub snapshot: Option<SnapshotId>,
    /// Byte offset of the block in it.
    pub offset: u64,
}

/// A block that failed verification.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BadBlock {
    /// Byte offset of the block on the pool's device.
    pub physical: u64,
    /// What is wrong.
    pub problem: BlockProblem,
    /// Every volume and snapshot that references it.
    pub references: Vec<BlockRef>,
}

/// How far a scrub has got (handed to its progress callback after every batch).
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ScrubProgress {
    /// Blocks read and verified so far.
    pub blocks: u64,
    /// Bytes read and verified so far.
    pub bytes: u64,
    /// Bad blocks found so far.
    pub bad: u64,
    /// Maps (volumes and snapshots) finished, of `maps_total`.
    pub maps_done: usize,
    /// Maps to scrub.
    pub maps_total: usize,
}

/// What a scrub found.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ScrubReport {
    /// Blocks read and verified.
    pub blocks: u64,
    /// Bytes read and verified.
    pub bytes: u64,
    /// References to blocks already verified through another map, not read again.
    pub shared_skipped: u64,
    /// Whether blocks were verified against checksums (false: a pool without data
    /// checksums, where a scrub finds only blocks the device cannot read).
    pub checksums: bool,
    /// The bad blocks (at most 10,000 listed; `bad_count` counts all).
    pub bad: Vec<BadBlock>,
    /// Bad blocks found.
    pub bad_count: u64,
    /// Where to resume when the progress callback stopped the scrub (None: it finished).
    pub resume: Option<ScrubCursor>,
}

impl ScrubReport {
    /// True when the scrub finished and found nothing wrong.
    pub fn is_clean(&self) -> bool {
        self.resume.is_none() && self.bad_count == 0
    }
}

impl Pool {
    /// Reads every block the pool's volumes and snapshots point at once and verifies it
    /// (see the module docs of `scrub` for how it runs alongside I/O). Starts at `from`
    /// (a cursor from an earlier, interrupted scrub) or at the beginning. `progress` is
    /// called after every batch; returning `ControlFlow::Break` stops the scrub with a
    /// report whose `resume` says where to go on.
    pub fn scrub(
        &self,
        from: Option<&ScrubCursor>,
        mut progress: impl FnMut(&ScrubProgress) -> ControlFlow<()>,
    ) -> Result<ScrubReport> {
        let mut targets: Vec<CursorTarget> = self
            .volumes()?
            .iter()
            .map(|v| CursorTarget::Volume(v.id.as_u128()))
            .chain(
                self.snapshots()?
                    .iter()
                    .map(|s| CursorTarget::Snapshot(s.id.as_u128())),
            )
            .collect();
        targets.sort();
        let (checksums, bs) = self.with(|e| Ok((e.store.checksums, e.store.block_size)))?;
        let per_batch = (BATCH_BYTES / bs).max(1) as u64;
        let mut report = ScrubReport {
            blocks: 0,
            bytes: 0,
            shared_skipped: 0,
            checksums,
            bad: Vec::new(),
            bad_count: 0,
            resume: None,
        };
        let mut prog = ScrubProgress {
            maps_total: targets.len(),
            ..ScrubProgress::default()
        };
        let mut seen: HashSet<u64> = HashSet::new();
        let mut bad_units: HashMap<u64, BlockProblem> = HashMap::new();
        let mut buf = vec![0u8; (per_batch as usize) * bs];
        let mut batch: Vec<Found> = Vec::new();
        let start = targets.partition_point(|t| from.is_some_and(|c| *t < c.target));
        for (i, &t) in targets.iter().enumerate().skip(start) {
            let mut key = match from {
                Some(c) if c.target == t => c.key,
                _ => 0,
            };
            loop {
                // The next batch of mappings, under the lock.
                batch.clear();
                let more = self.with(|e| {
                    let Some((root, _)) = e.root_and_size_of(t.io())? else {
                        return Ok(false); // deleted meanwhile
                    };
                    let Some(k) = e.store.next_key(root, key)? else {
                        return Ok(false);
                    };
                    let end = k.saturating_add(per_batch);
                    e.store.lookup_range(root, k, end, &mut batch)?;
                    key = end;
                    for f in batch.iter_mut() {
                        // `path_shared` from here on: may another map point at it too.
                        f.path_shared = f.path_shared || e.store.sm.get(f.value.unit)? > 1;
                    }
                    Ok(end != u64::MAX)
                })?;
                batch.retain(|f| {
                    let again = f.path_shared && seen.contains(&f.value.unit);
                    report.shared_skipped += u64::from(again);
                    !again
                });
                for f in &batch {
                    if f.path_shared && seen.len() < SEEN_CAP {
                        seen.insert(f.value.unit);
                    }
                }
                let items = &mut batch;
                let bad = self.verify_batch(t, items, &mut buf, bs, checksums)?;
                report.blocks += items.len() as u64;
                report.bytes += (items.len() * bs) as u64;
                for (unit, problem) in bad {
                    report.bad_count += 1;
                    if bad_units.len() < BAD_CAP {
                        bad_units.insert(unit, problem);
                    }
                }
                prog.blocks = report.blocks;
                prog.bytes = report.bytes;
                prog.bad = report.bad_count;
                prog.maps_done = i;
                if !more {
                    break;
                }
                if progress(&prog).is_break() {
                    report.resume = Some(ScrubCursor { target: t, key });
                    break;
                }
            }
            if report.resume.is_some() {
                break;
            }
        }
        if report.resume.is_none() {
            prog.maps_done = targets.len();
            let _ = progress(&prog);
        }
        report.bad = self.references(&targets, bad_units)?;
        Ok(report)
    }

    /// Reads and verifies a batch of `t`'s blocks outside the engine lock (holding the I/O
    /// gate): in device order, physically adjacent blocks in one read. Returns the bad
    /// ones, each confirmed under the lock.
    fn verify_batch(
        &self,
        t: CursorTarget,
        items: &mut [Found],
        buf: &mut [u8],
        bs: usize,
        checksums: bool,
    ) -> Result<Vec<(u64, BlockProblem)>> {
        items.sort_by_key(|f| f.value.unit);
        let units = (bs / crate::format::PAGE_SIZE) as u64;
        let mut suspects: Vec<&Found> = Vec::new();
        {
            let _gate = self.h.io_gate();
            let dev = self.h.device();
            let mut i = 0;
            while i < items.len() {
                // A run of physically contiguous blocks, read at once.
                let mut j = i + 1;
                while j < items.len() && items[j].value.unit == items[j - 1].value.unit + units {
                    j += 1;
                }
                let run = &mut buf[..(j - i) * bs];
                if dev.read_at(run, Store::byte(items[i].value.unit)).is_err() {
                    // Each block on its own, to tell which cannot be read.
                    suspects.extend(&items[i..j]);
                } else if checksums {
                    for (k, f) in items[i..j].iter().enumerate() {
                        if block_sum(&run[k * bs..(k + 1) * bs]) != f.value.sum {
                            suspects.push(f);
                        }
                    }
                }
                i = j;
            }
        }
        let mut bad = Vec::new();
        for f in suspects {
            if let Some(p) = self.confirm(t, f, &mut buf[..bs], checksums)? {
                bad.push((f.value.unit, p));
            }
        }
        Ok(bad)
    }

    /// Looks block `f` of `t` up again and rereads it, under the engine lock: what is still
    /// mapped there and still fails is bad.
    fn confirm(
        &self,
        t: CursorTarget,
        f: &Found,
        block: &mut [u8],
        checksums: bool,
    ) -> Result<Option<BlockProblem>> {
        self.with(|e| {
            let Some((root, _)) = e.root_and_size_of(t.io())? else {
                return Ok(None);
            };
            let mut now = Vec::new();
            e.store.lookup_range(root, f.key, f.key + 1, &mut now)?;
            if now.first().map(|n| n.value) != Some(f.value) {
                return Ok(None); // rewritten meanwhile
            }
            if let Err(err) = e.store.dev.read_at(block, Store::byte(f.value.unit)) {
                return Ok(Some(BlockProblem::Unreadable(err.to_string())));
            }
            let found = block_sum(block);
            Ok(
                (checksums && found != f.value.sum).then_some(BlockProblem::Mismatch {
                    expected: f.value.sum,
                    found,
                }),
            )
        })
    }

    /// Every reference to the bad units, from every map (one more walk of the maps, only
    /// when something was found).
    fn references(
        &self,
        targets: &[CursorTarget],
        bad_units: HashMap<u64, BlockProblem>,
    ) -> Result<Vec<BadBlock>> {
        if bad_units.is_empty() {
            return Ok(Vec::new());
        }
        let mut refs: HashMap<u64, Vec<BlockRef>> = HashMap::new();
        for &t in targets {
            let mut key = 0u64;
            loop {
                let mut batch = Vec::new();
                let (more, name, bs) = self.with(|e| {
                    let Some((root, _)) = e.root_and_size_of(t.io())? else {
                        return Ok((false, String::new(), 0));
                    };
                    let name = e.target(t.io())?.2;
                    let Some(k) = e.store.next_key(root, key)? else {
                        return Ok((false, name, 0));
                    };
                    let end = k.saturating_add(1 << 16);
                    e.store.lookup_range_for_read(root, k, end, &mut batch)?;
                    key = end;
                    Ok((end != u64::MAX, name, e.store.block_size as u64))
                })?;
                for f in &batch {
                    if bad_units.contains_key(&f.value.unit) {
                        let (volume, snapshot) = match t {
                            CursorTarget::Volume(id) => (Some(VolumeId::from_u128(id)), None),
                            CursorTarget::Snapshot(id) => (None, Some(SnapshotId::from_u128(id))),
                        };
                        refs.entry(f.value.unit).or_default().push(BlockRef {
                            name: name.clone(),
                            volume,
                            snapshot,
                            offset: f.key.saturating_mul(bs),
                        });
                    }
                }
                if !more {
                    break;
                }
            }
        }
        let mut bad: Vec<BadBlock> = bad_units
            .into_iter()
            .map(|(unit, problem)| BadBlock {
                physical: Store::byte(unit),
                problem,
                references: refs.remove(&unit).unwrap_or_default(),
            })
            .collect();
        bad.sort_by_key(|b| b.physical);
        Ok(bad)
    }
}
