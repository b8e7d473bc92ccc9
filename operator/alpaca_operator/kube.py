"""The one door to the Kubernetes API for the operator's own calls; kopf watches through its
own. Async, with plain dicts in and out.

What every request gets here, whatever carries it:
- one login for all the requests that a 401 hit at the same time (single flight: an exec
  plugin such as `aws eks get-token` runs once, not once per request), and a new login
  before the credentials expire when they say when;
- a 401 never closes a connection pool under the requests still in flight on it;
- 429 (API Priority and Fairness, --max-requests-inflight) and 503 with Retry-After are
  retried after the time the server asked for, as client-go does;
- a count per verb and resource (the benchmark) and metrics.api_call for each request.

Why not the kubernetes client: importing it costs 58 MiB and two seconds of start-up, and
its model classes would cost the 500-run benchmark most of its CPU. Why not lightkube or
kr8s: measured behind this same class (bench/kube_clients.py), both cost far more than the
20% that issue 11 allowed: 1.7x and 3.5x the operator's CPU (docs/benchmarks.md); and
neither has single-flight login or Retry-After either. Credentials come from kopf's own login
helpers (kubeconfig, in-cluster service account); a kubeconfig that needs an exec plugin or
auth provider falls back to the kubernetes client, loaded only then.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Protocol
from urllib.parse import quote

import aiohttp
import kopf
import yaml

from . import metrics

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"

# client-go's defaults: at most 10 retries of a request the server asked to retry later.
MAX_RETRIES = 10
MAX_RETRY_AFTER = 32.0      # seconds: API Priority and Fairness asks for at most 32; more is capped
# Log in again this long before credentials that say when they expire do expire.
EXPIRY_MARGIN = dt.timedelta(seconds=60)
# Connections to the API server at most. Each TLS connection holds asyncio's 256 KiB read
# buffer: 64 of them were 14 MiB of the operator's 121 MiB at 500 runs. With 16, the 500-run
# benchmark was no slower to Running (19.2 s, against 20.7 s with 64 in the docs before).
CONNECTIONS = 16

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
    "workloads": "/apis/kueue.x-k8s.io/v1beta2",
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
        return replace(info, server=in_cluster_server(os.environ))
    if _kubeconfig_needs_client():
        # Only now pay for the kubernetes client (see __main__ for why it is kept out).
        if sys.modules.get("kubernetes", False) is None:
            del sys.modules["kubernetes"]
        return kopf.login_via_client(settings=settings, logger=logger)
    return kopf.login_with_kubeconfig(settings=settings, logger=logger)


def _expired(info: kopf.ConnectionInfo) -> bool:
    if info.expiration is None:
        return False
    expiration = info.expiration
    if expiration.tzinfo is None:       # kopf: naive means UTC
        expiration = expiration.replace(tzinfo=dt.timezone.utc)
    return dt.datetime.now(dt.timezone.utc) >= expiration - EXPIRY_MARGIN


class Login:
    """The current credentials, fetched by `fetch` (blocking: kopf's login helpers, an exec
    plugin) once, and again only when they expire or the server refuses them. `refresh`
    is single-flight: every request that was refused with the same credentials waits for
    one new login instead of running its own."""

    def __init__(self, fetch: Callable[[], kopf.ConnectionInfo | None]):
        self._fetch = fetch
        self._info: kopf.ConnectionInfo | None = None
        self._lock = asyncio.Lock()
        self.logins = 0

    async def current(self) -> kopf.ConnectionInfo:
        info = self._info
        if info is None or _expired(info):
            return await self.refresh(info)
        return info

    async def refresh(self, stale: kopf.ConnectionInfo | None) -> kopf.ConnectionInfo:
        async with self._lock:
            info = self._info
            if info is not None and info is not stale and not _expired(info):
                return info     # another request logged in while this one waited
            info = await asyncio.get_running_loop().run_in_executor(None, self._fetch)
            if info is None:
                raise RuntimeError("no Kubernetes credentials: no service account, no kubeconfig")
            self._info = info
            self.logins += 1
            return info


# ---- transports ----------------------------------------------------------------------

@dataclass
class Response:
    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes
    credentials: Any        # what the request was sent with: handed back to relogin()


class Transport(Protocol):
    async def send(self, method: str, url: str, *, query: Mapping[str, str] | None,
                   data: bytes | None, headers: Mapping[str, str]) -> Response: ...

    async def relogin(self, stale: Any) -> None: ...

    async def close(self) -> None: ...


def _tls_identity(info: kopf.ConnectionInfo) -> tuple:
    """What a connection pool is bound to; a new token alone does not need a new pool."""
    return (info.server, info.ca_path, info.ca_data, info.insecure, info.certificate_path,
            info.certificate_data, info.private_key_path, info.private_key_data,
            info.trust_env, info.proxy_url)


class AiohttpTransport:
    """aiohttp, kopf's own HTTP stack (no second one in the process). The Authorization
    header goes on each request, not on the pool, so a new token changes nothing for
    requests in flight; a pool is replaced only when the TLS identity changes, and the old
    one is closed only after its requests have had their timeout to finish."""

    def __init__(self, credentials: Callable[[], kopf.ConnectionInfo | None], *,
                 connections: int = CONNECTIONS, timeout: float = 30):
        self.login = Login(credentials)
        self._connections = connections
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._identity: tuple | None = None
        self._retiring: set[asyncio.Task] = set()

    def _pool(self, info: kopf.ConnectionInfo) -> aiohttp.ClientSession:
        identity = _tls_identity(info)
        if self._session is not None and identity == self._identity:
            return self._session
        if self._session is not None:
            task = asyncio.get_running_loop().create_task(self._retire(self._session))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        self._identity = identity
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._connections, ssl=info.as_ssl_context()),
            headers={"Accept": "application/json", "User-Agent": "alpaca-operator"},
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            trust_env=info.trust_env,
        )
        return self._session

    async def _retire(self, session: aiohttp.ClientSession) -> None:
        try:
            await asyncio.sleep(self._timeout + 1)
        finally:
            await session.close()

    async def send(self, method: str, url: str, *, query: Mapping[str, str] | None,
                   data: bytes | None, headers: Mapping[str, str]) -> Response:
        info = await self.login.current()
        session = self._pool(info)
        async with session.request(method, info.server.rstrip("/") + url, params=query, data=data,
                                   headers={**headers, **info.as_http_headers()}) as resp:
            body = await resp.read()
            return Response(resp.status, resp.reason or "", resp.headers, body, info)

    async def relogin(self, stale: Any) -> None:
        await self.login.refresh(stale)

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(value)))
    except ValueError:
        return 1.0      # an HTTP date: rare from an API server; wait a little, as client-go


# ---- the client ----------------------------------------------------------------------

class Kube:
    def __init__(self, credentials: Callable[[], kopf.ConnectionInfo | None], *,
                 connections: int = CONNECTIONS, timeout: float = 30, transport: Transport | None = None):
        self.transport = transport or AiohttpTransport(credentials, connections=connections,
                                                       timeout=timeout)
        self.requests: Counter[str] = Counter()   # "VERB plural" -> HTTP requests sent, for the benchmark

    async def close(self) -> None:
        await self.transport.close()

    async def request(self, method: str, url: str, *, body: Any = None,
                      query: Mapping[str, str] | None = None,
                      content_type: str = "application/json") -> Any:
        parts = url.split("/")
        counter = f"{method} {next((p for p in reversed(parts) if p in RESOURCES), 'other')}"
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": content_type}
        relogged = False
        retries = 0
        while True:
            self.requests[counter] += 1
            try:
                resp = await self.transport.send(method, url, query=query, data=data, headers=headers)
            except Exception:     # no answer (connection, timeout); a cancel is not an API error
                metrics.api_call("kubernetes", method, "error")
                raise
            metrics.api_call("kubernetes", method, resp.status)
            if resp.status == 401 and not relogged:
                # Rotated service-account token, expired exec credentials: log in again
                # (once for every request refused with these credentials), then retry once.
                relogged = True
                await self.transport.relogin(resp.credentials)
                continue
            if resp.status in (429, 503) and retries < MAX_RETRIES:
                delay = _retry_after(resp.headers)
                if delay is not None:
                    # The server did not act on it (APF rejects before handling), so even a
                    # POST is safe to send again.
                    retries += 1
                    log.debug("%s %s: %s, retrying in %.1fs", method, url, resp.status, delay)
                    await asyncio.sleep(delay)
                    continue
            if resp.status >= 400:
                try:
                    parsed = json.loads(resp.body) if resp.body else None
                except ValueError:
                    parsed = resp.body.decode(errors="replace")
                raise ApiError(resp.status, resp.reason, parsed)
            return json.loads(resp.body) if resp.body else None

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
