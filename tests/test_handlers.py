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
