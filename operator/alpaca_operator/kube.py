"""The one door to the Kubernetes API for the operator's own calls; kopf watches through its
own. Async, on aiohttp (kopf's HTTP stack), with plain dicts in and out.

Why not the kubernetes client: importing it costs 58 MiB and two seconds of start-up
(half the memory budget, and time a restarted operator spends not reconciling), and its
model classes would cost the 500-run benchmark most of its CPU. Credentials come from
kopf's own login helpers (kubeconfig, in-cluster service account); a kubeconfig that needs
an exec plugin or auth provider (e.g. `aws eks get-token`) falls back to the kubernetes
client, loaded only then.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sys
from collections import Counter
from typing import Any, Callable, Mapping
from urllib.parse import quote

import aiohttp
import kopf
import yaml

from . import metrics

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"

# plural -> api prefix, for everything the operator touches (all namespaced).
RESOURCES: dict[str, str] = {
    "configmaps": "/api/v1",
    "services": "/api/v1",
    "serviceaccounts": "/api/v1",
    "pods": "/api/v1",
    "events": "/api/v1",
    "roles": "/apis/rbac.authorization.k8s.io/v1",
    "rolebindings": "/apis/rbac.authorization.k8s.io/v1",
    "jobs": "/apis/batch/v1",
    "alpacafinetunes": "/apis/alpaca.dev/v1alpha1",
}
KIND_TO_PLURAL = {
    "ConfigMap": "configmaps", "Service": "services", "ServiceAccount": "serviceaccounts",
    "Pod": "pods", "Event": "events", "Role": "roles", "RoleBinding": "rolebindings",
    "Job": "jobs", "AlpacaFineTune": "alpacafinetunes",
}


class ApiError(Exception):
    def __init__(self, status: int, reason: str, body: Any = None):
        super().__init__(f"{status} {reason}")
        self.status, self.reason, self.body = status, reason, body

    @property
    def message(self) -> str:
        if isinstance(self.body, dict):
            return self.body.get("message") or self.reason
        return self.reason


def path(plural: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    p = f"{RESOURCES[plural]}/namespaces/{quote(namespace)}/{plural}"
    if name:
        p += f"/{quote(name)}"
    if subresource:
        p += f"/{subresource}"
    return p


# ---- credentials -------------------------------------------------------------------

def _kubeconfig_needs_client() -> bool:
    """True when the current kubeconfig user authenticates through an exec plugin or an
    auth provider, which only the kubernetes client knows how to run."""
    paths = [os.path.expanduser(p) for p in
             (os.environ.get("KUBECONFIG") or "~/.kube/config").split(os.pathsep) if p]
    configs = []
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                configs.append(yaml.safe_load(f) or {})
        except OSError:
            continue
    current = next((c.get("current-context") for c in configs if c.get("current-context")), None)
    contexts = {x["name"]: x.get("context") or {} for c in configs for x in c.get("contexts") or ()}
    users = {x["name"]: x.get("user") or {} for c in configs for x in c.get("users") or ()}
    user = users.get((contexts.get(current) or {}).get("user"), {})
    return bool(user.get("exec") or user.get("auth-provider"))


def in_cluster_server(env: Mapping[str, str]) -> str:
    """The API server as the kubelet tells its pods (KUBERNETES_SERVICE_HOST/PORT), like
    client-go's in-cluster config; kopf alone assumes kubernetes.default.svc:443."""
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not (host and port):
        return "https://kubernetes.default.svc"
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def login(settings: kopf.OperatorSettings, logger: logging.Logger | Any = log) -> kopf.ConnectionInfo | None:
    """In a pod: its service account. Else $KUBECONFIG (or ~/.kube/config)."""
    info = kopf.login_with_service_account(settings=settings, logger=logger)
    if info is not None:
        return dataclasses.replace(info, server=in_cluster_server(os.environ))
    if _kubeconfig_needs_client():
        # Only now pay for the kubernetes client (see __main__ for why it is kept out).
        if sys.modules.get("kubernetes", False) is None:
            del sys.modules["kubernetes"]
        return kopf.login_via_client(settings=settings, logger=logger)
    return kopf.login_with_kubeconfig(settings=settings, logger=logger)


# ---- the client ----------------------------------------------------------------------

class Kube:
    def __init__(self, credentials: Callable[[], kopf.ConnectionInfo | None], *,
                 connections: int = 64, timeout: float = 30):
        self._credentials = credentials
        self._connections = connections
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._server = ""
        self._lock = asyncio.Lock()
        self.requests: Counter[str] = Counter()   # "VERB plural" -> count, for the benchmark

    async def _open(self, fresh: bool = False) -> aiohttp.ClientSession:
        async with self._lock:
            if self._session is not None and not fresh:
                return self._session
            if self._session is not None:
                await self._session.close()
            info = await asyncio.get_running_loop().run_in_executor(None, self._credentials)
            if info is None:
                raise RuntimeError("no Kubernetes credentials: no service account, no kubeconfig")
            self._server = info.server.rstrip("/")
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connections, ssl=info.as_ssl_context()),
                headers={**info.as_http_headers(), "Accept": "application/json",
                         "User-Agent": "alpaca-operator"},
                timeout=self._timeout,
                trust_env=info.trust_env,
            )
            return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, url: str, *, body: Any = None,
                      query: Mapping[str, str] | None = None,
                      content_type: str = "application/json") -> Any:
        parts = url.split("/")
        self.requests[f"{method} {next((p for p in reversed(parts) if p in RESOURCES), 'other')}"] += 1
        data = None if body is None else json.dumps(body)
        session = await self._open()
        for refreshed in (False, True):
            async with session.request(method, self._server + url, params=query, data=data,
                                       headers={"Content-Type": content_type}) as resp:
                text = await resp.text()
                metrics.api_call("kubernetes", method, resp.status)
                if resp.status == 401 and not refreshed:
                    # Projected service-account tokens rotate: log in again, once.
                    session = await self._open(fresh=True)
                    continue
                if resp.status >= 400:
                    try:
                        parsed = json.loads(text) if text else None
                    except ValueError:
                        parsed = text
                    raise ApiError(resp.status, resp.reason or "", parsed)
                return json.loads(text) if text else None
        raise AssertionError("unreachable")

    # ---- conveniences --------------------------------------------------------------

    async def get(self, plural: str, namespace: str, name: str) -> dict | None:
        """None when it does not exist."""
        try:
            return await self.request("GET", path(plural, namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def list(self, plural: str, namespace: str, label_selector: str | None = None) -> list[dict]:
        query = {"labelSelector": label_selector} if label_selector else None
        return (await self.request("GET", path(plural, namespace), query=query)).get("items") or []

    async def create(self, obj: Mapping[str, Any]) -> dict | None:
        """Create; None if it already exists (409 is normal: we may have made it before a crash)."""
        plural = KIND_TO_PLURAL[obj["kind"]]
        try:
            return await self.request("POST", path(plural, obj["metadata"]["namespace"]), body=obj)
        except ApiError as e:
            if e.status == 409:   # AlreadyExists: the only 409 a create gets
                return None
            raise

    async def patch(self, plural: str, namespace: str, name: str, patch: Mapping[str, Any], *,
                    subresource: str | None = None) -> dict | None:
        """Merge-patch; None if the object is gone."""
        try:
            return await self.request("PATCH", path(plural, namespace, name, subresource), body=patch,
                                      content_type=MERGE_PATCH)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def delete(self, plural: str, namespace: str, name: str, propagation: str = "Background",
                     uid: str | None = None) -> bool:
        """Delete (only that incarnation, given uid); False if already gone (404 is normal)."""
        options: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1",
                                   "propagationPolicy": propagation}
        if uid:
            options["preconditions"] = {"uid": uid}
        try:
            await self.request("DELETE", path(plural, namespace, name), body=options)
            return True
        except ApiError as e:
            if e.status == 404 or (uid and e.status == 409):
                return False
            raise
