#!/usr/bin/env bash
# Builds (or reuses) the Temporal CLI, whose `temporal server start-dev` is the peer that
# `make bench` compares against (bench/peer.py), from its Go module into the same cache as the
# other servers (hack/build-tools.sh). Cached by version: a binary present is never rebuilt.
# Prints the binary's path on its last line.
#
# Why CLI v1.5.1: it is the newest served version that `go install` accepts. v1.9.1's go.mod
# has `replace github.com/temporalio/cli/cliext => ./cliext`, a nested module that is not in
# the module zip and not served on its own, so `go install ...@v1.9.1` refuses ("The go.mod
# file for the module providing named packages contains one or more replace directives").
# v1.5.1 embeds go.temporal.io/server v1.29.1 and needs go >= 1.25.
#
# Cold build: about 5.5 minutes with -p 1 on 2 cores (1.8 GB of modules to download the first
# time, into $cache/go). Set GO_BUILD_P to use more cores.
set -euo pipefail

cache="${TASKFLOW_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/taskflow-operator}"
TEMPORAL_CLI_VERSION="${TEMPORAL_CLI_VERSION:-v1.5.1}"
bin="$cache/bin"
target="$bin/temporal-$TEMPORAL_CLI_VERSION"
mkdir -p "$bin"

log() { echo "[temporal] $*" >&2; }

if [[ ! -x "$target" ]]; then
  # A GOPATH of its own under the cache (module cache and all) so it is kept and reused; the
  # build cache is Go's default (under ~/.cache too) unless GOCACHE says otherwise.
  export GOPATH="${TEMPORAL_GOPATH:-$cache/go}" CGO_ENABLED=0 GOFLAGS= GOTOOLCHAIN=local
  gobin="$(mktemp -d "$bin/.temporal-build.XXXXXX")"
  trap 'rm -rf "$gobin"' EXIT
  log "building temporal $TEMPORAL_CLI_VERSION (cold build: about 5 minutes)"
  started=$SECONDS
  GOBIN="$gobin" go install -p "${GO_BUILD_P:-1}" -trimpath \
    -ldflags "-s -w -X github.com/temporalio/cli/temporalcli.Version=${TEMPORAL_CLI_VERSION#v}" \
    "github.com/temporalio/cli/cmd/temporal@$TEMPORAL_CLI_VERSION"
  mv "$gobin/temporal" "$target"
  log "built $target in $((SECONDS - started)) s"
fi
ln -sfn "temporal-$TEMPORAL_CLI_VERSION" "$bin/temporal"
echo "$target"
