"""manifests/policy/: a training pod may write status.progress of its own run and nothing else,
checked by the API server as the trainer itself (a TokenRequest token bound to a pod), with
a ServiceAccount that two runs share (spec.serviceAccountName)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from alpaca_operator.backends.base import Run
from alpaca_operator.backends.eks import render
from alpaca_operator.spec import parse_spec
from operator_harness import get_json, kubectl_as, patch_status_as, token_env

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "manifests" / "policy"
CRD = ROOT / "manifests" / "crd" / "alpacafinetunes.alpaca.dev.yaml"


def policy_docs() -> list[dict]:
    return [d for p in sorted(POLICY.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


@pytest.fixture(scope="module")
def policy(cluster, crd):
    """Installed for this module's tests only: other modules' tests play rank 0 with tokens
    that are not bound to a pod."""
    cluster.kubectl("apply", "-f", str(POLICY))
    yield
    cluster.kubectl("delete", "-f", str(POLICY), "--ignore-not-found")


def test_policy_guards_every_status_field_but_progress():
    crd = yaml.safe_load(CRD.read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    vap = next(d for d in policy_docs() if d["kind"] == "ValidatingAdmissionPolicy")
    guarded = {v["expression"].split("?status.?")[1].split(" ")[0]
               for v in vap["spec"]["validations"] if "?status.?" in v["expression"]}
    assert guarded == set(status) - {"progress"}
    binding = next(d for d in policy_docs() if d["kind"] == "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == vap["metadata"]["name"] and binding["spec"]["validationActions"] == ["Deny"]


def _run_with_rbac(cluster, namespace: str, name: str, account: str | None) -> dict:
    """A run, and the trainer identity the operator makes for its pods (once per namespace
    and account; applying it again changes nothing)."""
    body = {"apiVersion": "alpaca.dev/v1alpha1", "kind": "AlpacaFineTune", "metadata": {"name": name},
            "spec": {"model": {"uri": "s3://alpaca-test/m/"}, "data": {"uri": "s3://alpaca-test/d.json"},
                     "output": {"uri": f"s3://alpaca-test/{name}/"},
                     **({"serviceAccountName": account} if account else {})}}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))
    live = get_json(cluster, "aft", name, "-n", namespace)
    run = Run(name, namespace, live["metadata"]["uid"], 1, parse_spec(live["spec"]))
    for obj in render.render_trainer_identity(namespace, render.pod_service_account(run)):
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))
    return live


def _pod_token(cluster, namespace: str, pod_name: str, account: str, path: Path) -> dict:
    pod = _pod(cluster, namespace, pod_name, account)
    token = cluster.kubectl("create", "token", account, "-n", namespace, "--bound-object-kind=Pod",
                            f"--bound-object-name={pod['metadata']['name']}",
                            f"--bound-object-uid={pod['metadata']['uid']}")
    return token_env(cluster, token.stdout.strip(), path)


def _pod(cluster, namespace: str, name: str, account: str) -> dict:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
           "spec": {"serviceAccountName": account, "nodeSelector": {"alpaca.dev/none": "x"},
                    "containers": [{"name": "trainer", "image": "train"}]}}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))
    return get_json(cluster, "pod", name, "-n", namespace)


def test_trainer_writes_only_its_own_progress(cluster, policy, namespace, tmp_path):
    k = cluster.kubectl
    k("create", "serviceaccount", "shared", "-n", namespace)
    for name in ("alpha", "beta"):
        _run_with_rbac(cluster, namespace, name, "shared")
    # The operator's writes (here as the cluster admin, and as its own ServiceAccount with
    # manifests/rbac/) pass: phase, attempts, startTime, conditions.
    k("apply", "-f", str(ROOT / "manifests" / "rbac"))
    operator = token_env(cluster, k("create", "token", "alpaca-operator", "-n", "alpaca-system").stdout.strip(),
                         tmp_path / "operator.kubeconfig")
    started = {"phase": "Running", "attempts": 1, "startTime": "2026-12-01T00:00:00Z", "message": "running",
               "conditions": [{"type": "Running", "status": "True", "reason": "AllPodsRunning", "message": "",
                               "lastTransitionTime": "2026-12-01T00:00:00Z"}]}
    for name in ("alpha", "beta"):
        k("patch", "aft", name, "-n", namespace, "--subresource=status", "--type=merge",
          "-p", json.dumps({"status": started}))
    ok = patch_status_as(operator, namespace, "alpha", {"message": "running, said the operator"})
    assert ok.returncode == 0, ok.stderr

    pod = _pod(cluster, namespace, "alpha-a1-0-x7k2q", "shared")
    token = k("create", "token", "shared", "-n", namespace, "--bound-object-kind=Pod",
              f"--bound-object-name={pod['metadata']['name']}", f"--bound-object-uid={pod['metadata']['uid']}")
    rank0 = token_env(cluster, token.stdout.strip(), tmp_path / "rank0.kubeconfig")

    progress = {"progress": {"stage": "training", "step": 10, "totalSteps": 40, "display": "10/40", "loss": 1.5}}
    ok = patch_status_as(rank0, namespace, "alpha", progress)
    assert ok.returncode == 0, ok.stderr
    assert get_json(cluster, "aft", "alpha", "-n", namespace)["status"]["progress"]["step"] == 10

    for change, field in (({"phase": "Succeeded"}, "phase"), ({"attempts": 0}, "attempts"),
                          ({"startTime": None}, "startTime"), ({"conditions": []}, "conditions"),
                          ({"reason": "Succeeded"}, "reason"),
                          ({"progress": {"step": 11}, "message": "done"}, "message")):
        denied = patch_status_as(rank0, namespace, "alpha", change)
        assert denied.returncode != 0, change
        assert f"status.{field} is written only by the operator" in denied.stderr, denied.stderr
    # The same account is bound to beta's Role, but the pod is alpha's.
    denied = patch_status_as(rank0, namespace, "beta", progress)
    assert denied.returncode != 0 and "pod alpha-a1-0-x7k2q belongs to another run" in denied.stderr, denied.stderr
    # A token that names no pod cannot tell which run it is: refused too.
    plain = token_env(cluster, k("create", "token", "shared", "-n", namespace).stdout.strip(),
                      tmp_path / "plain.kubeconfig")
    denied = patch_status_as(plain, namespace, "alpha", progress)
    assert denied.returncode != 0 and "did not authenticate with a pod-bound token" in denied.stderr, denied.stderr

    # Reports that cannot be true: refused (a negative step by the CRD's schema already).
    for report, why in (({"step": 999999, "totalSteps": 1}, "may not exceed status.progress.totalSteps"),
                        ({"loss": -1}, "status.progress.loss may not be negative"),
                        ({"step": -1}, "status.progress.step")):
        denied = patch_status_as(rank0, namespace, "alpha", {"progress": report})
        assert denied.returncode != 0 and why in denied.stderr, (report, denied.stderr)

    # A bare pod named like alpha's pods, under another account that someone bound to
    # alpha's Role: the name alone proved nothing; the account is not alpha's trainer.
    k("create", "serviceaccount", "intruder", "-n", namespace)
    k("create", "rolebinding", "intruder-alpha", "-n", namespace, "--role=alpaca-trainer-progress",
      f"--serviceaccount={namespace}:intruder")
    fake = _pod(cluster, namespace, "alpha-a1-0-zzzzz", "intruder")
    token = k("create", "token", "intruder", "-n", namespace, "--bound-object-kind=Pod",
              f"--bound-object-name={fake['metadata']['name']}", f"--bound-object-uid={fake['metadata']['uid']}")
    intruder = token_env(cluster, token.stdout.strip(), tmp_path / "intruder.kubeconfig")
    denied = patch_status_as(intruder, namespace, "alpha", progress)
    assert denied.returncode != 0 and "only the trainer account shared of AlpacaFineTune alpha" in denied.stderr, \
        denied.stderr

    st = get_json(cluster, "aft", "alpha", "-n", namespace)["status"]
    assert st["phase"] == "Running" and st["attempts"] == 1 and st["startTime"] == "2026-12-01T00:00:00Z"
    assert st["progress"]["step"] == 10 and st["progress"]["loss"] == 1.5
    assert get_json(cluster, "aft", "beta", "-n", namespace)["status"].get("progress") is None


def test_every_status_field_but_progress_is_guarded_from_the_training_pods():
    root = Path(__file__).resolve().parent.parent / "manifests"
    policy = (root / "policy" / "trainer-status-policy.yaml").read_text()
    crd = yaml.safe_load((root / "crd" / "alpacafinetunes.alpaca.dev.yaml").read_text())
    fields = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    unguarded = [k for k in fields if k != "progress"
                 and f'"object.?status.?{k} == oldObject.?status.?{k}"' not in policy]
    assert not unguarded, f"status fields a training pod could rewrite: {unguarded}"


def test_under_the_operators_shared_trainer_account_a_pod_reports_only_its_own_runs_progress(
        cluster, policy, namespace, tmp_path):
    """Runs without spec.serviceAccountName share the namespace's alpaca-trainer, whose Role
    allows every run's status: the policy alone keeps run A's pods off run B."""
    for name in ("gamma", "delta"):
        _run_with_rbac(cluster, namespace, name, None)
    progress = {"progress": {"stage": "training", "step": 3, "totalSteps": 40, "display": "3/40", "loss": 2.0}}
    gamma = _pod_token(cluster, namespace, "gamma-a1-0-abcde", "alpaca-trainer", tmp_path / "gamma.kubeconfig")
    ok = patch_status_as(gamma, namespace, "gamma", progress)
    assert ok.returncode == 0, ok.stderr
    # RBAC lets it through (the Role names no run); the policy does not.
    denied = patch_status_as(gamma, namespace, "delta", progress)
    assert denied.returncode != 0 and "pod gamma-a1-0-abcde belongs to another run" in denied.stderr, denied.stderr
    assert (get_json(cluster, "aft", "delta", "-n", namespace).get("status") or {}).get("progress") is None
    # Nor can it read another run (its spec: buckets, environment), through the status or
    # otherwise: the Role allows patch alone.
    for how in (("--subresource=status",), ()):
        read = kubectl_as(gamma, "get", "alpacafinetune", "delta", "-n", namespace, "-o", "json", *how)
        assert read.returncode != 0 and "forbidden" in read.stderr.lower(), (how, read.stdout[:200], read.stderr)
    # A pod of a run an earlier operator version made runs as that run's own NAME-trainer.
    cluster.kubectl("create", "serviceaccount", "delta-trainer", "-n", namespace)
    cluster.kubectl("create", "rolebinding", "delta-progress", "-n", namespace, "--role=alpaca-trainer-progress",
                    f"--serviceaccount={namespace}:delta-trainer")
    legacy = _pod_token(cluster, namespace, "delta-a1-0-fghij", "delta-trainer", tmp_path / "delta.kubeconfig")
    ok = patch_status_as(legacy, namespace, "delta", progress)
    assert ok.returncode == 0, ok.stderr
    assert get_json(cluster, "aft", "delta", "-n", namespace)["status"]["progress"]["step"] == 3
    # ...and that account is only delta's.
    denied = patch_status_as(legacy, namespace, "gamma", {"progress": {"step": 4}})
    assert denied.returncode != 0, denied.stderr
