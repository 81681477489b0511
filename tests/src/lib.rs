//! What the end-to-end tests and the load drivers share: the workspace's binaries as real
//! processes (here), and in the modules the fixtures, namespaces, API servers and `deploy/`.

pub mod cni_load;
pub mod deploy;
pub mod device_plugin;
pub mod engine;
pub mod envtest;
pub mod fixtures;
pub mod kube_standin;
pub mod microvm;
pub mod netns;
pub mod node;
pub mod pki;
pub mod relay;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rust_ipam_proto::v1::{StatusRequest, ipam_client::IpamClient};

/// Path of the workspace's binary `name`, next to the running executable (a test in
/// `target/<profile>/deps/` or a binary in `target/<profile>/`). Under cargo (`CARGO` set,
/// as in `cargo test`) the first call of a process runs `cargo build --workspace --bins` in
/// that profile, so a test never runs a stale binary; otherwise that build runs only when
/// the binary is missing.
///
/// Every binary, in one build: cargo unifies features over the packages it is asked for,
/// so `-p PACKAGE` builds give each package's binaries their own copies of kube, rustls,
/// tokio and the rest (a minute and more each); `.ci/run` and `scripts/demo.sh` run the
/// same command, which leaves this one nothing to do.
pub fn workspace_bin(name: &str) -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe.parent().context("the running executable has no directory")?;
    if dir.file_name().is_some_and(|d| d == "deps") {
        dir = dir.parent().context("deps/ has no parent")?;
    }
    let bin = dir.join(name);
    let under_cargo = std::env::var_os("CARGO");
    if under_cargo.is_some() || !bin.exists() {
        let built = BUILT.get_or_init(|| {
            let mut cmd = Command::new(under_cargo.unwrap_or_else(|| "cargo".into()));
            cmd.args(["build", "--quiet", "--workspace", "--bins"]);
            // Without what cargo sets for the test it runs (a shell has none of it): build
            // scripts that watch these (ring's watches CARGO_MANIFEST_DIR and CARGO_PKG_*)
            // would rerun, and every crate above them rebuild, at each switch between this
            // build and `.ci/run`'s.
            for (key, _) in std::env::vars_os() {
                if key.to_str().is_some_and(|k| {
                    k.starts_with("CARGO_PKG_")
                        || [
                            "CARGO_MANIFEST_DIR",
                            "CARGO_MANIFEST_PATH",
                            "CARGO_CRATE_NAME",
                            "CARGO_BIN_NAME",
                            "CARGO_PRIMARY_PACKAGE",
                            "CARGO_TARGET_TMPDIR",
                        ]
                        .contains(&k)
                }) {
                    cmd.env_remove(key);
                }
            }
            // The profile's directory: `debug` is the dev profile's (and the test
            // profile's), any other is named after its profile (`release` for bench too).
            let profile = dir.file_name().and_then(|p| p.to_str()).unwrap_or("debug");
            if profile != "debug" {
                cmd.args(["--profile", profile]);
            }
            match cmd.status() {
                Ok(s) if s.success() => Ok(()),
                Ok(s) => Err(format!("{cmd:?} failed ({s})")),
                Err(e) => Err(format!("running {cmd:?}: {e}")),
            }
        });
        if let Err(e) = built {
            bail!("{} could not be built: {e}", bin.display());
        }
    }
    if !bin.exists() {
        bail!(
            "{} is not among the workspace's binaries (cargo build --workspace --bins made no such file)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Prints `SKIP` and why for a test this machine cannot run; in CI (`CI` set), where
/// everything is installed, it fails the test instead.
pub fn skip(test: &str, why: &str) {
    assert!(std::env::var_os("CI").is_none(), "CI must run {test}: {why}");
    println!("SKIP {test}: {why}");
}

/// What a CNI plugin answered.
#[derive(Debug)]
pub struct CniOutput {
    /// The exit status; -1 when a signal ended the plugin.
    pub code: i32,
    /// Stdout as JSON (a result, a CNI error, VERSION's answer); `Null` when it printed
    /// nothing.
    pub out: serde_json::Value,
    pub stderr: String,
}

/// Runs a CNI plugin as a runtime does: `cmd` (the plugin, or a wrapper such as `ip netns
/// exec NS plugin`) with no environment but `env`, and `stdin` as its input. Panics when it
/// cannot be run or prints something that is not JSON: no plugin may do that.
pub fn run_cni(cmd: &mut Command, env: &[(&str, &str)], stdin: &str) -> CniOutput {
    use std::io::Write as _;
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin.as_bytes())
        .unwrap_or_else(|e| panic!("writing the input of {program}: {e}"));
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("waiting for {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = if stdout.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{program} printed no JSON ({e}): {stdout:?}"))
    };
    CniOutput {
        code: out.status.code().unwrap_or(-1),
        out: json,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs the workspace's `rust-ipam` plugin as a runtime runs an IPAM plugin for `net1` of
/// container `cid`: `cni_args` is `CNI_ARGS` (the pod), `conf` the network configuration.
/// Outside any pod namespace: the plugin only talks to its server.
pub fn run_ipam_plugin(command: &str, cid: &str, cni_args: &str, conf: &serde_json::Value) -> CniOutput {
    let bin = workspace_bin("rust-ipam").expect("the rust-ipam binary");
    let env = [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", cid),
        ("CNI_NETNS", "/proc/self/ns/net"),
        ("CNI_IFNAME", "net1"),
        // Required, and never searched: an IPAM plugin calls no other plugin.
        ("CNI_PATH", "/nonexistent"),
        ("CNI_ARGS", cni_args),
    ];
    run_cni(&mut Command::new(bin), &env, &conf.to_string())
}

/// A free loopback TCP port. It is free when we look and bound a moment later; a process
/// taking it in between makes the server fail to start, which is reported.
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a probe port")?;
    Ok(l.local_addr()?.port())
}

/// How to start `rust-ipam-server`.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The binary; `None`: the workspace's, see [`workspace_bin`].
    pub bin: Option<PathBuf>,
    /// `RUST_LOG` of the server.
    pub log_level: String,
    /// File for the server's log; `None`: it inherits stderr.
    pub log_file: Option<PathBuf>,
    /// `--identity` of the server.
    pub identity: String,
    /// How long it may take to answer Status.
    pub startup_timeout: Duration,
    /// Also listen on this unix socket (reachable from other network namespaces).
    pub unix_socket: Option<PathBuf>,
    /// More command-line arguments (e.g. the kube store's).
    pub args: Vec<String>,
    /// The gRPC address (`127.0.0.1:PORT`); `None`: a free port. A server started again
    /// where clients already point.
    pub addr: Option<String>,
    /// Wait until it serves (leads); `false`: until it answers Status at all (a follower).
    pub wait_serving: bool,
    /// The server runs TLS (pass its `--tls-*` flags in `args`): the endpoint is
    /// `https://` and this is what the client presents.
    pub tls: Option<rust_ipam_proto::ClientTls>,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        ServerOptions {
            bin: None,
            log_level: "warn".into(),
            log_file: None,
            identity: "e2e".into(),
            startup_timeout: Duration::from_secs(20),
            unix_socket: None,
            args: Vec::new(),
            addr: None,
            wait_serving: true,
            tls: None,
        }
    }
}

impl ServerOptions {
    /// A replica on the kube store: `kubeconfig`'s credentials, leases in `namespace`,
    /// `identity`, info log to `log`, `extra` arguments after those; started without
    /// waiting to lead (a replica may follow).
    pub fn kube_replica(
        identity: &str,
        kubeconfig: &Path,
        namespace: &str,
        log: PathBuf,
        extra: &[&str],
    ) -> ServerOptions {
        let mut args: Vec<String> =
            ["--kubeconfig", &kubeconfig.display().to_string(), "--namespace", namespace]
                .map(String::from)
                .to_vec();
        args.extend(extra.iter().map(|a| a.to_string()));
        ServerOptions {
            identity: identity.into(),
            log_level: "info".into(),
            log_file: Some(log),
            wait_serving: false,
            args,
            ..ServerOptions::default()
        }
    }
}

/// A `rust-ipam-server` process serving on loopback; killed when dropped.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    /// `http://127.0.0.1:PORT` (`https://` with TLS).
    pub endpoint: String,
    /// `127.0.0.1:PORT`, as grpcurl wants it.
    pub addr: String,
    /// `127.0.0.1:PORT` of `/metrics`, `/healthz` and `/readyz`.
    pub metrics_addr: String,
}

/// Last lines of a log file, for error messages.
fn log_tail(log: Option<&Path>) -> String {
    let Some(text) = log.and_then(|l| std::fs::read_to_string(l).ok()) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    format!("; its log ends:\n{}", lines[lines.len().saturating_sub(20)..].join("\n"))
}

impl ServerProcess {
    /// Starts the workspace's server with default options and waits until it answers.
    pub async fn start(data_dir: &Path) -> anyhow::Result<ServerProcess> {
        ServerProcess::start_with(data_dir, &ServerOptions::default()).await
    }

    /// Starts the server with its store in `data_dir` and waits until it answers Status as
    /// the serving replica.
    pub async fn start_with(data_dir: &Path, opts: &ServerOptions) -> anyhow::Result<ServerProcess> {
        let bin = match &opts.bin {
            Some(b) => b.clone(),
            None => workspace_bin("rust-ipam-server")?,
        };
        let addr = match &opts.addr {
            Some(a) => a.clone(),
            None => format!("127.0.0.1:{}", free_port()?),
        };
        let metrics_addr = format!("127.0.0.1:{}", free_port()?);
        let stderr = match &opts.log_file {
            Some(path) => Stdio::from(
                std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
            ),
            None => Stdio::inherit(),
        };
        let mut cmd = Command::new(&bin);
        if let Some(sock) = &opts.unix_socket {
            cmd.arg("--listen").arg(format!("unix:{}", sock.display()));
        }
        let child = cmd
            .arg("--listen")
            .arg(&addr)
            .arg("--metrics-listen")
            .arg(&metrics_addr)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--identity")
            .arg(&opts.identity)
            .args(&opts.args)
            .env("RUST_LOG", &opts.log_level)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let scheme = if opts.tls.is_some() { "https" } else { "http" };
        let mut server = ServerProcess { child, endpoint: format!("{scheme}://{addr}"), addr, metrics_addr };
        server.wait_ready(opts).await?;
        Ok(server)
    }

    async fn wait_ready(&mut self, opts: &ServerOptions) -> anyhow::Result<()> {
        let deadline = Instant::now() + opts.startup_timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "rust-ipam-server exited during startup ({status}){}",
                    log_tail(opts.log_file.as_deref())
                );
            }
            if let Ok(ch) =
                rust_ipam_proto::connect_with(&self.endpoint, Duration::from_millis(500), opts.tls.as_ref())
                    .await
                && IpamClient::new(ch)
                    .status(StatusRequest {})
                    .await
                    .is_ok_and(|s| s.get_ref().serving || !opts.wait_serving)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "rust-ipam-server did not answer on {} within {:?}{}",
                    self.endpoint,
                    opts.startup_timeout,
                    log_tail(opts.log_file.as_deref())
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// GETs `path` from the metrics listener: the status code and the body.
    pub async fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(&self.metrics_addr)
            .await
            .with_context(|| format!("connecting to {}", self.metrics_addr))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes()).await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        let (head, body) = out.split_once("\r\n\r\n").context("no HTTP header end")?;
        let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no status code")?;
        Ok((code, body.to_string()))
    }

    /// The server's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the process to exit.
    pub fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().context("kill -TERM")?;
        self.child.wait().context("waiting for the server")
    }

    /// SIGKILL: no shutdown path runs, as in a node or OOM kill.
    pub fn kill_hard(&mut self) -> anyhow::Result<()> {
        self.child.kill().context("kill -9")?;
        self.child.wait().context("reaping the server")?;
        Ok(())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
