#!/usr/bin/env bash
# Build dist/process-starter/: the process-starter bundle, a directory that runs inside application images
# without Python and without a libc, and never unpacks anything at start.
#
#   bash scripts/build-process-starter.sh        (or: make process-starter)
#
# The bundle is a minimal Python of its own, laid out as an installation under $PREFIX
# (default /opt/cpupool/process-starter), where the agent's DaemonSet puts it on every node once and the
# webhook mounts it read-only, at the same path, into wrapped containers:
#
#   process-starter             a static launcher: exec python/bin/process-starter -I -S -c <run the starter> "$@"
#   python/bin/process-starter  Debian's python3.11 interpreter; its ELF interpreter is $PREFIX/lib/ld-linux-*.so
#                               and its RPATH $PREFIX/lib, so it never touches the container's /lib
#   python/lib/python3.11/      the standard library modules the starter imports, and agent.starter itself,
#                               as compiled .pyc files (no sources, no checks against them)
#   lib/                        the C libraries it loads, the dynamic loader included
#   VERSION                     a hash of the content
#
# A container start costs two execs and an interpreter start-up that imports a few dozen modules: no
# unpacking, nothing written. The modules are those a real run of the starter imports (recorded below),
# plus the whole `encodings` package. This works with Debian's /usr/bin/python3.11 (whose binary has
# libpython built in); as root, missing Debian packages are installed with apt-get.
# Environment: STARTER_PYTHON (default /usr/bin/python3.11), STARTER_BUILD_DIR (build/process-starter),
# STARTER_OUT (dist/process-starter), STARTER_PREFIX (/opt/cpupool/process-starter), CC (gcc).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${STARTER_PYTHON:-/usr/bin/python3.11}
BUILD=${STARTER_BUILD_DIR:-build/process-starter}
OUT=${STARTER_OUT:-dist/process-starter}
PREFIX=${STARTER_PREFIX:-/opt/cpupool/process-starter}
CC=${CC:-gcc}
DEBIAN_PACKAGES=(python3.11 patchelf binutils gcc libc6-dev)

say() { echo "build-process-starter: $*" >&2; }

missing_tools() {
    [ -x "$PYTHON" ] || echo python
    command -v patchelf >/dev/null || echo patchelf
    command -v ldd >/dev/null || echo ldd
    command -v "$CC" >/dev/null || echo "$CC"
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
if ldd "$PYTHON" | grep -q libpython; then
    say "$PYTHON loads libpython as a shared library; the bundle needs an interpreter with it built in (Debian's)"
    exit 1
fi

STAGE="$BUILD/bundle"
rm -rf "$STAGE"
mkdir -p "$STAGE/python/bin" "$STAGE/lib"
VERSION_DIR=$("$PYTHON" -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')
STDLIB="$STAGE/python/lib/$VERSION_DIR"
mkdir -p "$STDLIB/lib-dynload"

# 1. The modules a real run imports, started as the launcher starts it: the starter starts `true` pinned.
say "recording the modules the starter imports"
annotations="$BUILD/annotations"
true_path=$(command -v true)
printf 'cpupool.io/cpus="[{\\"container\\":\\"app\\",\\"processes\\":[{\\"process\\":\\"%s\\",\\"pool\\":\\"p\\",\\"cpus\\":1}]}]"\n' \
    "$true_path" >"$annotations"
cpu=$("$PYTHON" -c 'import os; print(min(os.sched_getaffinity(0)))')
env -i CONTAINER_NAME=app CPUPOOL_ANNOTATIONS_FILE="$annotations" CPUPOOL_POOLS=p=exclusive \
    CPUPOOL_P_CPUS="$cpu" CPUPOOL_LOG_LEVEL=error "$PYTHON" -I -S -c '
import sys
repo, record = sys.argv[1], sys.argv[2]
sys.path.insert(0, repo)
sys.argv = ["-c"]
from agent.starter.run import main
code = main()
import encodings, json
names = sorted(n for n, m in sys.modules.items() if getattr(m, "__file__", None))
with open(record, "w") as out:
    json.dump({"code": code, "modules": {n: sys.modules[n].__file__ for n in names}}, out)
' "$PWD" "$BUILD/modules.json"

# 2. Those modules as sourceless .pyc files in the bundle's library directory (agent.* from this
#    checkout), the whole encodings package, and the extension modules.
"$PYTHON" -I -S - "$BUILD/modules.json" "$PWD" "$STDLIB" <<'EOF'
import json, os, py_compile, sys, sysconfig, shutil
record, repo, target = sys.argv[1], sys.argv[2], sys.argv[3]
found = json.load(open(record))
if found["code"] != 0:
    sys.exit(f"the recording run of the starter exited {found['code']}")
stdlib = sysconfig.get_paths()["stdlib"]
dynload = os.path.join(stdlib, "lib-dynload")
files = dict(found["modules"])
encodings = os.path.join(stdlib, "encodings")
for name in os.listdir(encodings):
    if name.endswith(".py"):
        files["encodings." + name[:-3]] = os.path.join(encodings, name)
# The interpreter finds its library by this landmark (os itself is frozen into the binary).
files.setdefault("os", os.path.join(stdlib, "os.py"))
for name, path in sorted(files.items()):
    if path.endswith(".so"):
        shutil.copy2(path, os.path.join(target, "lib-dynload", os.path.basename(path)))
        continue
    for root in (os.path.join(repo, ""), os.path.join(stdlib, "")):
        if path.startswith(root):
            relative = path[len(root):]
            break
    else:
        sys.exit(f"module {name} comes from {path}, outside the standard library and this checkout")
    if relative.startswith("site-packages"):
        sys.exit(f"module {name} is a third-party module ({path}): the starter must not import it")
    destination = os.path.join(target, relative[:-3] + ".pyc")
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    py_compile.compile(
        path, cfile=destination, dfile=relative, doraise=True, optimize=0,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )
print(f"{len(files)} modules", file=sys.stderr)
EOF

# 3. The interpreter, the C libraries it and the extension modules load, and the loader; then absolute
#    paths under PREFIX: the kernel loads the interpreter named in the executable, and the loader finds
#    every library through the executable's DT_RPATH (inherited by libraries loaded later with dlopen,
#    unlike DT_RUNPATH), never through the container's /lib or /etc/ld.so.cache.
cp -L "$PYTHON" "$STAGE/python/bin/process-starter"
while read -r dep; do
    [ -n "$dep" ] && cp -L "$dep" "$STAGE/lib/$(basename "$dep")"
done < <({ echo "$PYTHON"; find "$STDLIB/lib-dynload" -name '*.so'; } | xargs ldd 2>/dev/null \
    | awk '/=> \// { print $3 } /^[ \t]+\/[^ ]*ld-linux[^ ]* \(0x/ { print $1 }' | sort -u)
LOADER=$(cd "$STAGE/lib" && ls ld-linux-*.so.* | head -n1)
patchelf --set-interpreter "$PREFIX/lib/$LOADER" "$STAGE/python/bin/process-starter"
patchelf --force-rpath --set-rpath "$PREFIX/lib" "$STAGE/python/bin/process-starter"
say "bundled $(ls "$STAGE/lib" | wc -l) libraries with the loader $LOADER"

# 4. The launcher: static, so it runs anywhere; -I ignores PYTHON* variables and the working directory,
#    -S skips site (no site-packages), which also keeps a pod's variables from steering the starter.
cat >"$BUILD/launcher.c" <<'EOF'
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    char **args = calloc((size_t)argc + 5, sizeof *args);
    int n = 0;
    if (args == NULL) {
        fputs("process-starter: out of memory\n", stderr);
        return 2;
    }
    /* The interpreter finds its library from its own absolute path. */
    args[n++] = INTERPRETER;
    args[n++] = "-I";
    args[n++] = "-S";
    /* -c rather than -m: runpy and its imports would add to every start. */
    args[n++] = "-c";
    args[n++] = "import sys\nfrom agent.starter.run import main\nsys.exit(main())";
    for (int i = 1; i < argc; i++) {
        args[n++] = argv[i];
    }
    args[n] = NULL;
    execv(INTERPRETER, args);
    perror("process-starter: cannot run " INTERPRETER);
    return 2;
}
EOF
"$CC" -static -O2 -Wall -Werror -DINTERPRETER="\"$PREFIX/python/bin/process-starter\"" \
    -o "$STAGE/process-starter" "$BUILD/launcher.c"
strip "$STAGE/process-starter" 2>/dev/null || true
chmod -R a+rX "$STAGE"

# A version that changes with the content: the DaemonSet installs each version in its own directory and
# switches a symlink, so running containers keep the files they started with.
(cd "$STAGE" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16) >"$STAGE/VERSION"

mkdir -p "$(dirname "$OUT")"
rm -rf "$OUT.tmp"
cp -a "$STAGE" "$OUT.tmp"
rm -rf "$OUT"
mv -f "$OUT.tmp" "$OUT"

# A bad input must fail fast with exit 2 even without any environment: proves the bundle starts. It runs
# only from PREFIX: check it there, in a private mount namespace, when this host allows one.
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
