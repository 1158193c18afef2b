//! Raw images in and out of volumes. Runs of zeros stay unallocated on import and become
//! holes on export, so sparse images stay sparse both ways.

use indicatif::{ProgressBar, ProgressStyle};
use snapvol::image::data_runs;
use snapvol::{Pool, Snapshot, Volume};
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

const CHUNK: usize = 1 << 20;

/// A byte-count progress bar on a terminal, nothing otherwise.
pub fn progress(len: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() || crate::output::forwarded() {
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
    if !std::io::stderr().is_terminal() || crate::output::forwarded() {
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

/// A spinner with the elapsed time on a terminal, for work of unknown size.
pub fn spinner(what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() || crate::output::forwarded() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
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

/// Where an image comes from or goes to: a path, or `-` for stdin/stdout.
fn is_stdio(p: &Path) -> bool {
    p.as_os_str() == "-"
}

/// The length of what an input path holds when it can be known without reading it: a
/// regular file's length or a block device's size; `None` for a pipe or a character device.
fn known_len(file: &mut File) -> std::io::Result<Option<u64>> {
    let ft = file.metadata()?.file_type();
    if ft.is_file() {
        Ok(Some(file.metadata()?.len()))
    } else if ft.is_block_device() {
        // A block device's size is where a seek to its end lands.
        let len = file.seek(SeekFrom::End(0))?;
        file.seek(SeekFrom::Start(0))?;
        Ok(Some(len))
    } else {
        Ok(None)
    }
}

/// Writes a volume or snapshot as a raw image to `out`; returns the bytes of data. A new or
/// existing regular file is rewritten with holes where the source has none; a block device
/// (as large as the source at least) gets every byte, zeros included, since its old contents
/// must not show through; `-`, a pipe or a character device get every byte in order. A file
/// this command created is removed again if the export fails.
pub fn export(src: &Source, out: &Path, granule: usize) -> Result<u64, String> {
    let len = src.len().map_err(|e| e.to_string())?;
    let name = out.display().to_string();
    let ioerr = |e: std::io::Error| format!("{name}: {e}");
    if is_stdio(out) {
        return copy_out(
            src,
            len,
            &mut crate::output::stdout_writer(),
            granule,
            "stdout",
        );
    }
    let existing = std::fs::metadata(out).ok().map(|m| m.file_type());
    match existing {
        Some(ft) if ft.is_block_device() => {
            let mut f = OpenOptions::new().write(true).open(out).map_err(ioerr)?;
            let dev_len = f.seek(SeekFrom::End(0)).map_err(ioerr)?;
            if dev_len < len {
                return Err(format!(
                    "{name}: the device holds {dev_len} bytes, the source {len}: too small"
                ));
            }
            f.seek(SeekFrom::Start(0)).map_err(ioerr)?;
            let data = copy_out(src, len, &mut f, granule, &name)?;
            f.sync_all().map_err(ioerr)?;
            Ok(data)
        }
        Some(ft) if ft.is_fifo() || ft.is_char_device() => {
            let mut f = OpenOptions::new().write(true).open(out).map_err(ioerr)?;
            copy_out(src, len, &mut f, granule, &name)
        }
        _ => {
            let created = existing.is_none();
            let r = export_sparse(src, len, out, granule);
            if r.is_err() && created {
                let _ = std::fs::remove_file(out);
            }
            r
        }
    }
}

/// Streams every byte of the source into `w`, in order; returns the bytes of data.
fn copy_out(
    src: &Source,
    len: u64,
    w: &mut dyn Write,
    granule: usize,
    name: &str,
) -> Result<u64, String> {
    let pb = progress(len, "export");
    let mut buf = vec![0u8; CHUNK];
    let (mut off, mut data) = (0u64, 0u64);
    while off < len {
        let n = (len - off).min(CHUNK as u64) as usize;
        src.read_at(&mut buf[..n], off).map_err(|e| e.to_string())?;
        data += data_runs(&buf[..n], granule)
            .iter()
            .map(|r| r.len() as u64)
            .sum::<u64>();
        w.write_all(&buf[..n]).map_err(|e| format!("{name}: {e}"))?;
        off += n as u64;
        pb.set_position(off);
    }
    w.flush().map_err(|e| format!("{name}: {e}"))?;
    pb.finish_and_clear();
    Ok(data)
}

fn export_sparse(src: &Source, len: u64, out: &Path, granule: usize) -> Result<u64, String> {
    let ioerr = |e: std::io::Error| format!("{}: {e}", out.display());
    let file = File::create(out).map_err(ioerr)?;
    file.set_len(len).map_err(ioerr)?;
    let pb = progress(len, "export");
    let mut buf = vec![0u8; CHUNK];
    let mut data = 0;
    let mut off = 0;
    while off < len {
        let n = (len - off).min(CHUNK as u64) as usize;
        src.read_at(&mut buf[..n], off).map_err(|e| e.to_string())?;
        for r in data_runs(&buf[..n], granule) {
            file.write_all_at(&buf[r.clone()], off + r.start as u64)
                .map_err(ioerr)?;
            data += r.len() as u64;
        }
        off += n as u64;
        pb.set_position(off);
    }
    file.sync_all().map_err(ioerr)?;
    pb.finish_and_clear();
    Ok(data)
}

/// Opens an input path (`-` is stdin) with the length it is known to have, if any.
pub fn open_input(input: &Path) -> Result<(Box<dyn Read>, Option<u64>), String> {
    if is_stdio(input) {
        return Ok((Box::new(std::io::stdin()), None));
    }
    let mut file = File::open(input).map_err(|e| format!("{}: {e}", input.display()))?;
    let len = known_len(&mut file).map_err(|e| format!("{}: {e}", input.display()))?;
    Ok((Box::new(file), len))
}

/// Creates volume `name` from a raw image: a file, a block device, a pipe or `-` (stdin).
/// A stream of unknown length is read to its end unless `size` says how much to take. The
/// volume appears only when the whole image is in (see `Pool::import`).
pub fn import(
    pool: &Pool,
    name: &str,
    input: &Path,
    size: Option<u64>,
) -> Result<snapvol::ImportStats, String> {
    if !is_stdio(input) {
        // A regular file is read by its data extents: its holes cost nothing.
        let file = File::open(input).map_err(|e| format!("{}: {e}", input.display()))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("{}: {e}", input.display()))?;
        if meta.file_type().is_file() && size.is_none_or(|s| s == meta.len()) {
            return pool
                .import_file(name, &file)
                .map_err(|e| format!("{}: {e}", input.display()));
        }
    }
    let (reader, len) = open_input(input)?;
    let size = size.or(len);
    let pb = match size {
        Some(s) => progress(s, "import"),
        None => stream_progress("import"),
    };
    let mut r = Counted {
        inner: std::io::BufReader::with_capacity(CHUNK, reader),
        pb: pb.clone(),
    };
    let stats = pool
        .import(name, &mut r, size)
        .map_err(|e| format!("{}: {e}", input.display()))?;
    pb.finish_and_clear();
    Ok(stats)
}
