# Scenario 5 (tests/tests/ipvlan_vm.rs): rust-macvlan on dummy masters, which the host
# kernel of delegate_netns.rs lacks: bridge mode pods reach each other, private mode pods do
# not; Debian's macvlan gives the same result on a dummy master.
server || exit 1
for mode in bridge private; do
  dummy "mv-$mode"
  pods "$mode-a" "$mode-b"
  echo "{\"cniVersion\":\"1.0.0\",\"name\":\"mv-$mode\",\"type\":\"rust-macvlan\",\"master\":\"mv-$mode\",\"mode\":\"$mode\",\"ipam\":{\"type\":\"rust-ipam\",\"range\":\"198.18.25.0/24\",\"network_name\":\"mv-$mode\",\"server\":\"$SERVER\"}}" >"/tmp/$mode.json"
  rec "add-$mode-a" cni rust-macvlan ADD "$mode-a" "cid-$mode-a" "/tmp/$mode.json"
  rec "add-$mode-b" cni rust-macvlan ADD "$mode-b" "cid-$mode-b" "/tmp/$mode.json"
  rec "link-$mode-a" ip -n "$mode-a" -d -j link show dev net1
  rec "addr-$mode-b" addrs "$mode-b" net1
  rec "ping-$mode" ping_from "$mode-a" 198.18.25.2
  with_prev "/tmp/$mode.json" "/tmp/out/add-$mode-a" >"/tmp/$mode-a-prev.json"
  rec "check-$mode-a" cni rust-macvlan CHECK "$mode-a" "cid-$mode-a" "/tmp/$mode-a-prev.json"
  rec "leases-$mode" leases "mv-$mode"
  rec "del-$mode-a" cni rust-macvlan DEL "$mode-a" "cid-$mode-a" "/tmp/$mode-a-prev.json"
  rec "del-$mode-b" cni rust-macvlan DEL "$mode-b" "cid-$mode-b" "/tmp/$mode.json"
  rec "links-$mode-a" links "$mode-a"
  rec "leases-$mode-end" leases "mv-$mode"
done
sed 's/"type":"rust-macvlan"/"type":"macvlan"/' /tmp/bridge.json >/tmp/ref.json
rec ref-add cni macvlan ADD bridge-a cid-ref /tmp/ref.json
rec ref-del cni macvlan DEL bridge-a cid-ref /tmp/ref.json
rec our-add cni rust-macvlan ADD bridge-a cid-ref /tmp/ref.json
rec our-del cni rust-macvlan DEL bridge-a cid-ref /tmp/ref.json
