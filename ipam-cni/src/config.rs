//! The network configuration on stdin and the `ipam` section's keys (Whereabouts' keys, so a
//! NAD migrates by changing only `type`), merged with the node config file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rust_ipam_proto::ClientTls;
use serde::Deserialize;
use serde_json::{Map, Value};

use cni::{CniError, ErrorCode, NetworkConfig, Route};

/// Node config file, used for keys the NAD does not set.
pub const NODE_CONFIG: &str = "/etc/cni/net.d/rust-ipam.d/rust-ipam.conf";
/// Where the server is when nothing says otherwise.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";
const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// One range as Whereabouts writes it (top-level keys or an `ipRanges` entry).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RangeConf {
    #[serde(default)]
    pub range: String,
    #[serde(default)]
    pub range_start: String,
    #[serde(default)]
    pub range_end: String,
    #[serde(default)]
    pub exclude: Vec<String>,
}

/// `server`: one endpoint or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
enum Servers {
    One(String),
    Many(Vec<String>),
}

/// The `ipam` keys as given (NAD or node file); every field optional so the two merge.
#[derive(Debug, Clone, Default, Deserialize)]
struct RawIpam {
    #[serde(flatten)]
    range: RawRange,
    #[serde(rename = "ipRanges")]
    ip_ranges: Option<Vec<RangeConf>>,
    /// An IPPool to allocate from instead of ranges written here.
    pool: Option<String>,
    gateway: Option<String>,
    routes: Option<Vec<Route>>,
    dns: Option<Value>,
    network_name: Option<String>,
    enable_overlapping_ranges: Option<bool>,
    configuration_path: Option<String>,
    server: Option<Servers>,
    /// Whole budget of one command, across endpoints and retries.
    timeout_ms: Option<u64>,
    /// Node name recorded on leases; default: the `NODE_NAME` environment, else the host name.
    node_name: Option<String>,
    /// Whereabouts' logging keys: `debug` writes what the plugin decides to `log_file`
    /// (default: stderr).
    log_level: Option<String>,
    log_file: Option<String>,
    /// PEM files for `https://` servers: the CA of the server's certificate, and this
    /// node's client certificate and key when the server asks for one (mutual TLS).
    tls_ca: Option<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    /// A ServiceAccount token file (the node DaemonSet's projected token, copied to the
    /// host), sent to servers that authorize callers (`--authorize`).
    token_file: Option<String>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct RawRange {
    range: Option<String>,
    range_start: Option<String>,
    range_end: Option<String>,
    exclude: Option<Vec<String>>,
}

/// The effective ipam configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct IpamConf {
    /// The IPPool named by `pool` ("" for ranges written in the config); its name is the
    /// network, and the server gives its ranges, routes and DNS.
    pub pool: String,
    pub ranges: Vec<RangeConf>,
    pub gateway: String,
    pub routes: Vec<Route>,
    pub dns: Option<Value>,
    pub network_name: String,
    pub servers: Vec<String>,
    pub timeout: Duration,
    pub node_name: String,
    /// Write debug lines (`log_level` = `debug`).
    pub debug: bool,
    /// Where debug lines go; empty: stderr.
    pub log_file: String,
    /// TLS material for `https://` servers, read when the config is.
    pub tls: Option<ClientTls>,
    /// The token from `token_file`, read when the config is.
    pub token: Option<String>,
    /// Keys accepted and not used (Whereabouts' datastore keys, for instance).
    pub ignored: Vec<String>,
}

/// The network configuration on stdin.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub ipam: Option<IpamConf>,
    /// Static addresses from `runtimeConfig.ips` and `args.cni.ips`.
    pub static_ips: Vec<String>,
    pub prev_result: Option<Value>,
    /// GC: `cni.dev/valid-attachments` (or the older `cni.dev/attachments`).
    pub valid_attachments: Vec<(String, String)>,
    /// `args.cni["ipam-claim-reference"]`: the IPAMClaim that owns the addresses (the
    /// network selection element's key, which rust-multus passes on there).
    pub ipam_claim: String,
    /// `allowPersistentIPs` (KubeVirt's switch on a NAD): without `ipam_claim`, the server
    /// reads the claim from the pod's network selection element.
    pub allow_persistent_ips: bool,
}

impl NetworkConfig for NetConf {
    fn cni_version(&self) -> &str {
        &self.cni_version
    }
}

/// The `args.cni` key naming an IPAMClaim: the network selection element's own key.
pub const IPAM_CLAIM_ARG: &str = "ipam-claim-reference";

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::INVALID_CONFIG, msg)
}

fn str_list(v: Option<&Value>, field: &str) -> Result<Vec<String>, CniError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| invalid(format!("{field} entry {i} is not a string")))
            })
            .collect(),
        Some(other) => Err(invalid(format!("{field} is {other}, not a list of strings"))),
    }
}

impl NetConf {
    /// Parses stdin. `node_file` is read for the ipam keys the config does not set
    /// (`configuration_path` in the config names another file).
    pub fn parse(stdin: &[u8], node_file: &Path) -> Result<NetConf, CniError> {
        let obj = &cni::config_object(stdin)?;
        let cni_version = obj.get("cniVersion").and_then(Value::as_str).unwrap_or("0.1.0").to_string();
        let name = obj.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
        let mut static_ips =
            str_list(obj.get("runtimeConfig").and_then(|r| r.get("ips")), "runtimeConfig.ips")?;
        static_ips.extend(str_list(
            obj.get("args").and_then(|a| a.get("cni")).and_then(|c| c.get("ips")),
            "args.cni.ips",
        )?);
        let ipam_claim = match obj.get("args").and_then(|a| a.get("cni")).and_then(|c| c.get(IPAM_CLAIM_ARG))
        {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(invalid(format!("args.cni.{IPAM_CLAIM_ARG} is {other}, not a string")));
            }
        };
        let allow_persistent_ips = match obj.get("allowPersistentIPs") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(invalid(format!("allowPersistentIPs is {other}, not true or false"))),
        };
        let prev_result = obj.get("prevResult").cloned().filter(|p| !p.is_null());
        let mut valid_attachments = Vec::new();
        for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
            if let Some(list) = obj.get(key) {
                let items = list.as_array().ok_or_else(|| invalid(format!("{key} is not a list")))?;
                for item in items {
                    let cid = item.get("containerID").and_then(Value::as_str);
                    let ifname = item.get("ifname").and_then(Value::as_str);
                    match (cid, ifname) {
                        (Some(c), Some(i)) => valid_attachments.push((c.to_string(), i.to_string())),
                        _ => return Err(invalid(format!("{key} entry {item} needs containerID and ifname"))),
                    }
                }
            }
        }
        let ipam = match obj.get("ipam") {
            None | Some(Value::Null) => None,
            Some(raw) => Some(IpamConf::from_value(raw, node_file)?),
        };
        Ok(NetConf {
            cni_version,
            name,
            ipam,
            static_ips,
            prev_result,
            valid_attachments,
            ipam_claim,
            allow_persistent_ips,
        })
    }
}

/// Most bytes read from a file a config names (node file, PEM files): far above any real
/// one, and a bound on what a NAD can make the plugin read.
const MAX_FILE: u64 = 1 << 20;

/// Reads a file a config names: a regular file of at most [`MAX_FILE`] bytes. A NAD's
/// author chooses these paths and the plugin runs as root, so `/dev/zero`, a FIFO or a
/// huge log must fail at once instead of hanging the pod's ADD or exhausting memory.
fn read_named_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let not_regular = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file");
    // Before opening too: opening a FIFO would wait for a writer.
    if !std::fs::metadata(path)?.is_file() {
        return Err(not_regular());
    }
    let file = std::fs::File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(not_regular());
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_FILE} bytes"),
        ));
    }
    Ok(bytes)
}

fn read_node_file(path: &Path, explicit: bool) -> Result<RawIpam, CniError> {
    match read_named_file(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| invalid(format!("node config {} is not valid: {e}", path.display()))),
        // The default file is optional; a configuration_path that names nothing is a mistake.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(RawIpam::default()),
        Err(e) => Err(invalid(format!("configuration_path {}: {e}", path.display()))),
    }
}

impl IpamConf {
    /// Writes a debug line when `log_level` is `debug`; logging never fails the command.
    pub fn debug(&self, line: impl std::fmt::Display) {
        if !self.debug {
            return;
        }
        let line = format!("rust-ipam: {line}\n");
        if self.log_file.is_empty() {
            eprint!("{line}");
        } else if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_file) {
            let _ = std::io::Write::write_all(&mut f, line.as_bytes());
        }
    }

    fn from_value(raw: &Value, node_file: &Path) -> Result<IpamConf, CniError> {
        let nad: RawIpam = serde_json::from_value(raw.clone()).map_err(|e| invalid(format!("ipam: {e}")))?;
        let (file_path, explicit) = match &nad.configuration_path {
            Some(p) if !p.is_empty() => (PathBuf::from(p), true),
            _ => (node_file.to_path_buf(), false),
        };
        let node = read_node_file(&file_path, explicit)?;
        let pick = |a: Option<String>, b: Option<String>| a.or(b).unwrap_or_default();
        let pool = nad.pool.clone().unwrap_or_default().trim().to_string();
        if !pool.is_empty() {
            return IpamConf::with_pool(pool, nad, node);
        }
        if nad.pool.is_some() {
            return Err(invalid("pool is empty: name an IPPool, or leave pool out and set \"range\""));
        }

        // Whereabouts: a top-level range comes first, then ipRanges.
        let mut ranges = Vec::new();
        let top = RawRange {
            range: nad.range.range.clone().or(node.range.range.clone()),
            range_start: nad.range.range_start.clone().or(node.range.range_start.clone()),
            range_end: nad.range.range_end.clone().or(node.range.range_end.clone()),
            exclude: nad.range.exclude.clone().or(node.range.exclude.clone()),
        };
        if top.range.as_deref().is_some_and(|r| !r.is_empty()) {
            ranges.push(RangeConf {
                range: top.range.unwrap_or_default(),
                range_start: top.range_start.unwrap_or_default(),
                range_end: top.range_end.unwrap_or_default(),
                exclude: top.exclude.unwrap_or_default(),
            });
        }
        ranges.extend(nad.ip_ranges.clone().or(node.ip_ranges.clone()).unwrap_or_default());
        if ranges.is_empty() {
            return Err(invalid(
                "ipam has no range: set \"range\" or \"ipRanges\", or name an IPPool with \"pool\"",
            ));
        }
        for (i, r) in ranges.iter().enumerate() {
            if r.range.trim().is_empty() {
                return Err(invalid(format!("ipRanges[{i}].range is empty")));
            }
        }

        IpamConf::finish(
            String::new(),
            ranges,
            pick(nad.gateway.clone(), node.gateway.clone()),
            pick(nad.network_name.clone(), node.network_name.clone()),
            nad,
            node,
        )
    }

    /// The config of a NAD naming an IPPool: the NAD may not also describe ranges (the
    /// pool does); the node file's range keys are not used.
    fn with_pool(pool: String, nad: RawIpam, node: RawIpam) -> Result<IpamConf, CniError> {
        let both = |key: &str| {
            invalid(format!(
                "ipam sets both \"pool\" ({pool:?}) and \"{key}\": the pool gives the ranges, gateway and network; remove one"
            ))
        };
        let r = &nad.range;
        let set = [
            ("range", r.range.is_some()),
            ("range_start", r.range_start.is_some()),
            ("range_end", r.range_end.is_some()),
            ("exclude", r.exclude.is_some()),
            ("ipRanges", nad.ip_ranges.is_some()),
            ("gateway", nad.gateway.is_some()),
        ];
        if let Some((key, _)) = set.iter().find(|(_, on)| *on) {
            return Err(both(key));
        }
        if nad.network_name.as_deref().is_some_and(|n| n != pool) {
            return Err(both("network_name"));
        }
        let network = pool.clone();
        IpamConf::finish(pool, Vec::new(), String::new(), network, nad, node)
    }

    /// The keys every config has, whether it names a pool or writes ranges.
    fn finish(
        pool: String,
        ranges: Vec<RangeConf>,
        gateway: String,
        network_name: String,
        nad: RawIpam,
        node: RawIpam,
    ) -> Result<IpamConf, CniError> {
        let pick = |a: Option<String>, b: Option<String>| a.or(b).unwrap_or_default();
        let servers = match nad.server.clone().or(node.server.clone()) {
            None => vec![DEFAULT_SERVER.to_string()],
            Some(Servers::One(s)) => vec![s],
            Some(Servers::Many(v)) => v,
        };
        if servers.is_empty() {
            return Err(invalid("server is an empty list"));
        }
        for s in &servers {
            rust_ipam_proto::check_endpoint(s).map_err(invalid)?;
        }
        let tls = client_tls(
            &servers,
            nad.tls_ca.clone().or(node.tls_ca.clone()),
            nad.tls_cert.clone().or(node.tls_cert.clone()),
            nad.tls_key.clone().or(node.tls_key.clone()),
        )?;
        let token = match nad.token_file.clone().or(node.token_file.clone()).filter(|p| !p.is_empty()) {
            Some(path) => Some(read_token(&path)?),
            None => None,
        };
        let timeout_ms = nad.timeout_ms.or(node.timeout_ms).unwrap_or(DEFAULT_TIMEOUT_MS);
        if timeout_ms == 0 {
            return Err(invalid("timeout_ms must be positive"));
        }
        let mut ignored: Vec<String> = nad.other.keys().filter(|k| *k != "type").cloned().collect();
        if nad.enable_overlapping_ranges.is_some() {
            // The server always keeps an address unique across overlapping ranges.
            ignored.push("enable_overlapping_ranges".into());
        }
        Ok(IpamConf {
            pool,
            ranges,
            gateway,
            routes: nad.routes.clone().or(node.routes.clone()).unwrap_or_default(),
            dns: nad.dns.clone().or(node.dns.clone()),
            network_name,
            servers,
            timeout: Duration::from_millis(timeout_ms),
            node_name: pick(nad.node_name.clone(), node.node_name.clone()),
            debug: pick(nad.log_level.clone(), node.log_level.clone()).eq_ignore_ascii_case("debug"),
            log_file: pick(nad.log_file.clone(), node.log_file.clone()),
            tls,
            token,
            ignored,
        })
    }
}

/// Reads the token `token_file` names: one line of printable ASCII.
fn read_token(path: &str) -> Result<String, CniError> {
    let bytes = read_named_file(Path::new(path))
        .map_err(|e| invalid(format!("token_file {path:?} cannot be read: {e}")))?;
    let token = String::from_utf8(bytes).unwrap_or_default();
    let token = token.trim();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(format!(
            "token_file {path:?} does not hold a token (one line of printable ASCII)"
        )));
    }
    Ok(token.to_string())
}

/// Reads the TLS files the keys name; `https://` servers need at least the CA.
fn client_tls(
    servers: &[String],
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
) -> Result<Option<ClientTls>, CniError> {
    let read = |field: &str, path: &str| {
        read_named_file(Path::new(path)).map_err(|e| invalid(format!("{field} {path:?} cannot be read: {e}")))
    };
    let identity = match (cert.filter(|c| !c.is_empty()), key.filter(|k| !k.is_empty())) {
        (Some(c), Some(k)) => Some((read("tls_cert", &c)?, read("tls_key", &k)?)),
        (None, None) => None,
        (Some(_), None) => return Err(invalid("tls_cert is set without tls_key")),
        (None, Some(_)) => return Err(invalid("tls_key is set without tls_cert")),
    };
    match ca.filter(|c| !c.is_empty()) {
        Some(ca) => Ok(Some(ClientTls { ca: read("tls_ca", &ca)?, identity })),
        None => match servers.iter().find(|s| s.starts_with("https://")) {
            Some(s) => {
                Err(invalid(format!("server {s:?} uses TLS: set tls_ca to the CA of its certificate")))
            }
            None if identity.is_some() => {
                Err(invalid("tls_cert and tls_key need tls_ca and an https:// server"))
            }
            None => Ok(None),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<NetConf, CniError> {
        NetConf::parse(json.as_bytes(), Path::new("/nonexistent/rust-ipam.conf"))
    }

    #[test]
    fn files_named_by_the_config_must_be_small_regular_files() {
        // A NAD naming a device or a directory fails at once (reading /dev/zero would never
        // end); the plugin runs as root with the path the NAD's author chose.
        let conf = |key: &str, path: &str| {
            format!(
                r#"{{"cniVersion":"1.0.0","name":"n","ipam":{{"type":"rust-ipam","range":"10.0.0.0/24",
                   "server":"https://s:1","{key}":"{path}"}}}}"#
            )
        };
        let e = parse(&conf("configuration_path", "/dev/zero")).expect_err("a device");
        assert_eq!(
            (e.code, e.msg.as_str()),
            (ErrorCode::INVALID_CONFIG, "configuration_path /dev/zero: not a regular file")
        );
        let e = parse(&conf("configuration_path", "/")).expect_err("a directory");
        assert_eq!(e.msg, "configuration_path /: not a regular file");
        let e = parse(&conf("tls_ca", "/dev/zero")).expect_err("a device");
        assert_eq!(e.msg, r#"tls_ca "/dev/zero" cannot be read: not a regular file"#);
        let dir = tempfile::tempdir().expect("tempdir");
        let big = dir.path().join("big.conf");
        std::fs::write(&big, vec![b' '; (MAX_FILE + 1) as usize]).expect("write");
        let e = parse(&conf("configuration_path", big.to_str().expect("utf-8"))).expect_err("too big");
        assert_eq!(e.msg, format!("configuration_path {}: larger than 1048576 bytes", big.display()));
    }

    #[test]
    fn whereabouts_keys_are_read_as_they_are() {
        let c = parse(
            r#"{"cniVersion":"0.3.1","name":"backend","type":"macvlan","master":"eth1",
              "ipam":{"type":"rust-ipam","range":"192.168.2.225/28","range_start":"192.168.2.226",
                "exclude":["192.168.2.229/30"],"gateway":"192.168.2.238","network_name":"rail0",
                "ipRanges":[{"range":"fd00:50::/64","exclude":["fd00:50::/120"]}],
                "routes":[{"dst":"10.0.0.0/8","gw":"192.168.2.238"}],"dns":{"nameservers":["10.0.0.10"]},
                "enable_overlapping_ranges":false,"datastore":"kubernetes",
                "kubernetes":{"kubeconfig":"/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig"},
                "log_level":"debug"}}"#,
        )
        .expect("parse");
        let ipam = c.ipam.expect("ipam");
        assert_eq!(c.cni_version, "0.3.1");
        assert_eq!(ipam.ranges.len(), 2);
        assert_eq!(
            ipam.ranges[0],
            RangeConf {
                range: "192.168.2.225/28".into(),
                range_start: "192.168.2.226".into(),
                range_end: String::new(),
                exclude: vec!["192.168.2.229/30".into()],
            }
        );
        assert_eq!(ipam.ranges[1].range, "fd00:50::/64");
        assert_eq!(ipam.gateway, "192.168.2.238");
        assert_eq!(ipam.network_name, "rail0");
        assert_eq!(ipam.routes, vec![Route { dst: "10.0.0.0/8".into(), gw: Some("192.168.2.238".into()) }]);
        assert_eq!(ipam.servers, vec![DEFAULT_SERVER.to_string()]);
        let mut ignored = ipam.ignored.clone();
        ignored.sort();
        assert_eq!(ignored, vec!["datastore", "enable_overlapping_ranges", "kubernetes"]);
        assert!(ipam.debug);
    }

    #[test]
    fn the_ipam_claim_comes_from_args_cni() {
        let c = parse(
            r#"{"cniVersion":"1.1.0","name":"n","ipam":{"type":"rust-ipam","range":"10.0.0.0/24"},
              "args":{"cni":{"ipam-claim-reference":"vm-a.net1"}}}"#,
        )
        .expect("parse");
        assert_eq!(c.ipam_claim, "vm-a.net1");
        let e = parse(r#"{"cniVersion":"1.1.0","args":{"cni":{"ipam-claim-reference":7}}}"#)
            .expect_err("a number");
        assert_eq!(e.msg, "args.cni.ipam-claim-reference is 7, not a string");
        let c = parse(r#"{"cniVersion":"1.1.0","allowPersistentIPs":true}"#).expect("parse");
        assert!(c.allow_persistent_ips);
        let e = parse(r#"{"cniVersion":"1.1.0","allowPersistentIPs":"yes"}"#).expect_err("not a bool");
        assert_eq!(e.msg, r#"allowPersistentIPs is "yes", not true or false"#);
    }

    #[test]
    fn static_ips_gc_lists_and_prev_result_are_read() {
        let c = parse(
            r#"{"cniVersion":"1.1.0","name":"n","ipam":{"type":"rust-ipam","range":"10.0.0.0/24",
              "server":["http://10.0.0.1:50051","unix:///run/rust-ipam.sock"]},
              "runtimeConfig":{"ips":["10.0.0.7/24"]},"args":{"cni":{"ips":["10.0.0.8"]}},
              "prevResult":{"ips":[{"address":"10.0.0.7/24"}]},
              "cni.dev/valid-attachments":[{"containerID":"c1","ifname":"net1"}],
              "cni.dev/attachments":[{"containerID":"c2","ifname":"eth0"}]}"#,
        )
        .expect("parse");
        assert_eq!(c.static_ips, vec!["10.0.0.7/24", "10.0.0.8"]);
        assert_eq!(c.ipam_claim, "");
        assert!(c.prev_result.is_some());
        assert_eq!(c.valid_attachments, vec![("c1".into(), "net1".into()), ("c2".into(), "eth0".into())]);
        assert_eq!(c.ipam.expect("ipam").servers.len(), 2);
    }

    #[test]
    fn node_file_fills_what_the_nad_leaves_out_and_the_nad_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("rust-ipam.conf");
        std::fs::write(
            &file,
            r#"{"server":"http://10.9.9.9:50051","network_name":"from-node","timeout_ms":3000}"#,
        )
        .expect("write");
        let c = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"rust-ipam","range":"10.0.0.0/24","network_name":"from-nad"}}"#,
            &file,
        )
        .expect("parse");
        let ipam = c.ipam.expect("ipam");
        assert_eq!(ipam.servers, vec!["http://10.9.9.9:50051"]);
        assert_eq!(ipam.network_name, "from-nad");
        assert_eq!(ipam.timeout, Duration::from_millis(3000));

        let missing = NetConf::parse(
            br#"{"cniVersion":"1.0.0","ipam":{"range":"10.0.0.0/24","configuration_path":"/nonexistent/x.conf"}}"#,
            &file,
        )
        .expect_err("explicit path must exist");
        assert_eq!(missing.code, ErrorCode::INVALID_CONFIG);
        assert!(missing.msg.starts_with("configuration_path /nonexistent/x.conf: "), "{}", missing.msg);
    }

    #[test]
    fn bad_configs_name_what_is_wrong() {
        let err = |s: &str| parse(s).expect_err("refused");
        let e = err("{not json");
        assert_eq!(e.code, ErrorCode::DECODE);
        assert!(e.msg.starts_with("network configuration is not JSON: "), "{}", e.msg);
        assert_eq!(err("[1]").msg, "network configuration is not a JSON object");
        assert_eq!(
            err(r#"{"cniVersion":"1.0.0","ipam":{"type":"rust-ipam"}}"#).msg,
            "ipam has no range: set \"range\" or \"ipRanges\", or name an IPPool with \"pool\""
        );
        assert_eq!(
            err(r#"{"cniVersion":"1.0.0","ipam":{"range":"10.0.0.0/24","server":"10.0.0.1:50051"}}"#).msg,
            "server \"10.0.0.1:50051\" is not http://host:port, https://host:port or unix:///path"
        );
        let e = err(r#"{"cniVersion":"1.0.0","ipam":{"range":"10.0.0.0/24","exclude":"10.0.0.1"}}"#);
        assert_eq!(e.code, ErrorCode::INVALID_CONFIG);
        assert!(e.msg.starts_with("ipam: "), "{}", e.msg);
        assert_eq!(
            err(r#"{"cniVersion":"1.0.0","runtimeConfig":{"ips":"10.0.0.1"}}"#).msg,
            "runtimeConfig.ips is \"10.0.0.1\", not a list of strings"
        );
    }

    #[test]
    fn a_pool_is_the_network_and_takes_the_place_of_ranges() {
        let c = parse(
            r#"{"cniVersion":"1.0.0","name":"rail0-a","ipam":{"type":"rust-ipam","pool":"rail0",
              "routes":[{"dst":"10.0.0.0/8"}],"server":"http://127.0.0.1:1"}}"#,
        )
        .expect("parse");
        let ipam = c.ipam.expect("ipam");
        assert_eq!((ipam.pool.as_str(), ipam.network_name.as_str()), ("rail0", "rail0"));
        assert!(ipam.ranges.is_empty());
        assert_eq!(ipam.routes.len(), 1, "routes of the NAD are kept (after the pool's)");
        // network_name equal to the pool's name says the same thing.
        let same =
            parse(r#"{"cniVersion":"1.0.0","ipam":{"pool":"rail0","network_name":"rail0"}}"#).expect("parse");
        assert_eq!(same.ipam.expect("ipam").network_name, "rail0");
    }

    #[test]
    fn a_pool_with_ranges_is_refused_naming_both_keys() {
        let err = |ipam: &str| {
            let e = parse(&format!(r#"{{"cniVersion":"1.0.0","ipam":{ipam}}}"#)).expect_err("refused");
            assert_eq!(e.code, ErrorCode::INVALID_CONFIG);
            e.msg
        };
        assert_eq!(
            err(r#"{"pool":"rail0","range":"10.0.0.0/24"}"#),
            r#"ipam sets both "pool" ("rail0") and "range": the pool gives the ranges, gateway and network; remove one"#
        );
        assert_eq!(
            err(r#"{"pool":"rail0","ipRanges":[{"range":"10.0.0.0/24"}]}"#),
            r#"ipam sets both "pool" ("rail0") and "ipRanges": the pool gives the ranges, gateway and network; remove one"#
        );
        assert_eq!(
            err(r#"{"pool":"rail0","gateway":"10.0.0.1"}"#),
            r#"ipam sets both "pool" ("rail0") and "gateway": the pool gives the ranges, gateway and network; remove one"#
        );
        assert_eq!(
            err(r#"{"pool":"rail0","network_name":"other"}"#),
            r#"ipam sets both "pool" ("rail0") and "network_name": the pool gives the ranges, gateway and network; remove one"#
        );
        assert_eq!(
            err(r#"{"pool":" "}"#),
            r#"pool is empty: name an IPPool, or leave pool out and set "range""#
        );
    }
}
