#!/usr/bin/env bash
# Static checks of the Helm chart helm/smarthost:
# - values.schema.json is what helm/tests/gen_schema.py makes, and takes
#   every key of docs/configuration.md that the chart does not set itself;
# - `helm lint` with the defaults and each values file of helm/tests;
# - `helm template` of the defaults and of each values file, validated
#   against the Kubernetes 1.33 schemas in strict mode (kubernetes-validate);
# - the smarthost.toml each one renders passes `smarthost check-config`;
# - every values file in helm/tests/bad is refused by the schema;
# - deploy/kubernetes/smarthost.yaml is the chart rendered with its defaults.
# Run after `cargo build -p smarthost-node --bins`; SMARTHOST_BIN overrides
# the binary. Prints "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
# shellcheck source=scripts/chart-tools.sh
. scripts/chart-tools.sh
ensure_helm
ensure_command openssl openssl
ensure_tools_python
validate="$(dirname "$TOOLS_PY")/kubernetes-validate"

binary="${SMARTHOST_BIN:-${CARGO_TARGET_DIR:-target}/debug/smarthost}"
[ -x "$binary" ] || { echo "error: $binary missing: cargo build -p smarthost-node --bins first" >&2; exit 1; }

chart=helm/smarthost
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
passed=0
failed=0
check() {
  local name="$1"
  shift
  if "$@" >"$work/out" 2>&1; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    echo "FAILED: $name"
    sed 's/^/  /' "$work/out" | tail -20
  fi
}

check "values.schema.json is up to date (python3 helm/tests/gen_schema.py)" \
  sh -c "python3 helm/tests/gen_schema.py '$work/schema.json' && cmp '$work/schema.json' $chart/values.schema.json"
check "values.schema.json takes every key of docs/configuration.md (helm/tests/schema_keys.py)" \
  python3 helm/tests/schema_keys.py

# A self-signed pair for the values file that carries certificate text.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=relay.test \
  -keyout "$work/tls.key" -out "$work/tls.crt" >/dev/null 2>&1
"$TOOLS_PY" - "$work" <<'PY'
import sys, yaml
work = sys.argv[1]
values = yaml.safe_load(open("helm/tests/values-tls.yaml"))
values["tls"]["cert"] = open(f"{work}/tls.crt").read()
values["tls"]["key"] = open(f"{work}/tls.key").read()
yaml.safe_dump(values, open(f"{work}/values-tls.yaml", "w"))
PY

# What a credentials Secret (credentials.existingSecret) would hold.
printf '[[smtp.users]]\nname = "app"\npassword_hash = "%s"\n' \
  "$("$binary" hash-password chart-test-secret)" > "$work/credentials.toml"

# The smarthost.toml of rendered manifests, with the TLS paths pointed at
# the test's pair (the pods mount it at /etc/smarthost/tls) and the
# credentials include at the test's file.
extract_config() {
  "$TOOLS_PY" - "$1" "$2" "$work" <<'PY'
import base64, sys, yaml
rendered, out, work = sys.argv[1:]
for doc in yaml.safe_load_all(open(rendered)):
    if doc and doc["metadata"]["name"].endswith("-config") and doc["kind"] in ("ConfigMap", "Secret"):
        data = doc.get("data") or {}
        text = doc.get("stringData", {}).get("smarthost.toml") or data["smarthost.toml"]
        if doc["kind"] == "Secret" and "stringData" not in doc:
            text = base64.b64decode(text).decode()
        text = text.replace("/etc/smarthost/tls/", work + "/")
        open(out, "w").write(text.replace("/etc/smarthost/credentials/", work + "/"))
        break
else:
    sys.exit("no -config ConfigMap or Secret rendered")
PY
}

cases=(default helm/tests/values-full.yaml helm/tests/values-podman.yaml "$work/values-tls.yaml")
for case in "${cases[@]}"; do
  name="$(basename "$case" .yaml)"
  args=()
  [ "$case" = default ] || args=(-f "$case")
  check "helm lint ($name)" "$HELM" lint --strict "$chart" "${args[@]}"
  check "helm template ($name)" sh -c '"$@" > "'"$work/$name.yaml"'"' _ "$HELM" template rel "$chart" "${args[@]}"
  check "kubernetes-validate --strict -k 1.33 ($name)" \
    "$validate" --strict --quiet --no-warn -k 1.33 "$work/$name.yaml"
  check "smarthost check-config of the rendered smarthost.toml ($name)" sh -c \
    "$(declare -f extract_config); TOOLS_PY='$TOOLS_PY' work='$work' extract_config '$work/$name.yaml' '$work/$name.toml' && '$binary' check-config '$work/$name.toml'"
done

# The credentials Secret is mounted and included (full).
check "credentials Secret mounted and included (full)" sh -c \
  "grep -q 'secretName: smarthost-credentials' '$work/values-full.yaml' && grep -q 'include = \[\"$work/credentials.toml\"\]' '$work/values-full.toml'"

# The ServiceMonitor is a custom resource that kubernetes-validate has no
# schema for: at least its shape is checked here.
check "ServiceMonitor rendered (full)" grep -q '^kind: ServiceMonitor$' "$work/values-full.yaml"
# It scrapes the coordinators too: the leading one shows the shared queue.
check "ServiceMonitor selects nodes and coordinators, each with a headless admin Service (full)" sh -c \
  "grep -q 'values: \[node, coordinator\]' '$work/values-full.yaml' && grep -q 'name: rel-smarthost-coordinator-admin' '$work/values-full.yaml'"
# With admin.metricsPort, the probes, the ServiceMonitor and the headless
# Services use the metrics listener, and the config asks for it.
check "admin.metricsPort: metrics_listen, probes and ServiceMonitor on port metrics (full)" sh -c \
  "grep -q '^metrics_listen = \"0.0.0.0:9090\"' '$work/values-full.toml' \
   && [ \"\$(grep -c 'port: metrics' '$work/values-full.yaml')\" -ge 5 ] \
   && grep -A1 'path: /metrics' '$work/values-full.yaml' | grep -q 'interval' \
   && grep -B1 'path: /metrics' '$work/values-full.yaml' | grep -q 'port: metrics' \
   && ! grep -A2 'readinessProbe' '$work/values-full.yaml' | grep -q 'port: admin'"
# The HPA's queue metric is one smarthost exports.
check "HPA scales on smarthost_queue_deliveries{state=ready} (full)" sh -c \
  "grep -A4 'name: smarthost_queue_deliveries' '$work/values-full.yaml' | grep -q 'state: ready'"
# The terminationGracePeriodSeconds covers preStop and shutdown_grace.
check "grace period = preStop 5 + shutdown_grace 60 + 5 (full)" \
  grep -q 'terminationGracePeriodSeconds: 70$' "$work/values-full.yaml"

# The plain manifests for clusters without Helm are the chart's defaults.
check "deploy/kubernetes/smarthost.yaml is the chart rendered with its defaults" sh -c \
  "'$HELM' template smarthost $chart > '$work/plain.yaml' && tail -n +7 deploy/kubernetes/smarthost.yaml | cmp - '$work/plain.yaml'"

for bad in helm/tests/bad/*.yaml; do
  check "schema refuses $(basename "$bad")" sh -c \
    "! '$HELM' template rel $chart -f '$bad' >/dev/null 2>'$work/err' && grep -q 'schema' '$work/err'"
done

echo "chart: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
