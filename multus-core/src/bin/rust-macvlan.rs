//! `rust-macvlan`: a macvlan link on the master, straight into the pod's namespace, with its
//! addresses from the `ipam` plugin. See `multus_core::delegate`.

fn main() -> std::process::ExitCode {
    cni::main(multus_core::delegate::LinkPlugin(multus_core::delegate::Kind::Macvlan))
}
