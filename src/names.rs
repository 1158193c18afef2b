//! The name grammar, parsed here and only here: `VOL` (a volume), `VOL@SNAP` (a snapshot),
//! `VOL#BM` (a bookmark) and `@ID` (a snapshot by its 32-hex-digit id, how one of a deleted
//! volume is reached). Volume, snapshot and bookmark names never contain `@` or `#` (see
//! `validate_name`), so every text splits one way. The CLI, NBD export names and stream
//! headers all go through [`ObjectName`].

use crate::catalog::validate_name;
use crate::error::{Error, Result};
use crate::ids::SnapshotId;
use std::fmt;
use std::str::FromStr;

/// A volume, snapshot or bookmark as users name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ObjectName {
    /// `VOL`.
    Volume(String),
    /// `VOL@SNAP`.
    Snapshot {
        /// The volume's name.
        volume: String,
        /// The snapshot's name.
        snapshot: String,
    },
    /// `VOL#BM`.
    Bookmark {
        /// The volume's name.
        volume: String,
        /// The bookmark's name.
        bookmark: String,
    },
    /// `@ID`: a snapshot by id.
    SnapshotId(SnapshotId),
}

impl FromStr for ObjectName {
    type Err = Error;

    /// Parses and validates every part; a bad part is [`Error::InvalidName`] (or
    /// [`Error::InvalidId`] after `@`).
    fn from_str(text: &str) -> Result<ObjectName> {
        if let Some(id) = text.strip_prefix('@') {
            return id.parse().map(ObjectName::SnapshotId);
        }
        let name = if let Some((volume, snapshot)) = text.split_once('@') {
            ObjectName::Snapshot {
                volume: volume.into(),
                snapshot: snapshot.into(),
            }
        } else if let Some((volume, bookmark)) = text.split_once('#') {
            ObjectName::Bookmark {
                volume: volume.into(),
                bookmark: bookmark.into(),
            }
        } else {
            ObjectName::Volume(text.into())
        };
        match &name {
            ObjectName::Volume(v) => validate_name(v)?,
            ObjectName::Snapshot {
                volume,
                snapshot: n,
            }
            | ObjectName::Bookmark {
                volume,
                bookmark: n,
            } => {
                validate_name(volume)?;
                validate_name(n)?;
            }
            ObjectName::SnapshotId(_) => {}
        }
        Ok(name)
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectName::Volume(v) => f.write_str(v),
            ObjectName::Snapshot { volume, snapshot } => write!(f, "{volume}@{snapshot}"),
            ObjectName::Bookmark { volume, bookmark } => write!(f, "{volume}#{bookmark}"),
            ObjectName::SnapshotId(id) => write!(f, "@{id}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_parses_validates_and_prints_back() {
        let id = SnapshotId::from_u128(0xab);
        for (text, want) in [
            ("db", ObjectName::Volume("db".into())),
            (
                "db@daily.1",
                ObjectName::Snapshot {
                    volume: "db".into(),
                    snapshot: "daily.1".into(),
                },
            ),
            (
                "db#mark",
                ObjectName::Bookmark {
                    volume: "db".into(),
                    bookmark: "mark".into(),
                },
            ),
            (
                "@000000000000000000000000000000ab",
                ObjectName::SnapshotId(id),
            ),
        ] {
            let got: ObjectName = text.parse().unwrap();
            assert_eq!(got, want);
            assert_eq!(got.to_string(), text);
        }
        for bad in [
            "", "@", "db@", "@snap", "db#", "#bm", "a@b@c", "a@b#c", "a#b@c", "-x",
        ] {
            match bad.parse::<ObjectName>() {
                Err(Error::InvalidName { .. } | Error::InvalidId { .. }) => {}
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }
}
