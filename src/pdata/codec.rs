//! Byte encodings of tree keys and values: little-endian integers and length-prefixed
//! strings, decoded with bounds checks (a page's bytes are checksummed, but a decoder never
//! trusts a length it reads).

use crate::error::{Error, Result};

/// Appends encodings to a buffer.
pub(crate) struct Writer(pub Vec<u8>);

impl Writer {
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u128(&mut self, v: u128) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
}

/// Reads encodings from a page's bytes; every failure is a corruption of that page.
pub(crate) struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    /// What is being read and where, for the error.
    what: &'static str,
    location: u64,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(b: &'a [u8], what: &'static str, location: u64) -> Reader<'a> {
        Reader {
            b,
            at: 0,
            what,
            location,
        }
    }

    #[cold]
    #[inline(never)]
    pub(crate) fn corrupt(&self, detail: impl Into<String>) -> Error {
        Error::corrupt(self.what, self.location, detail)
    }

    #[inline]
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| self.corrupt("entry runs past the end of the page"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    #[inline]
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    #[inline]
    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }
    #[inline]
    pub(crate) fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    #[inline]
    pub(crate) fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    #[inline]
    pub(crate) fn u128(&mut self) -> Result<u128> {
        Ok(u128::from_le_bytes(self.array()?))
    }
}

/// How a key or value is stored in a tree node.
pub(crate) trait Codec: Sized {
    /// The encoded size when every value of the type has the same one: nodes of fixed-size
    /// entries then count entries instead of summing bytes.
    const FIXED: Option<usize> = None;
    /// Bytes [`Codec::encode`] appends.
    fn encoded_len(&self) -> usize;
    fn encode(&self, w: &mut Writer);
    fn decode(r: &mut Reader<'_>) -> Result<Self>;
}

impl Codec for () {
    const FIXED: Option<usize> = Some(0);
    fn encoded_len(&self) -> usize {
        0
    }
    fn encode(&self, _: &mut Writer) {}
    fn decode(_: &mut Reader<'_>) -> Result<()> {
        Ok(())
    }
}

impl Codec for u64 {
    const FIXED: Option<usize> = Some(8);
    fn encoded_len(&self) -> usize {
        8
    }
    fn encode(&self, w: &mut Writer) {
        w.u64(*self);
    }
    #[inline]
    fn decode(r: &mut Reader<'_>) -> Result<u64> {
        r.u64()
    }
}

impl Codec for u128 {
    const FIXED: Option<usize> = Some(16);
    fn encoded_len(&self) -> usize {
        16
    }
    fn encode(&self, w: &mut Writer) {
        w.u128(*self);
    }
    fn decode(r: &mut Reader<'_>) -> Result<u128> {
        r.u128()
    }
}

/// Strings of at most 65,535 bytes, with a 2-byte length.
impl Codec for String {
    fn encoded_len(&self) -> usize {
        2 + self.len()
    }
    fn encode(&self, w: &mut Writer) {
        // Callers bound their strings far below this (names are at most 200 bytes).
        let n = self.len().min(u16::MAX as usize);
        w.u16(n as u16);
        w.0.extend_from_slice(&self.as_bytes()[..n]);
    }
    fn decode(r: &mut Reader<'_>) -> Result<String> {
        let n = r.u16()? as usize;
        let bytes = r.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| r.corrupt("a string is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_round_trip_and_truncation_is_corruption() {
        let mut w = Writer(Vec::new());
        7u64.encode(&mut w);
        (u128::MAX - 3).encode(&mut w);
        "pvc-é".to_string().encode(&mut w);
        let bytes = w.0;
        assert_eq!(bytes.len(), 8 + 16 + 2 + "pvc-é".len());
        let mut r = Reader::new(&bytes, "test page", 9);
        assert_eq!(u64::decode(&mut r).unwrap(), 7);
        assert_eq!(u128::decode(&mut r).unwrap(), u128::MAX - 3);
        assert_eq!(String::decode(&mut r).unwrap(), "pvc-é");
        for cut in 0..bytes.len() {
            let mut r = Reader::new(&bytes[..cut], "test page", 9);
            let all = u64::decode(&mut r)
                .and_then(|_| u128::decode(&mut r))
                .and_then(|_| String::decode(&mut r));
            assert!(
                matches!(all, Err(Error::Corrupt { .. })),
                "cut at {cut}: {all:?}"
            );
        }
        // A length prefix pointing at bytes that are not UTF-8.
        let bad = [2u8, 0, 0xff, 0xfe];
        let e = String::decode(&mut Reader::new(&bad, "test page", 1)).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
    }
}
