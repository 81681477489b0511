//! The meta-plugin's network configuration (what the runtime passes on stdin): Multus' keys,
//! their defaults, and this plugin's own `rustMultus` section.

use std::path::PathBuf;

use cni::{CniError, ErrorCode, NetworkConfig};
use serde::Deserialize;
use serde_json::{Map, Value};

/// Multus' default for `cniDir`: the delegate cache.
pub const DEFAULT_CNI_DIR: &str = "/var/lib/cni/multus";
/// Multus' default for `confDir`: where cluster networks named by file or conf name live.
pub const DEFAULT_CONF_DIR: &str = "/etc/cni/multus/net.d";
/// Multus' default for `binDir`.
pub const DEFAULT_BIN_DIR: &str = "/opt/cni/bin";
/// Multus' default for `multusNamespace`.
pub const DEFAULT_MULTUS_NAMESPACE: &str = "kube-system";
/// Multus' default for `globalNamespaces`.
pub const DEFAULT_GLOBAL_NAMESPACE: &str = "default";
/// Multus' default for `systemNamespaces`.
pub const DEFAULT_SYSTEM_NAMESPACE: &str = "kube-system";

/// The configuration, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct MultusConf {
    pub cni_version: String,
    pub name: String,
    /// Network of `eth0` (the runtime's ifname): a NAD name (in `multusNamespace`), a
    /// `namespace/name`, a path to a conf file or directory, or a conf name in `confDir`.
    pub cluster_network: Option<String>,
    /// Networks every pod gets after the cluster network (except in `systemNamespaces`).
    pub default_networks: Vec<String>,
    /// Inline delegates (Multus' older form): the first one is the cluster network.
    pub delegates: Vec<Value>,
    pub kubeconfig: Option<PathBuf>,
    pub cni_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub multus_namespace: String,
    pub namespace_isolation: bool,
    /// Namespaces whose NADs any pod may use under `namespaceIsolation`.
    pub global_namespaces: Vec<String>,
    pub system_namespaces: Vec<String>,
    pub readiness_indicator_file: Option<PathBuf>,
    /// Capability arguments from the runtime, passed to the cluster network.
    pub runtime_config: Map<String, Value>,
    /// Where warnings go (Multus' `logFile`); `None`: stderr.
    pub log_file: Option<PathBuf>,
    /// `rustMultus.objectsDir`: read Pods and NADs from YAML files instead of the API.
    pub objects_dir: Option<PathBuf>,
    /// `rustMultus.podResourcesSocket`: the kubelet's PodResources API, asked for the
    /// devices of networks with a resource name.
    pub pod_resources_socket: PathBuf,
    /// `rustMultus.deviceInfoDir`: where device plugins leave device-info files.
    pub device_info_dir: PathBuf,
    /// `rustMultus.parallelNetworks` (default true): the networks of one ADD or DEL are
    /// added or deleted at once, one thread each, unless one asks for the default route;
    /// false takes them one after another, as Multus does.
    pub parallel_networks: bool,
    /// GC: `cni.dev/valid-attachments`, as (container ID, ifname).
    pub valid_attachments: Vec<(String, String)>,
    /// Pods and NADs from a source the caller already holds (the thick daemon's watch
    /// cache), in place of `kubeconfig` and `objectsDir`; never read from the config.
    pub objects: Option<super::source::SharedSource>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    #[serde(default)]
    cni_version: String,
    #[serde(default)]
    name: String,
    cluster_network: Option<String>,
    default_networks: Option<Vec<String>>,
    delegates: Option<Vec<Value>>,
    kubeconfig: Option<String>,
    cni_dir: Option<String>,
    conf_dir: Option<String>,
    bin_dir: Option<String>,
    multus_namespace: Option<String>,
    namespace_isolation: Option<bool>,
    /// A comma-separated string in Multus.
    global_namespaces: Option<String>,
    system_namespaces: Option<Vec<String>>,
    #[serde(rename = "readinessindicatorfile")]
    readiness_indicator_file: Option<String>,
    runtime_config: Option<Map<String, Value>>,
    log_file: Option<String>,
    rust_multus: Option<RustMultus>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
    #[serde(rename = "cni.dev/attachments")]
    old_attachments: Option<Vec<Attachment>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RustMultus {
    objects_dir: Option<String>,
    pod_resources_socket: Option<String>,
    device_info_dir: Option<String>,
    parallel_networks: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct Attachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::INVALID_CONFIG, msg)
}

fn path(v: Option<String>) -> Option<PathBuf> {
    v.filter(|s| !s.is_empty()).map(PathBuf::from)
}

impl NetworkConfig for MultusConf {
    fn cni_version(&self) -> &str {
        &self.cni_version
    }
}

impl MultusConf {
    /// Parses stdin. Unknown keys are ignored, as Multus ignores them.
    pub fn parse(stdin: &[u8]) -> Result<MultusConf, CniError> {
        let raw: Raw = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(ErrorCode::DECODE, format!("network configuration is not valid: {e}"))
        })?;
        if raw.cni_version.is_empty() {
            return Err(invalid("cniVersion is missing from the network configuration"));
        }
        let cluster_network = raw.cluster_network.filter(|s| !s.trim().is_empty()).map(|s| s.trim().into());
        let delegates = raw.delegates.unwrap_or_default();
        if cluster_network.is_none() && delegates.is_empty() {
            return Err(invalid("the configuration needs clusterNetwork or delegates (neither is set)"));
        }
        for (i, d) in delegates.iter().enumerate() {
            if !d.is_object() {
                return Err(invalid(format!("delegates[{i}] is {d}, not a network configuration object")));
            }
        }
        let global_namespaces = match raw.global_namespaces {
            Some(s) if !s.trim().is_empty() => {
                s.split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_string).collect()
            }
            _ => vec![DEFAULT_GLOBAL_NAMESPACE.to_string()],
        };
        let own = raw.rust_multus.unwrap_or(RustMultus {
            objects_dir: None,
            pod_resources_socket: None,
            device_info_dir: None,
            parallel_networks: None,
        });
        for (key, v) in [
            ("objectsDir", &own.objects_dir),
            ("podResourcesSocket", &own.pod_resources_socket),
            ("deviceInfoDir", &own.device_info_dir),
        ] {
            if v.as_deref().is_some_and(|s| s.trim().is_empty()) {
                return Err(invalid(format!("rustMultus.{key} is empty")));
            }
        }
        let valid_attachments = raw
            .valid_attachments
            .or(raw.old_attachments)
            .unwrap_or_default()
            .into_iter()
            .map(|a| (a.container_id, a.ifname))
            .collect();
        Ok(MultusConf {
            cni_version: raw.cni_version,
            name: raw.name,
            cluster_network,
            default_networks: raw.default_networks.unwrap_or_default(),
            delegates,
            kubeconfig: path(raw.kubeconfig),
            cni_dir: path(raw.cni_dir).unwrap_or_else(|| DEFAULT_CNI_DIR.into()),
            conf_dir: path(raw.conf_dir).unwrap_or_else(|| DEFAULT_CONF_DIR.into()),
            bin_dir: path(raw.bin_dir).unwrap_or_else(|| DEFAULT_BIN_DIR.into()),
            multus_namespace: raw
                .multus_namespace
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| DEFAULT_MULTUS_NAMESPACE.into()),
            namespace_isolation: raw.namespace_isolation.unwrap_or(false),
            global_namespaces,
            system_namespaces: raw
                .system_namespaces
                .unwrap_or_else(|| vec![DEFAULT_SYSTEM_NAMESPACE.to_string()]),
            readiness_indicator_file: path(raw.readiness_indicator_file),
            runtime_config: raw.runtime_config.unwrap_or_default(),
            log_file: path(raw.log_file),
            objects_dir: path(own.objects_dir),
            pod_resources_socket: path(own.pod_resources_socket)
                .unwrap_or_else(|| super::devices::DEFAULT_POD_RESOURCES_SOCKET.into()),
            device_info_dir: path(own.device_info_dir)
                .unwrap_or_else(|| super::devices::DEFAULT_DEVICE_INFO_DIR.into()),
            parallel_networks: own.parallel_networks.unwrap_or(true),
            valid_attachments,
            objects: None,
        })
    }

    /// Where delegate binaries are looked for: `binDir` first, then `CNI_PATH`.
    pub fn plugin_path(&self, cni_path: &[PathBuf]) -> Vec<PathBuf> {
        let mut out = vec![self.bin_dir.clone()];
        out.extend(cni_path.iter().filter(|p| **p != self.bin_dir).cloned());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<MultusConf, CniError> {
        MultusConf::parse(v.to_string().as_bytes())
    }

    #[test]
    fn multus_defaults_apply() {
        let c = parse(json!({"cniVersion": "1.0.0", "name": "multus-cni-network", "type": "rust-multus",
            "clusterNetwork": "default-net"}))
        .expect("valid");
        assert_eq!(c.cluster_network.as_deref(), Some("default-net"));
        assert_eq!(c.cni_dir, PathBuf::from("/var/lib/cni/multus"));
        assert_eq!(c.conf_dir, PathBuf::from("/etc/cni/multus/net.d"));
        assert_eq!(c.bin_dir, PathBuf::from("/opt/cni/bin"));
        assert_eq!(c.multus_namespace, "kube-system");
        assert!(!c.namespace_isolation);
        assert_eq!(c.global_namespaces, vec!["default"]);
        assert_eq!(c.system_namespaces, vec!["kube-system"]);
        assert_eq!((c.kubeconfig, c.objects_dir, c.readiness_indicator_file), (None, None, None));
        assert_eq!(c.pod_resources_socket, PathBuf::from("/var/lib/kubelet/pod-resources/kubelet.sock"));
        assert_eq!(c.device_info_dir, PathBuf::from("/var/run/k8s.cni.cncf.io/devinfo"));
    }

    #[test]
    fn every_key_is_read() {
        let c = parse(json!({"cniVersion": "0.3.1", "name": "m", "clusterNetwork": " k8s-pod-network ",
            "defaultNetworks": ["a", "b"], "kubeconfig": "/etc/kc", "cniDir": "/c", "confDir": "/d",
            "binDir": "/b", "multusNamespace": "multus", "namespaceIsolation": true,
            "globalNamespaces": "default, shared ,", "systemNamespaces": ["kube-system", "ops"],
            "readinessindicatorfile": "/run/ready", "logFile": "/var/log/m.log",
            "runtimeConfig": {"portMappings": []}, "rustMultus": {"objectsDir": "/objs",
            "podResourcesSocket": "/k/pr.sock", "deviceInfoDir": "/di"},
            "cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}]}))
        .expect("valid");
        assert_eq!(c.cluster_network.as_deref(), Some("k8s-pod-network"));
        assert_eq!(c.default_networks, vec!["a", "b"]);
        assert_eq!(c.kubeconfig, Some(PathBuf::from("/etc/kc")));
        assert_eq!(
            (c.cni_dir.to_str(), c.conf_dir.to_str(), c.bin_dir.to_str()),
            (Some("/c"), Some("/d"), Some("/b"))
        );
        assert_eq!(c.multus_namespace, "multus");
        assert!(c.namespace_isolation);
        assert_eq!(c.global_namespaces, vec!["default", "shared"]);
        assert_eq!(c.system_namespaces, vec!["kube-system", "ops"]);
        assert_eq!(c.readiness_indicator_file, Some(PathBuf::from("/run/ready")));
        assert_eq!(c.objects_dir, Some(PathBuf::from("/objs")));
        assert_eq!(
            (c.pod_resources_socket.to_str(), c.device_info_dir.to_str()),
            (Some("/k/pr.sock"), Some("/di"))
        );
        assert_eq!(c.runtime_config.get("portMappings"), Some(&json!([])));
        assert_eq!(c.valid_attachments, vec![("c1".to_string(), "eth0".to_string())]);
        assert_eq!(
            c.plugin_path(&[PathBuf::from("/x"), PathBuf::from("/b")]),
            vec![PathBuf::from("/b"), PathBuf::from("/x")]
        );
    }

    #[test]
    fn bad_configurations_are_named() {
        let e = parse(json!({"cniVersion": "1.0.0", "name": "m"})).expect_err("no networks");
        assert_eq!(
            (e.code, e.msg.as_str()),
            (
                ErrorCode::INVALID_CONFIG,
                "the configuration needs clusterNetwork or delegates (neither is set)"
            )
        );
        let e = parse(json!({"name": "m", "clusterNetwork": "x"})).expect_err("no version");
        assert_eq!(e.msg, "cniVersion is missing from the network configuration");
        let e = parse(json!({"cniVersion": "1.0.0", "delegates": [1]})).expect_err("bad delegate");
        assert_eq!(e.msg, "delegates[0] is 1, not a network configuration object");
        let e =
            parse(json!({"cniVersion": "1.0.0", "clusterNetwork": "x", "rustMultus": {"objectDir": "/o"}}))
                .expect_err("typo");
        assert_eq!(e.code, ErrorCode::DECODE);
        assert!(e.msg.contains("unknown field `objectDir`"), "{e}");
        let e = parse(
            json!({"cniVersion": "1.0.0", "clusterNetwork": "x", "rustMultus": {"podResourcesSocket": " "}}),
        )
        .expect_err("empty");
        assert_eq!(
            (e.code, e.msg.as_str()),
            (ErrorCode::INVALID_CONFIG, "rustMultus.podResourcesSocket is empty")
        );
        let e = parse(json!({"cniVersion": "1.0.0", "clusterNetwork": "x", "namespaceIsolation": "yes"}))
            .expect_err("bool");
        assert!(e.msg.starts_with("network configuration is not valid: invalid type: string \"yes\""), "{e}");
    }
}
