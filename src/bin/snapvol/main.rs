//! `snapvol`: drive pools, volumes and snapshots from a shell, as zfs, rbd or qemu-img do.

mod backup;
#[cfg(feature = "nbd")]
mod control;
mod demo;
mod image;
mod json;
mod output;
mod pool_arg;
mod units;

use clap::{Parser, Subcommand};
use json::Value;
use output::{report, say};
use snapvol::device::{FileDevice, FileOptions};
use snapvol::{Pool, PoolOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use units::{human, parse_size};

#[derive(Parser)]
#[command(
    name = "snapvol",
    version,
    about = "Copy-on-write snapshot storage: thin volumes, snapshots, clones"
)]
struct Cli {
    /// Bypass the page cache (O_DIRECT) on the pool's file or block device.
    #[arg(long, global = true)]
    direct: bool,
    /// The pool for any command, in place of its POOL argument (also from the SNAPVOL_POOL
    /// environment variable; the flag wins). Example: SNAPVOL_POOL=pool.img snapvol list
    #[arg(long, global = true, value_name = "PATH")]
    pool: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// `--direct`, read by every command that opens a pool.
static DIRECT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(clap::Args, Clone, Copy)]
struct Output {
    /// Print JSON (stable field names, sizes in bytes).
    #[arg(long)]
    json: bool,
    /// Print sizes in bytes instead of human units.
    #[arg(long)]
    bytes: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pool-wide commands.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Create a thin volume. Example: snapvol create pool.img db --size 20G
    Create {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// Name of the new volume.
        vol: String,
        /// Size: bytes, or with K, M, G, T, P, E (powers of 1024); at most 1E.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Print {id, name, size}.
        #[arg(long)]
        json: bool,
    },
    /// Grow or shrink a volume.
    /// Example: snapvol resize pool.img db --size 40G
    Resize {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// The volume.
        vol: String,
        /// The new size: bytes, or with K, M, G, T, P, E (powers of 1024); at most 1E.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Allow a smaller size: the data past the new end is discarded (qemu-img's rule).
        #[arg(long)]
        shrink: bool,
    },
    /// Rename a volume (its snapshots follow).
    /// Example: snapvol rename pool.img db db-old
    Rename {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// The volume.
        vol: String,
        /// Its new name.
        new_name: String,
    },
    /// Delete a volume or a snapshot (VOL@SNAP).
    /// Example: snapvol destroy pool.img db@mon db@tue db#old
    Destroy {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// Volumes, snapshots (VOL@SNAP, or @ID for one whose volume is gone) and bookmarks
        /// (VOL#BM).
        #[arg(required = true)]
        targets: Vec<String>,
        /// Also destroy a volume's snapshots (a volume that has any is refused otherwise).
        #[arg(short = 'r', long)]
        recursive: bool,
        /// Say what would be destroyed and how many bytes that frees; change nothing.
        #[arg(short = 'n', long)]
        dry_run: bool,
        /// Print {dry_run, destroyed: [name], freed_bytes}.
        #[arg(long)]
        json: bool,
    },
    /// List volumes and snapshots with their space.
    /// Example: snapvol list pool.img db -t snapshot
    List {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// Only this volume, its snapshots and bookmarks.
        vol: Option<String>,
        /// Only these kinds: volume, snapshot, bookmark (repeat or separate with commas).
        #[arg(short = 't', long = "type", value_delimiter = ',')]
        kinds: Vec<String>,
        /// For scripts: no header, tab-separated, times in Unix seconds.
        #[arg(short = 'H')]
        scripted: bool,
        #[command(flatten)]
        out: Output,
    },
    /// Take snapshots; several VOL@SNAP arguments are one atomic group snapshot.
    /// Example: snapvol snapshot pool.img db@mon web@mon
    Snapshot {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// VOL@SNAP, one or more (several are one atomic group snapshot).
        #[arg(required = true)]
        targets: Vec<String>,
        /// Print {snapshots: [{name, id}]}.
        #[arg(long)]
        json: bool,
    },
    /// Clone a volume (frozen now) or a snapshot (VOL@SNAP) into a new writable volume.
    /// Example: snapvol clone pool.img template@v1 vm-042
    Clone {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// A snapshot VOL@SNAP, or a volume (frozen now).
        source: String,
        /// Name of the new volume.
        new_vol: String,
        /// Print {id, name, origin}.
        #[arg(long)]
        json: bool,
    },
    /// Return a volume to one of its snapshots, keeping every snapshot.
    /// Example: snapvol rollback pool.img db@before-upgrade
    Rollback {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// The snapshot to return its volume to: VOL@SNAP.
        target: String,
        /// Print {volume, snapshot, id}.
        #[arg(long)]
        json: bool,
    },
    /// Create a volume from a raw image (a file, a block device, a pipe, or - for stdin);
    /// runs of zeros stay unallocated. The volume appears only once the whole image is in.
    /// Example: snapvol import pool.img template golden.raw
    Import {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// Name of the new volume.
        vol: String,
        /// The image: a file, a block device, a pipe, or - for stdin.
        file: PathBuf,
        /// Bytes to take from a pipe or stdin (default: read to its end).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Print {id, name, size, data_bytes}.
        #[arg(long)]
        json: bool,
    },
    /// Write a volume or snapshot to a raw image: a file (unallocated ranges become holes),
    /// a block device at least as large, a pipe, or - for stdout.
    /// Example: snapvol export pool.img db@mon db-mon.raw
    Export {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// A volume or a snapshot (VOL@SNAP).
        source: String,
        /// Where to: a file, a block device, a pipe, or - for stdout.
        file: PathBuf,
    },
    /// Write FILE's bytes (- for stdin) into a volume at an offset.
    /// Example: snapvol write pool.img db patch.bin --offset 1M
    Write {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// The volume.
        vol: String,
        /// The bytes: a file, or - for stdin.
        file: PathBuf,
        /// Where in the volume to start, in bytes (K, M, G... allowed).
        #[arg(long, value_parser = parse_size, default_value = "0")]
        offset: u64,
    },
    /// Read bytes from a volume or snapshot (to stdout, or -o FILE).
    /// Example: snapvol read pool.img db@mon --offset 4K --length 512 -o sector.bin
    Read {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// A volume or a snapshot (VOL@SNAP).
        source: String,
        /// Where to start, in bytes (K, M, G... allowed).
        #[arg(long, value_parser = parse_size, default_value = "0")]
        offset: u64,
        /// Bytes to read (default: to the end).
        #[arg(long, value_parser = parse_size)]
        length: Option<u64>,
        /// Write the bytes to this file instead of stdout.
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// Changed extents between BASE (VOL@SNAP or bookmark VOL#BM) and TARGET (VOL@SNAP or
    /// VOL).
    /// Example: snapvol diff pool.img db@mon db@tue --json
    Diff {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// The base: a snapshot VOL@SNAP or a bookmark VOL#BM.
        base: String,
        /// The target: a later snapshot VOL@SNAP, or the live volume VOL.
        target: String,
        #[command(flatten)]
        out: Output,
    },
    /// Write a snapshot as a stream (stdout by default); --from sends only the changes.
    /// Example: snapvol send pool.img db@tue --from db@mon -o tue.stream
    Send {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// The snapshot to send: VOL@SNAP.
        snapshot: String,
        /// Base snapshot VOL@SNAP or bookmark VOL#BOOKMARK for an incremental stream.
        #[arg(long)]
        from: Option<String>,
        /// Write the stream to this file instead of stdout (removed again if the send fails).
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        /// Print {id, name, base_id, data_bytes, stream_bytes} (to stderr when the stream
        /// goes to stdout).
        #[arg(long)]
        json: bool,
    },
    /// Apply a stream (stdin by default) into VOL (default: the stream's volume name).
    /// Example: snapvol receive other.img db -i tue.stream
    Receive {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// The volume to create or update (default: the stream's volume name).
        vol: Option<String>,
        /// Read the stream from this file instead of stdin.
        #[arg(short = 'i', long)]
        input: Option<PathBuf>,
        /// Print {volume, snapshot, id, base_id, data_bytes}.
        #[arg(long)]
        json: bool,
    },
    /// Keep VOL@SNAP's id as bookmark VOL#SNAP: incremental sends can start from it after
    /// the snapshot is deleted.
    /// Example: snapvol bookmark pool.img db@mon
    Bookmark {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// The snapshot to keep as a bookmark: VOL@SNAP.
        snapshot: String,
        /// Print {name, id}.
        #[arg(long)]
        json: bool,
    },
    /// Hold the pool and serve it: its volumes (read-write, export name VOL) and snapshots
    /// (read-only, VOL@SNAP) over NBD, and every other snapvol command over a control socket,
    /// until SIGTERM or SIGINT. While it runs, `snapvol snapshot pool.img vm@before` and the
    /// other catalog commands are sent to it and run on the pool it holds. FLUSH from an NBD
    /// client commits the pool.
    /// Example: snapvol serve pool.img --nbd-socket /run/snapvol.sock
    #[cfg(feature = "nbd")]
    #[command(visible_alias = "nbd")]
    Serve {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// TCP address to serve NBD on (loopback unless you trust the network: no TLS).
        #[arg(
            long = "nbd-listen",
            visible_alias = "listen",
            value_name = "ADDR",
            default_value = "127.0.0.1:10809",
            conflicts_with = "nbd_socket"
        )]
        nbd_listen: String,
        /// Serve NBD on this Unix socket instead.
        #[arg(long = "nbd-socket", visible_alias = "socket", value_name = "PATH")]
        nbd_socket: Option<PathBuf>,
        /// The control socket (default: POOL.ctl beside a pool file, /run/snapvol/NAME.ctl
        /// for a block device; SNAPVOL_CONTROL sets it for clients and server alike).
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// NBD connections served at once; more are closed when accepted.
        #[arg(long, default_value_t = 1024, value_name = "N")]
        max_connections: usize,
        /// Close an NBD connection that sends nothing for this many seconds (default:
        /// never; qemu keeps idle connections open by design).
        #[arg(long, value_name = "SECS")]
        idle_timeout: Option<u64>,
        /// Do not offer this volume (VOL) or snapshot (VOL@SNAP) over NBD; repeat for more.
        /// `snapvol reexport` offers it again while the server runs.
        #[arg(long = "no-export", value_name = "NAME")]
        no_export: Vec<String>,
    },
    /// Stop offering a volume (VOL) or snapshot (VOL@SNAP) of a served pool over NBD: its
    /// connections are closed (writes they completed stay) and it is neither listed nor
    /// served until `snapvol reexport` or the server's restart. Only for a pool a running
    /// `snapvol serve` holds.
    /// Example: snapvol unexport pool.img scratch
    #[cfg(feature = "nbd")]
    Unexport {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// The export: VOL or VOL@SNAP.
        name: String,
    },
    /// Offer a volume or snapshot that `snapvol unexport` (or `serve --no-export`) closed
    /// over NBD again.
    /// Example: snapvol reexport pool.img scratch
    #[cfg(feature = "nbd")]
    Reexport {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// The export: VOL or VOL@SNAP.
        name: String,
    },
    /// Serve the pool as a CSI controller (Identity, Controller, GroupController and
    /// SnapshotMetadata services) over gRPC on a Unix socket until SIGTERM or SIGINT.
    /// Example: snapvol csi --pool pool.img --endpoint unix:///run/csi/csi.sock
    #[cfg(feature = "csi")]
    Csi {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// Where to listen: unix:///path/to/csi.sock (CSI_ENDPOINT, as sidecars set it).
        #[arg(long, env = "CSI_ENDPOINT")]
        endpoint: String,
        /// The plugin name GetPluginInfo reports.
        #[arg(long, default_value = snapvol::csi::DEFAULT_DRIVER_NAME)]
        driver_name: String,
        /// Size of a volume created with no capacity range (e.g. 1GiB).
        #[arg(long, default_value = "1GiB", value_parser = units::parse_size)]
        default_size: u64,
        /// Also serve the volumes over NBD on this Unix socket (export names as in
        /// volume_context's snapvol.io/nbd-export), as a node plugin would reach them.
        #[cfg(feature = "nbd")]
        #[arg(long)]
        nbd_socket: Option<PathBuf>,
        /// A backup target snapshot classes may name with the parameter
        /// snapvol.io/backup-target: NAME=DIR, NAME=file:///path or NAME=s3://bucket[/prefix]
        /// (repeat for more; s3 reads --s3-endpoint, --s3-region, --s3-path-style,
        /// --s3-allow-http and the AWS_* variables).
        #[arg(long = "backup-target", value_name = "NAME=TARGET")]
        backup_targets: Vec<String>,
        /// S3 endpoint URL of s3:// backup targets, for stores other than AWS.
        #[arg(long)]
        s3_endpoint: Option<String>,
        /// S3 region of s3:// backup targets.
        #[arg(long)]
        s3_region: Option<String>,
        /// Path-style requests for s3:// backup targets.
        #[arg(long)]
        s3_path_style: bool,
        /// Allow a plain http:// S3 endpoint (a local server: nothing is encrypted).
        #[arg(long)]
        s3_allow_http: bool,
    },
    /// Print a shell completion script: snapvol completions bash > /etc/bash_completion.d/snapvol
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Backups to a directory or S3 repository, restored by snapshot id into any pool.
    Backup {
        #[command(subcommand)]
        cmd: backup::BackupCmd,
        #[command(flatten)]
        s3: backup::S3Flags,
    },
    /// Run the seed's three workflows end to end on sparse file pools in DIR (or a
    /// temporary directory): template clones, snapshot and rollback around an upgrade,
    /// a consistent snapshot under load exported and imported into a second pool.
    /// Example: snapvol demo /tmp/snapvol-demo
    Demo {
        /// A directory for the pools and images (it must not hold the demo's files already;
        /// default: a temporary directory, removed at the end).
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PoolCmd {
    /// Create a pool on a file (created sparse) or a raw block device.
    /// Example: snapvol pool create pool.img --size 100G
    Create {
        /// The pool to create: a new file (created sparse) or a block device.
        path: PathBuf,
        /// Pool size for a file (a block device's size is its own: --size is refused).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Allocation unit for data: 4K to 1M, a power of two (default 4K).
        #[arg(long, value_parser = parse_size)]
        block_size: Option<u64>,
        /// Format a block device even though it holds a pool, a filesystem or a partition
        /// table (everything on it is lost).
        #[arg(long)]
        force: bool,
        /// Reserve the pool file's whole size on the host filesystem now (fallocate), so
        /// writes never find the host full; the pool keeps it reserved.
        #[arg(long)]
        preallocate: bool,
        /// Keep a checksum of every data block and verify it on every read: a damaged block
        /// is reported (and `pool scrub` finds it), never returned as data. Costs: each
        /// overwrite of a committed block is redirected (see BENCHMARKS.md), so off by default.
        #[arg(long, value_name = "on|off", default_value = "off", value_parser = parse_on_off, action = clap::ArgAction::Set)]
        data_checksums: bool,
        /// Guard a pool on a disk several hosts can reach (ZFS's multihost): its writer
        /// commits a heartbeat every MS milliseconds (100 to 60000), and every read-write
        /// open first watches for three of them and refuses the pool if another host's
        /// arrives, so each such open waits 3 × MS. Use with --direct on shared disks.
        #[arg(long, value_name = "MS")]
        multihost: Option<u64>,
        /// Print {id, path, size, block_size, data_checksums}.
        #[arg(long)]
        json: bool,
    },
    /// Grow a pool: a pool file is extended; a block device must be enlarged first.
    /// Example: snapvol pool grow pool.img --size 200G
    Grow {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// The new pool size.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Show pool-wide figures.
    /// Example: snapvol pool info pool.img --json
    Info {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        #[command(flatten)]
        out: Output,
    },
    /// Read every data block once and verify it against its checksum (a pool created with
    /// --data-checksums; without them only unreadable blocks are found). Runs beside I/O;
    /// Ctrl-C stops it and prints where to resume. Exit status 1 when damage is found, 2
    /// when stopped before the end with none found so far.
    /// Example: snapvol pool scrub pool.img
    Scrub {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// Go on from where an interrupted scrub stopped (the position it printed).
        #[arg(long, value_name = "POSITION")]
        resume: Option<String>,
        /// Print {clean, complete, checksums, blocks, bytes, shared_skipped, bad_count,
        /// bad: [{physical, problem, references: [{name, offset}]}], resume}.
        #[arg(long)]
        json: bool,
    },
    /// Verify every page and reference count; exit status 3 when problems are found (1 when
    /// the check itself fails).
    /// Example: snapvol pool check pool.img
    Check {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// Print {clean, nodes, blocks, units, problems}.
        #[arg(long)]
        json: bool,
    },
}

/// What a command reports: success, or the problem that stopped it.
type CmdResult = Result<ExitCode, String>;

fn main() -> ExitCode {
    let args = match pool_arg::place_pool(
        std::env::args_os().collect(),
        std::env::var_os("SNAPVOL_POOL"),
    ) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("snapvol: {msg}");
            return ExitCode::from(2);
        }
    };
    #[cfg_attr(not(feature = "nbd"), allow(unused_mut))]
    let mut cli = Cli::parse_from(args.clone());
    // A pool held by `snapvol serve`: the command runs there, on the pool it holds.
    #[cfg(feature = "nbd")]
    if let Some(pool) = forwarded_pool(&mut cli.cmd) {
        if let Some(code) = control::forward(pool, args.get(1..).unwrap_or_default()) {
            return code;
        }
    } else if let Some(pool) = stdin_pool(&cli.cmd) {
        let sock = control::socket_path(pool);
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            eprintln!(
                "snapvol: {} is held by a running `snapvol serve` (control socket {}): a \
                 command reading stdin is not sent to it; give the input as a file, or stop \
                 the server",
                pool.display(),
                sock.display()
            );
            return ExitCode::FAILURE;
        }
    }
    DIRECT.store(cli.direct, std::sync::atomic::Ordering::Relaxed);
    let r = run(cli.cmd);
    output::flush();
    match r {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("snapvol: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn opts() -> PoolOptions {
    PoolOptions::default().direct_io(DIRECT.load(std::sync::atomic::Ordering::Relaxed))
}

/// The pool `snapvol serve` holds in this process, and its path: commands forwarded to it
/// run on this handle instead of opening the pool.
#[cfg(feature = "nbd")]
static SERVED: std::sync::OnceLock<(PathBuf, Pool)> = std::sync::OnceLock::new();

/// The export marks of the NBD server `snapvol serve` runs in this process (for `unexport`
/// and `reexport`, which only mean something to a running server).
#[cfg(feature = "nbd")]
static SERVED_EXPORTS: std::sync::OnceLock<snapvol::nbd::ExportControl> =
    std::sync::OnceLock::new();

/// The export marks of the server holding the pool at `path`: `unexport` and `reexport` run
/// only there (forwarded over its control socket).
#[cfg(feature = "nbd")]
fn served_exports(path: &Path) -> Result<snapvol::nbd::ExportControl, String> {
    match (served(path), SERVED_EXPORTS.get()) {
        (Some(_), Some(e)) => Ok(e.clone()),
        _ => Err(format!(
            "{}: no `snapvol serve` holds this pool: exports exist only while a server runs \
             (its --no-export NAME keeps a volume off from the start)",
            path.display()
        )),
    }
}

/// The served pool, when `path` names it and this process serves it.
fn served(path: &Path) -> Option<Pool> {
    #[cfg(feature = "nbd")]
    if let Some((p, pool)) = SERVED.get() {
        if control::same_file(p, path) {
            return Some(pool.clone());
        }
    }
    let _ = path;
    None
}

fn open(path: &Path) -> Result<Pool, String> {
    if let Some(p) = served(path) {
        return Ok(p);
    }
    Pool::open_path(path, opts()).map_err(|e| format!("{}: {e}", path.display()))
}

/// For commands that change nothing (list, info, check, read, export, diff, send): they
/// write and flush nothing, share the pool with other such commands, and read a pool file
/// that lost its unused tail.
fn open_read_only(path: &Path) -> Result<Pool, String> {
    if let Some(p) = served(path) {
        return Ok(p);
    }
    Pool::open_path(path, opts().read_only(true)).map_err(|e| format!("{}: {e}", path.display()))
}

/// `VOL@SNAP` -> (VOL, Some(SNAP)); `VOL` -> (VOL, None), by the library's grammar
/// (`snapvol::ObjectName`); a bad name is refused with the library's reason.
fn split_target(t: &str) -> Result<(&str, Option<&str>), String> {
    match t.parse::<snapvol::ObjectName>() {
        Ok(snapvol::ObjectName::Volume(_)) => Ok((t, None)),
        Ok(snapvol::ObjectName::Snapshot { volume, .. }) => {
            Ok((&t[..volume.len()], Some(&t[volume.len() + 1..])))
        }
        Ok(_) => Err(format!("{t:?}: expected VOL or VOL@SNAP")),
        Err(e) => Err(e.to_string()),
    }
}

fn need_snapshot(t: &str) -> Result<(&str, &str), String> {
    match split_target(t)? {
        (v, Some(s)) => Ok((v, s)),
        _ => Err(format!("{t:?} is not a snapshot: expected VOL@SNAP")),
    }
}

fn size_str(bytes: u64, out: Output) -> String {
    if out.bytes {
        bytes.to_string()
    } else {
        human(bytes)
    }
}

/// `snapvol serve` (see its help): holds the pool, serves NBD and the control socket, and
/// on SIGTERM or SIGINT stops taking requests, lets forwarded commands finish, closes every
/// NBD connection, commits, and removes its sockets.
#[cfg(feature = "nbd")]
fn serve(
    path: &Path,
    nbd_listen: &str,
    nbd_socket: Option<PathBuf>,
    control_path: Option<PathBuf>,
    opts: snapvol::nbd::ServerOptions,
) -> CmdResult {
    // Registered first, so a signal that arrives while starting is not lost.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(|err| format!("signal handlers: {err}"))?;
    let pool = open(path)?;
    let ctl = Control::start(path, &pool, control_path)?;
    let started = match &nbd_socket {
        Some(sock) => {
            // A socket file left by a server that was killed refuses connections: replace
            // it. One that answers belongs to a running server: keep it.
            let stale = std::os::unix::net::UnixStream::connect(sock)
                .is_err_and(|err| err.kind() == std::io::ErrorKind::ConnectionRefused);
            if stale {
                let _ = std::fs::remove_file(sock);
            }
            std::os::unix::net::UnixListener::bind(sock)
                .and_then(|l| snapvol::nbd::Server::start_unix(&pool, l, opts))
                .map(|s| (s, sock.display().to_string()))
                .map_err(|err| format!("{}: {err}", sock.display()))
        }
        None => std::net::TcpListener::bind(nbd_listen)
            .and_then(|l| {
                let at = l.local_addr()?;
                snapvol::nbd::Server::start_tcp(&pool, l, opts).map(|s| (s, at.to_string()))
            })
            .map_err(|err| format!("{nbd_listen}: {err}")),
    };
    let (server, at) = match started {
        Ok(s) => s,
        Err(msg) => {
            ctl.stop();
            return Err(msg);
        }
    };
    let _ = SERVED_EXPORTS.set(server.exports());
    report!(
        "snapvol: serving {} over NBD on {at}; control socket {}",
        path.display(),
        ctl.path.display()
    );
    let _ = signals.forever().next();
    ctl.stop();
    let stopped = server.stop();
    if let Some(sock) = &nbd_socket {
        let _ = std::fs::remove_file(sock);
    }
    stopped.map_err(|err| format!("stopping the NBD server: {err}"))?;
    report!("snapvol: stopped; every acknowledged write is committed");
    done(pool)
}

/// A running control socket (see `control`).
#[cfg(feature = "nbd")]
struct Control {
    path: PathBuf,
    inflight: Arc<std::sync::atomic::AtomicUsize>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

#[cfg(feature = "nbd")]
impl Control {
    /// Binds the control socket of the pool at `pool_path` (at `at`, or its default place)
    /// and runs commands sent to it on `pool` from a thread of its own.
    fn start(pool_path: &Path, pool: &Pool, at: Option<PathBuf>) -> Result<Control, String> {
        let path = at.unwrap_or_else(|| control::socket_path(pool_path));
        let l = control::bind(&path)?;
        let _ = SERVED.set((pool_path.to_path_buf(), pool.clone()));
        let c = Control {
            path,
            inflight: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            stopping: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        let (inflight, stopping) = (c.inflight.clone(), c.stopping.clone());
        if let Err(err) = std::thread::Builder::new()
            .name("snapvol-control".into())
            .spawn(move || control_loop(&l, &inflight, &stopping))
        {
            let _ = std::fs::remove_file(&c.path);
            return Err(format!("control thread: {err}"));
        }
        Ok(c)
    }

    /// Takes no new commands and lets the running ones finish (up to a minute: a send
    /// half-done is not abandoned), then removes the socket.
    fn stop(&self) {
        use std::sync::atomic::Ordering;
        self.stopping.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.path);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while self.inflight.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Accepts control connections, each command on its own thread. A failed accept (out of
/// file descriptors, a client gone at once) is waited out, never the end of the server.
#[cfg(feature = "nbd")]
fn control_loop(
    l: &std::os::unix::net::UnixListener,
    inflight: &Arc<std::sync::atomic::AtomicUsize>,
    stopping: &Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    loop {
        let stream = match l.accept() {
            Ok((s, _)) => s,
            Err(_) => {
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        if stopping.load(Ordering::SeqCst) {
            continue;
        }
        inflight.fetch_add(1, Ordering::SeqCst);
        let n = inflight.clone();
        let spawned = std::thread::Builder::new()
            .name("snapvol-command".into())
            .spawn(move || {
                handle_control(stream);
                n.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            inflight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Runs one forwarded command (see `control`).
#[cfg(feature = "nbd")]
fn handle_control(stream: std::os::unix::net::UnixStream) {
    use output::Sink;
    // A client that connects and sends nothing does not hold a thread for long.
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(30)));
    let req = stream
        .try_clone()
        .map_err(|err| err.to_string())
        .and_then(|mut r| control::read_request(&mut r));
    let _ = stream.set_read_timeout(None);
    let terminal = req.as_ref().is_ok_and(|r| r.terminal);
    let mut sink = control::SocketSink::new(stream, terminal);
    let fail = |sink: &mut control::SocketSink, msg: String, code: u8| {
        let _ = sink.err(format!("snapvol: {msg}\n").as_bytes());
        sink.finish(code);
    };
    let req = match req {
        Ok(r) => r,
        Err(msg) => return fail(&mut sink, msg, 2),
    };
    let argv = std::iter::once(std::ffi::OsString::from("snapvol")).chain(req.args);
    let mut cmd = match Cli::try_parse_from(argv) {
        Ok(cli) => cli.cmd,
        Err(err) => {
            let _ = sink.err(err.to_string().as_bytes());
            return sink.finish(u8::try_from(err.exit_code()).unwrap_or(2));
        }
    };
    absolutize(&mut cmd, &req.cwd);
    let Some((held, _)) = SERVED.get() else {
        return fail(&mut sink, "the server is still starting".into(), 1);
    };
    match forwarded_pool(&mut cmd) {
        Some(p) if control::same_file(p, held) => {}
        Some(p) => {
            return fail(
                &mut sink,
                format!("this server holds {}, not {}", held.display(), p.display()),
                1,
            )
        }
        None => {
            return fail(
                &mut sink,
                "this command is not run through a server's control socket (it reads \
                 stdin, or serves): stop the server first, or give a file instead of stdin"
                    .into(),
                1,
            )
        }
    }
    let (code, mut sink) = output::with_sink(Box::new(sink), || {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cmd))) {
            Ok(Ok(code)) => control::exit_status(code),
            Ok(Err(msg)) => {
                report!("snapvol: {msg}");
                1
            }
            Err(_) => {
                report!("snapvol: the command failed inside the server (a bug: please report it)");
                1
            }
        }
    });
    sink.finish(code);
}

/// The pool of a command that runs through a server's control socket when the pool is
/// served, and the other path it names, if any: every command on one pool except those
/// reading stdin and those that serve.
#[cfg(feature = "nbd")]
fn forwarded_paths(cmd: &mut Cmd) -> Option<(&mut PathBuf, Option<&mut PathBuf>)> {
    let stdin = |p: &Path| p.as_os_str() == "-";
    match cmd {
        Cmd::Pool(PoolCmd::Grow { path, .. })
        | Cmd::Pool(PoolCmd::Info { path, .. })
        | Cmd::Pool(PoolCmd::Check { path, .. })
        | Cmd::Pool(PoolCmd::Scrub { path, .. })
        | Cmd::Create { path, .. }
        | Cmd::Resize { path, .. }
        | Cmd::Rename { path, .. }
        | Cmd::Destroy { path, .. }
        | Cmd::List { path, .. }
        | Cmd::Snapshot { path, .. }
        | Cmd::Clone { path, .. }
        | Cmd::Rollback { path, .. }
        | Cmd::Diff { path, .. }
        | Cmd::Unexport { path, .. }
        | Cmd::Reexport { path, .. }
        | Cmd::Bookmark { path, .. } => Some((path, None)),
        Cmd::Backup {
            cmd: backup::BackupCmd::Push { path, .. } | backup::BackupCmd::Restore { path, .. },
            ..
        } => Some((path, None)),
        Cmd::Export { path, file, .. } => Some((path, Some(file))),
        Cmd::Read { path, output, .. } | Cmd::Send { path, output, .. } => {
            Some((path, output.as_mut()))
        }
        Cmd::Import { path, file, .. } | Cmd::Write { path, file, .. } if !stdin(file) => {
            Some((path, Some(file)))
        }
        Cmd::Receive {
            path,
            input: Some(f),
            ..
        } if !stdin(f) => Some((path, Some(f))),
        _ => None,
    }
}

/// See [`forwarded_paths`].
#[cfg(feature = "nbd")]
fn forwarded_pool(cmd: &mut Cmd) -> Option<&Path> {
    forwarded_paths(cmd).map(|(p, _)| p.as_path())
}

/// Makes a forwarded command's paths absolute against the client's working directory
/// (the server's is its own).
#[cfg(feature = "nbd")]
fn absolutize(cmd: &mut Cmd, cwd: &Path) {
    let abs = |p: &mut PathBuf| {
        if p.is_relative() && p.as_os_str() != "-" {
            *p = cwd.join(&*p);
        }
    };
    if let Some((pool, other)) = forwarded_paths(cmd) {
        abs(pool);
        if let Some(o) = other {
            abs(o);
        }
    }
    // A backup target given as a relative directory is the client's too.
    if let Cmd::Backup {
        cmd: backup::BackupCmd::Push { to: t, .. } | backup::BackupCmd::Restore { target: t, .. },
        ..
    } = cmd
    {
        if !t.contains("://") && Path::new(t.as_str()).is_relative() {
            *t = cwd.join(t.as_str()).display().to_string();
        }
    }
}

/// The pool of a command that reads stdin (not forwarded to a server).
#[cfg(feature = "nbd")]
fn stdin_pool(cmd: &Cmd) -> Option<&Path> {
    match cmd {
        Cmd::Import { path, .. } | Cmd::Write { path, .. } | Cmd::Receive { path, .. } => {
            Some(path)
        }
        _ => None,
    }
}

fn done(pool: Pool) -> CmdResult {
    pool.close().map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

fn run(cmd: Cmd) -> CmdResult {
    let e = |err: snapvol::Error| err.to_string();
    match cmd {
        Cmd::Pool(PoolCmd::Create {
            path,
            size,
            block_size,
            force,
            preallocate,
            data_checksums,
            multihost,
            json,
        }) => {
            let mut o = opts()
                .preallocate(preallocate)
                .data_checksums(data_checksums)
                .multihost(multihost.map(std::time::Duration::from_millis));
            if let Some(bs) = block_size {
                o.block_size =
                    u32::try_from(bs).map_err(|_| format!("block size {bs} is too large"))?;
            }
            let is_block = std::fs::metadata(&path)
                .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
                .unwrap_or(false);
            let pool = if is_block {
                if size.is_some() {
                    return Err(format!(
                        "{}: --size is for a pool file; a block device's pool is the device's size",
                        path.display()
                    ));
                }
                let dev = FileDevice::open_with(
                    &path,
                    FileOptions {
                        direct: o.direct_io,
                        read_only: false,
                    },
                )
                .map_err(|err| format!("{}: {err}", path.display()))?;
                let found = snapvol::device::existing_format(&dev)
                    .map_err(|err| format!("{}: {err}", path.display()))?;
                if let (Some(what), false) = (found, force) {
                    return Err(format!(
                        "{} holds {what}; formatting it would destroy that (--force to do it anyway)",
                        path.display()
                    ));
                }
                Pool::create(Arc::new(dev), o)
            } else {
                let size = size.ok_or("--size is required for a pool in a file")?;
                if path.exists() {
                    return Err(format!("{}: already exists", path.display()));
                }
                Pool::create_file(&path, size, o)
            }
            .map_err(|err| format!("{}: {err}", path.display()))?;
            let st = pool.stats();
            if json {
                say!(
                    "{}",
                    Value::Obj(vec![
                        ("id", json::id(st.id)),
                        ("path", Value::Str(path.display().to_string())),
                        ("size", Value::Num(st.size)),
                        ("block_size", Value::Num(u64::from(st.block_size))),
                        ("data_checksums", Value::Bool(st.data_checksums)),
                    ])
                    .render()
                );
            } else {
                say!(
                    "created pool {} ({}, block size {}{})",
                    path.display(),
                    human(st.size),
                    human(u64::from(st.block_size)),
                    if st.data_checksums {
                        ", data checksums"
                    } else {
                        ""
                    }
                );
            }
            done(pool)
        }
        Cmd::Pool(PoolCmd::Grow { path, size }) => {
            let pool = open(&path)?;
            pool.grow(size)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            say!(
                "pool {} is now {}",
                path.display(),
                human(pool.stats().size)
            );
            done(pool)
        }
        Cmd::Pool(PoolCmd::Info { path, out }) => {
            let pool = open_read_only(&path)?;
            let st = pool.stats();
            if out.json {
                say!(
                    "{}",
                    Value::Obj(vec![
                        ("id", json::id(st.id)),
                        ("block_size", Value::Num(u64::from(st.block_size))),
                        ("size", Value::Num(st.size)),
                        ("used", Value::Num(st.used)),
                        ("free", Value::Num(st.free)),
                        ("available", Value::Num(st.available)),
                        ("volumes", Value::Num(st.volumes as u64)),
                        ("snapshots", Value::Num(st.snapshots as u64)),
                        ("generation", Value::Num(st.generation)),
                        ("data_checksums", Value::Bool(st.data_checksums)),
                        (
                            "multihost_ms",
                            st.multihost
                                .map_or(Value::Null, |d| Value::Num(d.as_millis() as u64)),
                        ),
                    ])
                    .render()
                );
            } else {
                say!("pool        {}", path.display());
                say!("id          {:032x}", st.id);
                say!("block size  {}", size_str(u64::from(st.block_size), out));
                say!("size        {}", size_str(st.size, out));
                say!("used        {}", size_str(st.used, out));
                say!("free        {}", size_str(st.free, out));
                say!("available   {}", size_str(st.available, out));
                say!("volumes     {}", st.volumes);
                say!("snapshots   {}", st.snapshots);
                say!("generation  {}", st.generation);
                say!(
                    "checksums   {}",
                    if st.data_checksums {
                        "data and metadata"
                    } else {
                        "metadata only"
                    }
                );
                if let Some(d) = st.multihost {
                    say!("multihost   heartbeat every {} ms", d.as_millis());
                }
            }
            done(pool)
        }
        Cmd::Pool(PoolCmd::Scrub { path, resume, json }) => scrub(&path, resume, json),
        Cmd::Pool(PoolCmd::Check { path, json }) => {
            let pool = open_read_only(&path)?;
            // The check does not know its total in advance: a spinner with the time taken,
            // not a bar that would sit full at "0 B/0 B".
            let pb = image::spinner("check");
            let report = pool
                .check()
                .map_err(|err| format!("{}: {err}", path.display()))?;
            pb.finish_and_clear();
            let problems: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
            if json {
                say!(
                    "{}",
                    Value::Obj(vec![
                        ("clean", Value::Bool(report.is_clean())),
                        ("nodes", Value::Num(report.nodes)),
                        ("blocks", Value::Num(report.blocks)),
                        ("units", Value::Num(report.units)),
                        (
                            "problems",
                            Value::Arr(problems.iter().cloned().map(Value::Str).collect())
                        ),
                    ])
                    .render()
                );
            } else {
                say!(
                    "{}: {} map pages, {} block references, {} units checked, {} problems",
                    path.display(),
                    report.nodes,
                    report.blocks,
                    report.units,
                    problems.len()
                );
                for p in &problems {
                    say!("  {p}");
                }
            }
            let clean = report.is_clean();
            pool.close().map_err(e)?;
            // 3, not 1: "the check ran and found problems" differs from "the check failed".
            Ok(if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
        Cmd::Create {
            path,
            vol,
            size,
            json,
        } => {
            let pool = open(&path)?;
            refuse_existing(&pool, &vol, None)?;
            let v = pool.create_volume(&vol, size).map_err(e)?;
            if json {
                say!(
                    "{}",
                    Value::Obj(vec![
                        ("id", json::id(v.id())),
                        ("name", Value::Str(vol.clone())),
                        ("size", Value::Num(size)),
                    ])
                    .render()
                );
            } else {
                say!("created volume {vol} ({}, id {:032x})", human(size), v.id());
            }
            drop(v);
            done(pool)
        }
        Cmd::Resize {
            path,
            vol,
            size,
            shrink,
        } => {
            let pool = open(&path)?;
            let current = pool.volume(&vol).and_then(|v| v.len()).map_err(e)?;
            if size < current && !shrink {
                return Err(format!(
                    "{vol} is {} and {} is smaller: shrinking discards the data past the new end \
                     (--shrink to do it)",
                    human(current),
                    human(size)
                ));
            }
            pool.resize_volume(&vol, size).map_err(e)?;
            say!("resized volume {vol} to {}", human(size));
            done(pool)
        }
        Cmd::Rename {
            path,
            vol,
            new_name,
        } => {
            let pool = open(&path)?;
            pool.rename_volume(&vol, &new_name).map_err(e)?;
            say!("renamed volume {vol} to {new_name}");
            done(pool)
        }
        Cmd::Destroy {
            path,
            targets,
            recursive,
            dry_run,
            json,
        } => {
            let pool = open(&path)?;
            // Everything is checked before anything is destroyed.
            let mut plan: Vec<(String, Destroy)> = Vec::new();
            for t in &targets {
                let name: snapvol::ObjectName = t.parse().map_err(|err| match err {
                    snapvol::Error::InvalidId { .. } => {
                        format!("{t}: expected @ and a 32-digit hex id")
                    }
                    other => other.to_string(),
                })?;
                match &name {
                    snapvol::ObjectName::Bookmark {
                        volume: v,
                        bookmark: b,
                    } => {
                        pool.bookmark_id(v, b).map_err(e)?;
                        plan.push((t.clone(), Destroy::Bookmark(v.clone(), b.clone())));
                    }
                    // `@ID`: a snapshot by its id (how one of a deleted volume is reached).
                    snapvol::ObjectName::SnapshotId(id) => {
                        pool.snapshot_info(*id).map_err(e)?;
                        plan.push((t.clone(), Destroy::Snapshot(*id)));
                    }
                    snapvol::ObjectName::Snapshot {
                        volume: v,
                        snapshot: s,
                    } => {
                        let id = pool.snapshot_handle(v, s).map_err(e)?.id();
                        plan.push((t.clone(), Destroy::Snapshot(id)));
                    }
                    _ => {
                        let v = t.as_str();
                        let vol = pool.volume(v).map_err(e)?;
                        let snaps = pool.volume_snapshots(vol.id()).map_err(e)?;
                        if !snaps.is_empty() && !recursive {
                            return Err(format!(
                                "{v} has {} snapshots ({}…): -r destroys them with it",
                                snaps.len(),
                                format_args!("{}@{}", snaps[0].volume_name, snaps[0].name)
                            ));
                        }
                        for s in snaps {
                            plan.push((
                                format!("{}@{}", s.volume_name, s.name),
                                Destroy::Snapshot(s.id),
                            ));
                        }
                        plan.push((t.clone(), Destroy::Volume(v.into())));
                    }
                }
            }
            let mut freed = 0u64;
            for (name, what) in &plan {
                let excl = match what {
                    Destroy::Snapshot(id) => pool.snapshot_usage_by_id(*id).map_err(e)?.exclusive,
                    Destroy::Volume(v) => pool.volume_usage(v).map_err(e)?.exclusive,
                    Destroy::Bookmark(..) => 0,
                };
                freed += excl;
                if dry_run {
                    if !json {
                        say!("would destroy {name} (frees {})", human(excl));
                    }
                } else {
                    match what {
                        Destroy::Snapshot(id) => pool.delete_snapshot_by_id(*id).map_err(e)?,
                        Destroy::Volume(v) => pool.delete_volume(v).map_err(e)?,
                        Destroy::Bookmark(v, b) => pool.delete_bookmark(v, b).map_err(e)?,
                    }
                    if !json {
                        say!("destroyed {name}");
                    }
                }
            }
            if json {
                say!(
                    "{}",
                    Value::Obj(vec![
                        ("dry_run", Value::Bool(dry_run)),
                        (
                            "destroyed",
                            Value::Arr(plan.iter().map(|(n, _)| Value::Str(n.clone())).collect())
                        ),
                        ("freed_bytes", Value::Num(freed)),
                    ])
                    .render()
                );
            } else if dry_run {
                say!(
                    "would free at least {} (blocks shared only among the targets come free too)",
                    human(freed)
                );
            }
            done(pool)
        }
        Cmd::List {
            path,
            vol,
            kinds,
            scripted,
            out,
        } => {
            let pool = open_read_only(&path)?;
            list(
                &pool,
                out,
                &ListOpts {
                    volume: vol,
                    kinds,
                    scripted,
                },
            )?;
            done(pool)
        }
        Cmd::Snapshot {
            path,
            targets,
            json,
        } => {
            let pool = open(&path)?;
            let pairs = targets
                .iter()
                .map(|t| need_snapshot(t))
                .collect::<Result<Vec<_>, _>>()?;
            for (v, s) in &pairs {
                refuse_existing(&pool, v, Some(s))?;
            }
            let ids = pool.snapshot_group(&pairs).map_err(e)?;
            if json {
                let items = targets
                    .iter()
                    .zip(&ids)
                    .map(|(t, id)| {
                        Value::Obj(vec![("name", Value::Str(t.clone())), ("id", json::id(*id))])
                    })
                    .collect();
                say!(
                    "{}",
                    Value::Obj(vec![("snapshots", Value::Arr(items))]).render()
                );
            } else {
                for (t, id) in targets.iter().zip(&ids) {
                    say!("snapshot {t} id {id:032x}");
                }
            }
            done(pool)
        }
        Cmd::Clone {
            path,
            source,
            new_vol,
            json,
        } => {
            let pool = open(&path)?;
            refuse_existing(&pool, &new_vol, None)?;
            let (vol, origin) = match split_target(&source)? {
                (v, Some(s)) => (
                    pool.clone_snapshot(v, s, &new_vol).map_err(e)?,
                    pool.snapshot_handle(v, s).map_err(e)?.id().as_u128(),
                ),
                (v, None) => (
                    pool.clone_volume(v, &new_vol).map_err(e)?,
                    pool.volume(v).map_err(e)?.id().as_u128(),
                ),
            };
            if json {
                say!(
                    "{}",
                    Value::Obj(vec![
                        ("id", json::id(vol.id())),
                        ("name", Value::Str(new_vol.clone())),
                        ("origin", json::id(origin)),
                    ])
                    .render()
                );
            } else {
                say!("cloned {source} to {new_vol} (id {:032x})", vol.id());
            }
            drop(vol);
            done(pool)
        }
        Cmd::Rollback { path, target, json } => {
            let pool = open(&path)?;
            let (v, s) = need_snapshot(&target)?;
            let id = pool.snapshot_handle(v, s).map_err(e)?.id();
            pool.rollback(v, s).map_err(e)?;
            if json {
                say!(
                    "{}",
                    Value::Obj(vec![
                        ("volume", Value::Str(v.to_string())),
                        ("snapshot", Value::Str(target.clone())),
                        ("id", json::id(id)),
                    ])
                    .render()
                );
            } else {
                say!("rolled {v} back to {target}");
            }
            done(pool)
        }
        Cmd::Import {
            path,
            vol,
            file,
            size,
            json,
        } => {
            let pool = open(&path)?;
            let stats = image::import(&pool, &vol, &file, size)?;
            if json {
                say!(
                    "{}",
                    Value::Obj(vec![
                        ("id", json::id(stats.volume_id)),
                        ("name", Value::Str(vol.clone())),
                        ("size", Value::Num(stats.size)),
                        ("data_bytes", Value::Num(stats.data_bytes)),
                    ])
                    .render()
                );
                return done(pool);
            }
            say!(
                "imported {} into {vol} ({}, {} of data)",
                file.display(),
                human(stats.size),
                human(stats.data_bytes)
            );
            done(pool)
        }
        Cmd::Export { path, source, file } => {
            let pool = open_read_only(&path)?;
            let src = source_of(&pool, &source)?;
            let data = image::export(&src, &file, pool.block_size() as usize)?;
            // The image may be on stdout: the report goes to stderr then.
            let msg = format!(
                "exported {source} to {} ({} of data)",
                file.display(),
                human(data)
            );
            if file.as_os_str() == "-" {
                report!("{msg}");
            } else {
                say!("{msg}");
            }
            drop(src);
            done(pool)
        }
        Cmd::Write {
            path,
            vol,
            file,
            offset,
        } => {
            let pool = open(&path)?;
            let v = match pool.volume(&vol) {
                Ok(v) => v,
                Err(err @ snapvol::Error::VolumeNotFound(_)) if vol.contains('@') => {
                    return Err(format!("{vol}: snapshots are read-only ({err})"))
                }
                Err(err) => return Err(err.to_string()),
            };
            let (mut input, _) = image::open_input(&file)?;
            let written = write_stream(&v, &mut *input, offset)
                .map_err(|err| format!("{}: {err}", file.display()))?;
            v.flush().map_err(e)?;
            say!("wrote {written} bytes to {vol} at {offset}");
            drop(v);
            done(pool)
        }
        Cmd::Read {
            path,
            source,
            offset,
            length,
            output,
        } => {
            let pool = open_read_only(&path)?;
            let src = source_of(&pool, &source)?;
            let size = src.len().map_err(e)?;
            let length = match length {
                Some(l) => l,
                None => size.checked_sub(offset).ok_or_else(|| {
                    format!("{source}: offset {offset} is beyond the end ({size} bytes)")
                })?,
            };
            if offset.checked_add(length).is_none_or(|end| end > size) {
                return Err(format!(
                    "{source}: range {offset}+{length} is beyond the end ({size} bytes)"
                ));
            }
            match &output {
                Some(f) => {
                    let created = !f.exists();
                    let r = std::fs::File::create(f)
                        .map_err(|err| Failed::Sink(err.to_string()))
                        .and_then(|mut w| read_stream(&src, offset, length, &mut w));
                    if let Err(err) = r {
                        if created {
                            let _ = std::fs::remove_file(f);
                        }
                        return Err(err.name(&source, &f.display().to_string()));
                    }
                }
                None => read_stream(&src, offset, length, &mut output::stdout_writer())
                    .map_err(|err| err.name(&source, "stdout"))?,
            }
            drop(src);
            done(pool)
        }
        Cmd::Diff {
            path,
            base,
            target,
            out,
        } => {
            let pool = open_read_only(&path)?;
            let base_id = base_id(&pool, &base)?;
            let t = match split_target(&target)? {
                (v, Some(s)) => {
                    snapvol::DiffTarget::Snapshot(pool.snapshot_handle(v, s).map_err(e)?.id())
                }
                (v, None) => snapvol::DiffTarget::Volume(pool.volume(v).map_err(e)?.id()),
            };
            let page = pool
                .delta(base_id, t, 0, 0, snapvol::TupleLength::Variable)
                .map_err(e)?;
            let kind = |k: snapvol::ExtentKind| match k {
                snapvol::ExtentKind::Data => "data",
                snapvol::ExtentKind::Zero => "zero",
            };
            if out.json {
                let ext = page
                    .extents
                    .iter()
                    .map(|x| {
                        Value::Obj(vec![
                            ("offset", Value::Num(x.offset)),
                            ("length", Value::Num(x.length)),
                            ("kind", Value::Str(kind(x.kind).into())),
                        ])
                    })
                    .collect();
                say!(
                    "{}",
                    Value::Obj(vec![
                        ("volume_size", Value::Num(page.volume_size)),
                        ("block_size", Value::Num(page.block_size)),
                        ("extents", Value::Arr(ext)),
                    ])
                    .render()
                );
            } else {
                let changed: u64 = page.extents.iter().map(|x| x.length).sum();
                for x in &page.extents {
                    say!(
                        "{:>14} {:>12} {}",
                        x.offset,
                        size_str(x.length, out),
                        kind(x.kind)
                    );
                }
                say!(
                    "{} extents, {} changed of {}",
                    page.extents.len(),
                    size_str(changed, out),
                    size_str(page.volume_size, out)
                );
            }
            done(pool)
        }
        Cmd::Send {
            path,
            snapshot,
            from,
            output,
            json,
        } => {
            let pool = open_read_only(&path)?;
            let (v, s) = need_snapshot(&snapshot)?;
            let id = pool.snapshot_handle(v, s).map_err(e)?.id();
            let base = from.as_deref().map(|b| base_id(&pool, b)).transpose()?;
            // The stream's size is about the data it carries, known from the block maps
            // before anything is read: the bar gets a total and an ETA.
            let page = match base {
                Some(b) => pool.delta(
                    b,
                    snapvol::DiffTarget::Snapshot(id),
                    0,
                    0,
                    snapvol::TupleLength::Variable,
                ),
                None => pool.allocated(
                    snapvol::DiffTarget::Snapshot(id),
                    0,
                    0,
                    snapvol::TupleLength::Variable,
                ),
            }
            .map_err(e)?;
            let total: u64 = page
                .extents
                .iter()
                .filter(|x| x.kind == snapvol::ExtentKind::Data)
                .map(|x| x.length)
                .sum();
            let pb = image::progress(total, "send");
            let stats = match &output {
                Some(f) => {
                    let created = !f.exists();
                    let file = std::fs::File::create(f)
                        .map_err(|err| format!("{}: {err}", f.display()))?;
                    let inner = std::io::BufWriter::with_capacity(1 << 20, file);
                    let mut w = image::Counted {
                        inner,
                        pb: pb.clone(),
                    };
                    // A stream cut short is of no use to anyone: a failed send removes it.
                    let sent = pool.send(id, base, &mut w).and_then(|st| {
                        let file = w.inner.into_inner().map_err(|err| snapvol::Error::Io {
                            op: "stream write",
                            offset: 0,
                            source: err.into_error(),
                        })?;
                        file.sync_all().map_err(|err| snapvol::Error::Io {
                            op: "stream sync",
                            offset: 0,
                            source: err,
                        })?;
                        Ok(st)
                    });
                    match sent {
                        Ok(st) => st,
                        Err(err) => {
                            if created {
                                let _ = std::fs::remove_file(f);
                            }
                            return Err(format!("{}: {err}", f.display()));
                        }
                    }
                }
                None => {
                    if output::stdout_is_terminal() {
                        return Err(
                            "refusing to write a binary stream to a terminal: use -o FILE or a pipe"
                                .into(),
                        );
                    }
                    let inner = std::io::BufWriter::with_capacity(1 << 20, output::stdout_writer());
                    let mut w = image::Counted {
                        inner,
                        pb: pb.clone(),
                    };
                    pool.send(id, base, &mut w).map_err(e)?
                }
            };
            pb.finish_and_clear();
            if json {
                let report = Value::Obj(vec![
                    ("id", json::id(id)),
                    ("name", Value::Str(snapshot.clone())),
                    (
                        "base_id",
                        base.map_or(Value::Null, |b| json::id(b.as_u128())),
                    ),
                    ("data_bytes", Value::Num(stats.data_bytes)),
                    ("stream_bytes", Value::Num(stats.stream_bytes)),
                ])
                .render();
                // stdout may be the stream itself.
                if output.is_some() {
                    say!("{report}");
                } else {
                    report!("{report}");
                }
            } else {
                report!(
                    "sent {snapshot}{}: {} of data, {} zero ranges, {} stream",
                    from.map(|f| format!(" from {f}")).unwrap_or_default(),
                    human(stats.data_bytes),
                    stats.zero_records,
                    human(stats.stream_bytes)
                );
            }
            done(pool)
        }
        Cmd::Receive {
            path,
            vol,
            input,
            json,
        } => {
            let pool = open(&path)?;
            let pb = match input
                .as_ref()
                .and_then(|f| std::fs::metadata(f).ok())
                .filter(|m| m.is_file())
            {
                Some(m) => image::progress(m.len(), "receive"),
                None => image::stream_progress("receive"),
            };
            let stats = match &input {
                Some(f) => {
                    let file =
                        std::fs::File::open(f).map_err(|err| format!("{}: {err}", f.display()))?;
                    let inner = std::io::BufReader::with_capacity(1 << 20, file);
                    let mut r = image::Counted {
                        inner,
                        pb: pb.clone(),
                    };
                    pool.receive(&mut r, vol.as_deref()).map_err(e)?
                }
                None => {
                    let stdin = std::io::stdin();
                    let inner = std::io::BufReader::with_capacity(1 << 20, stdin.lock());
                    let mut r = image::Counted {
                        inner,
                        pb: pb.clone(),
                    };
                    pool.receive(&mut r, vol.as_deref()).map_err(e)?
                }
            };
            pb.finish_and_clear();
            if json {
                say!(
                    "{}",
                    Value::Obj(vec![
                        ("volume", Value::Str(stats.volume.clone())),
                        (
                            "snapshot",
                            Value::Str(format!("{}@{}", stats.volume, stats.snapshot))
                        ),
                        ("id", json::id(stats.snapshot_id)),
                        ("base_id", stats.base_id.map_or(Value::Null, json::id)),
                        ("data_bytes", Value::Num(stats.data_bytes)),
                    ])
                    .render()
                );
            } else {
                say!(
                    "received {}@{} (id {:032x}, {} of data)",
                    stats.volume,
                    stats.snapshot,
                    stats.snapshot_id,
                    human(stats.data_bytes)
                );
            }
            done(pool)
        }
        Cmd::Bookmark {
            path,
            snapshot,
            json,
        } => {
            let pool = open(&path)?;
            let (v, s) = need_snapshot(&snapshot)?;
            let id = pool.bookmark(v, s).map_err(e)?;
            if json {
                say!(
                    "{}",
                    Value::Obj(vec![
                        ("name", Value::Str(format!("{v}#{s}"))),
                        ("id", json::id(id)),
                    ])
                    .render()
                );
            } else {
                say!("bookmark {v}#{s} id {id:032x}");
            }
            done(pool)
        }
        #[cfg(feature = "nbd")]
        #[cfg(feature = "nbd")]
        Cmd::Serve {
            path,
            nbd_listen,
            nbd_socket,
            control,
            max_connections,
            idle_timeout,
            no_export,
        } => serve(
            &path,
            &nbd_listen,
            nbd_socket,
            control,
            no_export.into_iter().fold(
                snapvol::nbd::ServerOptions::default()
                    .max_connections(max_connections.max(1))
                    .idle_timeout(idle_timeout.map(std::time::Duration::from_secs)),
                |o, name| o.closed_export(name),
            ),
        ),
        #[cfg(feature = "nbd")]
        Cmd::Unexport { path, name } => {
            let exports = served_exports(&path)?;
            let closed = exports
                .close(&name)
                .map_err(|err| format!("{}: {err}", path.display()))?;
            report!(
                "unexported {name} ({closed} connection{} closed); `snapvol reexport` offers it again",
                if closed == 1 { "" } else { "s" }
            );
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "nbd")]
        Cmd::Reexport { path, name } => {
            let exports = served_exports(&path)?;
            let was = exports
                .reopen(&name)
                .map_err(|err| format!("{}: {err}", path.display()))?;
            if was {
                report!("exported {name} again");
            } else {
                report!("{name} was exported already");
            }
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "csi")]
        Cmd::Csi {
            path,
            endpoint,
            driver_name,
            default_size,
            #[cfg(feature = "nbd")]
            nbd_socket,
            backup_targets,
            s3_endpoint,
            s3_region,
            s3_path_style,
            s3_allow_http,
        } => {
            let s3 = backup::S3Flags::new(s3_endpoint, s3_region, s3_path_style, s3_allow_http);
            let mut opts = snapvol::csi::CsiOptions::default()
                .driver_name(driver_name)
                .default_volume_size(default_size)
                .stop_on_signal(true);
            for spec in &backup_targets {
                let Some((name, at)) = spec.split_once('=') else {
                    return Err(format!(
                        "--backup-target {spec:?}: expected NAME=TARGET, e.g. offsite=s3://backups/cluster-a"
                    ));
                };
                let t = backup::target(at, &s3)?;
                opts = opts.backup_target(name, t).map_err(|e| e.to_string())?;
            }
            let pool = open(&path)?;
            // One process holds the pool for CSI, NBD and the CLI (its control socket).
            #[cfg(feature = "nbd")]
            let ctl = match Control::start(&path, &pool, None) {
                Ok(c) => Some(c),
                Err(msg) => {
                    // CSI does not need it: the driver serves on without.
                    report!("snapvol: no control socket for the CLI: {msg}");
                    None
                }
            };
            #[cfg(feature = "nbd")]
            let nbd = match nbd_socket {
                Some(sock) => {
                    let l = std::os::unix::net::UnixListener::bind(&sock)
                        .map_err(|err| format!("{}: {err}", sock.display()))?;
                    eprintln!(
                        "snapvol: serving the volumes over NBD on {}",
                        sock.display()
                    );
                    let opts = snapvol::nbd::ServerOptions::default();
                    let server = snapvol::nbd::Server::start_unix(&pool, l, opts)
                        .map_err(|err| format!("NBD server: {err}"))?;
                    // `unexport` / `reexport` reach this server too.
                    let _ = SERVED_EXPORTS.set(server.exports());
                    Some((server, sock))
                }
                None => None,
            };
            let sock = snapvol::csi::endpoint_path(&endpoint).map_err(|e| e.to_string())?;
            let server = snapvol::csi::Server::start_unix(&pool, &sock, opts)
                .map_err(|e| format!("{}: {e}", sock.display()))?;
            eprintln!(
                "snapvol: serving {} as a CSI controller on {}",
                path.display(),
                sock.display()
            );
            let served = server.wait().map_err(|e| format!("CSI server: {e}"));
            #[cfg(feature = "nbd")]
            if let Some(c) = ctl {
                c.stop();
            }
            #[cfg(feature = "nbd")]
            if let Some((nbd, sock)) = nbd {
                nbd.stop().map_err(|e| format!("NBD server: {e}"))?;
                let _ = std::fs::remove_file(sock);
            }
            served?;
            done(pool)
        }
        Cmd::Backup { cmd, s3 } => backup::run(cmd, &s3),
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "snapvol", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo { dir } => demo::run(dir).map(|_| ExitCode::SUCCESS),
    }
}

/// The library takes creating what exists as done (CSI's idempotency); an operator who
/// types `create` or `snapshot` for a name that is taken made a mistake, and is told.
fn refuse_existing(pool: &Pool, vol: &str, snap: Option<&str>) -> Result<(), String> {
    let (kind, name, taken) = match snap {
        None => ("volume", vol.to_string(), pool.volume(vol).is_ok()),
        Some(s) => (
            "snapshot",
            format!("{vol}@{s}"),
            pool.volume(vol)
                .and_then(|v| pool.volume_snapshots(v.id()))
                .is_ok_and(|all| all.iter().any(|x| x.name == s)),
        ),
    };
    if taken {
        return Err(snapvol::Error::AlreadyExists {
            kind,
            name,
            conflict: String::new(),
        }
        .to_string());
    }
    Ok(())
}

/// One thing `destroy` removes.
enum Destroy {
    Snapshot(snapvol::SnapshotId),
    Volume(String),
    Bookmark(String, String),
}

/// Bytes per step of `read` and `write`: their memory whatever the length.
const STEP: usize = 1 << 20;

/// Copies `length` bytes at `offset` of a volume or snapshot to `w`, a step at a time.
/// Which side of a copy failed, so the message names the right one.
enum Failed {
    Source(String),
    Sink(String),
}

impl Failed {
    fn name(self, source: &str, sink: &str) -> String {
        match self {
            Failed::Source(e) => format!("{source}: {e}"),
            Failed::Sink(e) => format!("{sink}: {e}"),
        }
    }
}

fn read_stream(
    src: &image::Source,
    offset: u64,
    length: u64,
    w: &mut dyn Write,
) -> Result<(), Failed> {
    let mut buf = vec![0u8; STEP.min(usize::try_from(length).unwrap_or(STEP))];
    let mut done = 0u64;
    while done < length {
        let n = (length - done).min(buf.len() as u64) as usize;
        src.read_at(&mut buf[..n], offset + done)
            .map_err(|e| Failed::Source(e.to_string()))?;
        w.write_all(&buf[..n])
            .map_err(|e| Failed::Sink(e.to_string()))?;
        done += n as u64;
    }
    w.flush().map_err(|e| Failed::Sink(e.to_string()))
}

/// Writes everything `input` holds into `v` from `offset`, a step at a time; returns the
/// bytes written.
fn write_stream(
    v: &snapvol::Volume,
    input: &mut dyn std::io::Read,
    offset: u64,
) -> Result<u64, String> {
    let mut buf = vec![0u8; STEP];
    let mut done = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(done),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        };
        let at = offset
            .checked_add(done)
            .ok_or_else(|| "offset overflows".to_string())?;
        v.write_at(&buf[..n], at).map_err(|e| e.to_string())?;
        done += n as u64;
    }
}

/// The id of a base given as VOL@SNAP or VOL#BM. A snapshot that is gone but left a bookmark
/// gets an error that says so.
fn base_id(pool: &Pool, base: &str) -> Result<snapvol::Base, String> {
    if let Ok(snapvol::ObjectName::Bookmark { volume, bookmark }) = base.parse() {
        return pool
            .bookmark_id(&volume, &bookmark)
            .map(snapvol::Base::Bookmark)
            .map_err(|e| e.to_string());
    }
    let (v, s) = need_snapshot(base)?;
    match pool.snapshot_handle(v, s) {
        Ok(h) => Ok(snapvol::Base::Snapshot(h.id())),
        Err(err @ snapvol::Error::SnapshotNotFound(_)) => match pool.bookmark_id(v, s) {
            Ok(_) => Err(format!(
                "the base snapshot {base} was destroyed; its bookmark {v}#{s} can be the base"
            )),
            Err(_) => Err(err.to_string()),
        },
        Err(err) => Err(err.to_string()),
    }
}

fn source_of(pool: &Pool, source: &str) -> Result<image::Source, String> {
    Ok(match split_target(source)? {
        (v, Some(s)) => {
            image::Source::Snapshot(pool.snapshot_handle(v, s).map_err(|e| e.to_string())?)
        }
        (v, None) => image::Source::Volume(pool.volume(v).map_err(|e| e.to_string())?),
    })
}

/// What `list` shows: which volume, which kinds, for people or for scripts.
struct ListOpts {
    volume: Option<String>,
    kinds: Vec<String>,
    scripted: bool,
}

/// One row of `list`.
struct Row {
    kind: &'static str,
    id: u128,
    name: String,
    /// The volume it belongs to, for sorting.
    volume: String,
    usage: Option<snapvol::Usage>,
    size: u64,
    created: u64,
    /// Orders a volume's snapshots and bookmarks by age (a bookmark has its snapshot's).
    generation: u64,
    origin: String,
    volume_gone: bool,
}

/// A Unix time as local date and time, as people read it.
fn local_time(unix: u64) -> String {
    use chrono::TimeZone;
    match chrono::Local.timestamp_opt(unix as i64, 0) {
        chrono::LocalResult::Single(t) | chrono::LocalResult::Ambiguous(t, _) => {
            t.format("%Y-%m-%d %H:%M").to_string()
        }
        chrono::LocalResult::None => unix.to_string(),
    }
}

fn list(pool: &Pool, out: Output, opts: &ListOpts) -> Result<(), String> {
    let e = |err: snapvol::Error| err.to_string();
    for k in &opts.kinds {
        if !["volume", "snapshot", "bookmark"].contains(&k.as_str()) {
            return Err(format!("-t {k}: expected volume, snapshot or bookmark"));
        }
    }
    let want = |k: &str| opts.kinds.is_empty() || opts.kinds.iter().any(|x| x == k);
    let of_volume = |v: &str| opts.volume.as_deref().is_none_or(|w| w == v);
    // The catalog is read once; the filters and lookups below work on these copies.
    let (all_vols, all_snaps, all_bms) = (
        pool.volumes().map_err(|e| e.to_string())?,
        pool.snapshots().map_err(|e| e.to_string())?,
        pool.bookmarks().map_err(|e| e.to_string())?,
    );
    if let Some(v) = &opts.volume {
        let known = all_vols.iter().any(|x| &x.name == v)
            || all_snaps.iter().any(|x| &x.volume_name == v)
            || all_bms.iter().any(|x| &x.volume_name == v);
        if !known {
            return Err(snapvol::Error::VolumeNotFound(v.clone().into()).to_string());
        }
    }
    let live: std::collections::HashSet<u128> = all_vols.iter().map(|v| v.id.as_u128()).collect();
    let names: std::collections::HashMap<u128, String> = all_vols
        .iter()
        .map(|v| (v.id.as_u128(), v.name.clone()))
        .chain(
            all_snaps
                .iter()
                .map(|s| (s.id.as_u128(), format!("{}@{}", s.volume_name, s.name))),
        )
        .collect();
    let vols: Vec<_> = all_vols
        .into_iter()
        .filter(|v| of_volume(&v.name))
        .collect();
    let snaps: Vec<_> = all_snaps
        .into_iter()
        .filter(|s| of_volume(&s.volume_name))
        .collect();
    let bms: Vec<_> = all_bms
        .into_iter()
        .filter(|b| of_volume(&b.volume_name))
        .collect();
    let mut rows = Vec::new();
    if want("volume") {
        for v in &vols {
            rows.push(Row {
                kind: "volume",
                id: v.id.as_u128(),
                name: v.name.clone(),
                volume: v.name.clone(),
                usage: Some(pool.volume_usage(&v.name).map_err(e)?),
                size: v.size,
                created: v.created_unix,
                generation: 0,
                origin: v.origin.map_or("-".into(), |o| {
                    names
                        .get(&o.as_u128())
                        .cloned()
                        .unwrap_or_else(|| format!("{:032x}", o.as_u128()))
                }),
                volume_gone: false,
            });
        }
    }
    if want("snapshot") {
        for s in &snaps {
            rows.push(Row {
                kind: "snapshot",
                id: s.id.as_u128(),
                name: format!("{}@{}", s.volume_name, s.name),
                volume: s.volume_name.clone(),
                usage: Some(pool.snapshot_usage_by_id(s.id).map_err(e)?),
                size: s.size,
                created: s.created_unix,
                generation: s.generation,
                origin: "-".into(),
                volume_gone: !live.contains(&s.volume_id.as_u128()),
            });
        }
    }
    if want("bookmark") {
        for b in &bms {
            rows.push(Row {
                kind: "bookmark",
                id: b.id.as_u128(),
                name: format!("{}#{}", b.volume_name, b.name),
                volume: b.volume_name.clone(),
                usage: None,
                size: b.size,
                created: b.created_unix,
                generation: b.generation,
                origin: "-".into(),
                volume_gone: !live.contains(&b.volume_id.as_u128()),
            });
        }
    }
    // By volume, the volume first, then its snapshots and bookmarks oldest first. Oldest by
    // generation, not by creation second: a bookmark made a second after its snapshot has
    // the snapshot's generation and belongs beside it (ordering by seconds made the order
    // depend on when the clock ticked).
    rows.sort_by(|a, b| {
        (
            &a.volume,
            a.kind != "volume",
            a.generation,
            a.created,
            &a.name,
        )
            .cmp(&(
                &b.volume,
                b.kind != "volume",
                b.generation,
                b.created,
                &b.name,
            ))
    });
    if out.json {
        let mut volumes = Vec::new();
        let mut snapshots = Vec::new();
        let mut bookmarks = Vec::new();
        let gen = |id: u128| {
            snaps
                .iter()
                .find(|s| s.id.as_u128() == id)
                .map(|s| s.generation)
                .or_else(|| {
                    bms.iter()
                        .find(|b| b.id.as_u128() == id)
                        .map(|b| b.generation)
                })
                .unwrap_or(0)
        };
        for r in &rows {
            let u = r.usage.unwrap_or_default();
            match r.kind {
                "volume" => volumes.push(Value::Obj(vec![
                    ("id", json::id(r.id)),
                    ("name", Value::Str(r.name.clone())),
                    (
                        "origin",
                        vols.iter()
                            .find(|v| v.id.as_u128() == r.id)
                            .and_then(|v| v.origin)
                            .map_or(Value::Null, |o| json::id(o.as_u128())),
                    ),
                    ("size", Value::Num(u.logical)),
                    ("allocated", Value::Num(u.allocated)),
                    ("exclusive", Value::Num(u.exclusive)),
                    ("shared", Value::Num(u.shared)),
                    ("created", Value::Num(r.created)),
                ])),
                "snapshot" => snapshots.push(Value::Obj(vec![
                    ("id", json::id(r.id)),
                    ("name", Value::Str(r.name.clone())),
                    (
                        "volume_id",
                        json::id(
                            snaps
                                .iter()
                                .find(|s| s.id.as_u128() == r.id)
                                .map_or(0, |s| s.volume_id.as_u128()),
                        ),
                    ),
                    ("volume_deleted", Value::Bool(r.volume_gone)),
                    ("size", Value::Num(u.logical)),
                    ("allocated", Value::Num(u.allocated)),
                    ("exclusive", Value::Num(u.exclusive)),
                    ("shared", Value::Num(u.shared)),
                    ("created", Value::Num(r.created)),
                    ("generation", Value::Num(gen(r.id))),
                ])),
                _ => bookmarks.push(Value::Obj(vec![
                    ("id", json::id(r.id)),
                    ("name", Value::Str(r.name.clone())),
                    (
                        "volume_id",
                        json::id(
                            bms.iter()
                                .find(|b| b.id.as_u128() == r.id)
                                .map_or(0, |b| b.volume_id.as_u128()),
                        ),
                    ),
                    ("size", Value::Num(r.size)),
                    ("created", Value::Num(r.created)),
                    ("generation", Value::Num(gen(r.id))),
                ])),
            }
        }
        say!(
            "{}",
            Value::Obj(vec![
                ("volumes", Value::Arr(volumes)),
                ("snapshots", Value::Arr(snapshots)),
                ("bookmarks", Value::Arr(bookmarks)),
            ])
            .render()
        );
        return Ok(());
    }
    let dash = || "-".to_string();
    // Scripts get bytes, as --bytes gives.
    let out = Output {
        bytes: out.bytes || opts.scripted,
        ..out
    };
    let cells = |r: &Row| -> Vec<String> {
        let u = r.usage;
        let name = if r.volume_gone {
            format!("{} (volume deleted)", r.name)
        } else {
            r.name.clone()
        };
        vec![
            format!("{:032x}", r.id),
            r.kind.to_string(),
            name,
            size_str(r.size, out),
            u.map_or_else(dash, |u| size_str(u.allocated, out)),
            u.map_or_else(dash, |u| size_str(u.exclusive, out)),
            u.map_or_else(dash, |u| size_str(u.shared, out)),
            if opts.scripted {
                r.created.to_string()
            } else {
                local_time(r.created)
            },
            r.origin.clone(),
        ]
    };
    if opts.scripted {
        // For scripts: no header, one tab between fields, times in Unix seconds.
        for r in &rows {
            say!("{}", cells(r).join("\t"));
        }
        return Ok(());
    }
    say!(
        "{:<32} {:<8} {:<28} {:>10} {:>10} {:>10} {:>10} {:<16} ORIGIN",
        "ID",
        "TYPE",
        "NAME",
        "SIZE",
        "ALLOC",
        "EXCL",
        "SHARED",
        "CREATED"
    );
    for r in &rows {
        let c = cells(r);
        say!(
            "{} {:<8} {:<28} {:>10} {:>10} {:>10} {:>10} {:<16} {}",
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            c[5],
            c[6],
            c[7],
            c[8]
        );
    }
    Ok(())
}

/// "on" or "off".
fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("{other:?}: say on or off")),
    }
}

/// `snapvol pool scrub`.
fn scrub(path: &Path, resume: Option<String>, json: bool) -> CmdResult {
    use std::sync::atomic::{AtomicBool, Ordering};
    let from = resume
        .map(|r| r.parse::<snapvol::ScrubCursor>())
        .transpose()
        .map_err(|e| e.to_string())?;
    let pool = open_read_only(path)?;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    // Only a scrub run by this process takes Ctrl-C; one forwarded to a server is not
    // this process's to stop.
    if !output::forwarded() {
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(sig, stop.clone()).map_err(|e| e.to_string())?;
        }
    }
    let pb = image::progress(pool.stats().used, "scrub");
    let report = pool
        .scrub(from.as_ref(), |p| {
            pb.set_position(p.bytes);
            if stop.load(Ordering::Relaxed) {
                std::ops::ControlFlow::Break(())
            } else {
                std::ops::ControlFlow::Continue(())
            }
        })
        .map_err(|err| format!("{}: {err}", path.display()))?;
    pb.finish_and_clear();
    let problem = |p: &snapvol::BlockProblem| match p {
        snapvol::BlockProblem::Mismatch { expected, found } => {
            format!("checksum {found:08x}, expected {expected:08x}")
        }
        snapvol::BlockProblem::Unreadable(why) => format!("unreadable: {why}"),
        other => format!("{other:?}"),
    };
    if json {
        let bad = report
            .bad
            .iter()
            .map(|b| {
                Value::Obj(vec![
                    ("physical", Value::Num(b.physical)),
                    ("problem", Value::Str(problem(&b.problem))),
                    (
                        "references",
                        Value::Arr(
                            b.references
                                .iter()
                                .map(|r| {
                                    Value::Obj(vec![
                                        ("name", Value::Str(r.name.clone())),
                                        ("offset", Value::Num(r.offset)),
                                    ])
                                })
                                .collect(),
                        ),
                    ),
                ])
            })
            .collect();
        say!(
            "{}",
            Value::Obj(vec![
                ("clean", Value::Bool(report.is_clean())),
                ("complete", Value::Bool(report.resume.is_none())),
                ("checksums", Value::Bool(report.checksums)),
                ("blocks", Value::Num(report.blocks)),
                ("bytes", Value::Num(report.bytes)),
                ("shared_skipped", Value::Num(report.shared_skipped)),
                ("bad_count", Value::Num(report.bad_count)),
                ("bad", Value::Arr(bad)),
                (
                    "resume",
                    report
                        .resume
                        .map_or(Value::Null, |c| Value::Str(c.to_string()))
                ),
            ])
            .render()
        );
    } else {
        if !report.checksums {
            report!(
                "snapvol: {} has no data checksums: the scrub finds only blocks the device cannot read",
                path.display()
            );
        }
        say!(
            "{}: {} blocks ({}) verified, {} references to shared blocks not read again, {} bad",
            path.display(),
            report.blocks,
            human(report.bytes),
            report.shared_skipped,
            report.bad_count
        );
        for b in &report.bad {
            let refs: Vec<String> = b
                .references
                .iter()
                .map(|r| format!("{} at byte {}", r.name, r.offset))
                .collect();
            say!(
                "  bad block at device byte {}: {}; in {}",
                b.physical,
                problem(&b.problem),
                if refs.is_empty() {
                    "nothing now (rewritten since)".to_string()
                } else {
                    refs.join(", ")
                }
            );
        }
        if let Some(c) = &report.resume {
            say!(
                "stopped before the end; go on with: snapvol pool scrub {} --resume {c}",
                path.display()
            );
        }
    }
    let (damaged, stopped) = (report.bad_count > 0, report.resume.is_some());
    pool.close().map_err(|e| e.to_string())?;
    Ok(match (damaged, stopped) {
        (true, _) => ExitCode::from(1),
        (false, true) => ExitCode::from(2),
        (false, false) => ExitCode::SUCCESS,
    })
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// clap checks a command's definition only when that command is parsed: two flags
    /// of one name (a global one and a subcommand's own) panic at run time for just that
    /// subcommand. This walks every subcommand of the build under test.
    #[test]
    fn every_subcommand_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
