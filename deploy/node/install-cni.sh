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
#   $HOST_CONF_DIR/tls/{ca.crt,tls.crt,tls.key}  with RUST_IPAM_TLS_DIR (below): the node's
#                                         client certificate for mutual TLS (key mode 0600)
#   $HOST_CONF_DIR/rust-ipam.token        with RUST_IPAM_TOKEN_DIR: this pod's projected token
#                                         (audience rust-ipam), the plugin's token_file for a
#                                         server run with --authorize (mode 0600)
#
# The plugins run in the host's network namespace, where the cluster's DNS names usually do
# not resolve, so the node config names the Service by its ClusterIP: the
# RUST_IPAM_SERVICE_HOST and RUST_IPAM_SERVICE_PORT_GRPC variables Kubernetes sets in pods of
# the Service's namespace created after the Service. RUST_IPAM_SERVER (comma list of
# http://host:port) overrides that.
#
# Mutual TLS (deploy/overlays/mtls): RUST_IPAM_TLS_DIR names a directory holding ca.crt (the
# CA of the server's certificate), tls.crt and tls.key (this node's client certificate): a
# mounted kubernetes.io/tls Secret. Install then copies the three files to
# $HOST_CONF_DIR/tls/, writes tls_ca, tls_cert and tls_key into the node config and an
# https:// server, and run keeps the copies in step with the Secret (renewals). The files
# are checked before anything is written: a missing or empty one changes nothing. Without
# RUST_IPAM_TLS_DIR, a tls/ directory left by an earlier TLS install is removed.
set -eu

SRC_DIR=${RUST_IPAM_SRC_DIR:-/opt/rust-ipam/cni}
HOST_BIN_DIR=${RUST_IPAM_HOST_BIN_DIR:-/host/opt/cni/bin}
HOST_CONF_DIR=${RUST_IPAM_HOST_CONF_DIR:-/host/etc/cni/net.d/rust-ipam.d}
# Where the host sees HOST_CONF_DIR: the paths written into the kubeconfig.
NODE_CONF_DIR=${RUST_IPAM_NODE_CONF_DIR:-/etc/cni/net.d/rust-ipam.d}
BINARIES=${RUST_IPAM_BINARIES:-rust-ipam rust-multus rust-macvlan rust-ipvlan}
SA_DIR=${RUST_IPAM_SA_DIR:-/var/run/secrets/kubernetes.io/serviceaccount}
REFRESH_SECONDS=${RUST_IPAM_REFRESH_SECONDS:-60}
TLS_DIR=${RUST_IPAM_TLS_DIR:-}
TOKEN_DIR=${RUST_IPAM_TOKEN_DIR:-}
TLS_FILES="ca.crt tls.crt tls.key"

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
	# Created private, then given MODE: a key is never readable by others, not even while
	# it is being copied.
	(umask 077 && cp "$1" "$tmp") || { rm -f "$tmp"; die "cannot write $tmp"; }
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
		scheme=http
		[ -z "$TLS_DIR" ] || scheme=https
		list="$scheme://$(url_host "${RUST_IPAM_SERVICE_HOST}"):$port"
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
		case "$TLS_DIR:$s" in
		:*) ;;
		*:https://*) ;;
		*) IFS=$old_ifs; die "server \"$s\" is not https:// but RUST_IPAM_TLS_DIR is set: with mutual TLS every server must be https://host:port" ;;
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
	check_tls_dir
	[ -z "$TOKEN_DIR" ] || [ -s "$TOKEN_DIR/token" ] || die "RUST_IPAM_TOKEN_DIR $TOKEN_DIR holds no token"

	mkdir -p "$HOST_BIN_DIR" "$HOST_CONF_DIR" || die "cannot create $HOST_BIN_DIR or $HOST_CONF_DIR"
	chmod 0755 "$HOST_CONF_DIR"
	for b in $BINARIES; do
		[ -f "$SRC_DIR/$b" ] || die "$SRC_DIR/$b is missing from the image"
		# Left over by an installer killed mid-copy.
		rm -f "$HOST_BIN_DIR/.$b.tmp."*
		put "$SRC_DIR/$b" "$HOST_BIN_DIR/$b" 0755
	done
	tls_keys=""
	if [ -n "$TLS_DIR" ]; then
		# The files first, so the config never names a file that is not there yet.
		install_tls
		tls_keys=",
  \"tls_ca\": \"$NODE_CONF_DIR/tls/ca.crt\",
  \"tls_cert\": \"$NODE_CONF_DIR/tls/tls.crt\",
  \"tls_key\": \"$NODE_CONF_DIR/tls/tls.key\""
	fi
	token_key=""
	if [ -n "$TOKEN_DIR" ]; then
		put "$TOKEN_DIR/token" "$HOST_CONF_DIR/rust-ipam.token" 0600
		token_key=",
  \"token_file\": \"$NODE_CONF_DIR/rust-ipam.token\""
	else
		rm -f "$HOST_CONF_DIR/rust-ipam.token"
	fi
	put_text "$HOST_CONF_DIR/rust-ipam.conf" 0644 <<CONF
{
  "server": $servers,
  "node_name": "$NODE_NAME",
  "timeout_ms": $timeout_ms$tls_keys$token_key
}
CONF
	if [ -z "$TLS_DIR" ] && [ -d "$HOST_CONF_DIR/tls" ]; then
		# The config no longer names them.
		rm -rf "$HOST_CONF_DIR/tls"
		log "removed $HOST_CONF_DIR/tls (RUST_IPAM_TLS_DIR is not set)"
	fi
	install_kubeconfig
}

# Fails, before anything is written, unless RUST_IPAM_TLS_DIR (when set) holds every file
# install_tls copies, each a non-empty PEM file.
check_tls_dir() {
	[ -n "$TLS_DIR" ] || return 0
	case "$NODE_CONF_DIR" in *'"'* | *'\'*) die "RUST_IPAM_NODE_CONF_DIR \"$NODE_CONF_DIR\" contains a quote or backslash" ;; esac
	[ -d "$TLS_DIR" ] || die "RUST_IPAM_TLS_DIR \"$TLS_DIR\" is not a directory (mount the node's TLS Secret there)"
	for f in $TLS_FILES; do
		[ -s "$TLS_DIR/$f" ] || die "RUST_IPAM_TLS_DIR \"$TLS_DIR\" has no $f (or it is empty): the node TLS Secret needs the keys ca.crt, tls.crt and tls.key"
		grep -q -e '-----BEGIN ' "$TLS_DIR/$f" || die "$TLS_DIR/$f is not PEM (no -----BEGIN line)"
	done
}

# Copies the node's TLS files to $HOST_CONF_DIR/tls (a directory only root can enter; the
# key 0600). Each file is replaced by rename; while a renewal is being copied, a plugin may
# read the new certificate with the old key, fail that one call and be retried.
install_tls() {
	mkdir -p "$HOST_CONF_DIR/tls" || die "cannot create $HOST_CONF_DIR/tls"
	chmod 0700 "$HOST_CONF_DIR/tls"
	rm -f "$HOST_CONF_DIR/tls/."*.tmp.*
	put "$TLS_DIR/ca.crt" "$HOST_CONF_DIR/tls/ca.crt" 0644
	put "$TLS_DIR/tls.key" "$HOST_CONF_DIR/tls/tls.key" 0600
	put "$TLS_DIR/tls.crt" "$HOST_CONF_DIR/tls/tls.crt" 0644
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
	if [ -n "$TLS_DIR" ]; then
		for f in $TLS_FILES; do
			[ -s "$HOST_CONF_DIR/tls/$f" ] || { log "$HOST_CONF_DIR/tls/$f is not installed"; exit 1; }
		done
	fi
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
	log "installed; refreshing the tokens${TLS_DIR:+ and the TLS files} every ${REFRESH_SECONDS}s"
	trap 'exit 0' TERM INT
	while :; do
		sleep "$REFRESH_SECONDS" &
		wait $! || true
		if [ -f "$SA_DIR/token" ] && [ -d "$HOST_CONF_DIR" ]; then
			put "$SA_DIR/token" "$HOST_CONF_DIR/rust-multus.token" 0600
		fi
		if [ -n "$TOKEN_DIR" ] && [ -s "$TOKEN_DIR/token" ] && [ -d "$HOST_CONF_DIR" ]; then
			put "$TOKEN_DIR/token" "$HOST_CONF_DIR/rust-ipam.token" 0600
		fi
		# A renewed certificate (the kubelet updates the mounted Secret): copy it over.
		# A Secret caught half-updated is skipped until the next round.
		if [ -n "$TLS_DIR" ] && [ -d "$HOST_CONF_DIR" ]; then
			(check_tls_dir && install_tls) || log "TLS files not refreshed this round"
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
