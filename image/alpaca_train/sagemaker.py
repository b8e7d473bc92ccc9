"""`train`: the SageMaker bring-your-own-container entrypoint.

SageMaker runs the image with the argument `train` and talks to it through files under
/opt/ml (moved by $ALPACA_SAGEMAKER_ROOT, for tests and the local stand-in). It sets no
SM_* variables (those come from the sagemaker-training toolkit, which we do not use):
everything is read from these files.

- input/config/hyperparameters.json: every value a string; each `key: value` becomes
  `--key value` for alpaca-train (`sagemaker_*` keys from the SDK are dropped, values the
  SDK JSON-quoted are unquoted, and `extra_args` may hold a JSON list passed verbatim).
  `nproc_per_node` sets the processes per host (default: one per GPU).
- input/config/resourceconfig.json: `hosts` (sorted here), `current_host` and
  `network_interface_name`; hosts[0] is the rendezvous master, the node rank is the index
  of current_host, and NCCL (and gloo) use that interface.
- input/data/<channel>/: `model` is the base model unless `model_name_or_path` is given;
  `training` (or `train`) holds the data file unless `data_path` is given; `config` (written
  by the operator) holds ds_config.json (-> --deepspeed) and train_args.json (a JSON list
  of arguments too long for a hyperparameter, appended).
- Outputs. With an output URI (hyperparameter output_uri or $ALPACA_OUTPUT_URI) and no
  compression ($ALPACA_MODEL_COMPRESSION unset or NONE), alpaca-train syncs checkpoints and
  uploads the model and manifest.json straight to that URI, as on EKS, working on the ML
  volume under /opt/ml/alpaca/; /opt/ml/model and /opt/ml/checkpoints stay empty, so
  nothing is uploaded twice. Otherwise SageMaker's own way: checkpoints in
  /opt/ml/checkpoints (CheckpointConfig syncs and restores them), the model in /opt/ml/model.
- Progress: rank 0 writes {output URI}/progress.json (alpaca_train.progress).
- output/failure: a one-line reason when training fails (SageMaker's FailureReason).

SIGTERM (StopTrainingJob, a spot reclaim) goes straight to the training processes, so
each can save a checkpoint in SageMaker's 120 s; torchrun, if signalled, would kill them
after 30. The exit code is then 143.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from alpaca_train import exitcodes, preflight, shutdown
from alpaca_train.launch import LaunchError, default_nproc, supervise, torchrun_command, wait_for_host

log = logging.getLogger("alpaca_train.sagemaker")

DATA_CHANNELS = ("training", "train")
CONFIG_CHANNEL = "config"


class ContractError(RuntimeError):
    pass


def root() -> Path:
    return Path(os.environ.get("ALPACA_SAGEMAKER_ROOT", "/opt/ml"))


def _read_json(path: Path, required: bool, kind: type = dict):
    if not path.is_file():
        if required:
            raise ContractError(f"{path} does not exist")
        return kind()
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ContractError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(obj, kind):
        raise ContractError(f"{path} must hold a JSON {'object' if kind is dict else 'list'}")
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


@dataclass(frozen=True)
class Outputs:
    """Where checkpoints and the model go, and where progress.json is written."""

    output_uri: str | None
    direct: bool  # alpaca-train writes to output_uri itself

    @classmethod
    def decide(cls, hp: dict, env: dict) -> "Outputs":
        uri = hp.get("output_uri") or env.get("ALPACA_OUTPUT_URI") or None
        compression = (env.get("ALPACA_MODEL_COMPRESSION") or "NONE").upper()
        if compression not in ("NONE", "GZIP"):
            raise ContractError(f"ALPACA_MODEL_COMPRESSION={compression!r}: expected NONE or GZIP")
        if uri and not uri.startswith("s3://"):
            raise ContractError(f"output URI {uri!r} is not an s3:// URI")
        return cls(uri, bool(uri) and compression == "NONE")

    @property
    def progress_uri(self) -> str | None:
        return self.output_uri.rstrip("/") + "/progress.json" if self.output_uri else None


def train_args(hp: dict, base: Path, outputs: Outputs | None = None) -> tuple[list[str], int | None]:
    hp = {k: _unquote(v) for k, v in hp.items() if not k.startswith("sagemaker_")}
    outputs = outputs or Outputs(hp.get("output_uri"), bool(hp.get("output_uri")))
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
    if outputs.direct:
        # On the ML volume, but outside what SageMaker itself uploads.
        hp.setdefault("output_dir", str(base / "alpaca" / "checkpoints"))
        hp.setdefault("final_model_dir", str(base / "alpaca" / "model"))
    else:
        hp.pop("output_uri", None)
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
    args += config_channel_args(data_dir / CONFIG_CHANNEL, args)
    try:
        return args, int(nproc) if nproc else None
    except ValueError:
        raise ContractError(f"hyperparameter nproc_per_node={nproc!r} is not an integer") from None


def config_channel_args(config: Path, args: list[str]) -> list[str]:
    """The operator's `config` channel: the DeepSpeed JSON and the arguments too long for hyperparameters."""
    if not config.is_dir():
        return []
    more: list[str] = []
    ds = config / "ds_config.json"
    if ds.is_file() and not any(a.split("=")[0] == "--deepspeed" for a in args):
        _read_json(ds, required=True)  # a clear error here, not deep inside DeepSpeed
        more += ["--deepspeed", str(ds)]
    listed = _read_json(config / "train_args.json", required=False, kind=list)
    if not all(isinstance(a, str) for a in listed):
        raise ContractError(f"{config / 'train_args.json'} must be a JSON list of strings")
    return more + listed


@dataclass(frozen=True)
class Cluster:
    hosts: list[str]
    current: str
    interface: str | None

    @property
    def master(self) -> str:
        return self.hosts[0]

    @property
    def node_rank(self) -> int:
        return self.hosts.index(self.current)

    @classmethod
    def read(cls, config: Path) -> "Cluster":
        resources = _read_json(config / "resourceconfig.json", required=False)
        hosts = resources.get("hosts") or ["localhost"]
        if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
            raise ContractError(f"{config / 'resourceconfig.json'}: hosts must be a list of host names")
        # SageMaker lists them sorted today; the rank must not depend on that staying so.
        hosts = sorted(hosts, key=lambda h: (len(h), h))
        current = resources.get("current_host") or hosts[0]
        if current not in hosts:
            raise ContractError(f"current_host {current!r} is not in hosts {hosts}")
        return cls(hosts, current, resources.get("network_interface_name") or None)


def build_command(base: Path, env: dict | None = None) -> tuple[list[str], dict]:
    """The torchrun command line and the environment it runs with."""
    env = dict(os.environ if env is None else env)
    config = base / "input" / "config"
    hp = _read_json(config / "hyperparameters.json", required=False)
    cluster = Cluster.read(config)
    outputs = Outputs.decide({k: _unquote(v) for k, v in hp.items()}, env)
    args, nproc = train_args(hp, base, outputs)
    if cluster.interface:
        env.setdefault("NCCL_SOCKET_IFNAME", cluster.interface)
        env.setdefault("GLOO_SOCKET_IFNAME", cluster.interface)
    env["ALPACA_FAILURE_FILE"] = str(base / "output" / "failure")
    # The ML volume, not the image's /workspace on the container's small root volume.
    env["ALPACA_WORKDIR"] = str(base / "alpaca")
    if not outputs.direct:
        env.pop("ALPACA_OUTPUT_URI", None)
    if outputs.progress_uri:
        env["ALPACA_PROGRESS_URI"] = outputs.progress_uri
    wait_for_host(cluster.master, float(env.get("ALPACA_RENDEZVOUS_TIMEOUT_S", "600")))
    port = int(env.get("ALPACA_MASTER_PORT", "29500"))
    cmd = torchrun_command(len(cluster.hosts), nproc or default_nproc(), cluster.node_rank, cluster.master, port, args)
    return cmd, env


def run_preflight(base: Path, env: dict) -> None:
    """The S3 preflight, on the first host only (a failed host fails the whole job), before
    waiting for the other hosts.

    The model and data channels are local by now (SageMaker downloaded them), so what is
    checked is the output URI (which the container writes: everything, or progress.json
    only when SageMaker uploads the model with the same role), a checkpoint URI in
    $ALPACA_CHECKPOINT_URI, and any input given as an s3:// hyperparameter.
    """
    config = base / "input" / "config"
    if Cluster.read(config).node_rank != 0:
        return
    hp = _read_json(config / "hyperparameters.json", required=False)
    outputs = Outputs.decide({k: _unquote(v) for k, v in hp.items()}, env)
    args, _ = train_args(hp, base, outputs)
    preflight.run_for_args(args, env, output=outputs.output_uri)


def write_failure(path: Path, message: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(" ".join(message.split())[:1000] + "\n")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    base = root()
    failure = base / "output" / "failure"
    if failure.exists():
        failure.unlink()
    try:
        run_preflight(base, dict(os.environ))
        cmd, env = build_command(base)
    except ContractError as e:
        log.error("%s", e)
        write_failure(failure, str(e))
        return exitcodes.USAGE
    except preflight.PreflightError as e:
        log.error("%s", e)
        write_failure(failure, str(e))
        return e.exit_code
    except LaunchError as e:
        log.error("%s", e)
        write_failure(failure, str(e))
        return 1
    for d in ("model", "checkpoints"):
        (base / d).mkdir(parents=True, exist_ok=True)
    log.info("running %s", " ".join(cmd))
    sys.stdout.flush()
    # The same supervisor as the pods': SIGTERM goes to the workers (each saves a checkpoint
    # in SageMaker's 120 s), and the workers' own exit codes (64/65/66/67/143) come back.
    rc = supervise(cmd, env)
    if rc == exitcodes.TERMINATED:
        if not failure.exists():
            write_failure(failure, "stopped by SIGTERM (StopTrainingJob or a spot interruption)")
        return exitcodes.TERMINATED
    if rc != 0 and not failure.exists():
        write_failure(failure, f"training exited with code {rc}; see the job's logs")
    return rc if 0 < rc < 256 else (0 if rc == 0 else 1)


def entry() -> NoReturn:
    """The console script: main(), then exit with exactly its code (alpaca_train.shutdown)."""
    shutdown.run_and_exit(main)


if __name__ == "__main__":
    entry()
