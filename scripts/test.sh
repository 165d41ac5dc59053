#!/usr/bin/env bash
# Runs every smarthost test. On a fresh Debian machine it first installs the
# real peers the tests talk to (swaks, python3) if they are missing; a
# dependency that cannot be installed stops the run with a clear message.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v swaks >/dev/null 2>&1 || missing+=(swaks)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if ((${#missing[@]})); then
  echo "installing test dependencies: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"; }; then
    echo "error: cannot install ${missing[*]}; install them with apt-get and run again" >&2
    exit 1
  fi
fi
for tool in swaks python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is required by the tests" >&2; exit 1; }
done

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The black-box tests start the real binary, so build it first.
cargo build --workspace --bins
cargo test --workspace
