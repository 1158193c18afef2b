//! The fixed-newstyle handshake: greeting, then options until the client picks an export
//! (NBD_OPT_GO or NBD_OPT_EXPORT_NAME) or leaves. Every length the client sends is checked
//! before anything is read into memory.

use super::export::{Export, Exports};
use super::wire::*;
use std::io::{self, Read, Write};

/// The export chosen, its size as told to the client, and what else was agreed.
pub(crate) struct Chosen {
    pub export: Export,
    pub size: u64,
    /// Reads are answered with structured reply chunks (NBD_OPT_STRUCTURED_REPLY).
    pub structured: bool,
    /// The client selected `base:allocation`: NBD_CMD_BLOCK_STATUS reports holes.
    pub allocation: bool,
}

/// What the options so far agreed, before an export is chosen.
#[derive(Default)]
struct Agreed {
    structured: bool,
    allocation: bool,
}

/// Transmission flags for an export.
pub(crate) fn transmission_flags(export: &Export) -> u16 {
    let common = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
    if export.read_only() {
        common | TFLAG_READ_ONLY
    } else {
        common | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES
    }
}

/// Runs the handshake, reading the client's options from `r` and answering on `s`. `None`: the client aborted, left, or asked for an export that does
/// not exist with NBD_OPT_EXPORT_NAME (which has no way to say so but closing).
pub(crate) fn negotiate(
    exports: &Exports<'_>,
    r: &mut impl Read,
    s: &mut impl Write,
) -> io::Result<Option<Chosen>> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&greeting)?;
    s.flush()?;
    let client = get_u32(r)?;
    if client & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        // Flags we did not offer: the protocol says to close.
        return Ok(None);
    }
    let no_zeroes = client & FLAG_C_NO_ZEROES != 0;
    let mut agreed = Agreed::default();
    loop {
        if get_u64(r)? != IHAVEOPT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad option magic",
            ));
        }
        let option = get_u32(r)?;
        let len = get_u32(r)?;
        if len > MAX_OPTION {
            skip(r, len as u64)?;
            if option == OPT_EXPORT_NAME {
                return Ok(None);
            }
            option_reply(s, option, REP_ERR_TOO_BIG, b"option data too long")?;
            s.flush()?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        match option {
            OPT_EXPORT_NAME => {
                let Some(export) = std::str::from_utf8(&data)
                    .ok()
                    .and_then(|name| exports.open(name))
                    .filter(|e| exports.claim(e))
                else {
                    return Ok(None);
                };
                let size = export.len().map_err(io::Error::other)?;
                let mut reply = Vec::with_capacity(134);
                reply.extend_from_slice(&size.to_be_bytes());
                reply.extend_from_slice(&transmission_flags(&export).to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&reply)?;
                s.flush()?;
                return Ok(Some(Chosen {
                    export,
                    size,
                    structured: agreed.structured,
                    allocation: agreed.allocation,
                }));
            }
            OPT_ABORT => {
                // The client may already have gone; its leaving is what matters.
                let _ = option_reply(s, option, REP_ACK, &[]).and_then(|()| s.flush());
                return Ok(None);
            }
            OPT_LIST if !data.is_empty() => {
                option_reply(s, option, REP_ERR_INVALID, b"LIST takes no data")?;
            }
            OPT_LIST => match exports.names() {
                Ok(names) => {
                    for name in names {
                        let mut d = (name.len() as u32).to_be_bytes().to_vec();
                        d.extend_from_slice(name.as_bytes());
                        // What follows the name is its description.
                        d.extend_from_slice(description(name.contains('@')).as_bytes());
                        option_reply(s, option, REP_SERVER, &d)?;
                    }
                    option_reply(s, option, REP_ACK, &[])?;
                }
                // The catalog could not be read: say why, and keep the connection.
                Err(e) => option_reply(s, option, REP_ERR_PLATFORM, e.to_string().as_bytes())?,
            },
            OPT_STRUCTURED_REPLY if !data.is_empty() => {
                option_reply(
                    s,
                    option,
                    REP_ERR_INVALID,
                    b"STRUCTURED_REPLY takes no data",
                )?;
            }
            OPT_STRUCTURED_REPLY => {
                agreed.structured = true;
                option_reply(s, option, REP_ACK, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(exports, s, option, &data, &mut agreed)?;
            }
            OPT_INFO | OPT_GO => {
                if let Some(chosen) = info(exports, s, option, &data, &agreed)? {
                    if option == OPT_GO {
                        s.flush()?;
                        return Ok(Some(chosen));
                    }
                }
            }
            _ => option_reply(s, option, REP_ERR_UNSUP, b"option not supported")?,
        }
        s.flush()?;
    }
}

/// An export's description: what it is and whether it can be written.
fn description(snapshot: bool) -> &'static str {
    if snapshot {
        "snapvol snapshot (read-only)"
    } else {
        "snapvol volume"
    }
}

/// Answers NBD_OPT_INFO or NBD_OPT_GO: the export's size and flags and its block sizes, or
/// an error reply. Returns the export when the answer was a success.
fn info<S: Write>(
    exports: &Exports<'_>,
    s: &mut S,
    option: u32,
    data: &[u8],
    agreed: &Agreed,
) -> io::Result<Option<Chosen>> {
    // u32 name length, name, u16 count of information requests, u16 each.
    let parsed = data.get(..4).and_then(|n| {
        let n = u32::from_be_bytes(n.try_into().ok()?) as usize;
        let name = data.get(4..4 + n)?;
        let count = u16::from_be_bytes(data.get(4 + n..6 + n)?.try_into().ok()?) as usize;
        let asked: Vec<u16> = data
            .get(6 + n..)?
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        (data.len() == 6 + n + 2 * count).then_some((name, asked))
    });
    let Some((name, asked)) = parsed else {
        option_reply(s, option, REP_ERR_INVALID, b"malformed request")?;
        return Ok(None);
    };
    let Some(export) = std::str::from_utf8(name).ok().and_then(|n| exports.open(n)) else {
        option_reply(s, option, REP_ERR_UNKNOWN, b"no such volume or snapshot")?;
        return Ok(None);
    };
    let size = match export.len() {
        Ok(size) => size,
        Err(e) => {
            option_reply(s, option, REP_ERR_UNKNOWN, e.to_string().as_bytes())?;
            return Ok(None);
        }
    };
    if option == OPT_GO && !exports.claim(&export) {
        option_reply(s, option, REP_ERR_UNKNOWN, b"no such volume or snapshot")?;
        return Ok(None);
    }
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&transmission_flags(&export).to_be_bytes());
    option_reply(s, option, REP_INFO, &d)?;
    // Any length and offset work (minimum 1); whole blocks avoid read-modify-write.
    let preferred = exports.pool.block_size().clamp(512, MAX_REQUEST);
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&preferred.to_be_bytes());
    d.extend_from_slice(&MAX_REQUEST.to_be_bytes());
    option_reply(s, option, REP_INFO, &d)?;
    // The canonical name and a description, when asked (nbdinfo --list asks for both).
    if asked.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(name);
        option_reply(s, option, REP_INFO, &d)?;
    }
    if asked.contains(&INFO_DESCRIPTION) {
        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(description(export.read_only()).as_bytes());
        option_reply(s, option, REP_INFO, &d)?;
    }
    option_reply(s, option, REP_ACK, &[])?;
    Ok(Some(Chosen {
        export,
        size,
        structured: agreed.structured,
        allocation: agreed.allocation,
    }))
}

/// Answers NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT. The one context served is
/// `base:allocation`; listing with no query, or the query `base:`, names it too. Setting
/// needs structured replies first and replaces any earlier selection.
fn meta_context<S: Write>(
    exports: &Exports<'_>,
    s: &mut S,
    option: u32,
    data: &[u8],
    agreed: &mut Agreed,
) -> io::Result<()> {
    // u32 export name length, name, u32 query count, then each: u32 length, query.
    let parsed = (|| {
        let at = |o: usize| -> Option<u32> {
            Some(u32::from_be_bytes(data.get(o..o + 4)?.try_into().ok()?))
        };
        let n = at(0)? as usize;
        let name = std::str::from_utf8(data.get(4..4 + n)?).ok()?;
        let count = at(4 + n)? as usize;
        let mut pos = 8 + n;
        let mut queries = Vec::new();
        for _ in 0..count {
            let len = at(pos)? as usize;
            queries.push(std::str::from_utf8(data.get(pos + 4..pos + 4 + len)?).ok()?);
            pos += 4 + len;
        }
        (pos == data.len()).then_some((name, queries))
    })();
    let Some((name, queries)) = parsed else {
        return option_reply(s, option, REP_ERR_INVALID, b"malformed request");
    };
    if option == OPT_SET_META_CONTEXT && !agreed.structured {
        return option_reply(s, option, REP_ERR_INVALID, b"structured replies first");
    }
    if exports.open(name).is_none() {
        return option_reply(s, option, REP_ERR_UNKNOWN, b"no such volume or snapshot");
    }
    let matches =
        |q: &str| q == ALLOCATION_CONTEXT || (option == OPT_LIST_META_CONTEXT && q == "base:");
    let selected = if queries.is_empty() {
        option == OPT_LIST_META_CONTEXT
    } else {
        queries.iter().any(|q| matches(q))
    };
    if option == OPT_SET_META_CONTEXT {
        agreed.allocation = selected;
    }
    if selected {
        let mut d = ALLOCATION_ID.to_be_bytes().to_vec();
        d.extend_from_slice(ALLOCATION_CONTEXT.as_bytes());
        option_reply(s, option, REP_META_CONTEXT, &d)?;
    }
    option_reply(s, option, REP_ACK, &[])
}
