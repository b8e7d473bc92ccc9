"""The Kueue part of `bench/operator_bench.py` (issue 18) without a cluster: how the most runs
at once are counted from watch events, the verdict on the Kueue-installed case, how Kueue's
requests are counted in the audit log, and where --write-docs puts the "### Kueue" part of
docs/benchmarks.md (the shape of the docs: the Operator section keeps its sub-parts).
"""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("operator_bench_under_test", ROOT / "bench" / "operator_bench.py")
ob = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ob)


def test_runs_at_once_counts_every_event_and_ends_on_finish_or_delete():
    c = ob.Concurrency()
    c.pod("ADDED", "a-0", "a", "Pending")
    c.pod("MODIFIED", "a-0", "a", "Running")
    c.pod("ADDED", "b-0", "b", "Pending")
    c.pod("ADDED", "b-1", "b", "Pending")        # a second pod of a run is the same run
    assert c.peak_runs == 2
    c.pod("MODIFIED", "a-0", "a", "Succeeded")
    c.pod("DELETED", "b-0", "b", "Running")      # deleted while it ran: it ends there
    c.pod("ADDED", "c-0", "c", "Pending")
    assert c.peak_runs == 2                       # b still holds b-1
    c.pod("DELETED", "b-1", "b", "Pending")
    c.pod("ADDED", "d-0", "d", "Pending")
    c.pod("ADDED", "e-0", "e", "Running")
    assert c.peak_runs == 3 and {r for r, p in c.live.items() if p} == {"c", "d", "e"}


def test_workloads_hold_quota_from_reservation_until_finished_or_deleted():
    c = ob.Concurrency()
    c.workload("ADDED", "w1", "", "")
    assert c.peak_reserved == 0
    c.workload("MODIFIED", "w1", "True", "")
    c.workload("MODIFIED", "w2", "True", "")
    c.workload("MODIFIED", "w1", "True", "True")
    c.workload("MODIFIED", "w3", "True", "")
    c.workload("DELETED", "w2", "True", "")
    c.workload("MODIFIED", "w4", "False", "")
    assert (c.peak_reserved, c.reserved) == (2, {"w3"})


def audit(stage: str, verb: str, agent: str, resource: str = "workloads", subresource: str = "") -> str:
    ref = {"resource": resource, "namespace": "bench", **({"subresource": subresource} if subresource else {})}
    return json.dumps({"kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "Metadata", "stage": stage,
                       "verb": verb, "userAgent": agent, "objectRef": ref, "auditID": "x"})


def test_audited_requests_are_counted_once_by_user_agent():
    kueue = "kueue/v0.0.0 (linux/amd64) kubernetes/$Format"
    lines = [
        audit("ResponseComplete", "update", kueue, subresource="status"),
        audit("ResponseComplete", "update", kueue, subresource="status"),
        audit("ResponseComplete", "create", kueue),
        audit("ResponseStarted", "watch", kueue),                   # a watch once, when it starts
        audit("ResponseComplete", "watch", kueue),                  # ... not again when it ends
        audit("ResponseComplete", "patch", "alpaca-operator", "alpacafinetunes", "status"),
        audit("ResponseComplete", "create", "kube-controller-manager/v1.35.3", "pods"),
        audit("Panic", "get", kueue),
    ]
    assert ob.audit_requests(lines, ob.KUEUE_AGENT) == {"update workloads/status": 2, "create workloads": 1,
                                                        "watch workloads": 1}
    assert ob.audit_requests(lines, ob.OPERATOR_AGENT) == {"patch alpacafinetunes/status": 1}


def rounds(without: list[float | None], with_kueue: list[float | None]) -> list[dict]:
    return ([{"kueue_installed": False, "all_running_after_first_apply_s": s} for s in without]
            + [{"kueue_installed": True, "all_running_after_first_apply_s": s} for s in with_kueue])


def test_the_margin_is_the_spread_of_the_rounds_without_kueue():
    v = ob.installed_verdict(rounds([40.0, 50.0], [52.0, 54.0]))     # plain spread 25 %
    assert v["spread"] == 0.25 and v["margin"] == 0.25 and v["ratio"] == round(53 / 45, 3)
    assert not v["slower"]
    v = ob.installed_verdict(rounds([40.0, 50.0], [60.0, 62.0]))     # 36 % slower: more than 25 %
    assert v["slower"]


def test_close_rounds_still_allow_the_floor_and_a_missing_figure_fails():
    v = ob.installed_verdict(rounds([40.0, 40.4], [43.0, 43.5]))
    assert v["margin"] == ob.KUEUE_MARGIN_FLOOR and not v["slower"]
    assert ob.installed_verdict(rounds([40.0, 40.4], [43.0, 44.0]))["slower"] is False
    assert ob.installed_verdict(rounds([40.0, 40.4], [47.0, 47.0]))["slower"]
    assert ob.installed_verdict(rounds([40.0, 41.0], [None, 41.0]))["slower"]


def result(runs: int, installed: bool, seconds: float) -> dict:
    return {"runs": runs, "kueue_installed": installed, "load_average": [1.1, 2.2], "running_p50_s": seconds / 2,
            "running_max_s": seconds - 1, "all_running_after_first_apply_s": seconds, "all_succeeded_s": seconds + 30,
            "operator_cpu_s": 17.3, "operator_requests_per_run": 15.7}


QUEUED = {"runs": 37, "pods": 37, "gpus_per_pod": 8, "gpu_nodes": ob.KUEUE_NODES, "run_for": "9s",
          "all_succeeded_s": 123.45, "peak_runs_with_pods": 7, "peak_workloads_holding_quota": 6,
          "quota_runs": ob.KUEUE_QUOTA_NODES, "quota_gpus": ob.KUEUE_QUOTA_NODES * 8,
          "operator_requests_per_run": 21.3, "kueue_requests_per_run": 31.9, "operator_peak_rss_mib": 77.7,
          "operator_cpu_s": 6.6, "succeeded": 37, "failed": 0, "apply_seconds": 0.91,
          "operator_requests_by_kind": {"POST jobs": 37}, "kueue_requests_by_kind": {"update workloads/status": 1180},
          "operator_requests_audited_per_run": 22.4}


def report(queued: dict = QUEUED, slow: float = 44.0) -> dict:
    installed = [result(500, False, 41.5), result(500, True, slow), result(500, True, 42.5), result(500, False, 43.0)]
    return {"date": "2031-07-19 08:43 UTC", "machine": "a fake machine", "load_average": [3.3, 4.4],
            "kueue": {"queued": queued, "installed": installed, "verdict": ob.installed_verdict(installed)}}


def test_the_kueue_part_says_the_measured_figures():
    text = ob.kueue_markdown(report())
    assert text.startswith(ob.KUEUE_HEADING + "\n")
    for figure in ("123.45 s", "| 7 | 6 | 8 |", "21.3", "31.9", "9s", "64 GPUs", "16 simulated", "--kueue 37", "22.4 per run",
                   "a fake machine", "3.3 before, 4.4 after", "43.25 s against 42.25 s", "not slower"):
        assert figure in text, figure
    assert ob.kueue_missed(report()["kueue"]) == []


def test_a_peak_over_the_quota_or_a_slower_kueue_is_a_missed_target():
    over = copy.deepcopy(QUEUED)
    over["peak_runs_with_pods"] = ob.KUEUE_QUOTA_NODES + 1
    assert "held quota at once" in ob.kueue_missed(report(over)["kueue"])[0]
    slow = report(slow=80.0)
    assert "SLOWER" in ob.kueue_markdown(slow)
    assert "with Kueue installed" in ob.kueue_missed(slow["kueue"])[0]


DOC = """# Benchmarks

## Training

train figures

## Operator

old operator figures

### Kubernetes client

client figures

## Operator, SageMaker backend

sagemaker figures
"""


def headings(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("#")]


@pytest.fixture
def docs(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text(DOC)
    return path


def test_the_kueue_part_goes_at_the_end_of_the_operator_section_and_is_replaced_there(docs):
    ob.write_docs(ob.kueue_markdown(report()), ob.KUEUE_HEADING, docs)
    assert headings(docs) == ["# Benchmarks", "## Training", "## Operator", "### Kubernetes client", "### Kueue",
                              "## Operator, SageMaker backend"]
    assert "client figures\n\n### Kueue\n" in docs.read_text()     # one blank line between the parts
    ob.write_docs(ob.kueue_markdown(report(slow=80.0)), ob.KUEUE_HEADING, docs)
    text = docs.read_text()
    assert text.count(ob.KUEUE_HEADING) == 1 and "SLOWER" in text and "client figures" in text
    assert "sagemaker figures" in text and "old operator figures" in text


def test_rewriting_the_operator_section_keeps_its_client_and_kueue_parts(docs):
    ob.write_docs(ob.kueue_markdown(report()), ob.KUEUE_HEADING, docs)
    ob.write_docs("## Operator\n\nnew operator figures\n", "## Operator", docs)
    text = docs.read_text()
    assert "old operator figures" not in text and "new operator figures" in text
    assert "client figures" in text and "| 7 | 6 | 8 |" in text
    assert headings(docs) == ["# Benchmarks", "## Training", "## Operator", "### Kubernetes client", "### Kueue",
                              "## Operator, SageMaker backend"]
