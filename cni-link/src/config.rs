//! The network configuration of a macvlan or ipvlan link plugin: the reference plugins' keys
//! (`master`, `mode`, `mtu`, `mac`, `linkInContainer`, `ipam`, `dns`), checked in full before
//! anything on the system is touched. Every error is code 7 (6 for JSON that is not JSON)
//! and names the field and the value.
//!
//! A requested MAC comes as the reference macvlan plugin reads it: `mac`, then `CNI_ARGS`
//! `MAC=`, then `runtimeConfig.mac` (Multus' `mac` capability). `args.cni.mac` is not read,
//! as the reference plugin does not read it either.

use std::fmt;

use cni::{CniArgs, CniError, Dns, ErrorCode, NetworkConfig};
use serde_json::{Map, Value};

use super::Kind;

/// The link kind with its mode: a mode of one kind can never be paired with the other kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KindData {
    /// macvlan `bridge` (the default), `private`, `vepa`, `passthru`.
    Macvlan(MacvlanMode),
    /// ipvlan `l2` (the default), `l3`, `l3s`.
    Ipvlan(IpvlanMode),
}

/// macvlan modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacvlanMode {
    Bridge,
    Private,
    Vepa,
    Passthru,
}

/// ipvlan modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpvlanMode {
    L2,
    L3,
    L3s,
}

impl KindData {
    /// The kind alone.
    pub fn kind(self) -> Kind {
        match self {
            KindData::Macvlan(_) => Kind::Macvlan,
            KindData::Ipvlan(_) => Kind::Ipvlan,
        }
    }

    /// The kind's default mode: macvlan `bridge`, ipvlan `l2`, as the reference plugins.
    pub fn default_for(kind: Kind) -> KindData {
        match kind {
            Kind::Macvlan => KindData::Macvlan(MacvlanMode::Bridge),
            Kind::Ipvlan => KindData::Ipvlan(IpvlanMode::L2),
        }
    }

    /// Parses the config's `mode` for `kind`.
    pub fn parse(kind: Kind, s: &str) -> Option<KindData> {
        Some(match (kind, s) {
            (Kind::Macvlan, "bridge") => KindData::Macvlan(MacvlanMode::Bridge),
            (Kind::Macvlan, "private") => KindData::Macvlan(MacvlanMode::Private),
            (Kind::Macvlan, "vepa") => KindData::Macvlan(MacvlanMode::Vepa),
            (Kind::Macvlan, "passthru") => KindData::Macvlan(MacvlanMode::Passthru),
            (Kind::Ipvlan, "l2") => KindData::Ipvlan(IpvlanMode::L2),
            (Kind::Ipvlan, "l3") => KindData::Ipvlan(IpvlanMode::L3),
            (Kind::Ipvlan, "l3s") => KindData::Ipvlan(IpvlanMode::L3s),
            _ => return None,
        })
    }

    /// The modes of `kind`, as the config spells them.
    pub fn names(kind: Kind) -> &'static [&'static str] {
        match kind {
            Kind::Macvlan => &["bridge", "private", "vepa", "passthru"],
            Kind::Ipvlan => &["l2", "l3", "l3s"],
        }
    }
}

impl fmt::Display for KindData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KindData::Macvlan(MacvlanMode::Bridge) => "bridge",
            KindData::Macvlan(MacvlanMode::Private) => "private",
            KindData::Macvlan(MacvlanMode::Vepa) => "vepa",
            KindData::Macvlan(MacvlanMode::Passthru) => "passthru",
            KindData::Ipvlan(IpvlanMode::L2) => "l2",
            KindData::Ipvlan(IpvlanMode::L3) => "l3",
            KindData::Ipvlan(IpvlanMode::L3s) => "l3s",
        })
    }
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Parses `aa:bb:cc:dd:ee:ff` (or with `-`); only a unicast, non-zero address, which is
    /// what the kernel accepts for a link.
    pub fn parse(s: &str) -> Option<Mac> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return None;
        }
        let mut mac = [0u8; 6];
        for (b, p) in mac.iter_mut().zip(&parts) {
            if p.len() != 2 {
                return None;
            }
            *b = u8::from_str_radix(p, 16).ok()?;
        }
        (mac[0] & 1 == 0 && mac != [0; 6]).then_some(Mac(mac))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

/// Smallest MTU the kernel takes for an Ethernet-like link.
pub const MIN_MTU: i64 = 68;
/// Largest MTU of a macvlan/ipvlan link.
pub const MAX_MTU: i64 = 65535;

/// The configuration of one call of the link plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkConf {
    pub cni_version: String,
    pub name: String,
    /// `master`; `None`: the interface of the default route.
    pub master: Option<String>,
    /// `mode`, of the binary's kind.
    pub kind: KindData,
    /// `mtu`; 0 leaves the kernel's choice (the master's MTU).
    pub mtu: u32,
    /// From `mac`, `CNI_ARGS` `MAC=` or `runtimeConfig.mac`, the last winning, as the
    /// reference macvlan plugin does.
    pub mac: Option<Mac>,
    /// `linkInContainer`: the master is in the pod's namespace.
    pub link_in_container: bool,
    /// `ipam.type`; `None` for a layer-2 only attachment (`"ipam": {}`).
    pub ipam_type: Option<String>,
    /// Top-level `dns`: copied into the result, as the reference plugins do.
    pub dns: Option<Dns>,
    /// `prevResult` (CHECK, DEL), as given.
    pub prev_result: Option<Value>,
}

impl NetworkConfig for LinkConf {
    fn cni_version(&self) -> &str {
        &self.cni_version
    }
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::INVALID_CONFIG, msg)
}

/// True when `s` can name a Linux network interface.
pub fn is_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

fn string<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(invalid(format!("{key} {other} is not a string"))),
    }
}

fn mac(s: &str, field: &str) -> Result<Mac, CniError> {
    Mac::parse(s).ok_or_else(|| {
        invalid(format!("{field} {s:?} is not a unicast MAC address (like 02:00:00:00:00:01)"))
    })
}

impl LinkConf {
    /// Parses and checks the configuration on stdin for `kind`; `args` is `CNI_ARGS`.
    pub fn parse(kind: Kind, stdin: &[u8], args: &CniArgs) -> Result<LinkConf, CniError> {
        let obj = &cni::config_object(stdin)?;
        let cni_version = string(obj, "cniVersion")?.unwrap_or("0.1.0").to_string();
        let name = string(obj, "name")?.unwrap_or_default().to_string();
        let master = match string(obj, "master")? {
            None | Some("") => None,
            Some(m) if is_ifname(m) => Some(m.to_string()),
            Some(m) => {
                return Err(invalid(format!(
                    "master {m:?} is not an interface name (1 to 15 characters, no '/', ':' or spaces)"
                )));
            }
        };
        let kind_data = match string(obj, "mode")? {
            None | Some("") => KindData::default_for(kind),
            Some(m) => KindData::parse(kind, m).ok_or_else(|| {
                invalid(format!(
                    "mode {m:?} is not one of the {kind} modes {}",
                    KindData::names(kind).join(", ")
                ))
            })?,
        };
        let mtu = match obj.get("mtu") {
            None | Some(Value::Null) => 0,
            Some(n) => {
                let Some(n) = n.as_i64() else {
                    return Err(invalid(format!("mtu {n} is not a whole number")));
                };
                if n != 0 && !(MIN_MTU..=MAX_MTU).contains(&n) {
                    return Err(invalid(format!(
                        "mtu {n} is out of range: 0 (the master's) or {MIN_MTU} to {MAX_MTU}"
                    )));
                }
                u32::try_from(n).unwrap_or(0)
            }
        };
        // The reference macvlan plugin: the config's `mac`, then CNI_ARGS MAC=, then
        // runtimeConfig.mac (Multus' `mac` capability), the last one set wins.
        let mut chosen = match string(obj, "mac")? {
            None | Some("") => None,
            Some(m) => Some(mac(m, "mac")?),
        };
        if !args.get("MAC").is_empty() {
            chosen = Some(mac(args.get("MAC"), "CNI_ARGS MAC")?);
        }
        let runtime = obj.get("runtimeConfig").and_then(Value::as_object);
        match runtime.map(|r| string(r, "mac")) {
            Some(Err(e)) => return Err(invalid(format!("runtimeConfig.{}", e.msg))),
            Some(Ok(Some(m))) if !m.is_empty() => chosen = Some(mac(m, "runtimeConfig.mac")?),
            _ => {}
        }
        if let (Kind::Ipvlan, Some(m)) = (kind, chosen) {
            return Err(invalid(format!(
                "mac {m} cannot be set: ipvlan links share the master's MAC address (use macvlan)"
            )));
        }
        let link_in_container = match obj.get("linkInContainer") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(invalid(format!("linkInContainer {other} is not true or false"))),
        };
        let ipam_type = match obj.get("ipam") {
            None | Some(Value::Null) => None,
            Some(Value::Object(ipam)) => {
                match string(ipam, "type").map_err(|e| invalid(format!("ipam.{}", e.msg)))? {
                    None | Some("") => None,
                    Some(t) => Some(t.to_string()),
                }
            }
            Some(other) => return Err(invalid(format!("ipam {other} is not an object"))),
        };
        let dns = match obj.get("dns") {
            None | Some(Value::Null) => None,
            Some(d) => Some(Dns::from_json(d, "dns").map_err(|e| invalid(e.msg))?),
        };
        let prev_result = obj.get("prevResult").cloned().filter(|p| !p.is_null());
        Ok(LinkConf {
            cni_version,
            name,
            master,
            kind: kind_data,
            mtu,
            mac: chosen,
            link_in_container,
            ipam_type,
            dns,
            prev_result,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(kind: Kind, conf: &str) -> Result<LinkConf, CniError> {
        LinkConf::parse(kind, conf.as_bytes(), &CniArgs::default())
    }

    fn err(kind: Kind, conf: &str) -> String {
        let e = parse(kind, conf).expect_err("must fail");
        assert_eq!(e.code, ErrorCode::INVALID_CONFIG, "{e}");
        e.msg
    }

    #[test]
    fn reference_keys_are_read() {
        let c = parse(
            Kind::Macvlan,
            r#"{"cniVersion":"1.0.0","name":"rail-0","type":"macvlan","master":"eth1","mode":"vepa",
                "mtu":1400,"mac":"02:00:00:AA:bb:01","linkInContainer":true,
                "ipam":{"type":"rust-ipam","range":"198.18.0.0/24"},"dns":{"nameservers":["10.0.0.10"]}}"#,
        )
        .expect("parse");
        assert_eq!(
            c,
            LinkConf {
                cni_version: "1.0.0".into(),
                name: "rail-0".into(),
                master: Some("eth1".into()),
                kind: KindData::Macvlan(MacvlanMode::Vepa),
                mtu: 1400,
                mac: Some(Mac([2, 0, 0, 0xaa, 0xbb, 1])),
                link_in_container: true,
                ipam_type: Some("rust-ipam".into()),
                dns: Some(Dns { nameservers: vec!["10.0.0.10".into()], ..Dns::default() }),
                prev_result: None,
            }
        );
        assert_eq!(c.mac.map(|m| m.to_string()).as_deref(), Some("02:00:00:aa:bb:01"));
        // Defaults: the default route's master, bridge / l2, the kernel's MTU, no IPAM.
        let c = parse(Kind::Macvlan, r#"{"cniVersion":"0.3.1","name":"n","type":"macvlan","ipam":{}}"#)
            .expect("defaults");
        assert_eq!(
            (c.master, c.kind, c.mtu, c.mac, c.ipam_type),
            (None, KindData::Macvlan(MacvlanMode::Bridge), 0, None, None)
        );
        let c =
            parse(Kind::Ipvlan, r#"{"cniVersion":"1.0.0","type":"ipvlan","mode":"l3s"}"#).expect("ipvlan");
        assert_eq!((c.kind, c.kind.kind()), (KindData::Ipvlan(IpvlanMode::L3s), Kind::Ipvlan));
        assert_eq!(parse(Kind::Ipvlan, r#"{"cniVersion":"1.0.0"}"#).expect("l2").kind.to_string(), "l2");
    }

    #[test]
    fn requested_macs_follow_the_reference_order() {
        let conf = br#"{"cniVersion":"1.0.0","mac":"02:00:00:00:00:01","runtimeConfig":{"mac":"02:00:00:00:00:03"}}"#;
        let args = CniArgs::parse("IgnoreUnknown=1;MAC=02:00:00:00:00:02").expect("args");
        let c = LinkConf::parse(Kind::Macvlan, conf, &args).expect("parse");
        assert_eq!(c.mac, Some(Mac([2, 0, 0, 0, 0, 3])), "runtimeConfig.mac wins");
        let c = LinkConf::parse(Kind::Macvlan, br#"{"cniVersion":"1.0.0","mac":"02:00:00:00:00:01"}"#, &args)
            .expect("parse");
        assert_eq!(c.mac, Some(Mac([2, 0, 0, 0, 0, 2])), "CNI_ARGS MAC beats the config's mac");
        let e = LinkConf::parse(
            Kind::Macvlan,
            br#"{"cniVersion":"1.0.0"}"#,
            &CniArgs::parse("MAC=zz").expect("a"),
        )
        .expect_err("bad");
        assert_eq!(e.msg, "CNI_ARGS MAC \"zz\" is not a unicast MAC address (like 02:00:00:00:00:01)");
    }

    #[test]
    fn bad_configs_name_the_field_and_value() {
        assert_eq!(
            err(Kind::Macvlan, r#"{"cniVersion":"1.0.0","mode":"l2"}"#),
            "mode \"l2\" is not one of the macvlan modes bridge, private, vepa, passthru"
        );
        assert_eq!(
            err(Kind::Ipvlan, r#"{"cniVersion":"1.0.0","mode":"bridge"}"#),
            "mode \"bridge\" is not one of the ipvlan modes l2, l3, l3s"
        );
        assert_eq!(
            err(Kind::Macvlan, r#"{"cniVersion":"1.0.0","mtu":70000}"#),
            "mtu 70000 is out of range: 0 (the master's) or 68 to 65535"
        );
        assert_eq!(
            err(Kind::Macvlan, r#"{"cniVersion":"1.0.0","mtu":-1}"#),
            "mtu -1 is out of range: 0 (the master's) or 68 to 65535"
        );
        assert_eq!(
            err(Kind::Macvlan, r#"{"cniVersion":"1.0.0","mtu":"1500"}"#),
            "mtu \"1500\" is not a whole number"
        );
        assert_eq!(
            err(Kind::Macvlan, r#"{"cniVersion":"1.0.0","mac":"01:00:5e:00:00:01"}"#),
            "mac \"01:00:5e:00:00:01\" is not a unicast MAC address (like 02:00:00:00:00:01)"
        );
        assert_eq!(
            err(Kind::Macvlan, r#"{"cniVersion":"1.0.0","runtimeConfig":{"mac":"02:00:00:00:00"}}"#),
            "runtimeConfig.mac \"02:00:00:00:00\" is not a unicast MAC address (like 02:00:00:00:00:01)"
        );
        assert_eq!(
            err(Kind::Macvlan, r#"{"cniVersion":"1.0.0","master":"eth0/x"}"#),
            "master \"eth0/x\" is not an interface name (1 to 15 characters, no '/', ':' or spaces)"
        );
        assert_eq!(
            err(Kind::Macvlan, r#"{"cniVersion":"1.0.0","master":"a-very-long-name-0"}"#),
            "master \"a-very-long-name-0\" is not an interface name (1 to 15 characters, no '/', ':' or spaces)"
        );
        assert_eq!(err(Kind::Macvlan, r#"{"cniVersion":"1.0.0","master":7}"#), "master 7 is not a string");
        assert_eq!(
            err(Kind::Macvlan, r#"{"cniVersion":"1.0.0","linkInContainer":"yes"}"#),
            "linkInContainer \"yes\" is not true or false"
        );
        assert_eq!(
            err(Kind::Macvlan, r#"{"cniVersion":"1.0.0","ipam":"rust-ipam"}"#),
            "ipam \"rust-ipam\" is not an object"
        );
        assert_eq!(
            err(Kind::Macvlan, r#"{"cniVersion":"1.0.0","ipam":{"type":1}}"#),
            "ipam.type 1 is not a string"
        );
        assert_eq!(
            err(Kind::Macvlan, r#"{"cniVersion":"1.0.0","dns":{"nameservers":"1.1.1.1"}}"#),
            "dns.nameservers \"1.1.1.1\" is not a list"
        );
        assert_eq!(
            err(Kind::Ipvlan, r#"{"cniVersion":"1.0.0","mac":"02:00:00:00:00:01"}"#),
            "mac 02:00:00:00:00:01 cannot be set: ipvlan links share the master's MAC address (use macvlan)"
        );
        let e = parse(Kind::Macvlan, "{nope").expect_err("not json");
        assert_eq!(e.code, ErrorCode::DECODE);
        assert!(e.msg.starts_with("network configuration is not JSON: "), "{e}");
    }

    #[test]
    fn macs_and_names() {
        assert_eq!(Mac::parse("02-00-00-00-00-0A"), Some(Mac([2, 0, 0, 0, 0, 10])));
        assert_eq!(Mac::parse("00:00:00:00:00:00"), None);
        assert_eq!(Mac::parse("02:00:00:00:00:001"), None);
        assert_eq!(Mac::parse("02:00:00:00:00:0g"), None);
        assert!(is_ifname("net1"));
        assert!(!is_ifname(""));
        assert!(!is_ifname("a b"));
        assert!(!is_ifname(".."));
    }
}
