"""kube.Kube against the real API server, as a ServiceAccount whose token an exec plugin
hands out (like `aws eks get-token`): logins are counted by the plugin itself.

- many requests share one login; a token the server starts refusing costs exactly one new
  login, whatever the number of requests refused, and a request in flight meanwhile
  finishes normally;
- credentials the server keeps refusing are not retried forever;
- API Priority and Fairness rejecting our user (a FlowSchema sends it to a priority level
  with no seats, whose one request in flight another request of ours holds) answers 429
  with Retry-After: the client waits that long between tries, gives up after MAX_RETRIES,
  and goes through once the server lets it;
- kopf's own request, under the same 429s, is logged as the operator configures its logging:
  each retry a WARNING, the request it gives up on an ERROR.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import kopf
import kubernetes.config.kube_config
import pytest
from kopf._cogs.clients import api as kopf_api

from alpaca_operator import kube, metrics
from alpaca_operator.__main__ import configure_logging

SA = "kube-test"

EXEC_PLUGIN = """#!{python}
import json, os
with open(os.environ["ALPACA_TEST_LOGINS"], "a") as f:
    f.write("login\\n")
with open(os.environ["ALPACA_TEST_TOKEN"]) as f:
    token = f.read().strip()
print(json.dumps({{"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential",
                  "status": {{"token": token}}}}))
"""


class ServiceAccountUser:
    """A ServiceAccount allowed to read and write ConfigMaps in the namespace, and a
    kubeconfig whose exec plugin hands out the token last given to use()."""

    def __init__(self, cluster, namespace: str, tmp: Path):
        self.cluster, self.namespace, self.tmp = cluster, namespace, tmp
        admin = json.loads(Path(cluster.kubeconfig).read_text())
        self.server = admin["clusters"][0]["cluster"]["server"]
        self.ca = base64.b64decode(admin["clusters"][0]["cluster"]["certificate-authority-data"])
        self.ssl = ssl.create_default_context(cadata=self.ca.decode())
        self.token_file, self.logins_file = tmp / "token", tmp / "logins"
        self.logins_file.write_text("")
        plugin = tmp / "exec-plugin"
        plugin.write_text(EXEC_PLUGIN.format(python=sys.executable))
        plugin.chmod(0o755)
        self.kubeconfig = tmp / "kubeconfig"
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "sa",
            "clusters": admin["clusters"],
            "users": [{"name": "sa", "user": {"exec": {
                "apiVersion": "client.authentication.k8s.io/v1beta1", "command": str(plugin),
                "interactiveMode": "Never",
                "env": [{"name": "ALPACA_TEST_LOGINS", "value": str(self.logins_file)},
                        {"name": "ALPACA_TEST_TOKEN", "value": str(self.token_file)}]}}}],
            "contexts": [{"name": "sa", "context": {"cluster": admin["clusters"][0]["name"], "user": "sa",
                                                    "namespace": namespace}}],
        }))
        k = lambda *a: cluster.kubectl(*a, "-n", namespace)  # noqa: E731
        k("create", "serviceaccount", SA)
        k("create", "role", SA, "--verb=get,list,watch,create,patch,delete", "--resource=configmaps")
        k("create", "rolebinding", SA, f"--role={SA}", f"--serviceaccount={namespace}:{SA}")
        k("create", "configmap", "probe", "--from-literal=a=1")

    def issue(self, holder: str) -> str:
        """A token bound to a new Secret `holder`: deleting the Secret revokes it at once."""
        self.cluster.kubectl("create", "secret", "generic", holder, "-n", self.namespace)
        return self.cluster.kubectl("create", "token", SA, "-n", self.namespace, "--duration=1h",
                                    "--bound-object-kind=Secret", f"--bound-object-name={holder}").stdout.strip()

    def use(self, token: str) -> None:
        self.token_file.write_text(token)

    def revoke(self, holder: str, token: str) -> None:
        self.cluster.kubectl("delete", "secret", holder, "-n", self.namespace)
        deadline = time.monotonic() + 30
        while self.get(token)[0] != 401:
            assert time.monotonic() < deadline, "the API server still accepts the revoked token"
            time.sleep(0.1)

    def get(self, token: str, query: str = "") -> tuple[int, Any]:
        """A LIST of the namespace's ConfigMaps with `token`: its status and (case-insensitive) headers."""
        req = urllib.request.Request(f"{self.server}/api/v1/namespaces/{self.namespace}/configmaps{query}",
                                     headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, context=self.ssl, timeout=10) as resp:
                return resp.status, resp.headers
        except urllib.error.HTTPError as e:
            return e.code, e.headers

    def logins(self) -> int:
        return len(self.logins_file.read_text().splitlines())


@pytest.fixture
def user(cluster, namespace, tmp_path, monkeypatch):
    u = ServiceAccountUser(cluster, namespace, tmp_path)
    # The operator's process has $KUBECONFIG from its start; the kubernetes client (which
    # runs exec plugins for kopf.login_via_client) read it when it was imported.
    monkeypatch.setenv("KUBECONFIG", str(u.kubeconfig))
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(u.kubeconfig))
    return u


@pytest.fixture
def api_calls(monkeypatch):
    """(monotonic time, system, verb, code) of every request, as metrics.api_call sees them."""
    calls: list[tuple] = []
    monkeypatch.setattr(metrics, "api_call", lambda *a: calls.append((time.monotonic(), *a)))
    return calls


def client() -> kube.Kube:
    settings = kopf.OperatorSettings()
    return kube.Kube(lambda: kube.login(settings))


def test_revoked_token_one_login_for_all_and_requests_in_flight_finish(user, namespace, api_calls):
    first = user.issue("holder-1")
    user.use(first)

    async def scenario():
        k = client()
        try:
            got = await asyncio.gather(*[k.get("configmaps", namespace, "probe") for _ in range(32)])
            assert [g["data"] for g in got] == [{"a": "1"}] * 32
            assert user.logins() == 1, "one login for 32 requests"

            second = await asyncio.to_thread(user.issue, "holder-2")
            # A request that stays in flight for 25 s (a watch that sees nothing), sent with
            # the first token and on the same connection pool. (The API server caches a
            # token's good verdict for 10 s: a revoked one is refused only after that.)
            listed = await k.request("GET", kube.path("configmaps", namespace))
            in_flight = asyncio.ensure_future(k.request(
                "GET", kube.path("configmaps", namespace),
                query={"watch": "true", "timeoutSeconds": "25", "fieldSelector": "metadata.name=nothing",
                       "resourceVersion": listed["metadata"]["resourceVersion"]}))
            await asyncio.sleep(0.3)

            user.use(second)
            await asyncio.to_thread(user.revoke, "holder-1", first)
            got = await asyncio.gather(*[k.get("configmaps", namespace, "probe") for _ in range(32)])
            assert [g["data"] for g in got] == [{"a": "1"}] * 32
            assert user.logins() == 2, "one new login for every request the server refused"
            assert not in_flight.done(), "the watch should still be in flight here"
            assert await in_flight is None      # the watch ended on its own timeout, unharmed
        finally:
            await k.close()

    asyncio.run(scenario())
    codes = [(verb, code) for _, system, verb, code in api_calls if system == "kubernetes"]
    assert ("GET", 401) in codes and codes.count(("GET", 200)) >= 64


def test_refused_credentials_are_not_retried_forever(user, namespace, api_calls):
    user.use("not-a-token")

    async def scenario():
        k = client()
        try:
            results = await asyncio.gather(*[k.get("configmaps", namespace, "probe") for _ in range(16)],
                                           return_exceptions=True)
        finally:
            await k.close()
        return results

    results = asyncio.run(scenario())
    assert all(isinstance(r, kube.ApiError) and r.status == 401 for r in results), results
    assert user.logins() == 2, "the first login, and one more after the 401s"
    assert len(api_calls) == 32     # each request: sent, refused, sent again once, refused


def _jail(cluster, namespace: str) -> tuple[str, str]:
    """A FlowSchema sending the ServiceAccount's requests to a priority level with no seats
    of its own and none to borrow, which rejects (429) instead of queueing: it runs a request
    only while no other of its requests is running. Returns (name, the level's uid)."""
    name = f"alpaca-test-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "PriorityLevelConfiguration",
         "metadata": {"name": name},
         "spec": {"type": "Limited", "limited": {
             "nominalConcurrencyShares": 0, "lendablePercent": 0, "borrowingLimitPercent": 0,
             "limitResponse": {"type": "Reject"}}}},
        {"apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "FlowSchema", "metadata": {"name": name},
         "spec": {"priorityLevelConfiguration": {"name": name}, "matchingPrecedence": 100,
                  "distinguisherMethod": {"type": "ByUser"},
                  "rules": [{"subjects": [{"kind": "ServiceAccount",
                                           "serviceAccount": {"name": SA, "namespace": namespace}}],
                             "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"],
                                                "namespaces": ["*"]}]}]}},
    ]}))
    uid = cluster.kubectl("get", "prioritylevelconfiguration", name, "-o", "jsonpath={.metadata.uid}").stdout
    return name, uid


class SeatHolder(threading.Thread):
    """Keeps the jail's one request running: back-to-back LISTs at a resourceVersion the
    server does not have yet, which its watch cache waits for (3 s) before answering 504."""

    def __init__(self, user: ServiceAccountUser, token: str):
        super().__init__(daemon=True)
        self.user, self.token, self.stopped = user, token, threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.user.get(self.token, "?resourceVersion=999999999&resourceVersionMatch=NotOlderThan")


@contextlib.contextmanager
def jailed(cluster, user: ServiceAccountUser, namespace: str, token: str):
    """The ServiceAccount in the jail, once API Priority and Fairness has taken it up, with
    its one seat held: every request of its answered 429 until the holder (yielded) stops."""
    name, level = _jail(cluster, namespace)
    holder = SeatHolder(user, token)
    try:
        deadline = time.monotonic() + 30
        while user.get(token)[1].get("X-Kubernetes-PF-PriorityLevel-UID") != level:
            assert time.monotonic() < deadline, "API Priority and Fairness did not take up the FlowSchema"
            time.sleep(0.2)
        holder.start()
        time.sleep(0.5)
        yield holder
    finally:
        holder.stopped.set()
        cluster.kubectl("delete", "flowschema", name, "--ignore-not-found")
        cluster.kubectl("delete", "prioritylevelconfiguration", name, "--ignore-not-found")


def test_429_retry_after_is_honoured(cluster, user, namespace, api_calls, monkeypatch):
    token = user.issue("holder")
    user.use(token)
    with jailed(cluster, user, namespace, token) as holder:
        code, headers = user.get(token)
        assert code == 429 and int(headers["Retry-After"]) >= 1

        async def scenario():
            k = client()
            try:
                # Still refused after MAX_RETRIES: the 429 reaches the caller.
                monkeypatch.setattr(kube, "MAX_RETRIES", 2)
                t0 = time.monotonic()
                with pytest.raises(kube.ApiError) as refused:
                    await k.get("configmaps", namespace, "probe")
                assert refused.value.status == 429
                assert time.monotonic() - t0 >= 2 * 0.9
                assert [code for *_, code in api_calls] == [429] * 3
                monkeypatch.setattr(kube, "MAX_RETRIES", 10)

                # Let through while it waits: the caller only sees the answer.
                pending = asyncio.ensure_future(k.get("configmaps", namespace, "probe"))
                await asyncio.sleep(1.5)
                holder.stopped.set()
                got = await pending
                assert got["data"] == {"a": "1"}
            finally:
                await k.close()

        asyncio.run(scenario())

    attempts = [(t, code) for t, _, _, code in api_calls[3:]]     # the request let through
    assert [code for _, code in attempts] == [429] * (len(attempts) - 1) + [200]
    assert len(attempts) >= 3
    # Each try after a 429 came no sooner than the server asked (Retry-After is at least 1).
    gaps = [b[0] - a[0] for a, b in zip(attempts, attempts[1:])]
    assert min(gaps) >= 0.9, gaps


@pytest.fixture
def operator_logging():
    """The operator's logging (alpaca_operator.__main__.configure_logging), its kopf handler
    writing into a buffer; every logger it sets, and the handlers it adds filters to, as they
    were afterwards."""
    root = logging.getLogger()
    loggers = [root] + [logging.getLogger(name) for name in ("asyncio", "kopf.objects", "aiohttp.access")]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    before = list(root.handlers)
    filters = [(h, list(h.filters)) for h in before]
    configure_logging(verbose=False, debug=False)
    out = io.StringIO()
    for h in root.handlers:
        if h not in before:
            h.setStream(out)
    try:
        yield out
    finally:
        for lg, handlers, level, propagate in saved:
            lg.handlers[:], lg.propagate = handlers, propagate
            lg.setLevel(level)
        for h, fs in filters:
            h.filters[:] = fs


def test_a_429_kopf_retries_is_a_warning_and_one_it_gives_up_on_an_error(cluster, user, namespace,
                                                                          operator_logging):
    """kopf logs each retried request at ERROR; the 429s the server sends while a just
    installed CRD fills its watch cache ("storage is (re)initializing") made every fresh
    `helm install` start with ERROR lines. Here the same 429, from the jail, through kopf's
    own request (as its watch lists the runs)."""
    token = user.issue("holder")
    user.use(token)
    logger = logging.getLogger("kopf._cogs.clients.watching")
    url = f"/api/v1/namespaces/{namespace}/configmaps"
    with jailed(cluster, user, namespace, token) as holder:
        assert user.get(token)[0] == 429

        async def scenario():
            context = kopf_api.auth.APIContext(kopf.ConnectionInfo(server=user.server, ca_data=user.ca, token=token))
            settings = kopf.OperatorSettings()
            try:
                with pytest.raises(kopf_api.errors.APITooManyRequestsError):
                    await kopf_api.request("GET", url, settings=settings, backoffs=[0.1], context=context,
                                           logger=logger)
                gave_up = operator_logging.getvalue()
                pending = asyncio.ensure_future(kopf_api.request("GET", url, settings=settings, backoffs=[1] * 8,
                                                                 context=context, logger=logger))
                await asyncio.sleep(1.5)
                holder.stopped.set()
                answer = await pending
                assert answer.status == 200
                answer.release()
            finally:
                await context.session.close()
            return gave_up, operator_logging.getvalue()[len(gave_up):]

        gave_up, let_through = asyncio.run(scenario())

    def lines(text: str, level: str) -> list[str]:
        return [ln for ln in text.splitlines() if f"[{level}" in ln and "Request attempt" in ln]
    # kopf's own wording: if it changes, the filter must follow.
    assert len(lines(gave_up, "WARNING")) == 1 and "will retry" in lines(gave_up, "WARNING")[0], gave_up
    assert len(lines(gave_up, "ERROR")) == 1 and "escalating" in lines(gave_up, "ERROR")[0], gave_up
    assert lines(let_through, "WARNING") and not lines(let_through, "ERROR"), let_through
    assert all("APITooManyRequestsError" in ln for ln in lines(let_through, "WARNING"))
