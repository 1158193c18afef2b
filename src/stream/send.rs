use super::{DATA, END, MAGIC, MAX_DATA, VERSION, ZERO};
use crate::diff::{DiffTarget, ExtentKind, TupleLength};
use crate::error::{Error, Result};
use crate::pool::Pool;
use std::io::Write;

/// What a send wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SendStats {
    pub data_records: u64,
    pub zero_records: u64,
    pub data_bytes: u64,
    pub stream_bytes: u64,
}

/// Writes through to `out`, keeping the running CRC and byte count of the stream.
struct Tee<'a> {
    out: &'a mut dyn Write,
    crc: crc32fast::Hasher,
    bytes: u64,
}

impl Tee<'_> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.crc.update(b);
        self.put_hashed(b, None)
    }

    /// Writes `b`, whose CRC `crc` is already known: the stream CRC is combined from it
    /// instead of hashing the bytes a second time (data is the bulk of a stream).
    fn put_hashed(&mut self, b: &[u8], crc: Option<u32>) -> Result<()> {
        if let Some(c) = crc {
            self.crc
                .combine(&crc32fast::Hasher::new_with_initial_len(c, b.len() as u64));
        }
        self.bytes += b.len() as u64;
        self.out
            .write_all(b)
            .map_err(|e| Error::io("stream write", self.bytes, e))
    }
}

/// Buffers of snapshot data in flight between the reader and the writer of a send.
const PIPELINE: usize = 3;

/// What the reader of a send hands to the writer, in stream order.
enum Item {
    /// `len` bytes of `buf` are the snapshot's data at `off`.
    Data {
        off: u64,
        buf: Vec<u8>,
        len: usize,
    },
    Zero {
        off: u64,
        len: u64,
    },
}

impl Pool {
    /// Walks the extents to send and reads their data, in order, into buffers taken from
    /// `spare`. Stops quietly when the writer has gone (it reports its own error).
    fn read_extents(
        &self,
        snapshot: u128,
        base: Option<u128>,
        handle: &crate::volume::Snapshot,
        items: &std::sync::mpsc::SyncSender<Result<Item>>,
        spare: &std::sync::mpsc::Receiver<Vec<u8>>,
    ) -> Result<()> {
        let mut from = 0;
        loop {
            let target = DiffTarget::Snapshot(snapshot);
            let page = match base {
                Some(b) => self.delta(b, target, from, 4096, TupleLength::Variable)?,
                None => self.allocated(target, from, 4096, TupleLength::Variable)?,
            };
            for e in &page.extents {
                let item = match e.kind {
                    ExtentKind::Zero => Item::Zero {
                        off: e.offset,
                        len: e.length,
                    },
                    ExtentKind::Data => {
                        let mut off = e.offset;
                        let end = e.offset + e.length;
                        while off < end {
                            let len = (end - off).min(MAX_DATA as u64) as usize;
                            let Ok(mut buf) = spare.recv() else {
                                return Ok(());
                            };
                            handle.read_at(&mut buf[..len], off)?;
                            if items.send(Ok(Item::Data { off, buf, len })).is_err() {
                                return Ok(());
                            }
                            off += len as u64;
                        }
                        continue;
                    }
                };
                if items.send(Ok(item)).is_err() {
                    return Ok(());
                }
            }
            match page.next_offset {
                Some(n) => from = n,
                None => return Ok(()),
            }
        }
    }

    /// Writes snapshot `snapshot` to `out` as a stream: whole, or with `base` (an earlier
    /// snapshot or bookmark of the same lineage) only what changed since it. See
    /// docs/stream-format.md.
    pub fn send(
        &self,
        snapshot: u128,
        base: Option<u128>,
        out: &mut dyn Write,
    ) -> Result<SendStats> {
        let info = self
            .snapshots()
            .into_iter()
            .find(|s| s.id == snapshot)
            .ok_or_else(|| Error::SnapshotNotFound(format!("id {snapshot:032x}")))?;
        if let Some(b) = base {
            if b == snapshot {
                return Err(Error::InvalidArgument(
                    "base and target are the same snapshot".into(),
                ));
            }
            if self.snapshot_by_id(b).is_err() && !self.bookmarks().iter().any(|x| x.id == b) {
                return Err(Error::SnapshotNotFound(format!(
                    "snapshot or bookmark id {b:032x}"
                )));
            }
        }
        let handle = self.snapshot_by_id(snapshot)?;
        let name = format!("{}@{}", info.volume_name, info.name);
        let mut tee = Tee {
            out,
            crc: crc32fast::Hasher::new(),
            bytes: 0,
        };
        let mut header = Vec::new();
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&self.block_size().to_le_bytes());
        header.extend_from_slice(&info.size.to_le_bytes());
        header.extend_from_slice(&snapshot.to_le_bytes());
        header.extend_from_slice(&base.unwrap_or(0).to_le_bytes());
        header.extend_from_slice(&(name.len() as u16).to_le_bytes());
        header.extend_from_slice(name.as_bytes());
        let hcrc = crc32fast::hash(&header);
        header.extend_from_slice(&hcrc.to_le_bytes());
        tee.put(&header)?;

        let mut stats = SendStats::default();
        // Reading the snapshot and checksumming + writing the stream overlap: a reader thread
        // walks the extents and fills buffers, this thread hashes and writes them. Memory stays
        // bounded by the buffers in circulation.
        let (items_tx, items_rx) = std::sync::mpsc::sync_channel::<Result<Item>>(PIPELINE);
        let (spare_tx, spare_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        for _ in 0..PIPELINE + 1 {
            let _ = spare_tx.send(vec![0u8; MAX_DATA]);
        }
        let handle = &handle;
        std::thread::scope(|scope| -> Result<()> {
            scope.spawn(move || {
                let r = self.read_extents(snapshot, base, handle, &items_tx, &spare_rx);
                if let Err(e) = r {
                    let _ = items_tx.send(Err(e));
                }
                drop(items_tx);
            });
            // Both ends are moved here so an early return drops them: the reader then stops at
            // its next send or its wait for a spare buffer instead of blocking the scope.
            let items_rx = items_rx;
            let spare_tx = spare_tx;
            for item in items_rx.iter() {
                match item? {
                    Item::Data { off, buf, len } => {
                        let crc = crc32fast::hash(&buf[..len]);
                        let mut rec = Vec::with_capacity(17);
                        rec.push(DATA);
                        rec.extend_from_slice(&off.to_le_bytes());
                        rec.extend_from_slice(&(len as u32).to_le_bytes());
                        rec.extend_from_slice(&crc.to_le_bytes());
                        tee.put(&rec)?;
                        tee.put_hashed(&buf[..len], Some(crc))?;
                        stats.data_records += 1;
                        stats.data_bytes += len as u64;
                        let _ = spare_tx.send(buf);
                    }
                    Item::Zero { off, len } => {
                        let mut fields = Vec::with_capacity(16);
                        fields.extend_from_slice(&off.to_le_bytes());
                        fields.extend_from_slice(&len.to_le_bytes());
                        let mut rec = vec![ZERO];
                        rec.extend_from_slice(&fields);
                        rec.extend_from_slice(&crc32fast::hash(&fields).to_le_bytes());
                        tee.put(&rec)?;
                        stats.zero_records += 1;
                    }
                }
            }
            Ok(())
        })?;
        let mut end = vec![END];
        end.extend_from_slice(&stats.data_records.to_le_bytes());
        end.extend_from_slice(&stats.zero_records.to_le_bytes());
        end.extend_from_slice(&stats.data_bytes.to_le_bytes());
        let crc = tee.crc.clone().finalize();
        end.extend_from_slice(&crc.to_le_bytes());
        tee.put(&end)?;
        tee.out
            .flush()
            .map_err(|e| Error::io("stream write", tee.bytes, e))?;
        stats.stream_bytes = tee.bytes;
        Ok(stats)
    }
}
