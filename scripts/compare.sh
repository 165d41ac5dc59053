#!/usr/bin/env bash
# Measures smarthost beside its anchors, in one run on this machine:
#
#   direct     Postfix's smtp-source straight into smtp-sink: the machine's
#              limit, no relay in between;
#   postfix    Postfix 3.7 as a loopback relay to that sink: an instance of
#              its own (config and queue in a temporary directory, started
#              with `postfix -c DIR start`, stopped at exit), relayhost
#              [127.0.0.1]:SINK, mynetworks 127.0.0.0/8, no local delivery,
#              fsync as shipped;
#   smarthost  one node on the local spool;
#   redis      one node on one redis-server (appendonly yes, appendfsync
#              always), as `BACKEND=redis scripts/bench.sh`;
#   redis3     three nodes on that Redis, the sessions spread over them;
#   cluster    one node on a Redis Cluster of three primaries (no replicas,
#              each as that Redis), as `BACKEND=redis-cluster
#              scripts/bench.sh`; only when SYSTEMS names it.
#
#   scripts/compare.sh
#
# Every cell of the matrix runs every system, one after the other, each
# from a fresh start (sink, relay, queue, Redis): message size 2 KB and
# 100 KB, 20 and 200 parallel sessions, one message per connection (a new
# connection each) and 20 per connection (`smtp-source -d -m 20`, run again
# for each connection of a session). The default takes about six minutes on
# 2 cores; QUICK=1 runs a small matrix (2 KB, 20 sessions, 1000 messages).
#
# Per run: messages/s from the first message sent to the last one received
# by smtp-sink (its -c counters), as a ratio to Postfix and to direct in the
# same cell; acceptance alone (until smtp-source is done); CPU seconds per
# 1 000 messages of the relay (utime + stime from /proc; Postfix's master
# and all its daemons), of redis-server (with the children that rewrite
# its AOF) and of the load tools (smtp-source and smtp-sink, which share
# the machine), and how many cores all of them kept busy on average; the
# smarthost nodes' peak RSS (VmHWM); Redis commands per message, those the
# nodes sent (their smarthost_redis_commands_total, a script call once) and
# those redis-server ran (INFO commandstats, the commands its scripts run
# included); acceptance
# latency p50/p99 from the nodes' smarthost_message_accept_seconds
# histogram (bucket upper bounds, so bucket resolution).
#
# The table goes to stdout (Markdown); compare.json and compare.csv to OUT
# (default ./compare-results). With OUT given, a plot of throughput against
# sessions, OUT/compare.png (python3-matplotlib, installed if missing).
#
# ROUNDS=N runs the whole matrix N times over, each round after the one
# before, so that a slow spell of the machine falls on every system of a
# round alike. The report then gives, per cell and system, the run with
# the median messages/s, the medians of the rounds' own ratios to Postfix
# and to direct (each against the anchors of its round), and the lowest
# and highest messages/s; compare.json keeps every run.
#
# Other knobs: SYSTEMS (say "postfix smarthost"), SIZES, SESSIONS,
# PER_CONNECTION, MESSAGES_SMALL (default 5000, messages under 10 KB),
# MESSAGES_LARGE (default 4000), CELL_TIMEOUT (seconds, default 300),
# SMARTHOST_BIN (another build), REDIS_ARGS (options for redis-server).
# Needs postfix, redis-server and redis-cli (installed from Debian when
# missing, no service started).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh

if [ -n "${QUICK:-}" ]; then
  sizes=${SIZES:-2048}
  sessions_list=${SESSIONS:-20}
  per_list=${PER_CONNECTION:-"1 20"}
  small=${MESSAGES_SMALL:-1000}
  large=${MESSAGES_LARGE:-1000}
else
  sizes=${SIZES:-"2048 102400"}
  sessions_list=${SESSIONS:-"20 200"}
  per_list=${PER_CONNECTION:-"1 20"}
  small=${MESSAGES_SMALL:-5000}
  large=${MESSAGES_LARGE:-4000}
fi
systems=${SYSTEMS:-"direct postfix smarthost redis redis3"}
rounds=${ROUNDS:-1}
case "$rounds" in
  [1-9]|[1-9][0-9]) ;;
  *) echo "ROUNDS is a count of rounds (1 to 99), not $rounds" >&2; exit 2 ;;
esac
cell_timeout=${CELL_TIMEOUT:-300}
out=${OUT:-compare-results}
for s in $systems; do
  case "$s" in direct|postfix|smarthost|redis|redis3|cluster) ;;
    *) echo "SYSTEMS names direct, postfix, smarthost, redis, redis3 or cluster, not $s" >&2; exit 2 ;;
  esac
done

need_postfix_tools
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
# Debian's matplotlib imports only under the system interpreter.
py=/usr/bin/python3
[ -x "$py" ] || py=python3
if [ -n "${OUT:-}" ] && ! "$py" -c 'import matplotlib' 2>/dev/null; then
  missing+=(python3-matplotlib)
fi
if ((${#missing[@]})); then install_debian "${missing[@]}"; fi
bin=$(smarthost_binary)

work=$(mktemp -d)
# Postfix's daemons drop to the postfix user inside the queue below.
chmod 755 "$work"
results="$work/results.jsonl"
pf_master=""
cleanup() {
  postfix_stop
  bench_cleanup
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A Postfix instance of its own, relaying to the sink on SINK_PORT; its
# SMTP service listens on pf_port. The shipped master.cf with no chroot
# (the queue is a temporary directory) and smtpd's process limit raised to
# 250 so that 200 sessions are served at once (the shipped limit is 100;
# smarthost runs with max_connections 1000 here).
postfix_start() { # SINK_PORT
  pf=$work/postfix
  rm -rf "$pf"
  mkdir -p "$pf/etc" "$pf/queue" "$pf/data"
  chown postfix "$pf/data"
  pf_port=$(free_port)
  awk -v port="$pf_port" '
    /^[^#[:space:]]/ && NF >= 8 {
      if ($1 == "smtp" && $2 == "inet") { $1 = "127.0.0.1:" port; $7 = 250 }
      $5 = "n"
    }
    { print }' /etc/postfix/master.cf >"$pf/etc/master.cf"
  cat >"$pf/etc/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $pf/queue
data_directory = $pf/data
maillog_file = $pf/maillog
maillog_file_prefixes = $pf
myhostname = bench.test
mydomain = bench.test
myorigin = \$myhostname
mydestination =
local_recipient_maps =
local_transport = error:local delivery is off
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:$1
biff = no
CF
  if ! postfix -c "$pf/etc" start >"$pf/start.log" 2>&1 || ! wait_port "$pf_port"; then
    cat "$pf/start.log" "$pf/maillog" >&2 2>/dev/null
    return 1
  fi
  pf_master=$(tr -d ' ' <"$pf/queue/pid/master.pid")
}

postfix_stop() {
  [ -n "$pf_master" ] || return 0
  postfix -c "$pf/etc" stop >/dev/null 2>&1 || true
  for _ in $(seq 100); do
    kill -0 "$pf_master" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pf_master" 2>/dev/null; then
    postfix -c "$pf/etc" abort >/dev/null 2>&1 || true
    sleep 1
    kill -KILL "$pf_master" 2>/dev/null || true
  fi
  pf_master=""
}

# In a sender's subshell, once its smtp-source runs are done: the CPU they
# used (bash's `times`: the shell's line, then its children's), to
# $work/load-cpu.N. Not through a pipe, which would run `times` in a
# process of its own, without those children.
load_cpu() { # N
  times >"$work/load-cpu.$1"
}

# Sends MESSAGES messages of SIZE bytes over SESSIONS parallel sessions,
# PER messages per connection, to the PORTS (sessions spread over them in
# turn). One message per connection is smtp-source's own mode; for more,
# each session runs `smtp-source -d -s 1 -m PER` once per connection, as
# -d alone would keep one connection per session for the whole run. Sets
# load_pids, load_messages and load_connections.
drive_load() { # SIZE SESSIONS PER MESSAGES PORT...
  local size=$1 sessions=$2 per=$3 messages=$4 n i s m before=0
  shift 4
  local ports=("$@")
  n=${#ports[@]}
  load_pids=()
  load_messages=0
  if [ "$per" -le 1 ]; then
    for i in $(seq 0 $((n - 1))); do
      s=$((sessions / n + (i < sessions % n ? 1 : 0)))
      m=$(((before + s) * messages / sessions - before * messages / sessions))
      before=$((before + s))
      if [ "$s" -eq 0 ] || [ "$m" -eq 0 ]; then continue; fi
      (
        /usr/sbin/smtp-source -s "$s" -m "$m" -l "$size" -f app@example.com \
          -t user@example.org "127.0.0.1:${ports[$i]}" || exit 1
        load_cpu "$i"
      ) 2>>"$work/source.err" &
      pids+=($!)
      load_pids+=($!)
      load_messages=$((load_messages + m))
    done
    load_connections=$load_messages
    return
  fi
  load_connections=$((messages / per))
  start_senders_per_connection "$size" "$per" "$load_connections" "$sessions" load_cpu \
    "${ports[@]}" 2>>"$work/source.err"
  pids+=("${sender_pids[@]}")
  load_pids=("${sender_pids[@]}")
  load_messages=$sender_messages
}

# Waits for the load, at most SECONDS; a watchdog ends what is left after
# that (only processes that are still this shell's children). Sets
# load_done to the moment the last sender finished; returns 1 when a
# sender failed or had to be ended.
wait_load() { # SECONDS
  local pid failed=0 watchdog
  (
    sleep "$1"
    for pid in "${load_pids[@]}"; do
      if [ "$(ps -o ppid= -p "$pid" 2>/dev/null | tr -d ' ')" = "$$" ]; then
        pkill -P "$pid" 2>/dev/null
        kill "$pid" 2>/dev/null
      fi
    done
  ) 2>/dev/null &
  watchdog=$!
  pids+=("$watchdog")
  for pid in "${load_pids[@]}"; do wait "$pid" || failed=1; done
  load_done=$(now)
  stop_pid "$watchdog"
  for pid in "${load_pids[@]}"; do stop_pid "$pid"; done
  return "$failed"
}

now() { date +%s.%N; }

# One system in one cell, from a fresh start; appends its figures to
# $results.
run_one() { # SYSTEM SIZE SESSIONS PER MESSAGES
  local system=$1 size=$2 sessions=$3 per=$4 messages=$5
  local sink_port targets=() relay=() queue redis_port="" nodes=0 status=ok
  local start accepted="" end="" cpu0="" cpu1="" rcpu0="" rcpu1="" calls0="" calls1=""
  local sent0="" sent1=""
  local rss="" delivered="" hist0="" hist1="" waiter pid tools_cpu
  rm -rf "$work/spool" "$work"/redis-* "$work"/delivery-*.log "$work/sink.out" "$work"/load-cpu.*
  redis_ports=()
  sink_port=$(free_port)
  start_sink "$sink_port" "$work/sink.out"
  case "$system" in
    direct) targets=("$sink_port") ;;
    postfix)
      postfix_start "$sink_port"
      targets=("$pf_port") ;;
    smarthost | redis | redis3 | cluster)
      nodes=1
      if [ "$system" = smarthost ]; then
        queue="path = \"$work/spool\""
      elif [ "$system" = cluster ]; then
        start_redis_cluster 3
        redis_port=${redis_ports[0]}
        queue="backend = \"redis\"
redis_cluster = true
redis_url = \"$cluster_url\""
      else
        redis_port=$(free_port)
        start_redis "$redis_port"
        redis_pids=("$redis_pid")
        queue="backend = \"redis\"
redis_url = \"redis://127.0.0.1:$redis_port\""
        [ "$system" = redis3 ] && nodes=3
      fi
      start_nodes "$bin" "$nodes" "$queue" "smart_host = \"[127.0.0.1]:$sink_port\""
      targets=("${node_ports[@]}")
      relay=("${node_pids[@]}")
      hist0="$work/hist0.json"
      "$py" scripts/compare.py hist "${node_admins[@]}" >"$hist0" ;;
  esac
  [ -n "$redis_port" ] && calls0=$(redis_calls) && rcpu0=$("$py" scripts/compare.py cpu --children "${redis_pids[@]}") &&
    sent0=$("$py" scripts/compare.py sent "${node_admins[@]}")
  if [ "$system" = postfix ]; then
    cpu0=$("$py" scripts/compare.py cpu --children "$pf_master")
  elif ((${#relay[@]})); then
    cpu0=$("$py" scripts/compare.py cpu "${relay[@]}")
  fi

  : >"$work/source.err"
  start=$(now)
  drive_load "$size" "$sessions" "$per" "$messages" "${targets[@]}"
  "$py" scripts/compare.py wait-sink "$work/sink.out" "$load_messages" "$cell_timeout" \
    >"$work/end" 2>"$work/wait.err" &
  waiter=$!
  pids+=("$waiter")
  if wait_load "$cell_timeout"; then
    accepted=$load_done
    if wait "$waiter"; then end=$(cat "$work/end"); else status=timeout; fi
  elif python3 -c "import sys; sys.exit($load_done - $start < $cell_timeout)"; then
    status=timeout
    echo "  the senders did not finish within $cell_timeout s" >&2
  else
    status=failed
    sed -n 1,3p "$work/source.err" >&2
  fi
  stop_pid "$waiter"
  [ "$status" = timeout ] && cat "$work/wait.err" >&2

  if [ "$system" = postfix ]; then
    cpu1=$("$py" scripts/compare.py cpu --children "$pf_master")
  elif ((${#relay[@]})); then
    cpu1=$("$py" scripts/compare.py cpu "${relay[@]}")
    rss=$("$py" scripts/compare.py hwm "${relay[@]}")
    hist1="$work/hist1.json"
    "$py" scripts/compare.py hist "${node_admins[@]}" >"$hist1"
  fi
  [ -n "$redis_port" ] && calls1=$(redis_calls) && rcpu1=$("$py" scripts/compare.py cpu --children "${redis_pids[@]}") &&
    sent1=$("$py" scripts/compare.py sent "${node_admins[@]}")
  tools_cpu=$("$py" scripts/compare.py load-cpu "$sink_pid" "$work"/load-cpu.*)

  [ "$system" = postfix ] && postfix_stop
  for pid in "${relay[@]}"; do stop_pid "$pid"; done
  if [ -n "$redis_port" ]; then for pid in "${redis_pids[@]}"; do stop_pid "$pid"; done; fi
  stop_pid "$sink_pid"
  # What the relay itself logged as delivered: a check on the sink's count.
  if [ "$system" = postfix ]; then
    delivered=$(grep -c 'status=sent' "$pf/maillog" 2>/dev/null || true)
  elif ((${#relay[@]})); then
    delivered=$(cat "$work"/delivery-*.log 2>/dev/null | grep -c '"outcome":"delivered"' || true)
  fi

  "$py" scripts/compare.py record "$results" round="$round" system="$system" size="$size" \
    sessions="$sessions" per_connection="$per" messages="$load_messages" \
    connections="$load_connections" status="$status" start="$start" \
    accepted="$accepted" end="$end" \
    cpu_relay="$([ -n "$cpu1" ] && python3 -c "print($cpu1 - $cpu0)")" \
    cpu_redis="$([ -n "$rcpu1" ] && python3 -c "print($rcpu1 - $rcpu0)")" \
    redis_calls="$([ -n "$calls1" ] && echo $((calls1 - calls0)))" cpu_tools="$tools_cpu" \
    redis_sent="$([ -n "$sent1" ] && echo $((sent1 - sent0)))" \
    rss_kib="$rss" delivered_logged="$delivered" hist_before="$hist0" hist_after="$hist1"
  if [ -n "$end" ]; then
    printf '  %-9s %6d msgs: %s msg/s\n' "$system" "$load_messages" \
      "$(python3 -c "print(round($load_messages / ($end - $start)))")" >&2
  else
    printf '  %-9s %6d msgs: %s\n' "$system" "$load_messages" "$status" >&2
  fi
}

cpu_model=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
echo "machine: $(nproc) CPUs, ${cpu_model:-unknown CPU}, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), $(uname -r)" >&2
echo "commit $commit; postfix $(postconf -dh mail_version 2>/dev/null); $(redis-server --version | awk '{ print $1, $3 }')" >&2
command="scripts/compare.sh"
for v in SYSTEMS SIZES SESSIONS PER_CONNECTION MESSAGES_LARGE MESSAGES_SMALL OUT QUICK REDIS_ARGS ROUNDS; do
  case "${!v:-}" in
    "") ;;
    *" "*) command="$v=\"${!v}\" $command" ;;
    *) command="$v=${!v} $command" ;;
  esac
done
echo "command: $command" >&2
"$py" - "$results.meta" "$(nproc)" "$cpu_model" "$commit" "$command" <<'PY'
import json, sys, time
path, nproc, cpu, commit, command = sys.argv[1:]
json.dump({"nproc": int(nproc), "cpu": cpu, "commit": commit, "command": command,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, open(path, "w"))
PY

began=$SECONDS
for round in $(seq "$rounds"); do
  [ "$rounds" -gt 1 ] && echo "== round $round of $rounds" >&2
  for size in $sizes; do
    messages=$small
    [ "$size" -gt 10240 ] && messages=$large
    for sessions in $sessions_list; do
      for per in $per_list; do
        echo "== $size bytes, $sessions sessions, $per per connection, $messages messages" >&2
        if [ "$per" -gt 1 ] && [ "$messages" -lt $((sessions * per)) ]; then
          echo "  (only $((messages / per)) connections: fewer than $sessions at once)" >&2
        fi
        for system in $systems; do
          run_one "$system" "$size" "$sessions" "$per" "$messages"
        done
      done
    done
  done
done
echo "all runs: $((SECONDS - began)) s" >&2

plot=()
[ -n "${OUT:-}" ] && plot=(--plot)
"$py" scripts/compare.py report "$results" "$out" "${plot[@]}"
