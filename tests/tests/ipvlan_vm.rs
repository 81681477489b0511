//! The delegates on a kernel that has ipvlan and dummy links: a stock Debian kernel booted
//! under qemu (see `rust_ipam_e2e::microvm`), one boot per scenario, the scenario a shell
//! script in `tests/vm/` that records every command's output; the assertions are here.
//!
//! Needs qemu-system-x86, busybox, the reference plugins and an unpacked Debian kernel in
//! `$RUST_IPAM_VM_KERNEL_DIR` (`.ci/run` installs all of it); without them each test prints
//! SKIP (and fails in CI).

use rust_ipam_e2e::microvm::{self, Boot};
use serde_json::{Value, json};

/// Boots `script`, or prints SKIP and returns `None` when this machine cannot.
fn boot(test: &str, script: &str) -> Option<Boot> {
    if microvm::skip(test) {
        return None;
    }
    Some(microvm::boot(script, &[]).unwrap_or_else(|e| panic!("{test}: {e:#}")))
}

/// `ip -j addr` of one device: its IPv4 addresses as `addr/prefix`.
fn inet(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or_default(), a["prefixlen"]))
        .collect()
}

/// Link names in an `ip -j link` listing.
fn names(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|l| l["ifname"].as_str().map(str::to_string)).collect()
}

/// `rust-ipam-ctl leases` lines as (address/prefix, container ID).
fn leases(b: &Boot, name: &str) -> Vec<(String, String)> {
    let r = b.rec(name);
    assert_eq!(r.rc, 0, "{name}: {}", r.stderr);
    let mut out: Vec<(String, String)> = r
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let addr = l.split('\t').next().unwrap_or_default().to_string();
            let cid = l.split_whitespace().find_map(|w| w.strip_prefix("container=")).unwrap_or_default();
            (addr, cid.to_string())
        })
        .collect();
    out.sort();
    out
}

#[test]
fn rust_ipvlan_l2_l3_l3s_pods_get_addresses_ping_check_and_del() {
    let Some(b) = boot(
        "rust_ipvlan_l2_l3_l3s_pods_get_addresses_ping_check_and_del",
        include_str!("../vm/ipvlan_modes.sh"),
    ) else {
        return;
    };
    b.verify(|b| {
        for (n, mode) in [(20, "l2"), (21, "l3"), (22, "l3s")] {
            let (a, bb) = (format!("{mode}-a"), format!("{mode}-b"));
            let r1 = b.ok_json(&format!("add-{a}"));
            let r2 = b.ok_json(&format!("add-{bb}"));
            let master = b.ok_json(&format!("master-{mode}"));
            let master_mac = master[0]["address"].as_str().expect("master MAC");
            assert_eq!(
                r1,
                json!({"cniVersion": "1.0.0", "dns": {},
                    "interfaces": [{"name": "net1", "mac": master_mac, "sandbox": format!("/var/run/netns/{a}")}],
                    "ips": [{"address": format!("198.18.{n}.1/24"), "interface": 0}]}),
                "{mode}: an ipvlan link has its master's MAC"
            );
            assert_eq!(r2["ips"], json!([{"address": format!("198.18.{n}.2/24"), "interface": 0}]));
            assert_eq!(inet(&b.ok_json(&format!("addr-{a}"))), [format!("198.18.{n}.1/24")]);
            assert_eq!(inet(&b.ok_json(&format!("addr-{bb}"))), [format!("198.18.{n}.2/24")]);
            let link = &b.ok_json(&format!("link-{a}"))[0];
            assert_eq!(link["linkinfo"]["info_kind"], "ipvlan", "{link}");
            assert_eq!(link["linkinfo"]["info_data"]["mode"], mode, "{link}");
            assert_eq!(link["link_index"], master[0]["ifindex"], "on its master: {link}");
            assert_eq!(
                leases(b, &format!("leases-{mode}")),
                [(format!("198.18.{n}.1/24"), format!("cid-{a}")), (format!("198.18.{n}.2/24"), format!("cid-{bb}"))]
            );
            let ping = b.rec(&format!("ping-{mode}"));
            assert_eq!(ping.rc, 0, "{mode}: {a} cannot reach {bb} over net1: {ping:?}");
            assert!(ping.stdout.contains("1 packets received"), "{ping:?}");
            assert_eq!((b.rec(&format!("check-{a}")).rc, b.json(&format!("check-{a}"))), (0, Value::Null));
            assert_eq!((b.rec(&format!("del-{a}")).rc, b.json(&format!("del-{a}"))), (0, Value::Null));
            assert_eq!(names(&b.ok_json(&format!("links-{a}"))), ["lo"], "net1 is gone from {a}");
            assert_eq!(
                leases(b, &format!("leases-{mode}-after-del")),
                [(format!("198.18.{n}.2/24"), format!("cid-{bb}"))]
            );
            let again = b.rec(&format!("del-again-{a}"));
            assert_eq!((again.rc, again.stdout.as_str()), (0, ""), "a repeated DEL succeeds");
            assert_eq!(b.rec(&format!("del-{bb}")).rc, 0);
            assert_eq!(names(&b.ok_json(&format!("links-{bb}"))), ["lo"]);
            assert_eq!(leases(b, &format!("leases-{mode}-end")), []);
        }
        let mut node = names(&b.ok_json("node-links"));
        node.sort();
        assert_eq!(node, ["iv-l2", "iv-l3", "iv-l3s", "lo"], "no temporary link left on the node");
    });
}

/// An error's (exit code, CNI code, message).
fn error(b: &Boot, name: &str) -> (i32, Option<u64>, String) {
    let v = b.json(name);
    (b.rec(name).rc, v["code"].as_u64(), v["msg"].as_str().unwrap_or_default().to_string())
}

#[test]
fn result_and_errors_match_debian_ipvlan() {
    let Some(b) = boot("result_and_errors_match_debian_ipvlan", include_str!("../vm/ipvlan_reference.sh"))
    else {
        return;
    };
    b.verify(|b| {
        for v in ["1.0.0", "0.4.0", "0.3.1"] {
            for mode in ["l2", "l3"] {
                let theirs = b.ok_json(&format!("ref-add-{v}-{mode}"));
                let mine = b.ok_json(&format!("our-add-{v}-{mode}"));
                // The whole result, MAC included: an ipvlan link has its master's.
                assert_eq!(mine, theirs, "result of cniVersion {v}, mode {mode}");
                assert_eq!(
                    mine["ips"][0]["address"], "198.18.23.2/24",
                    "the same attachment, the same lease"
                );
                for who in ["ref", "our"] {
                    let link = &b.ok_json(&format!("{who}-link-{v}-{mode}"))[0];
                    assert_eq!(
                        (&link["linkinfo"]["info_kind"], &link["linkinfo"]["info_data"]["mode"]),
                        (&json!("ipvlan"), &json!(mode)),
                        "{who}: {link}"
                    );
                }
                assert_eq!(b.rec(&format!("ref-del-{v}-{mode}")).rc, 0);
                assert_eq!(b.rec(&format!("our-del-{v}-{mode}")).rc, 0);
            }
        }
        assert_eq!(b.rec("our-add-check").rc, 0);
        assert_eq!(
            (b.rec("ref-check").rc, b.json("ref-check")),
            (0, Value::Null),
            "Debian's CHECK of our link"
        );
        assert_eq!((b.rec("our-check").rc, b.json("our-check")), (0, Value::Null));
        assert_eq!(b.rec("our-del-check").rc, 0);

        // What both refuse. Debian's plugin answers 999 (its catch-all) where the spec has a
        // code; ours gives the spec's: 7, invalid network config, naming the value.
        let both = [
            ("bad-mode", 7, "mode \"bridge\" is not one of the ipvlan modes l2, l3, l3s"),
            ("no-master", 7, "master \"nope0\" not found in the node's network namespace"),
            (
                "old-version",
                1,
                "cniVersion \"0.2.0\" is not supported; supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0",
            ),
            (
                "no-ipam-plugin",
                7,
                "plugin \"no-such-ipam\" not found in CNI_PATH [/opt/cni/bin, /usr/lib/cni]",
            ),
        ];
        for (case, code, msg) in both {
            let (rc, theirs, _) = error(b, &format!("ref-{case}"));
            assert_eq!(rc, 1, "Debian's plugin refuses {case}");
            assert!(theirs == Some(999) || theirs == Some(code), "{case}: Debian's code {theirs:?}");
            assert_eq!(error(b, &format!("our-{case}")), (1, Some(code), msg.to_string()), "{case}");
        }
        assert_eq!(error(b, "ref-old-version").1, Some(1), "the same code where Debian's has one");
        // What Debian's plugin lets through and the kernel would take, ours refuses: an MTU
        // above the master's (the kernel makes the link and drops what does not fit) and a
        // negative one.
        for (case, msg) in [
            ("mtu-above-master", "mtu 9000 is larger than the MTU 1500 of master \"ref0\""),
            ("mtu-negative", "mtu -5 is out of range: 0 (the master's) or 68 to 65535"),
        ] {
            assert_eq!(b.rec(&format!("ref-{case}")).rc, 0, "Debian's plugin takes {case}");
            assert_eq!(error(b, &format!("our-{case}")), (1, Some(7), msg.to_string()), "{case}");
        }
        // No ipam: ours makes a layer-2 link without addresses (as both macvlan plugins do);
        // Debian's ipvlan refuses.
        assert_eq!(
            b.ok_json("our-no-ipam"),
            json!({"cniVersion": "1.0.0", "dns": {}, "interfaces": [{"name": "net1",
                "mac": mac_of(&b.ok_json("node-links"), "ref0"), "sandbox": "/var/run/netns/p"}]})
        );
        assert_eq!(error(b, "ref-no-ipam"), (1, Some(999), "no plugin name provided".to_string()));
        for case in
            ["bad-mode", "no-master", "old-version", "no-ipam-plugin", "mtu-above-master", "mtu-negative"]
        {
            assert_eq!(names(&b.ok_json(&format!("links-{case}"))), ["lo"], "{case}: nothing made");
            assert_eq!(leases(b, &format!("leases-{case}")), [], "{case}: no lease");
        }
        let mut node = names(&b.ok_json("node-links"));
        node.sort();
        assert_eq!(node, ["lo", "ref0"]);
        assert_eq!(leases(b, "leases-end"), []);
    });
}

/// The MAC of `dev` in an `ip -j link` listing.
fn mac_of(links: &Value, dev: &str) -> String {
    let l = links.as_array().into_iter().flatten().find(|l| l["ifname"] == dev);
    l.and_then(|l| l["address"].as_str()).unwrap_or_else(|| panic!("no {dev} in {links}")).to_string()
}

#[test]
fn multus_pod_gets_a_bridge_eth0_and_an_ipvlan_net1() {
    let Some(b) =
        boot("multus_pod_gets_a_bridge_eth0_and_an_ipvlan_net1", include_str!("../vm/multus_ipvlan.sh"))
    else {
        return;
    };
    b.verify(|b| {
        let master_mac = b.ok_json("master")[0]["address"].as_str().expect("master MAC").to_string();
        for (i, pod) in ["seed-1", "seed-2"].iter().enumerate() {
            let r = b.ok_json(&format!("add-{pod}"));
            let (eth0, net1) = (format!("198.18.100.{}", i + 2), format!("198.18.26.{}", i + 1));
            // The runtime gets the cluster network's result.
            assert_eq!(r["ips"], json!([{"address": format!("{eth0}/24"), "gateway": "198.18.100.1", "interface": 2}]));
            assert_eq!(inet(&b.ok_json(&format!("eth0-{pod}"))), [format!("{eth0}/24")]);
            assert_eq!(inet(&b.ok_json(&format!("net1-{pod}"))), [format!("{net1}/24")]);
            let links = b.ok_json(&format!("links-{pod}"));
            let net1_link = links.as_array().into_iter().flatten().find(|l| l["ifname"] == "net1").expect("net1");
            assert_eq!(
                (&net1_link["linkinfo"]["info_kind"], &net1_link["linkinfo"]["info_data"]["mode"]),
                (&json!("ipvlan"), &json!("l2"))
            );
            let file = b.ok_json(&format!("pod-{pod}"));
            let status = file["metadata"]["annotations"]["k8s.v1.cni.cncf.io/network-status"]
                .as_str()
                .unwrap_or_else(|| panic!("no network-status in {file}"));
            assert_eq!(
                serde_json::from_str::<Value>(status).expect("network-status JSON"),
                json!([
                    {"name": "cluster-net", "interface": "eth0", "ips": [eth0], "mac": mac_of(&links, "eth0"),
                     "default": true, "dns": {}},
                    {"name": "team/backend", "interface": "net1", "ips": [net1], "mac": master_mac, "dns": {}},
                ]),
                "{pod}"
            );
            assert_eq!(mac_of(&links, "net1"), master_mac);
        }
        assert_eq!(
            leases(b, "leases"),
            [("198.18.26.1/24".into(), "cid-seed-1".into()), ("198.18.26.2/24".into(), "cid-seed-2".into())]
        );
        assert_eq!(b.rec("ping-net1").rc, 0, "seed-1 reaches seed-2 over the ipvlan net1: {:?}", b.rec("ping-net1"));
        assert_eq!(b.rec("ping-eth0").rc, 0, "and over the bridge eth0: {:?}", b.rec("ping-eth0"));
        assert_eq!((b.rec("check-seed-2").rc, b.json("check-seed-2")), (0, Value::Null));
        for pod in ["seed-1", "seed-2"] {
            assert_eq!((b.rec(&format!("del-{pod}")).rc, b.json(&format!("del-{pod}"))), (0, Value::Null));
            assert_eq!(names(&b.ok_json(&format!("links-after-{pod}"))), ["lo"], "{pod}");
        }
        assert_eq!(leases(b, "leases-end"), []);
        let held: Vec<&str> = b.rec("host-local-end").stdout.lines().filter(|l| l.starts_with("198.")).collect();
        assert!(held.is_empty(), "host-local released eth0's addresses: {held:?}");
    });
}

#[test]
fn ipvlan_rules_are_enforced_before_anything_is_made() {
    let Some(b) =
        boot("ipvlan_rules_are_enforced_before_anything_is_made", include_str!("../vm/ipvlan_rules.sh"))
    else {
        return;
    };
    b.verify(|b| {
        assert_eq!(b.ok_json("add-a")["ips"][0]["address"], "198.18.24.1/24");
        let cases = [
            ("missing", "master \"nope0\" not found in the node's network namespace"),
            ("down", "master \"rules-down\" is down: a link on it would pass no traffic (ip link set rules-down up)"),
            (
                "l3",
                "master \"rules0\" already has ipvlan links in mode l2 (net1 in /run/netns/a): the kernel keeps one mode per master and would switch them all to l3",
            ),
            ("mtu", "mtu 9000 is larger than the MTU 1500 of master \"rules0\""),
        ];
        for (case, msg) in cases {
            assert_eq!(error(b, &format!("add-b-{case}")), (1, Some(7), msg.to_string()), "{case}");
            assert_eq!(names(&b.ok_json(&format!("links-b-{case}"))), ["lo"], "{case}: no link in the pod");
            assert_eq!(
                leases(b, &format!("leases-{case}")),
                [("198.18.24.1/24".into(), "cid-a".into())],
                "{case}: only a's lease"
            );
        }
        // a's link kept its mode: the refused l3 never reached the kernel.
        assert_eq!(b.ok_json("link-a")[0]["linkinfo"]["info_data"]["mode"], "l2");
        let mut node = names(&b.ok_json("node-links"));
        node.sort();
        assert_eq!(node, ["lo", "rules-down", "rules0"], "no link left on the node");
        assert_eq!(b.ok_json("add-b-l2")["ips"][0]["address"], "198.18.24.2/24", "the same mode is fine");
        assert_eq!(b.rec("del-a").rc, 0);
        assert_eq!(b.rec("del-b").rc, 0);
        assert_eq!(b.ok_json("add-b-l3-alone")["ips"][0]["address"], "198.18.24.1/24", "alone, another mode is fine");
        assert_eq!(b.ok_json("link-b-l3")[0]["linkinfo"]["info_data"]["mode"], "l3");
        assert_eq!(b.rec("del-b-l3").rc, 0);
        assert_eq!(leases(b, "leases-end"), []);
    });
}

#[test]
fn rust_macvlan_on_dummy_masters() {
    let Some(b) = boot("rust_macvlan_on_dummy_masters", include_str!("../vm/macvlan_dummy.sh")) else {
        return;
    };
    b.verify(|b| {
        for mode in ["bridge", "private"] {
            let (a, bb) = (format!("{mode}-a"), format!("{mode}-b"));
            assert_eq!(
                b.ok_json(&format!("add-{a}"))["ips"],
                json!([{"address": "198.18.25.1/24", "interface": 0}])
            );
            assert_eq!(
                b.ok_json(&format!("add-{bb}"))["ips"],
                json!([{"address": "198.18.25.2/24", "interface": 0}])
            );
            assert_eq!(inet(&b.ok_json(&format!("addr-{bb}"))), ["198.18.25.2/24"]);
            let link = &b.ok_json(&format!("link-{a}"))[0];
            assert_eq!(
                (&link["linkinfo"]["info_kind"], &link["linkinfo"]["info_data"]["mode"]),
                (&json!("macvlan"), &json!(mode))
            );
            assert_eq!((b.rec(&format!("check-{a}")).rc, b.json(&format!("check-{a}"))), (0, Value::Null));
            assert_eq!(
                leases(b, &format!("leases-{mode}")),
                [
                    ("198.18.25.1/24".into(), format!("cid-{a}")),
                    ("198.18.25.2/24".into(), format!("cid-{bb}"))
                ]
            );
            assert_eq!(b.rec(&format!("del-{a}")).rc, 0);
            assert_eq!(b.rec(&format!("del-{bb}")).rc, 0);
            assert_eq!(names(&b.ok_json(&format!("links-{a}"))), ["lo"]);
            assert_eq!(leases(b, &format!("leases-{mode}-end")), []);
        }
        let (bridge, private) = (b.rec("ping-bridge"), b.rec("ping-private"));
        assert_eq!(bridge.rc, 0, "bridge mode: the pods reach each other: {bridge:?}");
        // private mode: the master drops traffic between its macvlan links.
        assert_eq!(private.rc, 1, "private mode: no answer: {private:?}");
        assert!(private.stdout.contains("0 packets received"), "{private:?}");
        let (theirs, mine) = (b.ok_json("ref-add"), b.ok_json("our-add"));
        let no_mac = |mut v: Value| {
            v["interfaces"][0]["mac"] = json!("<mac>");
            v
        };
        assert_eq!(no_mac(mine), no_mac(theirs), "Debian's macvlan on a dummy master: the same result");
        assert_eq!((b.rec("ref-del").rc, b.rec("our-del").rc), (0, 0));
    });
}
