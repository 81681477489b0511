//! `rust-macvlan`: a macvlan link on the master, straight into the pod's namespace, with its
//! addresses from the `ipam` plugin. See `multus_core::link`.

fn main() -> std::process::ExitCode {
    cni::main(multus_core::link::LinkPlugin(multus_core::link::Kind::Macvlan))
}
