"""The kubelet's containerLogs endpoint, which the API server proxies `kubectl logs` to.

HTTPS with client certificates signed by the cluster's CA (the API server's
--kubelet-client-certificate), so only the API server reads a pod's output.
"""
from __future__ import annotations

import ssl
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

FOLLOW_POLL_S = 0.2


def tail_offset(path: Path, lines: int) -> int:
    """Byte offset of the start of the last `lines` lines."""
    size = path.stat().st_size
    if lines <= 0:
        return size
    with open(path, "rb") as f:
        pos, found, block = size, 0, 65536
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step)
            # A trailing newline ends the last line; it does not start a new one.
            if pos + step == size and chunk.endswith(b"\n"):
                chunk = chunk[:-1]
            idx = len(chunk)
            while True:
                idx = chunk.rfind(b"\n", 0, idx)
                if idx < 0:
                    break
                found += 1
                if found == lines:
                    return pos + idx + 1
    return 0


# (namespace, pod, container, previous) -> (log file, finished?) or None
Resolver = Callable[[str, str, str, bool], "tuple[Path, Callable[[], bool]] | None"]


def make_handler(resolve: Resolver):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # the agent logs what matters
            pass

        def do_GET(self):  # noqa: N802
            url = urllib.parse.urlparse(self.path)
            q = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
            parts = url.path.strip("/").split("/")
            if url.path == "/healthz":
                return self._text(200, "ok")
            if len(parts) != 4 or parts[0] != "containerLogs":
                return self._text(404, f"{url.path}: the local-exec agent serves only containerLogs")
            _, ns, pod, container = parts
            found = resolve(ns, pod, container, q.get("previous") == "true")
            if found is None:
                return self._text(404, f"no logs of container {container} of pod {ns}/{pod} on this node")
            path, finished = found
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            limit = int(q["limitBytes"]) if q.get("limitBytes", "").isdigit() else None
            offset = tail_offset(path, int(q["tailLines"])) if q.get("tailLines", "").lstrip("-").isdigit() else 0
            try:
                self._stream(path, offset, limit, q.get("follow") == "true", finished)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _stream(self, path: Path, offset: int, limit: int | None, follow: bool, finished) -> None:
            sent = 0
            with open(path, "rb") as f:
                f.seek(offset)
                while True:
                    done = finished()  # read before the data, so nothing written last is missed
                    chunk = f.read(65536)
                    if chunk:
                        if limit is not None:
                            chunk = chunk[:limit - sent]
                        self.wfile.write(chunk)
                        self.wfile.flush()
                        sent += len(chunk)
                        if limit is not None and sent >= limit:
                            return
                        continue
                    if not follow or done:
                        return
                    time.sleep(FOLLOW_POLL_S)

        def _text(self, code: int, text: str) -> None:
            body = text.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


class LogServer:
    def __init__(self, resolve: Resolver, host: str, port: int, cert: str, key: str, client_ca: str):
        self.httpd = ThreadingHTTPServer((host, port), make_handler(resolve))
        self.httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="logs", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
