#!/usr/bin/env bash
# Build a Go test program under tests/ once per machine and print the binary's path.
#   scripts/build-go-peer.sh tests/nripeer
# The binary is cached outside the repository, under ${XDG_CACHE_HOME:-$HOME/.cache}/cpupool/<hash>/, keyed by
# a hash of the program's Go sources, go.mod and go.sum: an unchanged program is never built twice.
set -euo pipefail

src=${1:?usage: build-go-peer.sh <directory of a Go test program>}
name=$(basename "$src")
command -v go >/dev/null || { echo "build-go-peer.sh: go is not installed" >&2; exit 127; }

hash=$(cd "$src" && find . -maxdepth 1 \( -name '*.go' -o -name go.mod -o -name go.sum \) -print0 \
       | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/cpupool/$name-$hash
binary=$cache/$name
if [[ ! -x $binary ]]; then
    mkdir -p "$cache"
    # Build to a temporary name: a concurrent build or an interrupted one never leaves a broken binary.
    (cd "$src" && go build -trimpath -o "$binary.tmp.$$" .)
    mv -f "$binary.tmp.$$" "$binary"
fi
echo "$binary"
