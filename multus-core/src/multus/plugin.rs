//! The CNI commands of the meta-plugin.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use cni::{CniArgs, CniError, CniResult, Command, Env, ErrorCode, ErrorList, Failure};
use serde_json::{Map, Value};

use super::cache;
use super::config::MultusConf;
use super::delegate::{self, AddResult, Attachment, Delegate, PodArgs};
use super::devices;
use super::resolve::{self, Pod};
use super::route;
use super::source::{DirSource, KubeSource, ObjectSource, PodEvent, PodInfo, SharedSource, SourceError};
use super::status::{self, NETWORK_STATUS_ANNOTATION};

/// The meta-plugin `rust-multus`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MultusPlugin;

impl cni::Plugin for MultusPlugin {
    type Config = MultusConf;

    fn parse(&self, _: &Env, stdin: &[u8]) -> Result<MultusConf, Failure> {
        // Multus reports a config it cannot use in the version the config asked for.
        MultusConf::parse(stdin).map_err(|e| {
            let asked = serde_json::from_slice::<Value>(stdin)
                .ok()
                .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_string));
            match asked {
                Some(v) => Failure::new(e, v),
                None => Failure::latest(e),
            }
        })
    }

    fn add(&self, env: &Env, conf: &MultusConf, _: &[u8]) -> Result<CniResult, CniError> {
        add(env, conf, &Log::of(conf))
    }

    fn del(&self, env: &Env, conf: &MultusConf, _: &[u8]) -> Result<(), CniError> {
        del(env, conf, &Log::of(conf))
    }

    fn check(&self, env: &Env, conf: &MultusConf, _: &[u8]) -> Result<(), CniError> {
        check(env, conf)
    }

    fn gc(&self, env: &Env, conf: &MultusConf, _: &[u8]) -> Result<(), CniError> {
        gc(env, conf, &Log::of(conf))
    }

    fn status(&self, env: &Env, conf: &MultusConf, _: &[u8]) -> Result<(), CniError> {
        status(env, conf)
    }
}

/// One CNI call of `rust-multus` from its environment and stdin: what the binary would
/// print and whether it would exit with success. With `objects`, Pods and NADs come from
/// that source instead of the config's `kubeconfig` or `objectsDir`. The thick daemon
/// answers every verb through this, so thin and thick run the same code.
pub fn call(env: &Env, stdin: &[u8], objects: Option<SharedSource>) -> cni::Output {
    cni::Output::of(cni::run(&WithObjects(objects), env, stdin))
}

/// [`MultusPlugin`] with its Pods and NADs from a source the caller holds.
#[derive(Debug)]
struct WithObjects(Option<SharedSource>);

impl cni::Plugin for WithObjects {
    type Config = MultusConf;

    fn parse(&self, env: &Env, stdin: &[u8]) -> Result<MultusConf, Failure> {
        let mut conf = cni::Plugin::parse(&MultusPlugin, env, stdin)?;
        conf.objects = self.0.clone();
        Ok(conf)
    }

    fn add(&self, env: &Env, conf: &MultusConf, stdin: &[u8]) -> Result<CniResult, CniError> {
        cni::Plugin::add(&MultusPlugin, env, conf, stdin)
    }

    fn del(&self, env: &Env, conf: &MultusConf, stdin: &[u8]) -> Result<(), CniError> {
        cni::Plugin::del(&MultusPlugin, env, conf, stdin)
    }

    fn check(&self, env: &Env, conf: &MultusConf, stdin: &[u8]) -> Result<(), CniError> {
        cni::Plugin::check(&MultusPlugin, env, conf, stdin)
    }

    fn gc(&self, env: &Env, conf: &MultusConf, stdin: &[u8]) -> Result<(), CniError> {
        cni::Plugin::gc(&MultusPlugin, env, conf, stdin)
    }

    fn status(&self, env: &Env, conf: &MultusConf, stdin: &[u8]) -> Result<(), CniError> {
        cni::Plugin::status(&MultusPlugin, env, conf, stdin)
    }
}

/// Warnings: Multus' `logFile`, else stderr.
#[derive(Debug)]
struct Log {
    file: Option<PathBuf>,
}

impl Log {
    fn of(conf: &MultusConf) -> Log {
        Log { file: conf.log_file.clone() }
    }

    fn warn(&self, msg: &str) {
        let line = format!("rust-multus: warning: {msg}\n");
        if let Some(f) = &self.file
            && let Ok(mut out) = std::fs::OpenOptions::new().create(true).append(true).open(f)
        {
            let _ = out.write_all(line.as_bytes());
            return;
        }
        eprint!("{line}");
    }
}

fn open_source(conf: &MultusConf) -> Result<Option<Box<dyn ObjectSource>>, SourceError> {
    if let Some(shared) = &conf.objects {
        return Ok(Some(Box::new(shared.clone())));
    }
    if let Some(dir) = &conf.objects_dir {
        return Ok(Some(Box::new(DirSource::new(dir))));
    }
    if let Some(kc) = &conf.kubeconfig {
        return Ok(Some(Box::new(KubeSource::new(Some(kc))?)));
    }
    Ok(None)
}

fn source_err(e: SourceError) -> CniError {
    match e {
        SourceError::Unreachable(m) => CniError::new(ErrorCode::TRY_AGAIN_LATER, m),
        SourceError::Invalid(m) => CniError::new(ErrorCode::INVALID_CONFIG, m),
    }
}

/// The pod's identity from `CNI_ARGS`.
fn pod_args(inv: &Env, rargs: &CniArgs) -> PodArgs {
    let infra = rargs.get("K8S_POD_INFRA_CONTAINER_ID");
    PodArgs {
        namespace: rargs.get("K8S_POD_NAMESPACE").to_string(),
        name: rargs.get("K8S_POD_NAME").to_string(),
        infra_container_id: if infra.is_empty() { inv.container_id.clone() } else { infra.to_string() },
        uid: rargs.get("K8S_POD_UID").to_string(),
    }
}

/// Capability arguments of delegate `idx`: the pod's request, and for the cluster network
/// the runtime's own `runtimeConfig`.
fn caps(conf: &MultusConf, d: &Delegate, idx: usize) -> Map<String, Value> {
    let mut m = if idx == 0 { conf.runtime_config.clone() } else { Map::new() };
    m.extend(d.capability_args());
    m
}

fn attachment<'a>(
    inv: &'a Env,
    conf: &'a MultusConf,
    path: &'a [PathBuf],
    ifname: &'a str,
    args: Vec<(String, String)>,
    capability_args: Map<String, Value>,
) -> Attachment<'a> {
    Attachment {
        container_id: &inv.container_id,
        netns: &inv.netns,
        ifname,
        args,
        capability_args,
        path,
        cache_dir: &conf.cni_dir,
    }
}

fn add(inv: &Env, conf: &MultusConf, log: &Log) -> Result<CniResult, CniError> {
    let rargs = CniArgs::parse(&inv.args)?;
    let mut pod = pod_args(inv, &rargs);
    let source = open_source(conf).map_err(source_err)?;
    let info = match (&source, pod.namespace.is_empty() || pod.name.is_empty()) {
        (Some(s), false) => Some(s.pod(&pod.namespace, &pod.name).map_err(source_err)?.ok_or_else(|| {
            CniError::new(ErrorCode::TRY_AGAIN_LATER, format!("pod {}/{} not found", pod.namespace, pod.name))
        })?),
        _ => None,
    };
    if let Some(info) = &info {
        if !pod.uid.is_empty() && !info.uid.is_empty() && pod.uid != info.uid {
            return Err(CniError::new(
                ErrorCode::TRY_AGAIN_LATER,
                format!(
                    "pod {}/{}: expected UID {:?} (K8S_POD_UID) but the API has {:?}",
                    pod.namespace, pod.name, pod.uid, info.uid
                ),
            ));
        }
        if pod.uid.is_empty() {
            pod.uid = info.uid.clone();
        }
    }
    let mut events = Vec::new();
    let added = add_networks(inv, conf, log, source.as_deref(), &pod, info.as_ref(), &mut events);
    if let (Some(s), Some(info)) = (&source, &info) {
        let events: Vec<PodEvent<'_>> = events
            .into_iter()
            .map(|(kind, reason, message)| PodEvent {
                namespace: &pod.namespace,
                name: &pod.name,
                uid: &info.uid,
                kind,
                reason,
                message,
            })
            .collect();
        // An event that cannot be written never fails the ADD.
        if let Err(e) = s.pod_events(&events) {
            log.warn(&format!("recording events of pod {}/{}: {e}", pod.namespace, pod.name));
        }
    }
    added
}

/// An event for the pod: `Normal` or `Warning`, its reason and message.
type Event = (&'static str, &'static str, String);

/// The networks of an ADD: resolved, given their devices, added in order (rolled back on a
/// failure), cached and written to network-status. What the pod should hear of it goes to
/// `events` (Multus' reasons where Multus has one).
fn add_networks(
    inv: &Env,
    conf: &MultusConf,
    log: &Log,
    source: Option<&dyn ObjectSource>,
    pod: &PodArgs,
    info: Option<&PodInfo>,
    events: &mut Vec<Event>,
) -> Result<CniResult, CniError> {
    let warn = |events: &mut Vec<Event>, reason: &'static str, e: CniError| {
        events.push(("Warning", reason, e.msg.clone()));
        e
    };
    let podref = Pod { namespace: &pod.namespace, info };
    let mut delegates = resolve::delegates(conf, source, &podref, &inv.ifname).map_err(|e| {
        let reason = if resolve::nad_missing(&e) { "NoNetworkFound" } else { "InvalidNetworks" };
        warn(events, reason, e)
    })?;
    let kubelet = devices::PodResources { socket: conf.pod_resources_socket.clone() };
    let claimed = match (source, info) {
        (Some(s), Some(i))
            if !i.claims.is_empty() && delegates.iter().any(|d| !d.resource_name.is_empty()) =>
        {
            devices::claimed(s, &pod.namespace, &i.claims).map_err(|e| {
                let e = CniError::new(
                    ErrorCode::TRY_AGAIN_LATER,
                    format!("pod {}/{}: its ResourceClaims: {e}", pod.namespace, pod.name),
                );
                warn(events, "NoDeviceFound", e)
            })?
        }
        _ => devices::PodDevices::new(),
    };
    let devices = devices::ClaimedAndKubelet { claimed, kubelet: &kubelet };
    devices::assign(&mut delegates, &pod.namespace, &pod.name, &devices)
        .map_err(|e| warn(events, "NoDeviceFound", e))?;
    let path = conf.plugin_path(&inv.path);
    let add_one = |idx: usize| {
        let d = &delegates[idx];
        let ifname = d.ifname(&inv.ifname, idx);
        let args = delegate::cni_args(pod, &inv.args, &d.ip_request, &d.mac_request);
        let a = attachment(inv, conf, &path, &ifname, args, caps(conf, d, idx));
        delegate::add(d, &a).and_then(|r| default_route(inv, conf, d, &ifname, r))
    };
    let order: Vec<usize> = (0..delegates.len()).collect();
    let outcomes = each_network(conf, &delegates, &order, true, add_one);
    let tried = outcomes.len();
    let mut results: Vec<AddResult> = Vec::with_capacity(delegates.len());
    for (idx, added) in outcomes.into_iter().enumerate() {
        let d = &delegates[idx];
        let ifname = d.ifname(&inv.ifname, idx);
        match added {
            Ok(r) => {
                let ips: Vec<String> = match &r {
                    AddResult::Typed(t, _) => t.ips.iter().map(|ip| ip.address.to_string()).collect(),
                    AddResult::Legacy(_) => Vec::new(),
                };
                events.push((
                    "Normal",
                    "AddedInterface",
                    format!("Add {ifname} [{}] from {}", ips.join(" "), d.name),
                ));
                results.push(r);
            }
            Err(e) => {
                // Every network that was tried, the ones after this too when they ran at once.
                rollback(inv, conf, pod, &delegates[..tried], &path, log);
                let e = CniError::new(
                    e.code,
                    format!("error adding container to network {:?} ({ifname}): {}", d.name, e.msg),
                )
                .with_details(e.details);
                return Err(warn(events, "FailedAddingInterface", e));
            }
        }
    }
    let statuses: Vec<_> = delegates
        .iter()
        .zip(&results)
        .enumerate()
        .map(|(idx, (d, r))| {
            let mut s = status::from_result(&d.name, &d.ifname(&inv.ifname, idx), r, idx == 0);
            if !d.device_id.is_empty() {
                s.device_info = devices::device_info(
                    &conf.device_info_dir,
                    Path::new("/sys"),
                    &d.resource_name,
                    &d.device_id,
                );
            }
            s
        })
        .collect();
    // The cluster network's result; the harness prints it in the runtime's version.
    let answer = match &results[0] {
        AddResult::Typed(r, _) => Ok(r.clone()),
        AddResult::Legacy(raw) => CniResult::parse(raw),
    };
    let answer = match answer {
        Ok(r) => r,
        Err(e) => {
            rollback(inv, conf, pod, &delegates, &path, log);
            return Err(CniError::new(e.code, format!("the cluster network's result: {}", e.msg)));
        }
    };
    let status_json = serde_json::to_string(&statuses).unwrap_or_default();
    if let Err(e) = cache::save(&conf.cni_dir, &inv.container_id, &delegates, &status_json) {
        rollback(inv, conf, pod, &delegates, &path, log);
        return Err(e);
    }
    if let (Some(s), Some(_)) = (source, info)
        && let Err(e) =
            s.annotate_pod(&pod.namespace, &pod.name, NETWORK_STATUS_ANNOTATION, Some(&status_json))
    {
        log.warn(&format!("writing {NETWORK_STATUS_ANNOTATION} of pod {}/{}: {e}", pod.namespace, pod.name));
    }
    Ok(answer)
}

/// Applies a `default-route` request (Multus: the network's gateway becomes the pod's
/// default route, every other network loses its default route of that family) to the
/// namespace and to the result.
fn default_route(
    inv: &Env,
    conf: &MultusConf,
    d: &Delegate,
    ifname: &str,
    result: AddResult,
) -> Result<AddResult, CniError> {
    let (v4, v6) = (d.filter_v4_gateway, d.filter_v6_gateway);
    let gws: Vec<IpAddr> = d.gateway_request.iter().flatten().filter_map(|g| g.parse().ok()).collect();
    if !v4 && !v6 && gws.is_empty() {
        return Ok(result);
    }
    let (mut typed, version) = match result {
        AddResult::Typed(r, v) => (r, v),
        AddResult::Legacy(_) => {
            return Err(CniError::new(
                ErrorCode::INCOMPATIBLE_VERSION,
                format!(
                    "network {:?}: its result cannot take a default-route: results older than 0.3.0 have another shape",
                    d.name
                ),
            ));
        }
    };
    if v4 {
        route::delete_default(&inv.netns, ifname, false)?;
    }
    if v6 {
        route::delete_default(&inv.netns, ifname, true)?;
    }
    route::result_without_default(
        &mut typed,
        v4 || gws.iter().any(IpAddr::is_ipv4),
        v6 || gws.iter().any(IpAddr::is_ipv6),
    );
    for gw in &gws {
        route::delete_default(&inv.netns, ifname, gw.is_ipv6())?;
        route::add_default(&inv.netns, ifname, *gw)?;
        route::result_with_default(&mut typed, *gw);
    }
    // The cached result is what CHECK compares against: keep it in step, in the version the
    // delegate wrote it in.
    if let Ok(net) = d.network() {
        let p = delegate::result_path(&conf.cni_dir, &net.name, &inv.container_id, ifname);
        if let Some(mut c) = delegate::read_result(&p) {
            c.result = typed.render(version);
            delegate::write_result(&p, &c)?;
        }
    }
    Ok(AddResult::Typed(typed, version))
}

/// Deletes `delegates` in reverse order after a failed ADD, best effort.
fn rollback(
    inv: &Env,
    conf: &MultusConf,
    pod: &PodArgs,
    delegates: &[Delegate],
    path: &[PathBuf],
    log: &Log,
) {
    for (idx, d) in delegates.iter().enumerate().rev() {
        let ifname = d.ifname(&inv.ifname, idx);
        let args = delegate::cni_args(pod, &inv.args, &[], "");
        let a = attachment(inv, conf, path, &ifname, args, caps(conf, d, idx));
        if let Err(e) = delegate::del(d, &a) {
            log.warn(&format!("undoing network {:?} ({ifname}) after a failed ADD: {e}", d.name));
        }
    }
}

/// Runs `f` for the networks at the indexes of `order`, returning each outcome in that
/// order. At once, one thread each (`rustMultus.parallelNetworks`): each network has its
/// own interface, result file and IPAM call, so a pod's ADD or DEL waits for its slowest
/// network instead of the sum of them (eight IPAM round trips to an API server, one after
/// another). A `default-route` request moves routes between the pod's interfaces, so such
/// a pod keeps Multus' order; then `stop` ends the run at the first failure.
fn each_network<T: Send>(
    conf: &MultusConf,
    delegates: &[Delegate],
    order: &[usize],
    stop: bool,
    f: impl Fn(usize) -> Result<T, CniError> + Sync,
) -> Vec<Result<T, CniError>> {
    let routes_move =
        delegates.iter().any(|d| d.gateway_request.is_some() || d.filter_v4_gateway || d.filter_v6_gateway);
    if conf.parallel_networks && !routes_move {
        let f = &f;
        return std::thread::scope(|s| {
            let threads: Vec<_> = order.iter().map(|&idx| s.spawn(move || f(idx))).collect();
            threads
                .into_iter()
                .map(|t| {
                    t.join().unwrap_or_else(|_| {
                        Err(CniError::new(ErrorCode::PLUGIN_FAILED, "the network's call panicked"))
                    })
                })
                .collect()
        });
    }
    let mut outcomes = Vec::with_capacity(order.len());
    for &idx in order {
        let outcome = f(idx);
        let failed = outcome.is_err();
        outcomes.push(outcome);
        if failed && stop {
            break;
        }
    }
    outcomes
}

/// Deletes every delegate (at once, or in reverse order), past failures; all of them are
/// reported, in reverse order.
fn del_all(
    inv: &Env,
    conf: &MultusConf,
    pod: &PodArgs,
    delegates: &[Delegate],
    path: &[PathBuf],
) -> Result<(), CniError> {
    let order: Vec<usize> = (0..delegates.len()).rev().collect();
    let del_one = |idx: usize| {
        let d = &delegates[idx];
        let ifname = d.ifname(&inv.ifname, idx);
        let args = delegate::cni_args(pod, &inv.args, &[], "");
        let a = attachment(inv, conf, path, &ifname, args, caps(conf, d, idx));
        // Multus reports which networks failed, not the delegates' details.
        delegate::del(d, &a)
            .map_err(|e| CniError::new(e.code, format!("network {:?} ({ifname}): {}", d.name, e.msg)))
    };
    let mut errors = ErrorList::new();
    for outcome in each_network(conf, delegates, &order, false, del_one) {
        if let Err(e) = outcome {
            errors.push(e);
        }
    }
    let failed = errors.len();
    errors.into_result(" / ").map_err(|e| {
        CniError::new(e.code, format!("error deleting {failed} of {} networks: {}", delegates.len(), e.msg))
    })
}

fn del(inv: &Env, conf: &MultusConf, log: &Log) -> Result<(), CniError> {
    let rargs = CniArgs::parse(&inv.args)?;
    let pod = pod_args(inv, &rargs);
    let path = conf.plugin_path(&inv.path);
    let has_pod = !pod.namespace.is_empty() && !pod.name.is_empty();
    let delegates = match cache::load(&conf.cni_dir, &inv.container_id)? {
        Some(d) => d,
        None => {
            // No cache: the delegates can only come from the API, and only while the pod is
            // there. Without either, the pod is gone and there is nothing to undo.
            let found = (|| -> Result<Option<Vec<Delegate>>, CniError> {
                let Some(source) = open_source(conf).map_err(source_err)? else { return Ok(None) };
                if !has_pod {
                    return Ok(None);
                }
                let Some(info) = source.pod(&pod.namespace, &pod.name).map_err(source_err)? else {
                    return Ok(None);
                };
                let p = Pod { namespace: &pod.namespace, info: Some(&info) };
                resolve::delegates(conf, Some(source.as_ref()), &p, &inv.ifname).map(Some)
            })();
            match found {
                Ok(Some(d)) => d,
                Ok(None) => {
                    log.warn(&format!(
                        "DEL of container {}: no delegate cache in {} and no pod to ask; nothing to delete",
                        inv.container_id,
                        conf.cni_dir.display()
                    ));
                    return Ok(());
                }
                Err(e) => {
                    log.warn(&format!(
                        "DEL of container {}: no delegate cache in {} and the pod's networks cannot be read ({}); assuming the pod is gone",
                        inv.container_id,
                        conf.cni_dir.display(),
                        e.msg
                    ));
                    return Ok(());
                }
            }
        }
    };
    // Clear the pod's network-status while its sandbox is still there, as Multus does.
    if has_pod && !inv.netns.is_empty() && Path::new(&inv.netns).exists() {
        match open_source(conf) {
            Ok(Some(s)) => {
                if let Err(e) = s.annotate_pod(&pod.namespace, &pod.name, NETWORK_STATUS_ANNOTATION, None) {
                    log.warn(&format!(
                        "clearing {NETWORK_STATUS_ANNOTATION} of {}/{}: {e}",
                        pod.namespace, pod.name
                    ));
                }
            }
            Ok(None) => {}
            Err(e) => log.warn(&format!("clearing {NETWORK_STATUS_ANNOTATION}: {e}")),
        }
    }
    del_all(inv, conf, &pod, &delegates, &path)?;
    // Kept on failure so that the runtime's retry still knows every network.
    cache::remove(&conf.cni_dir, &inv.container_id);
    Ok(())
}

fn check(inv: &Env, conf: &MultusConf) -> Result<(), CniError> {
    let rargs = CniArgs::parse(&inv.args)?;
    let pod = pod_args(inv, &rargs);
    let path = conf.plugin_path(&inv.path);
    let delegates = cache::load(&conf.cni_dir, &inv.container_id)?.ok_or_else(|| {
        CniError::new(
            ErrorCode::INVALID_CONFIG,
            format!(
                "CHECK: container {} has no delegate cache in {}",
                inv.container_id,
                conf.cni_dir.display()
            ),
        )
    })?;
    for (idx, d) in delegates.iter().enumerate() {
        let ifname = d.ifname(&inv.ifname, idx);
        let args = delegate::cni_args(&pod, &inv.args, &[], "");
        let a = attachment(inv, conf, &path, &ifname, args, caps(conf, d, idx));
        delegate::check(d, &a).map_err(|e| {
            CniError::new(e.code, format!("network {:?} ({ifname}): {}", d.name, e.msg))
                .with_details(e.details)
        })?;
    }
    Ok(())
}

/// The runtime ifname a container used for its cluster network, from libcni's result cache
/// (Multus' cache does not record it).
fn cluster_ifname(
    conf: &MultusConf,
    d: &Delegate,
    container_id: &str,
) -> Option<(String, delegate::CachedResult)> {
    let net = d.network().ok()?;
    let prefix = format!("{}-{container_id}-", net.name);
    let dir = conf.cni_dir.join("results");
    std::fs::read_dir(&dir).ok()?.filter_map(Result::ok).find_map(|e| {
        let name = e.file_name().into_string().ok()?;
        let ifname = name.strip_prefix(&prefix)?.to_string();
        let c = delegate::read_result(&e.path())?;
        (c.container_id == container_id && c.network_name == net.name && c.if_name == ifname)
            .then_some((ifname, c))
    })
}

/// GC: containers the runtime no longer lists lose their delegates (DEL with what the
/// cache recorded, as libcni does), then every network in the cache gets GC with the
/// attachments that stay.
fn gc(inv: &Env, conf: &MultusConf, log: &Log) -> Result<(), CniError> {
    let valid: BTreeMap<&str, &str> =
        conf.valid_attachments.iter().map(|(c, i)| (c.as_str(), i.as_str())).collect();
    let path = conf.plugin_path(&inv.path);
    let mut errors = ErrorList::new();
    // Network name -> (a delegate to run GC with, attachments that stay).
    let mut networks: BTreeMap<String, (Delegate, BTreeSet<(String, String)>)> = BTreeMap::new();
    for cid in cache::containers(&conf.cni_dir)? {
        let delegates = match cache::load(&conf.cni_dir, &cid) {
            Ok(Some(d)) => d,
            Ok(None) => continue,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let runtime_ifname = match valid.get(cid.as_str()) {
            Some(i) => (*i).to_string(),
            None => delegates
                .first()
                .and_then(|d| cluster_ifname(conf, d, &cid))
                .map_or_else(|| "eth0".into(), |(i, _)| i),
        };
        let stale = !valid.contains_key(cid.as_str());
        let mut failed = false;
        for (idx, d) in delegates.iter().enumerate().rev() {
            let Ok(net) = d.network() else { continue };
            let ifname = d.ifname(&runtime_ifname, idx);
            let entry = networks.entry(net.name.clone()).or_insert_with(|| (d.clone(), BTreeSet::new()));
            if !stale {
                entry.1.insert((cid.clone(), ifname));
                continue;
            }
            let cached =
                delegate::read_result(&delegate::result_path(&conf.cni_dir, &net.name, &cid, &ifname));
            let (netns, args, capability_args) = match cached {
                Some(c) => (c.netns, c.cni_args, c.capability_args),
                None => (String::new(), Vec::new(), d.capability_args()),
            };
            let a = Attachment {
                container_id: &cid,
                netns: &netns,
                ifname: &ifname,
                args,
                capability_args,
                path: &path,
                cache_dir: &conf.cni_dir,
            };
            if let Err(e) = delegate::del(d, &a) {
                failed = true;
                errors.push(CniError::new(
                    e.code,
                    format!("container {cid}, network {:?} ({ifname}): {}", d.name, e.msg),
                ));
            }
        }
        if stale && !failed {
            log.warn(&format!("GC: container {cid} is not in the runtime's list; its networks were deleted"));
            cache::remove(&conf.cni_dir, &cid);
        }
    }
    for (name, (d, keep)) in networks {
        let keep: Vec<(String, String)> = keep.into_iter().collect();
        if let Err(e) = delegate::gc_or_status(&d, Command::Gc, &keep, &path) {
            errors.push(CniError::new(e.code, format!("network {name:?}: {}", e.msg)));
        }
    }
    // One code for every failure: GC's callers only learn that something stays behind.
    errors.into_result(" / ").map_err(|e| CniError::new(ErrorCode::PLUGIN_FAILED, format!("GC: {}", e.msg)))
}

/// STATUS: the readiness indicator file is there and every configured network (cluster and
/// default networks) answers STATUS.
fn status(inv: &Env, conf: &MultusConf) -> Result<(), CniError> {
    if let Some(f) = &conf.readiness_indicator_file
        && !f.exists()
    {
        return Err(CniError::new(
            ErrorCode::NOT_AVAILABLE,
            format!(
                "readiness indicator file {} does not exist: the cluster network is not ready",
                f.display()
            ),
        ));
    }
    let source = open_source(conf).map_err(|e| CniError::new(ErrorCode::NOT_AVAILABLE, e.to_string()))?;
    // No pod: the cluster network and every default network (no system namespace).
    let podref = Pod { namespace: "", info: None };
    let delegates = resolve::delegates(conf, source.as_deref(), &podref, "eth0")
        .map_err(|e| CniError::new(ErrorCode::NOT_AVAILABLE, e.msg))?;
    let path = conf.plugin_path(&inv.path);
    for d in &delegates {
        delegate::gc_or_status(d, Command::Status, &[], &path).map_err(|e| {
            CniError::new(e.code, format!("network {:?}: {}", d.name, e.msg)).with_details(e.details)
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use cni::LATEST_VERSION;

    use super::*;

    #[test]
    fn config_errors_are_reported_in_the_version_asked_for() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            Env::from_env(move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()))
        };
        let inv = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/n"),
            ("CNI_PATH", "/a::/b"),
        ])
        .expect("ADD");
        let run = |stdin: &[u8]| cni::run(&MultusPlugin, &inv, stdin).expect_err("refused");
        let f = run(br#"{"cniVersion":"0.2.0","clusterNetwork":"x"}"#);
        assert_eq!((f.error.code, f.version.as_str()), (ErrorCode::INCOMPATIBLE_VERSION, "0.2.0"));
        let f = run(b"{");
        assert_eq!((f.error.code, f.version), (ErrorCode::DECODE, LATEST_VERSION.to_string()));
        let f = run(br#"{"cniVersion":"1.0.0"}"#);
        assert_eq!((f.error.code, f.version.as_str()), (ErrorCode::INVALID_CONFIG, "1.0.0"));
    }
}
