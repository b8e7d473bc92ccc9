"""One container's parent, like containerd's shim: sets up the process's private mount and
UTS namespaces, execs the command, waits, and writes the exit status to a file. The agent
may die and come back; the shim stays, so the exit code is never lost.

    python shim.py LAUNCH.json

LAUNCH.json (written by the agent): argv, env, cwd, hostname, mounts [{source, target,
read_only}], hosts (file for /etc/hosts), termination_log (host file) and
termination_path (where the process sees it), shm_size, log, state (where this shim
writes container.json and exit.json), cgroup (a cgroup v2 directory or null).
Standard library only.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from procs import start_time

CLONE_NEWNS, CLONE_NEWUTS = 0x00020000, 0x04000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
START_ERROR_EXIT = 128
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

_libc = ctypes.CDLL(None, use_errno=True)


class StartError(Exception):
    pass


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise StartError(f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source or fstype} on {target}")


def bind(source: str, target: str, read_only: bool = False) -> None:
    mount(source, target, None, MS_BIND | MS_REC)
    if read_only:
        mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)


def ensure_mountpoint(target: str, like: str) -> None:
    """A file for a file, a directory for a directory. Under /dev it is our own tmpfs;
    elsewhere it is created on the host (an empty directory, as a kubelet's runtime would
    create it in the container's root filesystem)."""
    t = Path(target)
    if t.exists():
        return
    if Path(like).is_dir():
        t.mkdir(parents=True, exist_ok=True)
    else:
        t.parent.mkdir(parents=True, exist_ok=True)
        t.touch()


def private_dev(stage: str, shm_size: str, termination_log: str, termination_path: str) -> None:
    """A /dev of the process's own (as runc makes one): the usual devices bound from the
    host's, a private /dev/shm, and the termination log at the path the pod names."""
    os.makedirs(stage, exist_ok=True)
    mount("/dev", stage, None, MS_BIND | MS_REC)
    mount("tmpfs", "/dev", "tmpfs", MS_NOSUID, "mode=755")
    for name in DEVICES:
        if os.path.exists(f"{stage}/{name}"):
            Path(f"/dev/{name}").touch()
            mount(f"{stage}/{name}", f"/dev/{name}", None, MS_BIND)
    os.mkdir("/dev/pts")
    mount(f"{stage}/pts", "/dev/pts", None, MS_BIND | MS_REC)
    os.symlink("pts/ptmx", "/dev/ptmx")
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"/dev/{name}")
    os.symlink("/proc/self/fd", "/dev/fd")
    os.mkdir("/dev/shm")
    mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={shm_size}")
    _check(_libc.umount2(stage.encode(), MNT_DETACH), f"umount {stage}")
    ensure_mountpoint(termination_path, termination_log)
    bind(termination_log, termination_path)


def setup_namespaces(spec: dict) -> None:
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare(CLONE_NEWNS|CLONE_NEWUTS)")
    # Nothing done here may leak back to the host's mount table.
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    host = spec["hostname"].encode()
    _check(_libc.sethostname(host, len(host)), "sethostname")
    private_dev(spec["dev_stage"], spec["shm_size"], spec["termination_log"], spec["termination_path"])
    for source, target in ((spec["hosts"], "/etc/hosts"), (spec["hostname_file"], "/etc/hostname")):
        ensure_mountpoint(target, source)
        bind(source, target, read_only=True)
    # Every source is opened before anything is mounted: a volume at /tmp would otherwise hide
    # the sources that live below it (the agent's state directory may be under /tmp), and a
    # bind from /proc/self/fd/N reaches the opened directory whatever is mounted over its path.
    opened = []
    for m in spec["mounts"]:
        try:
            opened.append((m, os.open(m["source"], os.O_PATH | os.O_CLOEXEC)))
        except FileNotFoundError:
            raise StartError(f"mount source {m['source']} for {m['target']} does not exist") from None
    keep = [(k, os.open(k, os.O_PATH | os.O_CLOEXEC)) for k in spec.get("keep_visible") or () if os.path.isdir(k)]
    # Parents before children (/tmp before /tmp/x), as a kubelet's runtime mounts them.
    for m, fd in sorted(opened, key=lambda mf: len(Path(mf[0]["target"]).parts)):
        source = f"/proc/self/fd/{fd}"
        ensure_mountpoint(m["target"], source)
        bind(source, m["target"], m["read_only"])
        os.close(fd)
    # What stands in for the image's files stays visible under a volume mounted above it.
    targets = [Path(m["target"]) for m, _ in opened]
    for path, fd in keep:
        if any(Path(path) != t and Path(path).is_relative_to(t) for t in targets):
            source = f"/proc/self/fd/{fd}"
            ensure_mountpoint(path, source)
            bind(source, path)
        os.close(fd)


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def child(spec: dict, err_fd: int) -> None:
    try:
        os.setsid()  # its own process group: a delete signals the whole group
        if spec.get("cgroup"):
            Path(spec["cgroup"], "cgroup.procs").write_text(str(os.getpid()))
        # Opened on the host's paths, before any volume can hide them (one at /tmp may).
        log = os.open(spec["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        setup_namespaces(spec)
        env = spec["env"]
        argv = spec["argv"]
        cwd = spec.get("cwd") or "/"
        os.makedirs(cwd, exist_ok=True)
        os.chdir(cwd)
        exe = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=env.get("PATH", ""))
        if not exe or not os.access(exe, os.X_OK):
            raise StartError(f'exec: "{argv[0]}": executable file not found in $PATH')
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        os.execve(exe, argv, env)
    except BaseException as e:  # noqa: BLE001 - every failure becomes the start error
        msg = str(e) if isinstance(e, StartError) else f"{type(e).__name__}: {e}"
        os.write(err_fd, msg.encode()[:4000])
    os._exit(START_ERROR_EXIT)


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    state = Path(spec["state"])
    # The agent's signals are for the container, not for its parent.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    r, w = os.pipe()
    os.set_inheritable(w, False)
    pid = os.fork()
    if pid == 0:
        os.close(r)
        child(spec, w)
    os.close(w)
    write_json(state / "container.json", {"pid": pid, "start": start_time(pid),
                                          "startedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    error = b""
    while chunk := os.read(r, 4096):  # EOF at exec (close-on-exec) or at the child's exit
        error += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    result: dict = {"finishedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if error:
        result.update(exitCode=START_ERROR_EXIT, reason="StartError", message=error.decode(errors="replace"))
    elif os.WIFSIGNALED(status):
        result.update(exitCode=128 + os.WTERMSIG(status), signal=os.WTERMSIG(status))
    else:
        result.update(exitCode=os.WEXITSTATUS(status))
    write_json(state / "exit.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
