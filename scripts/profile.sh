#!/usr/bin/env bash
# Profiles smarthost under the load of scripts/bench.sh and draws a flame
# graph of where its CPU time goes.
#
#   scripts/profile.sh OUT [bench.sh arguments]
#       e.g. scripts/profile.sh /tmp/prof relay 20000 20 2048
#
# Builds the `profiling` profile (release with line tables), runs bench.sh
# with it, attaches `perf record` (DWARF call graphs) to every smarthost
# process once it runs, and writes OUT/perf.data, OUT/report.txt (the
# functions with the most samples of their own, and with their callees) and
# OUT/flame.svg. BACKEND, NODES and WEBHOOK pass through to bench.sh.
#
# Needs perf (Debian package linux-perf) and inferno
# (`cargo install inferno`; its binaries on PATH or in INFERNO_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: $0 OUT [bench.sh arguments]}
shift
mkdir -p "$out"
command -v perf >/dev/null || { echo "perf is missing: apt-get install linux-perf" >&2; exit 1; }
collapse=inferno-collapse-perf
flame=inferno-flamegraph
if [ -n "${INFERNO_DIR:-}" ]; then
  collapse=$INFERNO_DIR/$collapse
  flame=$INFERNO_DIR/$flame
fi
command -v "$collapse" >/dev/null || { echo "inferno is missing: cargo install inferno" >&2; exit 1; }

cargo build --profile profiling --bin smarthost --quiet
bin=$(realpath "${CARGO_TARGET_DIR:-target}/profiling/smarthost")

SMARTHOST_BIN=$bin scripts/bench.sh "$@" &
bench=$!
# The nodes are up once they listen; bench.sh starts the load after that.
pids=""
for _ in $(seq 200); do
  pids=$(pgrep -d, -f "^$bin (run|node)" || true)
  [ -n "$pids" ] && break
  sleep 0.05
done
[ -n "$pids" ] || { echo "no smarthost process came up" >&2; wait "$bench"; exit 1; }
perf record -q -F 499 --call-graph dwarf,16384 -o "$out/perf.data" -p "$pids" 2>"$out/perf-record.log" &
perf=$!
wait "$bench"
kill -INT "$perf" 2>/dev/null || true
wait "$perf" || true

{
  echo "# by library"
  perf report -i "$out/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null \
    | grep -v '^#' | grep '%' | head -10
  echo
  echo "# self"
  perf report -i "$out/perf.data" --no-children --sort dso,symbol --stdio -g none 2>/dev/null \
    | grep -v '^#' | grep '%' | head -40
  echo
  echo "# with callees"
  perf report -i "$out/perf.data" --children --sort symbol --stdio -g none 2>/dev/null \
    | grep -v '^#' | grep '%' | head -60
} >"$out/report.txt"
perf script -i "$out/perf.data" 2>/dev/null | "$collapse" | "$flame" >"$out/flame.svg"
echo "profile: $out/report.txt, $out/flame.svg"
