//! The one definition of what a pool may show after a crash or an I/O fault, shared by
//! tests/crash.rs, tests/faults.rs and the `operations` fuzz target.
//!
//! The durability contract: everything up to the last operation that committed (a flush
//! or a catalog operation that reached the device) is there; each later operation may or
//! may not have taken effect, in order; an operation cut short may have taken effect or
//! not; and the bytes of writes and discards since the last commit may have landed in part
//! (a device write torn at sector boundaries), snapshots excepted.

use super::{Model, Op};
use snapvol::Pool;

/// The states a pool may be found in, from the last durable point on.
#[derive(Clone, Debug)]
pub struct Acceptable {
    candidates: Vec<Model>,
    /// (volume, offset, length) whose bytes may have landed in part.
    undefined: Vec<(String, u64, u64)>,
}

impl Acceptable {
    /// Nothing since `durable`, a state known to be on the media.
    pub fn new(durable: Model) -> Acceptable {
        Acceptable {
            candidates: vec![durable],
            undefined: Vec::new(),
        }
    }

    /// `op` starts on a pool whose model is `before`.
    pub fn begin(&mut self, before: &Model, op: &Op) {
        self.undefined.extend(before.undefined_range(op));
    }

    /// `op` returned, leaving `after`; `durable` when it committed to the media (then
    /// nothing before it can be lost any more).
    pub fn done(&mut self, after: &Model, durable: bool) {
        if durable {
            *self = Acceptable::new(after.clone());
        } else {
            self.candidates.push(after.clone());
        }
    }

    /// `op`, begun on `before`, failed or was cut short: it may have taken effect or not.
    pub fn interrupted(&mut self, before: &Model, op: &Op) {
        self.candidates.push(before.predict(op));
    }

    /// The acceptable state `pool` shows (with the undefined bytes, and the ids of objects
    /// only predicted, taken from the pool), or why each candidate does not match.
    pub fn find(&self, pool: &Pool) -> Result<Model, Vec<String>> {
        let mut misses = Vec::new();
        for c in &self.candidates {
            let mut c = c.clone();
            for (name, off, len) in &self.undefined {
                c.adopt_range(pool, name, *off, *len);
            }
            match c.matches(pool) {
                Ok(()) => {
                    c.adopt_ids(pool);
                    return Ok(c);
                }
                Err(why) => misses.push(why),
            }
        }
        Err(misses)
    }
}
