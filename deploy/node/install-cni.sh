#!/bin/sh
# rust-ipam node installer: the entrypoint of the node DaemonSet (installed in the image as
# /usr/local/bin/rust-ipam-node-install).
#
#   rust-ipam-node-install [run|install|check|uninstall]
#
#   run        install, then stay up and keep rust-multus' service-account token fresh
#              (the default: what the DaemonSet runs)
#   install    install once and exit
#   check      exit 0 only if everything is installed (the DaemonSet's readiness probe)
#   uninstall  remove what install wrote from the host
#
# What install writes, each file as a temporary file in the same directory renamed over the
# old one, so a runtime that execs a plugin or reads the config at that moment sees either
# the old or the new file, never a partial one:
#   $HOST_BIN_DIR/{rust-ipam,rust-multus,rust-macvlan,rust-ipvlan}
#   $HOST_CONF_DIR/rust-ipam.conf         the rust-ipam plugin's node config (JSON)
#   $HOST_CONF_DIR/rust-multus.kubeconfig rust-multus' access to the API server, with
#   $HOST_CONF_DIR/ca.crt, rust-multus.token  the node ServiceAccount's CA and token
#
# The plugins run in the host's network namespace, where the cluster's DNS names usually do
# not resolve, so the node config names the Service by its ClusterIP: the
# RUST_IPAM_SERVICE_HOST and RUST_IPAM_SERVICE_PORT_GRPC variables Kubernetes sets in pods of
# the Service's namespace created after the Service. RUST_IPAM_SERVER (comma list of
# http://host:port) overrides that.
set -eu

SRC_DIR=${RUST_IPAM_SRC_DIR:-/opt/rust-ipam/cni}
HOST_BIN_DIR=${RUST_IPAM_HOST_BIN_DIR:-/host/opt/cni/bin}
HOST_CONF_DIR=${RUST_IPAM_HOST_CONF_DIR:-/host/etc/cni/net.d/rust-ipam.d}
# Where the host sees HOST_CONF_DIR: the paths written into the kubeconfig.
NODE_CONF_DIR=${RUST_IPAM_NODE_CONF_DIR:-/etc/cni/net.d/rust-ipam.d}
BINARIES=${RUST_IPAM_BINARIES:-rust-ipam rust-multus rust-macvlan rust-ipvlan}
SA_DIR=${RUST_IPAM_SA_DIR:-/var/run/secrets/kubernetes.io/serviceaccount}
REFRESH_SECONDS=${RUST_IPAM_REFRESH_SECONDS:-60}

log() { echo "rust-ipam-node-install: $*" >&2; }
die() { log "error: $*"; exit 1; }

# put SRC DEST MODE: copies SRC to DEST through a temporary file renamed over DEST; leaves
# DEST alone when it already has that content.
put() {
	if [ -f "$2" ] && cmp -s "$1" "$2"; then
		chmod "$3" "$2"
		return 0
	fi
	tmp="$(dirname "$2")/.$(basename "$2").tmp.$$"
	cp "$1" "$tmp" || { rm -f "$tmp"; die "cannot write $tmp"; }
	chmod "$3" "$tmp"
	mv -f "$tmp" "$2" || { rm -f "$tmp"; die "cannot rename $tmp to $2"; }
	log "wrote $2"
}

# put_text DEST MODE: like put, with the content from stdin.
put_text() {
	staged="$HOST_CONF_DIR/.staged.$$"
	cat >"$staged" || { rm -f "$staged"; die "cannot write $staged"; }
	put "$staged" "$1" "$2"
	rm -f "$staged"
}

# A host for a URL: an IPv6 address goes in brackets.
url_host() {
	case "$1" in
	*:*) echo "[$1]" ;;
	*) echo "$1" ;;
	esac
}

servers_json() {
	if [ -n "${RUST_IPAM_SERVER:-}" ]; then
		list=$RUST_IPAM_SERVER
	else
		[ -n "${RUST_IPAM_SERVICE_HOST:-}" ] || die "RUST_IPAM_SERVICE_HOST is not set: create the rust-ipam Service before this DaemonSet (Kubernetes sets the variable only in pods created after the Service), or set RUST_IPAM_SERVER"
		port=${RUST_IPAM_SERVICE_PORT_GRPC:-50051}
		list="http://$(url_host "${RUST_IPAM_SERVICE_HOST}"):$port"
	fi
	out=""
	old_ifs=$IFS
	IFS=,
	for s in $list; do
		case "$s" in
		http://* | https://* | unix:///*) ;;
		*) IFS=$old_ifs; die "server \"$s\" is not http://host:port, https://host:port or unix:///path" ;;
		esac
		case "$s" in
		*'"'* | *'\'*) IFS=$old_ifs; die "server \"$s\" contains a quote or backslash" ;;
		esac
		out="$out${out:+, }\"$s\""
	done
	IFS=$old_ifs
	[ -n "$out" ] || die "RUST_IPAM_SERVER is empty"
	echo "[$out]"
}

install_all() {
	[ -n "${NODE_NAME:-}" ] || die "NODE_NAME is not set (the DaemonSet sets it from spec.nodeName)"
	case "$NODE_NAME" in *'"'* | *'\'*) die "NODE_NAME \"$NODE_NAME\" contains a quote or backslash" ;; esac
	timeout_ms=${RUST_IPAM_TIMEOUT_MS:-10000}
	case "$timeout_ms" in '' | *[!0-9]*) die "RUST_IPAM_TIMEOUT_MS \"$timeout_ms\" is not a number of milliseconds" ;; esac
	[ "$timeout_ms" -gt 0 ] || die "RUST_IPAM_TIMEOUT_MS must be positive"
	servers=$(servers_json)

	mkdir -p "$HOST_BIN_DIR" "$HOST_CONF_DIR" || die "cannot create $HOST_BIN_DIR or $HOST_CONF_DIR"
	chmod 0755 "$HOST_CONF_DIR"
	for b in $BINARIES; do
		[ -f "$SRC_DIR/$b" ] || die "$SRC_DIR/$b is missing from the image"
		# Left over by an installer killed mid-copy.
		rm -f "$HOST_BIN_DIR/.$b.tmp."*
		put "$SRC_DIR/$b" "$HOST_BIN_DIR/$b" 0755
	done
	put_text "$HOST_CONF_DIR/rust-ipam.conf" 0644 <<CONF
{
  "server": $servers,
  "node_name": "$NODE_NAME",
  "timeout_ms": $timeout_ms
}
CONF
	install_kubeconfig
}

# rust-multus reads NADs and writes network-status as the node ServiceAccount. The token is
# referenced by file (kubeconfig tokenFile) so the refresh loop can replace it as the kubelet
# rotates it.
install_kubeconfig() {
	if [ ! -f "$SA_DIR/token" ] || [ -z "${KUBERNETES_SERVICE_HOST:-}" ]; then
		log "no service account token or KUBERNETES_SERVICE_HOST: not writing rust-multus.kubeconfig"
		return 0
	fi
	put "$SA_DIR/ca.crt" "$HOST_CONF_DIR/ca.crt" 0644
	put "$SA_DIR/token" "$HOST_CONF_DIR/rust-multus.token" 0600
	put_text "$HOST_CONF_DIR/rust-multus.kubeconfig" 0600 <<KC
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://$(url_host "$KUBERNETES_SERVICE_HOST"):${KUBERNETES_SERVICE_PORT:-443}
    certificate-authority: $NODE_CONF_DIR/ca.crt
users:
- name: rust-multus
  user:
    tokenFile: $NODE_CONF_DIR/rust-multus.token
contexts:
- name: rust-multus
  context:
    cluster: local
    user: rust-multus
current-context: rust-multus
KC
}

check_all() {
	for b in $BINARIES; do
		[ -x "$HOST_BIN_DIR/$b" ] || { log "$HOST_BIN_DIR/$b is not installed"; exit 1; }
	done
	[ -s "$HOST_CONF_DIR/rust-ipam.conf" ] || { log "$HOST_CONF_DIR/rust-ipam.conf is not installed"; exit 1; }
}

uninstall_all() {
	for b in $BINARIES; do
		rm -f "$HOST_BIN_DIR/$b" "$HOST_BIN_DIR/.$b.tmp."*
	done
	rm -rf "$HOST_CONF_DIR"
	log "removed $BINARIES from $HOST_BIN_DIR and $HOST_CONF_DIR"
}

case "${1:-run}" in
install)
	install_all
	;;
run)
	install_all
	log "installed; refreshing the token every ${REFRESH_SECONDS}s"
	trap 'exit 0' TERM INT
	while :; do
		sleep "$REFRESH_SECONDS" &
		wait $! || true
		if [ -f "$SA_DIR/token" ] && [ -d "$HOST_CONF_DIR" ]; then
			put "$SA_DIR/token" "$HOST_CONF_DIR/rust-multus.token" 0600
		fi
	done
	;;
check)
	check_all
	;;
uninstall)
	uninstall_all
	;;
*)
	die "unknown command \"$1\" (run, install, check or uninstall)"
	;;
esac
