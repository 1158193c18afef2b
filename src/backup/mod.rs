//! Backups: a deduplicating, block-indexed repository on a directory or any S3-compatible
//! store, pushed from snapshots by snapvol's own change tracking and restored into any pool
//! by snapshot id alone (format: docs/backup-format.md).
//!
//! A repository holds immutable chunk objects, each a fixed, aligned range of a volume named
//! by the BLAKE3 hash of its content, and one manifest per backup, named by the snapshot id,
//! listing every chunk that backup needs. So every backup restores alone and any backup can be
//! deleted in any order; chunks no manifest references are swept by [`Repository::gc`].
//!
//! * [`Repository::push`] reads only the chunks that cover the delta since the base backup's
//!   snapshot (or bookmark: each push bookmarks its snapshot, so the local base snapshot may
//!   be deleted and the next push is still incremental), and uploads only chunks the
//!   repository lacks: an interrupted push resumes, clones of one template upload it once.
//! * Data goes first and the manifest last with a create-only put: a manifest that exists is
//!   a complete backup.
//! * [`Repository::restore`] verifies every chunk against its hash, builds a hidden volume and
//!   shows the snapshot, with its original id, in one commit (as receive does); onto an older
//!   restored snapshot of the same lineage it downloads only the chunks that differ.
//!
//! ```
//! use snapvol::backup::{BaseChoice, DirTarget, RepoOptions, Repository};
//! use snapvol::{Pool, PoolOptions, device::MemoryDevice};
//! use std::sync::Arc;
//!
//! # fn main() -> snapvol::Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! let repo = Repository::open_or_create(Arc::new(DirTarget::new(dir.path())?), &RepoOptions::default())?;
//! let a = Pool::create(Arc::new(MemoryDevice::new(64 << 20)), PoolOptions::default())?;
//! a.create_volume("db", 8 << 20)?.write_at(b"precious", 4096)?;
//! let id = a.snapshot("db", "nightly")?;
//! repo.push(&a, id, BaseChoice::Auto)?;
//!
//! // Another pool, another cluster: the snapshot id is all it needs.
//! let b = Pool::create(Arc::new(MemoryDevice::new(64 << 20)), PoolOptions::default())?;
//! repo.restore(id, &b, &Default::default())?;
//! let mut buf = [0u8; 8];
//! b.snapshot_by_id(id)?.read_at(&mut buf, 4096)?;
//! assert_eq!(&buf, b"precious");
//! # Ok(())
//! # }
//! ```

#[cfg(any(test, feature = "testing"))]
mod fault;
mod format;
mod lifecycle;
mod push;
mod restore;
#[cfg(feature = "s3")]
mod s3;
mod sparse_hash;
mod target;

#[cfg(any(test, feature = "testing"))]
pub use fault::{FaultTarget, TargetFault};
pub use format::{
    Compression, Hash, ManifestHeader, RepoConfig, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE, REPO_VERSION,
};
pub use lifecycle::{GcStats, PruneReport, Retention, VerifyProblem, VerifyReport};
pub use push::{BaseChoice, PushStats};
pub use restore::{RestoreOptions, RestoreStats};
#[cfg(feature = "s3")]
pub use s3::{S3Options, S3Target};
pub use target::{DirTarget, MemoryTarget, ObjectMeta, Target};

use crate::error::{Error, Result};
use crate::ids::{PoolId, SnapshotId, VolumeId};
use format::CONFIG_KEY;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How a new repository stores its chunks.
#[derive(Clone, Debug)]
pub struct RepoOptions {
    /// Bytes of volume per chunk, a power of two from 64 KiB to 64 MiB (default 4 MiB).
    pub chunk_size: u32,
    /// How chunks are stored (default LZ4: it costs 0.13 s of CPU per GiB of incompressible
    /// data here and shrinks what volumes mostly hold, zeros in partly written chunks and
    /// filesystem metadata; BENCHMARKS.md).
    pub compression: Compression,
}

impl Default for RepoOptions {
    fn default() -> Self {
        RepoOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            compression: Compression::Lz4,
        }
    }
}

/// Progress of a long operation: `done` of `total` bytes in `phase` ("push", "restore",
/// "verify").
pub type ProgressFn = Arc<dyn Fn(&'static str, u64, u64) + Send + Sync>;

/// A backup repository on a [`Target`].
#[derive(Clone)]
pub struct Repository {
    target: Arc<dyn Target>,
    config: RepoConfig,
    parallelism: usize,
    progress: Option<ProgressFn>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("target", &self.target.describe())
            .field("config", &self.config)
            .field("parallelism", &self.parallelism)
            .finish()
    }
}

/// A backup as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackupInfo {
    /// The snapshot id: the backup's handle.
    pub id: SnapshotId,
    /// The name of the snapshot's volume when it was pushed.
    pub volume: String,
    /// The snapshot's name.
    pub snapshot: String,
    /// The volume's size in bytes.
    pub size: u64,
    /// The backup it was computed against (informational: every backup restores alone).
    pub base_id: Option<SnapshotId>,
    /// Chunks holding data.
    pub chunks: u64,
    /// When the snapshot was taken (seconds since the Unix epoch).
    pub created_unix: u64,
    /// The pool it was pushed from.
    pub pool_id: PoolId,
    /// The volume the snapshot is of.
    pub volume_id: VolumeId,
    /// The snapshot's generation in its pool (orders a volume's backups).
    pub generation: u64,
}

impl From<&ManifestHeader> for BackupInfo {
    fn from(h: &ManifestHeader) -> BackupInfo {
        BackupInfo {
            id: SnapshotId::from_u128(h.snapshot_id),
            volume: h.volume.clone(),
            snapshot: h.snapshot.clone(),
            size: h.size,
            base_id: h.base_id.map(SnapshotId::from_u128),
            chunks: h.entries,
            created_unix: h.created_unix,
            pool_id: PoolId::from_u128(h.pool_id),
            volume_id: VolumeId::from_u128(h.volume_id),
            generation: h.generation,
        }
    }
}

/// A lock older than this is left over by a killed process and is ignored. Pushes rewrite
/// theirs well within it.
pub(crate) const LOCK_STALE: Duration = Duration::from_secs(3600);
/// How often a running push rewrites its lock.
pub(crate) const LOCK_REFRESH: Duration = Duration::from_secs(300);
/// How long a push waits for a running garbage collection to finish.
const GC_WAIT: Duration = Duration::from_secs(600);

impl Repository {
    /// Creates a repository on `target`; `Error::AlreadyExists` if it holds one.
    pub fn create(target: Arc<dyn Target>, opts: &RepoOptions) -> Result<Repository> {
        if !opts.chunk_size.is_power_of_two()
            || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&opts.chunk_size)
        {
            return Err(Error::InvalidArgument(format!(
                "chunk size {} must be a power of two from 64 KiB to 64 MiB",
                opts.chunk_size
            )));
        }
        let config = RepoConfig {
            id: crate::ids::new_id(),
            version: REPO_VERSION,
            chunk_size: opts.chunk_size,
            compression: opts.compression,
        };
        if !target.put(CONFIG_KEY, &config.encode(), true)? {
            return Err(Error::AlreadyExists {
                kind: "backup repository",
                name: target.describe(),
                conflict: String::new(),
            });
        }
        Ok(Repository::with_config(target, config))
    }

    /// Opens the repository on `target`; `Error::BackupNotFound` if there is none.
    pub fn open(target: Arc<dyn Target>) -> Result<Repository> {
        let bytes = target.get(CONFIG_KEY, None)?.ok_or_else(|| {
            Error::BackupNotFound(format!("repository (no config at {})", target.describe()))
        })?;
        let config = RepoConfig::decode(&bytes)?;
        Ok(Repository::with_config(target, config))
    }

    /// Opens the repository on `target`, creating it with `opts` if there is none (two
    /// processes racing to create it agree on whichever config landed first).
    pub fn open_or_create(target: Arc<dyn Target>, opts: &RepoOptions) -> Result<Repository> {
        match Repository::open(target.clone()) {
            Err(Error::BackupNotFound(_)) => match Repository::create(target.clone(), opts) {
                Err(Error::AlreadyExists { .. }) => Repository::open(target),
                r => r,
            },
            r => r,
        }
    }

    fn with_config(target: Arc<dyn Target>, config: RepoConfig) -> Repository {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Repository {
            target,
            config,
            parallelism: (cores * 2).clamp(2, 16),
            progress: None,
        }
    }

    /// The repository's config.
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// Where the repository is.
    pub fn describe(&self) -> String {
        self.target.describe()
    }

    /// Chunks transferred at once by push, restore and verify (default: twice the cores,
    /// 2 to 16). Memory is about this many chunks.
    pub fn set_parallelism(&mut self, n: usize) {
        self.parallelism = n.clamp(1, 256);
    }

    /// Reports progress of long operations to `f`.
    pub fn set_progress(&mut self, f: ProgressFn) {
        self.progress = Some(f);
    }

    fn report(&self, phase: &'static str, done: u64, total: u64) {
        if let Some(p) = &self.progress {
            p(phase, done, total);
        }
    }

    /// Runs `work(i)` for every `i` in `0..n` on up to `parallelism` threads; returns the
    /// results in order, or the first error.
    fn parallel<T: Send>(
        &self,
        n: usize,
        work: impl Fn(usize) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let failed = std::sync::atomic::AtomicBool::new(false);
        let threads = self.parallelism.min(n).max(1);
        let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
        let results = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            if failed.load(std::sync::atomic::Ordering::Relaxed) {
                                return Ok(mine);
                            }
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if i >= n {
                                return Ok(mine);
                            }
                            match work(i) {
                                Ok(v) => mine.push((i, v)),
                                Err(e) => {
                                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                                    return Err(e);
                                }
                            }
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect::<Vec<Result<Vec<(usize, T)>>>>()
        });
        for r in results {
            for (i, v) in r? {
                out[i] = Some(v);
            }
        }
        Ok(out
            .into_iter()
            .map(|v| v.expect("every index done"))
            .collect())
    }

    /// Information about backup `id`.
    pub fn info(&self, id: SnapshotId) -> Result<BackupInfo> {
        Ok(BackupInfo::from(&format::read_header(
            &*self.target,
            id.as_u128(),
        )?))
    }

    /// Takes the push lock of snapshot `id` once no garbage collection runs (see `gc`).
    fn lock_push(&self, id: u128) -> Result<PushLock<'_>> {
        let key = format!("locks/push-{id:032x}");
        let body = lock_body("push");
        self.target.put(&key, body.as_bytes(), false)?;
        let lock = PushLock {
            target: &*self.target,
            key,
            written: std::time::Instant::now(),
        };
        // A gc that writes its lock after ours will see ours and stand aside, so only the
        // gcs already there now need waiting for (not later ones: a gc retried in a loop
        // must not starve pushes).
        let running = self.fresh_locks("locks/gc-")?;
        let start = std::time::Instant::now();
        while let Some(gc) = self
            .fresh_locks("locks/gc-")?
            .into_iter()
            .find(|k| running.contains(k))
        {
            if start.elapsed() > GC_WAIT {
                return Err(Error::RepositoryBusy(format!(
                    "a garbage collection holds {gc} for more than {} s",
                    GC_WAIT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(lock)
    }

    /// The keys of the locks under `prefix` that are not stale.
    fn fresh_locks(&self, prefix: &str) -> Result<Vec<String>> {
        let now = SystemTime::now();
        let mut found = Vec::new();
        self.target.list(prefix, &mut |m| {
            let age = now.duration_since(m.modified).unwrap_or(Duration::ZERO);
            if age < LOCK_STALE {
                found.push(m.key);
            }
            Ok(())
        })?;
        Ok(found)
    }
}

fn lock_body(what: &str) -> String {
    format!(
        "{what} pid {} at {}\n",
        std::process::id(),
        crate::ids::now_unix()
    )
}

/// A push's lock: garbage collection does not run while it is held (and not stale).
struct PushLock<'a> {
    target: &'a dyn Target,
    key: String,
    written: std::time::Instant,
}

impl PushLock<'_> {
    /// Rewrites the lock when it is getting old, so a long push never looks stale.
    fn refresh(&mut self) -> Result<()> {
        if self.written.elapsed() >= LOCK_REFRESH {
            self.target
                .put(&self.key, lock_body("push").as_bytes(), false)?;
            self.written = std::time::Instant::now();
        }
        Ok(())
    }
}

impl Drop for PushLock<'_> {
    fn drop(&mut self) {
        // A lock that cannot be removed goes stale on its own.
        let _ = self.target.delete(&self.key);
    }
}

/// True when every byte of `b` is zero (64 bytes at a time, which the compiler vectorizes).
pub(crate) fn is_zero(b: &[u8]) -> bool {
    let mut blocks = b.chunks_exact(64);
    for block in &mut blocks {
        let acc = block.chunks_exact(8).fold(0u64, |a, w| {
            a | u64::from_le_bytes(w.try_into().expect("8 bytes"))
        });
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&x| x == 0)
}
