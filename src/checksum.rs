//! Data block checksums: CRC-32 (IEEE, by crc32fast, as the metadata pages use), and the
//! arithmetic that joins the checksums of adjacent pieces into the checksum of their
//! concatenation without reading the bytes again.
//!
//! The join is what lets a send stream carry the pool's own block checksums: a DATA
//! record's CRC is built from the committed checksums of the blocks it covers, so bytes
//! that changed between the media and the stream (after the read verified them) fail the
//! receiver's check instead of being re-checksummed as they are.

/// The checksum a block's contents get in a pool with data checksums.
#[inline]
pub(crate) fn block_sum(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// The CRC of `a || b` from the CRC of `a` and the bytes of `b`.
pub(crate) fn extend(crc_a: u32, b: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(crc_a);
    h.update(b);
    h.finalize()
}

/// Appending `len` bytes to a CRC-32, as a linear map over GF(2): the CRC of `a || b` is
/// `Shift::new(b.len()).apply(crc(a)) ^ crc(b)` (the pre- and post-inversion of CRC-32
/// cancel in this form). Precomputed for one length, applying it costs 32 conditional xors,
/// far less than hashing the bytes.
#[derive(Clone, Debug)]
pub(crate) struct Shift {
    /// The image of each bit of the CRC.
    cols: [u32; 32],
}

impl Shift {
    /// The map for appending `len` bytes.
    pub(crate) fn new(len: u64) -> Shift {
        let mut cols = [0u32; 32];
        for (i, c) in cols.iter_mut().enumerate() {
            *c = shift_slow(1 << i, len);
        }
        Shift { cols }
    }

    /// `crc` moved past the appended bytes (xor the appended bytes' CRC to finish).
    #[inline]
    pub(crate) fn apply(&self, crc: u32) -> u32 {
        times(&self.cols, crc)
    }
}

/// `mat · vec` over GF(2), `mat` given by columns.
fn times(mat: &[u32; 32], mut vec: u32) -> u32 {
    let mut sum = 0;
    let mut i = 0;
    while vec != 0 {
        if vec & 1 != 0 {
            sum ^= mat[i];
        }
        vec >>= 1;
        i += 1;
    }
    sum
}

fn square(mat: &[u32; 32]) -> [u32; 32] {
    let mut sq = [0u32; 32];
    for (n, s) in sq.iter_mut().enumerate() {
        *s = times(mat, mat[n]);
    }
    sq
}

/// Moves `crc` past `len` zero bytes by repeated squaring of the one-bit operator (the
/// classic method zlib's `crc32_combine` uses): O(log len) 32×32 products.
fn shift_slow(mut crc: u32, mut len: u64) -> u32 {
    if len == 0 {
        return crc;
    }
    // The operator for one zero bit: the reflected polynomial, then a shift.
    let mut odd = [0u32; 32];
    odd[0] = 0xedb8_8320;
    let mut row = 1u32;
    for o in odd.iter_mut().skip(1) {
        *o = row;
        row <<= 1;
    }
    let even = square(&odd); // two zero bits
    let mut odd = square(&even); // four
    loop {
        let even = square(&odd); // first pass: one zero byte
        if len & 1 != 0 {
            crc = times(&even, crc);
        }
        len >>= 1;
        if len == 0 {
            break;
        }
        odd = square(&even);
        if len & 1 != 0 {
            crc = times(&odd, crc);
        }
        len >>= 1;
        if len == 0 {
            break;
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: u32) -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) as u8)
            .collect()
    }

    /// Joining checksums gives what hashing the concatenation gives, for block-sized and
    /// odd-sized pieces, and extending a CRC by bytes agrees too.
    #[test]
    fn joined_checksums_equal_the_checksum_of_the_whole() {
        for len in [1usize, 3, 512, 4096, 65536, 1 << 20] {
            let shift = Shift::new(len as u64);
            let (a, b) = (bytes(1000 + len % 7, 1), bytes(len, 2));
            let whole: Vec<u8> = a.iter().chain(&b).copied().collect();
            let joined = shift.apply(block_sum(&a)) ^ block_sum(&b);
            assert_eq!(joined, crc32fast::hash(&whole), "len {len}");
            assert_eq!(extend(block_sum(&a), &b), crc32fast::hash(&whole));
        }
        // From nothing: the empty CRC is 0, and moving it gives 0.
        assert_eq!(Shift::new(4096).apply(0), 0);
        assert_eq!(extend(0, b"abc"), crc32fast::hash(b"abc"));
    }
}
