//! A target that fails on cue, for tests of what every step of push, restore, verify and gc
//! does when the store misbehaves (feature `testing`).

use super::target::{ObjectMeta, Target};
use crate::error::{Error, Result};
use parking_lot::{Condvar, Mutex};
use std::ops::Range;
use std::sync::Arc;

/// What goes wrong, and on which call (counted from 1 since the fault was armed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetFault {
    /// The Nth put fails with an I/O error (nothing is stored).
    FailPut(u64),
    /// The Nth get fails with an I/O error.
    FailGet(u64),
    /// The Nth get returns only the first half of the body.
    TruncateGet(u64),
    /// The Nth get returns the body with one byte flipped.
    CorruptGet(u64),
    /// The Nth list fails with an I/O error.
    FailList(u64),
    /// The Nth delete fails with an I/O error.
    FailDelete(u64),
    /// The Nth put waits until the fault is disarmed, then goes through: a push caught in
    /// flight, for what a concurrent delete or stop does meanwhile.
    HoldPut(u64),
    /// The Nth get waits until the fault is disarmed, then goes through: a restore caught
    /// in flight, for what other requests do meanwhile.
    HoldGet(u64),
}

#[derive(Default)]
struct State {
    fault: Option<TargetFault>,
    puts: u64,
    gets: u64,
    lists: u64,
    deletes: u64,
    fired: u64,
    /// A put or get is waiting in [`TargetFault::HoldPut`] or [`TargetFault::HoldGet`].
    holding: bool,
}

/// Wraps a target; by default it passes everything through.
pub struct FaultTarget {
    inner: Arc<dyn Target>,
    state: Mutex<State>,
    released: Condvar,
}

impl FaultTarget {
    /// A target passing everything through to `inner` until told to fail.
    pub fn new(inner: Arc<dyn Target>) -> FaultTarget {
        FaultTarget {
            inner,
            state: Mutex::new(State::default()),
            released: Condvar::new(),
        }
    }

    /// Arms `fault`; the call counts start again from zero.
    pub fn arm(&self, fault: TargetFault) {
        *self.state.lock() = State {
            fault: Some(fault),
            ..State::default()
        };
        self.released.notify_all();
    }

    /// Passes everything through again (a held put goes on).
    pub fn disarm(&self) {
        self.state.lock().fault = None;
        self.released.notify_all();
    }

    /// Whether a put is waiting in [`TargetFault::HoldPut`].
    pub fn holding(&self) -> bool {
        self.state.lock().holding
    }

    /// Counts a put and applies a put fault to it.
    fn before_put(&self, key: &str) -> Result<()> {
        let mut s = self.state.lock();
        s.puts += 1;
        let n = s.puts;
        match s.fault {
            Some(TargetFault::FailPut(k)) if k == n => {
                s.fired += 1;
                Err(injected("put", key))
            }
            Some(TargetFault::HoldPut(k)) if k == n => {
                s.fired += 1;
                s.holding = true;
                while s.fault == Some(TargetFault::HoldPut(k)) {
                    self.released.wait(&mut s);
                }
                s.holding = false;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// How many times the armed fault has fired.
    pub fn fired(&self) -> u64 {
        self.state.lock().fired
    }

    /// Puts, gets, lists and deletes seen since the fault was armed.
    pub fn calls(&self) -> (u64, u64, u64, u64) {
        let s = self.state.lock();
        (s.puts, s.gets, s.lists, s.deletes)
    }
}

fn injected(op: &'static str, key: &str) -> Error {
    Error::Target {
        op,
        key: key.to_string(),
        source: std::io::Error::other("injected fault"),
    }
}

impl Target for FaultTarget {
    fn put(&self, key: &str, data: &[u8], create_only: bool) -> Result<bool> {
        self.before_put(key)?;
        self.inner.put(key, data, create_only)
    }

    fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Option<Vec<u8>>> {
        let fault = {
            let mut s = self.state.lock();
            s.gets += 1;
            let n = s.gets;
            if let Some(TargetFault::HoldGet(k)) = s.fault {
                if k == n {
                    s.fired += 1;
                    s.holding = true;
                    while s.fault == Some(TargetFault::HoldGet(k)) {
                        self.released.wait(&mut s);
                    }
                    s.holding = false;
                }
            }
            let f = s.fault.filter(|f| {
                matches!(f, TargetFault::FailGet(k) | TargetFault::TruncateGet(k)
                    | TargetFault::CorruptGet(k) if *k == n)
            });
            if f.is_some() {
                s.fired += 1;
            }
            f
        };
        if fault.is_some_and(|f| matches!(f, TargetFault::FailGet(_))) {
            return Err(injected("get", key));
        }
        let mut body = self.inner.get(key, range)?;
        if let Some(b) = body.as_mut() {
            match fault {
                Some(TargetFault::TruncateGet(_)) => b.truncate(b.len() / 2),
                Some(TargetFault::CorruptGet(_)) if !b.is_empty() => {
                    let i = b.len() / 2;
                    b[i] ^= 0x40;
                }
                _ => {}
            }
        }
        Ok(body)
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        self.inner.head(key)
    }

    fn list(&self, prefix: &str, each: &mut dyn FnMut(ObjectMeta) -> Result<()>) -> Result<()> {
        {
            let mut s = self.state.lock();
            s.lists += 1;
            if s.fault == Some(TargetFault::FailList(s.lists)) {
                s.fired += 1;
                return Err(injected("list", prefix));
            }
        }
        self.inner.list(prefix, each)
    }

    fn delete(&self, key: &str) -> Result<()> {
        {
            let mut s = self.state.lock();
            s.deletes += 1;
            if s.fault == Some(TargetFault::FailDelete(s.deletes)) {
                s.fired += 1;
                return Err(injected("delete", key));
            }
        }
        self.inner.delete(key)
    }

    fn put_batched(&self, key: &str, data: &[u8]) -> Result<bool> {
        self.before_put(key)?;
        self.inner.put_batched(key, data)
    }

    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }

    fn sweep_leftovers(&self, age: std::time::Duration) -> Result<u64> {
        self.inner.sweep_leftovers(age)
    }

    fn describe(&self) -> String {
        format!("faulty {}", self.inner.describe())
    }
}
