//! A fast hasher for unit numbers. Keys are page locations chosen by the allocator, not by
//! users, so the DoS resistance of SipHash buys nothing on this hot path.

use std::hash::{BuildHasherDefault, Hasher};

#[derive(Default)]
pub(crate) struct UnitHasher(u64);

impl Hasher for UnitHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: a multiply spreads sequential units over the table.
        self.0 = (self.0 ^ n)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(26);
    }
}

pub(crate) type UnitMap<V> = std::collections::HashMap<u64, V, BuildHasherDefault<UnitHasher>>;
pub(crate) type UnitSet = std::collections::HashSet<u64, BuildHasherDefault<UnitHasher>>;
