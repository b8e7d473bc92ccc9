"""`alpaca-launch`: the command of every training pod of an AlpacaFineTune gang.

It reads what the operator put in the pod (docs/contract.md, "The training pod"): the
rendezvous in PET_* variables, the arguments in $ALPACA_CONFIG_DIR/train_args.json and
the DeepSpeed config beside them; waits until rank 0's name resolves (pods of a gang
start in any order and the headless Service publishes them as they come); then becomes
torchrun over `python -m alpaca_train.train`.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

log = logging.getLogger("alpaca_train.launch")


class LaunchError(RuntimeError):
    pass


def wait_for_host(host: str, timeout_s: float, interval_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.getaddrinfo(host, None)
            return
        except socket.gaierror as e:
            if time.monotonic() >= deadline:
                raise LaunchError(f"rendezvous host {host!r} did not resolve within {timeout_s:.0f}s: {e}") from None
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
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", f"--node_rank={node_rank}",
        f"--master_addr={master_addr}", f"--master_port={master_port}",
        # The operator restarts the whole gang; a local restart would desynchronise it.
        "--max_restarts=0",
        "-m", "alpaca_train.train", *train_args,
    ]


def read_train_args(config_dir: Path) -> list[str]:
    path = config_dir / "train_args.json"
    if not path.is_file():
        raise LaunchError(f"{path} does not exist: the ConfigMap is not mounted at {config_dir}")
    try:
        args = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LaunchError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise LaunchError(f"{path} must be a JSON list of strings")
    return args


def build_command(env: dict) -> list[str]:
    config_dir = Path(env.get("ALPACA_CONFIG_DIR", "/etc/alpaca"))
    args = read_train_args(config_dir)
    ds = config_dir / "ds_config.json"
    if ds.is_file() and not any(a.split("=")[0] == "--deepspeed" for a in args):
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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    env = dict(os.environ)
    # Kubernetes shows this file's content as the container's termination message.
    if "ALPACA_FAILURE_FILE" not in env and os.access("/dev/termination-log", os.W_OK):
        env["ALPACA_FAILURE_FILE"] = "/dev/termination-log"
    try:
        cmd = build_command(env)
        wait_for_host(env.get("PET_MASTER_ADDR", "127.0.0.1"), float(env.get("ALPACA_RENDEZVOUS_TIMEOUT_S", "600")))
    except LaunchError as e:
        log.error("%s", e)
        if env.get("ALPACA_FAILURE_FILE"):
            try:
                Path(env["ALPACA_FAILURE_FILE"]).write_text(f"{e}\n")
            except OSError:
                pass
        return 1
    log.info("exec %s", " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    # exec: torchrun becomes the container's main process and gets its signals directly.
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
