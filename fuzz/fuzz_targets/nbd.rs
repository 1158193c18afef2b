//! Hostile NBD clients: raw bytes for the handshake, or a valid handshake (with or without
//! structured replies and `base:allocation`) choosing the volume or its snapshot, followed by
//! raw bytes as requests. Whatever a client sends, the server
//! answers or hangs up without panicking, and the pool stays consistent (`check()` clean);
//! a client on the read-only snapshot export changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapvol::device::MemoryDevice;
use snapvol::{Pool, PoolOptions};
use std::io::{Read, Write};
use std::sync::Arc;

/// The client's bytes in, the server's replies counted and dropped.
struct Wire<'a>(&'a [u8]);

impl Read for Wire<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Wire<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn option(m: &mut Vec<u8>, option: u32, data: &[u8]) {
    m.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
}

/// Client flags, optionally structured replies and `base:allocation`, then NBD_OPT_GO for
/// `name` with no information requests.
fn handshake(name: &str, structured: bool) -> Vec<u8> {
    let mut m = 3u32.to_be_bytes().to_vec();
    if structured {
        option(&mut m, 8, &[]);
        let q = "base:allocation";
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
        option(&mut m, 10, &d);
    }
    m.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    m.extend_from_slice(&7u32.to_be_bytes());
    m.extend_from_slice(&(name.len() as u32 + 6).to_be_bytes());
    m.extend_from_slice(&(name.len() as u32).to_be_bytes());
    m.extend_from_slice(name.as_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    m
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let opts = PoolOptions::default().block_size(4096).commit_interval(None);
    let pool = Pool::create(Arc::new(MemoryDevice::new(16 << 20)), opts).unwrap();
    let v = pool.create_volume("vm", 256 << 10).unwrap();
    v.write_at(&[7u8; 20_000], 5_000).unwrap();
    pool.snapshot("vm", "s").unwrap();
    let mut before = vec![0u8; 256 << 10];
    pool.snapshot_handle("vm", "s").unwrap().read_at(&mut before, 0).unwrap();
    let input = match mode % 5 {
        0 => rest.to_vec(),
        1 => [handshake("vm", false), rest.to_vec()].concat(),
        2 => [handshake("vm@s", false), rest.to_vec()].concat(),
        3 => [handshake("vm", true), rest.to_vec()].concat(),
        _ => [handshake("vm@s", true), rest.to_vec()].concat(),
    };
    let _ = snapvol::nbd::serve_connection(&pool, Wire(&input));
    assert!(pool.check().unwrap().is_clean());
    let mut after = vec![0u8; 256 << 10];
    pool.snapshot_handle("vm", "s").unwrap().read_at(&mut after, 0).unwrap();
    assert!(before == after, "the snapshot changed");
});
