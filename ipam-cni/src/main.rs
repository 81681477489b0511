//! `rust-ipam`: the binary a runtime or a main plugin (macvlan, bridge, ...) execs.

fn main() -> std::process::ExitCode {
    cni::main(ipam_cni::plugin::IpamPlugin::default())
}
