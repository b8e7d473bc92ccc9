"""A real hang (issue 19 §1): a 2-pod gang on the local-exec node whose rank 1 is frozen
(SIGSTOP). Rank 0 then waits in a collective and reports nothing more, although it is not
the rank that hangs; the operator ends the attempt after progressDeadlineSeconds and the
next attempt resumes from the last complete checkpoint in S3, at that checkpoint's step + 1."""
from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

from fixtures_train import keys
from operator_harness import get_json, wait_for
from test_e2e_eks import (deepspeed_ops, diagnose, finetune, inputs, manifest, operator, served,  # noqa: F401 - fixtures
                          wait_finished)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "hack" / "localexec"))
import procs  # noqa: E402 - the local-exec agent's process records

# 160 records / (2 nodes x batch 2) = 40 steps an epoch: 240 steps (about 10 a second on
# an idle 2-core machine), a checkpoint every 40, so rank 1 is frozen with some 200 steps
# to go, and the next attempt trains them in well under a minute.
EPOCHS, SAVE_STEPS, DEADLINE = 6, 40, 30


def process_tree(pid: int) -> list[int]:
    """pid and its descendants. torchrun starts its workers in sessions of their own, so
    the pod's process group alone would leave the training processes running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def signal_tree(tree: list[int], sig: int) -> None:
    for p in tree:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def rank(cluster, namespace: str, name: str, attempt: int, index: int) -> dict:
    return next(p for p in get_json(cluster, "pods", "-n", namespace, "-l", f"alpaca.dev/finetune={name}")["items"]
                if p["metadata"]["labels"].get("alpaca.dev/attempt") == str(attempt)
                and p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == str(index))


def test_a_frozen_rank_is_found_hung_and_the_gang_resumes_from_its_checkpoint(cluster, served, operator, inputs,
                                                                               s3, bucket):
    run = finetune("frozen", bucket, *inputs, s3)
    run["spec"]["training"].update(epochs=EPOCHS, saveSteps=SAVE_STEPS)
    # A frozen rank never answers SIGTERM: do not wait the default 300 s to SIGKILL it.
    run["spec"]["terminationGracePeriodSeconds"] = 5
    # Pods share the host's ports here: a new rank 0 that starts while the old one still
    # holds the rendezvous port fails once more, so a third attempt is no error.
    run["spec"]["runPolicy"] = {"backoffLimit": 3, "progressDeadlineSeconds": DEADLINE}
    cluster.kubectl("-n", served, "apply", "-f", "-", input=json.dumps(run))

    def complete_checkpoint():
        objs = keys(s3, bucket, "runs/frozen/")
        return all(any(k.endswith(f".alpaca-uploaded-node{n}-of-2") for k in objs) for n in (0, 1))
    wait_for("a complete checkpoint in S3", complete_checkpoint, timeout=240, interval=0.2,
             on_timeout=lambda: diagnose(cluster, served, operator))
    worker = rank(cluster, served, "frozen", 1, 1)
    record = procs.read_record(Path(cluster.kubeconfig).parent / "localexec" / "pods" / worker["metadata"]["uid"]
                               / "containers" / "trainer" / "0" / "container.json")
    # The whole of rank 1 (launcher, torchrun and its Python worker) stops, as a rank stuck
    # in a driver call would; its pod stays Running.
    assert procs.alive(record), record
    tree = {p: procs.start_time(p) for p in process_tree(int(record["pid"]))}
    assert len(tree) >= 3, tree
    signal_tree(list(tree), signal.SIGSTOP)
    try:
        progress = get_json(cluster, "aft", "frozen", "-n", served)["status"].get("progress") or {}
        assert progress.get("stage") in ("loading", "training"), f"frozen too late: {progress}"
        body = wait_finished(cluster, served, "frozen", operator, timeout=300)
    finally:
        # Nothing left behind: the agent kills the pod's process group, not the worker in its
        # own session, which stays stopped (the start time tells a recycled pid apart).
        signal_tree([p for p, started in tree.items() if started and procs.start_time(p) == started],
                    signal.SIGKILL)

    st = body["status"]
    hung = st["attemptHistory"][0]
    assert hung["attempt"] == 1 and hung["reason"] == "ProgressDeadlineExceeded", st["attemptHistory"]
    # The last step reported (at most every 10 s, so not the step it froze at).
    assert f"{DEADLINE}s (progressDeadlineSeconds)" in hung["message"] and hung["step"] >= 1
    m = manifest(s3, bucket, "frozen")
    assert m["result"]["global_step"] == m["result"]["max_steps"] == EPOCHS * 40
    resumed = re.search(r"checkpoint-(\d+)", m["result"]["resumed_from"] or "")
    assert resumed and int(resumed.group(1)) % SAVE_STEPS == 0, m["result"]
    # The step after the resume is the checkpoint's step + 1: the final attempt's rank 0
    # logged every step (loggingSteps 1) from there.
    logs = cluster.kubectl("-n", served, "logs", rank(cluster, served, "frozen", st["attempts"], 0)["metadata"]["name"]
                           ).stdout
    # (Not anchored: the metric line follows the progress bar's carriage return.)
    steps = [int(s) for s in re.findall(r"alpaca-progress step=(\d+)/", logs)]
    assert steps and steps[0] == int(resumed.group(1)) + 1, (resumed.group(0), steps[:3])
