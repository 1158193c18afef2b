//! CSI handles: the strings a CO stores for snapvol's objects (`volume_id`,
//! `snapshot_id`, `group_snapshot_id`). Each says what it names and carries the id, so it
//! resolves with no parameters, and a handle of one kind is never taken for another.

use crate::ids::{SnapshotId, VolumeId};

/// A parsed CSI handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handle {
    /// `vol-<32 hex>`: a volume.
    Volume(VolumeId),
    /// `snap-<32 hex>`: a snapshot (or, once deleted, its bookmark: same id);
    /// `snap-<32 hex>@<target>` when it is backed up to the named backup target.
    Snapshot(SnapshotId),
    /// `group-<32 hex>`: a group snapshot, named by its member with the smallest id.
    Group(SnapshotId),
}

impl Handle {
    /// Parses a handle; `None` if it is none of snapvol's.
    pub fn parse(s: &str) -> Option<Handle> {
        if let Some(hex) = s.strip_prefix("vol-") {
            hex_id(hex).map(|v| Handle::Volume(VolumeId::from_u128(v)))
        } else if s.starts_with("snap-") {
            parse_snapshot_target(s).map(|(id, _)| Handle::Snapshot(id))
        } else if let Some(hex) = s.strip_prefix("group-") {
            hex_id(hex).map(|v| Handle::Group(SnapshotId::from_u128(v)))
        } else {
            None
        }
    }
}

/// Exactly 32 lowercase or uppercase hex digits (no sign, no `0x`: `u128::from_str_radix`
/// alone would take `+…`).
fn hex_id(hex: &str) -> Option<u128> {
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(hex, 16).ok()
}

impl std::fmt::Display for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Handle::Volume(id) => write!(f, "vol-{id}"),
            Handle::Snapshot(id) => write!(f, "snap-{id}"),
            Handle::Group(id) => write!(f, "group-{id}"),
        }
    }
}

/// A volume's handle.
pub(crate) fn volume(id: VolumeId) -> String {
    Handle::Volume(id).to_string()
}

/// A snapshot's handle.
pub(crate) fn snapshot(id: SnapshotId) -> String {
    Handle::Snapshot(id).to_string()
}

/// The volume a handle names, if it names one.
pub(crate) fn parse_volume(s: &str) -> Option<VolumeId> {
    match Handle::parse(s) {
        Some(Handle::Volume(id)) => Some(id),
        _ => None,
    }
}

/// The handle of snapshot `id` backed up to target `target`.
pub(crate) fn backed_up_snapshot(id: SnapshotId, target: &str) -> String {
    format!("snap-{id}@{target}")
}

/// The snapshot a snapshot handle names, and the backup target it names, if any.
pub(crate) fn parse_snapshot_target(s: &str) -> Option<(SnapshotId, Option<&str>)> {
    let rest = s.strip_prefix("snap-")?;
    let (hex, target) = match rest.split_once('@') {
        Some((hex, t)) if super::backups::valid_target_name(t) => (hex, Some(t)),
        Some(_) => return None,
        None => (rest, None),
    };
    hex_id(hex).map(|v| (SnapshotId::from_u128(v), target))
}

/// The snapshot a handle names, if it names one.
pub(crate) fn parse_snapshot(s: &str) -> Option<SnapshotId> {
    match Handle::parse(s) {
        Some(Handle::Snapshot(id)) => Some(id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_print_and_parse_back_and_kinds_never_mix() {
        let v = VolumeId::from_u128(0x1234_5678_9abc_def0_1122_3344_5566_7788);
        let s = SnapshotId::from_u128(42);
        assert_eq!(volume(v), "vol-123456789abcdef01122334455667788");
        assert_eq!(snapshot(s), "snap-0000000000000000000000000000002a");
        assert_eq!(parse_volume(&volume(v)), Some(v));
        assert_eq!(parse_snapshot(&snapshot(s)), Some(s));
        assert_eq!(
            Handle::parse(&Handle::Group(s).to_string()),
            Some(Handle::Group(s))
        );
        // A snapshot handle is not a volume handle and the other way round.
        assert_eq!(parse_volume(&snapshot(s)), None);
        assert_eq!(parse_snapshot(&volume(v)), None);
        // A backed-up snapshot's handle names the same snapshot, and its target.
        let b = backed_up_snapshot(s, "offsite-1");
        assert_eq!(b, "snap-0000000000000000000000000000002a@offsite-1");
        assert_eq!(parse_snapshot(&b), Some(s));
        assert_eq!(parse_snapshot_target(&b), Some((s, Some("offsite-1"))));
        assert_eq!(parse_snapshot_target(&snapshot(s)), Some((s, None)));
    }

    #[test]
    fn malformed_handles_are_refused() {
        for bad in [
            "",
            "vol-",
            "vol-123",
            "vol-123456789abcdef01122334455667788ff",
            "vol-+23456789abcdef01122334455667788",
            "vol-12345678 abcdef01122334455667788",
            "VOL-123456789abcdef01122334455667788",
            "pvc-123456789abcdef01122334455667788",
            "snap-zz3456789abcdef01122334455667788",
            "snap-0000000000000000000000000000002a@",
            "snap-0000000000000000000000000000002a@Offsite",
            "snap-0000000000000000000000000000002a@-x",
            "snap-0000000000000000000000000000002a@a/b",
            "vol-123456789abcdef01122334455667788@offsite",
        ] {
            assert_eq!(Handle::parse(bad), None, "{bad:?}");
        }
    }
}
