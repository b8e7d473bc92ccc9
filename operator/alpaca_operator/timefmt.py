"""Timestamps as the Kubernetes API writes them (RFC 3339, UTC, whole seconds): the format
of every time in .status and in the Events the operator posts.

A leaf module, so the state machine, the backends and the metrics read and write times the
same way without importing one another.
"""
from __future__ import annotations

import datetime as dt


def fmt_time(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str | None) -> dt.datetime | None:
    if not s:
        return None
    try:
        return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None
