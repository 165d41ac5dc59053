#!/usr/bin/env bash
# The queue at scale: fills a queue with N messages over DOMAINS domains
# and times every queue operation at several queue sizes, then a node's
# start-up against the full queue, and on the local spool the stores made
# while a sparse segment is compacted (node/examples/scale_bench.rs).
#
#   scripts/scale.sh [N] [DOMAINS] [CHECKPOINTS]
#
# Defaults: 1000000 messages, 50000 domains, checkpoints 10000,100000,N.
# BACKEND=local, BACKEND=redis or BACKEND=both (the default). The Redis
# backend runs on a redis-server started here on a free port with
# appendonly yes and appendfsync always (as bench.sh); the local spool
# lives in a temporary directory (SCALE_DIR to put it elsewhere). Release
# build; every run starts from an empty queue.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000000}
domains=${2:-50000}
checkpoints=${3:-10000,100000,$n}
backend=${BACKEND:-both}
case "$backend" in local|redis|both) ;; *) echo "BACKEND is local, redis or both" >&2; exit 2 ;; esac

cargo build --release -p smarthost-node --example scale_bench --quiet
bin=${CARGO_TARGET_DIR:-target}/release/examples/scale_bench
work=$(mktemp -d "${SCALE_DIR:-${TMPDIR:-/tmp}}/scale.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

echo "machine: $(nproc) vCPU, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), $(uname -sr)"
if [ "$backend" != redis ]; then
  echo "== local spool"
  /usr/bin/time -f "fill: %e s, max RSS %M KiB" "$bin" fill local "$work/spool" "$n" "$domains" "$checkpoints"
  du -sh "$work/spool" | awk '{ print "spool on disk: " $1 }'
  /usr/bin/time -f "start process: %e s, max RSS %M KiB" "$bin" start local "$work/spool"
  rm -rf "$work/spool"
  # Stores timed while a sparse segment is compacted, next to N queued.
  "$bin" compact "$work/compact" "$n" 2>&1 | grep -E '^(compact at|removed)|compacted journal'
  rm -rf "$work/compact"
fi
if [ "$backend" != local ]; then
  echo "== redis"
  port=$(free_port)
  mkdir -p "$work/redis"
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly yes \
    --appendfsync always --dir "$work/redis" --daemonize no >"$work/redis/log" 2>&1 &
  pids+=($!)
  redis_pid=$!
  for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  url="redis://127.0.0.1:$port"
  /usr/bin/time -f "fill: %e s, max RSS %M KiB" "$bin" fill redis "$url" "$n" "$domains" "$checkpoints"
  redis-cli -p "$port" info memory | grep -E '^(used_memory|used_memory_rss):' | tr -d '\r'
  redis-cli -p "$port" dbsize | awk '{ print "keys: " $1 }'
  grep VmRSS "/proc/$redis_pid/status" | awk '{ printf "redis-server VmRSS: %.0f MiB\n", $2 / 1024 }'
  /usr/bin/time -f "start process: %e s, max RSS %M KiB" "$bin" start redis "$url"
fi
