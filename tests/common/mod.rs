//! A plain in-memory model of every volume and snapshot, and random operations applied to
//! both the model and a real pool. Shared by the model, crash and fault tests.
#![allow(dead_code)]

use proptest::prelude::*;
use snapvol::{Error, Pool};
use std::collections::BTreeMap;

#[derive(Clone, Debug)]
pub enum Op {
    Create { size: u64 },
    Write { vol: usize, offset: u64, len: u64, seed: u8 },
    Discard { vol: usize, offset: u64, len: u64 },
    Flush,
    Snapshot { vol: usize },
    GroupSnapshot { a: usize, b: usize },
    CloneSnapshot { snap: usize },
    CloneVolume { vol: usize },
    Rollback { vol: usize, snap: usize },
    DeleteVolume { vol: usize },
    DeleteSnapshot { snap: usize },
    Resize { vol: usize, size: u64 },
    Rename { vol: usize },
    Reopen,
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
        1 => Just(Op::Reopen),
    ]
}

#[derive(Clone, Debug)]
pub struct SnapModel {
    pub id: u128,
    /// Live volume id the snapshot belongs to (None once that volume is deleted).
    pub volume: Option<u128>,
    pub name: String,
    pub data: Vec<u8>,
}

#[derive(Clone, Debug, Default)]
pub struct Model {
    /// name -> (id, bytes)
    pub volumes: BTreeMap<String, (u128, Vec<u8>)>,
    pub snapshots: Vec<SnapModel>,
    counter: u64,
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

    fn vol_name(&self, id: u128) -> Option<String> {
        self.volumes.iter().find(|(_, v)| v.0 == id).map(|(n, _)| n.clone())
    }

    /// Snapshots reachable by `vol@name` (their volume is alive).
    fn named_snapshots(&self) -> Vec<usize> {
        (0..self.snapshots.len())
            .filter(|&i| self.snapshots[i].volume.is_some_and(|v| self.vol_name(v).is_some()))
            .collect()
    }

    /// Applies `op` to the pool and the model. Errors the model predicts (a full pool) are
    /// accepted; anything else is a failure. Returns the pool to keep using.
    pub fn apply(&mut self, pool: Pool, op: &Op, reopen: &dyn Fn(Pool) -> Pool) -> Result<Pool, Error> {
        match op {
            Op::Create { size } => {
                let name = self.fresh("v");
                pool.create_volume(&name, *size)?;
                let id = pool.volume(&name)?.id();
                self.volumes.insert(name, (id, vec![0; *size as usize]));
            }
            Op::Write { vol, offset, len, seed } => {
                let Some(name) = self.nth_volume(*vol) else { return Ok(pool) };
                let data = &mut self.volumes.get_mut(&name).unwrap().1;
                let size = data.len() as u64;
                let off = offset % size;
                let len = (*len).min(size - off);
                let bytes = pattern(*seed, off, len);
                match pool.volume(&name)?.write_at(&bytes, off) {
                    Ok(()) => data[off as usize..(off + len) as usize].copy_from_slice(&bytes),
                    Err(Error::NoSpace { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Op::Discard { vol, offset, len } => {
                let Some(name) = self.nth_volume(*vol) else { return Ok(pool) };
                let data = &mut self.volumes.get_mut(&name).unwrap().1;
                let size = data.len() as u64;
                let off = offset % size;
                let len = (*len).min(size - off);
                match pool.volume(&name)?.discard(off, len) {
                    Ok(()) => data[off as usize..(off + len) as usize].fill(0),
                    Err(Error::NoSpace { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Op::Flush => pool.flush()?,
            Op::Snapshot { vol } => {
                let Some(name) = self.nth_volume(*vol) else { return Ok(pool) };
                let snap = self.fresh("s");
                match pool.snapshot(&name, &snap) {
                    Ok(id) => {
                        let (vid, data) = self.volumes[&name].clone();
                        self.snapshots.push(SnapModel { id, volume: Some(vid), name: snap, data });
                    }
                    Err(Error::NoSpace { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Op::GroupSnapshot { a, b } => {
                let (Some(x), Some(y)) = (self.nth_volume(*a), self.nth_volume(*b)) else { return Ok(pool) };
                let (sx, sy) = (self.fresh("g"), self.fresh("g"));
                if x == y {
                    return Ok(pool);
                }
                match pool.snapshot_group(&[(&x, &sx), (&y, &sy)]) {
                    Ok(ids) => {
                        for (id, (v, s)) in ids.into_iter().zip([(x, sx), (y, sy)]) {
                            let (vid, data) = self.volumes[&v].clone();
                            self.snapshots.push(SnapModel { id, volume: Some(vid), name: s, data });
                        }
                    }
                    Err(Error::NoSpace { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Op::CloneSnapshot { snap } => {
                let named = self.named_snapshots();
                if named.is_empty() {
                    return Ok(pool);
                }
                let s = self.snapshots[named[snap % named.len()]].clone();
                let vol = self.vol_name(s.volume.unwrap()).unwrap();
                let new = self.fresh("c");
                match pool.clone_snapshot(&vol, &s.name, &new) {
                    Ok(v) => {
                        self.volumes.insert(new, (v.id(), s.data.clone()));
                    }
                    Err(Error::NoSpace { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Op::CloneVolume { vol } => {
                let Some(name) = self.nth_volume(*vol) else { return Ok(pool) };
                let new = self.fresh("c");
                match pool.clone_volume(&name, &new) {
                    Ok(v) => {
                        let data = self.volumes[&name].1.clone();
                        self.volumes.insert(new, (v.id(), data));
                    }
                    Err(Error::NoSpace { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Op::Rollback { vol, snap } => {
                let Some(name) = self.nth_volume(*vol) else { return Ok(pool) };
                let vid = self.volumes[&name].0;
                let mine: Vec<usize> = (0..self.snapshots.len())
                    .filter(|&i| self.snapshots[i].volume == Some(vid))
                    .collect();
                if mine.is_empty() {
                    return Ok(pool);
                }
                let s = self.snapshots[mine[snap % mine.len()]].clone();
                pool.rollback(&name, &s.name)?;
                self.volumes.get_mut(&name).unwrap().1 = s.data;
            }
            Op::DeleteVolume { vol } => {
                let Some(name) = self.nth_volume(*vol) else { return Ok(pool) };
                pool.delete_volume(&name)?;
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
                    return Ok(pool);
                }
                let i = named[snap % named.len()];
                let s = self.snapshots[i].clone();
                let vol = self.vol_name(s.volume.unwrap()).unwrap();
                pool.delete_snapshot(&vol, &s.name)?;
                self.snapshots.remove(i);
            }
            Op::Resize { vol, size } => {
                let Some(name) = self.nth_volume(*vol) else { return Ok(pool) };
                match pool.resize_volume(&name, *size) {
                    Ok(()) => self.volumes.get_mut(&name).unwrap().1.resize(*size as usize, 0),
                    Err(Error::NoSpace { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Op::Rename { vol } => {
                let Some(name) = self.nth_volume(*vol) else { return Ok(pool) };
                let new = self.fresh("r");
                pool.rename_volume(&name, &new)?;
                let v = self.volumes.remove(&name).unwrap();
                self.volumes.insert(new, v);
            }
            Op::Reopen => return Ok(reopen(pool)),
        }
        Ok(pool)
    }

    /// Every volume and snapshot of the pool equals the model byte for byte.
    pub fn verify(&self, pool: &Pool) {
        let mut names: Vec<String> = pool.volumes().into_iter().map(|v| v.name).collect();
        names.sort();
        assert_eq!(names, self.volumes.keys().cloned().collect::<Vec<_>>());
        for (name, (id, data)) in &self.volumes {
            let vol = pool.volume(name).unwrap();
            assert_eq!(vol.id(), *id);
            assert_eq!(vol.len().unwrap(), data.len() as u64, "size of {name}");
            let mut buf = vec![0u8; data.len()];
            vol.read_at(&mut buf, 0).unwrap();
            assert!(buf == *data, "volume {name} differs from the model");
        }
        assert_eq!(pool.snapshots().len(), self.snapshots.len());
        for s in &self.snapshots {
            let snap = pool.snapshot_by_id(s.id).unwrap();
            let mut buf = vec![0u8; s.data.len()];
            snap.read_at(&mut buf, 0).unwrap();
            assert!(buf == s.data, "snapshot {} differs from the model", s.name);
        }
    }
}
