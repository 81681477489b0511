//! The CNI protocol and nothing else (spec 1.1, with the 0.3.x/0.4.0 result shape): the
//! commands and their environment ([`Env`], [`CniArgs`]), versions ([`Version`]), results
//! ([`CniResult`]) and errors ([`CniError`], [`ErrorCode`], [`ErrorList`]), and the harness
//! every plugin binary of the workspace runs in ([`Plugin`], [`main`]), and calling another
//! plugin as the spec says ([`exec`]).
//!
//! It knows no transport (gRPC, Kubernetes) and no system call beyond running a plugin, so a
//! plugin's protocol side is tested without a server or root.

mod env;
mod error;
pub mod exec;
mod plugin;
mod result;
mod version;

pub use env::{CniArgs, Env, split_path};
pub use error::{CniError, ErrorCode, ErrorList, Failure};
pub use plugin::{NetworkConfig, Output, Plugin, config_object, main, read_invocation, run};
pub use result::{
    CniResult, Dns, Interface, IpConfig, IpResult, ResultRoute, Route, check_ipam_extras, ipam_result,
    parse_cidr,
};
pub use version::{Command, LATEST_VERSION, SUPPORTED_VERSIONS, Version, check_version, version_info};
