#!/usr/bin/env bash
# The test command (README, .ci/run): set-up, formatting, lints, every test against the
# private PostgreSQL. Extra arguments go to `cargo test`.
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

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test" >&2
cargo test --workspace --locked "$@"
