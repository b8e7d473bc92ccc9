"""The kopf handlers' set-up: what the operator leaves out of kopf's machinery must stay unused."""
from __future__ import annotations

import kopf

from alpaca_operator import handlers


def test_no_handler_reads_the_diffbase_that_is_left_empty():
    """NoDiffBase skips kopf's deep copy of every event's body; only change-detecting
    handlers and daemons read it, so the operator must have only watching handlers."""
    registry = kopf.get_default_registry()
    assert not list(registry._changing.get_all_handlers())
    assert not list(registry._spawning.get_all_handlers())
    watched = sorted(h.fn.__name__ for h in registry._watching.get_all_handlers())
    assert watched == ["finetune_event", "job_event"]
    body = kopf.Body({"metadata": {"name": "x", "managedFields": [{"manager": "m"}]}, "spec": {"a": 1}})
    assert handlers.NoDiffBase().build(body=body) == {} and handlers.NoDiffBase().fetch(body=body) is None


def test_the_echo_of_an_own_write_never_replaces_a_later_own_write():
    from alpaca_operator.cache import Cache
    from alpaca_operator.reconciler import Reconciler

    r = Reconciler(None, {}, Cache())
    r._state(("ns", "a")).written.extend(["5", "7"])
    assert r.is_stale_echo("ns", "a", "5", "7")            # our 7's reply came before 5's echo
    assert not r.is_stale_echo("ns", "a", "7", "5")        # the echo of the later write
    assert not r.is_stale_echo("ns", "a", "6", "7")        # someone else's change: the watch's newest
    assert not r.is_stale_echo("ns", "a", "7", "6")        # the cache holds a foreign body: ours is newer
    assert not r.is_stale_echo("ns", "b", "5", "7")        # nothing written for that run
