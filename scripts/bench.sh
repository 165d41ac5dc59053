#!/usr/bin/env bash
# Measures how fast smarthost accepts mail into its local spool: Postfix's
# smtp-source sends MESSAGES messages of SIZE bytes over SESSIONS parallel
# sessions (one message per connection) to a release build on loopback.
#
#   scripts/bench.sh [MESSAGES] [SESSIONS] [SIZE]     (defaults 20000 20 2048)
#
# Needs smtp-source (Debian package postfix; installed here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
messages=${1:-20000}
sessions=${2:-20}
size=${3:-2048}

if ! command -v smtp-source >/dev/null 2>&1 && [ ! -x /usr/sbin/smtp-source ]; then
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null
fi
source_bin=$(command -v smtp-source || echo /usr/sbin/smtp-source)

cargo build --release --bin smarthost --quiet
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/smarthost.toml" <<TOML
[node]
hostname = "bench.test"
[smtp]
listen = ["127.0.0.1:$port"]
max_connections = 1000
max_connections_per_ip = 1000
[queue]
path = "$work/spool"
[log]
level = "warn"
TOML
./target/release/smarthost run --config "$work/smarthost.toml" &
relay=$!
trap 'kill $relay 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

start=$(date +%s.%N)
"$source_bin" -s "$sessions" -m "$messages" -l "$size" \
  -f app@example.com -t user@example.org "127.0.0.1:$port"
end=$(date +%s.%N)
python3 - "$start" "$end" "$messages" "$sessions" "$size" <<'PY'
import sys
start, end, n, s, size = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
secs = end - start
print(f"{n} messages of {size} bytes, {s} parallel sessions: {secs:.2f} s, {n / secs:.0f} messages/s accepted")
PY
kill -TERM $relay
wait $relay || true
