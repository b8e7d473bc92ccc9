#!/usr/bin/env python3
"""Operator benchmark (make bench-operator): N AlpacaFineTunes applied at once.

Brings up its own control plane (hack/cluster.py, in .cache/bench-cluster on its own
port, so it never touches the test cluster) with one simulated p4d node per run, starts
the operator as a subprocess, creates N runs from a thread pool as fast as the API server
takes them, and reports:

- apply -> all of the run's pods Running: p50 / p95 / max, and the last one relative to
  the last apply (target: 500 runs all Running within 60 s of the last apply);
- first apply -> every run Succeeded (pods run `--run-for` seconds, kwok's clock);
- the operator's peak RSS (target < 200 MiB) and CPU seconds (from /proc);
- the operator's own API requests per run (its client counts them; kopf's few watch
  streams come on top).

Each run is one pod of one GPU by default, packed eight to a simulated p4d node (63 nodes
for 500 runs): kwok renews a Lease per node, and 500 simulated nodes on a 2-core machine
load the API server more than the operator does. `--full-nodes N` adds a round of N runs of
one whole 8-GPU node each (N nodes), the realistic shape. `--gangs RxN` adds R runs of N
whole nodes each (issue 15's growth: `--runs 2000 --gangs 8x64`); only one-pod cases of at
most 500 runs have targets.

`--sagemaker N` adds N runs with backend sagemaker against the local SageMaker stand-in
(hack/sagemaker_local/, progression mode: no training runs), the operator polling at its
default 30 s: the time until every training job exists, the SageMaker calls per run and
per run per minute while the jobs run (target at most 3; the reference is ACK's SageMaker
controller, which describes a running job every 30 s: 2 a minute), and the operator's
memory. The benchmark exits non-zero when a target is missed.

    python bench/operator_bench.py --runs 100 --runs 500 [--runs 2000] [--gangs 8x64] [--full-nodes 500] \
        [--sagemaker 200] [--write-docs]

These cases run on a control plane without Kueue. `--kueue N` adds Kueue's (issue 18): N runs
of one 8-GPU node with `spec.queueName` through one ClusterQueue whose quota fits 8 of them,
on 16 simulated nodes: first apply -> all Succeeded, the most runs that had pods (and the most
Workloads that held quota) at once, counted on every watch event (the benchmark fails if
either passes 8), and the operator's and Kueue's API requests per run (Kueue's from the API
server's audit log, by user agent); then the --kueue-compare case (500 runs, no queueName) on a
control plane without and with Kueue installed, --kueue-rounds times each, and fails when
Kueue's is slower than the run-to-run spread allows. It writes the "### Kueue" part.

    python bench/operator_bench.py --kueue 200 [--kueue-run-for 5s] [--kueue-compare 500] [--kueue-rounds 3] [--write-docs]

`--kubeflow N` (issue 15) runs Kubeflow's training-operator, built from its Go module
(hack/build-kubeflow.sh, into .bin on first use), on the same control plane: N PyTorchJobs of
one pod in the shape of N runs' pods, under its shipped build once (20 QPS client) and under a
build with its client unthrottled against N of the operator's runs --kubeflow-rounds times, the
order alternating; the same columns for each (creating them, last apply and first apply -> all
pods Running, all Succeeded, the operator's and every client's API requests per run from the
audit log, the operator's peak RSS and CPU, kube-apiserver's CPU), checked against issue 15's
targets (the benchmark fails on any missed). It writes the "### Against Kubeflow" part.

    python bench/operator_bench.py --kubeflow 500 [--kubeflow-rounds 3] [--write-docs]

`--client A --client B ... --rounds R` compares Kubernetes clients instead (issue 11): the
same N runs once per client and round, each on a fresh control plane, the clients' order
rotating from round to round so that a change in the machine's load hits each of them
alike; the report pairs each round's clients with the first one (the reference) and writes
the "### Kubernetes client" part of the Operator section. The clients other than the
operator's own (aiohttp) must be installed first: see bench/kube_clients.py.

    python bench/operator_bench.py --runs 200 --client aiohttp --client lightkube --client kr8s --rounds 3
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from alpaca_operator import api as operator_api
from alpaca_operator import status
from alpaca_operator.backends.eks import render
from alpaca_operator.backends.eks.backend import observe_pods
from alpaca_operator.preflight import Outcome as PreflightOutcome
from alpaca_operator.reconciler import render_event
from alpaca_operator.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("hack_cluster", ROOT / "hack" / "cluster.py")
hack_cluster = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hack_cluster)

NAMESPACE = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def bare_pods(report: dict) -> bool:
    """Did the report's operator make each run's pods itself, not a Job? (A report that does
    not say measured the operator's default.)"""
    return report.get("eks_workload", operator_api.DEFAULT_WORKLOAD) == operator_api.WORKLOAD_PODS


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# The simulated nodegroup's (hack/cluster.py): what the runs, and Kubeflow's PyTorchJobs, ask for.
INSTANCE_TYPE = "p4d.24xlarge"


def finetune(i: int, run_for: str, nodes: int, gpus: int, queue: str | None = None) -> dict:
    doc = {
        "apiVersion": "alpaca.dev/v1alpha1", "kind": "AlpacaFineTune",
        "metadata": {"name": f"bench-{i:04d}", "namespace": NAMESPACE},
        "spec": {
            "model": {"uri": "s3://alpaca-bench/models/llama-7b/"},
            "data": {"uri": "s3://alpaca-bench/data/alpaca_data.json"},
            "output": {"uri": f"s3://alpaca-bench/runs/bench-{i:04d}/"},
            "resources": {"nodes": nodes, "gpusPerNode": gpus, "instanceType": INSTANCE_TYPE},
            "podMetadata": {"annotations": {"kwok.alpaca.dev/complete-after": run_for}},
        },
    }
    if queue:
        doc["spec"]["queueName"] = queue
    return doc


class Proc:
    """/proc readings of the operator process."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def hwm(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK   # utime + stime

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, self.rss())
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


class Observer:
    """Watches jobs, pods and runs in the namespace through `kubectl get --watch` (cheap Go
    decoding, so the observer does not steal the operator's CPU), and records when each
    run's workload appeared (its Job, or its first pod where the operator makes the pods
    itself), when all its pods ran, and when it finished."""

    def __init__(self, env: dict, nodes: int, runs: str = "alpacafinetunes", run_label: str = "alpaca.dev/finetune",
                 run_state: str = "{.status.phase}"):
        """runs: the kind created; run_label: the pods' label naming their run; run_state: where
        a run says Succeeded or Failed (a jsonpath: an AlpacaFineTune's phase, the type of a
        PyTorchJob's condition that is True)."""
        self.nodes = nodes
        self._stopped = threading.Event()
        self.job_seen: dict[str, float] = {}     # run -> when its Job, or its first pod, was seen
        # Does the controller make a Job per run (ALPACA_EKS_WORKLOAD=job)? Else its pods are
        # its workload (the operator's default, and a PyTorchJob's).
        self.jobs_made = runs == "alpacafinetunes" and not operator_api.bare_pods_from_env(env)
        self.running_pods: dict[str, set[str]] = {}
        self.all_running: dict[str, float] = {}
        self.succeeded: dict[str, float] = {}
        self.failed: dict[str, float] = {}
        self.restarts: dict[str, int] = {}
        label = "{.metadata.labels." + run_label.replace(".", "\\.") + "}"
        self.procs = [
            self._watch(env, "jobs", "{.metadata.name} " + label + "{'\\n'}", self._job),
            self._watch(env, "pods", "{.metadata.name} " + label + " {.status.phase}{'\\n'}", self._pod),
            self._watch(env, runs, "{.metadata.name} " + run_state + "{'\\n'}", self._run),
        ]

    def _watch(self, env, kind, template, handle, *flags):
        """kubectl's watch ends when the server closes it; start it again (the new initial
        listing repeats what is known, which setdefault ignores)."""
        holder = {}

        def read():
            while not self._stopped.is_set():
                proc = holder["proc"] = subprocess.Popen(
                    # One listing, not pages: kubectl prints a paged listing's pages as Lists,
                    # which the template gives nothing, so a watch started again over more than
                    # 500 objects saw none of them (a few of 512 pods never seen Running).
                    [str(ROOT / ".bin" / "kubectl"), "get", kind, "-n", NAMESPACE, "--watch", "--chunk-size=0",
                     *flags,
                     "-o", f"jsonpath={template}"], env=env, stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL, text=True)
                for line in proc.stdout:
                    parts = line.split()
                    if parts:
                        handle(time.monotonic(), *parts)
                proc.wait()
                if not self._stopped.is_set():
                    # The API server closed it (0 to 4 times a case here; why, the logs do not
                    # say): the next one's listing gives the state it missed.
                    self.restarts[kind] = self.restarts.get(kind, 0) + 1
        threading.Thread(target=read, daemon=True).start()
        return holder

    def _job(self, now, name, run=None, *_):
        if run:
            self.job_seen.setdefault(run, now)

    def _pod(self, now, name, run=None, phase=None, *_):
        if run and not self.jobs_made:
            self.job_seen.setdefault(run, now)
        if run and phase == "Running":
            pods = self.running_pods.setdefault(run, set())
            pods.add(name)
            if len(pods) >= self.nodes:
                self.all_running.setdefault(run, now)

    def _run(self, now, name, *states):
        if "Succeeded" in states:
            self.succeeded.setdefault(name, now)
        elif "Failed" in states:
            self.failed.setdefault(name, now)

    def stop(self) -> None:
        self._stopped.set()
        for holder in self.procs:
            if "proc" in holder:
                holder["proc"].terminate()
                holder["proc"].wait(5)


class Concurrency:
    """How many runs hold pods, and how many of Kueue's Workloads hold quota, at once: counted
    on every watch event, in the order the API server wrote them, so no peak falls between
    two samples (a poll could miss one)."""

    LIVE_PHASES = ("Pending", "Running")

    def __init__(self):
        self.live: dict[str, set[str]] = {}        # run -> its pods not yet finished
        self.reserved: set[str] = set()            # Workloads with QuotaReserved and not Finished
        self.peak_runs = 0
        self.peak_reserved = 0

    def pod(self, event: str, name: str, run: str, phase: str) -> None:
        pods = self.live.setdefault(run, set())
        if event != "DELETED" and phase in self.LIVE_PHASES:
            pods.add(name)
        else:
            pods.discard(name)
        self.peak_runs = max(self.peak_runs, sum(1 for p in self.live.values() if p))

    def workload(self, event: str, name: str, quota_reserved: str, finished: str) -> None:
        if event != "DELETED" and quota_reserved == "True" and finished != "True":
            self.reserved.add(name)
        else:
            self.reserved.discard(name)
        self.peak_reserved = max(self.peak_reserved, len(self.reserved))


class QueueObserver(Observer):
    """The Observer, and a Concurrency fed by watches of pods and Workloads with their event
    types (a pod deleted while it runs ends there). One '|'-joined token per line: empty
    fields keep their place."""

    def __init__(self, env: dict, nodes: int):
        super().__init__(env, nodes)
        self.jobs_made = True      # queued runs keep their Job in either mode: Kueue admits Jobs
        self.concurrency = Concurrency()
        label = "{.object.metadata.labels.alpaca\\.dev/finetune}"
        cond = "{{.object.status.conditions[?(@.type==\"{}\")].status}}"
        self.procs += [
            self._watch(env, "pods", "{.type}|{.object.metadata.name}|" + label + "|{.object.status.phase}{'\\n'}",
                        self._fields(self.concurrency.pod), "--output-watch-events"),
            self._watch(env, "workloads.kueue.x-k8s.io", "{.type}|{.object.metadata.name}|"
                        + cond.format("QuotaReserved") + "|" + cond.format("Finished") + "{'\\n'}",
                        self._fields(self.concurrency.workload), "--output-watch-events"),
        ]

    @staticmethod
    def _fields(handle):
        def split(now, token, *_):
            fields = token.split("|")
            if len(fields) == 4 and fields[1]:
                handle(*fields)
        return split


# The queued case (--kueue N): runs of one whole 8-GPU node through one ClusterQueue whose
# quota fits KUEUE_QUOTA_NODES of them, on KUEUE_NODES nodes: the quota, not the nodes, is
# the limit.
KUEUE_NODES, KUEUE_QUOTA_NODES = 16, 8
KUEUE_LOCAL_QUEUE = "gpu"
KUEUE_TIMEOUT_S = 1800.0
# User agents in the API server's audit log: Kueue's (controller-runtime's default, the
# binary's name) and the operator's (its client's), whose own count it checks.
KUEUE_AGENT, OPERATOR_AGENT = "kueue/", "alpaca-operator"


def _queue_for_bench(cluster) -> None:
    """The ClusterQueue's quota cut to KUEUE_QUOTA_NODES p4d nodes (its flavor and name as
    `make cluster-up` makes them) and a LocalQueue in the bench namespace."""
    cluster.apply_queues(hack_cluster.kueue_nodegroups(KUEUE_QUOTA_NODES, 0, 0))
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": hack_cluster.local_kueue.API, "kind": "LocalQueue",
        "metadata": {"name": KUEUE_LOCAL_QUEUE, "namespace": NAMESPACE},
        "spec": {"clusterQueue": hack_cluster.local_kueue.CLUSTER_QUEUE}}))
    cluster.kubectl("wait", "--for=condition=Active", "--timeout=60s", "-n", NAMESPACE,
                    f"localqueue.kueue.x-k8s.io/{KUEUE_LOCAL_QUEUE}")


def _requests(lines):
    """Each request in audit events once: the API server logs a request when its response
    completes, and a watch when its stream starts (a watch that ends inside the window began
    before it)."""
    for line in lines:
        event = json.loads(line)
        if event["stage"] == "ResponseComplete" and event["verb"] == "watch" or event["stage"] not in (
                "ResponseComplete", "ResponseStarted"):
            continue
        yield event


def audit_agents(lines) -> dict[str, int]:
    """Requests by client, from audit events: the user agent's program name."""
    counts: dict[str, int] = {}
    for event in _requests(lines):
        agent = event.get("userAgent", "").split("/", 1)[0] or "(none)"
        counts[agent] = counts.get(agent, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def audit_requests(lines, agent: str) -> dict[str, int]:
    """Requests of the client whose user agent starts with `agent` ("": every client), by
    verb and resource, from audit events (each once: _requests)."""
    counts: dict[str, int] = {}
    for event in _requests(lines):
        if not event.get("userAgent", "").startswith(agent):
            continue
        ref = event.get("objectRef") or {}
        what = ref.get("resource", "other") + ("/" + ref["subresource"] if ref.get("subresource") else "")
        key = f"{event['verb']} {what}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def bench(n: int, gpus: int, args, kube_client: str | None = None, kueue: bool = False,
          queued: bool = False, kubeflow: str | None = None, audited: bool = False,
          nodes: int | None = None, floor: str | None = None) -> dict:
    """nodes: pods (nodes) per run, args.nodes unless given; kueue: Kueue installed
    beside the control plane (the runs name no queue unless `queued`); queued: the runs
    go through one ClusterQueue whose quota fits KUEUE_QUOTA_NODES of KUEUE_NODES
    simulated nodes at a time; kubeflow: instead of the operator and its runs, this
    build of Kubeflow's training-operator (KUBEFLOW_SHIPPED or KUBEFLOW_UNTHROTTLED) and
    PyTorchJobs of the same shape; audited: the API server's audit log counts every
    client's requests (always for queued, kubeflow and floor); floor: no controller at all,
    the benchmark's threads make each run's pods right after the run (FLOOR_PODS), and the
    operator's writes before they run as well (FLOOR_WRITES); the case ends when all run."""
    from kubernetes import client, config

    kueue = kueue or queued
    audited = audited or queued or kubeflow is not None or floor is not None
    nodes = nodes or args.nodes
    directory = ROOT / ".cache" / "bench-cluster"
    cluster = hack_cluster.Cluster(directory, args.port)
    # Enough 8-GPU nodes for every pod at once (pods pack when --gpus < 8); queued, more
    # nodes than the quota, so that the quota is the limit.
    gpu_nodes = KUEUE_NODES if queued else -(-n * nodes // (8 // gpus))
    log(f"control plane with {gpu_nodes} GPU nodes{', Kueue' if kueue else ''} in {directory}")
    t0 = time.monotonic()
    cluster.down()
    audit = directory / "audit.log"
    audit.unlink(missing_ok=True)
    cluster.audit_log = audit if audited else None
    cluster.up(gpu_nodes=gpu_nodes, system_nodes=2, kueue=kueue)
    log(f"  up in {time.monotonic() - t0:.0f}s")
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    tag = (f"{'-' + kube_client if kube_client else ''}{'-' + kubeflow if kubeflow else ''}"
           f"{'-floor-' + floor.replace('+', '-') if floor else ''}"
           f"{'-queued' if queued else '-kueue' if kueue else '-audited' if audited and not kubeflow else ''}")
    op_log = directory / f"operator-{n}{tag}.log"
    stats = directory / f"operator-{n}{tag}.stats.json"
    run_for = args.kueue_run_for if queued else args.run_for
    timeout = max(args.timeout, KUEUE_TIMEOUT_S) if queued else args.timeout
    stats.unlink(missing_ok=True)
    load_before = os.getloadavg()[0]
    op = None
    try:
        if kubeflow:
            _install_kubeflow(cluster)
        else:
            cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "manifests" / "crd"))
            cluster.wait_established("alpacafinetunes.alpaca.dev")
        cluster.kubectl("create", "namespace", NAMESPACE)
        if queued:
            _queue_for_bench(cluster)
        api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        api.configuration.connection_pool_maxsize = args.parallel + 4
        observer = (QueueObserver if queued else Observer)(env, nodes, **(KUBEFLOW_OBSERVED if kubeflow else {}))
        time.sleep(1)

        if kubeflow:
            op, ready = _start_kubeflow(kubeflow, env, op_log)
            _wait_healthy(ready, op)
        elif floor:
            _make_trainer_identity(api)
        else:
            with open(op_log, "wb") as out:
                # --client: the operator with that client (bench/kube_clients.py).
                command = ([str(ROOT / "bench" / "kube_clients.py"), kube_client] if kube_client
                           else ["-m", "alpaca_operator"])
                op = subprocess.Popen([sys.executable, *command, "--liveness",
                                       f"http://127.0.0.1:{args.port + 10}/healthz"],
                                      env={**env, "ALPACA_OPERATOR_STATS": str(stats)}, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
            _wait_healthy(f"http://127.0.0.1:{args.port + 10}/healthz", op)
        proc = Proc(op.pid) if op else None
        cpu_before = proc.cpu_seconds() if proc else 0.0
        client_before = time.process_time()
        plane = {name: Proc(pid) for name, pid in cluster.running().items() if pid}
        plane_before = {name: p.cpu_seconds() for name, p in plane.items()}
        time.sleep(2)

        custom = client.CustomObjectsApi(api)
        if kubeflow:
            docs = [pytorchjob(i, run_for, gpus) for i in range(n)]
            kind = ("kubeflow.org", "v1", NAMESPACE, "pytorchjobs")
        else:
            docs = [finetune(i, run_for, nodes, gpus, KUEUE_LOCAL_QUEUE if queued else None) for i in range(n)]
            kind = ("alpaca.dev", "v1alpha1", NAMESPACE, "alpacafinetunes")
        applied: dict[str, float] = {}
        audit_from = audit.stat().st_size if audited else 0

        core = client.CoreV1Api(api)

        def create(doc):
            made = custom.create_namespaced_custom_object(*kind, doc)
            applied[doc["metadata"]["name"]] = time.monotonic()
            if floor:
                _floor_children(core, custom, made, writes=floor == FLOOR_WRITES)

        log(f"creating {n} {kind[-1]} ({nodes} pod(s) x {gpus} GPUs each, running {run_for})"
            f"{' in queue ' + KUEUE_LOCAL_QUEUE if queued else ''}")
        first = time.monotonic()
        with cf.ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(create, docs))
        last_apply = max(applied.values())
        log(f"  created in {last_apply - first:.1f}s")

        deadline = time.monotonic() + timeout
        # With no controller no run ends: such a case ends when every run's pods run.
        finished = (lambda: len(observer.all_running) >= n) if floor else \
            (lambda: len(observer.succeeded) + len(observer.failed) >= n)
        while not finished() and time.monotonic() < deadline:
            time.sleep(0.25 if floor else 0.5)
        done = time.monotonic()
        audit_to = audit.stat().st_size if audited else 0
        cpu = proc.cpu_seconds() - cpu_before if proc else None
        client_cpu = time.process_time() - client_before
        plane_cpu = {name: round(p.cpu_seconds() - plane_before[name], 1) for name, p in plane.items()}
        for p in plane.values():
            p.stop()
        peak = max(proc.peak_rss, proc.hwm()) if proc else None
        if proc:
            proc.stop()
        observer.stop()
        counted = json.loads(stats.read_text()) if stats.exists() else {}

        latencies = [observer.all_running[k] - applied[k] for k in applied if k in observer.all_running]
        to_job = [observer.job_seen[k] - applied[k] for k in applied if k in observer.job_seen]
        missing = n - len(latencies)
        result = {
            "client": kube_client,
            "controller": kubeflow or (f"none ({floor})" if floor else OPERATOR_AGENT),
            "kueue_installed": kueue,
            "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
            "runs": n,
            "pods": n * nodes,
            "gpus_per_pod": gpus,
            "gpu_nodes": gpu_nodes,
            "all_running": len(latencies),
            "succeeded": len(observer.succeeded),
            "failed": len(observer.failed),
            "apply_seconds": round(last_apply - first, 2),
            "running_p50_s": round(pct(latencies, 0.5), 2) if latencies else None,
            "running_p95_s": round(pct(latencies, 0.95), 2) if latencies else None,
            "running_max_s": round(max(latencies), 2) if latencies else None,
            "job_created_p50_s": round(pct(to_job, 0.5), 2) if to_job else None,
            "job_created_max_s": round(max(to_job), 2) if to_job else None,
            "all_running_after_last_apply_s": round(max(observer.all_running.values()) - last_apply, 2)
            if latencies else None,
            "all_running_after_first_apply_s": round(max(observer.all_running.values()) - first, 2)
            if latencies else None,
            "all_succeeded_s": round(max(observer.succeeded.values()) - first, 2)
            if len(observer.succeeded) == n else None,
            "operator_peak_rss_mib": round(peak / 2**20, 1) if peak else None,
            "operator_cpu_s": round(cpu, 1) if cpu is not None else None,
            # This process: its creates (with floor, the pods and writes too); its kubectl watches are their own.
            "client_cpu_s": round(client_cpu, 1),
            "operator_requests": counted.get("requests_total"),
            # Its own client's count; a training-operator has none here (see the audited count).
            "operator_requests_per_run": None if kubeflow or floor else round(counted.get("requests_total", 0) / n, 1),
            "operator_requests_by_kind": counted.get("requests"),
            "reconciles": counted.get("reconciles"),
            "run_for": run_for,
            "control_plane_cpu_s": plane_cpu,
            "watch_restarts": dict(observer.restarts),
            "apiserver_cpu_s": plane_cpu.get("kube-apiserver"),
        }
        if audited:
            with open(audit, "rb") as f:
                f.seek(audit_from)
                window = f.read(audit_to - audit_from).decode().splitlines()
            operator_calls = audit_requests(window, KUBEFLOW_AGENT if kubeflow else OPERATOR_AGENT)
            every = audit_requests(window, "")
            result.update({
                "operator_requests_audited_per_run": round(sum(operator_calls.values()) / n, 1),
                "operator_requests_audited_by_kind": operator_calls,
                "all_requests_per_run": round(sum(every.values()) / n, 1),
                "all_requests_by_agent": audit_agents(window),
            })
        if queued:
            kueue_calls = audit_requests(window, KUEUE_AGENT)
            result.update({
                "quota_runs": KUEUE_QUOTA_NODES, "quota_gpus": KUEUE_QUOTA_NODES * 8,
                "peak_runs_with_pods": observer.concurrency.peak_runs,
                "peak_workloads_holding_quota": observer.concurrency.peak_reserved,
                "kueue_requests": sum(kueue_calls.values()),
                "kueue_requests_per_run": round(sum(kueue_calls.values()) / n, 1),
                "kueue_requests_by_kind": kueue_calls,
            })
        if missing or (result["all_succeeded_s"] is None and not floor):
            log(f"  WARNING: {missing} runs never had all pods Running, "
                f"{n - len(observer.succeeded)} did not succeed in {timeout}s; see {op_log}")
        return result
    finally:
        stop_operator(op)
        if not args.keep:
            cluster.down()


# EKS: up to this many runs all Running within the time after the last apply; the
# operator's peak memory in every round.
EKS_TARGET_RUNS, EKS_TARGET_RUNNING_S, EKS_TARGET_RSS_MIB = 500, 60.0, 200.0
SM_TARGET_PER_RUN_MINUTE = 3.0
SM_REFERENCE_PER_RUN_MINUTE = 2.0     # ACK's SageMaker controller: one describe per 30 s


def sagemaker_finetune(i: int) -> dict:
    name = f"smb-{i:04d}"
    return {
        "apiVersion": "alpaca.dev/v1alpha1", "kind": "AlpacaFineTune",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "backend": "sagemaker",
            "model": {"uri": "s3://alpaca-bench/models/llama-7b/"},
            "data": {"uri": "s3://alpaca-bench/data/alpaca_data.json"},
            "output": {"uri": f"s3://alpaca-bench/runs/{name}/"},
            "sagemaker": {"roleArn": "arn:aws:iam::123456789012:role/alpaca-bench",
                          "image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/alpaca-train:0.1.0"},
        },
    }


def bench_sagemaker(n: int, args) -> dict:
    from kubernetes import client, config
    spec = importlib.util.spec_from_file_location("sagemaker_local_handle", ROOT / "hack" / "sagemaker_local" / "handle.py")
    handle = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = handle
    spec.loader.exec_module(handle)

    directory = ROOT / ".cache" / "bench-cluster"
    cluster = hack_cluster.Cluster(directory, args.port)
    log(f"sagemaker: control plane (no GPU nodes) and the stand-in in {directory}")
    cluster.down()
    cluster.up(gpu_nodes=0, system_nodes=2)
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    op_log = directory / f"operator-sagemaker-{n}.log"
    stats = directory / f"operator-sagemaker-{n}.stats.json"
    op = None
    work = directory / "sagemaker-standin"
    shutil.rmtree(work, ignore_errors=True)
    try:
        with handle.StandIn.start(work, step_seconds=args.sagemaker_step_seconds) as sm:
            sm.client("s3").create_bucket(Bucket="alpaca-bench")
            sm.plan("smb-", training_seconds=args.sagemaker_training_seconds)
            cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "manifests" / "crd"))
            cluster.wait_established("alpacafinetunes.alpaca.dev")
            cluster.kubectl("create", "namespace", NAMESPACE)
            api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
            api.configuration.connection_pool_maxsize = args.parallel + 4
            observer = Observer(env, 1)
            with open(op_log, "wb") as out:
                op = subprocess.Popen([sys.executable, "-m", "alpaca_operator", "--liveness",
                                       f"http://127.0.0.1:{args.port + 10}/healthz"],
                                      env={**env, **sm.env, "ALPACA_OPERATOR_STATS": str(stats)}, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
            _wait_healthy(f"http://127.0.0.1:{args.port + 10}/healthz", op)
            proc = Proc(op.pid)
            cpu_before = proc.cpu_seconds()
            custom = client.CustomObjectsApi(api)
            applied: dict[str, float] = {}

            def create(doc):
                custom.create_namespaced_custom_object("alpaca.dev", "v1alpha1", NAMESPACE, "alpacafinetunes", doc)
                applied[doc["metadata"]["name"]] = time.monotonic()

            log(f"creating {n} sagemaker runs")
            first = time.monotonic()
            with cf.ThreadPoolExecutor(args.parallel) as pool:
                list(pool.map(create, [sagemaker_finetune(i) for i in range(n)]))
            last_apply = max(applied.values())
            lister = sm.client("sagemaker", max_attempts=5)
            all_exist = None
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                if all_exist is None:
                    names = [j["TrainingJobName"] for page in lister.get_paginator("list_training_jobs").paginate(
                        NameContains="smb-") for j in page["TrainingJobSummaries"]]
                    if len(names) >= n:
                        all_exist = time.monotonic()
                        log(f"  every job exists {all_exist - last_apply:.1f}s after the last apply")
                if len(observer.succeeded) + len(observer.failed) >= n:
                    break
                time.sleep(1.0)
            done = time.monotonic()
            cpu = proc.cpu_seconds() - cpu_before
            peak = max(proc.peak_rss, proc.hwm())
            proc.stop()
            observer.stop()
            counted = json.loads(stats.read_text()) if stats.exists() else {}
            aws = counted.get("aws_calls") or {}
            sm_calls = {k.split(":", 1)[1]: v for k, v in aws.items() if k.startswith("sagemaker:")}
            total = sum(sm_calls.values())
            # Per job, from the stand-in's own count, over the job's life (create -> finished).
            per_minute = []
            jobs = {j["TrainingJobName"]: j for page in lister.get_paginator("list_training_jobs").paginate(
                NameContains="smb-") for j in page["TrainingJobSummaries"]}
            for name, j in jobs.items():
                # While it runs: what the operator asks about it (its one create aside).
                calls = sum(v for k, v in sm.calls(name).items() if k != "CreateTrainingJob")
                end = j.get("TrainingEndTime") or j.get("LastModifiedTime")
                life = (end - j["CreationTime"]).total_seconds() / 60 if end else (done - first) / 60
                per_minute.append(calls / max(life, 1 / 60))
            window_min = (max(observer.succeeded.values(), default=done) - first) / 60
            result = {
                "runs": n, "jobs": len(jobs), "succeeded": len(observer.succeeded), "failed": len(observer.failed),
                "apply_seconds": round(last_apply - first, 2),
                "all_jobs_exist_after_last_apply_s": round(all_exist - last_apply, 2) if all_exist else None,
                "all_succeeded_s": round(max(observer.succeeded.values()) - first, 2)
                if len(observer.succeeded) == n else None,
                "job_seconds": args.sagemaker_training_seconds + 4 * args.sagemaker_step_seconds,
                "sagemaker_calls_by_operation": sm_calls,
                "sagemaker_calls_per_run": round(total / n, 2),
                "sagemaker_calls_per_run_minute_overall": round(total / n / window_min, 2) if window_min else None,
                "sagemaker_calls_per_run_minute_p50": round(pct(per_minute, 0.5), 2) if per_minute else None,
                "sagemaker_calls_per_run_minute_max": round(max(per_minute), 2) if per_minute else None,
                "s3_calls_per_run": round(sum(v for k, v in aws.items() if k.startswith("s3:")) / n, 2),
                "operator_peak_rss_mib": round(peak / 2**20, 1),
                "operator_cpu_s": round(cpu, 1),
                "kubernetes_requests_per_run": round(counted.get("requests_total", 0) / n, 1),
            }
            return result
    finally:
        stop_operator(op)
        if not args.keep:
            cluster.down()


def _wait_healthy(url: str, op: subprocess.Popen) -> None:
    import urllib.request
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if op.poll() is not None:
            raise SystemExit(f"the operator exited with {op.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the operator did not become healthy")


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 2**20
    return f"{os.cpu_count()} vCPU ({cpu}), {mem} GiB RAM, {platform.system()} {platform.release()}, " \
           f"Python {platform.python_version()}"


def stop_operator(op: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL after 15 s: the operator of one benchmark round."""
    if op is not None and op.poll() is None:
        op.send_signal(signal.SIGTERM)
        try:
            op.wait(15)
        except subprocess.TimeoutExpired:
            op.kill()


def eks_missed(results: list[dict]) -> list[str]:
    """The targets hold for the one-pod cases of at most EKS_TARGET_RUNS runs; the growth
    cases (more runs, gangs of several nodes) are recorded, with no target."""
    held = [r for r in results if r["runs"] <= EKS_TARGET_RUNS and r["pods"] == r["runs"]]
    missed = [f"{r['runs']} runs: last all Running {r['all_running_after_last_apply_s']} s after the last apply "
              f"(target {EKS_TARGET_RUNNING_S} s), {r['all_running']} of {r['runs']} Running" for r in held
              if r["all_running"] != r["runs"] or r["all_running_after_last_apply_s"] > EKS_TARGET_RUNNING_S]
    return missed + [f"{r['runs']} runs: operator peak {r['operator_peak_rss_mib']} MiB (target < {EKS_TARGET_RSS_MIB})"
                     for r in held if r["operator_peak_rss_mib"] >= EKS_TARGET_RSS_MIB]


def gang_case(text: str) -> tuple[int, int]:
    runs, _, nodes = text.partition("x")
    try:
        case = int(runs), int(nodes)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want RUNSxNODES, e.g. 8x64") from None
    if min(case) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: runs and nodes must be at least 1")
    return case


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, action="append",
                   help="N (repeatable); default 100 and 500 (none when only --sagemaker is given)")
    p.add_argument("--nodes", type=int, default=1, help="pods (nodes) per run")
    p.add_argument("--gpus", type=int, default=1, choices=[1, 2, 4, 8], help="GPUs per pod")
    p.add_argument("--gangs", type=gang_case, action="append", default=[], metavar="RUNSxNODES",
                   help="also RUNS runs of NODES whole 8-GPU nodes each (issue 15's growth: 8x64)")
    p.add_argument("--full-nodes", type=int, action="append", default=[],
                   help="also N runs of one whole 8-GPU node each (repeatable)")
    p.add_argument("--sagemaker", type=int, action="append", default=[],
                   help="also N sagemaker runs against the local stand-in (repeatable)")
    p.add_argument("--sagemaker-training-seconds", type=float, default=150.0,
                   help="how long each stand-in job stays in Training")
    p.add_argument("--sagemaker-step-seconds", type=float, default=5.0,
                   help="how long each other SecondaryStatus lasts")
    p.add_argument("--kueue", type=int, default=0, metavar="N",
                   help=f"also N runs of 1 x 8 GPUs through one Kueue ClusterQueue of {KUEUE_QUOTA_NODES} runs' "
                        "quota, and the --kueue-compare case without and with Kueue installed")
    p.add_argument("--kueue-run-for", default="5s", help="how long each queued run's pod runs (kwok)")
    p.add_argument("--kueue-compare", type=int, default=EKS_TARGET_RUNS, metavar="N",
                   help="with --kueue: N runs (no queueName) on a control plane without and with Kueue")
    p.add_argument("--kueue-rounds", type=int, default=3,
                   help="with --kueue: rounds of the comparison (each one without and one with Kueue, "
                        "the order alternating)")
    p.add_argument("--kubeflow", type=int, default=0, metavar="N",
                   help="also N PyTorchJobs under Kubeflow's training-operator (built into .bin on first use), "
                        "shipped once and unthrottled against N of the operator's runs --kubeflow-rounds times")
    # Three, so that a median is not one round's: on this 2-core machine one 500-run round in
    # four or five takes half as long again (11.8 to 13.9 s, then 17.2 and 19.3 s).
    p.add_argument("--kubeflow-rounds", type=int, default=3,
                   help="with --kubeflow: rounds of the operator against the unthrottled training-operator "
                        "(the order alternating)")
    p.add_argument("--floor", type=int, default=0, metavar="N",
                   help="also N runs with no controller (the benchmark makes each run's pod, and then also "
                        "the operator's writes before it runs) against N PyTorchJobs under the unthrottled "
                        "training-operator, --floor-rounds times: what issue 15's 0.8x target leaves a controller")
    p.add_argument("--floor-rounds", type=int, default=3, help="with --floor: rounds of the three cases")
    p.add_argument("--write-docs", action="store_true",
                   help="write the results into docs/benchmarks.md, section Operator")
    p.add_argument("--run-for", default="30s", help="how long each pod runs (kwok)")
    p.add_argument("--parallel", type=int, default=16, help="client threads creating the runs")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--port", type=int, default=int(os.environ.get("BENCH_PORT", "38443")))
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--keep", action="store_true", help="leave the control plane up")
    p.add_argument("--client", action="append", choices=["aiohttp", "lightkube", "kr8s"],
                   help="compare these Kubernetes clients (repeatable; the first is the reference)")
    p.add_argument("--rounds", type=int, default=3, help="with --client: rounds of every client")
    args = p.parse_args()
    if args.kueue and args.kueue_rounds < 1:
        p.error("--kueue needs --kueue-rounds of at least 1: the comparison is part of it")
    if args.kubeflow and (args.kubeflow_rounds < 1 or args.nodes != 1):
        p.error("--kubeflow needs --kubeflow-rounds of at least 1, and --nodes 1 (its PyTorchJobs have one pod)")
    if args.floor and (args.floor_rounds < 1 or args.nodes != 1):
        p.error("--floor needs --floor-rounds of at least 1, and --nodes 1 (its writes are a one-pod run's)")
    if shutil.which("openssl") is None:
        raise SystemExit("openssl is needed for the control plane's certificates")
    if args.client:
        return compare_clients(args)

    results = []
    load_before = os.getloadavg()[0]
    runs = args.runs or ([] if args.sagemaker or args.kueue or args.kubeflow or args.floor or args.gangs
                          or args.full_nodes else [100, 500])
    cases = [(n, args.gpus, None) for n in runs] + [(n, 8, None) for n in args.full_nodes] \
        + [(n, 8, nodes) for n, nodes in args.gangs]
    for n, gpus, nodes in cases:
        results.append(bench(n, gpus, args, nodes=nodes))
        log(json.dumps(results[-1]))
    kueue = bench_kueue(args) if args.kueue else None
    kubeflow = bench_kubeflow(args) if args.kubeflow else None
    floor = bench_floor(args) if args.floor else None
    sagemaker = []
    for n in args.sagemaker:
        sagemaker.append(bench_sagemaker(n, args))
        log(json.dumps(sagemaker[-1]))
    workload = operator_api.WORKLOAD_PODS if operator_api.bare_pods_from_env() else operator_api.WORKLOAD_JOB
    report = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
              "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)], "results": results,
              "sagemaker": sagemaker, "kueue": kueue, "kubeflow": kubeflow, "floor": floor, "eks_workload": workload}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report) if results else ""
    if kueue:
        text = (text + "\n" if text else "") + kueue_markdown(report)
    if kubeflow:
        text = (text + "\n" if text else "") + kubeflow_markdown(report)
    if floor:
        text = (text + "\n" if text else "") + floor_markdown(report)
    if sagemaker:
        text = (text + "\n" if text else "") + sagemaker_markdown(report)
    print(text)
    if args.write_docs:
        if results:
            write_docs(markdown(report))
        if kueue:
            write_docs(kueue_markdown(report), KUEUE_HEADING)
        if kubeflow:
            write_docs(kubeflow_markdown(report), KUBEFLOW_HEADING)
        if floor:
            write_docs(floor_markdown(report), FLOOR_HEADING)
        if sagemaker:
            write_docs(sagemaker_markdown(report), "## Operator, SageMaker backend")
    missed = eks_missed(results)
    missed += [f"{r['runs']} sagemaker runs: {r['sagemaker_calls_per_run_minute_max']} SageMaker calls per run "
              f"per minute (target {SM_TARGET_PER_RUN_MINUTE})" for r in sagemaker
              if r["sagemaker_calls_per_run_minute_max"] is None
              or r["sagemaker_calls_per_run_minute_max"] > SM_TARGET_PER_RUN_MINUTE or r["succeeded"] != r["runs"]]
    missed += kueue_missed(kueue) if kueue else []
    missed += kubeflow_missed(kubeflow) if kubeflow else []
    for m in missed:
        log(f"TARGET MISSED: {m}")
    return 1 if missed else 0


def sagemaker_markdown(report: dict) -> str:
    rows = ["| runs | every job exists, after the last apply | all Succeeded, after the first apply | "
            "SageMaker calls per run | per run per minute while it runs: overall / p50 / max job (target <= 3) | "
            "S3 calls per run | operator peak RSS | operator CPU |",
            "|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in report["sagemaker"]:
        rows.append(f"| {r['runs']} | {r['all_jobs_exist_after_last_apply_s']} s | {r['all_succeeded_s']} s | "
                    f"{r['sagemaker_calls_per_run']} | {r['sagemaker_calls_per_run_minute_overall']} / "
                    f"{r['sagemaker_calls_per_run_minute_p50']} / {r['sagemaker_calls_per_run_minute_max']} | "
                    f"{r['s3_calls_per_run']} | {r['operator_peak_rss_mib']} MiB | {r['operator_cpu_s']} s |")
    detail = "\n".join(f"- {r['runs']} runs: created in {r['apply_seconds']} s; each job about {r['job_seconds']:.0f} s "
                       f"long; SageMaker calls by operation {r['sagemaker_calls_by_operation']}; "
                       f"{r['kubernetes_requests_per_run']} Kubernetes requests per run." for r in report["sagemaker"])
    load = report["load_average"]
    return (
        "## Operator, SageMaker backend\n\n"
        "`make bench-operator` (`bench/operator_bench.py --sagemaker N`): N runs with `backend: sagemaker` "
        "created at once against the local SageMaker stand-in (`hack/sagemaker_local/`, progression "
        "mode: the jobs go Starting, Downloading, Training, Uploading, Completed; nothing trains), the "
        "operator polling at its default 30 s (with jitter). Calls are counted by the operator's own "
        "client; per minute while a job runs is the stand-in's count of the calls about that job "
        "(its one CreateTrainingJob aside) over its life from creation to end, and \"overall\" is every "
        "call of the operator over the runs' whole window. The "
        "reference is ACK's SageMaker controller, which describes a running job every 30 s (2 a "
        "minute).\n\n"
        f"Measured {report['date']} on {report['machine']}; load average {load[0]} before, {load[1]} after "
        "(a machine shared with other builds).\n\n"
        + "\n".join(rows) + "\n\n" + detail + "\n")


KUEUE_HEADING = "### Kueue"
# The least margin by which the Kueue-installed case may be slower before it counts as
# slower, when its rounds happen to agree more closely than that (see installed_verdict).
KUEUE_MARGIN_FLOOR = 0.10


def bench_kueue(args) -> dict:
    """The queued case, then the --kueue-compare case without and with Kueue installed, the
    order alternating from round to round so that a drift of the machine's load hits both."""
    queued = bench(args.kueue, 8, args, queued=True)
    log(json.dumps(queued))
    rounds = []
    for r in range(args.kueue_rounds):
        for installed in ((False, True) if r % 2 == 0 else (True, False)):
            log(f"Kueue comparison, round {r + 1}/{args.kueue_rounds}: Kueue {'installed' if installed else 'absent'}")
            rounds.append(bench(args.kueue_compare, args.gpus, args, kueue=installed))
            log(json.dumps(rounds[-1]))
    return {"queued": queued, "installed": rounds, "verdict": installed_verdict(rounds)}


def installed_verdict(rounds: list[dict], key: str = "all_running_after_first_apply_s") -> dict:
    """Whether the runs came up slower with Kueue installed: the median with Kueue against
    the median without, allowed the relative spread between the rounds without Kueue (a
    difference the plain control plane shows against itself is the machine's noise, not
    Kueue; the rounds with Kueue do not widen it, or an erratic Kueue would excuse itself),
    and no less than KUEUE_MARGIN_FLOOR. A round whose runs did not all come up counts as
    slower."""
    times = {installed: [r[key] for r in rounds if r["kueue_installed"] == installed] for installed in (False, True)}
    complete = all(v is not None for v in times[False] + times[True]) and times[False] and times[True]
    plain_times = times[False]
    spread = (max(plain_times) - min(plain_times)) / min(plain_times) if complete and len(plain_times) > 1 else 0.0
    margin = max(KUEUE_MARGIN_FLOOR, spread)
    plain = _median(times[False]) if complete else None
    with_kueue = _median(times[True]) if complete else None
    ratio = with_kueue / plain if complete else None
    return {"without_s": plain, "with_s": with_kueue, "ratio": round(ratio, 3) if ratio else None,
            "spread": round(spread, 3), "margin": round(margin, 3),
            "slower": not complete or ratio > 1 + margin}


def kueue_missed(kueue: dict) -> list[str]:
    q, v = kueue["queued"], kueue["verdict"]
    missed = []
    if max(q["peak_runs_with_pods"], q["peak_workloads_holding_quota"]) > q["quota_runs"]:
        missed.append(f"{q['runs']} queued runs: {q['peak_runs_with_pods']} had pods and "
                      f"{q['peak_workloads_holding_quota']} held quota at once (the quota fits {q['quota_runs']})")
    if q["succeeded"] != q["runs"]:
        missed.append(f"{q['runs']} queued runs: {q['succeeded']} Succeeded")
    if v["slower"]:
        missed.append(f"with Kueue installed, all Running {v['with_s']} s after the first apply against "
                      f"{v['without_s']} s without (margin {v['margin']:.0%})")
    return missed


def kueue_markdown(report: dict) -> str:
    k = report["kueue"]
    q, v, rounds = k["queued"], k["verdict"], k["installed"]
    load = report["load_average"]
    compare = rounds[0]["runs"]
    per_round = ["| round | Kueue | load average before / after | apply -> all pods Running p50 / max | "
                 "last Running, after the first apply | all Succeeded, after the first apply | "
                 "operator CPU | operator API requests per run |",
                 "|---:|---|---|---|---:|---:|---:|---:|"]
    for i, r in enumerate(rounds):
        per_round.append(f"| {i // 2 + 1} | {'installed' if r['kueue_installed'] else 'absent'} | "
                         f"{r['load_average'][0]} / {r['load_average'][1]} | {r['running_p50_s']} / "
                         f"{r['running_max_s']} s | {r['all_running_after_first_apply_s']} s | "
                         f"{r['all_succeeded_s']} s | {r['operator_cpu_s']} s | {r['operator_requests_per_run']} |")
    verdict = ("not slower" if not v["slower"] else "SLOWER")
    return (
        f"{KUEUE_HEADING}\n\n"
        f"`bench/operator_bench.py --kueue {q['runs']}` (in `make bench-operator`), measured {report['date']} "
        f"on {report['machine']}; load average {load[0]} before, {load[1]} after.\n\n"
        f"Queued: {q['runs']} runs of {q['pods'] // q['runs']} x {q['gpus_per_pod']} GPUs with "
        f"`queueName: {KUEUE_LOCAL_QUEUE}`, created at once on a control plane running Kueue, through one "
        f"ClusterQueue whose quota over the p4d flavor is {q['quota_gpus']} GPUs ({q['quota_runs']} runs at a "
        f"time) on {q['gpu_nodes']} simulated p4d nodes (so the quota, not the nodes, is the limit); each pod "
        f"runs {q['run_for']} (kwok). The most at once are counted on every event of a watch of the pods "
        "and of Kueue's Workloads (with their event types), not sampled. Kueue's requests are counted in "
        "the API server's audit log (level Metadata, this case only) by user agent (`kueue/...`), from "
        "just before the first apply to the last run Succeeded, each request once (a watch when it "
        "starts); Kueue's metrics endpoint has no client request counter (client-go's "
        "`rest_client_requests_total` is not registered there). The operator's are counted by its "
        "client, as in the other cases; the same audit log counts "
        f"{q['operator_requests_audited_per_run']} per run of its user agent.\n\n"
        "| runs | all Succeeded, after the first apply | most runs with pods at once | "
        "most Workloads holding quota at once | quota (runs) | operator API requests per run | "
        "Kueue API requests per run | operator peak RSS | operator CPU |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {q['runs']} | {q['all_succeeded_s']} s | {q['peak_runs_with_pods']} | "
        f"{q['peak_workloads_holding_quota']} | {q['quota_runs']} | {q['operator_requests_per_run']} | "
        f"{q['kueue_requests_per_run']} | {q['operator_peak_rss_mib']} MiB | {q['operator_cpu_s']} s |\n\n"
        f"- {q['succeeded']} of {q['runs']} Succeeded, {q['failed']} Failed; created in {q['apply_seconds']} s. "
        f"Operator requests {q['operator_requests_by_kind']}; Kueue's {q['kueue_requests_by_kind']}.\n\n"
        f"Kueue installed, no `queueName`: the {compare}-run case above (1 GPU per pod, every pod fits), "
        f"once per round on a control plane without Kueue and once with Kueue running ("
        + ("the runs' bare pods, which Kueue's Job integration does not see"
           if bare_pods(report) else "its webhooks see every Job")
        + f"), {len(rounds) // 2} round(s), the order alternating. Compared: first apply -> every "
        f"run's pods Running, median over the rounds. With Kueue {v['with_s']} s against {v['without_s']} s "
        f"without ({v['ratio']}x): {verdict}. The margin is the relative spread between the rounds without "
        f"Kueue in this run ({v['spread']:.0%}): a difference the plain control plane shows against "
        f"itself is the shared machine's noise, not Kueue; at least "
        f"{KUEUE_MARGIN_FLOOR:.0%}, for when the rounds happen to agree closely. Margin here "
        f"{v['margin']:.0%}; the bench fails when Kueue's median is slower by more.\n\n"
        + "\n".join(per_round) + "\n")

# The peer (--kubeflow N, issue 15): Kubeflow's training-operator, built from the Go module
# pinned in hack/kubeflow by hack/build-kubeflow.sh, running N PyTorchJobs of one pod each on
# the control plane and nodes the operator's N runs get.
KUBEFLOW_MODULE = "github.com/kubeflow/training-operator"
# Its two builds in .bin: as shipped (controller-runtime's client, 20 QPS and burst 30), and
# with its client at the local controller-manager's 300 QPS, burst 600 (the reference of the
# targets: the comparison is of the controllers, not of a client rate limit).
KUBEFLOW_SHIPPED, KUBEFLOW_UNTHROTTLED = "training-operator", "training-operator-unthrottled"
# Both builds' user agent in the audit log: client-go's default, the binary's name.
KUBEFLOW_AGENT = "training-operator"
# Its reconcile workers (--controller-threads; 1 by default): as many as the threads creating the runs.
KUBEFLOW_THREADS = 16
# Its certificate rotator (pkg/cert, no flag) fills in this Secret, in the namespace it takes
# for its own, and waits for a serving certificate in the fixed directory before it starts
# its controllers.
KUBEFLOW_NAMESPACE, KUBEFLOW_WEBHOOK_SECRET = "kubeflow", "training-operator-webhook-cert"
KUBEFLOW_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")
# What the Observer watches: the PyTorchJobs (a condition of type Succeeded or Failed that is
# True ends one) and their pods, labelled with the job's name.
KUBEFLOW_OBSERVED = {"runs": "pytorchjobs.kubeflow.org", "run_label": "training.kubeflow.org/job-name",
                     "run_state": "{.status.conditions[?(@.status==\"True\")].type}"}
KUBEFLOW_IMAGE = "alpaca-train:bench"     # never pulled: kwok plays the nodes


def kubeflow_version(go_mod: Path = ROOT / "hack" / "kubeflow" / "go.mod") -> str:
    """The training-operator's version that hack/kubeflow pins."""
    for line in go_mod.read_text().splitlines():
        words = line.split()
        if KUBEFLOW_MODULE in words[:2] and words.index(KUBEFLOW_MODULE) + 1 < len(words):
            return words[words.index(KUBEFLOW_MODULE) + 1]
    raise ValueError(f"{go_mod} does not require {KUBEFLOW_MODULE}")


KUBEFLOW_HEADING = f"### Against Kubeflow {kubeflow_version()}"


def pytorchjob(i: int, run_for: str, gpus: int) -> dict:
    """A PyTorchJob of one pod (its Master) in the shape of finetune(i, run_for, 1, gpus)'s
    pod: the same GPUs, instance type, GPU toleration and time running under kwok."""
    gpu = {"nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": {"name": f"bench-{i:04d}", "namespace": NAMESPACE},
        "spec": {"pytorchReplicaSpecs": {"Master": {
            "replicas": 1, "restartPolicy": "Never",
            "template": {
                "metadata": {"annotations": {"kwok.alpaca.dev/complete-after": run_for}},
                "spec": {
                    "nodeSelector": {"node.kubernetes.io/instance-type": INSTANCE_TYPE},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    # The container's name is how the training-operator finds it.
                    "containers": [{"name": "pytorch", "image": KUBEFLOW_IMAGE,
                                    "resources": {"requests": gpu, "limits": gpu}}],
                },
            },
        }}},
    }


def build_kubeflow() -> None:
    """Both builds into .bin (hack/build-kubeflow.sh; seconds once built)."""
    log("building Kubeflow's training-operator (hack/build-kubeflow.sh; minutes the first time)")
    # Its progress to stderr with the rest of the log: stdout is the report's.
    subprocess.run([str(ROOT / "hack" / "build-kubeflow.sh")], check=True, stdout=sys.stderr,
                   env={**os.environ, "BIN": str(hack_cluster.BIN)})


def _install_kubeflow(cluster) -> None:
    """The PyTorchJob CRD, and what the training-operator needs to start, having no way to
    turn its webhooks off: the Secret its certificate rotator fills in (empty), and a serving
    certificate where its webhook server reads one (KUBEFLOW_CERT_DIR; kept when there). No
    ValidatingWebhookConfiguration is installed, so the API server never calls that webhook."""
    cluster.kubectl("create", "-f", str(hack_cluster.BIN / "kubeflow-manifests"), timeout=120)
    cluster.wait_established("pytorchjobs.kubeflow.org")
    cluster.kubectl("create", "namespace", KUBEFLOW_NAMESPACE)
    cluster.kubectl("create", "secret", "generic", KUBEFLOW_WEBHOOK_SECRET, "-n", KUBEFLOW_NAMESPACE)
    if not all((KUBEFLOW_CERT_DIR / name).exists() for name in ("tls.crt", "tls.key")):
        KUBEFLOW_CERT_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
                        "-keyout", str(KUBEFLOW_CERT_DIR / "tls.key"), "-out", str(KUBEFLOW_CERT_DIR / "tls.crt"),
                        "-subj", "/CN=training-operator", "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True)


def _start_kubeflow(build: str, env: dict, op_log: Path) -> tuple[subprocess.Popen, str]:
    """This build of the training-operator, for PyTorchJobs only (the other kinds' CRDs are
    not installed), with KUBEFLOW_THREADS workers, on free ports. Returns the process and its
    readiness URL: ready once its webhook server listens, when its controllers start."""
    metrics, health, webhook = hack_cluster._free_ports(3)
    with open(op_log, "wb") as out:
        op = subprocess.Popen(
            [str(hack_cluster.BIN / build), "--enable-scheme=pytorchjob", f"--controller-threads={KUBEFLOW_THREADS}",
             f"--metrics-bind-address=127.0.0.1:{metrics}", f"--health-probe-bind-address=127.0.0.1:{health}",
             f"--webhook-server-port={webhook}"],
            # Its webhook server reads $TMPDIR/k8s-webhook-server/serving-certs, its rotator
            # the fixed /tmp one: the same directory.
            env={**env, "TMPDIR": str(KUBEFLOW_CERT_DIR.parents[1])}, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True, cwd=op_log.parent)
    return op, f"http://127.0.0.1:{health}/readyz"


def bench_kubeflow(args) -> dict:
    """The shipped build once, then --kubeflow-rounds rounds of the operator's runs and the
    unthrottled build's PyTorchJobs, the order alternating from round to round so that a drift
    of the machine's load hits both; each on a fresh control plane with the audit log on."""
    build_kubeflow()
    n = args.kubeflow
    log(f"Kubeflow: {n} PyTorchJobs, the shipped build")
    shipped = bench(n, args.gpus, args, kubeflow=KUBEFLOW_SHIPPED)
    log(json.dumps(shipped))
    rounds = []
    for r in range(args.kubeflow_rounds):
        for build in ((None, KUBEFLOW_UNTHROTTLED) if r % 2 == 0 else (KUBEFLOW_UNTHROTTLED, None)):
            log(f"Kubeflow comparison, round {r + 1}/{args.kubeflow_rounds}: {build or 'the operator'}")
            rounds.append(bench(n, args.gpus, args, kubeflow=build, audited=True))
            log(json.dumps(rounds[-1]))
    rows = kubeflow_rows(shipped, rounds)
    return {"runs": n, "shipped": shipped, "rounds": rounds, "rows": rows, "targets": kubeflow_targets(rows)}


# The compared columns: (result key, heading, unit).
KUBEFLOW_METRICS = (
    ("apply_seconds", "time to create all", "s"),
    ("all_running_after_last_apply_s", "last apply -> all pods Running", "s"),
    ("all_running_after_first_apply_s", "first apply -> all pods Running", "s"),
    ("all_succeeded_s", "first apply -> all Succeeded", "s"),
    ("operator_requests_audited_per_run", "operator API requests per run", ""),
    ("all_requests_per_run", "all clients' API requests per run", ""),
    ("operator_peak_rss_mib", "operator peak RSS", "MiB"),
    ("operator_cpu_s", "operator CPU", "s"),
    ("apiserver_cpu_s", "kube-apiserver CPU", "s"),
)
# The table's rows, top to bottom.
KUBEFLOW_ROWS = ("Kubeflow shipped", "Kubeflow unthrottled", "ours")
# Issue 15's Goal, ours against Kubeflow unthrottled: (metric, at most this factor of
# Kubeflow's, plus these seconds) or, with factor None, (metric, None, at most this).
KUBEFLOW_TARGETS = (
    ("all_running_after_first_apply_s", 0.8, 0.0),
    ("operator_requests_audited_per_run", 1.0, 0.0),
    ("all_requests_per_run", 1.0, 0.0),
    ("apply_seconds", 1.3, 0.0),
    ("operator_peak_rss_mib", None, 80.0),
    ("operator_cpu_s", 1.0, 0.0),
    ("apiserver_cpu_s", 1.2, 0.0),
    ("all_succeeded_s", 1.0, 5.0),
)


def _measured(result: dict, key: str) -> float | None:
    """A result's figure, None where the runs it times did not all get there (a time to the
    last of them would be a time to the last of those that did)."""
    if key.startswith("all_running") and result["all_running"] != result["runs"]:
        return None
    return result.get(key)


def _median_of(results: list[dict], key: str) -> float | None:
    """The median of the results' figure, None where any round's figure is (_measured)."""
    values = [_measured(r, key) for r in results]
    return round(_median(values), 2) if values and None not in values else None


def kubeflow_rows(shipped: dict, rounds: list[dict]) -> dict[str, dict]:
    """The table: each row's medians over its rounds (None where any round's figure is)."""
    def medians(results: list[dict]) -> dict:
        row = {"rounds": len(results), "succeeded": min((r["succeeded"] for r in results), default=0),
               "runs": results[0]["runs"] if results else 0}
        for key, _, _ in KUBEFLOW_METRICS:
            row[key] = _median_of(results, key)
        return row
    return {"Kubeflow shipped": medians([shipped]),
            "Kubeflow unthrottled": medians([r for r in rounds if r["controller"] == KUBEFLOW_UNTHROTTLED]),
            "ours": medians([r for r in rounds if r["controller"] == OPERATOR_AGENT])}


def _target_text(key: str, factor: float | None, plus: float) -> str:
    label, unit = next((label, unit) for k, label, unit in KUBEFLOW_METRICS if k == key)
    if factor is None:
        return f"{label} <= {plus:g} {unit}"
    bound = "Kubeflow's" if factor == 1 else f"{factor:g}x Kubeflow's"
    return f"{label} <= {bound}" + (f" + {plus:g} {unit}" if plus else "")


def kubeflow_targets(rows: dict[str, dict]) -> list[dict]:
    """Each target of KUBEFLOW_TARGETS: ours, the bound Kubeflow unthrottled's figure sets, and
    whether ours is within it (not where either figure is missing: a run that never got there)."""
    ours, theirs = rows["ours"], rows["Kubeflow unthrottled"]
    out = []
    for key, factor, plus in KUBEFLOW_TARGETS:
        if factor is None:
            bound = plus
        else:
            bound = round(theirs[key] * factor + plus, 2) if theirs[key] is not None else None
        unit = next(unit for k, _, unit in KUBEFLOW_METRICS if k == key)
        out.append({"target": _target_text(key, factor, plus), "key": key, "unit": unit, "ours": ours[key],
                    "bound": bound, "met": ours[key] is not None and bound is not None and ours[key] <= bound})
    return out


# The floor (--floor): no controller. FLOOR_PODS: the benchmark's threads make each run's
# pods right after the run; FLOOR_WRITES: and the operator's status writes and Events before
# its pods run (floor_writes: Launching, then Running).
FLOOR_PODS, FLOOR_WRITES = "pods", "pods+writes"
FLOOR_HEADING = "### The floor: no controller, against Kubeflow"


def floor_run(made: dict) -> render.Run:
    """The run as the operator reads it, from `made` (the run as created)."""
    meta = made["metadata"]
    return render.Run(meta["name"], meta["namespace"], meta["uid"], meta.get("generation", 1),
                      parse_spec(made["spec"]))


def floor_writes(run: render.Run, pods: list[dict], now: dt.datetime) -> list[tuple[dict, dict]]:
    """The status merge patches and the Events the operator writes for `run` before its `pods`
    (as render.render_pods made them) run: from its own state machine (status.decide on the
    pods as observe_pods reads them, made and pending, then running; its preflight as it
    passes without AWS credentials), and the Events as it posts them (reconciler.render_event;
    their involvedObject's resourceVersion is the caller's to set)."""
    meta = {"name": run.name, "namespace": run.namespace, "uid": run.uid}
    writes = []
    for pod_status in ({"phase": "Pending"}, {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}):
        seen = [{**pod, "metadata": {**pod["metadata"], "creationTimestamp": status.fmt_time(now)},
                 "status": pod_status} for pod in pods]
        plan = status.decide(run, observe_pods(run, 1, seen, started=False, holding=False), now)
        if status.unrecorded_preflight(run):
            plan = status.preflight(run, plan, PreflightOutcome(notes=("no AWS credentials",)), now)
        writes += [(plan.patch, render_event(meta, ev, "floor", status.fmt_time(now))) for ev in plan.events]
        run = dataclasses.replace(run, status={**run.status, **plan.patch})
    return writes


def _make_trainer_identity(api) -> None:
    """What the operator makes once per namespace before its first pod there."""
    from kubernetes import client
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    make = {"ServiceAccount": core.create_namespaced_service_account, "Role": rbac.create_namespaced_role,
            "RoleBinding": rbac.create_namespaced_role_binding}
    for obj in render.render_trainer_identity(NAMESPACE, operator_api.TRAINER_ACCOUNT):
        make[obj["kind"]](NAMESPACE, obj)


def _floor_children(core, custom, made: dict, writes: bool) -> None:
    """What the operator would make for `made` (its pods, as render.render_pods renders them) and,
    with writes, its writes before they run: from the benchmark's thread, at once."""
    meta = made["metadata"]
    run = floor_run(made)
    pods = render.render_pods(run, 1)
    for pod in pods:
        core.create_namespaced_pod(meta["namespace"], pod)
    if not writes:
        return
    rv = meta["resourceVersion"]
    for st, event in floor_writes(run, pods, dt.datetime.now(dt.timezone.utc)):
        new = custom.patch_namespaced_custom_object_status(
            operator_api.GROUP, operator_api.VERSION, meta["namespace"], operator_api.PLURAL, meta["name"],
            {"metadata": {"resourceVersion": rv}, "status": st})
        rv = new["metadata"]["resourceVersion"]
        event["involvedObject"]["resourceVersion"] = rv
        core.create_namespaced_event(meta["namespace"], event)


def bench_floor(args) -> dict:
    """--floor-rounds rounds of Kubeflow unthrottled, FLOOR_PODS and FLOOR_WRITES, the order
    alternating, each on a fresh control plane with the audit log on."""
    build_kubeflow()
    n, rounds = args.floor, []
    cases = ((KUBEFLOW_UNTHROTTLED, None), (None, FLOOR_PODS), (None, FLOOR_WRITES))
    for r in range(args.floor_rounds):
        for kubeflow, floor in (cases if r % 2 == 0 else cases[::-1]):
            log(f"floor, round {r + 1}/{args.floor_rounds}: {kubeflow or 'no controller, ' + floor}")
            rounds.append(bench(n, args.gpus, args, kubeflow=kubeflow, floor=floor))
            log(json.dumps(rounds[-1]))
    return {"runs": n, "parallel": args.parallel, "rounds": rounds}


def floor_rows(floor: dict) -> dict[str, dict]:
    """Each case's medians over its rounds: time to all Running, and the CPU of kube-apiserver
    and etcd (over the case: to all Succeeded for Kubeflow, to all Running for the floors)."""
    rows = {}
    for r in floor["rounds"]:
        rows.setdefault(r["controller"], []).append(r)
    out = {}
    for name, rs in rows.items():
        server = [(r["control_plane_cpu_s"].get("kube-apiserver") or 0) + (r["control_plane_cpu_s"].get("etcd") or 0)
                  for r in rs]
        out[name] = {"rounds": len(rs), "running": [_measured(r, "all_running_after_first_apply_s") for r in rs],
                     "running_median": _median_of(rs, "all_running_after_first_apply_s"),
                     "server_cpu_median": round(_median(server), 1),
                     "client_cpu_median": _median_of(rs, "client_cpu_s")}
    return out


def floor_markdown(report: dict) -> str:
    f = report["floor"]
    rows = floor_rows(f)
    theirs = rows[KUBEFLOW_UNTHROTTLED]["running_median"]
    bound = round(0.8 * theirs, 2) if theirs is not None else None
    table = ["| | rounds: first apply -> all pods Running | median | under 0.8x Kubeflow's | "
             "kube-apiserver + etcd CPU | benchmark process CPU |", "|---|---|---:|---|---:|---:|"]
    for name, row in rows.items():
        under = "-" if name == KUBEFLOW_UNTHROTTLED or bound is None or row["running_median"] is None \
            else ("yes" if row["running_median"] <= bound else "**no**")
        table.append(f"| {name} | {', '.join(_cell(x, 's') for x in row['running'])} | "
                     f"{_cell(row['running_median'], 's')} | {under} | {row['server_cpu_median']} s | "
                     f"{row['client_cpu_median']} s |")
    load = report["load_average"]
    pods, writes = rows.get(f"none ({FLOOR_PODS})"), rows.get(f"none ({FLOOR_WRITES})")
    budget = ""
    if bound is not None and pods and writes and pods["running_median"] is not None:
        left = round(bound - pods["running_median"], 2)
        budget = (f" Over the floor, the target leaves a controller {left} s for all its own work and the API "
                  f"server's for it (at two busy cores, {round(2 * left, 1)} CPU-seconds); the operator's writes "
                  f"before its pods run cost kube-apiserver and etcd "
                  f"{round(writes['server_cpu_median'] - pods['server_cpu_median'], 1)} CPU-seconds more than "
                  "the floor alone (medians).")
    return (
        f"{FLOOR_HEADING}\n\n"
        f"`bench/operator_bench.py --floor {f['runs']} --floor-rounds {len(f['rounds']) // 3}` (`make bench-floor`; "
        f"not in `make bench-operator`: not a target), measured {report['date']} on {report['machine']}; load average {load[0]} "
        f"before, {load[1]} after.\n\n"
        f"What issue 15's speed target leaves a controller on this machine. {f['runs']} runs as in the Kubeflow "
        "comparison, on the same control plane, with no controller at all: the benchmark's "
        f"{f['parallel']} threads create each run and, right after it, the pod the operator would make "
        f"for it (`none ({FLOOR_PODS})`); and then also the status writes and Events the operator makes "
        "before that pod runs, from its own state machine (Launching, then Running: a status write and an "
        f"Event each; `none ({FLOOR_WRITES})`). Kubeflow unthrottled takes turns with them, the order "
        "alternating. CPU is user + system time from /proc, the floors' to all Running, Kubeflow's to all "
        "Succeeded; the benchmark process's is its creates (and the floors' pods and writes), not its `kubectl` "
        f"watches. 0.8x Kubeflow's median: {_cell(bound, 's')}.{budget}\n\n" + "\n".join(table) + "\n")


def kubeflow_missed(kubeflow: dict) -> list[str]:
    missed = [f"against Kubeflow ({kubeflow['runs']} runs): {t['target']}: ours {_cell(t['ours'], t['unit'])}, "
              f"at most {_cell(t['bound'], t['unit'])}" for t in kubeflow["targets"] if not t["met"]]
    missed += [f"against Kubeflow: {name}: {row['succeeded']} of {row['runs']} Succeeded in its worst round"
               for name, row in kubeflow["rows"].items() if row["succeeded"] != row["runs"]]
    return missed


def _cell(value, unit: str) -> str:
    return "n/a" if value is None else f"{value}{' ' + unit if unit else ''}"


def kubeflow_markdown(report: dict) -> str:
    k = report["kubeflow"]
    rows, rounds, n = k["rows"], k["rounds"], k["runs"]
    load = report["load_average"]
    version = KUBEFLOW_HEADING.rsplit(" ", 1)[1]
    table = ["| | " + " | ".join(label for _, label, _ in KUBEFLOW_METRICS) + " |",
             "|---|" + "---:|" * len(KUBEFLOW_METRICS)]
    for name in KUBEFLOW_ROWS:
        row = rows[name]
        table.append(f"| {name} ({row['rounds']} round{'s' if row['rounds'] != 1 else ''}) | "
                     + " | ".join(_cell(row[key], unit) for key, _, unit in KUBEFLOW_METRICS) + " |")
    targets = "\n".join(f"- {t['target']}: ours {_cell(t['ours'], t['unit'])}, at most {_cell(t['bound'], t['unit'])}: "
                        f"{'met' if t['met'] else '**missed**'}" for t in k["targets"])
    per_round = ["| round | controller | load average before / after | "
                 + " | ".join(label for _, label, _ in KUBEFLOW_METRICS) + " | Succeeded |",
                 "|---:|---|---|" + "---:|" * (len(KUBEFLOW_METRICS) + 1)]
    for i, r in enumerate([k["shipped"], *rounds]):
        per_round.append(f"| {'-' if i == 0 else (i + 1) // 2} | {r['controller']} | "
                         f"{r['load_average'][0]} / {r['load_average'][1]} | "
                         + " | ".join(_cell(_measured(r, key), unit) for key, _, unit in KUBEFLOW_METRICS)
                         + f" | {r['succeeded']}/{r['runs']} |")
    agents = "; ".join(f"beside {r['controller']}, {r.get('all_requests_by_agent')}" for r in rounds[:2])
    return (
        f"{KUBEFLOW_HEADING}\n\n"
        f"`bench/operator_bench.py --kubeflow {n} --kubeflow-rounds {len(rounds) // 2}` (in `make bench-operator`), "
        f"measured {report['date']} on {report['machine']}; load average {load[0]} before, {load[1]} after.\n\n"
        f"Kubeflow's training-operator {version}, built from its Go module (`hack/kubeflow`, "
        "`hack/build-kubeflow.sh`), runs beside the same local control plane as the operator, each on a "
        f"fresh one: {n} PyTorchJobs of one pod (its Master) against {n} AlpacaFineTunes of one pod ("
        + ("the operator making each pod itself, `eksWorkload: pods`, its default" if bare_pods(report)
           else "each a Job, `eksWorkload: job`") + "), both "
        f"{report['kubeflow']['shipped']['gpus_per_pod']} GPU(s) per pod on {INSTANCE_TYPE} nodes that fit every "
        f"pod at once ({report['kubeflow']['shipped']['gpu_nodes']} simulated), each pod running "
        f"{report['kubeflow']['shipped']['run_for']} (kwok, which ends the pods of a PyTorchJob as it does a "
        f"Job's), created from {KUBEFLOW_THREADS} client threads. The training-operator runs with "
        f"`--enable-scheme=pytorchjob --controller-threads={KUBEFLOW_THREADS}` and its other defaults "
        "(its webhook server is up, as it cannot be turned off, but no webhook configuration points the API "
        "server at it). Shipped, its client keeps controller-runtime's 20 QPS (burst 30); unthrottled, the "
        "same build with 300 QPS, burst 600 (the local controller-manager's and scheduler's), so that a "
        "client rate limit is not what is compared. The unthrottled build and the operator take turns on "
        "the machine, the order alternating from round to round; the table has each one's medians over "
        "its rounds. Requests are counted in the API server's audit log (level Metadata, on for each of "
        "these cases), each once (a watch when it starts), from just before the first create to the last "
        "run Succeeded: the operator's by its user agent (`alpaca-operator`, `training-operator...`), and "
        "every client's (the controller, kube-controller-manager, the scheduler, kwok, the benchmark's own "
        "creates and watches), divided by the runs. CPU is the processes' user + system time over the same "
        "window (/proc); peak RSS is the operator's high-water mark.\n\n"
        + "\n".join(table) + "\n\n"
        f"Targets (issue 15), ours against Kubeflow unthrottled; the bench fails on any missed:\n\n{targets}\n\n"
        "Each case:\n\n" + "\n".join(per_round) + "\n\n"
        f"Every client's requests in round 1, by user agent, over the window: {agents}.\n")


CLIENT_HEADING = "### Kubernetes client"


def _span(lines: list[str], heading: str) -> tuple[int, int] | None:
    """[start, end) of the part under `heading`, up to the next heading of its level or above."""
    level = heading.split(" ", 1)[0]
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith("#") and lines[i].split(" ", 1)[0] <= level
                and lines[i].split(" ", 1)[0].strip("#") == ""), len(lines))
    return start, end


# Parts of the "## Operator" section that their own runs write (--client, --kueue, --kubeflow).
OPERATOR_SUBPARTS = (CLIENT_HEADING, KUEUE_HEADING, KUBEFLOW_HEADING, FLOOR_HEADING)


def write_docs(section: str, heading: str = "## Operator", path: Path | None = None) -> None:
    """Replace (or add) one part of docs/benchmarks.md: the "## Operator" section (keeping
    its client comparison, Kueue and Kubeflow parts, which only --client, --kueue and
    --kubeflow rewrite) or one of those parts; leave the rest."""
    path = path or ROOT / "docs" / "benchmarks.md"
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = doc.splitlines()
    new = section.rstrip().splitlines()
    if heading == "## Operator":
        old = _span(lines, heading)
        for sub in OPERATOR_SUBPARTS:
            kept = _span(lines[old[0]:old[1]], sub) if old else None
            if kept:
                part = lines[old[0] + kept[0]:old[0] + kept[1]]
                while part and not part[-1].strip():    # one blank line between parts, not more
                    part.pop()
                new += [""] + part
    span = _span(lines, heading)
    if span is None and heading in OPERATOR_SUBPARTS and _span(lines, "## Operator"):
        end = _span(lines, "## Operator")[1]
        while end and not lines[end - 1].strip():   # one blank line before the new part
            end -= 1
        span = (end, end)
        new = [""] + new
    if span is None:
        out = lines + [""] + new
    else:
        start, end = span
        out = lines[:start] + new + ([""] if end < len(lines) else []) + lines[end:]
    path.write_text("\n".join(out).rstrip() + "\n")
    log(f"wrote {heading!r} in {path}")


def compare_clients(args) -> int:
    n = (args.runs or [200])[0]
    clients = args.client
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    rounds: list[dict[str, dict]] = []
    for r in range(args.rounds):
        order = clients[r % len(clients):] + clients[:r % len(clients)]
        rounds.append({})
        for c in order:
            log(f"round {r + 1}/{args.rounds}: {c}")
            rounds[-1][c] = bench(n, args.gpus, args, c)
            log(json.dumps(rounds[-1][c]))
    report = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
              "commit": git.stdout.strip(), "runs": n, "clients": clients, "rounds": rounds}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    text = client_markdown(report)
    print(text)
    if args.write_docs:
        write_docs(text, CLIENT_HEADING)
    return 0


CLIENT_METRICS = [("all_running_after_last_apply_s", "last run Running, after the last apply", "s"),
                  ("running_p50_s", "apply -> Running p50", "s"),
                  ("operator_cpu_s", "operator CPU", "s"),
                  ("operator_peak_rss_mib", "operator peak RSS", "MiB"),
                  ("operator_requests_per_run", "requests per run", "")]


def _median(values: list[float]) -> float:
    return pct(values, 0.5)


def client_markdown(report: dict) -> str:
    clients, rounds, ref = report["clients"], report["rounds"], report["clients"][0]
    head = "| client | " + " | ".join(label for _, label, _ in CLIENT_METRICS) + " |"
    rows = [head, "|---|" + "---:|" * len(CLIENT_METRICS)]
    for c in clients:
        cells = []
        for key, _, unit in CLIENT_METRICS:
            values = [r[c][key] for r in rounds if r[c].get(key) is not None]
            ratios = [r[c][key] / r[ref][key] for r in rounds if r[c].get(key) and r[ref].get(key)]
            cell = f"{_median(values):.1f}{' ' + unit if unit else ''}" if values else "n/a"
            if c != ref and ratios and key != "operator_requests_per_run":
                cell += f" ({_median(ratios):.2f}x)"
            cells.append(cell)
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    per_round = ["| round | client | load average before / after | last Running after last apply | "
                 "operator CPU | peak RSS | requests per run | all Succeeded |",
                 "|---:|---|---|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(rounds, 1):
        for c, x in r.items():
            per_round.append(f"| {i} | {c} | {x['load_average'][0]} / {x['load_average'][1]} | "
                             f"{x['all_running_after_last_apply_s']} s | {x['operator_cpu_s']} s | "
                             f"{x['operator_peak_rss_mib']} MiB | {x['operator_requests_per_run']} | "
                             f"{x['succeeded']}/{x['runs']} |")
    return (
        f"{CLIENT_HEADING}\n\n"
        f"`python bench/operator_bench.py --runs {report['runs']} "
        + " ".join(f"--client {c}" for c in clients) + f" --rounds {len(rounds)}`, "
        f"at commit {report['commit']}, measured {report['date']} on {report['machine']}. "
        f"{report['runs']} runs per client and round, each on a fresh control plane; the order of "
        "the clients rotates from round to round. Each client is a transport behind the same "
        "`kube.Kube` (its own kubeconfig loading, TLS, auth and HTTP stack; the same JSON "
        "decoding, retries and counting), so only the client differs. Medians over the rounds; "
        f"in brackets the median of the per-round ratios to {ref} (the rounds are paired: the "
        "machine is shared, its load moves).\n\n"
        + "\n".join(rows) + "\n\nEach round:\n\n" + "\n".join(per_round) + "\n")


def gang(r: dict) -> str:
    n = r["pods"] // r["runs"]
    return f" of {n} nodes x {r['gpus_per_pod']} GPUs" if n > 1 else ""


def markdown(report: dict) -> str:
    rows = ["| runs | pods x GPUs (GPU nodes) | apply -> all pods Running p50 / p95 / max | "
            "last run Running, after the last apply | all Succeeded, after the first apply | "
            "operator peak RSS | operator CPU | operator API requests per run |",
            "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        rows.append(
            f"| {r['runs']} | {r['pods']} x {r['gpus_per_pod']} ({r['gpu_nodes']}) | "
            f"{r['running_p50_s']} / {r['running_p95_s']} / {r['running_max_s']} s | "
            f"{r['all_running_after_last_apply_s']} s | {r['all_succeeded_s']} s | "
            f"{r['operator_peak_rss_mib']} MiB | {r['operator_cpu_s']} s | {r['operator_requests_per_run']} |")
    detail = "\n".join(
        f"- {r['runs']} runs{gang(r)}: created in {r['apply_seconds']} s; workload (Jobs, or bare pods) created "
        f"{r['job_created_p50_s']} s (p50) / {r['job_created_max_s']} s (max) after each apply; "
        f"control plane CPU seconds {r['control_plane_cpu_s']}; requests {r['operator_requests_by_kind']}"
        + (f"; the benchmark's watches closed by the API server and started again: {r['watch_restarts']}"
           if r.get("watch_restarts") else "") + "."
        for r in report["results"])
    load = report["load_average"]
    return (
        "## Operator\n\n"
        "`make bench-operator` (`bench/operator_bench.py`): N AlpacaFineTunes created at once "
        "(16 client threads) on a control plane of its own whose simulated nodegroup fits every "
        f"pod; each pod runs {report['results'][0]['run_for']} (kwok). Times are from each run's create call to all its pods "
        "Running (seen by a watch), and to every run Succeeded. The operator's memory and CPU "
        "come from /proc; its requests are counted by its own client (kopf's few watch streams "
        "come on top). "
        + ("The operator makes each run's pods itself (`eksWorkload: pods`, its default).\n\n"
           if bare_pods(report) else
           "Each run's attempt is a Job (`eksWorkload: job`), whose pods kube-controller-manager makes.\n\n")
        + f"Measured {report['date']} on {report['machine']}; load average {load[0]} before, "
        f"{load[1]} after (a machine shared with other builds: the control plane and the "
        "operator share its 2 cores).\n\n"
        + "\n".join(rows) + "\n\n"
        "Targets: 500 runs all Running within 60 s of the last apply; operator under 200 MiB. "
        "The rows past 500 runs, and those of gangs of several nodes, record how the figures grow "
        "(issue 15); they have no target.\n\n"
        + detail + "\n")


if __name__ == "__main__":
    sys.exit(main())
