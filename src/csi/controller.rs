//! The Controller service: volumes (create empty, from a snapshot, from a volume; delete;
//! expand; validate; list) and snapshots (create, delete, list, get), with CSI's
//! idempotency: a retried call finds what the first one made and answers as it did.

use std::sync::Arc;

use tonic::{Code, Request, Response, Status};

use super::backups;
use super::handles::{self, parse_snapshot, parse_snapshot_target, parse_volume};
use super::proto::controller_server::Controller;
use super::proto::volume_capability::access_mode::Mode;
use super::proto::volume_capability::AccessType;
use super::proto::*;
use super::status::{bytes, check_name, count, int64, required, OrStatus};
use super::Driver;
use crate::error::{Error, ErrorKind};
use crate::ids::{BookmarkId, Origin, VolumeId};
use crate::{SnapshotInfo, VolumeInfo};

pub(crate) struct ControllerService(pub(crate) Arc<Driver>);

/// The capabilities this controller has (ControllerGetCapabilities).
const CAPABILITIES: [controller_service_capability::rpc::Type; 9] = {
    use controller_service_capability::rpc::Type as T;
    [
        T::CreateDeleteVolume,
        T::ListVolumes,
        T::GetCapacity,
        T::CreateDeleteSnapshot,
        T::ListSnapshots,
        T::CloneVolume,
        T::ExpandVolume,
        T::GetVolume,
        T::GetSnapshot,
    ]
};

/// The CSI view of a volume.
pub(crate) fn volume_msg(v: &VolumeInfo) -> Volume {
    let content_source = v.origin.map(|o| VolumeContentSource {
        r#type: Some(match o {
            Origin::Snapshot(s) => {
                volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
                    snapshot_id: handles::snapshot(s),
                })
            }
            Origin::Volume(src) => {
                volume_content_source::Type::Volume(volume_content_source::VolumeSource {
                    volume_id: handles::volume(src),
                })
            }
        }),
    });
    Volume {
        capacity_bytes: int64(v.size),
        volume_id: handles::volume(v.id),
        // What a node plugin needs to reach the volume: its NBD export name (the volume's
        // name, which is the CSI name: CSI never renames).
        volume_context: [("snapvol.io/nbd-export".to_string(), v.name.clone())]
            .into_iter()
            .collect(),
        content_source,
        accessible_topology: Vec::new(),
    }
}

/// The CSI view of a snapshot.
pub(crate) fn snapshot_msg(s: &SnapshotInfo, group: Option<&str>) -> Snapshot {
    Snapshot {
        size_bytes: int64(s.size),
        snapshot_id: handles::snapshot(s.id),
        source_volume_id: handles::volume(s.volume_id),
        creation_time: Some(prost_types::Timestamp {
            seconds: i64::try_from(s.created_unix).unwrap_or(i64::MAX),
            nanos: 0,
        }),
        ready_to_use: true,
        group_snapshot_id: group.unwrap_or_default().to_string(),
    }
}

/// Why a capability cannot be served, or `None` if it can. Volumes are block devices
/// reached over NBD: as a raw block device or formatted by the node (mount), by one node
/// at a time, or read-only by many (NBD serves any number of readers).
fn unsupported(c: &VolumeCapability) -> Option<String> {
    if c.access_type.is_none() {
        return Some("a volume capability needs an access type (block or mount)".into());
    }
    let mode = c
        .access_mode
        .as_ref()
        .and_then(|m| Mode::try_from(m.mode).ok())
        .unwrap_or(Mode::Unknown);
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter
        | Mode::MultiNodeReaderOnly => None,
        Mode::Unknown => Some("a volume capability needs a known access mode".into()),
        other => Some(format!(
            "access mode {} is not supported: a volume is written from one node",
            other.as_str_name()
        )),
    }
}

/// `INVALID_ARGUMENT` unless `caps` is non-empty and every one can be served.
fn check_capabilities(caps: &[VolumeCapability]) -> Result<(), Status> {
    if caps.is_empty() {
        return Err(required("volume_capabilities"));
    }
    match caps.iter().find_map(unsupported) {
        Some(why) => Err(Status::invalid_argument(why)),
        None => Ok(()),
    }
}

/// The requested capacity range, checked: (required, limit), 0 meaning not given.
fn range(r: Option<&CapacityRange>) -> Result<(u64, u64), Status> {
    let Some(r) = r else { return Ok((0, 0)) };
    let (req, lim) = (
        bytes("required_bytes", r.required_bytes)?,
        bytes("limit_bytes", r.limit_bytes)?,
    );
    if lim > 0 && req > lim {
        return Err(Status::invalid_argument(format!(
            "required_bytes {req} is more than limit_bytes {lim}"
        )));
    }
    Ok((req, lim))
}

/// Whether a volume of `size` bytes satisfies the range.
fn fits(size: u64, (req, lim): (u64, u64)) -> bool {
    size >= req && (lim == 0 || size <= lim)
}

/// The size to create: the required size rounded up to whole blocks when the limit
/// allows, else exactly what was asked; with no size asked, `default` (capped by the
/// limit). A clone must not be smaller than its source (`min`).
fn choose_size((req, lim): (u64, u64), default: u64, min: u64, block: u64) -> Result<u64, Status> {
    if lim > 0 && lim < min {
        return Err(Status::out_of_range(format!(
            "limit_bytes {lim} is smaller than the source, {min} bytes"
        )));
    }
    if req > 0 && req < min {
        return Err(Status::out_of_range(format!(
            "required_bytes {req} is smaller than the source, {min} bytes (volumes do not shrink)"
        )));
    }
    let want = if req > 0 {
        req
    } else if lim > 0 {
        default.max(min).min(lim)
    } else {
        default.max(min)
    };
    let rounded = want.checked_next_multiple_of(block.max(1)).unwrap_or(want);
    Ok(if lim > 0 && rounded > lim {
        want
    } else {
        rounded
    })
}

/// The visible volume named `name`, if there is one.
fn volume_named(d: &Driver, name: &str) -> Result<Option<VolumeInfo>, Status> {
    match d.pool.volume(name).and_then(|v| v.info()) {
        Ok(v) => Ok(Some(v)),
        Err(Error::VolumeNotFound(_)) | Err(Error::InvalidName { .. }) => Ok(None),
        Err(e) => Err(super::status::status(e)),
    }
}

/// Every snapshot named `name`, on any volume. CSI snapshot names are global while
/// snapvol's are per volume, so a name's uniqueness is checked across the catalog (a scan
/// of the snapshot records, paged so memory stays bounded).
pub(crate) fn snapshots_named(d: &Driver, name: &str) -> Result<Vec<SnapshotInfo>, Status> {
    let mut found = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = d
            .pool
            .list_snapshots(None, 4096, token.as_deref())
            .or_status()?;
        found.extend(page.entries.into_iter().filter(|s| s.name == name));
        match page.next_token {
            Some(t) => token = Some(t),
            None => return Ok(found),
        }
    }
}

/// The snapshot a handle names; `NOT_FOUND` (saying which) for an unknown or malformed one.
pub(crate) fn snapshot_info(d: &Driver, handle: &str) -> Result<SnapshotInfo, Status> {
    let Some(id) = parse_snapshot(handle) else {
        return Err(Status::not_found(format!(
            "{handle:?} is not a snapvol snapshot handle (snap-<32 hex digits>)"
        )));
    };
    d.pool.snapshot_info(id).or_status()
}

/// The volume a handle names; `NOT_FOUND` for an unknown or malformed one.
fn volume_info(d: &Driver, handle: &str) -> Result<VolumeInfo, Status> {
    let Some(id) = parse_volume(handle) else {
        return Err(Status::not_found(format!(
            "{handle:?} is not a snapvol volume handle (vol-<32 hex digits>)"
        )));
    };
    d.pool.volume_info(id).or_status()
}

/// Deletes a snapshot, first keeping a bookmark of it (when configured) so deltas can
/// still start from it. Each step is its own commit and each is skipped when already
/// done, so a retry after a failure between them completes the deletion.
pub(crate) fn retire_snapshot(d: &Driver, s: &SnapshotInfo) -> Result<(), Status> {
    if d.opts.bookmark_deleted_snapshots {
        let bookmark = BookmarkId::from_u128(s.id.as_u128());
        match d.pool.bookmark_info(bookmark) {
            Ok(_) => {}
            Err(Error::BookmarkNotFound(_)) => {
                if let Err(e) = d.pool.bookmark_by_id(s.id) {
                    if e.kind() != ErrorKind::AlreadyExists {
                        return Err(super::status::status(e));
                    }
                    // An older bookmark holds this name (a snapshot of the same name,
                    // deleted before): the newer one replaces it.
                    let old = d.pool.volume_bookmarks(s.volume_id).or_status()?;
                    for b in old.iter().filter(|b| b.name == s.name) {
                        d.pool.delete_bookmark_by_id(b.id).or_status()?;
                    }
                    d.pool.bookmark_by_id(s.id).or_status()?;
                }
            }
            Err(e) => return Err(super::status::status(e)),
        }
    }
    match d.pool.delete_snapshot_by_id(s.id) {
        Ok(()) | Err(Error::SnapshotNotFound(_)) => {}
        Err(e) => return Err(super::status::status(e)),
    }
    prune_bookmarks(d, s.volume_id)
}

/// Deletes the bookmarks of a volume that is gone and has no snapshot left: a delta needs a
/// target snapshot of the bookmark's own volume, and none can ever exist again, so they
/// would only accumulate.
pub(crate) fn prune_bookmarks(d: &Driver, volume: VolumeId) -> Result<(), Status> {
    match d.pool.volume_info(volume) {
        Err(Error::VolumeNotFound(_)) => {}
        Ok(_) => return Ok(()),
        Err(e) => return Err(super::status::status(e)),
    }
    if !d.pool.volume_snapshots(volume).or_status()?.is_empty() {
        return Ok(());
    }
    for b in d.pool.volume_bookmarks(volume).or_status()? {
        match d.pool.delete_bookmark_by_id(b.id) {
            Ok(()) | Err(Error::BookmarkNotFound(_)) => {}
            Err(e) => return Err(super::status::status(e)),
        }
    }
    Ok(())
}

/// A listing token error is `ABORTED` in CSI (the CO starts the listing over).
fn token_status(e: Error) -> Status {
    match e {
        Error::BadToken(_) => Status::aborted(e.to_string()),
        e => super::status::status(e),
    }
}

fn create_volume(d: &Driver, req: CreateVolumeRequest) -> Result<Volume, Status> {
    check_name("name", &req.name)?;
    check_capabilities(&req.volume_capabilities)?;
    let range = range(req.capacity_range.as_ref())?;
    let block = u64::from(d.pool.block_size());
    let source = req.volume_content_source.and_then(|s| s.r#type);
    // A backed-up snapshot this pool does not hold (another cluster's) is restored first,
    // under its own id, outside the create lock: a restore may take minutes, and other
    // creates go on meanwhile (restores of one id wait for each other).
    if let Some(volume_content_source::Type::Snapshot(s)) = &source {
        if let Some((id, Some(target))) = parse_snapshot_target(&s.snapshot_id) {
            backups::restore_once(d, target, id)?;
        }
    }
    let _one_at_a_time = d.create.lock();
    let existing = volume_named(d, &req.name)?;
    let conflict =
        |what: String| Status::already_exists(format!("volume {:?} exists {what}", req.name));
    let (origin, min) = match &source {
        None => (None, 0),
        Some(volume_content_source::Type::Snapshot(s)) => {
            let src = match parse_snapshot_target(&s.snapshot_id) {
                // Restored above; deleted again since (a race with DeleteSnapshot): restored
                // once more, so it is then a local snapshot like any other.
                Some((id, Some(target)))
                    if matches!(d.pool.snapshot_info(id), Err(Error::SnapshotNotFound(_))) =>
                {
                    backups::restore(d, target, id)?;
                    d.pool.snapshot_info(id).or_status()?
                }
                _ => snapshot_info(d, &s.snapshot_id)?,
            };
            (Some(Origin::Snapshot(src.id)), src.size)
        }
        Some(volume_content_source::Type::Volume(v)) => {
            let src = volume_info(d, &v.volume_id)?;
            (Some(Origin::Volume(src.id)), src.size)
        }
    };
    let size = choose_size(range, d.opts.default_volume_size, min, block)?;
    if let Some(v) = existing {
        if v.origin != origin {
            return Err(conflict("with another content source".into()));
        }
        if fits(v.size, range) {
            return Ok(volume_msg(&v));
        }
        // A clone whose resize did not happen (the first call failed between the two):
        // finish it rather than refuse the retry.
        if origin.is_some() && v.size == min && size > v.size {
            d.pool.resize_volume_by_id(v.id, size).or_status()?;
            return Ok(volume_msg(&d.pool.volume_info(v.id).or_status()?));
        }
        return Err(conflict(format!(
            "with size {} bytes, outside the requested range",
            v.size
        )));
    }
    let vol = match origin {
        None => d.pool.create_volume(&req.name, size),
        Some(Origin::Snapshot(s)) => d.pool.clone_snapshot_by_id(s, &req.name),
        Some(Origin::Volume(v)) => d.pool.clone_volume_by_id(v, &req.name),
    }
    .or_status()?;
    if size > min && origin.is_some() {
        vol.resize(size).or_status()?;
    }
    Ok(volume_msg(&vol.info().or_status()?))
}

fn create_snapshot(d: &Driver, req: CreateSnapshotRequest) -> Result<Snapshot, Status> {
    check_name("name", &req.name)?;
    if req.source_volume_id.is_empty() {
        return Err(required("source_volume_id"));
    }
    let target = backups::target_parameter(d, &req.parameters)?;
    // With a backup target, the handle names it and the snapshot is ready once its backup
    // is complete: each retry of the call asks (and restarts a push that failed).
    let answer = |s: &SnapshotInfo| -> Result<Snapshot, Status> {
        let mut msg = snapshot_msg(s, None);
        if let Some(t) = target {
            msg.snapshot_id = handles::backed_up_snapshot(s.id, t);
            msg.ready_to_use = backups::ready(d, t, s.id)?;
        }
        Ok(msg)
    };
    let _one_at_a_time = d.create.lock();
    let src = volume_info(d, &req.source_volume_id)?;
    let same_name = snapshots_named(d, &req.name)?;
    if let Some(s) = same_name.iter().find(|s| s.volume_id == src.id) {
        return answer(s);
    }
    if let Some(other) = same_name.first() {
        return Err(Status::already_exists(format!(
            "snapshot {:?} exists, of another volume ({})",
            req.name,
            handles::volume(other.volume_id)
        )));
    }
    let ids = d
        .pool
        .snapshot_group_by_id(&[(src.id, req.name.as_str())])
        .or_status()?;
    let info = d.pool.snapshot_info(ids[0]).or_status()?;
    answer(&info)
}

/// The CSI view of the snapshot a handle names, `None` if it names none. A backed-up
/// snapshot's handle answers from the pool when the pool holds it (ready once the backup is
/// complete), else from the backup's manifest on its target (a pre-provisioned snapshot
/// of another cluster: ready, it restores on first use).
fn snapshot_view(d: &Driver, handle: &str) -> Result<Option<Snapshot>, Status> {
    let Some((id, target)) = parse_snapshot_target(handle) else {
        return Ok(None);
    };
    match (d.pool.snapshot_info(id), target) {
        (Ok(s), None) => Ok(Some(snapshot_msg(&s, None))),
        (Ok(s), Some(t)) => {
            let mut msg = snapshot_msg(&s, None);
            msg.snapshot_id = handle.to_string();
            msg.ready_to_use = backups::complete(d, t, id)?;
            Ok(Some(msg))
        }
        (Err(Error::SnapshotNotFound(_)), Some(t)) => match backups::info(d, t, id) {
            Ok(b) => Ok(Some(Snapshot {
                size_bytes: int64(b.size),
                snapshot_id: handle.to_string(),
                source_volume_id: handles::volume(b.volume_id),
                creation_time: Some(prost_types::Timestamp {
                    seconds: i64::try_from(b.created_unix).unwrap_or(i64::MAX),
                    nanos: 0,
                }),
                ready_to_use: true,
                group_snapshot_id: String::new(),
            })),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(s),
        },
        (Err(Error::SnapshotNotFound(_)), None) => Ok(None),
        (Err(e), _) => Err(super::status::status(e)),
    }
}

fn list_snapshots(d: &Driver, req: ListSnapshotsRequest) -> Result<ListSnapshotsResponse, Status> {
    let max = count("max_entries", req.max_entries)?;
    let entry = |s: &SnapshotInfo| list_snapshots_response::Entry {
        snapshot: Some(snapshot_msg(s, None)),
    };
    let empty = ListSnapshotsResponse::default();
    let only: Option<VolumeId> = if req.source_volume_id.is_empty() {
        None
    } else {
        match parse_volume(&req.source_volume_id) {
            Some(v) => Some(v),
            None => return Ok(empty),
        }
    };
    if !req.snapshot_id.is_empty() {
        return Ok(match snapshot_view(d, &req.snapshot_id)? {
            Some(s) if only.is_none_or(|v| handles::volume(v) == s.source_volume_id) => {
                ListSnapshotsResponse {
                    entries: vec![list_snapshots_response::Entry { snapshot: Some(s) }],
                    next_token: String::new(),
                }
            }
            _ => empty,
        });
    }
    let token = (!req.starting_token.is_empty()).then_some(req.starting_token.as_str());
    let page = d
        .pool
        .list_snapshots(only, max, token)
        .map_err(token_status)?;
    Ok(ListSnapshotsResponse {
        entries: page.entries.iter().map(entry).collect(),
        next_token: page.next_token.unwrap_or_default(),
    })
}

fn expand_volume(
    d: &Driver,
    req: ControllerExpandVolumeRequest,
) -> Result<ControllerExpandVolumeResponse, Status> {
    if req.volume_id.is_empty() {
        return Err(required("volume_id"));
    }
    let Some(r) = req.capacity_range.as_ref() else {
        return Err(required("capacity_range"));
    };
    let range = range(Some(r))?;
    let v = volume_info(d, &req.volume_id)?;
    // A file system on the volume grows on the node; a raw block volume needs nothing.
    let node_expansion_required = matches!(
        req.volume_capability
            .as_ref()
            .and_then(|c| c.access_type.as_ref()),
        Some(AccessType::Mount(_))
    );
    let size = if v.size >= range.0 {
        v.size
    } else {
        let size = choose_size(range, 0, v.size, u64::from(d.pool.block_size()))?;
        d.pool.resize_volume_by_id(v.id, size).or_status()?;
        size
    };
    if !fits(size, range) {
        return Err(Status::out_of_range(format!(
            "volume is {size} bytes, more than limit_bytes {} (volumes do not shrink)",
            range.1
        )));
    }
    Ok(ControllerExpandVolumeResponse {
        capacity_bytes: int64(size),
        node_expansion_required,
    })
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = req.into_inner();
        let volume = self.0.run(move |d| create_volume(d, req)).await?;
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let req = req.into_inner();
        if req.volume_id.is_empty() {
            return Err(required("volume_id"));
        }
        // A handle that is not snapvol's names no volume: deleting it is done already.
        let Some(id) = parse_volume(&req.volume_id) else {
            return Ok(Response::new(DeleteVolumeResponse {}));
        };
        self.0
            .run(move |d| match d.pool.delete_volume_by_id(id) {
                Ok(()) | Err(Error::VolumeNotFound(_)) => prune_bookmarks(d, id),
                Err(e) => Err(super::status::status(e)),
            })
            .await?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "snapvol volumes need no controller publish: nodes reach them over NBD",
        ))
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "snapvol volumes need no controller unpublish: nodes reach them over NBD",
        ))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = req.into_inner();
        if req.volume_id.is_empty() {
            return Err(required("volume_id"));
        }
        if req.volume_capabilities.is_empty() {
            return Err(required("volume_capabilities"));
        }
        let handle = req.volume_id.clone();
        self.0
            .run(move |d| volume_info(d, &handle).map(|_| ()))
            .await?;
        let why = req.volume_capabilities.iter().find_map(unsupported);
        Ok(Response::new(match why {
            Some(message) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            },
            None => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: req.mutable_parameters,
                }),
                message: String::new(),
            },
        }))
    }

    async fn list_volumes(
        &self,
        req: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let req = req.into_inner();
        let max = count("max_entries", req.max_entries)?;
        let page = self
            .0
            .run(move |d| {
                let token = (!req.starting_token.is_empty()).then_some(req.starting_token.as_str());
                d.pool.list_volumes(max, token).map_err(token_status)
            })
            .await?;
        Ok(Response::new(ListVolumesResponse {
            entries: page
                .entries
                .iter()
                .map(|v| list_volumes_response::Entry {
                    volume: Some(volume_msg(v)),
                    status: None,
                })
                .collect(),
            next_token: page.next_token.unwrap_or_default(),
        }))
    }

    async fn get_capacity(
        &self,
        req: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let req = req.into_inner();
        if !req.volume_capabilities.is_empty() {
            if let Some(_why) = req.volume_capabilities.iter().find_map(unsupported) {
                // No volume with these capabilities can be made: none of the space is
                // available for it.
                return Ok(Response::new(GetCapacityResponse::default()));
            }
        }
        let stats = self.0.run(|d| Ok(d.pool.stats())).await?;
        Ok(Response::new(GetCapacityResponse {
            available_capacity: int64(stats.available),
            maximum_volume_size: Some(int64(crate::MAX_VOLUME_BYTES)),
            minimum_volume_size: None,
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: CAPABILITIES
                .iter()
                .map(|t| ControllerServiceCapability {
                    r#type: Some(controller_service_capability::Type::Rpc(
                        controller_service_capability::Rpc { r#type: *t as i32 },
                    )),
                })
                .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let req = req.into_inner();
        let snapshot = self.0.run(move |d| create_snapshot(d, req)).await?;
        Ok(Response::new(CreateSnapshotResponse {
            snapshot: Some(snapshot),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let req = req.into_inner();
        if req.snapshot_id.is_empty() {
            return Err(required("snapshot_id"));
        }
        let Some((id, target)) = parse_snapshot_target(&req.snapshot_id) else {
            return Ok(Response::new(DeleteSnapshotResponse {}));
        };
        let target = target.map(str::to_string);
        self.0
            .run(move |d| {
                // The backup first: a push still running refuses the whole deletion.
                if let Some(t) = &target {
                    backups::delete(d, t, id)?;
                }
                match d.pool.snapshot_info(id) {
                    Ok(s) => retire_snapshot(d, &s),
                    Err(Error::SnapshotNotFound(_)) => Ok(()),
                    Err(e) => Err(super::status::status(e)),
                }
            })
            .await?;
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let req = req.into_inner();
        Ok(Response::new(
            self.0.run(move |d| list_snapshots(d, req)).await?,
        ))
    }

    async fn get_snapshot(
        &self,
        req: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        let req = req.into_inner();
        if req.snapshot_id.is_empty() {
            return Err(required("snapshot_id"));
        }
        let handle = req.snapshot_id;
        let s = self
            .0
            .run(move |d| {
                snapshot_view(d, &handle)?
                    .ok_or_else(|| Status::not_found(format!("no snapshot {handle}")))
            })
            .await?;
        Ok(Response::new(GetSnapshotResponse { snapshot: Some(s) }))
    }

    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = req.into_inner();
        Ok(Response::new(
            self.0.run(move |d| expand_volume(d, req)).await?,
        ))
    }

    async fn controller_get_volume(
        &self,
        req: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let req = req.into_inner();
        if req.volume_id.is_empty() {
            return Err(required("volume_id"));
        }
        let v = self.0.run(move |d| volume_info(d, &req.volume_id)).await?;
        Ok(Response::new(ControllerGetVolumeResponse {
            volume: Some(volume_msg(&v)),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: Vec::new(),
                volume_condition: None,
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Status::new(
            Code::Unimplemented,
            "snapvol volumes have no mutable parameters",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_range_round_to_blocks_and_never_shrink_a_source() {
        let b = 4096;
        // Nothing asked: the default.
        assert_eq!(choose_size((0, 0), 1 << 30, 0, b).unwrap(), 1 << 30);
        // Only a limit: the default, capped by it.
        assert_eq!(choose_size((0, 1 << 20), 1 << 30, 0, b).unwrap(), 1 << 20);
        // A required size is rounded up to whole blocks...
        assert_eq!(
            choose_size((1_000_000_000, 0), 0, 0, b).unwrap(),
            1_000_001_536
        );
        // ...unless the limit forbids it: then exactly what was asked.
        assert_eq!(
            choose_size((1_000_000_000, 1_000_000_000), 0, 0, b).unwrap(),
            1_000_000_000
        );
        // A clone is at least its source, and asking for less is OUT_OF_RANGE.
        assert_eq!(choose_size((0, 0), 1 << 30, 5 << 30, b).unwrap(), 5 << 30);
        assert_eq!(
            choose_size((1 << 30, 0), 0, 5 << 30, b).unwrap_err().code(),
            Code::OutOfRange
        );
        assert_eq!(
            choose_size((0, 1 << 30), 0, 5 << 30, b).unwrap_err().code(),
            Code::OutOfRange
        );
        // Near the top of u64 the rounding cannot overflow.
        assert_eq!(
            choose_size((u64::MAX - 1, 0), 0, 0, b).unwrap(),
            u64::MAX - 1
        );
    }

    #[test]
    fn capacity_ranges_are_checked() {
        let r = |req, lim| CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        };
        assert_eq!(range(None).unwrap(), (0, 0));
        assert_eq!(range(Some(&r(10, 20))).unwrap(), (10, 20));
        assert_eq!(
            range(Some(&r(30, 20))).unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            range(Some(&r(-1, 0))).unwrap_err().code(),
            Code::InvalidArgument
        );
        assert!(fits(15, (10, 20)) && !fits(25, (10, 20)) && !fits(5, (10, 0)));
    }

    #[test]
    fn capabilities_need_a_type_and_a_mode_a_volume_can_serve() {
        let cap = |mode: Mode, block: bool| VolumeCapability {
            access_type: block.then_some(AccessType::Block(volume_capability::BlockVolume {})),
            access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
        };
        assert_eq!(unsupported(&cap(Mode::SingleNodeWriter, true)), None);
        assert_eq!(unsupported(&cap(Mode::MultiNodeReaderOnly, true)), None);
        assert!(unsupported(&cap(Mode::MultiNodeMultiWriter, true)).is_some());
        assert!(unsupported(&cap(Mode::Unknown, true)).is_some());
        assert!(unsupported(&cap(Mode::SingleNodeWriter, false)).is_some());
        assert_eq!(
            check_capabilities(&[]).unwrap_err().code(),
            Code::InvalidArgument
        );
    }
}
