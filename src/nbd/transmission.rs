//! The transmission phase: requests are served in order, each answered with a simple reply,
//! or, once structured replies were agreed, reads and block status with one structured chunk.
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
        // qemu's werror=enospc pauses the guest on this one (and only this one), to resume
        // it once there is room: a full host filesystem must not look like a broken disk.
        Error::NoSpace { .. } | Error::HostFull { .. } => ENOSPC,
        Error::ReadOnly(_) => EPERM,
        Error::InvalidArgument(_) | Error::OutOfRange { .. } => EINVAL,
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

/// One structured reply chunk, the last of its request.
fn chunk(s: &mut impl Write, handle: u64, kind: u16, payload: &[&[u8]]) -> io::Result<()> {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    let mut h = [0u8; 20];
    h[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
    h[16..].copy_from_slice(&(len as u32).to_be_bytes());
    s.write_all(&h)?;
    for p in payload {
        s.write_all(p)?;
    }
    Ok(())
}

/// What a request came to.
enum Outcome {
    /// Done, with this error (0: success) and nothing to return.
    Done(u32),
    /// A read's data.
    Data(Vec<u8>),
    /// Block status runs: (length, flags).
    Status(Vec<(u32, u32)>),
}

/// Sends the reply for request `r`: structured for reads and block status when agreed
/// (nbdkit and qemu do the same: simple replies stay valid for every other command).
fn answer(w: &mut impl Write, chosen: &Chosen, r: &Request, outcome: Outcome) -> io::Result<()> {
    let structured = chosen.structured && matches!(r.kind, CMD_READ | CMD_BLOCK_STATUS);
    match (structured, outcome) {
        (false, Outcome::Done(error)) => reply(w, r.handle, error, &[]),
        (false, Outcome::Data(data)) => reply(w, r.handle, 0, &data),
        // Block status is refused before it runs unless structured replies were agreed.
        (false, Outcome::Status(_)) => reply(w, r.handle, EINVAL, &[]),
        (true, Outcome::Done(0)) => chunk(w, r.handle, REPLY_TYPE_NONE, &[]),
        (true, Outcome::Done(error)) => chunk(
            w,
            r.handle,
            REPLY_TYPE_ERROR,
            &[&error.to_be_bytes(), &0u16.to_be_bytes()],
        ),
        (true, Outcome::Data(data)) if data.is_empty() => chunk(w, r.handle, REPLY_TYPE_NONE, &[]),
        (true, Outcome::Data(data)) => chunk(
            w,
            r.handle,
            REPLY_TYPE_OFFSET_DATA,
            &[&r.offset.to_be_bytes(), &data],
        ),
        (true, Outcome::Status(runs)) => {
            let mut p = ALLOCATION_ID.to_be_bytes().to_vec();
            for (len, flags) in runs {
                p.extend_from_slice(&len.to_be_bytes());
                p.extend_from_slice(&flags.to_be_bytes());
            }
            chunk(w, r.handle, REPLY_TYPE_BLOCK_STATUS, &[&p])
        }
    }
}

/// Runs reported by one block status reply at most.
const MAX_RUNS: usize = 1024;

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

/// Carries out one request.
fn execute(chosen: &Chosen, job: &Job) -> Outcome {
    let (export, r) = (&chosen.export, &job.r);
    let in_range = in_range(chosen, r);
    let error = match r.kind {
        CMD_READ if r.len > MAX_REQUEST || !in_range => EINVAL,
        CMD_READ => {
            let mut buf = vec![0u8; r.len as usize];
            match export.read_at(&mut buf, r.offset) {
                Ok(()) => return Outcome::Data(buf),
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
        CMD_BLOCK_STATUS if !chosen.allocation || r.len == 0 || !in_range => EINVAL,
        CMD_BLOCK_STATUS => {
            let max = if r.flags & CMD_FLAG_REQ_ONE != 0 {
                1
            } else {
                MAX_RUNS
            };
            match export.block_status(r.offset, r.offset + r.len as u64, max) {
                Ok(runs) if !runs.is_empty() => return Outcome::Status(runs),
                Ok(_) => EIO,
                Err(e) => errno(&e),
            }
        }
        _ => EINVAL,
    };
    Outcome::Done(error)
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
            let outcome = execute(chosen, &job);
            // A request that failed because its volume or snapshot was deleted meanwhile
            // (`snapvol destroy` while serving) gets its error, and the connection ends:
            // every later request would fail the same way, and a client that sees the
            // connection close stops (qemu reports the disk gone) instead of retrying.
            let gone = matches!(outcome, Outcome::Done(e) if e != 0)
                && chosen
                    .export
                    .len()
                    .is_err_and(|e| e.kind() == crate::error::ErrorKind::NotFound);
            answer(w, chosen, &job.r, outcome)?;
            w.flush()?;
            if gone {
                break;
            }
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
