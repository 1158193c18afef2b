#![deny(missing_docs)]
//! # snapvol
//!
//! Copy-on-write snapshot storage: a file or raw block device becomes a [`Pool`] of thin
//! [`Volume`]s with O(1) snapshots and writable clones, rollback, and crash-safe commits.
//!
//! ```
//! use snapvol::{Pool, PoolOptions, device::MemoryDevice};
//! use std::sync::Arc;
//!
//! let pool = Pool::create(Arc::new(MemoryDevice::new(64 << 20)), PoolOptions::default())?;
//! let vol = pool.create_volume("db", 16 << 20)?;
//! vol.write_at(b"version 1", 0)?;
//! pool.snapshot("db", "before-upgrade")?;          // O(1), durable on return
//! vol.write_at(b"version 2", 0)?;
//!
//! let snap = pool.snapshot_handle("db", "before-upgrade")?;
//! let mut buf = [0u8; 9];
//! snap.read_at(&mut buf, 0)?;
//! assert_eq!(&buf, b"version 1");                  // the snapshot never changes
//!
//! pool.rollback("db", "before-upgrade")?;          // O(1), keeps every snapshot
//! vol.read_at(&mut buf, 0)?;
//! assert_eq!(&buf, b"version 1");
//! assert!(pool.check()?.is_clean());
//! # Ok::<(), snapvol::Error>(())
//! ```
//!
//! Layers, bottom up (each a module; see docs/architecture.md): [`device`], `format`
//! (pages and superblocks), `space` (reference counts), `btree` (copy-on-write block maps),
//! `store` and `txn` (the open transaction and the commit protocol), `catalog`, [`Pool`]
//! and [`Volume`].

pub mod backup;
mod catalog;
mod check;
mod checksum;
#[cfg(feature = "csi")]
pub mod csi;
pub mod device;
mod diff;
mod error;
mod format;
mod ids;
pub mod image;
mod io;
mod listing;
mod map;
mod names;
#[cfg(feature = "nbd")]
pub mod nbd;
mod operations;
mod pdata;
mod pool;
mod scrub;
mod space;
mod store;
mod stream;
mod translation;
mod txn;
mod unit_hash;
mod volume;

pub use catalog::MAX_NAME;
pub use check::{CheckReport, Problem};
pub use diff::{DiffTarget, Extent, ExtentKind, ExtentPage, TupleLength};
pub use error::{Error, ErrorKind, Lookup, Result};
pub use format::{
    DEFAULT_BLOCK_SIZE, FORMAT_VERSION, MAX_BLOCK_SIZE, MAX_POOL_BYTES, MAX_VOLUME_BYTES,
    MIN_BLOCK_SIZE, PAGE_SIZE,
};
pub use ids::{Base, BookmarkId, Origin, PoolId, SnapshotId, VolumeId};
pub use image::ImportStats;
pub use listing::Page;
pub use names::ObjectName;
pub use pool::{BookmarkInfo, Pool, PoolOptions, PoolStats, SnapshotInfo, Usage, VolumeInfo};
pub use scrub::{
    BadBlock, BlockProblem, BlockRef, ScrubCursor, ScrubProgress, ScrubReport, SEEN_CAP,
};
pub use stream::{ReceiveStats, SendStats};
pub use volume::{Snapshot, Volume, VolumeIo};

/// The README's example runs as a doctest, so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
