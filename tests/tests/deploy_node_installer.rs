//! The node installer script `deploy/node/install-cni.sh` against a temporary "host": it
//! installs atomically a config the plugin reads, in plaintext and in mutual TLS mode (the
//! node's certificates copied from a Secret volume and kept in step with it), refuses bad
//! environments without changing anything, and uninstalls only what it wrote.
//!
//! Needs `sh`, `cmp` and `grep`; without them the tests print `SKIP` (and fail when `CI` is
//! set).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use rust_ipam_e2e::deploy::{
    Installer, Killed, missing, mode, nad_ipam, output_text, secret_volume, yaml_docs,
};
use rust_ipam_e2e::skip;
use serde_json::{Value, json};

#[test]
fn node_installer_installs_atomically_a_config_the_plugin_reads() {
    const TEST: &str = "node_installer_installs_atomically_a_config_the_plugin_reads";
    if let Some(why) = missing(&[("sh", &["-c", "command -v cmp >/dev/null"])]) {
        return skip(TEST, &why);
    }
    let inst = Installer::in_temp_dir();
    let o = inst.run("install", &[]);
    assert!(o.status.success(), "install failed:\n{}", output_text(&o));
    let want: BTreeSet<String> = Installer::BINARIES
        .iter()
        .map(|b| format!("host/opt/cni/bin/{b}"))
        .chain(
            ["ca.crt", "rust-ipam.conf", "rust-multus.kubeconfig", "rust-multus.token"]
                .iter()
                .map(|f| format!("host/etc/cni/net.d/rust-ipam.d/{f}")),
        )
        .collect();
    assert_eq!(inst.files(), want, "exactly these files, no temporary ones left");
    for b in Installer::BINARIES {
        let path = inst.bin_dir().join(b);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("#!/bin/sh\necho {b} v1\n"));
        assert_eq!(mode(&path), 0o755, "{b}");
    }
    let conf_path = inst.conf_dir().join("rust-ipam.conf");
    assert_eq!(mode(&conf_path), 0o644);
    assert_eq!(mode(&inst.conf_dir().join("rust-multus.token")), 0o600);
    let conf: Value = serde_json::from_str(&std::fs::read_to_string(&conf_path).unwrap()).expect("JSON");
    assert_eq!(
        conf,
        json!({"server": ["http://10.96.0.50:50051"], "node_name": "worker-1", "timeout_ms": 10000})
    );

    // The plugin, given the example NAD (no `server` in it) on this node, calls the Service.
    let ipam = nad_ipam(&conf_path);
    assert_eq!(ipam.servers, ["http://10.96.0.50:50051"]);
    assert_eq!(ipam.node_name, "worker-1");
    assert_eq!(ipam.timeout, std::time::Duration::from_millis(10_000));

    // rust-multus' kubeconfig names the host paths of the CA and the token.
    let kc = yaml_docs(&std::fs::read_to_string(inst.conf_dir().join("rust-multus.kubeconfig")).unwrap())
        .remove(0);
    assert_eq!(kc["clusters"][0]["cluster"]["server"], "https://10.96.0.1:443");
    assert_eq!(kc["clusters"][0]["cluster"]["certificate-authority"], "/etc/cni/net.d/rust-ipam.d/ca.crt");
    assert_eq!(kc["users"][0]["user"]["tokenFile"], "/etc/cni/net.d/rust-ipam.d/rust-multus.token");
    assert_eq!(kc["current-context"], "rust-multus");
    assert_eq!(inst.run("check", &[]).status.code(), Some(0));

    // Again with the same image: nothing is rewritten.
    let inode = |b: &str| std::fs::metadata(inst.bin_dir().join(b)).unwrap().ino();
    let before = inode("rust-ipam");
    let o = inst.run("install", &[]);
    assert!(o.status.success() && !output_text(&o).contains("wrote"), "{}", output_text(&o));
    assert_eq!(inode("rust-ipam"), before);

    // A new image: the new binary replaces the old by rename, so a runtime that is exec'ing
    // the old file at that moment keeps reading the old content, never a half-written one.
    std::fs::write(inst.dir.path().join("image/cni/rust-ipam"), "#!/bin/sh\necho rust-ipam v2\n").unwrap();
    let mut old = std::fs::File::open(inst.bin_dir().join("rust-ipam")).unwrap();
    let o = inst.run("install", &[("RUST_IPAM_SERVICE_HOST", "fd00:96::50")]);
    assert!(o.status.success(), "{}", output_text(&o));
    let mut old_content = String::new();
    std::io::Read::read_to_string(&mut old, &mut old_content).unwrap();
    assert_eq!(old_content, "#!/bin/sh\necho rust-ipam v1\n");
    assert_eq!(
        std::fs::read_to_string(inst.bin_dir().join("rust-ipam")).unwrap(),
        "#!/bin/sh\necho rust-ipam v2\n"
    );
    assert_ne!(inode("rust-ipam"), before);
    assert_eq!(inst.files(), want);
    // An IPv6 ClusterIP goes in brackets.
    assert_eq!(nad_ipam(&conf_path).servers, ["http://[fd00:96::50]:50051"]);

    // Bad environments are refused with a message and change nothing.
    let conf_before = std::fs::read(&conf_path).unwrap();
    for (env, message) in [
        (
            &[("RUST_IPAM_SERVICE_HOST", "")][..],
            "error: RUST_IPAM_SERVICE_HOST is not set: create the rust-ipam Service before this DaemonSet",
        ),
        (
            &[("RUST_IPAM_SERVER", "http://10.0.0.10:50051,10.0.0.11:50051")][..],
            "error: server \"10.0.0.11:50051\" is not http://host:port, https://host:port or unix:///path",
        ),
        (&[("NODE_NAME", "")][..], "error: NODE_NAME is not set"),
        (&[("RUST_IPAM_TIMEOUT_MS", "10s")][..], "error: RUST_IPAM_TIMEOUT_MS \"10s\" is not a number"),
    ] {
        let o = inst.run("install", env);
        assert_eq!(o.status.code(), Some(1), "{env:?}");
        assert!(output_text(&o).contains(message), "{env:?}: {}", output_text(&o));
        assert_eq!(std::fs::read(&conf_path).unwrap(), conf_before, "{env:?}");
    }
    // Servers named explicitly.
    let o = inst.run("install", &[("RUST_IPAM_SERVER", "http://10.0.0.10:50051,http://10.0.0.11:50051")]);
    assert!(o.status.success(), "{}", output_text(&o));
    assert_eq!(nad_ipam(&conf_path).servers, ["http://10.0.0.10:50051", "http://10.0.0.11:50051"]);

    // check fails once a binary is gone; uninstall removes only what install wrote.
    std::fs::remove_file(inst.bin_dir().join("rust-ipvlan")).unwrap();
    let o = inst.run("check", &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(output_text(&o).contains("rust-ipvlan is not installed"), "{}", output_text(&o));
    std::fs::write(inst.bin_dir().join("macvlan"), "another plugin").unwrap();
    let o = inst.run("uninstall", &[]);
    assert!(o.status.success(), "{}", output_text(&o));
    assert_eq!(inst.files(), BTreeSet::from(["host/opt/cni/bin/macvlan".to_string()]));
    assert!(!inst.conf_dir().exists());
}

/// Every file and directory under `dir`, relative to it, with its mode and content (empty for
/// a directory).
fn snapshot(dir: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).into_iter().flatten() {
            let p = e.expect("entry").path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if p.is_dir() {
                out.insert(rel, (mode(&p), Vec::new()));
                walk(root, &p, out);
            } else {
                out.insert(rel, (mode(&p), std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

const CA_PEM: &str = "-----BEGIN CERTIFICATE-----\nY2EK\n-----END CERTIFICATE-----\n";
const NODE_CERT_PEM: &str = "-----BEGIN CERTIFICATE-----\nbm9kZQo=\n-----END CERTIFICATE-----\n";
const NODE_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----\na2V5Cg==\n-----END PRIVATE KEY-----\n";

#[test]
fn node_installer_tls_mode_copies_the_certificates_and_writes_https() {
    const TEST: &str = "node_installer_tls_mode_copies_the_certificates_and_writes_https";
    if let Some(why) = missing(&[("sh", &["-c", "command -v cmp >/dev/null && command -v grep >/dev/null"])])
    {
        return skip(TEST, &why);
    }
    let inst = Installer::in_temp_dir();
    let secret = inst.dir.path().join("node-tls");
    secret_volume(&secret, 1, &[("ca.crt", CA_PEM), ("tls.crt", NODE_CERT_PEM), ("tls.key", NODE_KEY_PEM)]);
    let secret_str = secret.to_str().unwrap();
    let tls_env = [("RUST_IPAM_TLS_DIR", secret_str)];
    let o = inst.run("install", &tls_env);
    assert!(o.status.success(), "install failed:\n{}", output_text(&o));

    // The three files in tls/ (no temporary ones), a directory only root enters, the key
    // readable by root only.
    let tls_dir = inst.conf_dir().join("tls");
    assert!(inst.files().contains("host/etc/cni/net.d/rust-ipam.d/tls"));
    let in_tls: BTreeSet<String> = std::fs::read_dir(&tls_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(in_tls, BTreeSet::from(["ca.crt", "tls.crt", "tls.key"].map(String::from)));
    assert_eq!(mode(&tls_dir), 0o700);
    for (f, content, m) in
        [("ca.crt", CA_PEM, 0o644), ("tls.crt", NODE_CERT_PEM, 0o644), ("tls.key", NODE_KEY_PEM, 0o600)]
    {
        let p = tls_dir.join(f);
        assert!(!std::fs::symlink_metadata(&p).unwrap().file_type().is_symlink(), "{f} is a copy");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), content, "{f}");
        assert_eq!(mode(&p), m, "{f}");
    }
    // The node file: the Service over https and the host paths of the files.
    let conf_path = inst.conf_dir().join("rust-ipam.conf");
    assert_eq!(mode(&conf_path), 0o644);
    let conf: Value = serde_json::from_str(&std::fs::read_to_string(&conf_path).unwrap()).expect("JSON");
    assert_eq!(
        conf,
        json!({
            "server": ["https://10.96.0.50:50051"],
            "node_name": "worker-1",
            "timeout_ms": 10000,
            "tls_ca": "/etc/cni/net.d/rust-ipam.d/tls/ca.crt",
            "tls_cert": "/etc/cni/net.d/rust-ipam.d/tls/tls.crt",
            "tls_key": "/etc/cni/net.d/rust-ipam.d/tls/tls.key"
        })
    );
    assert_eq!(inst.run("check", &tls_env).status.code(), Some(0));

    // The plugin reads that file, and the certificates through it: here the "host" is the
    // temp dir, so the config names the files where this test can read them.
    let conf_dir = inst.conf_dir();
    let host_env =
        [("RUST_IPAM_TLS_DIR", secret_str), ("RUST_IPAM_NODE_CONF_DIR", conf_dir.to_str().unwrap())];
    let o = inst.run("install", &host_env);
    assert!(o.status.success(), "{}", output_text(&o));
    let ipam = nad_ipam(&conf_path);
    assert_eq!(ipam.servers, ["https://10.96.0.50:50051"]);
    assert_eq!(ipam.node_name, "worker-1");
    let tls = ipam.tls.expect("the plugin's TLS settings");
    assert_eq!(tls.ca, CA_PEM.as_bytes());
    assert_eq!(tls.identity, Some((NODE_CERT_PEM.as_bytes().to_vec(), NODE_KEY_PEM.as_bytes().to_vec())));
    let o = inst.run("install", &tls_env);
    assert!(o.status.success(), "{}", output_text(&o));

    // A renewal (the kubelet swaps ..data): the new certificate replaces the old by rename;
    // the unchanged CA is not rewritten.
    let ino = |f: &str| std::fs::metadata(tls_dir.join(f)).unwrap().ino();
    let (ca_ino, cert_ino) = (ino("ca.crt"), ino("tls.crt"));
    let renewed = NODE_CERT_PEM.replace("bm9kZQo=", "bm9kZTIK");
    let renewed_key = NODE_KEY_PEM.replace("a2V5Cg==", "a2V5MgoK");
    secret_volume(&secret, 2, &[("ca.crt", CA_PEM), ("tls.crt", &renewed), ("tls.key", &renewed_key)]);
    let o = inst.run("install", &tls_env);
    assert!(o.status.success(), "{}", output_text(&o));
    assert_eq!(std::fs::read_to_string(tls_dir.join("tls.crt")).unwrap(), renewed);
    assert_eq!(std::fs::read_to_string(tls_dir.join("tls.key")).unwrap(), renewed_key);
    assert_eq!(mode(&tls_dir.join("tls.key")), 0o600);
    assert_eq!(ino("ca.crt"), ca_ino);
    assert_ne!(ino("tls.crt"), cert_ino);
    let ca_wrote = format!("wrote {}", tls_dir.join("ca.crt").display());
    assert!(!output_text(&o).contains(&ca_wrote), "{}", output_text(&o));

    // `run` (what the DaemonSet runs) keeps the copies in step with the mounted Secret.
    let mut running = Killed(
        inst.command("run", &[("RUST_IPAM_TLS_DIR", secret_str), ("RUST_IPAM_REFRESH_SECONDS", "1")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn run"),
    );
    let third = NODE_CERT_PEM.replace("bm9kZQo=", "bm9kZTMK");
    secret_volume(&secret, 3, &[("ca.crt", CA_PEM), ("tls.crt", &third), ("tls.key", &renewed_key)]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::read_to_string(tls_dir.join("tls.crt")).unwrap() != third {
        assert!(running.0.try_wait().unwrap().is_none(), "run exited");
        assert!(std::time::Instant::now() < deadline, "run did not copy the renewed certificate");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(running);
    assert_eq!(mode(&tls_dir.join("tls.key")), 0o600);

    // A TLS directory that is not complete, or not PEM, or servers that are not https: a
    // clear error, and nothing on the host changes (not even a new binary in the image).
    std::fs::write(inst.dir.path().join("image/cni/rust-ipam"), "#!/bin/sh\necho rust-ipam v2\n").unwrap();
    let host = inst.dir.path().join("host");
    let before = snapshot(&host);
    let partial = |name: &str, files: &[(&str, &str)]| {
        let d = inst.dir.path().join(name);
        secret_volume(&d, 1, files);
        d.to_str().unwrap().to_string()
    };
    let no_key = partial("no-key", &[("ca.crt", CA_PEM), ("tls.crt", NODE_CERT_PEM)]);
    let no_ca = partial("no-ca", &[("tls.crt", NODE_CERT_PEM), ("tls.key", NODE_KEY_PEM)]);
    let empty_cert = partial("empty-cert", &[("ca.crt", CA_PEM), ("tls.crt", ""), ("tls.key", NODE_KEY_PEM)]);
    let not_pem =
        partial("not-pem", &[("ca.crt", "ca"), ("tls.crt", NODE_CERT_PEM), ("tls.key", NODE_KEY_PEM)]);
    let absent = inst.dir.path().join("absent").to_str().unwrap().to_string();
    let needs = "the node TLS Secret needs the keys ca.crt, tls.crt and tls.key";
    for (env, message) in [
        (vec![("RUST_IPAM_TLS_DIR", no_key.as_str())], format!("error: RUST_IPAM_TLS_DIR \"{no_key}\" has no tls.key (or it is empty): {needs}")),
        (vec![("RUST_IPAM_TLS_DIR", no_ca.as_str())], format!("error: RUST_IPAM_TLS_DIR \"{no_ca}\" has no ca.crt (or it is empty): {needs}")),
        (vec![("RUST_IPAM_TLS_DIR", empty_cert.as_str())], format!("error: RUST_IPAM_TLS_DIR \"{empty_cert}\" has no tls.crt (or it is empty): {needs}")),
        (vec![("RUST_IPAM_TLS_DIR", not_pem.as_str())], format!("error: {not_pem}/ca.crt is not PEM (no -----BEGIN line)")),
        (
            vec![("RUST_IPAM_TLS_DIR", absent.as_str())],
            format!("error: RUST_IPAM_TLS_DIR \"{absent}\" is not a directory (mount the node's TLS Secret there)"),
        ),
        (
            vec![("RUST_IPAM_TLS_DIR", secret_str), ("RUST_IPAM_SERVER", "https://10.0.0.10:50051,http://10.0.0.11:50051")],
            "error: server \"http://10.0.0.11:50051\" is not https:// but RUST_IPAM_TLS_DIR is set: with mutual TLS every server must be https://host:port".to_string(),
        ),
    ] {
        let o = inst.run("install", &env);
        assert_eq!(o.status.code(), Some(1), "{env:?}: {}", output_text(&o));
        let text = output_text(&o);
        assert_eq!(text.trim_end(), format!("rust-ipam-node-install: {message}"), "{env:?}");
        assert_eq!(snapshot(&host), before, "{env:?} changed the host");
    }
    // check notices a missing key.
    std::fs::remove_file(tls_dir.join("tls.key")).unwrap();
    let o = inst.run("check", &tls_env);
    assert_eq!(o.status.code(), Some(1));
    assert!(output_text(&o).contains("rust-ipam.d/tls/tls.key is not installed"), "{}", output_text(&o));

    // Explicit https servers are kept as given.
    let o = inst.run(
        "install",
        &[("RUST_IPAM_TLS_DIR", secret_str), ("RUST_IPAM_SERVER", "https://10.0.0.10:50051")],
    );
    assert!(o.status.success(), "{}", output_text(&o));
    let conf: Value = serde_json::from_str(&std::fs::read_to_string(&conf_path).unwrap()).unwrap();
    assert_eq!(conf["server"], json!(["https://10.0.0.10:50051"]));
    assert_eq!(mode(&tls_dir.join("tls.key")), 0o600);

    // Back to plaintext (the base DaemonSet): http, no TLS keys, and the copies are gone.
    let o = inst.run("install", &[]);
    assert!(o.status.success(), "{}", output_text(&o));
    let conf: Value = serde_json::from_str(&std::fs::read_to_string(&conf_path).unwrap()).unwrap();
    assert_eq!(
        conf,
        json!({"server": ["http://10.96.0.50:50051"], "node_name": "worker-1", "timeout_ms": 10000})
    );
    assert!(!tls_dir.exists());
    assert!(output_text(&o).contains("removed"), "{}", output_text(&o));
}

/// RUST_IPAM_TOKEN_DIR (the node DaemonSet's projected token for `--authorize`): the token
/// copied to the host readable by root only, named as the plugin's token_file, read by the
/// plugin, and a renewed token copied over by `install` again.
#[test]
fn node_installer_token_mode_gives_the_plugin_the_pods_token() {
    const TEST: &str = "node_installer_token_mode_gives_the_plugin_the_pods_token";
    if let Some(why) = missing(&[("sh", &["-c", "command -v cmp >/dev/null && command -v grep >/dev/null"])])
    {
        return skip(TEST, &why);
    }
    let inst = Installer::in_temp_dir();
    let projected = inst.dir.path().join("ipam-token");
    secret_volume(&projected, 1, &[("token", "header.claims.signature\n")]);
    let conf_dir = inst.conf_dir();
    let env = [
        ("RUST_IPAM_TOKEN_DIR", projected.to_str().unwrap()),
        ("RUST_IPAM_NODE_CONF_DIR", conf_dir.to_str().unwrap()),
    ];
    let o = inst.run("install", &env);
    assert!(o.status.success(), "install failed:\n{}", output_text(&o));
    let token = conf_dir.join("rust-ipam.token");
    assert_eq!(mode(&token), 0o600);
    let conf: Value =
        serde_json::from_str(&std::fs::read_to_string(conf_dir.join("rust-ipam.conf")).unwrap())
            .expect("JSON");
    assert_eq!(conf["token_file"], json!(token.to_str().unwrap()));
    assert_eq!(nad_ipam(&conf_dir.join("rust-ipam.conf")).token.as_deref(), Some("header.claims.signature"));

    secret_volume(&projected, 2, &[("token", "header.claims.renewed\n")]);
    assert!(inst.run("install", &env).status.success());
    assert_eq!(std::fs::read_to_string(&token).unwrap(), "header.claims.renewed\n");

    // Without the variable the token and the key are gone.
    let o = inst.run("install", &[]);
    assert!(o.status.success(), "{}", output_text(&o));
    assert!(!token.exists());
    let conf = std::fs::read_to_string(conf_dir.join("rust-ipam.conf")).unwrap();
    assert!(!conf.contains("token_file"), "{conf}");
    // A directory without a token fails before anything is written, and says why.
    let empty = inst.dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = inst.run("install", &[("RUST_IPAM_TOKEN_DIR", empty.to_str().unwrap())]);
    assert!(!o.status.success());
    assert!(output_text(&o).contains("holds no token"), "{}", output_text(&o));
}
