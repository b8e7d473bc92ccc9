#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok from
# the pinned Go modules under hack/ into $BIN (default .bin). Go's module and build
# caches stay in their default places in $HOME, so a second clone rebuilds in minutes;
# a binary already built from the same go.sum is kept, so a second run takes seconds.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${BIN:-$root/.bin}
mkdir -p "$bin"
export CGO_ENABLED=0 GOFLAGS=-mod=mod

k8s_version=$(cd "$root/hack/controlplane" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
minor=$(echo "$k8s_version" | cut -d. -f2)
vpkg=k8s.io/component-base/version
k8s_ldflags="-s -w -X $vpkg.gitVersion=$k8s_version -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor \
 -X $vpkg.gitTreeState=clean -X $vpkg.buildDate=1970-01-01T00:00:00Z"

# build MODULE_DIR PACKAGE NAME LDFLAGS: skipped when NAME was built from this go.sum and flags.
build() {
  local dir=$1 pkg=$2 name=$3 ldflags=$4
  local stamp="$bin/.$name.stamp" want
  want=$( (cat "$dir/go.mod" "$dir/go.sum"; echo "$ldflags") | sha256sum | cut -c1-16)
  if [[ -x "$bin/$name" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  echo "building $name ($pkg)"
  (cd "$dir" && go build -trimpath -ldflags "$ldflags" -o "$bin/$name" "$pkg")
  echo "$want" > "$stamp"
}

build "$root/hack/etcd" go.etcd.io/etcd/server/v3 etcd "-s -w"
build "$root/hack/kwok" sigs.k8s.io/kwok/cmd/kwok kwok \
  "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$(cd "$root/hack/kwok" && go list -m -f '{{.Version}}' sigs.k8s.io/kwok)"
for c in kube-apiserver kube-controller-manager kube-scheduler; do
  build "$root/hack/controlplane" "k8s.io/kubernetes/cmd/$c" "$c" "$k8s_ldflags"
done
