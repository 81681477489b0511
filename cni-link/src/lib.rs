//! The macvlan and ipvlan link plugins (binaries `rust-macvlan` and `rust-ipvlan`): one driver,
//! the link kind's data the only difference.
//!
//! Configuration as the reference plugins (see [`config`]). ADD checks the whole config, that
//! `CNI_IFNAME` is free in the pod and the master (exists, its MTU) before touching anything,
//! creates the link on the master
//! straight into the pod's namespace under a temporary name, runs the `ipam` plugin (exec,
//! per the CNI spec), then in the pod's namespace renames the link to `CNI_IFNAME`, sets
//! `arp_notify`/`ndisc_notify`, adds the addresses (IPv6 without DAD), sets it up and adds the
//! routes. Any failure removes the link and releases the lease (ipam DEL). DEL releases the
//! lease and deletes the link if it is one of this kind, carrying on past errors and reporting
//! them all; a missing namespace or link is success. CHECK runs ipam CHECK, then finds the
//! link of the `prevResult` with the right kind, master, mode and MAC, its addresses and
//! routes. GC and STATUS are passed to the ipam plugin. The result has the shape the
//! reference macvlan plugin prints (interfaces, ips indexed to the interface, routes, dns).
//!
//! The kind and its mode are one value ([`config::KindData`]), so a macvlan mode can never
//! reach an ipvlan link. The system is reached only through `netlink::Namespaces` and
//! `netlink::Netlink`: the binaries use the kernel, the unit tests a fake that enforces the
//! kernel's rules, so ADD, DEL and CHECK are tested without root (the namespace tests in
//! `tests/` run the binaries against the real kernel).
//!
//! Error codes: the spec's, and 120 (netlink), 121 (CHECK mismatch), 122 (link kind not in
//! this kernel), listed with every other one in [`cni::ErrorCode`].

pub mod config;
#[cfg(test)]
mod fake;
pub(crate) mod netlink;
pub mod route;

use std::fmt;
use std::io::Read as _;
use std::path::Path;

use cni::{CniError, CniResult, Command, Env, ErrorCode, ErrorList, Failure, Interface, IpResult};

use self::config::{KindData, LinkConf, is_ifname};
use self::netlink::{EEXIST, EOPNOTSUPP, Kernel, Link, Namespaces, Netlink, NewLink, failed, kind_name};
use cni::exec::{self, Call};

/// The link kind a binary makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Macvlan,
    Ipvlan,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Macvlan => "macvlan",
            Kind::Ipvlan => "ipvlan",
        })
    }
}

/// The plugin of `rust-macvlan` and `rust-ipvlan`: one driver, the kind its only setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkPlugin(pub Kind);

impl cni::Plugin for LinkPlugin {
    type Config = LinkConf;

    fn parse(&self, env: &Env, stdin: &[u8]) -> Result<LinkConf, Failure> {
        if env.command.has_attachment() && !is_ifname(&env.ifname) {
            return Err(Failure::latest(CniError::new(
                ErrorCode::INVALID_ENV,
                format!("CNI_IFNAME {:?} is not an interface name (1 to 15 characters)", env.ifname),
            )));
        }
        let args = env.cni_args().map_err(Failure::latest)?;
        LinkConf::parse(self.0, stdin, &args).map_err(Failure::latest)
    }

    fn add(&self, env: &Env, conf: &LinkConf, stdin: &[u8]) -> Result<CniResult, CniError> {
        add(&Kernel, env, conf, stdin)
    }

    fn del(&self, env: &Env, conf: &LinkConf, stdin: &[u8]) -> Result<(), CniError> {
        del(&Kernel, env, conf, stdin)
    }

    fn check(&self, env: &Env, conf: &LinkConf, stdin: &[u8]) -> Result<(), CniError> {
        check(&Kernel, env, conf, stdin)
    }

    fn gc(&self, env: &Env, conf: &LinkConf, stdin: &[u8]) -> Result<(), CniError> {
        to_ipam(env, conf, stdin)
    }

    fn status(&self, env: &Env, conf: &LinkConf, stdin: &[u8]) -> Result<(), CniError> {
        to_ipam(env, conf, stdin)
    }
}

/// GC and STATUS concern the addresses only: the ipam plugin answers them.
fn to_ipam(env: &Env, conf: &LinkConf, stdin: &[u8]) -> Result<(), CniError> {
    match &conf.ipam_type {
        Some(t) => exec::run(t, &Call::from_env(env, env.command), stdin).map(|_| ()),
        None => Ok(()),
    }
}

/// The master: named in the config or the default route's; it must exist.
async fn find_master(nl: &impl Netlink, conf: &LinkConf) -> Result<Link, CniError> {
    let where_ = if conf.link_in_container { "the pod's" } else { "the node's" };
    let name = match &conf.master {
        Some(m) => m.clone(),
        None => nl.default_route_link().await.map_err(|e| failed("listing routes for the default master", &e))?.ok_or_else(
            || {
                CniError::new(
                    ErrorCode::INVALID_CONFIG,
                    format!("master is not set and {where_} network namespace has no default route to take it from"),
                )
            },
        )?,
    };
    nl.link_by_name(&name)
        .await
        .map_err(|e| failed(format_args!("looking up master {name}"), &e))?
        .ok_or_else(|| {
            CniError::new(
                ErrorCode::INVALID_CONFIG,
                format!("master {name:?} not found in {where_} network namespace"),
            )
        })
}

/// The kernel keeps one ipvlan mode per master: a new link in another mode silently switches
/// every link on the master to it, breaking the pods that have them. So an ipvlan ADD is
/// refused when `candidates` (links of one namespace, `ns`; `None`: the plugin's own) hold an
/// ipvlan link on `master` in another mode. A link in another namespace is known to be on
/// this master by its parent's index and the master's MAC, which ipvlan links share.
fn one_ipvlan_mode<'a>(
    conf: &LinkConf,
    master: &Link,
    candidates: impl Iterator<Item = &'a Link>,
    ns: Option<&Path>,
) -> Result<(), CniError> {
    let KindData::Ipvlan(_) = conf.kind else { return Ok(()) };
    let other = candidates.into_iter().find(|l| {
        l.kind == kind_name(Kind::Ipvlan)
            && l.parent == Some(master.index)
            && l.kind_data.is_some_and(|k| k != conf.kind)
    });
    match other {
        None => Ok(()),
        Some(l) => {
            let mode = l.kind_data.map(|k| k.to_string()).unwrap_or_default();
            let place = ns.map_or_else(|| "the node's namespace".to_string(), |p| p.display().to_string());
            Err(CniError::new(
                ErrorCode::INVALID_CONFIG,
                format!(
                    "master {:?} already has ipvlan links in mode {mode} ({} in {place}): the kernel keeps one mode per master and would switch them all to {}",
                    master.name, l.name, conf.kind
                ),
            ))
        }
    }
}

/// A name for the new link until it is in the pod's namespace: the final name may be taken
/// on the node, so the link is made under a random one and renamed there.
fn temp_name() -> String {
    let mut b = [0u8; 4];
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).is_ok();
    if !ok {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        b = (t.subsec_nanos() ^ std::process::id()).to_le_bytes();
    }
    format!("cni{:02x}{:02x}{:02x}{:02x}", b[0], b[1], b[2], b[3])
}

fn add<S: Namespaces>(sys: &S, env: &Env, conf: &LinkConf, stdin: &[u8]) -> Result<CniResult, CniError> {
    let pod_path = Path::new(&env.netns);
    sys.check(pod_path)?;
    let ifname = env.ifname.as_str();
    // A taken name would fail the rename after the lease was taken, and releasing it then
    // would release the lease of whoever holds the name (a repeated ADD): refuse now.
    sys.run(Some(pod_path), |nl| async move {
        match nl.link_by_name(ifname).await {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err(CniError::new(
                ErrorCode::INVALID_ENV,
                format!(
                    "CNI_IFNAME {ifname} already exists in the pod's network namespace {}",
                    pod_path.display()
                ),
            )),
            Err(e) => Err(failed(format_args!("looking up {ifname} in the pod's namespace"), &e)),
        }
    })?;
    let tmp = temp_name();
    let master_ns = conf.link_in_container.then_some(pod_path);
    let into = (!conf.link_in_container).then_some(pod_path);
    let tmp_name = tmp.as_str();
    // Everything checked before the first change: the master exists, is up, its MTU allows
    // ours, and (ipvlan) it has no links of another mode.
    let master = sys.run(master_ns, |nl| async move {
        let master = find_master(&nl, conf).await?;
        if !master.up {
            return Err(CniError::new(
                ErrorCode::INVALID_CONFIG,
                format!(
                    "master {:?} is down: a link on it would pass no traffic (ip link set {} up)",
                    master.name, master.name
                ),
            ));
        }
        if conf.mtu > master.mtu {
            return Err(CniError::new(
                ErrorCode::INVALID_CONFIG,
                format!("mtu {} is larger than the MTU {} of master {:?}", conf.mtu, master.mtu, master.name),
            ));
        }
        // Links still beside their master, in its own namespace.
        let here = nl.links().await.map_err(|e| failed("listing links", &e))?;
        one_ipvlan_mode(conf, &master, here.iter().filter(|l| !l.parent_elsewhere), master_ns)?;
        Ok(master)
    })?;
    if matches!(conf.kind, KindData::Ipvlan(_)) && !conf.link_in_container {
        // The node's links moved into pods: look in every named namespace.
        for ns in sys.named() {
            let master = &master;
            let there =
                sys.run(
                    Some(&ns),
                    |nl| async move { nl.links().await.map_err(|e| failed("listing links", &e)) },
                );
            // A namespace that went away meanwhile holds nothing.
            let Ok(there) = there else { continue };
            let moved = there.iter().filter(|l| l.parent_elsewhere && l.mac == master.mac);
            one_ipvlan_mode(conf, master, moved, Some(&ns))?;
        }
    }
    let master = &master;
    sys.run(master_ns, |nl| async move {
        let new = NewLink {
            name: tmp_name,
            master: master.index,
            kind: conf.kind,
            mtu: conf.mtu,
            mac: conf.mac.map(|m| m.0),
            into,
        };
        create(&nl, &new).await
    })?;
    let mut result = CniResult {
        interfaces: Vec::new(),
        ips: Vec::new(),
        routes: Vec::new(),
        dns: Some(conf.dns.clone().unwrap_or_default()),
    };
    if let Some(ipam) = &conf.ipam_type {
        let got = exec::run(ipam, &Call::from_env(env, Command::Add), stdin).and_then(|v| {
            let r = CniResult::parse(&v).map_err(|e| {
                CniError::new(e.code, format!("ipam plugin {ipam:?} answered a bad result: {}", e.msg))
            })?;
            if r.ips.is_empty() {
                return Err(CniError::new(
                    ErrorCode::INVALID_CONFIG,
                    format!("ipam plugin {ipam:?} returned no addresses"),
                ));
            }
            Ok(r)
        });
        match got {
            Ok(r) => {
                result.ips = r.ips.into_iter().map(|ip| IpResult { interface: Some(0), ..ip }).collect();
                result.routes = r.routes;
            }
            Err(e) => {
                let mut cleanup = ErrorList::new();
                cleanup.check(remove_temp(sys, pod_path, &tmp));
                // The ipam plugin may have allocated before failing (a bad result, say).
                cleanup.check(exec::run(ipam, &Call::from_env(env, Command::Del), stdin));
                return Err(cleanup.after(e, "; "));
            }
        }
    }
    let configured = sys.run(Some(pod_path), |nl| {
        let result = &result;
        let tmp = &tmp;
        async move {
            let link = nl
                .link_by_name(tmp)
                .await
                .map_err(|e| failed(format_args!("looking up {tmp} in the pod's namespace"), &e))?
                .ok_or_else(|| {
                    CniError::new(
                        ErrorCode::NETLINK_FAILED,
                        format!("the new link {tmp} is not in the pod's namespace"),
                    )
                })?;
            match configure(&nl, &link, ifname, result).await {
                Ok(l) => Ok(l),
                Err(e) => {
                    let mut cleanup = ErrorList::new();
                    if let Err(d) = nl.delete(link.index).await {
                        cleanup.push(failed(format_args!("removing link {tmp}/{ifname}"), &d));
                    }
                    Err(cleanup.after(e, "; "))
                }
            }
        }
    });
    let link = match configured {
        Ok(l) => l,
        Err(e) => {
            let mut cleanup = ErrorList::new();
            if let Some(ipam) = &conf.ipam_type {
                cleanup.check(exec::run(ipam, &Call::from_env(env, Command::Del), stdin));
            }
            return Err(cleanup.after(e, "; "));
        }
    };
    result.interfaces.push(Interface {
        name: ifname.to_string(),
        mac: link.mac_string(),
        sandbox: env.netns.clone(),
        ..Interface::default()
    });
    Ok(result)
}

/// Deletes the link still under its temporary name in the pod's namespace.
fn remove_temp(sys: &impl Namespaces, pod: &Path, tmp: &str) -> Result<(), CniError> {
    sys.run(Some(pod), |nl| async move {
        if let Some(l) =
            nl.link_by_name(tmp).await.map_err(|e| failed(format_args!("looking up {tmp}"), &e))?
        {
            nl.delete(l.index).await.map_err(|e| failed(format_args!("removing link {tmp}"), &e))?;
        }
        Ok(())
    })
}

/// In the pod's namespace: the final name, sysctls, addresses, up, routes. Returns the
/// link as it is then (its MAC for the result).
async fn configure(
    nl: &impl Netlink,
    link: &Link,
    ifname: &str,
    result: &CniResult,
) -> Result<Link, CniError> {
    let (from, index) = (&link.name, link.index);
    nl.rename(index, ifname).await.map_err(|e| {
        if e.errno == Some(EEXIST) {
            CniError::new(
                ErrorCode::NETLINK_FAILED,
                format!(
                    "renaming {from} to {ifname}: an interface {ifname} already exists in the pod's namespace"
                ),
            )
        } else {
            failed(format_args!("renaming {from} to {ifname}"), &e)
        }
    })?;
    // As the reference plugins: announce the address on up and on change.
    nl.announce(ifname, result.ips.iter().any(|ip| ip.address.is_ipv6()));
    for ip in &result.ips {
        let addr = ip.address;
        nl.add_address(index, addr)
            .await
            .map_err(|e| failed(format_args!("adding address {addr} to {ifname}"), &e))?;
    }
    nl.set_up(index).await.map_err(|e| failed(format_args!("setting {ifname} up"), &e))?;
    let v4gw = result.ips.iter().find(|ip| ip.address.is_ipv4()).and_then(|ip| ip.gateway);
    let v6gw = result.ips.iter().find(|ip| ip.address.is_ipv6()).and_then(|ip| ip.gateway);
    for r in &result.routes {
        // The route's own gateway, else the address gateway of its family, as the reference
        // plugins do.
        let gw = r.gw.or(if r.dst.is_ipv4() { v4gw } else { v6gw });
        let what = match gw {
            Some(g) => format!("adding route {} via {g} dev {ifname}", r.dst),
            None => format!("adding route {} dev {ifname}", r.dst),
        };
        if r.dst.is_ipv6() && gw.is_some_and(|g| g.is_ipv4()) {
            // What the kernel's route message cannot carry (an IPv4 route may go via IPv6).
            return Err(CniError::new(
                ErrorCode::INVALID_CONFIG,
                format!("{what}: invalid address family Inet6"),
            ));
        }
        nl.add_route(index, r, gw).await.map_err(|e| failed(&what, &e))?;
    }
    nl.link_by_index(index).await.map_err(|e| failed(format_args!("reading {ifname} back"), &e))?.ok_or_else(
        || CniError::new(ErrorCode::NETLINK_FAILED, format!("{ifname} vanished while it was configured")),
    )
}

/// Creates the link; a kernel without the kind is error 122 naming it.
async fn create(nl: &impl Netlink, new: &NewLink<'_>) -> Result<(), CniError> {
    let kind = new.kind.kind();
    nl.create(new).await.map_err(|e| {
        if e.errno == Some(EOPNOTSUPP) {
            CniError::new(
                ErrorCode::LINK_KIND_UNSUPPORTED,
                format!("this kernel does not support {kind} links (module {kind} not available)"),
            )
            .with_details(format!("creating {kind} link {}: {}", new.name, e.text))
        } else {
            failed(format_args!("creating {kind} link {} on master index {}", new.name, new.master), &e)
        }
    })
}

fn del<S: Namespaces>(sys: &S, env: &Env, conf: &LinkConf, stdin: &[u8]) -> Result<(), CniError> {
    let mut errors = ErrorList::new();
    if let Some(ipam) = &conf.ipam_type {
        errors.check(exec::run(ipam, &Call::from_env(env, Command::Del), stdin));
    }
    let pod = Path::new(&env.netns);
    // No namespace (given or left): nothing of ours can be in it.
    if !env.netns.is_empty() && sys.exists(pod) {
        let ifname = env.ifname.as_str();
        let kind = conf.kind.kind();
        let removed = sys.run(Some(pod), |nl| async move {
            let Some(link) =
                nl.link_by_name(ifname).await.map_err(|e| failed(format_args!("looking up {ifname}"), &e))?
            else {
                return Ok(());
            };
            // Only a link this plugin could have made: another plugin's interface of the same
            // name is not ours to remove.
            if link.kind != kind_name(kind) {
                return Ok(());
            }
            nl.delete(link.index).await.map_err(|e| failed(format_args!("removing link {ifname}"), &e))
        });
        errors.check(removed);
    }
    errors.into_result("; ")
}

fn mismatch(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::CHECK_MISMATCH, msg)
}

fn check<S: Namespaces>(sys: &S, env: &Env, conf: &LinkConf, stdin: &[u8]) -> Result<(), CniError> {
    let kind = conf.kind.kind();
    if let Some(ipam) = &conf.ipam_type {
        exec::run(ipam, &Call::from_env(env, Command::Check), stdin)?;
    }
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(ErrorCode::INVALID_CONFIG, "CHECK needs prevResult in the configuration")
    })?;
    let prev = CniResult::parse(prev).map_err(|e| CniError::new(e.code, format!("prevResult: {}", e.msg)))?;
    let ifname = env.ifname.as_str();
    let netns = env.netns.as_str();
    let (index, iface) = prev
        .interfaces
        .iter()
        .enumerate()
        .find(|(_, i)| i.name == ifname && i.sandbox == netns)
        .ok_or_else(|| mismatch(format!("prevResult has no interface {ifname} in sandbox {netns}")))?;
    let pod = Path::new(netns);
    let master =
        sys.run(conf.link_in_container.then_some(pod), |nl| async move { find_master(&nl, conf).await })?;
    sys.run(Some(pod), |nl| {
        let prev = &prev;
        let master = &master;
        async move {
            let link = nl
                .link_by_name(ifname)
                .await
                .map_err(|e| failed(format_args!("looking up {ifname}"), &e))?
                .ok_or_else(|| mismatch(format!("interface {ifname} is missing in {netns}")))?;
            let want = kind_name(kind);
            if link.kind != want {
                let is = if link.kind.is_empty() { "a device" } else { link.kind.as_str() };
                return Err(mismatch(format!("interface {ifname} is {is}, not {want}")));
            }
            if link.kind_data != Some(conf.kind) {
                let is = link.kind_data.map_or_else(|| "unknown".to_string(), |m| m.to_string());
                return Err(mismatch(format!(
                    "interface {ifname} has {kind} mode {is}, the config says {}",
                    conf.kind
                )));
            }
            if link.parent != Some(master.index) {
                return Err(mismatch(format!(
                    "interface {ifname} is not on master {:?} (its parent is ifindex {}, the master's is {})",
                    master.name,
                    link.parent.map_or_else(|| "none".to_string(), |p| p.to_string()),
                    master.index
                )));
            }
            if !iface.mac.is_empty() && !iface.mac.eq_ignore_ascii_case(&link.mac_string()) {
                return Err(mismatch(format!(
                    "interface {ifname} has MAC {}, prevResult says {}",
                    link.mac_string(),
                    iface.mac
                )));
            }
            let have = nl
                .addresses(link.index)
                .await
                .map_err(|e| failed(format_args!("listing addresses of {ifname}"), &e))?;
            for ip in prev.ips.iter().filter(|ip| ip.interface.is_none_or(|i| i == index)) {
                if !have.contains(&ip.address) {
                    return Err(mismatch(format!("address {} of prevResult is not on {ifname}", ip.address)));
                }
            }
            for r in &prev.routes {
                if !nl.has_route(link.index, r).await.map_err(|e| failed("listing routes", &e))? {
                    return Err(mismatch(format!(
                        "route {} of prevResult is not in {netns} via {ifname}",
                        r.dst
                    )));
                }
            }
            Ok(())
        }
    })
}

#[cfg(test)]
mod tests {
    use cni::LATEST_VERSION;
    use serde_json::Value;

    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Env, CniError> {
        Env::from_env(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()))
    }

    fn run(kind: Kind, env: &Env, stdin: &[u8]) -> Result<Option<Value>, Failure> {
        cni::run(&LinkPlugin(kind), env, stdin)
    }

    #[test]
    fn environment_is_checked() {
        let base = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "cid"),
            ("CNI_NETNS", "/var/run/netns/p"),
            ("CNI_PATH", "/opt/cni/bin::/usr/lib/cni"),
            ("CNI_ARGS", "IgnoreUnknown=1;MAC=02:00:00:00:00:01"),
        ];
        let mut long = base.to_vec();
        long.push(("CNI_IFNAME", "net1-far-too-long"));
        let f = run(Kind::Macvlan, &env(&long).expect("env"), b"{}").expect_err("long ifname");
        assert_eq!(
            (f.error.code, f.error.msg.as_str(), f.version),
            (
                ErrorCode::INVALID_ENV,
                "CNI_IFNAME \"net1-far-too-long\" is not an interface name (1 to 15 characters)",
                LATEST_VERSION.to_string()
            )
        );
        let mut bad_args: Vec<_> = base.iter().filter(|(k, _)| *k != "CNI_ARGS").copied().collect();
        bad_args.extend([("CNI_IFNAME", "net1"), ("CNI_ARGS", "MAC")]);
        let f = run(Kind::Macvlan, &env(&bad_args).expect("env"), b"{}").expect_err("bad CNI_ARGS");
        assert_eq!(f.error.msg, "CNI_ARGS entry \"MAC\" is not KEY=VALUE");
        let err = env(&base).expect_err("no ifname");
        assert_eq!(err.msg, "CNI_IFNAME is required for ADD but not set");
    }

    #[test]
    fn version_is_answered_without_a_config() {
        let e = env(&[("CNI_COMMAND", "VERSION")]).expect("env");
        let v = run(Kind::Macvlan, &e, br#"{"cniVersion":"0.4.0"}"#).expect("version");
        assert_eq!(v.and_then(|v| v.get("cniVersion").cloned()), Some(Value::String("0.4.0".into())));
        let v = run(Kind::Ipvlan, &e, b"").expect("version").expect("answer");
        assert_eq!(v["cniVersion"], LATEST_VERSION.to_string());
    }

    #[test]
    fn config_errors_come_before_the_system_is_touched() {
        // No namespace, no master, no ipam plugin exist: the config's error comes first.
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "cid"),
            ("CNI_NETNS", "/nonexistent/netns"),
            ("CNI_IFNAME", "net1"),
            ("CNI_PATH", "/nonexistent"),
        ])
        .expect("env");
        let f = run(Kind::Macvlan, &e, br#"{"cniVersion":"1.0.0","master":"eth9","mode":"fast"}"#)
            .expect_err("bad mode");
        assert_eq!((f.error.code, f.version), (ErrorCode::INVALID_CONFIG, LATEST_VERSION.to_string()));
        assert_eq!(
            f.error.msg,
            "mode \"fast\" is not one of the macvlan modes bridge, private, vepa, passthru"
        );
        let f = run(Kind::Macvlan, &e, br#"{"cniVersion":"1.0.0"}"#).expect_err("no netns");
        assert_eq!((f.error.code, f.version.as_str()), (ErrorCode::INVALID_ENV, "1.0.0"));
        assert!(
            f.error.msg.starts_with("CNI_NETNS /nonexistent/netns: cannot open the network namespace"),
            "{}",
            f.error
        );
        let f = run(
            Kind::Macvlan,
            &env(&[
                ("CNI_COMMAND", "CHECK"),
                ("CNI_CONTAINERID", "cid"),
                ("CNI_NETNS", "/nonexistent/netns"),
                ("CNI_IFNAME", "net1"),
                ("CNI_PATH", "/nonexistent"),
            ])
            .expect("env"),
            br#"{"cniVersion":"0.3.1"}"#,
        )
        .expect_err("old CHECK");
        assert_eq!(f.error.msg, "CHECK needs cniVersion 0.4.0 or later, the config has 0.3.1");
    }

    #[test]
    fn temporary_names_are_valid_and_differ() {
        let (a, b) = (temp_name(), temp_name());
        assert!(is_ifname(&a) && a.starts_with("cni") && a.len() == 11, "{a}");
        assert_ne!(a, b);
    }
}

/// The drivers against [`fake::FakeNamespaces`]: no root, no kernel modules, every request
/// and every failure under the test's control. The ipam plugin is a shell script that
/// records its commands.
#[cfg(test)]
mod driver_tests {
    use std::os::unix::fs::PermissionsExt as _;
    use std::path::PathBuf;

    use cni::{CniArgs, Version};
    use ipnetwork::IpNetwork;
    use serde_json::{Value, json};

    use super::config::{KindData, MacvlanMode};
    use super::fake::FakeNamespaces;
    use super::*;

    const POD: &str = "/run/netns/pod";
    const ENETUNREACH: i32 = 101;
    const EBUSY: i32 = 16;

    /// The node with master `eth1` (MTU 1500, index 1), the pod's empty namespace, and a
    /// directory with the ipam plugins.
    fn rig() -> (FakeNamespaces, tempfile::TempDir) {
        let sys = FakeNamespaces::new();
        sys.add_device(None, "eth1", 1500);
        sys.add_netns(POD);
        let dir = tempfile::tempdir().expect("tempdir");
        let script = |name: &str, body: &str| {
            let p = dir.path().join(name);
            let text = format!(
                "#!/bin/sh\ncat > /dev/null\necho \"$CNI_COMMAND\" >> \"$(dirname \"$0\")/calls\"\n{body}\n"
            );
            std::fs::write(&p, text).expect("write script");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        };
        script(
            "fake-ipam",
            r#"[ "$CNI_COMMAND" = ADD ] && echo '{"cniVersion":"1.0.0","ips":[{"address":"198.18.0.5/24","gateway":"198.18.0.1"}],"routes":[{"dst":"10.0.0.0/8"}]}'; exit 0"#,
        );
        script("refusing-ipam", r#"echo '{"cniVersion":"1.0.0","code":11,"msg":"server away"}'; exit 1"#);
        (sys, dir)
    }

    fn calls(dir: &tempfile::TempDir) -> String {
        std::fs::read_to_string(dir.path().join("calls")).unwrap_or_default()
    }

    fn env(command: Command, dir: &tempfile::TempDir) -> Env {
        Env {
            command,
            container_id: "cid".into(),
            netns: POD.into(),
            ifname: "net1".into(),
            args: String::new(),
            path: vec![PathBuf::from(dir.path())],
        }
    }

    fn conf(kind: Kind, stdin: &Value) -> (LinkConf, Vec<u8>) {
        let bytes = serde_json::to_vec(stdin).expect("JSON");
        (LinkConf::parse(kind, &bytes, &CniArgs::default()).expect("config"), bytes)
    }

    fn macvlan() -> Value {
        json!({"cniVersion": "1.0.0", "name": "n", "master": "eth1", "mode": "vepa", "mtu": 1400,
            "ipam": {"type": "fake-ipam"}})
    }

    #[test]
    fn add_makes_the_link_in_the_pod_then_check_and_del_find_it() {
        let (sys, dir) = rig();
        let (c, stdin) = conf(Kind::Macvlan, &macvlan());
        let r = add(&sys, &env(Command::Add, &dir), &c, &stdin).expect("add");
        let rendered = r.render(Version::new(1, 0, 0));
        assert_eq!(
            rendered,
            json!({"cniVersion": "1.0.0",
                "interfaces": [{"name": "net1", "mac": "02:bb:00:00:00:02", "sandbox": POD}],
                "ips": [{"address": "198.18.0.5/24", "gateway": "198.18.0.1", "interface": 0}],
                "routes": [{"dst": "10.0.0.0/8"}],
                "dns": {}})
        );
        let pod = sys.links(Some(POD));
        assert_eq!(pod.len(), 1, "{pod:?}");
        let l = &pod[0];
        assert_eq!(
            (l.link.name.as_str(), l.link.kind.as_str(), l.link.kind_data, l.link.parent, l.link.mtu),
            ("net1", "macvlan", Some(KindData::Macvlan(MacvlanMode::Vepa)), Some(1), 1400)
        );
        assert!(l.up && l.announced, "{l:?}");
        assert_eq!(l.addresses, vec!["198.18.0.5/24".parse::<IpNetwork>().expect("cidr")]);
        assert_eq!(
            l.routes,
            vec![("10.0.0.0/8".parse().expect("cidr"), 254, Some("198.18.0.1".parse().expect("ip")))]
        );
        assert_eq!(sys.links(None).len(), 1, "the node keeps only its master");
        assert_eq!(calls(&dir), "ADD\n");

        let mut with_prev = macvlan();
        with_prev["prevResult"] = rendered;
        let (c, stdin) = conf(Kind::Macvlan, &with_prev);
        check(&sys, &env(Command::Check, &dir), &c, &stdin).expect("check");
        del(&sys, &env(Command::Del, &dir), &c, &stdin).expect("del");
        assert!(sys.links(Some(POD)).is_empty());
        // Idempotent: the link is gone, the ipam plugin is asked again.
        del(&sys, &env(Command::Del, &dir), &c, &stdin).expect("del again");
        assert_eq!(calls(&dir), "ADD\nCHECK\nDEL\nDEL\n");
    }

    #[test]
    fn a_failure_midway_removes_the_link_and_releases_the_lease() {
        let (sys, dir) = rig();
        sys.fail("add_route", ENETUNREACH);
        let (c, stdin) = conf(Kind::Macvlan, &macvlan());
        let e = add(&sys, &env(Command::Add, &dir), &c, &stdin).expect_err("no route");
        assert_eq!(
            (e.code, e.msg.as_str()),
            (
                ErrorCode::NETLINK_FAILED,
                "adding route 10.0.0.0/8 via 198.18.0.1 dev net1: Network is unreachable (os error 101)"
            )
        );
        assert!(sys.links(Some(POD)).is_empty());
        assert_eq!(sys.links(None).len(), 1);
        assert_eq!(calls(&dir), "ADD\nDEL\n");
    }

    #[test]
    fn nothing_is_touched_when_the_pod_or_the_master_is_wrong() {
        let (sys, dir) = rig();
        let add_err = |stdin: Value, kind: Kind| {
            let (c, bytes) = conf(kind, &stdin);
            add(&sys, &env(Command::Add, &dir), &c, &bytes).expect_err("refused")
        };
        let mut m = macvlan();
        m["master"] = json!("eth9");
        let e = add_err(m, Kind::Macvlan);
        assert_eq!(
            (e.code, e.msg.as_str()),
            (ErrorCode::INVALID_CONFIG, "master \"eth9\" not found in the node's network namespace")
        );
        let mut m = macvlan();
        m["mtu"] = json!(9000);
        assert_eq!(add_err(m, Kind::Macvlan).msg, "mtu 9000 is larger than the MTU 1500 of master \"eth1\"");
        let mut m = macvlan();
        m.as_object_mut().expect("object").remove("master");
        assert_eq!(
            add_err(m, Kind::Macvlan).msg,
            "master is not set and the node's network namespace has no default route to take it from"
        );
        sys.lacks(Kind::Ipvlan);
        let e = add_err(
            json!({"cniVersion": "1.0.0", "master": "eth1", "ipam": {"type": "fake-ipam"}}),
            Kind::Ipvlan,
        );
        assert_eq!(
            (e.code, e.msg.as_str()),
            (
                ErrorCode::LINK_KIND_UNSUPPORTED,
                "this kernel does not support ipvlan links (module ipvlan not available)"
            )
        );
        sys.add_device(Some(POD), "net1", 1500);
        let e = add_err(macvlan(), Kind::Macvlan);
        assert_eq!(
            (e.code, e.msg.as_str()),
            (
                ErrorCode::INVALID_ENV,
                "CNI_IFNAME net1 already exists in the pod's network namespace /run/netns/pod"
            )
        );
        assert_eq!(calls(&dir), "", "the ipam plugin was never asked");
        assert_eq!(sys.links(None).len(), 1);
        assert_eq!(sys.links(Some(POD)).len(), 1);
    }

    #[test]
    fn the_default_route_names_the_master() {
        let (sys, dir) = rig();
        sys.set_default_route(None, "eth1");
        let mut m = json!({"cniVersion": "1.0.0", "mode": "l3", "ipam": {}});
        let (c, stdin) = conf(Kind::Ipvlan, &m);
        let r = add(&sys, &env(Command::Add, &dir), &c, &stdin).expect("add");
        assert_eq!(r.interfaces[0].mac, "02:aa:00:00:00:01", "an ipvlan link has the master's MAC");
        assert_eq!(sys.links(Some(POD))[0].link.parent, Some(1));
        m["prevResult"] = r.render(Version::new(1, 0, 0));
        let (c, stdin) = conf(Kind::Ipvlan, &m);
        check(&sys, &env(Command::Check, &dir), &c, &stdin).expect("check");
        assert_eq!(calls(&dir), "", "no ipam");
    }

    #[test]
    fn check_names_each_difference() {
        let (sys, dir) = rig();
        let (c, stdin) = conf(Kind::Macvlan, &macvlan());
        let r = add(&sys, &env(Command::Add, &dir), &c, &stdin).expect("add");
        let mut with_prev = macvlan();
        with_prev["prevResult"] = r.render(Version::new(1, 0, 0));
        let (c, stdin) = conf(Kind::Macvlan, &with_prev);
        let check_err = || check(&sys, &env(Command::Check, &dir), &c, &stdin).expect_err("differs");
        sys.edit(Some(POD), "net1", |l| l.routes.clear());
        let e = check_err();
        assert_eq!(
            (e.code, e.msg.as_str()),
            (ErrorCode::CHECK_MISMATCH, "route 10.0.0.0/8 of prevResult is not in /run/netns/pod via net1")
        );
        sys.edit(Some(POD), "net1", |l| l.addresses.clear());
        assert_eq!(check_err().msg, "address 198.18.0.5/24 of prevResult is not on net1");
        sys.edit(Some(POD), "net1", |l| l.link.mac = vec![2, 0, 0, 0, 0, 9]);
        assert_eq!(
            check_err().msg,
            "interface net1 has MAC 02:00:00:00:00:09, prevResult says 02:bb:00:00:00:02"
        );
        sys.edit(Some(POD), "net1", |l| l.link.parent = Some(7));
        assert_eq!(
            check_err().msg,
            "interface net1 is not on master \"eth1\" (its parent is ifindex 7, the master's is 1)"
        );
        sys.edit(Some(POD), "net1", |l| l.link.kind_data = Some(KindData::Macvlan(MacvlanMode::Bridge)));
        assert_eq!(check_err().msg, "interface net1 has macvlan mode bridge, the config says vepa");
        sys.edit(Some(POD), "net1", |l| l.link.kind = "veth".into());
        assert_eq!(check_err().msg, "interface net1 is veth, not macvlan");
        sys.edit(Some(POD), "net1", |l| l.link.name = "other".into());
        assert_eq!(check_err().msg, "interface net1 is missing in /run/netns/pod");
    }

    #[test]
    fn del_leaves_other_links_and_reports_every_failure() {
        let (sys, dir) = rig();
        sys.add_device(Some(POD), "net1", 1500);
        let (c, stdin) = conf(Kind::Macvlan, &macvlan());
        del(&sys, &env(Command::Del, &dir), &c, &stdin).expect("not ours");
        assert_eq!(sys.links(Some(POD)).len(), 1, "a device that is not a macvlan link stays");

        let (sys, dir) = rig();
        let (c, stdin) = conf(Kind::Macvlan, &macvlan());
        add(&sys, &env(Command::Add, &dir), &c, &stdin).expect("add");
        sys.fail("delete", EBUSY);
        let mut m = macvlan();
        m["ipam"]["type"] = json!("refusing-ipam");
        let (c, stdin) = conf(Kind::Macvlan, &m);
        let e = del(&sys, &env(Command::Del, &dir), &c, &stdin).expect_err("both fail");
        assert_eq!(
            (e.code, e.msg.as_str()),
            (
                ErrorCode::TRY_AGAIN_LATER,
                "server away; removing link net1: Device or resource busy (os error 16)"
            )
        );
        // A namespace that is gone holds nothing of ours; the lease is still released.
        let mut gone = env(Command::Del, &dir);
        gone.netns = "/run/netns/gone".into();
        let (c, stdin) = conf(Kind::Macvlan, &macvlan());
        del(&sys, &gone, &c, &stdin).expect("gone");
        assert_eq!(calls(&dir), "ADD\nDEL\nDEL\n");
    }

    #[test]
    fn a_master_that_is_down_is_refused_before_anything_is_made() {
        let (sys, dir) = rig();
        sys.edit(None, "eth1", |l| l.up = false);
        let (c, stdin) = conf(
            Kind::Ipvlan,
            &json!({"cniVersion": "1.0.0", "master": "eth1", "ipam": {"type": "fake-ipam"}}),
        );
        let e = add(&sys, &env(Command::Add, &dir), &c, &stdin).expect_err("down");
        assert_eq!(
            (e.code, e.msg.as_str()),
            (
                ErrorCode::INVALID_CONFIG,
                "master \"eth1\" is down: a link on it would pass no traffic (ip link set eth1 up)"
            )
        );
        assert!(sys.links(Some(POD)).is_empty());
        assert_eq!(calls(&dir), "", "no lease asked for");
    }

    #[test]
    fn one_ipvlan_mode_per_master_wherever_its_links_are() {
        let (sys, dir) = rig();
        let other = "/run/netns/other";
        sys.add_netns(other);
        let l2 =
            json!({"cniVersion": "1.0.0", "master": "eth1", "mode": "l2", "ipam": {"type": "fake-ipam"}});
        let (c, stdin) = conf(Kind::Ipvlan, &l2);
        let mut in_other = env(Command::Add, &dir);
        in_other.netns = other.into();
        add(&sys, &in_other, &c, &stdin).expect("the first ipvlan link sets the mode");
        let mut l3 = l2.clone();
        l3["mode"] = json!("l3");
        let (c3, stdin3) = conf(Kind::Ipvlan, &l3);
        let e = add(&sys, &env(Command::Add, &dir), &c3, &stdin3).expect_err("another mode");
        assert_eq!(
            (e.code, e.msg.as_str()),
            (
                ErrorCode::INVALID_CONFIG,
                "master \"eth1\" already has ipvlan links in mode l2 (net1 in /run/netns/other): the kernel keeps one mode per master and would switch them all to l3"
            )
        );
        assert!(sys.links(Some(POD)).is_empty(), "nothing made");
        // The same mode is welcome.
        add(&sys, &env(Command::Add, &dir), &c, &stdin).expect("the same mode");
        assert_eq!(calls(&dir), "ADD\nADD\n", "no lease for the refused one");
        // A link still in the node's namespace counts too; another master does not.
        let (sys, dir) = rig();
        sys.add_device(None, "eth2", 1500);
        sys.run(None, |nl| async move {
            let new = NewLink {
                name: "iv0",
                master: 1,
                kind: KindData::Ipvlan(config::IpvlanMode::L3s),
                mtu: 0,
                mac: None,
                into: None,
            };
            create(&nl, &new).await
        })
        .expect("a node-side ipvlan link");
        let e = add(&sys, &env(Command::Add, &dir), &c, &stdin).expect_err("l3s on eth1");
        assert_eq!(
            e.msg,
            "master \"eth1\" already has ipvlan links in mode l3s (iv0 in the node's namespace): the kernel keeps one mode per master and would switch them all to l2"
        );
        let mut on_eth2 = l2.clone();
        on_eth2["master"] = json!("eth2");
        let (c2, stdin2) = conf(Kind::Ipvlan, &on_eth2);
        add(&sys, &env(Command::Add, &dir), &c2, &stdin2).expect("eth2 has no ipvlan links");
    }
}
