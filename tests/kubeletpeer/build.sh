#!/usr/bin/env bash
# Builds the kubelet peer once per machine and prints the binary's path.
# The binary is cached outside the repository, under ${XDG_CACHE_HOME:-$HOME/.cache}/cpupool/<hash>/, where
# <hash> covers go.mod, go.sum, this script and the Go sources: tests/peers/build.py computes the same key.
# Exit status 2 (and nothing built) when `go` is not on PATH.
set -euo pipefail
cd "$(dirname "$0")"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/cpupool"
hash=$(cat go.mod go.sum build.sh $(LC_ALL=C ls -- *.go) | sha256sum | cut -c1-16)
out="$cache/$hash/kubelet-peer"
if [ -x "$out" ]; then
    echo "$out"
    exit 0
fi
if ! command -v go >/dev/null 2>&1; then
    echo "go is not on PATH: cannot build the kubelet peer" >&2
    exit 2
fi
mkdir -p "$cache/$hash"
tmp=$(mktemp "$cache/$hash/.kubelet-peer.XXXXXX")
trap 'rm -f "$tmp"' EXIT
start=$SECONDS
echo "building the kubelet peer (k8s.io/kubernetes device manager; a cold build takes several minutes)" >&2
go build -mod=readonly -buildvcs=false -trimpath -ldflags "-s -w" -o "$tmp" .
mv -f "$tmp" "$out"
trap - EXIT
# Older builds of this program (other hashes) are dead weight of ~50 MB each.
for old in "$cache"/*/kubelet-peer; do
    [ "$old" = "$out" ] || rm -rf -- "$(dirname "$old")"
done
echo "built $out in $((SECONDS - start)) s" >&2
echo "$out"
