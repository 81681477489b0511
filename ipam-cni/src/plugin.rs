//! The commands: check the invocation, call the server, shape the answer.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::Duration;

use rust_ipam_proto::v1 as pb;
use rust_ipam_proto::v1::ipam_client::IpamClient;
use serde_json::Value;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

use crate::cni::{self, CniArgs, CniError, Command, IpConfig, code};
use crate::config::{IpamConf, NetConf};

/// Plugin-specific code: a CHECK found the lease missing or different from `prevResult`.
pub const LEASE_MISMATCH: u32 = 101;

/// The environment of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: CniArgs,
}

impl Invocation {
    /// Reads the CNI variables through `var`, requiring what the spec requires for the
    /// command.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Invocation, CniError> {
        let command = Command::parse(&var("CNI_COMMAND").unwrap_or_default())?;
        let need = |name: &str, required: bool| -> Result<String, CniError> {
            match var(name).filter(|v| !v.is_empty()) {
                Some(v) => Ok(v),
                None if required => Err(CniError::new(
                    code::INVALID_ENV,
                    format!("{name} is required for {} but not set", command.name()),
                )),
                None => Ok(String::new()),
            }
        };
        let attach = matches!(command, Command::Add | Command::Del | Command::Check);
        let with_netns = matches!(command, Command::Add | Command::Check);
        // Unused by an IPAM plugin, but every command except VERSION must have it.
        need("CNI_PATH", command != Command::Version)?;
        Ok(Invocation {
            command,
            container_id: need("CNI_CONTAINERID", attach)?,
            netns: need("CNI_NETNS", with_netns)?,
            ifname: need("CNI_IFNAME", attach)?,
            args: CniArgs::parse(&var("CNI_ARGS").unwrap_or_default())?,
        })
    }
}

/// A failed command: the error and the version to report it in.
pub type Failure = (CniError, String);

/// Runs one command; `Some` is printed on stdout.
pub async fn run(
    inv: &Invocation,
    stdin: &[u8],
    node_file: &std::path::Path,
) -> Result<Option<Value>, Failure> {
    let latest = cni::LATEST_VERSION.to_string();
    if inv.command == Command::Version {
        // VERSION gets `{"cniVersion": ...}` at most; answer even when it is missing.
        let asked = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_string))
            .unwrap_or(latest);
        return Ok(Some(cni::version_info(&asked)));
    }
    let conf = NetConf::parse(stdin, node_file).map_err(|e| (e, latest))?;
    let version = conf.cni_version.clone();
    let fail = |e: CniError| (e, version.clone());
    cni::check_version(inv.command, &version).map_err(fail)?;
    let ipam = conf
        .ipam
        .as_ref()
        .ok_or_else(|| fail(CniError::new(code::INVALID_CONFIG, "ipam section is missing")))?;
    if !ipam.ignored.is_empty() {
        ipam.debug(format_args!("ignoring ipam keys {:?}", ipam.ignored));
    }
    ipam.debug(format_args!(
        "{} {}/{} network {:?} via {:?}",
        inv.command.name(),
        inv.container_id,
        inv.ifname,
        ipam.network_name,
        ipam.servers
    ));
    let mut client = Client::new(ipam);
    match inv.command {
        Command::Add => add(inv, &conf, ipam, &mut client).await.map(Some).map_err(fail),
        Command::Del => del(inv, ipam, &mut client).await.map(|()| None).map_err(fail),
        Command::Check => check(inv, &conf, ipam, &mut client).await.map(|()| None).map_err(fail),
        Command::Gc => gc(&conf, ipam, &mut client).await.map(|()| None).map_err(fail),
        Command::Status => status(&mut client).await.map(|()| None).map_err(fail),
        Command::Version => unreachable!("answered above"),
    }
}

fn node_name(ipam: &IpamConf) -> String {
    if !ipam.node_name.is_empty() {
        return ipam.node_name.clone();
    }
    std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_default()
}

fn attachment(inv: &Invocation, ipam: &IpamConf) -> pb::Attachment {
    pb::Attachment {
        container_id: inv.container_id.clone(),
        ifname: inv.ifname.clone(),
        pod: Some(pb::PodRef {
            namespace: inv.args.get("K8S_POD_NAMESPACE").to_string(),
            name: inv.args.get("K8S_POD_NAME").to_string(),
            uid: inv.args.get("K8S_POD_UID").to_string(),
        }),
        node: node_name(ipam),
    }
}

fn is_v6_range(range: &str) -> bool {
    range.contains(':')
}

fn ranges(ipam: &IpamConf) -> Vec<pb::Range> {
    // Whereabouts has one gateway for the whole config: it belongs to the ranges of its family.
    let gw_v6 = is_v6_range(&ipam.gateway);
    ipam.ranges
        .iter()
        .map(|r| pb::Range {
            range: r.range.clone(),
            range_start: r.range_start.clone(),
            range_end: r.range_end.clone(),
            exclude: r.exclude.clone(),
            gateway: if !ipam.gateway.is_empty() && is_v6_range(&r.range) == gw_v6 {
                ipam.gateway.clone()
            } else {
                String::new()
            },
        })
        .collect()
}

async fn add(
    inv: &Invocation,
    conf: &NetConf,
    ipam: &IpamConf,
    client: &mut Client,
) -> Result<Value, CniError> {
    // Bad routes or dns in the config fail the ADD before anything is allocated.
    cni::check_ipam_extras(&ipam.routes, ipam.dns.as_ref())?;
    let mut requested: Vec<String> = conf.static_ips.clone();
    let ip_arg = inv.args.get("IP");
    // Multus passes a static request twice, as `IP=` and as the `ips` capability when the
    // config declares it: one address, asked for once.
    let addr = |s: &str| s.split_once('/').map_or(s, |(a, _)| a).to_string();
    for ip in ip_arg.split(',').filter(|s| !s.is_empty()) {
        if !requested.iter().any(|r| addr(r) == addr(ip)) {
            requested.push(ip.to_string());
        }
    }
    let req = pb::AllocateRequest {
        attachment: Some(attachment(inv, ipam)),
        network: ipam.network_name.clone(),
        ranges: ranges(ipam),
        requested_addresses: requested,
    };
    let leases = client
        .call(|mut c| {
            let req = req.clone();
            async move { c.allocate(req).await }
        })
        .await
        .map_err(CniError::from)?
        .leases;
    let ips = leases
        .iter()
        .map(|l| {
            Ok(IpConfig {
                address: parse_ip(&l.address)?,
                prefix_len: u8::try_from(l.prefix_len).unwrap_or(0),
                gateway: if l.gateway.is_empty() { None } else { Some(parse_ip(&l.gateway)?) },
            })
        })
        .collect::<Result<Vec<_>, CniError>>()?;
    cni::render_result(&conf.cni_version, &ips, &ipam.routes, ipam.dns.as_ref())
}

fn parse_ip(s: &str) -> Result<IpAddr, CniError> {
    s.parse().map_err(|_| CniError::new(code::IO_FAILURE, format!("server answered a bad address {s:?}")))
}

/// DEL releases the lease. When no server can be reached it still succeeds, so the runtime
/// can tear the pod down: the lease stays held and is freed later by GC (the runtime's list
/// of valid attachments) or the server's reconcile pass (the pod is gone). Nothing is lost.
async fn del(inv: &Invocation, ipam: &IpamConf, client: &mut Client) -> Result<(), CniError> {
    let req =
        pb::ReleaseRequest { attachment: Some(attachment(inv, ipam)), network: ipam.network_name.clone() };
    match client
        .call(|mut c| {
            let req = req.clone();
            async move { c.release(req).await }
        })
        .await
    {
        Ok(_) => Ok(()),
        Err(CallError::Unreachable(why)) => {
            eprintln!(
                "rust-ipam: DEL of {}/{} could not reach the server ({why}); the lease stays until GC or reconcile frees it",
                inv.container_id, inv.ifname
            );
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

async fn check(
    inv: &Invocation,
    conf: &NetConf,
    ipam: &IpamConf,
    client: &mut Client,
) -> Result<(), CniError> {
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "CHECK needs prevResult in the configuration"))?;
    let prev_ips: Vec<String> = prev
        .get("ips")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter().filter_map(|i| i.get("address").and_then(Value::as_str)).map(str::to_string).collect()
        })
        .unwrap_or_default();
    let req =
        pb::CheckRequest { attachment: Some(attachment(inv, ipam)), network: ipam.network_name.clone() };
    let leases = match client
        .call(|mut c| {
            let req = req.clone();
            async move { c.check(req).await }
        })
        .await
    {
        Ok(r) => r.leases,
        Err(CallError::Refused(s)) if s.code() == Code::NotFound => {
            return Err(CniError::new(LEASE_MISMATCH, s.message()));
        }
        Err(e) => return Err(e.into()),
    };
    for l in &leases {
        let want = format!("{}/{}", l.address, l.prefix_len);
        if !prev_ips.contains(&want) {
            return Err(CniError::new(
                LEASE_MISMATCH,
                format!(
                    "lease {want} of {}/{} is not in prevResult {prev_ips:?}",
                    inv.container_id, inv.ifname
                ),
            ));
        }
    }
    Ok(())
}

async fn gc(conf: &NetConf, ipam: &IpamConf, client: &mut Client) -> Result<(), CniError> {
    let req = pb::GcRequest {
        network: ipam.network_name.clone(),
        node: node_name(ipam),
        valid_attachments: conf
            .valid_attachments
            .iter()
            .map(|(c, i)| pb::AttachmentKey { container_id: c.clone(), ifname: i.clone() })
            .collect(),
    };
    client
        .call(|mut c| {
            let req = req.clone();
            async move { c.gc(req).await }
        })
        .await
        .map(|_| ())
        .map_err(CniError::from)
}

async fn status(client: &mut Client) -> Result<(), CniError> {
    match client.call(|mut c| async move { c.status(pb::StatusRequest {}).await }).await {
        Ok(s) if s.serving => Ok(()),
        Ok(s) => Err(CniError::new(
            code::NOT_AVAILABLE,
            format!("server is not allocating now (leader: {})", s.leader),
        )),
        Err(e) => Err(CniError::new(code::NOT_AVAILABLE, format!("rust-ipam server cannot serve ADD: {e}"))),
    }
}

/// Calls the servers of the config in turn until one answers, within the config's timeout.
/// A replica that answers UNAVAILABLE with a leader hint sends the call there next.
struct Client {
    /// Endpoints with their open channel; leader hints are appended.
    servers: Vec<(String, Option<Channel>)>,
    tls: Option<rust_ipam_proto::ClientTls>,
    deadline: Instant,
}

/// How long one endpoint gets to accept a connection before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between rounds over all endpoints.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// An error's message followed by its causes, which hold what went wrong on the wire.
fn with_sources(e: &dyn std::error::Error) -> String {
    sources_after(e.to_string(), e)
}

/// A status's message followed by its causes (its Display would add debug dumps).
fn status_text(s: &tonic::Status) -> String {
    sources_after(s.message().to_string(), s)
}

fn sources_after(mut out: String, e: &dyn std::error::Error) -> String {
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out = format!("{out}: {text}");
        }
        cause = c.source();
    }
    out
}

/// The leader endpoint a follower named, if it is one this plugin can dial.
fn leader_hint(s: &tonic::Status) -> Option<String> {
    let hint = s.metadata().get(rust_ipam_proto::LEADER_METADATA)?.to_str().ok()?;
    ["http://", "https://", "unix:///"].iter().any(|p| hint.starts_with(p)).then(|| hint.to_string())
}

impl Client {
    fn new(ipam: &IpamConf) -> Client {
        Client {
            servers: ipam.servers.iter().map(|s| (s.clone(), None)).collect(),
            tls: ipam.tls.clone(),
            deadline: Instant::now() + ipam.timeout,
        }
    }

    async fn call<T, F, Fut>(&mut self, f: F) -> Result<T, CallError>
    where
        F: Fn(IpamClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut last = String::from("no server tried");
        loop {
            let mut order: VecDeque<usize> = (0..self.servers.len()).collect();
            let mut tried = Vec::new();
            while let Some(i) = order.pop_front() {
                let left = self.deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                tried.push(i);
                let server = self.servers[i].0.clone();
                let channel = match &self.servers[i].1 {
                    Some(c) => c.clone(),
                    None => match rust_ipam_proto::connect_with(
                        &server,
                        CONNECT_TIMEOUT.min(left),
                        self.tls.as_ref(),
                    )
                    .await
                    {
                        Ok(c) => {
                            self.servers[i].1 = Some(c.clone());
                            c
                        }
                        Err(e) => {
                            last = format!("{server}: {}", with_sources(&e));
                            continue;
                        }
                    },
                };
                match tokio::time::timeout(left, f(IpamClient::new(channel))).await {
                    Ok(Ok(r)) => return Ok(r.into_inner()),
                    // Not the leader, going away, or the connection dropped (a TLS server
                    // that refused this client's certificate closes it): another replica
                    // may answer.
                    Ok(Err(s)) if matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Cancelled) => {
                        last = format!("{server}: {}", status_text(&s));
                        self.servers[i].1 = None;
                        if let Some(hint) = leader_hint(&s) {
                            let j = match self.servers.iter().position(|(e, _)| *e == hint) {
                                Some(j) => j,
                                None => {
                                    self.servers.push((hint, None));
                                    self.servers.len() - 1
                                }
                            };
                            if !tried.contains(&j) {
                                order.retain(|k| *k != j);
                                order.push_front(j);
                            }
                        }
                    }
                    Ok(Err(s)) => return Err(CallError::Refused(s)),
                    Err(_) => last = format!("{server}: no answer in time"),
                }
            }
            if Instant::now() + RETRY_PAUSE >= self.deadline {
                return Err(CallError::Unreachable(format!(
                    "no rust-ipam server answered within the timeout; last error: {last}"
                )));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}

/// Why a call to the servers failed.
#[derive(Debug)]
enum CallError {
    /// A server gave a definite answer.
    Refused(tonic::Status),
    /// No server answered within the timeout.
    Unreachable(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Refused(s) => write!(f, "{:?}: {}", s.code(), s.message()),
            CallError::Unreachable(why) => f.write_str(why),
        }
    }
}

impl From<CallError> for CniError {
    fn from(e: CallError) -> CniError {
        match e {
            CallError::Refused(s) => {
                let code = match s.code() {
                    Code::InvalidArgument => code::INVALID_CONFIG,
                    // Other servers wrote the same addresses meanwhile; a retry is safe.
                    Code::Aborted => code::TRY_AGAIN_LATER,
                    _ => cni::code::SERVER_REFUSED,
                };
                CniError::new(code, s.message()).with_details(format!("{:?}", s.code()))
            }
            CallError::Unreachable(why) => CniError::new(code::TRY_AGAIN_LATER, why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn environment_is_checked_per_command() {
        const PATH: (&str, &str) = ("CNI_PATH", "/opt/cni/bin");
        let add = Invocation::from_env(env(&[
            ("CNI_COMMAND", "ADD"),
            PATH,
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/p"),
            ("CNI_IFNAME", "net1"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p"),
        ]))
        .expect("valid");
        assert_eq!((add.command, add.args.get("K8S_POD_NAME")), (Command::Add, "p"));
        let err = |vars: &[(&str, &str)]| Invocation::from_env(env(vars)).expect_err("refused");
        let e = err(&[("CNI_COMMAND", "ADD"), PATH, ("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "net1")]);
        assert_eq!(
            (e.code, e.msg.as_str()),
            (code::INVALID_ENV, "CNI_NETNS is required for ADD but not set")
        );
        let e = err(&[("CNI_COMMAND", "GC")]);
        assert_eq!(e.msg, "CNI_PATH is required for GC but not set");
        assert_eq!(err(&[]).code, code::INVALID_ENV);
        // DEL may come without a namespace (it is gone); GC needs no attachment; VERSION
        // needs nothing else.
        let ok = |vars: &[(&str, &str)]| Invocation::from_env(env(vars)).is_ok();
        assert!(ok(&[("CNI_COMMAND", "DEL"), PATH, ("CNI_CONTAINERID", "c"), ("CNI_IFNAME", "i")]));
        assert!(ok(&[("CNI_COMMAND", "GC"), PATH]));
        assert!(ok(&[("CNI_COMMAND", "VERSION")]));
    }

    #[test]
    fn the_gateway_goes_to_ranges_of_its_family() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","ipam":{"range":"10.0.0.0/24","gateway":"10.0.0.1","ipRanges":[{"range":"fd00::/64"}]}}"#,
            std::path::Path::new("/nonexistent"),
        )
        .expect("parse");
        let r = ranges(conf.ipam.as_ref().expect("ipam"));
        assert_eq!((r[0].gateway.as_str(), r[1].gateway.as_str()), ("10.0.0.1", ""));
    }
}
