//! Compiles the kubelet's `.proto` files in `proto/` with protox (pure Rust), so a fresh
//! machine needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["podresources/v1/api.proto", "deviceplugin/v1beta1/api.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
