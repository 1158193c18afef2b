//! The transmission phase: requests are served in order, each answered with a simple reply.
//! A request outside the export, too long, or changing a read-only export gets an error reply
//! and the connection goes on; a malformed header ends it (the stream can no longer be
//! trusted to be in step).

use super::export::Export;
use super::handshake::Chosen;
use super::wire::*;
use crate::error::Error;
use std::io::{self, Read, Write};

/// The NBD error for a failed operation.
fn errno(e: &Error) -> u32 {
    match e {
        Error::NoSpace { .. } => ENOSPC,
        Error::InvalidArgument(_) => EINVAL,
        _ => EIO,
    }
}

fn reply(s: &mut impl Write, handle: u64, error: u32, data: &[u8]) -> io::Result<()> {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..].copy_from_slice(&handle.to_be_bytes());
    s.write_all(&h)?;
    if !data.is_empty() {
        s.write_all(data)?;
    }
    Ok(())
}

/// A request, as read from the wire.
struct Request {
    flags: u16,
    kind: u16,
    handle: u64,
    offset: u64,
    len: u32,
}

fn request(s: &mut impl Read) -> io::Result<Option<Request>> {
    let mut h = [0u8; 28];
    match s.read_exact(&mut h) {
        Ok(()) => {}
        // A client that closes between requests has simply left.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let field = |r: std::ops::Range<usize>| h[r].iter().fold(0u64, |acc, &b| (acc << 8) | b as u64);
    if field(0..4) as u32 != REQUEST_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad request magic",
        ));
    }
    Ok(Some(Request {
        flags: field(4..6) as u16,
        kind: field(6..8) as u16,
        handle: field(8..16),
        offset: field(16..24),
        len: field(24..28) as u32,
    }))
}

/// A request read off the wire, with the data of a write.
struct Job {
    r: Request,
    /// A write's data; a write refused before reading its data has its error instead.
    payload: Result<Vec<u8>, u32>,
}

/// Reads the next request and a write's data; `None` when the client disconnects (DISC or
/// end of stream). A write that will be refused has its data read and dropped, so the stream
/// stays in step.
fn next_job(chosen: &Chosen, s: &mut impl Read) -> io::Result<Option<Job>> {
    let Some(r) = request(s)? else {
        return Ok(None);
    };
    if r.kind == CMD_DISC {
        return Ok(None);
    }
    let mut payload = Ok(Vec::new());
    if r.kind == CMD_WRITE {
        let refused = if chosen.export.read_only() {
            Some(EPERM)
        } else if r.len > MAX_REQUEST || !in_range(chosen, &r) {
            Some(EINVAL)
        } else {
            None
        };
        payload = match refused {
            Some(err) => {
                skip(s, r.len as u64)?;
                Err(err)
            }
            None => {
                let mut data = vec![0u8; r.len as usize];
                s.read_exact(&mut data)?;
                Ok(data)
            }
        };
    }
    Ok(Some(Job { r, payload }))
}

fn in_range(chosen: &Chosen, r: &Request) -> bool {
    r.offset
        .checked_add(r.len as u64)
        .is_some_and(|end| end <= chosen.size)
}

/// Carries out one request: its error (0 for success) and, for a read, the data.
fn execute(chosen: &Chosen, job: Job) -> (u32, Vec<u8>) {
    let (export, r) = (&chosen.export, &job.r);
    let in_range = in_range(chosen, r);
    let error = match r.kind {
        CMD_READ if r.len > MAX_REQUEST || !in_range => EINVAL,
        CMD_READ => {
            let mut buf = vec![0u8; r.len as usize];
            match export.read_at(&mut buf, r.offset) {
                Ok(()) => return (0, buf),
                Err(e) => errno(&e),
            }
        }
        CMD_WRITE => match &job.payload {
            Ok(data) => change(export, r.flags, |v| v.write_at(data, r.offset)),
            Err(refused) => *refused,
        },
        CMD_FLUSH => export.flush().err().map_or(0, |e| errno(&e)),
        CMD_TRIM | CMD_WRITE_ZEROES if export.read_only() => EPERM,
        CMD_TRIM | CMD_WRITE_ZEROES if !in_range => EINVAL,
        CMD_TRIM => change(export, r.flags, |v| v.discard(r.offset, r.len as u64)),
        CMD_WRITE_ZEROES if r.flags & CMD_FLAG_NO_HOLE != 0 => {
            // Zeros that must stay allocated: written out, a bounded piece at a time.
            let zeros = vec![0u8; (r.len as usize).min(1 << 20)];
            change(export, r.flags, |v| {
                let mut off = 0u64;
                while off < r.len as u64 {
                    let n = (r.len as u64 - off).min(zeros.len() as u64) as usize;
                    v.write_at(&zeros[..n], r.offset + off)?;
                    off += n as u64;
                }
                Ok(())
            })
        }
        CMD_WRITE_ZEROES => change(export, r.flags, |v| v.write_zeroes(r.offset, r.len as u64)),
        _ => EINVAL,
    };
    (error, Vec::new())
}

/// Serves requests one at a time on one stream until the client disconnects.
pub(crate) fn serve<S: Read + Write>(chosen: &Chosen, s: &mut S) -> io::Result<()> {
    let served = (|| {
        while let Some(job) = next_job(chosen, s)? {
            let handle = job.r.handle;
            let (error, data) = execute(chosen, job);
            reply(s, handle, error, &data)?;
            s.flush()?;
        }
        Ok(())
    })();
    // Clients flush before leaving; committing here too costs little.
    let _ = chosen.export.flush();
    served
}

/// Serves requests on `workers` threads until the client disconnects: this thread reads
/// requests (and a write's data) and hands them over; each worker carries one out and writes
/// its reply, which NBD allows to come in any order. Reads and in-place writes of different
/// requests then reach the device in parallel, as they do for threads of one process. At most
/// two requests per worker wait, so memory stays bounded (each at most 32 MiB).
pub(crate) fn serve_parallel<R: Read, W: Write + Send>(
    chosen: &Chosen,
    mut reader: R,
    writer: W,
    workers: usize,
) -> io::Result<()> {
    let writer = std::sync::Mutex::new(writer);
    let (jobs_tx, jobs_rx) = std::sync::mpsc::sync_channel::<Job>(2 * workers);
    let jobs_rx = std::sync::Mutex::new(jobs_rx);
    let served = std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let Ok(job) = jobs_rx
                    .lock()
                    .map_err(drop)
                    .and_then(|rx| rx.recv().map_err(drop))
                else {
                    return;
                };
                let handle = job.r.handle;
                let (error, data) = execute(chosen, job);
                let Ok(mut w) = writer.lock() else {
                    return;
                };
                // A client that stopped listening is noticed by the reading side.
                if reply(&mut *w, handle, error, &data)
                    .and_then(|()| w.flush())
                    .is_err()
                {
                    return;
                }
            });
        }
        let jobs_tx = jobs_tx;
        while let Some(job) = next_job(chosen, &mut reader)? {
            if jobs_tx.send(job).is_err() {
                break;
            }
        }
        Ok(())
    });
    let _ = chosen.export.flush();
    served
}

/// Runs a change on the export's volume, then commits when the client asked for FUA.
fn change(
    export: &Export,
    flags: u16,
    op: impl FnOnce(&crate::volume::Volume) -> crate::error::Result<()>,
) -> u32 {
    let done = export.writable().and_then(|v| {
        op(v)?;
        if flags & CMD_FLAG_FUA != 0 {
            v.flush()?;
        }
        Ok(())
    });
    done.err().map_or(0, |e| errno(&e))
}
