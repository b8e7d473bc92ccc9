"""The growth cases of `bench/operator_bench.py` (issue 15: 2,000 runs; 8 runs of 64 nodes)
without a cluster: how a gang case is given, that only the one-pod cases of at most 500 runs
are held to the targets, and how the table names a gang."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("operator_bench_growth_under_test", ROOT / "bench" / "operator_bench.py")
ob = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ob)


def row(runs: int, nodes: int = 1, *, after_last: float = 10.0, running: int | None = None,
        rss: float = 100.0) -> dict:
    return {"runs": runs, "pods": runs * nodes, "gpus_per_pod": 8 if nodes > 1 else 1,
            "gpu_nodes": runs * nodes, "all_running": runs if running is None else running,
            "all_running_after_last_apply_s": after_last, "operator_peak_rss_mib": rss,
            "running_p50_s": 1.0, "running_p95_s": 2.0, "running_max_s": 3.0, "all_succeeded_s": 40.0,
            "operator_cpu_s": 5.0, "operator_requests_per_run": 7.0, "apply_seconds": 1.0,
            "job_created_p50_s": 0.5, "job_created_max_s": 1.0, "control_plane_cpu_s": {},
            "operator_requests_by_kind": {}, "run_for": "30s"}


def test_a_gang_case_is_runs_x_nodes_and_anything_else_is_refused():
    assert ob.gang_case("8x64") == (8, 64)
    for bad in ("8y64", "8x", "x64", "0x64", "8x0"):
        with pytest.raises(argparse.ArgumentTypeError):
            ob.gang_case(bad)


def test_only_one_pod_cases_of_at_most_500_runs_are_held_to_the_targets():
    slow, big = ob.EKS_TARGET_RUNNING_S + 1, ob.EKS_TARGET_RSS_MIB + 1
    assert ob.eks_missed([row(2000, after_last=slow, rss=big), row(8, 64, after_last=slow, rss=big),
                          row(8, 64, running=7)]) == []
    missed = ob.eks_missed([row(500, after_last=slow), row(100, running=99), row(500, rss=big)])
    assert len(missed) == 3 and missed[0].startswith("500 runs: last all Running") and "99 of 100" in missed[1]
    assert missed[2] == f"500 runs: operator peak {big} MiB (target < {ob.EKS_TARGET_RSS_MIB})"


def test_the_table_names_a_gang_by_its_nodes_and_gpus():
    text = ob.markdown({"results": [row(500), row(8, 64)], "date": "d", "machine": "m", "load_average": [0, 0]})
    assert "| 8 | 512 x 8 (512) |" in text
    assert "- 8 runs of 64 nodes x 8 GPUs: created in" in text
    assert "- 500 runs: created in" in text
