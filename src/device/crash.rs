//! A device that remembers every write and flush, so tests can build the image a power loss
//! would leave at any point of the history: everything before the last completed flush
//! survives; any subset of the later writes survives, in any order; the last write that
//! reaches the media may be torn at 512-byte sector boundaries.

use super::{check_range, BlockDevice};
use crate::error::Result;
use parking_lot::Mutex;

const SECTOR: usize = 512;

#[derive(Clone)]
enum Event {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Flush,
    /// Bytes `offset..offset + len` were discarded: after a crash they may read as zeros
    /// or as before, until the next flush makes the zeros durable (the harsher case a
    /// real device may give).
    Discard {
        offset: u64,
        len: u64,
    },
    /// The device became `len` bytes long. Modelled as durable at once (the engine flushes
    /// after growing and before anything refers to the new space, so a lost size change
    /// would only lose unreferenced zeros).
    Grow {
        len: u64,
    },
}

/// Records the device's history; see the module docs.
pub struct CrashDevice {
    state: Mutex<State>,
}

struct State {
    current: Vec<u8>,
    history: History,
}

/// A frozen copy of a [`CrashDevice`]'s history, from which crash images are built.
#[derive(Clone)]
pub struct History {
    base: Vec<u8>,
    events: Vec<Event>,
}

/// A position in a [`History`]: the image as of the last completed flush plus the writes
/// that had completed after it, not yet durable.
pub struct CrashPoint<'a> {
    history: &'a History,
    pos: usize,
    durable: Vec<u8>,
    pending: Vec<usize>,
}

impl CrashDevice {
    /// A zero-filled device of `len` bytes with an empty history.
    pub fn new(len: u64) -> CrashDevice {
        CrashDevice::from_image(vec![0; len as usize])
    }

    /// A device whose durable contents are `image`.
    pub fn from_image(image: Vec<u8>) -> CrashDevice {
        CrashDevice {
            state: Mutex::new(State {
                current: image.clone(),
                history: History {
                    base: image,
                    events: Vec::new(),
                },
            }),
        }
    }

    /// The history recorded so far.
    pub fn history(&self) -> History {
        self.state.lock().history.clone()
    }

    /// Number of events (writes and flushes) recorded so far.
    pub fn events(&self) -> usize {
        self.state.lock().history.events.len()
    }

    /// What reads see now (every completed write, durable or not).
    pub fn current_image(&self) -> Vec<u8> {
        self.state.lock().current.clone()
    }

    /// Forgets the history, making the current contents the new durable base. Bounds memory in
    /// long tests; only valid right after a flush.
    pub fn truncate_history(&self) {
        let mut s = self.state.lock();
        let current = s.current.clone();
        s.history = History {
            base: current,
            events: Vec::new(),
        };
    }
}

impl BlockDevice for CrashDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let s = self.state.lock();
        check_range("read", offset, buf.len(), s.current.len() as u64)?;
        let o = offset as usize;
        buf.copy_from_slice(&s.current[o..o + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut s = self.state.lock();
        check_range("write", offset, buf.len(), s.current.len() as u64)?;
        let o = offset as usize;
        s.current[o..o + buf.len()].copy_from_slice(buf);
        s.history.events.push(Event::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.state.lock().history.events.push(Event::Flush);
        Ok(())
    }

    fn len(&self) -> u64 {
        self.state.lock().current.len() as u64
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let mut s = self.state.lock();
        let n = usize::try_from(len).unwrap_or(usize::MAX);
        check_range("discard", offset, n, s.current.len() as u64)?;
        let o = offset as usize;
        s.current[o..o + n].fill(0);
        s.history.events.push(Event::Discard { offset, len });
        Ok(())
    }

    fn grow(&self, new_len: u64) -> Result<()> {
        let mut s = self.state.lock();
        if new_len > s.current.len() as u64 {
            s.current.resize(new_len as usize, 0);
            s.history.events.push(Event::Grow { len: new_len });
        }
        Ok(())
    }
}

impl History {
    /// Number of events in the history.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// True when nothing was written or flushed.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Event counts just after each flush: the crash points where nothing is in flight.
    pub fn flush_points(&self) -> Vec<usize> {
        (0..self.events.len())
            .filter(|&i| matches!(self.events[i], Event::Flush))
            .map(|i| i + 1)
            .collect()
    }

    /// A cursor at the start of the history. Advance it forward to each crash point to test.
    pub fn start(&self) -> CrashPoint<'_> {
        CrashPoint {
            history: self,
            pos: 0,
            durable: self.base.clone(),
            pending: Vec::new(),
        }
    }
}

impl CrashPoint<'_> {
    /// Moves forward to just after `events` events have completed.
    pub fn advance_to(&mut self, events: usize) {
        assert!(events >= self.pos && events <= self.history.events.len());
        while self.pos < events {
            match &self.history.events[self.pos] {
                Event::Write { .. } | Event::Discard { .. } => self.pending.push(self.pos),
                Event::Flush => {
                    for &i in &self.pending {
                        apply(&mut self.durable, &self.history.events[i], None);
                    }
                    self.pending.clear();
                }
                Event::Grow { len } => self.durable.resize(*len as usize, 0),
            }
            self.pos += 1;
        }
    }

    /// Events completed at this point.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Writes completed since the last flush (the ones a crash may lose).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The image with only what the last completed flush made durable.
    pub fn durable_image(&self) -> Vec<u8> {
        self.durable.clone()
    }

    /// A power-loss image chosen by `seed`: a random subset of the pending writes, applied in
    /// a random order, the last of them possibly torn at sector boundaries.
    pub fn crash_image(&self, seed: u64) -> Vec<u8> {
        let mut rng = SplitMix(seed);
        let mut image = self.durable.clone();
        let mut chosen: Vec<usize> = match rng.next() % 4 {
            0 => Vec::new(),
            1 => self.pending.clone(),
            _ => self
                .pending
                .iter()
                .copied()
                .filter(|_| rng.next() % 2 == 0)
                .collect(),
        };
        // Fisher-Yates: the device may reorder writes that were not separated by a flush.
        for i in (1..chosen.len()).rev() {
            let j = (rng.next() % (i as u64 + 1)) as usize;
            chosen.swap(i, j);
        }
        let torn = rng.next() % 2 == 0;
        for (n, &i) in chosen.iter().enumerate() {
            let tear = if torn && n + 1 == chosen.len() {
                Some(rng.next())
            } else {
                None
            };
            apply(&mut image, &self.history.events[i], tear);
        }
        image
    }
}

fn apply(image: &mut [u8], event: &Event, tear: Option<u64>) {
    let (offset, data) = match event {
        Event::Write { offset, data } => (offset, std::borrow::Cow::Borrowed(&data[..])),
        // Zeros over the range, landing sector by sector like a write when torn.
        Event::Discard { offset, len } => (offset, std::borrow::Cow::Owned(vec![0; *len as usize])),
        Event::Flush | Event::Grow { .. } => return,
    };
    let o = *offset as usize;
    match tear {
        None => image[o..o + data.len()].copy_from_slice(&data),
        Some(bits) => {
            // Each sector of the torn write lands or not, independently.
            let mut rng = SplitMix(bits);
            for (k, chunk) in data.chunks(SECTOR).enumerate() {
                if rng.next() % 2 == 0 {
                    let at = o + k * SECTOR;
                    image[at..at + chunk.len()].copy_from_slice(chunk);
                }
            }
        }
    }
}

/// SplitMix64: tiny, seedable, good enough to pick subsets and orders.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance() {
        super::super::conformance::run(&CrashDevice::new(2 << 20));
    }

    #[test]
    fn crash_keeps_flushed_and_may_drop_unflushed() {
        let dev = CrashDevice::new(8192);
        dev.write_at(&[1; 512], 0).unwrap();
        dev.flush().unwrap();
        dev.write_at(&[2; 1024], 512).unwrap();
        let h = dev.history();
        let mut p = h.start();
        p.advance_to(h.len());
        assert_eq!(p.pending(), 1);
        let mut saw_lost = false;
        let mut saw_kept = false;
        for seed in 0..64 {
            let img = p.crash_image(seed);
            assert_eq!(&img[..512], &[1; 512], "flushed write must survive");
            saw_lost |= img[512] == 0;
            saw_kept |= img[512] == 2;
        }
        assert!(saw_lost && saw_kept);
    }

    /// A discard is recorded: until a flush it may or may not have happened in a crash
    /// image; after one its zeros are durable.
    #[test]
    fn discards_are_pending_until_a_flush() {
        let dev = CrashDevice::new(8192);
        assert!(dev.supports_discard());
        dev.write_at(&[5; 4096], 4096).unwrap();
        dev.flush().unwrap();
        dev.discard(4096, 4096).unwrap();
        let mut buf = [1u8; 4096];
        dev.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [0; 4096], "reads see the discard at once");
        let h = dev.history();
        let mut p = h.start();
        p.advance_to(h.len());
        assert_eq!(p.pending(), 1);
        let (mut zeros, mut kept) = (false, false);
        for seed in 0..64 {
            let img = p.crash_image(seed);
            zeros |= img[4096..8192].iter().all(|&b| b == 0);
            kept |= img[4096..8192].iter().all(|&b| b == 5);
        }
        assert!(zeros && kept);
        dev.flush().unwrap();
        let h = dev.history();
        let mut p = h.start();
        p.advance_to(h.len());
        assert!(p.durable_image()[4096..8192].iter().all(|&b| b == 0));
    }
}
