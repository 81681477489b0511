//! Helpers for end-to-end tests: find the workspace's binaries and run the server as a real
//! process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rust_ipam_proto::v1::{StatusRequest, ipam_client::IpamClient};

/// Path of a binary built from this workspace, building it first if it is missing
/// (`cargo test --workspace` has already built it; `cargo test -p rust-ipam-e2e` has not).
pub fn workspace_bin(package: &str, name: &str) -> anyhow::Result<PathBuf> {
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().context("locating the test executable")?;
    let profile_dir = exe.parent().and_then(Path::parent).context("test executable has no target dir")?;
    let bin = profile_dir.join(name);
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", package, "--bin", name]);
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().with_context(|| format!("building {name}"))?;
        if !status.success() || !bin.exists() {
            bail!("could not build {name} (cargo build -p {package} --bin {name})");
        }
    }
    Ok(bin)
}

/// A free loopback TCP port (bound, then released: good enough for tests on one machine).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a probe port")?;
    Ok(l.local_addr()?.port())
}

/// A `rust-ipam-server` process serving on loopback with its store in `data_dir`.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// `127.0.0.1:PORT`, as grpcurl wants it.
    pub addr: String,
}

impl ServerProcess {
    /// Starts the server and waits until it answers Status.
    pub async fn start(data_dir: &Path) -> anyhow::Result<ServerProcess> {
        let bin = workspace_bin("ipam-server", "rust-ipam-server")?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let child = Command::new(bin)
            .arg("--listen")
            .arg(&addr)
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .context("spawning rust-ipam-server")?;
        let mut server = ServerProcess { child, endpoint: format!("http://{addr}"), addr };
        server.wait_ready(Duration::from_secs(20)).await?;
        Ok(server)
    }

    async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("rust-ipam-server exited early: {status}");
            }
            if let Ok(ch) = ipam_server::client::connect(&self.endpoint, Duration::from_millis(500)).await
                && IpamClient::new(ch).status(StatusRequest {}).await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("rust-ipam-server did not answer on {} within {within:?}", self.endpoint);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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
