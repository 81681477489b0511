//! CNI versions and commands, and which version has which command.

use std::fmt;

use serde_json::{Value, json};

use crate::error::{CniError, ErrorCode};

/// A CNI version, `major.minor.patch`, ordered as numbers (1.10.0 is after 1.9.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    /// `major.minor.patch`.
    pub const fn new(major: u32, minor: u32, patch: u32) -> Version {
        Version { major, minor, patch }
    }

    /// Parses `a.b.c`.
    pub fn parse(s: &str) -> Option<Version> {
        let mut it = s.split('.').map(|p| p.parse::<u32>().ok());
        let v = Version::new(it.next()??, it.next()??, it.next()??);
        it.next().is_none().then_some(v)
    }

    /// Results of this version carry `ips[].version` (0.3.x, 0.4.0).
    pub fn has_ip_version(self) -> bool {
        self < Version::new(1, 0, 0)
    }

    /// Results of this version may carry the 1.1.0 fields (interface `mtu`, `socketPath`,
    /// `pciID`; route `mtu`, `advmss`, `priority`, `table`, `scope`).
    pub fn has_1_1_fields(self) -> bool {
        self >= Version::new(1, 1, 0)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// As the spec writes it: the string `a.b.c`.
impl serde::Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Version, D::Error> {
        let s = String::deserialize(d)?;
        Version::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("cniVersion {s:?} is not a version (a.b.c)")))
    }
}

/// The newest version: errors that come before the config is read are reported in it.
pub const LATEST_VERSION: Version = Version::new(1, 1, 0);

/// Versions the plugins of this workspace speak, oldest first. 0.1.0/0.2.0 results have
/// another shape and are answered with error 1.
pub const SUPPORTED_VERSIONS: &[Version] = &[
    Version::new(0, 3, 0),
    Version::new(0, 3, 1),
    Version::new(0, 4, 0),
    Version::new(1, 0, 0),
    LATEST_VERSION,
];

/// The supported versions as an error message lists them.
pub(crate) fn supported_list() -> String {
    SUPPORTED_VERSIONS.iter().map(Version::to_string).collect::<Vec<_>>().join(", ")
}

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
                    ErrorCode::INVALID_ENV,
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
    pub fn since(self) -> Version {
        match self {
            Command::Check => Version::new(0, 4, 0),
            Command::Gc | Command::Status => Version::new(1, 1, 0),
            _ => Version::new(0, 1, 0),
        }
    }

    /// ADD, DEL and CHECK act on one attachment (container and interface).
    pub fn has_attachment(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }
}

/// Checks that the config's `version` is one of [`SUPPORTED_VERSIONS`], spelled as the spec
/// spells it, and that it has `cmd`.
pub fn check_version(cmd: Command, version: &str) -> Result<Version, CniError> {
    let v = SUPPORTED_VERSIONS.iter().copied().find(|v| v.to_string() == version).ok_or_else(|| {
        CniError::new(
            ErrorCode::INCOMPATIBLE_VERSION,
            format!("cniVersion {version:?} is not supported; supported: {}", supported_list()),
        )
    })?;
    if v < cmd.since() {
        return Err(CniError::new(
            ErrorCode::INCOMPATIBLE_VERSION,
            format!("{} needs cniVersion {} or later, the config has {version}", cmd.name(), cmd.since()),
        ));
    }
    Ok(v)
}

/// The VERSION answer, in the version the caller asked in.
pub fn version_info(asked: &str) -> Value {
    json!({ "cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_gate_commands() {
        assert_eq!(check_version(Command::Add, "0.3.1"), Ok(Version::new(0, 3, 1)));
        assert_eq!(check_version(Command::Gc, "1.1.0"), Ok(LATEST_VERSION));
        assert_eq!(
            check_version(Command::Add, "0.2.0").expect_err("old").msg,
            "cniVersion \"0.2.0\" is not supported; supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"
        );
        assert_eq!(
            check_version(Command::Add, "01.0.0").expect_err("not as the spec spells it").code,
            ErrorCode::INCOMPATIBLE_VERSION
        );
        assert_eq!(
            check_version(Command::Check, "0.3.1").expect_err("no CHECK in 0.3.1").msg,
            "CHECK needs cniVersion 0.4.0 or later, the config has 0.3.1"
        );
        assert_eq!(
            check_version(Command::Gc, "1.0.0").expect_err("no GC in 1.0.0").code,
            ErrorCode::INCOMPATIBLE_VERSION
        );
        assert!(Version::parse("1.10.0") > Version::parse("1.9.0"));
        assert_eq!(Version::parse("1.0"), None);
        assert_eq!(Version::parse("1.0.0.0"), None);
        assert_eq!(LATEST_VERSION.to_string(), "1.1.0");
        assert_eq!(serde_json::to_value(LATEST_VERSION).expect("JSON"), json!("1.1.0"));
        assert_eq!(
            serde_json::from_value::<Version>(json!("0.4.0")).expect("version"),
            Version::new(0, 4, 0)
        );
        assert_eq!(
            serde_json::from_value::<Version>(json!("1.0")).expect_err("not a.b.c").to_string(),
            "cniVersion \"1.0\" is not a version (a.b.c)"
        );
        assert_eq!(Command::parse("FOO").expect_err("bad").code, ErrorCode::INVALID_ENV);
    }

    #[test]
    fn version_answers_in_the_asked_version() {
        assert_eq!(
            version_info("0.4.0"),
            json!({"cniVersion": "0.4.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
        );
    }
}
