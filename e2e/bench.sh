#!/usr/bin/env bash
# The benchmark command (docs/benchmarks.md): starts the private PostgreSQL (e2e/pg.sh),
# builds wallaby-worker and wallaby-bench in release mode and runs the harness against them.
#
#   e2e/bench.sh                  full run; writes bench-results/ and docs/benchmarks.md
#   e2e/bench.sh --scale 0.1      smaller workloads (any wallaby-bench option passes through)
#   e2e/bench.sh --smoke          CI: ~2k rows per workload, file + http + grpc; exit 1 if rows are lost
#   e2e/bench.sh --debug --smoke  the same with the debug build (what e2e/test.sh already built)
#
# Needs pg_recvlogical (postgresql-client-15) and s3s-fs (e2e/setup.sh installs both).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."

profile=release
args=()
for a in "$@"; do
  case "$a" in
    --debug) profile=debug ;;
    *) args+=("$a") ;;
  esac
done
has() { local x; for x in "${args[@]}"; do [[ "$x" == "$1" || "$x" == "$1="* ]] && return 0; done; return 1; }
has --out || args+=(--out bench-results)
# Only a full-size release run rewrites the committed page.
if [[ "$profile" == release ]] && ! has --smoke && ! has --scale && ! has --docs; then
  args+=(--docs docs/benchmarks.md)
fi

"$here/pg.sh" start >/dev/null
eval "$("$here/pg.sh" env)"

if [[ "$profile" == release ]]; then
  cargo build --locked --release -p wallaby-worker -p wallaby-bench --bins
else
  # The whole workspace, as `cargo test --workspace` resolved its features: after the tests
  # this only links the two binaries.
  cargo build --locked --workspace --bins
fi
exec "${CARGO_TARGET_DIR:-target}/$profile/wallaby-bench" "${args[@]}"
