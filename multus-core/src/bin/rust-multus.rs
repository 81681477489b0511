//! `rust-multus`: the Multus-compatible meta-plugin the runtime execs as a CNI plugin.

fn main() -> std::process::ExitCode {
    cni::main(multus_core::multus::MultusPlugin)
}
