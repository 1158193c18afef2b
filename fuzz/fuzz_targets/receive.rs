//! Hostile streams into `receive`: raw bytes, or a real full or incremental stream with byte
//! edits and a cut. Whatever happens the pool stays consistent (`check()` clean); a failed
//! receive leaves the volumes and snapshots as they were.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapvol::device::MemoryDevice;
use snapvol::{Pool, PoolOptions};
use std::sync::{Arc, OnceLock};

fn opts() -> PoolOptions {
    PoolOptions::default().block_size(4096).commit_interval(None)
}

struct Seeds {
    full: Vec<u8>,
    incremental: Vec<u8>,
}

fn seeds() -> &'static Seeds {
    static S: OnceLock<Seeds> = OnceLock::new();
    S.get_or_init(|| {
        let p = Pool::create(Arc::new(MemoryDevice::new(16 << 20)), opts()).unwrap();
        let v = p.create_volume("v", 400_000).unwrap();
        v.write_at(&[3u8; 50_000], 1000).unwrap();
        v.write_at(&[4u8; 9_000], 300_000).unwrap();
        let s1 = p.snapshot("v", "a").unwrap();
        v.discard(0, 20_000).unwrap();
        v.write_at(&[5u8; 7_000], 200_000).unwrap();
        let s2 = p.snapshot("v", "b").unwrap();
        let (mut full, mut incremental) = (Vec::new(), Vec::new());
        p.send(s1, None, &mut full).unwrap();
        p.send(s2, Some(s1.into()), &mut incremental).unwrap();
        Seeds { full, incremental }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let s = seeds();
    let stream: Vec<u8> = match mode % 3 {
        0 => rest.to_vec(),
        m => {
            let mut st = if m == 1 { s.full.clone() } else { s.incremental.clone() };
            let (cut, edits) = rest.split_at(rest.len().min(2));
            for e in edits.chunks_exact(3) {
                let at = u16::from_le_bytes([e[0], e[1]]) as usize % st.len();
                st[at] = e[2];
            }
            if cut.len() == 2 {
                let keep = u16::from_le_bytes([cut[0], cut[1]]) as usize;
                if keep < st.len() {
                    st.truncate(keep);
                }
            }
            st
        }
    };
    let pool = Pool::create(Arc::new(MemoryDevice::new(8 << 20)), opts()).unwrap();
    if mode % 3 == 2 {
        // The incremental stream's base, so it can apply.
        pool.receive(&mut &s.full[..], None).unwrap();
    }
    let before = (pool.volumes().unwrap().len(), pool.snapshots().unwrap().len());
    match pool.receive(&mut &stream[..], None) {
        Ok(_) => {}
        Err(_) => assert_eq!((pool.volumes().unwrap().len(), pool.snapshots().unwrap().len()), before),
    }
    let report = pool.check().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
});
