#!/usr/bin/env bash
# Builds Kubeflow's training-operator from the Go module pinned in hack/kubeflow into $BIN
# (default .bin), for `bench/operator_bench.py --kubeflow` only (make setup and the tests do
# not need it), twice:
#   training-operator              as shipped (its client at controller-runtime's 20 QPS);
#   training-operator-unthrottled  the same with its client at 300 QPS, burst 600 (what the
#                                  local controller-manager and scheduler get; hack/cluster.py),
#                                  so that the comparison is not of client rate limits.
# and copies its PyTorchJob CRD to $BIN/kubeflow-manifests.
set -euo pipefail
source "$(dirname "$0")/go-build.sh"

mod=github.com/kubeflow/training-operator
src=$(cd "$root/hack/kubeflow" && go mod download "$mod" && go list -m -f '{{.Dir}}' "$mod")
version=$(cd "$root/hack/kubeflow" && go list -m -f '{{.Version}}' "$mod")
build "$root/hack/kubeflow" "$mod/cmd/training-operator.v1" training-operator "-s -w"
# The rest config is made inline in the call that makes the manager (controller-runtime's
# GetConfig gives it 20 QPS, burst 30); the copy names it first and raises both.
fixed='mgr, err := ctrl.NewManager(ctrl.GetConfigOrDie(), ctrl.Options{'
overlay="$bin/.training-operator-overlay"
patch_main "training-operator $version's cmd/training-operator.v1" "$src/cmd/training-operator.v1/main.go" \
  "$fixed" "restCfg := ctrl.GetConfigOrDie()
	restCfg.QPS, restCfg.Burst = 300, 600
	mgr, err := ctrl.NewManager(restCfg, ctrl.Options{" \
  "$root/hack/kubeflow" cmd/training-operator-unthrottled "$overlay"
build "$root/hack/kubeflow" ./cmd/training-operator-unthrottled training-operator-unthrottled "-s -w" "$overlay"
rm -rf "$bin/kubeflow-manifests"
mkdir -p "$bin/kubeflow-manifests"
cp "$src/manifests/base/crds/kubeflow.org_pytorchjobs.yaml" "$bin/kubeflow-manifests/"
chmod -R u+w "$bin/kubeflow-manifests"
