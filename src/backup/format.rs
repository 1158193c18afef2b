//! The repository's objects, byte for byte (docs/backup-format.md): the config, chunk
//! objects and manifests. Everything read from a target is untrusted: each decoder checks
//! every field, and a manifest is read in bounded pieces whatever it claims to hold.

use super::target::Target;
use crate::error::{Error, Result};

/// Highest repository format version this build reads, and the one it writes.
pub const REPO_VERSION: u32 = 1;
/// Default chunk size: 4 MiB (Proxmox Backup Server's and EBS's granularity is similar).
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;
/// Smallest and largest chunk size a repository may be created with.
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// See [`MIN_CHUNK_SIZE`].
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;

pub(crate) const CONFIG_KEY: &str = "config";
const CONFIG_MAGIC: &str = "snapvol backup repository";

const CHUNK_MAGIC: &[u8; 4] = b"SVCK";
pub(crate) const CHUNK_HEADER: usize = 12;
const MANIFEST_MAGIC: &[u8; 4] = b"SVBM";
/// Bytes of one manifest entry: chunk index (8) and content hash (32).
pub(crate) const ENTRY_LEN: usize = 40;
/// Bytes of a manifest's fixed header before the two names.
const FIXED_HEADER: usize = 4 + 4 + 4 + 4 + 8 + 16 * 4 + 8 + 8 + 8;
/// Most bytes a manifest header can take (two names of at most 200 bytes).
pub(crate) const MAX_HEADER: usize = FIXED_HEADER + 2 + 2 + 2 * crate::catalog::MAX_NAME + 4;
/// Bytes of a manifest read per request: bounds a restore's memory whatever the manifest
/// claims (a manifest of a full 64 TiB volume is 640 MiB).
const MANIFEST_PIECE: u64 = 4 << 20;

/// A chunk's name: the BLAKE3 hash of its content (see BENCHMARKS.md for why BLAKE3).
pub type Hash = [u8; 32];

/// How a chunk's content is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// As it is.
    None,
    /// LZ4 block format (a chunk that does not shrink is stored as it is).
    Lz4,
}

impl Compression {
    fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
        }
    }
}

/// The repository's config object: fixed when the repository is created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoConfig {
    /// The repository's own id.
    pub id: u128,
    /// The repository format version (see docs/backup-format.md).
    pub version: u32,
    /// Bytes of volume per chunk.
    pub chunk_size: u32,
    /// How new chunks are stored (each chunk records its own transform).
    pub compression: Compression,
}

impl RepoConfig {
    pub(crate) fn encode(&self) -> Vec<u8> {
        format!(
            "{CONFIG_MAGIC}\nversion {}\nid {:032x}\nchunk_size {}\nhash blake3\ncompression {}\n",
            self.version,
            self.id,
            self.chunk_size,
            self.compression.name()
        )
        .into_bytes()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<RepoConfig> {
        let bad = |detail: String| Error::BackupCorrupt {
            backup: "repository".into(),
            object: CONFIG_KEY.into(),
            detail,
        };
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))?;
        let mut lines = text.lines();
        if lines.next() != Some(CONFIG_MAGIC) {
            return Err(bad("not a snapvol backup repository config".into()));
        }
        let (mut version, mut id, mut chunk, mut hash, mut comp) = (None, None, None, None, None);
        for line in lines {
            let (k, v) = line
                .split_once(' ')
                .ok_or_else(|| bad(format!("bad line {line:?}")))?;
            match k {
                "version" => version = v.parse::<u32>().ok(),
                "id" => id = u128::from_str_radix(v, 16).ok(),
                "chunk_size" => chunk = v.parse::<u32>().ok(),
                "hash" => hash = Some(v.to_string()),
                "compression" => comp = Some(v.to_string()),
                // Unknown keys are for newer builds of the same version: ignored.
                _ => {}
            }
        }
        let version = version.ok_or_else(|| bad("no version".into()))?;
        if version > REPO_VERSION {
            return Err(Error::UnsupportedBackupVersion {
                what: "repository".into(),
                found: version,
                supported: REPO_VERSION,
            });
        }
        let chunk_size = chunk.ok_or_else(|| bad("no chunk_size".into()))?;
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(bad(format!("chunk size {chunk_size} out of range")));
        }
        if hash.as_deref() != Some("blake3") {
            return Err(bad(format!("unknown hash {hash:?}")));
        }
        let compression = match comp.as_deref() {
            Some("none") | None => Compression::None,
            Some("lz4") => Compression::Lz4,
            Some(other) => return Err(bad(format!("unknown compression {other:?}"))),
        };
        Ok(RepoConfig {
            id: id.ok_or_else(|| bad("no id".into()))?,
            version,
            chunk_size,
            compression,
        })
    }
}

pub(crate) fn hex(h: &Hash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key of the chunk with content hash `h`: 256 directories by its first byte.
pub(crate) fn chunk_key(h: &Hash) -> String {
    let x = hex(h);
    format!("chunks/{}/{x}", &x[..2])
}

/// Parses a chunk key back into its hash (for garbage collection).
pub(crate) fn parse_chunk_key(key: &str) -> Option<Hash> {
    let name = key.rsplit('/').next()?;
    if name.len() != 64 {
        return None;
    }
    let mut h = [0u8; 32];
    for (i, b) in h.iter_mut().enumerate() {
        *b = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(h)
}

pub(crate) fn manifest_key(id: u128) -> String {
    format!("manifests/{id:032x}")
}

/// A chunk object's header: magic, version, transform, reserved, content length.
pub(crate) fn chunk_header(transform: u8, content_len: usize) -> [u8; CHUNK_HEADER] {
    let mut h = [0u8; CHUNK_HEADER];
    h[..4].copy_from_slice(CHUNK_MAGIC);
    h[4] = 1;
    h[5] = transform;
    h[8..].copy_from_slice(&(content_len as u32).to_le_bytes());
    h
}

/// Makes `buf` a whole chunk object. `buf` holds the content after `CHUNK_HEADER` bytes of
/// room, so stored as it is, nothing is copied; compressed, `spare` receives the object and
/// `true` is returned, `buf` keeping the content (both buffers are the caller's, reused from
/// chunk to chunk). Returns whether the object is in `spare`.
pub(crate) fn seal_chunk(buf: &mut [u8], spare: &mut Vec<u8>, compression: Compression) -> bool {
    let len = buf.len() - CHUNK_HEADER;
    if compression == Compression::Lz4 {
        let bound = lz4_flex::block::get_maximum_output_size(len);
        spare.clear();
        spare.resize(CHUNK_HEADER + bound, 0);
        if let Ok(n) =
            lz4_flex::block::compress_into(&buf[CHUNK_HEADER..], &mut spare[CHUNK_HEADER..])
        {
            if n < len {
                spare.truncate(CHUNK_HEADER + n);
                spare[..CHUNK_HEADER].copy_from_slice(&chunk_header(1, len));
                return true;
            }
        }
    }
    buf[..CHUNK_HEADER].copy_from_slice(&chunk_header(0, len));
    false
}

/// A chunk object for `content` (see [`seal_chunk`]).
#[cfg(test)]
pub(crate) fn encode_chunk(content: &[u8], compression: Compression) -> Vec<u8> {
    let mut buf = vec![0u8; CHUNK_HEADER];
    buf.extend_from_slice(content);
    let mut spare = Vec::new();
    if seal_chunk(&mut buf, &mut spare, compression) {
        spare
    } else {
        buf
    }
}

/// Decodes a chunk object and checks it is what its name says: `expect` bytes whose BLAKE3
/// hash is `hash`. Errors name `backup` and the chunk.
pub(crate) fn decode_chunk(
    obj: &[u8],
    hash: &Hash,
    expect: usize,
    backup: &str,
) -> Result<Vec<u8>> {
    let bad = |detail: String| Error::BackupCorrupt {
        backup: backup.to_string(),
        object: chunk_key(hash),
        detail,
    };
    if obj.len() < CHUNK_HEADER || &obj[..4] != CHUNK_MAGIC {
        return Err(bad(format!("not a chunk object ({} bytes)", obj.len())));
    }
    if obj[4] != 1 {
        return Err(Error::UnsupportedBackupVersion {
            what: format!("chunk {}", chunk_key(hash)),
            found: u32::from(obj[4]),
            supported: 1,
        });
    }
    let len = u32::from_le_bytes([obj[8], obj[9], obj[10], obj[11]]) as usize;
    if len != expect {
        return Err(bad(format!(
            "holds {len} bytes where {expect} are expected"
        )));
    }
    let body = &obj[CHUNK_HEADER..];
    let content = match obj[5] {
        0 => {
            if body.len() != len {
                return Err(bad(format!("truncated: {} of {len} bytes", body.len())));
            }
            body.to_vec()
        }
        1 => {
            // `expect` is at most the chunk size, so a hostile length cannot make this big.
            let mut out = vec![0u8; len];
            match lz4_flex::block::decompress_into(body, &mut out) {
                Ok(n) if n == len => out,
                Ok(n) => return Err(bad(format!("decompresses to {n} of {len} bytes"))),
                Err(e) => return Err(bad(format!("does not decompress: {e}"))),
            }
        }
        t => return Err(bad(format!("unknown transform {t}"))),
    };
    if blake3::hash(&content).as_bytes() != hash {
        return Err(bad("content does not match its hash".into()));
    }
    Ok(content)
}

/// What a manifest says about its backup (everything but the chunk list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestHeader {
    /// The snapshot's id: the backup's id and name in the repository.
    pub snapshot_id: u128,
    /// The backup this one was computed against (informational: every manifest lists every
    /// chunk it needs).
    pub base_id: Option<u128>,
    /// The pool it was pushed from.
    pub pool_id: u128,
    /// The snapshot's volume.
    pub volume_id: u128,
    /// That volume's name when it was pushed.
    pub volume: String,
    /// The snapshot's name.
    pub snapshot: String,
    /// The volume's size in bytes.
    pub size: u64,
    /// Bytes of volume per chunk (the repository's).
    pub chunk_size: u32,
    /// When the snapshot was taken (seconds since the Unix epoch).
    pub created_unix: u64,
    /// The snapshot's generation in its pool.
    pub generation: u64,
    /// Chunks that hold data (the others read as zeros and are not stored).
    pub entries: u64,
}

impl ManifestHeader {
    /// Chunks the volume spans.
    pub(crate) fn chunk_count(&self) -> u64 {
        self.size.div_ceil(u64::from(self.chunk_size))
    }

    /// Bytes of chunk `index`'s content (the last chunk may be short).
    pub(crate) fn chunk_len(&self, index: u64) -> usize {
        let c = u64::from(self.chunk_size);
        (self.size - index * c).min(c) as usize
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(MAX_HEADER);
        b.extend_from_slice(MANIFEST_MAGIC);
        b.extend_from_slice(&REPO_VERSION.to_le_bytes());
        let header_len = (FIXED_HEADER + 4 + self.volume.len() + self.snapshot.len() + 4) as u32;
        b.extend_from_slice(&header_len.to_le_bytes());
        b.extend_from_slice(&self.chunk_size.to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        for id in [
            self.snapshot_id,
            self.base_id.unwrap_or(0),
            self.pool_id,
            self.volume_id,
        ] {
            b.extend_from_slice(&id.to_le_bytes());
        }
        b.extend_from_slice(&self.created_unix.to_le_bytes());
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&self.entries.to_le_bytes());
        for s in [&self.volume, &self.snapshot] {
            b.extend_from_slice(&(s.len() as u16).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes the header at the start of `b`; returns it and its length.
    fn decode(b: &[u8], backup: &str, key: &str) -> Result<(ManifestHeader, usize)> {
        let bad = |detail: String| Error::BackupCorrupt {
            backup: backup.to_string(),
            object: key.to_string(),
            detail,
        };
        if b.len() < 12 || &b[..4] != MANIFEST_MAGIC {
            return Err(bad("not a manifest".into()));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let version = u32_at(4);
        if version > REPO_VERSION || version == 0 {
            return Err(Error::UnsupportedBackupVersion {
                what: format!("manifest {key}"),
                found: version,
                supported: REPO_VERSION,
            });
        }
        let header_len = u32_at(8) as usize;
        if !(FIXED_HEADER + 8..=MAX_HEADER).contains(&header_len) || b.len() < header_len {
            return Err(bad(format!(
                "header of {header_len} bytes is truncated or impossible"
            )));
        }
        let crc = u32_at(header_len - 4);
        if crc32fast::hash(&b[..header_len - 4]) != crc {
            return Err(bad("header checksum mismatch".into()));
        }
        let mut c = Cursor { b, at: 12 };
        let u32v = |s: &[u8]| u32::from_le_bytes(s.try_into().expect("4"));
        let u64v = |s: &[u8]| u64::from_le_bytes(s.try_into().expect("8"));
        let u128v = |s: &[u8]| u128::from_le_bytes(s.try_into().expect("16"));
        let chunk_size = u32v(c.take(4));
        let size = u64v(c.take(8));
        let snapshot_id = u128v(c.take(16));
        let base_id = Some(u128v(c.take(16))).filter(|&x| x != 0);
        let pool_id = u128v(c.take(16));
        let volume_id = u128v(c.take(16));
        let created_unix = u64v(c.take(8));
        let generation = u64v(c.take(8));
        let entries = u64v(c.take(8));
        let names_end = header_len - 4;
        let mut names = Vec::new();
        for _ in 0..2 {
            if c.at + 2 > names_end {
                return Err(bad("names run past the header".into()));
            }
            let n = u16::from_le_bytes(c.take(2).try_into().expect("2")) as usize;
            if c.at + n > names_end {
                return Err(bad("names run past the header".into()));
            }
            let s = String::from_utf8(c.take(n).to_vec())
                .map_err(|_| bad("a name is not UTF-8".into()))?;
            crate::catalog::validate_name(&s).map_err(|e| bad(e.to_string()))?;
            names.push(s);
        }
        if c.at != names_end {
            return Err(bad("header length disagrees with its fields".into()));
        }
        let h = ManifestHeader {
            snapshot_id,
            base_id,
            pool_id,
            volume_id,
            snapshot: names.pop().expect("two names"),
            volume: names.pop().expect("two names"),
            size,
            chunk_size,
            created_unix,
            generation,
            entries,
        };
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(bad(format!("chunk size {chunk_size} out of range")));
        }
        if size > crate::format::MAX_VOLUME_BYTES {
            return Err(bad(format!(
                "volume size {size} is beyond the largest volume"
            )));
        }
        if entries > h.chunk_count() {
            return Err(bad(format!(
                "{entries} chunks listed for a volume of {} chunks",
                h.chunk_count()
            )));
        }
        Ok((h, header_len))
    }
}

/// Reads fields in order; the caller has checked that they lie inside the buffer.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        s
    }
}

/// Builds a manifest: the header, then entries in increasing chunk order, then the BLAKE3
/// hash of everything before it.
pub(crate) struct ManifestWriter {
    header: ManifestHeader,
    entries: Vec<u8>,
    last: Option<u64>,
}

impl ManifestWriter {
    pub(crate) fn new(header: ManifestHeader) -> ManifestWriter {
        ManifestWriter {
            header,
            entries: Vec::new(),
            last: None,
        }
    }

    /// Adds chunk `index` (strictly after the previous one) with content hash `hash`.
    pub(crate) fn push(&mut self, index: u64, hash: &Hash) {
        debug_assert!(self.last.is_none_or(|l| l < index));
        self.last = Some(index);
        self.entries.extend_from_slice(&index.to_le_bytes());
        self.entries.extend_from_slice(hash);
    }

    pub(crate) fn entries(&self) -> u64 {
        (self.entries.len() / ENTRY_LEN) as u64
    }

    pub(crate) fn finish(mut self) -> (ManifestHeader, Vec<u8>) {
        self.header.entries = self.entries();
        let mut out = self.header.encode();
        out.extend_from_slice(&self.entries);
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        (self.header, out)
    }
}

/// Reads a manifest from a target in bounded pieces: the header first, then entries one at
/// a time; the whole-manifest hash is checked when the last entry has been read, so a caller
/// must not make anything it derived visible before `next_entry` has returned `Ok(None)`.
pub(crate) struct ManifestReader<'a> {
    target: &'a dyn Target,
    key: String,
    backup: String,
    pub(crate) header: ManifestHeader,
    /// Object bytes fetched so far and not yet consumed.
    buf: Vec<u8>,
    buf_at: usize,
    /// Next object offset to fetch.
    fetch_at: u64,
    total: u64,
    hasher: blake3::Hasher,
    read_entries: u64,
    last_index: Option<u64>,
    verified: bool,
}

impl<'a> ManifestReader<'a> {
    /// Opens manifest `id`; `Error::BackupNotFound` if it is not in the repository.
    pub(crate) fn open(target: &'a dyn Target, id: u128) -> Result<ManifestReader<'a>> {
        let key = manifest_key(id);
        let backup = format!("{id:032x}");
        let meta = target
            .head(&key)?
            .ok_or_else(|| Error::BackupNotFound(backup.clone()))?;
        let first = target
            .get(&key, Some(0..(MAX_HEADER as u64).min(meta.size)))?
            .ok_or_else(|| Error::BackupNotFound(backup.clone()))?;
        let (header, header_len) = ManifestHeader::decode(&first, &backup, &key)?;
        let bad = |detail: String| Error::BackupCorrupt {
            backup: backup.clone(),
            object: key.clone(),
            detail,
        };
        if header.snapshot_id != id {
            return Err(bad(format!(
                "holds the manifest of backup {:032x}: swapped",
                header.snapshot_id
            )));
        }
        let expect = (header_len as u64)
            .checked_add(header.entries.saturating_mul(ENTRY_LEN as u64))
            .and_then(|x| x.checked_add(32))
            .ok_or_else(|| bad("impossible length".into()))?;
        if meta.size != expect {
            return Err(bad(format!(
                "{} bytes where its header implies {expect}: truncated or padded",
                meta.size
            )));
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(&first[..header_len]);
        Ok(ManifestReader {
            target,
            key,
            backup,
            header,
            buf: first[header_len..].to_vec(),
            buf_at: 0,
            fetch_at: first.len() as u64,
            total: meta.size,
            hasher,
            read_entries: 0,
            last_index: None,
            verified: false,
        })
    }

    fn bad(&self, detail: String) -> Error {
        Error::BackupCorrupt {
            backup: self.backup.clone(),
            object: self.key.clone(),
            detail,
        }
    }

    /// Makes at least `n` unconsumed bytes available (or fails: the object changed or ended).
    fn fill(&mut self, n: usize) -> Result<()> {
        while self.buf.len() - self.buf_at < n {
            if self.fetch_at >= self.total {
                return Err(self.bad("ends early".into()));
            }
            let end = (self.fetch_at + MANIFEST_PIECE).min(self.total);
            let piece = self
                .target
                .get(&self.key, Some(self.fetch_at..end))?
                .ok_or_else(|| self.bad("disappeared while being read".into()))?;
            if piece.is_empty() {
                return Err(self.bad("ends early".into()));
            }
            self.buf.drain(..self.buf_at);
            self.buf_at = 0;
            self.fetch_at += piece.len() as u64;
            self.buf.extend_from_slice(&piece);
        }
        Ok(())
    }

    /// The next (chunk index, hash), or `None` after the last one, once the manifest's hash
    /// has been verified.
    pub(crate) fn next_entry(&mut self) -> Result<Option<(u64, Hash)>> {
        if self.read_entries == self.header.entries {
            if !self.verified {
                self.fill(32)?;
                let sum = &self.buf[self.buf_at..self.buf_at + 32];
                if self.hasher.finalize().as_bytes() != sum {
                    return Err(self.bad("checksum mismatch".into()));
                }
                self.buf_at += 32;
                self.verified = true;
            }
            return Ok(None);
        }
        self.fill(ENTRY_LEN)?;
        let e = &self.buf[self.buf_at..self.buf_at + ENTRY_LEN];
        self.hasher.update(e);
        let index = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&e[8..]);
        self.buf_at += ENTRY_LEN;
        self.read_entries += 1;
        if index >= self.header.chunk_count() || self.last_index.is_some_and(|l| l >= index) {
            return Err(self.bad(format!("chunk index {index} out of order or range")));
        }
        self.last_index = Some(index);
        Ok(Some((index, hash)))
    }
}

/// Reads just a manifest's header (for listings).
pub(crate) fn read_header(target: &dyn Target, id: u128) -> Result<ManifestHeader> {
    Ok(ManifestReader::open(target, id)?.header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_and_newer_versions_are_refused() {
        let c = RepoConfig {
            id: 7,
            version: REPO_VERSION,
            chunk_size: DEFAULT_CHUNK_SIZE,
            compression: Compression::Lz4,
        };
        assert_eq!(RepoConfig::decode(&c.encode()).unwrap(), c);
        let newer = String::from_utf8(c.encode())
            .unwrap()
            .replace("version 1", "version 9");
        assert!(matches!(
            RepoConfig::decode(newer.as_bytes()),
            Err(Error::UnsupportedBackupVersion { found: 9, .. })
        ));
        assert!(matches!(
            RepoConfig::decode(b"junk"),
            Err(Error::BackupCorrupt { .. })
        ));
    }

    #[test]
    fn chunks_verify_their_content() {
        let data = vec![5u8; 70000];
        let h = *blake3::hash(&data).as_bytes();
        for c in [Compression::None, Compression::Lz4] {
            let obj = encode_chunk(&data, c);
            assert_eq!(decode_chunk(&obj, &h, data.len(), "b").unwrap(), data);
            let mut bad = obj.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(matches!(
                decode_chunk(&bad, &h, data.len(), "b"),
                Err(Error::BackupCorrupt { .. })
            ));
            assert!(matches!(
                decode_chunk(&obj[..obj.len() - 1], &h, data.len(), "b"),
                Err(Error::BackupCorrupt { .. })
            ));
        }
        assert!(encode_chunk(&data, Compression::Lz4).len() < 1000);
        assert_eq!(parse_chunk_key(&chunk_key(&h)), Some(h));
    }
}
