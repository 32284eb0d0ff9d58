#!/usr/bin/env bash
# Builds the API server peer (kube-apiserver and etcd in one binary, see main.go) once per machine and prints
# the binary's path. The binary is cached outside the repository, under
# ${XDG_CACHE_HOME:-$HOME/.cache}/cpupool/apiserver-<hash>/, where <hash> covers go.mod, go.sum, this script
# and the Go sources: tests/peers/apiserver.py computes the same key.
# Exit status 2 (and nothing built) when `go` is not on PATH.
set -euo pipefail
cd "$(dirname "$0")"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/cpupool"
hash=$(cat go.mod go.sum build.sh $(LC_ALL=C ls -- *.go) | sha256sum | cut -c1-16)
out="$cache/apiserver-$hash/apiserver-peer"
if [ -x "$out" ]; then
    echo "$out"
    exit 0
fi
if ! command -v go >/dev/null 2>&1; then
    echo "go is not on PATH: cannot build the API server peer" >&2
    exit 2
fi
mkdir -p "$cache/apiserver-$hash"
tmp=$(mktemp "$cache/apiserver-$hash/.apiserver-peer.XXXXXX")
trap 'rm -f "$tmp"' EXIT
start=$SECONDS
echo "building the API server peer (kube-apiserver of k8s.io/kubernetes and etcd; a cold build takes many minutes)" >&2
# Kubernetes stamps its release into the binary at link time (its own build does it from git): without it
# the API server reports v0.0.0-master and Helm refuses charts with a kubeVersion. Take it from go.mod.
version=$(go list -mod=readonly -m -f '{{.Version}}' k8s.io/kubernetes)
minor=${version#v*.}; minor=${minor%%.*}
major=${version#v}; major=${major%%.*}
stamp=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    stamp="$stamp -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    stamp="$stamp -X $pkg.gitTreeState=clean"
done
go build -mod=readonly -buildvcs=false -trimpath -ldflags "-s -w$stamp" -o "$tmp" .
mv -f "$tmp" "$out"
trap - EXIT
# Older builds of this program (other hashes) are dead weight of ~100 MB each.
for old in "$cache"/apiserver-*/apiserver-peer; do
    [ "$old" = "$out" ] || rm -rf -- "$(dirname "$old")"
done
echo "built $out in $((SECONDS - start)) s" >&2
echo "$out"
