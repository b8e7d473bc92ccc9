"""A local SageMaker for tests and the demo: moto's S3 and SageMaker, with what moto lacks.

    .venv/bin/python hack/sagemaker_local/server.py --host 127.0.0.1 --port P \\
        [--execute] [--work-dir DIR] [--step-seconds S]

Without --execute a job walks Starting, Downloading, Training, Uploading, each for
S seconds, to Completed (or as a plan posted to /_standin/plans says). With --execute
it really runs: our image's `train` once per instance (executor.py). README.md in this
directory lists the admin endpoints.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from standin import StandIn  # noqa: E402


def build_app(step_seconds: float, executor=None, seed: int | None = None) -> StandIn:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    return StandIn(DomainDispatcherApplication(create_backend_app), step_seconds, executor, seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--step-seconds", type=float, default=2.0,
                   help="time spent in each SecondaryStatus without --execute (default 2)")
    p.add_argument("--execute", action="store_true", help="run each job's instances for real")
    p.add_argument("--work-dir", type=Path, help="where executed jobs keep their /opt/ml roots")
    p.add_argument("--grace-seconds", type=float, default=120.0,
                   help="StopTrainingJob: SIGKILL this long after SIGTERM (SageMaker: 120)")
    p.add_argument("--train-command", default=None,
                   help="the image's entrypoint (default: `train` beside this Python)")
    p.add_argument("--seed", type=int, default=None, help="seed of the fault-rate dice")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    executor = None
    if args.execute:
        from executor import Executor

        work = args.work_dir or Path(tempfile.mkdtemp(prefix="sagemaker-local-"))
        train = shlex.split(args.train_command) if args.train_command else None
        executor = Executor(work, grace_seconds=args.grace_seconds, train_command=train)
    app = build_app(args.step_seconds, executor, args.seed)

    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from werkzeug.serving import make_server

    server = make_server(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)
    done = threading.Event()

    def shutdown(signum, frame):
        if not done.is_set():
            done.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    print(f"sagemaker-local listening on http://{args.host}:{server.server_port}"
          f"{' (execute)' if executor else ''}", flush=True)
    try:
        server.serve_forever()
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MOTO_ALLOW_NONEXISTENT_REGION", "true")
    sys.exit(main())
