//! One error type for the whole engine. Every variant names what was wrong (which volume, which
//! page, which check) so an operator can act on the message alone.

use crate::ids::{BookmarkId, SnapshotId, VolumeId};
use std::fmt;
use std::io;

/// How an object that was not found was asked for: by name or by id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup<I> {
    /// By name (`vol`, `vol@snap`, `vol#bookmark`).
    Name(String),
    /// By id.
    Id(I),
}

impl<I: fmt::Display> fmt::Display for Lookup<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lookup::Name(n) => write!(f, "named {n:?}"),
            Lookup::Id(id) => write!(f, "with id {id}"),
        }
    }
}

impl<I> From<&str> for Lookup<I> {
    fn from(name: &str) -> Lookup<I> {
        Lookup::Name(name.to_string())
    }
}

impl<I> From<String> for Lookup<I> {
    fn from(name: String) -> Lookup<I> {
        Lookup::Name(name)
    }
}

impl From<VolumeId> for Lookup<VolumeId> {
    fn from(id: VolumeId) -> Lookup<VolumeId> {
        Lookup::Id(id)
    }
}

impl From<SnapshotId> for Lookup<SnapshotId> {
    fn from(id: SnapshotId) -> Lookup<SnapshotId> {
        Lookup::Id(id)
    }
}

impl From<BookmarkId> for Lookup<BookmarkId> {
    fn from(id: BookmarkId) -> Lookup<BookmarkId> {
        Lookup::Id(id)
    }
}

/// The class of an [`Error`], for callers that map errors onto a protocol's codes. Each
/// class is a gRPC status code of the same name (CSI's error rules are written in them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The volume, snapshot, bookmark or backup does not exist.
    NotFound,
    /// An object of that name exists (with another source or size).
    AlreadyExists,
    /// The pool (or the host filesystem under it) is full.
    ResourceExhausted,
    /// The request is valid but the pool's state does not allow it (a stream's base is not
    /// there, the target is read-only, the pool is of an unsupported version).
    FailedPrecondition,
    /// The request itself is wrong (bad name, id, size, token or stream).
    InvalidArgument,
    /// I/O beyond the end of a volume or snapshot.
    OutOfRange,
    /// The pool or repository is busy or failed in a way a retry (or a reopen) may cure.
    Unavailable,
    /// Stored data or metadata is damaged.
    DataLoss,
    /// A bug or a broken invariant inside snapvol.
    Internal,
}

/// Result alias used throughout snapvol.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in snapvol.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The device failed an operation (`op` is "read", "write", "flush", "open", ...).
    #[error("device {op} failed{}: {source}", at_byte(.op, *.offset))]
    Io {
        /// The operation ("read", "write", "flush", "open", ...).
        op: &'static str,
        /// The byte offset it was at (0 for whole-device operations).
        offset: u64,
        /// What the system said.
        #[source]
        source: io::Error,
    },

    /// A metadata page or superblock failed validation: bad checksum, wrong location,
    /// wrong type or impossible contents. The page was not trusted.
    #[error("corrupt {what} at page {page}: {detail}")]
    Corrupt {
        /// What the page should have been ("superblock", "map node", ...).
        what: &'static str,
        /// Its page number.
        page: u64,
        /// What failed.
        detail: String,
    },

    /// A data block read back does not match the checksum its block map keeps (a pool with
    /// data checksums): the media or something writing behind the pool's back changed it.
    /// Nothing of the block was returned; other blocks still read.
    #[error("data checksum mismatch in pool {pool}: {target} at byte {offset} (physical block at device byte {physical}) should have CRC32 {expected:08x} but reads as {found:08x}; the block was not returned")]
    DataCorrupt {
        /// The pool's id.
        pool: crate::PoolId,
        /// The volume or snapshot read (`vol` or `vol@snap`), or what else read the block.
        target: String,
        /// Byte offset of the block in the volume or snapshot.
        offset: u64,
        /// Byte offset of the block on the pool's device.
        physical: u64,
        /// The checksum the block map keeps.
        expected: u32,
        /// The checksum of what was read.
        found: u32,
    },

    /// The device does not hold a snapvol pool (no valid superblock found).
    #[error("not a snapvol pool: {0}")]
    NotAPool(String),

    /// The pool was written by a newer format version than this build understands.
    #[error("unsupported pool format version {found} (this build reads up to {supported})")]
    UnsupportedVersion {
        /// The pool's version.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },

    /// The pool has no room for the operation (`needed` and `free` in bytes; `free` is what
    /// ordinary writes may still use, the reserve for deletes and commits excluded). Nothing
    /// was changed.
    #[error("pool is full: {op} needs {needed} bytes, {free} bytes are usable (free space by deleting snapshots or volumes, or grow the pool)")]
    NoSpace {
        /// The operation that needed the space.
        op: &'static str,
        /// Bytes it needed.
        needed: u64,
        /// Bytes ordinary writes may use.
        free: u64,
    },

    /// The filesystem holding the pool file is full (the device said ENOSPC or EDQUOT): the
    /// pool itself has room, its file cannot grow into it. Nothing committed was lost and
    /// the pool is not poisoned: the write that failed did not happen (or, written in place,
    /// left its own range undefined), and once the host has room again the same request
    /// succeeds. `pool create --preallocate` reserves a pool file's space up front.
    #[error(
        "the host filesystem under the pool is full (a {op} at byte {offset} was refused): \
         free space on it and retry; nothing committed was lost"
    )]
    HostFull {
        /// What was refused ("write").
        op: &'static str,
        /// The byte of the device it was at.
        offset: u64,
    },

    /// A send stream is malformed, truncated, corrupt or of an unknown version or record type.
    /// The receiving pool is unchanged.
    #[error("invalid stream: {0}")]
    BadStream(String),

    /// An incremental stream does not apply: its base is not the volume's newest snapshot, or
    /// the volume changed since then. The receiving pool is unchanged.
    #[error("stream does not apply to volume {volume:?}: {reason}")]
    WrongBase {
        /// The volume the stream was to go into.
        volume: String,
        /// Why it does not apply.
        reason: String,
    },

    /// A delta's or incremental send's base is not an ancestor of the target (another
    /// volume's, or rolled back past). Nothing was read or changed.
    #[error("{base} is not an ancestor of the target: {reason}")]
    NotAncestor {
        /// The base asked for.
        base: String,
        /// Why it is not an ancestor.
        reason: String,
    },

    /// Another handle or process has the device open; `pid` is the holder's process id
    /// when the system says (Linux's /proc/locks).
    #[error("{what} is in use by {}", holder(*.pid))]
    InUse {
        /// The device or file.
        what: String,
        /// The holder's process id, when known.
        pid: Option<u32>,
    },

    /// Another writer committed to the pool since this one last did (it reached the same
    /// bytes by another path: a loop device over the pool file, another host on a shared
    /// disk). Nothing of this commit was written over it; the pool refuses further work
    /// until reopened, and reopening shows the other writer's commit.
    #[error(
        "another writer committed to this pool (superblock generation {}{}) after this          process's last commit (generation {ours}); refusing to write over it: reopen the pool",
        found.map_or("unreadable".to_string(), |g| g.to_string()),
        writer(*.pid, .host)
    )]
    ConcurrentWriter {
        /// The generation this process last committed or opened.
        ours: u64,
        /// The generation found on the device, if its superblock is readable.
        found: Option<u64>,
        /// The process id the found superblock records (0 when unknown).
        pid: u32,
        /// The host name it records (empty when unknown).
        host: String,
    },

    /// An earlier write or flush failed; the pool refuses further work until reopened.
    #[error("pool is poisoned by an earlier I/O failure ({0}); reopen it")]
    Poisoned(String),

    /// No volume with this name or id exists.
    #[error("no volume {0}")]
    VolumeNotFound(Lookup<VolumeId>),

    /// No snapshot with this name (`vol@snap`) or id exists.
    #[error("no snapshot {0}")]
    SnapshotNotFound(Lookup<SnapshotId>),

    /// No bookmark with this name (`vol#name`) or id exists.
    #[error("no bookmark {0}")]
    BookmarkNotFound(Lookup<BookmarkId>),

    /// Text that should be an id (32 hex digits) is not one.
    #[error("invalid {kind} id {text:?}: an id is 32 hex digits")]
    InvalidId {
        /// Which kind of id ("volume", "snapshot", "bookmark", "pool").
        kind: &'static str,
        /// The text given (at most 80 characters of it).
        text: String,
    },

    /// A listing's continuation token is malformed, or belongs to another listing.
    #[error("invalid continuation token {0:?}")]
    BadToken(String),

    /// A volume or snapshot with this name already exists.
    #[error("{kind} {name:?} already exists{}", conflict_text(.conflict))]
    AlreadyExists {
        /// "volume", "snapshot", "bookmark", ...
        kind: &'static str,
        /// Its name.
        name: String,
        /// How the existing object differs from the one asked for (empty when the
        /// operation does not take an existing one as done: a rename, a receive).
        conflict: String,
    },

    /// A name is empty, too long or contains a reserved character.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },

    /// I/O outside the volume or snapshot.
    #[error("{what}: range {offset}+{len} is beyond the end ({size} bytes)")]
    OutOfRange {
        /// The volume or snapshot.
        what: String,
        /// Where the I/O starts.
        offset: u64,
        /// Its length.
        len: u64,
        /// The size of the volume or snapshot.
        size: u64,
    },

    /// An argument is out of its allowed range (block size, pool size, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The target is read-only (a snapshot).
    #[error("{0} is read-only")]
    ReadOnly(String),

    /// No backup with this id is in the repository.
    #[error("no backup {0} in the repository")]
    BackupNotFound(String),

    /// An object of a backup repository is missing, truncated, corrupt, or is not what its
    /// name says (a swapped chunk or manifest). `backup` names the backup (its snapshot id)
    /// or "repository", `object` the object's key. Nothing in a pool was changed.
    #[error("backup {backup}: {object}: {detail}")]
    BackupCorrupt {
        /// The backup (its snapshot id) or "repository".
        backup: String,
        /// The object's key.
        object: String,
        /// What is wrong with it.
        detail: String,
    },

    /// A repository object of a newer format than this build reads.
    #[error("backup {what} format version {found}; this build reads up to version {supported}")]
    UnsupportedBackupVersion {
        /// The object ("config", a manifest's key).
        what: String,
        /// Its version.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },

    /// The backup target failed an operation (network, permissions, a full disk): `op` is
    /// "put", "get", "list", "delete" or "head", `key` the object. Retrying may succeed.
    #[error("backup target {op} {key}: {source}")]
    Target {
        /// "put", "get", "list", "delete" or "head".
        op: &'static str,
        /// The object's key.
        key: String,
        /// What the store or the system said.
        #[source]
        source: io::Error,
    },

    /// A helper thread of an operation ended before its work was done (it panicked, or
    /// its own error was reported elsewhere). Nothing was committed by the operation.
    #[error("internal error: {0}")]
    Internal(String),

    /// Another push or a garbage collection holds the repository; retry later.
    #[error("backup repository busy: {0}")]
    RepositoryBusy(String),
}

fn conflict_text(conflict: &str) -> String {
    if conflict.is_empty() {
        String::new()
    } else {
        format!(" ({conflict})")
    }
}

/// ", written by process P on host H" for a superblock's recorded writer, when known.
fn writer(pid: u32, host: &str) -> String {
    match (pid, host) {
        (0, _) => String::new(),
        (p, "") => format!(", written by process {p}"),
        (p, h) => format!(", written by process {p} on host {h}"),
    }
}

fn holder(pid: Option<u32>) -> String {
    match pid {
        Some(p) if p == std::process::id() => "another pool handle in this process".into(),
        Some(p) => format!("process {p}"),
        None => "another pool handle or process".into(),
    }
}

/// " at byte N" for operations on a place of the device; nothing for those on the whole
/// device (opening, locking, flushing), where a byte offset would only be noise.
fn at_byte(op: &str, offset: u64) -> String {
    match op {
        "open" | "create" | "lock" | "flush" | "grow" => String::new(),
        _ => format!(" at byte {offset}"),
    }
}

impl Error {
    pub(crate) fn io(op: &'static str, offset: u64, source: io::Error) -> Error {
        Error::Io { op, offset, source }
    }

    pub(crate) fn corrupt(what: &'static str, page: u64, detail: impl Into<String>) -> Error {
        Error::Corrupt {
            what,
            page,
            detail: detail.into(),
        }
    }
}

impl Error {
    /// The class of this error (see [`ErrorKind`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::VolumeNotFound(_)
            | Error::SnapshotNotFound(_)
            | Error::BookmarkNotFound(_)
            | Error::BackupNotFound(_) => ErrorKind::NotFound,
            Error::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            Error::NoSpace { .. } | Error::HostFull { .. } => ErrorKind::ResourceExhausted,
            Error::Io { source, .. } | Error::Target { source, .. }
                if source.kind() == io::ErrorKind::StorageFull =>
            {
                ErrorKind::ResourceExhausted
            }
            Error::WrongBase { .. }
            | Error::NotAncestor { .. }
            | Error::ReadOnly(_)
            | Error::NotAPool(_)
            | Error::UnsupportedVersion { .. }
            | Error::UnsupportedBackupVersion { .. } => ErrorKind::FailedPrecondition,
            Error::InvalidName { .. }
            | Error::InvalidArgument(_)
            | Error::InvalidId { .. }
            | Error::BadToken(_)
            | Error::BadStream(_) => ErrorKind::InvalidArgument,
            Error::OutOfRange { .. } => ErrorKind::OutOfRange,
            Error::Io { .. }
            | Error::Target { .. }
            | Error::InUse { .. }
            | Error::ConcurrentWriter { .. }
            | Error::Poisoned(_)
            | Error::RepositoryBusy(_) => ErrorKind::Unavailable,
            Error::Corrupt { .. } | Error::BackupCorrupt { .. } | Error::DataCorrupt { .. } => {
                ErrorKind::DataLoss
            }
            Error::Internal(_) => ErrorKind::Internal,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match &e {
            Error::Io { source, .. } => source.kind(),
            Error::Corrupt { .. }
            | Error::DataCorrupt { .. }
            | Error::NotAPool(_)
            | Error::UnsupportedVersion { .. }
            | Error::BadStream(_)
            | Error::BackupCorrupt { .. }
            | Error::UnsupportedBackupVersion { .. } => io::ErrorKind::InvalidData,
            Error::Target { source, .. } => source.kind(),
            Error::BackupNotFound(_) => io::ErrorKind::NotFound,
            Error::RepositoryBusy(_) => io::ErrorKind::ResourceBusy,
            Error::NoSpace { .. } | Error::HostFull { .. } => io::ErrorKind::StorageFull,
            Error::VolumeNotFound(_) | Error::SnapshotNotFound(_) | Error::BookmarkNotFound(_) => {
                io::ErrorKind::NotFound
            }
            Error::InvalidId { .. } | Error::BadToken(_) => io::ErrorKind::InvalidInput,
            Error::AlreadyExists { .. } => io::ErrorKind::AlreadyExists,
            Error::InvalidName { .. }
            | Error::InvalidArgument(_)
            | Error::OutOfRange { .. }
            | Error::NotAncestor { .. }
            | Error::WrongBase { .. } => io::ErrorKind::InvalidInput,
            Error::ReadOnly(_) => io::ErrorKind::PermissionDenied,
            Error::Poisoned(_) | Error::Internal(_) => io::ErrorKind::Other,
            Error::InUse { .. } | Error::ConcurrentWriter { .. } => io::ErrorKind::ResourceBusy,
        };
        io::Error::new(kind, e)
    }
}
