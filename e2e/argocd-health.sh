#!/usr/bin/env bash
# Tests the Argo CD health check of Flow (charts/wallaby/argocd/flow-health.lua) in LuaJIT
# through PyPI's lupa, installed into a private virtualenv under .state/.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
readonly LUPA_VERSION=2.8
readonly VENV="$repo/.state/lua-venv"

die() { echo "argocd-health.sh: error: $*" >&2; exit 1; }

if ! "$VENV/bin/python" -c "import lupa.luajit21" 2>/dev/null; then
  command -v python3 >/dev/null || die "python3 is needed (apt-get install python3 python3-venv)"
  python3 -m venv "$VENV" || die "python3 -m venv $VENV failed (apt-get install python3-venv)"
  "$VENV/bin/pip" install -q "lupa==$LUPA_VERSION" || die "pip install lupa==$LUPA_VERSION failed; check the PyPI registry"
fi
"$VENV/bin/python" "$here/argocd_health_test.py"
