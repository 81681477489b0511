//! From configuration, pod and NADs to the ordered list of delegates: the cluster network
//! (index 0, the runtime's ifname), `defaultNetworks`, then the pod's
//! `k8s.v1.cni.cncf.io/networks` in order, with Multus' lookup rules.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use cni::{CniError, ErrorCode};
use serde_json::{Map, Value};

use super::annotation::{self, NETWORKS_ANNOTATION};
use super::config::MultusConf;
use super::delegate::Delegate;
use super::source::{ObjectSource, PodInfo, SourceError};

/// Pod annotation that replaces `clusterNetwork` for one pod (Multus' key).
pub const DEFAULT_NETWORK_ANNOTATION: &str = "v1.multus-cni.io/default-network";

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::INVALID_CONFIG, msg)
}

fn unreachable(e: SourceError) -> CniError {
    match e {
        SourceError::Unreachable(m) => CniError::new(ErrorCode::TRY_AGAIN_LATER, m),
        SourceError::Invalid(m) => invalid(m),
    }
}

/// How the error of a NAD that does not exist ends (after its `namespace/name`).
const NAD_NOT_FOUND: &str = "not found (networks are looked up in the pod's namespace unless one is given)";

/// Whether `e` says a NAD the pod names does not exist (a likely typo in its annotation).
pub fn nad_missing(e: &CniError) -> bool {
    e.msg.contains(NAD_NOT_FOUND)
}

/// Multus' namespace isolation: a pod may use NADs of its own namespace and of
/// `globalNamespaces` only.
pub fn check_isolation(conf: &MultusConf, pod_namespace: &str, target: &str) -> Result<(), CniError> {
    if !conf.namespace_isolation
        || pod_namespace == target
        || conf.global_namespaces.iter().any(|g| g == target)
    {
        return Ok(());
    }
    Err(invalid(format!(
        "namespace isolation: pod in namespace {pod_namespace:?} may not use networks of namespace {target:?} (allowed: its own and globalNamespaces {:?})",
        conf.global_namespaces
    )))
}

/// Config files of a directory as libcni lists them (`.conf`, `.conflist`, `.json`), sorted.
fn conf_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e, "conf" | "conflist" | "json"))
        })
        .collect();
    files.sort();
    files
}

/// The config in `dir` whose `name` is `name` (the first one when `name` is empty).
pub fn conf_by_name(dir: &Path, name: &str) -> Option<Vec<u8>> {
    conf_files(dir).into_iter().find_map(|p| {
        let bytes = std::fs::read(&p).ok()?;
        let v: Value = serde_json::from_slice(&bytes).ok()?;
        (name.is_empty() || v.get("name").and_then(Value::as_str) == Some(name)).then_some(bytes)
    })
}

/// The delegate of NAD `namespace/name`: its `spec.config` (named after the NAD when the
/// config has no name), or the config named like the NAD in `confDir` when it has none.
pub fn nad_delegate(
    conf: &MultusConf,
    source: Option<&dyn ObjectSource>,
    namespace: &str,
    name: &str,
    cni_args: &Map<String, Value>,
) -> Result<Delegate, CniError> {
    let key = format!("{namespace}/{name}");
    let Some(source) = source else {
        return Err(invalid(format!(
            "NetworkAttachmentDefinition {key}: no source of NADs is configured (kubeconfig or rustMultus.objectsDir)"
        )));
    };
    let nad = source
        .nad(namespace, name)
        .map_err(unreachable)?
        .ok_or_else(|| invalid(format!("NetworkAttachmentDefinition {key} {NAD_NOT_FOUND}")))?;
    let bytes = if nad.config.trim().is_empty() {
        conf_by_name(&conf.conf_dir, name).ok_or_else(|| {
            invalid(format!(
                "NetworkAttachmentDefinition {key} has no spec.config and {} has no config named {name:?}",
                conf.conf_dir.display()
            ))
        })?
    } else {
        let mut v: Value = serde_json::from_str(&nad.config).map_err(|e| {
            invalid(format!("NetworkAttachmentDefinition {key}: spec.config is not valid JSON: {e}"))
        })?;
        let Some(obj) = v.as_object_mut() else {
            return Err(invalid(format!(
                "NetworkAttachmentDefinition {key}: spec.config is not a JSON object"
            )));
        };
        if obj.get("name").and_then(Value::as_str).is_none_or(str::is_empty) {
            obj.insert("name".into(), Value::String(name.to_string()));
        }
        serde_json::to_vec(&v).unwrap_or_default()
    };
    let mut d = Delegate::load(&bytes, Some(&key), cni_args)?;
    d.resource_name = nad.resource_name;
    Ok(d)
}

/// A cluster or default network named as Multus allows: an absolute path to a config file
/// or a directory (its first config), `namespace/name` of a NAD, or a name: the NAD in
/// `namespace`, else the config of that name in `confDir`.
pub fn net_delegate(
    conf: &MultusConf,
    source: Option<&dyn ObjectSource>,
    netname: &str,
    namespace: &str,
) -> Result<Delegate, CniError> {
    if netname.starts_with('/') {
        let p = Path::new(netname);
        let bytes = if p.is_dir() {
            conf_by_name(p, "")
                .ok_or_else(|| invalid(format!("network {netname}: the directory has no config file")))?
        } else {
            std::fs::read(p).map_err(|e| invalid(format!("network {netname}: {e}")))?
        };
        return Delegate::load(&bytes, None, &Map::new());
    }
    if let Some((ns, name)) = netname.split_once('/') {
        return nad_delegate(conf, source, ns, name, &Map::new());
    }
    let nad_err = match nad_delegate(conf, source, namespace, netname, &Map::new()) {
        Ok(d) => return Ok(d),
        Err(e) => e,
    };
    if let Some(bytes) = conf_by_name(&conf.conf_dir, netname) {
        return Delegate::load(&bytes, None, &Map::new());
    }
    Err(CniError::new(
        nad_err.code,
        format!(
            "cannot find network {netname:?}: {}; and {} has no config named {netname:?}",
            nad_err.msg,
            conf.conf_dir.display()
        ),
    ))
}

/// The pod as the plugin sees it.
#[derive(Debug, Clone)]
pub struct Pod<'a> {
    pub namespace: &'a str,
    pub info: Option<&'a PodInfo>,
}

/// Every delegate of the pod, in order, with interface names checked.
pub fn delegates(
    conf: &MultusConf,
    source: Option<&dyn ObjectSource>,
    pod: &Pod<'_>,
    runtime_ifname: &str,
) -> Result<Vec<Delegate>, CniError> {
    let annotations = pod.info.map(|p| &p.annotations);
    let mut out = Vec::new();
    let pod_default = annotations.and_then(|a| a.get(DEFAULT_NETWORK_ANNOTATION)).map(|s| s.trim());
    let mut inline = Vec::new();
    for (i, d) in conf.delegates.iter().enumerate() {
        let bytes = serde_json::to_vec(d).unwrap_or_default();
        inline.push(
            Delegate::load(&bytes, None, &Map::new())
                .map_err(|e| invalid(format!("delegates[{i}]: {}", e.msg)))?,
        );
    }
    match pod_default.filter(|s| !s.is_empty()).or(conf.cluster_network.as_deref()) {
        Some(net) => {
            out.push(net_delegate(conf, source, net, &conf.multus_namespace)?);
            // A pod's default network replaces only the first inline delegate.
            if conf.cluster_network.is_none() {
                out.extend(inline.into_iter().skip(1));
            }
        }
        None => out.extend(inline),
    }
    if !conf.system_namespaces.iter().any(|s| s == pod.namespace) {
        for net in &conf.default_networks {
            out.push(net_delegate(conf, source, net, &conf.multus_namespace)?);
        }
    }
    if let Some(value) = annotations.and_then(|a| a.get(NETWORKS_ANNOTATION)) {
        let selections = annotation::parse(value, pod.namespace).map_err(|e| invalid(e.to_string()))?;
        for sel in selections {
            check_isolation(conf, pod.namespace, &sel.namespace)?;
            let mut d = nad_delegate(conf, source, &sel.namespace, &sel.name, &sel.cni_args)?;
            if sel.interface_requested {
                d.ifname_request = sel.interface.clone();
            }
            d.ip_request = sel.ips.clone();
            d.mac_request = sel.mac.clone().unwrap_or_default();
            if !sel.default_route.is_empty() {
                d.gateway_request = Some(sel.default_route.iter().map(IpAddr::to_string).collect());
            }
            out.push(d);
        }
    }
    check_gateways(&mut out)?;
    check_ifnames(&out, runtime_ifname)?;
    Ok(out)
}

/// Multus' `CheckGatewayConfig`: at most one IPv4 and one IPv6 default-route gateway in
/// all; when any is asked for, every other network's default route of that family goes.
pub fn check_gateways(delegates: &mut [Delegate]) -> Result<(), CniError> {
    if delegates.iter().all(|d| d.gateway_request.is_none()) {
        return Ok(());
    }
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for d in delegates.iter() {
        for gw in d.gateway_request.iter().flatten() {
            let ip: IpAddr = gw.parse().map_err(|_| {
                invalid(format!("network {}: default-route {gw:?} is not an IP address", d.name))
            })?;
            if ip.is_ipv4() {
                v4.push(format!("{} via {gw}", d.name))
            } else {
                v6.push(format!("{} via {gw}", d.name))
            }
        }
    }
    for (family, list) in [("IPv4", &v4), ("IPv6", &v6)] {
        if list.len() > 1 {
            return Err(invalid(format!(
                "{NETWORKS_ANNOTATION}: more than one {family} default-route ({}); ECMP default routes are not supported",
                list.join(", ")
            )));
        }
    }
    for d in delegates.iter_mut() {
        let gws: Vec<IpAddr> = d.gateway_request.iter().flatten().filter_map(|g| g.parse().ok()).collect();
        d.filter_v4_gateway = !gws.iter().any(IpAddr::is_ipv4);
        d.filter_v6_gateway = !gws.iter().any(IpAddr::is_ipv6);
    }
    Ok(())
}

/// Every delegate gets its own interface name.
pub fn check_ifnames(delegates: &[Delegate], runtime_ifname: &str) -> Result<(), CniError> {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for (i, d) in delegates.iter().enumerate() {
        let ifname = d.ifname(runtime_ifname, i);
        if let Some(other) = seen.insert(ifname.clone(), &d.name) {
            return Err(invalid(format!(
                "interface {ifname:?} is used by two networks: {other} and {} (name one of them with @ifname or \"interface\")",
                d.name
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::multus::source::DirSource;
    use serde_json::json;

    struct World {
        dir: tempfile::TempDir,
        source: DirSource,
    }

    impl World {
        fn new() -> World {
            let dir = tempfile::tempdir().expect("tempdir");
            for d in ["objects", "conf"] {
                std::fs::create_dir(dir.path().join(d)).expect("mkdir");
            }
            let source = DirSource::new(dir.path().join("objects"));
            World { dir, source }
        }

        fn nad(&self, ns: &str, name: &str, config: Option<Value>) {
            let mut o = json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
                "metadata": {"name": name, "namespace": ns}, "spec": {}});
            if let Some(c) = config {
                o["spec"]["config"] = Value::String(c.to_string());
            }
            std::fs::write(self.dir.path().join(format!("objects/{ns}-{name}.json")), o.to_string())
                .expect("nad");
        }

        fn conf_file(&self, file: &str, name: &str, kind: &str) {
            let c = json!({"cniVersion": "1.0.0", "name": name, "type": kind});
            std::fs::write(self.dir.path().join("conf").join(file), c.to_string()).expect("conf");
        }

        fn conf(&self, extra: Value) -> MultusConf {
            let mut c = json!({"cniVersion": "1.0.0", "name": "m", "clusterNetwork": "cluster",
                "confDir": self.dir.path().join("conf")});
            for (k, v) in extra.as_object().expect("object") {
                c[k] = v.clone();
            }
            MultusConf::parse(c.to_string().as_bytes()).expect("conf")
        }

        fn resolve(
            &self,
            conf: &MultusConf,
            pod_ns: &str,
            networks: &str,
        ) -> Result<Vec<(String, String)>, String> {
            let info = PodInfo {
                uid: "u".into(),
                annotations: [(NETWORKS_ANNOTATION.to_string(), networks.to_string())].into_iter().collect(),
                ..PodInfo::default()
            };
            let pod = Pod { namespace: pod_ns, info: Some(&info) };
            delegates(conf, Some(&self.source), &pod, "eth0")
                .map(|ds| ds.iter().enumerate().map(|(i, d)| (d.name.clone(), d.ifname("eth0", i))).collect())
                .map_err(|e| e.msg)
        }
    }

    fn mv() -> Option<Value> {
        Some(json!({"cniVersion": "1.0.0", "type": "macvlan"}))
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn namespace_isolation_and_global_namespaces() {
        let w = World::new();
        w.conf_file("10-cluster.conf", "cluster", "bridge");
        for (ns, name) in [("team", "a"), ("other", "b"), ("default", "c"), ("shared", "d")] {
            w.nad(ns, name, mv());
        }
        let open = w.conf(json!({}));
        assert_eq!(
            w.resolve(&open, "team", "a, other/b").expect("no isolation"),
            pairs(&[("cluster", "eth0"), ("team/a", "net1"), ("other/b", "net2")])
        );
        let isolated = w.conf(json!({"namespaceIsolation": true}));
        assert_eq!(
            w.resolve(&isolated, "team", "a,default/c").expect("own and default"),
            pairs(&[("cluster", "eth0"), ("team/a", "net1"), ("default/c", "net2")])
        );
        assert_eq!(
            w.resolve(&isolated, "team", "other/b").expect_err("isolated"),
            "namespace isolation: pod in namespace \"team\" may not use networks of namespace \"other\" (allowed: its own and globalNamespaces [\"default\"])"
        );
        let global = w.conf(json!({"namespaceIsolation": true, "globalNamespaces": "shared,other"}));
        assert!(w.resolve(&global, "team", "other/b,shared/d").is_ok());
        assert!(
            w.resolve(&global, "team", "default/c")
                .expect_err("default is no longer global")
                .contains("\"default\"")
        );
        assert!(check_isolation(&global, "x", "x").is_ok());
    }

    #[test]
    fn cluster_network_forms_and_default_networks() {
        let w = World::new();
        w.conf_file("10-cluster.conf", "cluster", "bridge");
        w.conf_file("20-other.conflist", "second", "ptp");
        w.nad("kube-system", "cluster", Some(json!({"cniVersion": "1.0.0", "type": "flannel"})));
        w.nad("kube-system", "extra", Some(json!({"cniVersion": "1.0.0", "type": "tuning"})));
        w.nad("team", "a", mv());
        // A NAD in multusNamespace wins over a conf file of the same name.
        let c = w.conf(json!({}));
        let ds = delegates(&c, Some(&w.source), &Pod { namespace: "team", info: None }, "eth0").expect("nad");
        assert_eq!(
            (ds[0].name.as_str(), ds[0].conf["type"].as_str()),
            ("kube-system/cluster", Some("flannel"))
        );
        // A conf name in confDir when there is no NAD.
        let c = w.conf(json!({"clusterNetwork": "second"}));
        let ds = delegates(&c, Some(&w.source), &Pod { namespace: "team", info: None }, "eth0")
            .expect("conf name");
        assert_eq!((ds[0].name.as_str(), ds[0].conf["type"].as_str()), ("second", Some("ptp")));
        // An absolute path: a file, or a directory's first config.
        let file = w.dir.path().join("conf/20-other.conflist");
        let c = w.conf(json!({"clusterNetwork": file}));
        let ds = delegates(&c, None, &Pod { namespace: "team", info: None }, "eth0").expect("file");
        assert_eq!(ds[0].name, "second");
        let c = w.conf(json!({"clusterNetwork": w.dir.path().join("conf")}));
        let ds = delegates(&c, None, &Pod { namespace: "team", info: None }, "eth0").expect("dir");
        assert_eq!(ds[0].name, "cluster");
        // namespace/name.
        let c = w.conf(json!({"clusterNetwork": "team/a"}));
        let ds =
            delegates(&c, Some(&w.source), &Pod { namespace: "x", info: None }, "eth0").expect("ns/name");
        assert_eq!(ds[0].name, "team/a");
        let c = w.conf(json!({"clusterNetwork": "nothing"}));
        assert_eq!(
            delegates(&c, Some(&w.source), &Pod { namespace: "x", info: None }, "eth0")
                .expect_err("unknown")
                .msg,
            format!(
                "cannot find network \"nothing\": NetworkAttachmentDefinition kube-system/nothing not found (networks are looked up in the pod's namespace unless one is given); and {} has no config named \"nothing\"",
                w.dir.path().join("conf").display()
            )
        );
        // defaultNetworks come before the annotation and shift its generated names; not in
        // systemNamespaces.
        let c = w.conf(json!({"defaultNetworks": ["extra"]}));
        assert_eq!(
            w.resolve(&c, "team", "a").expect("default networks"),
            pairs(&[("kube-system/cluster", "eth0"), ("kube-system/extra", "net1"), ("team/a", "net2")])
        );
        w.nad("kube-system", "a", mv());
        assert_eq!(
            w.resolve(&c, "kube-system", "a").expect("system namespace"),
            pairs(&[("kube-system/cluster", "eth0"), ("kube-system/a", "net1")])
        );
        assert_eq!(
            w.resolve(&c, "team", "a@net2, a@net1").expect_err("clash with a default network"),
            "interface \"net1\" is used by two networks: kube-system/extra and team/a (name one of them with @ifname or \"interface\")"
        );
        // The pod's own default network.
        let info = PodInfo {
            uid: String::new(),
            annotations: [(DEFAULT_NETWORK_ANNOTATION.to_string(), "second".to_string())]
                .into_iter()
                .collect(),
            ..PodInfo::default()
        };
        let ds = delegates(
            &w.conf(json!({})),
            Some(&w.source),
            &Pod { namespace: "team", info: Some(&info) },
            "eth0",
        )
        .expect("pod default");
        assert_eq!(ds[0].name, "second");
    }

    #[test]
    fn nad_configs_and_requests() {
        let w = World::new();
        w.conf_file("10-cluster.conf", "cluster", "bridge");
        w.conf_file("30-from-file.conf", "from-file", "ipvlan");
        w.nad("team", "unnamed", mv());
        w.nad("team", "from-file", None);
        w.nad("team", "broken", Some(json!(["not", "an", "object"])));
        let c = w.conf(json!({}));
        let d = nad_delegate(&c, Some(&w.source), "team", "unnamed", &Map::new()).expect("unnamed");
        assert_eq!(serde_json::from_slice::<Value>(&d.bytes).expect("JSON")["name"], "unnamed");
        let d = nad_delegate(&c, Some(&w.source), "team", "from-file", &Map::new()).expect("from confDir");
        assert_eq!(d.conf["type"], "ipvlan");
        assert_eq!(
            nad_delegate(&c, Some(&w.source), "team", "broken", &Map::new()).expect_err("array").msg,
            "NetworkAttachmentDefinition team/broken: spec.config is not a JSON object"
        );
        assert_eq!(
            nad_delegate(&c, None, "team", "unnamed", &Map::new()).expect_err("no source").msg,
            "NetworkAttachmentDefinition team/unnamed: no source of NADs is configured (kubeconfig or rustMultus.objectsDir)"
        );
        let gone = DirSource::new(w.dir.path().join("missing"));
        let e = nad_delegate(&c, Some(&gone), "team", "unnamed", &Map::new()).expect_err("unreachable");
        assert_eq!(e.code, ErrorCode::TRY_AGAIN_LATER);

        let info = PodInfo {
            uid: String::new(),
            annotations: [(
                NETWORKS_ANNOTATION.to_string(),
                r#"[{"name":"unnamed","interface":"fast0","ips":["10.1.1.5/24"],"mac":"c2:11:22:33:44:55",
                    "default-route":["10.1.1.1"],"cni-args":{"x":1}}]"#
                    .to_string(),
            )]
            .into_iter()
            .collect(),
            ..PodInfo::default()
        };
        let ds = delegates(&c, Some(&w.source), &Pod { namespace: "team", info: Some(&info) }, "eth0")
            .expect("ok");
        let d = &ds[1];
        assert_eq!(
            (d.ifname_request.as_str(), &d.ip_request, d.mac_request.as_str(), &d.gateway_request),
            (
                "fast0",
                &vec!["10.1.1.5/24".to_string()],
                "c2:11:22:33:44:55",
                &Some(vec!["10.1.1.1".to_string()])
            )
        );
        assert_eq!(
            serde_json::from_slice::<Value>(&d.bytes).expect("JSON")["args"],
            json!({"cni": {"x": 1}})
        );
        // The default route moves: the cluster network loses its IPv4 one, nobody keeps IPv6.
        assert_eq!((ds[0].filter_v4_gateway, ds[0].filter_v6_gateway), (true, true));
        assert_eq!((d.filter_v4_gateway, d.filter_v6_gateway), (false, true));
    }
}
