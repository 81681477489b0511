//! The plugin's verbs: check the invocation, call the server, shape the answer.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use cni::{CniArgs, CniError, CniResult, Env, ErrorCode, Failure, IpConfig};
use rust_ipam_proto::v1 as pb;
use rust_ipam_proto::v1::ipam_client::IpamClient;
use rust_ipam_proto::{Bearer, CallError, Replicas};
use serde_json::Value;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::config::{IpamConf, NODE_CONFIG, NetConf};

/// The `rust-ipam` IPAM plugin.
#[derive(Debug, Clone)]
pub struct IpamPlugin {
    /// The node config file, read for keys the NAD does not set.
    node_file: PathBuf,
}

impl Default for IpamPlugin {
    fn default() -> IpamPlugin {
        IpamPlugin::with_node_file(NODE_CONFIG)
    }
}

impl IpamPlugin {
    /// A plugin reading `node_file` instead of [`NODE_CONFIG`].
    pub fn with_node_file(node_file: impl Into<PathBuf>) -> IpamPlugin {
        IpamPlugin { node_file: node_file.into() }
    }
}

/// What every verb but VERSION works with.
struct Call<'a> {
    env: &'a Env,
    args: CniArgs,
    conf: &'a NetConf,
    ipam: &'a IpamConf,
    client: Replicas,
    bearer: Bearer,
}

type Ipam = IpamClient<InterceptedService<Channel, Bearer>>;

/// The Ipam client on `ch`, sending the config's token.
fn ipam_client(ch: Channel, bearer: &Bearer) -> Ipam {
    IpamClient::with_interceptor(ch, bearer.clone())
}

/// Checks the `ipam` section and runs `verb` against the servers on a runtime of its own.
fn call<T, F>(env: &Env, conf: &NetConf, verb: F) -> Result<T, CniError>
where
    F: AsyncFnOnce(&mut Call<'_>) -> Result<T, CniError>,
{
    let ipam = conf
        .ipam
        .as_ref()
        .ok_or_else(|| CniError::new(ErrorCode::INVALID_CONFIG, "ipam section is missing"))?;
    if !ipam.ignored.is_empty() {
        ipam.debug(format_args!("ignoring ipam keys {:?}", ipam.ignored));
    }
    ipam.debug(format_args!(
        "{} {}/{} network {:?} via {:?}",
        env.command.name(),
        env.container_id,
        env.ifname,
        ipam.network_name,
        ipam.servers
    ));
    // One call per process: a single-threaded runtime starts fastest.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(ErrorCode::IO_FAILURE, format!("starting the runtime: {e}")))?;
    let client = Replicas::new(&ipam.servers, ipam.tls.clone(), ipam.timeout)
        .map_err(|e| CniError::new(ErrorCode::INVALID_CONFIG, e))?
        .attempt_timeout(ATTEMPT_TIMEOUT);
    let bearer = Bearer::new(ipam.token.as_deref())
        .map_err(|e| CniError::new(ErrorCode::INVALID_CONFIG, format!("token_file: {e}")))?;
    let mut c = Call { env, args: env.cni_args()?, conf, ipam, client, bearer };
    rt.block_on(verb(&mut c))
}

impl cni::Plugin for IpamPlugin {
    type Config = NetConf;

    fn parse(&self, env: &Env, stdin: &[u8]) -> Result<NetConf, Failure> {
        env.cni_args().map_err(Failure::latest)?;
        NetConf::parse(stdin, &self.node_file).map_err(Failure::latest)
    }

    fn add(&self, env: &Env, conf: &NetConf, _: &[u8]) -> Result<CniResult, CniError> {
        call(env, conf, add)
    }

    fn del(&self, env: &Env, conf: &NetConf, _: &[u8]) -> Result<(), CniError> {
        call(env, conf, del)
    }

    fn check(&self, env: &Env, conf: &NetConf, _: &[u8]) -> Result<(), CniError> {
        call(env, conf, check)
    }

    fn gc(&self, env: &Env, conf: &NetConf, _: &[u8]) -> Result<(), CniError> {
        call(env, conf, gc)
    }

    fn status(&self, env: &Env, conf: &NetConf, _: &[u8]) -> Result<(), CniError> {
        call(env, conf, status)
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

fn attachment(c: &Call<'_>) -> pb::Attachment {
    pb::Attachment {
        container_id: c.env.container_id.clone(),
        ifname: c.env.ifname.clone(),
        pod: Some(pb::PodRef {
            namespace: c.args.get("K8S_POD_NAMESPACE").to_string(),
            name: c.args.get("K8S_POD_NAME").to_string(),
            uid: c.args.get("K8S_POD_UID").to_string(),
        }),
        node: node_name(c.ipam),
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

async fn add(c: &mut Call<'_>) -> Result<CniResult, CniError> {
    let ipam = c.ipam;
    // Bad routes or dns in the config fail the ADD before anything is allocated.
    cni::check_ipam_extras(&ipam.routes, ipam.dns.as_ref())?;
    let mut requested: Vec<String> = c.conf.static_ips.clone();
    let ip_arg = c.args.get("IP");
    // Multus passes a static request twice, as `IP=` and as the `ips` capability when the
    // config declares it: one address, asked for once.
    let addr = |s: &str| s.split_once('/').map_or(s, |(a, _)| a).to_string();
    for ip in ip_arg.split(',').filter(|s| !s.is_empty()) {
        if !requested.iter().any(|r| addr(r) == addr(ip)) {
            requested.push(ip.to_string());
        }
    }
    let req = pb::AllocateRequest {
        attachment: Some(attachment(c)),
        network: ipam.network_name.clone(),
        ranges: ranges(ipam),
        requested_addresses: requested,
        pool: ipam.pool.clone(),
        ipam_claim: c.conf.ipam_claim.clone(),
        claim_from_pod: c.conf.allow_persistent_ips,
    };
    let bearer = c.bearer.clone();
    let answer = c
        .client
        .call(|ch| {
            let (req, bearer) = (req.clone(), bearer.clone());
            async move { ipam_client(ch, &bearer).allocate(req).await }
        })
        .await
        .map_err(cni_error)?;
    let leases = answer.leases;
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
    if ipam.pool.is_empty() {
        return cni::ipam_result(&ips, &ipam.routes, ipam.dns.as_ref());
    }
    let (routes, dns) = pool_extras(ipam, answer.routes, answer.dns);
    cni::ipam_result(&ips, &routes, dns.as_ref())
}

/// The routes and DNS of an attachment of a pool: the pool's routes then the config's, and
/// the config's `dns` when it has one, else the pool's.
fn pool_extras(
    ipam: &IpamConf,
    routes: Vec<pb::Route>,
    dns: Option<pb::Dns>,
) -> (Vec<cni::Route>, Option<Value>) {
    let mut all: Vec<cni::Route> = routes
        .into_iter()
        .map(|r| cni::Route { dst: r.dst, gw: (!r.gw.is_empty()).then_some(r.gw) })
        .collect();
    all.extend(ipam.routes.iter().cloned());
    let dns = ipam.dns.clone().or_else(|| {
        dns.map(|d| {
            serde_json::json!({
                "nameservers": d.nameservers, "domain": d.domain, "search": d.search, "options": d.options,
            })
        })
    });
    (all, dns)
}

fn parse_ip(s: &str) -> Result<IpAddr, CniError> {
    s.parse()
        .map_err(|_| CniError::new(ErrorCode::IO_FAILURE, format!("server answered a bad address {s:?}")))
}

/// DEL releases the lease. When no server can be reached it still succeeds, so the runtime
/// can tear the pod down: the lease stays held and is freed later by GC (the runtime's list
/// of valid attachments) or the server's reconcile pass (the pod is gone). Nothing is lost.
async fn del(c: &mut Call<'_>) -> Result<(), CniError> {
    let req = pb::ReleaseRequest { attachment: Some(attachment(c)), network: c.ipam.network_name.clone() };
    let bearer = c.bearer.clone();
    match c
        .client
        .call(|ch| {
            let (req, bearer) = (req.clone(), bearer.clone());
            async move { ipam_client(ch, &bearer).release(req).await }
        })
        .await
    {
        Ok(_) => Ok(()),
        Err(why @ CallError::Unreachable { .. }) => {
            eprintln!(
                "rust-ipam: DEL of {}/{} could not reach the server ({why}); the lease stays until GC or reconcile frees it",
                c.env.container_id, c.env.ifname
            );
            Ok(())
        }
        Err(e) => Err(cni_error(e)),
    }
}

async fn check(c: &mut Call<'_>) -> Result<(), CniError> {
    let prev = c.conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(ErrorCode::INVALID_CONFIG, "CHECK needs prevResult in the configuration")
    })?;
    let prev_ips: Vec<String> = prev
        .get("ips")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter().filter_map(|i| i.get("address").and_then(Value::as_str)).map(str::to_string).collect()
        })
        .unwrap_or_default();
    let req = pb::CheckRequest { attachment: Some(attachment(c)), network: c.ipam.network_name.clone() };
    let bearer = c.bearer.clone();
    let leases = match c
        .client
        .call(|ch| {
            let (req, bearer) = (req.clone(), bearer.clone());
            async move { ipam_client(ch, &bearer).check(req).await }
        })
        .await
    {
        Ok(r) => r.leases,
        Err(CallError::Refused(s)) if s.code() == Code::NotFound => {
            return Err(CniError::new(ErrorCode::LEASE_MISMATCH, s.message()));
        }
        Err(e) => return Err(cni_error(e)),
    };
    for l in &leases {
        let want = format!("{}/{}", l.address, l.prefix_len);
        if !prev_ips.contains(&want) {
            return Err(CniError::new(
                ErrorCode::LEASE_MISMATCH,
                format!(
                    "lease {want} of {}/{} is not in prevResult {prev_ips:?}",
                    c.env.container_id, c.env.ifname
                ),
            ));
        }
    }
    Ok(())
}

async fn gc(c: &mut Call<'_>) -> Result<(), CniError> {
    let req = pb::GcRequest {
        network: c.ipam.network_name.clone(),
        node: node_name(c.ipam),
        valid_attachments: c
            .conf
            .valid_attachments
            .iter()
            .map(|(id, i)| pb::AttachmentKey { container_id: id.clone(), ifname: i.clone() })
            .collect(),
    };
    let bearer = c.bearer.clone();
    c.client
        .call(|ch| {
            let (req, bearer) = (req.clone(), bearer.clone());
            async move { ipam_client(ch, &bearer).gc(req).await }
        })
        .await
        .map(|_| ())
        .map_err(cni_error)
}

async fn status(c: &mut Call<'_>) -> Result<(), CniError> {
    let bearer = c.bearer.clone();
    let status = |ch| {
        let bearer = bearer.clone();
        async move { ipam_client(ch, &bearer).status(pb::StatusRequest {}).await }
    };
    match c.client.call(status).await {
        Ok(s) if s.serving => Ok(()),
        Ok(s) => Err(CniError::new(
            ErrorCode::NOT_AVAILABLE,
            format!("server is not allocating now (leader: {})", s.leader),
        )),
        Err(e) => {
            Err(CniError::new(ErrorCode::NOT_AVAILABLE, format!("rust-ipam server cannot serve ADD: {e}")))
        }
    }
}

/// How long one replica gets to answer before the call moves on: a frozen leader costs
/// this much of the config's timeout, not all of it.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// The CNI error for a failed call: the server's refusals keep their gRPC code in `details`.
fn cni_error(e: CallError) -> CniError {
    match e {
        CallError::Refused(s) => {
            let code = match s.code() {
                Code::InvalidArgument => ErrorCode::INVALID_CONFIG,
                // Other servers wrote the same addresses meanwhile; a retry is safe.
                Code::Aborted => ErrorCode::TRY_AGAIN_LATER,
                _ => ErrorCode::SERVER_REFUSED,
            };
            CniError::new(code, s.message()).with_details(format!("{:?}", s.code()))
        }
        e @ CallError::Unreachable { .. } => CniError::new(ErrorCode::TRY_AGAIN_LATER, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_pools_routes_come_first_and_the_configs_dns_wins() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","ipam":{"pool":"rail0","routes":[{"dst":"10.0.0.0/8","gw":"10.0.0.1"}]}}"#,
            std::path::Path::new("/nonexistent"),
        )
        .expect("parse");
        let ipam = conf.ipam.as_ref().expect("ipam");
        let pool_routes = vec![pb::Route { dst: "198.19.0.0/16".into(), gw: String::new() }];
        let pool_dns =
            pb::Dns { nameservers: vec!["198.18.0.53".into()], domain: "rail".into(), ..Default::default() };
        let (routes, dns) = pool_extras(ipam, pool_routes.clone(), Some(pool_dns.clone()));
        assert_eq!(
            routes,
            vec![
                cni::Route { dst: "198.19.0.0/16".into(), gw: None },
                cni::Route { dst: "10.0.0.0/8".into(), gw: Some("10.0.0.1".into()) },
            ]
        );
        assert_eq!(
            dns,
            Some(
                serde_json::json!({"nameservers": ["198.18.0.53"], "domain": "rail", "search": [], "options": []})
            )
        );
        let own = IpamConf { dns: Some(serde_json::json!({"nameservers": ["10.0.0.53"]})), ..ipam.clone() };
        assert_eq!(pool_extras(&own, pool_routes, Some(pool_dns)).1, own.dns);
    }
}
