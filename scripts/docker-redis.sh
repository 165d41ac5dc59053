#!/usr/bin/env bash
# Makes a Docker engine and the Redis test image ready for the tests that
# take their Redis from a container (SMARTHOST_TEST_REDIS=container, see
# docs/testing.md):
#
#   1. installs docker.io and mmdebstrap with apt-get when they are missing;
#   2. starts dockerd when no engine answers (there may be no service
#      manager: the daemon is started in the background, its log in
#      $DOCKERD_LOG, default /var/log/smarthost-dockerd.log);
#   3. builds the image smarthost-test/redis:7.0 once, when the engine does
#      not have it yet: a Debian bookworm root file system with
#      redis-server made by mmdebstrap and brought in with `docker import`,
#      so no image registry is needed. Later runs keep and reuse it.
#
# Prints the image tag. Any step that fails stops the script with a message
# and a non-zero status: the container tests are never skipped silently.
set -euo pipefail
cd "$(dirname "$0")/.."

image="${SMARTHOST_TEST_REDIS_IMAGE:-smarthost-test/redis:7.0}"
log="${DOCKERD_LOG:-/var/log/smarthost-dockerd.log}"

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

fail() {
  echo "error: $*" >&2
  exit 1
}

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
if ((${#missing[@]})); then
  echo "installing container tools: ${missing[*]}" >&2
  { $sudo apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
      -o DPkg::Lock::Timeout=300 "${missing[@]}" >/dev/null; } ||
    fail "cannot install ${missing[*]}; install them with apt-get and run again"
fi
command -v docker >/dev/null 2>&1 || fail "no docker client on PATH (the docker.io package has one)"

if ! docker info >/dev/null 2>&1; then
  echo "starting dockerd (log: $log)" >&2
  $sudo sh -c "nohup dockerd >'$log' 2>&1 </dev/null &"
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || {
    tail -n 20 "$log" >&2 || true
    fail "dockerd did not answer within 60 s; its log is $log"
  }
fi

# The Debian mirror apt already uses on this machine.
debian_mirror() {
  local uri
  uri="$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -n1)"
  [ -n "$uri" ] || uri="$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)"
  echo "${uri:-http://deb.debian.org/debian}"
}

if ! docker image inspect "$image" >/dev/null 2>&1; then
  echo "making $image from Debian packages (mmdebstrap, a few minutes, once)" >&2
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  mmdebstrap --variant=apt --quiet --include=redis-server bookworm "$tmp/rootfs.tar" "$(debian_mirror)" ||
    fail "mmdebstrap could not make the Redis root file system"
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'EXPOSE 6379' \
    --change 'CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no"]' \
    "$tmp/rootfs.tar" "$image" >/dev/null ||
    fail "docker import of $image failed"
fi
docker run --rm --entrypoint redis-server "$image" --version >/dev/null ||
  fail "$image does not run redis-server"
echo "$image"
