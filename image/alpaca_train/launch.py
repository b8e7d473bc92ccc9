"""`alpaca-launch`: the command of every training pod of an AlpacaFineTune gang.

It reads what the operator put in the pod (docs/contract.md, "The training pod"): the
rendezvous in PET_* variables, the arguments in $ALPACA_TRAIN_ARGS (a JSON list) and the
DeepSpeed JSON in $ALPACA_DEEPSPEED_CONFIG (in pods an earlier operator version made, both
as files in $ALPACA_CONFIG_DIR); checks that EFA is really there when FI_PROVIDER=efa;
waits until rank 0's name resolves (pods of a gang start in any order and the headless
Service publishes them as they come); then runs torchrun over `python -m alpaca_train.train`.

It stays torchrun's parent, for two reasons. torchrun exits 1 whatever its workers'
exit codes were, so the launcher collects theirs (docs/contract.md, "Exit codes"). And
on SIGTERM torchrun kills its workers 30 s later, too soon to upload a checkpoint, so
the launcher sends SIGTERM to the workers themselves and lets torchrun see them exit.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

from alpaca_train import exitcodes, preflight, shutdown
from alpaca_train.exitcodes import ImageError

log = logging.getLogger("alpaca_train.launch")
# The operator's names for them (operator/alpaca_operator/api.py; docs/contract.md).
ENV_TRAIN_ARGS = "ALPACA_TRAIN_ARGS"
ENV_DEEPSPEED_CONFIG = "ALPACA_DEEPSPEED_CONFIG"


class LaunchError(ImageError):
    """The pod's configuration cannot work (exit 64)."""

    exit_code = exitcodes.USAGE


class RendezvousTimeout(LaunchError):
    exit_code = exitcodes.RETRYABLE


def wait_for_host(host: str, timeout_s: float, interval_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.getaddrinfo(host, None)
            return
        except socket.gaierror as e:
            if time.monotonic() >= deadline:
                raise RendezvousTimeout(f"rendezvous host {host!r} did not resolve within {timeout_s:.0f}s: {e}") from None
            log.info("waiting for %s to resolve (%s)", host, e)
            time.sleep(interval_s)


def default_nproc() -> int:
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no torch, no GPU: one process
        return 1


def torchrun_command(nnodes: int, nproc: int, node_rank: int, master_addr: str, master_port: int,
                     train_args: list[str]) -> list[str]:
    if nnodes == 1:
        # One node needs no address others can reach: --standalone takes a free local port.
        # A fixed port would clash with any other run's rank 0 on a shared host network
        # (hostNetwork pods; two SageMaker local-mode jobs): EADDRINUSE, a failed attempt.
        rendezvous = ["--standalone", "--nnodes=1"]
    else:
        rendezvous = [f"--nnodes={nnodes}", f"--node_rank={node_rank}",
                      f"--master_addr={master_addr}", f"--master_port={master_port}"]
    return [
        sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc_per_node={nproc}",
        # The operator restarts the whole gang; a local restart would desynchronise it.
        "--max_restarts=0",
        "-m", "alpaca_train.train", *train_args,
    ]


def train_args_of(cmd: list[str]) -> list[str]:
    """alpaca-train's own arguments in a torchrun_command."""
    return cmd[cmd.index("alpaca_train.train") + 1:]


def _json_list_of_strings(text: str, where: str) -> list[str]:
    try:
        args = json.loads(text)
    except json.JSONDecodeError as e:
        raise LaunchError(f"{where}: malformed JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise LaunchError(f"{where} must be a JSON list of strings")
    return args


def read_train_args(config_dir: Path) -> list[str]:
    path = config_dir / "train_args.json"
    if not path.is_file():
        raise LaunchError(f"{path} does not exist: the ConfigMap is not mounted at {config_dir}")
    return _json_list_of_strings(path.read_text(), str(path))


def _deepspeed_file(env: dict) -> Path | None:
    """The DeepSpeed JSON as a file, which --deepspeed takes: from $ALPACA_DEEPSPEED_CONFIG,
    written to the pod's scratch directory, or the older operators' mounted file."""
    text = env.get(ENV_DEEPSPEED_CONFIG)
    if text is None:
        ds = Path(env.get("ALPACA_CONFIG_DIR", "/etc/alpaca")) / "ds_config.json"
        return ds if ds.is_file() else None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise LaunchError(f"${ENV_DEEPSPEED_CONFIG}: malformed JSON at column {e.colno}: {e.msg}") from None
    if not isinstance(config, dict):
        raise LaunchError(f"${ENV_DEEPSPEED_CONFIG} must be a JSON object")
    workdir = Path(env.get("ALPACA_WORKDIR") or tempfile.mkdtemp(prefix="alpaca-"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "ds_config.json"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def build_command(env: dict) -> list[str]:
    if ENV_TRAIN_ARGS in env:
        args = _json_list_of_strings(env[ENV_TRAIN_ARGS], f"${ENV_TRAIN_ARGS}")
    else:
        args = read_train_args(Path(env.get("ALPACA_CONFIG_DIR", "/etc/alpaca")))
    ds = _deepspeed_file(env)
    if ds is not None and not any(a.split("=")[0] == "--deepspeed" for a in args):
        args += ["--deepspeed", str(ds)]
    try:
        nnodes = int(env.get("PET_NNODES", "1"))
        nproc = int(env.get("PET_NPROC_PER_NODE") or default_nproc())
        node_rank = int(env.get("PET_NODE_RANK", "0"))
        port = int(env.get("PET_MASTER_PORT", "29500"))
    except ValueError as e:
        raise LaunchError(f"bad rendezvous variable: {e}") from None
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"PET_NODE_RANK={node_rank} is outside 0..{nnodes - 1}")
    master = env.get("PET_MASTER_ADDR", "127.0.0.1")
    return torchrun_command(nnodes, nproc, node_rank, master, port, args)


EFA_FI_INFO = ("/opt/amazon/efa/bin/fi_info",)


def check_efa(env: dict) -> None:
    """FI_PROVIDER=efa without a working EFA provider would train at TCP speed: fail instead."""
    if env.get("FI_PROVIDER", "").lower() != "efa":
        return
    fi_info = shutil.which("fi_info", path=env.get("PATH")) or next((p for p in EFA_FI_INFO if os.access(p, os.X_OK)), None)
    hint = ("NCCL would silently fall back to TCP. Use an image with the EFA installer and aws-ofi-nccl, "
            "on a node with EFA adapters (resources.efa requests them), or unset FI_PROVIDER")
    if fi_info is None:
        raise LaunchError(f"FI_PROVIDER=efa is set but libfabric is not installed (no fi_info): {hint}")
    proc = subprocess.run([fi_info, "-p", "efa", "-t", "FI_EP_RDM"], capture_output=True, text=True, env=env)
    if proc.returncode != 0 or "provider: efa" not in proc.stdout:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise LaunchError(f"FI_PROVIDER=efa is set but libfabric finds no EFA provider "
                          f"({detail[-1] if detail else 'fi_info -p efa found nothing'}): {hint}")


def supervise(cmd: list[str], env: dict) -> int:
    """Run torchrun; forward SIGTERM to its workers; return the exit code the contract defines."""
    import psutil

    code_dir = tempfile.mkdtemp(prefix="alpaca-exit-")
    env = dict(env, **{exitcodes.CODE_DIR_ENV: code_dir})
    proc = subprocess.Popen(cmd, env=env)
    terminated = []

    def forward(signum, frame):
        terminated.append(signum)
        try:
            workers = psutil.Process(proc.pid).children()
        except psutil.NoSuchProcess:
            return
        log.warning("SIGTERM: asking %d worker(s) to save a checkpoint and stop", len(workers))
        for w in workers or [psutil.Process(proc.pid)]:  # no workers yet: nothing to save
            try:
                w.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        rc = proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    codes = exitcodes.recorded(Path(code_dir))
    shutil.rmtree(code_dir, ignore_errors=True)
    code = exitcodes.combined(rc, codes, bool(terminated))
    if code != rc:
        log.info("torchrun exited %d; workers' codes %s: exiting %d", rc, codes, code)
    return code


def write_failure(env: dict, message: str) -> None:
    if env.get("ALPACA_FAILURE_FILE"):
        try:
            Path(env["ALPACA_FAILURE_FILE"]).write_text(f"{message}\n")
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # Before training there is nothing to save (and PID 1 would ignore SIGTERM without a handler).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(exitcodes.TERMINATED))
    env = dict(os.environ)
    # Kubernetes shows this file's content as the container's termination message.
    if "ALPACA_FAILURE_FILE" not in env and os.access("/dev/termination-log", os.W_OK):
        env["ALPACA_FAILURE_FILE"] = "/dev/termination-log"
    try:
        cmd = build_command(env)
        check_efa(env)
        if int(env.get("PET_NODE_RANK", "0")) == 0:
            # Once per gang: another node's pod is stopped by the Job failing with node 0.
            preflight.run_for_args(train_args_of(cmd), env)
        wait_for_host(env.get("PET_MASTER_ADDR", "127.0.0.1"), float(env.get("ALPACA_RENDEZVOUS_TIMEOUT_S", "600")))
    except (LaunchError, preflight.PreflightError) as e:
        log.error("%s", e)
        write_failure(env, str(e))
        return e.exit_code
    log.info("running %s", " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    return supervise(cmd, env)


def entry() -> NoReturn:
    """The console script: main(), then exit with exactly its code (alpaca_train.shutdown)."""
    shutdown.run_and_exit(main)


if __name__ == "__main__":
    entry()
