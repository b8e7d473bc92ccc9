"""The training image's exit codes (docs/contract.md, "Exit codes").

The operator and SageMaker act on them: a permanent code fails the run at once (a retry
cannot fix it), 143 is a disruption (a checkpoint was synced first), anything else is
retried. Each error class carries its code, so the code is decided where the error is.
"""
from __future__ import annotations

import os
from pathlib import Path

OK = 0
RETRYABLE = 1
USAGE = 64       # EX_USAGE: an invalid argument or configuration
DATAERR = 65     # EX_DATAERR: bad input data (unparseable records, no records, bad template)
NOINPUT = 66     # EX_NOINPUT: a model or data that is not there
# The loss became NaN or infinite. Not sysexits' EX_NOUSER, which means nothing in a training
# container: the next free code after the three above. Permanent because the same run
# diverges again from the same checkpoint; the user re-runs it with other settings.
LOSS_NOT_FINITE = 67
LOSS_SPIKE = 68  # a loss spike (guards.py): retried, skipping the spike's steps
TERMINATED = 143  # 128 + SIGTERM: stopped, a checkpoint saved and synced first

# The operator reads these codes from this very file (operator/alpaca_operator/exitcodes.py is
# a link to it, shipped in its wheel and image): keep the module to the standard library.
PERMANENT = frozenset({USAGE, DATAERR, NOINPUT, LOSS_NOT_FINITE})


class ImageError(Exception):
    """An error the image explains in one line; `exit_code` says what the platform should do."""

    exit_code = RETRYABLE


class UsageError(ImageError, ValueError):
    exit_code = USAGE


class MissingInputError(UsageError):
    exit_code = NOINPUT


class LossNotFiniteError(ImageError):
    """The training loss is NaN or infinite: nothing more is saved, the run fails (exit 67)."""

    exit_code = LOSS_NOT_FINITE


class LossSpikeError(ImageError):
    """The loss spiked (guards.py): the attempt ends, the next skips the spike's steps (exit 68)."""

    exit_code = LOSS_SPIKE


class Terminated(ImageError):
    """SIGTERM arrived; raised where nothing is left to save."""

    exit_code = TERMINATED


def code_for(exc: BaseException) -> int:
    return getattr(exc, "exit_code", RETRYABLE)


# alpaca-launch gives each worker a directory where it leaves its exit code, because
# torchrun itself exits 1 whatever its workers' codes were.
CODE_DIR_ENV = "ALPACA_EXIT_CODE_DIR"


def record(code: int, rank: int, env=None) -> None:
    env = os.environ if env is None else env
    d = env.get(CODE_DIR_ENV)
    if not d or code == OK:
        return
    try:
        (Path(d) / f"rank-{rank}").write_text(str(code))
    except OSError:
        pass


def recorded(directory: Path) -> dict[int, int]:
    """Rank -> exit code, for every worker that left one in `directory`."""
    out = {}
    for p in Path(directory).glob("rank-*"):
        try:
            out[int(p.name[5:])] = int(p.read_text().strip())
        except ValueError:
            continue
    return out


def combined(torchrun_rc: int, codes: dict[int, int], terminated: bool) -> int:
    """The launcher's exit code from torchrun's and its workers'.

    A permanent code from any rank wins (lowest rank first), so the reason the operator
    shows is the one that cannot be retried; then a loss spike (every rank stops at the
    same step with it; the operator then skips the spike's steps); then 143 when the stop
    was a SIGTERM (every rank of a stopping gang syncs before exiting 143); else torchrun's
    own code.
    """
    if torchrun_rc == OK:
        return OK
    for rank in sorted(codes):
        if codes[rank] in PERMANENT:
            return codes[rank]
    if LOSS_SPIKE in codes.values():
        return LOSS_SPIKE
    if codes and all(c == TERMINATED for c in codes.values()):
        return TERMINATED
    if terminated and not codes:
        return TERMINATED  # stopped before any worker began (nothing to save)
    return torchrun_rc if torchrun_rc > 0 else RETRYABLE
