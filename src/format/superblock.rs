//! The superblock: the single commit point. Two copies alternate (slot = generation % 2);
//! opening picks the valid one with the highest generation.

use super::*;

/// The longest heartbeat interval a pool may record (a minute): an open waits three of them.
pub(crate) const MAX_HEARTBEAT_MS: u32 = 60_000;
/// The shortest (a heartbeat is a commit: two device flushes).
pub(crate) const MIN_HEARTBEAT_MS: u32 = 100;

/// Everything needed to find the rest of the pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Superblock {
    pub generation: u64,
    pub block_size: u32,
    pub pool_id: u128,
    pub total_units: u64,
    pub used_units: u64,
    /// Root page of the space map index and its height (1 = root indexes leaves directly).
    pub space_root: u64,
    pub space_height: u32,
    /// Root page of the catalog tree (0 = empty catalog).
    pub catalog_root: u64,
    /// The catalog's write buffer page (0 = none): changes not yet in the tree.
    pub catalog_buffer: u64,
    /// Visible volumes and snapshots in the catalog (so pool figures need no scan).
    pub volumes: u64,
    pub snapshots: u64,
    pub created_unix: u64,
    /// The pool file's space is reserved on the host (`pool create --preallocate`): freed
    /// units are not punched out of it, and growing reserves the new space too.
    pub preallocated: bool,
    /// Every block map value carries its block's CRC32 and reads verify it (format
    /// version 3; chosen at creation, never changed).
    pub data_checksums: bool,
    /// Milliseconds between the writer's heartbeat commits (0 = no heartbeat): a read-write
    /// open waits for several of them and refuses the pool if one arrives (another writer,
    /// on another host sharing the disk, holds it). Chosen at creation.
    pub heartbeat_ms: u32,
}

impl Superblock {
    pub(crate) fn slot(generation: u64) -> u64 {
        generation % 2
    }

    pub(crate) fn encode(&self) -> Box<Page> {
        let mut p = new_page();
        let version = if self.data_checksums {
            FORMAT_VERSION
        } else {
            FORMAT_VERSION_PLAIN
        };
        put_u32(&mut p[..], 32, version);
        put_u32(&mut p[..], 36, PAGE_SIZE as u32);
        put_u32(&mut p[..], 40, self.block_size);
        p[48..64].copy_from_slice(&self.pool_id.to_le_bytes());
        put_u64(&mut p[..], 64, self.total_units);
        put_u64(&mut p[..], 72, self.used_units);
        put_u64(&mut p[..], 80, self.space_root);
        put_u32(&mut p[..], 88, self.space_height);
        put_u64(&mut p[..], 96, self.catalog_root);
        put_u64(&mut p[..], 104, self.volumes);
        put_u64(&mut p[..], 112, self.created_unix);
        put_u64(&mut p[..], 120, self.snapshots);
        put_u64(&mut p[..], 128, self.catalog_buffer);
        // Who wrote it: for the message a second writer gets (see `Superblock::writer`).
        let (pid, host) = this_writer();
        put_u32(&mut p[..], 136, pid);
        let host = &host.as_bytes()[..host.len().min(WRITER_HOST_LEN)];
        p[140] = host.len() as u8;
        p[141..141 + host.len()].copy_from_slice(host);
        p[205] = u8::from(self.preallocated);
        put_u32(&mut p[..], 206, self.heartbeat_ms);
        let slot = Self::slot(self.generation);
        seal(&mut p, PageKind::Superblock, slot, self.generation);
        p
    }

    /// The process id and host name of the process that wrote superblock page `p` (zero and
    /// empty for pages written before they were recorded). Informational only: nothing
    /// depends on them but messages.
    pub(crate) fn writer(p: &Page) -> (u32, String) {
        let len = usize::from(p[140]).min(WRITER_HOST_LEN);
        let host = String::from_utf8_lossy(&p[141..141 + len]).into_owned();
        (get_u32(&p[..], 136), host)
    }

    /// Decodes the superblock in `slot`, validating everything it can without other pages.
    pub(crate) fn decode(p: &Page, slot: u64, device_len: u64) -> Result<Superblock> {
        let (_, generation) = verify(p, &[PageKind::Superblock], slot)?;
        let version = get_u32(&p[..], 32);
        // There is no migration: a pool of any other version is refused, naming both.
        if version != FORMAT_VERSION && version != FORMAT_VERSION_PLAIN {
            return Err(Error::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let bad = |detail: String| Error::corrupt("superblock", slot, detail);
        if get_u32(&p[..], 36) as usize != PAGE_SIZE {
            return Err(bad(format!("page size {}", get_u32(&p[..], 36))));
        }
        let block_size = get_u32(&p[..], 40);
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(bad(format!("block size {block_size}")));
        }
        let sb = Superblock {
            generation,
            block_size,
            pool_id: u128::from_le_bytes(p[48..64].try_into().unwrap()),
            total_units: get_u64(&p[..], 64),
            used_units: get_u64(&p[..], 72),
            space_root: get_u64(&p[..], 80),
            space_height: get_u32(&p[..], 88),
            catalog_root: get_u64(&p[..], 96),
            volumes: get_u64(&p[..], 104),
            snapshots: get_u64(&p[..], 120),
            catalog_buffer: get_u64(&p[..], 128),
            created_unix: get_u64(&p[..], 112),
            preallocated: p[205] & 1 != 0,
            data_checksums: version == FORMAT_VERSION,
            heartbeat_ms: get_u32(&p[..], 206),
        };
        if sb.heartbeat_ms > MAX_HEARTBEAT_MS {
            return Err(bad(format!("heartbeat interval {} ms", sb.heartbeat_ms)));
        }
        if sb.generation >> crate::map::VALUE_BITS != 0 {
            // Map values keep 48 bits of a birth generation.
            return Err(bad(format!("generation {} is past 2^48", sb.generation)));
        }
        let units_on_device = device_len / PAGE_SIZE as u64;
        if sb.total_units > units_on_device && sb.total_units <= super::MAX_UNITS {
            // A pool file cut short (a copy that stopped early, a truncate): say how much is
            // missing and how to get it back, since the data usually lies well below the end.
            let pool_bytes = sb.total_units * PAGE_SIZE as u64;
            return Err(bad(format!(
                "the pool is {pool_bytes} bytes but the device holds {device_len}: \
                 {} bytes are missing from its end (a truncated file is restored by extending \
                 it to {pool_bytes} bytes, e.g. truncate -s {pool_bytes}; a read-only open \
                 reads it as it is while nothing past its end is in use)",
                pool_bytes - device_len
            )));
        }
        if sb.total_units > units_on_device
            || sb.total_units <= SUPERBLOCK_UNITS
            || sb.total_units > super::MAX_UNITS
        {
            return Err(bad(format!(
                "pool claims {} units, device has {units_on_device}",
                sb.total_units
            )));
        }
        if sb.used_units > sb.total_units {
            return Err(bad(format!(
                "{} units used of {}",
                sb.used_units, sb.total_units
            )));
        }
        let in_pool = |u: u64| u >= SUPERBLOCK_UNITS && u < sb.total_units;
        if !in_pool(sb.space_root) || sb.space_height == 0 || sb.space_height > 8 {
            return Err(bad("space map root out of range".into()));
        }
        if sb.catalog_root != 0 && !in_pool(sb.catalog_root) {
            return Err(bad("catalog root out of range".into()));
        }
        if sb.catalog_buffer != 0 && !in_pool(sb.catalog_buffer) {
            return Err(bad("catalog write buffer out of range".into()));
        }
        Ok(sb)
    }
}

/// Bytes of the host name a superblock keeps.
const WRITER_HOST_LEN: usize = 64;

/// This process's id and the host's name (read once).
fn this_writer() -> (u32, &'static str) {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let host = HOST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default()
    });
    (std::process::id(), host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let sb = Superblock {
            generation: 7,
            block_size: 65536,
            pool_id: 0x1234_5678_9abc_def0_1122_3344_5566_7788,
            total_units: 1000,
            used_units: 10,
            space_root: 5,
            space_height: 1,
            catalog_root: 6,
            catalog_buffer: 8,
            volumes: 3,
            snapshots: 9,
            created_unix: 1_700_000_000,
            preallocated: true,
            data_checksums: false,
            heartbeat_ms: 1500,
        };
        let p = sb.encode();
        assert_eq!(Superblock::decode(&p, 1, 1000 * 4096).unwrap(), sb);
        assert!(
            Superblock::decode(&p, 0, 1000 * 4096).is_err(),
            "slot is checked"
        );
        assert!(
            Superblock::decode(&p, 1, 999 * 4096).is_err(),
            "device too small"
        );
        let summed = Superblock {
            data_checksums: true,
            ..sb.clone()
        };
        let p = summed.encode();
        assert_eq!(
            get_u32(&p[..], 32),
            FORMAT_VERSION,
            "checksums are version 3"
        );
        assert_eq!(Superblock::decode(&p, 1, 1000 * 4096).unwrap(), summed);
        assert_eq!(get_u32(&sb.encode()[..], 32), FORMAT_VERSION_PLAIN);
    }
}
