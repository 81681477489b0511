//! A device plugin for the tests: it registers fake devices of one resource (PCI-shaped
//! IDs, as an SR-IOV device plugin's VFs) with the node's real kubelet over the kubelet's
//! device plugin API (v1beta1), so the kubelet counts them in the node's capacity, gives
//! them to pods that ask for the resource in `resources.limits`, and lists them in its
//! PodResources API, where rust-multus reads them. There are no devices behind the IDs:
//! the networks that use them in the tests are macvlan links, which ignore `deviceID`.
//!
//! The kubelet's device-plugin directory is fixed (`/var/lib/kubelet/device-plugins`,
//! whatever the kubelet's root directory); each plugin serves on its own socket there,
//! removed when the plugin is dropped.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use anyhow::Context as _;
use futures::Stream;
use kubelet_api::deviceplugin as dp;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

/// Where the kubelet looks for device plugins (and serves its registration socket).
pub const DEVICE_PLUGIN_DIR: &str = "/var/lib/kubelet/device-plugins";

/// `count` PCI-shaped device IDs of rail `rail`: `0000:<bus>:00.<fn>`, bus 0x3b + rail.
pub fn vf_ids(rail: usize, count: usize) -> Vec<String> {
    (0..count).map(|f| format!("0000:{:02x}:{:02x}.{}", 0x3b + rail, f / 8, f % 8)).collect()
}

#[derive(Debug, Clone)]
struct Devices {
    ids: Vec<String>,
}

type DeviceStream = Pin<Box<dyn Stream<Item = Result<dp::ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl dp::device_plugin_server::DevicePlugin for Devices {
    async fn get_device_plugin_options(
        &self,
        _: Request<dp::Empty>,
    ) -> Result<Response<dp::DevicePluginOptions>, Status> {
        Ok(Response::new(dp::DevicePluginOptions::default()))
    }

    type ListAndWatchStream = DeviceStream;

    async fn list_and_watch(&self, _: Request<dp::Empty>) -> Result<Response<DeviceStream>, Status> {
        let devices =
            self.ids.iter().map(|id| dp::Device { id: id.clone(), health: "Healthy".into() }).collect();
        // The list once, then the stream stays open: the devices never change.
        let first = futures::stream::once(async move { Ok(dp::ListAndWatchResponse { devices }) });
        Ok(Response::new(Box::pin(futures::StreamExt::chain(first, futures::stream::pending()))))
    }

    async fn get_preferred_allocation(
        &self,
        _: Request<dp::PreferredAllocationRequest>,
    ) -> Result<Response<dp::PreferredAllocationResponse>, Status> {
        Err(Status::unimplemented("no preferred allocation"))
    }

    async fn allocate(
        &self,
        r: Request<dp::AllocateRequest>,
    ) -> Result<Response<dp::AllocateResponse>, Status> {
        let container_responses = r
            .into_inner()
            .container_requests
            .iter()
            .map(|_| dp::ContainerAllocateResponse::default())
            .collect();
        Ok(Response::new(dp::AllocateResponse { container_responses }))
    }

    async fn pre_start_container(
        &self,
        _: Request<dp::PreStartContainerRequest>,
    ) -> Result<Response<dp::PreStartContainerResponse>, Status> {
        Ok(Response::new(dp::PreStartContainerResponse {}))
    }
}

/// A registered plugin; it stops serving and removes its socket when dropped.
#[derive(Debug)]
pub struct FakeDevicePlugin {
    pub resource: String,
    pub ids: Vec<String>,
    socket: PathBuf,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeDevicePlugin {
    fn drop(&mut self) {
        self.server.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl FakeDevicePlugin {
    /// Serves `ids` of `resource` on a socket of its own in [`DEVICE_PLUGIN_DIR`] and
    /// registers with the kubelet there (on the current tokio runtime).
    pub async fn register(resource: &str, ids: Vec<String>) -> anyhow::Result<FakeDevicePlugin> {
        let endpoint = format!("e2e-{}.sock", resource.replace(['/', '.'], "-"));
        let socket = Path::new(DEVICE_PLUGIN_DIR).join(&endpoint);
        let _ = std::fs::remove_file(&socket);
        let listener =
            UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
        let service = dp::device_plugin_server::DevicePluginServer::new(Devices { ids: ids.clone() });
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(UnixListenerStream::new(listener))
                .await;
        });
        let plugin = FakeDevicePlugin { resource: resource.to_string(), ids, socket, server };
        let kubelet = Path::new(DEVICE_PLUGIN_DIR).join("kubelet.sock");
        let channel = kubelet_api::connect(&kubelet, Duration::from_secs(5))
            .await
            .with_context(|| format!("the kubelet's registration socket {}", kubelet.display()))?;
        dp::registration_client::RegistrationClient::new(channel)
            .register(dp::RegisterRequest {
                version: "v1beta1".into(),
                endpoint,
                resource_name: resource.to_string(),
                options: Some(dp::DevicePluginOptions::default()),
            })
            .await
            .with_context(|| format!("registering {resource} with the kubelet"))?;
        Ok(plugin)
    }
}
