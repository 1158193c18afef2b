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
/// The label of a volume a receive, restore or import is building, for messages. Such
/// volumes are a flag on their catalog record (found by id, removed at open), so the label
/// need not be unique; '/' keeps it from looking like a user's name.
pub(crate) const HIDDEN_PREFIX: &str = "/recv/";
