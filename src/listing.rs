//! Paged listings: volumes, snapshots (all, or one volume's) and bookmarks, a page at a
//! time with an opaque continuation token, as CSI's ListVolumes and ListSnapshots page.
//!
//! A token names the last entry of the page it ends (its catalog key), so the next page is
//! one descent to that key and a scan of the page: paging through 100,000 snapshots costs
//! what the pages cost, and entries created or deleted between pages neither repeat nor
//! shift the others. A token carries which listing it belongs to and a checksum, so one
//! from another listing, or edited, or cut short, is [`Error::BadToken`] rather than a
//! silently wrong page.

use crate::error::{Error, Result};
use crate::ids::VolumeId;
use crate::pool::{BookmarkInfo, Pool, SnapshotInfo, VolumeInfo};

/// One page of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Page<T> {
    /// The entries, in the listing's order.
    pub entries: Vec<T>,
    /// Pass this to get the next page; `None` when this page is the last.
    pub next_token: Option<String>,
}

/// What a token continues: the listing, and its position in it.
#[derive(Debug, PartialEq, Eq)]
enum Position {
    /// After the volume of this name.
    Volume(String),
    /// After the snapshot at (volume, generation, id); `only` is the volume the listing is
    /// restricted to.
    Snapshot {
        only: Option<u128>,
        at: (u128, u64, u128),
    },
    /// After the bookmark of this id.
    Bookmark(u128),
}

impl Position {
    fn encode(&self) -> String {
        let body = match self {
            Position::Volume(name) => {
                let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
                format!("v{hex}")
            }
            Position::Snapshot {
                only: None,
                at: (v, g, i),
            } => format!("s{v:032x}{g:016x}{i:032x}"),
            Position::Snapshot {
                only: Some(o),
                at: (v, g, i),
            } => format!("S{o:032x}{v:032x}{g:016x}{i:032x}"),
            Position::Bookmark(id) => format!("b{id:032x}"),
        };
        let crc = crc32fast::hash(body.as_bytes());
        format!("{body}.{crc:08x}")
    }

    fn decode(token: &str) -> Option<Position> {
        let (body, crc) = token.rsplit_once('.')?;
        if crc.len() != 8 || u32::from_str_radix(crc, 16).ok()? != crc32fast::hash(body.as_bytes())
        {
            return None;
        }
        let kind = body.get(..1)?;
        let rest = body.get(1..)?;
        let hex = |s: &str| -> Option<u128> {
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u128::from_str_radix(s, 16).ok())
                .flatten()
        };
        let at = |s: &str| -> Option<(u128, u64, u128)> {
            if s.len() != 80 {
                return None;
            }
            let g = u64::try_from(hex(s.get(32..48)?)?).ok()?;
            Some((hex(s.get(..32)?)?, g, hex(s.get(48..)?)?))
        };
        match kind {
            "v" => {
                if rest.len() % 2 != 0 {
                    return None;
                }
                let bytes: Option<Vec<u8>> = (0..rest.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(rest.get(i..i + 2)?, 16).ok())
                    .collect();
                String::from_utf8(bytes?).ok().map(Position::Volume)
            }
            "s" => Some(Position::Snapshot {
                only: None,
                at: at(rest)?,
            }),
            "S" if rest.len() == 112 => Some(Position::Snapshot {
                only: Some(hex(rest.get(..32)?)?),
                at: at(rest.get(32..)?)?,
            }),
            "b" if rest.len() == 32 => Some(Position::Bookmark(hex(rest)?)),
            _ => None,
        }
    }
}

/// The position `token` names, which `fits` must accept as one of this listing's.
fn resume(token: Option<&str>, fits: impl Fn(&Position) -> bool) -> Result<Option<Position>> {
    let Some(t) = token else {
        return Ok(None);
    };
    match Position::decode(t) {
        Some(p) if fits(&p) => Ok(Some(p)),
        _ => Err(Error::BadToken(t.chars().take(80).collect())),
    }
}

/// `max_entries` as a bound: 0 means all, as in CSI.
fn bound(max_entries: usize) -> usize {
    if max_entries == 0 {
        usize::MAX
    } else {
        max_entries
    }
}

impl Pool {
    /// A page of the visible volumes, by name: at most `max_entries` (0: all), from where
    /// `token` (a previous page's `next_token`) left off.
    pub fn list_volumes(
        &self,
        max_entries: usize,
        token: Option<&str>,
    ) -> Result<Page<VolumeInfo>> {
        let after = match resume(token, |p| matches!(p, Position::Volume(_)))? {
            Some(Position::Volume(name)) => Some(name),
            _ => None,
        };
        let (recs, more) = self.with(|e| {
            let (c, sm) = e.cat();
            c.volumes_after(sm, after.as_deref(), bound(max_entries))
        })?;
        let next_token = more
            .then(|| {
                recs.last()
                    .map(|v| Position::Volume(v.name.clone()).encode())
            })
            .flatten();
        Ok(Page {
            entries: recs.into_iter().map(VolumeInfo::from).collect(),
            next_token,
        })
    }

    /// A page of the snapshots (also those of deleted volumes), or of volume `of`'s only:
    /// at most `max_entries` (0: all), from where `token` left off. Ordered by volume id,
    /// then oldest first.
    pub fn list_snapshots(
        &self,
        of: Option<VolumeId>,
        max_entries: usize,
        token: Option<&str>,
    ) -> Result<Page<SnapshotInfo>> {
        let only = of.map(VolumeId::as_u128);
        let after = match resume(
            token,
            |p| matches!(p, Position::Snapshot { only: o, .. } if *o == only),
        )? {
            Some(Position::Snapshot { at, .. }) => Some(at),
            _ => None,
        };
        let (recs, more) = self.with(|e| {
            let (c, sm) = e.cat();
            c.snapshots_after(sm, only, after, bound(max_entries))
        })?;
        let next_token = more
            .then(|| {
                recs.last().map(|s| {
                    Position::Snapshot {
                        only,
                        at: (s.volume, s.generation, s.id),
                    }
                    .encode()
                })
            })
            .flatten();
        Ok(Page {
            entries: recs.into_iter().map(SnapshotInfo::from).collect(),
            next_token,
        })
    }

    /// A page of the bookmarks, by id: at most `max_entries` (0: all), from where `token`
    /// left off.
    pub fn list_bookmarks(
        &self,
        max_entries: usize,
        token: Option<&str>,
    ) -> Result<Page<BookmarkInfo>> {
        let after = match resume(token, |p| matches!(p, Position::Bookmark(_)))? {
            Some(Position::Bookmark(id)) => Some(id),
            _ => None,
        };
        let (recs, more) = self.with(|e| {
            let (c, sm) = e.cat();
            c.bookmarks_after(sm, after, bound(max_entries))
        })?;
        let next_token = more
            .then(|| recs.last().map(|b| Position::Bookmark(b.id).encode()))
            .flatten();
        Ok(Page {
            entries: recs.into_iter().map(BookmarkInfo::from).collect(),
            next_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_edits() {
        let positions = [
            Position::Volume("db-1".into()),
            Position::Volume(String::new()),
            Position::Snapshot {
                only: None,
                at: (7, u64::MAX, u128::MAX),
            },
            Position::Snapshot {
                only: Some(3),
                at: (3, 9, 1),
            },
            Position::Bookmark(42),
        ];
        for p in positions {
            let t = p.encode();
            assert_eq!(Position::decode(&t), Some(p), "{t}");
            // Any one character changed, or the token cut short, is refused.
            for i in 0..t.len() {
                let mut b = t.clone().into_bytes();
                b[i] = if b[i] == b'0' { b'1' } else { b'0' };
                let edited = String::from_utf8(b).unwrap();
                assert_eq!(Position::decode(&edited), None, "{edited}");
                assert_eq!(Position::decode(&t[..i]), None);
            }
        }
        assert_eq!(Position::decode("🦀.00000000"), None);
    }
}
