//! What the command-line binaries share: durations as flags take them, the client's TLS
//! files, and the reconcile one-shot (`rust-ipam-ctl reconcile`, and its older spelling
//! `rust-ipam-server reconcile`).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use rust_ipam_proto::v1 as pb;
use rust_ipam_proto::v1::admin_client::AdminClient;
use rust_ipam_proto::{Bearer, ClientTls, Replicas};

use crate::reconcile::{Action, Reason, Row, table};

/// A duration flag: `15s`, `500ms`, `5m`, or `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, ""), |i| s.split_at(i));
    let n: u64 = n.parse().map_err(|_| format!("{s:?} is not a duration like 15s or 500ms"))?;
    match unit {
        "" if n == 0 => Ok(Duration::ZERO),
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        // An IPPool's cooldown comes through here too: a huge count must not overflow.
        "m" => n.checked_mul(60).map(Duration::from_secs).ok_or_else(|| format!("{s:?} is too long")),
        _ => Err(format!("{s:?} is not a duration like 15s or 500ms (units: ms, s, m)")),
    }
}

/// The client's TLS material from PEM files: the server's CA and, for mutual TLS, this
/// client's certificate and key. `None` without a CA.
pub fn client_tls(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> anyhow::Result<Option<ClientTls>> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let Some(ca) = ca else { return Ok(None) };
    let identity = match (cert, key) {
        (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
        _ => None,
    };
    Ok(Some(ClientTls { ca: read(ca)?, identity }))
}

/// One reconcile pass on the leader (the replicas follow its hint), printed as a table.
/// Exit status 0 when the pass ran, 2 when some leases could not be checked or freed.
pub async fn reconcile(
    replicas: &mut Replicas,
    bearer: &Bearer,
    dry_run: bool,
    grace: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    if let Some(g) = grace
        && g.subsec_nanos() != 0
    {
        bail!("--grace {g:?} is not a whole number of seconds");
    }
    let request = pb::ReconcileRequest { dry_run, grace_seconds: grace.map(|g| g.as_secs()) };
    let response = replicas
        .call(|ch| {
            let bearer = bearer.clone();
            async move { AdminClient::with_interceptor(ch, bearer).reconcile(request).await }
        })
        .await?;
    print!("{}", render(&response));
    let failed = response.entries.iter().filter(|e| e.action() == pb::ReconcileAction::Failed).count();
    Ok(if failed > 0 { ExitCode::from(2) } else { ExitCode::SUCCESS })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_the_units_the_flags_document() {
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(
            parse_duration("5"),
            Err("\"5\" is not a duration like 15s or 500ms (units: ms, s, m)".into())
        );
        assert_eq!(parse_duration("s"), Err("\"s\" is not a duration like 15s or 500ms".into()));
        assert_eq!(parse_duration("999999999999999999m"), Err("\"999999999999999999m\" is too long".into()));
    }
}
