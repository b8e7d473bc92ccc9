"""Helpers for the operator's tests against the real control plane (test_operator_*.py):
the operator as a subprocess (so it can be SIGKILLed), waiting, and phase watching."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import kubernetes

from alpaca_operator import api
from support import free_port, wait_for  # noqa: F401  (wait_for is re-exported to the operator tests)

ROOT = Path(__file__).resolve().parent.parent
KUBECTL = str(ROOT / ".bin" / "kubectl")


class OperatorProcess:
    """`python -m alpaca_operator` (standalone unless args say --peering), cluster-wide."""

    def __init__(self, env: dict, log_path: Path, stats_path: Path | None = None,
                 extra_env: dict | None = None, args: tuple[str, ...] = ()):
        self.env = {**env, **(extra_env or {})}
        self.args = tuple(args)
        if stats_path is not None:
            self.env["ALPACA_OPERATOR_STATS"] = str(stats_path)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0

    def start(self, wait: bool = True) -> None:
        self.port = free_port()
        log = open(self.log_path, "ab")
        log.write(f"\n===== start #{self.starts + 1} at {time.time():.3f} =====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "alpaca_operator", "--liveness", f"http://127.0.0.1:{self.port}/healthz",
             *self.args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=ROOT)
        log.close()
        self.starts += 1
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the operator exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"the operator did not become ready in {timeout}s:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL: no cleanup handlers, no goodbye, like an OOM kill or a node loss."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


class PhaseRecorder:
    """Every phase an AlpacaFineTune goes through, from a watch (polling would miss the
    short ones: Pending lasts milliseconds). A list first, then a watch from its
    resourceVersion: nothing is missed, and nothing needs waiting for (kubectl's watch
    prints nothing for an empty listing, so it cannot say when it is ready)."""

    def __init__(self, env: dict, namespace: str, name: str):
        from kubernetes import client, config, watch
        self.phases: list[str] = []
        api = client.CustomObjectsApi(config.new_client_from_config(config_file=env["KUBECONFIG"]))
        args = ("alpaca.dev", "v1alpha1", namespace, "alpacafinetunes")
        listing = api.list_namespaced_custom_object(*args, field_selector=f"metadata.name={name}")
        for item in listing.get("items") or ():
            self._saw(item)
        self._watch = watch.Watch()
        stream = self._watch.stream(api.list_namespaced_custom_object, *args,
                                    field_selector=f"metadata.name={name}",
                                    resource_version=listing["metadata"]["resourceVersion"], timeout_seconds=600)
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _saw(self, obj: dict) -> None:
        phase = (obj.get("status") or {}).get("phase")
        if phase and (not self.phases or self.phases[-1] != phase):
            self.phases.append(phase)

    def _read(self, stream) -> None:
        try:
            for event in stream:
                self._saw(event["object"])
        except Exception:  # noqa: BLE001 - stopped (stop() closes the stream under it)
            pass

    def stop(self) -> list[str]:
        time.sleep(0.5)     # the last event may still be on its way
        self._watch.stop()
        return self.phases


def token_env(cluster, token: str, path: Path) -> dict:
    """The environment of a kubectl that authenticates with this bearer token only (no
    client certificate: the API server would take that first)."""
    admin = json.loads(Path(cluster.kubeconfig).read_text())
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": "token", "user": {"token": token}}],
        "contexts": [{"name": "token", "context": {"cluster": admin["clusters"][0]["name"], "user": "token"}}],
        "current-context": "token",
    }))
    return {**cluster.env, "KUBECONFIG": str(path)}


def kubectl_as(env: dict, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([KUBECTL, *args], capture_output=True, text=True, timeout=60, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def patch_status_as(env: dict, namespace: str, name: str, status: dict, *,
                    check: bool = False) -> subprocess.CompletedProcess:
    """A merge patch of the run's status with env's credentials, sent as the image's reporter
    sends it: the kubernetes client's one PATCH (kubectl patch would GET first, which the
    trainer Role does not allow). returncode 0, or 1 with the API server's message as stderr."""
    client = kubernetes.config.new_client_from_config(config_file=env["KUBECONFIG"])
    try:
        kubernetes.client.CustomObjectsApi(client).patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"status": status}, _request_timeout=30)
    except kubernetes.client.ApiException as e:
        message = json.loads(e.body or "{}").get("message") or str(e)
        if check:
            raise AssertionError(f"PATCH {name}/status refused: {message}") from None
        return subprocess.CompletedProcess([], 1, "", message)
    finally:
        client.close()
    return subprocess.CompletedProcess([], 0, "", "")


def get_json(cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def assert_subset(expected: Any, actual: Any, path: str = "") -> None:
    """Every field we rendered is in the live object with that value (the API server adds
    defaults, which are not ours to pin)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: expected an object, got {actual!r}"
        for k, v in expected.items():
            assert k in actual, f"{path}.{k} is missing in the live object"
            assert_subset(v, actual[k], f"{path}.{k}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), \
            f"{path}: expected {len(expected)} items, got {actual!r}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_subset(e, a, f"{path}[{i}]")
    else:
        assert expected == actual, f"{path}: expected {expected!r}, got {actual!r}"


def service_account_env(cluster, path: Path, namespace: str, name: str) -> dict:
    """cluster.env with a kubeconfig that authenticates as system:serviceaccount:NAMESPACE:NAME
    only (a TokenRequest token): what a pod of that account may do, and nothing more."""
    token = cluster.kubectl("create", "token", name, "-n", namespace, "--duration=1h").stdout.strip()
    admin = json.loads(Path(cluster.kubeconfig).read_text())
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": admin["clusters"][0]["name"], "user": name}}],
        "current-context": name,
    }
    path.write_text(json.dumps(config))
    return {**cluster.env, "KUBECONFIG": str(path)}


def apply(cluster, namespace: str, *docs: dict) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))


def aft(cluster, namespace: str, name: str) -> dict:
    """The run; its status {} until the operator's first write (a check may run before it)."""
    body = get_json(cluster, "alpacafinetune", name, "-n", namespace)
    body.setdefault("status", {})
    return body


def phase_is(cluster, namespace, name, *phases):
    """A wait_for check: the run's body once its phase is one of these."""
    def check():
        body = aft(cluster, namespace, name)
        return body if body.get("status", {}).get("phase") in phases else None
    return check
