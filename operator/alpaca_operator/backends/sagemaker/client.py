"""The AWS side: boto3 clients per region, each call counted and its errors sorted, by
classify() alone, into the four kinds the backend acts on (docs/operator.md, SageMaker
"Errors"). Blocking boto3 runs in a bounded thread pool.

Region: spec.sagemaker.region, else the operator's environment (AWS_REGION,
AWS_DEFAULT_REGION). Endpoint: the standard AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_SAGEMAKER /
AWS_ENDPOINT_URL_S3 variables (botocore reads them). Credentials: the default chain (IRSA
or EKS Pod Identity in a cluster). Throttling and 5xx: botocore's retry mode
(ALPACA_SAGEMAKER_RETRY_MODE, default standard; ALPACA_SAGEMAKER_MAX_ATTEMPTS, default 4),
then the reconciler's jittered backoff.
"""
from __future__ import annotations

import asyncio
import enum
import os
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from ... import metrics


class Kind(str, enum.Enum):
    """What an AWS error means for the run."""
    PERMANENT = "Permanent"            # a retry cannot fix it: the run fails, with AWS's words
    CAPACITY = "Capacity"              # the account's quota is in use: wait, as for nodes
    RETRYABLE = "Retryable"            # throttled, 5xx, unreachable: the same call later
    NOT_CONFIGURED = "NotConfigured"   # no credentials or no region: the operator's setup


THROTTLING = frozenset({"ThrottlingException", "Throttling", "ThrottledException", "RequestLimitExceeded",
                        "TooManyRequestsException", "SlowDown", "RequestThrottled",
                        "RequestThrottledException", "ProvisionedThroughputExceededException"})
# Codes whose meaning does not follow from the HTTP status: AWS answers some with 400.
CODE_KINDS: dict[str, Kind] = {
    **{code: Kind.RETRYABLE for code in THROTTLING},
    "RequestTimeout": Kind.RETRYABLE, "RequestTimeoutException": Kind.RETRYABLE,
    "InternalFailure": Kind.RETRYABLE, "InternalError": Kind.RETRYABLE, "InternalServerError": Kind.RETRYABLE,
    "ServiceUnavailable": Kind.RETRYABLE, "ServiceUnavailableException": Kind.RETRYABLE,
    "ResourceLimitExceeded": Kind.CAPACITY,
    # botocore's own exceptions, by class name (classify_exception walks the class's bases):
    # no answer came, or none could be asked for.
    "NoCredentialsError": Kind.NOT_CONFIGURED, "PartialCredentialsError": Kind.NOT_CONFIGURED,
    "NoRegionError": Kind.NOT_CONFIGURED,
    "ConnectionError": Kind.RETRYABLE,      # EndpointConnectionError, ConnectTimeoutError, ...
    "HTTPClientError": Kind.RETRYABLE,      # ConnectionClosedError, ReadTimeoutError, ...
    "ResponseParserError": Kind.RETRYABLE,  # an answer that is not AWS's (a proxy's page)
}
# Permanent errors that are about who calls, not what is asked: the run names the IAM action.
ACCESS_DENIED = frozenset({"AccessDenied", "AccessDeniedException", "UnrecognizedClientException",
                           "InvalidClientTokenId", "ExpiredToken", "ExpiredTokenException",
                           "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidSignatureException",
                           "IncompleteSignature", "MissingAuthenticationToken", "NotAuthorized",
                           "AuthFailure", "AllAccessDisabled", "AccountProblem"})
NOT_FOUND_PREFIXES = ("Requested resource not found", "Could not find")
# S3 operations whose IAM action is not named like them.
IAM_ACTIONS = {("s3", "HeadObject"): "s3:GetObject", ("s3", "HeadBucket"): "s3:ListBucket",
               ("s3", "ListObjectsV2"): "s3:ListBucket", ("s3", "ListObjects"): "s3:ListBucket"}
_PERFORM = re.compile(r"not authorized to perform:? ([a-z0-9-]+:[A-Za-z0-9*]+)")


def classify(code: str, http_status: int = 0) -> Kind:
    """The kind of an AWS error code (or botocore exception class name) with its HTTP status
    (0: none came). Unknown codes follow the status: 5xx and 429 retry, anything else is
    the caller's to fix."""
    kind = CODE_KINDS.get(code)
    if kind is not None:
        return kind
    if http_status >= 500 or http_status == 429:
        return Kind.RETRYABLE
    return Kind.PERMANENT


def exception_code(e: BaseException) -> str:
    """A botocore exception without an AWS answer, as a code for classify(): its class's name,
    or the nearest base's that the table knows (EndpointConnectionError -> ConnectionError)."""
    for cls in type(e).__mro__:
        if cls.__name__ in CODE_KINDS:
            return cls.__name__
    return type(e).__name__


def iam_action(service: str, operation: str, message: str = "") -> str:
    """The IAM action a refused call needed: as AWS's message names it (iam:PassRole for a
    CreateTrainingJob, say), else the operation's own."""
    m = _PERFORM.search(message or "")
    if m:
        return m.group(1)
    return IAM_ACTIONS.get((service, operation), f"{service}:{operation}")


class AwsError(Exception):
    """An error AWS answered that a retry does not fix: Kind.PERMANENT (ValidationException,
    AccessDenied...) or Kind.CAPACITY (ResourceLimitExceeded)."""

    def __init__(self, operation: str, code: str, message: str, *, kind: Kind = Kind.PERMANENT,
                 service: str = "sagemaker", http_status: int = 0):
        super().__init__(f"{operation}: {code}: {message}")
        self.operation, self.code, self.message = operation, code, message
        self.kind, self.service, self.http_status = kind, service, http_status

    @property
    def access_denied(self) -> bool:
        return self.code in ACCESS_DENIED

    @property
    def action(self) -> str:
        return iam_action(self.service, self.operation, self.message)


class AwsUnavailable(Exception):
    """Kind.RETRYABLE: throttled, a 5xx or unreachable after botocore's retries."""


class AwsNotConfigured(Exception):
    """Kind.NOT_CONFIGURED: no credentials or no region: say so in the run's condition."""


def is_not_found(e: AwsError) -> bool:
    # SageMaker says ValidationException "Requested resource not found", not ResourceNotFound.
    return e.code in ("ResourceNotFound", "NoSuchKey", "404") or (
        e.code == "ValidationException" and e.message.startswith(NOT_FOUND_PREFIXES))


_TITLE = re.compile(r"<title>(.*?)</title>", re.IGNORECASE | re.DOTALL)
MESSAGE_MAX = 1024


def readable(message: str) -> str:
    """AWS's message as one line for a condition or a log line. A proxy or a load balancer
    in the way answers with an HTML page, which botocore passes on whole: its title only."""
    if "<html" in message.lower() and (m := _TITLE.search(message)):
        message = m.group(1)
    message = " ".join(message.split())
    return message if len(message) <= MESSAGE_MAX else message[:MESSAGE_MAX - 1] + "\u2026"


def aws_exception(service: str, operation: str, code: str, message: str, http_status: int = 0, *,
                  kind: Kind | None = None) -> Exception:
    """The exception of classify()'s kind (or of `kind`, already classified)."""
    message = readable(message)
    kind = kind or classify(code, http_status)
    if kind is Kind.RETRYABLE:
        return AwsUnavailable(f"{operation}: {code}: {message}".strip())
    if kind is Kind.NOT_CONFIGURED:
        return AwsNotConfigured(message or code)
    return AwsError(operation, code, message, kind=kind, service=service, http_status=http_status)


class Aws:
    def __init__(self, *, threads: int | None = None, retry_mode: str | None = None,
                 max_attempts: int | None = None):
        self._pool = ThreadPoolExecutor(max_workers=threads or int(os.environ.get("ALPACA_SAGEMAKER_THREADS", "16")),
                                        thread_name_prefix="aws")
        self._retry_mode = retry_mode or os.environ.get("ALPACA_SAGEMAKER_RETRY_MODE", "standard")
        self._max_attempts = max_attempts or int(os.environ.get("ALPACA_SAGEMAKER_MAX_ATTEMPTS", "4"))
        self._clients: dict[tuple[str, str | None], Any] = {}
        self._lock = threading.Lock()
        self._session = None
        self.calls: Counter[str] = Counter()    # "sagemaker:Operation" -> count, for the benchmark

    def client(self, service: str, region: str | None) -> Any:
        key = (service, region)
        with self._lock:
            c = self._clients.get(key)
            if c is None:
                import boto3
                from botocore.config import Config
                if self._session is None:
                    self._session = boto3.session.Session()
                c = self._session.client(service, region_name=region, config=Config(
                    retries={"mode": self._retry_mode, "max_attempts": self._max_attempts},
                    connect_timeout=10, read_timeout=30, max_pool_connections=32))
                self._clients[key] = c
            return c

    def _call_sync(self, service: str, region: str | None, operation: str, kwargs: dict) -> Any:
        from botocore import exceptions as bx
        from botocore.parsers import ResponseParserError
        self.calls[f"{service}:{operation}"] += 1
        try:
            client = self.client(service, region)
            method: Callable[..., Any] = getattr(client, _snake(operation))
            result = method(**kwargs)
        except bx.ClientError as e:
            err = e.response.get("Error") or {}
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            code = str(err.get("Code") or status or "Unknown")
            metrics.api_call(service, operation, code)
            raise aws_exception(service, operation, code, str(err.get("Message") or e), status) from None
        except (bx.BotoCoreError, ResponseParserError) as e:
            # No answer from AWS (unreachable, no credentials), or none asked for.
            metrics.api_call(service, operation, type(e).__name__)
            raise aws_exception(service, operation, type(e).__name__, str(e),
                                kind=classify(exception_code(e))) from None
        metrics.api_call(service, operation, str(result.get("ResponseMetadata", {}).get("HTTPStatusCode", 200)))
        return result

    def call_sync(self, service: str, region: str | None, operation: str, **kwargs: Any) -> Any:
        """For callers without an event loop (the alpaca-finetune CLI)."""
        return self._call_sync(service, region, operation, kwargs)

    async def call(self, service: str, region: str | None, operation: str, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call_sync, service, region, operation, kwargs)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _snake(operation: str) -> str:
    out = []
    for i, ch in enumerate(operation):
        if ch.isupper() and i:
            out.append("_")
        out.append(ch.lower())
    return "".join(out)
