//! `rust-multus-shim`: the node's CNI plugin in thick mode. It forwards the call (the CNI_*
//! variables and stdin) to `rust-multus-daemon` over its unix socket and prints the answer
//! with the same exit status; see `multus_core::multus::thick`.

use std::io::Read as _;
use std::process::ExitCode;

use multus_core::multus::thick::{CNI_VARS, shim};

fn main() -> ExitCode {
    let env = CNI_VARS.iter().filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v))).collect();
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        let e = cni::CniError::new(cni::ErrorCode::IO_FAILURE, format!("reading stdin: {e}"));
        return cni::Output::error(&e, &cni::LATEST_VERSION.to_string()).print();
    }
    shim(env, &stdin).print()
}
