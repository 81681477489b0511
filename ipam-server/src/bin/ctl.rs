//! `rust-ipam-ctl`: a small command-line client for the Ipam and Admin services.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use rust_ipam_proto::v1 as pb;
use rust_ipam_proto::v1::{admin_client::AdminClient, ipam_client::IpamClient};
use rust_ipam_proto::{ClientTls, connect_with};

/// Talk to a rust-ipam server.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Server endpoint: http://host:port, https://host:port or unix:///path.
    #[arg(long, env = "RUST_IPAM_SERVER", default_value = "http://127.0.0.1:50051")]
    server: String,
    /// PEM CA of the server's certificate, for https://.
    #[arg(long, env = "RUST_IPAM_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate for mutual TLS (with --tls-key).
    #[arg(long, env = "RUST_IPAM_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM key of --tls-cert.
    #[arg(long, env = "RUST_IPAM_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Give up on a call after this many milliseconds.
    #[arg(long, default_value_t = 5000)]
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
    println!("{}/{}\tnetwork={:?}\trange={}\t{holder}", l.address, l.prefix_len, l.network, l.range);
}

async fn run(args: Args) -> anyhow::Result<()> {
    let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let tls = match &args.tls_ca {
        Some(ca) => Some(ClientTls {
            ca: read(ca)?,
            identity: match (&args.tls_cert, &args.tls_key) {
                (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                _ => None,
            },
        }),
        None => None,
    };
    let channel = connect_with(&args.server, Duration::from_millis(args.timeout_ms), tls.as_ref())
        .await
        .with_context(|| format!("connecting to {}", args.server))?;
    let mut ipam = IpamClient::new(channel.clone());
    let mut admin = AdminClient::new(channel);
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
            };
            for l in ipam.allocate(req).await?.into_inner().leases {
                print_lease(&l);
            }
        }
        Cmd::Release { who } => {
            let req =
                pb::ReleaseRequest { attachment: Some(attachment(&who, "")), network: who.network.clone() };
            let released = ipam.release(req).await?.into_inner().released;
            println!("released {} address(es)", released.len());
            released.iter().for_each(print_lease);
        }
        Cmd::Leases { network, pod, node } => {
            let (pod_namespace, pod_name) = split_pod(&pod);
            let mut req =
                pb::ListLeasesRequest { network, pod_namespace, pod_name, node, ..Default::default() };
            loop {
                let page = admin.list_leases(req.clone()).await?.into_inner();
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
            for p in admin.list_pools(pb::ListPoolsRequest { network }).await?.into_inner().pools {
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
            let s = ipam.status(pb::StatusRequest {}).await?.into_inner();
            println!(
                "serving={} leader={} store={} leases={} pools={} version={}",
                s.serving, s.leader, s.store, s.leases, s.pools, s.version
            );
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(s) => eprintln!("error: {:?}: {}", s.code(), s.message()),
                None => eprintln!("error: {e:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}
