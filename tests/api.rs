//! The library API a CSI driver programs against: typed ids, operations by id, idempotent
//! creation, paged listings with continuation tokens, and error classes.

use snapvol::device::MemoryDevice;
use snapvol::{Base, Error, ErrorKind, Lookup, Origin, Pool, PoolOptions, SnapshotId, VolumeId};
use std::collections::HashSet;
use std::sync::Arc;

fn pool() -> Pool {
    pool_on().0
}

fn pool_on() -> (Pool, Arc<MemoryDevice>) {
    let dev = Arc::new(MemoryDevice::new(64 << 20));
    let opts = PoolOptions::default().commit_interval(None);
    (Pool::create(dev.clone(), opts).unwrap(), dev)
}

fn conflict(e: Error) -> String {
    match e {
        Error::AlreadyExists { conflict, .. } => conflict,
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
}

#[test]
fn creating_what_exists_returns_it_and_a_different_one_is_a_conflict() {
    let (p, dev) = pool_on();
    let v = p.create_volume("pvc-1", 1 << 20).unwrap();
    let gen = p.stats().generation;
    // A retried CreateVolume: the same volume, and nothing committed.
    assert_eq!(p.create_volume("pvc-1", 1 << 20).unwrap().id(), v.id());
    assert_eq!(p.stats().generation, gen);
    let c = conflict(p.create_volume("pvc-1", 2 << 20).unwrap_err());
    assert!(c.contains("1048576 bytes, not 2097152"), "{c}");
    assert_eq!(
        p.create_volume("pvc-1", 2 << 20).unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );

    v.write_at(b"before", 0).unwrap();
    let s = p.snapshot("pvc-1", "snap-1").unwrap();
    v.write_at(b"after!", 0).unwrap();
    // A retried CreateSnapshot returns the first snapshot, not a new one of newer data.
    assert_eq!(p.snapshot("pvc-1", "snap-1").unwrap(), s);
    assert_eq!(v.snapshot("snap-1").unwrap(), s);
    assert_eq!(p.volume_snapshots(v.id()).unwrap().len(), 1);
    let mut buf = [0u8; 6];
    p.snapshot_by_id(s).unwrap().read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"before");

    // Clones: the same source returns the clone; another source, or a plain volume of that
    // name, is a conflict.
    let c1 = p.clone_snapshot("pvc-1", "snap-1", "restore").unwrap();
    assert_eq!(p.clone_snapshot_by_id(s, "restore").unwrap().id(), c1.id());
    assert_eq!(
        c1.info().unwrap().origin,
        Some(Origin::Snapshot(s)),
        "a clone records its source"
    );
    let c = conflict(p.clone_volume("pvc-1", "restore").unwrap_err());
    assert!(c.contains(&format!("clone of snapshot {s}")), "{c}");
    let c = conflict(p.clone_volume("pvc-1", "pvc-1").unwrap_err());
    assert!(c.contains("not a clone"), "{c}");
    let cv = p.clone_volume("pvc-1", "copy").unwrap();
    assert_eq!(p.clone_volume_by_id(v.id(), "copy").unwrap().id(), cv.id());
    assert_eq!(cv.info().unwrap().origin, Some(Origin::Volume(v.id())));
    let c = conflict(p.create_volume("copy", 1 << 20).unwrap_err());
    assert!(c.contains(&format!("clone of volume {}", v.id())), "{c}");
    // The origin's kind survives a reopen (it is in the volume record's flags).
    let vid = v.id();
    drop((v, c1, cv));
    let p = reopen(p, &dev);
    let infos = p.volumes().unwrap();
    let origin = |n: &str| infos.iter().find(|v| v.name == n).unwrap().origin;
    assert_eq!(origin("copy"), Some(Origin::Volume(vid)));
    assert_eq!(origin("restore"), Some(Origin::Snapshot(s)));
    assert_eq!(origin("pvc-1"), None);
    assert!(p.check().unwrap().is_clean());
}

/// Closes `p` and opens its device again.
fn reopen(p: Pool, dev: &Arc<MemoryDevice>) -> Pool {
    p.close().unwrap();
    Pool::open(dev.clone(), PoolOptions::default()).unwrap()
}

#[test]
fn a_group_snapshot_is_all_or_nothing_also_when_retried() {
    let p = pool();
    let a = p.create_volume("a", 1 << 20).unwrap();
    let b = p.create_volume("b", 1 << 20).unwrap();
    let ids = p
        .snapshot_group_by_id(&[(a.id(), "g1"), (b.id(), "g1")])
        .unwrap();
    assert_eq!(
        p.snapshot_group(&[("a", "g1"), ("b", "g1")]).unwrap(),
        ids,
        "a retried group snapshot returns the same snapshots"
    );
    // Part of a group existing is a conflict, and nothing is taken.
    let before = p.stats().snapshots;
    let e = p.snapshot_group(&[("a", "g1"), ("b", "g2")]).unwrap_err();
    assert!(
        matches!(&e, Error::AlreadyExists { name, .. } if name == "a@g1"),
        "{e:?}"
    );
    assert_eq!(p.stats().snapshots, before);
    let e = p.snapshot_group(&[("a", "x"), ("a", "x")]).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
}

#[test]
fn every_operation_works_by_id() {
    let p = pool();
    let v = p.create_volume("db", 1 << 20).unwrap();
    let other = p.create_volume("other", 1 << 20).unwrap();
    v.write_at(&[7u8; 8192], 0).unwrap();
    let s1 = v.snapshot("s1").unwrap();
    v.write_at(&[8u8; 8192], 0).unwrap();
    assert_eq!(v.usage().unwrap().allocated, 8192);
    assert_eq!(
        p.snapshot_by_id(s1).unwrap().usage().unwrap().allocated,
        8192
    );
    let info = p.snapshot_by_id(s1).unwrap().info().unwrap();
    assert_eq!(
        (info.id, info.volume_id, info.name.as_str()),
        (s1, v.id(), "s1")
    );

    // Rollback by id; a snapshot of another volume is refused.
    let e = p.rollback_by_id(other.id(), s1).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    p.rollback_by_id(v.id(), s1).unwrap();
    let mut buf = [0u8; 4];
    v.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [7; 4]);

    // Resize and rename by id and on the handle.
    v.resize(3 << 20).unwrap();
    assert_eq!(p.volume_info(v.id()).unwrap().size, 3 << 20);
    p.resize_volume_by_id(v.id(), 2 << 20).unwrap();
    assert_eq!(v.len().unwrap(), 2 << 20);
    p.rename_volume_by_id(v.id(), "db2").unwrap();
    assert_eq!(v.info().unwrap().name, "db2");
    assert_eq!(p.volume_usage_by_id(v.id()).unwrap().logical, 2 << 20);

    // Bookmarks by id.
    let bm = p.bookmark_by_id(s1).unwrap();
    assert_eq!(bm.as_u128(), s1.as_u128());
    assert!(matches!(
        p.bookmark_by_id(s1).unwrap_err(),
        Error::AlreadyExists { .. }
    ));

    // Delete the volume by id: its snapshot stays, reachable and clonable by id alone.
    let vid = v.id();
    drop(v);
    p.delete_volume_by_id(vid).unwrap();
    match p.volume_by_id(vid).unwrap_err() {
        Error::VolumeNotFound(Lookup::Id(id)) => assert_eq!(id, vid),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        p.delete_volume_by_id(vid).unwrap_err().to_string(),
        format!("no volume with id {vid}")
    );
    let c = p.clone_snapshot_by_id(s1, "from-orphan").unwrap();
    c.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [7; 4]);
    // Deleting the snapshot the clone came from does not touch the clone.
    p.delete_snapshot_by_id(s1).unwrap();
    c.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [7; 4]);
    match p.delete_snapshot_by_id(s1).unwrap_err() {
        Error::SnapshotNotFound(Lookup::Id(id)) => assert_eq!(id, s1),
        other => panic!("{other:?}"),
    }
    // The bookmark outlives it. It is a base for its own volume's later states only: for a
    // clone it is refused as such, not answered wrongly.
    let e = p
        .delta(
            Base::Bookmark(bm),
            snapvol::DiffTarget::Volume(c.id()),
            0,
            0,
            snapvol::TupleLength::Variable,
        )
        .unwrap_err();
    assert!(matches!(e, Error::NotAncestor { .. }), "{e:?}");
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    assert_eq!(p.bookmark_info(bm).unwrap().volume_id, vid);
    p.delete_bookmark_by_id(bm).unwrap();
    assert!(matches!(
        p.delete_bookmark_by_id(bm).unwrap_err(),
        Error::BookmarkNotFound(Lookup::Id(id)) if id == bm
    ));
    let e = p
        .delta(
            Base::Snapshot(s1),
            snapvol::DiffTarget::Volume(c.id()),
            0,
            0,
            snapvol::TupleLength::Variable,
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(p.check().unwrap().is_clean());
}

/// Pages through a listing with `max` entries a page.
fn all_pages<T: Clone>(
    max: usize,
    mut page: impl FnMut(usize, Option<&str>) -> snapvol::Result<snapvol::Page<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let p = page(max, token.as_deref()).unwrap();
        assert!(p.entries.len() <= max);
        out.extend(p.entries.iter().cloned());
        match p.next_token {
            Some(t) => {
                assert_eq!(p.entries.len(), max, "only a full page has a next token");
                token = Some(t);
            }
            None => return out,
        }
    }
}

#[test]
fn listings_page_with_tokens_in_a_stable_order() {
    let p = pool();
    let mut snaps = Vec::new();
    for i in 0..23 {
        let v = p.create_volume(&format!("v{i:02}"), 1 << 20).unwrap();
        for k in 0..(i % 4) {
            snaps.push(v.snapshot(&format!("s{k}")).unwrap());
        }
    }
    // A deleted volume's snapshots are listed too.
    p.delete_volume("v03").unwrap();
    for &s in &snaps[..5] {
        p.bookmark_by_id(s).unwrap();
    }
    let all_vols = p.list_volumes(0, None).unwrap();
    assert_eq!(all_vols.entries.len(), 22);
    assert_eq!(all_vols.next_token, None);
    let names: Vec<String> = all_vols.entries.iter().map(|v| v.name.clone()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "volumes by name");
    for max in [1, 2, 5, 7, 22, 100] {
        let paged = all_pages(max, |m, t| p.list_volumes(m, t));
        assert_eq!(
            paged.iter().map(|v| &v.name).collect::<Vec<_>>(),
            names.iter().collect::<Vec<_>>()
        );
        let s = all_pages(max, |m, t| p.list_snapshots(None, m, t));
        assert_eq!(s.len(), snaps.len(), "max {max}");
        let got: HashSet<SnapshotId> = s.iter().map(|x| x.id).collect();
        assert_eq!(got, snaps.iter().copied().collect());
        let b = all_pages(max, |m, t| p.list_bookmarks(m, t));
        assert_eq!(b.len(), 5);
    }
    // One volume's snapshots, oldest first.
    let v07 = p.volume("v07").unwrap().id();
    let mine = all_pages(1, |m, t| p.list_snapshots(Some(v07), m, t));
    let names: Vec<&str> = mine.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["s0", "s1", "s2"]);
    assert!(mine.iter().all(|s| s.volume_id == v07));

    // Deleting between pages neither repeats nor drops the others.
    let first = p.list_volumes(5, None).unwrap();
    p.delete_volume(&first.entries[4].name).unwrap();
    p.delete_volume("v10").unwrap();
    let rest = all_pages(5, |m, t| match t {
        None => p.list_volumes(m, first.next_token.as_deref()),
        Some(_) => p.list_volumes(m, t),
    });
    let mut seen: Vec<String> = first.entries.iter().map(|v| v.name.clone()).collect();
    seen.extend(rest.iter().map(|v| v.name.clone()));
    let set: HashSet<&String> = seen.iter().collect();
    assert_eq!(set.len(), seen.len(), "no volume listed twice");
    assert_eq!(
        seen.len(),
        21,
        "22 volumes, one deleted after the page that listed it"
    );
}

#[test]
fn a_bad_or_foreign_token_is_a_typed_error() {
    let p = pool();
    for i in 0..4 {
        let v = p.create_volume(&format!("v{i}"), 1 << 20).unwrap();
        v.snapshot("a").unwrap();
        v.snapshot("b").unwrap();
    }
    let vol_token = p.list_volumes(1, None).unwrap().next_token.unwrap();
    let snap_token = p.list_snapshots(None, 1, None).unwrap().next_token.unwrap();
    let v0 = p.volume("v0").unwrap().id();
    let v1 = p.volume("v1").unwrap().id();
    let mine_token = p
        .list_snapshots(Some(v0), 1, None)
        .unwrap()
        .next_token
        .unwrap();
    let bad = |r: snapvol::Result<()>| match r {
        Err(e @ Error::BadToken(_)) => assert_eq!(e.kind(), ErrorKind::InvalidArgument),
        other => panic!("expected BadToken, got {other:?}"),
    };
    bad(p.list_volumes(1, Some(&snap_token)).map(drop));
    bad(p.list_snapshots(None, 1, Some(&vol_token)).map(drop));
    bad(p.list_snapshots(None, 1, Some(&mine_token)).map(drop));
    bad(p.list_snapshots(Some(v1), 1, Some(&mine_token)).map(drop));
    bad(p.list_bookmarks(1, Some(&vol_token)).map(drop));
    bad(p.list_volumes(1, Some("")).map(drop));
    bad(p.list_volumes(1, Some("garbage")).map(drop));
    let mut edited = vol_token.clone().into_bytes();
    edited[1] ^= 1;
    bad(p
        .list_volumes(1, Some(std::str::from_utf8(&edited).unwrap()))
        .map(drop));
    bad(p
        .list_volumes(1, Some(&vol_token[..vol_token.len() - 1]))
        .map(drop));
    // The right listing takes it.
    assert_eq!(
        p.list_snapshots(Some(v0), 1, Some(&mine_token))
            .unwrap()
            .entries[0]
            .name,
        "b"
    );
}

#[test]
fn ids_parse_errors_print_and_classify() {
    let p = pool();
    let v = p.create_volume("db", 1 << 20).unwrap();
    let s = v.snapshot("s").unwrap();
    let text = s.to_string();
    assert_eq!(text.len(), 32);
    assert_eq!(text.parse::<SnapshotId>().unwrap(), s);
    assert_eq!(format!("{s:032x}"), text);
    let e = "not-an-id".parse::<VolumeId>().unwrap_err();
    assert!(
        matches!(e, Error::InvalidId { kind: "volume", .. }),
        "{e:?}"
    );
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let missing = SnapshotId::from_u128(0x3039);
    let e = p.snapshot_info(missing).unwrap_err();
    assert_eq!(
        e.to_string(),
        "no snapshot with id 00000000000000000000000000003039"
    );
    assert_eq!(e.kind(), ErrorKind::NotFound);
    let e = p.volume("nope").unwrap_err();
    assert!(matches!(&e, Error::VolumeNotFound(Lookup::Name(n)) if n == "nope"));
    assert_eq!(e.to_string(), "no volume named \"nope\"");
    assert_eq!(
        p.create_volume("bad@name", 1).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    let mut buf = [0u8; 8];
    assert_eq!(
        v.read_at(&mut buf, 1 << 20).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    let big = p.create_volume("big", 1 << 30).unwrap();
    assert_eq!(
        big.write_at(&vec![1u8; 80 << 20], 0).unwrap_err().kind(),
        ErrorKind::ResourceExhausted
    );
}
