"""Checkpoints and the final model in S3: sync as saved, resume, manifest last.

Layout under the output URI (docs/contract.md): `checkpoint-STEP/` directories as the
Trainer writes them, the consolidated model at the root, and `manifest.json`, uploaded
last, whose presence means the upload is complete.

Each pod of a multi-node gang has its own disk, and each writes its own ranks' ZeRO
shards, so the first process of every node uploads its node's part of a checkpoint and
then a marker object; a checkpoint counts as present once every node's marker is there.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from .data import file_sha256
from .s3io import S3Error, S5cmd, join

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
    def is_node_main(self) -> bool:
        return self.local_rank == 0

    @property
    def is_global_main(self) -> bool:
        return self.rank == 0


def remote_checkpoints(uri: str, s5: S5cmd) -> dict[int, bool]:
    """Step -> complete (every node's marker present) for each checkpoint under `uri`."""
    nodes: dict[int, set[int]] = {}
    want: dict[int, int] = {}
    for key in s5.list(uri):
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


def restore_latest_checkpoint(uri: str, output_dir: Path, s5: S5cmd) -> Path | None:
    """Download the newest complete checkpoint under `uri` into `output_dir` (once per node)."""
    found = remote_checkpoints(uri, s5)
    complete = sorted(step for step, ok in found.items() if ok)
    incomplete = sorted(step for step, ok in found.items() if not ok and (not complete or step > complete[-1]))
    if incomplete:
        log.warning("ignoring incomplete checkpoint(s) in %s: %s", uri, ", ".join(f"checkpoint-{s}" for s in incomplete))
    if not complete:
        return None
    step = complete[-1]
    local = output_dir / f"checkpoint-{step}"
    done = output_dir / f".checkpoint-{step}.restored"
    if not done.exists():
        log.warning("resuming from %s", join(uri, f"checkpoint-{step}"))
        s5.download_prefix(join(uri, f"checkpoint-{step}"), local)
        done.write_text(uri)
    return local


class CheckpointSyncCallback(TrainerCallback):
    """Uploads each checkpoint as soon as it is saved; mirrors the Trainer's rotation."""

    def __init__(self, uri: str, s5: S5cmd, topology: Topology):
        self.uri = uri
        self.s5 = s5
        self.topo = topology
        self.uploaded: list[int] = []

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        # Every rank writes its own shard and RNG state: wait for all of them.
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if not self.topo.is_node_main:
            return
        step = state.global_step
        ckpt = Path(args.output_dir) / f"checkpoint-{step}"
        if not ckpt.is_dir():
            raise S3Error(f"checkpoint {ckpt} was not written on this node; cannot upload it")
        remote = join(self.uri, f"checkpoint-{step}")
        self.s5.sync_up(ckpt, remote)
        marker = ckpt.parent / f".marker-{step}-{self.topo.node}"
        marker.write_text(json.dumps({"node": self.topo.node, "nnodes": self.topo.nnodes, "step": step}))
        self.s5.upload_file(marker, join(remote, marker_name(self.topo.node, self.topo.nnodes)))
        marker.unlink()
        self.uploaded.append(step)
        log.info("checkpoint-%d uploaded to %s", step, remote)
        if self.topo.is_global_main:
            self._prune(Path(args.output_dir), step)
        else:
            # The Trainer rotates checkpoints on the global main process only, so other
            # nodes' disks would fill up; their part is safe in S3 now.
            shutil.rmtree(ckpt, ignore_errors=True)

    def _prune(self, output_dir: Path, newest: int) -> None:
        # The Trainer deleted older checkpoints locally (save_total_limit); delete them in
        # S3 too, but only ones older than the newest complete upload.
        local = {int(m.group(1)) for p in output_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name))}
        for step in sorted(remote_checkpoints(self.uri, self.s5)):
            if step < newest and step not in local:
                self.s5.remove_prefix(join(self.uri, f"checkpoint-{step}"))
                log.info("removed rotated checkpoint-%d from %s", step, self.uri)


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
