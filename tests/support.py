"""Small helpers shared by the test modules, the fixtures and the harnesses."""
from __future__ import annotations

import random
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


def _ephemeral_start(default: int = 32768) -> int:
    """The first port the kernel hands out as a connection's source port."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def three_free_ports() -> int:
    """A port P with P-1 and P-2 free too (a control plane's etcd sits below its API server),
    below the kernel's ephemeral range: a control plane stopped and started again on them (the
    demo test's `make demo` after `make cluster-down`) must not find one taken meanwhile as the
    source port of some other test's connection, which a port from bind(0) can be."""
    top = _ephemeral_start() - 1
    for _ in range(200):
        port = random.randint(20002, top)
        if all(port_free(p) for p in (port, port - 1, port - 2)):
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
