//! Opens, checks and reads a pool image whose metadata pages were mutated. The input picks one
//! of several real seed images (built once, deterministically; one with data checksums) and a list of byte edits
//! aimed at its metadata pages: the engine must never panic, and whatever it reads from a
//! volume or snapshot that it does not refuse must be the original data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapvol::device::MemoryDevice;
use snapvol::{Pool, PoolOptions};
use std::sync::{Arc, OnceLock};

struct Seed {
    image: Vec<u8>,
    meta_pages: Vec<usize>,
    /// (name, contents) of every volume and snapshot ("vol@snap").
    contents: Vec<(String, Vec<u8>)>,
}

const MAGICS: [&[u8; 4]; 6] = [b"SVSB", b"SVML", b"SVMB", b"SVSL", b"SVSI", b"SVCT"];

fn opts() -> PoolOptions {
    PoolOptions::default().commit_interval(None)
}

fn build(shape: u8) -> Seed {
    let mem = Arc::new(MemoryDevice::new(8 << 20));
    // Shape 3 is shape 1 on a pool with data checksums (format version 3).
    let opts = PoolOptions::default()
        .block_size(if shape == 2 { 16384 } else { 4096 })
        .commit_interval(None)
        .data_checksums(shape == 3);
    let pool = Pool::create(mem.clone(), opts).unwrap();
    let a = pool.create_volume("a", 3 << 20).unwrap();
    let n = if shape == 0 { 40 } else { 600 };
    for i in 0..n {
        a.write_at(&[(i % 250) as u8 + 1; 4096], i * 4096 + (i % 5) * 100).unwrap();
    }
    pool.snapshot("a", "s").unwrap();
    if shape >= 1 {
        a.write_at(&[0xAA; 20000], 50_000).unwrap();
        let b = pool.clone_snapshot("a", "s", "b").unwrap();
        b.write_at(&[0xBB; 9000], 1_000_000).unwrap();
        a.discard(200_000, 300_000).unwrap();
    }
    pool.flush().unwrap();
    let mut contents = Vec::new();
    for v in pool.volumes().unwrap() {
        let vol = pool.volume(&v.name).unwrap();
        let mut buf = vec![0u8; v.size as usize];
        vol.read_at(&mut buf, 0).unwrap();
        contents.push((v.name, buf));
    }
    for s in pool.snapshots().unwrap() {
        let h = pool.snapshot_by_id(s.id).unwrap();
        let mut buf = vec![0u8; s.size as usize];
        h.read_at(&mut buf, 0).unwrap();
        contents.push((format!("{}@{}", s.volume_name, s.name), buf));
    }
    // End with a commit that changes no data, so a fallback to the older superblock
    // must show the same contents.
    pool.snapshot("a", "marker").unwrap();
    drop(a);
    pool.close().unwrap();
    let image = mem.image();
    let meta_pages = (0..image.len() / 4096)
        .filter(|&u| MAGICS.iter().any(|m| &image[u * 4096..u * 4096 + 4] == *m))
        .collect();
    Seed { image, meta_pages, contents }
}

fn seeds() -> &'static [Seed] {
    static SEEDS: OnceLock<Vec<Seed>> = OnceLock::new();
    SEEDS.get_or_init(|| (0..4).map(build).collect())
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, edits)) = data.split_first() else { return };
    let seed = &seeds()[pick as usize % 4];
    let mut image = seed.image.clone();
    // Each edit: page index (u16), byte offset in the page (u16), value (u8).
    for e in edits.chunks_exact(5) {
        let page = seed.meta_pages[u16::from_le_bytes([e[0], e[1]]) as usize % seed.meta_pages.len()];
        let off = u16::from_le_bytes([e[2], e[3]]) as usize % 4096;
        image[page * 4096 + off] = e[4];
    }
    let Ok(pool) = Pool::open(Arc::new(MemoryDevice::from_image(image)), opts()) else { return };
    for (name, want) in &seed.contents {
        let got = match name.split_once('@') {
            None => pool.volume(name).and_then(|v| {
                let mut b = vec![0u8; v.len()? as usize];
                v.read_at(&mut b, 0).map(|_| b)
            }),
            Some((v, s)) => pool.snapshot_handle(v, s).and_then(|h| {
                let mut b = vec![0u8; h.len()? as usize];
                h.read_at(&mut b, 0).map(|_| b)
            }),
        };
        // A refused read is fine; wrong data is not. (A fallback to the older superblock
        // sees the same contents: the seeds end with a commit that changes no data.)
        if let Ok(got) = got {
            assert!(got == *want, "{name} returned wrong data");
        }
    }
    let _ = pool.check();
});
