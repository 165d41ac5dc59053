#!/usr/bin/env bash
# Builds the smarthost container image with podman from deploy/Dockerfile.
#
#   scripts/image.sh                      the full multi-stage build (Rust build
#                                         stage, then the runtime stage)
#   scripts/image.sh --prebuilt BINARY    the runtime stage only, around a
#                                         binary cargo built on this machine
#
# The image is tagged smarthost:VERSION and smarthost:latest, or only
# IMAGE=NAME:TAG when that is set. Where the base image debian:bookworm-slim
# cannot be pulled (no registry reachable), it is made from Debian packages
# with mmdebstrap and imported under that tag; it stays in podman's image
# store, so later runs reuse it. podman, runc, catatonit and mmdebstrap are
# installed with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

prebuilt=""
while (($#)); do
  case "$1" in
    --prebuilt) prebuilt="${2:?--prebuilt needs the path of a smarthost binary}"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1" >&2; exit 2 ;;
  esac
done

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman catatonit)
# crun refuses hybrid cgroup hierarchies (as on the CI machines); runc runs there.
command -v runc >/dev/null 2>&1 || missing+=(runc)
command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
if ((${#missing[@]})); then
  echo "installing container tools: ${missing[*]}" >&2
  { $sudo apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
      -o DPkg::Lock::Timeout=300 "${missing[@]}" >/dev/null; } || {
    echo "error: cannot install ${missing[*]}; install them with apt-get and run again" >&2
    exit 1
  }
fi
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/scripts/podman.conf}"

# The Debian mirror apt already uses on this machine.
debian_mirror() {
  local uri
  uri="$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -n1)"
  [ -n "$uri" ] || uri="$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)"
  echo "${uri:-http://deb.debian.org/debian}"
}

# Makes TAG exist in podman's store: pulled if a registry answers, else built
# from Debian bookworm packages (with EXTRA packages added).
ensure_base() {
  local tag="$1" extra="${2:-}"
  if podman image exists "$tag"; then
    return
  fi
  if [ -z "$extra" ] && podman pull -q "docker.io/library/$tag" >/dev/null 2>&1; then
    return
  fi
  echo "making $tag from Debian packages (mmdebstrap, a few minutes, once)" >&2
  local tmp
  tmp="$(mktemp -d)"
  local args=(--variant=minbase --quiet)
  [ -z "$extra" ] || args=(--variant=minbase --quiet "--include=$extra")
  mmdebstrap "${args[@]}" bookworm "$tmp/rootfs.tar" "$(debian_mirror)"
  podman import -q \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' "$tmp/rootfs.tar" "$tag" >/dev/null
  rm -rf "$tmp"
}

ensure_base debian:bookworm-slim

version="$(awk -F'"' '/^version *=/ {print $2; exit}' node/Cargo.toml)"
[ -n "$version" ] || version="$(awk -F'"' '/^version *=/ {print $2; exit}' Cargo.toml)"
commit="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
image="${IMAGE:-smarthost:$version}"
tags=(-t "$image")
[ -n "${IMAGE:-}" ] || tags+=(-t smarthost:latest)
build_args=(--build-arg "VERSION=$version" --build-arg "COMMIT=$commit" -f deploy/Dockerfile "${tags[@]}")

if [ -n "$prebuilt" ]; then
  [ -x "$prebuilt" ] || { echo "error: $prebuilt is not an executable (cargo build --bin smarthost first)" >&2; exit 1; }
  # A context of the binary alone: the runtime stage needs nothing else, and
  # the target directory is far too big to send.
  ctx="$(mktemp -d)"
  trap 'rm -rf "$ctx"' EXIT
  # Without debug symbols a debug build shrinks from about 200 MB to 40.
  strip --strip-debug -o "$ctx/smarthost" "$prebuilt" 2>/dev/null || cp "$prebuilt" "$ctx/smarthost"
  mkdir "$ctx/deploy"
  cp deploy/container.toml "$ctx/deploy/"
  # The shared stage gets a tag of its own, so that its package layer stays
  # in the build cache when an older image of ours is removed.
  podman build -q --target runtime-base -f deploy/Dockerfile -t localhost/smarthost-runtime-base:cache \
    "$ctx" >/dev/null
  podman build -q --target runtime-prebuilt "${build_args[@]}" "$ctx" >/dev/null
else
  podman build -q --target runtime "${build_args[@]}" . >/dev/null
fi
echo "$image"
