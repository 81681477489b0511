//! Network namespaces and links for root tests: made by the test, removed when dropped even
//! when the test fails, and the checks that decide whether this machine can run them.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Where Debian's containernetworking-plugins put the reference plugins.
pub const CNI_DIR: &str = "/usr/lib/cni";

/// Why this machine cannot run a namespace test that needs the reference `plugins`, if it
/// cannot: not root, no iproute2, no ping, or a plugin missing.
pub fn missing(plugins: &[&str]) -> Option<String> {
    if std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1) != 0 {
        return Some("not root (network namespaces need root)".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("iproute2 (`ip`) is not installed".into());
    }
    if Command::new("ping").arg("-V").output().is_err() {
        return Some("ping is not installed (apt-get install iputils-ping)".into());
    }
    for p in plugins {
        if !Path::new(CNI_DIR).join(p).exists() {
            return Some(format!("{CNI_DIR}/{p} is missing (apt-get install containernetworking-plugins)"));
        }
    }
    None
}

/// True, after [`crate::skip`], when the machine cannot run `test`.
pub fn skip(test: &str, plugins: &[&str]) -> bool {
    let Some(why) = missing(plugins) else { return false };
    crate::skip(test, &why);
    true
}

/// Runs `ip` with `args`, panicking with its stderr on failure; returns stdout.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Network namespaces named `ripam-<name>-<pid>`, with `lo` up, deleted when dropped.
#[derive(Debug)]
pub struct Netns(Vec<String>);

impl Netns {
    /// Creates one namespace per name.
    pub fn new(names: &[&str]) -> Netns {
        let tag = std::process::id();
        let ns = Netns(names.iter().map(|n| format!("ripam-{n}-{tag}")).collect());
        for n in &ns.0 {
            ip(&["netns", "add", n]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        ns
    }

    /// The full name of the `i`-th namespace.
    pub fn name(&self, i: usize) -> &str {
        &self.0[i]
    }

    /// How many namespaces there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `i`-th namespace's path, as a runtime passes it in `CNI_NETNS`.
    pub fn path(&self, i: usize) -> String {
        format!("/var/run/netns/{}", self.0[i])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Pings `address` once from namespace `ns` (`flags`: more of ping's, e.g. `-I net1`);
/// panics with `what` failed and ping's output when no answer comes within 3 s.
pub fn ping(ns: &str, address: &str, flags: &[&str], what: &str) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-c", "1", "-W", "3"])
        .args(flags)
        .arg(address)
        .output()
        .expect("run ping");
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Addresses of `family` ("inet" or "inet6") on `dev` inside `ns`, as `addr/prefix`; empty
/// when the device does not exist.
pub fn addresses_of(ns: &str, dev: &str, family: &str) -> Vec<String> {
    let out =
        Command::new("ip").args(["-n", ns, "-j", "addr", "show", "dev", dev]).output().expect("ip addr");
    if !out.status.success() {
        return Vec::new();
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j");
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter(|a| a["family"] == family)
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or_default(), a["prefixlen"]))
        .collect()
}

/// IPv4 addresses (with prefix) on `dev` inside `ns`.
pub fn addresses(ns: &str, dev: &str) -> Vec<String> {
    addresses_of(ns, dev, "inet")
}

/// Runs `cmd` (a plugin, or `ip netns exec NODE plugin`) as a runtime would for pod `pod`
/// of namespace `default` in the network namespace of the same name, on `net1`, with the
/// workspace's `rust-ipam` and the reference plugins on `CNI_PATH`; `extra_args` is
/// appended to `CNI_ARGS` (`;KEY=VALUE`). Exit code and output.
pub fn run_for_pod(
    cmd: &mut Command,
    command: &str,
    pod: &str,
    cid: &str,
    conf: &Value,
    extra_args: &str,
) -> (i32, Value) {
    let rust_ipam = crate::workspace_bin("rust-ipam").expect("rust-ipam binary");
    let cni_path = format!("{}:{CNI_DIR}", rust_ipam.parent().expect("bin dir").display());
    let netns = format!("/var/run/netns/{pod}");
    let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}{extra_args}");
    let env = [
        ("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", cid),
        ("CNI_NETNS", &netns),
        ("CNI_IFNAME", "net1"),
        ("CNI_PATH", &cni_path),
        ("CNI_ARGS", &args),
    ];
    let out = crate::run_cni(cmd, &env, &conf.to_string());
    (out.code, out.out)
}
