#!/usr/bin/env bash
# Builds the test control plane and client tools from their Go modules and caches
# them outside the checkout, keyed by version:
#   ${OUTRIDER_CACHE:-~/.cache/outrider}/<tool>-<version>/
# e2e/bin/ (git-ignored) gets links to every tool so scripts find them in one place.
# Idempotent: a tool whose cache directory is complete is not rebuilt.
#
# usage: e2e/tools.sh [tool...]   (default: all of them)
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.37.2}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
HELM_VERSION=${HELM_VERSION:-v3.22.0}
VICTORIALOGS_VERSION=${VICTORIALOGS_VERSION:-v1.52.1}
CRANE_VERSION=${CRANE_VERSION:-v0.22.1}
ARGOCD_VERSION=${ARGOCD_VERSION:-v3.6.1}
ARGOCD_GOTOOLCHAIN=${ARGOCD_GOTOOLCHAIN:-go1.27.3}

here=$(cd "$(dirname "$0")" && pwd)
cache=${OUTRIDER_CACHE:-$HOME/.cache/outrider}
bin="$here/bin"
mkdir -p "$cache" "$bin"
export GOFLAGS="${GOFLAGS:-} -buildvcs=false -trimpath"
export CGO_ENABLED=0

log() { printf '[tools] %s\n' "$*" >&2; }

need_go() {
  command -v go >/dev/null || { log "Go is required to build the test control plane (apt-get install golang, or Go 1.26 from go.dev)"; exit 1; }
}

link() { # link DIR NAME...
  local dir=$1; shift
  for n in "$@"; do ln -sfn "$dir/$n" "$bin/$n"; done
}

done_marker() { [ -f "$1/.complete" ]; }

build_kubernetes() {
  local dir="$cache/kubernetes-$K8S_VERSION"
  local tools=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
  if ! done_marker "$dir"; then
    need_go
    log "building ${tools[*]} $K8S_VERSION into $dir (cold: ~15-25 min on 2 cores)"
    local mod="$dir/src"; rm -rf "$mod"; mkdir -p "$mod"
    local minor=${K8S_VERSION#v1.}; local staging_v="v0.$minor"
    (
      cd "$mod"
      go mod download -json "k8s.io/kubernetes@$K8S_VERSION" >/dev/null
      local kmod; kmod=$(go env GOMODCACHE)/k8s.io/kubernetes@$K8S_VERSION/go.mod
      {
        echo "module outrider.dev/e2e/kubernetes"
        echo
        echo "go $(go env GOVERSION | sed 's/^go//; s/^\([0-9]*\.[0-9]*\).*/\1/')"
        echo
        echo "require k8s.io/kubernetes $K8S_VERSION"
        echo
        # every staging module k8s.io/kubernetes points at ./staging is pinned to its published v0.x
        grep -E '=> \./staging/src/k8s\.io/' "$kmod" | awk -v v="$staging_v" '{print "replace " $1 " => " $1 " " v}'
      } > go.mod
      for t in "${tools[@]}"; do go get -tool "k8s.io/kubernetes/cmd/$t@$K8S_VERSION"; done
      local ld=""
      for p in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
        ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=${minor%%.*} -X $p.gitTreeState=clean"
      done
      go build -ldflags "-s -w $ld" -o "$dir/" $(printf 'k8s.io/kubernetes/cmd/%s ' "${tools[@]}")
    )
    touch "$dir/.complete"
  fi
  link "$dir" "${tools[@]}"
}

build_etcd() {
  local dir="$cache/etcd-$ETCD_VERSION"
  if ! done_marker "$dir"; then
    need_go
    log "building etcd $ETCD_VERSION into $dir"
    local mod="$dir/src"; rm -rf "$mod"; mkdir -p "$mod"
    (
      cd "$mod"
      cat > main.go <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
      printf 'module outrider.dev/e2e/etcd\n\ngo 1.24\n' > go.mod
      go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
      go mod tidy
      go build -ldflags "-s -w" -o "$dir/etcd" .
    )
    touch "$dir/.complete"
  fi
  link "$dir" etcd
}

build_gotool() { # build_gotool NAME MODULE/PKG VERSION [EXTRA_LDFLAGS]
  local name=$1 pkg=$2 version=$3 ldflags=${4:-}
  local dir="$cache/$name-$version"
  if ! done_marker "$dir"; then
    need_go
    log "building $name $version into $dir"
    mkdir -p "$dir"
    GOBIN="$dir" go install -ldflags "-s -w $ldflags" "$pkg@$version"
    touch "$dir/.complete"
  fi
  link "$dir" "$name"
}

build_kwok() { build_gotool kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"; }
build_helm() { build_gotool helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"; }
# Log store for the agent's sink tests (tests/support/victorialogs.rs). Its go.mod has no replace
# directives, so `go install pkg@version` works. buildinfo.Version is what `-version` prints.
build_victorialogs() {
  build_gotool victoria-logs github.com/VictoriaMetrics/VictoriaLogs/app/victoria-logs "$VICTORIALOGS_VERSION" \
    "-X github.com/VictoriaMetrics/VictoriaMetrics/lib/buildinfo.Version=victoria-logs-$VICTORIALOGS_VERSION"
}

# Argo CD (e2e/argocd.sh): one binary, role from ARGOCD_BINARY_NAME. `go install` is refused (its go.mod
# replaces gitops-engine with ./gitops-engine), so a wrapper module requires argo-cd/v3 and copies its replace
# block minus that line (gitops-engine/v3 is published at the same version). Its go.mod says go 1.27: the
# toolchain is switched only for this build (GOTOOLCHAIN), inside the wrapper module, so neither the Go version
# nor Argo CD's k8s.io pins touch anything else. Next to the binary: hack/git-verify-wrapper.sh (repo-server
# runs it even with GPG off) and crds/ (Application, AppProject, ApplicationSet) from the same module.
build_argocd() {
  local dir="$cache/argocd-$ARGOCD_VERSION"
  if ! done_marker "$dir"; then
    need_go
    log "building argocd $ARGOCD_VERSION into $dir (cold: ~11+ min on 2 cores, ~200 MB binary)"
    local mod="$dir/src"; rm -rf "$mod"; mkdir -p "$mod"
    (
      cd "$mod"
      export GOTOOLCHAIN=$ARGOCD_GOTOOLCHAIN
      local m=github.com/argoproj/argo-cd/v3
      local src; src=$(go mod download -json "$m@$ARGOCD_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
      [ -n "$src" ] && [ -f "$src/go.mod" ] || { log "go mod download $m@$ARGOCD_VERSION gave no source dir"; exit 1; }
      {
        echo "module outrider.dev/e2e/argocd"
        echo
        grep -m1 -E '^go [0-9]' "$src/go.mod"
        echo
        echo "require $m $ARGOCD_VERSION"
        echo
        # its replace block(s) and single-line replaces as they are, without the in-tree gitops-engine
        awk '/^replace \($/ {inb=1} inb || /^replace / {print} inb && /^\)$/ {inb=0}' "$src/go.mod" |
          grep -v '=> \./gitops-engine'
      } > go.mod
      go get "$m/cmd@$ARGOCD_VERSION"
      go build -ldflags "-s -w -X $m/common.version=${ARGOCD_VERSION#v}" -o "$dir/argocd" "$m/cmd"
      mkdir -p "$dir/hack" "$dir/crds"
      install -m 0755 "$src/hack/git-verify-wrapper.sh" "$dir/hack/git-verify-wrapper.sh"
      install -m 0644 "$src"/manifests/crds/*-crd.yaml "$dir/crds/"
    )
    touch "$dir/.complete"
  fi
  link "$dir" argocd
}

# OCI image assembly without a container engine (e2e/image/build.sh, `make image`).
build_crane() { build_gotool crane github.com/google/go-containerregistry/cmd/crane "$CRANE_VERSION"; }

all=(etcd kubernetes kwok helm victorialogs argocd crane)
[ $# -gt 0 ] && all=("$@")
for t in "${all[@]}"; do "build_$t"; done
log "tools ready in $bin"
