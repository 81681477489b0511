//! CNI errors: the code, the error JSON a plugin prints, and the list a teardown collects.

use std::fmt;

use serde_json::{Value, json};

/// A CNI error code: the spec's (below 100) and every plugin-specific one of this workspace.
///
/// A newtype rather than an enum because a called plugin may answer any code, and it is
/// passed on unchanged.
///
/// | code | constant | raised by |
/// |---|---|---|
/// | 100 | [`ErrorCode::SERVER_REFUSED`] | rust-ipam: the server refused the request |
/// | 101 | [`ErrorCode::LEASE_MISMATCH`] | rust-ipam CHECK: lease missing or not in `prevResult` |
/// | 110 | [`ErrorCode::PLUGIN_FAILED`] | another plugin could not be run or answered nonsense |
/// | 120 | [`ErrorCode::NETLINK_FAILED`] | rust-macvlan / rust-ipvlan: a netlink request failed |
/// | 121 | [`ErrorCode::CHECK_MISMATCH`] | rust-macvlan / rust-ipvlan CHECK: the interface differs |
/// | 122 | [`ErrorCode::LINK_KIND_UNSUPPORTED`] | rust-ipvlan: the kernel has no ipvlan |
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// The config's `cniVersion` is not one the plugin speaks, or lacks the command.
    pub const INCOMPATIBLE_VERSION: ErrorCode = ErrorCode(1);
    /// A CNI_* variable is missing or wrong.
    pub const INVALID_ENV: ErrorCode = ErrorCode(4);
    /// An I/O failure (stdin, a file, a namespace, a runtime).
    pub const IO_FAILURE: ErrorCode = ErrorCode(5);
    /// The input could not be decoded.
    pub const DECODE: ErrorCode = ErrorCode(6);
    /// The network configuration is invalid.
    pub const INVALID_CONFIG: ErrorCode = ErrorCode(7);
    /// Transient: the runtime should retry later.
    pub const TRY_AGAIN_LATER: ErrorCode = ErrorCode(11);
    /// STATUS: the plugin cannot serve ADD now.
    pub const NOT_AVAILABLE: ErrorCode = ErrorCode(50);

    /// Plugin-specific: the server refused the request (rust-ipam).
    pub const SERVER_REFUSED: ErrorCode = ErrorCode(100);
    /// Plugin-specific: a CHECK found the lease missing or different from `prevResult`.
    pub const LEASE_MISMATCH: ErrorCode = ErrorCode(101);
    /// Plugin-specific: another plugin could not be run or answered with nonsense.
    pub const PLUGIN_FAILED: ErrorCode = ErrorCode(110);
    /// Plugin-specific: a netlink request (create, rename, address, route, delete a link)
    /// failed; the message names the request and the kernel's answer.
    pub const NETLINK_FAILED: ErrorCode = ErrorCode(120);
    /// Plugin-specific: CHECK found the pod's interface different from the config or the
    /// `prevResult` (missing link, wrong kind, master, mode or MAC, missing address or route).
    pub const CHECK_MISMATCH: ErrorCode = ErrorCode(121);
    /// Plugin-specific: the kernel cannot make links of this kind (no ipvlan module).
    pub const LINK_KIND_UNSUPPORTED: ErrorCode = ErrorCode(122);
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A CNI error: printed as JSON on stdout, with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    /// An error with `code` and a message.
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> CniError {
        CniError { code, msg: msg.into(), details: String::new() }
    }

    /// Adds details.
    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    /// The error JSON of the spec.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut v = json!({ "cniVersion": cni_version, "code": self.code.0, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }

    /// A CNI error JSON (`code`, `msg`, optional `details`) as a plugin prints it on failure.
    pub fn from_json(v: &Value) -> Option<CniError> {
        let code = u32::try_from(v.get("code")?.as_u64()?).ok()?;
        let msg = v.get("msg").and_then(Value::as_str).unwrap_or_default();
        let details = v.get("details").and_then(Value::as_str).unwrap_or_default();
        Some(CniError::new(ErrorCode(code), msg).with_details(details))
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

/// A failed command: the error and the `cniVersion` to print it in. The version stays the
/// string the config gave, because the spec echoes it even when it is one no plugin knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub error: CniError,
    pub version: String,
}

impl Failure {
    /// An error reported in `version`.
    pub fn new(error: CniError, version: impl Into<String>) -> Failure {
        Failure { error, version: version.into() }
    }

    /// An error from before any config was read, reported in the newest version.
    pub fn latest(error: CniError) -> Failure {
        Failure::new(error, crate::LATEST_VERSION.to_string())
    }
}

/// The errors of a teardown: a DEL keeps cleaning up past a failure, so every step's error
/// is kept and all are reported at the end, under the first one's code.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorList {
    errors: Vec<CniError>,
}

impl ErrorList {
    /// An empty list.
    pub fn new() -> ErrorList {
        ErrorList::default()
    }

    /// Keeps `e`.
    pub fn push(&mut self, e: CniError) {
        self.errors.push(e);
    }

    /// Keeps the error of `r`, if it failed.
    pub fn check<T>(&mut self, r: Result<T, CniError>) {
        if let Err(e) = r {
            self.errors.push(e);
        }
    }

    /// How many errors were kept.
    pub fn len(&self) -> usize {
        self.errors.len()
    }

    /// True when nothing failed.
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// `Ok` when nothing failed, else one error: the first one's code, every message joined
    /// with `separator`, every non-empty `details` joined with `"; "`.
    pub fn into_result(self, separator: &str) -> Result<(), CniError> {
        let mut it = self.errors.into_iter();
        let Some(first) = it.next() else { return Ok(()) };
        Err(it.fold(first, |a, b| merge(a, b, separator)))
    }

    /// `first`, the error that started a cleanup, followed by the cleanup's own errors. A
    /// cleanup error with `first`'s very message is left out: the cleanup met the same cause
    /// (an ipam plugin that cannot be found fails its DEL as it failed its ADD), and saying it
    /// twice tells nothing more.
    pub fn after(self, first: CniError, separator: &str) -> CniError {
        let msg = first.msg.clone();
        self.errors.into_iter().filter(|e| e.msg != msg).fold(first, |a, b| merge(a, b, separator))
    }
}

fn merge(a: CniError, b: CniError, separator: &str) -> CniError {
    let details = match (a.details.is_empty(), b.details.is_empty()) {
        (_, true) => a.details,
        (true, false) => b.details,
        (false, false) => format!("{}; {}", a.details, b.details),
    };
    CniError::new(a.code, format!("{}{separator}{}", a.msg, b.msg)).with_details(details)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_render_as_spec_json_and_read_back() {
        let e = CniError::new(ErrorCode::INVALID_CONFIG, "bad range").with_details("range \"x\"");
        let v = e.to_json("1.0.0");
        assert_eq!(
            v,
            json!({"cniVersion": "1.0.0", "code": 7, "msg": "bad range", "details": "range \"x\""})
        );
        assert_eq!(CniError::from_json(&v), Some(e));
        assert_eq!(
            CniError::from_json(&json!({"code": 120, "msg": "m"})),
            Some(CniError::new(ErrorCode::NETLINK_FAILED, "m"))
        );
        assert_eq!(CniError::from_json(&json!({"msg": "no code"})), None);
        assert_eq!(CniError::new(ErrorCode(7), "m").with_details("d").to_string(), "CNI error 7: m (d)");
    }

    #[test]
    fn a_list_reports_every_error_under_the_first_code() {
        assert_eq!(ErrorList::new().into_result("; "), Ok(()));
        let one = CniError::new(ErrorCode(7), "a");
        let mut l = ErrorList::new();
        l.push(one.clone());
        l.check::<()>(Ok(()));
        assert_eq!(l.len(), 1);
        assert_eq!(l.into_result("; "), Err(one));
        let mut l = ErrorList::new();
        l.push(CniError::new(ErrorCode(7), "plugin \"x\" not found").with_details("d1"));
        l.check::<()>(Err(CniError::new(ErrorCode(120), "removing link net1: Device or resource busy")));
        l.push(CniError::new(ErrorCode(5), "c").with_details("d3"));
        assert_eq!(
            l.into_result("; "),
            Err(CniError::new(
                ErrorCode(7),
                "plugin \"x\" not found; removing link net1: Device or resource busy; c"
            )
            .with_details("d1; d3"))
        );
        let mut cleanup = ErrorList::new();
        cleanup.push(CniError::new(ErrorCode(5), "b").with_details("d2"));
        assert_eq!(
            cleanup.after(CniError::new(ErrorCode(7), "a"), " / "),
            CniError::new(ErrorCode(7), "a / b").with_details("d2")
        );
        assert_eq!(
            ErrorList::new().after(CniError::new(ErrorCode(7), "a"), "; "),
            CniError::new(ErrorCode(7), "a")
        );
    }

    #[test]
    fn a_cleanup_error_repeating_the_first_is_said_once() {
        let first =
            CniError::new(ErrorCode::INVALID_CONFIG, "plugin \"x\" not found in CNI_PATH [/opt/cni/bin]");
        let mut cleanup = ErrorList::new();
        cleanup.push(first.clone());
        cleanup.push(CniError::new(ErrorCode::NETLINK_FAILED, "removing link cni0: busy"));
        let e = cleanup.after(first, "; ");
        assert_eq!(
            (e.code, e.msg.as_str()),
            (
                ErrorCode::INVALID_CONFIG,
                "plugin \"x\" not found in CNI_PATH [/opt/cni/bin]; removing link cni0: busy"
            )
        );
    }
}
