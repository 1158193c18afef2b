//! A CSI controller: the Container Storage Interface's Identity, Controller,
//! GroupController and SnapshotMetadata services over gRPC on a Unix socket, backed by one
//! [`Pool`].
//!
//! The wire types come from `proto/csi.proto` (names and field numbers as in the CSI
//! specification, v1.13), compiled at build time. Each call runs the pool's own catalog
//! operation on a blocking thread, so a commit's device flushes never stall the runtime:
//!
//! | CSI call | snapvol |
//! |---|---|
//! | CreateVolume (empty / from a snapshot / from a volume) | [`Pool::create_volume`], [`Pool::clone_snapshot_by_id`], [`Pool::clone_volume_by_id`] |
//! | DeleteVolume, ControllerExpandVolume | [`Pool::delete_volume_by_id`], [`Pool::resize_volume_by_id`] |
//! | CreateSnapshot, DeleteSnapshot | [`Pool::snapshot_group_by_id`], [`Pool::bookmark_by_id`] then [`Pool::delete_snapshot_by_id`] |
//! | ListVolumes, ListSnapshots | [`Pool::list_volumes`], [`Pool::list_snapshots`] (tokens passed through) |
//! | CreateVolumeGroupSnapshot | one atomic [`Pool::snapshot_group_by_id`] |
//! | GetMetadataAllocated, GetMetadataDelta | [`Pool::allocated`], [`Pool::delta`], page by page |
//!
//! Handles are self-describing: `vol-<32 hex>` is a volume id, `snap-<32 hex>` a snapshot
//! id, `group-<32 hex>` a group snapshot (named by its member with the smallest id), so a
//! pre-provisioned `snapshotHandle` resolves with no parameters. Deleting a snapshot keeps
//! a bookmark of it (one catalog entry, no space), so a later GetMetadataDelta can still
//! start from it. There is no Node service: volumes reach nodes as NBD exports (see
//! docs/csi.md).

mod backups;
mod controller;
mod group;
mod handles;
mod identity;
mod metadata;
mod status;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::backup::Target;
use crate::error::{Error, Result};
use crate::Pool;
pub use backups::{valid_target_name, BackupTargets, BACKUP_TARGET_PARAMETER};

pub use handles::Handle;

/// The gRPC types and service traits generated from `proto/csi.proto` (package `csi.v1`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/csi.v1.rs"));
}

/// The name the plugin reports (GetPluginInfo), in CSI's reverse-domain form.
pub const DEFAULT_DRIVER_NAME: &str = "snapvol.csi.io";

/// How the CSI server behaves.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CsiOptions {
    /// The plugin name GetPluginInfo reports.
    pub driver_name: String,
    /// Size of a volume whose CreateVolume gives no capacity range, in bytes.
    pub default_volume_size: u64,
    /// Keep a bookmark of each deleted snapshot so deltas can start from it (default on).
    pub bookmark_deleted_snapshots: bool,
    /// Stop serving (gracefully: in-flight calls finish) on SIGINT or SIGTERM.
    pub stop_on_signal: bool,
    /// How long a stop waits for calls in flight and for clients to close their
    /// connections before it drops them (default 10 s): a client that never answers the
    /// server's GOAWAY cannot keep the server, and the pool, from stopping.
    pub stop_grace: Duration,
    /// The backup targets a VolumeSnapshotClass may name (`snapvol.io/backup-target`), by
    /// name: see [`CsiOptions::backup_target`].
    pub backup_targets: BackupTargets,
}

impl Default for CsiOptions {
    fn default() -> Self {
        CsiOptions {
            driver_name: DEFAULT_DRIVER_NAME.to_string(),
            default_volume_size: 1 << 30,
            bookmark_deleted_snapshots: true,
            stop_on_signal: false,
            stop_grace: Duration::from_secs(10),
            backup_targets: BackupTargets::default(),
        }
    }
}

impl CsiOptions {
    /// Sets [`CsiOptions::driver_name`].
    pub fn driver_name(mut self, name: impl Into<String>) -> Self {
        self.driver_name = name.into();
        self
    }

    /// Sets [`CsiOptions::default_volume_size`].
    pub fn default_volume_size(mut self, bytes: u64) -> Self {
        self.default_volume_size = bytes;
        self
    }

    /// Sets [`CsiOptions::bookmark_deleted_snapshots`].
    pub fn bookmark_deleted_snapshots(mut self, on: bool) -> Self {
        self.bookmark_deleted_snapshots = on;
        self
    }

    /// Sets [`CsiOptions::stop_on_signal`].
    pub fn stop_on_signal(mut self, on: bool) -> Self {
        self.stop_on_signal = on;
        self
    }

    /// Adds backup target `name` (1 to 63 of `a-z 0-9 - _ .`; it becomes part of snapshot
    /// handles, `snap-<id>@name`): snapshots whose class has the parameter
    /// `snapvol.io/backup-target: name` are pushed there, and a handle naming it restores
    /// from it in any pool that has the same name configured. `InvalidArgument` for a bad
    /// name.
    pub fn backup_target(mut self, name: &str, target: Arc<dyn Target>) -> Result<Self> {
        if !backups::valid_target_name(name) {
            return Err(Error::InvalidArgument(format!(
                "backup target name {name:?}: use 1 to 63 of a-z, 0-9, '-', '_', '.', starting with a letter or digit"
            )));
        }
        self.backup_targets.0.insert(name.to_string(), target);
        Ok(self)
    }

    /// Sets [`CsiOptions::stop_grace`].
    pub fn stop_grace(mut self, grace: Duration) -> Self {
        self.stop_grace = grace;
        self
    }
}

/// What every service shares: the pool and the options. Creations take `create` so that
/// two concurrent requests for one CSI name (a retry racing its original) see each other:
/// the name checks and the creation are one step.
pub(crate) struct Driver {
    pub(crate) pool: Pool,
    pub(crate) opts: CsiOptions,
    pub(crate) create: Mutex<()>,
    pub(crate) backups: backups::Backups,
}

impl Driver {
    /// Runs `f` on a blocking thread: catalog operations commit, and a commit waits for
    /// device flushes, which must not hold up the runtime's workers.
    pub(crate) async fn run<T, F>(self: &Arc<Self>, f: F) -> std::result::Result<T, tonic::Status>
    where
        T: Send + 'static,
        F: FnOnce(&Driver) -> std::result::Result<T, tonic::Status> + Send + 'static,
    {
        let d = self.clone();
        match tokio::task::spawn_blocking(move || f(&d)).await {
            Ok(r) => r,
            Err(e) => Err(tonic::Status::internal(format!(
                "request handler failed: {e}"
            ))),
        }
    }
}

/// A running CSI server; [`Server::stop`] (or dropping it) stops it.
pub struct Server {
    path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The socket path of a CSI endpoint: `unix:///run/csi.sock`, `unix:/run/csi.sock` or a
/// plain path. Other schemes (CSI allows only Unix sockets in practice) are refused.
pub fn endpoint_path(endpoint: &str) -> Result<PathBuf> {
    let path = if let Some(rest) = endpoint.strip_prefix("unix://") {
        rest
    } else if let Some(rest) = endpoint.strip_prefix("unix:") {
        rest
    } else if endpoint.contains("://") {
        return Err(Error::InvalidArgument(format!(
            "CSI endpoint {endpoint:?}: only unix:// endpoints are served"
        )));
    } else {
        endpoint
    };
    if path.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "CSI endpoint {endpoint:?} names no socket path"
        )));
    }
    Ok(PathBuf::from(path))
}

/// Binds `path`, replacing a stale socket file a crashed server left (nothing answers on
/// it) but never a live server's socket or a file that is not a socket.
fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    let io_err = |op: &'static str| {
        move |source: io::Error| Error::Io {
            op,
            offset: 0,
            source,
        }
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::InvalidArgument(format!(
                "{} exists and is not a socket",
                path.display()
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::InUse {
                what: format!("CSI socket {}", path.display()),
                pid: None,
            });
        }
        std::fs::remove_file(path).map_err(io_err("remove stale socket"))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(io_err("bind"))?;
    listener.set_nonblocking(true).map_err(io_err("bind"))?;
    Ok(listener)
}

impl Server {
    /// Serves `pool` on the Unix socket `path` from a thread of its own (with a two-worker
    /// runtime inside it). Returns once the socket accepts connections.
    pub fn start_unix(pool: &Pool, path: impl AsRef<Path>, opts: CsiOptions) -> Result<Server> {
        let path = path.as_ref().to_path_buf();
        let listener = bind(&path)?;
        let driver = Arc::new(Driver {
            pool: pool.clone(),
            opts,
            create: Mutex::new(()),
            backups: Default::default(),
        });
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("snapvol-csi".into())
            .spawn(move || serve(driver, listener, stop_rx))
            .map_err(|source| Error::Io {
                op: "spawn",
                offset: 0,
                source,
            })?;
        Ok(Server {
            path,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The socket it serves on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Blocks until the server stops (by a signal, with [`CsiOptions::stop_on_signal`]),
    /// then removes its socket.
    pub fn wait(mut self) -> Result<()> {
        self.join()
    }

    /// Stops serving: no new calls are taken, calls in flight finish, the socket is removed.
    pub fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let r = match thread.join() {
            Ok(r) => r,
            Err(_) => Err(Error::Internal("the CSI server thread panicked".into())),
        };
        let _ = std::fs::remove_file(&self.path);
        r
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.join();
    }
}

fn serve(
    driver: Arc<Driver>,
    listener: std::os::unix::net::UnixListener,
    stop: oneshot::Receiver<()>,
) -> Result<()> {
    let io_err = |op: &'static str| {
        move |source: io::Error| Error::Io {
            op,
            offset: 0,
            source,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .thread_name("snapvol-csi-worker")
        .enable_io()
        .enable_time()
        .build()
        .map_err(io_err("start runtime"))?;
    let grace = driver.opts.stop_grace;
    let held = driver.clone();
    let served = rt.block_on(async move {
        let listener = tokio::net::UnixListener::from_std(listener).map_err(io_err("listen"))?;
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let on_signal = driver.opts.stop_on_signal;
        let stopping = Arc::new(tokio::sync::Notify::new());
        let told = stopping.clone();
        let shutdown = async move {
            if on_signal {
                wait_for_signal(stop).await;
            } else {
                let _ = stop.await;
            }
            // A permit is stored if the grace timer below is not waiting yet.
            told.notify_one();
        };
        use proto::controller_server::ControllerServer;
        use proto::group_controller_server::GroupControllerServer;
        use proto::identity_server::IdentityServer;
        use proto::snapshot_metadata_server::SnapshotMetadataServer;
        let serving = tonic::transport::Server::builder()
            .add_service(IdentityServer::new(identity::IdentityService(
                driver.clone(),
            )))
            .add_service(ControllerServer::new(controller::ControllerService(
                driver.clone(),
            )))
            .add_service(GroupControllerServer::new(group::GroupService(
                driver.clone(),
            )))
            .add_service(SnapshotMetadataServer::new(metadata::MetadataService(
                driver.clone(),
            )))
            .serve_with_incoming_shutdown(incoming, shutdown);
        // A graceful stop waits for every connection to close; past the grace period the
        // remaining ones are dropped with the runtime.
        tokio::select! {
            r = serving => r.map_err(|e| Error::Io {
                op: "serve",
                offset: 0,
                source: io::Error::other(e),
            }),
            () = async {
                stopping.notified().await;
                tokio::time::sleep(grace).await;
            } => Ok(()),
        }
    });
    // Blocking calls still running (a commit) get the same grace to finish.
    rt.shutdown_timeout(grace);
    // Backup pushes run on threads of their own and cannot be cut short: a stop waits for
    // them as long again, then leaves them running (see `Backups::join`).
    held.backups.join(grace);
    served
}

/// Waits for SIGINT, SIGTERM or an explicit stop, whichever comes first.
async fn wait_for_signal(stop: oneshot::Receiver<()>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        let _ = stop.await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = stop => {}
    }
}
