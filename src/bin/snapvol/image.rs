//! Raw images in and out of volumes. Runs of zeros stay unallocated on import and become
//! holes on export, so sparse images stay sparse both ways.

use indicatif::{ProgressBar, ProgressStyle};
use snapvol::{Pool, Snapshot, Volume};
use std::fs::File;
use std::io::IsTerminal;
use std::os::unix::fs::FileExt;
use std::path::Path;

const CHUNK: usize = 1 << 20;

/// A byte-count progress bar on a terminal, nothing otherwise.
pub fn progress(len: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

/// A byte counter on a terminal for streams of unknown length (send, receive).
pub fn stream_progress(what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec}") {
        pb.set_style(style);
    }
    pb.set_message(what.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    pb
}

/// Counts the bytes passing through a reader or writer into a progress bar.
pub struct Counted<T> {
    pub inner: T,
    pub pb: ProgressBar,
}

impl<W: std::io::Write> std::io::Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.pb.inc(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pb.inc(n as u64);
        Ok(n)
    }
}

/// Either side of an export: a volume or a snapshot.
pub enum Source {
    Volume(Volume),
    Snapshot(Snapshot),
}

impl Source {
    pub fn len(&self) -> snapvol::Result<u64> {
        match self {
            Source::Volume(v) => v.len(),
            Source::Snapshot(s) => s.len(),
        }
    }

    pub fn read_at(&self, buf: &mut [u8], off: u64) -> snapvol::Result<()> {
        match self {
            Source::Volume(v) => v.read_at(buf, off),
            Source::Snapshot(s) => s.read_at(buf, off),
        }
    }
}

/// Yields the non-zero runs of `buf`, at `granule` granularity, as byte ranges.
fn data_runs(buf: &[u8], granule: usize) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, g) in buf.chunks(granule).enumerate() {
        if g.iter().all(|&b| b == 0) {
            continue;
        }
        let (s, e) = (i * granule, i * granule + g.len());
        match runs.last_mut() {
            Some(r) if r.end == s => r.end = e,
            _ => runs.push(s..e),
        }
    }
    runs
}

/// Writes a volume or snapshot to `out` as a raw image; returns the bytes of data written.
pub fn export(src: &Source, out: &Path, granule: usize) -> Result<u64, String> {
    let len = src.len().map_err(|e| e.to_string())?;
    let file = File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    file.set_len(len)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    let pb = progress(len, "export");
    let mut buf = vec![0u8; CHUNK];
    let mut data = 0;
    let mut off = 0;
    while off < len {
        let n = (len - off).min(CHUNK as u64) as usize;
        src.read_at(&mut buf[..n], off).map_err(|e| e.to_string())?;
        for r in data_runs(&buf[..n], granule) {
            file.write_all_at(&buf[r.clone()], off + r.start as u64)
                .map_err(|e| format!("{}: {e}", out.display()))?;
            data += r.len() as u64;
        }
        off += n as u64;
        pb.set_position(off);
    }
    file.sync_all()
        .map_err(|e| format!("{}: {e}", out.display()))?;
    pb.finish_and_clear();
    Ok(data)
}

/// Creates volume `name` from a raw image; returns the bytes of data written.
pub fn import(pool: &Pool, name: &str, input: &Path) -> Result<u64, String> {
    let file = File::open(input).map_err(|e| format!("{}: {e}", input.display()))?;
    let len = file
        .metadata()
        .map_err(|e| format!("{}: {e}", input.display()))?
        .len();
    let vol = pool.create_volume(name, len).map_err(|e| e.to_string())?;
    let granule = pool.block_size() as usize;
    let pb = progress(len, "import");
    let mut buf = vec![0u8; CHUNK];
    let mut data = 0;
    let mut off = 0;
    let result = (|| {
        while off < len {
            let n = (len - off).min(CHUNK as u64) as usize;
            file.read_exact_at(&mut buf[..n], off)
                .map_err(|e| format!("{}: {e}", input.display()))?;
            for r in data_runs(&buf[..n], granule) {
                vol.write_at(&buf[r.clone()], off + r.start as u64)
                    .map_err(|e| e.to_string())?;
                data += r.len() as u64;
            }
            off += n as u64;
            pb.set_position(off);
        }
        vol.flush().map_err(|e| e.to_string())
    })();
    pb.finish_and_clear();
    if let Err(e) = result {
        // Leave no half-imported volume behind.
        drop(vol);
        let _ = pool.delete_volume(name);
        return Err(e);
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    #[test]
    fn runs() {
        let mut b = vec![0u8; 16];
        b[5] = 1;
        b[6] = 1;
        b[13] = 1;
        assert_eq!(super::data_runs(&b, 4), vec![4..8, 12..16]);
        b[9] = 1;
        assert_eq!(super::data_runs(&b, 4), vec![4..16]);
    }
}
