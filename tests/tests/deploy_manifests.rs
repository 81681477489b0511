//! `deploy/` as `kubectl kustomize` renders it: the base's objects wired together (Service to
//! pods, probes to ports, the CronJob and the node config to the Service, bindings to
//! accounts, the Role to the code's Lease name, host paths to the installer script, the image
//! to both), and the production overlay `deploy/overlays/mtls` (mutual TLS, admin socket, no
//! CronJob) changing only what it documents, and the thick overlay `deploy/overlays/thick`
//! (the daemon, its config as rust-multus reads it, its socket shared with the shim, its
//! RBAC).
//!
//! Needs `kubectl` (for kustomize); without it the tests print `SKIP` (and fail when `CI` is
//! set).

use std::collections::{BTreeMap, BTreeSet};

use rust_ipam_e2e::deploy::{
    KUBECTL, MTLS_OVERLAY, NAMESPACE, THICK_OVERLAY, container, find, missing, read, render, repo,
    string_list, yaml_docs,
};
use rust_ipam_e2e::skip;
use serde_json::{Value, json};

/// `--lease-name`'s default in `rust-ipam-server`; the Role grants get/patch on it by name.
const LEADER_LEASE: &str = "rust-ipam-leader";

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

fn key(v: &Value) -> (String, String, String) {
    let s = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or_default().to_string();
    (s("/kind"), s("/metadata/namespace"), s("/metadata/name"))
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

/// The server's flags in the base.
const BASE_SERVER_ARGS: [&str; 6] = [
    "--listen=0.0.0.0:50051",
    "--metrics-listen=0.0.0.0:9090",
    "--store=kube",
    "--authorize",
    "--node-service-account=rust-ipam/rust-ipam-node",
    "--admin=system:serviceaccount:rust-ipam:rust-ipam-reconcile",
];

#[test]
fn kustomize_renders_every_object_wired_together() {
    const TEST: &str = "kustomize_renders_every_object_wired_together";
    if let Some(why) = missing(&[KUBECTL]) {
        return skip(TEST, &why);
    }
    let docs = yaml_docs(&render("deploy"));
    let got: BTreeSet<_> = docs.iter().map(key).collect();
    let ns = |kind: &str, name: &str| (kind.to_string(), NAMESPACE.to_string(), name.to_string());
    let cluster = |kind: &str, name: &str| (kind.to_string(), String::new(), name.to_string());
    let want: BTreeSet<_> = [
        cluster("Namespace", NAMESPACE),
        cluster("CustomResourceDefinition", "ipleases.ipam.rust-ipam.io"),
        cluster("CustomResourceDefinition", "rangepools.ipam.rust-ipam.io"),
        cluster("CustomResourceDefinition", "ippools.ipam.rust-ipam.io"),
        ns("ServiceAccount", "rust-ipam-server"),
        ns("ServiceAccount", "rust-ipam-node"),
        ns("ServiceAccount", "rust-ipam-reconcile"),
        ns("Role", "rust-ipam-server"),
        ns("RoleBinding", "rust-ipam-server"),
        cluster("ClusterRole", "rust-ipam-pod-reader"),
        cluster("ClusterRole", "rust-ipam-node"),
        cluster("ClusterRole", "rust-ipam-token-reviewer"),
        cluster("ClusterRole", "rust-ipam-server-ippools"),
        cluster("ClusterRole", "rust-ipam-server-owners"),
        cluster("ClusterRoleBinding", "rust-ipam-server-pod-reader"),
        cluster("ClusterRoleBinding", "rust-ipam-server-ippools"),
        cluster("ClusterRoleBinding", "rust-ipam-server-owners"),
        cluster("ClusterRoleBinding", "rust-ipam-server-token-reviewer"),
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
    // The reconcile Job only calls the server: no binding, no API token; a token for the
    // server (audience rust-ipam), passed to rust-ipam-ctl.
    assert!(!docs.iter().any(|d| {
        d["subjects"].as_array().is_some_and(|ss| ss.iter().any(|s| s["name"] == "rust-ipam-reconcile"))
    }));
    assert_eq!(cron_pod["spec"]["automountServiceAccountToken"], false);
    for pod in [&cron_pod["spec"], &daemonset["spec"]["template"]["spec"]] {
        let projected = &pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "ipam-token")
            .unwrap()["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(projected["audience"], "rust-ipam", "{pod}");
    }
    let cron_args = string_list(&cron_pod["spec"]["containers"][0]["args"]);
    assert!(cron_args.contains(&"--token-file=/var/run/secrets/rust-ipam/token"), "{cron_args:?}");
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
    assert_eq!(args, BASE_SERVER_ARGS);
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
    assert_eq!(rc["command"], json!(["rust-ipam-ctl"]));
    assert_eq!(
        rc["args"],
        json!([
            "reconcile",
            format!("--server=http://rust-ipam.{NAMESPACE}.svc:50051"),
            "--token-file=/var/run/secrets/rust-ipam/token"
        ])
    );

    // The node installer: the host paths it writes to are mounted where the script writes
    // by default, and it learns the Service's ClusterIP from the variables Kubernetes
    // derives from the Service's name and port name.
    let ds_pod = &daemonset["spec"]["template"]["spec"];
    let install = container(ds_pod, "install");
    assert_eq!(install["command"], json!(["/usr/local/bin/rust-ipam-node-install", "run"]));
    assert_eq!(env_field_ref(install, "NODE_NAME"), "spec.nodeName");
    assert_ne!(ds_pod["enableServiceLinks"], false, "the installer needs the Service's variables");
    // The projected token for --authorize, where the installer looks for it.
    let token_dir =
        env_value(install, "RUST_IPAM_TOKEN_DIR").expect("RUST_IPAM_TOKEN_DIR in the node installer");
    let (_, vol) = mounted(ds_pod, install, token_dir);
    assert_eq!(vol["projected"]["sources"][0]["serviceAccountToken"]["audience"], "rust-ipam");
    let mounts: BTreeMap<&str, &str> = install["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| {
            let vol = ds_pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == m["name"]).unwrap();
            Some((m["mountPath"].as_str().unwrap(), vol["hostPath"]["path"].as_str()?))
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
        "for b in rust-ipam rust-multus rust-multus-shim rust-multus-daemon rust-macvlan rust-ipvlan; do",
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
fn mtls_overlay_wires_tls_the_admin_listeners_and_the_cronjob() {
    const TEST: &str = "mtls_overlay_wires_tls_the_admin_listeners_and_the_cronjob";
    if let Some(why) = missing(&[KUBECTL]) {
        return skip(TEST, &why);
    }
    let base = yaml_docs(&render("deploy"));
    let docs = yaml_docs(&render(MTLS_OVERLAY));
    let base_keys: BTreeSet<_> = base.iter().map(key).collect();
    let got: BTreeSet<_> = docs.iter().map(key).collect();
    let ns = |kind: &str, name: &str| (kind.to_string(), NAMESPACE.to_string(), name.to_string());
    // The base's objects, no more, no fewer.
    assert_eq!(got, base_keys);
    // Only the server, the node DaemonSet, the Service and the CronJob change.
    let changed = [
        ns("Deployment", "rust-ipam-server"),
        ns("DaemonSet", "rust-ipam-node"),
        ns("Service", "rust-ipam"),
        ns("CronJob", "rust-ipam-reconcile"),
    ];
    for d in &docs {
        if !changed.contains(&key(d)) {
            let b = base.iter().find(|b| key(b) == key(d)).unwrap();
            assert_eq!(d, b, "{:?} must be the base's", key(d));
        }
    }

    // The server: the base's flags, then TLS from the Secret, Admin on the socket and on a
    // TLS port that takes the admins' CA.
    let deployment = find(&docs, "Deployment", "rust-ipam-server");
    let pod = &deployment["spec"]["template"]["spec"];
    let server = container(pod, "server");
    let overlay_args = string_list(&server["args"]);
    let (base_args, added) = overlay_args.split_at(BASE_SERVER_ARGS.len().min(overlay_args.len()));
    assert_eq!(base_args, BASE_SERVER_ARGS, "the overlay appends to the base's flags");
    assert_eq!(
        added,
        [
            "--tls-cert=/etc/rust-ipam/tls/tls.crt",
            "--tls-key=/etc/rust-ipam/tls/tls.key",
            "--tls-client-ca=/etc/rust-ipam/tls/ca.crt",
            "--admin-listen=unix:/run/rust-ipam/admin.sock",
            "--admin-listen=0.0.0.0:50052",
            "--admin-tls-client-ca=/etc/rust-ipam/admin-ca/ca.crt",
            "--metrics-tls-cert=/etc/rust-ipam/tls/tls.crt",
            "--metrics-tls-key=/etc/rust-ipam/tls/tls.key",
        ]
    );
    // The metrics port is HTTPS: the probes and Prometheus' discovery are told so.
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(server[probe]["httpGet"]["scheme"], "HTTPS", "{probe}");
    }
    assert_eq!(deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scheme"], "https");
    // Only the admins' CA from their Secret, not its key.
    let (m, vol) = mounted(pod, server, "/etc/rust-ipam/admin-ca");
    assert_eq!(
        vol["secret"],
        json!({"secretName": "rust-ipam-admin-tls", "items": [{"key": "ca.crt", "path": "ca.crt"}],
               "defaultMode": 0o440})
    );
    assert_eq!(m["readOnly"], true);
    let admin_port = server["ports"].as_array().unwrap().iter().find(|p| p["name"] == "admin");
    assert_eq!(admin_port, Some(&json!({"name": "admin", "containerPort": 50052, "protocol": "TCP"})));
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
    remove_named(&mut rest, &format!("{c}/volumeMounts"), "admin-ca");
    remove_named(&mut rest, &format!("{c}/volumeMounts"), "admin-socket");
    remove_named(&mut rest, &format!("{c}/ports"), "admin");
    let c_obj = rest.pointer_mut(c).unwrap().as_object_mut().unwrap();
    assert_eq!(c_obj.remove("volumeMounts"), Some(json!([])));
    let spec = rest.pointer_mut("/spec/template/spec").unwrap().as_object_mut().unwrap();
    assert_eq!(spec.remove("volumes").map(|v| v.as_array().unwrap().len()), Some(3));
    spec["securityContext"].as_object_mut().unwrap().remove("fsGroup");
    for probe in ["readinessProbe", "livenessProbe"] {
        rest.pointer_mut(&format!("{c}/{probe}/httpGet")).unwrap().as_object_mut().unwrap().remove("scheme");
    }
    rest.pointer_mut("/spec/template/metadata/annotations")
        .unwrap()
        .as_object_mut()
        .unwrap()
        .remove("prometheus.io/scheme");
    assert_eq!(&rest, base_deployment);

    // The Service: gRPC over TLS, not h2c, and the admin port.
    let service = find(&docs, "Service", "rust-ipam");
    let port = |name: &str| service["spec"]["ports"].as_array().unwrap().iter().find(|p| p["name"] == name);
    assert_eq!(
        port("grpc"),
        Some(
            &json!({"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "https"})
        )
    );
    assert_eq!(
        port("admin"),
        Some(
            &json!({"name": "admin", "port": 50052, "targetPort": "admin", "protocol": "TCP", "appProtocol": "https"})
        )
    );
    assert_eq!(
        port("metrics"),
        Some(
            &json!({"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP", "appProtocol": "https"})
        )
    );
    let mut rest = service.clone();
    remove_named(&mut rest, "/spec/ports", "admin");
    rest["spec"]["ports"][0]["appProtocol"] = json!("kubernetes.io/h2c");
    rest["spec"]["ports"][1]["appProtocol"] = json!("http");
    assert_eq!(&rest, find(&base, "Service", "rust-ipam"));

    // The CronJob: rust-ipam-ctl over TLS to the admin port, with the admin certificate and
    // the CA of the server's certificate (the node Secret's ca.crt, nothing else of it).
    let cronjob = find(&docs, "CronJob", "rust-ipam-reconcile");
    let cron_pod = &cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    let rc = container(cron_pod, "reconcile");
    assert_eq!(
        string_list(&rc["args"]),
        [
            "reconcile",
            "--server=https://rust-ipam.rust-ipam.svc:50052",
            "--tls-ca=/etc/rust-ipam/admin-tls/server-ca.crt",
            "--tls-cert=/etc/rust-ipam/admin-tls/tls.crt",
            "--tls-key=/etc/rust-ipam/admin-tls/tls.key",
            "--token-file=/var/run/secrets/rust-ipam/token",
        ]
    );
    let (_, vol) = mounted(cron_pod, rc, "/etc/rust-ipam/admin-tls");
    assert_eq!(
        vol["projected"],
        json!({"defaultMode": 0o440, "sources": [
            {"secret": {"name": "rust-ipam-admin-tls", "items": [{"key": "tls.crt", "path": "tls.crt"},
                                                                 {"key": "tls.key", "path": "tls.key"}]}},
            {"secret": {"name": "rust-ipam-node-tls", "items": [{"key": "ca.crt", "path": "server-ca.crt"}]}}]})
    );
    assert_eq!(cron_pod["securityContext"]["fsGroup"], 65532);
    let mut rest = cronjob.clone();
    let t = "/spec/jobTemplate/spec/template/spec";
    *rest.pointer_mut(&format!("{t}/containers/0/args")).unwrap() = json!([
        "reconcile",
        format!("--server=http://rust-ipam.{NAMESPACE}.svc:50051"),
        "--token-file=/var/run/secrets/rust-ipam/token"
    ]);
    remove_named(&mut rest, &format!("{t}/containers/0/volumeMounts"), "admin-tls");
    remove_named(&mut rest, &format!("{t}/volumes"), "admin-tls");
    let spec = rest.pointer_mut(t).unwrap().as_object_mut().unwrap();
    spec["securityContext"].as_object_mut().unwrap().remove("fsGroup");
    assert_eq!(&rest, find(&base, "CronJob", "rust-ipam-reconcile"), "the rest of the CronJob is the base's");

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
        !string_list(&base_server["args"])
            .iter()
            .any(|a| a.starts_with("--tls") || a.starts_with("--admin-"))
    );
    find(&base, "CronJob", "rust-ipam-reconcile");

    // The image carries the ctl the CronJob runs and the docs tell operators to exec.
    let dockerfile = read("Dockerfile");
    for line in [
        "install -D -m 0755 target/release/rust-ipam-ctl /out/rust-ipam-ctl",
        "COPY --from=build /out/rust-ipam-ctl /usr/local/bin/rust-ipam-ctl",
    ] {
        assert!(dockerfile.contains(line), "Dockerfile must contain {line}");
    }
}

/// The thick overlay: the base unchanged but for the installer also installing the shim;
/// the daemon's config is a rust-multus config, the shim's config names the socket the
/// daemon binds on a host path; the daemon's account may list and watch pods and NADs; the
/// image builds the binaries the DaemonSet runs.
#[test]
fn thick_overlay_wires_the_daemon_the_shim_and_the_rbac() {
    const TEST: &str = "thick_overlay_wires_the_daemon_the_shim_and_the_rbac";
    if let Some(why) = missing(&[KUBECTL]) {
        return skip(TEST, &why);
    }
    let base = yaml_docs(&render("deploy"));
    let thick = yaml_docs(&render(THICK_OVERLAY));
    let daemon = find(&thick, "DaemonSet", "rust-multus-daemon");
    let spec = &daemon["spec"]["template"]["spec"];
    let c = container(spec, "daemon");
    let args = string_list(&c["args"]);
    let arg = |flag: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{flag}=")))
            .unwrap_or_else(|| panic!("the daemon has no --{flag}: {args:?}"))
            .to_string()
    };
    assert_eq!(
        c["image"],
        find(&base, "Deployment", "rust-ipam-server")["spec"]["template"]["spec"]["containers"][0]["image"]
    );
    assert_eq!(spec["serviceAccountName"], "rust-ipam-node");
    assert_eq!(spec["hostNetwork"], true, "the delegates make links on the host's masters");
    assert_eq!(env_field_ref(c, "NODE_NAME"), "spec.nodeName");

    // The config: a ConfigMap mounted where --config points, holding a config rust-multus
    // accepts, and the shim's config naming the socket the daemon binds.
    let config = std::path::Path::new(&arg("config")).to_path_buf();
    let (_, vol) = mounted(spec, c, config.parent().and_then(|p| p.to_str()).expect("dir"));
    let cm = find(&thick, "ConfigMap", vol["configMap"]["name"].as_str().expect("a ConfigMap volume"));
    let file = config.file_name().and_then(|f| f.to_str()).expect("file");
    let daemon_json = cm["data"][file].as_str().expect("daemon config in the ConfigMap");
    let conf =
        multus_core::multus::config::MultusConf::parse(daemon_json.as_bytes()).expect("a rust-multus config");
    assert_eq!(conf.cni_dir, std::path::Path::new("/var/lib/cni/multus"));
    let shim_json = cm["data"]["00-rust-multus.conf"].as_str().expect("the shim's config");
    let shim: Value = serde_json::from_str(shim_json).expect("JSON");
    assert_eq!(shim["type"], "rust-multus-shim");
    let shim = multus_core::multus::thick::ShimConf::parse(shim_json.as_bytes()).expect("a shim config");
    assert_eq!(shim.socket, std::path::Path::new(&arg("socket")), "shim and daemon agree on the socket");
    let (_, sock_vol) = mounted(spec, c, shim.socket.parent().and_then(|p| p.to_str()).expect("dir"));
    assert_eq!(
        sock_vol["hostPath"]["path"], "/run/rust-multus",
        "the socket is on the host, where the shim runs"
    );
    // Where the daemon looks for delegates and the cluster network is the host's.
    for (path, host) in [
        ("/opt/cni/bin", "/opt/cni/bin"),
        ("/etc/cni/net.d", "/etc/cni/net.d"),
        ("/var/lib/cni", "/var/lib/cni"),
    ] {
        assert_eq!(mounted(spec, c, path).1["hostPath"]["path"], host, "{path}");
    }
    // Probes reach the metrics listener.
    let listen = arg("metrics-listen");
    let port: i64 = listen.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], port);
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], port);

    // RBAC: list and watch of pods and NADs, bound to the daemon's account.
    let role = find(&thick, "ClusterRole", "rust-ipam-node-watch");
    let rules = role["rules"].as_array().expect("rules");
    for (group, resource) in [("", "pods"), ("k8s.cni.cncf.io", "network-attachment-definitions")] {
        assert!(
            rules.iter().any(|r| string_list(&r["apiGroups"]) == [group]
                && string_list(&r["resources"]) == [resource]
                && string_list(&r["verbs"]) == ["list", "watch"]),
            "list+watch of {resource}: {rules:?}"
        );
    }
    let binding = find(&thick, "ClusterRoleBinding", "rust-ipam-node-watch");
    assert_eq!(binding["roleRef"]["name"], "rust-ipam-node-watch");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "rust-ipam-node", "namespace": NAMESPACE}])
    );

    // The installer installs the shim; the image has both binaries.
    let install =
        container(&find(&thick, "DaemonSet", "rust-ipam-node")["spec"]["template"]["spec"], "install")
            .clone();
    let binaries = env_value(&install, "RUST_IPAM_BINARIES").expect("RUST_IPAM_BINARIES");
    assert!(binaries.split(' ').any(|b| b == "rust-multus-shim"), "{binaries}");
    let dockerfile = read("Dockerfile");
    for b in ["rust-multus-shim", "rust-multus-daemon"] {
        assert!(dockerfile.contains(&format!(" {b} ")), "the image must build {b}");
    }
    assert_eq!(c["command"], json!(["/opt/rust-ipam/cni/rust-multus-daemon"]));

    // Nothing of the base changes but the installer's environment.
    let mut base_objects: Vec<(String, String, String)> = base.iter().map(key).collect();
    base_objects.sort();
    for k in &base_objects {
        let (kind, ns, name) = k;
        let b = base.iter().find(|o| &key(o) == k).expect("base object");
        let t = thick
            .iter()
            .find(|o| &key(o) == k)
            .unwrap_or_else(|| panic!("{kind} {ns}/{name} missing from the overlay"));
        if kind == "DaemonSet" && name == "rust-ipam-node" {
            continue;
        }
        assert_eq!(normalize(t.clone()), normalize(b.clone()), "{kind} {ns}/{name} changed");
    }
}
