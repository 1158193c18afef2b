//! `snapvol backup`: push snapshots to a repository on a directory or S3, restore them by
//! snapshot id into any pool, and keep the repository (list, verify, delete, prune, gc).

use crate::json::{self, Value};
use crate::output::say;
use crate::units::{human, parse_size};
use clap::{Args, Subcommand};
use indicatif::ProgressBar;
use snapvol::backup::{
    BackupInfo, BaseChoice, Compression, DirTarget, RepoOptions, Repository, RestoreOptions,
    Retention, Target,
};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// How to reach an `s3://` target (also from the standard `AWS_*` variables).
#[derive(Args, Clone, Default)]
pub struct S3Flags {
    /// S3 endpoint URL, for stores other than AWS (MinIO, Ceph RGW, moto).
    #[arg(long, global = true)]
    endpoint: Option<String>,
    /// S3 region.
    #[arg(long, global = true)]
    region: Option<String>,
    /// Path-style requests (endpoint/bucket/key), as most self-hosted stores need.
    #[arg(long, global = true)]
    path_style: bool,
    /// Allow a plain http:// endpoint (a local server: nothing is encrypted).
    #[arg(long, global = true)]
    allow_http: bool,
    /// Chunks transferred at once (default: twice the cores, at most 16).
    #[arg(long, global = true)]
    jobs: Option<usize>,
}

impl S3Flags {
    /// S3 settings given under other flag names (`snapvol csi` has its own `--endpoint`).
    #[cfg_attr(not(feature = "csi"), allow(dead_code))]
    pub fn new(
        endpoint: Option<String>,
        region: Option<String>,
        path_style: bool,
        allow_http: bool,
    ) -> Self {
        S3Flags {
            endpoint,
            region,
            path_style,
            allow_http,
            jobs: None,
        }
    }
}

#[derive(Subcommand)]
pub enum BackupCmd {
    /// Create a repository (push creates one with the defaults if there is none).
    /// Example: snapvol backup init s3://backups/cluster-a --chunk-size 4M
    Init {
        /// A directory, file:///path, or s3://bucket[/prefix].
        target: String,
        /// Bytes of volume per chunk, 64K to 64M, a power of two.
        #[arg(long, value_parser = parse_size, default_value = "4M")]
        chunk_size: u64,
        /// How chunks are stored: none or lz4 (a chunk that does not shrink is kept as is).
        #[arg(long, default_value = "lz4")]
        compression: String,
    },
    /// Back up snapshot VOL@SNAP: only the chunks covering the change since the base are
    /// read, and only those the repository lacks are uploaded. Example:
    /// snapvol backup push pool.img db@mon --to /backups
    Push {
        /// The pool: a pool file or block device (or give it once with --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// The snapshot to back up: VOL@SNAP.
        snapshot: String,
        /// The repository: a directory, file:///path, or s3://bucket[/prefix].
        #[arg(long)]
        to: String,
        /// auto (the newest backed-up snapshot or bookmark of the volume), none (full), or
        /// VOL@SNAP / VOL#BOOKMARK.
        #[arg(long, default_value = "auto")]
        base: String,
        /// Print what was read and uploaded (see the README's --json table).
        #[arg(long)]
        json: bool,
    },
    /// List the repository's backups.
    /// Example: snapvol backup list /backups --json
    List {
        /// The repository: a directory, file:///path, or s3://bucket[/prefix].
        target: String,
        /// Print {backups: [...]}.
        #[arg(long)]
        json: bool,
    },
    /// Restore backup ID (the snapshot id, 32 hex digits) into POOL, as VOL (default: the
    /// backed-up volume's name). Example: snapvol backup restore s3://b/p 0123… pool.img
    Restore {
        /// The repository: a directory, file:///path, or s3://bucket[/prefix].
        target: String,
        /// The backup: its snapshot id (32 hex digits), as `backup list` shows.
        id: String,
        /// The pool to restore into: a pool file or block device (or --pool or SNAPVOL_POOL).
        path: PathBuf,
        /// Name of the volume to create (default: the backed-up volume's name).
        vol: Option<String>,
        /// Also create this writable volume from the restored snapshot.
        #[arg(long)]
        clone: Option<String>,
        /// Print what was restored and downloaded (see the README's --json table).
        #[arg(long)]
        json: bool,
    },
    /// Re-read every manifest and re-hash its chunks; exit status 1 on any problem.
    /// Example: snapvol backup verify s3://backups/cluster-a --sample 10
    Verify {
        /// The repository: a directory, file:///path, or s3://bucket[/prefix].
        target: String,
        /// One backup to verify (default: every backup).
        id: Option<String>,
        /// Check this percentage of the chunks, chosen at random (default: all).
        #[arg(long, default_value = "100")]
        sample: f64,
        /// Print {clean, backups, chunks_checked, bytes_checked, problems}.
        #[arg(long)]
        json: bool,
    },
    /// Delete backup ID (the others stay restorable; gc frees its chunks).
    /// Example: snapvol backup delete /backups 0123…cdef
    Delete {
        /// The repository: a directory, file:///path, or s3://bucket[/prefix].
        target: String,
        /// The backup: its snapshot id (32 hex digits), as `backup list` shows.
        id: String,
    },
    /// Delete the backups no rule keeps, per volume.
    /// Example: snapvol backup prune /backups --keep-last 7 --keep-daily 30
    Prune {
        /// The repository: a directory, file:///path, or s3://bucket[/prefix].
        target: String,
        /// Keep the newest N backups of each volume.
        #[arg(long, default_value = "0")]
        keep_last: usize,
        /// Keep the newest backup of each of the last N days that have one.
        #[arg(long, default_value = "0")]
        keep_daily: usize,
        /// Keep the newest backup of each of the last N weeks that have one.
        #[arg(long, default_value = "0")]
        keep_weekly: usize,
        /// Say what would be kept and removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print {dry_run, kept, removed}.
        #[arg(long)]
        json: bool,
    },
    /// Remove chunks no backup references that are older than the grace period.
    /// Example: snapvol backup gc /backups
    Gc {
        /// The repository: a directory, file:///path, or s3://bucket[/prefix].
        target: String,
        /// 30s, 15m, 24h, 7d (default 24h).
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        grace: Duration,
        /// Print {manifests, referenced, removed, removed_bytes, young, leftovers}.
        #[arg(long)]
        json: bool,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("bad duration {s:?}: expected a number and s, m, h or d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("bad duration {s:?}: unknown unit {unit:?}")),
    };
    n.checked_mul(mult)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("bad duration {s:?}: too long"))
}

fn parse_id(s: &str) -> Result<snapvol::SnapshotId, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not a backup id (32 hex digits)"))
}

/// The target a repository argument names (a directory, file:///path or s3://…).
pub fn target(spec: &str, s3: &S3Flags) -> Result<Arc<dyn Target>, String> {
    if let Some(rest) = spec.strip_prefix("s3://") {
        return s3_target(rest, s3);
    }
    let path = spec.strip_prefix("file://").unwrap_or(spec);
    Ok(Arc::new(
        DirTarget::new(path).map_err(|e| format!("{spec}: {e}"))?,
    ))
}

#[cfg(feature = "s3")]
fn s3_target(rest: &str, f: &S3Flags) -> Result<Arc<dyn Target>, String> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let endpoint = f
        .endpoint
        .clone()
        .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
    let opts = snapvol::backup::S3Options {
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        endpoint,
        region: f.region.clone(),
        path_style: f.path_style,
        allow_http: f.allow_http,
        ..Default::default()
    };
    Ok(Arc::new(
        snapvol::backup::S3Target::new(&opts).map_err(|e| e.to_string())?,
    ))
}

#[cfg(not(feature = "s3"))]
fn s3_target(rest: &str, _: &S3Flags) -> Result<Arc<dyn Target>, String> {
    Err(format!(
        "s3://{rest}: this snapvol was built without S3 support (cargo install --features s3)"
    ))
}

fn open_repo(spec: &str, s3: &S3Flags, pb: Option<&ProgressBar>) -> Result<Repository, String> {
    let mut r = Repository::open(target(spec, s3)?).map_err(|e| format!("{spec}: {e}"))?;
    if let Some(j) = s3.jobs {
        r.set_parallelism(j);
    }
    if let Some(pb) = pb {
        r.set_progress(progress_fn(pb));
    }
    Ok(r)
}

fn progress_fn(pb: &ProgressBar) -> snapvol::backup::ProgressFn {
    let pb = pb.clone();
    Arc::new(move |_, done, total| {
        if total > 0 {
            pb.set_length(total);
        }
        pb.set_position(done);
    })
}

fn info_json(b: &BackupInfo) -> Value {
    Value::Obj(vec![
        ("id", json::id(b.id)),
        ("volume", Value::Str(b.volume.clone())),
        ("snapshot", Value::Str(b.snapshot.clone())),
        ("size", Value::Num(b.size)),
        ("base_id", b.base_id.map_or(Value::Null, json::id)),
        ("chunks", Value::Num(b.chunks)),
        ("created", Value::Num(b.created_unix)),
    ])
}

/// The fields push and restore reports share: which backup, of what, from which base.
fn backup_fields(
    id: snapvol::SnapshotId,
    volume: &str,
    snapshot: &str,
    base: Option<snapvol::SnapshotId>,
    chunks: u64,
) -> Vec<(&'static str, Value)> {
    vec![
        ("id", json::id(id)),
        ("volume", Value::Str(volume.to_string())),
        ("snapshot", Value::Str(format!("{volume}@{snapshot}"))),
        ("base_id", base.map_or(Value::Null, json::id)),
        ("chunks", Value::Num(chunks)),
    ]
}

pub fn run(cmd: BackupCmd, s3: &S3Flags) -> Result<ExitCode, String> {
    let e = |err: snapvol::Error| err.to_string();
    match cmd {
        BackupCmd::Init {
            target: spec,
            chunk_size,
            compression,
        } => {
            let compression = match compression.as_str() {
                "none" => Compression::None,
                "lz4" => Compression::Lz4,
                other => return Err(format!("unknown compression {other:?} (none or lz4)")),
            };
            let chunk_size = u32::try_from(chunk_size)
                .map_err(|_| format!("chunk size {chunk_size} is too large"))?;
            let r = Repository::create(
                target(&spec, s3)?,
                &RepoOptions {
                    chunk_size,
                    compression,
                },
            )
            .map_err(|err| format!("{spec}: {err}"))?;
            say!(
                "created backup repository {spec} (id {:032x}, chunks of {})",
                r.config().id,
                human(u64::from(chunk_size))
            );
            Ok(ExitCode::SUCCESS)
        }
        BackupCmd::Push {
            path,
            snapshot,
            to,
            base,
            json,
        } => {
            let pool = crate::open(&path)?;
            let (v, s) = crate::need_snapshot(&snapshot)?;
            let id = pool.snapshot_handle(v, s).map_err(e)?.id();
            let base = match base.as_str() {
                "auto" => BaseChoice::Auto,
                "none" => BaseChoice::Full,
                other => BaseChoice::From(crate::base_id(&pool, other)?),
            };
            let pb = crate::image::progress(0, "push");
            let mut r = Repository::open_or_create(target(&to, s3)?, &RepoOptions::default())
                .map_err(|err| format!("{to}: {err}"))?;
            r.set_progress(progress_fn(&pb));
            if let Some(j) = s3.jobs {
                r.set_parallelism(j);
            }
            let st = r
                .push(&pool, id, base)
                .map_err(|err| format!("{to}: {err}"))?;
            pb.finish_and_clear();
            if json {
                say!(
                    "{}",
                    {
                        let mut f =
                            backup_fields(st.id, &st.volume, &st.snapshot, st.base_id, st.chunks);
                        f.extend([
                            ("read_chunks", Value::Num(st.read_chunks)),
                            ("uploaded_chunks", Value::Num(st.uploaded_chunks)),
                            ("uploaded_bytes", Value::Num(st.uploaded_bytes)),
                            ("already_present", Value::Bool(st.already_present)),
                        ]);
                        Value::Obj(f)
                    }
                    .render()
                );
            } else if st.already_present {
                say!("{snapshot} (id {id:032x}) is already backed up in {to}");
            } else {
                say!(
                    "pushed {snapshot} (id {id:032x}) to {to}: {}, {} chunks read, {} uploaded ({})",
                    st.base_id
                        .map_or("full".to_string(), |b| format!("incremental from {b:032x}")),
                    st.read_chunks,
                    st.uploaded_chunks,
                    human(st.uploaded_bytes)
                );
            }
            crate::done(pool)
        }
        BackupCmd::List { target: spec, json } => {
            let r = open_repo(&spec, s3, None)?;
            let list = r.list().map_err(e)?;
            if json {
                let items = list.iter().map(info_json).collect();
                say!(
                    "{}",
                    Value::Obj(vec![("backups", Value::Arr(items))]).render()
                );
            } else {
                say!(
                    "{:<32} {:<32} {:>10} {:>8} {:>11} BASE",
                    "ID",
                    "SNAPSHOT",
                    "SIZE",
                    "CHUNKS",
                    "CREATED"
                );
                for b in &list {
                    say!(
                        "{:032x} {:<32} {:>10} {:>8} {:>11} {}",
                        b.id,
                        format!("{}@{}", b.volume, b.snapshot),
                        human(b.size),
                        b.chunks,
                        b.created_unix,
                        b.base_id.map_or("-".into(), |x| format!("{x:032x}"))
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        BackupCmd::Restore {
            target: spec,
            id,
            path,
            vol,
            clone,
            json,
        } => {
            let id = parse_id(&id)?;
            let pool = crate::open(&path)?;
            let pb = crate::image::progress(0, "restore");
            let r = open_repo(&spec, s3, Some(&pb))?;
            let st = r
                .restore(id, &pool, &RestoreOptions { volume: vol, clone })
                .map_err(|err| format!("{spec}: {err}"))?;
            pb.finish_and_clear();
            if json {
                say!(
                    "{}",
                    {
                        let mut f =
                            backup_fields(st.id, &st.volume, &st.snapshot, st.base_id, st.chunks);
                        f.extend([
                            ("downloaded_chunks", Value::Num(st.downloaded_chunks)),
                            ("downloaded_bytes", Value::Num(st.downloaded_bytes)),
                            ("clone", st.clone.clone().map_or(Value::Null, Value::Str)),
                        ]);
                        Value::Obj(f)
                    }
                    .render()
                );
            } else {
                say!(
                    "restored {}@{} (id {:032x}): {} chunks downloaded ({}){}",
                    st.volume,
                    st.snapshot,
                    st.id,
                    st.downloaded_chunks,
                    human(st.downloaded_bytes),
                    st.clone
                        .as_ref()
                        .map_or(String::new(), |c| format!(", cloned to {c}"))
                );
            }
            crate::done(pool)
        }
        BackupCmd::Verify {
            target: spec,
            id,
            sample,
            json,
        } => {
            let id = id.as_deref().map(parse_id).transpose()?;
            let pb = crate::image::progress(0, "verify");
            let r = open_repo(&spec, s3, Some(&pb))?;
            let rep = r
                .verify(id, sample)
                .map_err(|err| format!("{spec}: {err}"))?;
            pb.finish_and_clear();
            if json {
                say!(
                    "{}",
                    Value::Obj(vec![
                        ("clean", Value::Bool(rep.is_clean())),
                        ("backups", Value::Num(rep.backups)),
                        ("chunks_checked", Value::Num(rep.chunks_checked)),
                        ("bytes_checked", Value::Num(rep.bytes_checked)),
                        (
                            "problems",
                            Value::Arr(
                                rep.problems
                                    .iter()
                                    .map(|p| Value::Str(p.to_string()))
                                    .collect()
                            )
                        ),
                    ])
                    .render()
                );
            } else {
                say!(
                    "{spec}: {} backups, {} chunks checked ({}), {} problems",
                    rep.backups,
                    rep.chunks_checked,
                    human(rep.bytes_checked),
                    rep.problems.len()
                );
                for p in &rep.problems {
                    say!("  {p}");
                }
            }
            Ok(if rep.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        BackupCmd::Delete { target: spec, id } => {
            let id = parse_id(&id)?;
            open_repo(&spec, s3, None)?.delete(id).map_err(e)?;
            say!("deleted backup {id:032x}");
            Ok(ExitCode::SUCCESS)
        }
        BackupCmd::Prune {
            target: spec,
            keep_last,
            keep_daily,
            keep_weekly,
            dry_run,
            json,
        } => {
            if keep_last + keep_daily + keep_weekly == 0 {
                return Err(
                    "prune needs at least one --keep-* rule (it would delete everything)".into(),
                );
            }
            let rep = open_repo(&spec, s3, None)?
                .prune(
                    Retention {
                        last: keep_last,
                        daily: keep_daily,
                        weekly: keep_weekly,
                    },
                    dry_run,
                )
                .map_err(e)?;
            if json {
                say!(
                    "{}",
                    Value::Obj(vec![
                        ("dry_run", Value::Bool(dry_run)),
                        ("kept", Value::Arr(rep.kept.iter().map(info_json).collect())),
                        (
                            "removed",
                            Value::Arr(rep.removed.iter().map(info_json).collect())
                        ),
                    ])
                    .render()
                );
            } else {
                let verb = if dry_run { "would remove" } else { "removed" };
                for b in &rep.removed {
                    say!("{verb} {:032x} {}@{}", b.id, b.volume, b.snapshot);
                }
                say!("kept {}, {verb} {}", rep.kept.len(), rep.removed.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        BackupCmd::Gc {
            target: spec,
            grace,
            json,
        } => {
            let st = open_repo(&spec, s3, None)?
                .gc(grace)
                .map_err(|err| format!("{spec}: {err}"))?;
            if json {
                say!(
                    "{}",
                    Value::Obj(vec![
                        ("manifests", Value::Num(st.manifests)),
                        ("referenced", Value::Num(st.referenced)),
                        ("removed", Value::Num(st.removed)),
                        ("removed_bytes", Value::Num(st.removed_bytes)),
                        ("young", Value::Num(st.young)),
                        ("leftovers", Value::Num(st.leftovers)),
                    ])
                    .render()
                );
            } else {
                say!(
                    "{spec}: {} backups reference {} chunks; removed {} chunks ({}), kept {} younger than the grace period",
                    st.manifests,
                    st.referenced,
                    st.removed,
                    human(st.removed_bytes),
                    st.young
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
