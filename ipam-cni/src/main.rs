//! `rust-ipam`: the binary a runtime or a main plugin (macvlan, bridge, ...) execs.

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::ExitCode;

use ipam_cni::cni::{CniError, LATEST_VERSION, code};
use ipam_cni::config::NODE_CONFIG;
use ipam_cni::plugin::{Invocation, run};

fn print(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, v);
    let _ = out.write_all(b"\n");
}

fn main() -> ExitCode {
    let fail = |e: CniError, version: &str| {
        print(&e.to_json(version));
        ExitCode::FAILURE
    };
    let latest = LATEST_VERSION;
    let inv = match Invocation::from_env(|k| std::env::var(k).ok()) {
        Ok(i) => i,
        Err(e) => return fail(e, latest),
    };
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        return fail(CniError::new(code::IO_FAILURE, format!("reading stdin: {e}")), latest);
    }
    // One call per process: a single-threaded runtime starts fastest.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(CniError::new(code::IO_FAILURE, format!("starting the runtime: {e}")), latest),
    };
    match rt.block_on(run(&inv, &stdin, Path::new(NODE_CONFIG))) {
        Ok(Some(v)) => {
            print(&v);
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err((e, version)) => fail(e, &version),
    }
}
