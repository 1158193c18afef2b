use super::{DATA, END, HIDDEN_PREFIX, MAGIC, MAX_DATA, VERSION, ZERO};
use crate::catalog::{validate_name, SnapshotRec, VolumeRec, MAX_NAME};
use crate::error::{Error, Result};
use crate::ids::{new_id, now_unix};
use crate::pool::Pool;
use crate::space::Reserve;
use crate::txn::Engine;
use crate::volume::Volume;
use std::io::Read;

/// What a receive created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiveStats {
    /// The volume received into.
    pub volume: String,
    /// The received snapshot's name.
    pub snapshot: String,
    /// Its id (the sender's: ids travel with streams).
    pub snapshot_id: crate::SnapshotId,
    /// The base snapshot of an incremental stream.
    pub base_id: Option<crate::SnapshotId>,
    /// Bytes of data records applied.
    pub data_bytes: u64,
    /// Zero records applied.
    pub zero_records: u64,
}

/// Reads from the stream, keeping the running CRC.
struct Src<'a> {
    r: &'a mut dyn Read,
    crc: crc32fast::Hasher,
    at: u64,
}

impl Src<'_> {
    fn take(&mut self, buf: &mut [u8]) -> Result<()> {
        self.take_raw(buf)?;
        self.crc.update(buf);
        Ok(())
    }

    /// Reads record data and returns its CRC, folded into the stream CRC without hashing
    /// the bytes twice.
    fn take_data(&mut self, buf: &mut [u8]) -> Result<u32> {
        self.take_raw(buf)?;
        let crc = crc32fast::hash(buf);
        self.crc.combine(&crc32fast::Hasher::new_with_initial_len(
            crc,
            buf.len() as u64,
        ));
        Ok(crc)
    }

    fn take_raw(&mut self, buf: &mut [u8]) -> Result<()> {
        self.r.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::BadStream(format!("truncated at byte {}", self.at))
            } else {
                Error::io("stream read", self.at, e)
            }
        })?;
        self.at += buf.len() as u64;
        Ok(())
    }
    fn u8(&mut self) -> Result<u8> {
        let mut b = [0u8; 1];
        self.take(&mut b)?;
        Ok(b[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let mut b = [0u8; 2];
        self.take(&mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.take(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.take(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn u128(&mut self) -> Result<u128> {
        let mut b = [0u8; 16];
        self.take(&mut b)?;
        Ok(u128::from_le_bytes(b))
    }
}

/// What a stream (or a restored backup) brings: the snapshot it makes and its base.
pub(crate) struct Header {
    pub(crate) size: u64,
    pub(crate) target: u128,
    /// 0 for a full stream.
    pub(crate) base: u128,
    pub(crate) volume: String,
    pub(crate) snapshot: String,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::BadStream(msg.into())
}

fn read_header(src: &mut Src) -> Result<Header> {
    let mut magic = [0u8; 8];
    src.take(&mut magic)?;
    if &magic != MAGIC {
        return Err(bad("not a snapvol stream (bad magic)"));
    }
    let version = src.u32()?;
    if version != VERSION {
        return Err(bad(format!(
            "stream format version {version}; this build reads version {VERSION}"
        )));
    }
    let _block_size = src.u32()?;
    let size = src.u64()?;
    let target = src.u128()?;
    let base = src.u128()?;
    let n = src.u16()? as usize;
    if n > 2 * MAX_NAME + 1 {
        return Err(bad(format!("name of {n} bytes")));
    }
    let mut name = vec![0u8; n];
    src.take(&mut name)?;
    let computed = src.crc.clone().finalize();
    let mut c = [0u8; 4];
    src.r
        .read_exact(&mut c)
        .map_err(|_| bad("truncated header"))?;
    src.crc.update(&c);
    src.at += 4;
    if u32::from_le_bytes(c) != computed {
        return Err(bad("header checksum mismatch"));
    }
    if size > crate::format::MAX_VOLUME_BYTES {
        return Err(bad(format!(
            "volume size {size} bytes is larger than the largest volume ({} bytes)",
            crate::format::MAX_VOLUME_BYTES
        )));
    }
    if target == 0 || target == base {
        return Err(bad("target snapshot id is 0 or equals the base"));
    }
    let name = String::from_utf8(name).map_err(|_| bad("target name is not UTF-8"))?;
    let (volume, snapshot) = match name.parse::<crate::ObjectName>() {
        Ok(crate::ObjectName::Snapshot { volume, snapshot }) => (volume, snapshot),
        Ok(_) => return Err(bad(format!("target name {name:?} is not volume@snapshot"))),
        Err(e) => return Err(bad(e.to_string())),
    };
    Ok(Header {
        size,
        target,
        base,
        volume,
        snapshot,
    })
}

impl Engine {
    /// Prepares the hidden volume a stream or restore of `size` bytes is applied to. Full
    /// (`base` 0): an empty one, and `name` must be free. Incremental: a copy of volume
    /// `name`, whose newest snapshot must be `base` with no change since.
    pub(crate) fn hidden_for(&mut self, name: &str, base: u128, size: u64) -> Result<u128> {
        if base == 0 {
            if self.volume_exists(name)? {
                return Err(Error::AlreadyExists {
                    kind: "volume",
                    name: name.to_string(),
                    conflict: String::new(),
                });
            }
            return self.add_hidden(0, size);
        }
        let vol = self.volume_named(name)?;
        let (c, sm) = self.cat();
        let newest = c.newest_snapshot(sm, vol.id)?;
        let wrong = |reason: String| Error::WrongBase {
            volume: name.to_string(),
            reason,
        };
        let Some(base) = newest.filter(|s| s.id == base) else {
            return Err(wrong(format!(
                "its newest snapshot is not the base {base:032x}"
            )));
        };
        if vol.root != base.root || vol.size != base.size {
            return Err(wrong(format!(
                "it changed since {}@{}; roll back first",
                name, base.name
            )));
        }
        self.add_hidden(base.root, base.size)
    }

    /// Adds a hidden volume with the given map root (shared) and size.
    pub(crate) fn add_hidden(&mut self, root: u64, size: u64) -> Result<u128> {
        self.catalog_op(Reserve::Keep, |e, r| {
            e.store.share_tree(root)?;
            let id = new_id();
            let generation = e.store.generation;
            let (c, sm) = e.cat();
            c.add_volume(
                sm,
                r,
                VolumeRec {
                    id,
                    // A label for messages only: hidden volumes are found by id.
                    name: format!("{HIDDEN_PREFIX}{id:032x}"),
                    size,
                    root,
                    created: now_unix(),
                    origin: None,
                    frozen_gen: generation,
                    hidden: true,
                },
            )?;
            Ok(id)
        })
    }

    /// Makes hidden volume `id` the visible volume `name`, durably, in one commit.
    pub(crate) fn reveal_hidden(&mut self, id: u128, name: &str) -> Result<()> {
        if self.volume_exists(name)? {
            return Err(Error::AlreadyExists {
                kind: "volume",
                name: name.into(),
                conflict: String::new(),
            });
        }
        // The volume owns every block it was given; it keeps writing them in place.
        self.catalog_op(Reserve::Keep, |e, r| {
            let (c, sm) = e.cat();
            c.rename_volume(sm, r, id, name)
        })
    }

    /// Deletes hidden volume `id` and drops its map.
    fn remove_hidden(&mut self, id: u128, reserve: Reserve) -> Result<()> {
        let (c, sm) = self.cat();
        if let Some(rec) = c.remove_volume(sm, reserve, id)? {
            self.store.drop_tree(rec.root)?;
        }
        Ok(())
    }

    /// Deletes every hidden volume (an interrupted or failed receive).
    pub(crate) fn drop_hidden(&mut self) -> Result<()> {
        let (c, sm) = self.cat();
        let hidden = c.hidden_volumes(sm)?;
        if hidden.is_empty() {
            return Ok(());
        }
        self.catalog_op(Reserve::Use, |e, r| {
            for id in hidden {
                e.remove_hidden(id, r)?;
            }
            Ok(())
        })
    }
}

impl Pool {
    /// Applies a stream (see docs/stream-format.md). A full stream creates volume `volume`
    /// (default: the stream's volume name) and its snapshot; an incremental stream applies
    /// onto the volume of that name (default: the stream's), whose newest snapshot must be
    /// the stream's base (checked by id) with no change since. Either way the received
    /// snapshot keeps the sender's id. Atomic: on any error the pool is unchanged.
    pub fn receive(&self, input: &mut dyn Read, volume: Option<&str>) -> Result<ReceiveStats> {
        let mut src = Src {
            r: input,
            crc: crc32fast::Hasher::new(),
            at: 0,
        };
        let h = read_header(&mut src)?;
        let name = volume.unwrap_or(&h.volume).to_string();
        validate_name(&name)?;
        if self
            .snapshot_by_id(crate::SnapshotId::from_u128(h.target))
            .is_ok()
        {
            return Err(Error::AlreadyExists {
                kind: "snapshot id",
                name: format!("{:032x}", h.target),
                conflict: String::new(),
            });
        }
        let hidden = self.with(|e| e.hidden_for(&name, h.base, h.size))?;
        let vol = self.volume_handle(hidden);
        let applied = self.apply_records(&mut src, &h, &vol);
        let result = applied.and_then(|(data_bytes, zero_records)| {
            self.finish_receive(&h, &name, hidden)
                .map(|_| ReceiveStats {
                    volume: name.clone(),
                    snapshot: h.snapshot.clone(),
                    snapshot_id: crate::SnapshotId::from_u128(h.target),
                    base_id: (h.base != 0).then_some(crate::SnapshotId::from_u128(h.base)),
                    data_bytes,
                    zero_records,
                })
        });
        if result.is_err() {
            self.abandon_hidden(hidden);
        }
        result
    }

    /// Removes hidden volume `id` after its operation failed, leaving the pool as it was
    /// (other operations' hidden volumes stay); if even that fails the next open cleans up.
    pub(crate) fn abandon_hidden(&self, id: u128) {
        let _ = self.with(|e| {
            if e.check_usable().is_err() || e.volume_rec(id)?.is_none() {
                return Ok(());
            }
            e.catalog_op(Reserve::Use, |e, r| e.remove_hidden(id, r))
        });
    }

    /// Parses and verifies records on this thread (the stream reader need not be `Send`)
    /// while a second thread applies them to the hidden volume, so checksumming and copying
    /// the stream overlap with the volume writes. Memory stays bounded by the buffers in
    /// circulation.
    fn apply_records(&self, src: &mut Src, h: &Header, vol: &Volume) -> Result<(u64, u64)> {
        if vol.len()? != h.size {
            self.resize_hidden(vol.id, h.size)?;
        }
        let (changes_tx, changes_rx) = std::sync::mpsc::sync_channel::<Change>(PIPELINE);
        let (spare_tx, spare_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        for _ in 0..PIPELINE + 1 {
            let _ = spare_tx.send(vec![0u8; MAX_DATA]);
        }
        std::thread::scope(|scope| {
            let applier = scope.spawn(move || -> Result<()> {
                // Returning drops both channel ends, which stops the parser at once.
                for change in changes_rx {
                    match change {
                        Change::Data { off, buf, len } => {
                            vol.write_at(&buf[..len], off)?;
                            let _ = spare_tx.send(buf);
                        }
                        Change::Zero { off, len } => vol.discard(off, len)?,
                    }
                }
                Ok(())
            });
            let parsed = parse_records(src, h, &changes_tx, &spare_rx);
            drop(changes_tx);
            let applied = applier
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            // A parser that stopped because the applier failed reports the applier's error.
            applied.and(parsed)
        })
    }
}

/// Buffers of stream data in flight between the parser and the applier of a receive.
const PIPELINE: usize = 3;

/// A verified record for the applier.
enum Change {
    Data { off: u64, buf: Vec<u8>, len: usize },
    Zero { off: u64, len: u64 },
}

/// The applier stopped (its own error is the one to report).
fn applier_gone() -> Error {
    Error::Internal("receive stopped: the volume writes failed".into())
}

/// Reads and verifies every record up to and including END, handing each change to the
/// applier in stream order.
fn parse_records(
    src: &mut Src,
    h: &Header,
    changes: &std::sync::mpsc::SyncSender<Change>,
    spare: &std::sync::mpsc::Receiver<Vec<u8>>,
) -> Result<(u64, u64)> {
    let (mut data_records, mut zero_records, mut data_bytes) = (0u64, 0u64, 0u64);
    let mut pos = 0u64;
    loop {
        let at = src.at;
        // The END record's CRC covers every byte before it.
        let crc_before_record = src.crc.clone().finalize();
        let kind = src.u8()?;
        match kind {
            DATA => {
                let off = src.u64()?;
                let len = src.u32()? as usize;
                let crc = src.u32()?;
                if len == 0 || len > MAX_DATA {
                    return Err(bad(format!("DATA record at byte {at}: length {len}")));
                }
                check_range(at, off, len as u64, pos, h.size)?;
                let mut buf = spare.recv().map_err(|_| applier_gone())?;
                if src.take_data(&mut buf[..len])? != crc {
                    return Err(bad(format!("DATA record at byte {at}: checksum mismatch")));
                }
                changes
                    .send(Change::Data { off, buf, len })
                    .map_err(|_| applier_gone())?;
                pos = off + len as u64;
                data_records += 1;
                data_bytes += len as u64;
            }
            ZERO => {
                let off = src.u64()?;
                let len = src.u64()?;
                let crc = src.u32()?;
                let mut fields = [0u8; 16];
                fields[..8].copy_from_slice(&off.to_le_bytes());
                fields[8..].copy_from_slice(&len.to_le_bytes());
                if crc32fast::hash(&fields) != crc {
                    return Err(bad(format!("ZERO record at byte {at}: checksum mismatch")));
                }
                if len == 0 {
                    return Err(bad(format!("ZERO record at byte {at}: length 0")));
                }
                check_range(at, off, len, pos, h.size)?;
                changes
                    .send(Change::Zero { off, len })
                    .map_err(|_| applier_gone())?;
                pos = off + len;
                zero_records += 1;
            }
            END => {
                let d = src.u64()?;
                let z = src.u64()?;
                let b = src.u64()?;
                let c = src.u32()?;
                if (d, z, b) != (data_records, zero_records, data_bytes) {
                    return Err(bad(format!(
                            "END record counts {d}/{z}/{b} do not match the stream ({data_records}/{zero_records}/{data_bytes})"
                        )));
                }
                if c != crc_before_record {
                    return Err(bad("stream checksum mismatch"));
                }
                let mut extra = [0u8; 1];
                match src.r.read(&mut extra) {
                    Ok(0) => {}
                    Ok(_) => return Err(bad("bytes after the END record")),
                    Err(e) => return Err(Error::io("stream read", src.at, e)),
                }
                return Ok((data_bytes, zero_records));
            }
            other => return Err(bad(format!("unknown record type {other} at byte {at}"))),
        }
    }
}

impl Pool {
    pub(crate) fn resize_hidden(&self, id: u128, size: u64) -> Result<()> {
        self.resize_by_id(id, size)
    }

    /// One commit makes the received volume and snapshot visible.
    pub(crate) fn finish_receive(&self, h: &Header, name: &str, hidden: u128) -> Result<()> {
        self.with(|e| {
            e.catalog_op(Reserve::Use, |e, r| {
                let missing =
                    || Error::VolumeNotFound(format!("{HIDDEN_PREFIX}{hidden:032x}").into());
                let tmp = e.volume_rec(hidden)?.ok_or_else(missing)?;
                let generation = e.store.generation;
                let vol_id = if h.base == 0 {
                    let (c, sm) = e.cat();
                    c.rename_volume(sm, r, hidden, name)?;
                    c.volume_mut(sm, hidden)?.ok_or_else(missing)?.frozen_gen = generation;
                    hidden
                } else {
                    // The volume keeps its id and name and takes the received map; the hidden
                    // volume's reference to that map moves with it.
                    let id = e.volume_named(name)?.id;
                    let (c, sm) = e.cat();
                    let v = c
                        .volume_mut(sm, id)?
                        .ok_or_else(|| Error::VolumeNotFound(name.into()))?;
                    let old_root = std::mem::replace(&mut v.root, tmp.root);
                    v.size = tmp.size;
                    v.frozen_gen = generation;
                    c.remove_volume(sm, r, hidden)?;
                    e.store.drop_tree(old_root)?;
                    id
                };
                let v = e.volume_rec(vol_id)?.ok_or_else(missing)?;
                e.store.share_tree(v.root)?;
                let (c, sm) = e.cat();
                c.add_snapshot(
                    sm,
                    r,
                    SnapshotRec {
                        id: h.target,
                        volume: v.id,
                        volume_name: v.name.clone(),
                        name: h.snapshot.clone(),
                        size: v.size,
                        root: v.root,
                        generation,
                        created: now_unix(),
                    },
                )
            })
        })
    }
}

fn check_range(at: u64, off: u64, len: u64, pos: u64, size: u64) -> Result<()> {
    let end = off
        .checked_add(len)
        .ok_or_else(|| bad(format!("record at byte {at}: range overflows")))?;
    if off < pos {
        return Err(bad(format!(
            "record at byte {at}: offset {off} overlaps or precedes the previous record"
        )));
    }
    if end > size {
        return Err(bad(format!(
            "record at byte {at}: range {off}+{len} is beyond the volume ({size} bytes)"
        )));
    }
    Ok(())
}
