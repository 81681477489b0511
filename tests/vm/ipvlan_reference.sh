# Scenario 2 (tests/tests/ipvlan_vm.rs): Debian's reference ipvlan plugin beside rust-ipvlan,
# both with rust-ipam: the same attachment, one after the other, in three CNI versions; the
# reference CHECK of our link; configs both must refuse.
server || exit 1
dummy ref0
pods p
conf() { # VERSION TYPE MODE
  echo "{\"cniVersion\":\"$1\",\"name\":\"ref\",\"type\":\"$2\",\"master\":\"ref0\",\"mode\":\"$3\",\"dns\":{\"nameservers\":[\"198.18.23.53\"]},\"ipam\":{\"type\":\"rust-ipam\",\"range\":\"198.18.23.0/24\",\"gateway\":\"198.18.23.1\",\"routes\":[{\"dst\":\"10.0.0.0/8\"},{\"dst\":\"0.0.0.0/0\",\"gw\":\"198.18.23.254\"}],\"network_name\":\"ref\",\"server\":\"$SERVER\"}}"
}
for v in 1.0.0 0.4.0 0.3.1; do
  for mode in l2 l3; do
    conf "$v" ipvlan "$mode" >"/tmp/$v-$mode.json"
    rec "ref-add-$v-$mode" cni ipvlan ADD p cid-shape "/tmp/$v-$mode.json"
    rec "ref-link-$v-$mode" ip -n p -d -j link show dev net1
    rec "ref-del-$v-$mode" cni ipvlan DEL p cid-shape "/tmp/$v-$mode.json"
    rec "our-add-$v-$mode" cni rust-ipvlan ADD p cid-shape "/tmp/$v-$mode.json"
    rec "our-link-$v-$mode" ip -n p -d -j link show dev net1
    rec "our-del-$v-$mode" cni rust-ipvlan DEL p cid-shape "/tmp/$v-$mode.json"
  done
done
# The reference CHECK of rust-ipvlan's link (routes that name their gateway, as the
# macvlan comparison in delegate_netns.rs explains).
echo "{\"cniVersion\":\"1.0.0\",\"name\":\"ref\",\"type\":\"ipvlan\",\"master\":\"ref0\",\"ipam\":{\"type\":\"rust-ipam\",\"range\":\"198.18.23.0/24\",\"gateway\":\"198.18.23.1\",\"routes\":[{\"dst\":\"0.0.0.0/0\",\"gw\":\"198.18.23.254\"}],\"network_name\":\"ref\",\"server\":\"$SERVER\"}}" >/tmp/check.json
rec our-add-check cni rust-ipvlan ADD p cid-check /tmp/check.json
with_prev /tmp/check.json /tmp/out/our-add-check >/tmp/check-prev.json
rec ref-check cni ipvlan CHECK p cid-check /tmp/check-prev.json
rec our-check cni rust-ipvlan CHECK p cid-check /tmp/check-prev.json
rec our-del-check cni rust-ipvlan DEL p cid-check /tmp/check-prev.json
# Refused configs: ours first (then its leftovers), then the reference's, then its DEL in
# case it left something.
base='"cniVersion":"1.0.0","name":"ref","type":"ipvlan"'
ipam="\"ipam\":{\"type\":\"rust-ipam\",\"range\":\"198.18.23.0/24\",\"network_name\":\"ref\",\"server\":\"$SERVER\"}"
echo "{$base,\"master\":\"ref0\",\"mode\":\"bridge\",$ipam}" >/tmp/case-bad-mode.json
echo "{$base,\"master\":\"nope0\",$ipam}" >/tmp/case-no-master.json
echo "{$base,\"master\":\"ref0\",\"mtu\":9000,$ipam}" >/tmp/case-mtu-above-master.json
echo "{$base,\"master\":\"ref0\",\"mtu\":-5,$ipam}" >/tmp/case-mtu-negative.json
echo "{\"cniVersion\":\"0.2.0\",\"name\":\"ref\",\"type\":\"ipvlan\",\"master\":\"ref0\",$ipam}" >/tmp/case-old-version.json
echo "{$base,\"master\":\"ref0\",\"ipam\":{\"type\":\"no-such-ipam\"}}" >/tmp/case-no-ipam-plugin.json
echo "{$base,\"master\":\"ref0\"}" >/tmp/case-no-ipam.json
for c in bad-mode no-master mtu-above-master mtu-negative old-version no-ipam-plugin no-ipam; do
  rec "our-$c" cni rust-ipvlan ADD p "cid-$c" "/tmp/case-$c.json"
  rec "links-$c" links p
  rec "leases-$c" leases ref
  cni rust-ipvlan DEL p "cid-$c" "/tmp/case-$c.json" >/dev/null 2>&1
  rec "ref-$c" cni ipvlan ADD p "cid-$c" "/tmp/case-$c.json"
  cni ipvlan DEL p "cid-$c" "/tmp/case-$c.json" >/dev/null 2>&1
  ip -n p link del net1 2>/dev/null
done
rec node-links links
rec leases-end leases ref
