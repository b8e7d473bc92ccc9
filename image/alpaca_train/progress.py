"""Training progress in the AlpacaFineTune's status (docs/contract.md, "Progress").

Global rank 0 merge-patches `status.progress` through the status subresource with the
pod's service-account token, at most once every 10 s and once at each stage change.
Requests go out from a background thread, so a slow or unreachable API server never
slows training, and any failure is logged, never raised.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "alpaca.dev", "v1alpha1", "alpacafinetunes"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MIN_INTERVAL_S = 10.0


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def hhmmss(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _in_cluster_patcher(name: str, namespace: str) -> Callable[[dict], None]:
    from kubernetes import client
    from kubernetes.config.incluster_config import InClusterConfigLoader

    sa = Path(os.environ.get("ALPACA_SERVICEACCOUNT_DIR", SA_DIR))
    cfg = client.Configuration()
    InClusterConfigLoader(token_filename=str(sa / "token"), cert_filename=str(sa / "ca.crt")).load_and_set(cfg)
    api = client.CustomObjectsApi(client.ApiClient(cfg))

    def patch(body: dict) -> None:
        api.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, body, _request_timeout=10
        )

    return patch


class ProgressReporter:
    """Sends the newest progress to the API server; drops reports it could not send in time."""

    def __init__(self, patch: Callable[[dict], None], min_interval_s: float = MIN_INTERVAL_S):
        self._patch = patch
        self.min_interval_s = min_interval_s
        self._last_sent = -float("inf")
        self._pending: dict | None = None
        self._cv = threading.Condition()
        self._busy = False
        self._closed = False
        self.sent = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="alpaca-progress", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls, env: dict | None = None) -> "ProgressReporter | None":
        env = os.environ if env is None else env
        name = env.get("ALPACA_FINETUNE_NAME")
        if not name or int(env.get("RANK", "0")) != 0:
            return None
        namespace = env.get("ALPACA_FINETUNE_NAMESPACE")
        if not namespace:
            ns_file = Path(env.get("ALPACA_SERVICEACCOUNT_DIR", SA_DIR)) / "namespace"
            namespace = ns_file.read_text().strip() if ns_file.exists() else "default"
        try:
            patch = _in_cluster_patcher(name, namespace)
        except Exception as e:  # noqa: BLE001 - progress must never fail training
            log.warning("progress reporting disabled: cannot configure the in-cluster client: %s", e)
            return None
        log.info("reporting progress to %s/%s %s", namespace, PLURAL, name)
        return cls(patch)

    def due(self) -> bool:
        return time.monotonic() - self._last_sent >= self.min_interval_s

    def report(self, force: bool = False, **progress: Any) -> None:
        """Queue a report; sent now if forced or 10 s passed since the last, else dropped."""
        now = time.monotonic()
        if not force and now - self._last_sent < self.min_interval_s:
            return
        self._last_sent = now
        progress = {k: v for k, v in progress.items() if v is not None}
        progress["updatedAt"] = _now()
        with self._cv:
            self._pending = {"status": {"progress": progress}}
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and not self._closed:
                    self._cv.wait()
                if self._pending is None and self._closed:
                    return
                body, self._pending, self._busy = self._pending, None, True
            try:
                self._patch(body)
                self.sent += 1
            except Exception as e:  # noqa: BLE001 - progress must never fail training
                self.failures += 1
                log.warning("progress report failed (training goes on): %s", str(e).splitlines()[0][:300])
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def flush(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while (self._pending is not None or self._busy) and time.monotonic() < deadline:
                self._cv.wait(timeout=max(0.0, deadline - time.monotonic()))

    def close(self, timeout_s: float = 15.0) -> None:
        self.flush(timeout_s)
        with self._cv:
            self._closed = True
            self._cv.notify_all()


class ProgressCallback(TrainerCallback):
    """Feeds a ProgressReporter from the Trainer: step, loss, learning rate, tokens/s, ETA."""

    def __init__(self, reporter: ProgressReporter | None):
        self.reporter = reporter
        self.loss: float | None = None
        self.lr: float | None = None
        self._t0 = 0.0
        self._step0 = 0
        self._window = (0.0, 0)  # (time, tokens) at the last report
        self.tokens_per_second: float | None = None

    def _progress(self, state, stage: str) -> dict:
        now = time.monotonic()
        t_prev, tok_prev = self._window
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        if now > t_prev and tokens > tok_prev:
            self.tokens_per_second = round((tokens - tok_prev) / (now - t_prev), 1)
        self._window = (now, tokens)
        done = state.global_step - self._step0
        eta = None
        if done > 0 and state.max_steps:
            eta = hhmmss((now - self._t0) / done * max(0, state.max_steps - state.global_step))
        return dict(
            stage=stage,
            step=int(state.global_step),
            totalSteps=int(state.max_steps or 0),
            display=f"{int(state.global_step)}/{int(state.max_steps or 0)}",
            epoch=round(float(state.epoch), 4) if state.epoch is not None else None,
            loss=self.loss,
            learningRate=self.lr,
            tokensPerSecond=self.tokens_per_second,
            eta=eta,
        )

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.monotonic()
        self._step0 = state.global_step
        self._window = (self._t0, int(getattr(state, "num_input_tokens_seen", 0) or 0))
        if self.reporter and state.is_world_process_zero:
            self.reporter.report(force=True, **self._progress(state, "training"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.loss = float(logs["loss"])
        if "learning_rate" in logs:
            self.lr = float(logs["learning_rate"])
        if self.reporter and state.is_world_process_zero and self.reporter.due():
            self.reporter.report(**self._progress(state, "training"))

    def on_train_end(self, args, state, control, **kwargs):
        if self.reporter and state.is_world_process_zero:
            self.reporter.report(force=True, **self._progress(state, "training"))
