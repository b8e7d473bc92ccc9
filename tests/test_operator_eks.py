"""The operator with backend eks, against the real control plane (kwok plays the GPU nodes).

The kwok stages (hack/kwok-stages.yaml) read pod annotations, which the runs set through
spec.podMetadata: `kwok.alpaca.dev/complete-after` (how long a pod runs) and
`kwok.alpaca.dev/fail-exit-code` (it then fails with that code).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from alpaca_operator import api
from alpaca_operator.backends.base import Run
from alpaca_operator.backends.eks import render
from alpaca_operator.spec import parse_spec
from operator_harness import (OperatorProcess, PhaseRecorder, aft, apply, assert_subset, get_json, kubectl_as,
                              patch_status_as, phase_is, token_env, wait_for)

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "manifests" / "samples"
POLICY = ROOT / "manifests" / "policy"


@pytest.fixture(scope="module")
def operator(cluster, crd, tmp_path_factory):
    # With the trainer-status policy installed, as in a real cluster: the operator's own
    # writes must pass it. (Removed after: other modules play rank 0 with unbound tokens.)
    cluster.kubectl("apply", "-f", str(POLICY))
    # The Job mode (the default is bare pods): test_operator_eks_pods.py runs these tests in that.
    op = OperatorProcess({**cluster.env, api.WORKLOAD_ENV: "job"}, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    yield op
    op.stop()
    cluster.kubectl("delete", "-f", str(POLICY), "--ignore-not-found")


def finetune(name: str, *, nodes: int = 1, gpus: int = 8, run_for: str = "3s", fail: int | None = None,
             run_policy: dict | None = None, **spec: object) -> dict:
    annotations = {"kwok.alpaca.dev/complete-after": run_for}
    if fail is not None:
        annotations["kwok.alpaca.dev/fail-exit-code"] = str(fail)
    return {
        "apiVersion": "alpaca.dev/v1alpha1", "kind": "AlpacaFineTune",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "s3://alpaca-test/models/tiny/"},
            "data": {"uri": "s3://alpaca-test/data/alpaca_data.json"},
            "output": {"uri": f"s3://alpaca-test/runs/{name}/"},
            "resources": {"nodes": nodes, "gpusPerNode": gpus, "instanceType": "p4d.24xlarge"},
            "podMetadata": {"annotations": annotations},
            "runPolicy": run_policy or {},
            **spec,
        },
    }


def jobs(cluster, namespace: str, name: str) -> list[dict]:
    return get_json(cluster, "jobs", "-n", namespace, "-l", f"alpaca.dev/finetune={name}")["items"]


def pods(cluster, namespace: str, name: str) -> list[dict]:
    return get_json(cluster, "pods", "-n", namespace, "-l", f"alpaca.dev/finetune={name}")["items"]


# The tests below that read a run's workload through these helpers run in both EKS modes:
# here with Jobs, and again in test_operator_eks_pods with bare pods (ALPACA_EKS_WORKLOAD=pods).

def bare(op: OperatorProcess) -> bool:
    """This operator runs a gang as bare pods, not as a Job."""
    return api.bare_pods_from_env(op.env)


def attempt_names(cluster, namespace: str, name: str) -> list[str]:
    """The attempts whose workload is still there, NAME-aA: its Job, or its bare pods."""
    found = {j["metadata"]["name"] for j in jobs(cluster, namespace, name)}
    found |= {api.job_name(name, int(p["metadata"]["labels"][api.LABEL_ATTEMPT])) for p in pods(cluster, namespace, name)
              if api.LABEL_JOB_NAME not in p["metadata"]["labels"]}
    return sorted(found)


def made_from(cluster, namespace: str, op: OperatorProcess, name: str, attempt: int) -> dict:
    """What the attempt's pods were made from (metadata and spec): its Job's pod template, or
    its bare rank 0 itself."""
    if bare(op):
        return get_json(cluster, "pod", api.pod_name(name, attempt, 0), "-n", namespace)
    job = get_json(cluster, "job", api.job_name(name, attempt), "-n", namespace)
    return {"metadata": job["metadata"], "spec": {**job["spec"]["template"]["spec"],
                                                  "activeDeadlineSeconds": job["spec"].get("activeDeadlineSeconds")}}


def workload_text(op: OperatorProcess, name: str, attempt: int) -> str:
    """How the operator's messages name the attempt's workload (what it failed to create)."""
    return f"Pod {api.pod_name(name, attempt, 0)}" if bare(op) else f"Job {api.job_name(name, attempt)}"


def event_reasons(cluster, namespace: str, name: str) -> list[str]:
    events = get_json(cluster, "events", "-n", namespace,
                      "--field-selector", f"involvedObject.name={name},involvedObject.kind=AlpacaFineTune")["items"]
    events.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
    return [e["reason"] for e in events]


def gpu_nodes(cluster) -> dict[str, dict]:
    nodes = get_json(cluster, "nodes", "-l", "nvidia.com/gpu.present=true")["items"]
    return {n["metadata"]["name"]: n["metadata"]["labels"] for n in nodes}


def dump(cluster, namespace: str, op: OperatorProcess):
    def text() -> str:
        out = cluster.kubectl("get", "aft,jobs,pods", "-n", namespace, "-o", "wide", check=False).stdout
        events = cluster.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False).stdout
        return f"{out}\n--- events ---\n{events[-6000:]}\n--- operator log ---\n{op.tail(40)}"
    return text


def expected_children(cluster, namespace: str, body: dict, attempt: int, bare_pods: bool = False) -> list[dict]:
    spec = parse_spec(body["spec"])
    run = Run(body["metadata"]["name"], namespace, body["metadata"]["uid"], 1, spec)
    ds = None
    if spec.deepspeed.config_map_ref:
        cm = get_json(cluster, "configmap", spec.deepspeed.config_map_ref.name, "-n", namespace)
        ds = json.loads(cm["data"][spec.deepspeed.config_map_ref.key])
    deadline = spec.run_policy.active_deadline_seconds
    if bare_pods:
        service = [render.render_service(run)] if render.gang_needs_service(run) else []
        return service + render.render_pods(run, attempt, deadline_seconds=deadline, ds_config=ds)
    return render.render_children(run, attempt, deadline_seconds=deadline, ds_config=ds)


# What admission adds to every pod, and not to a Job's template: the DefaultTolerationSeconds
# plugin's tolerations, and the ServiceAccount plugin's API token volume.
DEFAULT_TOLERATIONS = {"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"}
TOKEN_VOLUME = "kube-api-access-"


def without_defaults(live: dict) -> dict:
    """A live pod without what admission added to it (a Job's template has none of it)."""
    if live.get("kind") != "Pod":
        return live
    spec = live["spec"]
    containers = [{**c, "volumeMounts": [m for m in c.get("volumeMounts") or () if not m["name"].startswith(TOKEN_VOLUME)]}
                  for c in spec["containers"]]
    return {**live, "spec": {**spec, "containers": containers,
                             "volumes": [v for v in spec.get("volumes") or () if not v["name"].startswith(TOKEN_VOLUME)],
                             "tolerations": [t for t in spec.get("tolerations") or ()
                                             if t.get("key") not in DEFAULT_TOLERATIONS]}}


# ---- samples -----------------------------------------------------------------------------

EKS_SAMPLES = [p for p in sorted(SAMPLES.glob("*.yaml"))
               if any(d and d.get("kind") == "AlpacaFineTune" and d["spec"].get("backend", "eks") == "eks"
                      for d in yaml.safe_load_all(p.read_text()))]


@pytest.mark.parametrize("sample", EKS_SAMPLES, ids=lambda p: p.name)
def test_sample_lifecycle(cluster, operator, namespace, sample):
    docs = [d for d in yaml.safe_load_all(sample.read_text()) if d]
    runs = [d for d in docs if d["kind"] == "AlpacaFineTune"]
    # What a user of the sample must have beforehand: its IRSA service account.
    for d in runs:
        if d["spec"].get("serviceAccountName"):
            cluster.kubectl("create", "serviceaccount", d["spec"]["serviceAccountName"], "-n", namespace)
    for d in docs:
        if d["kind"] != "AlpacaFineTune":
            apply(cluster, namespace, d)
    recorders = {d["metadata"]["name"]: PhaseRecorder(cluster.env, namespace, d["metadata"]["name"]) for d in runs}
    for d in runs:
        apply(cluster, namespace, d)

    nodes = gpu_nodes(cluster)
    for d in runs:
        name = d["metadata"]["name"]
        body = wait_for(f"{name} Launching", phase_is(cluster, namespace, name, "Launching", "Running", "Succeeded"),
                        on_timeout=dump(cluster, namespace, operator))
        # Every child, exactly as rendered (the API server's defaults aside), owned by the run.
        for want in expected_children(cluster, namespace, body, attempt=1, bare_pods=bare(operator)):
            kind, child = want["kind"].lower(), want["metadata"]["name"]
            live = without_defaults(get_json(cluster, kind, child, "-n", namespace))
            assert_subset(want, live, f"{want['kind']}/{child}")
            assert live["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
        # The namespace's trainer identity, exactly as rendered, owned by no run.
        run = Run(name, namespace, body["metadata"]["uid"], 1, parse_spec(body["spec"]))
        for want in render.render_trainer_identity(namespace, render.pod_service_account(run)):
            live = get_json(cluster, want["kind"].lower(), want["metadata"]["name"], "-n", namespace)
            assert_subset(want, live, f"{want['kind']}/{want['metadata']['name']}")
            assert not live["metadata"].get("ownerReferences")

        selector = made_from(cluster, namespace, operator, name, 1)["spec"].get("nodeSelector") or {}
        fits = [n for n, labels in nodes.items() if all(labels.get(k) == v for k, v in selector.items())]
        nodes_wanted = body["spec"]["resources"]["nodes"]
        if len(fits) < nodes_wanted:
            pytest.fail(f"{sample.name}: {name} selects {selector}, which {len(fits)} simulated GPU nodes match "
                        f"(it needs {nodes_wanted}); the samples must fit the demo nodegroup")

        final = wait_for(f"{name} Succeeded", phase_is(cluster, namespace, name, "Succeeded", "Failed"),
                         timeout=90, on_timeout=dump(cluster, namespace, operator))
        assert final["status"]["phase"] == "Succeeded", final["status"]
        landed = {p["spec"].get("nodeName") for p in pods(cluster, namespace, name)}
        assert landed and landed <= set(fits), landed
        st = final["status"]
        assert st["output"] == d["spec"]["output"]["uri"] and st["attempts"] == 1
        assert st["startTime"] and st["completionTime"] and st["observedGeneration"] == body["metadata"]["generation"]
        last = api.pod_name(name, 1, nodes_wanted - 1)
        workload = ({"pods": last if nodes_wanted == 1 else f"{name}-a1-0..{last}"} if bare(operator)
                    else {"job": f"{name}-a1"})
        assert st["workload"] == {**workload, **({"service": name} if nodes_wanted > 1 else {}),
                                  "serviceAccount": d["spec"].get("serviceAccountName") or "alpaca-trainer"}
        # Launched at once: the first status write is Launching's (no Pending, no Accepted).
        assert recorders[name].stop() == ["Launching", "Running", "Succeeded"]
        assert event_reasons(cluster, namespace, name) == ["Launching", "Running", "Succeeded"]
        preflight = [c for c in st["conditions"] if c["type"] == "Preflight"]
        assert [c["status"] for c in preflight] == ["True"], st["conditions"]   # written with Launching


def test_kubectl_get_columns_and_progress_from_rank0(cluster, operator, namespace, tmp_path):
    apply(cluster, namespace, finetune("cols", nodes=2, run_for="30s"))
    wait_for("Running", phase_is(cluster, namespace, "cols", "Running"), on_timeout=dump(cluster, namespace, operator))

    # Rank 0 reports progress with its pod's own token (docs/contract.md): that is all it may do.
    rank0 = next(p for p in pods(cluster, namespace, "cols")
                 if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0")
    token = cluster.kubectl("create", "token", "alpaca-trainer", "-n", namespace, "--bound-object-kind=Pod",
                            f"--bound-object-name={rank0['metadata']['name']}",
                            f"--bound-object-uid={rank0['metadata']['uid']}").stdout.strip()
    as_pod = token_env(cluster, token, tmp_path / "rank0.kubeconfig")
    progress = {"status": {"progress": {"stage": "training", "step": 120, "totalSteps": 400, "epoch": 0.9,
                                        "loss": 1.234, "learningRate": 1.9e-5, "tokensPerSecond": 5231.5,
                                        "eta": "00:42:10", "updatedAt": "2026-11-28T04:00:00Z"}}}
    patch_status_as(as_pod, namespace, "cols", progress["status"], check=True)
    for verb_args in (["patch", "alpacafinetune", "cols", "--type=merge", "-p", '{"spec":{"image":"x"}}'],
                      ["get", "pods"], ["delete", "alpacafinetune", "cols"], ["get", "secrets"],
                      ["get", "alpacafinetune", "cols"], ["get", "alpacafinetune", "cols", "--subresource=status"]):
        denied = kubectl_as(as_pod, *verb_args, "-n", namespace)
        assert denied.returncode != 0 and "forbidden" in denied.stderr.lower(), (verb_args, denied.stderr)
    denied = patch_status_as(as_pod, namespace, "cols", {"phase": "Succeeded"})
    assert denied.returncode != 0 and "status.phase is written only by the operator" in denied.stderr
    apply(cluster, namespace, finetune("other", run_for="30s"))
    other = patch_status_as(as_pod, namespace, "other", progress["status"])
    assert other.returncode != 0 and "forbidden" in other.stderr.lower()

    wait_for("the Progress column", lambda: aft(cluster, namespace, "cols")["status"]["progress"].get("display") == "120/400",
             on_timeout=dump(cluster, namespace, operator))
    out = cluster.kubectl("get", "aft", "cols", "-n", namespace).stdout.splitlines()
    header, row = out[0].split(), out[1].split()
    assert header == ["NAME", "PHASE", "BACKEND", "NODES", "GPUS/NODE", "REASON", "PROGRESS", "LOSS", "AGE"], header
    assert row[:8] == ["cols", "Running", "eks", "2", "8", "Running", "120/400", "1.234"], row
    # rank 0 says it is uploading: the phase follows
    patch_status_as(as_pod, namespace, "cols", {"progress": {
        "stage": "uploading", "step": 400, "updatedAt": "2099-01-01T00:00:00Z"}}, check=True)
    wait_for("Uploading", phase_is(cluster, namespace, "cols", "Uploading"), on_timeout=dump(cluster, namespace, operator))
    assert aft(cluster, namespace, "cols")["status"]["progress"]["display"] == "400/400"


def test_worker_failure_restarts_the_gang_then_fails(cluster, operator, namespace):
    apply(cluster, namespace, finetune("flaky", nodes=2, run_for="2s", fail=3, run_policy={"backoffLimit": 2}))
    body = wait_for("Failed", phase_is(cluster, namespace, "flaky", "Failed", "Succeeded"), timeout=90,
                    on_timeout=dump(cluster, namespace, operator))
    st = body["status"]
    assert st["phase"] == "Failed" and st["attempts"] == 3
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "BackoffLimitExceeded"
    assert "exited with code 3" in failed["message"] and "flaky-a3-" in failed["message"]
    assert "exited with code 3" in st["message"]
    # The last attempt's workload stays for `kubectl logs`, and failedJobsHistoryLimit (1) earlier one.
    assert attempt_names(cluster, namespace, "flaky") == ["flaky-a2", "flaky-a3"]
    assert {p["metadata"]["labels"]["alpaca.dev/attempt"] for p in pods(cluster, namespace, "flaky")} == {"2", "3"}
    assert [h["outcome"] for h in st["attemptHistory"]] == ["Failed"] * 3
    reasons = event_reasons(cluster, namespace, "flaky")
    assert reasons.count("Restarting") == 2 and reasons[-1] == "BackoffLimitExceeded", reasons


def test_delete_while_running_removes_everything(cluster, operator, namespace):
    apply(cluster, namespace, finetune("doomed", nodes=2, run_for="120s"))
    wait_for("Running", phase_is(cluster, namespace, "doomed", "Running"), on_timeout=dump(cluster, namespace, operator))
    cluster.kubectl("delete", "alpacafinetune", "doomed", "-n", namespace, "--wait=true", timeout=60)

    def leftovers():
        out = cluster.kubectl("get", "jobs,pods,services,configmaps,serviceaccounts,roles,rolebindings",
                              "-n", namespace, "-l", "alpaca.dev/finetune=doomed", "-o", "name").stdout.split()
        return out or None
    wait_for("the children to be garbage-collected", lambda: not leftovers(), timeout=60,
             on_timeout=lambda: str(leftovers()))


def test_suspend_and_resume(cluster, operator, namespace):
    apply(cluster, namespace, finetune("pause", nodes=2, run_for="8s", run_policy={"activeDeadlineSeconds": 600}))
    wait_for("Running", phase_is(cluster, namespace, "pause", "Running"), on_timeout=dump(cluster, namespace, operator))
    cluster.kubectl("patch", "alpacafinetune", "pause", "-n", namespace, "--type=merge",
                    "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    wait_for("Suspended", phase_is(cluster, namespace, "pause", "Suspended"), on_timeout=dump(cluster, namespace, operator))
    # The attempt's Job is held in place (spec.suspend, as Kueue suspends it) and its pods go.
    held = wait_for("the pods to go away", lambda: (lambda js: js[0] if not pods(cluster, namespace, "pause") and len(js) == 1
                                                    and js[0]["spec"].get("suspend") else None)(
        jobs(cluster, namespace, "pause")), timeout=30, on_timeout=dump(cluster, namespace, operator))
    assert held["metadata"]["name"] == "pause-a1" and "Failed" not in str(held["status"].get("conditions"))
    cluster.kubectl("get", "service/pause", "-n", namespace)

    cluster.kubectl("patch", "alpacafinetune", "pause", "-n", namespace, "--type=merge",
                    "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    wait_for("Running again", phase_is(cluster, namespace, "pause", "Running"), on_timeout=dump(cluster, namespace, operator))
    job = get_json(cluster, "job", "pause-a1", "-n", namespace)   # the same Job, released
    assert job["metadata"]["uid"] == held["metadata"]["uid"] and not job["spec"].get("suspend")
    assert job["spec"]["activeDeadlineSeconds"] < 600                # what is left of the deadline
    body = wait_for("Succeeded", phase_is(cluster, namespace, "pause", "Succeeded"), timeout=60,
                    on_timeout=dump(cluster, namespace, operator))
    assert body["status"]["attempts"] == 1      # a resume is not a restart
    reasons = event_reasons(cluster, namespace, "pause")
    assert reasons == ["Launching", "Running", "Suspended", "Resumed", "Running", "Succeeded"], reasons


def test_deadline_exceeded(cluster, operator, namespace):
    apply(cluster, namespace, finetune("slow", nodes=1, run_for="300s",
                                       run_policy={"activeDeadlineSeconds": 5, "backoffLimit": 3}))
    body = wait_for("Failed", phase_is(cluster, namespace, "slow", "Failed"), timeout=60,
                    on_timeout=dump(cluster, namespace, operator))
    failed = next(c for c in body["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "DeadlineExceeded" and body["status"]["attempts"] == 1
    if bare(operator):
        # kwok does not enforce a pod's activeDeadlineSeconds: the operator does, and deletes them.
        wait_for("the pods to go", lambda: not [p for p in pods(cluster, namespace, "slow")
                                                if not p["metadata"].get("deletionTimestamp")], timeout=30,
                 on_timeout=dump(cluster, namespace, operator))
    else:
        wait_for("the pods to be stopped", lambda: all(p["status"]["phase"] != "Running"
                                                        for p in pods(cluster, namespace, "slow")), timeout=30)


def test_ttl_deletes_children_but_keeps_the_run(cluster, operator, namespace):
    apply(cluster, namespace, finetune("brief", run_for="1s", run_policy={"ttlSecondsAfterFinished": 3}))
    wait_for("Succeeded", phase_is(cluster, namespace, "brief", "Succeeded"), timeout=60,
             on_timeout=dump(cluster, namespace, operator))

    def cleaned():
        st = aft(cluster, namespace, "brief")["status"]
        return any(c["type"] == "ChildrenDeleted" and c["status"] == "True" for c in st["conditions"])
    wait_for("ChildrenDeleted", cleaned, timeout=30, on_timeout=dump(cluster, namespace, operator))
    # Requested: the Job goes once its pods have (deleted in the foreground).
    wait_for("the children gone", lambda: not cluster.kubectl(
        "get", "jobs,pods,services,configmaps,roles,rolebindings", "-n", namespace, "-l", "alpaca.dev/finetune=brief",
        "-o", "name").stdout.split(), timeout=30, on_timeout=dump(cluster, namespace, operator))
    # The namespace's trainer identity is not the run's: it stays for the next one.
    cluster.kubectl("get", "sa/alpaca-trainer", "role/alpaca-trainer-progress", "rolebinding/alpaca-trainer-progress",
                    "-n", namespace)
    assert aft(cluster, namespace, "brief")["status"]["phase"] == "Succeeded"


def test_missing_deepspeed_configmap_waits_in_pending(cluster, operator, namespace):
    run = finetune("byo-ds", deepspeed={"configMapRef": {"name": "later", "key": "ds.json"}})
    apply(cluster, namespace, run)

    def blocked():
        st = aft(cluster, namespace, "byo-ds").get("status", {})
        return st.get("phase") == "Pending" and any(c["reason"] == "ConfigMapNotFound" for c in st.get("conditions", []))
    wait_for("Pending with ConfigMapNotFound", blocked, on_timeout=dump(cluster, namespace, operator))
    assert attempt_names(cluster, namespace, "byo-ds") == []
    # The refused first launch wrote the run's first status: the preflight's result is in it.
    conditions = aft(cluster, namespace, "byo-ds")["status"]["conditions"]
    assert [c["status"] for c in conditions if c["type"] == "Preflight"] == ["True"], conditions
    ds = {"zero_optimization": {"stage": 2}, "train_batch_size": "auto"}
    cluster.kubectl("create", "configmap", "later", "-n", namespace, f"--from-literal=ds.json={json.dumps(ds)}")
    wait_for("Succeeded once the ConfigMap exists", phase_is(cluster, namespace, "byo-ds", "Succeeded"), timeout=90,
             on_timeout=dump(cluster, namespace, operator))
    env = _env_of(made_from(cluster, namespace, operator, "byo-ds", 1))
    assert json.loads(env["ALPACA_DEEPSPEED_CONFIG"]) == ds


def test_a_deleted_trainer_account_is_made_again(cluster, operator, namespace):
    """The namespace's trainer identity is made once and then trusted; someone deletes its
    ServiceAccount: the next run's pods cannot be created, the operator sees why, makes it
    again, and the Job controller's next try creates them."""
    apply(cluster, namespace, finetune("before", run_for="1s"))
    wait_for("Succeeded", phase_is(cluster, namespace, "before", "Succeeded"), timeout=60,
             on_timeout=dump(cluster, namespace, operator))
    old = get_json(cluster, "sa", "alpaca-trainer", "-n", namespace)
    cluster.kubectl("delete", "sa", "alpaca-trainer", "-n", namespace, "--wait=true")
    apply(cluster, namespace, finetune("after", run_for="1s"))
    wait_for("Succeeded", phase_is(cluster, namespace, "after", "Succeeded"), timeout=90,
             on_timeout=dump(cluster, namespace, operator))
    new = get_json(cluster, "sa", "alpaca-trainer", "-n", namespace)
    assert new["metadata"]["uid"] != old["metadata"]["uid"]


def test_an_earlier_versions_trainer_role_is_narrowed_to_patch(cluster, operator, namespace):
    """Earlier operators gave the namespace's trainer Role get as well as patch on the runs'
    status, which let a run's pods read every run of the namespace. The first launch there
    narrows such a Role in place, and the run goes on as ever."""
    legacy = render.render_trainer_identity(namespace, "alpaca-trainer")[1]
    legacy["rules"] = render.LEGACY_TRAINER_RULES
    cluster.kubectl("create", "-f", "-", input=json.dumps(legacy))
    apply(cluster, namespace, finetune("narrowed", run_for="1s"))
    wait_for("Succeeded", phase_is(cluster, namespace, "narrowed", "Succeeded"), timeout=60,
             on_timeout=dump(cluster, namespace, operator))
    role = get_json(cluster, "role", "alpaca-trainer-progress", "-n", namespace)
    assert role["rules"] == [{"apiGroups": ["alpaca.dev"], "resources": ["alpacafinetunes/status"], "verbs": ["patch"]}]


# ---- disruptions, permanent errors, failures the user can see (issue 11) --------------------

def conditions(body: dict) -> dict[str, dict]:
    return {c["type"]: c for c in body.get("status", {}).get("conditions", [])}


def events(cluster, namespace: str, name: str) -> list[dict]:
    found = get_json(cluster, "events", "-n", namespace,
                     "--field-selector", f"involvedObject.name={name},involvedObject.kind=AlpacaFineTune")["items"]
    return sorted(found, key=lambda e: int(e["metadata"]["resourceVersion"]))


def test_a_create_the_api_server_fails_shows_in_the_status_and_is_tried_again(cluster, operator, namespace):
    """An admission webhook that is down makes the API server answer 500 to the Job's
    create. The new run says so (Pending, BackendAvailable False, one Warning), not a blank
    phase, and runs once the webhook is gone."""
    name, hook = "eks-hook-down", f"alpaca-test-down-{namespace}"
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": hook},
        "webhooks": [{
            "name": "down.alpaca.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "failurePolicy": "Fail", "timeoutSeconds": 2,
            "clientConfig": {"url": "https://127.0.0.1:1/validate"},     # nothing listens
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "rules": [{"apiGroups": ["batch"], "apiVersions": ["v1"], "operations": ["CREATE"],
                       "resources": ["jobs"]},
                      {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                       "resources": ["pods"]}]}]}))

    def available(body: dict) -> dict:
        return next((c for c in (body.get("status") or {}).get("conditions") or ()
                     if c["type"] == "BackendAvailable"), {})
    try:
        apply(cluster, namespace, finetune(name))
        body = wait_for("BackendAvailable False", lambda: (lambda b: b if available(b).get("status") == "False"
                                                           else None)(aft(cluster, namespace, name)),
                        timeout=60, on_timeout=dump(cluster, namespace, operator))
        cond = available(body)
        assert body["status"]["phase"] == "Pending" and cond["reason"] == "BackendUnavailable", body["status"]
        assert f"could not create {workload_text(operator, name, 1)}: 500" in cond["message"], cond
        assert "down.alpaca.dev" in cond["message"] and "next try at" in cond["message"], cond
        assert not attempt_names(cluster, namespace, name)
    finally:
        cluster.kubectl("delete", "validatingwebhookconfiguration", hook, "--ignore-not-found")
    body = wait_for("Succeeded", phase_is(cluster, namespace, name, "Succeeded"), timeout=120,
                    on_timeout=dump(cluster, namespace, operator))
    assert body["status"]["attempts"] == 1 and attempt_names(cluster, namespace, name) == [f"{name}-a1"]
    assert available(body)["status"] == "True" and available(body)["reason"] == "BackendAnswers"
    reasons = event_reasons(cluster, namespace, name)
    assert reasons.count("BackendUnavailable") == 1 and reasons.count("BackendAnswers") == 1, reasons


def test_a_disruption_restarts_the_gang_without_using_the_backoff_limit(cluster, operator, namespace):
    apply(cluster, namespace, finetune("spot", nodes=2, run_for="8s", run_policy={"backoffLimit": 0}))
    wait_for("Running", phase_is(cluster, namespace, "spot", "Running"), on_timeout=dump(cluster, namespace, operator))
    # The node of rank 0 is reclaimed: DisruptionTarget, then SIGTERM (exit 143).
    rank0 = next(p for p in pods(cluster, namespace, "spot")
                 if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0")
    cluster.kubectl("annotate", "pod", rank0["metadata"]["name"], "-n", namespace, "kwok.alpaca.dev/disrupt=true")
    body = wait_for("Succeeded", phase_is(cluster, namespace, "spot", "Succeeded", "Failed"), timeout=60,
                    on_timeout=dump(cluster, namespace, operator))
    st = body["status"]
    assert st["phase"] == "Succeeded" and st["attempts"] == 2 and st["disruptions"] == 1, st
    first, second = st["attemptHistory"]
    assert first["outcome"] == "Disrupted" and first["worker"] == rank0["metadata"]["name"]
    assert first["exitCode"] == 143 and second["outcome"] == "Succeeded"
    restart = next(e for e in events(cluster, namespace, "spot") if e["reason"] == "Restarting")
    assert restart["type"] == "Warning" and "disrupted" in restart["message"] and "backoffLimit not used" in restart["message"]


def test_a_permanent_exit_code_fails_at_once_with_the_pods_reason(cluster, operator, namespace):
    run = finetune("baddata", run_for="1s", fail=65, run_policy={"backoffLimit": 3})
    run["spec"]["podMetadata"]["annotations"]["kwok.alpaca.dev/termination-message"] = \
        "alpaca_data.json: record 3 has no instruction"
    apply(cluster, namespace, run)
    body = wait_for("Failed", phase_is(cluster, namespace, "baddata", "Failed", "Succeeded"), timeout=60,
                    on_timeout=dump(cluster, namespace, operator))
    st = body["status"]
    failed = conditions(body)["Failed"]
    assert st["attempts"] == 1 and failed["reason"] == "PermanentFailure", st
    assert "exited with code 65 (bad input data): alpaca_data.json: record 3 has no instruction" in failed["message"]
    assert attempt_names(cluster, namespace, "baddata") == ["baddata-a1"]   # no retry
    assert st["attemptHistory"][0]["exitCode"] == 65


def test_a_run_that_cannot_start_counts_nothing_and_can_still_be_fixed(cluster, operator, namespace):
    cluster.kubectl("create", "configmap", "my-ds-config", "-n", namespace,
                    "--from-literal=ds_config.json={\"zero_optimization\": {\"stage\": 2}}")
    cluster.kubectl("create", "quota", "no-jobs", "-n", namespace, "--hard=count/jobs.batch=0,count/pods=0")
    apply(cluster, namespace, finetune("typo", run_for="2s", deepspeed={"configMapRef": {"name": "my-ds-confg"}},
                                       run_policy={"activeDeadlineSeconds": 600}))

    def pending(reason):
        def check():
            body = aft(cluster, namespace, "typo")
            created = conditions(body).get("Created") or {}
            return body if body["status"].get("phase") == "Pending" and created.get("reason") == reason else None
        return check
    body = wait_for("ConfigMapNotFound", pending("ConfigMapNotFound"), on_timeout=dump(cluster, namespace, operator))
    assert "startTime" not in body["status"] and "attempts" not in body["status"]
    # Nothing started, so the typo can be fixed (spec.deepspeed is immutable only once started).
    cluster.kubectl("patch", "aft", "typo", "-n", namespace, "--type=merge",
                    "-p", '{"spec":{"deepspeed":{"configMapRef":{"name":"my-ds-config"}}}}')
    # The quota refuses the Job (or the bare pod): the server's message, and Pending without a hot loop.
    body = wait_for("CreateRejected", pending("CreateRejected"), timeout=20, on_timeout=dump(cluster, namespace, operator))
    created = conditions(body)["Created"]
    assert "exceeded quota: no-jobs" in created["message"] and workload_text(operator, "typo", 1) in created["message"], \
        created
    assert "startTime" not in body["status"] and "attempts" not in body["status"]
    time.sleep(4)
    assert aft(cluster, namespace, "typo")["metadata"]["resourceVersion"] == body["metadata"]["resourceVersion"]
    assert [e["reason"] for e in events(cluster, namespace, "typo")].count("CreateRejected") == 1
    # The cluster changes; the next look (or any change to the run) launches it.
    cluster.kubectl("delete", "quota", "no-jobs", "-n", namespace)
    cluster.kubectl("annotate", "aft", "typo", "-n", namespace, "example.com/poke=1")
    body = wait_for("Succeeded", phase_is(cluster, namespace, "typo", "Succeeded"), timeout=30,
                    on_timeout=dump(cluster, namespace, operator))
    made = made_from(cluster, namespace, operator, "typo", 1)
    # The run started when its gang ran, not before its workload existed.
    assert body["status"]["startTime"] >= made["metadata"]["creationTimestamp"] and body["status"]["attempts"] == 1
    assert made["spec"]["activeDeadlineSeconds"] == 600          # the deadline counts from the real start


def test_workers_that_cannot_start_say_why_within_seconds(cluster, operator, namespace):
    # Its nodes exist (so it is not Unsatisfiable), but its affinity rules every one of them out.
    nowhere = finetune("nowhere", nodes=2, affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "eks.amazonaws.com/nodegroup", "operator": "In",
                                                     "values": ["gpu-p5"]}]}]}}})
    nopull = finetune("nopull")
    nopull["spec"]["podMetadata"]["annotations"]["kwok.alpaca.dev/image-pull-error"] = "true"
    apply(cluster, namespace, nowhere, nopull)

    def says(name, reason, text):
        def check():
            body = aft(cluster, namespace, name)
            running = conditions(body).get("Running") or {}
            return body if running.get("reason") == reason and text in body["status"].get("message", "") else None
        return check
    body = wait_for("Unschedulable", says("nowhere", "Unschedulable", "nodes are available"), timeout=20,
                    on_timeout=dump(cluster, namespace, operator))
    assert body["status"]["phase"] == "Launching" and "node affinity/selector" in body["status"]["message"]
    wait_for("ImagePullFailed", says("nopull", "ImagePullFailed", "ErrImagePull"), timeout=20,
             on_timeout=dump(cluster, namespace, operator))
    wide = cluster.kubectl("get", "aft", "nopull", "-n", namespace, "-o", "wide").stdout
    assert "ErrImagePull" in wide
    for name, reason in (("nowhere", "Unschedulable"), ("nopull", "ImagePullFailed")):
        warn = [e for e in events(cluster, namespace, name) if e["reason"] == reason]
        assert len(warn) == 1 and warn[0]["type"] == "Warning", events(cluster, namespace, name)
    cluster.kubectl("delete", "aft", "nowhere", "nopull", "-n", namespace, "--wait=true", timeout=60)
    cluster.kubectl("create", "quota", "no-pods", "-n", namespace, "--hard=pods=0")
    apply(cluster, namespace, finetune("noquota"))
    if bare(operator):
        # The operator creates bare pods itself: the quota's refusal is the create's answer.
        def refused():
            body = aft(cluster, namespace, "noquota")
            created = conditions(body).get("Created") or {}
            return body if created.get("reason") == "CreateRejected" and "exceeded quota: no-pods" in created.get(
                "message", "") else None
        wait_for("CreateRejected", refused, timeout=30, on_timeout=dump(cluster, namespace, operator))
    else:
        # Pods the Job controller cannot create (a quota) are only in the Job's Events: FailedCreate.
        wait_for("FailedCreate", says("noquota", "FailedCreate", "exceeded quota: no-pods"), timeout=30,
                 on_timeout=dump(cluster, namespace, operator))


def test_a_recreated_run_never_sees_the_old_runs_job(cluster, operator, namespace):
    apply(cluster, namespace, finetune("again", run_for="1s"))
    wait_for("Succeeded", phase_is(cluster, namespace, "again", "Succeeded"), timeout=60,
             on_timeout=dump(cluster, namespace, operator))
    old = made_from(cluster, namespace, operator, "again", 1)
    # Deleted without its children (they stay, ownerless), and created again.
    cluster.kubectl("delete", "aft", "again", "-n", namespace, "--cascade=orphan", "--wait=true")
    wait_for("the orphaned workload", lambda: not made_from(cluster, namespace, operator, "again", 1)["metadata"].get(
        "ownerReferences"), timeout=30)
    apply(cluster, namespace, finetune("again", run_for="1s"))

    def refused():
        body = aft(cluster, namespace, "again")
        return body if (conditions(body).get("Created") or {}).get("reason") == "NameConflict" else None
    body = wait_for("NameConflict", refused, timeout=20, on_timeout=dump(cluster, namespace, operator))
    time.sleep(12)     # two more looks at the leftovers: the same message, no second Event
    body = aft(cluster, namespace, "again")
    assert body["status"]["phase"] == "Pending" and "completionTime" not in body["status"], body["status"]
    assert made_from(cluster, namespace, operator, "again", 1)["metadata"]["uid"] == old["metadata"]["uid"]
    # Every leftover in one message, in a fixed order, with the command that removes them.
    message = conditions(body)["Created"]["message"]
    stale = ["pod/again-a1-0"] if bare(operator) else ["job/again-a1"]
    assert f"1 object(s) with this run's names already exist" in message and ", ".join(stale) in message, message
    assert f"kubectl -n {namespace} delete {' '.join(stale)}" in message, message
    assert [e["reason"] for e in events(cluster, namespace, "again")].count("NameConflict") == 1
    # The user removes the leftovers: the new run starts on its own, without a poke.
    cluster.kubectl("-n", namespace, "delete", *stale, "--wait=true", timeout=60)
    wait_for("Succeeded", phase_is(cluster, namespace, "again", "Succeeded"), timeout=40,
             on_timeout=dump(cluster, namespace, operator))
    new = made_from(cluster, namespace, operator, "again", 1)
    assert new["metadata"]["ownerReferences"][0]["uid"] == aft(cluster, namespace, "again")["metadata"]["uid"]


def test_a_resumed_gang_never_runs_beside_its_old_pods(cluster, operator, namespace):
    """The held Job is released in place: the Job controller makes a pod of an index again only
    once the old one is terminal (podReplacementPolicy Failed, with a podFailurePolicy), so
    no two incarnations of NAME-aA-I run at once, whatever holds the old object."""
    apply(cluster, namespace, finetune("hold", run_for="60s"))
    wait_for("Running", phase_is(cluster, namespace, "hold", "Running"), on_timeout=dump(cluster, namespace, operator))
    old = pods(cluster, namespace, "hold")[0]["metadata"]["name"]
    cluster.kubectl("patch", "pod", old, "-n", namespace, "--type=merge",
                    "-p", '{"metadata":{"finalizers":["example.com/hold"]}}')
    try:
        cluster.kubectl("patch", "aft", "hold", "-n", namespace, "--type=merge",
                        "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
        wait_for("the Job held, its pod terminating", lambda: any(j["spec"].get("suspend") for j in jobs(
            cluster, namespace, "hold")) and all(p["metadata"].get("deletionTimestamp") for p in pods(
                cluster, namespace, "hold")), timeout=30, on_timeout=dump(cluster, namespace, operator))
        (job,) = jobs(cluster, namespace, "hold")
        assert job["spec"]["podReplacementPolicy"] == "Failed"
        cluster.kubectl("patch", "aft", "hold", "-n", namespace, "--type=merge",
                        "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
        wait_for("Running again", phase_is(cluster, namespace, "hold", "Running"), timeout=30,
                 on_timeout=dump(cluster, namespace, operator))
        now = {p["metadata"]["name"]: p for p in pods(cluster, namespace, "hold")}
        live = [n for n, p in now.items() if p["status"].get("phase") not in ("Failed", "Succeeded")]
        assert len(live) == 1 and live[0] != old, {n: p["status"].get("phase") for n, p in now.items()}
        assert old not in now or now[old]["status"]["phase"] == "Failed"
    finally:
        cluster.kubectl("patch", "pod", old, "-n", namespace, "--type=merge", "-p", '{"metadata":{"finalizers":null}}',
                        check=False)


def test_a_replaced_gang_waits_for_its_old_pods_to_go(cluster, operator, namespace):
    """A corrected pending gang is a new Job of the same name: while a pod of the old one is
    still terminating, the new one's pods would meet it under the same hostname."""
    run = finetune("linger", run_for="2s")
    run["spec"]["resources"]["cpu"] = "500"
    apply(cluster, namespace, run)
    wait_for("Unschedulable", lambda: aft(cluster, namespace, "linger")["status"].get("reason") == "Unschedulable",
             timeout=30, on_timeout=dump(cluster, namespace, operator))
    old = pods(cluster, namespace, "linger")[0]["metadata"]["name"]
    cluster.kubectl("patch", "pod", old, "-n", namespace, "--type=merge",
                    "-p", '{"metadata":{"finalizers":["example.com/hold"]}}')
    try:
        cluster.kubectl("patch", "aft", "linger", "-n", namespace, "--type=merge", "-p", '{"spec":{"resources":{"cpu":"4"}}}')
        # Deleted in the foreground: the old Job stays, being deleted, while its pod does.
        gone = wait_for("the old Job being deleted", lambda: [j for j in jobs(cluster, namespace, "linger")
                                                             if j["metadata"].get("deletionTimestamp")],
                        timeout=30, on_timeout=dump(cluster, namespace, operator))
        time.sleep(4)
        assert [j["metadata"]["uid"] for j in jobs(cluster, namespace, "linger")] == [gone[0]["metadata"]["uid"]], \
            "a new Job met the old, terminating pod"
    finally:
        cluster.kubectl("patch", "pod", old, "-n", namespace, "--type=merge", "-p", '{"metadata":{"finalizers":null}}',
                        check=False)
    body = wait_for("Succeeded", phase_is(cluster, namespace, "linger", "Succeeded", "Failed"), timeout=60,
                    on_timeout=dump(cluster, namespace, operator))
    assert body["status"]["phase"] == "Succeeded" and body["status"]["attempts"] == 1


def _env_of(made: dict) -> dict[str, str]:
    """The environment of what made_from returns."""
    return {e["name"]: e.get("value") for e in made["spec"]["containers"][0]["env"]}


def test_a_non_finite_loss_fails_the_run_at_once_with_the_step_and_the_last_good_checkpoint(
        cluster, operator, namespace):
    run = finetune("diverge", run_for="1s", fail=67, run_policy={"backoffLimit": 3})
    run["spec"]["podMetadata"]["annotations"]["kwok.alpaca.dev/termination-message"] = (
        "alpaca-loss: kind=not-finite first=12 last=14 checkpoint=10; the loss was not finite (nan) at steps 12-14")
    apply(cluster, namespace, run)
    body = wait_for("Failed", phase_is(cluster, namespace, "diverge", "Failed", "Succeeded"), timeout=60,
                    on_timeout=dump(cluster, namespace, operator))
    failed = conditions(body)["Failed"]
    assert failed["reason"] == "LossNotFinite" and body["status"]["attempts"] == 1, body["status"]
    assert "not finite at step 14" in failed["message"] and "checkpoint-10 in s3://alpaca-test/runs/diverge/" \
        in failed["message"]
    assert attempt_names(cluster, namespace, "diverge") == ["diverge-a1"]   # no retry
    assert body["status"]["attemptHistory"][0]["resumeFromStep"] == 10


def test_a_loss_spike_restarts_and_the_next_attempt_is_told_the_steps_to_skip(cluster, operator, namespace):
    run = finetune("spike", run_for="1s", fail=68, run_policy={"backoffLimit": 1},
                   training={"lossSpike": {"factor": 4}})
    run["spec"]["podMetadata"]["annotations"]["kwok.alpaca.dev/termination-message"] = (
        "alpaca-loss: kind=spike first=7 last=9 checkpoint=4; loss spike at steps 7-9")
    apply(cluster, namespace, run)
    body = wait_for("Failed", phase_is(cluster, namespace, "spike", "Failed", "Succeeded"), timeout=60,
                    on_timeout=dump(cluster, namespace, operator))
    st = body["status"]
    assert st["attempts"] == 2 and conditions(body)["Failed"]["reason"] == "BackoffLimitExceeded", st
    assert [(e["reason"], e["skipSteps"], e["resumeFromStep"]) for e in st["attemptHistory"]] == \
        [("LossSpike", "7-9", 4)] * 2
    assert attempt_names(cluster, namespace, "spike") == ["spike-a1", "spike-a2"]
    env = {a: _env_of(made_from(cluster, namespace, operator, "spike", a)) for a in (1, 2)}
    # The second attempt's workload, created right after the first failed, already has the range.
    assert "ALPACA_SKIP_STEPS" not in env[1] and env[2]["ALPACA_SKIP_STEPS"] == "7-9"
    assert "skipping steps 7-9" in next(e["message"] for e in events(cluster, namespace, "spike")
                                        if e["reason"] == "Restarting")


def test_shared_cluster_pod_settings_reach_the_pods_and_the_run_succeeds(cluster, operator, namespace):
    """spec.imagePullSecrets, volumes, volumeMounts, affinity, topologySpreadConstraints,
    schedulerName and priorityClassName, as the scheduler and the kubelet get them."""
    priority = f"alpaca-test-{namespace}"
    cluster.kubectl("create", "priorityclass", priority, "--value=1000")
    cluster.kubectl("create", "configmap", "shared-models", "-n", namespace, "--from-literal=README=models")
    try:
        run = finetune("shared", nodes=2, run_for="2s",
                       imagePullSecrets=[{"name": "regcred"}],
                       volumes=[{"name": "models", "configMap": {"name": "shared-models"}},
                                {"name": "scratch", "emptyDir": {"sizeLimit": "10Gi"}}],
                       volumeMounts=[{"name": "models", "mountPath": "/models", "readOnly": True},
                                     {"name": "scratch", "mountPath": "/scratch"}],
                       affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                           "nodeSelectorTerms": [{"matchExpressions": [
                               {"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}]}]}}},
                       topologySpreadConstraints=[{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                                   "whenUnsatisfiable": "DoNotSchedule",
                                                   "labelSelector": {"matchLabels": {"alpaca.dev/finetune": "shared"}}}],
                       schedulerName="default-scheduler", priorityClassName=priority)
        apply(cluster, namespace, run)
        body = wait_for("Succeeded", phase_is(cluster, namespace, "shared", "Succeeded", "Failed"), timeout=90,
                        on_timeout=dump(cluster, namespace, operator))
        assert body["status"]["phase"] == "Succeeded", body["status"]
        live = pods(cluster, namespace, "shared")
        assert len(live) == 2
        for pod in live:
            spec = pod["spec"]
            assert spec["imagePullSecrets"] == [{"name": "regcred"}]
            assert {"name": "models", "configMap": {"name": "shared-models", "defaultMode": 420}} in spec["volumes"]
            assert {"name": "models", "mountPath": "/models", "readOnly": True} in spec["containers"][0]["volumeMounts"]
            assert spec["affinity"] == run["spec"]["affinity"]
            assert spec["topologySpreadConstraints"] == run["spec"]["topologySpreadConstraints"]
            # The admission plugin resolved the class: the scheduler ranks the pods by it.
            assert (spec["schedulerName"], spec["priorityClassName"], spec["priority"]) == \
                ("default-scheduler", priority, 1000)
        # maxSkew 1 by hostname: the gang of two sits on two nodes.
        assert len({p["spec"]["nodeName"] for p in live}) == 2
    finally:
        cluster.kubectl("delete", "priorityclass", priority, "--ignore-not-found")


def test_an_impossible_gang_fails_at_once_and_never_makes_a_pod(cluster, operator, namespace):
    started = time.monotonic()
    apply(cluster, namespace, finetune("huge", nodes=64))
    body = wait_for("Failed", phase_is(cluster, namespace, "huge", "Failed", "Launching", "Running"), timeout=10,
                    on_timeout=dump(cluster, namespace, operator))
    assert time.monotonic() - started < 10
    failed = conditions(body)["Failed"]
    assert body["status"]["phase"] == "Failed" and failed["reason"] == "Unsatisfiable", body["status"]
    assert ('needs 64 nodes x 8 nvidia.com/gpu matching {"node.kubernetes.io/instance-type": "p4d.24xlarge"}'
            in failed["message"]) and "the cluster has 4 such nodes" in failed["message"], failed
    assert jobs(cluster, namespace, "huge") == [] and pods(cluster, namespace, "huge") == []
    assert "Unsatisfiable" in cluster.kubectl("get", "aft", "huge", "-n", namespace).stdout   # the Reason column


def test_a_node_selector_typo_is_fixed_in_place_and_runs(cluster, operator, namespace):
    """whenUnsatisfiable Wait: the typo waits Pending (no pods), the patch launches it."""
    run = finetune("typo-sel", nodes=2, run_for="2s", run_policy={"whenUnsatisfiable": "Wait"})
    run["spec"]["resources"]["nodeSelector"] = {"eks.amazonaws.com/nodegroup": "gpu-p4dd"}
    apply(cluster, namespace, run)

    def waiting():
        body = aft(cluster, namespace, "typo-sel")
        return body if body["status"].get("reason") == "Unsatisfiable" else None
    body = wait_for("Unsatisfiable", waiting, timeout=20, on_timeout=dump(cluster, namespace, operator))
    assert body["status"]["phase"] == "Pending" and "gpu-p4dd" in body["status"]["message"]
    assert pods(cluster, namespace, "typo-sel") == []
    cluster.kubectl("patch", "aft", "typo-sel", "-n", namespace, "--type=merge",
                    "-p", '{"spec":{"resources":{"nodeSelector":{"eks.amazonaws.com/nodegroup":"gpu-p4d"}}}}')
    body = wait_for("Succeeded", phase_is(cluster, namespace, "typo-sel", "Succeeded", "Failed"), timeout=60,
                    on_timeout=dump(cluster, namespace, operator))
    assert body["status"]["phase"] == "Succeeded" and body["status"]["attempts"] == 1


def test_a_pending_gang_can_be_corrected_and_is_replaced(cluster, operator, namespace):
    """A gang that fits by GPUs but asks more cpu than any node has: Unschedulable, and not
    started, so spec.resources may still change; the edit replaces its pending pods."""
    run = finetune("greedy", nodes=2, run_for="2s")
    run["spec"]["resources"]["cpu"] = "500"
    apply(cluster, namespace, run)

    def unschedulable():
        body = aft(cluster, namespace, "greedy")
        return body if body["status"].get("reason") == "Unschedulable" else None
    body = wait_for("Unschedulable", unschedulable, timeout=30, on_timeout=dump(cluster, namespace, operator))
    assert "startTime" not in body["status"] and "Insufficient cpu" in body["status"]["message"], body["status"]["message"]
    old_uid = made_from(cluster, namespace, operator, "greedy", 1)["metadata"]["uid"]
    cluster.kubectl("patch", "aft", "greedy", "-n", namespace, "--type=merge",
                    "-p", '{"spec":{"resources":{"cpu":"4"}}}')
    body = wait_for("Succeeded", phase_is(cluster, namespace, "greedy", "Succeeded", "Failed"), timeout=60,
                    on_timeout=dump(cluster, namespace, operator))
    assert body["status"]["phase"] == "Succeeded" and body["status"]["attempts"] == 1, body["status"]
    assert attempt_names(cluster, namespace, "greedy") == ["greedy-a1"]
    made = made_from(cluster, namespace, operator, "greedy", 1)
    assert made["metadata"]["uid"] != old_uid and made["metadata"]["annotations"]["alpaca.dev/generation"] == "2"
    assert made["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "4"
    # Once started, spec.resources is immutable again.
    proc = cluster.kubectl("patch", "aft", "greedy", "-n", namespace, "--type=merge",
                           "-p", '{"spec":{"resources":{"cpu":"8"}}}', check=False)
    assert proc.returncode != 0 and "immutable" in proc.stderr


def test_a_gang_that_cannot_be_placed_now_holds_nothing_and_runs_when_nodes_free_up(cluster, operator, namespace):
    apply(cluster, namespace, finetune("hog", nodes=3, run_for="25s"))
    wait_for("hog Running", phase_is(cluster, namespace, "hog", "Running"), timeout=30,
             on_timeout=dump(cluster, namespace, operator))
    # Its first pod gets the fourth node; kwok ends each pod run_for after it starts, so
    # that pod must outlive the wait for the second one.
    apply(cluster, namespace, finetune("late", nodes=2, run_for="20s", run_policy={"schedulingTimeoutSeconds": 5}))

    def gave_back():
        body = aft(cluster, namespace, "late")
        return body if body["status"].get("reason") == "SchedulingTimeout" else None
    body = wait_for("SchedulingTimeout", gave_back, timeout=40, on_timeout=dump(cluster, namespace, operator))
    assert body["status"]["phase"] == "Pending" and "Insufficient nvidia.com/gpu" in body["status"]["message"]
    # Its placed pod went too: no GPU stays held by part of a gang.
    wait_for("no pods of late", lambda: not [p for p in pods(cluster, namespace, "late")
                                              if not p["metadata"].get("deletionTimestamp")] or None,
             timeout=15, on_timeout=dump(cluster, namespace, operator))
    body = wait_for("late Succeeded", phase_is(cluster, namespace, "late", "Succeeded", "Failed"), timeout=150,
                    on_timeout=dump(cluster, namespace, operator))
    st = body["status"]
    assert st["phase"] == "Succeeded" and st["disruptions"] >= 1, st
    *timed_out, done = st["attemptHistory"]
    assert timed_out and {h["reason"] for h in timed_out} == {"SchedulingTimeout"} and done["outcome"] == "Succeeded"
