//! The catalog at scale: snapshot latency, listing, opening and deleting with 100,000
//! snapshots of one volume, each figure side by side with the same at 10 snapshots, for
//! BENCHMARKS.md.
//!
//! `cargo bench --bench catalog` (SNAPVOL_BENCH_DIR picks the filesystem, default the temp
//! dir; SNAPVOL_BENCH_SNAPSHOTS the count, default 100,000).

use snapvol::{Pool, PoolOptions};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let base = std::env::var("SNAPVOL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let n: usize = std::env::var("SNAPVOL_BENCH_SNAPSHOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir_in(&base).unwrap();
    let path = dir.path().join("pool.img");
    let opts = PoolOptions::default().commit_interval(None);
    println!(
        "directory: {} ({n} snapshots of one volume)",
        base.display()
    );
    let pool = Pool::create_file(&path, 64 << 30, opts.clone()).unwrap();
    let v = pool.create_volume("db", 1 << 30).unwrap();
    v.write_at(&vec![7u8; 1 << 20], 0).unwrap();
    let mut lat = Vec::with_capacity(n);
    let mut at10 = None;
    let mut list10 = None;
    for i in 0..n {
        // A write between snapshots, as a volume in use has.
        v.write_at(&[i as u8; 4096], (i as u64 % 256) * 4096)
            .unwrap();
        let t = Instant::now();
        pool.snapshot("db", &format!("auto-{i:07}")).unwrap();
        lat.push(t.elapsed());
        if i + 1 == 10 {
            at10 = Some(median(lat.clone()));
            let t = Instant::now();
            let all = pool.snapshots().unwrap();
            let warm = t.elapsed();
            // Open and list cold at 10, as below at n: a second pool of the same shape (a
            // copy of this one would not stay sparse).
            let other = dir.path().join("ten.img");
            {
                let p10 = Pool::create_file(&other, 64 << 30, opts.clone()).unwrap();
                let v10 = p10.create_volume("db", 1 << 30).unwrap();
                v10.write_at(&vec![7u8; 1 << 20], 0).unwrap();
                for j in 0..10 {
                    p10.snapshot("db", &format!("auto-{j:07}")).unwrap();
                }
                drop(v10);
                p10.close().unwrap();
            }
            let t = Instant::now();
            let p10 = Pool::open_path(&other, opts.clone()).unwrap();
            let open = t.elapsed();
            let t = Instant::now();
            p10.snapshots().unwrap();
            list10 = Some((warm, all.len(), open, t.elapsed()));
            drop(p10);
            std::fs::remove_file(&other).unwrap();
        }
    }
    let window = 1000.min(n / 10).max(1);
    let last = median(lat[n - window..].to_vec());
    let first = at10.unwrap();
    println!(
        "snapshot latency: median {} over the first 10, {} over the last {window} (at {n}): {:.2}x",
        ms(first),
        ms(last),
        last.as_secs_f64() / first.as_secs_f64()
    );
    let t = Instant::now();
    let all = pool.snapshots().unwrap();
    let list = t.elapsed();
    assert_eq!(all.len(), n);
    let (l10, c10, open10, cold10) = list10.unwrap();
    println!(
        "list every snapshot (warm): {} for {c10}, {} for {n}",
        ms(l10),
        ms(list)
    );
    let id = v.id();
    let t = Instant::now();
    let of_volume = pool.volume_snapshots(id).unwrap();
    println!(
        "list the volume's snapshots (warm): {} for {}",
        ms(t.elapsed()),
        of_volume.len()
    );
    drop(v);
    pool.close().unwrap();

    let t = Instant::now();
    let pool = Pool::open_path(&path, opts.clone()).unwrap();
    println!(
        "open the pool: {} with 10 snapshots, {} with {n}",
        ms(open10),
        ms(t.elapsed())
    );
    let t = Instant::now();
    let all = pool.snapshots().unwrap();
    println!(
        "list every snapshot (cold, after open): {} for 10, {} for {}",
        ms(cold10),
        ms(t.elapsed()),
        all.len()
    );
    // Paged listings (CSI's ListSnapshots): a page costs the page, wherever it starts.
    let t = Instant::now();
    let first = pool.list_snapshots(None, 100, None).unwrap();
    let page_first = t.elapsed();
    assert_eq!(first.entries.len(), 100.min(n));
    let half = pool
        .list_snapshots(None, n / 2, None)
        .unwrap()
        .next_token
        .unwrap();
    let t = Instant::now();
    let middle = pool.list_snapshots(None, 100, Some(&half)).unwrap();
    let page_middle = t.elapsed();
    assert_eq!(middle.entries[0].name, format!("auto-{:07}", n / 2));
    println!(
        "list a page of 100 snapshots (warm): {} for the first page, {} from the middle of {n}",
        ms(page_first),
        ms(page_middle)
    );
    pool.close().unwrap();
    let pool = Pool::open_path(&path, opts.clone()).unwrap();
    let t = Instant::now();
    let middle = pool.list_snapshots(None, 100, Some(&half)).unwrap();
    println!(
        "list a page of 100 snapshots (cold, after open) from the middle of {n}: {}",
        ms(t.elapsed())
    );
    assert_eq!(middle.entries.len(), 100);
    let t = Instant::now();
    let h = pool
        .snapshot_handle("db", &format!("auto-{:07}", n / 2))
        .unwrap();
    println!(
        "find one snapshot by name (after the listing): {}",
        ms(t.elapsed())
    );
    let mid = h.id();
    drop(h);
    let used = pool.stats().used;
    let t = Instant::now();
    pool.delete_snapshot_by_id(mid).unwrap();
    println!(
        "delete one snapshot among {n}: {} (pool used {} -> {} bytes)",
        ms(t.elapsed()),
        used,
        pool.stats().used
    );
    let mut del = Vec::new();
    for i in (0..n).step_by((n / 100).max(1)).skip(1).take(50) {
        if i == n / 2 {
            continue;
        }
        let t = Instant::now();
        pool.delete_snapshot("db", &format!("auto-{i:07}")).unwrap();
        del.push(t.elapsed());
    }
    println!(
        "delete: median {} over {} scattered snapshots",
        ms(median(del.clone())),
        del.len()
    );
    pool.close().unwrap();
}
