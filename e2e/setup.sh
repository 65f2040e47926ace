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
# Extensions the type-fidelity tests create in their own databases.
[ -f /usr/share/postgresql/15/extension/postgis.control ] || need+=(postgresql-15-postgis-3)
if [ "${#need[@]}" -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
# pgvector is packaged by apt.postgresql.org, not by Debian 12 itself: installed when the
# configured repositories have it; the type tests skip the vector column otherwise.
if [ ! -f /usr/share/postgresql/15/extension/vector.control ] \
  && apt-cache show postgresql-15-pgvector >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends postgresql-15-pgvector >&2
fi
if ! command -v cargo >/dev/null; then
  echo "setup: installing Rust (rustup, stable)" >&2
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy >&2
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
"$here/pg.sh" start
