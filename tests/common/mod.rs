//! A plain in-memory model of every volume and snapshot, and random operations applied to
//! both the model and a real pool. Shared by the model, crash and fault tests.
#![allow(dead_code)]

pub mod ops_fuzz;
pub mod oracle;

use proptest::prelude::*;
use snapvol::{Base, BookmarkId, Error, Pool, SnapshotId, VolumeId};

/// The raw id a model gives an object whose real id it cannot know (an operation a crash
/// test only predicts). Real ids are never 0.
pub const UNKNOWN: u128 = 0;

/// A fixed workload touching every kind of operation, for fault and crash walks.
pub fn fixed_workload() -> Vec<Op> {
    use Op::*;
    vec![
        Create { size: 600_000 },
        Write {
            vol: 0,
            offset: 1000,
            len: 200_000,
            seed: 1,
        },
        Flush,
        Snapshot { vol: 0 },
        Write {
            vol: 0,
            offset: 50_000,
            len: 9000,
            seed: 2,
        },
        Create { size: 300_000 },
        Write {
            vol: 1,
            offset: 0,
            len: 300_000,
            seed: 3,
        },
        GroupSnapshot { a: 0, b: 1 },
        CloneSnapshot { snap: 0 },
        Write {
            vol: 2,
            offset: 4095,
            len: 2,
            seed: 4,
        },
        Discard {
            vol: 0,
            offset: 0,
            len: 100_000,
        },
        Flush,
        Grow { by: 1 << 20 },
        CloneVolume { vol: 1 },
        Write {
            vol: 1,
            offset: 70_000,
            len: 70_000,
            seed: 5,
        },
        DeleteSnapshot { snap: 0 },
        Resize {
            vol: 0,
            size: 123_457,
        },
        Rollback { vol: 1, snap: 0 },
        Rename { vol: 2 },
        Write {
            vol: 3,
            offset: 10,
            len: 5000,
            seed: 6,
        },
        DeleteVolume { vol: 0 },
        Write {
            vol: 0,
            offset: 0,
            len: 20_000,
            seed: 7,
        },
        Flush,
    ]
}
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Clone, Debug)]
pub enum Op {
    Create {
        size: u64,
    },
    Write {
        vol: usize,
        offset: u64,
        len: u64,
        seed: u8,
    },
    Discard {
        vol: usize,
        offset: u64,
        len: u64,
    },
    Flush,
    Snapshot {
        vol: usize,
    },
    GroupSnapshot {
        a: usize,
        b: usize,
    },
    CloneSnapshot {
        snap: usize,
    },
    CloneVolume {
        vol: usize,
    },
    Rollback {
        vol: usize,
        snap: usize,
    },
    DeleteVolume {
        vol: usize,
    },
    DeleteSnapshot {
        snap: usize,
    },
    Resize {
        vol: usize,
        size: u64,
    },
    Rename {
        vol: usize,
    },
    /// Grows the pool (and its device) by this many bytes.
    Grow {
        by: u64,
    },
    /// Keeps a snapshot as a bookmark.
    Bookmark {
        snap: usize,
    },
    /// Sends a snapshot (from an earlier one of its volume when there is one and `base`
    /// says so) and receives it into a fresh pool: the received snapshot must equal it.
    SendReceive {
        snap: usize,
        base: Option<usize>,
    },
    /// The delta between two snapshots, applied to the first, must give the second.
    Delta {
        a: usize,
        b: usize,
    },
    Reopen,
}

impl Op {
    /// Whether a successful call makes its effect durable (every catalog operation commits;
    /// writes and discards wait for a flush).
    pub fn is_durable(&self) -> bool {
        !matches!(
            self,
            Op::Write { .. } | Op::Discard { .. } | Op::SendReceive { .. } | Op::Delta { .. }
        )
    }
}

/// Sizes stay small so thousands of sequences run in seconds, but span several blocks and
/// (for the 4 KiB block size) several leaves of the block map.
pub const MAX_VOL: u64 = 3 << 20;

pub fn op_strategy() -> impl Strategy<Value = Op> {
    let idx = 0usize..8;
    prop_oneof![
        2 => (1u64..MAX_VOL).prop_map(|size| Op::Create { size }),
        12 => (idx.clone(), 0u64..MAX_VOL, 1u64..70_000, any::<u8>())
            .prop_map(|(vol, offset, len, seed)| Op::Write { vol, offset, len, seed }),
        2 => (idx.clone(), 0u64..MAX_VOL, 1u64..300_000)
            .prop_map(|(vol, offset, len)| Op::Discard { vol, offset, len }),
        2 => Just(Op::Flush),
        3 => idx.clone().prop_map(|vol| Op::Snapshot { vol }),
        1 => (idx.clone(), idx.clone()).prop_map(|(a, b)| Op::GroupSnapshot { a, b }),
        2 => idx.clone().prop_map(|snap| Op::CloneSnapshot { snap }),
        1 => idx.clone().prop_map(|vol| Op::CloneVolume { vol }),
        2 => (idx.clone(), idx.clone()).prop_map(|(vol, snap)| Op::Rollback { vol, snap }),
        1 => idx.clone().prop_map(|vol| Op::DeleteVolume { vol }),
        2 => idx.clone().prop_map(|snap| Op::DeleteSnapshot { snap }),
        1 => (idx.clone(), 1u64..MAX_VOL).prop_map(|(vol, size)| Op::Resize { vol, size }),
        1 => idx.clone().prop_map(|vol| Op::Rename { vol }),
        1 => (4096u64..2 << 20).prop_map(|by| Op::Grow { by }),
        1 => idx.clone().prop_map(|snap| Op::Bookmark { snap }),
        1 => (idx.clone(), prop::option::of(idx.clone()))
            .prop_map(|(snap, base)| Op::SendReceive { snap, base }),
        1 => (idx.clone(), idx.clone()).prop_map(|(a, b)| Op::Delta { a, b }),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Clone, Debug)]
pub struct SnapModel {
    pub id: SnapshotId,
    /// Live volume id the snapshot belongs to (None once that volume is deleted).
    pub volume: Option<VolumeId>,
    pub name: String,
    pub data: Bytes,
}

/// A volume's or snapshot's bytes, shared between the many model copies the oracles keep
/// (every step's before and after, every candidate) and copied only when one changes.
pub type Bytes = std::sync::Arc<Vec<u8>>;

#[derive(Clone, Debug, Default)]
pub struct Model {
    /// name -> (id, bytes)
    pub volumes: BTreeMap<String, (VolumeId, Bytes)>,
    pub snapshots: Vec<SnapModel>,
    /// Ids of the bookmarks taken ([`UNKNOWN`] for one a crash test only predicts).
    pub bookmarks: Vec<BookmarkId>,
    counter: u64,
}

/// Where an operation's random offset and length land inside a volume of `size` bytes.
fn clamp(size: u64, offset: u64, len: u64) -> (u64, u64) {
    let off = offset % size;
    (off, len.min(size - off))
}

pub fn pattern(seed: u8, offset: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((offset + i) as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

impl Model {
    fn nth_volume(&self, i: usize) -> Option<String> {
        if self.volumes.is_empty() {
            return None;
        }
        self.volumes.keys().nth(i % self.volumes.len()).cloned()
    }

    fn fresh(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!("{prefix}{}", self.counter)
    }

    fn vol_name(&self, id: VolumeId) -> Option<String> {
        self.volumes
            .iter()
            .find(|(_, v)| v.0 == id)
            .map(|(n, _)| n.clone())
    }

    /// Snapshots reachable by `vol@name` (their volume is alive).
    fn named_snapshots(&self) -> Vec<usize> {
        (0..self.snapshots.len())
            .filter(|&i| {
                self.snapshots[i]
                    .volume
                    .is_some_and(|v| self.vol_name(v).is_some())
            })
            .collect()
    }

    /// Applies `op` to the pool and the model. Errors the model predicts (a full pool) are
    /// accepted; anything else is returned. Returns the pool to keep using.
    pub fn apply(
        &mut self,
        pool: Pool,
        op: &Op,
        reopen: &dyn Fn(Pool) -> Pool,
    ) -> Result<Pool, Error> {
        if let Op::Reopen = op {
            return Ok(reopen(pool));
        }
        self.step(Some(&pool), op)?;
        Ok(pool)
    }

    /// What `op` would make of the model if it took effect (ids unknown: 0). A failed
    /// operation may or may not have reached the media, so both states are acceptable.
    pub fn predict(&self, op: &Op) -> Model {
        let mut m = self.clone();
        let _ = m.step(None, op);
        m
    }

    fn step(&mut self, pool: Option<&Pool>, op: &Op) -> Result<(), Error> {
        // Runs the pool call, or pretends it succeeded when there is no pool.
        macro_rules! call {
            ($p:ident => $e:expr, $fake:expr) => {
                match pool {
                    Some($p) => $e,
                    None => Ok($fake),
                }
            };
        }
        // A full pool is accepted only when it is one: the error's figures must say the
        // operation needed more than was free, and the pool's own figure must agree (within
        // the few pages a failed catalog operation may have held before it was undone).
        macro_rules! tolerate_full {
            ($r:expr, $ok:pat => $body:expr) => {
                match $r {
                    Ok($ok) => $body,
                    Err(e @ Error::NoSpace { needed, free, .. }) => {
                        let available = pool.map_or(0, |p| p.stats().available);
                        if free >= needed || available >= needed + (1 << 20) {
                            return Err(e);
                        }
                    }
                    Err(e) => return Err(e),
                }
            };
        }
        match op {
            Op::Reopen | Op::Flush => {
                call!(p => p.flush(), ())?;
            }
            Op::Create { size } => {
                let name = self.fresh("v");
                let id = call!(p => p.create_volume(&name, *size).map(|v| v.id()), VolumeId::from_u128(UNKNOWN))?;
                self.volumes
                    .insert(name, (id, Arc::new(vec![0; *size as usize])));
            }
            Op::Write {
                vol,
                offset,
                len,
                seed,
            } => {
                let Some(name) = self.nth_volume(*vol) else {
                    return Ok(());
                };
                let data = &mut self.volumes.get_mut(&name).unwrap().1;
                let (off, len) = clamp(data.len() as u64, *offset, *len);
                let bytes = pattern(*seed, off, len);
                let r = call!(p => p.volume(&name)?.write_at(&bytes, off), ());
                tolerate_full!(r, () => Arc::make_mut(data)[off as usize..(off + len) as usize].copy_from_slice(&bytes));
            }
            Op::Discard { vol, offset, len } => {
                let Some(name) = self.nth_volume(*vol) else {
                    return Ok(());
                };
                let data = &mut self.volumes.get_mut(&name).unwrap().1;
                let (off, len) = clamp(data.len() as u64, *offset, *len);
                let r = call!(p => p.volume(&name)?.discard(off, len), ());
                tolerate_full!(r, () => Arc::make_mut(data)[off as usize..(off + len) as usize].fill(0));
            }
            Op::Snapshot { vol } => {
                let Some(name) = self.nth_volume(*vol) else {
                    return Ok(());
                };
                let snap = self.fresh("s");
                let r = call!(p => p.snapshot(&name, &snap), SnapshotId::from_u128(UNKNOWN));
                tolerate_full!(r, id => {
                    let (vid, data) = self.volumes[&name].clone();
                    self.snapshots.push(SnapModel { id, volume: Some(vid), name: snap, data });
                });
            }
            Op::GroupSnapshot { a, b } => {
                let (Some(x), Some(y)) = (self.nth_volume(*a), self.nth_volume(*b)) else {
                    return Ok(());
                };
                let (sx, sy) = (self.fresh("g"), self.fresh("g"));
                if x == y {
                    return Ok(());
                }
                let r = call!(p => p.snapshot_group(&[(&x, &sx), (&y, &sy)]), vec![SnapshotId::from_u128(UNKNOWN); 2]);
                tolerate_full!(r, ids => {
                    for (id, (v, s)) in ids.into_iter().zip([(x, sx), (y, sy)]) {
                        let (vid, data) = self.volumes[&v].clone();
                        self.snapshots.push(SnapModel { id, volume: Some(vid), name: s, data });
                    }
                });
            }
            Op::CloneSnapshot { snap } => {
                let named = self.named_snapshots();
                if named.is_empty() {
                    return Ok(());
                }
                let s = self.snapshots[named[snap % named.len()]].clone();
                let vol = self.vol_name(s.volume.unwrap()).unwrap();
                let new = self.fresh("c");
                let r = call!(p => p.clone_snapshot(&vol, &s.name, &new).map(|v| v.id()), VolumeId::from_u128(UNKNOWN));
                tolerate_full!(r, id => { self.volumes.insert(new, (id, s.data.clone())); });
            }
            Op::CloneVolume { vol } => {
                let Some(name) = self.nth_volume(*vol) else {
                    return Ok(());
                };
                let new = self.fresh("c");
                let r = call!(p => p.clone_volume(&name, &new).map(|v| v.id()), VolumeId::from_u128(UNKNOWN));
                tolerate_full!(r, id => {
                    let data = self.volumes[&name].1.clone();
                    self.volumes.insert(new, (id, data));
                });
            }
            Op::Rollback { vol, snap } => {
                let Some(name) = self.nth_volume(*vol) else {
                    return Ok(());
                };
                let vid = self.volumes[&name].0;
                let mine: Vec<usize> = (0..self.snapshots.len())
                    .filter(|&i| self.snapshots[i].volume == Some(vid))
                    .collect();
                if mine.is_empty() {
                    return Ok(());
                }
                let s = self.snapshots[mine[snap % mine.len()]].clone();
                call!(p => p.rollback(&name, &s.name), ())?;
                self.volumes.get_mut(&name).unwrap().1 = s.data;
            }
            Op::DeleteVolume { vol } => {
                let Some(name) = self.nth_volume(*vol) else {
                    return Ok(());
                };
                call!(p => p.delete_volume(&name), ())?;
                let (vid, _) = self.volumes.remove(&name).unwrap();
                for s in &mut self.snapshots {
                    if s.volume == Some(vid) {
                        s.volume = None;
                    }
                }
            }
            Op::DeleteSnapshot { snap } => {
                let named = self.named_snapshots();
                if named.is_empty() {
                    return Ok(());
                }
                let i = named[snap % named.len()];
                let s = self.snapshots[i].clone();
                let vol = self.vol_name(s.volume.unwrap()).unwrap();
                call!(p => p.delete_snapshot(&vol, &s.name), ())?;
                self.snapshots.remove(i);
            }
            Op::Resize { vol, size } => {
                let Some(name) = self.nth_volume(*vol) else {
                    return Ok(());
                };
                let r = call!(p => p.resize_volume(&name, *size), ());
                tolerate_full!(r, () => Arc::make_mut(&mut self.volumes.get_mut(&name).unwrap().1).resize(*size as usize, 0));
            }
            Op::Rename { vol } => {
                let Some(name) = self.nth_volume(*vol) else {
                    return Ok(());
                };
                let new = self.fresh("r");
                call!(p => p.rename_volume(&name, &new), ())?;
                let v = self.volumes.remove(&name).unwrap();
                self.volumes.insert(new, v);
            }
            // No volume changes; what grows is the room the other operations have.
            Op::Grow { by } => call!(p => p.grow(p.stats().size + by), ())?,
            Op::Bookmark { snap } => {
                let named = self.named_snapshots();
                if named.is_empty() {
                    return Ok(());
                }
                let s = self.snapshots[named[snap % named.len()]].clone();
                if s.id.as_u128() != UNKNOWN && self.bookmarks.contains(&s.id.into()) {
                    // A second bookmark of one snapshot is refused (tests/stream.rs).
                    return Ok(());
                }
                let vol = self.vol_name(s.volume.unwrap()).unwrap();
                let id = call!(p => p.bookmark(&vol, &s.name), s.id.into())?;
                self.bookmarks.push(id);
            }
            Op::SendReceive { snap, base } => {
                let (Some(p), false) = (pool, self.snapshots.is_empty()) else {
                    return Ok(());
                };
                let i = snap % self.snapshots.len();
                let s = &self.snapshots[i];
                // A base: an earlier snapshot of the same (live) volume.
                let earlier: Vec<&SnapModel> = self.snapshots[..i]
                    .iter()
                    .filter(|b| b.volume.is_some() && b.volume == s.volume)
                    .collect();
                let base = base
                    .filter(|_| !earlier.is_empty())
                    .map(|b| earlier[b % earlier.len()]);
                let dest = Pool::create(
                    std::sync::Arc::new(snapvol::device::MemoryDevice::new(32 << 20)),
                    snapvol::PoolOptions::default().commit_interval(None),
                )?;
                let mut stream = Vec::new();
                if let Some(b) = base {
                    p.send(b.id, None, &mut stream)?;
                    dest.receive(&mut &stream[..], None)?;
                    stream.clear();
                }
                p.send(s.id, base.map(|b| Base::Snapshot(b.id)), &mut stream)?;
                let st = dest.receive(&mut &stream[..], None)?;
                assert_eq!(st.snapshot_id, s.id);
                let got = dest.snapshot_by_id(s.id)?;
                let mut buf = vec![0u8; s.data.len()];
                assert_eq!(got.len()?, buf.len() as u64, "received size of {}", s.name);
                got.read_at(&mut buf, 0)?;
                assert!(
                    buf[..] == s.data[..],
                    "send/receive of {} (base {:?}) changed its bytes",
                    s.name,
                    base.map(|b| &b.name)
                );
                assert!(dest.check()?.is_clean());
            }
            Op::Delta { a, b } => {
                let (Some(p), false) = (pool, self.snapshots.is_empty()) else {
                    return Ok(());
                };
                let n = self.snapshots.len();
                let (sa, sb) = (&self.snapshots[a % n], &self.snapshots[b % n]);
                let mut applied = Vec::clone(&sa.data);
                applied.resize(sb.data.len(), 0);
                let mut from = 0;
                loop {
                    let page = p.delta(
                        Base::Snapshot(sa.id),
                        snapvol::DiffTarget::Snapshot(sb.id),
                        from,
                        0,
                        snapvol::TupleLength::Variable,
                    )?;
                    assert_eq!(page.volume_size, sb.data.len() as u64);
                    for e in &page.extents {
                        let lo = e.offset as usize;
                        let hi = (e.offset + e.length).min(page.volume_size) as usize;
                        match e.kind {
                            snapvol::ExtentKind::Data => {
                                applied[lo..hi].copy_from_slice(&sb.data[lo..hi])
                            }
                            snapvol::ExtentKind::Zero => applied[lo..hi].fill(0),
                        }
                    }
                    match page.next_offset {
                        Some(next) => from = next,
                        None => break,
                    }
                }
                assert!(
                    applied[..] == sb.data[..],
                    "the delta from {} to {} does not turn one into the other",
                    sa.name,
                    sb.name
                );
            }
        }
        Ok(())
    }

    /// The volume and byte range a failed Write or Discard may have left undefined (a device
    /// write that fails may land in part, as on any disk); snapshots never are.
    pub fn undefined_range(&self, op: &Op) -> Option<(String, u64, u64)> {
        let (vol, offset, len) = match op {
            Op::Write {
                vol, offset, len, ..
            }
            | Op::Discard { vol, offset, len } => (*vol, *offset, *len),
            _ => return None,
        };
        let name = self.nth_volume(vol)?;
        let (off, len) = clamp(self.volumes[&name].1.len() as u64, offset, len);
        Some((name, off, len))
    }

    /// Takes the pool's bytes for a range the model cannot predict.
    pub fn adopt_range(&mut self, pool: &Pool, name: &str, off: u64, len: u64) {
        if let (Some(v), Ok(vol)) = (self.volumes.get_mut(name), pool.volume(name)) {
            let mut buf = vec![0u8; len as usize];
            if vol.len().ok() == Some(v.1.len() as u64) && vol.read_at(&mut buf, off).is_ok() {
                Arc::make_mut(&mut v.1)[off as usize..(off + len) as usize].copy_from_slice(&buf);
            }
        }
    }

    /// Whether the pool holds exactly this model's volumes and snapshots.
    /// Takes the pool's ids for the objects this model only predicted (an interrupted
    /// operation that took effect returned no id), so later operations name them by id.
    /// Names are unique (`fresh`), so each is found by name.
    pub fn adopt_ids(&mut self, pool: &Pool) {
        for (name, (id, _)) in self.volumes.iter_mut() {
            if id.as_u128() == UNKNOWN {
                if let Ok(v) = pool.volume(name) {
                    *id = v.id();
                }
            }
        }
        if self.snapshots.iter().any(|s| s.id.as_u128() == UNKNOWN) {
            let all = pool.snapshots().unwrap();
            for s in &mut self.snapshots {
                if s.id.as_u128() == UNKNOWN {
                    if let Some(x) = all.iter().find(|x| x.name == s.name) {
                        s.id = x.id;
                    }
                }
            }
        }
        if self.bookmarks.iter().any(|b| b.as_u128() == UNKNOWN) {
            self.bookmarks = pool
                .bookmarks()
                .unwrap()
                .into_iter()
                .map(|b| b.id)
                .collect();
        }
    }

    pub fn matches(&self, pool: &Pool) -> Result<(), String> {
        let mut names: Vec<String> = pool
            .volumes()
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        names.sort();
        if names != self.volumes.keys().cloned().collect::<Vec<_>>() {
            return Err(format!("volumes {names:?}"));
        }
        for (name, (_, data)) in &self.volumes {
            let vol = pool.volume(name).map_err(|e| e.to_string())?;
            if vol.len().map_err(|e| e.to_string())? != data.len() as u64 {
                return Err(format!("size of {name}"));
            }
            let mut buf = vec![0u8; data.len()];
            vol.read_at(&mut buf, 0).map_err(|e| e.to_string())?;
            if buf[..] != data[..] {
                let at = buf
                    .iter()
                    .zip(data.iter())
                    .position(|(a, b)| a != b)
                    .unwrap();
                let n = buf[at..]
                    .iter()
                    .zip(&data[at..])
                    .take_while(|(a, b)| a != b)
                    .count();
                return Err(format!(
                    "contents of {name} at byte {at} for {n} bytes (pool {:#x}, model {:#x})",
                    buf[at], data[at]
                ));
            }
        }
        if pool.snapshots().unwrap().len() != self.snapshots.len() {
            return Err("snapshot count".into());
        }
        if pool.bookmarks().unwrap().len() != self.bookmarks.len() {
            return Err("bookmark count".into());
        }
        for s in &self.snapshots {
            let id = if s.id.as_u128() != UNKNOWN {
                s.id
            } else {
                // A predicted snapshot: its id is unknown, its name is unique.
                match pool
                    .snapshots()
                    .unwrap()
                    .into_iter()
                    .find(|x| x.name == s.name)
                {
                    Some(x) => x.id,
                    None => return Err(format!("snapshot {} missing", s.name)),
                }
            };
            let snap = pool.snapshot_by_id(id).map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; s.data.len()];
            snap.read_at(&mut buf, 0).map_err(|e| e.to_string())?;
            if buf[..] != s.data[..] {
                return Err(format!("contents of snapshot {}", s.name));
            }
        }
        Ok(())
    }

    /// Every volume and snapshot of the pool equals the model byte for byte.
    pub fn verify(&self, pool: &Pool) {
        let mut names: Vec<String> = pool
            .volumes()
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        names.sort();
        assert_eq!(names, self.volumes.keys().cloned().collect::<Vec<_>>());
        for (name, (id, data)) in &self.volumes {
            let vol = pool.volume(name).unwrap();
            assert_eq!(vol.id(), *id);
            assert_eq!(vol.len().unwrap(), data.len() as u64, "size of {name}");
            let mut buf = vec![0u8; data.len()];
            vol.read_at(&mut buf, 0).unwrap();
            assert!(buf[..] == data[..], "volume {name} differs from the model");
        }
        assert_eq!(pool.snapshots().unwrap().len(), self.snapshots.len());
        for s in &self.snapshots {
            let snap = pool.snapshot_by_id(s.id).unwrap();
            let mut buf = vec![0u8; s.data.len()];
            snap.read_at(&mut buf, 0).unwrap();
            assert!(
                buf[..] == s.data[..],
                "snapshot {} differs from the model",
                s.name
            );
        }
    }
}
