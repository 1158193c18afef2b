//! The NBD server against real clients (qemu-io, qemu-img, qemu-nbd) and against a raw
//! protocol client that sends what real clients never do: unknown exports, requests outside
//! the export, oversized and read-only writes, unknown commands, a broken header.

use snapvol::device::{CrashDevice, MemoryDevice};
use snapvol::nbd::ServerOptions;
use snapvol::{Pool, PoolOptions};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::Arc;

#[path = "support/served.rs"]
mod served;
use served::{missing, snapvol_cli, snapvol_raw, tool, Server};

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// A raw client on one end of a socket pair whose other end the server serves.
struct Client(UnixStream);

impl Client {
    fn connect(pool: &Pool) -> (Client, std::thread::JoinHandle<std::io::Result<()>>) {
        let (a, b) = UnixStream::pair().unwrap();
        let pool = pool.clone();
        let server = std::thread::spawn(move || snapvol::nbd::serve_connection(&pool, b));
        (Client::greet(a), server)
    }

    /// Checks the server's greeting and answers it: fixed newstyle, no zeroes.
    fn greet(stream: UnixStream) -> Client {
        let mut c = Client(stream);
        let mut greeting = [0u8; 18];
        c.0.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        assert_eq!(u64_at(&greeting, 8), IHAVEOPT);
        assert_eq!(u16::from_be_bytes([greeting[16], greeting[17]]) & 3, 3);
        c.0.write_all(&3u32.to_be_bytes()).unwrap();
        c
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.0.write_all(&m).unwrap();
    }

    /// One option reply: (type, data).
    fn option_reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(u64_at(&h, 0), REPLY_MAGIC);
        assert_eq!(u32_at(&h, 8), option);
        let mut data = vec![0u8; u32_at(&h, 16) as usize];
        self.0.read_exact(&mut data).unwrap();
        (u32_at(&h, 12), data)
    }

    /// NBD_OPT_LIST: the export names offered.
    fn list(&mut self) -> Vec<String> {
        self.option(3, &[]);
        let mut names = Vec::new();
        loop {
            match self.option_reply(3) {
                (2, d) => {
                    let n = u32_at(&d, 0) as usize;
                    names.push(String::from_utf8(d[4..4 + n].to_vec()).unwrap());
                }
                (1, _) => return names,
                other => panic!("{other:?}"),
            }
        }
    }

    /// NBD_OPT_GO; returns the export's size and flags, or the error reply type.
    fn go(&mut self, name: &str) -> Result<(u64, u16), u32> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(7, &d);
        let mut export = None;
        loop {
            match self.option_reply(7) {
                (3, info) if info[..2] == [0, 0] => {
                    export = Some((u64_at(&info, 2), u16::from_be_bytes([info[10], info[11]])))
                }
                (3, _) => {}
                (1, _) => return Ok(export.unwrap()),
                (err, _) => return Err(err),
            }
        }
    }

    fn request(&mut self, kind: u16, flags: u16, handle: u64, offset: u64, len: u32, data: &[u8]) {
        let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&handle.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(data);
        self.0.write_all(&m).unwrap();
    }

    /// A simple reply's error, after checking its handle; `data` bytes follow a success.
    fn reply(&mut self, handle: u64, data: &mut [u8]) -> u32 {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(u32_at(&h, 0), 0x6744_6698);
        assert_eq!(u64_at(&h, 8), handle);
        let err = u32_at(&h, 4);
        if err == 0 {
            self.0.read_exact(data).unwrap();
        }
        err
    }
}

fn memory_pool() -> Pool {
    let pool = Pool::create(
        Arc::new(MemoryDevice::new(64 << 20)),
        PoolOptions::default(),
    )
    .unwrap();
    let v = pool.create_volume("vm", 4 << 20).unwrap();
    v.write_at(&[7u8; 8192], 0).unwrap();
    pool.snapshot("vm", "s").unwrap();
    pool
}

#[test]
fn the_handshake_lists_refuses_and_chooses_exports() {
    let pool = memory_pool();
    let (mut c, server) = Client::connect(&pool);
    // LIST: the volume and its snapshot.
    c.option(3, &[]);
    let mut names = Vec::new();
    loop {
        match c.option_reply(3) {
            (2, d) => {
                // A name (with its length), then its description.
                let n = u32_at(&d, 0) as usize;
                let name = String::from_utf8(d[4..4 + n].to_vec()).unwrap();
                let desc = String::from_utf8(d[4 + n..].to_vec()).unwrap();
                names.push(format!("{name}: {desc}"));
            }
            (1, _) => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        names,
        ["vm: snapvol volume", "vm@s: snapvol snapshot (read-only)"]
    );
    // Unknown option, unknown export, malformed GO, oversized option: error replies, and
    // the handshake goes on.
    c.option(99, b"x");
    assert_eq!(c.option_reply(99).0, 0x8000_0001);
    assert_eq!(c.go("nope"), Err(0x8000_0006));
    c.option(7, &[0, 0, 0, 9, b'v']);
    assert_eq!(c.option_reply(7).0, 0x8000_0003);
    c.option(7, &vec![0u8; 5000]);
    assert_eq!(c.option_reply(7).0, 0x8000_0009);
    let (size, flags) = c.go("vm@s").unwrap();
    assert_eq!(size, 4 << 20);
    assert_ne!(flags & 2, 0, "a snapshot is exported read-only");
    c.request(2, 0, 1, 0, 0, &[]);
    server.join().unwrap().unwrap();
}

#[test]
fn bad_requests_get_errors_and_the_connection_goes_on() {
    let pool = memory_pool();
    let (mut c, server) = Client::connect(&pool);
    let (size, flags) = c.go("vm").unwrap();
    assert_eq!(flags & 2, 0, "a volume is exported read-write");
    let mut buf = vec![0u8; 4096];
    // Outside the export, past u64, longer than the server's maximum.
    c.request(0, 0, 1, size - 100, 4096, &[]);
    assert_eq!(c.reply(1, &mut buf), 22);
    c.request(0, 0, 2, u64::MAX - 10, 4096, &[]);
    assert_eq!(c.reply(2, &mut buf), 22);
    c.request(0, 0, 3, 0, (32 << 20) + 1, &[]);
    assert_eq!(c.reply(3, &mut buf), 22);
    // An oversized write's payload is consumed: the next request is still understood.
    c.request(1, 0, 4, 0, (32 << 20) + 1, &vec![1u8; (32 << 20) + 1]);
    assert_eq!(c.reply(4, &mut []), 22);
    c.request(1, 0, 5, size - 10, 4096, &[2u8; 4096]);
    assert_eq!(c.reply(5, &mut []), 22);
    c.request(6, 0, 6, size, 1, &[]);
    assert_eq!(c.reply(6, &mut []), 22, "write zeroes past the end");
    c.request(42, 0, 7, 0, 0, &[]);
    assert_eq!(c.reply(7, &mut []), 22, "unknown command");
    // Zero-length requests are valid and change nothing, even at the very end.
    for (i, kind) in [0u16, 1, 4, 6].into_iter().enumerate() {
        c.request(kind, 0, 20 + i as u64, size, 0, &[]);
        assert_eq!(
            c.reply(20 + i as u64, &mut []),
            0,
            "zero-length command {kind}"
        );
    }
    // Nothing above changed the volume; a good write with FUA is durable on reply.
    let mut got = vec![0u8; 8192];
    pool.volume("vm").unwrap().read_at(&mut got, 0).unwrap();
    assert_eq!(got, vec![7u8; 8192]);
    c.request(1, 1, 8, 4096, 4096, &[9u8; 4096]);
    assert_eq!(c.reply(8, &mut []), 0);
    c.request(0, 0, 9, 0, 8192, &[]);
    assert_eq!(c.reply(9, &mut got), 0);
    assert_eq!(&got[..4096], &[7u8; 4096]);
    assert_eq!(&got[4096..], &[9u8; 4096]);
    // TRIM and WRITE_ZEROES (punching, and NO_HOLE) read back as zeros.
    c.request(4, 0, 10, 0, 4096, &[]);
    assert_eq!(c.reply(10, &mut []), 0);
    c.request(6, 2, 11, 4096, 4096, &[]);
    assert_eq!(c.reply(11, &mut []), 0);
    c.request(0, 0, 12, 0, 8192, &[]);
    assert_eq!(c.reply(12, &mut got), 0);
    assert!(got.iter().all(|&b| b == 0));
    c.request(3, 0, 13, 0, 0, &[]);
    assert_eq!(c.reply(13, &mut []), 0);
    // A broken header ends the connection (the stream is out of step).
    c.0.write_all(&[0xde, 0xad, 0xbe, 0xef]).unwrap();
    c.0.write_all(&[0u8; 24]).unwrap();
    assert!(server.join().unwrap().is_err());
    assert!(pool.check().unwrap().is_clean());
}

#[test]
fn a_snapshot_export_refuses_every_change() {
    let pool = memory_pool();
    let (mut c, server) = Client::connect(&pool);
    c.go("vm@s").unwrap();
    c.request(1, 0, 1, 0, 4096, &[1u8; 4096]);
    assert_eq!(c.reply(1, &mut []), 1);
    c.request(4, 0, 2, 0, 4096, &[]);
    assert_eq!(c.reply(2, &mut []), 1);
    c.request(6, 0, 3, 0, 4096, &[]);
    assert_eq!(c.reply(3, &mut []), 1);
    let mut got = vec![0u8; 8192];
    c.request(0, 0, 4, 0, 8192, &[]);
    assert_eq!(c.reply(4, &mut got), 0);
    assert_eq!(got, vec![7u8; 8192]);
    drop(c);
    server.join().unwrap().unwrap();
}

#[test]
fn qemu_tools_write_read_copy_and_list_and_the_pool_keeps_it_after_a_kill() {
    if let Some(t) = missing(&["qemu-io", "qemu-img", "qemu-nbd"]) {
        eprintln!("SKIPPED qemu_tools_write_read_copy_and_list_and_the_pool_keeps_it_after_a_kill: {t} is not installed (apt-get install qemu-utils)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("pool.img");
    let snapvol = env!("CARGO_BIN_EXE_snapvol");
    tool(
        snapvol,
        &["pool", "create", img.to_str().unwrap(), "--size", "256M"],
    );
    tool(
        snapvol,
        &["create", img.to_str().unwrap(), "vm", "--size", "16M"],
    );
    tool(snapvol, &["snapshot", img.to_str().unwrap(), "vm@empty"]);
    let server = Server::start(&img, &dir.path().join("nbd.sock"));
    let vm = server.uri("vm");
    tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            &vm,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 5M 64k",
            "-c",
            "write -z 512k 64k",
            "-c",
            "discard 5M 4k",
            "-c",
            "flush",
            "-c",
            "write -f -P 0xef 8M 4k",
        ],
    );
    // What the writes above make, checked through NBD and after the server is killed.
    let mut want = vec![0u8; 16 << 20];
    want[..1 << 20].fill(0xab);
    want[512 << 10..576 << 10].fill(0);
    want[5 << 20..(5 << 20) + (64 << 10)].fill(0xcd);
    want[5 << 20..(5 << 20) + 4096].fill(0);
    want[8 << 20..(8 << 20) + 4096].fill(0xef);
    let info = tool("qemu-img", &["info", "-f", "raw", &vm]);
    assert!(info.contains("16 MiB"), "{info}");
    let copy = dir.path().join("copy.raw");
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &vm,
            copy.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&copy).unwrap() == want,
        "qemu-img convert copy differs"
    );
    // Block status (structured replies, base:allocation) as qemu-img map reads it: data
    // exactly where the writes left data, everything else a zero hole.
    let map: serde_json::Value = serde_json::from_str(&tool(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &vm],
    ))
    .unwrap();
    let mut data: Vec<(u64, u64)> = Vec::new();
    for e in map.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        assert_eq!(e["data"].as_bool().unwrap(), !e["zero"].as_bool().unwrap());
        if e["data"].as_bool().unwrap() {
            match data.last_mut() {
                Some(last) if last.1 == start => last.1 += len,
                _ => data.push((start, start + len)),
            }
        }
    }
    let (k, m) = (1u64 << 10, 1u64 << 20);
    // `write -z` without -u asks for NO_HOLE, so those zeros stay allocated data.
    assert_eq!(
        data,
        [
            (0, m),
            (5 * m + 4 * k, 5 * m + 64 * k),
            (8 * m, 8 * m + 4 * k)
        ]
    );
    // The snapshot export is listed, read-only, and unchanged.
    let list = tool(
        "qemu-nbd",
        &["--list", "-k", server.socket.to_str().unwrap()],
    );
    assert!(
        list.contains("export: 'vm'") && list.contains("export: 'vm@empty'"),
        "{list}"
    );
    let empty = server.uri("vm@empty");
    let refused = Command::new("qemu-io")
        .args(["-f", "raw", &empty, "-c", "write -P 1 0 4k"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stdout).into_owned()
        + &String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("Permission denied"),
        "{said}"
    );
    tool(
        "qemu-io",
        &["-f", "raw", "-r", &empty, "-c", "read -P 0 0 16M"],
    );
    server.kill();

    // What the client wrote and flushed is in the pool file after SIGKILL.
    let export = dir.path().join("export.raw");
    tool(
        snapvol,
        &[
            "export",
            img.to_str().unwrap(),
            "vm",
            export.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&export).unwrap() == want,
        "flushed writes lost by the kill"
    );
    // A new server takes over the socket file the killed one left behind.
    let again = Server::start(&img, &dir.path().join("nbd.sock"));
    let copy2 = dir.path().join("copy2.raw");
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &again.uri("vm"),
            copy2.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&copy2).unwrap() == want,
        "served after a restart"
    );
}

/// Durability as NBD promises it, read from the device's history: a write is not durable on
/// its reply, FLUSH makes every completed write durable, and FUA makes its own write durable
/// before the reply.
#[test]
fn flush_and_fua_make_writes_durable_before_the_reply() {
    let dev = Arc::new(CrashDevice::new(64 << 20));
    let opts = || PoolOptions::default().commit_interval(None);
    let pool = Pool::create(dev.clone(), opts()).unwrap();
    pool.create_volume("vm", 4 << 20).unwrap();
    let (mut c, server) = Client::connect(&pool);
    c.go("vm").unwrap();
    // The volume as a crash right now would leave it.
    let after_crash = |off: u64| {
        let history = dev.history();
        let mut at = history.start();
        at.advance_to(history.len());
        let p = Pool::open(
            Arc::new(CrashDevice::from_image(at.durable_image())),
            opts(),
        )
        .unwrap();
        let mut b = vec![0u8; 4096];
        p.volume("vm").unwrap().read_at(&mut b, off).unwrap();
        b
    };
    c.request(1, 0, 1, 0, 4096, &[1u8; 4096]);
    assert_eq!(c.reply(1, &mut []), 0);
    assert!(after_crash(0) == [0u8; 4096], "not durable before a flush");
    c.request(3, 0, 2, 0, 0, &[]);
    assert_eq!(c.reply(2, &mut []), 0);
    assert!(after_crash(0) == [1u8; 4096], "durable after FLUSH");
    c.request(1, 1, 3, 8192, 4096, &[2u8; 4096]);
    assert_eq!(c.reply(3, &mut []), 0);
    assert!(
        after_crash(8192) == [2u8; 4096],
        "durable after a FUA write"
    );
    c.request(6, 1, 4, 0, 4096, &[]);
    assert_eq!(c.reply(4, &mut []), 0);
    assert!(
        after_crash(0) == [0u8; 4096],
        "durable after FUA write zeroes"
    );
    c.request(2, 0, 5, 0, 0, &[]);
    server.join().unwrap().unwrap();
}

/// The socket path (buffered reading, as `serve_unix` runs it): 200 requests sent without
/// waiting (writes, some with FUA, reads, a flush, a refused one) each get exactly one reply
/// with their own handle and the right result, matched by handle, as a client must.
#[test]
fn pipelined_requests_on_a_socket_each_get_their_reply() {
    let pool = memory_pool();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let served = pool.clone();
    // Runs until the test process ends.
    std::thread::spawn(move || snapvol::nbd::serve_unix(&served, listener));
    let mut c = Client::greet(UnixStream::connect(&path).unwrap());
    c.go("vm").unwrap();
    let block = |i: u64| vec![(i % 251) as u8 + 1; 4096];
    let mut sent = Vec::new();
    for i in 0..100u64 {
        c.request(1, (i % 7 == 0) as u16, i, (i + 2) * 4096, 4096, &block(i));
        sent.push(i);
    }
    c.request(3, 0, 1000, 0, 0, &[]);
    c.request(0, 0, 1001, 4 << 20, 4096, &[]);
    let mut replies = std::collections::HashMap::new();
    for _ in 0..102 {
        let mut h = [0u8; 16];
        c.0.read_exact(&mut h).unwrap();
        assert_eq!(u32_at(&h, 0), 0x6744_6698);
        let handle = u64_at(&h, 8);
        assert!(
            replies.insert(handle, u32_at(&h, 4)).is_none(),
            "two replies to {handle}"
        );
    }
    assert!(sent.iter().all(|i| replies[i] == 0));
    assert_eq!(replies[&1000], 0);
    assert_eq!(replies[&1001], 22, "read past the end");
    // Every write landed: read them back, again without waiting between requests.
    for i in 0..100u64 {
        c.request(0, 0, 2000 + i, (i + 2) * 4096, 4096, &[]);
    }
    let mut seen = 0;
    for _ in 0..100 {
        let mut h = [0u8; 16];
        c.0.read_exact(&mut h).unwrap();
        assert_eq!(u32_at(&h, 4), 0);
        let i = u64_at(&h, 8) - 2000;
        let mut data = vec![0u8; 4096];
        c.0.read_exact(&mut data).unwrap();
        assert!(data == block(i), "block {i}");
        seen += 1;
    }
    assert_eq!(seen, 100);
    c.request(2, 0, 0, 0, 0, &[]);
    assert!(pool.check().unwrap().is_clean());
}

impl Client {
    fn simple_ok(&mut self, option: u32, data: &[u8]) -> (u32, Vec<u8>) {
        self.option(option, data);
        self.option_reply(option)
    }

    /// One structured chunk: (flags, type, payload), after checking the magic and handle.
    fn chunk(&mut self, handle: u64) -> (u16, u16, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(u32_at(&h, 0), 0x668e_33ef, "a structured chunk");
        assert_eq!(u64_at(&h, 8), handle);
        let mut p = vec![0u8; u32_at(&h, 16) as usize];
        self.0.read_exact(&mut p).unwrap();
        (
            u16::from_be_bytes([h[4], h[5]]),
            u16::from_be_bytes([h[6], h[7]]),
            p,
        )
    }
}

fn meta_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Structured replies and `base:allocation`: negotiation in the right order, reads answered
/// with one data chunk (or an error chunk), and block status from the block map, whole or
/// limited to one run.
#[test]
fn structured_replies_and_block_status() {
    let pool = memory_pool(); // "vm": 4 MiB, data in 0..8192
    pool.volume("vm")
        .unwrap()
        .write_at(&[5u8; 4096], 1 << 20)
        .unwrap();
    let (mut c, server) = Client::connect(&pool);
    // Selecting a context needs structured replies first.
    let (kind, _) = c.simple_ok(10, &meta_request("vm", &["base:allocation"]));
    assert_eq!(kind, 0x8000_0003);
    assert_eq!(c.simple_ok(8, &[]).0, 1);
    // Listing with no query names the one context; an unknown one is not selected.
    c.option(9, &meta_request("vm", &[]));
    assert_eq!(
        c.option_reply(9),
        (4, [&1u32.to_be_bytes()[..], b"base:allocation"].concat())
    );
    assert_eq!(c.option_reply(9).0, 1);
    c.option(10, &meta_request("vm", &["qemu:dirty-bitmap:x"]));
    assert_eq!(c.option_reply(10).0, 1, "nothing selected, then ACK");
    c.option(10, &meta_request("nope", &["base:allocation"]));
    assert_eq!(c.option_reply(10).0, 0x8000_0006);
    c.option(10, &meta_request("vm", &["base:allocation"]));
    assert_eq!(c.option_reply(10).0, 4);
    assert_eq!(c.option_reply(10).0, 1);
    c.go("vm").unwrap();

    // A read: one OFFSET_DATA chunk with the DONE flag; a bad one: one ERROR chunk.
    c.request(0, 0, 1, 4096, 8192, &[]);
    let (flags, kind, p) = c.chunk(1);
    assert_eq!((flags, kind), (1, 1));
    assert_eq!(u64_at(&p, 0), 4096);
    assert_eq!(&p[8..8 + 4096], &[7u8; 4096]);
    assert_eq!(&p[8 + 4096..], &[0u8; 4096]);
    c.request(0, 0, 2, 4 << 20, 1, &[]);
    let (flags, kind, p) = c.chunk(2);
    assert_eq!((flags, kind), (1, 0x8001));
    assert_eq!(u32_at(&p, 0), 22);
    // Other commands keep simple replies.
    c.request(3, 0, 3, 0, 0, &[]);
    assert_eq!(c.reply(3, &mut []), 0);

    // Block status of the whole volume: data, hole, data, hole.
    c.request(7, 0, 4, 0, 4 << 20, &[]);
    let (flags, kind, p) = c.chunk(4);
    assert_eq!((flags, kind), (1, 5));
    assert_eq!(u32_at(&p, 0), 1, "the base:allocation id");
    let runs: Vec<(u32, u32)> = p[4..]
        .chunks(8)
        .map(|d| (u32_at(d, 0), u32_at(d, 4)))
        .collect();
    assert_eq!(
        runs,
        [
            (8192, 0),
            ((1 << 20) - 8192, 3),
            (4096, 0),
            ((3 << 20) - 4096, 3)
        ]
    );
    // REQ_ONE: exactly one run, from the offset asked (mid-hole here).
    c.request(7, 8, 5, 65536, 1 << 20, &[]);
    let (_, _, p) = c.chunk(5);
    assert_eq!(p.len(), 12);
    assert_eq!((u32_at(&p, 4), u32_at(&p, 8)), ((1 << 20) - 65536, 3));
    // Past the end, or of length 0: an error chunk.
    c.request(7, 0, 6, 4 << 20, 1, &[]);
    assert_eq!(c.chunk(6).1, 0x8001);
    c.request(2, 0, 7, 0, 0, &[]);
    server.join().unwrap().unwrap();
}

/// Without structured replies, block status is refused with a simple EINVAL.
#[test]
fn block_status_needs_the_context() {
    let pool = memory_pool();
    let (mut c, server) = Client::connect(&pool);
    c.go("vm").unwrap();
    c.request(7, 0, 1, 0, 4096, &[]);
    assert_eq!(c.reply(1, &mut []), 22);
    c.request(2, 0, 2, 0, 0, &[]);
    server.join().unwrap().unwrap();
}

#[test]
fn nbdinfo_lists_the_exports_with_their_names_and_descriptions() {
    if let Some(t) = missing(&["nbdinfo"]) {
        eprintln!("SKIPPED nbdinfo_lists_the_exports_with_their_names_and_descriptions: {t} is not installed (apt-get install libnbd-bin)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("pool.img");
    let p = img.to_str().unwrap();
    let snapvol = env!("CARGO_BIN_EXE_snapvol");
    tool(snapvol, &["pool", "create", p, "--size", "64M"]);
    tool(snapvol, &["create", p, "vm", "--size", "16M"]);
    tool(snapvol, &["snapshot", p, "vm@base"]);
    let server = Server::start(&img, &dir.path().join("nbd.sock"));
    let list = tool("nbdinfo", &["--list", "--json", &server.uri("")]);
    let j: serde_json::Value = serde_json::from_str(&list).unwrap();
    let exports = j["exports"].as_array().unwrap();
    let names: Vec<&str> = exports
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vm", "vm@base"], "{list}");
    for e in exports {
        assert_eq!(e["export-size"], 16u64 << 20, "{list}");
        let desc = e["description"].as_str().unwrap_or_default();
        assert!(desc.contains("snapvol"), "{list}");
    }
    assert_eq!(exports[1]["is_read_only"], true, "{list}");
}

/// Whether the server closed `c`: a read sees the end of the stream (or a reset).
fn closed(c: &mut Client) -> bool {
    c.0.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 1];
    match c.0.read(&mut b) {
        Ok(0) => true,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        Ok(_) => false,
    }
}

/// A [`snapvol::nbd::Server`] closes one export's connections and refuses new ones to it
/// while others carry on, and stops: every connection closed, the pool committed, its
/// threads gone.
#[test]
fn a_server_closes_one_export_and_stops() {
    let dev = Arc::new(MemoryDevice::new(64 << 20));
    let pool = Pool::create(dev.clone(), PoolOptions::default().commit_interval(None)).unwrap();
    pool.create_volume("vm", 4 << 20).unwrap();
    pool.create_volume("other", 4 << 20).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let server =
        snapvol::nbd::Server::start_unix(&pool, listener, ServerOptions::default()).unwrap();
    let connect = || Client::greet(UnixStream::connect(&path).unwrap());
    let (mut a, mut b, mut o) = (connect(), connect(), connect());
    a.go("vm").unwrap();
    b.go("").unwrap_err(); // two volumes: no default export
    let mut b = connect();
    b.go("vm").unwrap();
    o.go("other").unwrap();
    a.request(1, 0, 1, 0, 4096, &[9u8; 4096]);
    assert_eq!(a.reply(1, &mut []), 0);
    assert!(server.connections() >= 3);

    assert_eq!(server.close_export("vm").unwrap(), 2);
    assert!(closed(&mut a) && closed(&mut b), "vm's clients are cut off");
    let mut again = connect();
    assert_eq!(
        again.go("vm"),
        Err(0x8000_0006),
        "a closed export is unknown"
    );
    // The other export is untouched.
    o.request(1, 0, 2, 0, 4096, &[5u8; 4096]);
    assert_eq!(o.reply(2, &mut []), 0);
    assert!(matches!(
        server.close_export("nope"),
        Err(snapvol::Error::VolumeNotFound(_))
    ));
    // The mark is queried and lifted through a handle of its own.
    let control = server.exports();
    assert!(control.is_closed("vm").unwrap());
    assert!(
        !control.reopen("other").unwrap(),
        "an open export was not closed"
    );
    assert!(matches!(
        control.reopen("vm@nope"),
        Err(snapvol::Error::SnapshotNotFound(_))
    ));
    assert!(server.reopen_export("vm").unwrap());
    assert!(!control.is_closed("vm").unwrap());
    let mut back = connect();
    back.go("vm").unwrap();
    let mut got = vec![0u8; 4096];
    back.request(0, 0, 3, 0, 4096, &[]);
    assert_eq!(back.reply(3, &mut got), 0);
    assert_eq!(got, vec![9u8; 4096], "the write before the close stays");

    let generation = pool.stats().generation;
    server.stop().unwrap();
    assert!(
        closed(&mut o) && closed(&mut back),
        "stop closes every connection"
    );
    assert!(pool.stats().generation > generation, "stop commits");
    assert!(
        UnixStream::connect(&path).is_err() || {
            // The socket file may still accept at the kernel level for a moment; nobody serves.
            let mut late = connect_quiet(&path);
            closed(&mut late)
        }
    );
    drop(pool);
    let reopened = Pool::open(dev, PoolOptions::default()).unwrap();
    let mut buf = vec![0u8; 4096];
    reopened
        .volume("other")
        .unwrap()
        .read_at(&mut buf, 0)
        .unwrap();
    assert_eq!(
        buf,
        vec![5u8; 4096],
        "a write acknowledged before stop is durable"
    );
}

/// `ServerOptions::closed_exports`: closed before the first connection is accepted, and a
/// name the pool does not have fails the start with NotFound.
#[test]
fn a_server_starts_with_exports_closed() {
    let pool = memory_pool();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let opts = ServerOptions::default().closed_export("vm@s");
    let server = snapvol::nbd::Server::start_unix(&pool, listener, opts).unwrap();
    let mut c = Client::greet(UnixStream::connect(&path).unwrap());
    assert_eq!(c.list(), ["vm"]);
    assert_eq!(c.go("vm@s"), Err(0x8000_0006));
    assert!(server.exports().is_closed("vm@s").unwrap());
    drop(c);
    server.stop().unwrap();
    let listener = std::os::unix::net::UnixListener::bind(dir.path().join("b.sock")).unwrap();
    let opts = ServerOptions::default().closed_export("nosuch");
    let err = snapvol::nbd::Server::start_unix(&pool, listener, opts).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert!(err.to_string().contains("nosuch"), "{err}");
}

/// A server keeps its limits: a connection over `max_connections` is closed at once, and a
/// client that does not finish the handshake in time is closed and its thread freed, while
/// a client that finished it may stay idle.
#[test]
fn a_server_limits_connections_and_handshake_time() {
    let pool = memory_pool();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let opts = ServerOptions::default()
        .max_connections(2)
        .handshake_timeout(std::time::Duration::from_millis(300));
    let server = snapvol::nbd::Server::start_unix(&pool, listener, opts).unwrap();
    let mut serving = Client::greet(UnixStream::connect(&path).unwrap());
    serving.go("vm").unwrap();
    let mut silent = connect_quiet(&path);
    // Both are counted once accepted.
    let t = std::time::Instant::now();
    while server.connections() < 2 && t.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(server.connections(), 2);
    let mut third = connect_quiet(&path);
    assert!(closed(&mut third), "a connection over the limit is closed");
    // The silent client never sends its flags: it is closed after the handshake timeout.
    let mut greeting = [0u8; 18];
    silent.0.read_exact(&mut greeting).unwrap();
    assert!(closed(&mut silent), "a stalled handshake is closed");
    let t = std::time::Instant::now();
    while server.connections() > 1 && t.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(server.connections(), 1, "its thread is gone");
    // The serving client, idle for longer than the handshake timeout, is still served.
    std::thread::sleep(std::time::Duration::from_millis(600));
    let mut got = vec![0u8; 4096];
    serving.request(0, 0, 1, 0, 4096, &[]);
    assert_eq!(serving.reply(1, &mut got), 0);
    assert_eq!(got, vec![7u8; 4096]);
    // And there is room again.
    let mut next = Client::greet(UnixStream::connect(&path).unwrap());
    next.go("vm@s").unwrap();
    server.stop().unwrap();
}

/// A raw connection, without reading the greeting.
fn connect_quiet(path: &std::path::Path) -> Client {
    Client(UnixStream::connect(path).unwrap())
}

/// `@ID` exports a snapshot by id, also one whose volume is gone (it has no `VOL@SNAP`
/// name left); the name grammar is the library's, so a bookmark name is no export.
#[test]
fn a_snapshot_of_a_deleted_volume_is_exported_by_id() {
    let pool = memory_pool();
    let id = pool.snapshot_handle("vm", "s").unwrap().id();
    pool.bookmark("vm", "s").unwrap();
    pool.delete_volume("vm").unwrap();
    let (mut c, _server) = Client::connect(&pool);
    assert_eq!(c.go("vm@s"), Err(0x8000_0006));
    assert_eq!(c.go("vm#s"), Err(0x8000_0006));
    let (size, flags) = c.go(&format!("@{id}")).unwrap();
    assert_eq!(size, 4 << 20);
    assert_ne!(flags & 2, 0, "read-only");
    let mut got = vec![0u8; 8192];
    c.request(0, 0, 1, 0, 8192, &[]);
    assert_eq!(c.reply(1, &mut got), 0);
    assert_eq!(got, vec![7u8; 8192]);
}

#[test]
fn a_served_pool_takes_cli_commands_over_its_control_socket_while_a_client_writes() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("p.img");
    let p = pool.to_str().unwrap();
    assert_eq!(snapvol_cli(&["pool", "create", p, "--size", "256M"]).0, 0);
    assert_eq!(snapvol_cli(&["create", p, "vm", "--size", "16M"]).0, 0);
    let sock = dir.path().join("nbd.sock");
    let server = Server::start(&pool, &sock);
    let ctl = dir.path().join("p.img.ctl");
    for _ in 0..200 {
        if ctl.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&ctl).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the control socket is the owner's only"
    );

    // A client writes block after block; `acked` counts the writes it has seen replied to.
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (acked, stop, sock) = (acked.clone(), stop.clone(), sock.clone());
        std::thread::spawn(move || {
            let mut c = Client::greet(UnixStream::connect(&sock).unwrap());
            c.go("vm").unwrap();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && i < 4096 {
                c.request(1, 0, i, i * 4096, 4096, &[(i % 251) as u8 + 1; 4096]);
                assert_eq!(c.reply(i, &mut []), 0);
                i += 1;
                acked.store(i, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    while acked.load(std::sync::atomic::Ordering::SeqCst) < 50 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // The snapshot, taken while the client writes, holds every write acknowledged before it.
    let before = acked.load(std::sync::atomic::Ordering::SeqCst);
    let (code, out, err) = snapvol_cli(&["snapshot", p, "vm@live", "--json"]);
    assert_eq!(code, 0, "{err}");
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["snapshots"][0]["id"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(id.len(), 32);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    let len = (before * 4096).to_string();
    // Raw bytes: stdout is the snapshot's data, not text.
    let (code, bytes, err) = snapvol_raw(&["read", p, "vm@live", "--length", &len], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(bytes.len() as u64, before * 4096);
    for i in 0..before as usize {
        assert_eq!(
            bytes[i * 4096],
            (i % 251) as u8 + 1,
            "block {i} acknowledged before the snapshot"
        );
    }

    // A backup of the live snapshot, pushed through the server, to a directory named
    // relative to the client's working directory.
    let (code, out, err) = snapvol_raw(
        &["backup", "push", p, "vm@live", "--to", "repo", "--json"],
        Some(dir.path()),
    );
    assert_eq!(code, 0, "{err}");
    let pushed: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(pushed["id"], id.as_str());
    assert!(
        dir.path().join("repo").join("config").exists(),
        "the client's ./repo"
    );

    // The other catalog commands, through the server, as they would run alone.
    assert_eq!(snapvol_cli(&["clone", p, "vm@live", "vm2"]).0, 0);
    // A connection open across a rollback reads the rolled-back contents afterwards.
    let mut open = Client::greet(UnixStream::connect(&sock).unwrap());
    open.go("vm").unwrap();
    open.request(1, 0, 1, 8 << 20, 4096, &[0xEE; 4096]);
    assert_eq!(open.reply(1, &mut []), 0);
    let (code, _, err) = snapvol_cli(&["rollback", p, "vm@live"]);
    assert_eq!(code, 0, "{err}");
    let mut back = vec![0u8; 4096];
    open.request(0, 0, 2, 8 << 20, 4096, &[]);
    assert_eq!(open.reply(2, &mut back), 0);
    assert_eq!(
        back,
        vec![0u8; 4096],
        "the write after the snapshot is rolled back"
    );
    drop(open);
    // A clone made while serving is exported at once.
    let mut c = Client::greet(UnixStream::connect(&sock).unwrap());
    assert_eq!(c.go("vm2").unwrap().0, 16 << 20);
    drop(c);
    let (code, _, err) = snapvol_cli(&["destroy", p, "nosuch"]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("snapvol: ") && err.contains("nosuch"),
        "{err}"
    );
    let (code, _, err) = snapvol_cli(&["destroy", p, "vm2"]);
    assert_eq!(code, 0, "{err}");
    // Reading stdin is not forwarded: refused with a reason, not hung.
    let (code, _, err) = snapvol_cli(&["import", p, "x", "-"]);
    assert_eq!(code, 1);
    assert!(err.contains("stdin"), "{err}");
    let listed = snapvol_cli(&["list", p, "--json"]);
    assert_eq!(listed.0, 0, "{}", listed.2);

    // SIGTERM: a clean stop that leaves no socket behind; the same listing without it.
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut server = server;
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!ctl.exists() && !sock.exists(), "sockets removed");
    assert_eq!(snapvol_cli(&["list", p, "--json"]), listed);
}

/// `serve --no-export`, `unexport` and `reexport`: a volume kept off NBD is neither listed
/// nor served (its open connections are cut, their writes kept), the mark is the running
/// server's, and the commands say so when no server holds the pool.
#[test]
fn a_volume_marked_not_exported_is_neither_listed_nor_served_until_reexported() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("p.img");
    let p = pool.to_str().unwrap();
    assert_eq!(snapvol_cli(&["pool", "create", p, "--size", "64M"]).0, 0);
    for v in ["vm", "scratch"] {
        assert_eq!(snapvol_cli(&["create", p, v, "--size", "4M"]).0, 0);
    }
    assert_eq!(snapvol_cli(&["snapshot", p, "vm@s"]).0, 0);
    // Without a server the marks do not exist: a clear refusal, nothing changed.
    let (code, _, err) = snapvol_cli(&["unexport", p, "vm"]);
    assert_eq!(code, 1);
    assert!(err.contains("no `snapvol serve` holds this pool"), "{err}");

    let sock = dir.path().join("nbd.sock");
    let server = Server::start_with(&pool, &sock, &["--no-export", "scratch"]);
    let ctl = dir.path().join("p.img.ctl");
    for _ in 0..200 {
        if ctl.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let connect = || Client::greet(UnixStream::connect(&sock).unwrap());
    assert_eq!(connect().list(), ["vm", "vm@s"]);
    assert_eq!(connect().go("scratch"), Err(0x8000_0006));

    // A connection open on vm is cut by `unexport`; what it wrote stays.
    let mut open = connect();
    open.go("vm").unwrap();
    open.request(1, 0, 1, 0, 4096, &[3u8; 4096]);
    assert_eq!(open.reply(1, &mut []), 0);
    let (code, _, err) = snapvol_cli(&["unexport", p, "vm"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("1 connection closed"), "{err}");
    assert!(closed(&mut open));
    assert_eq!(
        connect().list(),
        ["vm@s"],
        "the snapshot is an export of its own"
    );
    let (code, _, err) = snapvol_cli(&["unexport", p, "nosuch"]);
    assert_eq!(code, 1);
    assert!(err.contains("nosuch"), "{err}");

    let (code, _, err) = snapvol_cli(&["reexport", p, "scratch"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = snapvol_cli(&["reexport", p, "vm"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = snapvol_cli(&["reexport", p, "vm"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("exported already"), "{err}");
    assert_eq!(connect().list(), ["scratch", "vm", "vm@s"]);
    let mut back = connect();
    back.go("vm").unwrap();
    let mut got = vec![0u8; 4096];
    back.request(0, 0, 2, 0, 4096, &[]);
    assert_eq!(back.reply(2, &mut got), 0);
    assert_eq!(got, vec![3u8; 4096]);
    drop(back);
    drop(server);

    // An unknown name on the command line stops the server before it serves.
    let out = Command::new(env!("CARGO_BIN_EXE_snapvol"))
        .args(["serve", p, "--nbd-socket", sock.to_str().unwrap()])
        .args(["--no-export", "nosuch"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("closed export") && err.contains("nosuch"),
        "{err}"
    );
    assert!(!ctl.exists(), "no control socket left");
}

/// More idle connections than the server has file descriptors for (`snapvol serve` under a
/// limit of 40): its accepts fail with EMFILE, which it waits out instead of exiting; the
/// client connected before the flood is served throughout, a client after the flood is
/// served once the idle ones are gone, and SIGTERM still stops it cleanly.
#[test]
fn a_flood_of_idle_connections_past_the_fd_limit_does_not_end_the_server() {
    if missing(&["prlimit"]).is_some() {
        eprintln!("SKIPPED a_flood_of_idle_connections_past_the_fd_limit_does_not_end_the_server: prlimit is not installed (apt-get install util-linux)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("p.img");
    let p = pool.to_str().unwrap();
    assert_eq!(snapvol_cli(&["pool", "create", p, "--size", "64M"]).0, 0);
    assert_eq!(snapvol_cli(&["create", p, "vm", "--size", "4M"]).0, 0);
    let sock = dir.path().join("nbd.sock");
    let mut child = Command::new("prlimit")
        .args(["--nofile=40:40", env!("CARGO_BIN_EXE_snapvol"), "serve", p])
        .args([
            "--nbd-socket",
            sock.to_str().unwrap(),
            "--max-connections",
            "1000",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..300 {
        if UnixStream::connect(&sock).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut active = Client::greet(UnixStream::connect(&sock).unwrap());
    active.go("vm").unwrap();
    // Fewer than the listen backlog, so each connect returns; most are never accepted.
    let idle: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    for i in 0..20u64 {
        active.request(1, 0, i, i * 4096, 4096, &[i as u8 + 1; 4096]);
        assert_eq!(active.reply(i, &mut []), 0, "the active client is served");
    }
    assert!(child.try_wait().unwrap().is_none(), "the server is up");
    drop(idle);
    std::thread::sleep(std::time::Duration::from_millis(500));
    // A server whose accept loop died would never greet: fail, do not hang.
    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut late = Client::greet(s);
    late.go("vm").unwrap();
    let mut got = vec![0u8; 4096];
    late.request(0, 0, 1, 19 * 4096, 4096, &[]);
    assert_eq!(late.reply(1, &mut got), 0);
    assert_eq!(got, vec![20u8; 4096]);
    drop((active, late));
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists(), "socket removed");
}

#[test]
fn a_full_host_filesystem_is_enospc_to_the_client_and_serving_goes_on_after() {
    use snapvol::device::{FaultDevice, FaultKind};
    let fault = Arc::new(FaultDevice::new(Arc::new(MemoryDevice::new(64 << 20))));
    let pool = Pool::create(fault.clone(), PoolOptions::default().commit_interval(None)).unwrap();
    let v = pool.create_volume("vm", 4 << 20).unwrap();
    v.write_at(&[7u8; 8192], 0).unwrap();
    v.flush().unwrap();
    drop(v);
    let (mut c, server) = Client::connect(&pool);
    c.go("vm").unwrap();
    // Every device write refused as a full filesystem refuses it (28 = ENOSPC).
    fault.fail_nth_with(FaultKind::Write, 0, true, 28);
    c.request(1, 0, 1, 1 << 20, 4096, &[9u8; 4096]);
    assert_eq!(
        c.reply(1, &mut []),
        28,
        "ENOSPC, which qemu's werror=enospc acts on"
    );
    // Reads of flushed data go on while the host is full.
    let mut got = vec![0u8; 8192];
    c.request(0, 0, 2, 0, 8192, &[]);
    assert_eq!(c.reply(2, &mut got), 0);
    assert_eq!(got, vec![7u8; 8192]);
    // Room again: the same write and a flush succeed on the same connection.
    fault.disarm();
    c.request(1, 0, 3, 1 << 20, 4096, &[9u8; 4096]);
    assert_eq!(c.reply(3, &mut []), 0);
    c.request(3, 0, 4, 0, 0, &[]);
    assert_eq!(c.reply(4, &mut []), 0);
    let mut back = vec![0u8; 4096];
    c.request(0, 0, 5, 1 << 20, 4096, &[]);
    assert_eq!(c.reply(5, &mut back), 0);
    assert_eq!(back, vec![9u8; 4096]);
    drop(c);
    server.join().unwrap().unwrap();
    assert!(pool.check().unwrap().is_clean());
}

#[test]
fn a_connection_to_a_volume_deleted_while_served_gets_an_error_and_is_closed() {
    let pool = memory_pool();
    pool.create_volume("gone", 1 << 20).unwrap();
    let (mut c, server) = Client::connect(&pool);
    c.go("gone").unwrap();
    let (mut other, other_server) = Client::connect(&pool);
    other.go("vm").unwrap();
    pool.delete_volume("gone").unwrap();
    let mut buf = vec![0u8; 4096];
    c.request(0, 0, 1, 0, 4096, &[]);
    assert_eq!(
        c.reply(1, &mut buf),
        5,
        "EIO for the request that found it gone"
    );
    assert!(closed(&mut c), "then the connection ends");
    server.join().unwrap().unwrap();
    // Other exports are not concerned.
    other.request(0, 0, 2, 0, 4096, &[]);
    assert_eq!(other.reply(2, &mut buf), 0);
    assert_eq!(buf, vec![7u8; 4096]);
    drop(other);
    other_server.join().unwrap().unwrap();
}

#[test]
fn an_idle_timeout_closes_a_silent_client_and_spares_a_busy_one() {
    let pool = memory_pool();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let opts = ServerOptions::default().idle_timeout(Some(std::time::Duration::from_millis(300)));
    let server = snapvol::nbd::Server::start_unix(&pool, l, opts).unwrap();
    let mut idle = Client::greet(UnixStream::connect(&sock).unwrap());
    idle.go("vm").unwrap();
    let mut busy = Client::greet(UnixStream::connect(&sock).unwrap());
    busy.go("vm").unwrap();
    let mut buf = vec![0u8; 4096];
    for h in 0..8 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        busy.request(0, 0, h, 0, 4096, &[]);
        assert_eq!(
            busy.reply(h, &mut buf),
            0,
            "a client that keeps talking is served"
        );
    }
    assert!(
        closed(&mut idle),
        "a client silent for longer than the timeout is closed"
    );
    let t = std::time::Instant::now();
    while server.connections() != 1 && t.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(server.connections(), 1, "the idle one's thread is gone");
    drop(busy);
    server.stop().unwrap();
}

/// With data checksums, a request that reads a damaged block gets EIO and no bytes, and the
/// connection goes on: the next request, for an undamaged block, is answered.
#[test]
fn a_damaged_block_is_eio_and_the_connection_goes_on() {
    let dev = Arc::new(MemoryDevice::new(64 << 20));
    let pool = Pool::create(
        dev.clone(),
        PoolOptions::default()
            .commit_interval(None)
            .data_checksums(true),
    )
    .unwrap();
    let v = pool.create_volume("vm", 1 << 20).unwrap();
    v.write_at(&[7u8; 8192], 0).unwrap();
    pool.flush().unwrap();
    let at = v.physical_block(4096).unwrap().unwrap();
    snapvol::device::BlockDevice::write_at(&*dev, &[0x55], at + 9).unwrap();
    let (mut c, server) = Client::connect(&pool);
    c.go("vm").unwrap();
    let mut buf = vec![0u8; 4096];
    c.request(0, 0, 1, 4096, 512, &[]);
    assert_eq!(c.reply(1, &mut buf[..512]), 5, "EIO for the damaged block");
    c.request(0, 0, 2, 0, 4096, &[]);
    assert_eq!(c.reply(2, &mut buf), 0, "the neighbour still reads");
    assert_eq!(buf, vec![7u8; 4096]);
    drop(c);
    server.join().unwrap().unwrap();
}
