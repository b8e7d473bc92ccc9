"""Training progress in the AlpacaFineTune's status (docs/contract.md, "Progress").

On EKS, global rank 0 merge-patches `status.progress` through the status subresource
with the pod's service-account token, at most once every 10 s and once at each stage
change. Under SageMaker the container cannot reach the API server: rank 0 writes the same
keys, plus `job` and `attempt`, as the JSON object $ALPACA_PROGRESS_URI
(`{output URI}/progress.json`, set by the `train` entrypoint), at most once every 30 s and
at each stage change; the operator copies it into the status. Either way requests go out
from a background thread, so a slow or unreachable server never slows training, and any
failure is logged, never raised.

Rank 0 also prints one `alpaca-progress step=S/T loss=L learning_rate=R
tokens_per_second=X epoch=E` line per logging step, which SageMaker's MetricDefinitions
match (a field is left out while unknown).
"""
from __future__ import annotations

import datetime as dt
import logging
import math
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
S3_MIN_INTERVAL_S = 30.0
METRIC_LINE_PREFIX = "alpaca-progress"
# JSON has no NaN or infinity: a non-finite loss is reported as `lossNotFinite` (NaN,
# Infinity or -Infinity) with `loss` removed, and a finite one removes `lossNotFinite`. These
# two keys are sent as null to remove them (a merge patch keeps a key that is left out).
NULLABLE = ("loss", "lossNotFinite")


def loss_fields(loss: float | None) -> dict[str, Any]:
    """The report's loss keys: none while the loss is unknown. The loss to 4 significant
    digits, the Loss column of `kubectl get aft` (a printer column cannot format a number);
    the metric line and the Trainer's log keep the full value."""
    if loss is None:
        return {}
    if math.isfinite(loss):
        return {"loss": float(f"{loss:.4g}"), "lossNotFinite": None}
    return {"loss": None, "lossNotFinite": "NaN" if math.isnan(loss) else ("Infinity" if loss > 0 else "-Infinity")}


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


def _s3_writer(uri: str, extra: dict) -> Callable[[dict], None]:
    import json
    import tempfile

    from alpaca_train.s3io import S5cmd

    # One attempt: the next report replaces a lost one; a retry would only delay it.
    s5 = S5cmd(attempts=1)

    def write(body: dict) -> None:
        obj = dict(body["status"]["progress"], **extra)
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="progress-", delete=False) as f:
            json.dump(obj, f)
        try:
            s5.upload_file(Path(f.name), uri)
        finally:
            os.unlink(f.name)

    return write


class ProgressReporter:
    """Sends the newest progress to the API server: a report still queued when the next one
    comes is merged into it, and one not forced within the interval is dropped."""

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
        if int(env.get("RANK", "0")) != 0:
            return None
        if env.get("ALPACA_PROGRESS_URI"):
            uri = env["ALPACA_PROGRESS_URI"]
            extra = {"job": env.get("TRAINING_JOB_NAME")}
            attempt = env.get("ALPACA_ATTEMPT")
            if attempt:
                extra["attempt"] = int(attempt) if attempt.isdigit() else attempt
            log.info("writing progress to %s", uri)
            return cls(_s3_writer(uri, {k: v for k, v in extra.items() if v is not None}),
                       min_interval_s=S3_MIN_INTERVAL_S)
        name = env.get("ALPACA_FINETUNE_NAME")
        if not name:
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
        progress = {k: v for k, v in progress.items() if v is not None or k in NULLABLE}
        progress["updatedAt"] = _now()
        with self._cv:
            if self._pending is not None:
                # Not sent yet (the one before it is still on its way): what only it says
                # stays, as the two merge patches sent in turn would leave it. Replaced, the
                # training's last epoch and ETA were lost under the final "done" report.
                progress = {**self._pending["status"]["progress"], **progress}
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
        self._line_window = (0.0, 0)  # (time, tokens) at the last metric line
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
            **loss_fields(self.loss),
            learningRate=self.lr,
            tokensPerSecond=self.tokens_per_second,
            eta=eta,
        )

    def metric_line(self, state) -> str:
        """The stdout line SageMaker's MetricDefinitions match (the backend's regexes)."""
        now = time.monotonic()
        t_prev, tok_prev = self._line_window
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        tps = (tokens - tok_prev) / (now - t_prev) if now > t_prev and tokens > tok_prev and t_prev else None
        self._line_window = (now, tokens)
        parts = [METRIC_LINE_PREFIX, f"step={int(state.global_step)}/{int(state.max_steps or 0)}"]
        if self.loss is not None and math.isfinite(self.loss):
            parts.append(f"loss={self.loss:.6g}")
        if self.lr is not None:
            parts.append(f"learning_rate={self.lr:.6g}")
        if tps is not None:
            parts.append(f"tokens_per_second={tps:.1f}")
        if state.epoch is not None:
            parts.append(f"epoch={float(state.epoch):.4g}")
        return " ".join(parts)

    def on_train_begin(self, args, state, control, **kwargs):
        # No report here: the stage stays `loading` (reported when the trainer started) until
        # the first step completes, so the operator's startupDeadlineSeconds, not its
        # progressDeadlineSeconds, covers DeepSpeed's set-up and the first step.
        self._t0 = time.monotonic()
        self._step0 = state.global_step
        self._window = (self._t0, int(getattr(state, "num_input_tokens_seen", 0) or 0))
        self._line_window = self._window

    def on_step_end(self, args, state, control, **kwargs):
        # A report as steps complete (at most every 10 s), not only on logging steps: the
        # operator reads a report older than progressDeadlineSeconds as a hung gang, and
        # logging steps may be far apart. A logging step is reported by on_log, with its loss.
        if not (self.reporter and state.is_world_process_zero) or control.should_log:
            return
        first = state.global_step == self._step0 + 1
        if first or self.reporter.due():
            self.reporter.report(force=first, **self._progress(state, "training"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.loss = float(logs["loss"])
        if "learning_rate" in logs:
            self.lr = float(logs["learning_rate"])
        if state.is_world_process_zero and "loss" in logs:
            print(self.metric_line(state), flush=True)
        if self.reporter and state.is_world_process_zero and (
                self.reporter.due() or state.global_step == self._step0 + 1):
            self.reporter.report(force=True, **self._progress(state, "training"))

    def on_train_end(self, args, state, control, **kwargs):
        if self.reporter and state.is_world_process_zero:
            self.reporter.report(force=True, **self._progress(state, "training"))
