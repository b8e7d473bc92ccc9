"""The maintained clients issue 11 asked to compare, as transports behind kube.Kube (so the
operator, the retries and the counting stay the same and only the client differs):

- lightkube: its kubeconfig / service-account loading, TLS and auth (lightkube.config),
  and the httpx2 client it builds from them;
- kr8s: its Api object (kubeconfig / service account, TLS, auth) and Api.call_api.

Used only by `bench/operator_bench.py --client` (ALPACA_KUBE_CLIENT); see docs/benchmarks.md.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

from .kube import Response


class LightkubeTransport:
    def __init__(self, *, connections: int, timeout: float):
        import httpx2
        from lightkube.config import client_adapter
        from lightkube.config.kubeconfig import KubeConfig

        config = KubeConfig.from_env().get()
        params = client_adapter.ConnectionParams(timeout=httpx2.Timeout(timeout))
        self._client = httpx2.AsyncClient(
            **params.httpx_params(config),
            limits=httpx2.Limits(max_connections=connections, max_keepalive_connections=connections),
            headers={"Accept": "application/json", "User-Agent": "alpaca-operator"})

    async def send(self, method: str, url: str, *, query: Mapping[str, str] | None,
                   data: bytes | None, headers: Mapping[str, str]) -> Response:
        resp = await self._client.request(method, url, params=query, content=data, headers=headers)
        return Response(resp.status_code, resp.reason_phrase, resp.headers, resp.content, None)

    async def relogin(self, stale: Any) -> None:
        pass    # lightkube's ExecAuth/BearerTokenFileAuth retry a 401 themselves

    async def close(self) -> None:
        await self._client.aclose()


class Kr8sTransport:
    def __init__(self, *, connections: int, timeout: float):
        self._timeout = timeout
        self._api = None

    async def _get_api(self):
        if self._api is None:
            import kr8s.asyncio
            self._api = await kr8s.asyncio.api()
            self._api.timeout = self._timeout
        return self._api

    async def send(self, method: str, url: str, *, query: Mapping[str, str] | None,
                   data: bytes | None, headers: Mapping[str, str]) -> Response:
        api = await self._get_api()
        base, _, last = url.rpartition("/")
        async with api.call_api(method, version="", base=base, url=last, raise_for_status=False,
                                params=query, content=data, headers=headers) as resp:
            return Response(resp.status_code, resp.reason_phrase, resp.headers, resp.content, None)

    async def relogin(self, stale: Any) -> None:
        await (await self._get_api()).auth.reauthenticate()

    async def close(self) -> None:
        if self._api is not None and self._api._session is not None:
            await self._api._session.aclose()


def make(client: str, credentials: Callable[[], Any], *, connections: int, timeout: float):
    # httpx logs each request at INFO; aiohttp's access log is off too (__main__).
    for name in ("httpx", "httpx2", "httpcore", "httpcore2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if client == "lightkube":
        return LightkubeTransport(connections=connections, timeout=timeout)
    if client == "kr8s":
        return Kr8sTransport(connections=connections, timeout=timeout)
    raise ValueError(f"ALPACA_KUBE_CLIENT={client!r}: aiohttp, lightkube or kr8s")
