"""How a process of the image ends: with the contract's exit code, whatever threads are alive.

Ending the way Python does by itself (`sys.exit`, the end of `__main__`) finalizes the
interpreter while other threads still run, and that can turn any exit code into SIGABRT.
The case we hit: rank 0 refuses a foreign checkpoint, broadcasts the error, and every
rank exits 64 at once. gloo's worker thread (`ProcessGroupGloo::runLoop`) is still
destroying the broadcast's work object, whose tensor holds a Python object; dropping it
takes the GIL, and a thread that takes the GIL of a finalizing interpreter is made to exit
(`pthread_exit`). That forced unwind runs into the work's noexcept C++ destructor,
`std::terminate` is called ("terminate called without an active exception"), and the
process dies by SIGABRT (-6): a retryable crash to the operator instead of a permanent
configuration error. It lost the race about half the time.

So every exit path does the same, in this order:

1. record the code for `alpaca-launch` (torchrun's own code says nothing), first, so that
   even a process killed while ending leaves the right one;
2. stop our background threads (the checkpoint upload, through `on_exit`), bounded;
3. tear the process group down, so no gloo/NCCL thread is left to call into Python;
   bounded, because a dead or frozen peer can block it (NCCL's abort, gloo's pending work);
4. flush the logs and stdio (the failure file is written and closed already);
5. `os._exit(code)`: no interpreter finalization and no C++ static destructors, so
   nothing still running can change the code. `atexit` handlers do not run: what we
   relied on them for (logging's flush, the code record) is done above.

`finish` does 1-3 and returns the code, so that `main()` stays callable in-process (the
tests do); `run_and_exit`, the console scripts' and `python -m`'s entry, does 4-5.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
from typing import Callable, NoReturn

from . import exitcodes

log = logging.getLogger(__name__)

# Seconds each step of the ending may take (a stop of the uploader, the process group's
# teardown). A healthy gang needs milliseconds; the bound only matters when a peer is dead.
TIMEOUT_ENV = "ALPACA_EXIT_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 30.0

_on_exit: list[tuple[str, Callable[[], object]]] = []


def timeout_s() -> float:
    try:
        return max(0.0, float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def on_exit(what: str, fn: Callable[[], object]) -> None:
    """Run `fn` (bounded) when the process ends, before the process group is torn down."""
    _on_exit.append((what, fn))


def bounded(what: str, fn: Callable[[], object], seconds: float) -> bool:
    """Run fn in a daemon thread for at most `seconds`; False if it did not return in time.

    A thread, not a signal alarm, because what blocks is C++ (a collective waiting for a
    dead peer) that no Python exception can interrupt; the process exits without it.
    """
    errors: list[BaseException] = []

    def target():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - the ending goes on whatever fails
            errors.append(e)

    t = threading.Thread(target=target, name=f"alpaca-exit: {what}", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        log.warning("%s did not finish within %.0fs; exiting without waiting for it", what, seconds)
        return False
    if errors:
        log.warning("%s failed (exiting anyway): %s: %s", what, type(errors[0]).__name__, errors[0])
    return True


def leave_process_group(seconds: float) -> bool:
    """Destroy every process group this process still holds, bounded; True once none is left."""
    if "torch.distributed" not in sys.modules:
        return True  # never imported here (alpaca-launch, the SageMaker entrypoint): nothing to tear down
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    # Every backend is shut down and its worker threads joined: none is left to call into
    # a finalizing interpreter, and the peers see the connections close.
    return bounded("tearing down the process group", dist.destroy_process_group, seconds)


def finish(code: int, rank: int | None = None) -> int:
    """Record `code`, stop the background threads, leave the process group; return `code`.

    Idempotent: a second call finds nothing left to do.
    """
    if rank is not None:
        exitcodes.record(code, rank)
    seconds = timeout_s()
    while _on_exit:
        what, fn = _on_exit.pop()
        bounded(what, fn, seconds)
    leave_process_group(seconds)
    return code


def exit_now(code: int) -> NoReturn:
    """Flush the logs and stdio, then end the process with exactly `code`."""
    if threading.current_thread() is threading.main_thread():
        # The code is decided: a SIGTERM now (a pod deleted while failing) must not make it -15.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(code if isinstance(code, int) and 0 <= code <= 255 else exitcodes.RETRYABLE)


def _system_exit_code(e: SystemExit) -> int:
    if e.code is None:
        return exitcodes.OK
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)  # what Python itself does with sys.exit("message")
    return exitcodes.RETRYABLE


def run_and_exit(main: Callable[[], int], rank: int | None = None) -> NoReturn:
    """A process's entry: run `main`, then end with its code whatever is still running.

    `main` is expected to end things itself (`finish`); if it raised instead (argparse's
    `--help` exits through SystemExit, a KeyboardInterrupt, a bug in the ending itself),
    the ending happens here.
    """
    try:
        code = main()
    except SystemExit as e:
        code = finish(_system_exit_code(e), rank)
    except BaseException:  # noqa: BLE001 - a crash is exit 1 (retryable), never an abort
        traceback.print_exc()
        code = finish(exitcodes.RETRYABLE, rank)
    exit_now(code)
