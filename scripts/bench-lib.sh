# shellcheck shell=bash
# Shell functions the benchmark scripts share (scripts/bench.sh,
# scripts/compare.sh); source it from the repository root.
#
# The caller sets `work` to a temporary directory of its own. Every process
# started here is kept in the array `pids`; stop_pid ends one of them,
# bench_cleanup (for the caller's EXIT trap) ends the rest and removes
# `work`. Ports are free loopback ports; nothing listens beyond 127.0.0.1.

pids=()
redis_ports=()
node_ports=()
node_admins=()
node_pids=()

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() { # PORT: until something accepts on it, at most 10 s
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  return 1
}

# Ends one process this script started (and the children of a subshell),
# politely first, and forgets its id so that a recycled id is never hit.
stop_pid() { # PID
  local pid=$1 kept=() p
  if kill -0 "$pid" 2>/dev/null; then
    pkill -TERM -P "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  for p in "${pids[@]}"; do [ "$p" = "$pid" ] || kept+=("$p"); done
  pids=("${kept[@]}")
}

bench_cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    pkill -KILL -P "$pid" 2>/dev/null || true
    kill "$pid" 2>/dev/null || true
  done
  pids=()
  if [ -n "${work:-}" ]; then rm -rf "$work"; fi
}

# Installs the named Debian packages. The packages may ship services
# (postfix does); none is started during the install (policy-rc.d answers
# 101, "action forbidden"), and a policy-rc.d already there is put back.
install_debian() { # PACKAGE...
  local sudo="" policy=/usr/sbin/policy-rc.d saved="" status=0 apt_log
  apt_log=$(mktemp)
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing $* (Debian packages)" >&2
  if [ -e "$policy" ]; then
    saved=$(mktemp)
    $sudo cp -p "$policy" "$saved"
  fi
  printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
  $sudo chmod 755 "$policy"
  { $sudo apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
      -o DPkg::Lock::Timeout=300 "$@"; } >"$apt_log" 2>&1 || status=$?
  [ "$status" -eq 0 ] || cat "$apt_log" >&2
  rm -f "$apt_log"
  if [ -n "$saved" ]; then $sudo mv "$saved" "$policy"; else $sudo rm -f "$policy"; fi
  return "$status"
}

# smtp-source and smtp-sink come with Postfix; installed when missing, with
# no configuration and its service kept from starting.
need_postfix_tools() {
  [ -x /usr/sbin/smtp-source ] && [ -x /usr/sbin/smtp-sink ] && return 0
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  install_debian postfix
}

# The binary under test: SMARTHOST_BIN runs another build (say, of an older
# commit); otherwise the release build is made (or brought up to date).
smarthost_binary() {
  if [ -n "${SMARTHOST_BIN:-}" ]; then
    echo "$SMARTHOST_BIN"
    return
  fi
  cargo build --release --bin smarthost --quiet >&2
  echo "${CARGO_TARGET_DIR:-target}/release/smarthost"
}

start_sink() { # PORT OUTPUT [OPTIONS]: Postfix's smtp-sink, counters (-c) to OUTPUT; sets sink_pid
  /usr/sbin/smtp-sink -u nobody -c -m 1000 "${@:3}" "127.0.0.1:$1" 1000 >"$2" 2>&1 &
  pids+=($!)
  # shellcheck disable=SC2034 # the caller's to stop
  sink_pid=$!
  wait_port "$1"
}

# REDIS_ARGS in the environment adds options to every server, after EXTRA
# ARGS.
start_redis() { # PORT [EXTRA ARGS]: a redis-server with an fsync per write; sets redis_pid
  local dir="$work/redis-$1"
  mkdir -p "$dir"
  redis-server --port "$1" --bind 127.0.0.1 --save "" --appendonly yes \
    --appendfsync always --dir "$dir" --daemonize no "${@:2}" ${REDIS_ARGS:-} >"$dir/log" 2>&1 &
  pids+=($!)
  # shellcheck disable=SC2034 # the caller's to measure and stop
  redis_pid=$!
  redis_ports+=("$1")
  wait_port "$1"
}

# A Redis Cluster of COUNT primaries and no replicas, each started as
# start_redis does; sets redis_pids (every server) and cluster_url (the
# seeds, as queue.redis_url takes them).
start_redis_cluster() { # COUNT
  local p ok seeds=()
  redis_pids=()
  for _ in $(seq "$1"); do
    p=$(free_port)
    start_redis "$p" --cluster-enabled yes --cluster-config-file nodes.conf \
      --cluster-port "$(free_port)"
    redis_pids+=("$redis_pid")
    seeds+=("127.0.0.1:$p")
  done
  redis-cli --cluster create "${seeds[@]}" --cluster-replicas 0 --cluster-yes >"$work/cluster-create.log"
  for _ in $(seq 100); do
    ok=0
    for p in "${seeds[@]}"; do
      redis-cli -p "${p#*:}" cluster info | grep -q 'cluster_state:ok' && ok=$((ok + 1))
    done
    [ "$ok" = "$1" ] && break
    sleep 0.1
  done
  cluster_url=$(printf 'redis://%s,' "${seeds[@]}")
  # shellcheck disable=SC2034 # the caller's, for its configuration
  cluster_url=${cluster_url%,}
}

redis_calls() { # every command on every server started here, the INFO calls left out
  local p
  for p in "${redis_ports[@]}"; do redis-cli -p "$p" info commandstats; done |
    awk -F'[=,:]' '/^cmdstat_/ && $1 != "cmdstat_info" { sum += $3 } END { print sum + 0 }'
}

redis_stats() { # NAME CALLS per line, summed over the servers started here
  local p
  for p in "${redis_ports[@]}"; do redis-cli -p "$p" info commandstats; done |
    awk -F'[=,:]' '/^cmdstat_/ && $1 != "cmdstat_info" { sub("cmdstat_", "", $1); print $1, $3 }'
}

# Starts SESSIONS senders in the background that together open CONNECTIONS
# connections of PER messages of SIZE bytes each: each sender runs
# `smtp-source -d -s 1 -m PER` once per connection (-d alone would keep one
# connection per session for the whole run), sender i to PORTS[i % count].
# AFTER (a command, or "") runs in each sender's shell once its connections
# are done, given the sender's number; a failed smtp-source ends its sender
# with 1. Sets sender_pids and sender_messages (what they send in all).
start_senders_per_connection() { # SIZE PER CONNECTIONS SESSIONS AFTER PORT...
  local size=$1 per=$2 connections=$3 sessions=$4 after=$5 i count
  shift 5
  local ports=("$@")
  sender_pids=()
  sender_messages=0
  for i in $(seq 0 $((sessions - 1))); do
    count=$((connections / sessions + (i < connections % sessions ? 1 : 0)))
    [ "$count" -gt 0 ] || continue
    (
      for _ in $(seq "$count"); do
        /usr/sbin/smtp-source -d -s 1 -m "$per" -l "$size" -f app@example.com \
          -t user@example.org "127.0.0.1:${ports[$((i % ${#ports[@]}))]}" || exit 1
      done
      if [ -n "$after" ]; then "$after" "$i"; fi
    ) &
    sender_pids+=($!)
    sender_messages=$((sender_messages + count * per))
  done
}

# Starts COUNT nodes of BINARY, each with its own SMTP and admin port, on
# the queue QUEUE (the body of [queue]); DELIVERY is added to [delivery]
# (say, a smart_host) and EXTRA after it (whole tables). Node n writes its
# delivery log to $work/delivery-n.log. DNS goes to a loopback port where
# nothing answers, so nothing leaves this machine. CPUS (a taskset CPU
# list, e.g. 0 or 0,1) pins the nodes to those cores. Sets node_ports,
# node_admins and node_pids.
start_nodes() { # BINARY COUNT QUEUE DELIVERY [EXTRA]
  local bin=$1 count=$2 queue=$3 delivery=$4 extra=${5:-} n dns
  dns=$(free_port)
  node_ports=()
  node_admins=()
  node_pids=()
  for n in $(seq "$count"); do
    node_ports+=("$(free_port)")
    node_admins+=("$(free_port)")
    cat >"$work/node$n.toml" <<TOML
[node]
id = "node-$n"
hostname = "bench.test"
[smtp]
listen = ["127.0.0.1:${node_ports[$((n - 1))]}"]
max_connections = 1000
max_connections_per_ip = 1000
[queue]
$queue
[admin]
listen = "127.0.0.1:${node_admins[$((n - 1))]}"
[log]
level = "warn"
[delivery]
dns_servers = ["127.0.0.1:$dns"]
log_file = "$work/delivery-$n.log"
$delivery
$extra
TOML
    local pin=()
    [ -n "${CPUS:-}" ] && pin=(taskset -c "$CPUS")
    "${pin[@]}" "$bin" run --config "$work/node$n.toml" >"$work/node$n.log" 2>&1 &
    pids+=($!)
    node_pids+=($!)
  done
  for n in $(seq "$count"); do
    wait_port "${node_ports[$((n - 1))]}" || { cat "$work/node$n.log" >&2; return 1; }
  done
}
