//! The harness every plugin binary runs in: read the environment and stdin, answer VERSION,
//! parse and version-check the config, call the plugin's verb, print the result or the
//! error JSON and exit with the matching status. A plugin only implements the verbs.

use std::io::{Read as _, Write as _};
use std::process::ExitCode;

use serde_json::Value;

use crate::env::Env;
use crate::error::{CniError, ErrorCode, Failure};
use crate::result::CniResult;
use crate::version::{Command, LATEST_VERSION, Version, check_version, version_info};

/// A parsed network configuration: the harness needs its `cniVersion`.
pub trait NetworkConfig {
    /// The config's `cniVersion`, as written.
    fn cni_version(&self) -> &str;
}

/// A CNI plugin: its config and its verbs. VERSION is answered by the harness.
pub trait Plugin {
    /// The plugin's network configuration.
    type Config: NetworkConfig;

    /// Parses stdin (and checks the environment beyond what every plugin needs). The
    /// failure says which version to report it in, since only the plugin knows how far it
    /// got in reading the config.
    fn parse(&self, env: &Env, stdin: &[u8]) -> Result<Self::Config, Failure>;

    /// ADD: the result, printed in the config's version.
    fn add(&self, env: &Env, conf: &Self::Config, stdin: &[u8]) -> Result<CniResult, CniError>;

    /// DEL: succeeds for what is already gone.
    fn del(&self, env: &Env, conf: &Self::Config, stdin: &[u8]) -> Result<(), CniError>;

    /// CHECK: the attachment is as the config's `prevResult` says.
    fn check(&self, env: &Env, conf: &Self::Config, stdin: &[u8]) -> Result<(), CniError>;

    /// GC: release what is not in the config's `cni.dev/valid-attachments`.
    fn gc(&self, env: &Env, conf: &Self::Config, stdin: &[u8]) -> Result<(), CniError>;

    /// STATUS: whether an ADD can succeed now.
    fn status(&self, env: &Env, conf: &Self::Config, stdin: &[u8]) -> Result<(), CniError>;
}

/// Stdin as the JSON object every network configuration is, or the DECODE error saying
/// why it is not one; a plugin then reads its keys from the object.
pub fn config_object(stdin: &[u8]) -> Result<serde_json::Map<String, Value>, CniError> {
    match serde_json::from_slice::<Value>(stdin) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(_) => Err(CniError::new(ErrorCode::DECODE, "network configuration is not a JSON object")),
        Err(e) => Err(CniError::new(ErrorCode::DECODE, format!("network configuration is not JSON: {e}"))),
    }
}

/// The `cniVersion` of stdin, when it has one: VERSION answers in it.
fn asked_version(stdin: &[u8]) -> Option<String> {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_string))
}

/// Runs one command of `plugin`; `Some` is printed on stdout.
pub fn run<P: Plugin>(plugin: &P, env: &Env, stdin: &[u8]) -> Result<Option<Value>, Failure> {
    if env.command == Command::Version {
        // VERSION gets `{"cniVersion": ...}` at most; answer even when it is missing.
        let asked = asked_version(stdin).unwrap_or_else(|| LATEST_VERSION.to_string());
        return Ok(Some(version_info(&asked)));
    }
    let conf = plugin.parse(env, stdin)?;
    let fail = |e: CniError| Failure::new(e, conf.cni_version());
    let version: Version = check_version(env.command, conf.cni_version()).map_err(fail)?;
    match env.command {
        Command::Add => plugin.add(env, &conf, stdin).map(|r| Some(r.render(version))),
        Command::Del => plugin.del(env, &conf, stdin).map(|()| None),
        Command::Check => plugin.check(env, &conf, stdin).map(|()| None),
        Command::Gc => plugin.gc(env, &conf, stdin).map(|()| None),
        Command::Status => plugin.status(env, &conf, stdin).map(|()| None),
        Command::Version => unreachable!("answered above"),
    }
    .map_err(fail)
}

/// What a plugin binary prints and how it exits: a process that answers for a plugin
/// (a daemon behind a shim) hands this back so the shim prints the very same.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// The JSON printed on stdout (a result, VERSION's answer or an error); `None` prints
    /// nothing.
    pub stdout: Option<Value>,
    /// Whether the exit status is success (0) or failure (1).
    pub success: bool,
}

impl Output {
    /// The output of a command's answer, as [`run`] gives it.
    pub fn of(answer: Result<Option<Value>, Failure>) -> Output {
        match answer {
            Ok(stdout) => Output { stdout, success: true },
            Err(f) => Output { stdout: Some(f.error.to_json(&f.version)), success: false },
        }
    }

    /// The output of `error`, reported in `version`.
    pub fn error(error: &CniError, version: &str) -> Output {
        Output { stdout: Some(error.to_json(version)), success: false }
    }

    /// Prints stdout (a line of JSON) and gives the exit status.
    pub fn print(&self) -> ExitCode {
        if let Some(v) = &self.stdout {
            let mut out = std::io::stdout().lock();
            // Nothing is left to tell the caller if stdout itself is gone.
            let _ = serde_json::to_writer(&mut out, v);
            let _ = out.write_all(b"\n");
        }
        if self.success { ExitCode::SUCCESS } else { ExitCode::FAILURE }
    }
}

/// The environment and stdin of this process, as a plugin binary gets them.
pub fn read_invocation() -> Result<(Env, Vec<u8>), Failure> {
    let env = Env::from_env(|k| std::env::var(k).ok()).map_err(Failure::latest)?;
    let mut stdin = Vec::new();
    std::io::stdin()
        .read_to_end(&mut stdin)
        .map_err(|e| Failure::latest(CniError::new(ErrorCode::IO_FAILURE, format!("reading stdin: {e}"))))?;
    Ok((env, stdin))
}

/// A plugin binary's whole `main`: the process environment and stdin in, the answer on
/// stdout, failure as the exit status.
pub fn main<P: Plugin>(plugin: P) -> ExitCode {
    Output::of(read_invocation().and_then(|(env, stdin)| run(&plugin, &env, &stdin))).print()
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use serde_json::json;

    use super::*;
    use crate::result::IpResult;

    /// A plugin that records the verbs it was asked for and fails DEL.
    #[derive(Debug, Default)]
    struct Recorder {
        calls: RefCell<Vec<&'static str>>,
    }

    #[derive(Debug)]
    struct Conf(String);

    impl NetworkConfig for Conf {
        fn cni_version(&self) -> &str {
            &self.0
        }
    }

    impl Plugin for Recorder {
        type Config = Conf;

        fn parse(&self, _: &Env, stdin: &[u8]) -> Result<Conf, Failure> {
            asked_version(stdin)
                .map(Conf)
                .ok_or_else(|| Failure::latest(CniError::new(ErrorCode::DECODE, "no cniVersion")))
        }

        fn add(&self, _: &Env, _: &Conf, _: &[u8]) -> Result<CniResult, CniError> {
            self.calls.borrow_mut().push("add");
            Ok(CniResult {
                ips: vec![IpResult {
                    address: "10.1.0.5/16".parse().expect("cidr"),
                    gateway: None,
                    interface: None,
                }],
                ..CniResult::default()
            })
        }

        fn del(&self, _: &Env, _: &Conf, _: &[u8]) -> Result<(), CniError> {
            self.calls.borrow_mut().push("del");
            Err(CniError::new(ErrorCode::NETLINK_FAILED, "busy"))
        }

        fn check(&self, _: &Env, _: &Conf, _: &[u8]) -> Result<(), CniError> {
            self.calls.borrow_mut().push("check");
            Ok(())
        }

        fn gc(&self, _: &Env, _: &Conf, _: &[u8]) -> Result<(), CniError> {
            self.calls.borrow_mut().push("gc");
            Ok(())
        }

        fn status(&self, _: &Env, _: &Conf, _: &[u8]) -> Result<(), CniError> {
            self.calls.borrow_mut().push("status");
            Ok(())
        }
    }

    fn env(command: Command) -> Env {
        Env {
            command,
            container_id: "c".into(),
            netns: "/n".into(),
            ifname: "net1".into(),
            args: String::new(),
            path: Vec::new(),
        }
    }

    #[test]
    fn verbs_are_dispatched_and_answered_in_the_config_version() {
        let p = Recorder::default();
        let out = run(&p, &env(Command::Add), br#"{"cniVersion":"0.4.0"}"#).expect("add");
        assert_eq!(
            out,
            Some(json!({"cniVersion": "0.4.0", "ips": [{"address": "10.1.0.5/16", "version": "4"}]}))
        );
        assert_eq!(
            run(&p, &env(Command::Del), br#"{"cniVersion":"1.0.0"}"#),
            Err(Failure::new(CniError::new(ErrorCode::NETLINK_FAILED, "busy"), "1.0.0"))
        );
        assert_eq!(run(&p, &env(Command::Check), br#"{"cniVersion":"1.0.0"}"#), Ok(None));
        assert_eq!(run(&p, &env(Command::Gc), br#"{"cniVersion":"1.1.0"}"#), Ok(None));
        assert_eq!(run(&p, &env(Command::Status), br#"{"cniVersion":"1.1.0"}"#), Ok(None));
        assert_eq!(*p.calls.borrow(), ["add", "del", "check", "gc", "status"]);
    }

    #[test]
    fn versions_are_checked_before_any_verb() {
        let p = Recorder::default();
        let f = run(&p, &env(Command::Gc), br#"{"cniVersion":"1.0.0"}"#).expect_err("no GC in 1.0.0");
        assert_eq!(
            (f.error.code, f.error.msg.as_str(), f.version.as_str()),
            (
                ErrorCode::INCOMPATIBLE_VERSION,
                "GC needs cniVersion 1.1.0 or later, the config has 1.0.0",
                "1.0.0"
            )
        );
        let f = run(&p, &env(Command::Add), br#"{"cniVersion":"0.2.0"}"#).expect_err("old");
        assert_eq!((f.error.code, f.version.as_str()), (ErrorCode::INCOMPATIBLE_VERSION, "0.2.0"));
        let f = run(&p, &env(Command::Add), b"{}").expect_err("parse");
        assert_eq!((f.error.code, f.version.as_str()), (ErrorCode::DECODE, "1.1.0"));
        assert!(p.calls.borrow().is_empty());
    }

    #[test]
    fn version_needs_no_config() {
        let p = Recorder::default();
        let v = run(&p, &env(Command::Version), br#"{"cniVersion":"0.4.0"}"#).expect("version");
        assert_eq!(v.and_then(|v| v.get("cniVersion").cloned()), Some(json!("0.4.0")));
        let v = run(&p, &env(Command::Version), b"").expect("version").expect("answer");
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));
    }
}
