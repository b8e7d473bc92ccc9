"""spec.deepspeed.configMapRef -> the user's DeepSpeed JSON, read from the run's namespace.

Both backends read it the same way (EKS mounts it in the pods, SageMaker puts it in the
config channel), and a missing or malformed one holds the launch with the same reasons.
"""
from __future__ import annotations

import json

from ..kube import Kube
from .base import LaunchError, Run


async def read_user_ds_config(kube: Kube | None, run: Run) -> dict | None:
    """None when the spec names no ConfigMap; LaunchError when it cannot be used (yet)."""
    ref = run.spec.deepspeed.config_map_ref
    if ref is None:
        return None
    if kube is None:
        raise LaunchError("ConfigMapNotFound", "spec.deepspeed.configMapRef needs a cluster")
    cm = await kube.get("configmaps", run.namespace, ref.name)
    if cm is None:
        raise LaunchError("ConfigMapNotFound",
                          f"spec.deepspeed.configMapRef: ConfigMap {ref.name} not found in {run.namespace}")
    text = (cm.get("data") or {}).get(ref.key)
    if text is None:
        raise LaunchError("ConfigMapKeyNotFound",
                          f"spec.deepspeed.configMapRef: ConfigMap {ref.name} has no key {ref.key}")
    try:
        config = json.loads(text)
    except ValueError as e:
        raise LaunchError("InvalidDeepSpeedConfig",
                          f"ConfigMap {ref.name} key {ref.key} is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise LaunchError("InvalidDeepSpeedConfig", f"ConfigMap {ref.name} key {ref.key} is not a JSON object")
    return config
