"""What the real CreateTrainingJob refuses and moto does not: each constraint, written down
with where AWS states it, sent to a plain moto server (which creates the job: the gap this
file records), to the request builder's validator and to the local stand-in (both refuse
it, so a run that cannot start on SageMaker cannot start in tests either).

The stand-in enforces them because it plays SageMaker for the operator's tests and the
demo: a request moto waves through would pass every local test and fail only on AWS.
"""
from __future__ import annotations

import copy
import uuid

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from alpaca_operator.backends.base import Run
from alpaca_operator.backends.sagemaker.request import RequestError, build_request, validate
from alpaca_operator.sagemaker_limits import operation_model
from alpaca_operator.spec import parse_spec

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/alpaca-train:0.1.0"


def _rename(p: dict, name: str) -> None:
    p["TrainingJobName"] = name


# (constraint, how to break it, where AWS states it, whether moto 5.2.5 lets it through)
CONSTRAINTS = [
    ("image registry", lambda p: p["AlgorithmSpecification"].update(TrainingImage="ghcr.io/alpaca-operator/train:0.1.0"),
     "SageMaker pulls from Amazon ECR; another registry needs TrainingImageConfig Vpc (developer guide, "
     "'Use a private Docker registry for training')", True),
    ("job name length", lambda p: _rename(p, "n" * 64), "TrainingJobName: at most 63 (service model)", True),
    ("job name pattern", lambda p: _rename(p, "bad_name-" + uuid.uuid4().hex[:8]),
     "TrainingJobName: ^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62} (service model)", True),
    ("environment entries", lambda p: p["Environment"].update({f"E{i}": "v" for i in range(100)}),
     "Environment: at most 100 entries (service model)", True),
    ("environment key", lambda p: p["Environment"].update({"1BAD": "v"}),
     "Environment key: [a-zA-Z_][a-zA-Z0-9_]* (service model)", True),
    ("environment value length", lambda p: p["Environment"].update(LONG="v" * 513),
     "Environment value: at most 512 characters (service model)", True),
    ("environment total size", lambda p: p["Environment"].update({f"E{i}": "v" * 500 for i in range(70)}),
     "all keys and values at most 32 KB together (documented for a container's Environment)", True),
    ("tags per resource", lambda p: p["Tags"].extend({"Key": f"k{i}", "Value": "v"} for i in range(46)),
     "at most 50 tags (service model; Tagging AWS resources)", True),
    ("tag key length", lambda p: p["Tags"].append({"Key": "k" * 129, "Value": "v"}),
     "tag key at most 128 characters", True),
    ("tag value length", lambda p: p["Tags"].append({"Key": "team", "Value": "v" * 257}),
     "tag value at most 256 characters", True),
    ("reserved tag prefix", lambda p: p["Tags"].append({"Key": "aws:owner", "Value": "v"}),
     "the prefix aws: is reserved for AWS's own tags (Tagging AWS resources)", True),
    ("training instance type", lambda p: p["ResourceConfig"].update(InstanceType="ml.t2.medium"),
     "ResourceConfig.InstanceType: one of TrainingInstanceType (service model; ml.t2 hosts notebooks only)", True),
    ("hyperparameter value length", lambda p: p["HyperParameters"].update(long="v" * 257),
     "each hyperparameter value at most 256 characters (CreateTrainingJob reference; the model says 2500)", True),
]
IDS = [c[0] for c in CONSTRAINTS]


def _request(name: str, bucket: str) -> dict:
    spec = {"backend": "sagemaker", "model": {"uri": f"s3://{bucket}/models/tiny/"},
            "data": {"uri": f"s3://{bucket}/data/alpaca_data.json"}, "output": {"uri": f"s3://{bucket}/out/"},
            "sagemaker": {"roleArn": "arn:aws:iam::123456789012:role/alpaca-sagemaker", "image": IMAGE,
                          "instanceType": "ml.m5.xlarge"}}
    params = build_request(Run(name, "default", str(uuid.uuid4()), 1, parse_spec(spec), {}), 1).params
    return copy.deepcopy(params)


def _broken(mutate, bucket: str) -> dict:
    p = _request(f"lim-{uuid.uuid4().hex[:8]}", bucket)
    mutate(p)
    return p


def _moto_client(endpoint: str):
    # No client-side checks: what reaches the server is what a lax client would send.
    return boto3.client("sagemaker", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing",
                        config=Config(parameter_validation=False, retries={"max_attempts": 1}))


def test_the_base_request_passes_everywhere(s3, sagemaker_local):
    p = _request(f"lim-ok-{uuid.uuid4().hex[:8]}", "lim-bucket")
    validate(p)
    _moto_client(s3.endpoint).create_training_job(**p)
    sagemaker_local.client().create_training_job(**p)


@pytest.mark.parametrize("constraint, mutate, source, moto_skips", CONSTRAINTS, ids=IDS)
def test_each_constraint_moto_skips_and_we_enforce(constraint, mutate, source, moto_skips, s3, sagemaker_local):
    p = _broken(mutate, "lim-bucket")
    # What moto does with it: the gap, recorded.
    try:
        _moto_client(s3.endpoint).create_training_job(**p)
        accepted = True
    except ClientError:
        accepted = False
    assert accepted is moto_skips, f"{constraint}: moto {'accepts' if accepted else 'refuses'} it now; update the table"
    # The request builder's validator refuses it before anything is created.
    with pytest.raises(RequestError):
        validate(p)
    # The stand-in refuses it as SageMaker does.
    with pytest.raises(ClientError) as e:
        sagemaker_local.client().create_training_job(**p)
    assert e.value.response["Error"]["Code"] == "ValidationException", e.value.response
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_the_table_covers_the_service_models_limits_we_rely_on():
    shape = operation_model().input_shape
    # The numbers the table's cases straddle are the model's own (a botocore update that moves
    # them shows here, not as a silently passing case).
    assert shape.members["TrainingJobName"].metadata["max"] == 63
    assert shape.members["Environment"].metadata["max"] == 100
    assert shape.members["Environment"].value.metadata["max"] == 512
    tag = shape.members["Tags"]
    assert (tag.metadata["max"], tag.member.members["Key"].metadata["max"],
            tag.member.members["Value"].metadata["max"]) == (50, 128, 256)
    types = shape.members["ResourceConfig"].members["InstanceType"].enum
    assert "ml.p4d.24xlarge" in types and "ml.g5.xlarge" in types and "ml.t2.medium" not in types
