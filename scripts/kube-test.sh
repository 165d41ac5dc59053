#!/usr/bin/env bash
# Plays the Helm chart for real: builds the image around the smarthost
# binary cargo built (scripts/image.sh --prebuilt), renders the chart with
# helm/tests/values-podman.yaml and starts it with `podman kube play` on a
# podman network this test creates: a Redis pod and an SMTP sink pod
# (helm/tests/peers.yaml, from an image of Debian's redis-server and
# aiosmtpd), two coordinators and three nodes. It checks the pods' /healthz
# and /readyz and the cluster view of a coordinator, sends one message over
# STARTTLS with a certificate given in the values (a Secret of the chart),
# then sends 300 messages through the node pods, kills one node pod
# (SIGKILL) and drains another (SIGTERM) mid-run, and checks that every
# message answered 250 reaches the sink, and that the drained node answered
# every transaction it had begun and exited 0 (helm/tests/kube_mail.py).
# `podman kube down` and the network removal run on every exit. With
# KUBE_TEST_LOGS=DIR each pod's whole log is kept in DIR.
#
# Everything is reached on the test's own network (10.89.250.0/24); no port
# is published. Needs root (podman networks). Run after
# `cargo build -p smarthost-node --bins`; SMARTHOST_BIN overrides the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
# shellcheck source=scripts/chart-tools.sh
. scripts/chart-tools.sh
ensure_helm
ensure_command curl curl
ensure_command openssl openssl
ensure_command swaks swaks
ensure_tools_python

binary="${SMARTHOST_BIN:-${CARGO_TARGET_DIR:-target}/debug/smarthost}"
[ -x "$binary" ] || { echo "error: $binary missing: cargo build -p smarthost-node --bins first" >&2; exit 1; }

export CONTAINERS_CONF="${CONTAINERS_CONF:-$root/scripts/podman.conf}"
# The previous run's image goes, so that the images of old binaries do not
# pile up; the base and the package layer stay in the build cache.
if command -v podman >/dev/null 2>&1; then
  podman rmi -f localhost/smarthost:kube-test >/dev/null 2>&1 || true
fi
# Installs podman when missing and makes the base image once.
image="$(IMAGE=localhost/smarthost:kube-test scripts/image.sh --prebuilt "$binary")"

# The peers' image, tagged by what goes into it, so it is built once.
peers_tag="$(cat tests/peers/Containerfile tests/peers/sink.py | sha256sum | cut -c1-12)"
peers_image="localhost/smarthost-test-peers:$peers_tag"
if ! podman image exists "$peers_image"; then
  echo "building $peers_image"
  podman build -q -t "$peers_image" -f tests/peers/Containerfile tests/peers >/dev/null
fi

net=smarthost-kube-test
subnet=10.89.250.0/24
work="$(mktemp -d)"
# The pods' user (10001) reads the config files mounted from here.
chmod 755 "$work"
mkdir -p "$work/sink" "$work/files"
sed -e "s#SINK_DIR#$work/sink#" -e "s#localhost/smarthost-test-peers:1#$peers_image#" \
  helm/tests/peers.yaml > "$work/peers.yaml"
# STARTTLS with a certificate from the values: the chart makes the Secret.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=relay.test \
  -keyout "$work/tls.key" -out "$work/tls.crt" >/dev/null 2>&1
"$HELM" template t helm/smarthost -f helm/tests/values-podman.yaml \
  --set image.repository="${image%:*}" --set image.tag="${image##*:}" \
  --set tls.enabled=true --set-file tls.cert="$work/tls.crt" --set-file tls.key="$work/tls.key" \
  > "$work/chart.yaml"
"$TOOLS_PY" helm/tests/podmanize.py "$work/files" < "$work/chart.yaml" > "$work/play.yaml"

cleanup() {
  status=$?
  if [ "$status" -ne 0 ]; then
    echo "--- logs of the played pods (test failed) ---"
    podman ps -a --format '{{.Names}} {{.Status}}' 2>&1 | grep -E '^(t-|redis-|sink-)' || true
    for c in $(podman ps -a --format '{{.Names}}' 2>/dev/null | grep -E '^(t-|redis-|sink-)'); do
      echo "--- $c (warnings and errors, then the last lines)"
      podman logs "$c" 2>&1 | grep -E '"level":"(WARN|ERROR)"| WARN | ERROR ' | tail -n 30 || true
      podman logs --tail 5 "$c" 2>&1 || true
    done
  fi
  if [ -n "${KUBE_TEST_LOGS:-}" ]; then
    mkdir -p "$KUBE_TEST_LOGS"
    for c in $(podman ps -a --format '{{.Names}}' 2>/dev/null | grep -E '^(t-|redis-|sink-)'); do
      podman logs "$c" >"$KUBE_TEST_LOGS/$c.log" 2>&1 || true
    done
  fi
  # The containers' anonymous volumes (their /var/lib/smarthost), which
  # `kube down` leaves behind.
  local volumes
  volumes="$(podman ps -a --format '{{.Names}}' 2>/dev/null | grep -E '^(t-|redis-|sink-)' |
    xargs -r podman inspect --format '{{range .Mounts}}{{if eq .Type "volume"}}{{.Name}} {{end}}{{end}}' 2>/dev/null || true)"
  podman kube down "$work/play.yaml" >/dev/null 2>&1 || true
  podman kube down "$work/peers.yaml" >/dev/null 2>&1 || true
  # shellcheck disable=SC2086
  [ -z "${volumes// /}" ] || podman volume rm -f $volumes >/dev/null 2>&1 || true
  podman network rm -f "$net" >/dev/null 2>&1 || true
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT

# Leftovers of an interrupted run go first.
podman kube down "$work/play.yaml" >/dev/null 2>&1 || true
podman kube down "$work/peers.yaml" >/dev/null 2>&1 || true
podman network rm -f "$net" >/dev/null 2>&1 || true
podman network create --subnet "$subnet" "$net" >/dev/null

pod_ip() {
  local infra
  infra="$(podman pod inspect "$1" --format '{{.InfraContainerID}}')"
  podman inspect "$infra" --format "{{(index .NetworkSettings.Networks \"$net\").IPAddress}}"
}

# Waits until COMMAND succeeds, at most SECONDS.
wait_for() {
  local what="$1" seconds="$2"
  shift 2
  local i
  for ((i = 0; i < seconds * 2; i++)); do
    if "$@" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.5
  done
  echo "error: $what not within ${seconds}s" >&2
  return 1
}

podman kube play --network "$net" "$work/peers.yaml" >/dev/null
wait_for "Redis answering" 30 podman exec redis-pod-0-redis redis-cli ping
wait_for "the sink listening" 30 sh -c "podman logs sink-pod-0-sink 2>&1 | grep -q READY"

podman kube play --network "$net" "$work/play.yaml" >/dev/null
nodes=()
for i in 0 1 2; do
  ip="$(pod_ip "t-node-pod-$i")"
  # The probes on the metrics listener (admin.metricsPort 9090).
  wait_for "node $i ready at $ip" 120 curl -sf -m 2 "http://$ip:9090/readyz"
  curl -sf -m 2 "http://$ip:9090/healthz" | grep -q alive
  nodes+=("$ip")
done
coordinator="$(pod_ip t-coordinator-pod-0)"
wait_for "coordinator ready" 120 curl -sf -m 2 "http://$coordinator:9090/readyz"
# The metrics listener serves no API; the API port does.
api_status="$(curl -s -o /dev/null -w '%{http_code}' -m 2 "http://$coordinator:9090/api/v1/queue")"
[ "$api_status" = 404 ] ||
  { echo "error: the metrics port answered /api/v1/queue with $api_status, not 404" >&2; exit 1; }
# One leader and all five processes alive in the shared membership.
cluster_ok() {
  curl -sf -m 2 "http://$coordinator:8025/api/v1/cluster" | "$TOOLS_PY" -c '
import json, sys
c = json.load(sys.stdin)
sys.exit(0 if c["leader"] and len(c["live"]) == 5 else 1)'
}
wait_for "a leader and five live members in /api/v1/cluster" 120 cluster_ok
echo "chart played: 3 nodes (${nodes[*]}), 2 coordinators, Redis and sink on $net"

# The rendered configuration is what the pods run.
podman exec t-node-pod-0-smarthost /usr/local/bin/smarthost check-config \
  /etc/smarthost/config/smarthost.toml

# One message over STARTTLS, with the certificate from the chart's Secret.
swaks --server "${nodes[0]}:2525" --tls --from app@example.com --to tls@tls.kube.test \
  --helo client.test --h-Subject "kube-test tls" >"$work/swaks.log" 2>&1 ||
  { cat "$work/swaks.log"; echo "error: STARTTLS message refused" >&2; exit 1; }
grep -q "TLS started" "$work/swaks.log"
tls_seen() { grep -l '"tls@tls.kube.test"' "$work"/sink/*.json; }
wait_for "the STARTTLS message at the sink" 30 tls_seen
echo "STARTTLS with the chart's certificate: message delivered"

"$TOOLS_PY" helm/tests/kube_mail.py "$work/sink" "${nodes[@]}" \
  --kill t-node-pod-2-smarthost --drain t-node-pod-1-smarthost

# /metrics on the pods: exactly one coordinator leads and shows the shared
# queue, the other shows neither; node 0 counts the messages it took.
metrics_ok() {
  local leaders=0 queues=0 page pod
  for pod in t-coordinator-pod-0 t-coordinator-pod-1; do
    page="$(curl -sf -m 2 "http://$(pod_ip "$pod"):9090/metrics")" || return 1
    if grep -q '^smarthost_coordinator_leader 1$' <<<"$page"; then leaders=$((leaders + 1)); fi
    if grep -q '^smarthost_queue_messages ' <<<"$page"; then queues=$((queues + 1)); fi
  done
  [ "$leaders" = 1 ] && [ "$queues" = 1 ]
}
wait_for "one leading coordinator showing the queue at /metrics" 60 metrics_ok
# Asked again for a while: one scrape of a busy pod may time out.
node0_counts() {
  curl -sf -m 2 "http://${nodes[0]}:9090/metrics" | grep -Eq '^smarthost_messages_received_total [1-9]'
}
wait_for "node 0's /metrics counting the messages it received" 30 node0_counts
echo "metrics: one leader shows the queue; node 0 counts what it received"
