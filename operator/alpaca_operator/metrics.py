"""The operator's Prometheus metrics (docs/operator.md lists them), on prometheus-client.

The rest of the operator calls the functions below (one line at each place, so the call
sites stay readable); `serve()` exposes them, with prometheus-client's process metrics, on
`--metrics-port`. Every function stays cheap and never raises: metrics must not break a
reconcile.

Runs by phase is a gauge computed at scrape time from the last phase seen per run (not a
label per run: 500 runs must not make 500 series).
"""
from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
from typing import Any, Callable, Iterable, Mapping

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .timefmt import parse_time

log = logging.getLogger(__name__)

PREFIX = "alpaca_operator"
# Reconciles take milliseconds; time to Running from seconds (kwok) to an hour (a large gang
# waiting for capacity).
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
RUNNING_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
RUNNING_PHASES = ("Running", "Uploading")


def _safe(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a metric must never fail the caller
            log.debug("metrics.%s failed", fn.__name__, exc_info=True)
            return None
    return wrapper


class _RunPhases(Collector):
    """alpaca_operator_runs{phase, backend}: how many runs are in each phase now."""

    def __init__(self) -> None:
        self._runs: dict[tuple[str, str], tuple[str, str]] = {}
        self._lock = threading.Lock()   # the scrape runs in the HTTP server's thread

    def set(self, key: tuple[str, str], backend: str, phase: str | None) -> None:
        with self._lock:
            if phase is None:
                self._runs.pop(key, None)
            else:
                self._runs[key] = (backend or self._runs.get(key, ("eks", ""))[0], phase)

    def phase(self, key: tuple[str, str]) -> str | None:
        with self._lock:
            return (self._runs.get(key) or (None, None))[1]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        g = GaugeMetricFamily(f"{PREFIX}_runs", "AlpacaFineTunes by phase and backend, as last seen",
                              labels=["phase", "backend"])
        counts: dict[tuple[str, str], int] = {}
        with self._lock:
            for backend, phase in self._runs.values():
                counts[(phase, backend)] = counts.get((phase, backend), 0) + 1
        for (phase, backend), n in sorted(counts.items()):
            g.add_metric([phase, backend], n)
        yield g


class Metrics:
    """The collectors, on one registry (the default one in the operator; a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.registry = registry
        self.runs = _RunPhases()
        registry.register(self.runs)
        self.reconciles = Counter(f"{PREFIX}_reconciles", "Reconciles of a run, by backend",
                                  ["backend"], registry=registry)
        self.reconcile_errors = Counter(f"{PREFIX}_reconcile_errors",
                                        "Reconciles that failed (retried with backoff), by backend and error class",
                                        ["backend", "error"], registry=registry)
        self.reconcile_seconds = Histogram(f"{PREFIX}_reconcile_duration_seconds",
                                           "How long one reconcile took, by backend", ["backend"],
                                           buckets=RECONCILE_BUCKETS, registry=registry)
        self.time_to_running = Histogram(f"{PREFIX}_time_to_running_seconds",
                                         "From a run's creation to its first Running, by backend", ["backend"],
                                         buckets=RUNNING_BUCKETS, registry=registry)
        self.api_calls = Counter(f"{PREFIX}_api_calls",
                                 "The operator's own API calls (kopf's watches aside), by system, verb and code",
                                 ["system", "verb", "code"], registry=registry)
        self.api_errors = Counter(f"{PREFIX}_api_errors",
                                  "API calls answered with an error (HTTP >= 400 or an AWS error code)",
                                  ["system", "verb", "code"], registry=registry)
        self.restarts = Counter(f"{PREFIX}_run_restarts", "New attempts of a run, by backend and cause",
                                ["backend", "cause"], registry=registry)


_metrics = Metrics()


def use(metrics: Metrics) -> Metrics:
    """Replace the module's collectors (tests); returns the previous ones."""
    global _metrics
    previous, _metrics = _metrics, metrics
    return previous


def serve(port: int | None, addr: str = "0.0.0.0") -> None:
    """Expose /metrics on PORT (None or 0: not at all) from a daemon thread."""
    if port:
        start_http_server(int(port), addr=addr, registry=_metrics.registry)
        log.info("metrics on http://%s:%d/metrics", addr, int(port))


def _is_error(code: str) -> bool:
    return not code.isdigit() or int(code) >= 400


# ---- the interface the operator calls ----------------------------------------------

@_safe
def api_call(system: str, verb: str, code: str | int) -> None:
    """One call to an API: system "kubernetes" or "sagemaker" (or "s3"); verb the HTTP verb
    or the SageMaker operation (e.g. "CreateTrainingJob"); code the HTTP status or the AWS
    error code ("200", "409", "ThrottlingException")."""
    code = str(code)
    _metrics.api_calls.labels(system, verb, code).inc()
    if _is_error(code):
        _metrics.api_errors.labels(system, verb, code).inc()


@_safe
def reconcile_done(backend: str, seconds: float, error: str | None = None) -> None:
    """One reconcile of a run of this backend, how long it took, and its error class if any."""
    _metrics.reconciles.labels(backend).inc()
    _metrics.reconcile_seconds.labels(backend).observe(max(0.0, seconds))
    if error:
        _metrics.reconcile_errors.labels(backend, error).inc()


@_safe
def run_phase(namespace: str, name: str, backend: str, phase: str | None) -> None:
    """The run's phase as last written (None: the run is gone)."""
    _metrics.runs.set((namespace, name), backend, phase)


@_safe
def time_to_running(backend: str, seconds: float) -> None:
    """From the run's creation to its first Running."""
    _metrics.time_to_running.labels(backend).observe(max(0.0, seconds))


@_safe
def restart(backend: str, cause: str) -> None:
    """A new attempt started; cause e.g. "WorkerFailed", "Disruption", "JobFailed"."""
    _metrics.restarts.labels(backend, cause or "Unknown").inc()


# ---- conveniences for the call sites ------------------------------------------------

def backend_of(body: Mapping[str, Any] | None) -> str:
    return str(((body or {}).get("spec") or {}).get("backend") or "eks")


@_safe
def run_seen(body: Mapping[str, Any], deleted: bool = False) -> None:
    """A run as a watch event showed it (the start-up listing included)."""
    meta = body.get("metadata") or {}
    run_phase(meta.get("namespace", ""), meta.get("name", ""), backend_of(body),
              None if deleted else (body.get("status") or {}).get("phase"))


@_safe
def status_written(old: Mapping[str, Any], new: Mapping[str, Any] | None) -> None:
    """The operator wrote a run's status (old: the body it decided on, new: what the API
    server returned): the phase, the first Running. (Restarts come from the plan that
    starts them: restart().)"""
    if not new:
        return
    backend = backend_of(new)
    before, after = old.get("status") or {}, new.get("status") or {}
    meta = new.get("metadata") or {}
    run_phase(meta.get("namespace", ""), meta.get("name", ""), backend, after.get("phase"))
    if after.get("phase") in RUNNING_PHASES and before.get("phase") not in RUNNING_PHASES \
            and (after.get("attempts") or 1) == 1:
        created = parse_time(meta.get("creationTimestamp"))
        if created is not None:
            time_to_running(backend, (dt.datetime.now(dt.timezone.utc) - created).total_seconds())

