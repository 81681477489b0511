//! `deploy/`: what `kubectl kustomize deploy/` renders is valid for the Kubernetes API
//! (PyPI's `kubernetes-validate --strict`, offline), wired together consistently (Service to
//! pods, probes to ports, the CronJob and the node config to the Service, bindings to
//! accounts), the CRD-typed examples validate against our generated CRDs and are what the
//! server writes, and the node installer script installs atomically a config the plugin
//! reads; the production overlay `deploy/overlays/mtls` (mutual TLS, admin socket, no
//! CronJob) is wired as documented, and its server args, the documented openssl certificates,
//! the installer in TLS mode and the real plugin work together over mutual TLS.
//!
//! Needs `kubectl` (for kustomize) and `kubernetes-validate` (`pip install
//! kubernetes-validate==1.37.0`); without them the tests that need them print `SKIP` (and
//! fail when `CI` is set); the end-to-end TLS test also needs `openssl` and `bash`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use ipam_server::allocator::{
    AllocateRequest, Allocator, Attachment, Change, FieldPrefix, PodRef, RangeInput, RangeSpec,
};
use ipam_server::k8s::crd::{
    IPLease, IPLeaseSpec, RangePool, RangePoolSpec, RangePoolStatus, lease_name, pool_name,
};
use serde_json::{Value, json};

/// Kubernetes versions the manifests are validated against: the oldest supported here and
/// the newest kubernetes-validate 1.37.0 carries.
const KUBERNETES_VERSIONS: &[&str] = &["1.29.0", "1.37.0"];
const NAMESPACE: &str = "rust-ipam";
/// `--lease-name`'s default in `rust-ipam-server`; the Role grants get/patch on it by name.
const LEADER_LEASE: &str = "rust-ipam-leader";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Prints `SKIP` for a test the machine cannot run; in CI that is a failure.
fn skip(test: &str, why: &str) {
    assert!(std::env::var_os("CI").is_none(), "CI must run {test}: {why}");
    println!("SKIP {test}: {why}");
}

/// Why `program` cannot be run, if it cannot.
fn missing(program: &str, version_args: &[&str]) -> Option<String> {
    match Command::new(program).args(version_args).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("{program} {version_args:?} failed: {}", String::from_utf8_lossy(&o.stderr))),
        Err(e) => Some(format!("{program} is not installed ({e})")),
    }
}

/// Every YAML document of `text` as JSON (empty documents dropped).
fn yaml_docs(text: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// `v` with whole floats as integers: kustomize re-serializes `255.0` as `255`, the same
/// number to the API server.
fn normalize(v: Value) -> Value {
    match v {
        Value::Number(n)
            if n.as_f64().is_some_and(|f| f.fract() == 0.0 && f.abs() < 1e15)
                && !n.is_i64()
                && !n.is_u64() =>
        {
            json!(n.as_f64().unwrap() as i64)
        }
        Value::Array(a) => Value::Array(a.into_iter().map(normalize).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, normalize(v))).collect()),
        other => other,
    }
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn output_text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `kubectl kustomize deploy/`.
fn render() -> String {
    render_dir("deploy")
}

/// `kubectl kustomize <dir>` (`dir` relative to the repository).
fn render_dir(dir: &str) -> String {
    let o = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo().join(dir))
        .output()
        .expect("run kubectl kustomize");
    assert!(o.status.success(), "kubectl kustomize {dir} failed:\n{}", output_text(&o));
    String::from_utf8(o.stdout).expect("UTF-8 output")
}

fn key(v: &Value) -> (String, String, String) {
    let s = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or_default().to_string();
    (s("/kind"), s("/metadata/namespace"), s("/metadata/name"))
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("the rendered manifests have no {kind} {name}"))
}

fn container<'a>(pod_spec: &'a Value, name: &str) -> &'a Value {
    pod_spec["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name} in {pod_spec}"))
}

fn env_field_ref(c: &Value, name: &str) -> String {
    c["env"]
        .as_array()
        .and_then(|e| e.iter().find(|v| v["name"] == name))
        .and_then(|v| v.pointer("/valueFrom/fieldRef/fieldPath"))
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("container {} has no env {name} from a fieldRef", c["name"]))
        .to_string()
}

/// The container port named `name`.
fn named_port(c: &Value, name: &str) -> i64 {
    c["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .and_then(|p| p["containerPort"].as_i64())
        .unwrap_or_else(|| panic!("container {} has no port named {name}", c["name"]))
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|sel| !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

#[test]
fn kustomize_renders_every_object_wired_together() {
    const TEST: &str = "kustomize_renders_every_object_wired_together";
    if let Some(why) = missing("kubectl", &["version", "--client"]) {
        return skip(TEST, &why);
    }
    let docs = yaml_docs(&render());
    let got: BTreeSet<_> = docs.iter().map(key).collect();
    let ns = |kind: &str, name: &str| (kind.to_string(), NAMESPACE.to_string(), name.to_string());
    let cluster = |kind: &str, name: &str| (kind.to_string(), String::new(), name.to_string());
    let want: BTreeSet<_> = [
        cluster("Namespace", NAMESPACE),
        cluster("CustomResourceDefinition", "ipleases.ipam.rust-ipam.io"),
        cluster("CustomResourceDefinition", "rangepools.ipam.rust-ipam.io"),
        ns("ServiceAccount", "rust-ipam-server"),
        ns("ServiceAccount", "rust-ipam-node"),
        ns("ServiceAccount", "rust-ipam-reconcile"),
        ns("Role", "rust-ipam-server"),
        ns("RoleBinding", "rust-ipam-server"),
        cluster("ClusterRole", "rust-ipam-pod-reader"),
        cluster("ClusterRole", "rust-ipam-node"),
        cluster("ClusterRoleBinding", "rust-ipam-server-pod-reader"),
        cluster("ClusterRoleBinding", "rust-ipam-node"),
        ns("Service", "rust-ipam"),
        ns("Deployment", "rust-ipam-server"),
        ns("DaemonSet", "rust-ipam-node"),
        ns("CronJob", "rust-ipam-reconcile"),
    ]
    .into_iter()
    .collect();
    assert_eq!(got, want, "objects rendered by kubectl kustomize deploy/");

    // The CRDs come from crds/ itself (one source), and crds/Kustomization lists every
    // CRD file there.
    let mut crd_files: Vec<String> = std::fs::read_dir(repo().join("crds"))
        .expect("crds/")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml") || f.ends_with(".yml") || f.ends_with(".json"))
        .collect();
    crd_files.sort();
    let listed = &yaml_docs(&read("crds/Kustomization"))[0]["resources"];
    assert_eq!(listed, &json!(crd_files), "crds/Kustomization must list every CRD file");
    for f in &crd_files {
        let on_disk = yaml_docs(&read(&format!("crds/{f}"))).remove(0);
        // `kubectl apply -f crds/` (README) must meet CRDs only.
        assert_eq!(on_disk["kind"], "CustomResourceDefinition", "crds/{f}");
        let rendered = find(&docs, "CustomResourceDefinition", on_disk["metadata"]["name"].as_str().unwrap());
        assert_eq!(normalize(rendered.clone()), normalize(on_disk), "crds/{f} rendered unchanged");
    }

    // Every account a workload or binding names exists, and every binding's role.
    let has = |kind: &str, ns: &str, name: &str| got.contains(&(kind.into(), ns.into(), name.into()));
    for d in docs.iter().filter(|d| d["kind"].as_str().is_some_and(|k| k.ends_with("Binding"))) {
        let role = &d["roleRef"];
        let role_ns = if role["kind"] == "Role" { NAMESPACE } else { "" };
        assert!(has(role["kind"].as_str().unwrap(), role_ns, role["name"].as_str().unwrap()), "{role}");
        for s in d["subjects"].as_array().expect("subjects") {
            assert_eq!(s["kind"], "ServiceAccount");
            assert!(
                has("ServiceAccount", s["namespace"].as_str().unwrap(), s["name"].as_str().unwrap()),
                "{s}"
            );
        }
    }
    let deployment = find(&docs, "Deployment", "rust-ipam-server");
    let daemonset = find(&docs, "DaemonSet", "rust-ipam-node");
    let cronjob = find(&docs, "CronJob", "rust-ipam-reconcile");
    let cron_pod = &cronjob["spec"]["jobTemplate"]["spec"]["template"];
    for (pod, sa) in [
        (&deployment["spec"]["template"], "rust-ipam-server"),
        (&daemonset["spec"]["template"], "rust-ipam-node"),
        (cron_pod, "rust-ipam-reconcile"),
    ] {
        assert_eq!(pod["spec"]["serviceAccountName"], sa);
    }
    // The reconcile Job only calls the server: no binding, no token.
    assert!(!docs.iter().any(|d| {
        d["subjects"].as_array().is_some_and(|ss| ss.iter().any(|s| s["name"] == "rust-ipam-reconcile"))
    }));
    assert_eq!(cron_pod["spec"]["automountServiceAccountToken"], false);
    let role = find(&docs, "Role", "rust-ipam-server");
    assert!(
        role["rules"].as_array().unwrap().iter().any(|r| r["resources"] == json!(["leases"])
            && r["resourceNames"] == json!([LEADER_LEASE])
            && r["verbs"] == json!(["get", "patch", "watch"])),
        "the Role must let the server get, patch and watch the Lease {LEADER_LEASE}: {role}"
    );

    // The server: two replicas, the flags, the downward API, probes on the metrics port.
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], "100%");
    let pod = &deployment["spec"]["template"];
    let server = container(&pod["spec"], "server");
    let args: Vec<&str> = server["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(args, ["--listen=0.0.0.0:50051", "--metrics-listen=0.0.0.0:9090", "--store=kube"]);
    assert_eq!(named_port(server, "grpc"), 50051);
    assert_eq!(named_port(server, "metrics"), 9090);
    assert_eq!(env_field_ref(server, "POD_NAME"), "metadata.name");
    assert_eq!(env_field_ref(server, "POD_NAMESPACE"), "metadata.namespace");
    assert_eq!(env_field_ref(server, "POD_IP"), "status.podIP");
    assert_eq!(server["readinessProbe"]["httpGet"], json!({"path": "/readyz", "port": "metrics"}));
    assert_eq!(server["livenessProbe"]["httpGet"], json!({"path": "/healthz", "port": "metrics"}));
    let sc = &server["securityContext"];
    assert_eq!(
        (&sc["readOnlyRootFilesystem"], &sc["allowPrivilegeEscalation"], &sc["capabilities"]["drop"]),
        (&json!(true), &json!(false), &json!(["ALL"]))
    );
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
    let anti = &pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        [0]["podAffinityTerm"];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
    assert!(labels_match(&anti["labelSelector"]["matchLabels"], &pod["metadata"]["labels"]));

    // The Service selects the server pods (and not the node pods), on ports that exist.
    let service = find(&docs, "Service", "rust-ipam");
    let selector = &service["spec"]["selector"];
    assert!(labels_match(selector, &pod["metadata"]["labels"]), "Service selector {selector}");
    assert!(!labels_match(selector, &daemonset["spec"]["template"]["metadata"]["labels"]));
    assert!(labels_match(&deployment["spec"]["selector"]["matchLabels"], &pod["metadata"]["labels"]));
    let mut svc_ports = BTreeMap::new();
    for p in service["spec"]["ports"].as_array().unwrap() {
        let target = p["targetPort"].as_str().expect("named targetPort");
        assert_eq!(p["port"].as_i64(), Some(named_port(server, target)), "{p}");
        svc_ports.insert(p["name"].as_str().unwrap().to_string(), p["port"].as_i64().unwrap());
    }
    assert_eq!(svc_ports.get("grpc"), Some(&50051));

    // The CronJob reaches the Service by its DNS name.
    assert_eq!(cronjob["spec"]["concurrencyPolicy"], "Forbid");
    let rc = container(&cron_pod["spec"], "reconcile");
    assert_eq!(rc["args"], json!(["reconcile", format!("--server=http://rust-ipam.{NAMESPACE}.svc:50051")]));

    // The node installer: the host paths it writes to are mounted where the script writes
    // by default, and it learns the Service's ClusterIP from the variables Kubernetes
    // derives from the Service's name and port name.
    let ds_pod = &daemonset["spec"]["template"]["spec"];
    let install = container(ds_pod, "install");
    assert_eq!(install["command"], json!(["/usr/local/bin/rust-ipam-node-install", "run"]));
    assert_eq!(env_field_ref(install, "NODE_NAME"), "spec.nodeName");
    assert_ne!(ds_pod["enableServiceLinks"], false, "the installer needs the Service's variables");
    let mounts: BTreeMap<&str, &str> = install["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let vol = ds_pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == m["name"]).unwrap();
            (m["mountPath"].as_str().unwrap(), vol["hostPath"]["path"].as_str().unwrap())
        })
        .collect();
    assert_eq!(
        mounts,
        BTreeMap::from([
            ("/host/opt/cni/bin", "/opt/cni/bin"),
            ("/host/etc/cni/net.d/rust-ipam.d", "/etc/cni/net.d/rust-ipam.d")
        ])
    );
    let script = read("deploy/node/install-cni.sh");
    let env_prefix = service["metadata"]["name"].as_str().unwrap().to_uppercase().replace('-', "_");
    for line in [
        "HOST_BIN_DIR=${RUST_IPAM_HOST_BIN_DIR:-/host/opt/cni/bin}".to_string(),
        "HOST_CONF_DIR=${RUST_IPAM_HOST_CONF_DIR:-/host/etc/cni/net.d/rust-ipam.d}".to_string(),
        "NODE_CONF_DIR=${RUST_IPAM_NODE_CONF_DIR:-/etc/cni/net.d/rust-ipam.d}".to_string(),
        format!("url_host \"${{{env_prefix}_SERVICE_HOST}}\""),
        format!("port=${{{env_prefix}_SERVICE_PORT_GRPC:-50051}}"),
    ] {
        assert!(script.contains(&line), "deploy/node/install-cni.sh must contain {line}");
    }
    // The image (not built here: no docker) puts the script and the binaries where the
    // DaemonSet and the script expect them.
    let dockerfile = read("Dockerfile");
    for line in [
        "COPY --chmod=0755 deploy/node/install-cni.sh /usr/local/bin/rust-ipam-node-install",
        "COPY --from=build /out/cni/ /opt/rust-ipam/cni/",
        "for b in rust-ipam rust-multus rust-macvlan rust-ipvlan; do",
    ] {
        assert!(dockerfile.contains(line), "Dockerfile must contain {line}");
    }
    for line in [
        "SRC_DIR=${RUST_IPAM_SRC_DIR:-/opt/rust-ipam/cni}",
        "BINARIES=${RUST_IPAM_BINARIES:-rust-ipam rust-multus rust-macvlan rust-ipvlan}",
    ] {
        assert!(script.contains(line), "deploy/node/install-cni.sh must contain {line}");
    }
}

// ---- deploy/overlays/mtls ----

/// The production overlay: mutual TLS on the gRPC port, Admin on a unix socket, no CronJob.
const MTLS_OVERLAY: &str = "deploy/overlays/mtls";

fn string_list(v: &Value) -> Vec<&str> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

/// The volume mount at `path` of container `c`, and the pod's volume it mounts.
fn mounted<'a>(pod_spec: &'a Value, c: &'a Value, path: &str) -> (&'a Value, &'a Value) {
    let m = c["volumeMounts"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["mountPath"] == path))
        .unwrap_or_else(|| panic!("container {} mounts nothing at {path}", c["name"]));
    let v = pod_spec["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == m["name"]))
        .unwrap_or_else(|| panic!("no volume {} for the mount at {path}", m["name"]));
    (m, v)
}

fn env_value<'a>(c: &'a Value, name: &str) -> Option<&'a str> {
    c["env"].as_array()?.iter().find(|v| v["name"] == name)?["value"].as_str()
}

/// Removes `name` from the list at `pointer` (entries keyed by "name").
fn remove_named(v: &mut Value, pointer: &str, name: &str) {
    let list = v.pointer_mut(pointer).and_then(Value::as_array_mut).expect(pointer);
    let before = list.len();
    list.retain(|e| e["name"] != name);
    assert_eq!(list.len(), before - 1, "{pointer} must hold exactly one {name}");
}

#[test]
fn mtls_overlay_wires_tls_and_the_admin_socket_and_drops_the_cronjob() {
    const TEST: &str = "mtls_overlay_wires_tls_and_the_admin_socket_and_drops_the_cronjob";
    if let Some(why) = missing("kubectl", &["version", "--client"]) {
        return skip(TEST, &why);
    }
    let base = yaml_docs(&render());
    let docs = yaml_docs(&render_dir(MTLS_OVERLAY));
    let base_keys: BTreeSet<_> = base.iter().map(key).collect();
    let got: BTreeSet<_> = docs.iter().map(key).collect();
    let ns = |kind: &str, name: &str| (kind.to_string(), NAMESPACE.to_string(), name.to_string());
    // The base's objects less the CronJob (it cannot speak TLS) and its unused account.
    let removed: BTreeSet<_> = base_keys.difference(&got).cloned().collect();
    assert_eq!(
        removed,
        BTreeSet::from([ns("CronJob", "rust-ipam-reconcile"), ns("ServiceAccount", "rust-ipam-reconcile")])
    );
    assert!(got.is_subset(&base_keys), "the overlay adds no object: {:?}", got.difference(&base_keys));
    assert!(!docs.iter().any(|d| d["kind"] == "CronJob" || d["kind"] == "Job"));
    // Only the server, the node DaemonSet and the Service change.
    let changed =
        [ns("Deployment", "rust-ipam-server"), ns("DaemonSet", "rust-ipam-node"), ns("Service", "rust-ipam")];
    for d in &docs {
        if !changed.contains(&key(d)) {
            let b = base.iter().find(|b| key(b) == key(d)).unwrap();
            assert_eq!(d, b, "{:?} must be the base's", key(d));
        }
    }

    // The server: the base's flags, then TLS from the Secret, Admin on the socket, and the
    // reconcile timer that replaces the CronJob.
    let deployment = find(&docs, "Deployment", "rust-ipam-server");
    let pod = &deployment["spec"]["template"]["spec"];
    let server = container(pod, "server");
    assert_eq!(
        string_list(&server["args"]),
        [
            "--listen=0.0.0.0:50051",
            "--metrics-listen=0.0.0.0:9090",
            "--store=kube",
            "--tls-cert=/etc/rust-ipam/tls/tls.crt",
            "--tls-key=/etc/rust-ipam/tls/tls.key",
            "--tls-client-ca=/etc/rust-ipam/tls/ca.crt",
            "--admin-listen=unix:/run/rust-ipam/admin.sock",
            "--reconcile-every=5m",
        ]
    );
    let (m, vol) = mounted(pod, server, "/etc/rust-ipam/tls");
    assert_eq!(vol["secret"], json!({"secretName": "rust-ipam-server-tls", "defaultMode": 0o440}));
    // No subPath: the kubelet's updates of a renewed Secret must reach the files.
    assert_eq!(m, &json!({"name": vol["name"], "mountPath": "/etc/rust-ipam/tls", "readOnly": true}));
    // 0440 files are readable by the server (uid 65532) through the fsGroup only.
    let psc = &pod["securityContext"];
    assert_eq!(
        (&psc["fsGroup"], &psc["runAsUser"], &psc["runAsNonRoot"]),
        (&json!(65532), &json!(65532), &json!(true))
    );
    let (_, vol) = mounted(pod, server, "/run/rust-ipam");
    assert_eq!(vol["emptyDir"]["medium"], "Memory", "the admin socket's directory: {vol}");
    assert_eq!(server["securityContext"]["readOnlyRootFilesystem"], true);
    // `kubectl exec ... rust-ipam-ctl` inherits the container's environment: a
    // RUST_IPAM_TLS_* variable there would become the ctl's TLS setting.
    let env_names: Vec<&str> =
        server["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert!(!env_names.iter().any(|n| n.starts_with("RUST_IPAM_")), "{env_names:?}");
    // Everything else is the base's.
    let mut rest = deployment.clone();
    let base_deployment = find(&base, "Deployment", "rust-ipam-server");
    let c = "/spec/template/spec/containers/0";
    *rest.pointer_mut(&format!("{c}/args")).unwrap() =
        base_deployment.pointer(&format!("{c}/args")).unwrap().clone();
    remove_named(&mut rest, &format!("{c}/volumeMounts"), "tls");
    remove_named(&mut rest, &format!("{c}/volumeMounts"), "admin-socket");
    let c_obj = rest.pointer_mut(c).unwrap().as_object_mut().unwrap();
    assert_eq!(c_obj.remove("volumeMounts"), Some(json!([])));
    let spec = rest.pointer_mut("/spec/template/spec").unwrap().as_object_mut().unwrap();
    assert_eq!(spec.remove("volumes").map(|v| v.as_array().unwrap().len()), Some(2));
    spec["securityContext"].as_object_mut().unwrap().remove("fsGroup");
    assert_eq!(&rest, base_deployment);

    // The Service: gRPC over TLS, not h2c.
    let service = find(&docs, "Service", "rust-ipam");
    let grpc = service["spec"]["ports"].as_array().unwrap().iter().find(|p| p["name"] == "grpc").unwrap();
    assert_eq!(
        grpc,
        &json!({"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "https"})
    );
    let mut rest = service.clone();
    rest["spec"]["ports"][0]["appProtocol"] = json!("kubernetes.io/h2c");
    assert_eq!(&rest, find(&base, "Service", "rust-ipam"));

    // The node installer: the client Secret mounted where RUST_IPAM_TLS_DIR points.
    let daemonset = find(&docs, "DaemonSet", "rust-ipam-node");
    let ds_pod = &daemonset["spec"]["template"]["spec"];
    let install = container(ds_pod, "install");
    let tls_dir = env_value(install, "RUST_IPAM_TLS_DIR").expect("RUST_IPAM_TLS_DIR in the node installer");
    assert_eq!(tls_dir, "/etc/rust-ipam/node-tls");
    let (m, vol) = mounted(ds_pod, install, tls_dir);
    assert_eq!(vol["secret"], json!({"secretName": "rust-ipam-node-tls", "defaultMode": 0o400}));
    assert_eq!(m, &json!({"name": vol["name"], "mountPath": tls_dir, "readOnly": true}));
    let mut rest = daemonset.clone();
    let c = "/spec/template/spec/containers/0";
    remove_named(&mut rest, &format!("{c}/env"), "RUST_IPAM_TLS_DIR");
    remove_named(&mut rest, &format!("{c}/volumeMounts"), "node-tls");
    remove_named(&mut rest, "/spec/template/spec/volumes", "node-tls");
    assert_eq!(&rest, find(&base, "DaemonSet", "rust-ipam-node"), "the rest of the DaemonSet is the base's");
    assert!(read("deploy/node/install-cni.sh").contains("TLS_DIR=${RUST_IPAM_TLS_DIR:-}"));

    // The base stays plaintext, with its CronJob.
    let base_server =
        container(&find(&base, "Deployment", "rust-ipam-server")["spec"]["template"]["spec"], "server");
    assert!(
        !string_list(&base_server["args"]).iter().any(|a| a.starts_with("--tls") || a.starts_with("--admin"))
    );
    find(&base, "CronJob", "rust-ipam-reconcile");

    // The image carries the ctl the docs tell operators to exec.
    let dockerfile = read("Dockerfile");
    for line in [
        "install -D -m 0755 target/release/rust-ipam-ctl /out/rust-ipam-ctl",
        "COPY --from=build /out/rust-ipam-ctl /usr/local/bin/rust-ipam-ctl",
    ] {
        assert!(dockerfile.contains(line), "Dockerfile must contain {line}");
    }
}

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
    for (tool, args) in [("kubectl", &["version", "--client"][..]), ("kubernetes-validate", &["--version"])] {
        if let Some(why) = missing(tool, args) {
            return skip(TEST, &why);
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let rendered = dir.path().join("rendered.yaml");
    std::fs::write(&rendered, render()).expect("write");
    let rendered_mtls = dir.path().join("rendered-mtls.yaml");
    std::fs::write(&rendered_mtls, render_dir(MTLS_OVERLAY)).expect("write");
    let mut files = vec![rendered, rendered_mtls];
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
    "x-kubernetes-preserve-unknown-fields",
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
    if let Some(items) = v.as_array() {
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

fn example(file: &str) -> Value {
    let mut docs = yaml_docs(&read(&format!("deploy/examples/{file}")));
    assert_eq!(docs.len(), 1, "deploy/examples/{file} holds one object");
    docs.remove(0)
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
    for (file, kind) in [("iplease.yaml", "IPLease"), ("rangepool.yaml", "RangePool")] {
        let errs = validate_against_crd(&crd_for(kind), &example(file));
        assert!(errs.is_empty(), "deploy/examples/{file}: {errs:#?}");
    }
    let errs = validate_against_crd(&nad_crd(), &example("network-attachment-definition.yaml"));
    assert!(errs.is_empty(), "deploy/examples/network-attachment-definition.yaml: {errs:#?}");

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
        ["pattern"] = json!("^[0-9.]+$");
    assert_eq!(
        validate_against_crd(&odd, &lease),
        [r#".spec.address: schema keyword "pattern" is not supported by this check"#]
    );
}

/// The ipam section of the example NAD, as the plugin reads it with `node_file`.
fn nad_ipam(node_file: &Path) -> ipam_cni::config::IpamConf {
    let nad = example("network-attachment-definition.yaml");
    let config = nad["spec"]["config"].as_str().expect("spec.config");
    let conf = ipam_cni::config::NetConf::parse(config.as_bytes(), node_file)
        .unwrap_or_else(|e| panic!("the plugin refuses the example NAD: {e:?}"));
    assert_eq!(conf.name, nad["metadata"]["name"], "the CNI network is named like the NAD");
    conf.ipam.expect("an ipam section")
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

// ---- the node installer ----

struct Installer {
    dir: tempfile::TempDir,
}

impl Installer {
    const BINARIES: [&str; 4] = ["rust-ipam", "rust-multus", "rust-macvlan", "rust-ipvlan"];

    /// An image's /opt/rust-ipam/cni and service account, and an empty host, in a temp dir.
    fn new() -> Installer {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        std::fs::create_dir_all(p.join("image/cni")).unwrap();
        std::fs::create_dir_all(p.join("sa")).unwrap();
        for b in Self::BINARIES {
            std::fs::write(p.join("image/cni").join(b), format!("#!/bin/sh\necho {b} v1\n")).unwrap();
        }
        std::fs::write(p.join("sa/token"), "token-1").unwrap();
        std::fs::write(p.join("sa/ca.crt"), "-----BEGIN CERTIFICATE-----\n").unwrap();
        Installer { dir }
    }

    fn bin_dir(&self) -> PathBuf {
        self.dir.path().join("host/opt/cni/bin")
    }

    fn conf_dir(&self) -> PathBuf {
        self.dir.path().join("host/etc/cni/net.d/rust-ipam.d")
    }

    /// Runs the script with `command` and the variables Kubernetes would set, plus `env`
    /// (an empty value removes a variable).
    fn run(&self, command: &str, env: &[(&str, &str)]) -> Output {
        self.command(command, env).output().expect("run sh")
    }

    /// The script's command line for [`Installer::run`], to spawn.
    fn command(&self, command: &str, env: &[(&str, &str)]) -> Command {
        let p = self.dir.path();
        let mut cmd = Command::new("sh");
        cmd.arg(repo().join("deploy/node/install-cni.sh"))
            .arg(command)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_IPAM_SRC_DIR", p.join("image/cni"))
            .env("RUST_IPAM_HOST_BIN_DIR", self.bin_dir())
            .env("RUST_IPAM_HOST_CONF_DIR", self.conf_dir())
            .env("RUST_IPAM_SA_DIR", p.join("sa"))
            .env("NODE_NAME", "worker-1")
            .env("RUST_IPAM_SERVICE_HOST", "10.96.0.50")
            .env("RUST_IPAM_SERVICE_PORT_GRPC", "50051")
            .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
            .env("KUBERNETES_SERVICE_PORT", "443");
        for (k, v) in env {
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        cmd
    }

    fn files(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for d in [self.bin_dir(), self.conf_dir()] {
            for e in std::fs::read_dir(&d).into_iter().flatten() {
                out.insert(
                    e.expect("entry").path().strip_prefix(self.dir.path()).unwrap().display().to_string(),
                );
            }
        }
        out
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode()
        & 0o7777
}

#[test]
fn node_installer_installs_atomically_a_config_the_plugin_reads() {
    const TEST: &str = "node_installer_installs_atomically_a_config_the_plugin_reads";
    if let Some(why) = missing("sh", &["-c", "command -v cmp >/dev/null"]) {
        return skip(TEST, &why);
    }
    let inst = Installer::new();
    let o = inst.run("install", &[]);
    assert!(o.status.success(), "install failed:\n{}", output_text(&o));
    let want: BTreeSet<String> = Installer::BINARIES
        .iter()
        .map(|b| format!("host/opt/cni/bin/{b}"))
        .chain(
            ["ca.crt", "rust-ipam.conf", "rust-multus.kubeconfig", "rust-multus.token"]
                .iter()
                .map(|f| format!("host/etc/cni/net.d/rust-ipam.d/{f}")),
        )
        .collect();
    assert_eq!(inst.files(), want, "exactly these files, no temporary ones left");
    for b in Installer::BINARIES {
        let path = inst.bin_dir().join(b);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("#!/bin/sh\necho {b} v1\n"));
        assert_eq!(mode(&path), 0o755, "{b}");
    }
    let conf_path = inst.conf_dir().join("rust-ipam.conf");
    assert_eq!(mode(&conf_path), 0o644);
    assert_eq!(mode(&inst.conf_dir().join("rust-multus.token")), 0o600);
    let conf: Value = serde_json::from_str(&std::fs::read_to_string(&conf_path).unwrap()).expect("JSON");
    assert_eq!(
        conf,
        json!({"server": ["http://10.96.0.50:50051"], "node_name": "worker-1", "timeout_ms": 10000})
    );

    // The plugin, given the example NAD (no `server` in it) on this node, calls the Service.
    let ipam = nad_ipam(&conf_path);
    assert_eq!(ipam.servers, ["http://10.96.0.50:50051"]);
    assert_eq!(ipam.node_name, "worker-1");
    assert_eq!(ipam.timeout, std::time::Duration::from_millis(10_000));

    // rust-multus' kubeconfig names the host paths of the CA and the token.
    let kc = yaml_docs(&std::fs::read_to_string(inst.conf_dir().join("rust-multus.kubeconfig")).unwrap())
        .remove(0);
    assert_eq!(kc["clusters"][0]["cluster"]["server"], "https://10.96.0.1:443");
    assert_eq!(kc["clusters"][0]["cluster"]["certificate-authority"], "/etc/cni/net.d/rust-ipam.d/ca.crt");
    assert_eq!(kc["users"][0]["user"]["tokenFile"], "/etc/cni/net.d/rust-ipam.d/rust-multus.token");
    assert_eq!(kc["current-context"], "rust-multus");
    assert_eq!(inst.run("check", &[]).status.code(), Some(0));

    // Again with the same image: nothing is rewritten.
    let inode = |b: &str| std::fs::metadata(inst.bin_dir().join(b)).unwrap().ino();
    let before = inode("rust-ipam");
    let o = inst.run("install", &[]);
    assert!(o.status.success() && !output_text(&o).contains("wrote"), "{}", output_text(&o));
    assert_eq!(inode("rust-ipam"), before);

    // A new image: the new binary replaces the old by rename, so a runtime that is exec'ing
    // the old file at that moment keeps reading the old content, never a half-written one.
    std::fs::write(inst.dir.path().join("image/cni/rust-ipam"), "#!/bin/sh\necho rust-ipam v2\n").unwrap();
    let mut old = std::fs::File::open(inst.bin_dir().join("rust-ipam")).unwrap();
    let o = inst.run("install", &[("RUST_IPAM_SERVICE_HOST", "fd00:96::50")]);
    assert!(o.status.success(), "{}", output_text(&o));
    let mut old_content = String::new();
    std::io::Read::read_to_string(&mut old, &mut old_content).unwrap();
    assert_eq!(old_content, "#!/bin/sh\necho rust-ipam v1\n");
    assert_eq!(
        std::fs::read_to_string(inst.bin_dir().join("rust-ipam")).unwrap(),
        "#!/bin/sh\necho rust-ipam v2\n"
    );
    assert_ne!(inode("rust-ipam"), before);
    assert_eq!(inst.files(), want);
    // An IPv6 ClusterIP goes in brackets.
    assert_eq!(nad_ipam(&conf_path).servers, ["http://[fd00:96::50]:50051"]);

    // Bad environments are refused with a message and change nothing.
    let conf_before = std::fs::read(&conf_path).unwrap();
    for (env, message) in [
        (
            &[("RUST_IPAM_SERVICE_HOST", "")][..],
            "error: RUST_IPAM_SERVICE_HOST is not set: create the rust-ipam Service before this DaemonSet",
        ),
        (
            &[("RUST_IPAM_SERVER", "http://10.0.0.10:50051,10.0.0.11:50051")][..],
            "error: server \"10.0.0.11:50051\" is not http://host:port, https://host:port or unix:///path",
        ),
        (&[("NODE_NAME", "")][..], "error: NODE_NAME is not set"),
        (&[("RUST_IPAM_TIMEOUT_MS", "10s")][..], "error: RUST_IPAM_TIMEOUT_MS \"10s\" is not a number"),
    ] {
        let o = inst.run("install", env);
        assert_eq!(o.status.code(), Some(1), "{env:?}");
        assert!(output_text(&o).contains(message), "{env:?}: {}", output_text(&o));
        assert_eq!(std::fs::read(&conf_path).unwrap(), conf_before, "{env:?}");
    }
    // Servers named explicitly.
    let o = inst.run("install", &[("RUST_IPAM_SERVER", "http://10.0.0.10:50051,http://10.0.0.11:50051")]);
    assert!(o.status.success(), "{}", output_text(&o));
    assert_eq!(nad_ipam(&conf_path).servers, ["http://10.0.0.10:50051", "http://10.0.0.11:50051"]);

    // check fails once a binary is gone; uninstall removes only what install wrote.
    std::fs::remove_file(inst.bin_dir().join("rust-ipvlan")).unwrap();
    let o = inst.run("check", &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(output_text(&o).contains("rust-ipvlan is not installed"), "{}", output_text(&o));
    std::fs::write(inst.bin_dir().join("macvlan"), "another plugin").unwrap();
    let o = inst.run("uninstall", &[]);
    assert!(o.status.success(), "{}", output_text(&o));
    assert_eq!(inst.files(), BTreeSet::from(["host/opt/cni/bin/macvlan".to_string()]));
    assert!(!inst.conf_dir().exists());
}

/// Every file and directory under `dir`, relative to it, with its mode and content (empty for
/// a directory).
fn snapshot(dir: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).into_iter().flatten() {
            let p = e.expect("entry").path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if p.is_dir() {
                out.insert(rel, (mode(&p), Vec::new()));
                walk(root, &p, out);
            } else {
                out.insert(rel, (mode(&p), std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A Secret volume as the kubelet lays it out: the files in a timestamped directory, `..data`
/// a symlink to it, and each key a symlink through `..data` (an update swaps `..data`).
fn secret_volume(dir: &Path, generation: u32, files: &[(&str, &str)]) {
    let data = format!("..2026_12_03_10_00_0{generation}.000000001");
    std::fs::create_dir_all(dir.join(&data)).unwrap();
    for (name, content) in files {
        std::fs::write(dir.join(&data).join(name), content).unwrap();
    }
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(&data, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
}

const CA_PEM: &str = "-----BEGIN CERTIFICATE-----\nY2EK\n-----END CERTIFICATE-----\n";
const NODE_CERT_PEM: &str = "-----BEGIN CERTIFICATE-----\nbm9kZQo=\n-----END CERTIFICATE-----\n";
const NODE_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----\na2V5Cg==\n-----END PRIVATE KEY-----\n";

#[test]
fn node_installer_tls_mode_copies_the_certificates_and_writes_https() {
    const TEST: &str = "node_installer_tls_mode_copies_the_certificates_and_writes_https";
    if let Some(why) = missing("sh", &["-c", "command -v cmp >/dev/null && command -v grep >/dev/null"]) {
        return skip(TEST, &why);
    }
    let inst = Installer::new();
    let secret = inst.dir.path().join("node-tls");
    secret_volume(&secret, 1, &[("ca.crt", CA_PEM), ("tls.crt", NODE_CERT_PEM), ("tls.key", NODE_KEY_PEM)]);
    let secret_str = secret.to_str().unwrap();
    let tls_env = [("RUST_IPAM_TLS_DIR", secret_str)];
    let o = inst.run("install", &tls_env);
    assert!(o.status.success(), "install failed:\n{}", output_text(&o));

    // The three files in tls/ (no temporary ones), a directory only root enters, the key
    // readable by root only.
    let tls_dir = inst.conf_dir().join("tls");
    assert!(inst.files().contains("host/etc/cni/net.d/rust-ipam.d/tls"));
    let in_tls: BTreeSet<String> = std::fs::read_dir(&tls_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(in_tls, BTreeSet::from(["ca.crt", "tls.crt", "tls.key"].map(String::from)));
    assert_eq!(mode(&tls_dir), 0o700);
    for (f, content, m) in
        [("ca.crt", CA_PEM, 0o644), ("tls.crt", NODE_CERT_PEM, 0o644), ("tls.key", NODE_KEY_PEM, 0o600)]
    {
        let p = tls_dir.join(f);
        assert!(!std::fs::symlink_metadata(&p).unwrap().file_type().is_symlink(), "{f} is a copy");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), content, "{f}");
        assert_eq!(mode(&p), m, "{f}");
    }
    // The node file: the Service over https and the host paths of the files.
    let conf_path = inst.conf_dir().join("rust-ipam.conf");
    assert_eq!(mode(&conf_path), 0o644);
    let conf: Value = serde_json::from_str(&std::fs::read_to_string(&conf_path).unwrap()).expect("JSON");
    assert_eq!(
        conf,
        json!({
            "server": ["https://10.96.0.50:50051"],
            "node_name": "worker-1",
            "timeout_ms": 10000,
            "tls_ca": "/etc/cni/net.d/rust-ipam.d/tls/ca.crt",
            "tls_cert": "/etc/cni/net.d/rust-ipam.d/tls/tls.crt",
            "tls_key": "/etc/cni/net.d/rust-ipam.d/tls/tls.key"
        })
    );
    assert_eq!(inst.run("check", &tls_env).status.code(), Some(0));

    // The plugin reads that file, and the certificates through it: here the "host" is the
    // temp dir, so the config names the files where this test can read them.
    let conf_dir = inst.conf_dir();
    let host_env =
        [("RUST_IPAM_TLS_DIR", secret_str), ("RUST_IPAM_NODE_CONF_DIR", conf_dir.to_str().unwrap())];
    let o = inst.run("install", &host_env);
    assert!(o.status.success(), "{}", output_text(&o));
    let ipam = nad_ipam(&conf_path);
    assert_eq!(ipam.servers, ["https://10.96.0.50:50051"]);
    assert_eq!(ipam.node_name, "worker-1");
    let tls = ipam.tls.expect("the plugin's TLS settings");
    assert_eq!(tls.ca, CA_PEM.as_bytes());
    assert_eq!(tls.identity, Some((NODE_CERT_PEM.as_bytes().to_vec(), NODE_KEY_PEM.as_bytes().to_vec())));
    let o = inst.run("install", &tls_env);
    assert!(o.status.success(), "{}", output_text(&o));

    // A renewal (the kubelet swaps ..data): the new certificate replaces the old by rename;
    // the unchanged CA is not rewritten.
    let ino = |f: &str| std::fs::metadata(tls_dir.join(f)).unwrap().ino();
    let (ca_ino, cert_ino) = (ino("ca.crt"), ino("tls.crt"));
    let renewed = NODE_CERT_PEM.replace("bm9kZQo=", "bm9kZTIK");
    let renewed_key = NODE_KEY_PEM.replace("a2V5Cg==", "a2V5MgoK");
    secret_volume(&secret, 2, &[("ca.crt", CA_PEM), ("tls.crt", &renewed), ("tls.key", &renewed_key)]);
    let o = inst.run("install", &tls_env);
    assert!(o.status.success(), "{}", output_text(&o));
    assert_eq!(std::fs::read_to_string(tls_dir.join("tls.crt")).unwrap(), renewed);
    assert_eq!(std::fs::read_to_string(tls_dir.join("tls.key")).unwrap(), renewed_key);
    assert_eq!(mode(&tls_dir.join("tls.key")), 0o600);
    assert_eq!(ino("ca.crt"), ca_ino);
    assert_ne!(ino("tls.crt"), cert_ino);
    let ca_wrote = format!("wrote {}", tls_dir.join("ca.crt").display());
    assert!(!output_text(&o).contains(&ca_wrote), "{}", output_text(&o));

    // `run` (what the DaemonSet runs) keeps the copies in step with the mounted Secret.
    let mut running = Killed(
        inst.command("run", &[("RUST_IPAM_TLS_DIR", secret_str), ("RUST_IPAM_REFRESH_SECONDS", "1")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn run"),
    );
    let third = NODE_CERT_PEM.replace("bm9kZQo=", "bm9kZTMK");
    secret_volume(&secret, 3, &[("ca.crt", CA_PEM), ("tls.crt", &third), ("tls.key", &renewed_key)]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::read_to_string(tls_dir.join("tls.crt")).unwrap() != third {
        assert!(running.0.try_wait().unwrap().is_none(), "run exited");
        assert!(std::time::Instant::now() < deadline, "run did not copy the renewed certificate");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(running);
    assert_eq!(mode(&tls_dir.join("tls.key")), 0o600);

    // A TLS directory that is not complete, or not PEM, or servers that are not https: a
    // clear error, and nothing on the host changes (not even a new binary in the image).
    std::fs::write(inst.dir.path().join("image/cni/rust-ipam"), "#!/bin/sh\necho rust-ipam v2\n").unwrap();
    let host = inst.dir.path().join("host");
    let before = snapshot(&host);
    let partial = |name: &str, files: &[(&str, &str)]| {
        let d = inst.dir.path().join(name);
        secret_volume(&d, 1, files);
        d.to_str().unwrap().to_string()
    };
    let no_key = partial("no-key", &[("ca.crt", CA_PEM), ("tls.crt", NODE_CERT_PEM)]);
    let no_ca = partial("no-ca", &[("tls.crt", NODE_CERT_PEM), ("tls.key", NODE_KEY_PEM)]);
    let empty_cert = partial("empty-cert", &[("ca.crt", CA_PEM), ("tls.crt", ""), ("tls.key", NODE_KEY_PEM)]);
    let not_pem =
        partial("not-pem", &[("ca.crt", "ca"), ("tls.crt", NODE_CERT_PEM), ("tls.key", NODE_KEY_PEM)]);
    let absent = inst.dir.path().join("absent").to_str().unwrap().to_string();
    let needs = "the node TLS Secret needs the keys ca.crt, tls.crt and tls.key";
    for (env, message) in [
        (vec![("RUST_IPAM_TLS_DIR", no_key.as_str())], format!("error: RUST_IPAM_TLS_DIR \"{no_key}\" has no tls.key (or it is empty): {needs}")),
        (vec![("RUST_IPAM_TLS_DIR", no_ca.as_str())], format!("error: RUST_IPAM_TLS_DIR \"{no_ca}\" has no ca.crt (or it is empty): {needs}")),
        (vec![("RUST_IPAM_TLS_DIR", empty_cert.as_str())], format!("error: RUST_IPAM_TLS_DIR \"{empty_cert}\" has no tls.crt (or it is empty): {needs}")),
        (vec![("RUST_IPAM_TLS_DIR", not_pem.as_str())], format!("error: {not_pem}/ca.crt is not PEM (no -----BEGIN line)")),
        (
            vec![("RUST_IPAM_TLS_DIR", absent.as_str())],
            format!("error: RUST_IPAM_TLS_DIR \"{absent}\" is not a directory (mount the node's TLS Secret there)"),
        ),
        (
            vec![("RUST_IPAM_TLS_DIR", secret_str), ("RUST_IPAM_SERVER", "https://10.0.0.10:50051,http://10.0.0.11:50051")],
            "error: server \"http://10.0.0.11:50051\" is not https:// but RUST_IPAM_TLS_DIR is set: with mutual TLS every server must be https://host:port".to_string(),
        ),
    ] {
        let o = inst.run("install", &env);
        assert_eq!(o.status.code(), Some(1), "{env:?}: {}", output_text(&o));
        let text = output_text(&o);
        assert_eq!(text.trim_end(), format!("rust-ipam-node-install: {message}"), "{env:?}");
        assert_eq!(snapshot(&host), before, "{env:?} changed the host");
    }
    // check notices a missing key.
    std::fs::remove_file(tls_dir.join("tls.key")).unwrap();
    let o = inst.run("check", &tls_env);
    assert_eq!(o.status.code(), Some(1));
    assert!(output_text(&o).contains("rust-ipam.d/tls/tls.key is not installed"), "{}", output_text(&o));

    // Explicit https servers are kept as given.
    let o = inst.run(
        "install",
        &[("RUST_IPAM_TLS_DIR", secret_str), ("RUST_IPAM_SERVER", "https://10.0.0.10:50051")],
    );
    assert!(o.status.success(), "{}", output_text(&o));
    let conf: Value = serde_json::from_str(&std::fs::read_to_string(&conf_path).unwrap()).unwrap();
    assert_eq!(conf["server"], json!(["https://10.0.0.10:50051"]));
    assert_eq!(mode(&tls_dir.join("tls.key")), 0o600);

    // Back to plaintext (the base DaemonSet): http, no TLS keys, and the copies are gone.
    let o = inst.run("install", &[]);
    assert!(o.status.success(), "{}", output_text(&o));
    let conf: Value = serde_json::from_str(&std::fs::read_to_string(&conf_path).unwrap()).unwrap();
    assert_eq!(
        conf,
        json!({"server": ["http://10.96.0.50:50051"], "node_name": "worker-1", "timeout_ms": 10000})
    );
    assert!(!tls_dir.exists());
    assert!(output_text(&o).contains("removed"), "{}", output_text(&o));
}

/// Kills the process when dropped (a failing assertion must not leave a server running).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The openssl commands of docs/operations.md ("Mutual TLS in a cluster"), with the
/// ClusterIP 127.0.0.1, run by bash in `dir`: ca.crt, server.crt/key, node.crt/key.
const DOC_OPENSSL: &str = r#"set -e
CLUSTER_IP=127.0.0.1
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 -subj /CN=rust-ipam-ca \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
  -keyout ca.key -out ca.crt
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=rust-ipam -keyout server.key -out server.csr
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -out server.crt -extfile <(
  printf 'subjectAltName=IP:%s,DNS:rust-ipam.rust-ipam.svc,DNS:rust-ipam.rust-ipam.svc.cluster.local\n' "$CLUSTER_IP"
  printf 'extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n')
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=rust-ipam-node -keyout node.key -out node.csr
openssl x509 -req -in node.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -out node.crt -extfile <(
  printf 'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n')
"#;

/// The pieces working together as in a cluster with the overlay: certificates made by the
/// documented openssl commands, the server started with the overlay's own args (paths and
/// addresses mapped to a temp dir and loopback, the embedded store for the kube store), the
/// installer writing the node file in TLS mode, and the real `rust-ipam` plugin allocating
/// through it over mutual TLS; Admin answers on the socket only; no certificate, no entry.
#[test]
fn mtls_overlay_args_docs_certificates_installer_and_plugin_work_together() {
    const TEST: &str = "mtls_overlay_args_docs_certificates_installer_and_plugin_work_together";
    for (tool, args) in [
        ("kubectl", &["version", "--client"][..]),
        ("openssl", &["version"][..]),
        ("bash", &["-c", "command -v cmp >/dev/null"][..]),
    ] {
        if let Some(why) = missing(tool, args) {
            return skip(TEST, &why);
        }
    }
    // The commands are the docs' own, line for line (but the ClusterIP).
    let docs_text = read("docs/operations.md");
    for line in DOC_OPENSSL.lines().filter(|l| !l.starts_with("set -e") && !l.starts_with("CLUSTER_IP=")) {
        assert!(docs_text.contains(line), "docs/operations.md must contain the line {line:?}");
    }
    let inst = Installer::new();
    let root = inst.dir.path();
    let pki = root.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let o = Command::new("bash").arg("-c").arg(DOC_OPENSSL).current_dir(&pki).output().expect("bash");
    assert!(o.status.success(), "the documented openssl commands failed:\n{}", output_text(&o));
    let pem = |f: &str| std::fs::read_to_string(pki.join(f)).unwrap();
    // The two Secrets as mounted volumes.
    let server_secret = root.join("server-tls");
    secret_volume(
        &server_secret,
        1,
        &[("tls.crt", &pem("server.crt")), ("tls.key", &pem("server.key")), ("ca.crt", &pem("ca.crt"))],
    );
    let node_secret = root.join("node-tls");
    secret_volume(
        &node_secret,
        1,
        &[("tls.crt", &pem("node.crt")), ("tls.key", &pem("node.key")), ("ca.crt", &pem("ca.crt"))],
    );

    // The server with the overlay's args.
    let docs = yaml_docs(&render_dir(MTLS_OVERLAY));
    let deployment = find(&docs, "Deployment", "rust-ipam-server");
    let server = container(&deployment["spec"]["template"]["spec"], "server");
    let (port, metrics) = (rust_ipam_e2e::free_port().unwrap(), rust_ipam_e2e::free_port().unwrap());
    let run_dir = root.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let mut args: Vec<String> = string_list(&server["args"])
        .iter()
        .map(|a| {
            a.replace("--listen=0.0.0.0:50051", &format!("--listen=127.0.0.1:{port}"))
                .replace("--metrics-listen=0.0.0.0:9090", &format!("--metrics-listen=127.0.0.1:{metrics}"))
                .replace("--store=kube", "--store=embedded")
                .replace("/etc/rust-ipam/tls", server_secret.to_str().unwrap())
                .replace("/run/rust-ipam", run_dir.to_str().unwrap())
        })
        .collect();
    args.push(format!("--data-dir={}", root.join("data").display()));
    let bin = rust_ipam_e2e::workspace_bin("rust-ipam-server").expect("server binary");
    let ctl_bin = rust_ipam_e2e::workspace_bin("rust-ipam-ctl").expect("ctl binary");
    let log = root.join("server.log");
    let _server = Killed(
        Command::new(&bin)
            .args(&args)
            .env_clear()
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start rust-ipam-server"),
    );
    let socket = format!("unix://{}/admin.sock", run_dir.display());
    let ctl = |args: &[&str]| Command::new(&ctl_bin).args(args).env_clear().output().expect("rust-ipam-ctl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let o = ctl(&["--server", &socket, "status"]);
        if o.status.success() && output_text(&o).contains("serving=true") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server did not serve on {socket}: {}\nlog:\n{}",
            output_text(&o),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(mode(&run_dir.join("admin.sock")), 0o600);

    // The node: the installer in TLS mode, naming this server.
    let conf_dir = inst.conf_dir();
    let endpoint = format!("https://127.0.0.1:{port}");
    let o = inst.run(
        "install",
        &[
            ("RUST_IPAM_TLS_DIR", node_secret.to_str().unwrap()),
            ("RUST_IPAM_NODE_CONF_DIR", conf_dir.to_str().unwrap()),
            ("RUST_IPAM_SERVER", &endpoint),
        ],
    );
    assert!(o.status.success(), "{}", output_text(&o));

    // The plugin, as the runtime runs it for a NAD that leaves the server to the node file.
    let conf_path = conf_dir.join("rust-ipam.conf");
    let nad = json!({
        "cniVersion": "1.0.0", "name": "backend-network", "type": "macvlan",
        "ipam": {"type": "rust-ipam", "range": "10.56.0.0/16", "exclude": ["10.56.0.0/28"],
                 "configuration_path": conf_path}
    });
    let plugin = |command: &str| {
        let env = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "c0ffee"),
            ("CNI_NETNS", "/proc/self/ns/net"),
            ("CNI_IFNAME", "net1"),
            ("CNI_PATH", "/nonexistent"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod-a;K8S_POD_UID=uid-a"),
        ];
        let bin = rust_ipam_e2e::workspace_bin("rust-ipam").expect("plugin");
        rust_ipam_e2e::run_cni(&mut Command::new(bin), &env, &nad.to_string())
    };
    let o = plugin("ADD");
    assert_eq!(o.code, 0, "ADD over mutual TLS failed:\n{}\n{}", o.out, o.stderr);
    assert_eq!(o.out["ips"][0]["address"], "10.56.0.16/16", "{}", o.out);

    // Admin on the socket sees the lease; the TLS port refuses Admin even with a
    // certificate, and refuses any call without one.
    let o = ctl(&["--server", &socket, "leases"]);
    assert!(o.status.success() && output_text(&o).contains("10.56.0.16"), "{}", output_text(&o));
    let (ca, crt, key) = (pki.join("ca.crt"), pki.join("node.crt"), pki.join("node.key"));
    let tls_args = [
        "--tls-ca",
        ca.to_str().unwrap(),
        "--tls-cert",
        crt.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let with_cert = |cmd: &str| ctl(&[&["--server", endpoint.as_str()][..], &tls_args, &[cmd]].concat());
    let o = with_cert("status");
    assert!(o.status.success(), "{}", output_text(&o));
    let o = with_cert("pools");
    assert!(!o.status.success() && output_text(&o).contains("Unimplemented"), "{}", output_text(&o));
    let o = ctl(&["--server", &endpoint, "--tls-ca", ca.to_str().unwrap(), "status"]);
    assert!(!o.status.success(), "a client without a certificate got in: {}", output_text(&o));
    let o = plugin("DEL");
    assert_eq!(o.code, 0, "DEL over mutual TLS failed:\n{}\n{}", o.out, o.stderr);
    let o = ctl(&["--server", &socket, "leases"]);
    assert!(o.status.success() && !output_text(&o).contains("10.56.0.16"), "{}", output_text(&o));
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("TLS handshake failed"), "the refusal is logged:\n{log_text}");
}
