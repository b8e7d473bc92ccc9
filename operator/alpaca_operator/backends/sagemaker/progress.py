"""A training job's progress.json (docs/contract.md), read from its output prefix.

The operator (each poll of a running job) and `alpaca-finetune status/wait` read it through
this one function, so both accept and refuse the same files.
"""
from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import urlsplit

from .client import Aws, AwsError, AwsNotConfigured, AwsUnavailable

log = logging.getLogger(__name__)


def progress_location(output_uri: str) -> tuple[str, str]:
    parts = urlsplit(output_uri)
    return parts.netloc, (parts.path.strip("/") + "/progress.json").lstrip("/")


def read_progress(aws: Aws, region: str | None, output_uri: str, job: str) -> dict[str, Any] | None:
    """Job `job`'s progress, without the report's own bookkeeping (job, attempt); None when
    there is none yet, it cannot be read, or it is an older job's (or another run's). Blocking."""
    if not output_uri.startswith("s3://"):
        return None
    bucket, key = progress_location(output_uri)
    try:
        obj = aws.call_sync("s3", region, "GetObject", Bucket=bucket, Key=key)
        data = json.loads(obj["Body"].read())
    except (AwsError, AwsUnavailable, AwsNotConfigured, ValueError) as e:
        log.debug("no progress for %s: %s", job, e)
        return None
    if not isinstance(data, dict) or data.get("job") not in (None, job):
        return None
    return {k: v for k, v in data.items() if k not in ("job", "attempt")}
