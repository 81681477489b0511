//! The environment of one plugin call: `CNI_COMMAND` and the variables it needs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::error::{CniError, ErrorCode};
use crate::version::Command;

/// The CNI_* variables of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    /// Empty when the runtime gave none (DEL of a gone sandbox, GC, STATUS).
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` as given: a plugin passes it on unchanged to the plugins it calls, and
    /// reads it with [`Env::cni_args`].
    pub args: String,
    /// The directories of `CNI_PATH`, in order.
    pub path: Vec<PathBuf>,
}

impl Env {
    /// Reads the CNI variables through `var`, requiring what the spec requires for the
    /// command: `CNI_PATH` for every command but VERSION, the container and interface for
    /// ADD, DEL and CHECK, the namespace for ADD and CHECK (a DEL may come after the sandbox
    /// is gone).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let command = Command::parse(&var("CNI_COMMAND").unwrap_or_default())?;
        let need = |name: &str, required: bool| -> Result<String, CniError> {
            match var(name).filter(|v| !v.is_empty()) {
                Some(v) => Ok(v),
                None if required => Err(CniError::new(
                    ErrorCode::INVALID_ENV,
                    format!("{name} is required for {} but not set", command.name()),
                )),
                None => Ok(String::new()),
            }
        };
        let attach = command.has_attachment();
        let with_netns = matches!(command, Command::Add | Command::Check);
        let path = need("CNI_PATH", command != Command::Version)?;
        Ok(Env {
            command,
            container_id: need("CNI_CONTAINERID", attach)?,
            netns: need("CNI_NETNS", with_netns)?,
            ifname: need("CNI_IFNAME", attach)?,
            args: var("CNI_ARGS").unwrap_or_default(),
            path: split_path(&path),
        })
    }

    /// `CNI_ARGS`, parsed.
    pub fn cni_args(&self) -> Result<CniArgs, CniError> {
        CniArgs::parse(&self.args)
    }
}

/// Splits `CNI_PATH` into directories, skipping empty entries.
pub fn split_path(var: &str) -> Vec<PathBuf> {
    var.split(':').filter(|p| !p.is_empty()).map(PathBuf::from).collect()
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
                CniError::new(ErrorCode::INVALID_ENV, format!("CNI_ARGS entry {part:?} is not KEY=VALUE"))
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn environment_is_checked_per_command() {
        const PATH: (&str, &str) = ("CNI_PATH", "/opt/cni/bin::/usr/lib/cni");
        let add = Env::from_env(env(&[
            ("CNI_COMMAND", "ADD"),
            PATH,
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/p"),
            ("CNI_IFNAME", "net1"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p"),
        ]))
        .expect("valid");
        assert_eq!(
            add,
            Env {
                command: Command::Add,
                container_id: "c1".into(),
                netns: "/var/run/netns/p".into(),
                ifname: "net1".into(),
                args: "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p".into(),
                path: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
            }
        );
        assert_eq!(add.cni_args().expect("args").get("K8S_POD_NAME"), "p");
        let err = |vars: &[(&str, &str)]| Env::from_env(env(vars)).expect_err("refused");
        let e = err(&[("CNI_COMMAND", "ADD"), PATH, ("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "net1")]);
        assert_eq!(
            (e.code, e.msg.as_str()),
            (ErrorCode::INVALID_ENV, "CNI_NETNS is required for ADD but not set")
        );
        let e = err(&[("CNI_COMMAND", "ADD"), PATH, ("CNI_CONTAINERID", "c")]);
        assert_eq!(e.msg, "CNI_NETNS is required for ADD but not set");
        let e = err(&[("CNI_COMMAND", "CHECK"), PATH, ("CNI_CONTAINERID", "c"), ("CNI_NETNS", "/n")]);
        assert_eq!(e.msg, "CNI_IFNAME is required for CHECK but not set");
        assert_eq!(err(&[("CNI_COMMAND", "GC")]).msg, "CNI_PATH is required for GC but not set");
        assert_eq!(err(&[]).code, ErrorCode::INVALID_ENV);
        assert_eq!(
            err(&[("CNI_COMMAND", "FOO")]).msg,
            "CNI_COMMAND \"FOO\" is not one of ADD, DEL, CHECK, VERSION, GC, STATUS"
        );
        // DEL may come without a namespace (it is gone); GC needs no attachment; VERSION
        // needs nothing else.
        let ok = |vars: &[(&str, &str)]| Env::from_env(env(vars)).is_ok();
        assert!(ok(&[("CNI_COMMAND", "DEL"), PATH, ("CNI_CONTAINERID", "c"), ("CNI_IFNAME", "i")]));
        assert!(ok(&[("CNI_COMMAND", "GC"), PATH]));
        assert!(ok(&[("CNI_COMMAND", "VERSION")]));
    }

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
        assert_eq!(split_path("/a::/b:"), vec![PathBuf::from("/a"), PathBuf::from("/b")]);
    }
}
