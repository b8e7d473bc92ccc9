"""Crash safety: the operator is SIGKILLed at random moments, 20 times, while 10 runs go
through their lives (some restart their gang and fail). In the end every run has the
workload of its last attempt and of the failed one before it (failedJobsHistoryLimit 1),
and the terminal status it would have had anyway. In both EKS modes: Jobs, and bare pods
(ALPACA_EKS_WORKLOAD=pods, the default). And the operator restarted in the other mode while
runs are under way (an upgrade that changes it): each run keeps the kind it started with."""
from __future__ import annotations

import json
import random
import time

import pytest

from alpaca_operator import api
from operator_harness import OperatorProcess, get_json, wait_for
from test_operator_eks import attempt_names

KILLS = 20
OK, FLAKY = 7, 3


def run(name: str, *, fail: bool, seconds: int) -> dict:
    annotations = {"kwok.alpaca.dev/complete-after": f"{seconds}s"}
    if fail:
        annotations["kwok.alpaca.dev/fail-exit-code"] = "3"
    return {
        "apiVersion": "alpaca.dev/v1alpha1", "kind": "AlpacaFineTune",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "s3://alpaca-test/models/tiny/"},
            "data": {"uri": "s3://alpaca-test/data/alpaca_data.json"},
            "output": {"uri": f"s3://alpaca-test/runs/{name}/"},
            "resources": {"nodes": 2, "gpusPerNode": 1},
            "podMetadata": {"annotations": annotations},
            "runPolicy": {"backoffLimit": 1},
        },
    }


@pytest.mark.parametrize("workload", ["job", "pods"])
def test_sigkill_at_random_points(cluster, crd, namespace, tmp_path, workload):
    rng = random.Random(int(time.time()))
    op = OperatorProcess({**cluster.env, api.WORKLOAD_ENV: workload}, tmp_path / "operator.log")
    names = [f"ok-{i}" for i in range(OK)] + [f"flaky-{i}" for i in range(FLAKY)]
    rng.shuffle(names)
    # Lives of 5 to 30 s (flaky ones: two attempts of 4 s), created one per kill cycle, so
    # the kills land on creation, launch, restart and completion alike.
    docs = [run(n, fail=n.startswith("flaky"), seconds=4 if n.startswith("flaky") else rng.randint(5, 30))
            for n in names]
    op.start(wait=False)
    try:
        for i in range(KILLS):
            if i < len(docs):
                cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(docs[i]))
            if rng.random() < 0.2:
                time.sleep(rng.uniform(0.2, 2.0))       # killed while starting up
            else:
                op.wait_ready()
                time.sleep(rng.uniform(0.0, 2.5))       # killed while handling
            op.kill()
            op.start(wait=False)
        op.wait_ready()

        def all_done():
            items = get_json(cluster, "alpacafinetunes", "-n", namespace)["items"]
            done = [i for i in items if i.get("status", {}).get("phase") in ("Succeeded", "Failed")]
            return items if len(done) == len(names) else None
        items = wait_for("every run to finish", all_done, timeout=180, interval=1,
                         on_timeout=lambda: cluster.kubectl("get", "aft,jobs,pods", "-n", namespace).stdout
                         + "\n" + op.tail())
    finally:
        op.stop()

    problems = []
    for item in items:
        name, st = item["metadata"]["name"], item["status"]
        found = attempt_names(cluster, namespace, name)
        want_attempts = 2 if name.startswith("flaky") else 1
        want_phase = "Failed" if name.startswith("flaky") else "Succeeded"
        # The last attempt's workload, and the failed one before it (failedJobsHistoryLimit 1).
        if found != [f"{name}-a{a}" for a in range(max(1, want_attempts - 1), want_attempts + 1)]:
            problems.append(f"{name}: workloads {found}")
        if (st["phase"], st.get("attempts")) != (want_phase, want_attempts):
            problems.append(f"{name}: phase {st['phase']} attempts {st.get('attempts')}")
        if want_phase == "Succeeded" and (st.get("output") != item["spec"]["output"]["uri"]
                                          or not st.get("completionTime")):
            problems.append(f"{name}: incomplete success status {st}")
        if want_phase == "Failed":
            failed = [c for c in st["conditions"] if c["type"] == "Failed" and c["status"] == "True"]
            if not failed or failed[0]["reason"] != "BackoffLimitExceeded" or "code 3" not in failed[0]["message"]:
                problems.append(f"{name}: failure not recorded right: {st.get('conditions')}")
        terminal = [c["type"] for c in st["conditions"] if c["type"] in ("Succeeded", "Failed") and c["status"] == "True"]
        if terminal != [want_phase]:
            problems.append(f"{name}: terminal conditions {terminal}")
    assert not problems, "\n".join(problems) + f"\n(operator started {op.starts} times)\n" + op.tail(30)
    assert op.starts == KILLS + 1


@pytest.mark.parametrize("before,after", [("job", "pods"), ("pods", "job")])
def test_a_switched_mode_leaves_each_started_run_the_workload_kind_it_started_with(
        cluster, crd, namespace, tmp_path, before, after):
    """An upgrade that changes the mode (eksWorkload's default became pods) while runs are
    under way: each keeps its kind, its running gang is never doubled by one of the other
    kind, and its restart is of its own kind too. (After a switch to the job mode, with no
    pod watch there, a run of bare pods is looked at every UNWATCHED_PODS_POLL seconds.)"""
    docs = {"long": run("long", fail=False, seconds=15), "flaky": run("flaky", fail=True, seconds=4)}
    first = OperatorProcess({**cluster.env, api.WORKLOAD_ENV: before}, tmp_path / "before.log")
    first.start()
    try:
        for doc in docs.values():
            cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))

        def under_way():
            items = {i["metadata"]["name"]: i.get("status") or {} for i in get_json(cluster, "aft", "-n", namespace)["items"]}
            return items if items.get("long", {}).get("phase") == "Running" \
                and (items.get("flaky", {}).get("workload") or {}) else None
        wait_for("long Running and flaky launched", under_way, timeout=60, on_timeout=first.tail)
    finally:
        first.stop()
    second = OperatorProcess({**cluster.env, api.WORKLOAD_ENV: after}, tmp_path / "after.log")
    second.start()
    try:
        def finished():
            items = get_json(cluster, "aft", "-n", namespace)["items"]
            return items if all((i.get("status") or {}).get("phase") in ("Succeeded", "Failed") for i in items) else None
        items = wait_for("both runs finished", finished, timeout=120, interval=1,
                         on_timeout=lambda: cluster.kubectl("get", "aft,jobs,pods", "-n", namespace).stdout + second.tail())
    finally:
        second.stop()
    got = {i["metadata"]["name"]: (i["status"]["phase"], i["status"]["attempts"]) for i in items}
    assert got == {"long": ("Succeeded", 1), "flaky": ("Failed", 2)}, got
    made = [a for name in sorted(docs) for a in attempt_names(cluster, namespace, name)]
    assert made == ["flaky-a1", "flaky-a2", "long-a1"], made
    jobs = get_json(cluster, "jobs", "-n", namespace)["items"]
    bare = [p for p in get_json(cluster, "pods", "-n", namespace)["items"] if api.LABEL_JOB_NAME not in p["metadata"]["labels"]]
    assert (jobs and not bare) if before == "job" else (bare and not jobs), "a gang of the other kind was made"
