"""The S3 preflight: before any model load or training step, prove the trainer's own
identity can read the model and data and write the output (docs/contract.md, "Preflight").

A wrong bucket or a role without write access otherwise shows up only at the first
checkpoint upload, hours of GPU time later. The launchers (`alpaca-launch` on EKS, `train`
on SageMaker) run it once per gang, on node 0, before torchrun: a few requests, not one
set per rank. The other nodes need no check of their own: node 0's permanent exit fails
the whole gang (the Job's podFailurePolicy on EKS; a failed host fails a SageMaker job).

boto3, not s5cmd: the check needs S3's own error code (NoSuchBucket, AccessDenied) for
the message, one request per check, and no retries of errors that cannot heal.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Iterable

from . import exitcodes
from .exitcodes import ImageError
from .s3io import endpoint, is_s3

log = logging.getLogger(__name__)

# Set to "off" (or 0/false/no) to skip the check, e.g. for an output bucket whose policy
# allows no deletes at all.
ENABLE_ENV = "ALPACA_PREFLIGHT"
# SageMaker's CheckpointConfig.S3Uri: the container cannot otherwise know it.
CHECKPOINT_URI_ENV = "ALPACA_CHECKPOINT_URI"
MARKER_PREFIX = ".alpaca-preflight-"

# Codes that a later request may not see again: checked once more by botocore's retries,
# then reported as retryable (exit 1), never as a configuration error.
_TRANSIENT_CODES = frozenset({"RequestTimeout", "RequestTimeoutException", "Throttling", "ThrottlingException",
                              "SlowDown", "TooManyRequests", "RequestLimitExceeded", "ServiceUnavailable",
                              "InternalError"})
# A HEAD response has no body, so botocore's code is only the status; name it as S3 would.
_HEAD_CODES = {"404": "NotFound", "403": "AccessDenied", "400": "BadRequest", "301": "PermanentRedirect"}


class PreflightError(ImageError):
    """A check failed; `exit_code` says whether a retry can help (64: it cannot)."""

    exit_code = exitcodes.USAGE


class InputMissing(PreflightError):
    """The model or data is not there (exit 66, as training itself would exit later)."""

    exit_code = exitcodes.NOINPUT


class Unavailable(PreflightError):
    """S3 did not answer (5xx, throttling, no connection) after retries: retryable (exit 1)."""

    exit_code = exitcodes.RETRYABLE


@dataclass(frozen=True)
class Check:
    what: str   # model | data | output | checkpoints
    uri: str
    kind: str   # prefix (read a directory) | object (read one file) | writable

    @property
    def bucket(self) -> str:
        return self.uri[len("s3://"):].split("/", 1)[0]

    @property
    def key(self) -> str:
        rest = self.uri[len("s3://"):].split("/", 1)
        return rest[1] if len(rest) > 1 else ""


def enabled(env) -> bool:
    return env.get(ENABLE_ENV, "on").strip().lower() not in ("off", "0", "false", "no")


def plan(model: str | None, data: str | None, output: str | None, checkpoints: str | None = None) -> list[Check]:
    """What to check: only s3:// URIs (a SageMaker channel, a local path or a Hub id is not S3).

    The model is a prefix (the trainer lists and copies it), the data one object; the output
    and a separate checkpoint prefix must take a write.
    """
    checks = []
    if is_s3(model):
        checks.append(Check("model", model, "prefix"))
    if is_s3(data):
        checks.append(Check("data", data, "object"))
    for what, uri in (("output", output), ("checkpoints", checkpoints)):
        if is_s3(uri) and not any(c.kind == "writable" and c.uri.rstrip("/") == uri.rstrip("/") for c in checks):
            checks.append(Check(what, uri, "writable"))
    return checks


def plan_from_args(args: list[str], env, output: str | None = None) -> list[Check]:
    """The checks for alpaca-train's arguments (and the variables it falls back to).

    `output` overrides them where the container writes to a URI alpaca-train is not told
    (SageMaker with compression: progress.json goes there, and SageMaker's upload with the
    same role).
    """
    values = _values(args, ("--model_name_or_path", "--data_path", "--output_uri"))
    return plan(values.get("--model_name_or_path"), values.get("--data_path"),
                output or values.get("--output_uri") or env.get("ALPACA_OUTPUT_URI"), env.get(CHECKPOINT_URI_ENV))


def _values(args: list[str], names: Iterable[str]) -> dict[str, str]:
    # The last occurrence wins, as with argparse; both `--k v` and `--k=v`.
    names = set(names)
    found: dict[str, str] = {}
    for i, a in enumerate(args):
        key, eq, value = a.partition("=")
        if key in names:
            if eq:
                found[key] = value
            elif i + 1 < len(args):
                found[key] = args[i + 1]
    return found


def client():
    import boto3
    from botocore.config import Config

    url = endpoint()  # the variables s5cmd is given (s3io)
    config = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=10, read_timeout=30,
                    s3={"addressing_style": "path"} if url else None)
    return boto3.client("s3", endpoint_url=url, config=config)


def describe(error: BaseException) -> tuple[str, bool]:
    """S3's error as `Code: message`, and whether a retry might succeed."""
    from botocore.exceptions import ClientError, NoCredentialsError, ParamValidationError, PartialCredentialsError

    if isinstance(error, ClientError):
        err = error.response.get("Error") or {}
        status = (error.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0
        code = str(err.get("Code") or status)
        code = _HEAD_CODES.get(code, code)
        message = err.get("Message") or ""
        transient = code in _TRANSIENT_CODES or status >= 500 or status == 429
        return (f"{code}: {message}" if message else code) + (f" (HTTP {status})" if status else ""), transient
    if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return (f"{type(error).__name__}: {error} (give the pods an IAM role through IRSA or EKS Pod "
                "Identity, or AWS_* credentials)"), False
    if isinstance(error, ParamValidationError):  # e.g. a bucket name S3 would never accept
        return f"{type(error).__name__}: {error}", False
    return f"{type(error).__name__}: {error}", True


def _fail(check: Check, operation: str, error: BaseException, doing: str) -> PreflightError:
    what, transient = describe(error)
    message = (f"preflight: {doing} the {check.what} {check.uri} failed ({operation} on bucket {check.bucket}): "
               f"{what}")
    if transient:
        return Unavailable(message + "; S3 did not answer, so the attempt is retried")
    missing = what.startswith(("NoSuchKey", "NoSuchBucket", "NotFound"))
    return (InputMissing if missing and check.kind != "writable" else PreflightError)(message)


def _call(check: Check, operation: str, doing: str, request):
    try:
        return request()
    except Exception as e:  # noqa: BLE001 - every failure is described (describe)
        raise _fail(check, operation, e, doing) from None


def _read_prefix(s3, check: Check) -> None:
    prefix = check.key.rstrip("/") + "/" if check.key else ""
    listed = _call(check, "ListObjectsV2", "listing",
                   lambda: s3.list_objects_v2(Bucket=check.bucket, Prefix=prefix, MaxKeys=1))
    if not listed.get("KeyCount"):
        raise InputMissing(f"preflight: the {check.what} {check.uri} is empty or does not exist "
                           f"(no object under it in bucket {check.bucket})")
    # Listing needs s3:ListBucket, the copy s3:GetObject: prove both.
    _read_object(s3, Check(check.what, f"s3://{check.bucket}/{listed['Contents'][0]['Key']}", "object"))


def _read_object(s3, check: Check) -> None:
    try:
        # One byte, not a HEAD: a GET's error has a body, so S3 says NoSuchBucket or NoSuchKey.
        s3.get_object(Bucket=check.bucket, Key=check.key, Range="bytes=0-0")["Body"].close()
    except Exception as e:  # noqa: BLE001
        if getattr(e, "response", {}).get("Error", {}).get("Code") == "InvalidRange":
            return  # an empty object: it is there and readable
        raise _fail(check, "GetObject", e, "reading") from None


def _write(s3, check: Check) -> None:
    """One request of each kind the trainer makes on its output: it lists it (resume, a
    finished run's manifest), uploads, reads back, and deletes (checkpoint rotation)."""
    prefix = check.key.rstrip("/") + "/" if check.key else ""
    marker = f"{prefix}{MARKER_PREFIX}{uuid.uuid4().hex}"
    _call(check, "ListObjectsV2", "listing", lambda: s3.list_objects_v2(Bucket=check.bucket, Prefix=prefix, MaxKeys=1))
    _call(check, "PutObject", "writing to", lambda: s3.put_object(
        Bucket=check.bucket, Key=marker, Body=b"written by the alpaca-train preflight; deleted at once\n"))
    try:
        _call(check, "HeadObject", "reading back from", lambda: s3.head_object(Bucket=check.bucket, Key=marker))
    except PreflightError:
        try:  # leave nothing behind where a delete is allowed
            s3.delete_object(Bucket=check.bucket, Key=marker)
        except Exception as e:  # noqa: BLE001
            log.warning("preflight: could not delete s3://%s/%s: %s", check.bucket, marker, describe(e)[0])
        raise
    try:
        _call(check, "DeleteObject", "deleting from", lambda: s3.delete_object(Bucket=check.bucket, Key=marker))
    except PreflightError as e:
        e.args = (f"{e}; its marker s3://{check.bucket}/{marker} is left there",)
        raise


def run(checks: list[Check], s3=None) -> None:
    """Run the checks in order; raise the first failure (a PreflightError with its exit code)."""
    if not checks:
        return
    s3 = s3 or client()
    for check in checks:
        {"prefix": _read_prefix, "object": _read_object, "writable": _write}[check.kind](s3, check)
    log.info("preflight: %s", "; ".join(f"{c.what} {c.uri} {'writable' if c.kind == 'writable' else 'readable'}"
                                         for c in checks))


def run_for_args(args: list[str], env, output: str | None = None) -> None:
    """The launchers' entry: the checks for alpaca-train's arguments, unless switched off."""
    if not enabled(env):
        log.warning("preflight: switched off (%s=%s)", ENABLE_ENV, env.get(ENABLE_ENV))
        return
    run(plan_from_args(args, env, output))
