"""The AWS side: boto3 clients per region, each call counted and its errors sorted into
retry-later, permanent, and not-configured. Blocking boto3 runs in a bounded thread pool.

Region: spec.sagemaker.region, else the operator's environment (AWS_REGION,
AWS_DEFAULT_REGION). Endpoint: the standard AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_SAGEMAKER /
AWS_ENDPOINT_URL_S3 variables (botocore reads them). Credentials: the default chain (IRSA
or EKS Pod Identity in a cluster). Throttling and 5xx: botocore's retry mode
(ALPACA_SAGEMAKER_RETRY_MODE, default standard; ALPACA_SAGEMAKER_MAX_ATTEMPTS, default 4),
then the reconciler's jittered backoff.
"""
from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from ... import metrics

THROTTLING = frozenset({"ThrottlingException", "Throttling", "ThrottledException", "RequestLimitExceeded",
                        "TooManyRequestsException", "SlowDown", "RequestThrottled"})
NOT_FOUND_PREFIXES = ("Requested resource not found", "Could not find")


class AwsError(Exception):
    """A permanent error from AWS (ValidationException, ResourceLimitExceeded, AccessDenied...)."""

    def __init__(self, operation: str, code: str, message: str):
        super().__init__(f"{operation}: {code}: {message}")
        self.operation, self.code, self.message = operation, code, message


class AwsUnavailable(Exception):
    """Throttled, a 5xx or unreachable after botocore's retries."""


class AwsNotConfigured(Exception):
    """No credentials or no region: say so in the run's condition."""


def is_not_found(e: AwsError) -> bool:
    # SageMaker says ValidationException "Requested resource not found", not ResourceNotFound.
    return e.code in ("ResourceNotFound", "NoSuchKey", "404") or (
        e.code == "ValidationException" and e.message.startswith(NOT_FOUND_PREFIXES))


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
        self.calls[f"{service}:{operation}"] += 1
        try:
            client = self.client(service, region)
            method: Callable[..., Any] = getattr(client, _snake(operation))
            result = method(**kwargs)
        except bx.ClientError as e:
            err = e.response.get("Error") or {}
            code = str(err.get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or "Unknown")
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            metrics.api_call(service, operation, code)
            if code in THROTTLING or status >= 500 or status == 429:
                raise AwsUnavailable(f"{operation}: {code}: {err.get('Message') or ''}".strip()) from None
            raise AwsError(operation, code, str(err.get("Message") or e)) from None
        except (bx.NoCredentialsError, bx.PartialCredentialsError, bx.NoRegionError) as e:
            metrics.api_call(service, operation, type(e).__name__)
            raise AwsNotConfigured(str(e)) from None
        except (bx.EndpointConnectionError, bx.ConnectionError, bx.ReadTimeoutError,
                bx.ConnectTimeoutError) as e:
            metrics.api_call(service, operation, type(e).__name__)
            raise AwsUnavailable(f"{operation}: {e}") from None
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
