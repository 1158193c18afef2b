//! Backups through CSI: a VolumeSnapshotClass parameter pushes each snapshot of the class to
//! a named backup target, and a snapshot handle that names the target restores from it in
//! any pool, another cluster's included.
//!
//! * `CreateSnapshot` with the parameter `snapvol.io/backup-target: NAME` cuts the snapshot
//!   as usual, starts [`Repository::push`] to the target configured under `NAME` on a thread
//!   of its own, and answers `ready_to_use: false` with the handle `snap-<id>@NAME`. The
//!   CO's retries answer `true` once the backup's manifest exists (a manifest that exists is
//!   a complete backup); a failed push is reported once as the call's error, and the next
//!   retry starts it again (it resumes: chunks already stored are not uploaded again).
//! * `CreateVolume` from `snap-<id>@NAME` clones the local snapshot when the pool has it;
//!   otherwise it restores the backup first ([`Repository::restore`], every chunk verified),
//!   so the snapshot then exists locally under its own id and the next volume from it is a
//!   plain clone.
//! * `ListSnapshots` by such a handle answers from the pool, or, when the pool does not hold
//!   the snapshot, from the target's manifest (a pre-provisioned VolumeSnapshotContent).
//! * `DeleteSnapshot` of such a handle deletes the local snapshot and the backup's manifest
//!   (its chunks go at the repository's next `snapvol backup gc`); a VolumeSnapshotClass
//!   with `deletionPolicy: Retain` keeps the backup. A snapshot whose push is running is
//!   `FAILED_PRECONDITION`.
//!
//! Target names are configured in the driver ([`super::CsiOptions::backup_target`]), never
//! in handles or parameters, so credentials and endpoints stay out of the CO's objects and a
//! handle is the same string in every cluster configured with the same name.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;
use tonic::Status;

use super::status::OrStatus;
use super::Driver;
use crate::backup::{BackupInfo, BaseChoice, RepoOptions, Repository, RestoreOptions, Target};
use crate::error::Error;
use crate::ids::SnapshotId;

/// The VolumeSnapshotClass parameter naming the backup target.
pub const BACKUP_TARGET_PARAMETER: &str = "snapvol.io/backup-target";

/// The backup targets a driver knows, by name.
#[derive(Clone, Default)]
pub struct BackupTargets(pub(crate) BTreeMap<String, Arc<dyn Target>>);

impl std::fmt::Debug for BackupTargets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(n, t)| (n, t.describe())))
            .finish()
    }
}

/// Whether `name` may name a target: 1 to 63 of `a-z`, `0-9`, `-`, `_`, `.`, starting with
/// a letter or digit (it becomes part of snapshot handles).
pub fn valid_target_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-_.".contains(c))
}

/// Where a push stands, while the driver runs.
enum Push {
    Running(std::thread::JoinHandle<()>),
    /// The push ended with this error; reported once, then forgotten.
    Failed(Status),
}

/// The driver's backup state: repositories opened once, pushes in flight.
#[derive(Default)]
pub(crate) struct Backups {
    repos: Mutex<HashMap<String, Repository>>,
    pushes: Arc<Mutex<HashMap<SnapshotId, Push>>>,
    /// One gate per snapshot id being restored (see [`restore_once`]).
    restoring: Mutex<HashMap<SnapshotId, Arc<Mutex<()>>>>,
}

impl Backups {
    /// Waits up to `grace` for the pushes in flight (the server is stopping); returns how
    /// many were still running then. Those are left to finish on their own threads (each
    /// holds a pool handle): a push cannot be cut short safely, but it need not be either,
    /// since one ended by the process exiting resumes on the CO's next CreateSnapshot and
    /// uploads only what is missing. So a long push cannot keep a stop waiting past the
    /// grace period the CO allows before it kills the driver.
    pub(crate) fn join(&self, grace: std::time::Duration) -> usize {
        let running: Vec<_> = self
            .pushes
            .lock()
            .drain()
            .filter_map(|(_, p)| match p {
                Push::Running(t) => Some(t),
                Push::Failed(_) => None,
            })
            .collect();
        let deadline = std::time::Instant::now() + grace;
        let mut left = 0;
        for t in running {
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                left += 1;
            }
        }
        left
    }
}

/// The repository on target `name` (created there with the defaults if it holds none).
fn repo(d: &Driver, name: &str) -> Result<Repository, Status> {
    if let Some(r) = d.backups.repos.lock().get(name) {
        return Ok(r.clone());
    }
    let Some(target) = d.opts.backup_targets.0.get(name) else {
        return Err(Status::invalid_argument(format!(
            "no backup target named {name:?} is configured in this driver (known: {})",
            known(d)
        )));
    };
    let r = Repository::open_or_create(target.clone(), &RepoOptions::default()).or_status()?;
    d.backups.repos.lock().insert(name.to_string(), r.clone());
    Ok(r)
}

fn known(d: &Driver) -> String {
    let names: Vec<&str> = d.opts.backup_targets.0.keys().map(String::as_str).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// The target a CreateSnapshot's parameters name, checked; `None` without the parameter.
pub(crate) fn target_parameter<'a>(
    d: &Driver,
    parameters: &'a HashMap<String, String>,
) -> Result<Option<&'a str>, Status> {
    for key in parameters.keys() {
        if key != BACKUP_TARGET_PARAMETER && !key.starts_with("csi.storage.k8s.io/") {
            return Err(Status::invalid_argument(format!(
                "unknown snapshot class parameter {key:?} (snapvol knows {BACKUP_TARGET_PARAMETER:?})"
            )));
        }
    }
    let Some(name) = parameters.get(BACKUP_TARGET_PARAMETER) else {
        return Ok(None);
    };
    if !d.opts.backup_targets.0.contains_key(name) {
        return Err(Status::invalid_argument(format!(
            "{BACKUP_TARGET_PARAMETER} names {name:?}, which is not a backup target of this driver (known: {})",
            known(d)
        )));
    }
    Ok(Some(name))
}

/// Whether snapshot `id`'s backup on `name` is complete; starts (or restarts) its push
/// when it is neither complete nor running. A push that failed since the last call is
/// that failure.
pub(crate) fn ready(d: &Driver, name: &str, id: SnapshotId) -> Result<bool, Status> {
    let repo = repo(d, name)?;
    let mut pushes = d.backups.pushes.lock();
    match pushes.get(&id) {
        Some(Push::Running(t)) if !t.is_finished() => return Ok(false),
        Some(Push::Failed(_)) => {
            let Some(Push::Failed(status)) = pushes.remove(&id) else {
                unreachable!("matched above")
            };
            return Err(status);
        }
        _ => {}
    }
    match repo.info(id) {
        Ok(_) => {
            pushes.remove(&id);
            return Ok(true);
        }
        Err(Error::BackupNotFound(_)) => {}
        Err(e) => return Err(super::status::status(e)),
    }
    let (pool, all) = (d.pool.clone(), d.backups.pushes.clone());
    let thread = std::thread::Builder::new()
        .name("snapvol-csi-push".into())
        .spawn(move || {
            let r = repo.push(&pool, id, BaseChoice::Auto);
            let mut pushes = all.lock();
            match r {
                Ok(_) => {
                    pushes.remove(&id);
                }
                Err(e) => {
                    let s = super::status::status(e);
                    pushes.insert(
                        id,
                        Push::Failed(Status::new(
                            s.code(),
                            format!("backup push failed: {}", s.message()),
                        )),
                    );
                }
            }
        })
        .map_err(|e| Status::unavailable(format!("cannot start a backup push: {e}")))?;
    pushes.insert(id, Push::Running(thread));
    Ok(false)
}

/// Whether snapshot `id`'s backup on `name` is complete (its manifest exists). Starts
/// nothing: only CreateSnapshot does.
pub(crate) fn complete(d: &Driver, name: &str, id: SnapshotId) -> Result<bool, Status> {
    match repo(d, name)?.info(id) {
        Ok(_) => Ok(true),
        Err(Error::BackupNotFound(_)) => Ok(false),
        Err(e) => Err(super::status::status(e)),
    }
}

/// The backup of `id` on target `name`, as its manifest describes it.
pub(crate) fn info(d: &Driver, name: &str, id: SnapshotId) -> Result<BackupInfo, Status> {
    repo(d, name)?.info(id).or_status()
}

/// Restores backup `id` from target `name` unless the pool holds snapshot `id` already.
/// Concurrent calls for one id wait for each other (the second then finds it restored);
/// calls for other ids run in parallel.
pub(crate) fn restore_once(d: &Driver, name: &str, id: SnapshotId) -> Result<(), Status> {
    let held = |d: &Driver| !matches!(d.pool.snapshot_info(id), Err(Error::SnapshotNotFound(_)));
    if held(d) {
        return Ok(());
    }
    let gate = d.backups.restoring.lock().entry(id).or_default().clone();
    let r = {
        let _one_per_id = gate.lock();
        if held(d) {
            Ok(())
        } else {
            restore(d, name, id)
        }
    };
    // Forgotten once no other call waits on it (checked under the map's lock, where new
    // waiters take it).
    let mut gates = d.backups.restoring.lock();
    if Arc::strong_count(&gate) == 2 {
        gates.remove(&id);
    }
    r
}

/// Restores backup `id` from target `name` into the pool, where it becomes the snapshot of
/// that id (on no visible volume: the volume it is restored onto is deleted after, and a
/// snapshot outlives its volume).
pub(crate) fn restore(d: &Driver, name: &str, id: SnapshotId) -> Result<(), Status> {
    let repo = repo(d, name)?;
    let volume = format!("csi-restore-{id}");
    // A restore interrupted after its volume appeared left that volume behind: start over.
    match d.pool.delete_volume(&volume) {
        Ok(()) | Err(Error::VolumeNotFound(_)) => {}
        Err(e) => return Err(super::status::status(e)),
    }
    let opts = RestoreOptions {
        volume: Some(volume.clone()),
        clone: None,
    };
    repo.restore(id, &d.pool, &opts).or_status()?;
    d.pool.delete_volume(&volume).or_status()
}

/// Deletes backup `id` from target `name` (a deleted VolumeSnapshotContent whose policy is
/// Delete); a push still running refuses.
pub(crate) fn delete(d: &Driver, name: &str, id: SnapshotId) -> Result<(), Status> {
    let repo = repo(d, name)?;
    {
        let mut pushes = d.backups.pushes.lock();
        match pushes.get(&id) {
            Some(Push::Running(t)) if !t.is_finished() => {
                return Err(Status::failed_precondition(format!(
                    "snapshot {id} is being pushed to backup target {name:?}; delete it once it is ready"
                )));
            }
            _ => {
                pushes.remove(&id);
            }
        }
    }
    match repo.delete(id) {
        Ok(()) | Err(Error::BackupNotFound(_)) => Ok(()),
        Err(e) => Err(super::status::status(e)),
    }
}
