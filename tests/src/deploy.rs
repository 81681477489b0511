//! `deploy/` as its tests read it: the repository's files, `kubectl kustomize` renderings and
//! their objects, the example NAD as the plugin reads it, and the node installer script run
//! against a temporary "host".

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The namespace deploy/ installs into.
pub const NAMESPACE: &str = "rust-ipam";
/// The production overlay: mutual TLS on the gRPC port, Admin on a unix socket and a TLS
/// port of its own CA, the CronJob calling it there.
pub const MTLS_OVERLAY: &str = "deploy/overlays/mtls";
/// rust-multus in thick mode: the base plus the per-node daemon, its config and RBAC.
pub const THICK_OVERLAY: &str = "deploy/overlays/thick";
/// `kubectl` (for kustomize) and how to ask it whether it runs.
pub const KUBECTL: (&str, &[&str]) = ("kubectl", &["version", "--client"]);

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Why the first of `tools` (a program and the arguments that make it print its version)
/// that cannot be run cannot, if one cannot.
pub fn missing(tools: &[(&str, &[&str])]) -> Option<String> {
    tools.iter().find_map(|(program, version_args)| {
        match Command::new(program).args(*version_args).output() {
            Ok(o) if o.status.success() => None,
            Ok(o) => {
                Some(format!("{program} {version_args:?} failed: {}", String::from_utf8_lossy(&o.stderr)))
            }
            Err(e) => Some(format!("{program} is not installed ({e})")),
        }
    })
}

/// Every YAML document of `text` as JSON (empty documents dropped).
pub fn yaml_docs(text: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// The text of `rel`, a file of the repository.
pub fn read(rel: &str) -> String {
    let path = repo().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// What a command printed, stdout then stderr.
pub fn output_text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `kubectl kustomize <dir>` (`dir` relative to the repository).
pub fn render(dir: &str) -> String {
    let o = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo().join(dir))
        .output()
        .expect("run kubectl kustomize");
    assert!(o.status.success(), "kubectl kustomize {dir} failed:\n{}", output_text(&o));
    String::from_utf8(o.stdout).expect("UTF-8 output")
}

/// The object of `kind` named `name` among `docs`.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("the rendered manifests have no {kind} {name}"))
}

/// The container `name` of a pod spec.
pub fn container<'a>(pod_spec: &'a Value, name: &str) -> &'a Value {
    pod_spec["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name} in {pod_spec}"))
}

/// The strings of a JSON list (`[]` for anything else).
pub fn string_list(v: &Value) -> Vec<&str> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

/// The one object of `deploy/examples/<file>`.
pub fn example(file: &str) -> Value {
    let mut docs = yaml_docs(&read(&format!("deploy/examples/{file}")));
    assert_eq!(docs.len(), 1, "deploy/examples/{file} holds one object");
    docs.remove(0)
}

/// The ipam section of the example NAD, as the plugin reads it with `node_file`.
pub fn nad_ipam(node_file: &Path) -> ipam_cni::config::IpamConf {
    let nad = example("network-attachment-definition.yaml");
    let config = nad["spec"]["config"].as_str().expect("spec.config");
    let conf = ipam_cni::config::NetConf::parse(config.as_bytes(), node_file)
        .unwrap_or_else(|e| panic!("the plugin refuses the example NAD: {e:?}"));
    assert_eq!(conf.name, nad["metadata"]["name"], "the CNI network is named like the NAD");
    conf.ipam.expect("an ipam section")
}

/// deploy/node/install-cni.sh with an image and a host in a temporary directory.
#[derive(Debug)]
pub struct Installer {
    /// Holds `image/cni`, `sa` and `host`.
    pub dir: tempfile::TempDir,
}

impl Installer {
    /// The binaries the image ships and the script installs.
    pub const BINARIES: [&str; 4] = ["rust-ipam", "rust-multus", "rust-macvlan", "rust-ipvlan"];

    /// An image's /opt/rust-ipam/cni and service account, and an empty host, in a temp dir.
    pub fn in_temp_dir() -> Installer {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        std::fs::create_dir_all(p.join("image/cni")).unwrap();
        std::fs::create_dir_all(p.join("sa")).unwrap();
        for b in Self::BINARIES {
            std::fs::write(p.join("image/cni").join(b), format!("#!/bin/sh\necho {b} v1\n")).unwrap();
        }
        std::fs::write(p.join("sa/token"), "token-1").unwrap();
        std::fs::write(p.join("sa/ca.crt"), "-----BEGIN CERTIFICATE-----\n").unwrap();
        Installer { dir }
    }

    /// The host's CNI binary directory.
    pub fn bin_dir(&self) -> PathBuf {
        self.dir.path().join("host/opt/cni/bin")
    }

    /// The host's /etc/cni/net.d/rust-ipam.d.
    pub fn conf_dir(&self) -> PathBuf {
        self.dir.path().join("host/etc/cni/net.d/rust-ipam.d")
    }

    /// Runs the script with `command` and the variables Kubernetes would set, plus `env`
    /// (an empty value removes a variable).
    pub fn run(&self, command: &str, env: &[(&str, &str)]) -> Output {
        self.command(command, env).output().expect("run sh")
    }

    /// The script's command line for [`Installer::run`], to spawn.
    pub fn command(&self, command: &str, env: &[(&str, &str)]) -> Command {
        let p = self.dir.path();
        let mut cmd = Command::new("sh");
        cmd.arg(repo().join("deploy/node/install-cni.sh"))
            .arg(command)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_IPAM_SRC_DIR", p.join("image/cni"))
            .env("RUST_IPAM_HOST_BIN_DIR", self.bin_dir())
            .env("RUST_IPAM_HOST_CONF_DIR", self.conf_dir())
            .env("RUST_IPAM_SA_DIR", p.join("sa"))
            .env("NODE_NAME", "worker-1")
            .env("RUST_IPAM_SERVICE_HOST", "10.96.0.50")
            .env("RUST_IPAM_SERVICE_PORT_GRPC", "50051")
            .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
            .env("KUBERNETES_SERVICE_PORT", "443");
        for (k, v) in env {
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        cmd
    }

    /// What the script wrote on the host, relative to [`Installer::dir`].
    pub fn files(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for d in [self.bin_dir(), self.conf_dir()] {
            for e in std::fs::read_dir(&d).into_iter().flatten() {
                out.insert(
                    e.expect("entry").path().strip_prefix(self.dir.path()).unwrap().display().to_string(),
                );
            }
        }
        out
    }
}

/// The permission bits of `path`.
pub fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode()
        & 0o7777
}

/// A Secret volume as the kubelet lays it out: the files in a timestamped directory, `..data`
/// a symlink to it, and each key a symlink through `..data` (an update swaps `..data`).
pub fn secret_volume(dir: &Path, generation: u32, files: &[(&str, &str)]) {
    let data = format!("..2026_12_03_10_00_0{generation}.000000001");
    std::fs::create_dir_all(dir.join(&data)).unwrap();
    for (name, content) in files {
        std::fs::write(dir.join(&data).join(name), content).unwrap();
    }
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(&data, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
}

/// Kills the process when dropped (a failing assertion must not leave a server running).
#[derive(Debug)]
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
