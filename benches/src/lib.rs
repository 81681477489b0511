//! What the benchmark drivers share: the API server's own rate, as raw IPLease creates at
//! the concurrency the measured path has, so a ratio is measured in the same run.

use std::time::Instant;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use ipam_server::k8s::crd::{IPLease, IPLeaseSpec};
use tracing::warn;

/// Histogram bounds: 1 µs to 60 s at 3 significant digits.
pub const HIST_MAX_US: u64 = 60_000_000;
/// The interface of every lease the drivers take.
pub const IFNAME: &str = "net1";

/// An empty latency histogram (microseconds).
pub fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).context("creating a latency histogram")
}

/// The spec of a lease of pod `cid` (its namesake, in namespace `tool`) on node `tool`, as
/// the server writes one.
pub fn lease_spec(
    tool: &str,
    network: &str,
    address: &str,
    range: &str,
    prefix_len: u8,
    cid: &str,
) -> IPLeaseSpec {
    IPLeaseSpec {
        network: network.into(),
        address: address.into(),
        range: range.into(),
        prefix_len,
        gateway: None,
        container_id: cid.into(),
        ifname: IFNAME.into(),
        pod_ref: format!("{tool}/{cid}"),
        pod_uid: String::new(),
        node: tool.into(),
        created_unix_ms: 0,
        note: String::new(),
        owner: None,
        kept: false,
    }
}

/// Creates IPLeases one after another through `api` (a client's own keep-alive
/// connection), the n-th for address `base + n` in network `raw`, while `more(n)` says so,
/// recording each answered create's latency in `hist`. Returns how many were refused.
pub async fn raw_creates(
    api: &kube::Api<IPLease>,
    tool: &str,
    base: u32,
    prefix: &str,
    mut more: impl FnMut(u32) -> bool,
    hist: &mut Histogram<u64>,
) -> u64 {
    let mut errors = 0u64;
    for n in 1u32.. {
        if !more(n) {
            break;
        }
        let address = std::net::Ipv4Addr::from(base.wrapping_add(n)).to_string();
        let spec = lease_spec(tool, "raw", &address, "", 16, &format!("{prefix}-{n}"));
        let obj = IPLease::new(&format!("raw.{address}"), spec);
        let t = Instant::now();
        match api.create(&kube::api::PostParams::default(), &obj).await {
            Ok(_) => {
                hist.saturating_record(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX).max(1))
            }
            Err(e) => {
                errors += 1;
                if errors == 1 {
                    warn!(error = %e, "a raw create failed");
                }
            }
        }
    }
    errors
}

/// The median of `v` (the mean of the middle two for an even count; NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The smallest of `v` (infinity when empty).
pub fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// The largest of `v` (0 when empty).
pub fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// `--pin-control-plane`: puts etcd and kube-apiserver (every thread) on the machine's last
/// CPU, and this process, with every thread and process it starts from now on, on the
/// others. A cluster's control plane has cores of its own; on a machine this small it
/// otherwise shares them with the measured path, so every CPU second the path spends on the
/// node is also taken from the API server. CPUs are assumed numbered 0..N (as on this
/// machine's VMs).
/// Returns "node CPUs 0-N, control plane CPU N" for the output.
pub fn pin_control_plane(env: &rust_ipam_e2e::envtest::Envtest) -> anyhow::Result<String> {
    use rust_ipam_e2e::envtest::Component;
    let cpus = std::thread::available_parallelism().context("counting CPUs")?.get();
    if cpus < 2 {
        anyhow::bail!("--pin-control-plane needs at least 2 CPUs, this process may use {cpus}");
    }
    let last = (cpus - 1).to_string();
    let rest = if cpus == 2 { "0".to_string() } else { format!("0-{}", cpus - 2) };
    let pin = |cpus: &str, pid: u32, what: &str| -> anyhow::Result<()> {
        let out = std::process::Command::new("taskset")
            .args(["--all-tasks", "--cpu-list", "--pid", cpus, &pid.to_string()])
            .output()
            .context("running taskset (util-linux)")?;
        if !out.status.success() {
            anyhow::bail!(
                "taskset {cpus} {what} (pid {pid}): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    pin(&last, env.pid(Component::Etcd), "etcd")?;
    pin(&last, env.pid(Component::ApiServer), "kube-apiserver")?;
    pin(&rest, std::process::id(), "this process")?;
    Ok(format!("node CPUs {rest}, control plane CPU {last}"))
}
