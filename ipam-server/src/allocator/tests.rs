use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use std::sync::Arc;

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn spec(range: &str, exclude: &[&str], gateway: &str) -> RangeSpec {
    RangeSpec::parse(
        &RangeInput {
            range: range.into(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
            gateway: gateway.into(),
            ..Default::default()
        },
        FieldPrefix(""),
    )
    .expect("valid test range")
}

fn att(cid: &str, ifname: &str, pod: &str) -> Attachment {
    Attachment {
        container_id: cid.into(),
        ifname: ifname.into(),
        pod: PodRef { namespace: "ns".into(), name: pod.into(), uid: format!("uid-{cid}") },
        node: "node-a".into(),
        ..Default::default()
    }
}

fn req(a: Attachment, network: &str, ranges: Vec<RangeSpec>, requested: &[&str]) -> AllocateRequest {
    AllocateRequest {
        attachment: Arc::new(a),
        network: network.into(),
        ranges,
        requested: requested
            .iter()
            .map(|s| parse_address("requested_addresses", s).expect("test address"))
            .collect(),
    }
}

fn addrs(v: &[Arc<Lease>]) -> Vec<IpAddr> {
    v.iter().map(|a| a.address).collect()
}

#[test]
fn hands_out_lowest_free_skipping_exclusions_and_gateway() {
    let mut al = Allocator::new();
    let r = spec("192.168.100.0/24", &["192.168.100.0/28"], "192.168.100.16");
    let got = al.allocate(&req(att("c1", "net1", "p1"), "", vec![r.clone()], &[]), 1).expect("allocate");
    assert_eq!(addrs(&got), vec![ip("192.168.100.17")]);
    assert_eq!(got[0].prefix_len, 24);
    assert_eq!(got[0].gateway, Some(ip("192.168.100.16")));
    assert_eq!(&*got[0].range, "192.168.100.0/24");
    let got = al.allocate(&req(att("c2", "net1", "p2"), "", vec![r], &[]), 1).expect("allocate");
    assert_eq!(addrs(&got), vec![ip("192.168.100.18")]);
}

#[test]
fn same_attachment_gets_same_lease_and_journal_is_empty() {
    let mut al = Allocator::new();
    let r = spec("10.0.0.0/24", &[], "");
    let first = al.allocate(&req(att("c1", "net1", "p1"), "", vec![r.clone()], &[]), 1).expect("allocate");
    assert_eq!(al.drain_journal().collect::<Vec<_>>().len(), 2, "pool and lease persisted");
    let again = al.allocate(&req(att("c1", "net1", "p1"), "", vec![r], &[]), 2).expect("allocate");
    assert_eq!(first, again);
    assert!(al.drain_journal().collect::<Vec<_>>().is_empty(), "an idempotent allocate changes nothing");
    assert_eq!(al.lease_count(), 1);
}

#[test]
fn pod_back_with_new_container_keeps_its_address() {
    let mut al = Allocator::new();
    let r = spec("10.0.0.0/24", &[], "");
    al.allocate(&req(att("c1", "net1", "p1"), "", vec![r.clone()], &[]), 1).expect("allocate");
    al.allocate(&req(att("c2", "net1", "p2"), "", vec![r.clone()], &[]), 1).expect("allocate");
    al.drain_journal().for_each(drop);
    let back = al.allocate(&req(att("c9", "net1", "p1"), "", vec![r], &[]), 5).expect("allocate");
    assert_eq!(addrs(&back), vec![ip("10.0.0.1")]);
    assert_eq!(&*back[0].holder.container_id, "c9");
    assert_eq!(back[0].created_unix_ms, 1, "the lease keeps its age");
    assert!(al.check("", "c1", "net1").is_empty(), "old container no longer holds it");
    assert_eq!(al.drain_journal().collect::<Vec<_>>(), vec![Change::PutLease(back[0].clone())]);
}

#[test]
fn overlapping_ranges_in_a_network_never_share_an_address() {
    let mut al = Allocator::new();
    let wide = spec("192.168.100.0/24", &["192.168.100.0/28"], "");
    let narrow = spec("192.168.100.0/25", &[], "");
    al.allocate(&req(att("a", "net1", "p1"), "", vec![wide.clone()], &[]), 1).expect("allocate");
    let got = al.allocate(&req(att("b", "net1", "p2"), "", vec![narrow.clone()], &[]), 1).expect("allocate");
    assert_eq!(addrs(&got), vec![ip("192.168.100.1")]);
    // Take .2-.16 through the narrow range; the wide one must skip what it sees held.
    // Take .2-.15 and .17 through the narrow range (.16 is held by "a").
    for i in 2..=16 {
        al.allocate(&req(att(&format!("n{i}"), "net1", ""), "", vec![narrow.clone()], &[]), 1)
            .expect("allocate");
    }
    let got = al.allocate(&req(att("c", "net1", "p3"), "", vec![wide], &[]), 1).expect("allocate");
    assert_eq!(addrs(&got), vec![ip("192.168.100.18")]);
    // Another network is independent.
    let got = al.allocate(&req(att("d", "net1", "p4"), "rail0", vec![narrow], &[]), 1).expect("allocate");
    assert_eq!(addrs(&got), vec![ip("192.168.100.1")]);
}

#[test]
fn exhaustion_reports_counts_and_holds_nothing_new() {
    let mut al = Allocator::new();
    let r = spec("10.0.0.0/29", &["10.0.0.1"], "10.0.0.2");
    for c in ["a", "b", "c", "d"] {
        al.allocate(&req(att(c, "net1", ""), "", vec![r.clone()], &[]), 1).expect("allocate");
    }
    let v6 = spec("fd00::/64", &[], "");
    let err = al.allocate(&req(att("e", "net1", ""), "", vec![v6, r], &[]), 1).expect_err("exhausted");
    assert_eq!(err.to_string(), "range 10.0.0.0/29 is exhausted: size 6, held 4, excluded 2");
    assert!(al.check("", "e", "net1").is_empty(), "the v6 address taken first was rolled back");
    assert_eq!(al.lease_count(), 4);
}

#[test]
fn dual_stack_request_gets_one_address_per_range() {
    let mut al = Allocator::new();
    let got = al
        .allocate(
            &req(
                att("a", "net1", "p"),
                "",
                vec![spec("10.1.0.0/16", &[], ""), spec("fd00:50::/64", &[], "")],
                &[],
            ),
            1,
        )
        .expect("allocate");
    assert_eq!(addrs(&got), vec![ip("10.1.0.1"), ip("fd00:50::1")]);
    assert_eq!(al.release("", "a", "net1", 1).len(), 2);
    assert!(al.release("", "a", "net1", 1).is_empty(), "release is idempotent");
}

#[test]
fn static_addresses_are_given_exactly_or_refused_clearly() {
    let mut al = Allocator::new();
    let r = spec("10.0.0.0/24", &["10.0.0.0/28"], "10.0.0.254");
    let got =
        al.allocate(&req(att("a", "net1", "pa"), "", vec![r.clone()], &["10.0.0.77/24"]), 1).expect("static");
    assert_eq!(addrs(&got), vec![ip("10.0.0.77")]);
    let err = |al: &mut Allocator, cid: &str, want: &str| {
        al.allocate(&req(att(cid, "net1", ""), "", vec![r.clone()], &[want]), 1)
            .expect_err("refused")
            .to_string()
    };
    assert_eq!(
        err(&mut al, "b", "10.0.0.77"),
        "address 10.0.0.77 in network \"\" is already held by pod ns/pa (container a interface net1)"
    );
    assert_eq!(
        err(&mut al, "b", "10.0.0.5"),
        "requested_addresses \"10.0.0.5\" is excluded (or the gateway) in range 10.0.0.0/24"
    );
    assert_eq!(
        err(&mut al, "b", "10.0.0.254"),
        "requested_addresses \"10.0.0.254\" is excluded (or the gateway) in range 10.0.0.0/24"
    );
    assert_eq!(
        err(&mut al, "b", "10.9.0.1"),
        "requested_addresses \"10.9.0.1\" is not in any requested range (or two addresses were requested in one range)"
    );
    assert_eq!(
        err(&mut al, "a", "10.0.0.78"),
        "container a interface net1 already holds 10.0.0.77 in range 10.0.0.0/24, not the requested 10.0.0.78"
    );
    assert_eq!(al.lease_count(), 1);
}

#[test]
fn gc_keeps_valid_attachments_and_manual_reservations() {
    let mut al = Allocator::new();
    let r = spec("10.0.0.0/24", &[], "");
    for c in ["a", "b", "c"] {
        al.allocate(&req(att(c, "net1", ""), "", vec![r.clone()], &[]), 1).expect("allocate");
    }
    let other_node = Attachment { node: "node-b".into(), ..att("d", "net1", "") };
    al.allocate(&req(other_node, "", vec![r.clone()], &[]), 1).expect("allocate on node-b");
    al.reserve("", ip("10.0.0.100"), "router", 1).expect("reserve");
    let valid: HashSet<(String, String)> = [("b".to_string(), "net1".to_string())].into();
    let freed: Vec<String> =
        al.gc("", "node-a", &valid, 1).iter().map(|l| l.holder.container_id.to_string()).collect();
    assert_eq!(freed, vec!["a", "c"]);
    let left: Vec<IpAddr> = al.leases(&LeaseFilter::default()).iter().map(|l| l.address).collect();
    assert_eq!(left, vec![ip("10.0.0.2"), ip("10.0.0.4"), ip("10.0.0.100")]);
}

#[test]
fn leases_after_pages_by_key_across_networks() {
    let mut al = Allocator::new();
    let r = spec("10.0.0.0/24", &[], "");
    for (net, c) in [("rail1", "a"), ("", "b"), ("rail0", "c"), ("", "d"), ("rail0", "e")] {
        al.allocate(&req(att(c, "net1", c), net, vec![r.clone()], &[]), 1).expect("allocate");
    }
    al.reserve("", ip("10.0.0.200"), "router", 1).expect("reserve");
    let keys =
        |p: &LeasePage| p.leases.iter().map(|l| format!("{}/{}", l.network, l.address)).collect::<Vec<_>>();
    let all = LeaseFilter::default();

    let first = al.leases_after(&all, None, 2);
    assert_eq!(keys(&first), ["/10.0.0.1", "/10.0.0.2"]);
    assert_eq!(first.next, Some(("".into(), ip("10.0.0.2"))));
    let second = al.leases_after(&all, Some(("", ip("10.0.0.2"))), 3);
    assert_eq!(keys(&second), ["/10.0.0.200", "rail0/10.0.0.1", "rail0/10.0.0.2"]);
    let last = al.leases_after(&all, Some(("rail0", ip("10.0.0.2"))), 3);
    assert_eq!((keys(&last), last.next), (vec!["rail1/10.0.0.1".to_string()], None));
    // A page that ends exactly at the last lease says so.
    assert_eq!(al.leases_after(&all, Some(("rail0", ip("10.0.0.1"))), 2).next, None);
    // A key that is no longer held (or a network that does not exist) still seeks.
    assert_eq!(keys(&al.leases_after(&all, Some(("", ip("10.0.0.3"))), 1)), ["/10.0.0.200"]);
    assert_eq!(keys(&al.leases_after(&all, Some(("rail00", ip("0.0.0.0"))), 9)), ["rail1/10.0.0.1"]);

    // A filter that skips most leases: a short page stops at the scan limit and goes on
    // after the last lease it looked at.
    let pod_e = LeaseFilter { pod_name: "e".into(), ..LeaseFilter::default() };
    let short = al.scan_after(&pod_e, None, 10, 3);
    assert_eq!((keys(&short), short.next), (vec![], Some(("".into(), ip("10.0.0.200")))));
    let found = al.scan_after(&pod_e, Some(("", ip("10.0.0.200"))), 10, 2);
    assert_eq!(keys(&found), ["rail0/10.0.0.2"]);
    assert_eq!(found.next, Some(("rail0".into(), ip("10.0.0.2"))), "rail1 was not looked at yet");
    let rest = al.scan_after(&pod_e, found.next.as_ref().map(|(n, a)| (&**n, *a)), 10, 2);
    assert_eq!((keys(&rest), rest.next), (vec![], None));
    // Limit 0 is taken as 1, so every call makes progress.
    assert_eq!(keys(&al.leases_after(&all, None, 0)), ["/10.0.0.1"]);
}

#[test]
fn manual_reservation_blocks_allocation_and_release_address_frees_it() {
    let mut al = Allocator::new();
    let r = spec("10.0.0.0/30", &[], "");
    al.reserve("", ip("10.0.0.1"), "broken NIC", 1).expect("reserve");
    let err = al.reserve("", ip("10.0.0.1"), "again", 1).expect_err("held");
    assert_eq!(
        err.to_string(),
        "address 10.0.0.1 in network \"\" is already held by a manual reservation (broken NIC)"
    );
    let got = al.allocate(&req(att("a", "net1", ""), "", vec![r.clone()], &[]), 1).expect("allocate");
    assert_eq!(addrs(&got), vec![ip("10.0.0.2")]);
    let pools = al.pools(None);
    assert_eq!((pools[0].size, pools[0].used, pools[0].free), (2, 2, 0));
    assert_eq!(al.release_address("", ip("10.0.0.1"), 1).expect("held").note, "broken NIC");
    assert_eq!(
        al.release_address("", ip("10.0.0.1"), 1).expect_err("gone").to_string(),
        "address 10.0.0.1 is not held in network \"\""
    );
    assert_eq!(al.pools(Some(""))[0].free, 1);
}

#[test]
fn sync_from_store_takes_the_stores_word_for_one_address() {
    let mut al = Allocator::new();
    let r = spec("10.0.0.0/29", &[], "");
    let mine = al.allocate(&req(att("a", "net1", "pa"), "", vec![r.clone()], &[]), 1).expect("allocate");
    al.drain_journal().for_each(drop);
    // The store refused 10.0.0.1 because another server gave it to pod pb first.
    let theirs = Lease { holder: Arc::new(att("b", "net1", "pb")), ..(*mine[0]).clone() };
    al.sync_from_store("", ip("10.0.0.1"), Some(theirs));
    assert!(al.check("", "a", "net1").is_empty(), "a no longer believes it holds 10.0.0.1");
    assert_eq!(addrs(&al.check("", "b", "net1")), vec![ip("10.0.0.1")]);
    assert_eq!(al.lease_count(), 1);
    // Choosing again gives a the next address; nothing about the sync was journaled.
    let again = al.allocate(&req(att("a", "net1", "pa"), "", vec![r], &[]), 2).expect("allocate");
    assert_eq!(addrs(&again), vec![ip("10.0.0.2")]);
    assert_eq!(al.drain_journal().collect::<Vec<_>>(), vec![Change::PutLease(again[0].clone())]);
    // A refused release: the store has nothing there after all.
    al.sync_from_store("", ip("10.0.0.1"), None);
    assert_eq!((al.lease_count(), al.pools(None)[0].used), (1, 1));
    assert!(al.drain_journal().next().is_none());
}

#[test]
fn restore_rebuilds_bitmaps_and_reports_bad_records() {
    let mut al = Allocator::new();
    let r = spec("10.0.0.0/24", &[], "");
    for c in ["a", "b"] {
        al.allocate(&req(att(c, "net1", ""), "", vec![r.clone()], &[]), 1).expect("allocate");
    }
    let leases = al.leases(&LeaseFilter::default());
    let mut dup = (*leases[0]).clone();
    dup.holder = Arc::new(Attachment { container_id: "intruder".into(), ..(*dup.holder).clone() });
    let pools = vec![
        ("".to_string(), r.input().clone()),
        ("".to_string(), RangeInput { range: "garbage".into(), ..Default::default() }),
    ];
    let (mut back, problems) = Allocator::restore(pools, leases.iter().map(|l| (**l).clone()).chain([dup]));
    assert_eq!(problems.len(), 2);
    assert_eq!(problems[0].error, "address already held by container a interface net1");
    assert_eq!(problems[1].error, "range \"garbage\" is not a CIDR or first-last/prefix range");
    assert_eq!(back.pools(None)[0].used, 2);
    let got = back.allocate(&req(att("c", "net1", ""), "", vec![r], &[]), 1).expect("allocate");
    assert_eq!(addrs(&got), vec![ip("10.0.0.3")]);
}

#[test]
fn ipv6_64_and_ipv4_8_work_end_to_end() {
    let mut al = Allocator::new();
    let v6 = spec("fd00:50::/64", &["fd00:50::/120"], "");
    let got =
        al.allocate(&req(att("a", "net1", ""), "", vec![v6.clone()], &["fd00:50::ffff:ffff:ffff:fffe"]), 1);
    assert_eq!(addrs(&got.expect("static at the top")), vec![ip("fd00:50::ffff:ffff:ffff:fffe")]);
    let got = al.allocate(&req(att("b", "net1", ""), "", vec![v6], &[]), 1).expect("allocate");
    assert_eq!(addrs(&got), vec![ip("fd00:50::100")]);
    let pools = al.pools(None);
    assert_eq!(pools[0].size, (1u128 << 64) - 2);
    assert_eq!(pools[0].free, (1u128 << 64) - 2 - 255 - 2);
    let v4 = spec("10.0.0.0/8", &[], "");
    let got =
        al.allocate(&req(att("c", "net1", ""), "x", vec![v4], &["10.255.255.254"]), 1).expect("allocate");
    assert_eq!(addrs(&got), vec![ip("10.255.255.254")]);
}

// --- Property test against a naive model -------------------------------------------------

/// A test range with, written out by hand, the addresses it may hand out and every address
/// between its first and last.
struct ModelRange {
    spec: RangeSpec,
    allowed: Vec<IpAddr>,
    span: Vec<IpAddr>,
}

fn model_ranges() -> Vec<ModelRange> {
    let v4 = |first: u8, last: u8, skip: &[u8]| -> Vec<IpAddr> {
        (first..=last).filter(|o| !skip.contains(o)).map(|o| IpAddr::from([198, 18, 0, o])).collect()
    };
    let v6 = |v: &[&str]| v.iter().map(|s| ip(s)).collect::<Vec<_>>();
    vec![
        // .1-.14, minus .4-.5 and the gateway .1
        ModelRange {
            spec: spec("198.18.0.0/28", &["198.18.0.4/31"], "198.18.0.1"),
            allowed: v4(1, 14, &[1, 4, 5]),
            span: v4(1, 14, &[]),
        },
        // .8-.12
        ModelRange {
            spec: RangeSpec::parse(
                &RangeInput { range: "198.18.0.8-198.18.0.12/27".into(), ..Default::default() },
                FieldPrefix(""),
            )
            .expect("valid"),
            allowed: v4(8, 12, &[]),
            span: v4(8, 12, &[]),
        },
        // same CIDR as the first, nothing excluded
        ModelRange { spec: spec("198.18.0.0/28", &[], ""), allowed: v4(1, 14, &[]), span: v4(1, 14, &[]) },
        ModelRange {
            spec: spec("fd00::/125", &["fd00::3"], ""),
            allowed: v6(&["fd00::1", "fd00::2", "fd00::4", "fd00::5", "fd00::6"]),
            span: v6(&["fd00::1", "fd00::2", "fd00::3", "fd00::4", "fd00::5", "fd00::6"]),
        },
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Allocate { net: u8, cid: u8, ifname: u8, pod: u8, ranges: Vec<usize>, requested: Option<usize> },
    Release { net: u8, cid: u8, ifname: u8 },
    Gc { net: u8, valid: Vec<(u8, u8)> },
    Reserve { net: u8, addr: usize },
    ReleaseAddress { net: u8, addr: usize },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    let net = 0u8..2;
    prop_oneof![
        6 => (net.clone(), 0u8..5, 0u8..2, 0u8..3, proptest::sample::subsequence(vec![0, 1, 2, 3], 1..=3), proptest::option::of(0usize..30))
            .prop_map(|(net, cid, ifname, pod, ranges, requested)| Op::Allocate { net, cid, ifname, pod, ranges, requested }),
        2 => (net.clone(), 0u8..5, 0u8..2).prop_map(|(net, cid, ifname)| Op::Release { net, cid, ifname }),
        1 => (net.clone(), proptest::collection::vec((0u8..5, 0u8..2), 0..6)).prop_map(|(net, valid)| Op::Gc { net, valid }),
        1 => (net.clone(), 0usize..30).prop_map(|(net, addr)| Op::Reserve { net, addr }),
        1 => (net, 0usize..30).prop_map(|(net, addr)| Op::ReleaseAddress { net, addr }),
        1 => Just(Op::Restart),
    ]
}

/// Holder in the model: (container id, ifname, pod) or a manual reservation (None).
type Holder = Option<(String, String, String)>;
/// The model's state: who holds each (network, address).
type ModelState = BTreeMap<(String, IpAddr), Holder>;

fn candidates() -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = (0..=20u8).map(|o| IpAddr::from([198, 18, 0, o])).collect();
    v.extend(
        ["fd00::", "fd00::1", "fd00::3", "fd00::6", "fd00::7", "fd00::9", "fd00::2", "fd00::5", "fd00::4"]
            .map(ip),
    );
    v
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Invalid,
    Held,
    Conflict,
    Exhausted,
}

fn outcome(e: &AllocError) -> Outcome {
    match e {
        AllocError::Invalid { .. } => Outcome::Invalid,
        AllocError::Held { .. } => Outcome::Held,
        AllocError::Conflict { .. } => Outcome::Conflict,
        AllocError::Exhausted { .. } => Outcome::Exhausted,
        AllocError::NotFound { .. } => unreachable!("allocate never answers NotFound"),
        AllocError::NoFreeBlock(_) | AllocError::BlockExhausted(_) => {
            unreachable!("allocate never answers per-node block errors")
        }
    }
}

/// The model's answer to an allocate, and its new state on success.
fn model_allocate(
    state: &ModelState,
    ranges: &[ModelRange],
    net: &str,
    (cid, ifname, pod): (&str, &str, &str),
    picks: &[usize],
    requested: Option<IpAddr>,
) -> Result<(Vec<IpAddr>, ModelState), Outcome> {
    let in_range = |r: usize, a: IpAddr| ranges[r].span.contains(&a);
    let allowed = |r: usize, a: IpAddr| ranges[r].allowed.contains(&a);
    let mut wanted = vec![None; picks.len()];
    if let Some(a) = requested {
        let slot = picks.iter().position(|r| in_range(*r, a)).ok_or(Outcome::Invalid)?;
        wanted[slot] = Some(a);
    }
    let held_by = |st: &ModelState, f: &dyn Fn(&(String, String, String)) -> bool| {
        st.iter()
            .filter(|((n, _), h)| n == net && h.as_ref().is_some_and(f))
            .map(|((_, a), _)| *a)
            .collect::<Vec<_>>()
    };
    let mut existing = held_by(state, &|h| h.0 == cid && h.1 == ifname);
    let mut moved = false;
    if existing.is_empty() && !pod.is_empty() {
        existing = held_by(state, &|h| h.2 == pod && h.1 == ifname);
        moved = !existing.is_empty();
    }
    let mut st = state.clone();
    let mut chosen: Vec<IpAddr> = Vec::new();
    for (slot, r) in picks.iter().enumerate() {
        let reuse = existing.iter().copied().find(|a| allowed(*r, *a) && !chosen.contains(a));
        let a = match (reuse, wanted[slot]) {
            (Some(h), Some(w)) if h != w => return Err(Outcome::Conflict),
            (Some(h), _) => {
                chosen.push(h);
                continue;
            }
            (None, Some(w)) => {
                if !allowed(*r, w) {
                    return Err(Outcome::Invalid);
                }
                if st.contains_key(&(net.to_string(), w)) {
                    return Err(Outcome::Held);
                }
                w
            }
            (None, None) => ranges[*r]
                .allowed
                .iter()
                .copied()
                .find(|a| !st.contains_key(&(net.to_string(), *a)))
                .ok_or(Outcome::Exhausted)?,
        };
        st.insert((net.to_string(), a), Some((cid.into(), ifname.into(), pod.into())));
        chosen.push(a);
    }
    if moved {
        for a in existing {
            st.insert((net.to_string(), a), Some((cid.into(), ifname.into(), pod.into())));
        }
    }
    Ok((chosen, st))
}

fn snapshot(al: &Allocator) -> ModelState {
    al.leases(&LeaseFilter::default())
        .into_iter()
        .map(|l| {
            let h = (!l.is_manual()).then(|| {
                (
                    l.holder.container_id.to_string(),
                    l.holder.ifname.to_string(),
                    l.holder.pod.name.to_string(),
                )
            });
            ((l.network.to_string(), l.address), h)
        })
        .collect()
}

/// Every page of a paged read (`limit` per page, `scan` looked at per call) joined, or
/// why the pages are wrong: too long, or a continuation that does not move forward.
fn read_paged(
    al: &Allocator,
    filter: &LeaseFilter,
    limit: usize,
    scan: usize,
) -> Result<Vec<Arc<Lease>>, String> {
    let mut out = Vec::new();
    let mut after: Option<(Str, IpAddr)> = None;
    loop {
        let page = al.scan_after(filter, after.as_ref().map(|(n, a)| (&**n, *a)), limit, scan);
        if page.leases.len() > limit.max(1) {
            return Err(format!("{} leases on a page of {limit}", page.leases.len()));
        }
        out.extend(page.leases);
        match page.next {
            Some(next) if after.as_ref().is_some_and(|a| *a >= next) => {
                return Err(format!("continuation {next:?} does not move past {after:?}"));
            }
            Some(next) => after = Some(next),
            None => return Ok(out),
        }
    }
}

/// Filters the property test reads with: the leases it makes differ in network, pod,
/// container, range and whether they are manual.
fn model_filters() -> Vec<LeaseFilter> {
    let f = LeaseFilter::default;
    vec![
        f(),
        LeaseFilter { network: Some("rail0".into()), ..f() },
        LeaseFilter { network: Some("".into()), ..f() },
        LeaseFilter { pod_name: "pod-a".into(), ..f() },
        LeaseFilter { pod_namespace: "ns".into(), container_id: "c1".into(), ..f() },
        LeaseFilter { range: "198.18.0.0/28".into(), ..f() },
        LeaseFilter {
            container_id: "".into(),
            pod_name: "pod-b".into(),
            network: Some("rail0".into()),
            ..f()
        },
    ]
}

/// What a store holds after applying the journal.
#[derive(Default)]
struct FakeStore {
    pools: BTreeSet<(String, String)>,
    pool_inputs: Vec<(String, RangeInput)>,
    leases: BTreeMap<(String, IpAddr), Arc<Lease>>,
}

impl FakeStore {
    fn apply(&mut self, changes: Vec<Change>) {
        for c in changes {
            match c {
                Change::PutLease(l) => {
                    self.leases.insert((l.network.to_string(), l.address), l);
                }
                Change::DeleteLease { network, address } => {
                    self.leases.remove(&(network.to_string(), address));
                }
                Change::PutPool { network, range } => {
                    if self.pools.insert((network.to_string(), format!("{range:?}"))) {
                        self.pool_inputs.push((network.to_string(), range));
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn allocator_matches_naive_model(ops in proptest::collection::vec(op(), 1..60)) {
        let ranges = model_ranges();
        let cands = candidates();
        let nets = ["", "rail0"];
        let pods = ["", "pod-a", "pod-b"];
        let mut al = Allocator::new();
        let mut model: ModelState = BTreeMap::new();
        let mut store = FakeStore::default();
        for op in ops {
            match op {
                Op::Allocate { net, cid, ifname, pod, ranges: picks, requested } => {
                    let (net, cid, ifname, pod) = (nets[net as usize], format!("c{cid}"), format!("net{ifname}"), pods[pod as usize]);
                    let requested = requested.map(|i| cands[i % cands.len()]);
                    let a = Attachment {
                        container_id: cid.clone(),
                        ifname: ifname.clone(),
                        pod: PodRef { namespace: "ns".into(), name: pod.into(), uid: String::new() },
                        node: String::new(),
                        ..Default::default()
                    };
                    let r = AllocateRequest {
                        attachment: Arc::new(a),
                        network: net.into(),
                        ranges: picks.iter().map(|i| ranges[*i].spec.clone()).collect(),
                        requested: requested.into_iter().collect(),
                    };
                    let got = al.allocate(&r, 7);
                    let want = model_allocate(&model, &ranges, net, (&cid, &ifname, pod), &picks, requested);
                    match (got, want) {
                        (Ok(got), Ok((addrs, st))) => {
                            prop_assert_eq!(got.iter().map(|g| g.address).collect::<Vec<_>>(), addrs);
                            for (g, r) in got.iter().zip(&picks) {
                                prop_assert!(ranges[*r].allowed.contains(&g.address), "outside range or excluded");
                            }
                            model = st;
                        }
                        (Err(e), Err(o)) => prop_assert_eq!(outcome(&e), o, "{}", e),
                        (got, want) => prop_assert!(false, "allocator {:?} but model {:?}", got, want),
                    }
                }
                Op::Release { net, cid, ifname } => {
                    let (net, cid, ifname) = (nets[net as usize], format!("c{cid}"), format!("net{ifname}"));
                    al.release(net, &cid, &ifname, 7);
                    model.retain(|(n, _), h| !(n == net && h.as_ref().is_some_and(|h| h.0 == cid && h.1 == ifname)));
                }
                Op::Gc { net, valid } => {
                    let net = nets[net as usize];
                    let valid: HashSet<(String, String)> = valid.iter().map(|(c, i)| (format!("c{c}"), format!("net{i}"))).collect();
                    // Every attachment of the model is on node "" (one node).
                    al.gc(net, "", &valid, 7);
                    model.retain(|(n, _), h| n != net || h.as_ref().is_none_or(|h| valid.contains(&(h.0.clone(), h.1.clone()))));
                }
                Op::Reserve { net, addr } => {
                    let (net, a) = (nets[net as usize], cands[addr % cands.len()]);
                    let got = al.reserve(net, a, "test", 7);
                    let free = !model.contains_key(&(net.to_string(), a));
                    prop_assert_eq!(got.is_ok(), free);
                    if free {
                        model.insert((net.to_string(), a), None);
                    }
                }
                Op::ReleaseAddress { net, addr } => {
                    let (net, a) = (nets[net as usize], cands[addr % cands.len()]);
                    let got = al.release_address(net, a, 7);
                    prop_assert_eq!(got.is_ok(), model.remove(&(net.to_string(), a)).is_some());
                }
                Op::Restart => {
                    let (back, problems) = Allocator::restore(store.pool_inputs.clone(), store.leases.values().map(|l| (**l).clone()));
                    prop_assert!(problems.is_empty(), "{:?}", problems);
                    al = back;
                }
            }
            store.apply(al.drain_journal().collect::<Vec<_>>());
            let now = snapshot(&al);
            prop_assert_eq!(&now, &model);
            let persisted: BTreeMap<_, _> = store.leases.values().map(|l| ((l.network.clone(), l.address), l.clone())).collect();
            prop_assert_eq!(persisted.values().cloned().collect::<Vec<_>>(), al.leases(&LeaseFilter::default()), "journal and memory differ");
            prop_assert_eq!(al.lease_count(), model.len());
            // Paged reads, at any page size and scan limit, equal the sorted filter.
            for filter in model_filters() {
                let want = al.leases(&filter);
                for (limit, scan) in [(1, 1), (2, 3), (3, 1), (1, 7), (1000, SCAN_LIMIT)] {
                    let got = read_paged(&al, &filter, limit, scan).map_err(TestCaseError::fail)?;
                    prop_assert_eq!(&got, &want, "filter {:?}, pages of {}, scanning {}", filter, limit, scan);
                }
            }
            // Reading on from any key gives what follows it.
            let all = al.leases(&LeaseFilter::default());
            for net in nets {
                for a in cands.iter().copied() {
                    let page = al.leases_after(&LeaseFilter::default(), Some((net, a)), 1000);
                    let after: Vec<_> = all.iter().filter(|l| (&*l.network, l.address) > (net, a)).cloned().collect();
                    prop_assert_eq!(page.leases, after);
                    prop_assert_eq!(page.next, None);
                }
            }
            for p in al.pools(None) {
                prop_assert_eq!(p.size, p.used + p.excluded + p.free);
            }
        }
    }
}

#[test]
fn a_released_address_cools_down_before_it_is_handed_out_again() {
    let mut al = Allocator::new();
    // 10.0.0.1 to 10.0.0.6; the gateway 10.0.0.1 is never handed out.
    let r = spec("10.0.0.0/29", &[], "10.0.0.1");
    al.set_cooldown("rail0", 30_000);
    let take = |al: &mut Allocator, cid: &str, now: i64| {
        addrs(
            &al.allocate(&req(att(cid, "net1", cid), "rail0", vec![r.clone()], &[]), now).expect("allocate"),
        )[0]
    };
    assert_eq!(take(&mut al, "a", 1_000), ip("10.0.0.2"));
    assert_eq!(take(&mut al, "b", 1_000), ip("10.0.0.3"));
    assert_eq!(addrs(&al.release("rail0", "a", "net1", 2_000)), vec![ip("10.0.0.2")]);
    assert_eq!(al.cooldown_holds("rail0", 2_000), 1);
    // 10.0.0.2 cools until 32000: the next lowest free address goes out instead.
    assert_eq!(take(&mut al, "c", 31_999), ip("10.0.0.4"));
    assert!(al.take_cooldown_overrides().is_empty());
    assert_eq!(al.cooldown_holds("rail0", 31_999), 1);
    assert_eq!(al.cooldown_holds("rail0", 32_000), 0);
    // At 32000 it has passed: lowest first again.
    assert_eq!(take(&mut al, "d", 32_000), ip("10.0.0.2"));
    assert_eq!(al.cooldown_holds("rail0", 32_000), 0);
}

#[test]
fn a_full_range_hands_out_the_address_cooling_longest_and_says_so() {
    let mut al = Allocator::new();
    // Two usable addresses: 10.0.0.1 and 10.0.0.2.
    let r = spec("10.0.0.0/30", &[], "");
    al.set_cooldown("p", 60_000);
    let take = |al: &mut Allocator, cid: &str, now: i64| {
        al.allocate(&req(att(cid, "net1", cid), "p", vec![r.clone()], &[]), now).map(|l| addrs(&l)[0])
    };
    assert_eq!(take(&mut al, "a", 0), Ok(ip("10.0.0.1")));
    assert_eq!(take(&mut al, "b", 0), Ok(ip("10.0.0.2")));
    al.release("p", "b", "net1", 1_000);
    al.release("p", "a", "net1", 2_000);
    assert_eq!(al.cooldown_holds("p", 2_000), 2);
    // Both cool; 10.0.0.2 was released first, so its cooldown ends first.
    assert_eq!(take(&mut al, "c", 5_000), Ok(ip("10.0.0.2")));
    assert_eq!(
        al.take_cooldown_overrides(),
        vec![CooldownOverride {
            network: "p".into(),
            address: ip("10.0.0.2"),
            released_unix_ms: 1_000,
            until_unix_ms: 61_000,
        }]
    );
    assert!(al.take_cooldown_overrides().is_empty(), "taken once");
    assert_eq!(take(&mut al, "d", 5_000), Ok(ip("10.0.0.1")));
    assert_eq!(al.take_cooldown_overrides().len(), 1);
    assert_eq!(
        take(&mut al, "e", 5_000).expect_err("full").to_string(),
        "range 10.0.0.0/30 is exhausted: size 2, held 2, excluded 0"
    );
}

#[test]
fn cooldown_is_per_network_and_zero_forgets_it() {
    let mut al = Allocator::new();
    let r = spec("10.0.0.0/29", &[], "");
    let take = |al: &mut Allocator, net: &str, cid: &str, now: i64| {
        addrs(&al.allocate(&req(att(cid, "net1", cid), net, vec![r.clone()], &[]), now).expect("allocate"))[0]
    };
    al.set_cooldown("cool", 10_000);
    for net in ["cool", "plain"] {
        assert_eq!(take(&mut al, net, "a", 0), ip("10.0.0.1"));
        al.release(net, "a", "net1", 100);
    }
    // Without a cooldown the address comes straight back.
    assert_eq!(take(&mut al, "plain", "b", 200), ip("10.0.0.1"));
    assert_eq!(take(&mut al, "cool", "b", 200), ip("10.0.0.2"));
    // A static request takes a cooling address (it was asked for by name).
    let got = al
        .allocate(&req(att("s", "net1", "s"), "cool", vec![r.clone()], &["10.0.0.1"]), 300)
        .expect("static");
    assert_eq!(addrs(&got), vec![ip("10.0.0.1")]);
    al.release("cool", "s", "net1", 400);
    al.set_cooldown("cool", 0);
    assert_eq!(al.cooldown_holds("cool", 400), 0);
    assert_eq!(take(&mut al, "cool", "c", 500), ip("10.0.0.1"));
    // A failed all-or-nothing request leaves an address it took from cooling cooling.
    let pair = spec("10.8.0.0/30", &[], "");
    let tiny = spec("10.9.0.0/30", &[], "");
    al.set_cooldown("c2", 10_000);
    for cid in ["x1", "x2", "t1", "t2"] {
        let r = if cid.starts_with('x') { pair.clone() } else { tiny.clone() };
        al.allocate(&req(att(cid, "net1", cid), "c2", vec![r], &[]), 600).expect("fill");
    }
    al.release("c2", "x1", "net1", 700);
    let err =
        al.allocate(&req(att("u", "net1", "u"), "c2", vec![pair, tiny], &[]), 800).expect_err("tiny is full");
    assert_eq!(err.to_string(), "range 10.9.0.0/30 is exhausted: size 2, held 2, excluded 0");
    assert_eq!(al.cooldown_holds("c2", 800), 1);
    assert!(al.take_cooldown_overrides().is_empty());
}

#[test]
fn usage_of_sums_a_pools_ranges_before_and_after_allocation() {
    let mut al = Allocator::new();
    let v4 = spec("10.0.0.0/29", &["10.0.0.6"], "10.0.0.1");
    let v6 = spec("fd00::/125", &[], "");
    let both = [v4.clone(), v6.clone()];
    assert_eq!(al.usage_of("p", &both), PoolTotals { size: 12, used: 0, excluded: 2, free: 10 });
    al.reserve("p", ip("10.0.0.3"), "router", 1).expect("reserve");
    assert_eq!(al.usage_of("p", &both), PoolTotals { size: 12, used: 1, excluded: 2, free: 9 });
    al.allocate(&req(att("a", "net1", "a"), "p", vec![v4, v6], &[]), 1).expect("allocate");
    assert_eq!(al.usage_of("p", &both), PoolTotals { size: 12, used: 3, excluded: 2, free: 7 });
    // Found by the ippools fuzz target: ::/0 and one more range count past u128.
    let huge = [spec("::/0", &[], ""), spec("fd00::/64", &[], "")];
    let t = al.usage_of("p", &huge);
    assert_eq!((t.size, t.free), (u128::MAX, u128::MAX));
}

#[test]
fn a_node_keeps_its_block_and_a_new_node_takes_the_lowest_free_one() {
    let mut al = Allocator::new();
    let within: ipnetwork::IpNetwork = "198.18.0.0/26".parse().expect("cidr");
    let block = |al: &Allocator, node: &str| {
        al.node_block("rail0", &BlockCut::by_prefix(within, 28).expect("cut"), node, None)
            .map(|(b, _)| b.to_string())
    };
    assert_eq!(block(&al, "n1"), Ok("198.18.0.0/28".into()));
    let on = |node: &str, cid: &str| Attachment { node: node.into(), ..att(cid, "net1", cid) };
    let take = |al: &mut Allocator, node: &str, cid: &str, cidr: &str| {
        addrs(
            &al.allocate(&req(on(node, cid), "rail0", vec![spec(cidr, &[], "")], &[]), 1).expect("allocate"),
        )[0]
    };
    assert_eq!(take(&mut al, "n1", "a", "198.18.0.0/28"), ip("198.18.0.1"));
    assert_eq!(block(&al, "n1"), Ok("198.18.0.0/28".into()));
    assert_eq!(block(&al, "n2"), Ok("198.18.0.16/28".into()));
    take(&mut al, "n2", "b", "198.18.0.16/28");
    // A manual reservation claims no block.
    al.reserve("rail0", ip("198.18.0.40"), "router", 1).expect("reserve");
    assert_eq!(block(&al, "n3"), Ok("198.18.0.32/28".into()));
    take(&mut al, "n3", "c", "198.18.0.32/28");
    take(&mut al, "n4", "d", "198.18.0.48/28");
    assert_eq!(
        block(&al, "n5").expect_err("full").to_string(),
        "no free /28 block for node \"n5\" in 198.18.0.0/26 (network \"rail0\"): all 4 blocks are other nodes'"
    );
    take(&mut al, "n2", "b2", "198.18.0.16/28");
    let blocks: Vec<(String, String, u128)> = al
        .node_blocks("rail0", &BlockCut::by_prefix(within, 28).expect("cut"))
        .into_iter()
        .map(|(b, n, u)| (b.to_string(), n, u))
        .collect();
    assert_eq!(
        blocks,
        [
            ("198.18.0.0/28", "n1", 1),
            ("198.18.0.16/28", "n2", 2),
            ("198.18.0.32/28", "n3", 1),
            ("198.18.0.48/28", "n4", 1)
        ]
        .map(|(b, n, u)| (b.to_string(), n.to_string(), u))
    );
    // n1's last lease goes: its block is free for the next node.
    al.release("rail0", "a", "net1", 2);
    assert_eq!(block(&al, "n5"), Ok("198.18.0.0/28".into()));
    // Every lease of another network or family is ignored; IPv6 works alike.
    let v6: ipnetwork::IpNetwork = "fd00::/120".parse().expect("cidr");
    assert_eq!(
        al.node_block("rail0", &BlockCut::by_prefix(v6, 124).expect("cut"), "n1", None)
            .map(|(b, _)| b.to_string()),
        Ok("fd00::/124".into())
    );
    assert!(BlockCut::by_prefix(within, 26).is_err(), "a block must be smaller than the range");
}

#[test]
fn an_assigned_block_stays_the_nodes_until_it_is_given_back() {
    let mut al = Allocator::new();
    let within: ipnetwork::IpNetwork = "198.18.0.0/26".parse().expect("cidr");
    let block = |al: &Allocator, node: &str, prefer: Option<u128>| {
        al.node_block("rail0", &BlockCut::by_prefix(within, 28).expect("cut"), node, prefer)
            .map(|(b, new)| (b.to_string(), new))
    };
    assert_eq!(block(&al, "n1", Some(2)), Ok(("198.18.0.32/28".into(), true)));
    al.assign_block("rail0", "198.18.0.32/28".parse().expect("block"), "n1", 5);
    // Recorded as a manual lease of the blocks network, so the stores persist it.
    let marker = al.get("rail0/node-blocks", ip("198.18.0.32")).expect("marker");
    assert!(marker.is_manual());
    assert_eq!((marker.holder.node.as_str(), marker.prefix_len), ("n1", 28));
    assert_eq!(block(&al, "n1", None), Ok(("198.18.0.32/28".into(), false)));
    // No lease is held in it, yet no other node gets it, even when it prefers it.
    assert_eq!(block(&al, "n2", Some(2)), Ok(("198.18.0.0/28".into(), true)));
    assert_eq!(
        al.node_blocks("rail0", &BlockCut::by_prefix(within, 28).expect("cut"))
            .into_iter()
            .map(|(b, n, u)| (b.to_string(), n, u))
            .collect::<Vec<_>>(),
        [("198.18.0.32/28".to_string(), "n1".to_string(), 0)]
    );
    assert_eq!(
        al.assigned_blocks().into_iter().map(|(net, b, n, u)| (net, b.to_string(), n, u)).collect::<Vec<_>>(),
        [("rail0".to_string(), "198.18.0.32/28".to_string(), "n1".to_string(), 0)]
    );
    // A restart rebuilds it from the leases like any other.
    let leases: Vec<Lease> = al.leases(&LeaseFilter::default()).iter().map(|l| (**l).clone()).collect();
    let (again, problems) = Allocator::restore(Vec::new(), leases);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(
        again
            .node_block("rail0", &BlockCut::by_prefix(within, 28).expect("cut"), "n1", None)
            .map(|(b, _)| b.to_string()),
        Ok("198.18.0.32/28".into())
    );
    al.unassign_block("rail0", "198.18.0.32/28".parse().expect("block"), 6).expect("assigned");
    assert_eq!(block(&al, "n2", Some(2)), Ok(("198.18.0.32/28".into(), true)));
    assert!(al.assigned_blocks().is_empty());
}

fn owned(cid: &str, pod: &str, owner: Option<Owner>) -> Attachment {
    Attachment { owner, ..att(cid, "net1", pod) }
}

fn web() -> Option<Owner> {
    Some(Owner::StatefulSet { name: "web".into(), uid: "set-1".into() })
}

#[test]
fn a_kept_address_goes_back_to_the_owners_next_sandbox() {
    let mut al = Allocator::new();
    let r = spec("10.0.0.0/24", &[], "");
    al.allocate(&req(att("x", "net1", "other"), "", vec![r.clone()], &[]), 1).expect("allocate");
    let got = al.allocate(&req(owned("c1", "web-3", web()), "", vec![r.clone()], &[]), 1).expect("allocate");
    assert_eq!(addrs(&got), vec![ip("10.0.0.2")]);
    al.drain_journal().for_each(drop);

    let out = al.release_keeping("", "c1", "net1", 2, &|_| true);
    assert!(out.freed.is_empty());
    assert_eq!(addrs(&out.kept), vec![ip("10.0.0.2")]);
    assert!(out.kept[0].holder.kept);
    assert_eq!(al.lease_count(), 2);
    assert_eq!(al.drain_journal().collect::<Vec<_>>(), vec![Change::PutLease(out.kept[0].clone())]);
    assert!(
        al.get("", ip("10.0.0.2")).expect("held").who().contains("statefulset/web (kept since pod ns/web-3")
    );
    // A second DEL of the same sandbox changes nothing.
    assert_eq!(al.release_keeping("", "c1", "net1", 3, &|_| true).kept.len(), 1);
    assert_eq!(al.journal_len(), 0);

    let got = al.allocate(&req(owned("c2", "web-3", web()), "", vec![r], &[]), 4).expect("allocate");
    assert_eq!(addrs(&got), vec![ip("10.0.0.2")]);
    assert!(!got[0].holder.kept);
    assert_eq!(got[0].holder.container_id, "c2");
    assert!(
        al.release_keeping("", "c1", "net1", 5, &|_| false).freed.is_empty(),
        "the old sandbox holds nothing"
    );
}

#[test]
fn the_new_pods_add_before_the_old_sandboxs_del_keeps_the_address() {
    let mut al = Allocator::new();
    let r = spec("10.0.0.0/24", &[], "");
    let first =
        al.allocate(&req(owned("old", "web-0", web()), "", vec![r.clone()], &[]), 1).expect("allocate");
    let moved = al
        .allocate(
            &req(Attachment { node: "node-b".into(), ..owned("new", "web-0", web()) }, "", vec![r], &[]),
            2,
        )
        .expect("allocate");
    assert_eq!(addrs(&moved), addrs(&first));
    assert_eq!(moved[0].holder.node, "node-b");
    // The old sandbox's DEL, on the other node, finds nothing of its own.
    let out = al.release_keeping("", "old", "net1", 3, &|_| false);
    assert!(out.freed.is_empty() && out.kept.is_empty());
    assert_eq!(al.get("", first[0].address).expect("held").holder.container_id, "new");
}

#[test]
fn a_pod_that_is_not_the_sets_never_takes_its_ordinals_address() {
    let mut al = Allocator::new();
    let r = spec("10.0.0.0/24", &[], "");
    al.allocate(&req(owned("c1", "web-3", web()), "", vec![r.clone()], &[]), 1).expect("allocate");
    // Still held by the set's sandbox, and then kept: neither goes to the impostor.
    let other = Some(Owner::StatefulSet { name: "web".into(), uid: "set-2".into() });
    let got = al.allocate(&req(owned("imp", "web-3", None), "", vec![r.clone()], &[]), 2).expect("allocate");
    assert_eq!(addrs(&got), vec![ip("10.0.0.2")]);
    al.release("", "imp", "net1", 3);
    al.release_keeping("", "c1", "net1", 4, &|_| true);
    let got =
        al.allocate(&req(owned("imp2", "web-3", other), "", vec![r.clone()], &[]), 5).expect("allocate");
    assert_eq!(addrs(&got), vec![ip("10.0.0.2")], "another set of the same name");
    let got = al.allocate(&req(owned("c2", "web-3", web()), "", vec![r], &[]), 6).expect("allocate");
    assert_eq!(addrs(&got), vec![ip("10.0.0.1")], "the set's own pod");
}

#[test]
fn a_kept_address_is_freed_once_the_owner_lets_go() {
    let mut al = Allocator::new();
    let r = spec("10.0.0.0/24", &[], "");
    al.allocate(&req(owned("c1", "web-3", web()), "", vec![r], &[]), 1).expect("allocate");
    al.release_keeping("", "c1", "net1", 2, &|_| true);
    let out = al.release_keeping("", "c1", "net1", 3, &|_| false);
    assert_eq!(addrs(&out.freed), vec![ip("10.0.0.1")]);
    assert_eq!(al.lease_count(), 0);
}

#[test]
fn a_claims_address_follows_the_claim_across_pods() {
    let mut al = Allocator::new();
    let r = spec("10.0.0.0/24", &[], "");
    let claim = Some(Owner::Claim { name: "vm-a.net1".into() });
    let src = al.allocate(&req(owned("src", "launcher-a", claim.clone()), "n", vec![r.clone()], &[]), 1);
    let src = src.expect("allocate");
    // Migration: the target pod's ADD while the source runs.
    let dst = al.allocate(&req(owned("dst", "launcher-b", claim.clone()), "n", vec![r.clone()], &[]), 2);
    assert_eq!(addrs(&dst.expect("allocate")), addrs(&src));
    assert!(al.release_keeping("n", "src", "net1", 3, &|_| true).kept.is_empty(), "the source holds nothing");
    let out = al.release_keeping("n", "dst", "net1", 4, &|_| true);
    assert_eq!(addrs(&out.kept), addrs(&src));
    // A restart: a third pod of another name.
    let again =
        al.allocate(&req(owned("c3", "launcher-c", claim), "n", vec![r.clone()], &[]), 5).expect("allocate");
    assert_eq!(addrs(&again), addrs(&src));
    // A pod without the claim does not get it.
    let plain = al.allocate(&req(att("p", "net1", "launcher-a"), "n", vec![r], &[]), 6).expect("allocate");
    assert_ne!(addrs(&plain), addrs(&src));
}

#[test]
fn gc_keeps_what_owners_want_and_leaves_kept_leases_alone() {
    let mut al = Allocator::new();
    let r = spec("10.0.0.0/24", &[], "");
    al.allocate(&req(owned("a", "web-0", web()), "", vec![r.clone()], &[]), 1).expect("allocate");
    al.allocate(&req(owned("b", "web-1", web()), "", vec![r.clone()], &[]), 1).expect("allocate");
    al.allocate(&req(att("c", "net1", "plain"), "", vec![r], &[]), 1).expect("allocate");
    al.release_keeping("", "b", "net1", 2, &|_| true);
    let out = al.gc_keeping("", "node-a", &HashSet::new(), 3, &|l| l.holder.pod.name == "web-0");
    assert_eq!(addrs(&out.freed), vec![ip("10.0.0.3")]);
    assert_eq!(addrs(&out.kept), vec![ip("10.0.0.1")]);
    assert!(al.get("", ip("10.0.0.2")).expect("kept").holder.kept, "kept before, still kept");
}

#[test]
fn a_sandbox_added_again_after_its_del_holds_its_kept_address_again() {
    let mut al = Allocator::new();
    let r = spec("10.0.0.0/24", &[], "");
    al.allocate(&req(owned("c1", "web-0", web()), "", vec![r.clone()], &[]), 1).expect("allocate");
    al.release_keeping("", "c1", "net1", 2, &|_| true);
    let got = al.allocate(&req(owned("c1", "web-0", web()), "", vec![r], &[]), 3).expect("allocate");
    assert_eq!(addrs(&got), vec![ip("10.0.0.1")]);
    assert!(!got[0].holder.kept);
    assert_eq!(al.lease_count(), 1);
}

#[test]
fn owner_and_kept_survive_the_stores_json() {
    let lease = Lease {
        address: ip("10.0.0.1"),
        network: "n".into(),
        range: "10.0.0.0/24".into(),
        prefix_len: 24,
        gateway: None,
        holder: Arc::new(Attachment { kept: true, ..owned("c1", "web-0", web()) }),
        created_unix_ms: 1,
        note: String::new(),
    };
    let json = serde_json::to_string(&lease).expect("json");
    assert_eq!(serde_json::from_str::<Lease>(&json).expect("back"), lease);
    let claim = Lease {
        holder: Arc::new(owned("c2", "launcher", Some(Owner::Claim { name: "vm.net1".into() }))),
        ..lease
    };
    let json = serde_json::to_string(&claim).expect("json");
    assert_eq!(serde_json::from_str::<Lease>(&json).expect("back"), claim);
    // A lease written before owners existed reads as owned by nobody.
    let old = r#"{"address":"10.0.0.1","network":"n","range":"","prefix_len":24,"container_id":"c","ifname":"net1","pod":{"namespace":"a","name":"b"},"node":"x","created_unix_ms":1}"#;
    let old: Lease = serde_json::from_str(old).expect("old lease");
    assert_eq!((old.holder.owner.clone(), old.holder.kept), (None, false));
}
