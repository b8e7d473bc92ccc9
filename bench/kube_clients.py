#!/usr/bin/env python3
"""The operator with another Kubernetes client, for `operator_bench.py --client`.

Issue 11 asked to compare the maintained async clients with our own before choosing; the
operator keeps only the winner (kube.AiohttpTransport, see docs/benchmarks.md). Each client
here is a transport behind the same kube.Kube, so the operator, its retries and its
counting stay the same and only the client differs:

- aiohttp: the operator as shipped;
- lightkube: its kubeconfig / service-account loading, TLS and auth (lightkube.config) and
  the httpx2 client it builds from them;
- kr8s: its Api object (kubeconfig / service account, TLS, auth) and Api.call_api.

lightkube and kr8s are not operator dependencies: install them into .venv first
(`.venv/bin/uv pip install --python .venv/bin/python lightkube==1.0.1 kr8s==0.20.15`).

    python bench/kube_clients.py CLIENT [alpaca-operator arguments]
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Mapping

CLIENTS = ("aiohttp", "lightkube", "kr8s")


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
                   data: bytes | None, headers: Mapping[str, str]):
        from alpaca_operator.kube import Response
        resp = await self._client.request(method, url, params=query, content=data, headers=headers)
        return Response(resp.status_code, resp.reason_phrase, resp.headers, resp.content, None)

    async def relogin(self, stale: Any) -> None:
        pass    # lightkube's ExecAuth / BearerTokenFileAuth retry a 401 themselves

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
                   data: bytes | None, headers: Mapping[str, str]):
        from alpaca_operator.kube import Response
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


def use(client: str) -> None:
    """Make kube.Kube build its transport with `client`."""
    if client == "aiohttp":
        return
    from alpaca_operator import kube
    cls = {"lightkube": LightkubeTransport, "kr8s": Kr8sTransport}[client]
    # httpx logs each request at INFO; aiohttp's access log is off too (__main__).
    for name in ("httpx", "httpx2", "httpcore", "httpcore2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    kube.AiohttpTransport = lambda credentials, *, connections, timeout: cls(  # type: ignore[misc]
        connections=connections, timeout=timeout)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in CLIENTS:
        raise SystemExit(f"usage: kube_clients.py {{{','.join(CLIENTS)}}} [alpaca-operator arguments]")
    from alpaca_operator.__main__ import main
    use(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
