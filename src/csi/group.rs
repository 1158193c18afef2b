//! The GroupController service: a group snapshot is one atomic snapshot of several
//! volumes ([`crate::Pool::snapshot_group_by_id`], one commit), every member named by the
//! group's name. The group's handle is `group-<id>` of its member with the smallest id; the
//! members are the snapshots of that name taken in that member's commit (its generation),
//! so the handle needs no record of its own.

use std::collections::BTreeSet;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::controller::{retire_snapshot, snapshot_msg, snapshots_named};
use super::handles::{parse_snapshot, parse_volume, Handle};
use super::proto::group_controller_server::GroupController;
use super::proto::*;
use super::status::{check_name, required, OrStatus};
use super::Driver;
use crate::error::Error;
use crate::ids::{SnapshotId, VolumeId};
use crate::SnapshotInfo;

pub(crate) struct GroupService(pub(crate) Arc<Driver>);

/// The members of a group snapshot: the snapshots named `name` taken at `generation`.
fn members(d: &Driver, name: &str, generation: u64) -> Result<Vec<SnapshotInfo>, Status> {
    let mut m: Vec<SnapshotInfo> = snapshots_named(d, name)?
        .into_iter()
        .filter(|s| s.generation == generation)
        .collect();
    m.sort_by_key(|s| s.id);
    Ok(m)
}

fn group_msg(members: &[SnapshotInfo]) -> VolumeGroupSnapshot {
    let id = members
        .iter()
        .map(|s| s.id)
        .min()
        .map(|a| Handle::Group(a).to_string())
        .unwrap_or_default();
    let created = members.iter().map(|s| s.created_unix).max().unwrap_or(0);
    VolumeGroupSnapshot {
        group_snapshot_id: id.clone(),
        snapshots: members.iter().map(|s| snapshot_msg(s, Some(&id))).collect(),
        creation_time: Some(prost_types::Timestamp {
            seconds: i64::try_from(created).unwrap_or(i64::MAX),
            nanos: 0,
        }),
        ready_to_use: true,
    }
}

/// The group a handle names: its anchor (the member with the smallest id) and members.
/// `None` when the handle is not a group handle or the anchor is gone.
fn resolve(d: &Driver, handle: &str) -> Result<Option<Vec<SnapshotInfo>>, Status> {
    let Some(Handle::Group(anchor)) = Handle::parse(handle) else {
        return Ok(None);
    };
    let a = match d.pool.snapshot_info(anchor) {
        Ok(a) => a,
        Err(Error::SnapshotNotFound(_)) => return Ok(None),
        Err(e) => return Err(super::status::status(e)),
    };
    let m = members(d, &a.name, a.generation)?;
    // The anchor must still be the smallest id, or the handle is not this group's.
    if m.first().map(|s| s.id) != Some(anchor) {
        return Ok(None);
    }
    Ok(Some(m))
}

/// `INVALID_ARGUMENT` when the caller's `snapshot_ids` are not the group's members (the
/// spec asks a plugin that can detect a mismatch to report it). An empty list is no claim.
fn check_claimed(members: &[SnapshotInfo], claimed: &[String]) -> Result<(), Status> {
    if claimed.is_empty() {
        return Ok(());
    }
    let want: BTreeSet<Option<SnapshotId>> = claimed.iter().map(|c| parse_snapshot(c)).collect();
    let have: BTreeSet<Option<SnapshotId>> = members.iter().map(|s| Some(s.id)).collect();
    if want != have {
        return Err(Status::invalid_argument(
            "snapshot_ids do not match the group snapshot's members",
        ));
    }
    Ok(())
}

fn create(
    d: &Driver,
    req: CreateVolumeGroupSnapshotRequest,
) -> Result<VolumeGroupSnapshot, Status> {
    check_name("name", &req.name)?;
    if req.source_volume_ids.is_empty() {
        return Err(required("source_volume_ids"));
    }
    let mut vols: Vec<VolumeId> = Vec::with_capacity(req.source_volume_ids.len());
    for h in &req.source_volume_ids {
        let Some(v) = parse_volume(h) else {
            return Err(Status::not_found(format!(
                "{h:?} is not a snapvol volume handle (vol-<32 hex digits>)"
            )));
        };
        if vols.contains(&v) {
            return Err(Status::invalid_argument(format!(
                "source_volume_ids names {h} twice"
            )));
        }
        vols.push(v);
    }
    let _one_at_a_time = d.create.lock();
    let same_name = snapshots_named(d, &req.name)?;
    if let Some(first) = same_name.first() {
        // A retry finds the group it made: the members of that commit, on exactly these
        // volumes. Anything else under the name is another object.
        let m = members(d, &req.name, first.generation)?;
        let on: BTreeSet<VolumeId> = m.iter().map(|s| s.volume_id).collect();
        if m.len() == same_name.len() && on == vols.iter().copied().collect() {
            return Ok(group_msg(&m));
        }
        return Err(Status::already_exists(format!(
            "snapshots named {:?} exist on other volumes or from another request",
            req.name
        )));
    }
    let items: Vec<(VolumeId, &str)> = vols.iter().map(|v| (*v, req.name.as_str())).collect();
    let ids = d.pool.snapshot_group_by_id(&items).or_status()?;
    let mut m = Vec::with_capacity(ids.len());
    for id in ids {
        m.push(d.pool.snapshot_info(id).or_status()?);
    }
    m.sort_by_key(|s| s.id);
    Ok(group_msg(&m))
}

fn delete(d: &Driver, req: DeleteVolumeGroupSnapshotRequest) -> Result<(), Status> {
    if req.group_snapshot_id.is_empty() {
        return Err(required("group_snapshot_id"));
    }
    let Some(m) = resolve(d, &req.group_snapshot_id)? else {
        return Ok(());
    };
    check_claimed(&m, &req.snapshot_ids)?;
    // The anchor goes last: until it is gone the handle still resolves, so a retry after
    // a failure part way deletes the rest.
    for s in m.iter().rev() {
        retire_snapshot(d, s)?;
    }
    Ok(())
}

#[tonic::async_trait]
impl GroupController for GroupService {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<GroupControllerGetCapabilitiesResponse>, Status> {
        use group_controller_service_capability::{rpc, Rpc, Type};
        Ok(Response::new(GroupControllerGetCapabilitiesResponse {
            capabilities: vec![GroupControllerServiceCapability {
                r#type: Some(Type::Rpc(Rpc {
                    r#type: rpc::Type::CreateDeleteGetVolumeGroupSnapshot as i32,
                })),
            }],
        }))
    }

    async fn create_volume_group_snapshot(
        &self,
        req: Request<CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<CreateVolumeGroupSnapshotResponse>, Status> {
        let req = req.into_inner();
        let g = self.0.run(move |d| create(d, req)).await?;
        Ok(Response::new(CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(g),
        }))
    }

    async fn delete_volume_group_snapshot(
        &self,
        req: Request<DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<DeleteVolumeGroupSnapshotResponse>, Status> {
        let req = req.into_inner();
        self.0.run(move |d| delete(d, req)).await?;
        Ok(Response::new(DeleteVolumeGroupSnapshotResponse {}))
    }

    async fn get_volume_group_snapshot(
        &self,
        req: Request<GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<GetVolumeGroupSnapshotResponse>, Status> {
        let req = req.into_inner();
        if req.group_snapshot_id.is_empty() {
            return Err(required("group_snapshot_id"));
        }
        let g = self
            .0
            .run(move |d| {
                let Some(m) = resolve(d, &req.group_snapshot_id)? else {
                    return Err(Status::not_found(format!(
                        "no group snapshot {:?}",
                        req.group_snapshot_id
                    )));
                };
                check_claimed(&m, &req.snapshot_ids)?;
                Ok(group_msg(&m))
            })
            .await?;
        Ok(Response::new(GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(g),
        }))
    }
}
