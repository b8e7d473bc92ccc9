"""Checkpoints and the final model in S3: sync as saved, resume, manifest last.

Layout under the output URI (docs/contract.md): `checkpoint-STEP/` directories as the
Trainer writes them, the consolidated model at the root, and `manifest.json`, uploaded
last, whose presence means the upload is complete.

Each pod of a multi-node gang has its own disk, and each writes its own ranks' ZeRO
shards, so the first process of every node uploads its node's part of a checkpoint and
then a marker object; a checkpoint counts as present once every node's marker is there.
Each checkpoint carries `alpaca-checkpoint.json`, the identity of the run that wrote it;
rank 0 alone chooses the step to resume from, and each node downloads only the shared
files and its own ranks' shards.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Container

from transformers import TrainerCallback

from .data import file_sha256
from .exitcodes import UsageError
from .s3io import S3Error, S3NotFound, S5cmd, join

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MARKER_RE = re.compile(r"^\.alpaca-uploaded-node(\d+)-of-(\d+)$")
MANIFEST = "manifest.json"


def marker_name(node: int, nnodes: int) -> str:
    return f".alpaca-uploaded-node{node}-of-{nnodes}"


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @classmethod
    def from_env(cls, env=None) -> "Topology":
        env = os.environ if env is None else env
        world = int(env.get("WORLD_SIZE", "1"))
        # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
        local_world = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world)
        return cls(int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), world, local_world)

    @property
    def node(self) -> int:
        return self.rank // self.local_world_size

    @property
    def nnodes(self) -> int:
        return max(1, self.world_size // self.local_world_size)

    @property
    def node_ranks(self) -> range:
        return range(self.node * self.local_world_size, (self.node + 1) * self.local_world_size)

    @property
    def is_node_main(self) -> bool:
        return self.local_rank == 0

    @property
    def is_global_main(self) -> bool:
        return self.rank == 0


def remote_checkpoints(uri: str, s5: S5cmd, listing: list[str] | None = None) -> dict[int, bool]:
    """Step -> complete (every node's marker present) for each checkpoint under `uri`."""
    nodes: dict[int, set[int]] = {}
    want: dict[int, int] = {}
    for key in s5.list(uri) if listing is None else listing:
        parts = key.split("/")
        m = CHECKPOINT_RE.match(parts[0])
        if not m or len(parts) < 2:
            continue
        step = int(m.group(1))
        nodes.setdefault(step, set())
        if len(parts) == 2 and (mk := MARKER_RE.match(parts[1])):
            nodes[step].add(int(mk.group(1)))
            want[step] = int(mk.group(2))
    return {step: step in want and nodes[step] >= set(range(want[step])) for step in nodes}


# --- which run a checkpoint belongs to --------------------------------------------------

IDENTITY = "alpaca-checkpoint.json"


@dataclass(frozen=True)
class CheckpointIdentity:
    """Who wrote a checkpoint, and the settings a resume must share with it.

    `run_uid` is the operator's (ALPACA_RUN_UID: the AlpacaFineTune's metadata.uid);
    without it the output URI and the settings' fingerprint identify the run.
    """

    run_uid: str | None
    output_uri: str | None
    settings: dict

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.settings)

    def to_json(self) -> str:
        return json.dumps({"run_uid": self.run_uid, "output_uri": self.output_uri, "settings": self.settings,
                           "fingerprint": self.fingerprint}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "CheckpointIdentity":
        obj = json.loads(text)
        return cls(obj.get("run_uid"), obj.get("output_uri"), obj.get("settings") or {})

    def mismatch(self, theirs: "CheckpointIdentity") -> str | None:
        """Why a checkpoint written by `theirs` cannot be resumed by this run; None if it can."""
        if self.run_uid and theirs.run_uid and self.run_uid != theirs.run_uid:
            return f"it was written by run {theirs.run_uid}, this is run {self.run_uid}"
        diffs = [f"{k} {theirs.settings.get(k)!r} there, {self.settings.get(k)!r} here"
                 for k in sorted(set(self.settings) | set(theirs.settings))
                 if self.settings.get(k) != theirs.settings.get(k)]
        if diffs:
            return "its settings differ: " + "; ".join(diffs)
        return None


class ForeignCheckpointError(UsageError):
    """The output URI holds checkpoints another run wrote."""


def _refusal(where: str, why: str) -> str:
    return (f"refusing to resume from {where}: {why}. The output URI holds another run's checkpoints; "
            "choose another output URI, or delete those checkpoints to start over (nothing was deleted)")


def read_identity(uri: str, step: int, s5: S5cmd, tmp_dir: Path) -> CheckpointIdentity | None:
    dest = tmp_dir / f".identity-{os.getpid()}-{step}.json"
    try:
        s5.download_file(join(uri, f"checkpoint-{step}", IDENTITY), dest)
    except S3NotFound:
        return None
    try:
        return CheckpointIdentity.from_json(dest.read_text())
    except (json.JSONDecodeError, AttributeError):
        return None
    finally:
        dest.unlink(missing_ok=True)


def newest_allowed(steps, exclude: Container[int] = ()) -> int | None:
    """The newest of `steps` that is not in `exclude` (the steps of a skipped loss spike)."""
    return max((s for s in steps if s not in exclude), default=None)


def plan_remote_resume(uri: str, s5: S5cmd, identity: CheckpointIdentity, tmp_dir: Path,
                       exclude: Container[int] = (), discard_foreign: bool = False) -> int | None:
    """The step every rank resumes from (rank 0 alone decides; None: start afresh).

    Incomplete checkpoints newer than it are leftovers of an attempt that died while
    uploading; they are deleted so that this attempt's own upload of the same step can
    never be completed by a stale marker. So are complete ones newer than it in `exclude`
    (saved during a loss spike that this attempt skips): never resumed, they would only
    stand in the way of the rotation, which keeps whatever is behind the newest complete
    checkpoint. A checkpoint of another run is refused, or deleted where the user asked to
    overwrite the output (discard_foreign).
    """
    listing = s5.list(uri)
    if discard_foreign:
        for step in remote_checkpoints(uri, s5, listing):
            theirs = read_identity(uri, step, s5, tmp_dir)
            why = "no identity" if theirs is None else identity.mismatch(theirs)
            if why:
                log.warning("deleting %s (%s), as --overwrite_output asks", join(uri, f"checkpoint-{step}"), why)
                s5.remove_prefix(join(uri, f"checkpoint-{step}"))
        listing = s5.list(uri)
    found = remote_checkpoints(uri, s5, listing)
    newest = newest_allowed((step for step, ok in found.items() if ok), exclude)
    for step in sorted(s for s in found if newest is None or s > newest):
        theirs = read_identity(uri, step, s5, tmp_dir)
        if theirs is not None and (why := identity.mismatch(theirs)):
            raise ForeignCheckpointError(_refusal(join(uri, f"checkpoint-{step}"), why))
        log.warning("deleting %s (%s)", join(uri, f"checkpoint-{step}"),
                    "saved during a loss spike that this attempt skips" if found[step]
                    else "incomplete: not every node uploaded its part")
        s5.remove_prefix(join(uri, f"checkpoint-{step}"))
    if newest is None:
        return None
    where = join(uri, f"checkpoint-{newest}")
    theirs = read_identity(uri, newest, s5, tmp_dir)
    if theirs is None:
        raise ForeignCheckpointError(_refusal(where, f"it has no {IDENTITY}, so nothing says which run wrote it"))
    if why := identity.mismatch(theirs):
        raise ForeignCheckpointError(_refusal(where, why))
    return newest


def local_checkpoints(output_dir: Path) -> list[int]:
    if not output_dir.is_dir():
        return []
    return [int(m.group(1)) for p in output_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]


def plan_local_resume(output_dir: Path, identity: CheckpointIdentity, exclude: Container[int] = ()) -> int | None:
    """The newest checkpoint already on disk (SageMaker restores /opt/ml/checkpoints)."""
    step = newest_allowed(local_checkpoints(output_dir), exclude)
    if step is None:
        return None
    last = str(output_dir / f"checkpoint-{step}")
    path = Path(last) / IDENTITY
    if not path.is_file():
        raise ForeignCheckpointError(_refusal(last, f"it has no {IDENTITY}, so nothing says which run wrote it"))
    if why := identity.mismatch(CheckpointIdentity.from_json(path.read_text())):
        raise ForeignCheckpointError(_refusal(last, why))
    return step


def last_checkpoint(output_uri: str | None, output_dir: Path, s5: S5cmd, exclude: Container[int] = ()) -> int | None:
    """The newest complete checkpoint not in `exclude`, in the output URI or else on disk."""
    if output_uri:
        return newest_allowed((step for step, ok in remote_checkpoints(output_uri, s5).items() if ok), exclude)
    return newest_allowed(local_checkpoints(output_dir), exclude)


# ZeRO shards and RNG states are per rank; everything else in a checkpoint is shared.
RANK_FILE_RE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_|^rng_state_(\d+)\.pth$")


def file_rank(name: str) -> int | None:
    m = RANK_FILE_RE.search(name)
    return int(m.group(1) or m.group(2)) if m else None


def files_for_node(keys: list[str], ranks: range) -> list[str]:
    """The keys of a checkpoint one node needs: the shared files and its own ranks' files."""
    out = []
    for key in keys:
        name = key.rsplit("/", 1)[-1]
        if MARKER_RE.match(name):
            continue
        rank = file_rank(name)
        if rank is None or rank in ranks:
            out.append(key)
    return out


def restore_checkpoint(uri: str, step: int, output_dir: Path, s5: S5cmd, topo: Topology, *,
                       all_shards: bool = False) -> Path:
    """Download checkpoint `step` for this node (its node-main process calls this).

    `all_shards`: DeepSpeed's elastic checkpoints need every rank's optimizer shard.
    """
    remote = join(uri, f"checkpoint-{step}")
    local = output_dir / f"checkpoint-{step}"
    done = output_dir / f".checkpoint-{step}.restored"
    if done.exists() and done.read_text() == remote:
        return local
    keys = s5.list(remote)
    ranks = range(0, 1 << 30) if all_shards else topo.node_ranks
    wanted = files_for_node(keys, ranks)
    if not wanted:
        raise S3Error(f"{remote} is empty: it was deleted after rank 0 chose it")
    if local.exists():
        shutil.rmtree(local)
    log.warning("resuming from %s (%d of its %d files for ranks %d-%d)", remote, len(wanted), len(keys),
                ranks.start, min(ranks.stop, topo.world_size) - 1)
    s5.download_files([(join(remote, k), local / k) for k in wanted], what=f"download of {remote}")
    done.write_text(remote)
    return local


def check_restored(ckpt: Path, topo: Topology) -> None:
    """Every rank loads the chosen step, or the run stops here with the reason."""
    if not ckpt.is_dir():
        raise S3Error(f"rank {topo.rank}: {ckpt} is not on this node; every rank must resume from the same step")
    names = [p.name for p in ckpt.rglob("*") if p.is_file()]
    ranked = {r for n in names if (r := file_rank(n)) is not None}
    if ranked and topo.rank not in ranked and topo.world_size > 1:
        raise S3Error(f"rank {topo.rank}: {ckpt} holds no ZeRO shard or RNG state of this rank "
                      f"(it has ranks {sorted(ranked)}): it was written by a gang of another size")


def choose_resume(identity: CheckpointIdentity, output_uri: str | None, output_dir: Path, topo: Topology,
                  s5: S5cmd, group=None, *, all_shards: bool = False, exclude: Container[int] = (),
                  discard_foreign: bool = False) -> str | None:
    """One decision for the whole gang: rank 0 picks the step, every rank loads it.

    Called by every rank once the process group exists. Without an output URI the
    checkpoints on disk count (SageMaker restores /opt/ml/checkpoints). `exclude`: steps
    never resumed from (those of a skipped loss spike).
    """
    from .stopping import decided_by_rank0

    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    if output_uri:
        step = decided_by_rank0(lambda: plan_remote_resume(output_uri, s5, identity, tmp, exclude, discard_foreign),
                                group)
    else:
        step = decided_by_rank0(lambda: plan_local_resume(output_dir, identity, exclude), group)
    if step is None:
        return None
    ckpt = output_dir / f"checkpoint-{step}"
    if output_uri:
        try:
            if topo.is_node_main:
                restore_checkpoint(output_uri, step, output_dir, s5, topo, all_shards=all_shards)
        finally:
            barrier(group)  # the node's other ranks read what its first rank downloaded
    else:
        log.warning("resuming from %s", ckpt)
    check_restored(ckpt, topo)
    return str(ckpt)


# --- uploads ---------------------------------------------------------------------------

STAGING = ".alpaca-upload"


def _stage(ckpt: Path, staging: Path) -> Path:
    """A hard-linked copy the Trainer's rotation cannot delete from under the upload."""
    if staging.exists():
        shutil.rmtree(staging)
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(ckpt, staging, copy_function=os.link)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(ckpt, staging)
    return staging


class CheckpointSyncCallback(TrainerCallback):
    """Uploads each checkpoint in the background as soon as it is saved.

    At most one upload is in flight per node: a save waits for the previous upload, so
    the gang stalls only when uploads are slower than saves. `finish()` waits for the
    last one. The Trainer's rotation is mirrored in S3 only behind a step that every node
    has uploaded, so a gang killed mid-upload always leaves a complete checkpoint.
    """

    def __init__(self, uri: str, s5: S5cmd, topology: Topology, identity: CheckpointIdentity | None = None,
                 group=None):
        self.uri = uri
        self.s5 = s5
        self.topo = topology
        self.identity = identity
        self.group = group
        self.uploaded: list[int] = []
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def on_save(self, args, state, control, **kwargs):
        # Every rank writes its own shard and RNG state: wait for all of them.
        barrier(self.group)
        if not self.topo.is_node_main:
            return
        self.wait()
        step = state.global_step
        output_dir = Path(args.output_dir)
        ckpt = output_dir / f"checkpoint-{step}"
        if not ckpt.is_dir():
            raise S3Error(f"checkpoint {ckpt} was not written on this node; cannot upload it")
        if self.identity is not None:
            write_identity(ckpt, self.identity)
        staged = _stage(ckpt, output_dir / STAGING / ckpt.name)
        if not self.topo.is_global_main:
            # The Trainer rotates checkpoints on the global main process only, so other
            # nodes' disks would fill up; their part is staged for upload now.
            shutil.rmtree(ckpt, ignore_errors=True)
        self._thread = threading.Thread(target=self._upload, args=(staged, step, output_dir),
                                        name=f"upload-checkpoint-{step}", daemon=True)
        self._thread.start()

    def _upload(self, staged: Path, step: int, output_dir: Path) -> None:
        try:
            remote = join(self.uri, f"checkpoint-{step}")
            self.s5.sync_up(staged, remote)
            marker = staged.parent / f".marker-{step}-{self.topo.node}"
            marker.write_text(json.dumps({"node": self.topo.node, "nnodes": self.topo.nnodes, "step": step}))
            self.s5.upload_file(marker, join(remote, marker_name(self.topo.node, self.topo.nnodes)))
            marker.unlink()
            shutil.rmtree(staged, ignore_errors=True)
            self.uploaded.append(step)
            log.info("checkpoint-%d uploaded to %s", step, remote)
            if self.topo.is_global_main:
                self.prune(output_dir)
        except BaseException as e:  # noqa: BLE001 - reported by wait(), in the training thread
            self._error = e

    def wait(self) -> None:
        """Block until the upload in flight is done; raise its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err if isinstance(err, S3Error) else S3Error(f"checkpoint upload failed: {err}")

    finish = wait

    def abandon(self, timeout_s: float = 10.0) -> None:
        """The process is ending on a failure: stop the upload in flight where it is.

        Its s5cmd is stopped and no marker follows, so that checkpoint stays incomplete in
        S3 and the next attempt deletes it; waiting for it could take longer than the
        platform gives a failing pod, for a checkpoint the other nodes may not complete.
        """
        self.s5.cancel()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def prune(self, output_dir: Path) -> None:
        # The Trainer deleted older checkpoints locally (save_total_limit); delete them in
        # S3 too, but only behind the newest checkpoint that every node has uploaded.
        found = remote_checkpoints(self.uri, self.s5)
        complete = [step for step, ok in found.items() if ok]
        if not complete:
            return
        newest = max(complete)
        local = {int(m.group(1)) for p in output_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name))}
        for step in sorted(found):
            if step < newest and step not in local:
                self.s5.remove_prefix(join(self.uri, f"checkpoint-{step}"))
                log.info("removed rotated checkpoint-%d from %s", step, self.uri)


def write_identity(ckpt: Path, identity: CheckpointIdentity) -> None:
    (ckpt / IDENTITY).write_text(identity.to_json())


class IdentityCallback(TrainerCallback):
    """Without an output URI: still record which run wrote each checkpoint on disk."""

    def __init__(self, identity: CheckpointIdentity):
        self.identity = identity

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.local_process_index == 0 and ckpt.is_dir():
            write_identity(ckpt, self.identity)


def barrier(group=None) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def model_files(final_dir: Path) -> list[Path]:
    """The files of the final model: everything at the root except checkpoints and our markers."""
    out = []
    for p in sorted(final_dir.rglob("*")):
        rel = p.relative_to(final_dir)
        if not p.is_file() or CHECKPOINT_RE.match(rel.parts[0]) or rel.parts[0].startswith(".") or rel.name == MANIFEST:
            continue
        out.append(p)
    return out


def build_manifest(final_dir: Path, output_uri: str | None, info: dict) -> dict:
    files = [
        {"path": str(p.relative_to(final_dir)), "size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in model_files(final_dir)
    ]
    return {
        "format": 1,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "output_uri": output_uri,
        "files": files,
        **info,
    }


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def finished_run(uri: str, s5: S5cmd, tmp_dir: Path) -> dict | None:
    """The manifest of a finished run already under `uri`, if any."""
    if MANIFEST not in s5.list(uri):
        return None
    path = s5.download_file(join(uri, MANIFEST), tmp_dir / f"existing-{os.getpid()}-{MANIFEST}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    finally:
        path.unlink(missing_ok=True)


def upload_final(final_dir: Path, uri: str, s5: S5cmd, manifest: dict) -> None:
    """Upload the model files, then the manifest: never a manifest for a partial upload."""
    s5.upload_files(
        [(final_dir / f["path"], join(uri, f["path"])) for f in manifest["files"]],
        what=f"upload of the model in {final_dir} to {uri}",
    )
    path = final_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    s5.upload_file(path, join(uri, MANIFEST))
