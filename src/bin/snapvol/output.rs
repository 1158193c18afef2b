//! The CLI's text output: buffered (a listing of 100,000 rows is a few writes, not one per
//! line), flushed at every line when stdout is a terminal (a person sees progress as it
//! happens), and quiet when the reader went away (`snapvol list pool.img | head -1` ends
//! with status 0 and no message, as the reader asked for no more).

use std::io::{BufWriter, IsTerminal, Stdout, Write};
use std::sync::Mutex;

struct Out {
    w: BufWriter<Stdout>,
    terminal: bool,
}

static OUT: Mutex<Option<Out>> = Mutex::new(None);

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
    with(|o| {
        writeln!(o.w, "{args}")?;
        if o.terminal {
            o.w.flush()?;
        }
        Ok(())
    });
}

/// Writes what is buffered (before exit, and before anything else writes to stdout).
pub fn flush() {
    with(|o| o.w.flush());
}

/// `println!` for the CLI's text output: buffered, and quiet on a closed pipe.
macro_rules! say {
    ($($t:tt)*) => {
        $crate::output::line(format_args!($($t)*))
    };
}
pub(crate) use say;
