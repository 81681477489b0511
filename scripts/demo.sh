#!/usr/bin/env bash
# Builds rust-ipam, starts rust-ipam-server with its defaults (127.0.0.1:50051, embedded
# store), allocates addresses for a few pods over real gRPC, then keeps serving until Ctrl-C.
# Arguments are passed to the server (e.g. --data-dir /tmp/ipam).
set -euo pipefail
cd "$(dirname "$0")/.."
# All of the workspace's binaries, as the tests build them: one feature set, one build.
cargo build --quiet --workspace --bins
bin=target/debug

"$bin/rust-ipam-server" "$@" &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
trap 'exit 0' INT TERM

ctl() { "$bin/rust-ipam-ctl" "$@"; }
for _ in $(seq 100); do
  ctl status >/dev/null 2>&1 && break
  kill -0 "$server" 2>/dev/null || { echo "rust-ipam-server exited; see its log above" >&2; exit 1; }
  sleep 0.1
done
ctl status

echo
echo "== three pods on a NAD with range 10.56.0.0/16, exclude 10.56.0.0/28"
for pod in train-0 train-1 train-2; do
  ctl allocate --container-id "demo-$pod" --pod "demo/$pod" --range 10.56.0.0/16 --exclude 10.56.0.0/28
done
echo "== train-0 asks again: same address (ADD is idempotent)"
ctl allocate --container-id demo-train-0 --pod demo/train-0 --range 10.56.0.0/16 --exclude 10.56.0.0/28
echo "== a dual-stack attachment: one address per range"
ctl allocate --container-id demo-ds --pod demo/dual-stack --range 10.57.0.0/24 --range fd00:56::/64
echo
ctl pools
echo
echo "rust-ipam-server is serving on 127.0.0.1:50051 (Ctrl-C to stop)."
wait "$server"
