"""`train`: the SageMaker bring-your-own-container entrypoint.

SageMaker runs the image with the argument `train` and talks to it through files under
/opt/ml (moved by $ALPACA_SAGEMAKER_ROOT, for tests):

- input/config/hyperparameters.json: every value a string; each `key: value` becomes
  `--key value` for alpaca-train (`sagemaker_*` keys from the SDK are dropped, values the
  SDK JSON-quoted are unquoted, and `extra_args` may hold a JSON list passed verbatim).
  `nproc_per_node` sets the processes per host (default: one per GPU).
- input/config/resourceconfig.json: `hosts` and `current_host`; hosts[0] is the
  rendezvous master and the node rank is the index of current_host.
- input/data/<channel>/: the `model` channel is the base model unless
  `model_name_or_path` is given; the `training` (or `train`) channel's single file is the
  data unless `data_path` is given.
- model/: the final model; checkpoints/: the checkpoints (SageMaker syncs and restores
  it); output/failure: a one-line reason when training fails.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from alpaca_train.launch import LaunchError, default_nproc, torchrun_command, wait_for_host

log = logging.getLogger("alpaca_train.sagemaker")

DATA_CHANNELS = ("training", "train")


class ContractError(RuntimeError):
    pass


def root() -> Path:
    return Path(os.environ.get("ALPACA_SAGEMAKER_ROOT", "/opt/ml"))


def _read_json(path: Path, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise ContractError(f"{path} does not exist")
        return {}
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ContractError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(obj, dict):
        raise ContractError(f"{path} must hold a JSON object")
    return obj


def _unquote(value) -> str:
    # The SageMaker Python SDK JSON-encodes each value ('"cosine"'); the API passes strings as-is.
    if isinstance(value, str):
        try:
            inner = json.loads(value)
        except json.JSONDecodeError:
            return value
        return inner if isinstance(inner, str) else value
    return json.dumps(value)


def _single_file(channel_dir: Path) -> Path:
    files = sorted(p for p in channel_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    if len(files) != 1:
        raise ContractError(
            f"data channel {channel_dir} must hold exactly one file (found {len(files)}); "
            "or set the hyperparameter data_path"
        )
    return files[0]


def train_args(hp: dict, base: Path) -> tuple[list[str], int | None]:
    hp = {k: _unquote(v) for k, v in hp.items() if not k.startswith("sagemaker_")}
    nproc = hp.pop("nproc_per_node", None)
    extra = hp.pop("extra_args", None)
    data_dir = base / "input" / "data"
    if "model_name_or_path" not in hp:
        if not (data_dir / "model").is_dir():
            raise ContractError("no base model: set the hyperparameter model_name_or_path or give a 'model' channel")
        hp["model_name_or_path"] = str(data_dir / "model")
    if "data_path" not in hp:
        channel = next((data_dir / c for c in DATA_CHANNELS if (data_dir / c).is_dir()), None)
        if channel is None:
            raise ContractError("no data: set the hyperparameter data_path or give a 'training' channel")
        hp["data_path"] = str(_single_file(channel))
    hp.setdefault("output_dir", str(base / "checkpoints"))
    hp.setdefault("final_model_dir", str(base / "model"))
    args: list[str] = []
    for key, value in hp.items():
        args += [f"--{key}", value]
    if extra:
        try:
            more = json.loads(extra)
        except json.JSONDecodeError as e:
            raise ContractError(f"hyperparameter extra_args is not a JSON list: {e.msg}") from None
        if not isinstance(more, list):
            raise ContractError("hyperparameter extra_args must be a JSON list of strings")
        args += [str(a) for a in more]
    try:
        return args, int(nproc) if nproc else None
    except ValueError:
        raise ContractError(f"hyperparameter nproc_per_node={nproc!r} is not an integer") from None


def build_command(base: Path) -> list[str]:
    config = base / "input" / "config"
    hp = _read_json(config / "hyperparameters.json", required=False)
    resources = _read_json(config / "resourceconfig.json", required=False)
    hosts = resources.get("hosts") or ["localhost"]
    current = resources.get("current_host") or hosts[0]
    if current not in hosts:
        raise ContractError(f"current_host {current!r} is not in hosts {hosts}")
    args, nproc = train_args(hp, base)
    master = hosts[0]
    wait_for_host(master, float(os.environ.get("ALPACA_RENDEZVOUS_TIMEOUT_S", "600")))
    port = int(os.environ.get("ALPACA_MASTER_PORT", "29500"))
    return torchrun_command(len(hosts), nproc or default_nproc(), hosts.index(current), master, port, args)


def write_failure(path: Path, message: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(" ".join(message.split())[:1000] + "\n")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    base = root()
    failure = base / "output" / "failure"
    try:
        cmd = build_command(base)
    except (ContractError, LaunchError) as e:
        log.error("%s", e)
        write_failure(failure, str(e))
        return 1
    for d in ("model", "checkpoints"):
        (base / d).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, ALPACA_FAILURE_FILE=str(failure))
    if failure.exists():
        failure.unlink()
    log.info("running %s", " ".join(cmd))
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0 and not failure.exists():
        write_failure(failure, f"training exited with code {rc}; see the job's logs")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
