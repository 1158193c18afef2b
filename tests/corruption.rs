//! Corrupt media: flipping bytes of any metadata page or superblock gives a typed error or a
//! fallback to the other superblock; never wrong data, never a panic.

use snapvol::device::{BlockDevice, MemoryDevice};
use snapvol::{Pool, PoolOptions, Volume};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Every kind of metadata page: superblock, block map leaf and branch, space map leaf and
/// index, catalog leaf, branch and write buffer.
const MAGICS: [&[u8; 4]; 8] = [
    b"SVSB", b"SVML", b"SVMB", b"SVSL", b"SVSI", b"SVCL", b"SVCB", b"SVCW",
];

/// What a flipped metadata byte may cause: a refusal that says the pool is damaged.
fn is_damage(e: &snapvol::Error) -> bool {
    matches!(
        e,
        snapvol::Error::Corrupt { .. }
            | snapvol::Error::NotAPool(_)
            | snapvol::Error::UnsupportedVersion { .. }
    )
}

fn opts() -> PoolOptions {
    PoolOptions::default()
        .block_size(4096)
        .commit_interval(None)
}

fn read(v: &Volume) -> snapvol::Result<Vec<u8>> {
    let mut b = vec![0u8; v.len()? as usize];
    v.read_at(&mut b, 0)?;
    Ok(b)
}

/// Builds a pool with a multi-level block map, snapshots and a clone. Ends with a catalog
/// operation that changes no data, so both superblocks name states with the same contents.
fn build() -> (Vec<u8>, BTreeMap<String, Vec<u8>>) {
    let mem = Arc::new(MemoryDevice::new(24 << 20));
    let pool = Pool::create(mem.clone(), opts()).unwrap();
    let a = pool.create_volume("a", 4 << 20).unwrap();
    for i in 0..700u64 {
        a.write_at(&[(i % 200) as u8 + 1; 4096], i * 4096 + (i % 3) * 7)
            .unwrap();
    }
    pool.snapshot("a", "s1").unwrap();
    a.write_at(&[0xAB; 30000], 100_000).unwrap();
    pool.clone_snapshot("a", "s1", "b").unwrap();
    pool.volume("b")
        .unwrap()
        .write_at(&[0xCD; 5000], 2_000_000)
        .unwrap();
    pool.flush().unwrap();
    let mut expect = BTreeMap::new();
    expect.insert("a".to_string(), read(&a).unwrap());
    expect.insert("b".to_string(), read(&pool.volume("b").unwrap()).unwrap());
    expect.insert("a@s1".to_string(), {
        let s = pool.snapshot_handle("a", "s1").unwrap();
        let mut v = vec![0u8; s.len().unwrap() as usize];
        s.read_at(&mut v, 0).unwrap();
        v
    });
    // Enough snapshots that the catalog tree has branches too.
    for i in 0..60 {
        pool.snapshot("b", &format!("keep-{i:02}")).unwrap();
    }
    pool.snapshot("b", "marker").unwrap();
    pool.close().unwrap();
    (mem.image(), expect)
}

#[test]
fn flipping_any_metadata_byte_never_yields_wrong_data() {
    let (image, expect) = build();
    let meta_pages: Vec<usize> = (0..image.len() / 4096)
        .filter(|&u| MAGICS.iter().any(|m| &image[u * 4096..u * 4096 + 4] == *m))
        .collect();
    assert!(
        meta_pages.len() > 10,
        "found {} metadata pages",
        meta_pages.len()
    );
    let mut opened = 0;
    let mut refused = 0;
    let mut flips = 0;
    let mut detected = 0;
    for &u in &meta_pages {
        // Header bytes, a spread of body bytes, and the last byte of every page.
        let mut offsets: Vec<usize> = (0..32).collect();
        offsets.extend((32..4096).step_by(331));
        offsets.push(4095);
        for off in offsets {
            let mut img = image.clone();
            img[u * 4096 + off] ^= 1 << (off % 8);
            flips += 1;
            let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::from_image(img));
            let pool = match Pool::open(dev, opts()) {
                Ok(p) => p,
                Err(e) => {
                    assert!(
                        is_damage(&e),
                        "flip at page {u} byte {off}: open said {e:?}"
                    );
                    refused += 1;
                    continue;
                }
            };
            opened += 1;
            for (name, want) in &expect {
                let got = match name.split_once('@') {
                    None => pool.volume(name).and_then(|v| read(&v)),
                    Some((v, s)) => pool.snapshot_handle(v, s).and_then(|s| {
                        let mut b = vec![0u8; s.len()? as usize];
                        s.read_at(&mut b, 0).map(|_| b)
                    }),
                };
                match got {
                    Ok(got) => assert!(
                        got == *want,
                        "flip at page {u} byte {off}: {name} returned wrong data"
                    ),
                    // A damaged page on the way is named as such, not as a missing volume.
                    Err(e) => assert!(
                        matches!(e, snapvol::Error::Corrupt { .. }),
                        "flip at page {u} byte {off}: reading {name} said {e:?}"
                    ),
                }
            }
            // check() never panics: it reports a flipped live page, or fails naming the
            // damage; a flipped page that nothing references leaves it clean.
            match pool.check() {
                Ok(r) if r.is_clean() => {}
                Ok(_) => detected += 1,
                Err(e) => {
                    assert!(
                        is_damage(&e),
                        "flip at page {u} byte {off}: check said {e:?}"
                    );
                    detected += 1;
                }
            }
        }
    }
    eprintln!(
        "{flips} flips over {} pages: {opened} opened, {refused} refused, {detected} found by check",
        meta_pages.len()
    );
    assert!(opened > 0 && refused > 0 && detected > 0);
    // Every kind of page was among those flipped.
    for m in MAGICS {
        assert!(
            meta_pages
                .iter()
                .any(|&u| &image[u * 4096..u * 4096 + 4] == m),
            "no {} page in the test pool",
            String::from_utf8_lossy(m)
        );
    }
}

#[test]
fn a_torn_newest_superblock_falls_back_to_the_other() {
    let (image, expect) = build();
    let gen = |slot: usize| {
        u64::from_le_bytes(
            image[slot * 4096 + 16..slot * 4096 + 24]
                .try_into()
                .unwrap(),
        )
    };
    let newest = if gen(0) > gen(1) { 0 } else { 1 };
    let mut img = image.clone();
    img[newest * 4096 + 512..newest * 4096 + 1024].fill(0xFF);
    let pool = Pool::open(Arc::new(MemoryDevice::from_image(img)), opts()).unwrap();
    assert!(pool.check().unwrap().is_clean());
    assert_eq!(read(&pool.volume("a").unwrap()).unwrap(), expect["a"]);
    assert_eq!(
        pool.stats().generation,
        gen(1 - newest),
        "opened the older commit"
    );
}

#[test]
fn check_reports_a_corrupt_live_page() {
    let (image, _) = build();
    // Corrupt each block map leaf in turn: the pool opens (leaves load lazily), and check
    // names the page unless it is an old, unreferenced copy (then check is clean).
    let mut found_live = false;
    for u in (0..image.len() / 4096).filter(|&u| &image[u * 4096..u * 4096 + 4] == b"SVML") {
        let mut img = image.clone();
        img[u * 4096 + 100] ^= 0xFF;
        let pool = Pool::open(Arc::new(MemoryDevice::from_image(img)), opts()).unwrap();
        let report = pool.check().unwrap();
        if !report.is_clean() {
            found_live = true;
            assert!(
                report.problems.iter().any(
                    |p| matches!(p, snapvol::Problem::Corrupt { page, .. } if *page == u as u64)
                ),
                "{:?}",
                report.problems
            );
        }
    }
    assert!(found_live, "no live leaf found to corrupt");
}
