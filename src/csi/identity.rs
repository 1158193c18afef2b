//! The Identity service: who the plugin is, what it offers, and whether it is ready.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::proto::identity_server::Identity;
use super::proto::plugin_capability::{service, Service, Type};
use super::proto::*;
use super::status::OrStatus;
use super::Driver;

pub(crate) struct IdentityService(pub(crate) Arc<Driver>);

fn service_capability(t: service::Type) -> PluginCapability {
    PluginCapability {
        r#type: Some(Type::Service(Service { r#type: t as i32 })),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.0.opts.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        use plugin_capability::volume_expansion;
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: vec![
                service_capability(service::Type::ControllerService),
                service_capability(service::Type::GroupControllerService),
                service_capability(service::Type::SnapshotMetadataService),
                PluginCapability {
                    r#type: Some(Type::VolumeExpansion(plugin_capability::VolumeExpansion {
                        r#type: volume_expansion::Type::Online as i32,
                    })),
                },
            ],
        }))
    }

    /// Ready when the pool answers: its statistics need the engine, which a failed
    /// device leaves poisoned (every call would fail), reported as not ready.
    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let ready = self
            .0
            .run(|d| d.pool.list_volumes(1, None).or_status().map(|_| ()))
            .await
            .is_ok();
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}
