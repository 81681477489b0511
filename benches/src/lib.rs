//! What the benchmark drivers share: the API server's own rate, as raw IPLease creates at
//! the concurrency the measured path has, so a ratio is measured in the same run.

use std::collections::BTreeMap;
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

/// One series of the API server's `apiserver_request_total`, without the response code.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiRequest {
    pub verb: String,
    /// The API group, empty for the core group.
    pub group: String,
    /// The resource, with `/subresource` when there is one.
    pub resource: String,
}

impl ApiRequest {
    /// A write: create, update, patch or delete.
    pub fn is_write(&self) -> bool {
        matches!(self.verb.as_str(), "POST" | "PUT" | "PATCH" | "DELETE")
    }
}

impl std::fmt::Display for ApiRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.group.as_str() {
            "" => write!(f, "{} {}", self.verb, self.resource),
            g => write!(f, "{} {}.{g}", self.verb, self.resource),
        }
    }
}

/// The requests the API server has served so far, from its own `apiserver_request_total`
/// counters (/metrics), summed over response codes.
pub async fn api_requests(client: &kube::Client) -> anyhow::Result<BTreeMap<ApiRequest, f64>> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await.context("reading the API server's metrics")?;
    Ok(request_counts(&text))
}

/// The `apiserver_request_total` series of a metrics text, summed over response codes.
fn request_counts(metrics: &str) -> BTreeMap<ApiRequest, f64> {
    let mut counts = BTreeMap::new();
    for series in metrics.lines().filter_map(|l| l.strip_prefix("apiserver_request_total{")) {
        let Some((labels, value)) = series.rsplit_once("} ") else { continue };
        let Ok(value) = value.trim().parse::<f64>() else { continue };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix("=\"")?.strip_suffix('"'))
                .unwrap_or_default()
                .to_string()
        };
        let mut resource = label("resource");
        let sub = label("subresource");
        if !sub.is_empty() {
            resource = format!("{resource}/{sub}");
        }
        let key = ApiRequest { verb: label("verb"), group: label("group"), resource };
        *counts.entry(key).or_insert(0.0) += value;
    }
    counts
}

/// `after - before` for each series, the ones that did not change left out.
pub fn api_requests_since(
    after: &BTreeMap<ApiRequest, f64>,
    before: &BTreeMap<ApiRequest, f64>,
) -> BTreeMap<ApiRequest, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect()
}

/// Clock ticks per second in /proc/stat's and /proc/PID/stat's CPU times (USER_HZ: 100 on
/// Linux, whatever the kernel's own tick rate).
pub const USER_HZ: f64 = 100.0;

/// The CPU time of every process at one moment, from /proc/PID/stat: by pid, its start
/// time (so a reused pid is another process), its command name (kernel workers, whose
/// names change with their work, as `kworker`), its own time (all its threads) and the time
/// of the children it has reaped (a CNI plugin's time lands in the runtime that ran and
/// waited for it).
#[derive(Debug, Default)]
pub struct ProcCpu(BTreeMap<u32, ProcTimes>);

#[derive(Debug)]
struct ProcTimes {
    started: u64,
    name: String,
    own: u64,
    reaped: u64,
}

impl ProcCpu {
    /// Reads every process's counters now; a process that ends while it is read is left out.
    pub fn now() -> anyhow::Result<ProcCpu> {
        let mut procs = BTreeMap::new();
        for entry in std::fs::read_dir("/proc").context("listing /proc")? {
            let Some(pid) = entry?.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            // "pid (comm) state ppid ...": the name may hold spaces and parentheses.
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
            let comm = &stat[open + 1..close];
            let name = if comm.starts_with("kworker/") { "kworker" } else { comm };
            let fields: Vec<u64> =
                stat[close + 1..].split_whitespace().skip(1).map(|f| f.parse().unwrap_or(0)).collect();
            // After the state: utime, stime, cutime, cstime are the 11th to 14th, the start
            // time the 19th.
            if fields.len() < 19 {
                continue;
            }
            let times = ProcTimes {
                started: fields[18],
                name: name.to_string(),
                own: fields[10] + fields[11],
                reaped: fields[12] + fields[13],
            };
            procs.insert(pid, times);
        }
        Ok(ProcCpu(procs))
    }

    /// Seconds of CPU since `before`, by command name: (own, reaped children's), for the
    /// processes alive now (one that started since counts from zero). A process that ended
    /// in between is counted only through the parent that reaped it.
    pub fn since(&self, before: &ProcCpu) -> BTreeMap<String, (f64, f64)> {
        let mut by_name: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for (pid, now) in &self.0 {
            let (own0, reaped0) = match before.0.get(pid) {
                Some(then) if then.started == now.started => (then.own, then.reaped),
                _ => (0, 0),
            };
            let e = by_name.entry(now.name.clone()).or_default();
            e.0 += now.own.saturating_sub(own0) as f64 / USER_HZ;
            e.1 += now.reaped.saturating_sub(reaped0) as f64 / USER_HZ;
        }
        by_name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_counts_sum_codes_and_name_subresources() {
        let metrics = r#"# HELP apiserver_request_total [STABLE] Counter of apiserver requests
apiserver_request_total{code="201",component="apiserver",dry_run="",group="ipam.rust-ipam.io",resource="ipleases",scope="namespace",subresource="",verb="POST",version="v1alpha1"} 384
apiserver_request_total{code="409",component="apiserver",dry_run="",group="ipam.rust-ipam.io",resource="ipleases",scope="namespace",subresource="",verb="POST",version="v1alpha1"} 2
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="pods",scope="namespace",subresource="status",verb="PATCH",version="v1"} 7
apiserver_request_total_other{verb="GET"} 9
apiserver_request_duration_seconds_count{verb="GET"} 9
"#;
        let counts = request_counts(metrics);
        let key = |verb: &str, group: &str, resource: &str| ApiRequest {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
        };
        let create = key("POST", "ipam.rust-ipam.io", "ipleases");
        assert_eq!(counts.get(&create), Some(&386.0));
        assert_eq!(counts.get(&key("PATCH", "", "pods/status")), Some(&7.0));
        assert_eq!(counts.len(), 2, "{counts:?}");
        assert_eq!(create.to_string(), "POST ipleases.ipam.rust-ipam.io");
        assert_eq!(key("PATCH", "", "pods/status").to_string(), "PATCH pods/status");
        assert!(create.is_write() && !key("GET", "", "pods").is_write());
        let before = BTreeMap::from([(create.clone(), 300.0)]);
        let since = api_requests_since(&counts, &before);
        assert_eq!(since.get(&create), Some(&86.0));
        assert_eq!(since.len(), 2);
    }

    fn times(started: u64, name: &str, own: u64, reaped: u64) -> ProcTimes {
        ProcTimes { started, name: name.into(), own, reaped }
    }

    #[test]
    fn cpu_since_counts_a_reused_pid_as_a_new_process() {
        let before =
            ProcCpu(BTreeMap::from([(10, times(5, "etcd", 100, 0)), (11, times(6, "pause", 50, 0))]));
        let after = ProcCpu(BTreeMap::from([
            (10, times(5, "etcd", 250, 0)),
            // Pid 11 ended; the same pid now names another process started later.
            (11, times(900, "containerd", 30, 70)),
            (12, times(901, "containerd", 20, 0)),
        ]));
        let since = after.since(&before);
        assert_eq!(since.get("etcd"), Some(&(1.5, 0.0)));
        assert_eq!(since.get("containerd"), Some(&(0.5, 0.7)));
        assert_eq!(since.get("pause"), None);
    }

    #[test]
    fn cpu_now_reads_this_process() {
        let now = ProcCpu::now().expect("reading /proc");
        let me = now.0.get(&std::process::id()).expect("this process is listed");
        assert!(me.started > 0);
        assert!(!me.name.is_empty());
    }
}
