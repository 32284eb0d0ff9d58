#!/usr/bin/env bash
# Build dist/process-starter: one static executable that runs inside application images without Python.
#
#   bash scripts/build-process-starter.sh        (or: make process-starter)
#
# PyInstaller --onefile bundles the interpreter and agent.starter with its imports; staticx then bundles
# the C libraries and the dynamic loader, so the result needs no libc in the image. This works with
# Debian's python3.11 (its libpython3.11.so comes from the libpython3.11 package); a pyenv or python.org
# build in /usr/local gives a onefile binary that staticx cannot make self-contained.
#
# At run time the executable unpacks itself into $TMPDIR (writable, exec allowed) and needs /proc.
# Environment: STARTER_PYTHON (default /usr/bin/python3.11), STARTER_BUILD_DIR (build/process-starter),
# STARTER_OUT (dist/process-starter). As root, missing Debian packages are installed with apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${STARTER_PYTHON:-/usr/bin/python3.11}
BUILD=${STARTER_BUILD_DIR:-build/process-starter}
OUT=${STARTER_OUT:-dist/process-starter}
DEBIAN_PACKAGES=(python3.11 python3.11-venv libpython3.11 patchelf binutils)
# Pinned so that two builds of one commit bundle the same code.
BUILD_REQUIREMENTS=("pyinstaller==6.22.3" "staticx==0.14.2")
# The starter's own imports (agent.starter -> annotation, config, cpuset, logs, mutation), bounded as in
# pyproject.toml.
RUNTIME_REQUIREMENTS=("jsonschema>=4.20,<5" "structlog>=24.1" "PyYAML>=6.0")

say() { echo "build-process-starter: $*" >&2; }

missing_tools() {
    [ -x "$PYTHON" ] && "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || echo python
    "$PYTHON" -c 'import sysconfig, os, sys; d = sysconfig.get_config_var("LIBDIR") or ""; \
        sys.exit(not any(os.path.exists(os.path.join(d, n)) for n in ("libpython3.11.so.1.0", "libpython3.11.so")))' \
        2>/dev/null || echo libpython
    command -v patchelf >/dev/null || echo patchelf
    command -v objdump >/dev/null || echo objdump
}

if [ -n "$(missing_tools)" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing ${DEBIAN_PACKAGES[*]} (missing: $(missing_tools | tr '\n' ' '))"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${DEBIAN_PACKAGES[@]}" >/dev/null
    fi
    if [ -n "$(missing_tools)" ]; then
        say "missing: $(missing_tools | tr '\n' ' '); install the Debian packages ${DEBIAN_PACKAGES[*]}"
        exit 1
    fi
fi

VENV="$BUILD/venv"
# A venv of another interpreter (e.g. after STARTER_PYTHON changed) would bundle the wrong libpython.
if [ -x "$VENV/bin/python" ] && [ "$(readlink -f "$VENV/bin/python")" != "$(readlink -f "$PYTHON")" ]; then
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "${BUILD_REQUIREMENTS[@]}" "${RUNTIME_REQUIREMENTS[@]}"

# The entry point imports the package from this checkout (--paths), not from an installed copy.
mkdir -p "$BUILD" "$(dirname "$OUT")"
cat >"$BUILD/process_starter_main.py" <<'EOF'
import sys

from agent.starter import main

sys.exit(main())
EOF

say "PyInstaller --onefile"
"$VENV/bin/pyinstaller" --onefile --noconfirm --clean --log-level WARN \
    --name process-starter \
    --paths "$PWD" \
    --distpath "$BUILD/onefile" --workpath "$BUILD/work" --specpath "$BUILD" \
    "$BUILD/process_starter_main.py"

say "staticx"
"$VENV/bin/staticx" --strip "$BUILD/onefile/process-starter" "$OUT.tmp"
chmod 0755 "$OUT.tmp"
mv -f "$OUT.tmp" "$OUT"

# A bad input must fail fast with exit 2 even without any environment: proves the binary starts.
set +e
env -i "$OUT" >/dev/null 2>&1
rc=$?
set -e
if [ "$rc" != 2 ]; then
    say "the built $OUT exited $rc on an empty environment, expected 2"
    exit 1
fi
say "built $OUT ($(du -h "$OUT" | cut -f1))"
