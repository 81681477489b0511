#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ and runs each one for FUZZ_SECONDS (default 20) on a
# scratch copy of its committed corpus (fuzz/corpus/<target>). Fails on the first crash,
# panic, timeout (an input taking over FUZZ_TIMEOUT seconds, default 10) or out-of-memory,
# leaving the input in fuzz/artifacts/<target>/ and printing how to replay it.
#
# Stable toolchain: no sanitizer (-s none), and RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its
# instrumentation flags. Needs cargo-fuzz (`cargo install cargo-fuzz --locked`).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${FUZZ_SECONDS:-20}
timeout=${FUZZ_TIMEOUT:-10}
export RUSTC_BOOTSTRAP=1
targets=$(cargo fuzz list)

start=$(date +%s)
cargo fuzz build -s none
echo "fuzz targets built in $(($(date +%s) - start)) s"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in $targets; do
  mkdir -p "$scratch/$t" "artifacts/$t"
  echo "== fuzz $t (${seconds}s)"
  # New inputs go to the scratch directory (the first one); the committed corpus is only read.
  if ! cargo fuzz run -s none "$t" "$scratch/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout="$timeout" -rss_limit_mb=2048 \
    -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"$scratch/$t.log" 2>&1; then
    tail -n 60 "$scratch/$t.log"
    echo "fuzz target $t failed; replay: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -s none $t artifacts/$t/<file>" >&2
    exit 1
  fi
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec)' "$scratch/$t.log" | tr '\n' ' '
  echo
done
echo "fuzzing done in $(($(date +%s) - start)) s"
