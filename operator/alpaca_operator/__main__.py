"""`python -m alpaca_operator` (or `alpaca-operator`): run the operator with kopf.

Locally, against $KUBECONFIG:       python -m alpaca_operator            (standalone)
In a cluster with several replicas: python -m alpaca_operator --peering alpaca-operator

The same as `kopf run -m alpaca_operator.handlers` with the flags below. With --peering,
replicas see each other through the ClusterKopfPeering object of that name
(manifests/peering/) and only the one with the highest priority acts; the others pause
until it is gone. Each replica picks a random priority unless --priority is given
(kopf pauses *all* operators of equal priority).
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import random
import sys


def priority_from_ip(ip: str | None) -> int | None:
    """A peering priority that no other live replica has: its pod IP as a number (kopf
    pauses every replica of equal priority, which random ones cannot rule out)."""
    try:
        return int(ipaddress.ip_address(ip or "")) % (2 ** 62) + 1
    except ValueError:
        return None


class AskedRetryIsAWarning(logging.Filter):
    """kopf logs every request it retries at ERROR, even one the API server asked it to
    retry: a 429 (API Priority and Fairness, or "storage is (re)initializing" while a CRD
    just installed fills its watch cache, which every fresh `helm install` met). That is a
    WARNING; a request kopf gives up on ("escalating") stays an ERROR, as do other retries."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and record.name.startswith("kopf."):
            message = record.getMessage()
            if "; will retry: " in message and "APITooManyRequestsError(" in message:
                record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        return True


def configure_logging(verbose: bool, debug: bool) -> None:
    import kopf
    kopf.configure(verbose=verbose, debug=debug)
    for handler in logging.getLogger().handlers:
        handler.addFilter(AskedRetryIsAWarning())
    if not (verbose or debug):
        # One line per watch event ("Handler ... succeeded") and per probe is noise at scale.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="alpaca-operator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--namespace", action="append", default=[],
                   help="watch only this namespace (repeatable); default: all namespaces")
    p.add_argument("--peering", default=os.environ.get("ALPACA_PEERING") or None,
                   help="ClusterKopfPeering name to coordinate replicas; default: standalone")
    p.add_argument("--priority", type=int, default=None,
                   help="peering priority (highest acts); default: random")
    p.add_argument("--liveness", default=os.environ.get("ALPACA_LIVENESS") or None,
                   help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("ALPACA_METRICS_PORT") or 0),
                   help="serve Prometheus metrics on this port (/metrics); default: off")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)

    # kopf imports the kubernetes client, when installed, only to recognise its model classes;
    # this operator hands kopf plain dicts, and the import costs 58 MiB and two seconds of
    # start-up. kube.login() lifts the block if a kubeconfig needs the client's exec plugins.
    # Here, not on import: a process that imports this module for priority_from_ip (the
    # tests) would lose the client for good.
    sys.modules.setdefault("kubernetes", None)  # type: ignore[arg-type]
    import kopf

    from . import handlers, metrics  # noqa: F401  (registers the handlers)
    metrics.serve(args.metrics_port)

    configure_logging(args.verbose, args.debug)
    priority = args.priority if args.priority is not None else priority_from_ip(os.environ.get("POD_IP"))
    if args.peering and priority is None:
        priority = random.SystemRandom().randint(1, 1_000_000)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=priority or 0,
        liveness_endpoint=args.liveness,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
