//! The CLI's text output: buffered (a listing of 100,000 rows is a few writes, not one per
//! line), flushed at every line when stdout is a terminal (a person sees progress as it
//! happens), and quiet when the reader went away (`snapvol list pool.img | head -1` ends
//! with status 0 and no message, as the reader asked for no more).
//!
//! Inside `snapvol serve`, a command forwarded over the control socket runs on a thread of
//! the server with a [`Sink`] installed: its stdout and stderr go back to the client that
//! sent it, not to the server's own.

use std::cell::RefCell;
use std::io::{BufWriter, IsTerminal, Stdout, Write};
use std::sync::Mutex;

struct Out {
    w: BufWriter<Stdout>,
    terminal: bool,
}

static OUT: Mutex<Option<Out>> = Mutex::new(None);

/// Where a forwarded command's output goes (see the module docs).
#[cfg_attr(not(feature = "nbd"), allow(dead_code))]
pub trait Sink {
    /// Bytes for the client's stdout.
    fn out(&mut self, b: &[u8]) -> std::io::Result<()>;
    /// Bytes for the client's stderr.
    fn err(&mut self, b: &[u8]) -> std::io::Result<()>;
    /// Whether the client's stdout is a terminal.
    fn out_is_terminal(&self) -> bool;
    /// Ends the answer with exit status `code`.
    fn finish(&mut self, code: u8);
}

thread_local! {
    static SINK: RefCell<Option<Box<dyn Sink>>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's output going to `sink`; returns the sink afterwards.
#[cfg_attr(not(feature = "nbd"), allow(dead_code))]
pub fn with_sink<T>(sink: Box<dyn Sink>, f: impl FnOnce() -> T) -> (T, Box<dyn Sink>) {
    SINK.with(|s| *s.borrow_mut() = Some(sink));
    let r = f();
    let sink = SINK
        .with(|s| s.borrow_mut().take())
        .expect("installed above, taken only here");
    (r, sink)
}

/// Runs `f` on this thread's sink, if one is installed.
fn on_sink(f: impl FnOnce(&mut dyn Sink) -> std::io::Result<()>) -> Option<std::io::Result<()>> {
    SINK.with(|s| s.borrow_mut().as_mut().map(|sink| f(&mut **sink)))
}

fn with(f: impl FnOnce(&mut Out) -> std::io::Result<()>) {
    let mut g = OUT.lock().unwrap_or_else(|p| p.into_inner());
    let out = g.get_or_insert_with(|| Out {
        w: BufWriter::with_capacity(64 << 10, std::io::stdout()),
        terminal: std::io::stdout().is_terminal(),
    });
    if let Err(e) = f(out) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("snapvol: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// Writes one line of text output.
pub fn line(args: std::fmt::Arguments<'_>) {
    // A forwarded command's client that went away just stops hearing it.
    if on_sink(|s| s.out(format!("{args}\n").as_bytes())).is_some() {
        return;
    }
    with(|o| {
        writeln!(o.w, "{args}")?;
        if o.terminal {
            o.w.flush()?;
        }
        Ok(())
    });
}

/// Writes one line to stderr (reports that must not mix with data on stdout).
pub fn warn_line(args: std::fmt::Arguments<'_>) {
    if on_sink(|s| s.err(format!("{args}\n").as_bytes())).is_some() {
        return;
    }
    // Text already buffered for stdout goes first, so the two keep their order on a
    // terminal that shows both.
    flush();
    eprintln!("{args}");
}

/// Whether this thread runs a forwarded command (no progress bars on the server's terminal).
pub fn forwarded() -> bool {
    SINK.with(|s| s.borrow().is_some())
}

/// Whether stdout (the client's, for a forwarded command) is a terminal.
pub fn stdout_is_terminal() -> bool {
    SINK.with(|s| s.borrow().as_ref().map(|sink| sink.out_is_terminal()))
        .unwrap_or_else(|| std::io::stdout().is_terminal())
}

/// A writer for binary output on stdout (a stream, a volume's bytes).
pub fn stdout_writer() -> Box<dyn Write> {
    if SINK.with(|s| s.borrow().is_some()) {
        Box::new(SinkWriter)
    } else {
        flush();
        Box::new(std::io::stdout().lock())
    }
}

/// Binary stdout of a forwarded command.
struct SinkWriter;

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        on_sink(|s| s.out(buf)).unwrap_or(Ok(()))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes what is buffered (before exit, and before anything else writes to stdout).
pub fn flush() {
    if SINK.with(|s| s.borrow().is_some()) {
        return;
    }
    with(|o| o.w.flush());
}

/// `println!` for the CLI's text output: buffered, and quiet on a closed pipe.
macro_rules! say {
    ($($t:tt)*) => {
        $crate::output::line(format_args!($($t)*))
    };
}
pub(crate) use say;

/// `eprintln!` for a command's reports: to the client's stderr when forwarded.
macro_rules! report {
    ($($t:tt)*) => {
        $crate::output::warn_line(format_args!($($t)*))
    };
}
pub(crate) use report;
