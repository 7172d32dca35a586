#!/usr/bin/env bash
# Builds (once; cached under $IEX_CLUSTER_CACHE/bin, keyed by version) the cluster's binaries from
# the Go module proxy: kube-apiserver, kube-controller-manager, kube-scheduler, kubelet,
# kube-proxy, kubectl (Kubernetes $K8S_VERSION), etcd, CoreDNS, and the pause binary.
#
# `go install k8s.io/kubernetes/cmd/...@vX` is refused (its go.mod replaces the staging repos), so
# each is built from a small wrapper module that requires k8s.io/kubernetes and replaces every
# staging repo with its published v0.X twin.
source "$(dirname "$0")/env.sh"
command -v go >/dev/null || die "go is required (the Go toolchain; see docs/cluster.md)"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0
# A build cache of its own (~5 GB), removed once the binaries are built: they are what is cached,
# and a version bump rebuilds in minutes. The user's own Go build cache stays as it was.
export GOCACHE=$IEX_CLUSTER_CACHE/go-build

build_k8s() {
  [ -f "$BIN/.complete" ] && { log "kubernetes $K8S_VERSION: cached ($BIN)"; return; }
  local src=$IEX_CLUSTER_CACHE/src/k8s-$K8S_VERSION staging=v0.${K8S_VERSION#v1.}
  mkdir -p "$src" "$BIN"
  log "kubernetes $K8S_VERSION: building (wrapper module $src)"
  go mod download -json "k8s.io/kubernetes@$K8S_VERSION" >/dev/null
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  {
    echo "module iex.local/k8s-build"
    echo "go 1.24.0"
    echo "require k8s.io/kubernetes $K8S_VERSION"
    grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging' "$gomod" | awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}'
  } > "$src/go.mod"
  cat > "$src/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubectl/pkg/cmd"
)
GO
  (cd "$src" && "${NICE[@]}" go mod tidy -e >/dev/null 2>&1 || true; cd "$src" && "${NICE[@]}" go mod download)
  local ver=$K8S_VERSION major minor
  major=${ver#v}; major=${major%%.*}; minor=${ver#v*.}; minor=${minor%%.*}
  local ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$ver -X $p.gitMajor=$major -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    ld+=" -X $p.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  done
  for cmd in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
    log "  go build $cmd"
    (cd "$src" && "${NICE[@]}" go build -trimpath -ldflags "$ld" -o "$BIN/$cmd" "k8s.io/kubernetes/cmd/$cmd")
  done
  # The pause container's binary, from the kubernetes module's own source.
  local dir
  dir=$(cd "$src" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)
  "${NICE[@]}" gcc -Os -Wall -Werror -static -DVERSION="$K8S_VERSION" -o "$BIN/pause" "$dir/build/pause/linux/pause.c"
  touch "$BIN/.complete"
}

# go install-style: a module whose main package is a sub-package of a module with replace
# directives of its own is built through a wrapper that requires it.
build_wrapped() { # name version module package out
  local name=$1 ver=$2 mod=$3 pkg=$4 out=$5
  [ -f "$out/.complete" ] && { log "$name $ver: cached ($out)"; return; }
  local src=$IEX_CLUSTER_CACHE/src/$name-$ver
  mkdir -p "$src" "$out"
  log "$name $ver: building"
  printf 'module iex.local/%s-build\ngo 1.24.0\nrequire %s %s\n' "$name" "$mod" "$ver" > "$src/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "%s"\n' "$pkg" > "$src/tools.go"
  (cd "$src" && "${NICE[@]}" go mod tidy -e >/dev/null 2>&1 || true)
  (cd "$src" && "${NICE[@]}" go build -trimpath -ldflags "-s -w" -o "$out/$name" "$pkg")
  touch "$out/.complete"
}

mkdir -p "$IEX_CLUSTER_CACHE"
build_k8s
build_wrapped etcd "$ETCD_VERSION" go.etcd.io/etcd/server/v3 go.etcd.io/etcd/server/v3 "$ETCD_BIN"
build_wrapped coredns "$COREDNS_VERSION" github.com/coredns/coredns github.com/coredns/coredns "$COREDNS_BIN"
rm -rf "$GOCACHE"
log "binaries ready: $BIN $ETCD_BIN $COREDNS_BIN"
