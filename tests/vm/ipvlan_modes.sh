# Scenario 1 (tests/tests/ipvlan_vm.rs): rust-ipvlan in each mode on its own dummy master
# with rust-ipam and a server in the guest: two pods, their addresses, a ping, CHECK, DEL
# twice, the leases along the way.
server || exit 1
n=20
for mode in l2 l3 l3s; do
  dummy "iv-$mode"
  pods "$mode-a" "$mode-b"
  cat >"/tmp/$mode.json" <<CONF
{"cniVersion":"1.0.0","name":"iv-$mode","type":"rust-ipvlan","master":"iv-$mode","mode":"$mode","ipam":{"type":"rust-ipam","range":"198.18.$n.0/24","network_name":"iv-$mode","server":"$SERVER"}}
CONF
  rec "add-$mode-a" cni rust-ipvlan ADD "$mode-a" "cid-$mode-a" "/tmp/$mode.json"
  rec "add-$mode-b" cni rust-ipvlan ADD "$mode-b" "cid-$mode-b" "/tmp/$mode.json"
  rec "link-$mode-a" ip -n "$mode-a" -d -j link show dev net1
  rec "addr-$mode-a" addrs "$mode-a" net1
  rec "addr-$mode-b" addrs "$mode-b" net1
  rec "master-$mode" ip -j link show dev "iv-$mode"
  rec "leases-$mode" leases "iv-$mode"
  rec "ping-$mode" ping_from "$mode-a" "198.18.$n.2"
  with_prev "/tmp/$mode.json" "/tmp/out/add-$mode-a" >"/tmp/$mode-a-prev.json"
  rec "check-$mode-a" cni rust-ipvlan CHECK "$mode-a" "cid-$mode-a" "/tmp/$mode-a-prev.json"
  rec "del-$mode-a" cni rust-ipvlan DEL "$mode-a" "cid-$mode-a" "/tmp/$mode-a-prev.json"
  rec "links-$mode-a" links "$mode-a"
  rec "leases-$mode-after-del" leases "iv-$mode"
  rec "del-again-$mode-a" cni rust-ipvlan DEL "$mode-a" "cid-$mode-a" "/tmp/$mode-a-prev.json"
  rec "del-$mode-b" cni rust-ipvlan DEL "$mode-b" "cid-$mode-b" "/tmp/$mode.json"
  rec "links-$mode-b" links "$mode-b"
  rec "leases-$mode-end" leases "iv-$mode"
  n=$((n + 1))
done
rec node-links links
