//! Threads write while another thread takes snapshots: every snapshot holds each write
//! wholly or not at all, and every write that completed before the snapshot call.

use snapvol::device::MemoryDevice;
use snapvol::{Pool, PoolOptions};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

const SLOTS: u64 = 16;
const RECORD: usize = 6000; // crosses block boundaries on purpose

fn record(writer: u64, k: u64) -> Vec<u8> {
    let word = ((writer << 24) | k) as u32;
    word.to_le_bytes()
        .iter()
        .copied()
        .cycle()
        .take(RECORD)
        .collect()
}

fn slot_offset(writer: u64, slot: u64) -> u64 {
    (writer * SLOTS + slot) * (RECORD as u64 + 1000)
}

/// Returns the record number in a slot (None if never written); panics on a torn record.
fn decode(bytes: &[u8], writer: u64) -> Option<u64> {
    if bytes.iter().all(|&b| b == 0) {
        return None;
    }
    let word = u32::from_le_bytes(bytes[..4].try_into().unwrap());
    assert!(
        bytes.chunks(4).all(|c| c == &word.to_le_bytes()[..c.len()]),
        "a torn write is visible in a snapshot"
    );
    assert_eq!(u64::from(word >> 24), writer, "record of the wrong writer");
    Some(u64::from(word & 0xFF_FFFF))
}

#[test]
fn snapshots_are_barriers_for_concurrent_writers() {
    let pool = Pool::create(
        Arc::new(MemoryDevice::new(256 << 20)),
        PoolOptions::default(),
    )
    .unwrap();
    let a = pool.create_volume("a", 4 << 20).unwrap();
    let b = pool.create_volume("b", 4 << 20).unwrap();
    // writer -> (volume, completed, started)
    let writers: Vec<(snapvol::Volume, Arc<AtomicU64>, Arc<AtomicU64>)> = vec![
        (a.clone(), Default::default(), Default::default()),
        (a.clone(), Default::default(), Default::default()),
        (a.clone(), Default::default(), Default::default()),
        (b.clone(), Default::default(), Default::default()),
    ];
    // Writers run until the snapshot thread has taken all its snapshots, so every snapshot
    // lands while all of them are writing, however the machine schedules threads.
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for (w, (vol, done, started)) in writers.iter().enumerate() {
            let w = w as u64;
            let stop = &stop;
            s.spawn(move || {
                let mut k = 0;
                while !stop.load(SeqCst) {
                    k += 1;
                    started.store(k, SeqCst);
                    vol.write_at(&record(w, k), slot_offset(w, k % SLOTS))
                        .unwrap();
                    done.store(k, SeqCst);
                }
            });
        }
        while writers.iter().any(|w| w.1.load(SeqCst) == 0) {
            std::thread::yield_now();
        }
        let mut taken = Vec::new();
        for i in 0..40 {
            let before: Vec<u64> = writers.iter().map(|w| w.1.load(SeqCst)).collect();
            let ids = pool
                .snapshot_group(&[("a", &format!("s{i}")), ("b", &format!("s{i}"))])
                .unwrap();
            let after: Vec<u64> = writers.iter().map(|w| w.2.load(SeqCst)).collect();
            taken.push((ids, before, after));
            std::thread::yield_now();
        }
        stop.store(true, SeqCst);
        for (ids, before, after) in taken {
            for (w, _) in writers.iter().enumerate() {
                let snap = pool
                    .snapshot_by_id(if w < 3 { ids[0] } else { ids[1] })
                    .unwrap();
                let w = w as u64;
                let mut newest = 0;
                for slot in 0..SLOTS {
                    let mut buf = vec![0u8; RECORD];
                    snap.read_at(&mut buf, slot_offset(w, slot)).unwrap();
                    if let Some(k) = decode(&buf, w) {
                        assert_eq!(k % SLOTS, slot);
                        assert!(
                            k <= after[w as usize],
                            "a write started after the snapshot is in it"
                        );
                        newest = newest.max(k);
                    }
                }
                let done = before[w as usize];
                assert!(
                    newest >= done,
                    "writer {w}: completed write {done} missing (newest {newest})"
                );
                if done > 0 {
                    let mut buf = vec![0u8; RECORD];
                    snap.read_at(&mut buf, slot_offset(w, done % SLOTS))
                        .unwrap();
                    assert!(decode(&buf, w).unwrap() >= done);
                }
            }
        }
    });
    assert!(pool.check().unwrap().is_clean());
}
