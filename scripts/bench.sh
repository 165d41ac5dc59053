#!/usr/bin/env bash
# Measures smarthost on loopback with Postfix's load tools.
#
#   scripts/bench.sh accept [MESSAGES] [SESSIONS] [SIZE]
#       smtp-source sends MESSAGES messages of SIZE bytes over SESSIONS
#       parallel sessions (a new connection per message); the figure is how
#       fast smarthost acknowledges them into its local spool (fsync'd).
#       Delivery of example.org is suspended through the admin API first,
#       so the figure is acceptance alone.
#   scripts/bench.sh relay [MESSAGES] [SESSIONS] [SIZE]
#       the same load, relayed through smarthost to Postfix's smtp-sink
#       (smart host); the figure is from the first message sent to the last
#       one delivered, as the delivery log records it.
#
#   scripts/bench.sh slow [DOMAINS] [PER_DOMAIN] [DELAY]
#       delivery to a slow receiver, where a relay's capacity is its open
#       connections: PER_DOMAIN messages to each of DOMAINS recipient
#       domains (d1.bench.test, …), each domain's messages spread evenly
#       over the nodes, relayed to an smtp-sink that waits DELAY seconds
#       before it answers each DATA. Each node may open NODE_CONNECTIONS
#       connections (delivery.max_connections, default 6), a domain
#       DOMAIN_CONNECTIONS across the cluster (default 100), 20 messages a
#       connection. The figure is messages/s from the first message sent
#       to the last one delivered, against the ideal: NODES ×
#       NODE_CONNECTIONS connections, each a message per DELAY (less when
#       the domains' caps allow fewer). Defaults: 90, 10, 0.2. SUBMIT_TO=1
#       sends every message to node 1 instead: the others learn of the
#       work from the shared queue alone. The receiver counts messages
#       without storing them (--no-store), so that it is never the limit.
#       The run prints each node's open connections over the run, sampled
#       from /metrics every 0.25 s.
#
# Defaults: 20000 messages, 20 sessions, 2048 bytes. Needs smtp-source and
# smtp-sink (Debian package postfix; installed here if missing).
#
# BACKEND=redis runs the node on the Redis backend instead of the local
# spool: a redis-server with appendonly yes and appendfsync always is started
# on a free port, and the Redis commands per message are counted
# (INFO commandstats before and after). NODES=3 (with BACKEND=redis) starts
# three nodes on that Redis; the sessions and messages are split evenly
# between them. BACKEND=redis-cluster does the same on a Redis Cluster of
# three primaries (no replicas) on free ports, each with the same fsync
# settings; the commands are counted on all three.
#
# REDIS_MONITOR=1 (Redis backends) also records every command with
# MONITOR and says how many the nodes sent and how many their scripts ran
# (INFO commandstats counts both alike). MONITOR slows Redis: count with
# it, time without it. REDIS_ARGS adds options to every redis-server
# started here (say "--auto-aof-rewrite-percentage 0"), as compare.sh does.
#
# METRICS_OUT=PREFIX writes each node's /metrics, as the run left them,
# to PREFIX.node1, PREFIX.node2, ... DELIVERY_EXTRA adds its lines to
# every node's [delivery] table (say 'body_cache = "256MiB"').
#
# PER_CONNECTION=N (accept and relay modes) sends N messages on each
# connection instead of one: each session runs `smtp-source -d -s 1 -m N`
# once per connection, as scripts/compare.sh does (MESSAGES is rounded
# down to whole connections).
#
# Both modes also print the acceptance latency from the nodes' metrics
# (smarthost_message_accept_seconds: from the final dot to the message
# being durable): the mean, p50 and p99 as bucket bounds, and how many
# messages took over 10 ms.
#
# SAMPLE=1 (relay mode) also prints each node's open outbound connections
# over the run, as slow mode does: how fast a backlog gets its connections.
#
# CPUS=0 (a taskset CPU list) pins the nodes to those cores, to measure
# how the throughput grows with cores; the load tools are not pinned.
#
# WEBHOOK=1 adds a delivery webhook for all mail, posted to a local HTTP
# endpoint (tests/peers/webhook_receiver.py): every message makes an
# `accepted` and, in relay mode, a `delivered` event, written to the outbox
# before the step each reports. In relay mode the run also waits until the
# endpoint has every event and reports how long after the last delivery.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-accept}
if [ "$mode" = slow ]; then
  domains=${2:-90}
  per_domain=${3:-10}
  delay=${4:-0.2}
  messages=$((domains * per_domain))
  sessions=$domains
  size=2048
else
  messages=${2:-20000}
  sessions=${3:-20}
  size=${4:-2048}
fi
case "$mode" in accept|relay|slow) ;; *) echo "usage: $0 accept|relay [MESSAGES] [SESSIONS] [SIZE], or $0 slow [DOMAINS] [PER_DOMAIN] [DELAY]" >&2; exit 2 ;; esac

. scripts/bench-lib.sh
need_postfix_tools
bin=$(smarthost_binary)
work=$(mktemp -d)
trap bench_cleanup EXIT

# Nothing leaves this machine: DNS goes to a loopback port where nothing
# answers; relay mode names its smart host.
delivery=""
if [ "$mode" = relay ]; then
  sink_port=$(free_port)
  start_sink "$sink_port" /dev/null
  delivery="smart_host = \"[127.0.0.1]:$sink_port\""
elif [ "$mode" = slow ]; then
  # smtp-sink waits whole seconds only: the aiosmtpd sink of the tests,
  # which also counts each domain's peak connections.
  sink_port=$(free_port)
  delay_ms=$(python3 -c "print(round($delay * 1000))")
  /usr/bin/python3 tests/peers/sink.py --listen "127.0.0.1:$sink_port" --dir "$work/sink" \
    --pipelining --no-store --data-delay-ms "$delay_ms" >"$work/sink.out" 2>"$work/sink.log" &
  pids+=($!)
  wait_port "$sink_port"
  node_connections=${NODE_CONNECTIONS:-6}
  domain_connections=${DOMAIN_CONNECTIONS:-100}
  delivery="smart_host = \"[127.0.0.1]:$sink_port\"
max_connections = $node_connections
max_connections_per_domain = $domain_connections
max_messages_per_connection = 20"
fi
webhook=""
if [ -n "${WEBHOOK:-}" ]; then
  hook_port=$(free_port)
  python3 tests/peers/webhook_receiver.py --listen "127.0.0.1:$hook_port" \
    --out "$work/posts.jsonl" >/dev/null &
  pids+=($!)
  wait_port "$hook_port"
  webhook="[[webhooks.endpoints]]
name = \"bench\"
url = \"http://127.0.0.1:$hook_port/events\"
secret = \"bench-webhook-secret-0123456789\""
fi
backend=${BACKEND:-local}
queue="path = \"$work/spool\""
case "$backend" in
  local) ;;
  redis)
    redis_port=$(free_port)
    start_redis "$redis_port"
    queue="backend = \"redis\"
redis_url = \"redis://127.0.0.1:$redis_port\"" ;;
  redis-cluster)
    start_redis_cluster 3
    queue="backend = \"redis\"
redis_cluster = true
redis_url = \"$cluster_url\"" ;;
  *) echo "BACKEND is local, redis or redis-cluster" >&2; exit 2 ;;
esac
nodes=${NODES:-1}
if [ "$nodes" -gt 1 ] && [ "$backend" = local ]; then
  echo "NODES=$nodes needs BACKEND=redis (nodes share the queue in Redis)" >&2
  exit 2
fi
[ -n "${DELIVERY_EXTRA:-}" ] && delivery="$delivery
$DELIVERY_EXTRA"
start_nodes "$bin" "$nodes" "$queue" "$delivery" "$webhook"
ports=("${node_ports[@]}")
if [ "$mode" = accept ]; then
  "$bin" queue suspend example.org --config "$work/node1.toml" >/dev/null
fi

monitors=()
[ "$backend" != local ] && calls_before=$(redis_calls) && redis_stats >"$work/stats-before" &&
  sent_before=$(python3 scripts/compare.py sent "${node_admins[@]}")
if [ -n "${REDIS_MONITOR:-}" ] && [ "$backend" != local ]; then
  for p in "${redis_ports[@]}"; do
    redis-cli -p "$p" monitor >"$work/monitor-$p.txt" &
    pids+=($!)
    monitors+=($!)
  done
fi

if [ "$mode" = slow ] || [ -n "${SAMPLE:-}" ]; then
  python3 scripts/compare.py sample "$work/open.txt" "${node_admins[@]}" &
  pids+=($!)
  sampler=$!
fi
cpu_before=$(python3 scripts/compare.py cpu "${node_pids[@]}")
start=$(date +%s.%N)
# What is sent: each node its equal share (slow mode sends every message).
[ "$mode" = slow ] || messages=$(( messages / nodes * nodes ))
sources=()
if [ "$mode" = slow ]; then
  # Each domain's messages round-robin over the nodes: node j gets its
  # share, one session per domain and node.
  for d in $(seq "$domains"); do
    for j in $(seq 0 $((nodes - 1))); do
      count=$(( per_domain / nodes + (j < per_domain % nodes ? 1 : 0) ))
      [ "$count" -gt 0 ] || continue
      target=${ports[$j]}
      [ -n "${SUBMIT_TO:-}" ] && target=${ports[$((SUBMIT_TO - 1))]}
      /usr/sbin/smtp-source -s 1 -m "$count" -l "$size" -f app@example.com \
        -t "user@d$d.bench.test" "127.0.0.1:$target" &
      sources+=($!)
    done
  done
elif [ "${PER_CONNECTION:-1}" -gt 1 ]; then
  start_senders_per_connection "$size" "$PER_CONNECTION" "$((messages / PER_CONNECTION))" \
    "$sessions" "" "${ports[@]}"
  sources=("${sender_pids[@]}")
  messages=$sender_messages
else
  for node_port in "${ports[@]}"; do
    /usr/sbin/smtp-source -s "$((sessions / nodes))" -m "$((messages / nodes))" -l "$size" \
      -f app@example.com -t user@example.org "127.0.0.1:$node_port" &
    sources+=($!)
  done
fi
for source in "${sources[@]}"; do wait "$source"; done
accepted=$(date +%s.%N)
end=$accepted
if [ "$mode" != accept ]; then
  deadline=$((SECONDS + 600))
  delivered() { cat "$work"/delivery-*.log 2>/dev/null | grep -c '"outcome":"delivered"' || true; }
  while [ "$(delivered)" -lt "$messages" ]; do
    if [ $SECONDS -gt $deadline ]; then echo "not all messages delivered within 600 s" >&2; exit 1; fi
    sleep 0.05
  done
  end=$(date +%s.%N)
fi
hooked=""
if [ -n "$webhook" ] && [ "$mode" = relay ]; then
  # Each event's "event" key, as it appears in the kept (JSON-quoted) body.
  events() { grep -o '\\"event\\":' "$work/posts.jsonl" 2>/dev/null | wc -l; }
  deadline=$((SECONDS + 600))
  while [ "$(events)" -lt $(( messages * 2 )) ]; do
    if [ $SECONDS -gt $deadline ]; then echo "not all webhook events posted within 600 s" >&2; exit 1; fi
    sleep 0.5
  done
  hooked=$(python3 -c "import time; print(f'{time.time() - $end:.2f}')")
fi
if [ -n "${METRICS_OUT:-}" ]; then
  for i in "${!node_admins[@]}"; do
    curl -s "http://127.0.0.1:${node_admins[$i]}/metrics" >"$METRICS_OUT.node$((i + 1))"
  done
fi
calls=""
if [ "$backend" != local ]; then
  calls=$(( $(redis_calls) - calls_before ))
  sent=$(python3 scripts/compare.py sent "${node_admins[@]}")
  python3 -c "print(f'  Redis commands the nodes sent (smarthost_redis_commands_total): {($sent - $sent_before) / $messages:.2f} per message')" >&2
  redis_stats >"$work/stats-after"
  if [ -n "${REDIS_MONITOR:-}" ]; then
    kill "${monitors[@]}" 2>/dev/null || true
    python3 - "$messages" "$work"/monitor-*.txt <<'PY' >&2
import collections, re, sys
n = int(sys.argv[1])
sent, scripted = collections.Counter(), collections.Counter()
for path in sys.argv[2:]:
    for line in open(path, errors="replace"):
        m = re.match(r'[\d.]+ \[\d+ ([^\]]+)\] "([^"]+)"', line)
        if not m or m.group(2).lower() in ("info", "monitor"):
            continue
        (scripted if m.group(1) == "lua" else sent)[m.group(2).lower()] += 1
print(f"  Redis commands sent by the nodes: {sum(sent.values()) / n:.2f} per message: " +
      ", ".join(f"{k} {c / n:.2f}" for k, c in sent.most_common() if c / n >= 0.01))
print(f"  and run by their scripts: {sum(scripted.values()) / n:.2f} per message")
PY
  fi
  # Per command, per message: what the clients sent (calls from scripts
  # are counted under their own names too, so they are shown apart).
  python3 - "$work/stats-before" "$work/stats-after" "$messages" <<'PY' >&2
import sys
def load(path):
    out = {}
    for line in open(path):
        name, calls = line.split()
        out[name] = out.get(name, 0) + int(calls)
    return out
before, after, n = load(sys.argv[1]), load(sys.argv[2]), int(sys.argv[3])
diff = sorted(((after[k] - before.get(k, 0), k) for k in after), reverse=True)
print("  Redis commands per message, by name: " + ", ".join(
    f"{k} {c / n:.2f}" for c, k in diff if c > 0))
PY
fi
cpu=$(python3 -c "print($(python3 scripts/compare.py cpu "${node_pids[@]}") - $cpu_before)")
hwm=$(python3 scripts/compare.py hwm "${node_pids[@]}")
python3 - "$mode" "$start" "$accepted" "$end" "$messages" "$sessions" "$size" "$backend" "$calls" "$nodes" "$hooked" "$cpu" "$hwm" <<'PY'
import os
import sys
nodes = int(sys.argv[10])
hooked = sys.argv[11]
cpu = float(sys.argv[12])
hwm = int(sys.argv[13])
mode, start, accepted, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
n, s, size, backend, calls = int(sys.argv[5]), sys.argv[6], sys.argv[7], sys.argv[8], sys.argv[9]
per = int(os.environ.get("PER_CONNECTION") or 1)
print(f"{mode} ({backend} backend, {nodes} node{'s' if nodes > 1 else ''}): {n} messages of {size} bytes, {s} parallel sessions"
      + (f", {per} per connection" if per > 1 and mode != "slow" else ""))
if calls:
    print(f"  Redis commands: {int(calls)} in all, {int(calls) / n:.1f} per message")
print(f"  accepted in {accepted - start:.2f} s: {n / (accepted - start):.0f} messages/s")
if mode != "accept":
    print(f"  delivered in {end - start:.2f} s: {n / (end - start):.0f} messages/s end to end")
print(f"  smarthost CPU: {cpu:.2f} s, {cpu / n * 1000:.3f} s per 1,000 messages")
print(f"  smarthost peak RSS: {hwm / 1024:.0f} MiB{' (the largest node)' if nodes > 1 else ''}")
if hooked:
    print(f"  webhook: all {2 * n} events (accepted, delivered) at the endpoint {hooked} s after the last delivery")
PY
[ "$mode" = slow ] || python3 scripts/compare.py accept "${node_admins[@]}"
if [ "$mode" = relay ] && [ -n "${SAMPLE:-}" ]; then
  kill "$sampler" 2>/dev/null || true
  # Against the one domain's connection cap (max_connections_per_domain).
  python3 scripts/compare.py timeline "$work/open.txt" "$start" "$end" 100
fi
if [ "$mode" = slow ]; then
  kill "$sampler" 2>/dev/null || true
  # The ideal: every connection busy, a message per DELAY each, as far as
  # the domains' caps allow that many connections.
  per_node=()
  for n in $(seq "$nodes"); do
    per_node+=("$(grep -c '"outcome":"delivered"' "$work/delivery-$n.log" || true)")
  done
  python3 - "$start" "$end" "$messages" "$nodes" "$node_connections" "$domains" \
    "$domain_connections" "$delay" "$work/sink/stats.json" "${node_admins[*]}" "${per_node[@]}" <<'PY'
import json, re, sys, urllib.request
start, end = float(sys.argv[1]), float(sys.argv[2])
n, nodes, conns, domains, cap = (int(a) for a in sys.argv[3:8])
delay = float(sys.argv[8])
stats = json.load(open(sys.argv[9]))
connections = min(nodes * conns, domains * cap)
ideal = connections / delay
rate = n / (end - start)
print(f"  slow receiver: {domains} domains, {delay} s per message, {conns} connections a node, "
      f"{cap} a domain: ideal {ideal:.1f} messages/s ({connections} connections)")
print(f"  {rate:.1f} messages/s, {rate / ideal:.2f} of the ideal; delivered by each node: "
      + ", ".join(sys.argv[11:]))
# Each node's takes for new connections (its /metrics).
for i, port in enumerate(sys.argv[10].split(), 1):
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    def value(pattern):
        m = re.search(pattern + r" ([0-9.e+]+)", page)
        return float(m.group(1)) if m else 0.0
    work = value(r'smarthost_delivery_takes_total\{result="work"\}')
    empty = value(r'smarthost_delivery_takes_total\{result="empty"\}')
    total = value(r"smarthost_delivery_messages_per_connection_sum")
    def mean(name, labels=""):
        count = value(name + "_count" + labels)
        return value(name + "_sum" + labels) / count if count else 0.0
    attempt = mean("smarthost_delivery_attempt_seconds")
    redis = mean("smarthost_redis_request_seconds", r'\{component="schedule"\}')
    print(f"  node {i}: {work:.0f} takes with work ({total / work if work else 0:.1f} messages each), "
          f"{empty:.0f} empty; an attempt {attempt * 1000:.0f} ms, "
          f"a schedule round trip {redis * 1000:.1f} ms on average")
by_domain = stats["peak_concurrent_by_domain"]
print(f"  at the receiver: {stats['peak_concurrent']} connections at most at once "
      f"(of {nodes * conns}), {max(by_domain.values(), default=0)} for one domain at most "
      f"(cap {cap}), {stats['connections_total']} connections in all")
PY
  python3 scripts/compare.py timeline "$work/open.txt" "$start" "$end" "$node_connections"
  # How the domains were spread over the nodes: by how many nodes
  # delivered to each.
  python3 - "$work"/delivery-*.log <<'PY'
import collections, json, sys
served = collections.defaultdict(set)
for node, path in enumerate(sys.argv[1:]):
    for line in open(path):
        entry = json.loads(line)
        if entry.get("outcome") == "delivered":
            served[entry["domain"]].add(node)
spread = collections.Counter(len(nodes) for nodes in served.values())
print("  domains delivered to by: " + ", ".join(
    f"{k} node{'s' if k > 1 else ''} {spread[k]}" for k in sorted(spread)))
PY
fi
