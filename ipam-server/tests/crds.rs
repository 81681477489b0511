//! `crds/` holds exactly what the Rust types generate: regenerate with
//! `cargo run -p ipam-server --bin rust-ipam-server -- crds --out crds`.

use std::path::Path;

#[test]
fn crds_directory_matches_the_rust_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    for (file, yaml) in ipam_server::k8s::crd::crd_yaml() {
        let path = dir.join(file);
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == yaml,
            "{} differs from the generated CRD; regenerate with \
             `cargo run -p ipam-server --bin rust-ipam-server -- crds --out crds`",
            path.display()
        );
        let crd: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("generated YAML parses");
        assert_eq!(crd["spec"]["group"], "ipam.rust-ipam.io");
        assert!(
            crd["spec"]["versions"][0]["additionalPrinterColumns"]
                .as_sequence()
                .is_some_and(|c| c.len() >= 5)
        );
    }
}

#[test]
fn the_tests_ipamclaim_crd_matches_the_rust_type() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/envtest/ipamclaims.yaml");
    let yaml = ipam_server::k8s::keep::ipamclaim_crd_yaml();
    if std::env::var_os("RUST_IPAM_REGENERATE").is_some() {
        std::fs::write(&path, &yaml).expect("write");
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == yaml,
        "{} differs from the IPAMClaim type; regenerate with RUST_IPAM_REGENERATE=1",
        path.display()
    );
    let crd: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("generated YAML parses");
    assert_eq!(crd["metadata"]["name"], "ipamclaims.k8s.cni.cncf.io");
    assert_eq!(crd["spec"]["versions"][0]["name"], "v1alpha1");
}
