"""Training job names: deterministic from (run name, uid, attempt, resume), never reused.

SageMaker names are unique per account and region forever (a finished job keeps its name),
so a resumed attempt cannot reuse its stopped job's name: it gets `rK` appended. The uid
part makes a re-created run of the same name, or a run of the same name in another
namespace or cluster, pick different names; the tags (request.py) tell ours from others.
"""
from __future__ import annotations

import re

MAX_LEN = 63
NAME_PATTERN = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
_SUFFIX = re.compile(r"-([0-9a-f]{8})-a([0-9]+)(?:r([0-9]+))?$")


def uid_mark(uid: str) -> str:
    """What every job name of the run with this uid contains (`-<8 hex>-a`), and nearly no other's."""
    return f"-{uid.replace('-', '').lower()[:8]:0<8}-a"


def training_job_name(run_name: str, uid: str, attempt: int, resume: int = 0) -> str:
    if attempt < 1 or resume < 0:
        raise ValueError(f"attempt {attempt} / resume {resume}")
    suffix = f"{uid_mark(uid)}{attempt}" + (f"r{resume}" if resume else "")
    prefix = re.sub(r"[^a-zA-Z0-9-]+", "-", run_name)[:MAX_LEN - len(suffix)].strip("-") or "run"
    name = prefix + suffix
    assert NAME_PATTERN.fullmatch(name) and len(name) <= MAX_LEN, name
    return name


def parse_job_name(name: str) -> tuple[int, int] | None:
    """(attempt, resume) of a name made above, else None."""
    m = _SUFFIX.search(name or "")
    if not m:
        return None
    return int(m.group(2)), int(m.group(3) or 0)

