"""A small Kubernetes REST client on the standard library: dicts in, dicts out, watches
as line streams. The agent needs a handful of verbs and strategic-merge patches of pod
status, which the generated Python client cannot send; and no third-party import means
hack/cluster.py can start the agent before anything is installed."""
from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Iterator


class ApiError(RuntimeError):
    def __init__(self, status: int, body: str, what: str):
        super().__init__(f"{what}: HTTP {status}: {body[:500]}")
        self.status = status


def _load_config(path: Path) -> dict:
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        import yaml  # a hand-written YAML kubeconfig; hack/cluster.py writes JSON
        return yaml.safe_load(text)


class Kube:
    def __init__(self, kubeconfig: str | Path):
        cfg = _load_config(Path(kubeconfig))
        ctx_name = cfg.get("current-context")
        ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in cfg["users"] if u["name"] == ctx["user"])
        url = urllib.parse.urlparse(cluster["server"])
        self.host, self.port = url.hostname, url.port or 443
        self.ctx = ssl.create_default_context()
        self._tmp = tempfile.mkdtemp(prefix="localexec-kube-")
        os.chmod(self._tmp, 0o700)
        self.ca_pem = self._pem(cluster, "certificate-authority")
        self.ctx.load_verify_locations(cadata=self.ca_pem.decode())
        self.headers: dict[str, str] = {}
        if user.get("token"):
            self.headers["Authorization"] = f"Bearer {user['token']}"
        if user.get("client-certificate-data") or user.get("client-certificate"):
            cert = Path(self._tmp, "client.crt")
            key = Path(self._tmp, "client.key")
            cert.write_bytes(self._pem(user, "client-certificate"))
            key.write_bytes(self._pem(user, "client-key"))
            self.ctx.load_cert_chain(str(cert), str(key))
            cert.unlink()
            key.unlink()

    @staticmethod
    def _pem(section: dict, key: str) -> bytes:
        if section.get(f"{key}-data"):
            return base64.b64decode(section[f"{key}-data"])
        return Path(section[key]).read_bytes()

    def _conn(self, timeout: float) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, *, params: dict | None = None,
                content_type: str = "application/json", timeout: float = 30,
                missing_ok: bool = False) -> dict | None:
        if params:
            path += "?" + urllib.parse.urlencode(params)
        data = json.dumps(body).encode() if body is not None else None
        conn = self._conn(timeout)
        try:
            conn.request(method, path, body=data,
                         headers={**self.headers, "Content-Type": content_type, "Accept": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        if resp.status == 404 and missing_ok:
            return None
        if resp.status >= 300:
            raise ApiError(resp.status, raw.decode(errors="replace"), f"{method} {path}")
        return json.loads(raw) if raw else {}

    def get(self, path: str, **kw) -> dict | None:
        return self.request("GET", path, **kw)

    def patch(self, path: str, body: dict, strategic: bool = False, **kw) -> dict | None:
        ctype = "application/strategic-merge-patch+json" if strategic else "application/merge-patch+json"
        return self.request("PATCH", path, body, content_type=ctype, **kw)

    def watch(self, path: str, resource_version: str, params: dict | None = None,
              timeout_s: int = 240) -> Iterator[dict]:
        """Events of one watch request until the server ends it (timeoutSeconds)."""
        q = {**(params or {}), "watch": "1", "resourceVersion": resource_version,
             "timeoutSeconds": str(timeout_s), "allowWatchBookmarks": "true"}
        conn = self._conn(timeout_s + 30)
        try:
            conn.request("GET", path + "?" + urllib.parse.urlencode(q), headers=self.headers)
            resp = conn.getresponse()
            if resp.status >= 300:
                raise ApiError(resp.status, resp.read().decode(errors="replace"), f"watch {path}")
            while True:
                line = resp.readline()
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()
