# Scenario 3 (tests/tests/ipvlan_vm.rs): the seeds' pods through rust-multus: the cluster
# network from Debian's bridge + host-local as eth0, an ipvlan NAD (rust-ipvlan, rust-ipam) as
# net1, Pods and NADs from a directory of YAML files.
server || exit 1
dummy seeds0
mkdir -p /tmp/objects /tmp/conf /tmp/cache /tmp/host-local
echo '{"cniVersion":"1.0.0","name":"cluster-net","type":"bridge","bridge":"rmcbr0","isGateway":true,"isDefaultGateway":true,"ipam":{"type":"host-local","subnet":"198.18.100.0/24","dataDir":"/tmp/host-local"}}' >/tmp/conf/10-cluster.conf
echo '{"cniVersion":"1.0.0","name":"multus-cni-network","type":"rust-multus","clusterNetwork":"cluster-net","confDir":"/tmp/conf","cniDir":"/tmp/cache","binDir":"/usr/lib/cni","rustMultus":{"objectsDir":"/tmp/objects"}}' >/tmp/multus.json
cat >/tmp/objects/nad-backend.yaml <<NAD
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata:
  name: backend
  namespace: team
spec:
  config: '{"cniVersion":"1.0.0","name":"backend","type":"rust-ipvlan","master":"seeds0","mode":"l2","ipam":{"type":"rust-ipam","range":"198.18.26.0/24","network_name":"seeds","server":"$SERVER"}}'
NAD
export POD_NS=team
for p in seed-1 seed-2; do
  echo "{\"apiVersion\":\"v1\",\"kind\":\"Pod\",\"metadata\":{\"name\":\"$p\",\"namespace\":\"team\",\"uid\":\"uid-$p\",\"annotations\":{\"k8s.v1.cni.cncf.io/networks\":\"backend\"}}}" >"/tmp/objects/pod-$p.json"
  pods "$p"
  rec "add-$p" cni rust-multus ADD "$p" "cid-$p" /tmp/multus.json eth0 ";K8S_POD_INFRA_CONTAINER_ID=cid-$p"
  rec "pod-$p" cat "/tmp/objects/pod-$p.json"
  rec "links-$p" ip -n "$p" -d -j link show
  rec "eth0-$p" addrs "$p" eth0
  rec "net1-$p" addrs "$p" net1
done
rec master ip -j link show dev seeds0
rec leases leases seeds
rec ping-net1 ping_from seed-1 198.18.26.2
rec ping-eth0 ping_from seed-1 198.18.100.3
rec check-seed-2 cni rust-multus CHECK seed-2 cid-seed-2 /tmp/multus.json eth0 ";K8S_POD_INFRA_CONTAINER_ID=cid-seed-2"
for p in seed-1 seed-2; do
  rec "del-$p" cni rust-multus DEL "$p" "cid-$p" /tmp/multus.json eth0 ";K8S_POD_INFRA_CONTAINER_ID=cid-$p"
  rec "links-after-$p" links "$p"
done
rec leases-end leases seeds
rec host-local-end ls /tmp/host-local/cluster-net
