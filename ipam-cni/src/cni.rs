//! The CNI protocol as an IPAM plugin sees it: commands and their environment, `CNI_ARGS`,
//! versions, results and errors (CNI spec 1.1, with the 0.3.x/0.4.0 result shape).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde_json::{Value, json};

/// Versions this plugin speaks, oldest first. 0.1.0/0.2.0 results have another shape and
/// are answered with error 1.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", LATEST_VERSION];
/// The newest version: used to report errors that come before the config is read.
pub const LATEST_VERSION: &str = "1.1.0";

/// Error codes of the CNI spec that this plugin uses.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// First plugin-specific code: the server refused the request.
    pub const SERVER_REFUSED: u32 = 100;
}

/// A CNI error: printed as JSON on stdout, with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    /// An error with `code` and a message.
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError { code, msg: msg.into(), details: String::new() }
    }

    /// Adds details.
    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    /// The error JSON of the spec.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut v = json!({ "cniVersion": cni_version, "code": self.code, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

/// A CNI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

impl Command {
    /// From `CNI_COMMAND`.
    pub fn parse(s: &str) -> Result<Command, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            other => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, VERSION, GC, STATUS"),
                ));
            }
        })
    }

    /// The name as in `CNI_COMMAND`.
    pub fn name(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Gc => "GC",
            Command::Status => "STATUS",
        }
    }

    /// The first CNI version that has this command.
    fn since(self) -> &'static str {
        match self {
            Command::Check => "0.4.0",
            Command::Gc | Command::Status => "1.1.0",
            _ => "0.1.0",
        }
    }
}

/// A CNI version as numbers, for comparisons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(u32, u32, u32);

impl Version {
    /// Parses `a.b.c`.
    pub fn parse(s: &str) -> Option<Version> {
        let mut it = s.split('.').map(|p| p.parse::<u32>().ok());
        let v = Version(it.next()??, it.next()??, it.next()??);
        it.next().is_none().then_some(v)
    }
}

/// Checks that `version` is one this plugin speaks and that it has `cmd`.
pub fn check_version(cmd: Command, version: &str) -> Result<(), CniError> {
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {version:?} is not supported; supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let (have, need) = (Version::parse(version), Version::parse(cmd.since()));
    if have < need {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("{} needs cniVersion {} or later, the config has {version}", cmd.name(), cmd.since()),
        ));
    }
    Ok(())
}

/// `CNI_ARGS`: `K=V;K=V`. Keys may repeat (Multus repeats them); the last value wins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pairs: BTreeMap<String, String>,
}

impl CniArgs {
    /// Parses `CNI_ARGS`. A pair without `=` is an error, as in libcni.
    pub fn parse(s: &str) -> Result<CniArgs, CniError> {
        let mut pairs = BTreeMap::new();
        for part in s.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                CniError::new(code::INVALID_ENV, format!("CNI_ARGS entry {part:?} is not KEY=VALUE"))
            })?;
            pairs.insert(k.to_string(), v.to_string());
        }
        Ok(CniArgs { pairs })
    }

    /// A value, empty when absent.
    pub fn get(&self, key: &str) -> &str {
        self.pairs.get(key).map_or("", String::as_str)
    }
}

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

/// Renders an IPAM result in the shape of `version` (0.3.x and 0.4.0 carry `ips[].version`).
pub fn render_result(version: &str, ips: &[IpConfig], routes: &[Route], dns: Option<&Value>) -> Value {
    let old = Version::parse(version).is_some_and(|v| v < Version(1, 0, 0));
    let ips: Vec<Value> = ips
        .iter()
        .map(|ip| {
            let mut v = json!({ "address": format!("{}/{}", ip.address, ip.prefix_len) });
            if let Some(gw) = ip.gateway {
                v["gateway"] = Value::String(gw.to_string());
            }
            if old {
                v["version"] = Value::String(if ip.address.is_ipv4() { "4" } else { "6" }.into());
            }
            v
        })
        .collect();
    let mut out = json!({ "cniVersion": version, "ips": ips });
    if !routes.is_empty() {
        out["routes"] = serde_json::to_value(routes).unwrap_or(Value::Null);
    }
    if let Some(d) = dns {
        out["dns"] = d.clone();
    }
    out
}

/// The VERSION answer.
pub fn version_info(config_version: &str) -> Value {
    json!({ "cniVersion": config_version, "supportedVersions": SUPPORTED_VERSIONS })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_take_multus_repeated_keys() {
        // As Multus passed them to a delegate (shared/fixtures/multus/delegate-calls.log).
        let a = CniArgs::parse(
            "IgnoreUnknown=true;K8S_POD_NAMESPACE=fixture;K8S_POD_NAME=trainer;K8S_POD_INFRA_CONTAINER_ID=cid-fx1;\
             K8S_POD_UID=;IgnoreUnknown=1;K8S_POD_NAMESPACE=fixture;K8S_POD_NAME=trainer;\
             K8S_POD_INFRA_CONTAINER_ID=cid-fx1;IP=198.18.31.42/24",
        )
        .expect("parse");
        assert_eq!(a.get("K8S_POD_NAMESPACE"), "fixture");
        assert_eq!(a.get("K8S_POD_NAME"), "trainer");
        assert_eq!(a.get("K8S_POD_UID"), "");
        assert_eq!(a.get("IgnoreUnknown"), "1");
        assert_eq!(a.get("IP"), "198.18.31.42/24");
        assert_eq!(a.get("ABSENT"), "");
        assert_eq!(
            CniArgs::parse("A=1;broken").expect_err("bad").msg,
            "CNI_ARGS entry \"broken\" is not KEY=VALUE"
        );
        assert_eq!(CniArgs::parse("").expect("empty"), CniArgs::default());
    }

    #[test]
    fn versions_gate_commands() {
        assert!(check_version(Command::Add, "0.3.1").is_ok());
        assert!(check_version(Command::Gc, "1.1.0").is_ok());
        assert_eq!(
            check_version(Command::Add, "0.2.0").expect_err("old").msg,
            "cniVersion \"0.2.0\" is not supported; supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"
        );
        assert_eq!(
            check_version(Command::Check, "0.3.1").expect_err("no CHECK in 0.3.1").msg,
            "CHECK needs cniVersion 0.4.0 or later, the config has 0.3.1"
        );
        assert_eq!(
            check_version(Command::Gc, "1.0.0").expect_err("no GC in 1.0.0").code,
            code::INCOMPATIBLE_VERSION
        );
        assert!(Version::parse("1.10.0") > Version::parse("1.9.0"));
        assert_eq!(Version::parse("1.0"), None);
    }

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
            render_result("1.0.0", &ips, &routes, None),
            json!({"cniVersion": "1.0.0", "ips": [
                {"address": "10.56.0.1/16"}, {"address": "fd00::2/64", "gateway": "fd00::1"}],
                "routes": [{"dst": "0.0.0.0/0"}]})
        );
        assert_eq!(
            render_result("0.3.1", &ips[..1], &[], Some(&json!({"nameservers": ["10.0.0.10"]}))),
            json!({"cniVersion": "0.3.1", "ips": [{"address": "10.56.0.1/16", "version": "4"}],
                "dns": {"nameservers": ["10.0.0.10"]}})
        );
    }

    #[test]
    fn errors_render_as_spec_json() {
        let e = CniError::new(code::INVALID_CONFIG, "bad range").with_details("range \"x\"");
        assert_eq!(
            e.to_json("1.0.0"),
            json!({"cniVersion": "1.0.0", "code": 7, "msg": "bad range", "details": "range \"x\""})
        );
        assert_eq!(Command::parse("FOO").expect_err("bad").code, code::INVALID_ENV);
    }
}
