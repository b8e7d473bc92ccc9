"""The AlpacaFineTune of run.yaml as a SageMaker training job through the SageMaker Python
SDK 3.x (`ModelTrainer`, which replaced the seed notebook's `Estimator`).

    pip install 'alpaca-operator[sdk]'          # the sagemaker package: an optional extra
    python examples/sagemaker_sdk/train_alpaca.py run.yaml [--no-wait]

It asks the operator's own request builder what to send (so the job is the one the
operator or `alpaca-finetune submit-sagemaker` would create), uploads the config channel,
and hands each part to ModelTrainer. Prints the job's name; with waiting, its final status.
"""
from __future__ import annotations

import argparse
import sys
import uuid

import boto3
import yaml

from alpaca_operator.backends.base import Run
from alpaca_operator.backends.sagemaker.request import build_request
from alpaca_operator.manifest_validation import validate_manifest
from alpaca_operator.spec import parse_spec, sagemaker_defaults


def model_trainer(params: dict, session=None):
    """ModelTrainer from CreateTrainingJob parameters (request.py's)."""
    from sagemaker.train import ModelTrainer
    from sagemaker.train.configs import (CheckpointConfig, Compute, InputData, OutputDataConfig, S3DataSource,
                                         StoppingCondition, Tag, TrainingImageConfig)

    res = params["ResourceConfig"]
    extra = {}
    if image_config := params["AlgorithmSpecification"].get("TrainingImageConfig"):
        # A private registry, reached through the job's VPC (spec.sagemaker.imageRepositoryAccess: Vpc).
        extra["training_image_config"] = TrainingImageConfig(**{
            {"TrainingRepositoryAccessMode": "training_repository_access_mode",
             "TrainingRepositoryAuthConfig": "training_repository_auth_config"}[k]: v
            for k, v in image_config.items()})
    return ModelTrainer(
        **extra,
        sagemaker_session=session,
        training_image=params["AlgorithmSpecification"]["TrainingImage"],
        role=params["RoleArn"],
        base_job_name=params["TrainingJobName"],
        compute=Compute(instance_type=res["InstanceType"], instance_count=res["InstanceCount"],
                        volume_size_in_gb=res["VolumeSizeInGB"],
                        enable_managed_spot_training=params["EnableManagedSpotTraining"]),
        stopping_condition=StoppingCondition(**{
            {"MaxRuntimeInSeconds": "max_runtime_in_seconds",
             "MaxWaitTimeInSeconds": "max_wait_time_in_seconds"}[k]: v
            for k, v in params["StoppingCondition"].items()}),
        output_data_config=OutputDataConfig(s3_output_path=params["OutputDataConfig"]["S3OutputPath"],
                                            compression_type=params["OutputDataConfig"]["CompressionType"]),
        checkpoint_config=CheckpointConfig(s3_uri=params["CheckpointConfig"]["S3Uri"],
                                           local_path=params["CheckpointConfig"]["LocalPath"]),
        # As built, S3DataType included: the data channel is a ManifestFile naming one object.
        input_data_config=[InputData(channel_name=c["ChannelName"], data_source=S3DataSource(
            s3_data_type=src["S3DataType"], s3_uri=src["S3Uri"],
            s3_data_distribution_type=src["S3DataDistributionType"]))
            for c in params["InputDataConfig"] for src in [c["DataSource"]["S3DataSource"]]],
        hyperparameters=params["HyperParameters"],
        environment=params["Environment"],
        tags=[Tag(key=t["Key"], value=t["Value"]) for t in params["Tags"]],
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_yaml")
    p.add_argument("--no-wait", action="store_true")
    args = p.parse_args(argv)
    obj = validate_manifest(yaml.safe_load(open(args.run_yaml)))
    meta = obj["metadata"]
    run = Run(meta["name"], meta.get("namespace") or "default", str(uuid.uuid4()), 1, parse_spec(obj["spec"]), {})
    req = build_request(run, 1, **sagemaker_defaults())
    s3 = boto3.client("s3")
    bucket, _, key = req.config_prefix.removeprefix("s3://").partition("/")
    for file, content in req.config_files.items():
        s3.put_object(Bucket=bucket, Key=key + file, Body=content.encode())
    trainer = model_trainer(req.params)
    trainer.train(wait=not args.no_wait, logs=False)
    job = trainer._latest_training_job
    print(job.training_job_name)
    if not args.no_wait:
        job.refresh()
        print(job.training_job_status)
        return 0 if job.training_job_status == "Completed" else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
