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
//! Error codes: the spec's, and 120 (netlink), 121 (CHECK mismatch), 122 (link kind not in
//! this kernel), listed with every other one in [`cni::ErrorCode`].

pub mod config;
pub(crate) mod netlink;

use std::fmt;
use std::io::Read as _;
use std::os::fd::AsRawFd as _;
use std::path::Path;

use cni::{CniError, CniResult, Command, Env, ErrorCode, ErrorList, Failure, Interface, IpResult};

use self::config::{LinkConf, is_ifname};
use self::netlink::{Link, NewLink, Nl, failed, in_netns, kind_name};
use crate::exec::{self, Call};

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
        add(self.0, env, conf, stdin)
    }

    fn del(&self, env: &Env, conf: &LinkConf, stdin: &[u8]) -> Result<(), CniError> {
        del(self.0, env, conf, stdin)
    }

    fn check(&self, env: &Env, conf: &LinkConf, stdin: &[u8]) -> Result<(), CniError> {
        check(self.0, env, conf, stdin)
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
async fn find_master(nl: &Nl, conf: &LinkConf) -> Result<Link, CniError> {
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

fn add(kind: Kind, env: &Env, conf: &LinkConf, stdin: &[u8]) -> Result<CniResult, CniError> {
    let pod_path = Path::new(&env.netns);
    let pod = netlink::open_netns(pod_path)?;
    let ifname = env.ifname.as_str();
    // A taken name would fail the rename after the lease was taken, and releasing it then
    // would release the lease of whoever holds the name (a repeated ADD): refuse now.
    in_netns(Some(pod_path), |nl| async move {
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
    let netns_fd = (!conf.link_in_container).then(|| pod.as_raw_fd());
    let tmp_name = tmp.as_str();
    // Everything checked before the first change: the master exists and its MTU allows ours.
    in_netns(master_ns, |nl| async move {
        let master = find_master(&nl, conf).await?;
        if conf.mtu > master.mtu {
            return Err(CniError::new(
                ErrorCode::INVALID_CONFIG,
                format!("mtu {} is larger than the MTU {} of master {:?}", conf.mtu, master.mtu, master.name),
            ));
        }
        let new = NewLink {
            kind,
            name: tmp_name,
            master: master.index,
            mode: conf.mode,
            mtu: conf.mtu,
            mac: conf.mac.map(|m| m.0),
            netns_fd,
        };
        nl.create(&new).await
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
                cleanup.check(remove_temp(pod_path, &tmp));
                // The ipam plugin may have allocated before failing (a bad result, say).
                cleanup.check(exec::run(ipam, &Call::from_env(env, Command::Del), stdin));
                return Err(cleanup.after(e, "; "));
            }
        }
    }
    let configured = in_netns(Some(pod_path), |nl| {
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
fn remove_temp(pod: &Path, tmp: &str) -> Result<(), CniError> {
    in_netns(Some(pod), |nl| async move {
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
async fn configure(nl: &Nl, link: &Link, ifname: &str, result: &CniResult) -> Result<Link, CniError> {
    nl.rename(link.index, &link.name, ifname).await?;
    // As the reference plugins: announce the address on up and on change; best effort, a
    // namespace may have IPv6 disabled.
    let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{ifname}/arp_notify"), "1");
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{ifname}/ndisc_notify"), "1");
    if result.ips.iter().any(|ip| ip.address.is_ipv6()) {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"), "0");
    }
    for ip in &result.ips {
        nl.add_address(link.index, ifname, ip.address).await?;
    }
    nl.set_up(link.index, ifname).await?;
    let v4gw = result.ips.iter().find(|ip| ip.address.is_ipv4()).and_then(|ip| ip.gateway);
    let v6gw = result.ips.iter().find(|ip| ip.address.is_ipv6()).and_then(|ip| ip.gateway);
    for r in &result.routes {
        let gw = r.gw.or(if r.dst.is_ipv4() { v4gw } else { v6gw });
        nl.add_route(link.index, ifname, r, gw).await?;
    }
    nl.link_by_index(link.index)
        .await
        .map_err(|e| failed(format_args!("reading {ifname} back"), &e))?
        .ok_or_else(|| {
            CniError::new(ErrorCode::NETLINK_FAILED, format!("{ifname} vanished while it was configured"))
        })
}

fn del(kind: Kind, env: &Env, conf: &LinkConf, stdin: &[u8]) -> Result<(), CniError> {
    let mut errors = ErrorList::new();
    if let Some(ipam) = &conf.ipam_type {
        errors.check(exec::run(ipam, &Call::from_env(env, Command::Del), stdin));
    }
    let pod = Path::new(&env.netns);
    // No namespace (given or left): nothing of ours can be in it.
    if !env.netns.is_empty() && pod.exists() {
        let ifname = env.ifname.as_str();
        let removed = in_netns(Some(pod), |nl| async move {
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

fn check(kind: Kind, env: &Env, conf: &LinkConf, stdin: &[u8]) -> Result<(), CniError> {
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
        in_netns(conf.link_in_container.then_some(pod), |nl| async move { find_master(&nl, conf).await })?;
    in_netns(Some(pod), |nl| {
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
            if link.mode != Some(conf.mode) {
                let is = link.mode.map_or_else(|| "unknown".to_string(), |m| m.to_string());
                return Err(mismatch(format!(
                    "interface {ifname} has {kind} mode {is}, the config says {}",
                    conf.mode
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
