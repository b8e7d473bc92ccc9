#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok and Kueue from
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

# build MODULE_DIR PACKAGE NAME LDFLAGS [OVERLAY_DIR]: skipped when NAME was built from this
# go.sum, flags and overlay (OVERLAY_DIR/overlay.json for `go build -overlay`, and the .go files it names).
build() {
  local dir=$1 pkg=$2 name=$3 ldflags=$4 overlay=${5:-}
  local stamp="$bin/.$name.stamp" want flags=()
  want=$( (cat "$dir/go.mod" "$dir/go.sum"; echo "$ldflags"; [[ -z $overlay ]] || cat "$overlay"/*.go) \
    | sha256sum | cut -c1-16)
  if [[ -x "$bin/$name" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  [[ -z $overlay ]] || flags=(-overlay "$overlay/overlay.json")
  echo "building $name ($pkg)"
  (cd "$dir" && go build -trimpath "${flags[@]}" -ldflags "$ldflags" -o "$bin/$name" "$pkg")
  echo "$want" > "$stamp"
}

build "$root/hack/etcd" go.etcd.io/etcd/server/v3 etcd "-s -w"
build "$root/hack/kwok" sigs.k8s.io/kwok/cmd/kwok kwok \
  "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$(cd "$root/hack/kwok" && go list -m -f '{{.Version}}' sigs.k8s.io/kwok)"
for c in kube-apiserver kube-controller-manager kube-scheduler; do
  build "$root/hack/controlplane" "k8s.io/kubernetes/cmd/$c" "$c" "$k8s_ldflags"
done
# Kueue admits queued GPU Jobs on the local cluster (hack/cluster.py; KUEUE=0 leaves it off).
kueue_version=$(cd "$root/hack/kueue" && go list -m -f '{{.Version}}' sigs.k8s.io/kueue)
kueue_src=$(cd "$root/hack/kueue" && go mod download sigs.k8s.io/kueue && go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)
# Unless it makes its own certificates, Kueue reads its metrics certificate from a fixed
# /etc/kueue/metrics/certs (cmd/kueue/main.go): outside this checkout, shared by every local
# cluster, and root's to write. So the binary is built from a copy of that main.go in which
# $KUEUE_METRICS_CERT_DIR, when set, gives the directory (hack/cluster.py sets the cluster's
# PKI); nothing else changes. The copy is an overlay (go build -overlay) adding it to this
# module as ./cmd/kueue, since Go refuses to overlay files in the module cache.
fixed='metricsCertPath := "/etc/kueue/metrics/certs"'
if [[ $(grep -cF "$fixed" "$kueue_src/cmd/kueue/main.go") != 1 || $(ls "$kueue_src/cmd/kueue") != main.go ]]; then
  echo "Kueue $kueue_version's cmd/kueue is not the one whose $fixed this patches (update hack/build-controlplane.sh)" >&2
  exit 1
fi
overlay="$bin/.kueue-overlay"
mkdir -p "$overlay"
sed "s|$fixed|$fixed; if d := os.Getenv(\"KUEUE_METRICS_CERT_DIR\"); d != \"\" { metricsCertPath = d }|" \
  "$kueue_src/cmd/kueue/main.go" > "$overlay/main.go"
printf '{"Replace": {"%s": "%s"}}\n' "$root/hack/kueue/cmd/kueue/main.go" "$overlay/main.go" > "$overlay/overlay.json"
build "$root/hack/kueue" ./cmd/kueue kueue \
  "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$kueue_version" "$overlay"
# Its CRDs and webhook configurations, from the same module: hack/cluster.py applies them.
rm -rf "$bin/kueue-manifests"
mkdir -p "$bin/kueue-manifests/crd"
cp "$kueue_src"/config/components/crd/bases/*.yaml "$bin/kueue-manifests/crd/"
cp "$kueue_src/config/components/webhook/manifests.yaml" "$bin/kueue-manifests/webhooks.yaml"
chmod -R u+w "$bin/kueue-manifests"
