"""Two replicas with kopf peering, each running as the operator's own ServiceAccount with
exactly manifests/rbac/: only one acts; when it dies, the other takes over."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from operator_harness import OperatorProcess, get_json, token_env, wait_for

ROOT = Path(__file__).resolve().parent.parent
LIFETIME = 6    # seconds a silent replica is still taken for alive


@pytest.fixture(scope="module")
def operator_rbac(cluster, crd):
    cluster.kubectl("apply", "-f", str(ROOT / "manifests" / "rbac"), "-f", str(ROOT / "manifests" / "peering"))
    for crd_name in ("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"):
        cluster.wait_established(crd_name)
    cluster.kubectl("apply", "-f", str(ROOT / "manifests" / "operator" / "peering.yaml"))


def service_account_env(cluster, tmp_path: Path) -> dict:
    """A kubeconfig that authenticates as system:serviceaccount:alpaca-system:alpaca-operator."""
    token = cluster.kubectl("create", "token", "alpaca-operator", "-n", "alpaca-system",
                            "--duration=1h").stdout.strip()
    return token_env(cluster, token, tmp_path / "operator.kubeconfig")


def finetune(name: str) -> str:
    return json.dumps({
        "apiVersion": "alpaca.dev/v1alpha1", "kind": "AlpacaFineTune", "metadata": {"name": name},
        "spec": {"model": {"uri": "s3://alpaca-test/m/"}, "data": {"uri": "s3://alpaca-test/d.json"},
                 "output": {"uri": f"s3://alpaca-test/runs/{name}/"},
                 "resources": {"nodes": 2, "gpusPerNode": 1},
                 "podMetadata": {"annotations": {"kwok.alpaca.dev/complete-after": "2s"}}},
    })


def live_priorities(cluster) -> set[int]:
    peers = get_json(cluster, "clusterkopfpeering", "alpaca-operator").get("status") or {}
    now = dt.datetime.now(dt.timezone.utc)
    return {p["priority"] for p in peers.values()
            if now - dt.datetime.fromisoformat(p["lastseen"]) < dt.timedelta(seconds=p["lifetime"])}


def reporters(cluster, namespace: str, name: str) -> set[str]:
    events = get_json(cluster, "events", "-n", namespace,
                      "--field-selector", f"involvedObject.name={name},involvedObject.kind=AlpacaFineTune")["items"]
    return {e.get("reportingInstance") for e in events}


def succeeded(cluster, namespace, name):
    return lambda: get_json(cluster, "aft", name, "-n", namespace).get("status", {}).get("phase") == "Succeeded"


def test_only_the_highest_priority_replica_acts(cluster, operator_rbac, namespace, tmp_path):
    env = service_account_env(cluster, tmp_path)
    common = {"ALPACA_PEERING_LIFETIME": str(LIFETIME)}
    high, low = (OperatorProcess(env, tmp_path / f"{which}.log",
                                 extra_env={**common, "POD_NAME": f"replica-{which}"},
                                 args=("--peering", "alpaca-operator", "--priority", str(priority)))
                 for which, priority in (("high", 200), ("low", 100)))
    try:
        high.start()
        low.start()
        # Both keep-alives in the peering object: from here on the low one is paused.
        wait_for("both replicas in the peering object", lambda: {100, 200} <= live_priorities(cluster),
                 timeout=30, on_timeout=low.tail)
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=finetune("first"))
        wait_for("first Succeeded", succeeded(cluster, namespace, "first"), timeout=60,
                 on_timeout=lambda: high.tail() + "\n---\n" + low.tail())
        assert reporters(cluster, namespace, "first") == {"replica-high"}

        high.kill()     # no goodbye: the low one waits out the lifetime, then acts
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=finetune("second"))
        wait_for("second Succeeded", succeeded(cluster, namespace, "second"), timeout=LIFETIME * 2 + 60,
                 on_timeout=lambda: low.tail())
        assert reporters(cluster, namespace, "second") == {"replica-low"}
    finally:
        high.stop()
        low.stop()
