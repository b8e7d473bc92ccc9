"""Small helpers shared by the test modules, the fixtures and the harnesses."""
from __future__ import annotations

import socket
import time
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def three_free_ports() -> int:
    """A port P with P-1 and P-2 free too (a control plane's etcd sits below its API server)."""
    for _ in range(50):
        port = free_port()
        if port > 20000 and all(port_free(p) for p in (port - 1, port - 2)):
            return port
    raise AssertionError("no three free ports in a row")


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60, interval: float = 0.3,
             on_timeout: Callable[[], str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    extra = on_timeout() if on_timeout else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})\n{extra}")
