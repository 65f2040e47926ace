#!/usr/bin/env bash
# Installs what the demo and the tests need on a fresh Debian machine and starts the
# private PostgreSQL (e2e/pg.sh). Idempotent; prints the DSN as its last line.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

need=()
command -v cc >/dev/null || need+=(gcc)
command -v make >/dev/null || need+=(make)
command -v perl >/dev/null || need+=(perl)
command -v psql >/dev/null || need+=(postgresql-client-15)
command -v cargo >/dev/null || command -v curl >/dev/null || need+=(curl ca-certificates)
[ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql-15)
if [ "${#need[@]}" -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
if ! command -v cargo >/dev/null; then
  echo "setup: installing Rust (rustup, stable)" >&2
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy >&2
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
"$here/pg.sh" start
