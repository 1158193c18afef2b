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
mod server;
mod transmission;
mod wire;

use crate::pool::Pool;
pub use server::{ExportControl, Server, ServerOptions};
use std::io::{self, Read, Write};

/// Serves one client on `stream` until it disconnects: the handshake, then its requests.
/// Errors are the connection's (a client that breaks the protocol or goes away); the pool
/// is never left inconsistent by one.
pub fn serve_connection<S: Read + Write>(pool: &Pool, stream: S) -> io::Result<()> {
    let stream = std::cell::RefCell::new(stream);
    let (mut r, mut w) = (Half(&stream), Half(&stream));
    let exports = export::Exports {
        pool,
        closed: None,
        claim: None,
    };
    match handshake::negotiate(&exports, &mut r, &mut w)? {
        Some(chosen) => transmission::serve(&chosen, &mut r, &mut w),
        None => Ok(()),
    }
}

/// One stream used as both the request side and the reply side, one call at a time.
pub(crate) struct Half<'a, S>(pub(crate) &'a std::cell::RefCell<S>);

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

/// Accepts clients on `listener` until an unrecoverable error, each on its own thread, with
/// [`ServerOptions::default`]'s limits. A failed `accept` that concerns one attempt, or a
/// passing lack of file descriptors, is waited out, not the end of the server. [`Server`] is the form that can be stopped.
pub fn serve_tcp(pool: &Pool, listener: std::net::TcpListener) -> io::Result<()> {
    server::accept_loop(
        pool,
        &listener,
        &server::Shared::new(ServerOptions::default()),
    )
}

/// [`serve_tcp`] on a Unix socket.
pub fn serve_unix(pool: &Pool, listener: std::os::unix::net::UnixListener) -> io::Result<()> {
    server::accept_loop(
        pool,
        &listener,
        &server::Shared::new(ServerOptions::default()),
    )
}
