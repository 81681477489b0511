# Helpers for the micro-VM's scenarios (tests/vm/*.sh), sourced before each by /init. The
# guest is the node: its own network namespace holds the masters and runs the plugins; pods
# are namespaces made with `ip netns add`. The test reads what `rec` prints and asserts.

# busybox's sh runs its own applets before PATH: iproute2 by its path.
ip() { /usr/sbin/ip "$@"; }

_cat() {
  cat "$1"
  if [ -s "$1" ] && [ -n "$(tail -c 1 "$1")" ]; then echo; fi
}

# rec NAME CMD...: runs CMD and prints its exit code, stdout and stderr between markers (see
# tests/src/microvm.rs); the stdout stays in /tmp/out/NAME.
rec() {
  _name=$1
  shift
  mkdir -p /tmp/out
  "$@" >"/tmp/out/$_name" 2>/tmp/out/.stderr
  _rc=$?
  echo "@@rec $_name rc=$_rc"
  _cat "/tmp/out/$_name"
  echo "@@stderr $_name"
  _cat /tmp/out/.stderr
  echo "@@end $_name"
}

# pods NAME...: network namespaces with lo up.
pods() {
  for _p in "$@"; do
    ip netns add "$_p" && ip -n "$_p" link set lo up
  done
}

# dummy NAME: a dummy link, up, as a master.
dummy() { ip link add "$1" type dummy && ip link set "$1" up; }

# cni PLUGIN COMMAND POD CID CONF [IFNAME] [MORE_CNI_ARGS]: runs a plugin as a runtime does,
# for the pod $POD_NS/POD (POD_NS defaults to `default`) in /var/run/netns/POD, the config
# from the file CONF. Ours are in /opt/cni/bin, Debian's reference plugins in /usr/lib/cni.
cni() {
  _bin=/usr/lib/cni/$1
  [ -x "/opt/cni/bin/$1" ] && _bin=/opt/cni/bin/$1
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin CNI_COMMAND="$2" CNI_CONTAINERID="$4" \
    CNI_NETNS="/var/run/netns/$3" CNI_IFNAME="${6:-net1}" CNI_PATH=/opt/cni/bin:/usr/lib/cni \
    CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=${POD_NS:-default};K8S_POD_NAME=$3$7" "$_bin" <"$5"
}

# with_prev CONF RESULT: the config CONF with the JSON in RESULT as its prevResult.
with_prev() {
  _c=$(cat "$1")
  printf '%s,"prevResult":%s}\n' "${_c%\}}" "$(cat "$2")"
}

# server: rust-ipam-server on unix:/run/ipam.sock with its embedded store; waits until it
# serves.
SERVER=unix:///run/ipam.sock
server() {
  RUST_LOG=warn rust-ipam-server --listen unix:/run/ipam.sock --metrics-listen off \
    --data-dir /var/lib/rust-ipam --identity vm >/tmp/server.log 2>&1 &
  for _ in $(seq 600); do
    rust-ipam-ctl --server "$SERVER" status >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "@@vm rust-ipam-server did not start:"
  cat /tmp/server.log
  return 1
}

# leases NETWORK: the server's leases of NETWORK, one a line.
leases() { rust-ipam-ctl --server "$SERVER" leases --network "$1"; }

# links NS: `ip -j link` of namespace NS, or of the node without NS.
links() {
  if [ -n "$1" ]; then ip -n "$1" -d -j link show; else ip -d -j link show; fi
}

# addrs NS DEV: `ip -j addr` of DEV in NS.
addrs() { ip -n "$1" -j addr show dev "$2"; }

# ping_from NS ADDRESS: one ping, 3 s to answer.
ping_from() { ip netns exec "$1" ping -c 1 -W 3 "$2"; }
