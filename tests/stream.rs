//! Send/receive across two pools: full and incremental round trips keep ids and bytes; wrong
//! bases, truncated, corrupted and hostile streams are refused with typed errors and leave the
//! receiving pool exactly as it was.

use snapvol::device::MemoryDevice;
use snapvol::{Base, Error, Lookup, Pool, PoolOptions, SnapshotId};
use std::io::Read as _;
use std::sync::Arc;

fn pool(size: u64, block_size: u32) -> Pool {
    Pool::create(
        Arc::new(MemoryDevice::new(size)),
        PoolOptions::default()
            .block_size(block_size)
            .commit_interval(None),
    )
    .unwrap()
}

fn snap_bytes(p: &Pool, id: SnapshotId) -> Vec<u8> {
    let s = p.snapshot_by_id(id).unwrap();
    let mut b = vec![0u8; s.len().unwrap() as usize];
    s.read_at(&mut b, 0).unwrap();
    b
}

fn send(p: &Pool, id: SnapshotId, base: Option<Base>) -> Vec<u8> {
    let mut out = Vec::new();
    p.send(id, base, &mut out).unwrap();
    out
}

/// What must not change when a receive fails: the volumes, the snapshots, and the space
/// used, up to the space map pages that now exist (one per 4 MiB of pool at most).
#[derive(Debug)]
struct State(Vec<String>, Vec<SnapshotId>, u64, u64);

impl PartialEq for State {
    fn eq(&self, o: &State) -> bool {
        let slack = self.3 / (1016 * 4096) * 4096 + 4096;
        self.0 == o.0 && self.1 == o.1 && self.2.abs_diff(o.2) <= slack
    }
}

fn state(p: &Pool) -> State {
    let mut v: Vec<String> = p.volumes().unwrap().into_iter().map(|v| v.name).collect();
    v.sort();
    let mut s: Vec<SnapshotId> = p.snapshots().unwrap().into_iter().map(|s| s.id).collect();
    s.sort();
    let st = p.stats();
    State(v, s, st.used, st.size)
}

#[test]
fn full_then_incremental_chain_round_trips() {
    let a = pool(64 << 20, 4096);
    let b = pool(64 << 20, 16384);
    let v = a.create_volume("db", 5_000_000).unwrap();
    v.write_at(&vec![1u8; 1_000_000], 12345).unwrap();
    let s1 = a.snapshot("db", "s1").unwrap();
    let st = b.receive(&mut &send(&a, s1, None)[..], None).unwrap();
    assert_eq!((st.volume.as_str(), st.snapshot_id), ("db", s1));
    assert_eq!(snap_bytes(&b, s1), snap_bytes(&a, s1));
    let mut prev = s1;
    for i in 0..5u8 {
        v.write_at(&vec![i + 2; 70_000], u64::from(i) * 900_000)
            .unwrap();
        v.discard(4_000_000 - u64::from(i) * 100_000, 50_000)
            .unwrap();
        if i == 3 {
            a.resize_volume("db", 6_000_000).unwrap();
        }
        let s = a.snapshot("db", &format!("s{}", i + 2)).unwrap();
        let stream = send(&a, s, Some(prev.into()));
        let full = send(&a, s, None);
        assert!(
            stream.len() < full.len() / 3,
            "incremental carries only the change"
        );
        let st = b.receive(&mut &stream[..], None).unwrap();
        assert_eq!(st.base_id, Some(prev));
        assert_eq!(snap_bytes(&b, s), snap_bytes(&a, s), "snapshot {i} differs");
        prev = s;
    }
    // The receiving volume reads like the last snapshot; everything is consistent.
    let rv = b.volume("db").unwrap();
    let mut buf = vec![0u8; rv.len().unwrap() as usize];
    rv.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, snap_bytes(&a, prev));
    assert!(b.check().unwrap().is_clean());
    // Receiving the same snapshot id twice is refused.
    let again = b
        .receive(&mut &send(&a, prev, None)[..], Some("other"))
        .unwrap_err();
    assert!(matches!(again, Error::AlreadyExists { .. }), "{again}");
}

#[test]
fn wrong_base_and_changed_volume_are_refused() {
    let a = pool(32 << 20, 4096);
    let b = pool(32 << 20, 4096);
    let v = a.create_volume("v", 1 << 20).unwrap();
    v.write_at(&[1u8; 5000], 0).unwrap();
    let s1 = a.snapshot("v", "s1").unwrap();
    v.write_at(&[2u8; 5000], 0).unwrap();
    let s2 = a.snapshot("v", "s2").unwrap();
    v.write_at(&[3u8; 5000], 0).unwrap();
    let s3 = a.snapshot("v", "s3").unwrap();
    // No base on the receiver at all.
    let before = state(&b);
    let e = b
        .receive(&mut &send(&a, s2, Some(s1.into()))[..], None)
        .unwrap_err();
    assert!(matches!(e, Error::VolumeNotFound(_)), "{e}");
    assert_eq!(state(&b), before);
    b.receive(&mut &send(&a, s1, None)[..], None).unwrap();
    // s3 from s2, but the receiver's newest is s1: lineage is checked by id.
    let before = state(&b);
    let e = b
        .receive(&mut &send(&a, s3, Some(s2.into()))[..], None)
        .unwrap_err();
    assert!(matches!(e, Error::WrongBase { .. }), "{e}");
    assert_eq!(state(&b), before);
    // The receiver's volume changed since s1: refused until rolled back.
    b.volume("v").unwrap().write_at(&[9u8; 10], 0).unwrap();
    let e = b
        .receive(&mut &send(&a, s2, Some(s1.into()))[..], None)
        .unwrap_err();
    assert!(matches!(e, Error::WrongBase { .. }), "{e}");
    b.rollback("v", "s1").unwrap();
    b.receive(&mut &send(&a, s2, Some(s1.into()))[..], None)
        .unwrap();
    assert_eq!(snap_bytes(&b, s2), snap_bytes(&a, s2));
    assert!(b.check().unwrap().is_clean());
}

#[test]
fn damaged_streams_leave_the_receiver_unchanged() {
    let a = pool(32 << 20, 4096);
    let v = a.create_volume("v", 2 << 20).unwrap();
    for i in 0..20u64 {
        v.write_at(&[i as u8 + 1; 30_000], i * 100_000).unwrap();
    }
    let s1 = a.snapshot("v", "s1").unwrap();
    v.discard(0, 300_000).unwrap();
    v.write_at(&[0xEE; 9_000], 1_500_000).unwrap();
    let s2 = a.snapshot("v", "s2").unwrap();
    let full = send(&a, s1, None);
    let incr = send(&a, s2, Some(s1.into()));

    let b = pool(32 << 20, 4096);
    // Truncation anywhere.
    for cut in (0..full.len())
        .step_by(full.len() / 97 + 1)
        .chain([full.len() - 1])
    {
        let before = state(&b);
        let e = b.receive(&mut &full[..cut], None).unwrap_err();
        assert!(matches!(e, Error::BadStream(_)), "cut {cut}: {e}");
        assert_eq!(state(&b), before, "cut {cut} changed the pool");
    }
    // A flipped byte anywhere.
    for at in (0..full.len()).step_by(full.len() / 131 + 1) {
        let mut bad = full.clone();
        bad[at] ^= 0x40;
        let before = state(&b);
        match b.receive(&mut &bad[..], None) {
            Err(Error::BadStream(_)) | Err(Error::InvalidName { .. }) => {}
            Err(e) => panic!("flip at {at}: {e}"),
            // A flip in the volume name bytes makes a valid stream for another name.
            Ok(st) => {
                assert_eq!(snap_bytes(&b, s1), snap_bytes(&a, s1));
                b.delete_snapshot(&st.volume, &st.snapshot).unwrap();
                b.delete_volume(&st.volume).unwrap();
                continue;
            }
        }
        assert_eq!(state(&b), before, "flip at {at} changed the pool");
    }
    // Trailing garbage, a newer version, an unknown record type.
    let mut extra = full.clone();
    extra.push(0);
    assert!(matches!(
        b.receive(&mut &extra[..], None),
        Err(Error::BadStream(_))
    ));
    let mut newer = full.clone();
    newer[8] = 2;
    let e = b.receive(&mut &newer[..], None).unwrap_err();
    assert!(
        matches!(e, Error::BadStream(_)) && e.to_string().contains("version 2"),
        "{e}"
    );
    let header_len = 8 + 4 + 4 + 8 + 16 + 16 + 2 + "v@s1".len() + 4;
    let mut unknown = full.clone();
    unknown[header_len] = 9;
    let e = b.receive(&mut &unknown[..], None).unwrap_err();
    assert!(
        matches!(e, Error::BadStream(_)) && e.to_string().contains("unknown record type 9"),
        "{e}"
    );
    assert!(b.check().unwrap().is_clean());
    // Then the real streams still apply.
    b.receive(&mut &full[..], None).unwrap();
    let cut = &incr[..incr.len() - 3];
    let before = state(&b);
    assert!(matches!(
        b.receive(&mut &cut[..], None),
        Err(Error::BadStream(_))
    ));
    assert_eq!(state(&b), before);
    b.receive(&mut &incr[..], None).unwrap();
    assert_eq!(snap_bytes(&b, s2), snap_bytes(&a, s2));
    assert!(b.check().unwrap().is_clean());
}

#[test]
fn a_full_receiver_fails_cleanly() {
    let a = pool(64 << 20, 4096);
    let v = a.create_volume("big", 16 << 20).unwrap();
    v.write_at(&vec![5u8; 12 << 20], 0).unwrap();
    let s = a.snapshot("big", "s").unwrap();
    let stream = send(&a, s, None);
    let b = pool(8 << 20, 4096);
    let before = state(&b);
    let e = b.receive(&mut &stream[..], None).unwrap_err();
    assert!(matches!(e, Error::NoSpace { .. }), "{e}");
    assert_eq!(state(&b), before);
    assert!(b.check().unwrap().is_clean());
}

#[test]
fn incremental_from_a_bookmark_after_the_base_is_deleted() {
    let a = pool(32 << 20, 4096);
    let b = pool(32 << 20, 4096);
    let v = a.create_volume("v", 3_000_000).unwrap();
    v.write_at(&vec![1u8; 2_000_000], 0).unwrap();
    let s1 = a.snapshot("v", "s1").unwrap();
    b.receive(&mut &send(&a, s1, None)[..], None).unwrap();
    assert_eq!(a.bookmark("v", "s1").unwrap(), s1.into());
    a.delete_snapshot("v", "s1").unwrap();
    v.write_at(&[7u8; 10_000], 500_000).unwrap();
    v.discard(1_000_000, 300_000).unwrap();
    let s2 = a.snapshot("v", "s2").unwrap();
    // The delta from the bookmark covers what changed; zeros are reported conservatively.
    let page = a
        .delta(
            Base::Bookmark(s1.into()),
            snapvol::DiffTarget::Snapshot(s2),
            0,
            0,
            snapvol::TupleLength::Variable,
        )
        .unwrap();
    let data: u64 = page
        .extents
        .iter()
        .filter(|e| e.kind == snapvol::ExtentKind::Data)
        .map(|e| e.length)
        .sum();
    // Three rewritten blocks and the two partly discarded edge blocks.
    assert_eq!(data, 5 * 4096, "only the rewritten blocks are data");
    let stream = send(&a, s2, Some(Base::Bookmark(s1.into())));
    b.receive(&mut &stream[..], None).unwrap();
    assert_eq!(snap_bytes(&b, s2), snap_bytes(&a, s2));
    assert!(b.check().unwrap().is_clean());
    // A rollback past the bookmark breaks the lineage: refused, not silently wrong.
    let s0 = a.snapshot("v", "s3").unwrap();
    let _ = s0;
    a.create_volume("w", 1 << 20).unwrap();
    let w = a.volume("w").unwrap();
    w.write_at(&[1u8; 4096], 0).unwrap();
    a.snapshot("w", "old").unwrap();
    w.write_at(&[2u8; 4096], 0).unwrap();
    let wb = a.snapshot("w", "mark").unwrap();
    a.bookmark("w", "mark").unwrap();
    a.delete_snapshot("w", "mark").unwrap();
    a.rollback("w", "old").unwrap();
    let later = a.snapshot("w", "later").unwrap();
    let e = a
        .send(later, Some(Base::Bookmark(wb.into())), &mut Vec::new())
        .unwrap_err();
    assert!(matches!(e, Error::NotAncestor { .. }), "{e:?}");
    assert!(e.to_string().contains("rolled back past it"), "{e}");
    // A snapshot base that is gone is not found, even though its bookmark is there.
    let e = a.send(later, Some(wb.into()), &mut Vec::new()).unwrap_err();
    assert!(
        matches!(e, Error::SnapshotNotFound(Lookup::Id(id)) if id == wb),
        "{e:?}"
    );
}

/// An output that fails after `left` bytes, as a full disk or a closed pipe does.
struct FailingOutput {
    left: usize,
}

impl std::io::Write for FailingOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other("disk full"));
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failing_output_ends_the_send_with_an_error() {
    let p = pool(64 << 20, 4096);
    let v = p.create_volume("v", 16 << 20).unwrap();
    v.write_at(&vec![7u8; 16 << 20], 0).unwrap();
    let id = p.snapshot("v", "s").unwrap();
    let full = send(&p, id, None).len();
    // Fail at the header, inside the first record, and deep in the stream: each is an error
    // naming the stream write (the reader side must not keep the send waiting).
    for left in [0, 100, 5 << 20, full - 1] {
        match p.send(id, None, &mut FailingOutput { left }) {
            Err(Error::Io { .. }) => {}
            other => panic!("failing after {left} bytes gave {other:?}"),
        }
    }
    // The pool is untouched and a later send still works.
    assert_eq!(send(&p, id, None).len(), full);
    assert!(p.check().unwrap().is_clean());
}

#[test]
fn a_stream_claiming_a_volume_beyond_the_largest_is_refused() {
    let a = pool(32 << 20, 4096);
    a.create_volume("v", 1 << 20).unwrap();
    let id = a.snapshot("v", "s").unwrap();
    let mut s = send(&a, id, None);
    // The header's size field, then its checksum, made consistent again: only the size is
    // wrong, and it must be refused as such before anything is created.
    let name_len = u16::from_le_bytes([s[56], s[57]]) as usize;
    let crc_at = 58 + name_len;
    s[16..24].copy_from_slice(&(snapvol::MAX_VOLUME_BYTES + 4096).to_le_bytes());
    let crc = crc32fast::hash(&s[..crc_at]);
    s[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    let b = pool(32 << 20, 4096);
    let before = state(&b);
    match b.receive(&mut &s[..], None) {
        Err(Error::BadStream(why)) => assert!(why.contains("largest volume"), "{why}"),
        other => panic!("expected BadStream, got {other:?}"),
    }
    assert_eq!(state(&b), before);
}

/// A reader that yields `ok` bytes of a pattern, then fails.
struct Failing {
    ok: usize,
    at: usize,
}

impl std::io::Read for Failing {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at >= self.ok {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "source went away",
            ));
        }
        let n = buf.len().min(self.ok - self.at).min(100_000);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = ((self.at + i) % 251) as u8 | 1;
        }
        self.at += n;
        Ok(n)
    }
}

#[test]
fn an_import_that_fails_midway_or_fills_the_pool_leaves_the_pool_unchanged() {
    let p = pool(32 << 20, 4096);
    p.create_volume("other", 1 << 20).unwrap();
    let before = state(&p);
    match p.import("img", &mut Failing { ok: 3 << 20, at: 0 }, None) {
        Err(Error::Io { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::ConnectionReset)
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
    assert_eq!(state(&p), before);
    assert!(matches!(p.volume("img"), Err(Error::VolumeNotFound(_))));
    // More data than the pool holds: NoSpace, and nothing remains.
    match p.import(
        "img",
        &mut Failing {
            ok: 64 << 20,
            at: 0,
        },
        Some(64 << 20),
    ) {
        Err(Error::NoSpace { .. }) => {}
        other => panic!("expected NoSpace, got {other:?}"),
    }
    assert_eq!(state(&p), before);
    // A good import afterwards works, with the image's length as its size.
    let st = p
        .import(
            "img",
            &mut Failing {
                ok: 1_000_001,
                at: 0,
            }
            .take(1_000_001),
            None,
        )
        .unwrap();
    assert_eq!(st.size, 1_000_001);
    assert_eq!(p.volume("img").unwrap().len().unwrap(), 1_000_001);
    assert!(p.check().unwrap().is_clean());
}

#[test]
fn a_bookmark_stays_a_base_after_rolling_back_and_forward_again() {
    let a = pool(32 << 20, 4096);
    let b = pool(32 << 20, 4096);
    let v = a.create_volume("v", 1 << 20).unwrap();
    v.write_at(&[1u8; 8192], 0).unwrap();
    a.snapshot("v", "old").unwrap();
    v.write_at(&[2u8; 8192], 0).unwrap();
    let mark = a.snapshot("v", "mark").unwrap();
    b.receive(&mut &send(&a, mark, None)[..], None).unwrap();
    a.bookmark("v", "mark").unwrap();
    // Back to old, then forward to a snapshot taken from mark's state: mark is an ancestor.
    a.rollback("v", "old").unwrap();
    a.rollback("v", "mark").unwrap();
    a.delete_snapshot("v", "mark").unwrap();
    v.write_at(&[3u8; 4096], 65536).unwrap();
    let next = a.snapshot("v", "next").unwrap();
    let stream = send(&a, next, Some(Base::Bookmark(mark.into())));
    b.receive(&mut &stream[..], None).unwrap();
    assert_eq!(snap_bytes(&b, next), snap_bytes(&a, next));
    // Back past the bookmark for good: refused.
    a.rollback("v", "old").unwrap();
    let past = a.snapshot("v", "past").unwrap();
    let e = a
        .send(past, Some(Base::Bookmark(mark.into())), &mut Vec::new())
        .unwrap_err();
    assert!(matches!(e, Error::NotAncestor { .. }), "{e:?}");
    assert!(e.to_string().contains("rolled back past it"), "{e}");
}
