#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/seed-*).

Seeds are real inputs: the recorded fixtures of Multus 4.3 and Whereabouts 0.9.4 (copied
from ../shared/fixtures into fuzz/seeds/fixtures, as data) and the inputs of the unit
tests. A target taking several inputs gets them joined by NUL (see fuzz/src/lib.rs). The
gRPC seeds are protobuf, encoded here by hand (strings, messages and varints are all they
use). Run from anywhere; files are only added or overwritten.
"""
import base64
import json
import pathlib
import struct

HERE = pathlib.Path(__file__).resolve().parent
FIX = HERE / "fixtures"
CORPUS = HERE.parent / "corpus"


def put(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / f"seed-{name}").write_bytes(data)


def join(*fields):
    return b"\0".join(f.encode() if isinstance(f, str) else f for f in fields)


# --- the recorded delegate calls: environment and stdin -------------------------------
calls = []
cur = None
for line in (FIX / "multus" / "delegate-calls.log").read_text().splitlines():
    if line.startswith("== "):
        cur = {"title": line[3:]}
        calls.append(cur)
    elif line.startswith("stdin: "):
        cur["stdin"] = line[len("stdin: "):]
    elif "=" in line and cur is not None:
        k, v = line.split("=", 1)
        cur[k] = v

for i, c in enumerate(calls):
    env = [c.get(k, "") for k in
           ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"]]
    put("cni_env", f"fixture-call-{i}", join(*env, json.loads(c["stdin"])["cniVersion"]))
    put("link_conf", f"fixture-call-{i}", b"\0" + join(c["stdin"], c.get("CNI_ARGS", "")))
    put("link_conf", f"fixture-call-{i}-ipvlan", b"\1" + join(c["stdin"].replace("macvlan", "ipvlan")
                                                          .replace('"bridge"', '"l3"'), c.get("CNI_ARGS", "")))
    prev = json.loads(c["stdin"]).get("prevResult")
    if prev:
        put("cni_result", f"fixture-prev-{i}", json.dumps(prev))
for cmd in ["VERSION", "GC", "STATUS", "CHECK"]:
    put("cni_env", f"cmd-{cmd.lower()}", join(cmd, "cid", "/var/run/netns/x", "eth0", "A=1;B=", "/opt/cni/bin", "1.1.0"))
put("cni_env", "bad-args", join("ADD", "cid", "/var/run/netns/x", "eth0", "K8S_POD_NAME", "/opt/cni/bin", "0.3.1"))

# --- results: what Multus returned and cached -----------------------------------------
for f in [FIX / "multus" / "add-result.json", *sorted((FIX / "multus" / "cache" / "results").iterdir())]:
    v = json.loads(f.read_text())
    put("cni_result", f"fixture-{f.name}", json.dumps(v.get("result", v)))
put("cni_result", "legacy-0.2.0", json.dumps({"cniVersion": "0.2.0", "ip4": {"ip": "10.1.1.5/24"}}))
put("cni_result", "v6-routes-dns", json.dumps({
    "cniVersion": "1.1.0", "interfaces": [{"name": "net1", "mac": "c2:11:22:33:44:55", "mtu": 1500}],
    "ips": [{"address": "fd00:50::1/64", "gateway": "fd00:50::ffff", "interface": 0}],
    "routes": [{"dst": "::/0", "gw": "fd00:50::ffff", "mtu": 1400, "table": 100, "scope": 0}],
    "dns": {"nameservers": ["fd00::53"], "domain": "cluster.local", "search": ["a"], "options": ["ndots:5"]}}))

# --- the rust-ipam plugin's config and node file --------------------------------------
nad = {"cniVersion": "1.0.0", "name": "backend-network", "type": "macvlan", "master": "eth1",
       "ipam": {"type": "rust-ipam", "range": "10.56.0.0/16", "exclude": ["10.56.0.0/28"],
                "gateway": "10.56.0.1", "server": "http://10.96.0.50:50051"}}
put("ipam_conf", "readme-nad", join(json.dumps(nad), ""))
node = {"server": ["http://127.0.0.1:50051", "unix:///run/rust-ipam/ipam.sock"], "timeout_ms": 5000,
        "node_name": "node-a", "network_name": "rail0"}
nad2 = {"cniVersion": "0.3.1", "name": "rail0", "type": "ipvlan",
        "ipam": {"type": "rust-ipam", "ipRanges": [{"range": "fd00:50::/64", "range_start": "fd00:50::10",
                                                   "exclude": ["fd00:50::10/127"]},
                                                  {"range": "198.18.0.10-198.18.0.20/24"}],
                 "routes": [{"dst": "0.0.0.0/0"}], "dns": {"nameservers": ["10.0.0.53"]},
                 "enable_overlapping_ranges": True, "datastore": "kubernetes"},
        "runtimeConfig": {"ips": ["198.18.0.12/24"]}, "args": {"cni": {"ips": ["fd00:50::12/64"]}},
        "cni.dev/valid-attachments": [{"containerID": "cid-a1", "ifname": "net1"}]}
put("ipam_conf", "iprange-node-file", join(json.dumps(nad2), json.dumps(node)))
put("ipam_conf", "node-file-range", join(json.dumps({"cniVersion": "1.1.0", "name": "n", "ipam": {"type": "rust-ipam"}}),
                                         json.dumps({"range": "198.18.2.0/24", "gateway": "198.18.2.1"})))

# --- the networks annotation ----------------------------------------------------------
for name, value in {
    "fixture": '[{"name":"rail-0","interface":"net1"},{"name":"rail-1","interface":"net2","ips":["198.18.31.42/24"]}]',
    "comma": "rail-0, other/rail-1@net5,rail-2",
    "full": '[{"name":"a","namespace":"n","mac":"c2:11:22:33:44:55","default-route":["10.1.1.1"],"cni-args":{"mtu":9000}}]',
}.items():
    put("networks_annotation", name, join(value, "fixture"))

# --- rust-multus: config, annotation, NAD spec.config, default network -----------------
cache = json.loads((FIX / "multus" / "cache" / "cid-fx1").read_text())
# Multus' delegate cache: each delegate's config bytes, as a NAD's spec.config; the first
# (the cluster network) also inline as the config's delegate.
cluster = base64.b64decode(cache[0]["Bytes"]).decode()
for i, d in enumerate(cache):
    put("multus_nad", f"fixture-delegate-{i}", join(
        json.dumps({"cniVersion": "1.0.0", "name": "multus-cni-network", "delegates": [json.loads(cluster)]}),
        '[{"name":"rail-0","interface":"net1"},{"name":"rail-1","interface":"net2","ips":["198.18.31.42/24"]}]',
        base64.b64decode(d["Bytes"]).decode(),
        ""))
conflist = {"cniVersion": "1.0.0", "name": "rail", "plugins": [
    {"type": "macvlan", "capabilities": {"ips": True, "mac": True}, "ipam": {"type": "rust-ipam", "range": "198.18.0.0/24"}},
    {"type": "tuning", "sysctl": {"net.core.somaxconn": "500"}}]}
put("multus_nad", "conflist-default-network", join(
    json.dumps({"cniVersion": "1.1.0", "name": "multus", "delegates": [
        {"cniVersion": "1.0.0", "name": "cluster", "type": "bridge"}], "namespaceIsolation": True,
        "globalNamespaces": "default,kube-system", "systemNamespaces": ["kube-system"]}),
    "rail-0@net1,kube-system/rail-1",
    json.dumps(conflist),
    "default/cluster-net"))
put("multus_nad", "cached-result", join(json.dumps({"cniVersion": "1.0.0", "name": "m", "clusterNetwork": "x"}),
                                        "", (FIX / "multus" / "add-result.json").read_text(), ""))

# --- Whereabouts import ---------------------------------------------------------------
ippools = (FIX / "whereabouts" / "ippools.yaml").read_text()
reservations = (FIX / "whereabouts" / "overlappingrangeipreservations.yaml").read_text()
put("whereabouts_import", "fixture-pools", ippools)
put("whereabouts_import", "fixture-pools-and-reservations", join(ippools, reservations))
put("whereabouts_import", "single-object", """apiVersion: whereabouts.cni.cncf.io/v1alpha1
kind: IPPool
metadata: {name: rail0-10.50.0.0-16, namespace: kube-system}
spec:
  range: 10.50.0.0/16
  allocations:
    "256": {id: cid-a1, ifname: net2, podref: ai-training/train-0}
---
apiVersion: whereabouts.cni.cncf.io/v1alpha1
kind: OverlappingRangeIPReservation
metadata: {name: fd00-50--1, namespace: kube-system}
spec: {ifname: net1, podref: default/v6pod}
""")
put("whereabouts_import", "json-list", json.dumps({"apiVersion": "v1", "kind": "List", "items": [
    {"kind": "IPPool", "metadata": {"name": "fd00-50---64"},
     "spec": {"range": "fd00:50::/64", "allocations": {"1": {"id": "c", "ifname": "net1", "podref": "default/v6pod"}}}}]}))

# --- IPLease / RangePool objects read back --------------------------------------------
lease = {"apiVersion": "ipam.rust-ipam.io/v1alpha1", "kind": "IPLease",
         "metadata": {"name": "198.18.0.2", "namespace": "rust-ipam", "resourceVersion": "12"},
         "spec": {"network": "", "address": "198.18.0.2", "prefixLen": 24, "range": "198.18.0.0/24",
                  "gateway": "198.18.0.1", "containerId": "cid-a1", "ifname": "net1",
                  "podRef": "ai-training/train-0", "podUid": "uid-1", "node": "node-a",
                  "createdUnixMs": 1700000000000}}
pool = {"apiVersion": "ipam.rust-ipam.io/v1alpha1", "kind": "RangePool",
        "metadata": {"name": "198.18.0.0-24"},
        "spec": {"network": "", "range": "198.18.0.0/24", "exclude": ["198.18.0.0/28"], "gateway": "198.18.0.1"}}
put("kube_objects", "list", json.dumps({"apiVersion": "v1", "kind": "List", "items": [pool, lease]}))
put("kube_objects", "lease-yaml", "apiVersion: ipam.rust-ipam.io/v1alpha1\nkind: IPLease\nmetadata:\n  name: rail0.fd00-50--1\n"
    "spec:\n  network: rail0\n  address: fd00:50::1\n  prefixLen: 64\n  range: fd00:50::/64\n  note: by hand\n")

# --- IPPools as a pools directory file holds them --------------------------------------
EXAMPLES = HERE.parent.parent / "deploy" / "examples"
put("ippools", "example", (EXAMPLES / "ippool.yaml").read_text())
put("ippools", "rails", (EXAMPLES / "rails.yaml").read_text())
put("ippools", "edges", "apiVersion: ipam.rust-ipam.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: v6all\n"
    "spec:\n  ranges:\n  - range: ::/0\n  perNodePrefix: 1\n  gatewayIndex: 1\n---\n"
    "apiVersion: ipam.rust-ipam.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: tight\n"
    "spec:\n  ranges:\n  - range: 198.18.0.0/30\n    exclude: [198.18.0.1]\n  cooldown: 60m\n---\n"
    "apiVersion: ipam.rust-ipam.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: bad\n"
    "spec:\n  ranges:\n  - range: 198.18.12.0/24\n    range_start: 198.18.11.200\n")
put("ippools", "runs-rails-selectors",
    "apiVersion: ipam.rust-ipam.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: run0\n"
    "spec:\n  ranges:\n  - range: 198.18.0.0/24\n    gateway: 198.18.0.1\n  perNodeBlockSize: 7\n"
    "  railGroup: g\n---\n"
    "apiVersion: ipam.rust-ipam.io/v1alpha1\nkind: IPPool\nmetadata:\n  name: run1\n"
    "spec:\n  ranges:\n  - range: 198.18.1.0/24\n  perNodePrefix: 29\n  gatewayIndex: 1\n  railGroup: g\n"
    "  nodeSelector:\n    matchLabels: {gpu: \"true\"}\n    matchExpressions:\n    - {key: zone, operator: In, values: [a]}\n")

# --- gRPC requests: method byte, u16 LE length, protobuf ------------------------------
def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, value):
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint(num << 3 | 2) + varint(len(value)) + value


def msg(*fields):
    return b"".join(field(n, v) for n, v in fields if v is not None)


def record(method, body):
    return bytes([method]) + struct.pack("<H", len(body)) + body


def attachment(cid, pod):
    return msg((1, cid), (2, "net1"), (3, msg((1, "ai-training"), (2, pod), (3, "uid-" + pod))), (4, "node-a"))


def rng(r, start=None, end=None, exclude=(), gw=None):
    return msg((1, r), (2, start), (3, end), *[(4, e) for e in exclude], (5, gw))


alloc_v4 = msg((1, attachment("cid-a1", "train-0")), (2, ""), (3, rng("198.18.0.0/24", exclude=["198.18.0.0/28"], gw="198.18.0.1")))
alloc_dual = msg((1, attachment("cid-a2", "train-1")), (2, "rail0"),
                 (3, rng("198.18.0.0/16", "198.18.0.10", "198.18.0.20")), (3, rng("fd00:50::/64")), (4, "198.18.0.12"))
put("grpc_requests", "allocate-release", record(0, alloc_v4) + record(2, msg((1, attachment("cid-a1", "train-0")))) +
    record(1, msg((1, attachment("cid-a1", "train-0")))))
put("grpc_requests", "dual-stack-gc", record(0, alloc_dual) + record(0, alloc_v4) +
    record(3, msg((1, "rail0"), (2, msg((1, "cid-a1"), (2, "net1"))), (3, "node-a"))) + record(4, b""))
put("grpc_requests", "admin", record(0, alloc_v4) + record(5, b"") + record(6, msg((7, 1))) +
    record(7, msg((1, ""), (2, "198.18.0.16"))) + record(8, msg((1, ""), (2, "198.18.0.99"), (3, "printer"))) +
    record(9, msg((1, ""), (2, "198.18.0.16"), (3, "pod gone"))) + record(6, msg((8, "3139382e31382e302e31362f"))))
put("grpc_requests", "exhaust", record(0, msg((1, attachment("c1", "p1")), (3, rng("198.18.0.0/30")))) +
    record(0, msg((1, attachment("c2", "p2")), (3, rng("198.18.0.0/30")))) +
    record(0, msg((1, attachment("c3", "p3")), (3, rng("198.18.0.0/30")))))
att = msg((1, "c"), (2, "net1"))
for name, r, extra in [
    ("v6all", msg((1, "::/0")), b""),
    ("v4all", msg((1, "0.0.0.0/0")), b""),
    ("v6all-excl", msg((1, "::/0"), (4, "::/1"), (4, "8000::/1")), b""),
    ("v6-128", msg((1, "::1/128")), b""),
    ("v4-32", msg((1, "10.0.0.1/32")), record(5, b"")),
    ("v4-31", msg((1, "10.0.0.0/31")), record(5, b"")),
    ("range-form", msg((1, "::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/0")), record(5, b"")),
]:
    put("grpc_requests", f"edge-{name}", record(0, msg((1, att), (3, r))) + extra)
last = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
put("grpc_requests", "edge-v6all-req", record(0, msg((1, att), (3, msg((1, "::/0"), (5, last))), (4, last))) + record(5, b""))
print("seeds written to", CORPUS)
