//! Recognizes what a device already holds before it is formatted, so that `pool create` on a
//! block device never silently destroys a pool, a filesystem or a partition table.
//!
//! Only well-known, fixed-position signatures are checked (as blkid's superblock probes do for
//! the common formats); a device none of them matches may still hold data, which is why
//! formatting a block device also asks the caller to confirm (`--force`) when it is refused.

use super::BlockDevice;
use crate::error::Result;

/// A signature: what it means, the byte offset it lives at and the bytes it must equal.
struct Signature {
    what: &'static str,
    at: u64,
    magic: &'static [u8],
}

/// Fixed-position magic numbers of the formats a block device is most likely to hold. The
/// offsets and bytes are the formats' own (interface facts).
const SIGNATURES: &[Signature] = &[
    Signature {
        what: "a snapvol pool",
        at: 0,
        magic: b"SVSB",
    },
    Signature {
        what: "a snapvol pool",
        at: 4096,
        magic: b"SVSB",
    },
    Signature {
        what: "a GPT partition table",
        at: 512,
        magic: b"EFI PART",
    },
    Signature {
        what: "an LVM physical volume",
        at: 512 + 24,
        magic: b"LVM2 001",
    },
    Signature {
        what: "a LUKS encrypted volume",
        at: 0,
        magic: b"LUKS\xba\xbe",
    },
    Signature {
        what: "an XFS filesystem",
        at: 0,
        magic: b"XFSB",
    },
    Signature {
        what: "an ext2/3/4 filesystem",
        at: 1024 + 56,
        magic: &[0x53, 0xef],
    },
    Signature {
        what: "a btrfs filesystem",
        at: 65536 + 64,
        magic: b"_BHRfS_M",
    },
    Signature {
        what: "swap space",
        at: 4096 - 10,
        magic: b"SWAPSPACE2",
    },
    Signature {
        what: "an ISO 9660 filesystem",
        at: 32768 + 1,
        magic: b"CD001",
    },
    Signature {
        what: "a squashfs filesystem",
        at: 0,
        magic: b"hsqs",
    },
    Signature {
        what: "a qcow2 image",
        at: 0,
        magic: b"QFI\xfb",
    },
    // Last: the boot-sector mark is shared by MBR partition tables and FAT filesystems.
    Signature {
        what: "an MBR partition table or FAT filesystem",
        at: 510,
        magic: &[0x55, 0xaa],
    },
];

/// Bytes read from the start of the device: enough for every signature above.
const PROBE_BYTES: u64 = 128 << 10;

/// What the start of `dev` holds, by the first known signature found: `Some("an XFS
/// filesystem")`, or `None` when no known signature matches. Reads the first 128 KiB.
pub fn existing_format(dev: &dyn BlockDevice) -> Result<Option<&'static str>> {
    let len = dev.len().min(PROBE_BYTES) as usize;
    let mut head = vec![0u8; len];
    dev.read_at(&mut head, 0)?;
    Ok(SIGNATURES
        .iter()
        .find(|s| {
            let start = s.at as usize;
            head.get(start..start + s.magic.len()) == Some(s.magic)
        })
        .map(|s| s.what))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemoryDevice;

    #[test]
    fn finds_each_signature_and_nothing_on_zeros() {
        let dev = MemoryDevice::new(1 << 20);
        assert_eq!(existing_format(&dev).unwrap(), None);
        for s in SIGNATURES {
            let dev = MemoryDevice::new(1 << 20);
            dev.write_at(s.magic, s.at).unwrap();
            assert_eq!(existing_format(&dev).unwrap(), Some(s.what), "{}", s.what);
        }
    }

    #[test]
    fn a_device_smaller_than_the_probe_is_read_to_its_end() {
        let dev = MemoryDevice::new(2048);
        dev.write_at(&[0x55, 0xaa], 510).unwrap();
        assert!(existing_format(&dev).unwrap().is_some());
    }
}
