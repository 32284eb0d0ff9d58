#!/usr/bin/env bash
# Build dist/process-starter/: the process-starter bundle, a directory that runs inside application images
# without Python and without a libc, and never unpacks anything at start.
#
#   bash scripts/build-process-starter.sh        (or: make process-starter)
#
# PyInstaller --onedir bundles the interpreter and agent.starter with its imports (the standard library
# only). The script then copies every C library the bundle needs, the dynamic loader included, into the
# bundle's _internal/ and points the executable at them by absolute path: its ELF interpreter becomes
# $PREFIX/_internal/ld-linux-*.so and its RPATH $PREFIX/_internal. So the bundle must be run from
# $PREFIX (default /opt/cpupool/process-starter): the agent's DaemonSet lays it out there on every node
# once, and the webhook mounts that directory read-only at the same path into wrapped containers. A
# container start then costs one exec and the interpreter's start-up, with nothing written anywhere.
#
# This works with Debian's python3.11 (its libpython3.11.so comes from the libpython3.11 package); a
# pyenv or python.org build in /usr/local is not supported. As root, missing Debian packages are installed.
# Environment: STARTER_PYTHON (default /usr/bin/python3.11), STARTER_BUILD_DIR (build/process-starter),
# STARTER_OUT (dist/process-starter), STARTER_PREFIX (/opt/cpupool/process-starter).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${STARTER_PYTHON:-/usr/bin/python3.11}
BUILD=${STARTER_BUILD_DIR:-build/process-starter}
OUT=${STARTER_OUT:-dist/process-starter}
PREFIX=${STARTER_PREFIX:-/opt/cpupool/process-starter}
DEBIAN_PACKAGES=(python3.11 python3.11-venv libpython3.11 patchelf binutils)
# Pinned so that two builds of one commit bundle the same code.
BUILD_REQUIREMENTS=("pyinstaller==6.22.3")

say() { echo "build-process-starter: $*" >&2; }

missing_tools() {
    [ -x "$PYTHON" ] && "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || echo python
    "$PYTHON" -c 'import sysconfig, os, sys; d = sysconfig.get_config_var("LIBDIR") or ""; \
        sys.exit(not any(os.path.exists(os.path.join(d, n)) for n in ("libpython3.11.so.1.0", "libpython3.11.so")))' \
        2>/dev/null || echo libpython
    command -v patchelf >/dev/null || echo patchelf
    command -v objdump >/dev/null || echo objdump
    command -v ldd >/dev/null || echo ldd
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
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${BUILD_REQUIREMENTS[@]}"

# The entry point imports the package from this checkout (--paths), not from an installed copy.
mkdir -p "$BUILD" "$(dirname "$OUT")"
cat >"$BUILD/process_starter_main.py" <<'EOF'
import sys

from agent.starter import main

sys.exit(main())
EOF

say "PyInstaller --onedir"
rm -rf "$BUILD/onedir"
# The starter imports only the standard library; excluding the big optional parts keeps the bundle small.
"$VENV/bin/pyinstaller" --onedir --noconfirm --clean --log-level WARN \
    --name process-starter \
    --paths "$PWD" \
    --exclude-module tkinter --exclude-module unittest --exclude-module pydoc \
    --distpath "$BUILD/onedir" --workpath "$BUILD/work" --specpath "$BUILD" \
    "$BUILD/process_starter_main.py"

BUNDLE="$BUILD/onedir/process-starter"
LIB="$BUNDLE/_internal"
EXE="$BUNDLE/process-starter"

# Every ELF file of the bundle, and the system libraries they load (resolved by this host's loader).
elf_files() { find "$BUNDLE" -type f \( -name '*.so*' -o -path "$EXE" \) -print; }
copied=0
for _round in 1 2 3; do
    while read -r dep; do
        [ -n "$dep" ] || continue
        name=$(basename "$dep")
        if [ ! -e "$LIB/$name" ]; then
            cp -L "$dep" "$LIB/$name"
            copied=$((copied + 1))
        fi
    done < <(elf_files | xargs -r ldd 2>/dev/null | awk '/=> \// { print $3 } /^[ \t]+\/[^ ]*ld-linux[^ ]* \(0x/ { print $1 }' | sort -u)
done
LOADER=$(cd "$LIB" && ls ld-linux-*.so.* 2>/dev/null | head -n1)
if [ -z "$LOADER" ]; then
    say "no dynamic loader found among the bundle's libraries"
    exit 1
fi
say "bundled $copied system libraries and the loader $LOADER"

# Absolute paths under PREFIX: the kernel loads the interpreter named in the executable, and the loader
# finds every library through the executable's DT_RPATH (inherited by libraries loaded later with dlopen,
# unlike DT_RUNPATH), never through the container's own /lib or /etc/ld.so.cache.
patchelf --set-interpreter "$PREFIX/_internal/$LOADER" "$EXE"
patchelf --force-rpath --set-rpath "$PREFIX/_internal" "$EXE"
find "$LIB" -maxdepth 1 -type f -name 'libpython*.so*' -exec patchelf --force-rpath --set-rpath "$PREFIX/_internal" {} \;

# A version that changes with the content: the DaemonSet installs each version in its own directory and
# switches a symlink, so running containers keep the files they started with.
(cd "$BUNDLE" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16) >"$BUNDLE/VERSION"

rm -rf "$OUT.tmp"
cp -a "$BUNDLE" "$OUT.tmp"
rm -rf "$OUT"
mv -f "$OUT.tmp" "$OUT"

# A bad input must fail fast with exit 2 even without any environment: proves the bundle starts. It can
# only run from PREFIX, so check it there in a private mount namespace when this host allows one.
top="/$(echo "$PREFIX" | cut -d/ -f2)"
if [ "$(id -u)" = 0 ] && [ -d "$top" ] && unshare --mount true 2>/dev/null; then
    # A tmpfs over the prefix's top directory, in the namespace only: nothing is written on this host.
    set +e
    unshare --mount sh -c "mount -t tmpfs tmpfs '$top' && mkdir -p '$PREFIX' && \
        mount --bind '$PWD/$OUT' '$PREFIX' && exec env -i '$PREFIX/process-starter'" >/dev/null 2>&1
    rc=$?
    set -e
    if [ "$rc" != 2 ]; then
        say "the built bundle exited $rc on an empty environment, expected 2"
        exit 1
    fi
else
    say "not root or no mount namespace: the bundle was not test-run"
fi
say "built $OUT/ ($(du -sh "$OUT" | cut -f1), version $(cat "$OUT/VERSION"), runs from $PREFIX)"
