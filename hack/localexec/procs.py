"""Processes the agent started, named for good by pid + start time, and the cgroups that
hold them. Shared by the agent and hack/cluster.py (whose `down` sweeps whatever an agent
that died left behind). Standard library only."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

CGROUP_DIR = "alpaca-localexec"


def start_time(pid: int) -> str | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    if fields[0] == "Z":
        return None
    return fields[19]


def alive(record: dict | None) -> bool:
    """The process the record names still runs (a recycled pid is another process)."""
    return bool(record) and start_time(int(record["pid"])) == record["start"]


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def signal_group(record: dict | None, sig: int) -> bool:
    if not alive(record):
        return False
    try:
        os.killpg(int(record["pid"]), sig)
    except ProcessLookupError:
        return False
    return True


def signal_one(record: dict | None, sig: int) -> bool:
    if not alive(record):
        return False
    try:
        os.kill(int(record["pid"]), sig)
    except ProcessLookupError:
        return False
    return True


def cgroup_root() -> Path | None:
    """A cgroup v2 directory we may create children in, or None (then process groups only)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            root = Path(parts[1]) / CGROUP_DIR
            try:
                root.mkdir(exist_ok=True)
                return root
            except OSError:
                continue
    return None


def cgroup_kill(path: Path | str | None) -> None:
    """Every process in the cgroup, however it was forked or daemonised."""
    if not path or not Path(path).is_dir():
        return
    kill = Path(path) / "cgroup.kill"
    try:
        if kill.exists():
            kill.write_text("1")
            return
        for pid in Path(path, "cgroup.procs").read_text().split():
            os.kill(int(pid), signal.SIGKILL)
    except (OSError, ValueError):
        pass


def cgroup_empty(path: Path | str | None) -> bool:
    try:
        return not Path(path, "cgroup.procs").read_text().split()
    except (OSError, TypeError):
        return True


def cgroup_remove(path: Path | str | None) -> None:
    if not path:
        return
    p = Path(path)
    for child in sorted(p.glob("**/"), key=lambda c: len(c.parts), reverse=True):
        try:
            child.rmdir()
        except OSError:
            pass


def mounts_under(directory: Path) -> list[str]:
    """Mount points in this (the host's) namespace below directory, deepest first."""
    prefix = str(directory.resolve()).rstrip("/") + "/"
    points = []
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix):
                points.append(point)
    except OSError:
        return []
    return sorted(points, key=len, reverse=True)


def unmount(point: str) -> None:
    import ctypes
    ctypes.CDLL(None, use_errno=True).umount2(point.encode(), 2)  # MNT_DETACH


def sweep(state_dir: Path, grace_s: float = 5.0) -> int:
    """Kill every process an agent recorded under state_dir, unmount its tmpfs volumes and
    remove its cgroups. Returns how many processes were still alive."""
    import time
    records = [read_record(p) for p in state_dir.glob("pods/*/containers/*/*/container.json")]
    shims = [read_record(p) for p in state_dir.glob("pods/*/containers/*/*/shim.json")]
    live = [r for r in records if alive(r)]
    for r in live:
        signal_group(r, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(r) for r in live):
        time.sleep(0.1)
    for r in live + shims:
        signal_group(r, signal.SIGKILL)
        signal_one(r, signal.SIGKILL)
    for cg in state_dir.glob("pods/*/cgroup"):
        path = cg.read_text().strip()
        cgroup_kill(path)
        cgroup_remove(path)
    for point in mounts_under(state_dir):
        unmount(point)
    return len(live)
