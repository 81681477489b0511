//! Device-plugin networks (SR-IOV VFs, RDMA rails): a NAD annotated
//! `k8s.v1.cni.cncf.io/resourceName: <resource>` needs the device the kubelet gave the pod
//! for that resource. The kubelet's PodResources API lists the pod's devices per resource;
//! each network of a resource gets the next one, in the order the pod's networks come and
//! the kubelet lists the devices, as Multus does. The device ID goes into the delegate's
//! config as `deviceID` and `pciBusID` (into every plugin of a conflist), and into
//! `runtimeConfig.deviceID` where the delegate declares the `deviceID` capability; the
//! network-status entry gets its `device-info` (the device plugin's device-info file, or
//! the PCI address the ID is).
//!
//! Devices allocated through DRA count the same way: for each of the pod's ResourceClaims,
//! each allocated device (`status.allocation.devices.results`) is looked up in its
//! driver's ResourceSlices, and its attributes `k8s.cni.cncf.io/resourceName` and
//! `k8s.cni.cncf.io/deviceID` say which resource it is and what to hand the delegate (the
//! attributes Multus reads). A device without a resource name (a GPU in the same claim) is
//! not a network's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cni::{CniError, ErrorCode};
use kubelet_api::podresources as pr;
use serde_json::{Value, json};

use super::delegate::Delegate;
use super::source::ObjectSource;

/// The NAD annotation naming the device plugin resource of a network.
pub const RESOURCE_NAME_ANNOTATION: &str = "k8s.v1.cni.cncf.io/resourceName";
/// Where the kubelet serves its PodResources API.
pub const DEFAULT_POD_RESOURCES_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";
/// Where device plugins and CNI plugins leave device-info files (the Network Plumbing
/// WG's device-info spec): `<dir>/dp/<resource>-<device>-device.json`.
pub const DEFAULT_DEVICE_INFO_DIR: &str = "/var/run/k8s.cni.cncf.io/devinfo";

/// How long one question to the kubelet may take.
const KUBELET_TIMEOUT: Duration = Duration::from_secs(5);

/// The devices of one pod: resource name → device IDs, in the kubelet's order (every
/// container of the pod, in order).
pub type PodDevices = BTreeMap<String, Vec<String>>;

/// Where the pod's devices come from: the kubelet, or a test's table.
pub trait DeviceSource: std::fmt::Debug {
    /// The devices of pod `namespace/name`, or why they cannot be read.
    fn devices(&self, namespace: &str, name: &str) -> Result<PodDevices, String>;
}

/// The kubelet's PodResources API (v1) on a unix socket.
#[derive(Debug, Clone)]
pub struct PodResources {
    pub socket: PathBuf,
}

fn collect(pod: &pr::PodResources) -> PodDevices {
    let mut out = PodDevices::new();
    for c in &pod.containers {
        for d in &c.devices {
            out.entry(d.resource_name.clone()).or_default().extend(d.device_ids.iter().cloned());
        }
    }
    out
}

impl DeviceSource for PodResources {
    fn devices(&self, namespace: &str, name: &str) -> Result<PodDevices, String> {
        let socket = self.socket.display().to_string();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("starting the runtime: {e}"))?;
        rt.block_on(async {
            let channel = kubelet_api::connect(&self.socket, KUBELET_TIMEOUT)
                .await
                .map_err(|e| format!("the kubelet's PodResources API at {socket}: {e}"))?;
            let mut client = pr::pod_resources_lister_client::PodResourcesListerClient::new(channel);
            // Get asks for one pod; kubelets without it (feature gate KubeletPodResourcesGet
            // off) answer UNIMPLEMENTED, and List has every pod.
            let get = pr::GetPodResourcesRequest { pod_name: name.into(), pod_namespace: namespace.into() };
            match client.get(get).await {
                Ok(r) => return Ok(r.into_inner().pod_resources.as_ref().map(collect).unwrap_or_default()),
                Err(s) if s.code() == tonic::Code::Unimplemented => {}
                Err(s) => return Err(format!("the kubelet's PodResources API at {socket}: {}", s.message())),
            }
            let all = client
                .list(pr::ListPodResourcesRequest {})
                .await
                .map_err(|s| format!("the kubelet's PodResources API at {socket}: {}", s.message()))?;
            Ok(all
                .into_inner()
                .pod_resources
                .iter()
                .find(|p| p.namespace == namespace && p.name == name)
                .map(collect)
                .unwrap_or_default())
        })
    }
}

/// The device attribute naming the resource a DRA device is (the NAD's `resourceName`).
pub const DRA_RESOURCE_NAME: &str = "k8s.cni.cncf.io/resourceName";
/// The device attribute holding the ID a delegate gets.
pub const DRA_DEVICE_ID: &str = "k8s.cni.cncf.io/deviceID";

/// A string attribute of a ResourceSlice device (`v1`: `attributes`; `v1beta1`:
/// `basic.attributes`).
fn attribute<'a>(device: &'a Value, name: &str) -> Option<&'a str> {
    let attrs = device.get("attributes").or_else(|| device.get("basic").and_then(|b| b.get("attributes")))?;
    attrs.get(name)?.get("string")?.as_str()
}

/// The network devices the pod's ResourceClaims `claims` (in `namespace`) were allocated,
/// by resource name, in claim and result order.
pub fn claimed(source: &dyn ObjectSource, namespace: &str, claims: &[String]) -> Result<PodDevices, String> {
    let mut out = PodDevices::new();
    let mut slices: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for claim in claims {
        let what = format!("ResourceClaim {namespace}/{claim}");
        let c = source
            .resource_claim(namespace, claim)
            .map_err(|e| e.to_string())?
            .ok_or(format!("{what} not found"))?;
        let Some(results) = c["status"]["allocation"]["devices"]["results"].as_array() else {
            return Err(format!("{what} is not allocated (no status.allocation.devices.results)"));
        };
        for r in results {
            let (driver, pool, name) = (
                r["driver"].as_str().unwrap_or_default(),
                r["pool"].as_str().unwrap_or_default(),
                r["device"].as_str().unwrap_or_default(),
            );
            if !slices.contains_key(driver) {
                let got = source.resource_slices(driver).map_err(|e| e.to_string())?;
                slices.insert(driver.to_string(), got);
            }
            let device = slices[driver]
                .iter()
                .filter(|s| s["spec"]["pool"]["name"] == pool)
                .flat_map(|s| s["spec"]["devices"].as_array().into_iter().flatten())
                .find(|d| d["name"] == name)
                .ok_or_else(|| {
                    format!(
                        "{what}: device {name:?} of pool {pool:?} (driver {driver}) is in no ResourceSlice"
                    )
                })?;
            let Some(resource) = attribute(device, DRA_RESOURCE_NAME) else { continue };
            let id = attribute(device, DRA_DEVICE_ID).ok_or_else(|| {
                format!("{what}: device {name:?} of pool {pool:?} (driver {driver}) is resource {resource:?} but has no {DRA_DEVICE_ID} attribute")
            })?;
            out.entry(resource.to_string()).or_default().push(id.to_string());
        }
    }
    Ok(out)
}

/// The pod's devices from its ResourceClaims and from the kubelet together. When the
/// claims gave devices, the kubelet not answering is no error: a pod of DRA devices only
/// does not need it.
#[derive(Debug)]
pub struct ClaimedAndKubelet<'a> {
    pub claimed: PodDevices,
    pub kubelet: &'a dyn DeviceSource,
}

impl DeviceSource for ClaimedAndKubelet<'_> {
    fn devices(&self, namespace: &str, name: &str) -> Result<PodDevices, String> {
        let mut all = self.claimed.clone();
        match self.kubelet.devices(namespace, name) {
            Ok(plugged) => {
                for (resource, ids) in plugged {
                    all.entry(resource).or_default().extend(ids);
                }
            }
            Err(e) if all.is_empty() => return Err(e),
            Err(_) => {}
        }
        Ok(all)
    }
}

/// Writes `deviceID` and `pciBusID` into a delegate's config: the config itself, or every
/// plugin of a conflist.
fn inject(bytes: &[u8], device: &str, network: &str) -> Result<Vec<u8>, CniError> {
    let mut v: Value = serde_json::from_slice(bytes).map_err(|e| {
        CniError::new(
            ErrorCode::INVALID_CONFIG,
            format!("network {network:?}: config is not valid JSON: {e}"),
        )
    })?;
    let targets: Vec<&mut Value> = match v.get_mut("plugins").and_then(Value::as_array_mut) {
        Some(list) => list.iter_mut().collect(),
        None => vec![&mut v],
    };
    for t in targets {
        if let Some(obj) = t.as_object_mut() {
            obj.insert("deviceID".into(), json!(device));
            obj.insert("pciBusID".into(), json!(device));
        }
    }
    Ok(serde_json::to_vec(&v).unwrap_or_default())
}

/// Gives every delegate with a resource name the next device of that resource, and writes
/// it into its config. The kubelet is asked once, and only when a delegate has a resource.
/// A resource with no device left, or devices that cannot be read, fail the ADD with an
/// error naming the network and the resource.
pub fn assign(
    delegates: &mut [Delegate],
    namespace: &str,
    pod: &str,
    source: &dyn DeviceSource,
) -> Result<(), CniError> {
    if delegates.iter().all(|d| d.resource_name.is_empty()) {
        return Ok(());
    }
    let mut devices: Option<PodDevices> = None;
    let mut used: BTreeMap<String, usize> = BTreeMap::new();
    for d in delegates.iter_mut().filter(|d| !d.resource_name.is_empty()) {
        let all = match &devices {
            Some(all) => all,
            None => {
                let got = source.devices(namespace, pod).map_err(|e| {
                    CniError::new(
                        ErrorCode::TRY_AGAIN_LATER,
                        format!(
                            "network {:?} needs a device of resource {:?}, but pod {namespace}/{pod}'s devices cannot be read: {e}",
                            d.name, d.resource_name
                        ),
                    )
                })?;
                devices.insert(got)
            }
        };
        let next = used.entry(d.resource_name.clone()).or_default();
        let have = all.get(&d.resource_name).map_or(&[][..], Vec::as_slice);
        let Some(device) = have.get(*next) else {
            return Err(CniError::new(
                ErrorCode::INVALID_CONFIG,
                format!(
                    "network {:?} needs a device of resource {:?}, but pod {namespace}/{pod} has {} of them and {} networks before it took {}: request one more {:?} in the pod's resources.limits",
                    d.name,
                    d.resource_name,
                    have.len(),
                    *next,
                    if *next == 1 { "it" } else { "them" },
                    d.resource_name
                ),
            ));
        };
        *next += 1;
        d.bytes = inject(&d.bytes, device, &d.name)?;
        d.device_id = device.clone();
    }
    Ok(())
}

/// Whether `id` is a PCI address (`0000:3b:00.2`).
fn is_pci_address(id: &str) -> bool {
    let b = id.as_bytes();
    let hex = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_hexdigit);
    b.len() == 12
        && hex(0..4)
        && b[4] == b':'
        && hex(5..7)
        && b[7] == b':'
        && hex(8..10)
        && b[10] == b'.'
        && (b'0'..=b'7').contains(&b[11])
}

/// The network-status `device-info` of `device` of `resource`: the device plugin's
/// device-info file under `dir` when there is one, else for a PCI address a `pci` entry
/// (with the RDMA device the kernel shows under `sysfs`, if any).
pub fn device_info(dir: &Path, sysfs: &Path, resource: &str, device: &str) -> Option<Value> {
    let file = dir.join("dp").join(format!(
        "{}-{}-device.json",
        resource.replace('/', "-"),
        device.replace('/', "-")
    ));
    if let Some(v) = std::fs::read(&file).ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        && v.is_object()
    {
        return Some(v);
    }
    if !is_pci_address(device) {
        return None;
    }
    let mut pci = json!({"pci-address": device});
    let rdma = std::fs::read_dir(sysfs.join("bus/pci/devices").join(device).join("infiniband"))
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned());
    if let Some(r) = rdma {
        pci["rdma-device"] = json!(r);
    }
    Some(json!({"type": "pci", "version": "1.1.0", "pci": pci}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    #[derive(Debug)]
    struct Table(Result<PodDevices, String>);

    impl DeviceSource for Table {
        fn devices(&self, _: &str, _: &str) -> Result<PodDevices, String> {
            self.0.clone()
        }
    }

    fn delegate(name: &str, resource: &str, config: Value) -> Delegate {
        let mut d = Delegate::load(&serde_json::to_vec(&config).expect("json"), Some(name), &Map::new())
            .expect("delegate");
        d.resource_name = resource.into();
        d
    }

    fn sriov(name: &str) -> Value {
        json!({"cniVersion": "1.0.0", "name": name, "type": "sriov", "ipam": {"type": "rust-ipam"}})
    }

    fn table(entries: &[(&str, &[&str])]) -> Table {
        Table(Ok(entries
            .iter()
            .map(|(r, ids)| (r.to_string(), ids.iter().map(|s| s.to_string()).collect()))
            .collect()))
    }

    #[test]
    fn each_network_of_a_resource_gets_the_next_device_in_order() {
        let mut ds = vec![
            delegate("cluster", "", json!({"cniVersion": "1.0.0", "name": "cluster", "type": "bridge"})),
            delegate("ns/rail0-a", "example.com/rail0", sriov("rail0-a")),
            delegate("ns/rail1", "example.com/rail1", sriov("rail1")),
            delegate("ns/rail0-b", "example.com/rail0", sriov("rail0-b")),
        ];
        let t = table(&[
            ("example.com/rail0", &["0000:3b:00.2", "0000:3b:00.3"]),
            ("example.com/rail1", &["0000:5e:00.2"]),
        ]);
        assign(&mut ds, "ns", "gpu", &t).expect("assigned");
        let ids: Vec<&str> = ds.iter().map(|d| d.device_id.as_str()).collect();
        assert_eq!(ids, ["", "0000:3b:00.2", "0000:5e:00.2", "0000:3b:00.3"]);
        let conf: Value = serde_json::from_slice(&ds[3].bytes).expect("json");
        assert_eq!((&conf["deviceID"], &conf["pciBusID"]), (&json!("0000:3b:00.3"), &json!("0000:3b:00.3")));
        let cluster: Value = serde_json::from_slice(&ds[0].bytes).expect("json");
        assert!(cluster.get("deviceID").is_none(), "{cluster}");
    }

    #[test]
    fn every_plugin_of_a_conflist_gets_the_device() {
        let list = json!({"cniVersion": "1.0.0", "name": "rail", "plugins": [
            {"type": "sriov", "ipam": {"type": "rust-ipam"}}, {"type": "tuning"}]});
        let mut ds = vec![delegate("ns/rail", "example.com/rail0", list)];
        assign(&mut ds, "ns", "gpu", &table(&[("example.com/rail0", &["0000:3b:00.2"])])).expect("assigned");
        let conf: Value = serde_json::from_slice(&ds[0].bytes).expect("json");
        for p in conf["plugins"].as_array().expect("plugins") {
            assert_eq!(p["deviceID"], "0000:3b:00.2", "{conf}");
        }
    }

    #[test]
    fn a_missing_device_or_kubelet_names_the_network_and_resource() {
        let mut ds = vec![
            delegate("ns/rail0-a", "example.com/rail0", sriov("rail0-a")),
            delegate("ns/rail0-b", "example.com/rail0", sriov("rail0-b")),
        ];
        let e = assign(&mut ds, "ns", "gpu", &table(&[("example.com/rail0", &["0000:3b:00.2"])]))
            .expect_err("short");
        assert_eq!(e.code, ErrorCode::INVALID_CONFIG);
        assert_eq!(
            e.msg,
            "network \"ns/rail0-b\" needs a device of resource \"example.com/rail0\", but pod ns/gpu has 1 of them and 1 networks before it took it: request one more \"example.com/rail0\" in the pod's resources.limits"
        );
        let e = assign(&mut ds, "ns", "gpu", &Table(Err("no such file".into()))).expect_err("no kubelet");
        assert_eq!(e.code, ErrorCode::TRY_AGAIN_LATER);
        assert_eq!(
            e.msg,
            "network \"ns/rail0-a\" needs a device of resource \"example.com/rail0\", but pod ns/gpu's devices cannot be read: no such file"
        );
    }

    #[test]
    fn no_resource_asks_nothing() {
        let mut ds = vec![delegate("ns/plain", "", sriov("plain"))];
        assign(&mut ds, "ns", "gpu", &Table(Err("never asked".into()))).expect("nothing to do");
        assert!(ds[0].device_id.is_empty());
    }

    #[test]
    fn device_info_from_the_plugins_file_or_the_pci_address() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sys = dir.path().join("sys");
        std::fs::create_dir_all(sys.join("bus/pci/devices/0000:3b:00.3/infiniband/mlx5_3")).expect("sysfs");
        std::fs::create_dir_all(dir.path().join("dp")).expect("dp");
        let written = json!({"type": "pci", "version": "1.1.0", "pci": {"pci-address": "0000:3b:00.2", "pf-pci-address": "0000:3b:00.0"}});
        std::fs::write(dir.path().join("dp/example.com-rail0-0000:3b:00.2-device.json"), written.to_string())
            .expect("file");
        assert_eq!(device_info(dir.path(), &sys, "example.com/rail0", "0000:3b:00.2"), Some(written));
        assert_eq!(
            device_info(dir.path(), &sys, "example.com/rail0", "0000:3b:00.3"),
            Some(
                json!({"type": "pci", "version": "1.1.0", "pci": {"pci-address": "0000:3b:00.3", "rdma-device": "mlx5_3"}})
            )
        );
        assert_eq!(
            device_info(dir.path(), &sys, "example.com/rail0", "0000:3b:00.4"),
            Some(json!({"type": "pci", "version": "1.1.0", "pci": {"pci-address": "0000:3b:00.4"}}))
        );
        assert_eq!(device_info(dir.path(), &sys, "example.com/gpu", "GPU-1234"), None);
        assert!(
            !is_pci_address("0000:3b:00.8") && !is_pci_address("0000:3g:00.1") && !is_pci_address("3b:00.1")
        );
    }

    #[test]
    fn dra_devices_come_from_claims_and_their_slices() {
        let dir = tempfile::tempdir().expect("tempdir");
        let objects = r#"
apiVersion: resource.k8s.io/v1
kind: ResourceSlice
metadata: {name: node-a-vf}
spec:
  driver: vf.example.com
  nodeName: node-a
  pool: {name: node-a, generation: 1, resourceSliceCount: 1}
  devices:
  - name: vf-0
    attributes:
      k8s.cni.cncf.io/resourceName: {string: example.com/rail0}
      k8s.cni.cncf.io/deviceID: {string: "0000:3b:00.2"}
  - name: vf-1
    attributes:
      k8s.cni.cncf.io/resourceName: {string: example.com/rail0}
  - name: gpu-0
    attributes:
      model: {string: h100}
---
apiVersion: resource.k8s.io/v1
kind: ResourceClaim
metadata: {name: rails, namespace: team}
status:
  allocation:
    devices:
      results:
      - {request: gpu, driver: vf.example.com, pool: node-a, device: gpu-0}
      - {request: vf, driver: vf.example.com, pool: node-a, device: vf-0}
---
apiVersion: resource.k8s.io/v1
kind: ResourceClaim
metadata: {name: broken, namespace: team}
status:
  allocation:
    devices:
      results:
      - {request: vf, driver: vf.example.com, pool: node-a, device: vf-1}
---
apiVersion: resource.k8s.io/v1
kind: ResourceClaim
metadata: {name: pending, namespace: team}
spec: {}
"#;
        std::fs::write(dir.path().join("dra.yaml"), objects).expect("write");
        let src = super::super::source::DirSource::new(dir.path());
        let got = claimed(&src, "team", &["rails".into()]).expect("claimed");
        assert_eq!(
            got,
            PodDevices::from([("example.com/rail0".to_string(), vec!["0000:3b:00.2".to_string()])])
        );
        assert_eq!(
            claimed(&src, "team", &["broken".into()]).expect_err("no id"),
            "ResourceClaim team/broken: device \"vf-1\" of pool \"node-a\" (driver vf.example.com) is resource \"example.com/rail0\" but has no k8s.cni.cncf.io/deviceID attribute"
        );
        assert_eq!(
            claimed(&src, "team", &["pending".into()]).expect_err("unallocated"),
            "ResourceClaim team/pending is not allocated (no status.allocation.devices.results)"
        );
        assert_eq!(
            claimed(&src, "team", &["gone".into()]).expect_err("missing"),
            "ResourceClaim team/gone not found"
        );
        // With devices from claims, a kubelet that does not answer is no error.
        let both = ClaimedAndKubelet { claimed: got.clone(), kubelet: &Table(Err("no socket".into())) };
        assert_eq!(both.devices("team", "gpu").expect("claims suffice"), got);
        let none = ClaimedAndKubelet { claimed: PodDevices::new(), kubelet: &Table(Err("no socket".into())) };
        assert_eq!(none.devices("team", "gpu").expect_err("nothing"), "no socket");
    }
}
