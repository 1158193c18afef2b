//! Ids and clock readings for catalog records.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A new 128-bit id, never 0: the creation time in milliseconds in the top 48 bits and 80
/// random bits below (the layout of UUIDv7). Ids made later sort later, so the catalog's
/// records of new volumes and snapshots are appended at the end of their key range (one
/// leaf path per commit, full leaves) instead of landing in a random leaf each; 80 random
/// bits keep ids from different pools and processes apart (they travel with backups and
/// streams).
pub(crate) fn new_id() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // RandomState is keyed from the OS's random source once per process and varied per
    // instance; hashing the time and a salt through two instances gives 128 random bits.
    let half = |salt: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(since.as_nanos());
        h.write_u64(salt);
        h.finish()
    };
    let random = ((half(1) as u128) << 64 | half(2) as u128) & ((1u128 << 80) - 1);
    let millis = since.as_millis() & ((1u128 << 48) - 1);
    (millis << 80 | random).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_nonzero_and_ordered_by_time() {
        let a = new_id();
        std::thread::sleep(std::time::Duration::from_millis(3));
        let b = new_id();
        assert!(a != 0 && b > a, "{a:032x} then {b:032x}");
        let many: std::collections::HashSet<u128> = (0..10_000).map(|_| new_id()).collect();
        assert_eq!(many.len(), 10_000);
        // The top bits are this millisecond.
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis();
        assert!(ms - (new_id() >> 80) < 1000);
    }
}
