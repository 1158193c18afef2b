use super::{DATA, END, MAGIC, MAX_DATA, VERSION, ZERO};
use crate::diff::{DiffTarget, ExtentKind, TupleLength};
use crate::error::{Error, Result};
use crate::pool::Pool;
use std::io::Write;

/// What a send wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SendStats {
    /// Data records written.
    pub data_records: u64,
    /// Zero records written (ranges that read as zeros, sent without data).
    pub zero_records: u64,
    /// Bytes of data carried.
    pub data_bytes: u64,
    /// Bytes of stream written in all.
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

/// Buffers each helper reader of a send fills while the writer drains the others.
const BUFFERS_PER_HELPER: usize = 2;

/// Pieces of the stream the writer plans ahead: enough that every helper always has its next
/// job queued and rarely sleeps. A piece is a few words; only helpers' results hold buffers.
const LOOKAHEAD: usize = 64;

/// Threads that read and checksum a send's data, the caller's own thread included: copying
/// out of the page cache and checksumming together cost more than the plain sequential read
/// send is measured against, so they are spread over the cores.
fn reader_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 4))
}

/// The pieces of a stream in order: the extents to send, a page at a time, with data cut
/// into records of at most `MAX_DATA` bytes.
struct Pieces<'a> {
    pool: &'a Pool,
    target: crate::SnapshotId,
    base: Option<crate::Base>,
    /// Where the next page of extents starts; `None` once the last page was fetched.
    next_page: Option<u64>,
    extents: std::collections::VecDeque<crate::diff::Extent>,
}

enum Piece {
    Data { off: u64, len: usize },
    Zero { off: u64, len: u64 },
}

impl Pieces<'_> {
    fn next(&mut self) -> Result<Option<Piece>> {
        while self.extents.is_empty() {
            let Some(from) = self.next_page else {
                return Ok(None);
            };
            let target = DiffTarget::Snapshot(self.target);
            let page = match self.base {
                Some(b) => self
                    .pool
                    .delta(b, target, from, 4096, TupleLength::Variable)?,
                None => self
                    .pool
                    .allocated(target, from, 4096, TupleLength::Variable)?,
            };
            self.next_page = page.next_offset;
            self.extents = page.extents.into();
        }
        let Some(e) = self.extents.front_mut() else {
            return Ok(None);
        };
        Ok(Some(match e.kind {
            ExtentKind::Zero => {
                let (off, len) = (e.offset, e.length);
                self.extents.pop_front();
                Piece::Zero { off, len }
            }
            ExtentKind::Data => {
                let (off, len) = (e.offset, e.length.min(MAX_DATA as u64));
                e.offset += len;
                e.length -= len;
                if e.length == 0 {
                    self.extents.pop_front();
                }
                Piece::Data {
                    off,
                    len: len as usize,
                }
            }
        }))
    }
}

/// Where the writer finds a planned piece when its turn comes.
enum Slot {
    Zero {
        off: u64,
        len: u64,
    },
    /// Data this thread reads itself.
    Own {
        off: u64,
        len: usize,
    },
    /// Data helper `h` is reading; its results arrive in the order its jobs were queued.
    Helper(usize),
}

/// Data read and checksummed by a helper: `len` bytes of `buf` at `off`, with their CRC.
struct Read {
    off: u64,
    buf: Vec<u8>,
    len: usize,
    crc: u32,
}

/// Runs one helper's jobs in order: reads each piece into one of its own buffers (handed back
/// by the writer once written) and checksums it while it is still in this core's cache.
fn read_jobs(
    handle: &crate::volume::Snapshot,
    shift: &crate::checksum::Shift,
    jobs: std::sync::mpsc::Receiver<(u64, usize)>,
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    done: std::sync::mpsc::SyncSender<Result<Read>>,
) {
    for (off, len) in jobs.iter() {
        let Ok(mut buf) = spare.recv() else {
            return;
        };
        let read = handle
            .read_at_crc(&mut buf[..len], off, shift)
            .map(|crc| Read { off, crc, buf, len });
        let failed = read.is_err();
        if done.send(read).is_err() || failed {
            return;
        }
    }
}

fn data_record(
    tee: &mut Tee,
    stats: &mut SendStats,
    off: u64,
    data: &[u8],
    crc: u32,
) -> Result<()> {
    let mut rec = Vec::with_capacity(17);
    rec.push(DATA);
    rec.extend_from_slice(&off.to_le_bytes());
    rec.extend_from_slice(&(data.len() as u32).to_le_bytes());
    rec.extend_from_slice(&crc.to_le_bytes());
    tee.put(&rec)?;
    tee.put_hashed(data, Some(crc))?;
    stats.data_records += 1;
    stats.data_bytes += data.len() as u64;
    Ok(())
}

fn zero_record(tee: &mut Tee, stats: &mut SendStats, off: u64, len: u64) -> Result<()> {
    let mut fields = Vec::with_capacity(16);
    fields.extend_from_slice(&off.to_le_bytes());
    fields.extend_from_slice(&len.to_le_bytes());
    let mut rec = vec![ZERO];
    rec.extend_from_slice(&fields);
    rec.extend_from_slice(&crc32fast::hash(&fields).to_le_bytes());
    tee.put(&rec)?;
    stats.zero_records += 1;
    Ok(())
}

impl Pool {
    /// Writes snapshot `snapshot` to `out` as a stream: whole, or with `base` (an earlier
    /// snapshot or bookmark of the same lineage) only what changed since it. See
    /// docs/stream-format.md.
    pub fn send(
        &self,
        snapshot: crate::SnapshotId,
        base: Option<crate::Base>,
        out: &mut dyn Write,
    ) -> Result<SendStats> {
        let info = self.snapshot_info(snapshot)?;
        if let Some(b) = base {
            if b.as_u128() == snapshot.as_u128() {
                return Err(Error::InvalidArgument(
                    "base and target are the same snapshot".into(),
                ));
            }
            match b {
                crate::Base::Snapshot(s) => self.snapshot_info(s).map(drop)?,
                crate::Base::Bookmark(b) => self.bookmark_info(b).map(drop)?,
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
        header.extend_from_slice(&snapshot.as_u128().to_le_bytes());
        header.extend_from_slice(&base.map_or(0, crate::Base::as_u128).to_le_bytes());
        header.extend_from_slice(&(name.len() as u16).to_le_bytes());
        header.extend_from_slice(name.as_bytes());
        let hcrc = crc32fast::hash(&header);
        header.extend_from_slice(&hcrc.to_le_bytes());
        tee.put(&header)?;

        let mut stats = SendStats::default();
        // Data pieces are dealt round-robin to this thread and to helper threads, which read
        // and checksum them in parallel. This thread plans the stream a few dozen pieces
        // ahead, reads its own share, and writes every piece in order. Memory stays bounded:
        // one buffer here and two per helper.
        let helpers = reader_count() - 1;
        let mut job_txs = Vec::with_capacity(helpers);
        let mut done_rxs = Vec::with_capacity(helpers);
        let mut spare_txs = Vec::with_capacity(helpers);
        let mut ends = Vec::with_capacity(helpers);
        for _ in 0..helpers {
            // Unbounded, so planning never waits on a helper that waits on this thread; the
            // lookahead bounds what is queued.
            let (job_tx, job_rx) = std::sync::mpsc::channel();
            let (done_tx, done_rx) = std::sync::mpsc::sync_channel(BUFFERS_PER_HELPER);
            let (spare_tx, spare_rx) = std::sync::mpsc::channel::<Vec<u8>>();
            for _ in 0..BUFFERS_PER_HELPER {
                let _ = spare_tx.send(vec![0u8; MAX_DATA]);
            }
            job_txs.push(job_tx);
            done_rxs.push(done_rx);
            spare_txs.push(spare_tx);
            ends.push((job_rx, spare_rx, done_tx));
        }
        let handle = &handle;
        // A record's CRC is joined from the pool's block checksums (see `read_at_crc`).
        let shift = &crate::checksum::Shift::new(u64::from(self.block_size()));
        let mut pieces = Pieces {
            pool: self,
            target: snapshot,
            base,
            next_page: Some(0),
            extents: Default::default(),
        };
        std::thread::scope(|scope| -> Result<()> {
            for (jobs, spare, done) in ends {
                scope.spawn(move || read_jobs(handle, shift, jobs, spare, done));
            }
            // The channel ends are moved here so any return drops them: every helper then
            // stops at its next wait instead of blocking the scope.
            let (job_txs, done_rxs, spare_txs) = (job_txs, done_rxs, spare_txs);
            let mut own = vec![0u8; MAX_DATA];
            let mut planned = std::collections::VecDeque::with_capacity(LOOKAHEAD);
            let mut dealt = 0usize;
            let mut more = true;
            loop {
                while more && planned.len() < LOOKAHEAD {
                    let slot = match pieces.next()? {
                        None => {
                            more = false;
                            break;
                        }
                        Some(Piece::Zero { off, len }) => Slot::Zero { off, len },
                        Some(Piece::Data { off, len }) => {
                            let reader = dealt % (helpers + 1);
                            dealt += 1;
                            if reader == 0 {
                                Slot::Own { off, len }
                            } else {
                                // A helper that has gone left its error in its results.
                                let _ = job_txs[reader - 1].send((off, len));
                                Slot::Helper(reader - 1)
                            }
                        }
                    };
                    planned.push_back(slot);
                }
                let Some(slot) = planned.pop_front() else {
                    break;
                };
                match slot {
                    Slot::Zero { off, len } => zero_record(&mut tee, &mut stats, off, len)?,
                    Slot::Own { off, len } => {
                        let crc = handle.read_at_crc(&mut own[..len], off, shift)?;
                        data_record(&mut tee, &mut stats, off, &own[..len], crc)?;
                    }
                    Slot::Helper(h) => {
                        let r = done_rxs[h].recv().map_err(|_| {
                            Error::Internal("send stopped: a reader thread ended".into())
                        })??;
                        data_record(&mut tee, &mut stats, r.off, &r.buf[..r.len], r.crc)?;
                        let _ = spare_txs[h].send(r.buf);
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
