//! A running NBD server that can be stopped: [`Server`] accepts on its own thread, keeps
//! track of its connections, and can close one export's connections (refusing new ones to
//! it) or stop altogether, closing every connection and committing the pool.
//!
//! Stopping works on sockets blocked in `read` or `accept`: a connection is shut down
//! (`shutdown(2)`, so its thread's read returns and it ends), and the accept loop is woken
//! by a connection the server makes to itself.

use super::export::{ExportKey, Exports};
use super::{handshake, transmission};
use crate::error::Result;
use crate::pool::Pool;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A connection's socket, kept so the server can shut it down.
pub(crate) enum Conn {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Conn {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(t),
            Conn::Unix(s) => s.set_read_timeout(t),
        }
    }

    fn shutdown(&self) {
        // The connection may have ended on its own: nothing to do then.
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

struct Live {
    conn: Conn,
    /// The export, once the handshake chose one.
    export: Option<ExportKey>,
    thread: Option<JoinHandle<()>>,
}

/// Limits a server keeps, so idle or stuck clients cannot hold its threads without bound.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServerOptions {
    /// Connections served at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// How long a client may take over the handshake (from connecting to choosing an
    /// export) before it is closed.
    pub handshake_timeout: Duration,
    /// Once serving, how long a client may send nothing before it is closed (`None`, the
    /// default: never, since qemu and nbd-client keep idle connections open by design; set
    /// it for clients that connect per job and may vanish without closing).
    pub idle_timeout: Option<Duration>,
    /// Exports (`VOL` or `VOL@SNAP`) closed from the start, before the first connection is
    /// accepted, as [`ExportControl::close`] would close them; a name the pool does not
    /// have makes the server's start fail (`io::ErrorKind::NotFound`).
    pub closed_exports: Vec<String>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(30),
            idle_timeout: None,
            closed_exports: Vec::new(),
        }
    }
}

impl ServerOptions {
    /// Sets [`ServerOptions::max_connections`].
    #[must_use]
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// Sets [`ServerOptions::idle_timeout`].
    #[must_use]
    pub fn idle_timeout(mut self, t: Option<Duration>) -> Self {
        self.idle_timeout = t;
        self
    }

    /// Adds an export to [`ServerOptions::closed_exports`].
    #[must_use]
    pub fn closed_export(mut self, name: impl Into<String>) -> Self {
        self.closed_exports.push(name.into());
        self
    }

    /// Sets [`ServerOptions::handshake_timeout`].
    #[must_use]
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }
}

/// What the accept thread and the connection threads share with the [`Server`] handle.
pub(crate) struct Shared {
    opts: ServerOptions,
    stopping: AtomicBool,
    next: AtomicU64,
    live: Mutex<HashMap<u64, Live>>,
    closed: Mutex<HashSet<ExportKey>>,
}

impl Shared {
    pub(crate) fn new(opts: ServerOptions) -> Arc<Shared> {
        Arc::new(Shared {
            opts,
            stopping: AtomicBool::new(false),
            next: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
            closed: Mutex::new(HashSet::new()),
        })
    }
}

/// A listening socket: TCP or Unix.
pub(crate) trait Listener: Send + Sync + 'static {
    type Stream: Read + Write + Send + 'static;
    fn accept_one(&self) -> io::Result<Self::Stream>;
    fn prepare(stream: &Self::Stream) -> io::Result<(Conn, Self::Stream)>;
    /// Makes a blocked `accept_one` return.
    fn wake(&self);
}

impl Listener for std::net::TcpListener {
    type Stream = std::net::TcpStream;
    fn accept_one(&self) -> io::Result<Self::Stream> {
        self.accept().map(|(s, _)| s)
    }
    fn prepare(stream: &Self::Stream) -> io::Result<(Conn, Self::Stream)> {
        // Replies are whole messages; do not hold them back waiting for more.
        stream.set_nodelay(true)?;
        Ok((Conn::Tcp(stream.try_clone()?), stream.try_clone()?))
    }
    fn wake(&self) {
        if let Ok(addr) = self.local_addr() {
            let _ = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1));
        }
    }
}

impl Listener for std::os::unix::net::UnixListener {
    type Stream = std::os::unix::net::UnixStream;
    fn accept_one(&self) -> io::Result<Self::Stream> {
        self.accept().map(|(s, _)| s)
    }
    fn prepare(stream: &Self::Stream) -> io::Result<(Conn, Self::Stream)> {
        Ok((Conn::Unix(stream.try_clone()?), stream.try_clone()?))
    }
    fn wake(&self) {
        if let Some(path) = self
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Into::into))
        {
            let _ = std::os::unix::net::UnixStream::connect::<std::path::PathBuf>(path);
        }
    }
}

/// Whether a failed `accept` concerns only that one connection attempt (or a passing lack of
/// file descriptors or memory): the server waits a moment and goes on instead of ending.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
    ) || matches!(
        e.raw_os_error(),
        Some(libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM)
    )
}

/// The errno values `transient` waits out (Linux's numbers).
mod libc_errno {
    pub const EMFILE: i32 = 24;
    pub const ENFILE: i32 = 23;
    pub const ENOBUFS: i32 = 105;
    pub const ENOMEM: i32 = 12;
}

/// Accepts until the server stops, serving each client on its own thread.
pub(crate) fn accept_loop<L: Listener>(
    pool: &Pool,
    listener: &L,
    shared: &Arc<Shared>,
) -> io::Result<()> {
    loop {
        let stream = match listener.accept_one() {
            Ok(s) => s,
            Err(e) if shared.stopping.load(Ordering::SeqCst) => {
                let _ = e;
                return Ok(());
            }
            Err(e) if transient(&e) => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => return Err(e),
        };
        if shared.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        if shared.live.lock().len() >= shared.opts.max_connections {
            // Over the limit: closed at once (the client sees the connection end).
            continue;
        }
        let Ok((conn, stream)) = L::prepare(&stream) else {
            continue;
        };
        if conn
            .set_read_timeout(Some(shared.opts.handshake_timeout))
            .is_err()
        {
            continue;
        }
        let id = shared.next.fetch_add(1, Ordering::Relaxed);
        shared.live.lock().insert(
            id,
            Live {
                conn,
                export: None,
                thread: None,
            },
        );
        let (pool, sh) = (pool.clone(), shared.clone());
        let thread = std::thread::spawn(move || {
            // One client's protocol error or disconnect concerns only its own connection.
            let _ = serve_one(&pool, stream, &sh, id);
            // A finished connection forgets itself, unless `stop` is collecting it.
            if !sh.stopping.load(Ordering::SeqCst) {
                sh.live.lock().remove(&id);
            }
        });
        if let Some(l) = shared.live.lock().get_mut(&id) {
            l.thread = Some(thread);
        }
    }
}

fn serve_one<S: Read + Write>(pool: &Pool, stream: S, shared: &Shared, id: u64) -> io::Result<()> {
    // Buffered both ways: a pipelining client's requests are read many per system call, and
    // a reply's header and data leave in one (every reply is flushed).
    let stream = std::cell::RefCell::new(stream);
    let mut reader = io::BufReader::with_capacity(64 << 10, super::Half(&stream));
    let mut writer = io::BufWriter::with_capacity(64 << 10, super::Half(&stream));
    // Registered under the export before the client hears its choice is accepted, and
    // checked against the closed set under the same lock `close_export` takes: a close
    // either sees this connection or this connection sees the close.
    let claim = |key: ExportKey| {
        let mut live = shared.live.lock();
        if shared.closed.lock().contains(&key) {
            return false;
        }
        if let Some(l) = live.get_mut(&id) {
            l.export = Some(key);
        }
        true
    };
    let exports = Exports {
        pool,
        closed: Some(&shared.closed),
        claim: Some(&claim),
    };
    let Some(chosen) = handshake::negotiate(&exports, &mut reader, &mut writer)? else {
        return Ok(());
    };
    // The handshake is over: from now on only the idle timeout, if one is set. A read
    // that times out ends this connection (its thread returns the error).
    if let Some(l) = shared.live.lock().get(&id) {
        l.conn.set_read_timeout(shared.opts.idle_timeout)?;
    }
    transmission::serve(&chosen, &mut reader, &mut writer)
}

/// A running NBD server (see the module docs). Dropping it stops it.
pub struct Server {
    pool: Pool,
    shared: Arc<Shared>,
    wake: Box<dyn Fn() + Send>,
    accept: Option<JoinHandle<io::Result<()>>>,
}

impl Server {
    /// Serves `pool` on a TCP listener, from a thread of its own.
    pub fn start_tcp(
        pool: &Pool,
        listener: std::net::TcpListener,
        opts: ServerOptions,
    ) -> io::Result<Server> {
        Server::start(pool, listener, opts)
    }

    /// Serves `pool` on a Unix socket listener, from a thread of its own.
    pub fn start_unix(
        pool: &Pool,
        listener: std::os::unix::net::UnixListener,
        opts: ServerOptions,
    ) -> io::Result<Server> {
        Server::start(pool, listener, opts)
    }

    fn start<L: Listener>(pool: &Pool, listener: L, opts: ServerOptions) -> io::Result<Server> {
        let shared = Shared::new(opts);
        // Before the accept thread exists, so no client can choose one of them first.
        let control = ExportControl {
            pool: pool.clone(),
            shared: shared.clone(),
        };
        for name in &shared.opts.closed_exports {
            control.close(name).map_err(|e| {
                io::Error::new(io::ErrorKind::NotFound, format!("closed export: {e}"))
            })?;
        }
        let listener = Arc::new(listener);
        let (p, sh, l) = (pool.clone(), shared.clone(), listener.clone());
        let accept = std::thread::Builder::new()
            .name("snapvol-nbd-accept".into())
            .spawn(move || accept_loop(&p, &*l, &sh))?;
        Ok(Server {
            pool: pool.clone(),
            shared,
            wake: Box::new(move || listener.wake()),
            accept: Some(accept),
        })
    }

    /// Connections open now (handshaking or serving).
    pub fn connections(&self) -> usize {
        self.shared.live.lock().len()
    }

    /// Closes every connection serving export `name` (`VOL` or `VOL@SNAP`, by whatever
    /// name the clients used) and refuses new ones to it until [`Server::reopen_export`];
    /// returns how many were closed. Writes they completed stay; nothing is committed here.
    /// The same as [`ExportControl::close`] on [`Server::exports`].
    pub fn close_export(&self, name: &str) -> Result<usize> {
        self.exports().close(name)
    }

    /// Lets clients connect to export `name` again after [`Server::close_export`]. The
    /// same as [`ExportControl::reopen`].
    pub fn reopen_export(&self, name: &str) -> Result<bool> {
        self.exports().reopen(name)
    }

    /// A handle that closes and reopens this server's exports from anywhere (another
    /// thread, a control command) while the server runs; it does nothing once the server
    /// has stopped.
    pub fn exports(&self) -> ExportControl {
        ExportControl {
            pool: self.pool.clone(),
            shared: self.shared.clone(),
        }
    }

    /// Stops: no new connections, every connection closed, every thread joined, and the
    /// pool committed so each write a client saw complete is durable. Returns the accept
    /// loop's error, if it had stopped on one, or the commit's.
    pub fn stop(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        let Some(accept) = self.accept.take() else {
            return Ok(());
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        (self.wake)();
        let accepted = accept.join();
        let live: Vec<Live> = self.shared.live.lock().drain().map(|(_, l)| l).collect();
        for l in &live {
            l.conn.shutdown();
        }
        for l in live {
            if let Some(t) = l.thread {
                let _ = t.join();
            }
        }
        self.pool.flush()?;
        match accepted {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(crate::Error::io("accept", 0, e)),
            Err(_) => Err(crate::Error::Internal(
                "the NBD accept thread panicked".into(),
            )),
        }
    }
}

/// Marks a running server's exports closed or open again (see [`Server::exports`]). A closed
/// export is neither listed nor served: it is the way to keep a volume (or one snapshot) of a
/// served pool off the network. The mark is the server's, not the pool's: it lasts until
/// reopened or until the server stops, and it follows the volume or snapshot by id, so a
/// rename keeps it and a new volume created under the old name is offered.
#[derive(Clone)]
pub struct ExportControl {
    pool: Pool,
    shared: Arc<Shared>,
}

impl ExportControl {
    /// Closes every connection serving export `name` (`VOL` or `VOL@SNAP`) and refuses new
    /// ones to it; returns how many connections were closed. A volume's snapshots are
    /// exports of their own and stay open. `VolumeNotFound` / `SnapshotNotFound` when the
    /// pool has no such export.
    pub fn close(&self, name: &str) -> Result<usize> {
        let key = self.key(name)?;
        let live = self.shared.live.lock();
        self.shared.closed.lock().insert(key);
        let mut n = 0;
        for l in live.values().filter(|l| l.export == Some(key)) {
            l.conn.shutdown();
            n += 1;
        }
        Ok(n)
    }

    /// Offers export `name` again; `Ok(false)` when it was not closed. The same not-found
    /// errors as [`ExportControl::close`].
    pub fn reopen(&self, name: &str) -> Result<bool> {
        let key = self.key(name)?;
        Ok(self.shared.closed.lock().remove(&key))
    }

    /// Whether export `name` is closed.
    pub fn is_closed(&self, name: &str) -> Result<bool> {
        let key = self.key(name)?;
        Ok(self.shared.closed.lock().contains(&key))
    }

    fn key(&self, name: &str) -> Result<super::export::ExportKey> {
        Ok(super::export::Export::open(&self.pool, name)
            .ok_or_else(|| match name.split_once('@') {
                Some(_) => crate::Error::SnapshotNotFound(name.into()),
                None => crate::Error::VolumeNotFound(name.into()),
            })?
            .key())
    }
}

impl std::fmt::Debug for ExportControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportControl")
            .field("closed", &self.shared.closed.lock().len())
            .finish_non_exhaustive()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}
