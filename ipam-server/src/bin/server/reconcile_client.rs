//! `rust-ipam-server reconcile`: asks the leader for one pass over gRPC and prints its table.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use ipam_server::reconcile::{Action, Reason, Row, table};
use rust_ipam_proto::v1 as pb;
use rust_ipam_proto::v1::admin_client::AdminClient;
use rust_ipam_proto::{LEADER_METADATA, connect};

/// Leader hints followed from one starting endpoint before trying the next.
const MAX_HOPS: usize = 3;
/// How long reaching one endpoint may take before the next is tried; the pass itself may
/// take up to --timeout.
const CONNECT: Duration = Duration::from_secs(5);

/// A channel to `target` whose calls may take `timeout`.
async fn channel(target: &str, timeout: Duration) -> anyhow::Result<tonic::transport::Channel> {
    if target.starts_with("unix://") {
        return Ok(connect(target, timeout).await?);
    }
    let endpoint = tonic::transport::Endpoint::from_shared(target.to_string())
        .with_context(|| format!("--server {target:?} is not an endpoint like http://host:port"))?;
    Ok(endpoint.connect_timeout(CONNECT.min(timeout)).timeout(timeout).connect().await?)
}

/// Runs the pass; exit status 2 when some entries failed.
pub(crate) fn run(
    servers: &[String],
    dry_run: bool,
    grace: Option<Duration>,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    if let Some(g) = grace
        && g.subsec_nanos() != 0
    {
        bail!("--grace {g:?} is not a whole number of seconds");
    }
    let request = pb::ReconcileRequest { dry_run, grace_seconds: grace.map(|g| g.as_secs()) };
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    let response = runtime.block_on(async {
        tokio::time::timeout(timeout, call(servers, request, timeout))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within --timeout {timeout:?}"))?
    })?;
    print!("{}", render(&response));
    let failed = response.entries.iter().filter(|e| e.action() == pb::ReconcileAction::Failed).count();
    Ok(if failed > 0 { ExitCode::from(2) } else { ExitCode::SUCCESS })
}

/// Tries each endpoint in turn, following the leader hint of a replica that does not lead.
async fn call(
    servers: &[String],
    request: pb::ReconcileRequest,
    timeout: Duration,
) -> anyhow::Result<pb::ReconcileResponse> {
    let mut errors = Vec::new();
    for server in servers {
        let mut target = server.clone();
        for _ in 0..=MAX_HOPS {
            let channel = match channel(&target, timeout).await {
                Ok(c) => c,
                Err(e) => {
                    errors.push(format!("{target}: {e:#}"));
                    break;
                }
            };
            match AdminClient::new(channel).reconcile(request).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    let hint = s.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok());
                    errors.push(format!("{target}: {}", s.message()));
                    match hint {
                        Some(h) if !h.is_empty() && h != target => target = h.to_string(),
                        _ => break,
                    }
                }
                // The leader answered: its word is final.
                Err(s) => bail!("{target}: {:?}: {}", s.code(), s.message()),
            }
        }
    }
    bail!("no server ran the pass: {}", errors.join("; "))
}

/// The words the server's own log and metrics use (`pod-gone`, `kept-young`); a value
/// this build does not know shows as its protobuf name.
fn words(e: &pb::ReconcileEntry) -> (String, String) {
    let reason = Reason::try_from(e.reason()).map_or_else(|u| u.0, Reason::as_str);
    let action = Action::try_from(e.action()).map_or_else(|u| u.0, Action::as_str);
    (reason.to_string(), action.to_string())
}

/// The table and a summary line.
fn render(r: &pb::ReconcileResponse) -> String {
    let rows: Vec<Row> = r
        .entries
        .iter()
        .map(|e| {
            let l = e.lease.clone().unwrap_or_default();
            let pod = l.pod.map(|p| format!("{}/{}", p.namespace, p.name)).unwrap_or_default();
            let (reason, action) = words(e);
            Row {
                network: l.network,
                address: l.address,
                pod,
                node: l.node,
                container: l.container_id,
                age: Duration::from_secs(e.age_seconds),
                reason,
                action,
            }
        })
        .collect();
    let mut out = table(&rows);
    for e in r.entries.iter().filter(|e| !e.detail.is_empty()) {
        let addr = e.lease.as_ref().map(|l| l.address.as_str()).unwrap_or_default();
        out.push_str(&format!("{addr}: {}\n", e.detail));
    }
    use pb::ReconcileAction as A;
    let count = |a: A| r.entries.iter().filter(|e| e.action() == a).count();
    let kept = count(A::KeptYoung) + count(A::KeptPodLive) + count(A::KeptChanged);
    let (failed, grace) = (count(A::Failed), r.grace_seconds);
    let (leases, pods) = (r.leases_checked, r.pods_listed);
    if r.dry_run {
        out.push_str(&format!(
            "dry run: {} would be freed, {kept} kept, {failed} failed ({leases} pod leases, {pods} pods, grace {grace}s); nothing changed\n",
            count(A::WouldFree)
        ));
    } else {
        out.push_str(&format!(
            "{} freed, {kept} kept, {failed} failed ({leases} pod leases, {pods} pods, grace {grace}s)\n",
            r.freed
        ));
    }
    out
}
