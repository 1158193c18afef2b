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

/// Buffers each reader of a send fills while the writer drains the others.
const BUFFERS_PER_READER: usize = 2;

/// Jobs the walker deals ahead to each reader (a job is a few words, not a buffer), so a
/// reader rarely sleeps waiting for its next one.
const JOBS_AHEAD: usize = 64;

/// Readers of a send: copying out of the page cache and checksumming cost about the same as
/// the plain sequential read send is measured against, so they are spread over the cores.
fn reader_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 4))
}

/// One piece of the stream, in stream order, as the walker hands it to a reader.
enum Job {
    Data { off: u64, len: usize },
    Zero { off: u64, len: u64 },
}

/// A piece of the stream ready to write: data read and checksummed by a reader.
enum Item {
    /// `len` bytes of `buf` are the snapshot's data at `off`; `crc` is their CRC.
    Data {
        off: u64,
        buf: Vec<u8>,
        len: usize,
        crc: u32,
    },
    Zero {
        off: u64,
        len: u64,
    },
}

impl Pool {
    /// Walks the extents to send and deals them out as jobs, job `k` to reader
    /// `k % jobs.len()`, so the writer can collect results in order without reordering.
    /// Stops quietly when a reader has gone (the writer reports the error).
    fn deal_extents(
        &self,
        snapshot: u128,
        base: Option<u128>,
        jobs: &[std::sync::mpsc::SyncSender<Result<Job>>],
    ) {
        let mut k = 0usize;
        let mut deal = |job: Result<Job>| {
            let sent = jobs[k % jobs.len()].send(job).is_ok();
            k += 1;
            sent
        };
        let mut from = 0;
        loop {
            let target = DiffTarget::Snapshot(snapshot);
            let page = match base {
                Some(b) => self.delta(b, target, from, 4096, TupleLength::Variable),
                None => self.allocated(target, from, 4096, TupleLength::Variable),
            };
            let page = match page {
                Ok(p) => p,
                Err(e) => {
                    deal(Err(e));
                    return;
                }
            };
            for e in &page.extents {
                match e.kind {
                    ExtentKind::Zero => {
                        if !deal(Ok(Job::Zero {
                            off: e.offset,
                            len: e.length,
                        })) {
                            return;
                        }
                    }
                    ExtentKind::Data => {
                        let end = e.offset + e.length;
                        let mut off = e.offset;
                        while off < end {
                            let len = (end - off).min(MAX_DATA as u64) as usize;
                            if !deal(Ok(Job::Data { off, len })) {
                                return;
                            }
                            off += len as u64;
                        }
                    }
                }
            }
            match page.next_offset {
                Some(n) => from = n,
                None => return,
            }
        }
    }
}

/// Runs one reader's jobs in order: reads each data piece into one of its own buffers (handed
/// back by the writer once written) and checksums it while it is still in this core's cache.
fn read_jobs(
    handle: &crate::volume::Snapshot,
    jobs: std::sync::mpsc::Receiver<Result<Job>>,
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    done: std::sync::mpsc::SyncSender<Result<Item>>,
) {
    for job in jobs.iter() {
        let item = match job {
            Err(e) => Err(e),
            Ok(Job::Zero { off, len }) => Ok(Item::Zero { off, len }),
            Ok(Job::Data { off, len }) => {
                let Ok(mut buf) = spare.recv() else {
                    return;
                };
                handle.read_at(&mut buf[..len], off).map(|()| {
                    let crc = crc32fast::hash(&buf[..len]);
                    Item::Data { off, buf, len, crc }
                })
            }
        };
        let failed = item.is_err();
        if done.send(item).is_err() || failed {
            return;
        }
    }
}

impl Pool {
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
        // A walker deals the pieces of the stream round-robin to readers, which read and
        // checksum them in parallel; this thread collects them in the same round-robin order
        // and writes them. Memory stays bounded by the buffers each reader owns.
        let readers = reader_count();
        let mut job_txs = Vec::with_capacity(readers);
        let mut done_rxs = Vec::with_capacity(readers);
        let mut spare_txs = Vec::with_capacity(readers);
        let mut ends = Vec::with_capacity(readers);
        for _ in 0..readers {
            let (job_tx, job_rx) = std::sync::mpsc::sync_channel(JOBS_AHEAD);
            let (done_tx, done_rx) = std::sync::mpsc::sync_channel(BUFFERS_PER_READER);
            let (spare_tx, spare_rx) = std::sync::mpsc::channel::<Vec<u8>>();
            for _ in 0..BUFFERS_PER_READER {
                let _ = spare_tx.send(vec![0u8; MAX_DATA]);
            }
            job_txs.push(job_tx);
            done_rxs.push(done_rx);
            spare_txs.push(spare_tx);
            ends.push((job_rx, spare_rx, done_tx));
        }
        let handle = &handle;
        std::thread::scope(|scope| -> Result<()> {
            scope.spawn(move || self.deal_extents(snapshot, base, &job_txs));
            for (jobs, spare, done) in ends {
                scope.spawn(move || read_jobs(handle, jobs, spare, done));
            }
            // The channel ends are moved here so an early return drops them: every reader and
            // the walker then stop at their next send or wait instead of blocking the scope.
            let done_rxs = done_rxs;
            let spare_txs = spare_txs;
            // Job k went to reader k % readers, and a reader with no result left has no job
            // left: the jobs after the last one would have come to it.
            for k in 0.. {
                let Ok(item) = done_rxs[k % readers].recv() else {
                    break;
                };
                match item? {
                    Item::Data { off, buf, len, crc } => {
                        let mut rec = Vec::with_capacity(17);
                        rec.push(DATA);
                        rec.extend_from_slice(&off.to_le_bytes());
                        rec.extend_from_slice(&(len as u32).to_le_bytes());
                        rec.extend_from_slice(&crc.to_le_bytes());
                        tee.put(&rec)?;
                        tee.put_hashed(&buf[..len], Some(crc))?;
                        stats.data_records += 1;
                        stats.data_bytes += len as u64;
                        let _ = spare_txs[k % readers].send(buf);
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
