//! `rust-multus`: the Multus-compatible meta-plugin the runtime execs as a CNI plugin.

use std::io::{Read as _, Write as _};
use std::process::ExitCode;

use ipam_cni::cni::{CniError, LATEST_VERSION, code};
use multus_core::multus::{Invocation, run};

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
    let inv = match Invocation::from_env(|k| std::env::var(k).ok()) {
        Ok(i) => i,
        Err(e) => return fail(e, LATEST_VERSION),
    };
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        return fail(CniError::new(code::IO_FAILURE, format!("reading stdin: {e}")), LATEST_VERSION);
    }
    match run(&inv, &stdin) {
        Ok(Some(v)) => {
            print(&v);
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err((e, version)) => fail(e, &version),
    }
}
