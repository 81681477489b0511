//! `rust-ipam-ctl`: a small command-line client for the Ipam and Admin services.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ipam_server::cli::{client_tls, parse_duration};
use rust_ipam_proto::v1 as pb;
use rust_ipam_proto::v1::{admin_client::AdminClient, ipam_client::IpamClient};
use rust_ipam_proto::{Bearer, Replicas};

/// Talk to a rust-ipam server. The connection flags may come before or after the command.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Server endpoint: http://host:port, https://host:port or unix:///path; repeat (or a
    /// comma list) for the replicas of one server: a replica that does not lead sends the
    /// call to the one that does.
    #[arg(
        long = "server",
        env = "RUST_IPAM_SERVER",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    servers: Vec<String>,
    /// PEM CA of the server's certificate, for https://.
    #[arg(long, env = "RUST_IPAM_TLS_CA", global = true)]
    tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate for mutual TLS (with --tls-key).
    #[arg(long, env = "RUST_IPAM_TLS_CERT", requires_all = ["tls_key", "tls_ca"], global = true)]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM key of --tls-cert.
    #[arg(long, env = "RUST_IPAM_TLS_KEY", requires = "tls_cert", global = true)]
    tls_key: Option<std::path::PathBuf>,
    /// A ServiceAccount token file sent as `authorization: Bearer` (servers with
    /// --authorize; Admin calls need an --admin identity), e.g. a projected token.
    #[arg(long, env = "RUST_IPAM_TOKEN_FILE", global = true)]
    token_file: Option<std::path::PathBuf>,
    /// Give up on a call after this many milliseconds, waiting for a leader included
    /// (`reconcile` has its own --timeout).
    #[arg(long, default_value_t = 5000, global = true)]
    timeout_ms: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Args)]
struct Who {
    /// Container (sandbox) ID.
    #[arg(long)]
    container_id: String,
    /// Interface name in the pod.
    #[arg(long, default_value = "net1")]
    ifname: String,
    /// Network name (addresses are unique per network).
    #[arg(long, default_value = "")]
    network: String,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Allocate one address from each --range for an attachment.
    Allocate {
        #[command(flatten)]
        who: Who,
        /// CIDR or first-last/prefix; repeat for several ranges.
        #[arg(long, required = true)]
        range: Vec<String>,
        /// Excluded CIDR or address (applies to every --range).
        #[arg(long)]
        exclude: Vec<String>,
        /// Pod as namespace/name.
        #[arg(long, default_value = "")]
        pod: String,
        /// Specific address wanted.
        #[arg(long)]
        ip: Vec<String>,
    },
    /// Release what an attachment holds.
    Release {
        #[command(flatten)]
        who: Who,
    },
    /// List leases.
    Leases {
        #[arg(long)]
        network: Option<String>,
        /// Pod as namespace/name or namespace/.
        #[arg(long, default_value = "")]
        pod: String,
        #[arg(long, default_value = "")]
        node: String,
    },
    /// List pools with their size and use.
    Pools {
        #[arg(long, default_value = "")]
        network: String,
    },
    /// Show the server's status.
    Status,
    /// Run one stale-lease reconcile pass on the leader (e.g. from a CronJob) and print its
    /// table: network, address, pod, node, container, age, reason, action. Exit status 0
    /// when the pass ran, 2 when some leases could not be checked or freed, 1 on error.
    Reconcile {
        /// Print what would be freed and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keep leases younger than this (whole seconds: `10m`, `90s`). Default: the
        /// server's --reconcile-grace.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        grace: Option<Duration>,
        /// Give up after this long (a pass over many leases takes a while).
        #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
        timeout: Duration,
    },
}

fn split_pod(pod: &str) -> (String, String) {
    pod.split_once('/')
        .map_or_else(|| (String::new(), pod.to_string()), |(ns, n)| (ns.to_string(), n.to_string()))
}

fn attachment(who: &Who, pod: &str) -> pb::Attachment {
    let (namespace, name) = split_pod(pod);
    pb::Attachment {
        container_id: who.container_id.clone(),
        ifname: who.ifname.clone(),
        pod: Some(pb::PodRef { namespace, name, uid: String::new() }),
        node: String::new(),
    }
}

fn print_lease(l: &pb::Lease) {
    let pod = l.pod.as_ref().map(|p| format!("{}/{}", p.namespace, p.name)).unwrap_or_default();
    let holder = if l.container_id.is_empty() {
        format!("reserved: {}", l.note)
    } else {
        format!("pod={pod} container={} ifname={}", l.container_id, l.ifname)
    };
    // Only for an owned lease, so the lines of every other lease read as before.
    let holder = match (l.owner.as_str(), l.kept) {
        ("", _) => holder,
        (owner, false) => format!("{holder} owner={owner}"),
        (owner, true) => format!("{holder} owner={owner} kept"),
    };
    println!("{}/{}\tnetwork={:?}\trange={}\t{holder}", l.address, l.prefix_len, l.network, l.range);
}

/// The bearer of `--token-file`'s token (none without the flag).
fn bearer(token_file: Option<&std::path::Path>) -> anyhow::Result<Bearer> {
    let token = match token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading --token-file {}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    Bearer::new(token.as_deref()).map_err(|e| anyhow::anyhow!("--token-file: {e}"))
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let tls = client_tls(args.tls_ca.as_deref(), args.tls_cert.as_deref(), args.tls_key.as_deref())?;
    let budget = match args.cmd {
        Cmd::Reconcile { timeout, .. } => timeout,
        _ => Duration::from_millis(args.timeout_ms),
    };
    let mut replicas =
        Replicas::new(&args.servers, tls, budget).map_err(|e| anyhow::anyhow!("--server: {e}"))?;
    let bearer = bearer(args.token_file.as_deref())?;
    match args.cmd {
        Cmd::Allocate { who, range, exclude, pod, ip } => {
            let ranges = range
                .into_iter()
                .map(|r| pb::Range { range: r, exclude: exclude.clone(), ..Default::default() })
                .collect();
            let req = pb::AllocateRequest {
                attachment: Some(attachment(&who, &pod)),
                network: who.network.clone(),
                ranges,
                requested_addresses: ip,
                ..Default::default()
            };
            let leases = replicas
                .call(|ch| {
                    let (req, bearer) = (req.clone(), bearer.clone());
                    async move { IpamClient::with_interceptor(ch, bearer).allocate(req).await }
                })
                .await?
                .leases;
            for l in leases {
                print_lease(&l);
            }
        }
        Cmd::Release { who } => {
            let req =
                pb::ReleaseRequest { attachment: Some(attachment(&who, "")), network: who.network.clone() };
            let released = replicas
                .call(|ch| {
                    let (req, bearer) = (req.clone(), bearer.clone());
                    async move { IpamClient::with_interceptor(ch, bearer).release(req).await }
                })
                .await?
                .released;
            println!("released {} address(es)", released.len());
            released.iter().for_each(print_lease);
        }
        Cmd::Leases { network, pod, node } => {
            let (pod_namespace, pod_name) = split_pod(&pod);
            let mut req =
                pb::ListLeasesRequest { network, pod_namespace, pod_name, node, ..Default::default() };
            loop {
                let page = replicas
                    .call(|ch| {
                        let (req, bearer) = (req.clone(), bearer.clone());
                        async move { AdminClient::with_interceptor(ch, bearer).list_leases(req).await }
                    })
                    .await?;
                page.leases.iter().for_each(print_lease);
                if page.next_page_token.is_empty() {
                    break;
                }
                req.page_token = page.next_page_token;
            }
        }
        Cmd::Pools { network } => {
            println!(
                "{:<10} {:<28} {:>12} {:>12} {:>12} {:>12}",
                "NETWORK", "RANGE", "SIZE", "USED", "EXCLUDED", "FREE"
            );
            let req = pb::ListPoolsRequest { network };
            let pools = replicas
                .call(|ch| {
                    let (req, bearer) = (req.clone(), bearer.clone());
                    async move { AdminClient::with_interceptor(ch, bearer).list_pools(req).await }
                })
                .await?
                .pools;
            for p in pools {
                let range = p.range.map(|r| r.range).unwrap_or_default();
                println!(
                    "{:<10} {:<28} {:>12} {:>12} {:>12} {:>12}",
                    format!("{:?}", p.network),
                    range,
                    p.size,
                    p.used,
                    p.excluded,
                    p.free
                );
            }
        }
        Cmd::Status => {
            let s = replicas
                .call(|ch| {
                    let bearer = bearer.clone();
                    async move { IpamClient::with_interceptor(ch, bearer).status(pb::StatusRequest {}).await }
                })
                .await?;
            println!(
                "serving={} leader={} store={} leases={} pools={} version={}",
                s.serving, s.leader, s.store, s.leases, s.pools, s.version
            );
        }
        Cmd::Reconcile { dry_run, grace, .. } => {
            return ipam_server::cli::reconcile(&mut replicas, &bearer, dry_run, grace).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
