#!/bin/bash
# Server-side cost of the Redis schedule scripts with R deliveries ready in
# one domain: the scripts of a base revision (the ready line as a list,
# scanned by LPOS/LREM) against the current ones (a sorted set). Each cost
# is `INFO commandstats` usec of one EVAL (script compile included).
#
#   scripts/redis_script_cost.sh            # R=200000, base ee597d0
#   R=1000 BASE=<rev> scripts/redis_script_cost.sh
set -euo pipefail
R=${R:-200000}
BASE=${BASE:-ee597d0}
PORT=${PORT:-6391}
ROOT=$(git rev-parse --show-toplevel)
NEW=$ROOT/node/src/schedule/scripts
OLD=$(mktemp -d)
trap 'redis-cli -p $PORT SHUTDOWN NOSAVE >/dev/null 2>&1 || true; rm -rf "$OLD"' EXIT
git -C "$ROOT" show "$BASE:node/src/schedule/redis.rs" > "$OLD/redis.rs"
for name in INSERT FILE CLAIM; do
  # The script between `const NAME: &str = r"` and the closing `";`.
  sed -n "/^const $name: &str = r\"/,/^\";/p" "$OLD/redis.rs" | sed '1d;$d' \
    > "$OLD/$(echo $name | tr A-Z a-z).lua"
done
redis-server --port "$PORT" --save '' --appendonly no --daemonize yes --logfile "$OLD/redis.log"
sleep 0.5
cli() { redis-cli -p "$PORT" "$@"; }
usec() { cli INFO commandstats | grep '^cmdstat_eval:' | sed 's/.*usec=\([0-9]*\),.*/\1/'; }
K="smarthost:{d:x}"
ids512=()
for i in $(seq 1 512); do ids512+=("new$i" 0 1); done
run() { # label, script file, EVAL arguments...
  local label=$1 file=$2
  shift 2
  cli CONFIG RESETSTAT >/dev/null
  local reply
  reply=$(cli EVAL "$(cat "$file")" "$@")
  case "$reply" in ERR*) echo "$label: $reply" >&2; exit 1 ;; esac
  printf '  %-24s %10s usec\n' "$label" "$(usec)"
}
measure() { # dir, layout fill script
  local dir=$1 fill=$2
  cli FLUSHALL >/dev/null
  cli EVAL "$fill" 1 "$K:ready" "$R" >/dev/null
  run "insert 512 new ids" "$dir/insert.lua" 4 "$K:ready" "$K:deferred" "$K:leases" "$K:suspended" "${ids512[@]}"
  cli HSET "$K:holders" "id$((R / 2))" node-a >/dev/null
  cli ZADD "$K:leases" 1 "id$((R / 2))" >/dev/null
  run "file (complete) 1 id" "$dir/file.lua" 4 "$K:ready" "$K:deferred" "$K:leases" "$K:holders" "id$((R / 2))" node-a ""
  run "claim 1 id (expiry)" "$dir/claim.lua" 4 "$K:ready" "$K:deferred" "$K:leases" "$K:holders" exp 60000 "id$((R / 3))"
}
echo "$BASE, $R ready (list):"
measure "$OLD" "for i=1,tonumber(ARGV[1]) do redis.call('RPUSH', KEYS[1], 'id'..i) end"
echo "now, $R ready (sorted set):"
measure "$NEW" "for i=1,tonumber(ARGV[1]) do redis.call('ZADD', KEYS[1], i, 'id'..i) end"
