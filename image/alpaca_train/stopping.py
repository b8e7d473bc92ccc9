"""SIGTERM (a spot reclaim, a drain, StopTrainingJob, a delete): save, sync, exit 143.

The signal may reach one node of a gang only, and a DeepSpeed save is collective, so the
ranks agree at every optimizer step (one all-reduce of a flag on the CPU control group)
and all of them stop after the same step, with a checkpoint of it.
"""
from __future__ import annotations

import logging
import signal

from transformers import TrainerCallback

from .exitcodes import Terminated

log = logging.getLogger(__name__)


class GracefulStop(TrainerCallback):
    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None
        self.group = None
        # starting: nothing to save yet, so the signal ends the process at once;
        # training: finish the step, save and stop; finishing: let the final upload end;
        # ending: the exit code is decided, and the process is on its way out.
        self.phase = "starting"

    def install(self) -> "GracefulStop":
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def uninstall(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def ending(self) -> None:
        """From now on a SIGTERM changes nothing: an exception raised from the handler
        would interrupt the ending (the uploader's stop, the process group's teardown)."""
        self.phase = "ending"

    def _on_signal(self, signum, frame):
        self.requested = True
        if self.phase == "ending":
            log.warning("SIGTERM: already exiting")
            return
        if self.phase == "starting":
            raise Terminated("stopped by SIGTERM before training began: nothing to save")
        log.warning("SIGTERM: saving a checkpoint after this step, then stopping")

    def on_train_begin(self, args, state, control, **kwargs):
        self.phase = "training"

    def on_step_end(self, args, state, control, **kwargs):
        if self._anyone_stopping():
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self.phase = "finishing"

    def _anyone_stopping(self) -> bool:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())


def control_group():
    """A gloo group for small CPU-side agreements (the resume step, the stop flag).

    With NCCL as the training backend they would otherwise need a GPU tensor and a
    device sync at every step.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def decided_by_rank0(fn, group=None):
    """Rank 0 computes fn(); every rank gets its result or raises its error."""
    import torch.distributed as dist

    from .exitcodes import ImageError
    from .s3io import S3Error

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except ImageError as e:
            box[0] = ("error", type(e), str(e))
        except Exception as e:  # noqa: BLE001 - the other ranks must not wait forever
            box[0] = ("error", S3Error, f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0, group=group)
    if box[0][0] == "error":
        raise box[0][1](box[0][2])
    return box[0][1]
