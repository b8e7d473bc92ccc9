"""Checkpoints in S3 across a gang: two ranks over gloo, each its own "node" with its own
disk, against the local S3 (moto over HTTP, real s5cmd). The ranks run the image's own
functions (the sync callback, the resume decision) on a checkpoint laid out as DeepSpeed
writes one; a real SIGTERM'd two-node run is in test_train_launch.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fixtures_train import free_port, keys

from alpaca_train.outputs import CheckpointIdentity

TESTS = Path(__file__).resolve().parent
SETTINGS = {"model": "s3://b/models/tiny/", "model_config_sha256": "c0", "data_sha256": "d0", "world_size": 2,
            "zero_stage": 3}


def identity(uri: str, run_uid: str = "run-a", **settings) -> CheckpointIdentity:
    return CheckpointIdentity(run_uid, uri, {**SETTINGS, **settings})


def shard_files(step: int, ranks=(0, 1)) -> dict[str, bytes]:
    """A ZeRO-3 checkpoint as DeepSpeed and the Trainer lay it out, for these ranks."""
    g = f"global_step{step}"
    files = {"trainer_state.json": json.dumps({"global_step": step}).encode(), "latest": g.encode(),
             "scheduler.pt": b"s", "config.json": b"{}"}
    for r in ranks:
        files[f"rng_state_{r}.pth"] = f"rng{r}".encode()
        files[f"{g}/zero_pp_rank_{r}_mp_rank_00_model_states.pt"] = f"model{r}".encode()
        files[f"{g}/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"] = f"optim{r}".encode() * 100
    return files


def put_checkpoint(s3, bucket, step: int, ident: CheckpointIdentity | None, nodes=(0, 1), nnodes=2, prefix="run"):
    for name, body in shard_files(step).items():
        s3.client.put_object(Bucket=bucket, Key=f"{prefix}/checkpoint-{step}/{name}", Body=body)
    if ident is not None:
        s3.client.put_object(Bucket=bucket, Key=f"{prefix}/checkpoint-{step}/alpaca-checkpoint.json",
                             Body=ident.to_json())
    for node in nodes:
        s3.client.put_object(Bucket=bucket, Key=f"{prefix}/checkpoint-{step}/.alpaca-uploaded-node{node}-of-{nnodes}",
                             Body=b"{}")


# --- the ranks' side (run in subprocesses by `gang`) -------------------------------------


def _rank():
    import torch.distributed as dist

    from alpaca_train.outputs import Topology
    from alpaca_train.s3io import S5cmd

    dist.init_process_group("gloo")
    cfg = json.loads(Path(sys.argv[1]).read_text())
    return dist, Topology.from_env(), S5cmd(), cfg


def _wait_for(path: Path, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def rank_saves_checkpoint():
    """Both nodes save checkpoint-4; node 1's upload never ends (its node is lost)."""
    from alpaca_train.outputs import CheckpointSyncCallback
    from alpaca_train.s3io import S5cmd

    dist, topo, s5, cfg = _rank()

    class LostNode(S5cmd):
        def sync_up(self, src, uri):
            time.sleep(3600)

    out = Path(cfg["dir"]) / f"node{topo.node}"
    for name, body in shard_files(4, ranks=[topo.rank]).items():
        (out / "checkpoint-4" / name).parent.mkdir(parents=True, exist_ok=True)
        (out / "checkpoint-4" / name).write_bytes(body)
    # Node 0 (the Trainer's rotation, save_total_limit 1) no longer has checkpoint-2 on disk.
    cb = CheckpointSyncCallback(cfg["uri"], LostNode() if topo.node == 1 else s5, topo,
                                CheckpointIdentity.from_json(cfg["identity"]))
    cb.on_save(SimpleNamespace(output_dir=str(out)), SimpleNamespace(global_step=4), SimpleNamespace())
    print(f"on_save returned on node {topo.node}", flush=True)
    cb.wait()
    print(f"upload done on node {topo.node}", flush=True)
    time.sleep(3600)  # the gang is killed here


def rank_resumes():
    """What alpaca_train.train does between the process group and the model load, and how it
    ends: with the image's own exit (a plain sys.exit right after the refusal's broadcast
    died by SIGABRT about one run in two: alpaca_train/shutdown.py)."""
    from alpaca_train import shutdown

    shutdown.run_and_exit(_resumes, int(os.environ["RANK"]))


def _resumes() -> int:
    from alpaca_train import outputs, shutdown
    from alpaca_train.exitcodes import ImageError
    from alpaca_train.s3io import S5cmd

    dist, topo, s5, cfg = _rank()
    if topo.rank == 0 and cfg.get("pause_after_listing"):
        class Pausing(S5cmd):
            listed = False

            def list(self, prefix_uri):
                keys = super().list(prefix_uri)
                if not self.listed:
                    self.listed = True
                    Path(cfg["dir"], "rank0-listed").write_text("")
                    _wait_for(Path(cfg["dir"], "rank0-go"))
                return keys
        s5 = Pausing()
    if topo.rank == 1 and cfg.get("pause_after_listing"):
        _wait_for(Path(cfg["dir"], "rank1-go"))
    out = Path(cfg["dir"]) / f"node{topo.node}"
    try:
        resume = outputs.choose_resume(CheckpointIdentity.from_json(cfg["identity"]), cfg["uri"], out, topo, s5)
    except ImageError as e:
        print(f"rank {topo.rank} exit {e.exit_code}: {e}", flush=True)
        return shutdown.finish(e.exit_code, topo.rank)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))
    print("RESULT " + json.dumps({"rank": topo.rank, "resume": resume and Path(resume).name, "files": files}),
          flush=True)
    return shutdown.finish(0, topo.rank)


# --- the test's side ---------------------------------------------------------------------


class Gang:
    def __init__(self, tmp_path: Path, env: dict, target: str, cfg: dict, world: int = 2):
        cfg = dict(cfg, dir=str(tmp_path))
        (tmp_path / "cfg.json").write_text(json.dumps(cfg))
        port = free_port()
        self.logs = [tmp_path / f"rank{r}.log" for r in range(world)]
        self.procs = []
        for r in range(world):
            rank_env = dict(env, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(TESTS))
            self.procs.append(subprocess.Popen(
                [sys.executable, "-c", f"import sys, test_train_checkpoints as t; t.{target}()", tmp_path / "cfg.json"],
                env=rank_env, stdout=open(self.logs[r], "w"), stderr=subprocess.STDOUT, start_new_session=True))

    def output(self, r: int) -> str:
        return self.logs[r].read_text()

    def wait_output(self, r: int, text: str, timeout=120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output(r):
            assert self.procs[r].poll() is None, f"rank {r} exited {self.procs[r].returncode}:\n{self.output(r)[-3000:]}"
            assert time.monotonic() < deadline, f"rank {r} never printed {text!r}:\n{self.output(r)[-3000:]}"
            time.sleep(0.1)

    def wait(self, timeout=120) -> list[int]:
        try:
            return [p.wait(timeout=timeout) for p in self.procs]
        finally:
            self.kill()

    def kill(self) -> None:
        import signal

        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def results(self) -> list[dict]:
        out = []
        for r in range(len(self.procs)):
            lines = [l for l in self.output(r).splitlines() if l.startswith("RESULT ")]
            assert lines, f"rank {r}:\n{self.output(r)[-3000:]}"
            out.append(json.loads(lines[-1][len("RESULT "):]))
        return out


@pytest.fixture
def gang_env(train_env, s3):
    return dict(train_env, **s3.env)


def test_gang_killed_between_two_nodes_uploads_keeps_a_complete_checkpoint(gang_env, tmp_path, s3, bucket):
    uri = f"s3://{bucket}/run"
    put_checkpoint(s3, bucket, 2, identity(uri))
    gang = Gang(tmp_path, gang_env, "rank_saves_checkpoint", {"uri": uri, "identity": identity(uri).to_json()})
    try:
        # The upload runs in the background: node 1's save returns although its upload hangs.
        gang.wait_output(1, "on_save returned on node 1")
        gang.wait_output(0, "upload done on node 0")
    finally:
        gang.kill()
    objects = keys(s3, bucket, "run/")
    assert "run/checkpoint-4/.alpaca-uploaded-node0-of-2" in objects
    assert "run/checkpoint-4/.alpaca-uploaded-node1-of-2" not in objects
    # Node 0 rotated checkpoint-2 away on its disk, but checkpoint-4 is not complete: kept.
    for name in shard_files(2):
        assert f"run/checkpoint-2/{name}" in objects, name
    assert {"run/checkpoint-2/.alpaca-uploaded-node0-of-2", "run/checkpoint-2/.alpaca-uploaded-node1-of-2"} <= set(objects)
    assert json.loads(s3.client.get_object(Bucket=bucket, Key="run/checkpoint-4/alpaca-checkpoint.json")["Body"].read())[
        "run_uid"] == "run-a"


def test_nodes_that_see_different_latest_steps_resume_from_one_step(gang_env, tmp_path, s3, bucket):
    uri = f"s3://{bucket}/run"
    put_checkpoint(s3, bucket, 2, identity(uri))
    put_checkpoint(s3, bucket, 4, identity(uri), nodes=[0])  # the last attempt's node 1 was still uploading
    gang = Gang(tmp_path, gang_env, "rank_resumes",
                {"uri": uri, "identity": identity(uri).to_json(), "pause_after_listing": True})
    try:
        _wait_for_file(tmp_path / "rank0-listed", gang)
        # ...and finishes now: a node that looked only now would see checkpoint-4 complete.
        s3.client.put_object(Bucket=bucket, Key="run/checkpoint-4/.alpaca-uploaded-node1-of-2", Body=b"{}")
        (tmp_path / "rank1-go").write_text("")
        (tmp_path / "rank0-go").write_text("")
        assert gang.wait() == [0, 0], gang.output(0)[-2000:] + gang.output(1)[-2000:]
    finally:
        gang.kill()
    results = gang.results()
    assert [r["resume"] for r in results] == ["checkpoint-2", "checkpoint-2"]
    # The incomplete checkpoint-4 was deleted: this attempt's own checkpoint-4 starts clean.
    assert not any(k.startswith("run/checkpoint-4/") for k in keys(s3, bucket, "run/"))


def _wait_for_file(path: Path, gang: Gang, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        for r, p in enumerate(gang.procs):
            assert p.poll() is None, f"rank {r} exited {p.returncode}:\n{gang.output(r)[-3000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared:\n{gang.output(0)[-3000:]}"
        time.sleep(0.05)


def test_a_node_downloads_only_its_own_shards(gang_env, tmp_path, s3, bucket):
    uri = f"s3://{bucket}/run"
    put_checkpoint(s3, bucket, 6, identity(uri))
    gang = Gang(tmp_path, gang_env, "rank_resumes", {"uri": uri, "identity": identity(uri).to_json()})
    assert gang.wait() == [0, 0], gang.output(0)[-2000:] + gang.output(1)[-2000:]
    shared = {"trainer_state.json", "latest", "scheduler.pt", "config.json", "alpaca-checkpoint.json"}
    for r in gang.results():
        assert r["resume"] == "checkpoint-6"
        mine = {f"rng_state_{r['rank']}.pth", f"global_step6/zero_pp_rank_{r['rank']}_mp_rank_00_model_states.pt",
                f"global_step6/bf16_zero_pp_rank_{r['rank']}_mp_rank_00_optim_states.pt"}
        assert set(r["files"]) == {f"checkpoint-6/{f}" for f in shared | mine}, r


def test_a_foreign_checkpoint_is_refused_with_the_reason(gang_env, tmp_path, s3, bucket):
    uri = f"s3://{bucket}/run"
    put_checkpoint(s3, bucket, 2, identity(uri, run_uid="run-b"))
    gang = Gang(tmp_path, gang_env, "rank_resumes", {"uri": uri, "identity": identity(uri).to_json()})
    assert gang.wait() == [64, 64]
    for r in (0, 1):
        assert f"refusing to resume from {uri}/checkpoint-2: it was written by run run-b, this is run run-a" in gang.output(r)
    assert "run/checkpoint-2/.alpaca-uploaded-node1-of-2" in keys(s3, bucket, "run/"), "nothing was deleted"


def test_a_checkpoint_is_foreign_when_any_setting_differs(tmp_path):
    ours = identity("s3://b/run")
    assert ours.mismatch(identity("s3://b/run")) is None
    assert ours.mismatch(identity("s3://b/run", run_uid=None)) is None  # written without ALPACA_RUN_UID
    assert ours.mismatch(identity("s3://b/run", world_size=4, zero_stage=2)) == (
        "its settings differ: world_size 4 there, 2 here; zero_stage 2 there, 3 here")
    assert "data_sha256 'd1' there, 'd0' here" in ours.mismatch(identity("s3://b/run", run_uid=None, data_sha256="d1"))
