#!/usr/bin/env bash
# Refreshes tests/data/eksctl/ (eksctl's ClusterConfig JSON schema and its licence) from
# eksctl's Go module: `hack/update_eksctl_schema.sh v0.216.0`. The module is still
# published under its old path, github.com/weaveworks/eksctl (the new path is not on the
# Go module proxy). Update the version in tests/data/eksctl/README.md and docs/eks.md too.
set -euo pipefail
version=${1:?usage: $0 vX.Y.Z}
root=$(cd "$(dirname "$0")/.." && pwd)
dir=$(cd "$(mktemp -d)" && GOFLAGS=-mod=mod go mod download -json "github.com/weaveworks/eksctl@$version" \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
install -m 644 "$dir/pkg/apis/eksctl.io/v1alpha5/assets/schema.json" "$root/tests/data/eksctl/schema.json"
install -m 644 "$dir/LICENSE" "$root/tests/data/eksctl/LICENSE"
echo "tests/data/eksctl/ now holds eksctl $version's schema"
