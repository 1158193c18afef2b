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

/// A memory device whose next armed read or write announces itself and then stalls until
/// released (or two seconds pass), so a test can act while that I/O is in flight outside the
/// engine lock.
struct Stalling {
    inner: MemoryDevice,
    armed: std::sync::Mutex<Option<(bool, std::sync::mpsc::Sender<()>)>>,
    released: AtomicBool,
    /// The stalled I/O reached the device (what a caller waiting for it must see done).
    stalled_done: AtomicBool,
}

impl Stalling {
    fn arm(&self, write: bool) -> std::sync::mpsc::Receiver<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.released.store(false, SeqCst);
        *self.armed.lock().unwrap() = Some((write, tx));
        rx
    }

    fn release(&self) {
        self.released.store(true, SeqCst);
    }

    /// Stalls when armed for this direction; returns whether it did.
    fn stall_if_armed(&self, write: bool) -> bool {
        let mut armed = self.armed.lock().unwrap();
        if armed.as_ref().is_some_and(|(w, _)| *w == write) {
            let (_, tx) = armed.take().unwrap();
            drop(armed);
            tx.send(()).unwrap();
            let t = std::time::Instant::now();
            while !self.released.load(SeqCst) && t.elapsed().as_secs() < 2 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            return true;
        }
        false
    }

    /// Runs `io` after a stall if armed, and records when the stalled one is done.
    fn io(&self, write: bool, io: impl FnOnce() -> snapvol::Result<()>) -> snapvol::Result<()> {
        let stalled = self.stall_if_armed(write);
        let r = io();
        if stalled {
            self.stalled_done.store(true, SeqCst);
        }
        r
    }
}

impl snapvol::device::BlockDevice for Stalling {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> snapvol::Result<()> {
        self.io(false, || self.inner.read_at(buf, offset))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> snapvol::Result<()> {
        self.io(true, || self.inner.write_at(buf, offset))
    }
    fn flush(&self) -> snapvol::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
}

fn stalling_pool() -> (Arc<Stalling>, Pool) {
    let dev = Arc::new(Stalling {
        inner: MemoryDevice::new(64 << 20),
        armed: std::sync::Mutex::new(None),
        released: AtomicBool::new(false),
        stalled_done: AtomicBool::new(false),
    });
    let opts = PoolOptions::default().commit_interval(None);
    let pool = Pool::create(dev.clone(), opts).unwrap();
    (dev, pool)
}

/// A read in flight outside the engine lock keeps its blocks: deleting the snapshot it reads
/// and reusing the space must wait for it, so it never returns another volume's bytes.
#[test]
fn blocks_under_an_in_flight_read_are_not_reused() {
    let (dev, pool) = stalling_pool();
    let vol = pool.create_volume("v", 1 << 20).unwrap();
    vol.write_at(&[0xAB; 1 << 20], 0).unwrap();
    pool.snapshot("v", "s").unwrap();
    let snap = pool.snapshot_handle("v", "s").unwrap();
    let entered = dev.arm(false);
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        snap.read_at(&mut buf, 0).map(|_| buf)
    });
    entered.recv().unwrap();
    // While the read stalls: free the snapshot's blocks, let two commits pass so they could
    // be reused, and fill the pool's free space with other bytes.
    vol.write_at(&[0x11; 1 << 20], 0).unwrap();
    pool.delete_snapshot("v", "s").unwrap();
    assert!(
        dev.stalled_done.load(SeqCst),
        "deleting the snapshot did not wait for the read in flight"
    );
    // Two more commits: freed units become allocatable after the commit that follows the
    // one that freed them.
    pool.create_volume("a", 4096).unwrap();
    pool.create_volume("b", 4096).unwrap();
    let other = pool.create_volume("other", 64 << 20).unwrap();
    let mut filled = 0u64;
    while other.write_at(&[0xCD; 65536], filled).is_ok() {
        filled += 65536;
    }
    assert!(filled > 8 << 20, "the pool filled up after {filled} bytes");
    dev.release();
    match reader.join().unwrap() {
        Ok(buf) => assert!(
            buf.iter().all(|&b| b == 0xAB),
            "an in-flight read of a snapshot returned bytes it never held"
        ),
        Err(e) => panic!("the read had started before the delete: {e}"),
    }
}

/// A snapshot taken while an in-place write is in flight waits for it: the snapshot never
/// changes after the call returns.
#[test]
fn snapshot_waits_for_in_flight_in_place_writes() {
    let (dev, pool) = stalling_pool();
    let vol = pool.create_volume("v", 1 << 20).unwrap();
    vol.write_at(&[1u8; 65536], 0).unwrap();
    pool.flush().unwrap();
    let entered = dev.arm(true);
    let writer = {
        let vol = vol.clone();
        std::thread::spawn(move || vol.write_at(&[2u8; 65536], 0))
    };
    entered.recv().unwrap();
    pool.snapshot("v", "s").unwrap();
    let snap = pool.snapshot_handle("v", "s").unwrap();
    let mut first = vec![0u8; 65536];
    snap.read_at(&mut first, 0).unwrap();
    dev.release();
    writer.join().unwrap().unwrap();
    let mut again = vec![0u8; 65536];
    snap.read_at(&mut again, 0).unwrap();
    assert!(first == again, "the snapshot changed after it was taken");
    assert!(
        first.iter().all(|&b| b == 1) || first.iter().all(|&b| b == 2),
        "the snapshot holds half a write"
    );
}

/// Group commit's rule, deterministically: a flush with nothing completed since the last
/// flush's commit touches no device; a flush after any kind of write (in place outside the
/// engine lock, zero-filled in place under it by a partial discard or write_zeroes,
/// redirected) flushes the device.
#[test]
fn a_flush_skips_the_device_only_when_every_write_it_covers_is_durable() {
    let dev = Arc::new(snapvol::device::CountingDevice::new(Arc::new(
        MemoryDevice::new(64 << 20),
    )));
    let pool = Pool::create(dev.clone(), PoolOptions::default().commit_interval(None)).unwrap();
    let v = pool.create_volume("v", 1 << 20).unwrap();
    v.write_at(&[1u8; 65536], 0).unwrap();
    v.flush().unwrap();
    let n = || dev.flushes();
    let before = n();
    v.flush().unwrap();
    pool.flush().unwrap();
    assert_eq!(n(), before, "nothing new: no device flush");
    let steps: [(&str, &dyn Fn()); 4] = [
        ("in place", &|| v.write_at(&[2u8; 4096], 0).unwrap()),
        ("partial discard", &|| v.discard(100, 200).unwrap()),
        ("partial write_zeroes", &|| {
            v.write_zeroes(5000, 100).unwrap()
        }),
        ("redirected", &|| {
            v.write_at(&[3u8; 4096], 512 << 10).unwrap()
        }),
    ];
    for (what, step) in steps {
        step();
        let before = n();
        v.flush().unwrap();
        assert!(
            n() > before,
            "a flush after a {what} write reaches the device"
        );
        let before = n();
        v.flush().unwrap();
        assert_eq!(n(), before, "and the flush after that does not ({what})");
    }
}
