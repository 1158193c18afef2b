//! The operations-with-faults check shared by the `operations` fuzz target and the regression
//! test that replays every input the fuzzer ever failed on (fuzz/regressions/operations/).

use super::oracle::Acceptable;
use super::{Model, Op};
use snapvol::device::{BlockDevice, FaultDevice, FaultKind, MemoryDevice};
use snapvol::{Error, Pool, PoolOptions};
use std::sync::Arc;

fn opts() -> PoolOptions {
    PoolOptions::default()
        .block_size(4096)
        .commit_interval(None)
}

enum Step {
    Op(Op),
    Fault(FaultKind, u64),
}

fn decode(data: &[u8]) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut it = data.chunks_exact(6);
    for c in &mut it {
        let a = c[1] as usize;
        let n = u32::from_le_bytes([c[2], c[3], c[4], c[5]]) as u64;
        let op = match c[0] % 17 {
            0 => Op::Create {
                size: 1 + n % super::MAX_VOL,
            },
            1..=4 => Op::Write {
                vol: a,
                offset: n,
                len: 1 + u64::from(c[4]) * 300,
                seed: c[5],
            },
            5 => Op::Discard {
                vol: a,
                offset: n,
                len: 1 + u64::from(c[3]) * 2000,
            },
            6 => Op::Flush,
            7 => Op::Snapshot { vol: a },
            8 => Op::GroupSnapshot {
                a,
                b: c[2] as usize,
            },
            9 => Op::CloneSnapshot { snap: a },
            10 => Op::CloneVolume { vol: a },
            11 => Op::Rollback {
                vol: a,
                snap: c[2] as usize,
            },
            12 => Op::DeleteVolume { vol: a },
            13 => Op::DeleteSnapshot { snap: a },
            14 => Op::Resize {
                vol: a,
                size: 1 + n % super::MAX_VOL,
            },
            15 => Op::Rename { vol: a },
            // The checks that change nothing ride on the fault code's spare bit (so the
            // older inputs in fuzz/regressions mostly keep their meaning).
            _ if c[2] & 0x80 != 0 => match c[3] % 3 {
                0 => Op::Bookmark { snap: a },
                1 => Op::SendReceive {
                    snap: a,
                    base: (c[4] % 2 == 0).then_some(c[5] as usize),
                },
                _ => Op::Delta {
                    a,
                    b: c[4] as usize,
                },
            },
            _ => {
                let kind = [FaultKind::Read, FaultKind::Write, FaultKind::Flush][a % 3];
                steps.push(Step::Fault(kind, n % 64));
                continue;
            }
        };
        steps.push(Step::Op(op));
    }
    steps
}

/// Runs the operations and faults `data` decodes to; panics on any violation.
pub fn run(data: &[u8]) {
    let mem = Arc::new(MemoryDevice::new(16 << 20));
    let fault = Arc::new(FaultDevice::new(mem.clone()));
    let dev: Arc<dyn BlockDevice> = fault.clone();
    let mut pool = Pool::create(dev.clone(), opts()).unwrap();
    let mut model = Model::default();
    let mut acceptable = Acceptable::new(model.clone());
    let reopen = |p: Pool| {
        drop(p);
        Pool::open(dev.clone(), opts()).unwrap()
    };
    let mut log: Vec<String> = Vec::new();
    for step in decode(data) {
        let op = match step {
            Step::Fault(kind, n) => {
                log.push(format!("fault {kind:?} #{n}"));
                fault.fail_nth(kind, n, false);
                continue;
            }
            Step::Op(Op::Reopen) => continue,
            Step::Op(op) => op,
        };
        let before = model.clone();
        acceptable.begin(&before, &op);
        log.push(format!("{op:?}"));
        let flushes = fault.seen(FaultKind::Flush);
        match model.apply(pool.clone(), &op, &reopen) {
            Ok(p) => {
                pool = p;
                // Durable only if it really committed (a no-op catalog call flushes nothing).
                let durable = op.is_durable() && fault.seen(FaultKind::Flush) > flushes;
                acceptable.done(&model, durable);
            }
            Err(e) => {
                assert!(
                    matches!(e, Error::Io { .. } | Error::Poisoned(_)),
                    "{op:?}: {e}"
                );
                acceptable.interrupted(&before, &op);
                fault.disarm();
                drop(pool);
                pool = Pool::open(dev.clone(), opts()).unwrap();
                let report = pool.check().unwrap();
                assert!(report.is_clean(), "{:?}", report.problems);
                model = acceptable.find(&pool).unwrap_or_else(|why| {
                    panic!("after {op:?} failed with {e}: reopened pool matches no allowed state: {why:?}\nlog: {log:?}")
                });
                // Reopening read the state back: it is what the media holds now.
                acceptable = Acceptable::new(model.clone());
            }
        }
    }
    fault.disarm();
    drop(pool);
    let pool = Pool::open(mem.clone(), opts()).unwrap();
    let report = pool.check().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    if let Err(why) = acceptable.find(&pool) {
        panic!("at the end: the reopened pool matches no allowed state: {why:?}\nlog: {log:?}");
    }
}
