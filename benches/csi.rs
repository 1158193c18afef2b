//! The CSI controller's cost over the library it calls: round-trip latency of Probe (the
//! floor of any call),
//! CreateSnapshot, CreateVolume from a snapshot and DeleteSnapshot over the Unix socket
//! (a tonic client in this process, the server on its own runtime) against the same
//! library calls the server makes, and a GetMetadataDelta stream of a 64 GiB volume with
//! 4 MiB changed against `Pool::delta` paged the same way. Medians side by side, for
//! BENCHMARKS.md.
//!
//! `cargo bench --features csi --bench csi` (SNAPVOL_BENCH_DIR picks the filesystem of the
//! pool file, default the temp dir; SNAPVOL_BENCH_ROUNDS the samples per figure, 200).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use snapvol::csi::proto::controller_client::ControllerClient;
use snapvol::csi::proto::identity_client::IdentityClient;
use snapvol::csi::proto::snapshot_metadata_client::SnapshotMetadataClient;
use snapvol::csi::proto::*;
use snapvol::csi::{CsiOptions, Server};
use snapvol::{Base, DiffTarget, Pool, PoolOptions, TupleLength};
use tonic::transport::{Channel, Endpoint};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn row(what: &str, grpc: Duration, lib: Duration) {
    println!(
        "{what:<44} gRPC {:>10}   library {:>10}   ratio {:.2}x",
        us(grpc),
        us(lib),
        grpc.as_secs_f64() / lib.as_secs_f64()
    );
}

async fn connect(sock: PathBuf) -> Channel {
    Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let sock = sock.clone();
            async move {
                let s = tokio::net::UnixStream::connect(sock).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .unwrap()
}

fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(volume_capability::AccessType::Block(
            volume_capability::BlockVolume {},
        )),
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

fn main() {
    let base = std::env::var("SNAPVOL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let rounds: usize = std::env::var("SNAPVOL_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir_in(&base).unwrap();
    println!("directory: {} ({rounds} rounds per figure)", base.display());
    let pool = Pool::create_file(
        dir.path().join("pool.img"),
        256 << 30,
        PoolOptions::default().commit_interval(None),
    )
    .unwrap();
    let sock = dir.path().join("csi.sock");
    let server = Server::start_unix(&pool, &sock, CsiOptions::default()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let channel = rt.block_on(connect(sock.clone()));
    let mut ctl = ControllerClient::new(channel.clone());
    let mut ident = IdentityClient::new(channel.clone());
    let mut meta = SnapshotMetadataClient::new(channel);

    // The floor: Probe is one RPC, one hop to a blocking thread, one catalog read.
    let (mut g_probe, mut l_probe) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        let ready = rt
            .block_on(ident.probe(ProbeRequest {}))
            .unwrap()
            .into_inner()
            .ready;
        g_probe.push(t.elapsed());
        assert_eq!(ready, Some(true));
        let t = Instant::now();
        pool.list_volumes(1, None).unwrap();
        l_probe.push(t.elapsed());
    }
    row(
        "Probe / list_volumes(1) (the RPC floor)",
        median(g_probe),
        median(l_probe),
    );

    // A volume in use: 64 MiB written.
    let v = pool.create_volume("pvc-bench", 64 << 30).unwrap();
    let vid = v.info().unwrap().id;
    for i in 0..64u64 {
        v.write_at(&vec![i as u8 + 1; 1 << 20], i << 30).unwrap();
    }
    v.flush().unwrap();
    let handle = format!("vol-{vid}");

    // CreateSnapshot, then DeleteSnapshot, each timed alone.
    let (mut g_create, mut l_create, mut g_delete, mut l_delete) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds {
        v.write_at(&[i as u8; 4096], 4096).unwrap();
        let name = format!("snapshot-grpc-{i}");
        let t = Instant::now();
        let s = rt
            .block_on(ctl.create_snapshot(CreateSnapshotRequest {
                source_volume_id: handle.clone(),
                name,
                ..Default::default()
            }))
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        g_create.push(t.elapsed());
        let t = Instant::now();
        rt.block_on(ctl.delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: s.snapshot_id,
            ..Default::default()
        }))
        .unwrap();
        g_delete.push(t.elapsed());

        v.write_at(&[i as u8; 4096], 4096).unwrap();
        let name = format!("snapshot-lib-{i}");
        let t = Instant::now();
        let id = pool.snapshot_group_by_id(&[(vid, name.as_str())]).unwrap()[0];
        let _ = pool.snapshot_info(id).unwrap();
        l_create.push(t.elapsed());
        let t = Instant::now();
        pool.bookmark_by_id(id).unwrap();
        pool.delete_snapshot_by_id(id).unwrap();
        l_delete.push(t.elapsed());
    }
    row(
        "CreateSnapshot / snapshot_group_by_id",
        median(g_create),
        median(l_create),
    );
    row(
        "DeleteSnapshot / bookmark + delete_snapshot",
        median(g_delete),
        median(l_delete),
    );

    // CreateVolume from a snapshot (its deletion untimed).
    let src = pool.snapshot_group_by_id(&[(vid, "clone-source")]).unwrap()[0];
    let (mut g_clone, mut l_clone) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let mut req = CreateVolumeRequest {
            name: format!("pvc-clone-grpc-{i}"),
            volume_capabilities: vec![block_cap()],
            ..Default::default()
        };
        req.volume_content_source = Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Snapshot(
                volume_content_source::SnapshotSource {
                    snapshot_id: format!("snap-{src}"),
                },
            )),
        });
        let t = Instant::now();
        let made = rt
            .block_on(ctl.create_volume(req))
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        g_clone.push(t.elapsed());
        rt.block_on(ctl.delete_volume(DeleteVolumeRequest {
            volume_id: made.volume_id,
            ..Default::default()
        }))
        .unwrap();

        let t = Instant::now();
        let c = pool
            .clone_snapshot_by_id(src, &format!("pvc-clone-lib-{i}"))
            .unwrap();
        let info = c.info().unwrap();
        l_clone.push(t.elapsed());
        pool.delete_volume_by_id(info.id).unwrap();
    }
    row(
        "CreateVolume from snapshot / clone_snapshot",
        median(g_clone),
        median(l_clone),
    );

    // GetMetadataDelta: 4 MiB changed (1,024 scattered 4 KiB writes) in a 64 GiB volume.
    let a = pool.snapshot_group_by_id(&[(vid, "delta-a")]).unwrap()[0];
    for i in 0..1024u64 {
        v.write_at(&[0xee; 4096], (i * 61 + 7) * (64 << 20) % (64 << 30))
            .unwrap();
    }
    let b = pool.snapshot_group_by_id(&[(vid, "delta-b")]).unwrap()[0];
    let (mut g_delta, mut l_delta) = (Vec::new(), Vec::new());
    let mut tuples = (0, 0);
    for _ in 0..rounds.min(50) {
        let t = Instant::now();
        let n = rt.block_on(async {
            let mut s = meta
                .get_metadata_delta(GetMetadataDeltaRequest {
                    base_snapshot_id: format!("snap-{a}"),
                    target_snapshot_id: format!("snap-{b}"),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let mut n = 0;
            while let Some(m) = s.message().await.unwrap() {
                n += m.block_metadata.len();
            }
            n
        });
        g_delta.push(t.elapsed());
        let t = Instant::now();
        let mut m = 0;
        let mut at = 0;
        loop {
            let p = pool
                .delta(
                    Base::Snapshot(a),
                    DiffTarget::Snapshot(b),
                    at,
                    4096,
                    TupleLength::Variable,
                )
                .unwrap();
            m += p.extents.len();
            match p.next_offset {
                Some(o) => at = o,
                None => break,
            }
        }
        l_delta.push(t.elapsed());
        tuples = (n, m);
    }
    assert_eq!(tuples.0, tuples.1, "the stream and the library disagree");
    row(
        &format!("GetMetadataDelta 64 GiB, {} tuples / delta", tuples.0),
        median(g_delta),
        median(l_delta),
    );
    // The clients close their connection with their runtime, so the stop is prompt.
    drop((ctl, meta, ident, rt));
    server.stop().unwrap();
    pool.close().unwrap();
}
