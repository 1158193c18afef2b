//! What the side-by-side benches share: a cheap random generator, the round count, the
//! median, and per-call timing.

use std::time::Instant;

/// xorshift64: fast, deterministic offsets.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Rounds per scenario (SNAPVOL_BENCH_ROUNDS, default 8).
pub fn rounds() -> usize {
    std::env::var("SNAPVOL_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Times `n` calls of `op`, in microseconds per call.
pub fn time(n: u64, mut op: impl FnMut(u64)) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        op(i);
    }
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// A named part of a bench, run in a fresh temporary directory.
#[allow(dead_code)] // Not every bench is cut into scenarios.
pub type Scenario = (&'static str, fn(&tempfile::TempDir));

/// Runs the scenarios whose names contain one of the command line's words (all of them
/// without any; the flags cargo bench passes are ignored), each in a fresh directory under
/// SNAPVOL_BENCH_DIR (default the temp dir).
#[allow(dead_code)] // Not every bench is cut into scenarios.
pub fn run_scenarios(scenarios: &[Scenario]) {
    let base = std::env::var("SNAPVOL_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    println!("directory: {} ({} rounds)", base.display(), rounds());
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |name: &str| only.is_empty() || only.iter().any(|o| name.contains(o.as_str()));
    for (name, f) in scenarios {
        if want(name) {
            let dir = tempfile::tempdir_in(&base).unwrap();
            f(&dir);
        }
    }
}

/// A plain file of `size` bytes (sparse), `plain` in `dir`: the baseline side of a bench.
#[allow(dead_code)] // Not every bench compares with a plain file.
pub fn plain_file(dir: &tempfile::TempDir, size: u64) -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("plain"))
        .unwrap();
    f.set_len(size).unwrap();
    f
}
