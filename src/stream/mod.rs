//! Send/receive streams: a snapshot, whole or as the changes since an earlier one, as a byte
//! stream for backups and for moving snapshots between pools with their ids. The format is in
//! docs/stream-format.md.

pub(crate) mod receive;
mod send;

pub use receive::ReceiveStats;
pub use send::SendStats;

pub(crate) const MAGIC: &[u8; 8] = b"SNAPVOLS";
pub(crate) const VERSION: u32 = 1;
pub(crate) const DATA: u8 = 1;
pub(crate) const ZERO: u8 = 2;
pub(crate) const END: u8 = 3;
/// Largest DATA record: the receiver's one buffer.
pub(crate) const MAX_DATA: usize = 1 << 20;
/// Names of volumes a receive is building: '/' is refused in user names, so no user volume
/// can collide, and an interrupted receive is recognized and removed at open.
pub(crate) const HIDDEN_PREFIX: &str = "/recv/";
