//! An NBD server (feature `nbd`): exports a pool's volumes read-write and its snapshots
//! read-only to any NBD client (qemu, nbd-client, nbdkit's tools, libnbd), over TCP or a Unix
//! socket. Export names are `VOL` and `VOL@SNAP`; the empty name is the only volume of a
//! pool that has one.
//!
//! The fixed-newstyle handshake (NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_EXPORT_NAME,
//! NBD_OPT_ABORT, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_LIST/SET_META_CONTEXT with
//! `base:allocation`); commands READ, WRITE (with FUA), FLUSH, TRIM, WRITE_ZEROES (with
//! NO_HOLE), BLOCK_STATUS (from the block map) and DISC. FLUSH commits the pool, so it covers
//! every connection's completed writes and the server advertises CAN_MULTI_CONN. There is no
//! TLS: listen on loopback or a Unix socket.
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! let pool = snapvol::Pool::open_path("pool.img", snapvol::PoolOptions::default()).unwrap();
//! let listener = std::net::TcpListener::bind("127.0.0.1:10809")?;
//! snapvol::nbd::serve_tcp(&pool, listener)    // qemu-io nbd://127.0.0.1/VOL
//! # }
//! ```

mod export;
mod handshake;
mod transmission;
mod wire;

use crate::pool::Pool;
use std::io::{self, Read, Write};

/// Serves one client on `stream` until it disconnects: the handshake, then its requests.
/// Errors are the connection's (a client that breaks the protocol or goes away); the pool
/// is never left inconsistent by one.
pub fn serve_connection<S: Read + Write>(pool: &Pool, stream: S) -> io::Result<()> {
    let stream = std::cell::RefCell::new(stream);
    let (mut r, mut w) = (Half(&stream), Half(&stream));
    match handshake::negotiate(pool, &mut r, &mut w)? {
        Some(chosen) => transmission::serve(&chosen, &mut r, &mut w),
        None => Ok(()),
    }
}

/// One stream used as both the request side and the reply side, one call at a time.
struct Half<'a, S>(&'a std::cell::RefCell<S>);

impl<S: Read> Read for Half<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

impl<S: Write> Write for Half<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.borrow_mut().flush()
    }
}

/// Accepts clients on `listener` forever, each on its own thread.
pub fn serve_tcp(pool: &Pool, listener: std::net::TcpListener) -> io::Result<()> {
    for stream in listener.incoming() {
        let stream = stream?;
        // Replies are whole messages; do not hold them back waiting for more.
        stream.set_nodelay(true)?;
        spawn(pool, stream);
    }
    Ok(())
}

/// Accepts clients on a Unix socket forever, each on its own thread.
pub fn serve_unix(pool: &Pool, listener: std::os::unix::net::UnixListener) -> io::Result<()> {
    for stream in listener.incoming() {
        spawn(pool, stream?);
    }
    Ok(())
}

/// A socket that can be split into a reading and a writing handle.
trait Socket: Read + Write + Send + Sized + 'static {
    fn try_clone(&self) -> io::Result<Self>;
}

impl Socket for std::net::TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        std::net::TcpStream::try_clone(self)
    }
}

impl Socket for std::os::unix::net::UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        std::os::unix::net::UnixStream::try_clone(self)
    }
}

fn spawn<S: Socket>(pool: &Pool, stream: S) {
    let pool = pool.clone();
    std::thread::spawn(move || {
        // One client's protocol error or disconnect concerns only its own connection.
        let _ = serve_socket(&pool, stream);
    });
}

fn serve_socket<S: Socket>(pool: &Pool, stream: S) -> io::Result<()> {
    // Buffered both ways: a pipelining client's requests are read many per system call, and
    // a reply's header and data leave in one (every reply is flushed).
    let mut writer = io::BufWriter::with_capacity(64 << 10, stream.try_clone()?);
    let mut reader = io::BufReader::with_capacity(64 << 10, stream);
    match handshake::negotiate(pool, &mut reader, &mut writer)? {
        Some(chosen) => transmission::serve(&chosen, &mut reader, &mut writer),
        None => Ok(()),
    }
}
