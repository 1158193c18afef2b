//! The control socket of `snapvol serve`: a CLI command that finds its pool held by a server
//! sends itself there and the server runs it on the pool it holds, so `snapvol snapshot
//! pool.img vm@before` works while a VM writes through NBD. The wire format is in
//! docs/control.md.
//!
//! One connection carries one command. The client sends its arguments (after `--pool` and
//! `SNAPVOL_POOL` were applied) and its working directory; the server parses them with the
//! same parser, makes the paths in them absolute against that directory, runs the command
//! with its output going back over the socket (`output::Sink`) and ends with the exit status.

use crate::output::{self, Sink};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// First bytes of a request: magic and protocol version.
const MAGIC: &[u8; 5] = b"SVCTL";
/// The protocol version this build speaks. A server answers a request of another version
/// with a message and exit status 2, so an old client and a new server fail cleanly.
pub const VERSION: u8 = 1;
/// Frame kinds of the server's answer.
const FRAME_STDOUT: u8 = 1;
const FRAME_STDERR: u8 = 2;
const FRAME_EXIT: u8 = 3;
/// Bounds on a request, so a hostile or broken client cannot make the server allocate
/// without limit.
const MAX_ARGS: u32 = 4096;
const MAX_ARG_BYTES: u32 = 1 << 20;
/// Bounds on one answer frame (a client refuses larger ones).
const MAX_FRAME: u32 = 16 << 20;

/// The control socket of the pool at `pool`: `SNAPVOL_CONTROL` if set, else `POOL.ctl`
/// beside a pool file, or `/run/snapvol/NAME.ctl` for a block device (whose directory, /dev,
/// is not a place for sockets).
pub fn socket_path(pool: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("SNAPVOL_CONTROL") {
        return PathBuf::from(p);
    }
    let is_block = std::fs::metadata(pool)
        .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
        .unwrap_or(false);
    if is_block {
        let name = pool.file_name().unwrap_or(pool.as_os_str());
        let mut n = name.to_os_string();
        n.push(".ctl");
        return Path::new("/run/snapvol").join(n);
    }
    let mut p = pool.as_os_str().to_os_string();
    p.push(".ctl");
    PathBuf::from(p)
}

/// Whether two paths name the same file (device and inode), as a pool is recognized
/// whatever path reaches it.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => {
            let key = |m: &std::fs::Metadata| {
                if std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()) {
                    (0, m.rdev(), 0)
                } else {
                    (1, m.dev(), m.ino())
                }
            };
            key(&x) == key(&y)
        }
        _ => false,
    }
}

// ---------------------------------------------------------------- client

/// Sends the command to the server holding `pool`, if one answers on its control socket,
/// and relays its output; returns its exit status. `None` when no server answers (no socket,
/// or one left by a server that is gone): the command then runs here.
pub fn forward(pool: &Path, args: &[OsString]) -> Option<ExitCode> {
    let sock = socket_path(pool);
    let stream = UnixStream::connect(&sock).ok()?;
    Some(match relay(stream, args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            output::flush();
            eprintln!(
                "snapvol: the server holding {} (control socket {}): {e}",
                pool.display(),
                sock.display()
            );
            ExitCode::FAILURE
        }
    })
}

fn relay(mut stream: UnixStream, args: &[OsString]) -> io::Result<u8> {
    let cwd = std::env::current_dir()?;
    let mut req = Vec::new();
    req.extend_from_slice(MAGIC);
    req.push(VERSION);
    req.push(u8::from(io::IsTerminal::is_terminal(&io::stdout())));
    put_bytes(&mut req, cwd.as_os_str().as_bytes());
    req.extend_from_slice(&(args.len() as u32).to_le_bytes());
    for a in args {
        put_bytes(&mut req, a.as_bytes());
    }
    stream.write_all(&req)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut r = io::BufReader::with_capacity(1 << 20, stream);
    let mut out = io::stdout().lock();
    loop {
        let mut head = [0u8; 5];
        if let Err(e) = r.read_exact(&mut head) {
            return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::other("the server closed the connection before the command ended")
            } else {
                e
            });
        }
        let len = u32::from_le_bytes(head[1..].try_into().expect("4 bytes"));
        if len > MAX_FRAME {
            return Err(io::Error::other(format!(
                "a {len}-byte frame: not a snapvol server"
            )));
        }
        let mut payload = vec![0u8; len as usize];
        r.read_exact(&mut payload)?;
        match head[0] {
            FRAME_STDOUT => {
                if let Err(e) = out.write_all(&payload) {
                    // The reader went away (`| head`): as a local command would, stop quietly.
                    if e.kind() == io::ErrorKind::BrokenPipe {
                        return Ok(0);
                    }
                    return Err(e);
                }
            }
            FRAME_STDERR => {
                out.flush()?;
                io::stderr().write_all(&payload)?;
            }
            FRAME_EXIT if payload.len() == 1 => {
                out.flush()?;
                return Ok(payload[0]);
            }
            k => return Err(io::Error::other(format!("unknown frame kind {k}"))),
        }
    }
}

fn put_bytes(v: &mut Vec<u8>, b: &[u8]) {
    v.extend_from_slice(&(b.len() as u32).to_le_bytes());
    v.extend_from_slice(b);
}

// ---------------------------------------------------------------- server

/// A parsed request.
pub struct Request {
    /// The client's working directory.
    pub cwd: PathBuf,
    /// Its arguments, without the program name.
    pub args: Vec<OsString>,
    /// Whether its stdout is a terminal.
    pub terminal: bool,
}

/// Reads a request, refusing anything malformed or oversized with a message for the client.
pub fn read_request(r: &mut dyn Read) -> Result<Request, String> {
    let mut head = [0u8; 7];
    r.read_exact(&mut head)
        .map_err(|e| format!("reading the request: {e}"))?;
    if &head[..5] != MAGIC {
        return Err("not a snapvol control request".into());
    }
    if head[5] != VERSION {
        return Err(format!(
            "control protocol version {} is not spoken here (this server speaks {VERSION}): \
             use a snapvol of the server's version",
            head[5]
        ));
    }
    let terminal = head[6] & 1 != 0;
    let cwd = PathBuf::from(OsString::from_vec(get_bytes(r)?));
    let mut n = [0u8; 4];
    r.read_exact(&mut n)
        .map_err(|e| format!("reading the request: {e}"))?;
    let n = u32::from_le_bytes(n);
    if n > MAX_ARGS {
        return Err(format!("{n} arguments: at most {MAX_ARGS}"));
    }
    let mut args = Vec::with_capacity(n as usize);
    for _ in 0..n {
        args.push(OsString::from_vec(get_bytes(r)?));
    }
    Ok(Request {
        cwd,
        args,
        terminal,
    })
}

fn get_bytes(r: &mut dyn Read) -> Result<Vec<u8>, String> {
    let mut n = [0u8; 4];
    r.read_exact(&mut n)
        .map_err(|e| format!("reading the request: {e}"))?;
    let n = u32::from_le_bytes(n);
    if n > MAX_ARG_BYTES {
        return Err(format!("a {n}-byte argument: at most {MAX_ARG_BYTES}"));
    }
    let mut b = vec![0u8; n as usize];
    r.read_exact(&mut b)
        .map_err(|e| format!("reading the request: {e}"))?;
    Ok(b)
}

/// A forwarded command's output, framed onto the client's socket. A client that went away
/// is not an error of the command: the rest of its output is dropped.
pub struct SocketSink {
    stream: io::BufWriter<UnixStream>,
    terminal: bool,
    gone: bool,
}

impl SocketSink {
    /// Frames output onto `stream`.
    pub fn new(stream: UnixStream, terminal: bool) -> SocketSink {
        SocketSink {
            stream: io::BufWriter::with_capacity(256 << 10, stream),
            terminal,
            gone: false,
        }
    }

    fn frame(&mut self, kind: u8, b: &[u8]) -> io::Result<()> {
        if self.gone {
            return Ok(());
        }
        for piece in b.chunks(MAX_FRAME as usize) {
            let r = self
                .stream
                .write_all(&[kind])
                .and_then(|_| self.stream.write_all(&(piece.len() as u32).to_le_bytes()))
                .and_then(|_| self.stream.write_all(piece));
            if r.is_err() {
                self.gone = true;
                return Ok(());
            }
        }
        if self.terminal && kind == FRAME_STDOUT {
            // A person watching sees lines as they come.
            let _ = self.stream.flush();
        }
        Ok(())
    }
}

impl Sink for SocketSink {
    fn finish(&mut self, code: u8) {
        let _ = self.frame(FRAME_EXIT, &[code]);
        let _ = self.stream.flush();
    }
    fn out(&mut self, b: &[u8]) -> io::Result<()> {
        self.frame(FRAME_STDOUT, b)
    }
    fn err(&mut self, b: &[u8]) -> io::Result<()> {
        // Reports are rare and should not wait behind buffered data.
        self.frame(FRAME_STDERR, b)?;
        if !self.gone {
            let _ = self.stream.flush();
        }
        Ok(())
    }
    fn out_is_terminal(&self) -> bool {
        self.terminal
    }
}

/// Binds the control socket at `path` with owner-only permissions: bound under a
/// temporary name, restricted, then renamed into place, so the socket is never reachable
/// with wider permissions. A socket left by a server that is gone (it refuses connections)
/// is replaced; one that answers belongs to a running server and is an error.
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::PermissionsExt;
    if UnixStream::connect(path).is_ok() {
        return Err(format!(
            "{}: another server answers on this control socket",
            path.display()
        ));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("{}: {e}", path.display()));
    }
    Ok(l)
}

/// The exit status an `ExitCode` stands for (it has no getter; every status the CLI uses
/// is one of these).
pub fn exit_status(code: ExitCode) -> u8 {
    (0..=255u8)
        .find(|&c| ExitCode::from(c) == code)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: u8, args: &[&str]) -> Vec<u8> {
        let mut r = MAGIC.to_vec();
        r.push(version);
        r.push(1);
        put_bytes(&mut r, b"/work");
        r.extend_from_slice(&(args.len() as u32).to_le_bytes());
        for a in args {
            put_bytes(&mut r, a.as_bytes());
        }
        r
    }

    #[test]
    fn a_request_round_trips() {
        let r = read_request(&mut &request(VERSION, &["list", "p.img"])[..]).unwrap();
        assert_eq!(r.cwd, Path::new("/work"));
        assert_eq!(r.args, ["list", "p.img"]);
        assert!(r.terminal);
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason_and_nothing_large_is_allocated() {
        let good = request(VERSION, &["list", "p.img"]);
        // Every cut of a good request is refused, never taken for a shorter one.
        for cut in 0..good.len() {
            let e = read_request(&mut &good[..cut]).err().expect("refused");
            assert!(
                e.starts_with("reading the request") || e.contains("not a snapvol"),
                "{e}"
            );
        }
        let e = read_request(&mut &request(VERSION + 1, &[])[..])
            .err()
            .unwrap();
        assert!(e.contains("version 2") && e.contains("speaks 1"), "{e}");
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(
            read_request(&mut &bad[..]).err().unwrap(),
            "not a snapvol control request"
        );
        // Counts and lengths beyond the bounds are refused before anything is allocated.
        let mut many = request(VERSION, &[]);
        let at = many.len() - 4;
        many[at..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_request(&mut &many[..])
            .err()
            .unwrap()
            .contains("arguments"));
        let mut long = MAGIC.to_vec();
        long.extend_from_slice(&[VERSION, 0]);
        long.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_request(&mut &long[..])
            .err()
            .unwrap()
            .contains("byte argument"));
    }

    #[test]
    fn exit_statuses_survive_the_trip() {
        for c in [0u8, 1, 2, 3, 255] {
            assert_eq!(exit_status(ExitCode::from(c)), c);
        }
        assert_eq!(exit_status(ExitCode::SUCCESS), 0);
        assert_eq!(exit_status(ExitCode::FAILURE), 1);
    }
}
