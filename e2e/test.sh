#!/usr/bin/env bash
# The test command (README, .ci/run): set-up, the Helm chart and its Argo CD health check,
# formatting, lints, every test against the private PostgreSQL. Extra arguments go to
# `cargo test`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."

"$here/setup.sh" >/dev/null
# setup.sh may have just installed Rust with rustup.
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
# The tests start the private PostgreSQL themselves too (idempotent); export it here so
# every test process agrees on the instance.
eval "$("$here/pg.sh" env)"

echo "== Helm chart: lint and render (e2e/helm.sh)" >&2
"$here/helm.sh"
echo "== Argo CD health check of Flow (e2e/argocd-health.sh)" >&2
"$here/argocd-health.sh"
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test" >&2
cargo test --workspace --locked --no-fail-fast "$@"
echo "== benchmark smoke run (e2e/bench.sh --debug --smoke: ~2k rows per workload; fails if rows are lost, never on time)" >&2
"$here/bench.sh" --debug --smoke --out "${CARGO_TARGET_DIR:-target}/bench-smoke"
