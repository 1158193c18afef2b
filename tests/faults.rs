//! Fault injection: the device fails the Nth read, write or flush, for every N a workload
//! reaches. Each failure is a typed error, a failed write or flush poisons the pool, and
//! reopening gives a committed state no older than the last completed durable operation,
//! with `check()` clean.

mod common;

use common::oracle::Acceptable;
use common::{fixed_workload, Model};
use snapvol::device::{BlockDevice, FaultDevice, FaultKind, MemoryDevice};
use snapvol::{Error, Pool, PoolOptions};
use std::sync::Arc;

fn opts() -> PoolOptions {
    PoolOptions::default()
        .block_size(4096)
        .commit_interval(None)
}

/// Runs the workload with the `n`th I/O of `kind` failing. Returns false once `n` is past
/// the workload's last I/O of that kind.
fn run_with_fault(kind: FaultKind, n: u64) -> bool {
    let mem = Arc::new(MemoryDevice::new(16 << 20));
    let fault = Arc::new(FaultDevice::new(mem.clone()));
    let dev: Arc<dyn BlockDevice> = fault.clone();
    let mut pool = Pool::create(dev.clone(), opts()).unwrap();
    fault.fail_nth(kind, n, false);
    let mut model = Model::default();
    let mut acceptable = Acceptable::new(model.clone());
    let no_reopen = |p: Pool| p;
    let mut failed = None;
    for op in fixed_workload() {
        let before = model.clone();
        acceptable.begin(&before, &op);
        let flushes = fault.seen(FaultKind::Flush);
        match model.apply(pool.clone(), &op, &no_reopen) {
            Ok(p) => {
                pool = p;
                // Durable only if it really committed (a no-op catalog call flushes nothing).
                let durable = op.is_durable() && fault.seen(FaultKind::Flush) > flushes;
                acceptable.done(&model, durable);
            }
            Err(e) => {
                acceptable.interrupted(&before, &op);
                assert!(
                    matches!(e, Error::Io { .. } | Error::Poisoned(_)),
                    "{op:?} under a {kind:?} fault gave {e}"
                );
                failed = Some(op.clone());
                if kind != FaultKind::Read {
                    let err = pool
                        .volumes()
                        .unwrap()
                        .first()
                        .map(|v| pool.volume(&v.name).unwrap().write_at(&[1], 0).unwrap_err());
                    if let Some(err) = err {
                        assert!(
                            matches!(err, Error::Poisoned(_)),
                            "after a failed {kind:?}: {err}"
                        );
                    }
                }
                break;
            }
        }
    }
    let Some(failed_op) = failed else {
        assert_eq!(fault.fired(), 0);
        return false;
    };
    fault.disarm();
    drop(pool);
    let pool = Pool::open(mem.clone(), opts()).unwrap();
    let report = pool.check().unwrap();
    assert!(report.is_clean(), "{kind:?} #{n}: {:?}", report.problems);
    if let Err(misses) = acceptable.find(&pool) {
        panic!("{kind:?} #{n} failing {failed_op:?}: reopened pool matches no state since the last durable point: {misses:?}");
    }
    true
}

#[test]
fn every_write_fault() {
    let mut n = 0;
    while run_with_fault(FaultKind::Write, n) {
        n += 1;
    }
    assert!(n > 20, "workload reached only {n} writes");
}

#[test]
fn every_flush_fault() {
    let mut n = 0;
    while run_with_fault(FaultKind::Flush, n) {
        n += 1;
    }
    assert!(n > 10, "workload reached only {n} flushes");
}

#[test]
fn every_read_fault() {
    let mut n = 0;
    while run_with_fault(FaultKind::Read, n) {
        n += 1;
    }
    assert!(n > 5, "workload reached only {n} reads");
}

/// Every input the operations fuzzer ever failed on, replayed.
#[test]
fn fuzz_regressions_replay() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/operations");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        common::ops_fuzz::run(&data);
        n += 1;
    }
    assert!(n > 0);
}

/// A device read failing anywhere in a send (the extent walk or any reader thread's data) ends
/// the send with that I/O error instead of a short stream or a hang; the pool is unchanged and
/// the next send is whole.
#[test]
fn a_failing_read_ends_the_send_with_an_error() {
    let fault = Arc::new(FaultDevice::new(Arc::new(MemoryDevice::new(64 << 20))));
    let pool = Pool::create(fault.clone(), opts()).unwrap();
    let v = pool.create_volume("v", 24 << 20).unwrap();
    for i in 0..24u64 {
        // Leave holes so the stream has ZERO records between data.
        if i % 5 != 3 {
            v.write_at(&vec![i as u8 + 1; 1 << 20], i << 20).unwrap();
        }
    }
    let id = pool.snapshot("v", "s").unwrap();
    let mut whole = Vec::new();
    pool.send(id, None, &mut whole).unwrap();
    // Armed past the end only to count the reads a send makes.
    fault.fail_nth(FaultKind::Read, u64::MAX, false);
    pool.send(id, None, &mut std::io::sink()).unwrap();
    let reads = fault.seen(FaultKind::Read);
    fault.disarm();
    assert!(reads > 10, "a send made only {reads} device reads");
    for n in [0, 1, 2, reads / 2, reads - 1] {
        for sticky in [false, true] {
            fault.fail_nth(FaultKind::Read, n, sticky);
            let mut out = Vec::new();
            match pool.send(id, None, &mut out) {
                Err(Error::Io { .. }) => {}
                other => panic!("read #{n} failing (sticky {sticky}) gave {other:?}"),
            }
            fault.disarm();
            assert!(out.len() < whole.len());
        }
    }
    let mut again = Vec::new();
    pool.send(id, None, &mut again).unwrap();
    assert_eq!(again, whole);
    assert!(pool.check().unwrap().is_clean());
}

/// A workload of writes (whole blocks, partial blocks, into blocks a snapshot shares) and
/// flushes, with the `n`th device write refused as a full host filesystem refuses it
/// (ENOSPC). The refused operation is a `HostFull` error; the pool is not poisoned: reads of
/// flushed data and of the snapshot work at once, and the same operation retried succeeds.
/// At the end everything is there, after a reopen too, and `check()` is clean. Returns
/// false once `n` is past the workload's writes.
fn run_with_host_full(n: u64) -> bool {
    let mem = Arc::new(MemoryDevice::new(16 << 20));
    let fault = Arc::new(FaultDevice::new(mem.clone()));
    let dev: Arc<dyn BlockDevice> = fault.clone();
    let pool = Pool::create(dev.clone(), opts()).unwrap();
    let vol = pool.create_volume("vm", 1 << 20).unwrap();
    let mut model = vec![0u8; 1 << 20];
    vol.write_at(&[0x11; 65536], 0).unwrap();
    model[..65536].fill(0x11);
    vol.flush().unwrap();
    let snap = pool.snapshot("vm", "before").unwrap();
    let snap_bytes = model.clone();
    fault.fail_nth_with(FaultKind::Write, n, false, libc_enospc());
    let mut refused = 0;
    for i in 0..24u64 {
        let (off, len) = match i % 4 {
            0 => ((i * 40_000) % ((1 << 20) - 8192), 4096), // shared or new, partial
            1 => ((i / 4) * 4096, 4096),                    // a block the snapshot shares
            2 => (200_000 + i * 4096, 4096),                // new blocks, whole
            _ => (500_000 + i * 1000, 3000),                // partial, unaligned
        };
        let byte = (i as u8).wrapping_mul(7).wrapping_add(1);
        let data = vec![byte; len];
        let op = |v: &snapvol::Volume| -> Result<(), Error> {
            v.write_at(&data, off)?;
            if i % 5 == 4 {
                v.flush()?;
            }
            Ok(())
        };
        match op(&vol) {
            Ok(()) => {}
            Err(Error::HostFull { op: what, .. }) => {
                assert_eq!(what, "write");
                refused += 1;
                // Not poisoned: flushed data and the snapshot read at once...
                let mut b = [0u8; 4096];
                pool.snapshot_by_id(snap)
                    .unwrap()
                    .read_at(&mut b, 0)
                    .unwrap();
                assert_eq!(b, [0x11; 4096]);
                // ...and the same operation goes through once the host has room.
                op(&vol)
                    .unwrap_or_else(|e| panic!("retry of op {i} after ENOSPC at write {n}: {e}"));
            }
            Err(e) => panic!("op {i}, ENOSPC at write {n}: {e:?}"),
        }
        model[off as usize..off as usize + len].fill(byte);
    }
    let mut got = vec![0u8; 1 << 20];
    vol.read_at(&mut got, 0).unwrap();
    assert_eq!(got, model, "ENOSPC at write {n}");
    // The refused write may be one of a commit's (flush and check commit first): the
    // commit is refused as a whole, and done again by the retry.
    let mut again = |f: &mut dyn FnMut() -> Result<(), Error>| match f() {
        Err(Error::HostFull { .. }) => {
            refused += 1;
            f().unwrap();
        }
        r => r.unwrap(),
    };
    again(&mut || vol.flush());
    drop(vol);
    let mut clean = false;
    again(&mut || pool.check().map(|r| clean = r.is_clean()));
    assert!(clean, "ENOSPC at write {n}");
    again(&mut || pool.flush());
    drop(pool);
    let fired = fault.fired() > 0;
    assert_eq!(
        fired,
        refused > 0,
        "every refusal was reported, ENOSPC at write {n}"
    );
    let pool = Pool::open(dev, opts()).unwrap();
    let mut got = vec![0u8; 1 << 20];
    pool.volume("vm").unwrap().read_at(&mut got, 0).unwrap();
    assert_eq!(got, model, "after reopening, ENOSPC at write {n}");
    let mut s = vec![0u8; 1 << 20];
    pool.snapshot_by_id(snap)
        .unwrap()
        .read_at(&mut s, 0)
        .unwrap();
    assert_eq!(s, snap_bytes);
    assert!(pool.check().unwrap().is_clean());
    fired
}

/// ENOSPC's number on Linux (no libc in the tests).
fn libc_enospc() -> i32 {
    28
}

#[test]
fn a_full_host_filesystem_refuses_writes_without_poisoning_and_they_succeed_after() {
    let mut n = 0;
    while run_with_host_full(n) {
        n += 1;
    }
    assert!(n > 20, "the workload writes to the device {n} times");
    eprintln!("ENOSPC injected at each of {n} device writes");
}
