# Scenario 4 (tests/tests/ipvlan_vm.rs): what rust-ipvlan refuses before it touches anything:
# a master that is missing or down, a second mode on a master, an MTU above the master's.
server || exit 1
dummy rules0
ip link add rules-down type dummy
pods a b
conf() { # MASTER MODE [MORE]
  echo "{\"cniVersion\":\"1.0.0\",\"name\":\"rules\",\"type\":\"rust-ipvlan\",\"master\":\"$1\",\"mode\":\"$2\"$3,\"ipam\":{\"type\":\"rust-ipam\",\"range\":\"198.18.24.0/24\",\"network_name\":\"rules\",\"server\":\"$SERVER\"}}"
}
conf rules0 l2 >/tmp/l2.json
conf nope0 l2 >/tmp/missing.json
conf rules-down l2 >/tmp/down.json
conf rules0 l3 >/tmp/l3.json
conf rules0 l2 ',"mtu":9000' >/tmp/mtu.json
rec add-a cni rust-ipvlan ADD a cid-a /tmp/l2.json
for c in missing down l3 mtu; do
  rec "add-b-$c" cni rust-ipvlan ADD b cid-b "/tmp/$c.json"
  rec "links-b-$c" links b
  rec "leases-$c" leases rules
done
rec link-a ip -n a -d -j link show dev net1
rec node-links links
# The same mode on the same master is fine; after a's DEL, so is another mode.
rec add-b-l2 cni rust-ipvlan ADD b cid-b /tmp/l2.json
rec del-a cni rust-ipvlan DEL a cid-a /tmp/l2.json
rec del-b cni rust-ipvlan DEL b cid-b /tmp/l2.json
rec add-b-l3-alone cni rust-ipvlan ADD b cid-b /tmp/l3.json
rec link-b-l3 ip -n b -d -j link show dev net1
rec del-b-l3 cni rust-ipvlan DEL b cid-b /tmp/l3.json
rec leases-end leases rules
