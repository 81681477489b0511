//! Results of every version from 0.3.0 to 1.1.0, and the `routes` and `dns` of an ipam
//! config that become part of one.

use std::fmt;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde_json::{Value, json};

use crate::error::{CniError, ErrorCode};
use crate::version::{LATEST_VERSION, Version, supported_list};

/// One address of an IPAM result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: IpAddr,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
}

/// A route of an IPAM result (`routes` of the ipam config).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

/// A CNI result, typed: what a plugin prints after ADD and finds again as `prevResult`.
///
/// [`CniResult::parse`] reads a result of any version from 0.3.0 to 1.1.0 (0.3.x and 0.4.0
/// carry `ips[].version`, which is implied by the address and not kept); [`CniResult::render`]
/// writes it in the shape of any of those versions, as libcni does: empty lists and strings
/// are left out, `dns` is written when present (even empty, as the reference plugins write
/// `"dns": {}`), and the 1.1.0 fields (interface `mtu`/`socketPath`/`pciID`, route `mtu`,
/// `advmss`, `priority`, `table`, `scope`) only in 1.1.0 and later.
///
/// It deserializes through [`CniResult::parse`], so a result read with serde gets the same
/// checks and the same error text.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "Value")]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpResult>,
    pub routes: Vec<ResultRoute>,
    /// `None`: no `dns` key at all.
    pub dns: Option<Dns>,
}

/// An interface of a result. Empty strings are absent keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    /// 1.1.0 and later.
    pub mtu: Option<u32>,
    /// The network namespace path; empty for an interface on the host.
    pub sandbox: String,
    /// 1.1.0 and later.
    pub socket_path: String,
    /// 1.1.0 and later.
    pub pci_id: String,
}

/// An address of a result: the address with its prefix length, as `10.1.2.3/24`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpResult {
    pub address: IpNetwork,
    pub gateway: Option<IpAddr>,
    /// Index into [`CniResult::interfaces`] of the interface that has it.
    pub interface: Option<usize>,
}

/// A route of a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultRoute {
    pub dst: IpNetwork,
    pub gw: Option<IpAddr>,
    /// 1.1.0 and later, as are the fields below.
    pub mtu: Option<u32>,
    pub advmss: Option<u32>,
    pub priority: Option<u32>,
    pub table: Option<u32>,
    pub scope: Option<u32>,
}

impl ResultRoute {
    /// A route to `dst`, via `gw` if given.
    pub fn new(dst: IpNetwork, gw: Option<IpAddr>) -> ResultRoute {
        ResultRoute { dst, gw, mtu: None, advmss: None, priority: None, table: None, scope: None }
    }
}

/// The `dns` of a result or of a network config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dns {
    pub nameservers: Vec<String>,
    pub domain: String,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

/// Decode error (code 6) naming `field` and what was wrong.
fn bad(field: &str, what: impl fmt::Display) -> CniError {
    CniError::new(ErrorCode::DECODE, format!("{field} {what}"))
}

fn opt_str<'a>(v: &'a Value, key: &str, field: &str) -> Result<&'a str, CniError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(""),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(bad(&format!("{field}.{key}"), format_args!("{other} is not a string"))),
    }
}

fn opt_u32(v: &Value, key: &str, field: &str) -> Result<Option<u32>, CniError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()).map(Some).ok_or_else(|| {
            bad(&format!("{field}.{key}"), format_args!("{n} is not a number from 0 to 4294967295"))
        }),
    }
}

fn opt_ip(v: &Value, key: &str, field: &str) -> Result<Option<IpAddr>, CniError> {
    let s = opt_str(v, key, field)?;
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| bad(&format!("{field}.{key}"), format_args!("{s:?} is not an IP address")))
}

/// Parses `a.b.c.d/n` or `x::y/n`; the prefix is required.
pub fn parse_cidr(s: &str, field: &str) -> Result<IpNetwork, CniError> {
    match s.split_once('/') {
        Some((ip, len)) if !ip.is_empty() && !len.is_empty() => s.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| bad(field, format_args!("{s:?} is not an address with a prefix length (10.1.2.3/24)")))
}

fn list<'a>(v: &'a Value, key: &str, field: &str) -> Result<&'a [Value], CniError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(bad(&format!("{field}{key}"), format_args!("{other} is not a list"))),
    }
}

fn strings(v: &Value, key: &str, field: &str) -> Result<Vec<String>, CniError> {
    list(v, key, &format!("{field}."))?
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.as_str()
                .map(str::to_string)
                .ok_or_else(|| bad(&format!("{field}.{key}[{i}]"), format_args!("{s} is not a string")))
        })
        .collect()
}

impl Dns {
    /// Reads a `dns` object (`nameservers`, `domain`, `search`, `options`); other keys are
    /// ignored as libcni does. `field` names it in errors.
    pub fn from_json(v: &Value, field: &str) -> Result<Dns, CniError> {
        if !v.is_object() {
            return Err(bad(field, format_args!("{v} is not an object")));
        }
        Ok(Dns {
            nameservers: strings(v, "nameservers", field)?,
            domain: opt_str(v, "domain", field)?.to_string(),
            search: strings(v, "search", field)?,
            options: strings(v, "options", field)?,
        })
    }

    /// The JSON object, without empty keys.
    pub fn to_json(&self) -> Value {
        let mut out = serde_json::Map::new();
        if !self.nameservers.is_empty() {
            out.insert("nameservers".into(), json!(self.nameservers));
        }
        if !self.domain.is_empty() {
            out.insert("domain".into(), json!(self.domain));
        }
        if !self.search.is_empty() {
            out.insert("search".into(), json!(self.search));
        }
        if !self.options.is_empty() {
            out.insert("options".into(), json!(self.options));
        }
        Value::Object(out)
    }
}

impl ResultRoute {
    /// Reads one route object; `field` names it in errors (`routes[0]`).
    pub fn from_json(v: &Value, field: &str) -> Result<ResultRoute, CniError> {
        let dst = opt_str(v, "dst", field)?;
        if dst.is_empty() {
            return Err(bad(&format!("{field}.dst"), "is missing"));
        }
        Ok(ResultRoute {
            dst: parse_cidr(dst, &format!("{field}.dst"))?,
            gw: opt_ip(v, "gw", field)?,
            mtu: opt_u32(v, "mtu", field)?,
            advmss: opt_u32(v, "advmss", field)?,
            priority: opt_u32(v, "priority", field)?,
            table: opt_u32(v, "table", field)?,
            scope: opt_u32(v, "scope", field)?,
        })
    }

    /// Converts the `routes` of an ipam config; `field` names the list in errors.
    pub fn from_config(routes: &[Route], field: &str) -> Result<Vec<ResultRoute>, CniError> {
        routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let at = format!("{field}[{i}]");
                let gw = match r.gw.as_deref() {
                    None | Some("") => None,
                    Some(g) => Some(g.parse().map_err(|_| {
                        CniError::new(
                            ErrorCode::INVALID_CONFIG,
                            format!("{at}.gw {g:?} is not an IP address"),
                        )
                    })?),
                };
                let dst = parse_cidr(&r.dst, &format!("{at}.dst"))
                    .map_err(|e| CniError::new(ErrorCode::INVALID_CONFIG, e.msg))?;
                Ok(ResultRoute::new(dst, gw))
            })
            .collect()
    }

    fn to_json(&self, version: Version) -> Value {
        let mut v = json!({ "dst": self.dst.to_string() });
        if let Some(gw) = self.gw {
            v["gw"] = json!(gw.to_string());
        }
        if version.has_1_1_fields() {
            for (key, val) in [
                ("mtu", self.mtu),
                ("advmss", self.advmss),
                ("priority", self.priority),
                ("table", self.table),
                ("scope", self.scope),
            ] {
                if let Some(n) = val {
                    v[key] = json!(n);
                }
            }
        }
        v
    }
}

impl TryFrom<Value> for CniResult {
    type Error = CniError;

    fn try_from(v: Value) -> Result<CniResult, CniError> {
        CniResult::parse(&v)
    }
}

impl CniResult {
    /// Reads a result of any supported version (its own `cniVersion` says which; a result
    /// without one is read by its keys). Errors are code 6 and name the field.
    pub fn parse(v: &Value) -> Result<CniResult, CniError> {
        if !v.is_object() {
            return Err(bad("result", format_args!("{v} is not an object")));
        }
        if let Some(ver) = v.get("cniVersion").and_then(Value::as_str) {
            let known =
                Version::parse(ver).is_some_and(|p| p >= Version::new(0, 3, 0) && p <= LATEST_VERSION);
            if !known {
                return Err(CniError::new(
                    ErrorCode::INCOMPATIBLE_VERSION,
                    format!("result cniVersion {ver:?} is not one of {}", supported_list()),
                ));
            }
        }
        let interfaces = list(v, "interfaces", "")?
            .iter()
            .enumerate()
            .map(|(i, it)| {
                let f = format!("interfaces[{i}]");
                let name = opt_str(it, "name", &f)?;
                if name.is_empty() {
                    return Err(bad(&format!("{f}.name"), "is missing"));
                }
                Ok(Interface {
                    name: name.to_string(),
                    mac: opt_str(it, "mac", &f)?.to_string(),
                    mtu: opt_u32(it, "mtu", &f)?,
                    sandbox: opt_str(it, "sandbox", &f)?.to_string(),
                    socket_path: opt_str(it, "socketPath", &f)?.to_string(),
                    pci_id: opt_str(it, "pciID", &f)?.to_string(),
                })
            })
            .collect::<Result<Vec<_>, CniError>>()?;
        let ips = list(v, "ips", "")?
            .iter()
            .enumerate()
            .map(|(i, ip)| {
                let f = format!("ips[{i}]");
                let address = parse_cidr(opt_str(ip, "address", &f)?, &format!("{f}.address"))?;
                let interface = match ip.get("interface") {
                    None | Some(Value::Null) => None,
                    Some(n) => {
                        let idx = n
                            .as_u64()
                            .and_then(|n| usize::try_from(n).ok())
                            .filter(|&n| n < interfaces.len());
                        Some(idx.ok_or_else(|| {
                            bad(
                                &format!("{f}.interface"),
                                format_args!("{n} is not an index into the {} interfaces", interfaces.len()),
                            )
                        })?)
                    }
                };
                Ok(IpResult { address, gateway: opt_ip(ip, "gateway", &f)?, interface })
            })
            .collect::<Result<Vec<_>, CniError>>()?;
        let routes = list(v, "routes", "")?
            .iter()
            .enumerate()
            .map(|(i, r)| ResultRoute::from_json(r, &format!("routes[{i}]")))
            .collect::<Result<Vec<_>, CniError>>()?;
        let dns = match v.get("dns") {
            None | Some(Value::Null) => None,
            Some(d) => Some(Dns::from_json(d, "dns")?),
        };
        Ok(CniResult { interfaces, ips, routes, dns })
    }

    /// The result in the shape of `version`.
    pub fn render(&self, version: Version) -> Value {
        let new_fields = version.has_1_1_fields();
        let mut out = json!({ "cniVersion": version.to_string() });
        if !self.interfaces.is_empty() {
            let list: Vec<Value> = self
                .interfaces
                .iter()
                .map(|i| {
                    let mut v = json!({ "name": i.name });
                    if !i.mac.is_empty() {
                        v["mac"] = json!(i.mac);
                    }
                    if let (true, Some(mtu)) = (new_fields, i.mtu) {
                        v["mtu"] = json!(mtu);
                    }
                    if !i.sandbox.is_empty() {
                        v["sandbox"] = json!(i.sandbox);
                    }
                    if new_fields && !i.socket_path.is_empty() {
                        v["socketPath"] = json!(i.socket_path);
                    }
                    if new_fields && !i.pci_id.is_empty() {
                        v["pciID"] = json!(i.pci_id);
                    }
                    v
                })
                .collect();
            out["interfaces"] = Value::Array(list);
        }
        if !self.ips.is_empty() {
            let old = version.has_ip_version();
            let list: Vec<Value> = self
                .ips
                .iter()
                .map(|ip| {
                    let mut v = json!({ "address": ip.address.to_string() });
                    if let Some(i) = ip.interface {
                        v["interface"] = json!(i);
                    }
                    if let Some(gw) = ip.gateway {
                        v["gateway"] = json!(gw.to_string());
                    }
                    if old {
                        v["version"] = json!(if ip.address.is_ipv4() { "4" } else { "6" });
                    }
                    v
                })
                .collect();
            out["ips"] = Value::Array(list);
        }
        if !self.routes.is_empty() {
            out["routes"] = Value::Array(self.routes.iter().map(|r| r.to_json(version)).collect());
        }
        if let Some(dns) = &self.dns {
            out["dns"] = dns.to_json();
        }
        out
    }
}

/// The result of an IPAM plugin: addresses, and the ipam config's routes and dns. The ipam config's `routes` and `dns` are checked here (error 7
/// naming the bad one); [`check_ipam_extras`] checks them before anything is allocated.
pub fn ipam_result(ips: &[IpConfig], routes: &[Route], dns: Option<&Value>) -> Result<CniResult, CniError> {
    let (routes, dns) = check_ipam_extras(routes, dns)?;
    let ips = ips
        .iter()
        .map(|ip| {
            let address = IpNetwork::new(ip.address, ip.prefix_len).map_err(|_| {
                CniError::new(
                    ErrorCode::IO_FAILURE,
                    format!("prefix length {} is too long for {}", ip.prefix_len, ip.address),
                )
            })?;
            Ok(IpResult { address, gateway: ip.gateway, interface: None })
        })
        .collect::<Result<Vec<_>, CniError>>()?;
    Ok(CniResult { interfaces: Vec::new(), ips, routes, dns })
}

/// The ipam config's `routes` and `dns` as result parts; error 7 names the bad one.
pub fn check_ipam_extras(
    routes: &[Route],
    dns: Option<&Value>,
) -> Result<(Vec<ResultRoute>, Option<Dns>), CniError> {
    let routes = ResultRoute::from_config(routes, "ipam routes")?;
    let dns = dns
        .map(|d| Dns::from_json(d, "ipam dns").map_err(|e| CniError::new(ErrorCode::INVALID_CONFIG, e.msg)))
        .transpose()?;
    Ok((routes, dns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_take_the_shape_of_their_version() {
        let ips = [
            IpConfig { address: "10.56.0.1".parse().expect("ip"), prefix_len: 16, gateway: None },
            IpConfig {
                address: "fd00::2".parse().expect("ip"),
                prefix_len: 64,
                gateway: Some("fd00::1".parse().expect("ip")),
            },
        ];
        let routes = [Route { dst: "0.0.0.0/0".into(), gw: None }];
        assert_eq!(
            ipam_result(&ips, &routes, None).expect("result").render(Version::new(1, 0, 0)),
            json!({"cniVersion": "1.0.0", "ips": [
                {"address": "10.56.0.1/16"}, {"address": "fd00::2/64", "gateway": "fd00::1"}],
                "routes": [{"dst": "0.0.0.0/0"}]})
        );
        assert_eq!(
            ipam_result(&ips[..1], &[], Some(&json!({"nameservers": ["10.0.0.10"]})))
                .expect("result")
                .render(Version::new(0, 3, 1)),
            json!({"cniVersion": "0.3.1", "ips": [{"address": "10.56.0.1/16", "version": "4"}],
                "dns": {"nameservers": ["10.0.0.10"]}})
        );
    }

    #[test]
    fn ipam_routes_and_dns_are_checked() {
        let bad_dst = [Route { dst: "10.0.0.0".into(), gw: None }];
        let e = check_ipam_extras(&bad_dst, None).expect_err("no prefix");
        assert_eq!(e.code, ErrorCode::INVALID_CONFIG);
        assert_eq!(
            e.msg,
            "ipam routes[0].dst \"10.0.0.0\" is not an address with a prefix length (10.1.2.3/24)"
        );
        let bad_gw = [Route { dst: "10.0.0.0/8".into(), gw: Some("gw".into()) }];
        assert_eq!(
            check_ipam_extras(&bad_gw, None).expect_err("gw").msg,
            "ipam routes[0].gw \"gw\" is not an IP address"
        );
        let e = check_ipam_extras(&[], Some(&json!({"nameservers": "10.0.0.10"}))).expect_err("dns");
        assert_eq!(
            (e.code, e.msg.as_str()),
            (ErrorCode::INVALID_CONFIG, "ipam dns.nameservers \"10.0.0.10\" is not a list")
        );
    }

    /// What Debian's macvlan printed for one config in 1.0.0 and 0.4.0 (see
    /// tests/tests/delegate_netns.rs, which compares with the live plugin).
    fn macvlan_result_100() -> Value {
        json!({"cniVersion": "1.0.0",
            "interfaces": [{"name": "net1", "mac": "02:29:ce:c9:a7:2b", "sandbox": "/var/run/netns/p"}],
            "ips": [{"interface": 0, "address": "198.18.5.2/24", "gateway": "198.18.5.1"}],
            "routes": [{"dst": "10.0.0.0/8"}],
            "dns": {}})
    }

    #[test]
    fn results_parse_and_render_in_every_version() {
        let r = CniResult::parse(&macvlan_result_100()).expect("parse 1.0.0");
        assert_eq!(
            r,
            CniResult {
                interfaces: vec![Interface {
                    name: "net1".into(),
                    mac: "02:29:ce:c9:a7:2b".into(),
                    sandbox: "/var/run/netns/p".into(),
                    ..Interface::default()
                }],
                ips: vec![IpResult {
                    address: "198.18.5.2/24".parse().expect("cidr"),
                    gateway: Some("198.18.5.1".parse().expect("ip")),
                    interface: Some(0),
                }],
                routes: vec![ResultRoute::new("10.0.0.0/8".parse().expect("cidr"), None)],
                dns: Some(Dns::default()),
            }
        );
        assert_eq!(r.render(Version::new(1, 0, 0)), macvlan_result_100());
        assert_eq!(serde_json::from_value::<CniResult>(macvlan_result_100()).expect("serde"), r);
        let old = json!({"cniVersion": "0.4.0",
            "interfaces": [{"name": "net1", "mac": "02:29:ce:c9:a7:2b", "sandbox": "/var/run/netns/p"}],
            "ips": [{"version": "4", "interface": 0, "address": "198.18.5.2/24", "gateway": "198.18.5.1"}],
            "routes": [{"dst": "10.0.0.0/8"}],
            "dns": {}});
        assert_eq!(r.render(Version::new(0, 4, 0)), old);
        let mut v031 = old.clone();
        v031["cniVersion"] = json!("0.3.1");
        assert_eq!(r.render(Version::new(0, 3, 1)), v031);
        // Back from the old shapes: the same result.
        assert_eq!(CniResult::parse(&old).expect("parse 0.4.0"), r);
        assert_eq!(CniResult::parse(&v031).expect("parse 0.3.1"), r);
    }

    #[test]
    fn fields_of_1_1_0_appear_only_in_1_1_0() {
        let v110 = json!({"cniVersion": "1.1.0",
            "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:01", "mtu": 1400, "socketPath": "/run/vhu.sock",
                "pciID": "0000:00:1f.6"}, {"name": "net1", "sandbox": "/proc/7/ns/net"}],
            "ips": [{"address": "fd00::5/64", "interface": 1}, {"address": "10.1.0.5/16", "gateway": "10.1.0.1"}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1", "mtu": 1300, "advmss": 1200, "priority": 10,
                "table": 100, "scope": 0}, {"dst": "fd00::/8"}],
            "dns": {"nameservers": ["10.0.0.10"], "domain": "cluster.local", "search": ["svc.cluster.local"],
                "options": ["ndots:5"]}});
        let r = CniResult::parse(&v110).expect("parse 1.1.0");
        assert_eq!(r.interfaces[0].mtu, Some(1400));
        assert_eq!(r.interfaces[0].pci_id, "0000:00:1f.6");
        assert_eq!(r.routes[0].table, Some(100));
        assert_eq!(r.dns.as_ref().map(|d| d.domain.as_str()), Some("cluster.local"));
        assert_eq!(r.render(Version::new(1, 1, 0)), v110);
        assert_eq!(
            r.render(Version::new(1, 0, 0)),
            json!({"cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:01"}, {"name": "net1", "sandbox": "/proc/7/ns/net"}],
                "ips": [{"address": "fd00::5/64", "interface": 1}, {"address": "10.1.0.5/16", "gateway": "10.1.0.1"}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}, {"dst": "fd00::/8"}],
                "dns": {"nameservers": ["10.0.0.10"], "domain": "cluster.local", "search": ["svc.cluster.local"],
                    "options": ["ndots:5"]}})
        );
        assert_eq!(
            r.render(Version::new(0, 3, 0))["ips"],
            json!([{"address": "fd00::5/64", "interface": 1, "version": "6"},
                {"address": "10.1.0.5/16", "gateway": "10.1.0.1", "version": "4"}])
        );
        // An IPAM-only result: no interfaces, no dns.
        let ipam = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/16"}]});
        assert_eq!(CniResult::parse(&ipam).expect("ipam").render(Version::new(1, 0, 0)), ipam);
    }

    #[test]
    fn bad_results_name_the_field() {
        let msg = |v: Value| CniResult::parse(&v).expect_err("bad").msg;
        assert_eq!(
            msg(json!({"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5"}]})),
            "ips[0].address \"10.1.0.5\" is not an address with a prefix length (10.1.2.3/24)"
        );
        assert_eq!(
            msg(json!({"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/8", "interface": 2}]})),
            "ips[0].interface 2 is not an index into the 0 interfaces"
        );
        assert_eq!(
            msg(json!({"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/8", "gateway": "x"}]})),
            "ips[0].gateway \"x\" is not an IP address"
        );
        assert_eq!(
            msg(json!({"cniVersion": "1.0.0", "routes": [{"gw": "10.0.0.1"}]})),
            "routes[0].dst is missing"
        );
        assert_eq!(
            msg(json!({"cniVersion": "1.0.0", "interfaces": [{"mac": "x"}]})),
            "interfaces[0].name is missing"
        );
        assert_eq!(msg(json!({"cniVersion": "1.0.0", "ips": {}})), "ips {} is not a list");
        assert_eq!(msg(json!({"cniVersion": "1.0.0", "dns": []})), "dns [] is not an object");
        assert_eq!(msg(json!([])), "result [] is not an object");
        assert_eq!(
            serde_json::from_value::<CniResult>(json!({"routes": [{"gw": "10.0.0.1"}]}))
                .expect_err("serde")
                .to_string(),
            "CNI error 6: routes[0].dst is missing"
        );
        let e = CniResult::parse(&json!({"cniVersion": "0.2.0", "ip4": {}})).expect_err("0.2.0");
        assert_eq!(e.code, ErrorCode::INCOMPATIBLE_VERSION);
        assert_eq!(CniResult::parse(&json!({"ips": {}})).expect_err("decode").code, ErrorCode::DECODE);
    }
}
