"""Fixtures of the SageMaker tests: the local stand-in (hack/sagemaker_local/) on loopback.

Loaded by tests/conftest.py through pytest_plugins. `sagemaker_local` answers jobs by
the clock (Starting, Downloading, Training, Uploading, each `STEP_SECONDS`, then
Completed, or as a plan says); `sagemaker_exec` runs them for real, our `train` once per
instance. Both are session fixtures: a test that sets faults or plans undoes them
(`with sagemaker_local.faults(...)`, or reset_faults/clear_plans in a finally), and
names its jobs uniquely (the stand-in never forgets a name, like SageMaker).
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEP_SECONDS = 1.0

_spec = importlib.util.spec_from_file_location("sagemaker_local_handle", ROOT / "hack" / "sagemaker_local" / "handle.py")
sagemaker_local_handle = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sagemaker_local_handle
_spec.loader.exec_module(sagemaker_local_handle)
StandIn = sagemaker_local_handle.StandIn
StandInError = sagemaker_local_handle.StandInError


@contextmanager
def standin(prefix: str, **kwargs):
    """A stand-in of our own in a temporary directory, removed (with every job's files) after."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        sm = StandIn.launch(work, **kwargs)
    except StandInError as e:
        shutil.rmtree(work, ignore_errors=True)
        pytest.fail(str(e), pytrace=False)
    try:
        yield sm
    finally:
        sm.close()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def sagemaker_local():
    """The stand-in without execution: .endpoint, .env, .client(), .calls(), .set_faults(), .plan()."""
    with standin("sagemaker-local-", step_seconds=STEP_SECONDS) as sm:
        yield sm


@pytest.fixture(scope="session")
def sagemaker_exec(train_env):
    """The stand-in in execution mode: each job runs `train` per instance under a local /opt/ml.

    The jobs inherit train_env (CPU DeepSpeed, cached JIT builds, no Hub); a stop gets
    SIGTERM, then SIGKILL after 60 s.
    """
    env = dict(train_env)
    env.pop("PYTHONPATH", None)
    with standin("sagemaker-exec-", execute=True, step_seconds=STEP_SECONDS, grace_seconds=60, env=env) as sm:
        yield sm


def new_bucket(sm, prefix: str) -> str:
    """A bucket of the stand-in's S3 no other module uses: PREFIX-<random>."""
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    sm.client("s3").create_bucket(Bucket=name)
    return name


def job_request(name: str, bucket: str, **overrides) -> dict:
    """A minimal valid CreateTrainingJob request writing under s3://bucket/out/."""
    req = {
        "TrainingJobName": name,
        "RoleArn": "arn:aws:iam::123456789012:role/alpaca-sagemaker",
        "AlgorithmSpecification": {"TrainingImage": "123456789012.dkr.ecr.us-east-1.amazonaws.com/alpaca-train:0.1.0",
                                   "TrainingInputMode": "File"},
        "OutputDataConfig": {"S3OutputPath": f"s3://{bucket}/out/", "CompressionType": "NONE"},
        "ResourceConfig": {"InstanceType": "ml.p4d.24xlarge", "InstanceCount": 1, "VolumeSizeInGB": 100},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
    }
    req.update(overrides)
    return req

