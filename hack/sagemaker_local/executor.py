"""Execution mode: a training job really runs, as SageMaker would run our image.

For each instance algo-1..N of a job the executor lays out a root that stands in for
/opt/ml (input/config/{hyperparameters,inputdataconfig,resourceconfig}.json, the
channels downloaded from the local S3 into input/data/<channel>/, checkpoints restored
from CheckpointConfig), then starts the image's `train` with ALPACA_SAGEMAKER_ROOT
pointing at it. Each instance gets a private mount and UTS namespace (`unshare -m -u`)
with its own /etc/hosts, where algo-1..N are distinct loopback addresses, and its
hostname set: the names resolve as they do in a SageMaker cluster, and nowhere else.

While it trains, the checkpoint directories are synced to CheckpointConfig.S3Uri; when
every instance has exited, /opt/ml/model is uploaded (a prefix with CompressionType
NONE, else model.tar.gz). Status: exit code 0 everywhere = Completed; any other =
Failed, with the failure file's line as FailureReason, and the other instances are
stopped. StopTrainingJob: SIGTERM to each instance's main process (as `docker stop`),
SIGKILL of everything it started after the grace period, then Stopped.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

from standin import COMPLETED, FAILED, IN_PROGRESS, STOPPED, STOPPING

log = logging.getLogger("sagemaker_local.executor")

OPT_ML = "/opt/ml"
CHECKPOINT_SYNC_S = 2.0
# The command runs inside the new namespaces: bind our hosts file, name the host, exec.
NAMESPACE_SCRIPT = 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"'


class JobError(Exception):
    """Ends a job Failed with this FailureReason."""


def _split(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise JobError(f"ClientError: {uri} is not an s3:// URI")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def _free_port(avoid: frozenset = frozenset({36443, 29500})) -> int:
    # 36443 is the default of `make cluster-up`, 29500 torchrun's: both are often taken later.
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


class Executor:
    def __init__(self, work_dir: Path, grace_seconds: float = 120.0, train_command: list[str] | None = None):
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.grace_seconds = grace_seconds
        beside = Path(sys.executable).parent / "train"
        self.train_command = train_command or ([str(beside)] if beside.exists()
                                               else [sys.executable, "-m", "alpaca_train.sagemaker"])
        # As root a mount namespace is enough; otherwise a user namespace maps us to root in it.
        self.unshare = ["unshare", "-m", "-u"] if os.geteuid() == 0 else ["unshare", "-r", "-m", "-u"]
        self.runs: list[Run] = []

    def start(self, job, endpoint: str) -> "Run":
        run = Run(self, job.name, job.request, job.region, endpoint)
        self.runs.append(run)
        run.start()
        return run

    def close(self) -> None:
        for run in self.runs:
            run.kill()


class Run:
    def __init__(self, executor: Executor, name: str, request: dict, region: str, endpoint: str):
        self.ex = executor
        self.name = name
        self.request = request
        self.region = region
        self.endpoint = endpoint
        self.dir = executor.work_dir / name
        count = int(request.get("ResourceConfig", {}).get("InstanceCount", 1))
        self.hosts = [f"algo-{i}" for i in range(1, count + 1)]
        self.procs: dict[str, subprocess.Popen] = {}
        self.exit_codes: dict[str, int] = {}
        self.exit_order: list[str] = []
        self._lock = threading.Lock()
        self._history: list[tuple[str, str, str | None]] = [(IN_PROGRESS, "Starting", None)]
        self._stop = threading.Event()
        self._stop_secondary = "Stopped"
        self._killed = False
        self._kill_timer: threading.Timer | None = None
        self.metrics: list[dict] = []
        self.started = time.monotonic()
        self._synced: dict[Path, tuple[int, int]] = {}
        self._thread = threading.Thread(target=self._main, name=f"job-{name}", daemon=True)

    # --- what the stand-in asks -----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def updates(self, since: int) -> list[tuple[str, str, str | None]]:
        """Every state entered after the first `since`: each is one SecondaryStatusTransition."""
        with self._lock:
            return self._history[since:]

    def _set(self, status: str, secondary: str, reason: str | None = None) -> None:
        with self._lock:
            if self._stop.is_set() and status == IN_PROGRESS:
                status, secondary = STOPPING, "Stopping"
            if self._history and self._history[-1][:2] == (status, secondary):
                return
            self._history.append((status, secondary, reason))

    def stop(self, secondary: str = "Stopped") -> None:
        """StopTrainingJob: SIGTERM now, SIGKILL after the grace period."""
        with self._lock:
            if self._stop.is_set():
                return
            self._stop_secondary = secondary
            self._stop.set()
            if self._history[-1][0] == IN_PROGRESS:
                self._history.append((STOPPING, "Stopping", None))
        self._signal_all(signal.SIGTERM)
        self._kill_timer = threading.Timer(self.ex.grace_seconds, self.kill)
        self._kill_timer.daemon = True
        self._kill_timer.start()

    def kill(self) -> None:
        """SIGKILL everything the instances started, as the end of a container would.

        torchrun starts its workers in sessions of their own, and they outlive a killed
        torchrun, so the instances' processes are found by the root in their environment.
        """
        import psutil

        roots = {str(self.root(h)) for h in self.hosts}
        victims = [p for p in self.procs.values() if p.poll() is None]
        if victims:
            self._killed = True
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("ALPACA_SAGEMAKER_ROOT") in roots:
                    proc.kill()
                    self._killed = True
            except (psutil.Error, OSError):
                continue
        for proc in victims:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def describe(self) -> dict:
        return {"dir": str(self.dir), "hosts": self.hosts,
                "roots": {h: str(self.root(h)) for h in self.hosts},
                "logs": {h: str(self.dir / f"{h}.log") for h in self.hosts},
                "pids": {h: p.pid for h, p in self.procs.items()},
                "exitCodes": dict(self.exit_codes), "exitOrder": list(self.exit_order),
                "killed": self._killed}

    def _signal_all(self, sig: int) -> None:
        # As `docker stop`: the container's main process only; it forwards to its children.
        for proc in list(self.procs.values()):
            if proc.poll() is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    # --- the job --------------------------------------------------------------------------

    def root(self, host: str) -> Path:
        return self.dir / host / "opt-ml"

    def local(self, host: str, path: str) -> Path:
        """A path the request names under /opt/ml, inside this instance's root."""
        if path.rstrip("/") == OPT_ML or path.startswith(OPT_ML + "/"):
            return self.root(host) / path[len(OPT_ML):].lstrip("/")
        raise JobError(f"ClientError: local path {path} is not under {OPT_ML}")

    def _s3(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            config=Config(retries={"total_max_attempts": 5, "mode": "standard"}))

    def _main(self) -> None:
        try:
            s3 = self._s3()
            self._prepare()
            self._set(IN_PROGRESS, "Downloading")
            self._download(s3)
            if self._stop.is_set():
                self._finish(s3)
                return
            self._set(IN_PROGRESS, "Training")
            self._train(s3)
            self._finish(s3)
        except JobError as e:
            self.kill()
            self._set(FAILED, FAILED, str(e))
        except Exception as e:  # noqa: BLE001 - any bug of ours still ends the job
            log.exception("job %s", self.name)
            self.kill()
            self._set(FAILED, FAILED, f"InternalServerError: {type(e).__name__}: {e}")

    def _prepare(self) -> None:
        req = self.request
        rc = req.get("ResourceConfig", {})
        hosts_lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        hosts_lines += [f"127.0.1.{i} {h}" for i, h in enumerate(self.hosts, start=1)]
        channels = {c["ChannelName"]: {"ContentType": c.get("ContentType", ""),
                                       "TrainingInputMode": c.get("InputMode") or req.get(
                                           "AlgorithmSpecification", {}).get("TrainingInputMode", "File"),
                                       "S3DistributionType": c.get("DataSource", {}).get("S3DataSource", {}).get(
                                           "S3DataDistributionType", "FullyReplicated"),
                                       "RecordWrapperType": c.get("RecordWrapperType", "None")}
                    for c in req.get("InputDataConfig") or []}
        for host in self.hosts:
            root = self.root(host)
            for d in ("input/config", "input/data", "model", "output/data", "code", "checkpoints"):
                (root / d).mkdir(parents=True, exist_ok=True)
            cfg = root / "input" / "config"
            (cfg / "hyperparameters.json").write_text(json.dumps(req.get("HyperParameters") or {}))
            (cfg / "inputdataconfig.json").write_text(json.dumps(channels))
            (cfg / "resourceconfig.json").write_text(json.dumps({
                "current_host": host, "current_instance_type": rc.get("InstanceType", ""),
                "current_group_name": "homogeneousCluster", "hosts": list(self.hosts),
                "instance_groups": [{"instance_group_name": "homogeneousCluster",
                                     "instance_type": rc.get("InstanceType", ""), "hosts": list(self.hosts)}],
                # Every instance here is on loopback.
                "network_interface_name": "lo",
            }))
            (self.dir / f"{host}.hosts").write_text("\n".join(hosts_lines) + "\n")

    def _objects(self, s3, uri: str) -> list[tuple[str, str]]:
        """(key, path relative to the channel) of every object under an S3Prefix, as SageMaker lays them out."""
        bucket, prefix = _split(uri)
        # s3://b/data/ lays out what is under data/; s3://b/data/train.json (a key prefix) lays
        # out train.json (and train.json.1, ...) by the name after the last slash.
        if not prefix or prefix.endswith("/"):
            base = prefix
        else:
            base = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
        out = []
        try:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):
                        out.append((obj["Key"], obj["Key"][len(base):]))
        except s3.exceptions.NoSuchBucket:
            raise JobError(f"ClientError: Data download failed: bucket {bucket} does not exist") from None
        return out

    def _manifest(self, s3, channel: str, uri: str) -> tuple[str, list[tuple[str, str]]]:
        """(bucket, [(key, path in the channel)]) of a ManifestFile: [{"prefix": "s3://b/p/"},
        "rel", ...] names exactly those objects, each laid out under its relative path."""
        bucket, key = _split(uri)
        try:
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            entries = json.loads(body)
            prefix = entries[0]["prefix"]
            rels = entries[1:]
        except (s3.exceptions.NoSuchKey, s3.exceptions.NoSuchBucket):
            raise JobError(f"ClientError: channel {channel}: manifest file {uri} does not exist") from None
        except (ValueError, LookupError, TypeError):
            raise JobError(f"ClientError: channel {channel}: manifest file {uri} is not "
                           '[{"prefix": "s3://..."}, "relative/key", ...]') from None
        data_bucket, base = _split(prefix)
        out = []
        for rel in rels:
            try:
                s3.head_object(Bucket=data_bucket, Key=base + rel)
            except Exception:  # noqa: BLE001 - a 404 or 403 alike: SageMaker fails the download
                raise JobError(f"ClientError: Data download failed: {prefix}{rel} (listed in the manifest file "
                               f"{uri}) does not exist or cannot be read") from None
            out.append((base + rel, rel))
        return data_bucket, out

    def _download(self, s3) -> None:
        for channel in self.request.get("InputDataConfig") or []:
            src = channel.get("DataSource", {}).get("S3DataSource")
            name = channel["ChannelName"]
            if not src:
                raise JobError(f"ClientError: channel {name}: only S3DataSource is supported here")
            kind = src.get("S3DataType", "S3Prefix")
            if kind == "ManifestFile":
                bucket, objects = self._manifest(s3, name, src["S3Uri"])
            elif kind == "S3Prefix":
                objects = self._objects(s3, src["S3Uri"])
                bucket = _split(src["S3Uri"])[0]
            else:
                raise JobError(f"ClientError: channel {name}: S3DataType {kind} is not supported here")
            if not objects:
                raise JobError(f"ClientError: Data download failed: No S3 objects found under S3 URL "
                               f"\"{src['S3Uri']}\" given in input data source. Please ensure that the bucket "
                               "exists in the selected region, that objects exist under that S3 prefix, and "
                               "that the role has permission to read them.")
            sharded = src.get("S3DataDistributionType") == "ShardedByS3Key"
            for i, (key, rel) in enumerate(objects):
                targets = [self.hosts[i % len(self.hosts)]] if sharded else self.hosts
                first = self.root(targets[0]) / "input" / "data" / name / rel
                first.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, key, str(first))
                for host in targets[1:]:
                    dest = self.root(host) / "input" / "data" / name / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(first, dest)
        ckpt = self.request.get("CheckpointConfig")
        if ckpt and ckpt.get("S3Uri"):
            bucket = _split(ckpt["S3Uri"])[0]
            objects = self._objects(s3, ckpt["S3Uri"].rstrip("/") + "/")
            for host in self.hosts:
                local = self.local(host, ckpt.get("LocalPath") or "/opt/ml/checkpoints")
                for key, rel in objects:
                    dest = local / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file(bucket, key, str(dest))
                    st = dest.stat()
                    self._synced[dest] = (st.st_size, st.st_mtime_ns)

    def _env(self, host: str, master_port: int) -> dict:
        env = dict(os.environ)
        for k in list(env):
            if k.startswith(("SM_", "TRAINING_JOB_", "ALPACA_SAGEMAKER_")):
                del env[k]
        env.update({k: str(v) for k, v in (self.request.get("Environment") or {}).items()})
        account = "123456789012"
        env.update(
            TRAINING_JOB_NAME=self.name,
            TRAINING_JOB_ARN=f"arn:aws:sagemaker:{self.region}:{account}:training-job/{self.name}",
            ALPACA_SAGEMAKER_ROOT=str(self.root(host)),
            # Every job of this stand-in shares one network namespace: a port of its own.
            ALPACA_MASTER_PORT=str(master_port),
            AWS_ENDPOINT_URL=self.endpoint, S3_ENDPOINT_URL=self.endpoint,
            AWS_REGION=self.region, AWS_DEFAULT_REGION=self.region,
        )
        return env

    def _train(self, s3) -> None:
        master_port = _free_port()
        stopping_condition = self.request.get("StoppingCondition") or {}
        max_runtime = stopping_condition.get("MaxRuntimeInSeconds")
        for host in self.hosts:
            cmd = [*self.ex.unshare, "--", "sh", "-c", NAMESPACE_SCRIPT, "sh",
                   str(self.dir / f"{host}.hosts"), host, *self.ex.train_command]
            logf = open(self.dir / f"{host}.log", "ab")
            self.procs[host] = subprocess.Popen(cmd, env=self._env(host, master_port), cwd=self.root(host),
                                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
            logf.close()
        last_sync = time.monotonic()
        while True:
            for host, proc in self.procs.items():
                if host not in self.exit_codes and proc.poll() is not None:
                    self.exit_codes[host] = proc.returncode
                    self.exit_order.append(host)
                    if proc.returncode != 0 and not self._stop.is_set():
                        # One instance failed: SageMaker ends the whole job.
                        self._signal_all(signal.SIGTERM)
                        timer = threading.Timer(self.ex.grace_seconds, self.kill)
                        timer.daemon = True
                        timer.start()
            if len(self.exit_codes) == len(self.procs):
                break
            if max_runtime and time.monotonic() - self.started > float(max_runtime) and not self._stop.is_set():
                self.stop("MaxRuntimeExceeded")
            if time.monotonic() - last_sync >= CHECKPOINT_SYNC_S:
                self._sync_checkpoints(s3)
                last_sync = time.monotonic()
            time.sleep(0.2)
        if self._kill_timer:
            self._kill_timer.cancel()

    def _sync_checkpoints(self, s3) -> None:
        ckpt = self.request.get("CheckpointConfig")
        if not ckpt or not ckpt.get("S3Uri"):
            return
        bucket, prefix = _split(ckpt["S3Uri"].rstrip("/") + "/")
        for host in self.hosts:
            local = self.local(host, ckpt.get("LocalPath") or "/opt/ml/checkpoints")
            if not local.is_dir():
                continue
            for path in sorted(p for p in local.rglob("*") if p.is_file()):
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                sig = (st.st_size, st.st_mtime_ns)
                if self._synced.get(path) == sig:
                    continue
                try:
                    s3.upload_file(str(path), bucket, prefix + str(path.relative_to(local)))
                except FileNotFoundError:
                    continue  # a file the Trainer rotated away meanwhile
                self._synced[path] = sig

    def _upload_model(self, s3) -> None:
        out = self.request.get("OutputDataConfig") or {}
        if not out.get("S3OutputPath"):
            return
        bucket, prefix = _split(out["S3OutputPath"].rstrip("/") + "/")
        base = f"{prefix}{self.name}/output/"
        files: dict[str, Path] = {}
        for host in self.hosts:
            model = self.root(host) / "model"
            for p in sorted(model.rglob("*")) if model.is_dir() else []:
                if p.is_file():
                    files.setdefault(str(p.relative_to(model)), p)
        if (out.get("CompressionType") or "GZIP") == "NONE":
            for rel, p in files.items():
                s3.upload_file(str(p), bucket, f"{base}model/{rel}")
        else:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz") as tar:
                for rel, p in files.items():
                    tar.add(p, arcname=rel)
            s3.put_object(Bucket=bucket, Key=f"{base}model.tar.gz", Body=buf.getvalue())
        data = self.root(self.hosts[0]) / "output" / "data"
        if data.is_dir() and any(data.iterdir()):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz") as tar:
                tar.add(data, arcname=".")
            s3.put_object(Bucket=bucket, Key=f"{base}output.tar.gz", Body=buf.getvalue())

    def _metrics(self) -> None:
        """FinalMetricDataList: the last match of each MetricDefinitions regex in algo-1's log."""
        defs = (self.request.get("AlgorithmSpecification") or {}).get("MetricDefinitions") or []
        try:
            text = (self.dir / f"{self.hosts[0]}.log").read_text(errors="replace")
        except OSError:
            return
        for d in defs:
            try:
                matches = re.findall(d["Regex"], text)
            except re.error:
                continue
            if matches:
                last = matches[-1]
                try:
                    self.metrics.append({"MetricName": d["Name"],
                                         "Value": float(last[0] if isinstance(last, tuple) else last)})
                except ValueError:
                    pass

    def _failure_reason(self) -> str | None:
        for host in self.exit_order:
            rc = self.exit_codes[host]
            if rc == 0:
                continue
            f = self.root(host) / "output" / "failure"
            message = f.read_text(errors="replace").strip() if f.is_file() else ""
            return f"AlgorithmError: {message or 'see the job logs'}, exit code: {rc}"[:1024]
        return None

    def _finish(self, s3) -> None:
        reason = self._failure_reason()
        if reason is None:
            self._set(IN_PROGRESS, "Uploading")
        self._sync_checkpoints(s3)
        if reason is None or self._stop.is_set():
            self._upload_model(s3)
        self._metrics()
        if self._stop.is_set():
            self._set(STOPPED, self._stop_secondary)
        elif reason is not None:
            self._set(FAILED, FAILED, reason)
        else:
            self._set(COMPLETED, COMPLETED)
