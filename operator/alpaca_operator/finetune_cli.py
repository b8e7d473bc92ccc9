"""`alpaca-finetune`: the SageMaker backend without Kubernetes, for notebook users.

    alpaca-finetune submit-sagemaker -f run.yaml [--wait]   # prints the training job's name
    alpaca-finetune status NAME                             # status, progress, failure reason
    alpaca-finetune stop NAME                               # StopTrainingJob

run.yaml is the AlpacaFineTune you would `kubectl apply` (backend: sagemaker). It is
validated as the API server would (the CRD's schema with its defaults, and its CEL rules),
then submitted through the operator's own request builder. Credentials, region and
endpoint come from the usual AWS variables and files (spec.sagemaker.region wins); the
execution role from spec.sagemaker.roleArn, else ALPACA_SAGEMAKER_ROLE_ARN.

Exit codes: 0 submitted / Completed; 1 the job Failed or an AWS error; 2 invalid input
(the API server's messages); 3 the job was Stopped; 130 interrupted (the job goes on).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

import yaml

from .backends.base import Run
from .backends.sagemaker.client import Aws, AwsError, AwsNotConfigured, AwsUnavailable, is_not_found
from .backends.sagemaker.progress import read_progress
from .backends.sagemaker.request import RequestError, build_request
from .manifest_validation import ManifestError, UnknownFieldError, validate_manifest
from .spec import SpecError, parse_spec

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
FINISHED = {"Completed": EXIT_OK, "Failed": EXIT_FAILED, "Stopped": EXIT_STOPPED}


class UsageError(Exception):
    pass


def load_run(path: str) -> tuple[dict, Run]:
    """The validated, defaulted AlpacaFineTune and the Run the request builder takes."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as e:
        raise UsageError(f"error: cannot read {path}: {e.strerror}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise UsageError(f"error: {path} is not valid YAML: {e}") from None
    if len(docs) != 1:
        raise UsageError(f"error: {path} must hold exactly one AlpacaFineTune (found {len(docs)} documents)")
    try:
        obj = validate_manifest(docs[0])
    except (ManifestError, UnknownFieldError) as e:
        raise UsageError(f"Error from validation: {e}") from None
    if obj["spec"].get("backend") != "sagemaker":
        raise UsageError(f'The AlpacaFineTune "{obj["metadata"]["name"]}" is invalid: spec.backend: '
                         f'Unsupported value: "{obj["spec"].get("backend")}": alpaca-finetune submits '
                         'backend sagemaker only (kubectl apply runs the others)')
    meta = obj["metadata"]
    try:
        spec = parse_spec(obj["spec"])
    except SpecError as e:
        raise UsageError(f"error: {e}") from None
    # A fresh uid per submission: the job name is new each time, like a new AlpacaFineTune.
    run = Run(meta["name"], meta.get("namespace") or "default", str(uuid.uuid4()), 1, spec,
              {"attempts": 1})
    return obj, run


def submit(run: Run, aws: Aws) -> str:
    if run.spec.deepspeed.config_map_ref is not None:
        raise UsageError("error: spec.deepspeed.configMapRef needs a cluster; use zeroStage and the offload switches")
    try:
        req = build_request(run, 1, deadline_seconds=run.spec.run_policy.active_deadline_seconds,
                            default_role=os.environ.get("ALPACA_SAGEMAKER_ROLE_ARN") or None)
    except RequestError as e:
        raise UsageError(f"error: {e}") from None
    region = (run.spec.sagemaker or {}).get("region")
    bucket, _, key = req.config_prefix.removeprefix("s3://").partition("/")
    for file, content in req.config_files.items():
        aws.call_sync("s3", region, "PutObject", Bucket=bucket, Key=key + file, Body=content.encode(),
                      ContentType="application/json")
    aws.call_sync("sagemaker", region, "CreateTrainingJob", **req.params)
    return req.name


def progress_of(aws: Aws, region: str | None, desc: dict) -> dict | None:
    uri = (desc.get("Environment") or {}).get("ALPACA_OUTPUT_URI") or \
        (desc.get("OutputDataConfig") or {}).get("S3OutputPath")
    return read_progress(aws, region, uri, desc.get("TrainingJobName")) if uri else None


def describe_line(desc: dict, progress: dict | None) -> str:
    line = f"{desc['TrainingJobName']}: {desc.get('TrainingJobStatus')}"
    if desc.get("SecondaryStatus"):
        line += f" ({desc['SecondaryStatus']})"
    if progress and progress.get("step") is not None and progress.get("totalSteps"):
        line += f" step {progress['step']}/{progress['totalSteps']}"
        if progress.get("loss") is not None:
            line += f" loss {progress['loss']:.4g}" if isinstance(progress["loss"], (int, float)) else ""
        if progress.get("eta"):
            line += f" eta {progress['eta']}"
    if desc.get("FailureReason"):
        line += f": {desc['FailureReason']}"
    return line


def _bar(progress: dict | None, width: int = 30) -> str:
    if not progress or not progress.get("totalSteps"):
        return "[" + " " * width + "]"
    done = min(width, int(width * progress.get("step", 0) / max(1, progress["totalSteps"])))
    return "[" + "#" * done + "." * (width - done) + "]"


def wait(aws: Aws, region: str | None, name: str, interval: float, out: TextIO) -> int:
    """Until the job ends: a progress bar on a terminal, a line per change otherwise."""
    tty = out.isatty()
    last = None
    while True:
        desc = aws.call_sync("sagemaker", region, "DescribeTrainingJob", TrainingJobName=name)
        progress = progress_of(aws, region, desc) if desc.get("TrainingJobStatus") == "InProgress" else None
        line = describe_line(desc, progress)
        if tty:
            out.write("\r\x1b[2K" + _bar(progress) + " " + line)
            out.flush()
        elif line != last:
            out.write(line + "\n")
            out.flush()
        last = line
        status = desc.get("TrainingJobStatus")
        if status in FINISHED:
            if tty:
                out.write("\n")
            artifacts = (desc.get("ModelArtifacts") or {}).get("S3ModelArtifacts")
            if status == "Completed":
                out.write(f"model: {(desc.get('Environment') or {}).get('ALPACA_OUTPUT_URI') or artifacts}\n")
            return FINISHED[status]
        time.sleep(interval)


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    p = argparse.ArgumentParser(prog="alpaca-finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--region", default=None, help="AWS region (default: spec.sagemaker.region, then AWS_REGION)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit-sagemaker", help="validate run.yaml and create its SageMaker training job")
    s.add_argument("-f", "--filename", required=True, help="the AlpacaFineTune YAML (- for stdin)")
    s.add_argument("--wait", action="store_true", help="follow the job to its end; the exit code says how it ended")
    s.add_argument("--interval", type=float, default=30.0, help="seconds between status polls with --wait")
    st = sub.add_parser("status", help="a training job's status and progress")
    st.add_argument("name")
    sp = sub.add_parser("stop", help="stop a training job (it saves a checkpoint first)")
    sp.add_argument("name")
    args = p.parse_args(argv)
    aws = Aws(threads=1)
    try:
        if args.command == "submit-sagemaker":
            _, run = load_run(args.filename)
            region = args.region or (run.spec.sagemaker or {}).get("region")
            if args.region:
                run = Run(run.name, run.namespace, run.uid, run.generation,
                          _with_region(run.spec, args.region), run.status)
            name = submit(run, aws)
            out.write(name + "\n")
            out.flush()
            return wait(aws, region, name, args.interval, out) if args.wait else EXIT_OK
        if args.command == "status":
            desc = aws.call_sync("sagemaker", args.region, "DescribeTrainingJob", TrainingJobName=args.name)
            out.write(describe_line(desc, progress_of(aws, args.region, desc)) + "\n")
            return EXIT_OK
        if args.command == "stop":
            aws.call_sync("sagemaker", args.region, "StopTrainingJob", TrainingJobName=args.name)
            out.write(f"{args.name}: stopping\n")
            return EXIT_OK
    except UsageError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    except AwsError as e:
        if is_not_found(e):
            print(f"error: no training job {getattr(args, 'name', '')} ({e.message})", file=sys.stderr)
        else:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (AwsUnavailable, AwsNotConfigured) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ninterrupted; the training job goes on (alpaca-finetune stop NAME stops it)", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        aws.close()
    return EXIT_USAGE


def _with_region(spec: Any, region: str) -> Any:
    from dataclasses import replace
    return replace(spec, sagemaker={**(spec.sagemaker or {}), "region": region})


if __name__ == "__main__":
    sys.exit(main())
