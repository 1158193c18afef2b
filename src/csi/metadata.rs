//! The SnapshotMetadata service: which blocks of a snapshot are allocated, and which
//! changed between two snapshots of a volume (the base may be a deleted snapshot kept as a
//! bookmark), streamed page by page from [`crate::Pool::allocated`] and
//! [`crate::Pool::delta`]. Each page is one short engine call, so a long stream never holds
//! the engine, and a client that stops reading stops the walk.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::controller::snapshot_info;
use super::handles::parse_snapshot;
use super::proto::snapshot_metadata_server::SnapshotMetadata;
use super::proto::*;
use super::status::{bytes, count, int64, required, OrStatus};
use super::Driver;
use crate::error::Error;
use crate::ids::{Base, BookmarkId};
use crate::{DiffTarget, ExtentPage, TupleLength};

pub(crate) struct MetadataService(pub(crate) Arc<Driver>);

/// Tuples per message when the client leaves `max_results` at 0: about 80 KiB of message.
const DEFAULT_RESULTS: usize = 4096;

/// Pages computed ahead of the client.
const AHEAD: usize = 2;

/// One page of either call, as the pool answers it.
type PageFn = Box<dyn FnMut(&Driver, u64) -> crate::Result<ExtentPage> + Send>;

fn tuples(p: &ExtentPage) -> Vec<BlockMetadata> {
    p.extents
        .iter()
        .map(|e| BlockMetadata {
            byte_offset: int64(e.offset),
            size_bytes: int64(e.length),
        })
        .collect()
}

/// Checks the offset against the volume's size: CSI answers `OUT_OF_RANGE` for an offset
/// past the end.
fn check_offset(offset: u64, size: u64) -> Result<(), Status> {
    if offset > 0 && offset >= size {
        return Err(Status::out_of_range(format!(
            "starting_offset {offset} is not below the volume's size, {size} bytes"
        )));
    }
    Ok(())
}

/// Streams `first` and the pages of `page` after it. The first page was computed in the
/// same blocking call that resolved the handles, before the call answers, so a bad request
/// fails as the call's status rather than in the stream; a stream that fits in one page
/// (the common case for a delta between snapshots) is answered without another hop to a
/// blocking thread.
fn stream<T, F>(
    driver: &Arc<Driver>,
    first: ExtentPage,
    mut page: PageFn,
    wrap: F,
) -> ReceiverStream<Result<T, Status>>
where
    T: Send + 'static,
    F: Fn(&ExtentPage) -> T + Send + 'static,
{
    let Some(mut next) = first.next_offset else {
        let (tx, rx) = mpsc::channel(1);
        // A fresh channel with room for one: this send cannot fail.
        let _ = tx.try_send(Ok(wrap(&first)));
        return ReceiverStream::new(rx);
    };
    let (tx, rx) = mpsc::channel(AHEAD);
    let d = driver.clone();
    tokio::task::spawn_blocking(move || {
        if tx.blocking_send(Ok(wrap(&first))).is_err() {
            return;
        }
        loop {
            let msg = match page(&d, next) {
                Ok(p) => {
                    let msg = Ok(wrap(&p));
                    match p.next_offset {
                        Some(at) => next = at,
                        None => {
                            let _ = tx.blocking_send(msg);
                            return;
                        }
                    }
                    msg
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(super::status::status(e)));
                    return;
                }
            };
            // A client that went away closes the channel: stop walking.
            if tx.blocking_send(msg).is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

fn limit(n: i32) -> Result<usize, Status> {
    Ok(match count("max_results", n)? {
        0 => DEFAULT_RESULTS,
        n => n,
    })
}

#[tonic::async_trait]
impl SnapshotMetadata for MetadataService {
    type GetMetadataAllocatedStream = ReceiverStream<Result<GetMetadataAllocatedResponse, Status>>;
    type GetMetadataDeltaStream = ReceiverStream<Result<GetMetadataDeltaResponse, Status>>;

    async fn get_metadata_allocated(
        &self,
        req: Request<GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let req = req.into_inner();
        if req.snapshot_id.is_empty() {
            return Err(required("snapshot_id"));
        }
        let offset = bytes("starting_offset", req.starting_offset)?;
        let max = limit(req.max_results)?;
        let handle = req.snapshot_id;
        let (first, page) = self
            .0
            .run(move |d| {
                let snap = snapshot_info(d, &handle)?;
                check_offset(offset, snap.size)?;
                let target = DiffTarget::Snapshot(snap.id);
                let mut page: PageFn =
                    Box::new(move |d, at| d.pool.allocated(target, at, max, TupleLength::Variable));
                Ok((page(d, offset).or_status()?, page))
            })
            .await?;
        let s = stream(&self.0, first, page, |p| GetMetadataAllocatedResponse {
            block_metadata_type: BlockMetadataType::VariableLength as i32,
            volume_capacity_bytes: int64(p.volume_size),
            block_metadata: tuples(p),
        });
        Ok(Response::new(s))
    }

    async fn get_metadata_delta(
        &self,
        req: Request<GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let req = req.into_inner();
        if req.base_snapshot_id.is_empty() {
            return Err(required("base_snapshot_id"));
        }
        if req.target_snapshot_id.is_empty() {
            return Err(required("target_snapshot_id"));
        }
        let offset = bytes("starting_offset", req.starting_offset)?;
        let max = limit(req.max_results)?;
        let (base_handle, target_handle) = (req.base_snapshot_id, req.target_snapshot_id);
        let (first, page) = self
            .0
            .run(move |d| {
                let target = snapshot_info(d, &target_handle)?;
                // A deleted base lives on as its bookmark, under the same id.
                let Some(id) = parse_snapshot(&base_handle) else {
                    return Err(Status::not_found(format!(
                        "{base_handle:?} is not a snapvol snapshot handle"
                    )));
                };
                let base = match d.pool.snapshot_info(id) {
                    Ok(_) => Base::Snapshot(id),
                    Err(Error::SnapshotNotFound(_)) => {
                        let b = BookmarkId::from_u128(id.as_u128());
                        d.pool.bookmark_info(b).map_err(|_| {
                            Status::not_found(format!(
                                "no snapshot {base_handle}, nor a bookmark of one"
                            ))
                        })?;
                        Base::Bookmark(b)
                    }
                    Err(e) => return Err(super::status::status(e)),
                };
                check_offset(offset, target.size)?;
                let to = DiffTarget::Snapshot(target.id);
                let mut page: PageFn =
                    Box::new(move |d, at| d.pool.delta(base, to, at, max, TupleLength::Variable));
                Ok((page(d, offset).or_status()?, page))
            })
            .await?;
        let s = stream(&self.0, first, page, |p| GetMetadataDeltaResponse {
            block_metadata_type: BlockMetadataType::VariableLength as i32,
            volume_capacity_bytes: int64(p.volume_size),
            block_metadata: tuples(p),
        });
        Ok(Response::new(s))
    }
}
