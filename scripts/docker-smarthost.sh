#!/usr/bin/env bash
# Hands the smarthost image that scripts/kube-test.sh built with podman
# (localhost/smarthost:kube-test, around the debug binary) to the Docker
# engine as smarthost-test/smarthost:local, for the tests that start
# smarthost itself through testcontainers (tests/tests/containers.rs).
# Run scripts/docker-redis.sh first: it installs and starts the engine.
# Prints the image tag; fails with a message when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."

source_image="${SMARTHOST_PODMAN_IMAGE:-localhost/smarthost:kube-test}"
image="${SMARTHOST_TEST_IMAGE:-smarthost-test/smarthost:local}"

fail() {
  echo "error: $*" >&2
  exit 1
}

command -v podman >/dev/null 2>&1 || fail "podman is missing: scripts/kube-test.sh installs it and builds $source_image"
podman image exists "$source_image" || fail "$source_image is missing: run scripts/kube-test.sh (or scripts/image.sh) first"
docker info >/dev/null 2>&1 || fail "no Docker engine answers: run scripts/docker-redis.sh first"

# The previous copy goes, so that images of old binaries do not pile up.
docker rmi -f "$image" >/dev/null 2>&1 || true
podman save --format docker-archive "$source_image" | docker load -q >/dev/null ||
  fail "cannot load $source_image into Docker"
docker tag "$source_image" "$image" || fail "cannot tag $image"
docker rmi "$source_image" >/dev/null 2>&1 || true
echo "$image"
