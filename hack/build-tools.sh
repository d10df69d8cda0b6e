#!/usr/bin/env bash
# Builds (or reuses) the real servers the tests and `make dev` run: kube-apiserver,
# kubectl and kube-controller-manager 1.34, etcd 3.6 and nats-server, from their Go
# modules into a git-ignored cache. Prints the directory holding the binaries.
#
# Reuse order: $KUBEBUILDER_ASSETS (envtest layout) for apiserver/etcd/kubectl,
# then the cache. A binary present in the cache is never rebuilt.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cache="${TASKFLOW_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/taskflow-operator}"
K8S_VERSION=v1.34.4
ETCD_VERSION=v3.6.6
NATS_VERSION=v2.15.2
HELM_VERSION=v3.19.0
bin="$cache/bin"
mkdir -p "$bin"
export CGO_ENABLED=0 GOFLAGS=-mod=mod

log() { echo "[tools] $*" >&2; }

link_asset() {  # name: reuse an envtest binary, or one on PATH, when the user has one
  local name=$1 found=""
  [[ -e "$bin/$name" ]] && return 0
  if [[ -n "${KUBEBUILDER_ASSETS:-}" && -x "$KUBEBUILDER_ASSETS/$name" ]]; then
    found="$KUBEBUILDER_ASSETS/$name"
  elif found=$(command -v "$name" 2>/dev/null); then
    # kubectl must be of the apiserver's minor; other servers are taken as they are.
    if [[ $name == kubectl ]] && ! "$found" version --client 2>/dev/null \
        | grep -q "v${K8S_VERSION#v}" ; then
      found=""
    fi
  fi
  if [[ -n "$found" ]]; then
    ln -s "$found" "$bin/$name"
    log "reusing $found"
  fi
}

build_kube() {  # name package
  local name=$1 pkg=$2
  link_asset "$name"
  [[ -x "$bin/$name" ]] && return 0
  log "building $name $K8S_VERSION (cold build: several minutes)"
  local v=${K8S_VERSION#v} ld=""
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=${v%%.*} -X $p.gitMinor=$(cut -d. -f2 <<<"$v")"
  done
  (cd "$here/tools/kube" && go build -trimpath -ldflags "-s -w$ld" -o "$bin/$name.tmp" "$pkg")
  mv "$bin/$name.tmp" "$bin/$name"
}

build_etcd() {
  link_asset etcd
  [[ -x "$bin/etcd" ]] && return 0
  log "building etcd $ETCD_VERSION"
  (cd "$here/tools/etcd" && go build -trimpath -ldflags "-s -w" -o "$bin/etcd.tmp" .)
  mv "$bin/etcd.tmp" "$bin/etcd"
}

go_install() {  # name module-path@version
  local name=$1 target=$2
  link_asset "$name"
  [[ -x "$bin/$name" ]] && return 0
  log "building $name ($target)"
  GOFLAGS= GOBIN="$bin/.gobin" go install -trimpath -ldflags "-s -w" "$target"
  mv "$bin/.gobin/$name" "$bin/$name"
}

what="${1:-all}"
case "$what" in
  all|test)
    go_install nats-server "github.com/nats-io/nats-server/v2@$NATS_VERSION"
    build_etcd
    build_kube kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
    build_kube kubectl k8s.io/kubernetes/cmd/kubectl
    ;;&
  all|helm)
    go_install helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
    ;;&
  all|kcm)
    build_kube kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager
    ;;
esac
echo "$bin"
