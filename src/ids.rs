//! Ids and clock readings for catalog records.
//!
//! Every object has a 128-bit id that never changes (renames, deletes of its volume,
//! sends and backups keep it). The public API names ids by type, so a snapshot id cannot be
//! passed where a volume's is meant, and a delta's base says whether it is a snapshot or a
//! bookmark. Ids print and parse as 32 lowercase hex digits: the form CSI handles, the CLI
//! and backup object names use.

use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

/// Defines a typed id: a `u128` newtype that prints and parses as 32 hex digits.
macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(u128);

        impl $name {
            /// The id with this raw value (as stored in streams, backups and catalogs).
            pub const fn from_u128(raw: u128) -> $name {
                $name(raw)
            }

            /// The raw value.
            pub const fn as_u128(self) -> u128 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:032x}", self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:032x})"), self.0)
            }
        }

        /// `{:032x}` is the same as `{}`: the 32 hex digits.
        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }

        impl From<$name> for u128 {
            fn from(id: $name) -> u128 {
                id.0
            }
        }

        impl FromStr for $name {
            type Err = Error;

            /// Parses exactly 32 hex digits (either case); anything else is
            /// [`Error::InvalidId`].
            fn from_str(text: &str) -> Result<$name> {
                parse_hex_id(text)
                    .map($name)
                    .ok_or_else(|| Error::InvalidId {
                        kind: $what,
                        text: text.chars().take(80).collect(),
                    })
            }
        }
    };
}

typed_id!(
    /// A volume's id.
    VolumeId,
    "volume"
);
typed_id!(
    /// A snapshot's id.
    SnapshotId,
    "snapshot"
);
typed_id!(
    /// A bookmark's id: the id of the snapshot it was made from (the snapshot may be gone).
    BookmarkId,
    "bookmark"
);
typed_id!(
    /// A pool's id, chosen when it is created.
    PoolId,
    "pool"
);

impl From<SnapshotId> for BookmarkId {
    /// The bookmark made (or to be made) from this snapshot.
    fn from(s: SnapshotId) -> BookmarkId {
        BookmarkId(s.0)
    }
}

/// What a delta, an incremental send or a backup is computed against: a snapshot, or the
/// bookmark kept of a deleted one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Base {
    /// A snapshot that still exists.
    Snapshot(SnapshotId),
    /// A bookmark (the snapshot it was made from may be gone).
    Bookmark(BookmarkId),
}

impl Base {
    /// The raw id: a bookmark's is its snapshot's, so both name the same point in time.
    pub fn as_u128(self) -> u128 {
        match self {
            Base::Snapshot(s) => s.as_u128(),
            Base::Bookmark(b) => b.as_u128(),
        }
    }
}

impl From<SnapshotId> for Base {
    fn from(s: SnapshotId) -> Base {
        Base::Snapshot(s)
    }
}

impl From<BookmarkId> for Base {
    fn from(b: BookmarkId) -> Base {
        Base::Bookmark(b)
    }
}

/// What a volume was cloned from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// A clone of this snapshot (which may since have been deleted).
    Snapshot(SnapshotId),
    /// A clone of this live volume, as it was at the clone (which may since have been
    /// deleted).
    Volume(VolumeId),
}

impl Origin {
    /// The raw id of the snapshot or volume.
    pub fn as_u128(self) -> u128 {
        match self {
            Origin::Snapshot(s) => s.as_u128(),
            Origin::Volume(v) => v.as_u128(),
        }
    }
}

/// 32 hex digits, or None.
fn parse_hex_id(text: &str) -> Option<u128> {
    if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(text, 16).ok()
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A new 128-bit id, never 0: the creation time in milliseconds in the top 48 bits and 80
/// random bits below (the layout of UUIDv7). Ids made later sort later, so the catalog's
/// records of new volumes and snapshots are appended at the end of their key range (one
/// leaf path per commit, full leaves) instead of landing in a random leaf each; 80 random
/// bits keep ids from different pools and processes apart (they travel with backups and
/// streams).
pub(crate) fn new_id() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // RandomState is keyed from the OS's random source once per process and varied per
    // instance; hashing the time and a salt through two instances gives 128 random bits.
    let half = |salt: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(since.as_nanos());
        h.write_u64(salt);
        h.finish()
    };
    let random = ((half(1) as u128) << 64 | half(2) as u128) & ((1u128 << 80) - 1);
    let millis = since.as_millis() & ((1u128 << 48) - 1);
    (millis << 80 | random).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_and_parse_as_32_hex_digits() {
        let id = SnapshotId::from_u128(0x3039);
        assert_eq!(id.to_string(), "00000000000000000000000000003039");
        assert_eq!(
            format!("{id:?}"),
            "SnapshotId(00000000000000000000000000003039)"
        );
        assert_eq!(
            "00000000000000000000000000003039"
                .parse::<SnapshotId>()
                .unwrap(),
            id
        );
        let upper = "ABCDEF0123456789ABCDEF0123456789";
        assert_eq!(
            upper.parse::<VolumeId>().unwrap().as_u128(),
            0xABCDEF0123456789ABCDEF0123456789
        );
        for bad in [
            "",
            "3039",
            "0x000000000000000000000000003039",
            "+0000000000000000000000000003039",
            "g0000000000000000000000000003039",
            "000000000000000000000000000030390",
        ] {
            match bad.parse::<VolumeId>() {
                Err(Error::InvalidId {
                    kind: "volume",
                    text,
                }) => assert_eq!(text, bad),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert_eq!(BookmarkId::from(id).as_u128(), 0x3039);
        assert_eq!(
            Base::Bookmark(id.into()).as_u128(),
            Base::Snapshot(id).as_u128()
        );
    }

    #[test]
    fn ids_are_distinct_nonzero_and_ordered_by_time() {
        let a = new_id();
        std::thread::sleep(std::time::Duration::from_millis(3));
        let b = new_id();
        assert!(a != 0 && b > a, "{a:032x} then {b:032x}");
        let many: std::collections::HashSet<u128> = (0..10_000).map(|_| new_id()).collect();
        assert_eq!(many.len(), 10_000);
        // The top bits are this millisecond.
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis();
        assert!(ms - (new_id() >> 80) < 1000);
    }
}
