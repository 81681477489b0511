//! Delegates: one network of the pod, kept in the cache as Multus keeps it (its
//! `DelegateNetConf` JSON), and called as libcni calls a network: the config or each plugin
//! of a conflist, declared capabilities as `runtimeConfig`, the result cached under
//! `<cniDir>/results/` (`cniCacheV1`) and given back as `prevResult` on DEL and CHECK.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use cni::{CniError, CniResult, Command, ErrorCode, LATEST_VERSION, Version};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value, json};

use cni::exec;

/// One delegate network, in the JSON shape of Multus' cache file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delegate {
    /// The single config's common keys (`{"ipam": {}}` for a conflist).
    #[serde(rename = "Conf")]
    pub conf: Value,
    /// The conflist's common keys (`{}` for a single config).
    #[serde(rename = "ConfList")]
    pub conf_list: Value,
    /// `namespace/name` of the NAD, or the config's name.
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "ifnameRequest", default, skip_serializing_if = "String::is_empty")]
    pub ifname_request: String,
    #[serde(rename = "macRequest", default, skip_serializing_if = "String::is_empty")]
    pub mac_request: String,
    #[serde(rename = "ipRequest", default, skip_serializing_if = "Vec::is_empty")]
    pub ip_request: Vec<String>,
    #[serde(rename = "default-route", default, skip_serializing_if = "Option::is_none")]
    pub gateway_request: Option<Vec<String>>,
    #[serde(rename = "IsFilterV4Gateway", default)]
    pub filter_v4_gateway: bool,
    #[serde(rename = "IsFilterV6Gateway", default)]
    pub filter_v6_gateway: bool,
    /// The NAD's `k8s.v1.cni.cncf.io/resourceName`: the device plugin resource it needs.
    #[serde(rename = "resourceName", default, skip_serializing_if = "String::is_empty")]
    pub resource_name: String,
    /// The device of that resource this network got (also in `bytes`, see
    /// [`super::devices`]).
    #[serde(rename = "deviceID", default, skip_serializing_if = "String::is_empty")]
    pub device_id: String,
    /// The config as the delegate gets it (base64 in JSON, as Go writes `[]byte`).
    #[serde(rename = "Bytes", serialize_with = "ser_b64", deserialize_with = "de_b64")]
    pub bytes: Vec<u8>,
}

fn ser_b64<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&B64.encode(b))
}

fn de_b64<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let s = String::deserialize(d)?;
    B64.decode(s.as_bytes()).map_err(serde::de::Error::custom)
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::INVALID_CONFIG, msg)
}

/// The keys of a plugin config that Multus' cache repeats (libcni's `NetConf`).
fn conf_summary(c: &Map<String, Value>) -> Value {
    let mut out = Map::new();
    for k in ["cniVersion", "name", "type"] {
        if let Some(v) = c.get(k).filter(|v| v.as_str().is_some_and(|s| !s.is_empty())) {
            out.insert(k.into(), v.clone());
        }
    }
    if let Some(caps) = c.get("capabilities").filter(|v| v.as_object().is_some_and(|m| !m.is_empty())) {
        out.insert("capabilities".into(), caps.clone());
    }
    let ipam_type =
        c.get("ipam").and_then(|i| i.get("type")).and_then(Value::as_str).filter(|t| !t.is_empty());
    out.insert("ipam".into(), ipam_type.map_or_else(|| json!({}), |t| json!({"type": t})));
    Value::Object(out)
}

/// A parsed delegate config: a single config or a conflist.
#[derive(Debug, Clone)]
pub struct Network {
    pub name: String,
    pub cni_version: String,
    /// The plugins, in order (one for a single config).
    pub plugins: Vec<Map<String, Value>>,
    pub is_list: bool,
}

impl Network {
    /// Parses delegate config bytes; `what` names the network in errors.
    pub fn parse(bytes: &[u8], what: &str) -> Result<Network, CniError> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| invalid(format!("network {what}: config is not valid JSON: {e}")))?;
        let Value::Object(mut top) = v else {
            return Err(invalid(format!("network {what}: config is not a JSON object")));
        };
        let name = top.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
        let cni_version = top.get("cniVersion").and_then(Value::as_str).unwrap_or_default().to_string();
        if cni_version.is_empty() {
            return Err(invalid(format!("network {what}: config has no cniVersion")));
        }
        let (plugins, is_list) = match top.remove("plugins") {
            Some(Value::Array(list)) => {
                if list.is_empty() {
                    return Err(invalid(format!("network {what}: conflist has no plugins")));
                }
                let plugins = list
                    .into_iter()
                    .enumerate()
                    .map(|(i, p)| match p {
                        Value::Object(m) => Ok(m),
                        other => {
                            Err(invalid(format!("network {what}: plugins[{i}] is {other}, not an object")))
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                (plugins, true)
            }
            Some(other) => return Err(invalid(format!("network {what}: plugins is {other}, not a list"))),
            None => (vec![top], false),
        };
        for (i, p) in plugins.iter().enumerate() {
            if p.get("type").and_then(Value::as_str).is_none_or(str::is_empty) {
                let at = if is_list { format!(" plugins[{i}]") } else { String::new() };
                return Err(invalid(format!("network {what}:{at} config has no \"type\"")));
            }
        }
        Ok(Network { name, cni_version, plugins, is_list })
    }

    fn version_at_least(&self, v: Version) -> bool {
        Version::parse(&self.cni_version).is_some_and(|have| have >= v)
    }

    /// The stdin of plugin `i`: libcni's injections (list name and version, `prevResult`,
    /// the capabilities the plugin declares as `runtimeConfig`) on top of its config.
    fn plugin_stdin(&self, i: usize, prev: Option<&Value>, caps: &Map<String, Value>) -> Vec<u8> {
        let mut p = self.plugins[i].clone();
        if self.is_list {
            p.insert("name".into(), Value::String(self.name.clone()));
            p.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        }
        let declared = p.get("capabilities").and_then(Value::as_object).cloned().unwrap_or_default();
        let rc: Map<String, Value> = declared
            .iter()
            .filter(|(_, on)| on.as_bool() == Some(true))
            .filter_map(|(k, _)| caps.get(k).map(|v| (k.clone(), v.clone())))
            .collect();
        if !rc.is_empty() {
            p.insert("runtimeConfig".into(), Value::Object(rc));
        }
        if let Some(prev) = prev {
            p.insert("prevResult".into(), prev.clone());
        }
        serde_json::to_vec(&p).unwrap_or_default()
    }
}

impl Delegate {
    /// A delegate from config bytes (NAD `spec.config`, a conf file, an inline delegate).
    /// `name` is the name it is known by (`namespace/name` for a NAD); `cni_args` are the
    /// annotation's `cni-args`, put into the config as `args.cni` as Multus does.
    pub fn load(
        bytes: &[u8],
        name: Option<&str>,
        cni_args: &Map<String, Value>,
    ) -> Result<Delegate, CniError> {
        let what = name.unwrap_or("(unnamed)");
        let mut bytes = bytes.to_vec();
        if !cni_args.is_empty() {
            let mut v: Value = serde_json::from_slice(&bytes)
                .map_err(|e| invalid(format!("network {what}: config is not valid JSON: {e}")))?;
            let targets: Vec<&mut Value> = match v.get_mut("plugins").and_then(Value::as_array_mut) {
                Some(list) => list.iter_mut().collect(),
                None => vec![&mut v],
            };
            for t in targets {
                if let Some(obj) = t.as_object_mut() {
                    let args = obj.entry("args").or_insert_with(|| json!({}));
                    if !args.is_object() {
                        *args = json!({});
                    }
                    args["cni"] = Value::Object(cni_args.clone());
                }
            }
            bytes = serde_json::to_vec(&v).unwrap_or_default();
        }
        let net = Network::parse(&bytes, what)?;
        let (conf, conf_list) = if net.is_list {
            let plugins: Vec<Value> = net.plugins.iter().map(conf_summary).collect();
            (
                json!({"ipam": {}}),
                json!({"cniVersion": net.cni_version, "name": net.name, "plugins": plugins}),
            )
        } else {
            (conf_summary(&net.plugins[0]), json!({}))
        };
        Ok(Delegate {
            conf,
            conf_list,
            name: name.map_or_else(|| net.name.clone(), str::to_string),
            ifname_request: String::new(),
            mac_request: String::new(),
            ip_request: Vec::new(),
            gateway_request: None,
            filter_v4_gateway: false,
            filter_v6_gateway: false,
            resource_name: String::new(),
            device_id: String::new(),
            bytes,
        })
    }

    /// The parsed config.
    pub fn network(&self) -> Result<Network, CniError> {
        Network::parse(&self.bytes, &self.name)
    }

    /// The interface in the pod: requested, the runtime's for the cluster network (index 0),
    /// else `net<index>` (Multus' `getIfname`).
    pub fn ifname(&self, runtime_ifname: &str, index: usize) -> String {
        if !self.ifname_request.is_empty() {
            self.ifname_request.clone()
        } else if index == 0 {
            runtime_ifname.to_string()
        } else {
            format!("net{index}")
        }
    }

    /// Capability arguments Multus derives from the pod's request (`ips`, `mac`).
    pub fn capability_args(&self) -> Map<String, Value> {
        let mut m = Map::new();
        if !self.ip_request.is_empty() {
            m.insert("ips".into(), json!(self.ip_request));
        }
        if !self.mac_request.is_empty() {
            m.insert("mac".into(), json!(self.mac_request));
        }
        if !self.device_id.is_empty() {
            m.insert("deviceID".into(), json!(self.device_id));
        }
        m
    }
}

/// The pod's identity as the delegates get it in `CNI_ARGS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodArgs {
    pub namespace: String,
    pub name: String,
    pub infra_container_id: String,
    pub uid: String,
}

/// `CNI_ARGS` for a delegate, as Multus builds it: its own five pairs, then the runtime's
/// `CNI_ARGS` as given, then on ADD the deprecated `IP=`/`MAC=` of a static request.
pub fn cni_args(pod: &PodArgs, runtime_args: &str, ips: &[String], mac: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = [
        ("IgnoreUnknown", "true"),
        ("K8S_POD_NAMESPACE", pod.namespace.as_str()),
        ("K8S_POD_NAME", pod.name.as_str()),
        ("K8S_POD_INFRA_CONTAINER_ID", pod.infra_container_id.as_str()),
        ("K8S_POD_UID", pod.uid.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for part in runtime_args.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        out.push((k.to_string(), v.to_string()));
    }
    if !ips.is_empty() {
        out.push(("IP".into(), ips.join(",")));
    }
    if !mac.is_empty() {
        out.push(("MAC".into(), mac.to_string()));
    }
    out
}

/// `K=V;K=V`.
pub fn join_args(args: &[(String, String)]) -> String {
    args.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";")
}

/// libcni's cached result of one attachment (`<cniDir>/results/<net>-<cid>-<ifname>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedResult {
    pub kind: String,
    #[serde(rename = "containerId")]
    pub container_id: String,
    #[serde(serialize_with = "ser_b64", deserialize_with = "de_b64")]
    pub config: Vec<u8>,
    #[serde(rename = "ifName")]
    pub if_name: String,
    #[serde(rename = "networkName")]
    pub network_name: String,
    #[serde(default)]
    pub netns: String,
    #[serde(rename = "cniArgs", default)]
    pub cni_args: Vec<(String, String)>,
    #[serde(rename = "capabilityArgs", default, skip_serializing_if = "Map::is_empty")]
    pub capability_args: Map<String, Value>,
    pub result: Value,
}

/// What a delegate's ADD printed, as the rest of ADD uses it.
#[derive(Debug, Clone, PartialEq)]
pub enum AddResult {
    /// A result of 0.3.0 or later, and the version it is written in.
    Typed(CniResult, Version),
    /// A 0.1.0/0.2.0 result: another shape, which Multus passes through unconverted.
    Legacy(Value),
}

impl AddResult {
    /// Reads what a network printed; its own `cniVersion`, else the network's
    /// (`net_version`), says which version it is.
    pub fn parse(raw: &Value, net_version: &str) -> Result<AddResult, CniError> {
        let version = raw
            .get("cniVersion")
            .and_then(Value::as_str)
            .and_then(Version::parse)
            .or_else(|| Version::parse(net_version))
            .unwrap_or(LATEST_VERSION);
        if version < Version::new(0, 3, 0) {
            return Ok(AddResult::Legacy(raw.clone()));
        }
        Ok(AddResult::Typed(CniResult::parse(raw)?, version))
    }
}

/// One attachment of a delegate.
#[derive(Debug, Clone)]
pub struct Attachment<'a> {
    pub container_id: &'a str,
    pub netns: &'a str,
    pub ifname: &'a str,
    pub args: Vec<(String, String)>,
    pub capability_args: Map<String, Value>,
    /// Directories searched for plugin binaries.
    pub path: &'a [PathBuf],
    /// Multus' `cniDir`.
    pub cache_dir: &'a Path,
}

/// Path of the cached result.
pub fn result_path(cache_dir: &Path, network: &str, container_id: &str, ifname: &str) -> PathBuf {
    cache_dir.join("results").join(format!("{network}-{container_id}-{ifname}"))
}

/// Reads a cached result, `None` when there is none.
pub fn read_result(path: &Path) -> Option<CachedResult> {
    let text = std::fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Writes a cached result (mode 0600, in a 0700 directory).
pub fn write_result(path: &Path, c: &CachedResult) -> Result<(), CniError> {
    let fail =
        |e: std::io::Error| CniError::new(ErrorCode::IO_FAILURE, format!("writing {}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        super::cache::create_private_dir(dir).map_err(fail)?;
    }
    let bytes = serde_json::to_vec(c).unwrap_or_default();
    super::cache::write_private(path, &bytes).map_err(fail)
}

fn call<'a>(command: Command, a: &'a Attachment<'a>, args: &'a str) -> exec::Call<'a> {
    exec::Call { command, container_id: a.container_id, netns: a.netns, ifname: a.ifname, args, path: a.path }
}

/// ADD: runs the network (each plugin of a conflist with the previous result) and caches
/// the final result as it was printed.
pub fn add(d: &Delegate, a: &Attachment<'_>) -> Result<AddResult, CniError> {
    let net = d.network()?;
    let args = join_args(&a.args);
    let mut prev: Option<Value> = None;
    for (i, p) in net.plugins.iter().enumerate() {
        let kind = p.get("type").and_then(Value::as_str).unwrap_or_default();
        let stdin = net.plugin_stdin(i, prev.as_ref(), &a.capability_args);
        prev = Some(exec::run(kind, &call(Command::Add, a, &args), &stdin)?);
    }
    let result = prev.unwrap_or(Value::Null);
    let cached = CachedResult {
        kind: "cniCacheV1".into(),
        container_id: a.container_id.into(),
        config: d.bytes.clone(),
        if_name: a.ifname.into(),
        network_name: net.name.clone(),
        netns: a.netns.into(),
        cni_args: a.args.clone(),
        capability_args: a.capability_args.clone(),
        result,
    };
    write_result(&result_path(a.cache_dir, &net.name, a.container_id, a.ifname), &cached)?;
    AddResult::parse(&cached.result, &net.cni_version)
}

/// DEL: every plugin in reverse order, with the cached result as `prevResult` (CNI 0.4.0
/// and later); the cached result is removed when all succeed.
pub fn del(d: &Delegate, a: &Attachment<'_>) -> Result<(), CniError> {
    let net = d.network()?;
    let args = join_args(&a.args);
    let path = result_path(a.cache_dir, &net.name, a.container_id, a.ifname);
    let cached = read_result(&path).map(|c| c.result);
    let prev = cached.as_ref().filter(|_| net.version_at_least(Command::Check.since()));
    for i in (0..net.plugins.len()).rev() {
        let kind = net.plugins[i].get("type").and_then(Value::as_str).unwrap_or_default();
        let stdin = net.plugin_stdin(i, prev, &a.capability_args);
        exec::run(kind, &call(Command::Del, a, &args), &stdin)?;
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// CHECK: every plugin with the cached result as `prevResult`.
pub fn check(d: &Delegate, a: &Attachment<'_>) -> Result<(), CniError> {
    let net = d.network()?;
    if !net.version_at_least(Command::Check.since()) {
        return Err(CniError::new(
            ErrorCode::INCOMPATIBLE_VERSION,
            format!("network {}: cniVersion {} has no CHECK", d.name, net.cni_version),
        ));
    }
    let path = result_path(a.cache_dir, &net.name, a.container_id, a.ifname);
    let cached = read_result(&path).ok_or_else(|| {
        CniError::new(
            ErrorCode::INVALID_CONFIG,
            format!("network {}: no cached result at {}", d.name, path.display()),
        )
    })?;
    let args = join_args(&a.args);
    for i in 0..net.plugins.len() {
        let kind = net.plugins[i].get("type").and_then(Value::as_str).unwrap_or_default();
        let stdin = net.plugin_stdin(i, Some(&cached.result), &a.capability_args);
        exec::run(kind, &call(Command::Check, a, &args), &stdin)?;
    }
    Ok(())
}

/// GC or STATUS of every plugin of a network (skipped below CNI 1.1.0, as libcni does);
/// GC carries the attachments that stay (`cni.dev/valid-attachments`).
pub fn gc_or_status(
    d: &Delegate,
    command: Command,
    valid: &[(String, String)],
    path: &[PathBuf],
) -> Result<(), CniError> {
    let net = d.network()?;
    if !net.version_at_least(Command::Gc.since()) {
        return Ok(());
    }
    for i in 0..net.plugins.len() {
        let kind = net.plugins[i].get("type").and_then(Value::as_str).unwrap_or_default();
        let mut stdin: Value =
            serde_json::from_slice(&net.plugin_stdin(i, None, &Map::new())).unwrap_or_default();
        if command == Command::Gc {
            let list: Vec<Value> =
                valid.iter().map(|(c, i)| json!({"containerID": c, "ifname": i})).collect();
            stdin["cni.dev/valid-attachments"] = Value::Array(list);
        }
        let c = exec::Call { command, container_id: "", netns: "", ifname: "", args: "", path };
        exec::run(kind, &c, &serde_json::to_vec(&stdin).unwrap_or_default())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(path: &str) -> String {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/multus").join(path);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn fixture_delegates() -> Vec<Delegate> {
        let cache: Value = serde_json::from_str(&fixture("cache/cid-fx1")).expect("JSON");
        let bytes = |i: usize| B64.decode(cache[i]["Bytes"].as_str().expect("Bytes")).expect("base64");
        let eth0 = Delegate::load(&bytes(0), None, &Map::new()).expect("default-net");
        let mut net1 = Delegate::load(&bytes(1), Some("fixture/rail-0"), &Map::new()).expect("rail-0");
        net1.ifname_request = "net1".into();
        let mut net2 = Delegate::load(&bytes(2), Some("fixture/rail-1"), &Map::new()).expect("rail-1");
        net2.ifname_request = "net2".into();
        net2.ip_request = vec!["198.18.31.42/24".into()];
        vec![eth0, net1, net2]
    }

    #[test]
    fn cache_file_has_the_shape_multus_wrote() {
        let ours = fixture_delegates();
        let theirs: Value = serde_json::from_str(&fixture("cache/cid-fx1")).expect("JSON");
        assert_eq!(serde_json::to_value(&ours).expect("JSON"), theirs);
        // And Multus' file reads back as the same delegates.
        let back: Vec<Delegate> = serde_json::from_value(theirs).expect("read Multus' cache");
        assert_eq!(back, ours);
        assert_eq!(
            [ours[0].ifname("eth0", 0), ours[1].ifname("eth0", 1), ours[2].ifname("eth0", 2)],
            ["eth0", "net1", "net2"]
        );
        let mut unnamed = ours[1].clone();
        unnamed.ifname_request.clear();
        assert_eq!(unnamed.ifname("eth0", 4), "net4");
    }

    #[test]
    fn cni_args_are_those_multus_passed() {
        // shared/fixtures/multus/delegate-calls.log: ADD net2 with a static IP, then DEL.
        let log = fixture("delegate-calls.log");
        let logged = |call: &str| {
            let block = log.split("== ").find(|b| b.starts_with(call)).expect("call in log");
            block.lines().find_map(|l| l.strip_prefix("CNI_ARGS=")).expect("CNI_ARGS").to_string()
        };
        let uid = "0b6e8ad1-0009-4d6b-935f-6ee53c4b07ab";
        let pod = PodArgs {
            namespace: "fixture".into(),
            name: "trainer".into(),
            infra_container_id: "cid-fx1".into(),
            uid: uid.into(),
        };
        let runtime = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=fixture;K8S_POD_NAME=trainer;K8S_POD_INFRA_CONTAINER_ID=cid-fx1;K8S_POD_UID={uid}"
        );
        let add = cni_args(&pod, &runtime, &["198.18.31.42/24".to_string()], "");
        assert_eq!(join_args(&add), logged("ADD net2"));
        assert_eq!(join_args(&cni_args(&pod, &runtime, &[], "")), logged("ADD net1"));
        // DEL: the runtime gave no UID and Multus did not look the pod up.
        let pod = PodArgs { uid: String::new(), ..pod };
        let runtime = "IgnoreUnknown=1;K8S_POD_NAMESPACE=fixture;K8S_POD_NAME=trainer;K8S_POD_INFRA_CONTAINER_ID=cid-fx1";
        assert_eq!(join_args(&cni_args(&pod, runtime, &[], "")), logged("DEL net2"));
        // libcni's cached cniArgs list is the same pairs.
        let cached: CachedResult =
            serde_json::from_str(&fixture("cache/results/rail-1-cid-fx1-net2")).expect("cniCacheV1");
        assert_eq!(cached.cni_args, cni_args(&pod, runtime, &["198.18.31.42/24".to_string()], ""));
        assert_eq!(cni_args(&pod, "", &[], "c2:11:22:33:44:55").last().expect("mac").1, "c2:11:22:33:44:55");
    }

    #[test]
    fn stdin_is_what_the_delegate_got() {
        let log = fixture("delegate-calls.log");
        let block = log.split("== ").find(|b| b.starts_with("DEL net2")).expect("DEL net2");
        let logged: Value =
            serde_json::from_str(block.lines().find_map(|l| l.strip_prefix("stdin: ")).expect("stdin"))
                .expect("JSON");
        let d = &fixture_delegates()[2];
        let net = d.network().expect("network");
        let prev = &logged["prevResult"];
        let ours: Value =
            serde_json::from_slice(&net.plugin_stdin(0, Some(prev), &d.capability_args())).expect("JSON");
        // The recorder rewrote host-local's dataDir in one place and not the other.
        let mut theirs = logged.clone();
        theirs["ipam"]["dataDir"] = ours["ipam"]["dataDir"].clone();
        assert_eq!(ours, theirs, "no runtimeConfig: macvlan declares no ips capability");
        let mut with_caps: Value = serde_json::from_slice(&d.bytes).expect("JSON");
        with_caps["capabilities"] = json!({"ips": true, "mac": false});
        let d2 = Delegate::load(
            &serde_json::to_vec(&with_caps).expect("JSON"),
            Some("fixture/rail-1"),
            &Map::new(),
        )
        .expect("load");
        assert_eq!(d2.conf["capabilities"], json!({"ips": true, "mac": false}));
        let caps = Map::from_iter([
            ("ips".into(), json!(["198.18.31.42/24"])),
            ("mac".into(), json!("c2:11:22:33:44:55")),
        ]);
        let stdin: Value =
            serde_json::from_slice(&d2.network().expect("net").plugin_stdin(0, None, &caps)).expect("JSON");
        assert_eq!(stdin["runtimeConfig"], json!({"ips": ["198.18.31.42/24"]}));
    }

    #[test]
    fn results_are_typed_unless_older_than_0_3_0() {
        let r = AddResult::parse(&json!({"ips": [{"address": "10.1.0.5/16"}]}), "0.4.0").expect("typed");
        let AddResult::Typed(typed, version) = r else { panic!("{r:?}") };
        assert_eq!((typed.ips.len(), version), (1, Version::new(0, 4, 0)));
        let old = json!({"cniVersion": "0.2.0", "ip4": {"ip": "10.1.0.5/16"}});
        assert_eq!(AddResult::parse(&old, "1.0.0").expect("legacy"), AddResult::Legacy(old));
        let e = AddResult::parse(&json!({"ips": [{"gateway": "10.0.0.1"}]}), "1.0.0").expect_err("bad");
        assert_eq!(
            (e.code, e.msg.as_str()),
            (ErrorCode::DECODE, "ips[0].address \"\" is not an address with a prefix length (10.1.2.3/24)")
        );
    }

    #[test]
    fn conflists_and_cni_args_and_bad_configs() {
        let list = json!({"cniVersion": "1.1.0", "name": "pods", "plugins": [
            {"type": "bridge", "ipam": {"type": "host-local"}}, {"type": "portmap", "capabilities": {"portMappings": true}}]});
        let args = Map::from_iter([("mtu".to_string(), json!(9000))]);
        let d = Delegate::load(list.to_string().as_bytes(), None, &args).expect("conflist");
        assert_eq!(d.name, "pods");
        assert_eq!(d.conf, json!({"ipam": {}}));
        assert_eq!(
            d.conf_list,
            json!({"cniVersion": "1.1.0", "name": "pods", "plugins": [{"type": "bridge", "ipam": {"type": "host-local"}},
                {"type": "portmap", "capabilities": {"portMappings": true}, "ipam": {}}]})
        );
        let net = d.network().expect("net");
        let second: Value =
            serde_json::from_slice(&net.plugin_stdin(1, Some(&json!({"ips": []})), &Map::new()))
                .expect("JSON");
        assert_eq!(second["name"], "pods");
        assert_eq!(second["cniVersion"], "1.1.0");
        assert_eq!(second["args"], json!({"cni": {"mtu": 9000}}));
        assert_eq!(second["prevResult"], json!({"ips": []}));

        let e = Delegate::load(br#"{"cniVersion":"1.0.0","name":"x"}"#, Some("ns/x"), &Map::new())
            .expect_err("no type");
        assert_eq!(
            (e.code, e.msg.as_str()),
            (ErrorCode::INVALID_CONFIG, "network ns/x: config has no \"type\"")
        );
        let e =
            Delegate::load(br#"{"name":"x","type":"a"}"#, Some("ns/x"), &Map::new()).expect_err("no version");
        assert_eq!(e.msg, "network ns/x: config has no cniVersion");
        let e = Delegate::load(br#"{"cniVersion":"1.0.0","plugins":[]}"#, Some("ns/x"), &Map::new())
            .expect_err("empty");
        assert_eq!(e.msg, "network ns/x: conflist has no plugins");
        let e = Delegate::load(b"{", Some("ns/x"), &Map::new()).expect_err("json");
        assert!(e.msg.starts_with("network ns/x: config is not valid JSON: "), "{e}");
    }
}
