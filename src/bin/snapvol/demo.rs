//! `snapvol demo`: the seed's three workflows end to end on sparse file pools, with timings
//! and space used at each step:
//!
//! 1. a template volume cloned for two workers (clones share every block);
//! 2. a snapshot before an "upgrade", the upgrade, a rollback, the data as before;
//! 3. a consistent snapshot taken while writes go on, exported to a raw image, imported
//!    into a second pool and verified byte for byte;
//! 4. that snapshot pushed to a backup repository, an incremental pushed after more writes,
//!    both restored by snapshot id into the second pool and verified byte for byte.

use crate::image::{export, import, Source};
use crate::units::human;
use snapvol::backup::{BaseChoice, DirTarget, RepoOptions, Repository, RestoreOptions};
use snapvol::{Pool, PoolOptions, Volume};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const MIB: u64 = 1 << 20;

/// Every file the demo creates in its directory.
const DEMO_FILES: &[&str] = &["pool.img", "pool2.img", "app-backup.raw", "backups"];

fn step<T, E: Into<Box<dyn std::error::Error>>>(
    pool: &Pool,
    what: &str,
    f: impl FnOnce() -> std::result::Result<T, E>,
) -> Result<T> {
    let t = Instant::now();
    let r = f().map_err(Into::into)?;
    println!(
        "  {what:<58} {:>9.2} ms   pool used {}",
        t.elapsed().as_secs_f64() * 1e3,
        human(pool.stats().used)
    );
    Ok(r)
}

fn fill(vol: &Volume, bytes: u64, seed: u8) -> snapvol::Result<()> {
    let mut chunk = vec![0u8; MIB as usize];
    for (i, b) in chunk.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(13).wrapping_add(seed);
    }
    for off in (0..bytes).step_by(MIB as usize) {
        chunk[0] = (off / MIB) as u8;
        vol.write_at(&chunk, off)?;
    }
    vol.flush()
}

fn read_all(len: u64, read: impl Fn(&mut [u8], u64) -> snapvol::Result<()>) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    read(&mut buf, 0)?;
    Ok(buf)
}

pub fn run(dir: Option<PathBuf>) -> std::result::Result<(), String> {
    run_inner(dir).map_err(|e| e.to_string())
}

fn run_inner(dir: Option<PathBuf>) -> Result<()> {
    let (dir, _keep) = match dir {
        Some(d) => (d, None),
        None => {
            let t =
                std::env::temp_dir().join(format!("snapvol-walkthrough-{}", std::process::id()));
            (t.clone(), Some(TempDir(t)))
        }
    };
    std::fs::create_dir_all(&dir)?;
    // The demo writes only files it creates: anything already there is someone's data.
    for name in DEMO_FILES {
        let p = dir.join(name);
        if p.symlink_metadata().is_ok() {
            return Err(format!(
                "{} already exists; the demo creates its own files and touches no others \
                 (remove it or pick another directory)",
                p.display()
            )
            .into());
        }
    }
    let path = dir.join("pool.img");
    println!("snapvol walkthrough in {}", dir.display());
    let pool = Pool::create_file(&path, 8 << 30, PoolOptions::default())?;
    println!(
        "pool: 8 GiB sparse file, block size {}",
        human(pool.block_size() as u64)
    );

    println!("\n1. Template volume cloned for two workers (PVC dataSource: PVC)");
    let template = step(&pool, "create volume 'template' (1 GiB, thin)", || {
        pool.create_volume("template", 1 << 30)
    })?;
    step(&pool, "write 256 MiB into the template and flush", || {
        fill(&template, 256 * MIB, 1)
    })?;
    let used_before = pool.stats().used;
    step(&pool, "clone 'template' -> 'worker-1'", || {
        pool.clone_volume("template", "worker-1")
    })?;
    step(&pool, "clone 'template' -> 'worker-2'", || {
        pool.clone_volume("template", "worker-2")
    })?;
    let w1 = pool.volume("worker-1")?;
    step(&pool, "worker-1 writes 4 MiB of its own", || {
        w1.write_at(&vec![0x77; 4 * MIB as usize], 0)?;
        w1.flush()
    })?;
    for name in ["template", "worker-1", "worker-2"] {
        let u = pool.volume_usage(name)?;
        println!(
            "     {name:<9} allocated {:>10}  shared {:>10}  exclusive {:>10}",
            human(u.allocated),
            human(u.shared),
            human(u.exclusive)
        );
    }
    println!(
        "     two clones of 256 MiB cost {} of pool space",
        human(pool.stats().used - used_before)
    );

    println!("\n2. Snapshot before an upgrade, then roll back (VolumeSnapshot + restore)");
    let db = step(
        &pool,
        "create volume 'db' (512 MiB) and write 64 MiB",
        || {
            let v = pool.create_volume("db", 512 * MIB)?;
            fill(&v, 64 * MIB, 2)?;
            Ok::<_, snapvol::Error>(v)
        },
    )?;
    let original = read_all(64 * MIB, |b, o| db.read_at(b, o))?;
    step(&pool, "snapshot db@before-upgrade", || {
        pool.snapshot("db", "before-upgrade")
    })?;
    step(&pool, "upgrade: rewrite 16 MiB, discard 8 MiB", || {
        db.write_at(&vec![0xEE; 16 * MIB as usize], 8 * MIB)?;
        db.discard(40 * MIB, 8 * MIB)?;
        db.flush()
    })?;
    if read_all(64 * MIB, |b, o| db.read_at(b, o))? == original {
        return Err("the upgrade did not change db".into());
    }
    step(&pool, "rollback db to db@before-upgrade", || {
        pool.rollback("db", "before-upgrade")
    })?;
    let back = read_all(64 * MIB, |b, o| db.read_at(b, o))?;
    if back != original {
        return Err("the rollback did not restore db".into());
    }
    println!("     db reads exactly as before the upgrade (64 MiB compared)");

    println!("\n3. Consistent snapshot under load, export, import elsewhere (backup/restore)");
    let app = pool.create_volume("app", 256 * MIB)?;
    fill(&app, 32 * MIB, 3)?;
    let stop = AtomicBool::new(false);
    let snap_id = std::thread::scope(|s| -> Result<snapvol::SnapshotId> {
        let writer = s.spawn(|| -> snapvol::Result<u64> {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // A database rewriting its hot first 32 MiB.
                let off = (n * 7919 * 4096) % (32 * MIB - 65536);
                app.write_at(&[(n % 251) as u8 + 1; 65536], off)?;
                n += 1;
            }
            Ok(n)
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        let id = step(&pool, "snapshot app@backup while a writer runs", || {
            pool.snapshot("app", "backup")
        })?;
        std::thread::sleep(std::time::Duration::from_millis(50));
        stop.store(true, Ordering::Relaxed);
        let writes = writer.join().expect("writer thread")?;
        println!("     the writer completed {writes} writes of 64 KiB around the snapshot");
        Ok(id)
    })?;
    let snap = pool.snapshot_by_id(snap_id)?;
    let image = dir.join("app-backup.raw");
    let source = Source::Snapshot(snap.clone());
    let exported = step(&pool, "export app@backup to a sparse raw image", || {
        export(&source, &image, 4096)
    })?;
    println!(
        "     {} of data in a {} image",
        human(exported),
        human(snap.len()?)
    );
    let path2 = dir.join("pool2.img");
    let pool2 = Pool::create_file(&path2, 2 << 30, PoolOptions::default())?;
    let restored = step(
        &pool2,
        "import the image into a second pool as 'app-restored'",
        || {
            import(&pool2, "app-restored", &image, None)?;
            pool2.volume("app-restored").map_err(|e| e.to_string())
        },
    )?;
    let a = read_all(snap.len()?, |b, o| snap.read_at(b, o))?;
    let b = read_all(restored.len()?, |b, o| restored.read_at(b, o))?;
    if a != b {
        return Err("the restored volume differs from the snapshot".into());
    }
    println!(
        "     app-restored equals app@backup byte for byte ({})",
        human(a.len() as u64)
    );

    println!("\n4. Backups to a repository, restored by snapshot id in another pool (S3 workflow)");
    let repo_dir = dir.join("backups");
    let repo = step(
        &pool,
        "create a backup repository (a directory; s3:// works alike)",
        || {
            Repository::create(
                Arc::new(DirTarget::new(&repo_dir)?),
                &RepoOptions::default(),
            )
        },
    )?;
    let full = step(
        &pool,
        "push app@backup (full: its allocated chunks)",
        || repo.push(&pool, snap_id, BaseChoice::Auto),
    )?;
    println!(
        "     {} chunks read, {} uploaded ({})",
        full.read_chunks,
        full.uploaded_chunks,
        human(full.uploaded_bytes)
    );
    step(&pool, "more writes: 16 scattered 64 KiB writes", || {
        for i in 0..16u64 {
            app.write_at(&[0xA5; 65536], i * 13 * MIB)?;
        }
        app.flush()
    })?;
    let snap2 = step(&pool, "snapshot app@later", || {
        pool.snapshot("app", "later")
    })?;
    let inc = step(
        &pool,
        "push app@later (incremental: only changed chunks)",
        || repo.push(&pool, snap2, BaseChoice::Auto),
    )?;
    println!(
        "     base app@backup ({:032x}): {} of {} chunks read (the writer's last writes and \
         the 16 new ones), {} uploaded ({})",
        inc.base_id.map_or(0, |b| b.as_u128()),
        inc.read_chunks,
        (256 * MIB).div_ceil(u64::from(repo.config().chunk_size)),
        inc.uploaded_chunks,
        human(inc.uploaded_bytes)
    );
    for id in [snap_id, snap2] {
        step(
            &pool2,
            &format!("restore {id:032x} into the second pool by id alone"),
            || repo.restore(id, &pool2, &RestoreOptions::default()),
        )?;
        let want = read_all(pool.snapshot_by_id(id)?.len()?, |b, o| {
            pool.snapshot_by_id(id)?.read_at(b, o)
        })?;
        let got = read_all(pool2.snapshot_by_id(id)?.len()?, |b, o| {
            pool2.snapshot_by_id(id)?.read_at(b, o)
        })?;
        if want != got {
            return Err(format!("restored snapshot {id:032x} differs").into());
        }
    }
    println!("     both restored snapshots equal the originals byte for byte (ids kept)");

    let t = Instant::now();
    let report = pool.check()?;
    println!(
        "\ncheck: {} map pages, {} block references, {} problems ({:.1} ms)",
        report.nodes,
        report.blocks,
        report.problems.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
    if !report.is_clean() || !pool2.check()?.is_clean() {
        return Err(format!("check found problems: {:?}", report.problems).into());
    }
    let st = pool.stats();
    println!(
        "pool: {} volumes, {} snapshots, {} used of {}",
        st.volumes,
        st.snapshots,
        human(st.used),
        human(st.size)
    );
    std::io::stdout().flush().ok();
    Ok(())
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
