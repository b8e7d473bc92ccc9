"""A sagemaker run's life at its edges: deleted at any point of its launch, its TTL, what
the operator asks AWS once it is finished (issue 16 §1: no job left billing, TTL cleans
every attempt, the backend holds nothing it does not need; issue 15: restart cost).

The real control plane, the SageMaker stand-in (hack/sagemaker_local/) with its fault
injection and per-job call counts, the operator as a process polling every second.
"""
from __future__ import annotations

import datetime as dt
import json
import time

import pytest

from alpaca_operator.backends.base import Run
from alpaca_operator.backends.sagemaker.client import Aws
from alpaca_operator.backends.sagemaker.names import training_job_name
from alpaca_operator.backends.sagemaker.progress import read_progress
from alpaca_operator.reconciler import RELEASE_RETRY
from alpaca_operator.spec import parse_spec
from alpaca_operator.status import deleting
from operator_harness import OperatorProcess, PhaseRecorder, aft, apply, phase_is, wait_for
from test_operator_sagemaker import POLL, dump, finetune, jobs_of, uid_of

FINALIZER = "alpaca.dev/operator"


@pytest.fixture(scope="module")
def sm_bucket(sagemaker_local):
    name = "sm-lifecycle"
    sagemaker_local.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def stats_path(tmp_path_factory):
    return tmp_path_factory.mktemp("stats") / "stats.json"


@pytest.fixture(scope="module")
def operator(cluster, crd, sagemaker_local, tmp_path_factory, stats_path):
    op = OperatorProcess({**cluster.env, **sagemaker_local.env, "ALPACA_SAGEMAKER_POLL_SECONDS": str(POLL)},
                         tmp_path_factory.mktemp("operator") / "operator.log", stats_path=stats_path)
    op.start()
    yield op
    op.stop()


def _gone(cluster, namespace, name):
    return lambda: cluster.kubectl("get", "aft", name, "-n", namespace, check=False).returncode != 0


def _stats(path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


# ---- deleted at each point of the launch ------------------------------------------------

@pytest.mark.parametrize("point", ["at-once", "before-create", "reply-pending", "after-record"])
def test_delete_at_any_point_of_the_launch_leaves_no_job_running(cluster, operator, sagemaker_local, sm_bucket,
                                                                  namespace, point):
    """at-once: deleted right after it was applied (the operator may not have seen it);
    before-create: while the launch's DescribeTrainingJob is in flight, before the create;
    reply-pending: SageMaker made the job, its reply to the create has not arrived (nothing
    recorded); after-record: the status says attempt 1 runs."""
    name = f"sm-d-{point}"
    sagemaker_local.plan(f"{name}-", training_seconds=None)     # trains until stopped
    rec = PhaseRecorder(cluster.env, namespace, name)
    show = dump(cluster, namespace, operator, sagemaker_local)
    delete = ("delete", "aft", name, "-n", namespace, "--wait=false")
    if point == "at-once":
        apply(cluster, namespace, finetune(name, sm_bucket))
        cluster.kubectl(*delete)
    elif point == "before-create":
        with sagemaker_local.faults(latency=3, operations=["DescribeTrainingJob"]):
            apply(cluster, namespace, finetune(name, sm_bucket))
            job = training_job_name(name, wait_for("uid", lambda: uid_of(cluster, namespace, name)), 1)
            wait_for("the launch's describe", lambda: sagemaker_local.calls(job).get("DescribeTrainingJob"),
                     timeout=30, on_timeout=show)
            assert not sagemaker_local.calls(job).get("CreateTrainingJob")
            cluster.kubectl(*delete)
    elif point == "reply-pending":
        with sagemaker_local.faults(latency_after=3, operations=["CreateTrainingJob"]):
            apply(cluster, namespace, finetune(name, sm_bucket))
            job = training_job_name(name, wait_for("uid", lambda: uid_of(cluster, namespace, name)), 1)
            wait_for("the create", lambda: sagemaker_local.calls(job).get("CreateTrainingJob"), timeout=30,
                     on_timeout=show)
            # The finalizer was there before the create went out.
            assert FINALIZER in aft(cluster, namespace, name)["metadata"]["finalizers"]
            assert "attempts" not in (aft(cluster, namespace, name).get("status") or {})
            cluster.kubectl(*delete)
    else:
        apply(cluster, namespace, finetune(name, sm_bucket))
        wait_for("attempt 1 recorded", lambda: (aft(cluster, namespace, name).get("status") or {}).get("attempts"),
                 timeout=60, on_timeout=show)
        cluster.kubectl(*delete)

    wait_for(f"{name} gone", _gone(cluster, namespace, name), timeout=90, on_timeout=show)
    time.sleep(4)   # a create still in flight (3 s of latency) would have landed now
    phases = rec.stop()
    sm = sagemaker_local.client("sagemaker")
    jobs = jobs_of(sagemaker_local, f"{name}-")
    for j in jobs:
        assert sm.describe_training_job(TrainingJobName=j)["TrainingJobStatus"] == "Stopped", (j, phases)
        assert sagemaker_local.calls(j).get("StopTrainingJob") == 1
    if point != "at-once":
        assert len(jobs) == 1, jobs
        # Through the state machine: Stopping while the job stopped, Stopped once it had.
        assert phases[-2:] == ["Stopping", "Stopped"], phases


def test_deleting_is_a_state_machine_step():
    """Pure: Stopping (condition True) while the job stops, Stopped (condition False) then."""
    spec = parse_spec(finetune("x", "b")["spec"])
    now = dt.datetime(2026, 12, 5, tzinfo=dt.timezone.utc)
    run = Run("x", "ns", "uid", 1, spec, {"phase": "Running", "conditions": [
        {"type": "Running", "status": "True", "reason": "Running", "message": "", "lastTransitionTime": "t"}]})
    stopping = deleting(run, now, "x-job", "Stopping")
    assert stopping.patch["phase"] == "Stopping"
    conds = {c["type"]: c for c in stopping.patch["conditions"]}
    assert conds["Stopping"]["status"] == "True" and conds["Stopping"]["reason"] == "StoppingTrainingJob"
    assert conds["Running"]["status"] == "False"
    after = Run("x", "ns", "uid", 1, spec, {**run.status, **stopping.patch})
    assert deleting(after, now, "x-job", "Stopping").patch == {}        # nothing new: no write
    stopped = deleting(after, now, "x-job", "Stopped")
    assert stopped.patch["phase"] == "Stopped" and stopped.patch["completionTime"]
    assert {c["type"]: c for c in stopped.patch["conditions"]}["Stopping"]["status"] == "False"
    assert [e.reason for e in stopped.events] == ["Stopped"]


def test_a_run_deleted_while_sagemaker_is_down_stays_until_its_job_is_stopped(cluster, operator, sagemaker_local,
                                                                               sm_bucket, namespace):
    """No job is left billing because AWS did not answer when its run was deleted: the run
    keeps its finalizer, and the operator tries again (RELEASE_RETRY) until the job is
    stopped; only then does the run go."""
    name = "sm-d-down"
    sagemaker_local.plan(f"{name}-", training_seconds=None)     # trains until stopped
    show = dump(cluster, namespace, operator, sagemaker_local)
    apply(cluster, namespace, finetune(name, sm_bucket))
    wait_for("Running", phase_is(cluster, namespace, name, "Running"), timeout=60, on_timeout=show)
    job = training_job_name(name, uid_of(cluster, namespace, name), 1)
    since = len(operator.log_path.read_bytes())
    with sagemaker_local.faults(unreachable=True):
        cluster.kubectl("delete", "aft", name, "-n", namespace, "--wait=false")
        wait_for("a try to stop the job", lambda: "cannot stop the training job yet" in
                 operator.log_path.read_text(errors="replace")[since:], timeout=90, on_timeout=show)
        body = aft(cluster, namespace, name)
        assert body["metadata"].get("deletionTimestamp") and FINALIZER in body["metadata"]["finalizers"]
        assert not sagemaker_local.calls(job).get("StopTrainingJob")
    wait_for(f"{name} gone", _gone(cluster, namespace, name), timeout=RELEASE_RETRY + 60, on_timeout=show)
    assert sagemaker_local.calls(job).get("StopTrainingJob") == 1
    assert sagemaker_local.client("sagemaker").describe_training_job(
        TrainingJobName=job)["TrainingJobStatus"] == "Stopped"


# ---- TTL ---------------------------------------------------------------------------------

def test_ttl_deletes_every_attempts_config_channel_and_nothing_else(cluster, operator, sagemaker_local, sm_bucket,
                                                                   namespace):
    name = "sm-ttl-all"
    s3 = sagemaker_local.client("s3")
    root = f"runs/{name}/.alpaca/"
    # A former run of the same name (another uid) under the same output, and what is not a
    # config channel at all: both stay.
    foreign = [f"{root}{name}-deadbeef-a1/train_args.json", f"runs/{name}/model/config.json"]
    for key in foreign:
        s3.put_object(Bucket=sm_bucket, Key=key, Body=b"{}")
    sagemaker_local.plan(f"{name}-", outcome="Failed", failure_reason="AlgorithmError: NCCL timeout", step_seconds=0.3)
    apply(cluster, namespace, finetune(name, sm_bucket, run_policy={"backoffLimit": 1, "ttlSecondsAfterFinished": 3}))
    body = wait_for("Failed", phase_is(cluster, namespace, name, "Failed"), timeout=90,
                    on_timeout=dump(cluster, namespace, operator, sagemaker_local))
    uid = body["metadata"]["uid"]
    ours = [training_job_name(name, uid, a) for a in (1, 2)]
    assert body["status"]["attempts"] == 2 and jobs_of(sagemaker_local, f"{name}-") == sorted(ours)

    def keys():
        return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=sm_bucket, Prefix=f"runs/{name}/").get("Contents", []))
    for job in ours:    # each attempt had its config channel
        assert f"{root}{job}/train_args.json" in keys()

    def deleted():
        conds = {c["type"]: c for c in (aft(cluster, namespace, name).get("status") or {}).get("conditions", [])}
        return conds.get("ChildrenDeleted", {}).get("status") == "True"
    wait_for("ChildrenDeleted", deleted, timeout=60, on_timeout=dump(cluster, namespace, operator, sagemaker_local))
    assert keys() == sorted(foreign)


# ---- a finished run costs nothing ------------------------------------------------------------

def test_a_finished_run_is_not_looked_up_again_after_a_restart(cluster, operator, sagemaker_local, sm_bucket,
                                                                namespace, stats_path):
    done, running = "sm-settled", "sm-still"
    sagemaker_local.plan(f"{done}-", step_seconds=0.2, training_seconds=0)
    sagemaker_local.plan(f"{running}-", training_seconds=None)
    apply(cluster, namespace, finetune(done, sm_bucket), finetune(running, sm_bucket))
    body = wait_for("Succeeded", phase_is(cluster, namespace, done, "Succeeded"), timeout=60,
                    on_timeout=dump(cluster, namespace, operator, sagemaker_local))
    assert body["status"]["sagemaker"]["trainingJobStatus"] == "Completed"
    wait_for(f"{running} Running", phase_is(cluster, namespace, running, "Running"), timeout=60)
    job = body["status"]["sagemaker"]["trainingJobName"]
    other = aft(cluster, namespace, running)["status"]["sagemaker"]["trainingJobName"]
    progress_key = f"runs/{done}/progress.json"
    sagemaker_local.client("s3").put_object(Bucket=sm_bucket, Key=progress_key,
                                            Body=json.dumps({"job": job, "step": 3, "totalSteps": 3}).encode())
    before, objects_before = sagemaker_local.calls(job), sagemaker_local.object_calls(sm_bucket, progress_key)
    other_before = sagemaker_local.calls(other).get("DescribeTrainingJob", 0)

    operator.kill()
    stats_path.unlink(missing_ok=True)
    operator.start()
    wait_for("the restarted operator's first reconciles", lambda: _stats(stats_path).get("reconciles", 0) >= 2,
             timeout=60, on_timeout=operator.tail)
    # The running one is looked up again (so the operator did look), the finished one not:
    # no Describe, no ListTags, no progress GetObject.
    wait_for("the running job described again",
             lambda: sagemaker_local.calls(other).get("DescribeTrainingJob", 0) > other_before, timeout=30)
    time.sleep(3 * POLL)
    assert sagemaker_local.calls(job) == before
    assert sagemaker_local.object_calls(sm_bucket, progress_key) == objects_before
    assert aft(cluster, namespace, done)["status"]["phase"] == "Succeeded"
    sagemaker_local.set_job(other, "Stopped")


def test_progress_is_read_the_same_way_by_the_operator_and_the_cli(sagemaker_local, sm_bucket, monkeypatch):
    for k, v in sagemaker_local.env.items():
        monkeypatch.setenv(k, v)
    aws = Aws()
    s3 = sagemaker_local.client("s3")
    uri = f"s3://{sm_bucket}/runs/progress-read/"
    assert read_progress(aws, None, uri, "job-a1") is None     # none yet
    s3.put_object(Bucket=sm_bucket, Key="runs/progress-read/progress.json",
                  Body=json.dumps({"job": "job-a1", "attempt": 1, "step": 5, "totalSteps": 10, "loss": 1.5}).encode())
    assert read_progress(aws, None, uri, "job-a1") == {"step": 5, "totalSteps": 10, "loss": 1.5}
    assert read_progress(aws, None, uri, "job-a2") is None     # an older job's
    s3.put_object(Bucket=sm_bucket, Key="runs/progress-read/progress.json", Body=b"not json")
    assert read_progress(aws, None, uri, "job-a1") is None
    aws.close()
