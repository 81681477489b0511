//! `deploy/`'s objects against what they must match: the rendered manifests (base and mTLS
//! overlay) and the hand-applied ones against the Kubernetes schemas (PyPI's
//! `kubernetes-validate --strict`, offline), the CRD-typed examples against our generated
//! CRDs, those examples against what the server writes for the example NAD, and the
//! example IPPool against the server's own check and the NAD that names it.
//!
//! Needs `kubectl` (for kustomize) and `kubernetes-validate` (`pip install
//! kubernetes-validate==1.37.0`) for the first test; without them it prints `SKIP` (and
//! fails when `CI` is set).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use ipam_server::allocator::{
    AllocateRequest, Allocator, Attachment, Change, FieldPrefix, PodRef, RangeInput, RangeSpec,
};
use ipam_server::k8s::crd::{
    IPLease, IPLeaseSpec, IPPool, RangePool, RangePoolSpec, RangePoolStatus, lease_name, pool_name,
};
use rust_ipam_e2e::deploy::{
    KUBECTL, MTLS_OVERLAY, NAMESPACE, THICK_OVERLAY, example, missing, nad_ipam, output_text, read, render,
    repo, yaml_docs,
};
use rust_ipam_e2e::skip;
use serde_json::{Value, json};

/// Kubernetes versions the manifests are validated against: the oldest supported here and
/// the newest kubernetes-validate 1.37.0 carries.
const KUBERNETES_VERSIONS: &[&str] = &["1.29.0", "1.37.0"];

/// Runs kubernetes-validate on `files`; its output when it failed or warned (a WARN is
/// how it reports an apiVersion/kind it has no schema for, e.g. a removed API).
fn kubernetes_validate(version: &str, files: &[PathBuf]) -> Result<(), String> {
    let o = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet", "-k", version])
        .args(files)
        .output()
        .map_err(|e| format!("running kubernetes-validate: {e}"))?;
    let text = output_text(&o);
    let complaints: Vec<&str> =
        text.lines().filter(|l| l.starts_with("WARN") || l.starts_with("ERROR")).collect();
    if o.status.success() && complaints.is_empty() {
        Ok(())
    } else {
        Err(format!("kubernetes-validate --strict -k {version} failed ({}):\n{text}", o.status))
    }
}

#[test]
fn manifests_pass_kubernetes_validate_strict() {
    const TEST: &str = "manifests_pass_kubernetes_validate_strict";
    if let Some(why) = missing(&[KUBECTL, ("kubernetes-validate", &["--version"])]) {
        return skip(TEST, &why);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let rendered = dir.path().join("rendered.yaml");
    std::fs::write(&rendered, render("deploy")).expect("write");
    let rendered_mtls = dir.path().join("rendered-mtls.yaml");
    std::fs::write(&rendered_mtls, render(MTLS_OVERLAY)).expect("write");
    let rendered_thick = dir.path().join("rendered-thick.yaml");
    std::fs::write(&rendered_thick, render(THICK_OVERLAY)).expect("write");
    let mut files = vec![rendered, rendered_mtls, rendered_thick];
    // Manifests applied by hand, outside the kustomization (built-in kinds only: CRD-typed
    // objects are checked against our CRDs below).
    for entry in std::fs::read_dir(repo().join("deploy/uninstall")).expect("deploy/uninstall") {
        files.push(entry.expect("entry").path());
    }
    for version in KUBERNETES_VERSIONS {
        if let Err(e) = kubernetes_validate(version, &files) {
            panic!("{e}");
        }
    }
    // The tool does reject what the API server would: a misspelled field, an API that is
    // gone.
    let bad = dir.path().join("bad.yaml");
    let text = read("deploy/base/server.yaml").replacen("readinessProbe:", "readinesProbe:", 1);
    std::fs::write(&bad, text).expect("write");
    let e =
        kubernetes_validate("1.37.0", std::slice::from_ref(&bad)).expect_err("a misspelled field is refused");
    assert!(e.contains("'readinesProbe' was unexpected"), "{e}");
    std::fs::write(&bad, read("deploy/base/reconcile.yaml").replace("batch/v1", "batch/v1beta1"))
        .expect("write");
    let e = kubernetes_validate("1.37.0", &[bad]).expect_err("a removed API is refused");
    assert!(e.contains("Couldn't find schema for kind CronJob with api version batch/v1beta1"), "{e}");
}

// ---- CRD-typed objects against the CRDs' openAPIV3Schema ----

/// The keywords of the structural schemas the API server accepts that this check
/// understands; a schema using any other makes the check fail rather than pass unchecked.
const KNOWN_KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "items",
    "additionalProperties",
    "nullable",
    "description",
    "title",
    "default",
    "format",
    "minimum",
    "maximum",
    "enum",
    "pattern",
    "minItems",
    "x-kubernetes-preserve-unknown-fields",
    // CEL rules, which this check cannot evaluate: the real API server does, for every
    // example (tests/tests/ippools.rs creates deploy/examples' IPPools there).
    "x-kubernetes-validations",
];

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Checks `v` against an OpenAPI v3 schema as the API server does for custom resources
/// under strict field validation (kubectl's default): wrong types, missing required fields,
/// out-of-range numbers and unknown fields are errors. `format` is not checked (the API
/// server does not check formats like int64 or uint8 either).
fn check_schema(schema: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
    let Some(s) = schema.as_object() else {
        return errs.push(format!("{path}: the schema is not an object"));
    };
    for k in s.keys() {
        if !KNOWN_KEYWORDS.contains(&k.as_str()) {
            errs.push(format!("{path}: schema keyword {k:?} is not supported by this check"));
        }
    }
    if v.is_null() {
        if s.get("nullable") != Some(&Value::Bool(true)) {
            errs.push(format!("{path}: null is not allowed"));
        }
        return;
    }
    let want = s.get("type").and_then(Value::as_str).unwrap_or_default();
    let ok = match want {
        "" => true,
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        other => {
            errs.push(format!("{path}: schema type {other:?} is not supported by this check"));
            true
        }
    };
    if !ok {
        return errs.push(format!("{path}: {v} is {}, the schema wants {want}", describe(v)));
    }
    if let Some(allowed) = s.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        errs.push(format!("{path}: {v} is not one of {}", Value::Array(allowed.clone())));
    }
    if let Some(n) = v.as_f64() {
        if let Some(min) = s.get("minimum").and_then(Value::as_f64)
            && n < min
        {
            errs.push(format!("{path}: {v} is below the minimum {min}"));
        }
        if let Some(max) = s.get("maximum").and_then(Value::as_f64)
            && n > max
        {
            errs.push(format!("{path}: {v} is above the maximum {max}"));
        }
    }
    if let (Some(pattern), Some(text)) = (s.get("pattern").and_then(Value::as_str), v.as_str()) {
        // The API server's patterns are ECMA-262; ours are plain enough for the regex crate.
        let re = regex::Regex::new(pattern).unwrap_or_else(|e| panic!("{path}: pattern {pattern:?}: {e}"));
        if !re.is_match(text) {
            errs.push(format!("{path}: {v} does not match the pattern {pattern:?}"));
        }
    }
    if let Some(items) = v.as_array() {
        if let Some(min) = s.get("minItems").and_then(Value::as_u64)
            && (items.len() as u64) < min
        {
            errs.push(format!("{path}: {} items, the schema wants at least {min}", items.len()));
        }
        if let Some(item_schema) = s.get("items") {
            for (i, item) in items.iter().enumerate() {
                check_schema(item_schema, item, &format!("{path}[{i}]"), errs);
            }
        }
        return;
    }
    let Some(obj) = v.as_object() else { return };
    for r in s.get("required").and_then(Value::as_array).into_iter().flatten() {
        let r = r.as_str().unwrap_or_default();
        if !obj.contains_key(r) {
            errs.push(format!("{path}: required field {r} is missing"));
        }
    }
    let props = s.get("properties").and_then(Value::as_object);
    let preserve = s.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    for (k, field) in obj {
        let at = format!("{path}.{k}");
        match (props.and_then(|p| p.get(k)), s.get("additionalProperties")) {
            (Some(sub), _) => check_schema(sub, field, &at, errs),
            (None, Some(extra)) if extra.is_object() => check_schema(extra, field, &at, errs),
            (None, Some(Value::Bool(true))) => {}
            (None, _) if preserve => {}
            (None, _) => errs.push(format!("{at}: unknown field (not in the CRD schema)")),
        }
    }
}

/// A DNS-1123 subdomain, what the API server requires of a custom resource's name.
fn dns_subdomain(name: &str) -> bool {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    !name.is_empty()
        && name.len() <= 253
        && name.chars().all(ok_char)
        && name.split('.').all(|label| alnum(label.chars().next()) && alnum(label.chars().last()))
}

/// The errors of `obj` against the CRD `crd`, `[]` when it is valid.
fn validate_against_crd(crd: &Value, obj: &Value) -> Vec<String> {
    let spec = &crd["spec"];
    let mut errs = Vec::new();
    let api_version = obj["apiVersion"].as_str().unwrap_or_default();
    let version = spec["versions"].as_array().and_then(|vs| {
        vs.iter().find(|v| {
            format!(
                "{}/{}",
                spec["group"].as_str().unwrap_or_default(),
                v["name"].as_str().unwrap_or_default()
            ) == api_version
                && v["served"] == true
        })
    });
    let Some(version) = version else {
        return vec![format!("apiVersion {api_version:?} is not served by {}", crd["metadata"]["name"])];
    };
    if obj["kind"] != spec["names"]["kind"] {
        errs.push(format!("kind {} is not {}", obj["kind"], spec["names"]["kind"]));
    }
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    if !dns_subdomain(name) {
        errs.push(format!("metadata.name {name:?} is not a DNS-1123 subdomain"));
    }
    if spec["scope"] == "Cluster" && obj["metadata"].get("namespace").is_some() {
        errs.push("metadata.namespace is set on a cluster-scoped resource".into());
    }
    // The API server adds apiVersion, kind and metadata to every CRD's schema.
    let mut schema = version["schema"]["openAPIV3Schema"].clone();
    let string_map = json!({"type": "object", "additionalProperties": {"type": "string"}});
    schema["properties"]["apiVersion"] = json!({"type": "string"});
    schema["properties"]["kind"] = json!({"type": "string"});
    schema["properties"]["metadata"] = json!({
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                       "labels": string_map, "annotations": string_map},
    });
    check_schema(&schema, obj, "", &mut errs);
    errs
}

fn crd_for(kind: &str) -> Value {
    for (file, yaml) in ipam_server::k8s::crd::crd_yaml() {
        let crd = yaml_docs(&yaml).remove(0);
        if crd["spec"]["names"]["kind"] == kind {
            // The same CRD as in crds/ (the ipam-server test keeps them equal).
            assert_eq!(yaml_docs(&read(&format!("crds/{file}"))).remove(0), crd);
            return crd;
        }
    }
    panic!("no CRD for kind {kind}");
}

/// The upstream NetworkAttachmentDefinition CRD's schema (k8s.cni.cncf.io/v1; Multus'
/// deployments/multus-daemonset.yml): `spec.config`, a string holding the CNI config JSON.
fn nad_crd() -> Value {
    json!({
        "metadata": {"name": "network-attachment-definitions.k8s.cni.cncf.io"},
        "spec": {
            "group": "k8s.cni.cncf.io", "scope": "Namespaced",
            "names": {"kind": "NetworkAttachmentDefinition"},
            "versions": [{"name": "v1", "served": true, "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {"spec": {"type": "object", "properties": {"config": {"type": "string"}}}}
            }}}]
        }
    })
}

#[test]
fn crd_typed_examples_validate_against_the_generated_crds() {
    for (file, kind) in
        [("iplease.yaml", "IPLease"), ("rangepool.yaml", "RangePool"), ("ippool.yaml", "IPPool")]
    {
        let errs = validate_against_crd(&crd_for(kind), &example(file));
        assert!(errs.is_empty(), "deploy/examples/{file}: {errs:#?}");
    }
    for file in ["network-attachment-definition.yaml", "network-attachment-definition-pool.yaml"] {
        let errs = validate_against_crd(&nad_crd(), &example(file));
        assert!(errs.is_empty(), "deploy/examples/{file}: {errs:#?}");
    }

    // An IPPool's schema refuses a cooldown that is not a duration and a pool without ranges.
    let pool_crd = crd_for("IPPool");
    let pool = example("ippool.yaml");
    let broken_pool = |edit: &dyn Fn(&mut Value)| {
        let mut obj = pool.clone();
        edit(&mut obj);
        validate_against_crd(&pool_crd, &obj)
    };
    assert_eq!(
        broken_pool(&|o| o["spec"]["cooldown"] = json!("30 seconds")),
        [r#".spec.cooldown: "30 seconds" does not match the pattern "^(0|[0-9]+(ms|s|m))$""#]
    );
    assert_eq!(
        broken_pool(&|o| o["spec"]["ranges"] = json!([])),
        [".spec.ranges: 0 items, the schema wants at least 1"]
    );
    assert_eq!(
        broken_pool(&|o| o["metadata"]["namespace"] = json!("rust-ipam")),
        ["metadata.namespace is set on a cluster-scoped resource"]
    );

    // The check refuses what the API server refuses, naming the field.
    let crd = crd_for("IPLease");
    let lease = example("iplease.yaml");
    let broken = |edit: &dyn Fn(&mut Value)| {
        let mut obj = lease.clone();
        edit(&mut obj);
        validate_against_crd(&crd, &obj)
    };
    assert_eq!(
        broken(&|o| o["spec"]["podref"] = json!("default/x")),
        [".spec.podref: unknown field (not in the CRD schema)"]
    );
    assert_eq!(
        broken(&|o| o["spec"]["prefixLen"] = json!("16")),
        [r#".spec.prefixLen: "16" is a string, the schema wants integer"#]
    );
    assert_eq!(
        broken(&|o| o["spec"]["prefixLen"] = json!(300)),
        [".spec.prefixLen: 300 is above the maximum 255"]
    );
    assert_eq!(
        broken(&|o| drop(o["spec"].as_object_mut().unwrap().remove("address"))),
        [".spec: required field address is missing"]
    );
    assert_eq!(broken(&|o| o["status"] = json!({})), [".status: unknown field (not in the CRD schema)"]);
    assert_eq!(broken(&|o| o["spec"]["gateway"] = Value::Null), Vec::<String>::new(), "gateway is nullable");
    assert_eq!(broken(&|o| o["spec"]["node"] = Value::Null), [".spec.node: null is not allowed"]);
    assert_eq!(
        broken(&|o| o["metadata"]["name"] = json!("10.56.0.16_")),
        [r#"metadata.name "10.56.0.16_" is not a DNS-1123 subdomain"#]
    );
    assert_eq!(
        broken(&|o| o["apiVersion"] = json!("ipam.rust-ipam.io/v1")),
        [r#"apiVersion "ipam.rust-ipam.io/v1" is not served by "ipleases.ipam.rust-ipam.io""#]
    );
    let mut odd = crd.clone();
    odd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["address"]
        ["maxLength"] = json!(39);
    assert_eq!(
        validate_against_crd(&odd, &lease),
        [r#".spec.address: schema keyword "maxLength" is not supported by this check"#]
    );
}

#[test]
fn the_example_pool_is_valid_and_the_pool_nad_names_it() {
    let pool: IPPool = serde_json::from_value(example("ippool.yaml")).expect("an IPPool");
    let name = pool.metadata.name.clone().expect("a name");
    let checked = ipam_server::pools::check(&name, &pool.spec).expect("the server takes the example pool");
    assert_eq!(checked.ranges_text(), "198.18.0.10-198.18.0.254/24,fd00:18::/64");
    assert_eq!(checked.cooldown, std::time::Duration::from_secs(30));

    let nad = example("network-attachment-definition-pool.yaml");
    let config = nad["spec"]["config"].as_str().expect("spec.config");
    let conf = ipam_cni::config::NetConf::parse(config.as_bytes(), Path::new("/nonexistent/rust-ipam.conf"))
        .unwrap_or_else(|e| panic!("the plugin refuses the pool NAD: {e:?}"));
    assert_eq!(conf.name, nad["metadata"]["name"], "the CNI network is named like the NAD");
    let ipam = conf.ipam.expect("ipam");
    assert_eq!((ipam.pool.as_str(), ipam.network_name.as_str()), (name.as_str(), name.as_str()));
    assert!(ipam.ranges.is_empty());
}

#[test]
fn the_eight_rail_example_is_eight_valid_per_node_pools() {
    let docs = yaml_docs(&read("deploy/examples/rails.yaml"));
    assert_eq!(docs.len(), 8);
    let crd = crd_for("IPPool");
    for (i, doc) in docs.iter().enumerate() {
        let errs = validate_against_crd(&crd, doc);
        assert!(errs.is_empty(), "deploy/examples/rails.yaml document {i}: {errs:#?}");
        let pool: IPPool = serde_json::from_value(doc.clone()).expect("an IPPool");
        assert_eq!(pool.metadata.name.as_deref(), Some(format!("rail{i}").as_str()));
        let checked = ipam_server::pools::check(&format!("rail{i}"), &pool.spec).expect("valid");
        let per_node = checked.per_node.expect("per-node blocks");
        assert_eq!((per_node.cut, per_node.gateway_index), (ipam_server::pools::Cut::Prefix(28), Some(1)));
        assert_eq!(checked.rail_group, "spectrum-x");
        // The first node's block on this rail: .1 the gateway, .2 to .14 for pods.
        let range = &checked.ranges[0];
        let first: ipam_server::allocator::Block = format!("198.18.{}.0/28", 16 * i).parse().expect("block");
        let block = per_node.block_range(first, range).expect("block");
        assert_eq!(block.gateway(), Some(format!("198.18.{}.1", 16 * i).parse().expect("ip")));
        assert_eq!(block.size() - block.excluded_count(), 13);
    }
}

#[test]
fn examples_are_what_the_server_writes_for_the_example_nad() {
    let ipam = nad_ipam(Path::new("/nonexistent/rust-ipam.conf"));
    assert_eq!(ipam.ranges.len(), 1);
    let r = &ipam.ranges[0];
    let input = RangeInput {
        range: r.range.clone(),
        range_start: r.range_start.clone(),
        range_end: r.range_end.clone(),
        exclude: r.exclude.clone(),
        gateway: ipam.gateway.clone(),
    };
    let lease_example: IPLease = serde_json::from_value(example("iplease.yaml")).expect("an IPLease");
    let pool_example: RangePool = serde_json::from_value(example("rangepool.yaml")).expect("a RangePool");

    // The first pod on the network, as the example lease names it.
    let s = &lease_example.spec;
    let (pod_ns, pod_name) = s.pod_ref.split_once('/').expect("podRef namespace/name");
    let attachment = Attachment {
        container_id: s.container_id.clone(),
        ifname: s.ifname.clone(),
        pod: PodRef { namespace: pod_ns.into(), name: pod_name.into(), uid: s.pod_uid.clone() },
        node: s.node.clone(),
        ..Default::default()
    };
    let mut alloc = Allocator::new();
    let spec = RangeSpec::parse(&input, FieldPrefix("")).expect("the NAD's range parses");
    let req = AllocateRequest {
        attachment: Arc::new(attachment),
        network: Arc::from(ipam.network_name.as_str()),
        ranges: vec![spec],
        requested: Vec::new(),
    };
    let leases = alloc.allocate(&req, s.created_unix_ms).expect("allocate");
    assert_eq!(leases.len(), 1);
    let want_addr: IpAddr = s.address.parse().expect("address");
    assert_eq!(leases[0].address, want_addr, "the first address the server hands out");

    // What the kube store writes for these changes (k8s/store.rs), object for object.
    let mut pools = 0;
    for change in alloc.drain_journal() {
        match change {
            Change::PutLease(l) => {
                assert_eq!(
                    lease_example.metadata.name.as_deref(),
                    Some(lease_name(&l.network, l.address).as_str())
                );
                assert_eq!(lease_example.spec, IPLeaseSpec::from(&*l));
            }
            Change::PutPool { network, range } => {
                pools += 1;
                assert_eq!(pool_example.metadata.name.as_deref(), Some(pool_name(&network, &range).as_str()));
                assert_eq!(pool_example.spec, RangePoolSpec::new(&network, &range));
            }
            Change::DeleteLease { .. } => panic!("nothing is deleted"),
        }
    }
    assert_eq!(pools, 1);
    // And the status the leader keeps (k8s/leader.rs).
    let usage = alloc.pools(None);
    assert_eq!(usage.len(), 1);
    let u = &usage[0];
    let status = RangePoolStatus {
        size: u.size.to_string(),
        used: u.used.to_string(),
        free: u.free.to_string(),
        excluded: u.excluded.to_string(),
    };
    assert_eq!(pool_example.status, Some(status));
    for ns in [&lease_example.metadata.namespace, &pool_example.metadata.namespace] {
        assert_eq!(ns.as_deref(), Some(NAMESPACE));
    }
}
