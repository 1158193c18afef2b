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

/// Serves requests in order until the client disconnects, reading them from `r` and
/// replying on `w`.
///
/// One request at a time, on purpose: handing requests to worker threads (tried, side by
/// side with this on the same pool) cost 2-4x the throughput of a client with 16 requests in
/// flight on two cores, and 10-30% at one in flight, because every request then paid two
/// wake-ups between threads; served in order, a pipelining client keeps the socket buffer
/// full and the server never sleeps. Clients wanting parallelism open several connections
/// (the server advertises CAN_MULTI_CONN).
pub(crate) fn serve<R: Read, W: Write>(chosen: &Chosen, r: &mut R, w: &mut W) -> io::Result<()> {
    let served = (|| {
        while let Some(job) = next_job(chosen, r)? {
            let handle = job.r.handle;
            let (error, data) = execute(chosen, job);
            reply(w, handle, error, &data)?;
            w.flush()?;
        }
        Ok(())
    })();
    // Clients flush before leaving; committing here too costs little.
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
