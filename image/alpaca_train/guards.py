"""Safety nets on the training loss (docs/contract.md, "Diverging loss").

- A loss that is not finite (NaN, ±inf) for `--nan_tolerance` optimizer steps running ends
  training with exit 67 (LOSS_NOT_FINITE). No checkpoint is saved at a step whose loss is
  not finite (its weights are what the bad update made), so the newest checkpoint in the
  output is the last good one; the termination message names it. A retry would diverge
  the same way, so the operator does not retry.
- With `--loss_spike_factor F`, a loss above F times the median of the previous
  `--loss_spike_window` steps, for SPIKE_STEPS steps running, ends the attempt with exit 68
  (LOSS_SPIKE). The next attempt gets the spike's steps in $ALPACA_SKIP_STEPS: it resumes
  from the newest checkpoint before them, and drops their batches.

Skipping a step means: its batches are drawn from the data loader as always and thrown
away, with no forward, no backward and no optimizer update, while the step counter and
the learning-rate schedule move on. Every other step sees exactly the batches it would
have seen, in the same order (the data order depends on the seed and the step only).

Every rank takes the same decision at the same step: the step's loss is all-reduced, as
the Trainer's logged loss is, before it is judged.

The trip is reported in one line that the operator parses (the termination message,
SageMaker's FailureReason): `alpaca-loss: kind=KIND first=A last=B checkpoint=C; ...` with
KIND `not-finite` or `spike`, A..B the steps, C the checkpoint to go back to (`none`: the
start). The operator's parser is alpaca_operator.backends.base.parse_loss_failure.
"""
from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass

from transformers import Trainer, TrainerCallback

from .exitcodes import LossNotFiniteError, LossSpikeError, UsageError

log = logging.getLogger(__name__)

DEFAULT_NAN_TOLERANCE = 3       # the CRD's training.nanTolerance default
DEFAULT_SPIKE_WINDOW = 50       # the CRD's training.lossSpike.window default
SPIKE_STEPS = 3                 # steps above the threshold, running, that make a spike
SKIP_STEPS_ENV = "ALPACA_SKIP_STEPS"
MARKER = "alpaca-loss:"
NOT_FINITE, SPIKE = "not-finite", "spike"


# --- step ranges ----------------------------------------------------------------------

@dataclass(frozen=True)
class StepRanges:
    """Inclusive ranges of optimizer steps, written `7-9,20-22` (a single step: `7`)."""

    ranges: tuple[tuple[int, int], ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> "StepRanges":
        out = []
        for part in (text or "").replace(" ", "").split(","):
            if not part:
                continue
            first, sep, last = part.partition("-")
            try:
                a, b = int(first), int(last if sep else first)
            except ValueError:
                raise UsageError(f"{SKIP_STEPS_ENV}: {part!r} is not a step or a range A-B of steps") from None
            if a < 1 or b < a:
                raise UsageError(f"{SKIP_STEPS_ENV}: {part!r} is not a range of steps (1 <= A <= B)")
            out.append((a, b))
        return cls(tuple(sorted(out)))

    def __contains__(self, step: object) -> bool:
        return isinstance(step, int) and any(a <= step <= b for a, b in self.ranges)

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __str__(self) -> str:
        return ",".join(f"{a}-{b}" for a, b in self.ranges)

    def plus(self, first: int, last: int) -> "StepRanges":
        return StepRanges(tuple(sorted(self.ranges + ((first, last),))))


@dataclass(frozen=True)
class FromStep:
    """Step `first` and every later one, and the steps of `also`: the checkpoints a run may
    not go back to once step `first` went wrong (a Container, as outputs takes it)."""

    first: int
    also: StepRanges = StepRanges()

    def __contains__(self, step: object) -> bool:
        return isinstance(step, int) and (step >= self.first or step in self.also)


# --- the test hook --------------------------------------------------------------------

@dataclass(frozen=True)
class ScaleLoss:
    """`--test_scale_loss_at_step K:F` or `K-L:F`: the loss of steps K..L is multiplied by
    F before the backward pass (F may be nan or inf). A test hook: it injects a spike or a
    divergence where a test wants one."""

    first: int
    last: int
    factor: float

    @classmethod
    def parse(cls, text: str | None) -> "ScaleLoss | None":
        if not text:
            return None
        steps, sep, factor = text.partition(":")
        try:
            (a, b), = StepRanges.parse(steps).ranges
            return cls(a, b, float(factor))
        except (ValueError, UsageError):
            raise UsageError(f"--test_scale_loss_at_step {text!r}: expected STEP:FACTOR or FIRST-LAST:FACTOR") from None

    def factor_at(self, step: int) -> float | None:
        return self.factor if self.first <= step <= self.last else None


# --- the decision (pure) --------------------------------------------------------------

@dataclass(frozen=True)
class Trip:
    kind: str           # NOT_FINITE | SPIKE
    first: int          # the first step of the streak
    last: int           # the step it was decided at
    loss: float         # the loss at `last`
    threshold: float | None = None   # SPIKE: F x the median it was compared with


class LossMonitor:
    """Judges each optimizer step's loss; returns a Trip once training must stop."""

    def __init__(self, nan_tolerance: int = DEFAULT_NAN_TOLERANCE, spike_factor: float | None = None,
                 spike_window: int = DEFAULT_SPIKE_WINDOW, spike_steps: int = SPIKE_STEPS):
        if nan_tolerance < 1:
            raise UsageError(f"--nan_tolerance must be at least 1, not {nan_tolerance}")
        if spike_factor is not None and not spike_factor > 1:
            raise UsageError(f"--loss_spike_factor must be above 1, not {spike_factor}")
        if spike_window < 1:
            raise UsageError(f"--loss_spike_window must be at least 1, not {spike_window}")
        self.nan_tolerance = nan_tolerance
        self.spike_factor = spike_factor
        self.spike_steps = spike_steps
        # The baseline: the last `spike_window` finite losses that were not part of a
        # spike, so a long spike cannot raise its own baseline.
        self.window: deque[float] = deque(maxlen=spike_window)
        # Judged steps only: a skipped step neither breaks a streak nor adds to it.
        self.bad_since: int | None = None
        self.bad_count = 0
        self.spike_since: int | None = None
        self.spike_count = 0

    def observe(self, step: int, loss: float) -> Trip | None:
        if not math.isfinite(loss):
            self.bad_since = step if self.bad_since is None else self.bad_since
            self.bad_count += 1
            if self.bad_count >= self.nan_tolerance:
                return Trip(NOT_FINITE, self.bad_since, step, loss)
            return None
        self.bad_since, self.bad_count = None, 0
        threshold = self.threshold()
        if threshold is not None and loss > threshold:
            self.spike_since = step if self.spike_since is None else self.spike_since
            self.spike_count += 1
            if self.spike_count >= self.spike_steps:
                return Trip(SPIKE, self.spike_since, step, loss, threshold)
            return None
        if self.spike_since is not None:
            # Back under the threshold before SPIKE_STEPS: a blip, not a spike.
            self.spike_since, self.spike_count = None, 0
        self.window.append(loss)
        return None

    def threshold(self) -> float | None:
        """F x the median of the window, once the window is full (judging on a few steps
        would trip on the normal noise of the first steps)."""
        if self.spike_factor is None or len(self.window) < self.window.maxlen:
            return None
        return self.spike_factor * statistics.median(self.window)


def failure(trip: Trip, checkpoint: int | None, where: str, skip: StepRanges):
    """The error that ends the process: its message is the termination message."""
    back = f"checkpoint-{checkpoint}" if checkpoint is not None else "the start (no checkpoint before it)"
    steps = f"step {trip.first}" if trip.first == trip.last else f"steps {trip.first}-{trip.last}"
    marker = f"{MARKER} kind={trip.kind} first={trip.first} last={trip.last} checkpoint={checkpoint if checkpoint is not None else 'none'}"
    if trip.kind == NOT_FINITE:
        return LossNotFiniteError(
            f"{marker}; the loss was not finite ({trip.loss}) at {steps}: training stopped without saving. "
            f"The last good checkpoint is {back} in {where}. A retry would diverge again: re-run from it "
            "with a lower learning rate (docs/contract.md, 'Diverging loss')")
    return LossSpikeError(
        f"{marker}; loss spike at {steps}: {trip.loss:.6g} > {trip.threshold:.6g} (the spike factor times "
        f"the median of the previous steps). The next attempt resumes from {back} in {where} and skips "
        f"steps {skip.plus(trip.first, trip.last)}")


# --- the Trainer side -----------------------------------------------------------------

class LossGuard(TrainerCallback):
    """Feeds each step's loss to a LossMonitor and stops training when it says so.

    Goes after GracefulStop among the callbacks: its veto of a save at a non-finite step
    must win over a SIGTERM's request to save.
    """

    def __init__(self, monitor: LossMonitor, skip: StepRanges = StepRanges(), scale: ScaleLoss | None = None,
                 group=None):
        self.monitor = monitor
        self.skip = skip
        self.scale = scale
        self.group = group
        self.trip: Trip | None = None
        self.vetoed: set[int] = set()        # steps whose checkpoint was not saved
        # Since the last log: the trained steps' losses, and whether a step was skipped or
        # not finite (then the Trainer's own figure is wrong: see logged_loss()).
        self._losses: list[float] = []
        self._irregular = False
        self._sum = None

    def add(self, loss) -> None:
        """One micro-batch's loss (as the Trainer accumulates it for its log)."""
        loss = loss.detach()
        self._sum = loss if self._sum is None else self._sum + loss

    def on_step_begin(self, args, state, control, **kwargs):
        self._sum = None

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step in self.skip:
            self._irregular = True
            log.warning("step %d skipped (%s=%s): its batches were dropped, the model was not updated",
                        step, SKIP_STEPS_ENV, self.skip)
            return
        loss = self._global_loss()
        self._losses.append(loss)
        if not math.isfinite(loss):
            self._irregular = True
            # The weights are what this step's update made of a non-finite loss: never
            # save them over the last good checkpoint.
            if control.should_save:
                self.vetoed.add(step)
            control.should_save = False
            log.error("the loss is not finite (%s) at step %d", loss, step)
        trip = self.monitor.observe(step, loss)
        if trip is not None:
            self.trip = trip
            control.should_save = False
            control.should_training_stop = True

    def _global_loss(self) -> float:
        import torch
        import torch.distributed as dist

        value = float(self._sum.item()) if self._sum is not None else float("nan")
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return value
        # One small all-reduce on the CPU control group per step (GracefulStop does the same).
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return float(t.item()) / dist.get_world_size()

    def logged_loss(self) -> tuple[bool, float | None]:
        """(irregular, the mean loss of the steps trained since the last log, None if every
        one was skipped), and a new window begins. Irregular: the Trainer's own figure is
        wrong, as it counts a skipped step as 0 and hides a non-finite loss (its
        logging_nan_inf_filter); else it is the same mean, and stays as it is."""
        out = (self._irregular, sum(self._losses) / len(self._losses) if self._losses else None)
        self._losses, self._irregular = [], False
        return out


class GuardedTrainer(Trainer):
    """The Trainer, with the guard fed from each micro-batch and the skipped steps dropped."""

    def __init__(self, *args, guard: LossGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = guard

    def training_step(self, model, inputs, num_items_in_batch=None):
        import torch

        if self.state.global_step + 1 in self.guard.skip:
            # No forward and no backward: with no gradient the optimizer leaves the weights
            # as they are (and under DeepSpeed the engine does not step at all).
            return torch.zeros((), device=self.args.device)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.guard.add(loss)
        return loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        out = super().compute_loss(model, inputs, *args, **kwargs)
        factor = self.guard.scale.factor_at(self.state.global_step + 1) if self.guard.scale else None
        if factor is None:
            return out
        if isinstance(out, tuple):
            return (out[0] * factor, *out[1:])
        return out * factor

    def log(self, logs, start_time=None):
        if "loss" in logs:
            irregular, loss = self.guard.logged_loss()
            if irregular and loss is None:
                logs.pop("loss")
                logs.pop("grad_norm", None)
            elif irregular:
                logs["loss"] = loss
        super().log(logs, start_time)
