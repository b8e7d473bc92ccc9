"""What one failed attempt tells the next ones, for both backends: whether the failure was
the node's (node_evidence, gpu_health: reported in the Observation, recorded by status.py in
attemptHistory), and, read back from attemptHistory, the nodes a new attempt keeps off
(avoided_nodes) and the loss-spike steps it skips (skip_steps). Pure.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

# What in a trainer's termination message blames the GPU node rather than the run: NVIDIA
# Xid errors, CUDA runtime/driver errors, NCCL errors (a link flap, a dead peer's NIC), ECC
# errors. docs/contract.md lists them; the run's own bugs (a Python exception, an OOM of
# host memory) do not match.
NODE_ERROR = re.compile(
    r"\bXid\b|CUDA error|CUDA_ERROR_\w+|cudaError\w*|NCCL error|ncclSystemError|ncclInternalError"
    r"|ncclUnhandledCudaError|uncorrectable ECC|ECC error|GPU has fallen off the bus",
    re.IGNORECASE)
# CUDA errors that are the run's own (a batch too large, an index out of range in a
# kernel): a CUDA error message saying one of these blames the run, not the node.
RUN_CUDA_ERROR = re.compile(r"out of memory|device-side assert", re.IGNORECASE)
# The kubelet's eviction messages for node pressure ("The node was low on resource: memory").
NODE_PRESSURE = re.compile(r"node was low on resource|node had condition: \[\w*Pressure\]", re.IGNORECASE)


def node_evidence(termination_message: str, pod_reason: str, pod_message: str,
                  node_conditions: list[Mapping[str, Any]] | None) -> str:
    """Why a failed worker's node, not the run, is to blame; "" when nothing says so. The
    trainer's own termination message naming a GPU/NCCL error (NODE_ERROR), an eviction for
    node pressure, or the node not Ready (node_conditions None: the node could not be read)."""
    found = NODE_ERROR.search(termination_message or "")
    if found and not RUN_CUDA_ERROR.search(termination_message):
        start = max(0, found.start() - 80)
        return f"termination message: {termination_message[start:found.end() + 160].strip()}"
    if pod_reason == "Evicted" and NODE_PRESSURE.search(pod_message or ""):
        return f"evicted for node pressure: {pod_message.strip()}"
    for c in node_conditions or ():
        if c.get("type") == "Ready" and c.get("status") != "True":
            why = ": ".join(str(x) for x in (c.get("reason"), c.get("message")) if x) or f"status {c.get('status')}"
            return f"node not Ready ({why})"
    return ""


def gpu_health(node_conditions: list[Mapping[str, Any]] | None) -> str:
    """The node's GPU-health conditions as node-problem-detector or DCGM publish them (a
    condition type naming the GPU, True meaning a problem), for the Event: "" if none."""
    bad = [c for c in node_conditions or ()
           if "gpu" in str(c.get("type", "")).lower() and c.get("status") == "True"]
    return "; ".join(f"{c['type']}: {c.get('reason') or ''} {c.get('message') or ''}".strip() for c in bad)


def avoided_nodes(history: list[Mapping[str, Any]] | None, attempt: int, window: int) -> list[str]:
    """The nodes attempt `attempt` keeps off: those a failure in one of the `window`
    attempts before it was attributed to (and that were not kept for too few nodes)."""
    return sorted({e["node"] for e in history or () if e.get("node") and e.get("nodeAvoided")
                   and attempt - window <= int(e.get("attempt") or 0) < attempt})


def skip_steps(status: Mapping[str, Any]) -> str | None:
    """The steps every new attempt skips: those of each loss spike so far ("7-9,20-22"),
    for the trainer's ALPACA_SKIP_STEPS. From attemptHistory, so a relaunch, a resume or a
    restarted operator renders the same."""
    ranges = dict.fromkeys(e["skipSteps"] for e in status.get("attemptHistory") or () if e.get("skipSteps"))
    return ",".join(ranges) or None
