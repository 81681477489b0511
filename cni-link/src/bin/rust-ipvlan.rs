//! `rust-ipvlan`: an ipvlan link on the master, straight into the pod's namespace, with its
//! addresses from the `ipam` plugin. See `cni_link`.

fn main() -> std::process::ExitCode {
    cni::main(cni_link::LinkPlugin(cni_link::Kind::Ipvlan))
}
