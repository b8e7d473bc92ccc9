"""Every exit path of the trainer ends with the contract's code, every time (docs/contract.md,
"Exit codes"; image/alpaca_train/shutdown.py says why that needs care).

A 2-rank gang over a real gloo process group runs the trainer's own `entry()` (main and
its ending, exactly as `python -m alpaca_train.train` runs them) 20 times per path, and
each rank's exit status must be the exact code every time: a lost race at interpreter
exit shows up as -6 (SIGABRT), as in test_train_checkpoints' foreign-checkpoint gang about
one run in two while it ended with sys.exit right behind the refusal's broadcast. (The race
needs the exit that close behind a collective, so a return to Python's own exit would not
fail here every time; the ending's other promises would.) Alive at each exit: the process
group, rank 0's progress reporter (writing to the local S3) and, where a checkpoint was
being saved, the checkpoint upload thread.

To make 120-odd gangs cheap, each rank is a "zygote" that imports the trainer once and forks
one child per run. Only the model, its data module and the Trainer are stand-ins (no model
is loaded): the Trainer is a loop of steps, each one all-reduce over the gang as a real
step's gradients are, that calls the real callbacks (the SIGTERM agreement, the progress
reports, the checkpoint sync) the way transformers' Trainer does. The arguments, the
inputs from S3, the process group, the resume decision and the exit are the trainer's own.
"""
from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fixtures_train import keys
from support import free_port

TESTS = Path(__file__).resolve().parent
RUNS = 20
GOOD = [{"instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(4)]
RUN_UID = "run-a"

# case -> the exit code of rank 0 and rank 1, and how many gangs
CASES = {
    # rank 0's output_dir holds another run's checkpoint: rank 0 decides, broadcasts, both refuse
    "foreign-checkpoint": ((64, 64), RUNS),
    "bad-data": ((65, 65), RUNS),            # the data object in S3 is malformed
    "missing-model": ((66, 66), RUNS),       # no model under the S3 prefix
    # SIGTERM on rank 1 only, mid-training: the gang agrees, saves, syncs, stops
    "sigterm": ((143, 143), RUNS),
    "crash": ((1, 1), RUNS),                 # rank 1 crashes while its upload runs; rank 0 loses its peer
    "loss-not-finite": ((67, 67), RUNS),     # both ranks see a non-finite loss while their uploads run
    # Rank 1 hangs (never joins another collective) while rank 0 fails with a reduction in
    # flight: rank 0's teardown of the group blocks, and must be cut off (rank 1 is killed after).
    "peer-frozen": ((67, -signal.SIGKILL), 3),
}
FROZEN_EXIT_TIMEOUT_S = 2


# --- the ranks' side -------------------------------------------------------------------


class SteppingTrainer:
    """transformers.Trainer's callback protocol around steps that only all-reduce."""

    def __init__(self, model=None, args=None, processing_class=None, callbacks=(), guard=None, **_):
        from transformers.trainer_callback import TrainerState

        self.args, self.callbacks, self.guard = args, list(callbacks), guard
        self.rank = int(os.environ["RANK"])
        self.case = os.environ["EXIT_CASE"]
        self.state = TrainerState(max_steps=10_000, is_world_process_zero=self.rank == 0,
                                  is_local_process_zero=True)

    def _call(self, event, control):
        for cb in self.callbacks:
            getattr(cb, event)(self.args, self.state, control)

    def _save(self, control):
        ckpt = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": self.state.global_step}))
        (ckpt / f"rng_state_{self.rank}.pth").write_bytes(b"rng")
        self._call("on_save", control)

    def _wait_for_upload(self):
        """Until this node's (slow) upload runs: the failure must find it in flight."""
        pid_file = Path(os.environ["EXIT_RUN_DIR"], f"upload-pid-{self.rank}")
        deadline = time.monotonic() + 30
        while not pid_file.exists():
            assert time.monotonic() < deadline, "the checkpoint upload never started"
            time.sleep(0.01)

    def train(self, resume_from_checkpoint=None):
        import torch
        import torch.distributed as dist
        from transformers.trainer_callback import TrainerControl

        from alpaca_train.exitcodes import LossNotFiniteError

        control = TrainerControl()
        self._call("on_train_begin", control)
        Path(os.environ["EXIT_RUN_DIR"], f"training-{self.rank}").touch()
        while self.state.global_step < self.state.max_steps:
            dist.all_reduce(torch.ones(4))  # the step's gradients
            if self.guard is not None:
                self.guard.add(torch.tensor(2.0))  # a finite loss, as GuardedTrainer.training_step feeds it
            self.state.global_step += 1
            control = TrainerControl()
            if self.case == "crash" and self.state.global_step == 3 and self.rank == 1:
                raise RuntimeError("simulated crash in the training step")
            if self.case == "loss-not-finite" and self.state.global_step == 3:
                raise LossNotFiniteError("loss is nan at step 3")
            if self.case == "peer-frozen" and self.state.global_step == 2:
                if self.rank == 1:
                    time.sleep(3600)  # hung: it never joins another collective
                dist.all_reduce(torch.ones(4), async_op=True)  # overlapped with the step, as DeepSpeed's are
                raise LossNotFiniteError("loss is nan at step 2")
            self._call("on_step_end", control)
            if control.should_save or (self.case in ("crash", "loss-not-finite") and self.state.global_step == 2):
                self._save(control)
                if self.case in ("crash", "loss-not-finite"):
                    self._wait_for_upload()
            if control.should_training_stop:
                break
            time.sleep(0.01)
        self._call("on_train_end", control)
        return SimpleNamespace(training_loss=0.0)


def _child(cfg: dict) -> None:
    """One rank of one run, in a forked zygote: the trainer's entry with its own exit."""
    from alpaca_train import train
    from alpaca_train.s3io import S5cmd

    class SlowUploads(S5cmd):
        """A checkpoint upload that takes longer than the run: still in flight at the exit."""

        def sync_up(self, src, uri):
            pid_file = Path(os.environ["EXIT_RUN_DIR"], f"upload-pid-{os.environ['RANK']}")
            self._exec(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 120"])

    log = os.open(cfg["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.update(cfg["env"])
    train.load_model_and_tokenizer = lambda *a, **k: (None, None)
    train.make_data_module = lambda *a, **k: {}
    train.guards.GuardedTrainer = SteppingTrainer   # the Trainer the script builds (with its loss guard)
    if cfg["env"]["EXIT_CASE"] in ("crash", "loss-not-finite"):
        train.S5cmd = SlowUploads
    train.entry(cfg["argv"])


def zygote() -> None:
    """Import the trainer once; then, per line on stdin, fork a rank and report its exit status."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from alpaca_train import train

    # Warm what main() would import lazily, so that each child starts at once.
    import accelerate  # noqa: F401
    import torch.distributed  # noqa: F401
    from transformers.trainer_callback import TrainerControl  # noqa: F401

    values, _ = train.parse_args(["--output_dir", "/tmp/unused"])
    train.build(train.TrainingArguments, values)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cfg = json.loads(line)
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _child(cfg)  # never returns: entry() ends the process
        run_dir = Path(cfg["env"]["EXIT_RUN_DIR"])
        reaped = (0, 0)
        if cfg.get("signal"):
            signum, marker = cfg["signal"]
            while not (run_dir / marker).exists() and (reaped := os.waitpid(pid, os.WNOHANG)) == (0, 0):
                time.sleep(0.01)
            if reaped == (0, 0):
                os.kill(pid, signum)
        # A rank that ended before its signal was due was reaped by the wait above.
        _, status = reaped if reaped != (0, 0) else os.waitpid(pid, 0)
        (run_dir / f"exited-{cfg['env']['RANK']}").touch()
        print(json.dumps({"code": os.waitstatus_to_exitcode(status), "seconds": time.monotonic() - t0}),
              flush=True)


# --- the test's side -------------------------------------------------------------------


class Zygotes:
    def __init__(self, env: dict, world: int = 2):
        self.procs = [subprocess.Popen(
            [sys.executable, "-c", "import test_exit_paths as t; t.zygote()"],
            env=dict(env, PYTHONPATH=str(TESTS)), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, start_new_session=True) for _ in range(world)]
        for p in self.procs:
            assert json.loads(self._line(p, 180)) == {"ready": True}

    def _line(self, proc, timeout: float) -> str:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        assert ready, f"zygote {proc.pid} did not answer in {timeout}s"
        line = proc.stdout.readline()
        assert line, f"zygote {proc.pid} exited {proc.wait()}"
        return line

    def run(self, cfgs: list[dict], timeout: float = 60) -> list[dict]:
        for p, cfg in zip(self.procs, cfgs):
            p.stdin.write(json.dumps(cfg) + "\n")
            p.stdin.flush()
        return [json.loads(self._line(p, timeout)) for p in self.procs]

    def close(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the zygote and any child still running
            except ProcessLookupError:
                pass
            p.wait()


@pytest.fixture(scope="module")
def gang(train_env, s3):
    env = dict(train_env, **s3.env)
    z = Zygotes(env)
    yield z
    z.close()


@pytest.fixture(scope="module")
def inputs(s3, tmp_path_factory):
    """The bucket's objects and the local inputs every run shares."""
    import uuid

    from alpaca_train.outputs import CheckpointIdentity

    root = tmp_path_factory.mktemp("exit-inputs")
    bucket = f"exit-{uuid.uuid4().hex[:12]}"
    s3.client.create_bucket(Bucket=bucket)
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # identifies the model; never loaded (no model in this test)
    data = root / "data.json"
    data.write_text(json.dumps(GOOD))
    s3.client.put_object(Bucket=bucket, Key="bad.jsonl", Body=b'{"instruction": "a", "output": "b"}\n{"instruction": \n')
    foreign = CheckpointIdentity("run-b", None, {"world_size": 2}).to_json()
    return {"bucket": bucket, "model": str(model), "data": str(data), "foreign": foreign}


def run_config(case: str, i: int, rank: int, base: Path, inputs: dict, port: int) -> dict:
    b = inputs["bucket"]
    args = {"model_name_or_path": inputs["model"], "data_path": inputs["data"], "ddp_timeout": "60",
            "report_to": "none"}
    run_dir = base / f"{case}-{i}"
    work = run_dir / f"rank{rank}"
    work.mkdir(parents=True, exist_ok=True)
    # Only where the checkpoint sync needs it: every s5cmd call costs a tenth of a second.
    if case in ("sigterm", "crash", "loss-not-finite"):
        args["output_uri"] = f"s3://{b}/{case}-{i}/"
    elif case == "foreign-checkpoint":
        # Without an output URI the checkpoints on disk count (SageMaker restores them there).
        ckpt = work / "output" / "checkpoint-2"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text("{}")
        (ckpt / "alpaca-checkpoint.json").write_text(inputs["foreign"])
    elif case == "bad-data":
        args["data_path"] = f"s3://{b}/bad.jsonl"
    elif case == "missing-model":
        args["model_name_or_path"] = f"s3://{b}/no-such-model/"
    env = {"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "ALPACA_RUN_UID": RUN_UID,
           "ALPACA_WORKDIR": str(work), "ALPACA_FAILURE_FILE": str(work / "failure"),
           "ALPACA_EXIT_CODE_DIR": str(run_dir), "ALPACA_PROGRESS_URI": f"s3://{b}/progress/{case}-{i}.json",
           "EXIT_CASE": case, "EXIT_RUN_DIR": str(run_dir)}
    signal_when = None
    if case == "sigterm" and rank == 1:
        signal_when = (signal.SIGTERM, "training-1")  # a spot reclaim reaches one node, once the gang trains
    if case == "peer-frozen":
        env["ALPACA_EXIT_TIMEOUT_S"] = str(FROZEN_EXIT_TIMEOUT_S)
        if rank == 1:
            signal_when = (signal.SIGKILL, "exited-0")
    return {"argv": [x for k, v in args.items() for x in (f"--{k}", v)], "env": env, "log": str(work / "log"),
            "signal": signal_when}


def running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("case", list(CASES))
def test_every_rank_exits_with_the_contracts_code_every_time(case, gang, inputs, tmp_path, s3):
    codes, runs = CASES[case]
    t0 = time.monotonic()
    for i in range(runs):
        port = free_port()
        cfgs = [run_config(case, i, rank, tmp_path, inputs, port) for rank in (0, 1)]
        results = gang.run(cfgs)
        logs = [Path(c["log"]).read_text() for c in cfgs]
        for rank, (res, log, want) in enumerate(zip(results, logs, codes)):
            assert res["code"] == want, f"run {i}, rank {rank} exited {res['code']}, not {want}:\n{log[-4000:]}"
            if want < 0:
                continue  # killed by the test
            assert "terminate called" not in log, log[-4000:]
            # What alpaca-launch reads (torchrun's own code says nothing); 0 is not recorded.
            recorded = Path(cfgs[rank]["env"]["ALPACA_EXIT_CODE_DIR"], f"rank-{rank}").read_text()
            assert int(recorded) == want, (i, rank, recorded)
            assert res["seconds"] < 30, (i, rank, res["seconds"], log[-4000:])
            if case in ("crash", "loss-not-finite"):
                # The upload in flight (a 120 s one) was stopped, not waited for nor left running.
                assert not running(int(Path(cfgs[rank]["env"]["EXIT_RUN_DIR"], f"upload-pid-{rank}").read_text()))
        failure = Path(cfgs[0]["env"]["ALPACA_FAILURE_FILE"]).read_text()
        if case == "foreign-checkpoint":
            assert "it was written by run run-b, this is run run-a" in failure
        elif case == "bad-data":
            assert "line 2: malformed JSON record" in failure
        elif case == "missing-model":
            assert "no-such-model" in failure
        elif case == "sigterm":
            assert "stopped by SIGTERM at step" in failure
            # 143 means a checkpoint of the step was synced first: both nodes' parts are there.
            step = re.search(r"checkpoint-(\d+) saved", failure).group(1)
            objects = set(keys(s3, inputs["bucket"], f"{case}-{i}/"))
            assert {f"{case}-{i}/checkpoint-{step}/.alpaca-uploaded-node{r}-of-2" for r in (0, 1)} <= objects, objects
        elif case == "crash":
            assert "simulated crash" in Path(cfgs[1]["env"]["ALPACA_FAILURE_FILE"]).read_text()
        elif case == "loss-not-finite":
            assert "loss is nan at step 3" in failure
            # The upload cut off at the exit left no marker: that checkpoint is not complete.
            assert not [k for k in keys(s3, inputs["bucket"], f"{case}-{i}/") if ".alpaca-uploaded" in k]
        elif case == "peer-frozen":
            assert f"tearing down the process group did not finish within {FROZEN_EXIT_TIMEOUT_S}s" in logs[0]
    print(f"{case}: {runs} gangs in {time.monotonic() - t0:.1f}s")

