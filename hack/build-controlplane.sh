#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok and Kueue from
# the pinned Go modules under hack/ into $BIN (default .bin); see hack/go-build.sh.
set -euo pipefail
source "$(dirname "$0")/go-build.sh"

k8s_version=$(cd "$root/hack/controlplane" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
minor=$(echo "$k8s_version" | cut -d. -f2)
vpkg=k8s.io/component-base/version
k8s_ldflags="-s -w -X $vpkg.gitVersion=$k8s_version -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor \
 -X $vpkg.gitTreeState=clean -X $vpkg.buildDate=1970-01-01T00:00:00Z"

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
# PKI); nothing else changes.
fixed='metricsCertPath := "/etc/kueue/metrics/certs"'
overlay="$bin/.kueue-overlay"
patch_main "Kueue $kueue_version's cmd/kueue" "$kueue_src/cmd/kueue/main.go" "$fixed" \
  "$fixed; if d := os.Getenv(\"KUEUE_METRICS_CERT_DIR\"); d != \"\" { metricsCertPath = d }" \
  "$root/hack/kueue" cmd/kueue "$overlay"
build "$root/hack/kueue" ./cmd/kueue kueue \
  "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$kueue_version" "$overlay"
# Its CRDs and webhook configurations, from the same module: hack/cluster.py applies them.
rm -rf "$bin/kueue-manifests"
mkdir -p "$bin/kueue-manifests/crd"
cp "$kueue_src"/config/components/crd/bases/*.yaml "$bin/kueue-manifests/crd/"
cp "$kueue_src/config/components/webhook/manifests.yaml" "$bin/kueue-manifests/webhooks.yaml"
chmod -R u+w "$bin/kueue-manifests"
