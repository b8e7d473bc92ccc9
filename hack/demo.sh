#!/usr/bin/env bash
# make demo: the operator end to end on the local control plane. Applies the CRD, runs
# the operator, applies a two-node AlpacaFineTune, plays rank 0's progress reports with
# the training pods' own (and only) permission, and follows it to Succeeded.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export KUBECONFIG=${KUBECONFIG:-$root/.cluster/kubeconfig}
export PATH="$root/.bin:$root/.venv/bin:$PATH"
ns=alpaca-demo
name=alpaca-7b
log=$root/.cluster/logs/operator-demo.log

kubectl apply --server-side --force-conflicts -f manifests/crd/ >/dev/null
kubectl wait --for=condition=Established crd/alpacafinetunes.alpaca.dev --timeout=60s >/dev/null
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n "$ns" delete aft "$name" --ignore-not-found --wait=true >/dev/null

echo "== the operator (log: $log)"
python -m alpaca_operator >"$log" 2>&1 &
operator=$!
trap 'kill $operator 2>/dev/null; wait $operator 2>/dev/null || true' EXIT

echo "== kubectl apply -f hack/demo/alpaca-7b-2x8.yaml"
kubectl -n "$ns" apply -f hack/demo/alpaca-7b-2x8.yaml

# What rank 0 does while it trains: patch its own AlpacaFineTune's status, as the
# per-run service account the operator bound to a Role on that one object.
trainer="system:serviceaccount:$ns:$name-trainer"
report() {
  kubectl -n "$ns" patch aft "$name" --subresource=status --type=merge --as="$trainer" -p "$1" >/dev/null 2>&1 || true
}

deadline=$((SECONDS + 120))
step=0
while (( SECONDS < deadline )); do
  phase=$(kubectl -n "$ns" get aft "$name" -o jsonpath='{.status.phase}')
  if [[ $phase == Running && $step -lt 1218 ]]; then
    step=$((step + 203))
    loss=$(python -c "import math; print(round(1.9*math.exp(-$step/700)+0.9, 3))")
    report "{\"status\":{\"progress\":{\"stage\":\"training\",\"step\":$step,\"totalSteps\":1218,\"display\":\"$step/1218\",\"loss\":$loss,\"updatedAt\":\"$(date -u +%FT%TZ)\"}}}"
  fi
  kubectl -n "$ns" get aft "$name" --no-headers
  [[ $phase == Succeeded || $phase == Failed ]] && break
  sleep 3
done

echo; echo "== kubectl get aft,jobs,pods -o wide"
kubectl -n "$ns" get aft -o wide
kubectl -n "$ns" get jobs,pods -o wide
echo; echo "== what rank 0 may do, and may not"
for check in "patch alpacafinetunes/$name --subresource=status" "patch alpacafinetunes/other --subresource=status" "create pods" "get secrets"; do
  printf '  %-55s %s\n' "$check" "$(kubectl -n "$ns" auth can-i $check --as="$trainer" 2>/dev/null || true)"
done
echo; echo "== kubectl describe aft $name"
kubectl -n "$ns" describe aft "$name" | sed -n '/^Status:/,$p'
[[ $(kubectl -n "$ns" get aft "$name" -o jsonpath='{.status.phase}') == Succeeded ]]
