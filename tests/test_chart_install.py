"""charts/alpaca-operator installed into the real control plane: its Deployment, its
ServiceAccount alone driving full EKS lifecycles (the operator runs as a local process with
a TokenRequest token of that account, since kwok's pods run nothing), what that account may
do, the metrics of the lifecycle, `helm upgrade` of the CRD and `helm uninstall`."""
from __future__ import annotations

import re
import shutil
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from alpaca_operator import api
from alpaca_operator.__main__ import priority_from_ip
from alpaca_operator.status import parse_time
from operator_harness import OperatorProcess, free_port, get_json, service_account_env, wait_for
from test_chart import CHART, helm, values_file
from test_operator_eks import apply, attempt_names, finetune, jobs, made_from, phase_is
from test_operator_peering import reporters

ROOT = Path(__file__).resolve().parent.parent
CRD_FILE = ROOT / "manifests" / "crd" / "alpacafinetunes.alpaca.dev.yaml"
P = "alpaca_operator"


class Release:
    def __init__(self, cluster, name: str, namespace: str, tmp: Path):
        self.cluster, self.name, self.namespace, self.tmp = cluster, name, namespace, tmp
        self.fullname = f"{name}-alpaca-operator"
        self.installed = False

    def helm(self, *args: str, check: bool = True):
        return helm(*args, "--namespace", self.namespace, env=self.cluster.env, check=check)

    def install(self, values: dict, chart: Path = CHART, verb: str = "install", *extra: str):
        self.helm(verb, self.name, str(chart), "-f", values_file(self.tmp, values),
                  "--wait", "--timeout", "120s", *extra)
        self.installed = True

    def uninstall(self):
        if self.installed:
            self.helm("uninstall", self.name, "--wait", "--timeout", "60s")
            self.installed = False

    def operator(self, log: Path, *args: str, extra_env: dict | None = None) -> OperatorProcess:
        env = service_account_env(self.cluster, self.tmp / f"{self.name}.kubeconfig", self.namespace, self.fullname)
        return OperatorProcess(env, log, extra_env=extra_env, args=("--peering", self.fullname, *args))

    def can_i(self, verb: str, resource: str, namespace: str) -> bool:
        resource, _, sub = resource.partition("/")
        proc = self.cluster.kubectl("auth", "can-i", verb, resource, *([f"--subresource={sub}"] if sub else []),
                                    "-n", namespace,
                                    f"--as=system:serviceaccount:{self.namespace}:{self.fullname}", check=False)
        return proc.stdout.strip() == "yes"


@pytest.fixture(scope="module")
def cluster_wide(cluster, tmp_path_factory):
    """The default install: CRDs with the release, every namespace."""
    rel = Release(cluster, f"cw{uuid.uuid4().hex[:5]}", f"alpaca-cw-{uuid.uuid4().hex[:5]}",
                  tmp_path_factory.mktemp("chart-cw"))
    cluster.kubectl("create", "namespace", rel.namespace)
    try:
        # --take-ownership: the CRD may be there already (kubectl apply -f manifests/crd/,
        # as the other tests and users without helm do); --force-conflicts: kubectl then
        # co-owns its fields, and the chart's copy wins.
        rel.install({}, CHART, "install", "--take-ownership", "--force-conflicts")
        yield rel
    finally:
        rel.uninstall()
        # Back to the one source (the upgrade test added a field).
        cluster.kubectl("replace", "-f", str(CRD_FILE), check=False)
        cluster.kubectl("delete", "namespace", rel.namespace, "--wait=false", check=False)


@pytest.fixture(scope="module")
def namespaced(cluster, cluster_wide, tmp_path_factory):
    """A second release watching one namespace only, with namespaced RBAC; the CRDs and
    the admission policy are the first release's."""
    rel = Release(cluster, f"ns{uuid.uuid4().hex[:5]}", f"alpaca-ns-{uuid.uuid4().hex[:5]}",
                  tmp_path_factory.mktemp("chart-ns"))
    rel.watched = f"runs-{uuid.uuid4().hex[:6]}"
    for ns in (rel.namespace, rel.watched):
        cluster.kubectl("create", "namespace", ns)
    try:
        # Cluster-scoped objects (CRDs, the admission policy) are the first release's.
        rel.install({"crds": {"enabled": False}, "admissionPolicy": {"enabled": False},
                     "watchNamespaces": [rel.watched]})
        yield rel
    finally:
        rel.uninstall()
        cluster.kubectl("delete", "namespace", rel.namespace, rel.watched, "--wait=false", check=False)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# An HTTP 403 in a log line, not the digits 403 inside a number: the harness's start lines
# carry a Unix time with milliseconds ("start #1 at 1796506907.403"), and kopf's lines a
# time with milliseconds after a comma ("[2026-12-08 00:08:20,403]").
HTTP_403 = re.compile(r"(?<![\d.,])403(?![\d.])")


def assert_no_forbidden(op: OperatorProcess) -> None:
    log = op.log_path.read_text(errors="replace")
    bad = [ln for ln in log.splitlines() if HTTP_403.search(ln) or "forbidden" in ln.lower()
           or "Not enough permissions" in ln]
    assert not bad, "the operator was refused something:\n" + "\n".join(bad[:20])


# ---- tests ---------------------------------------------------------------------------

def test_install_runs_the_deployment_under_the_charts_account(cluster, cluster_wide):
    rel = cluster_wide
    dep = get_json(cluster, "deployment", rel.fullname, "-n", rel.namespace)
    assert dep["status"].get("availableReplicas") == 1
    pods = get_json(cluster, "pods", "-n", rel.namespace, "-l", f"app.kubernetes.io/instance={rel.name}")["items"]
    assert [p["spec"]["serviceAccountName"] for p in pods] == [rel.fullname]
    assert get_json(cluster, "clusterkopfpeering", rel.fullname)["metadata"]["name"] == rel.fullname
    crd = get_json(cluster, "crd", "alpacafinetunes.alpaca.dev")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == rel.name


# What the operator calls in a run's namespace (docs/operator.md, "Permissions"); the
# account may do exactly this there, besides what every authenticated user may.
RUN_NAMESPACE_RULES = {
    "alpacafinetunes.alpaca.dev": {"get", "list", "watch", "patch"},
    "alpacafinetunes.alpaca.dev/status": {"get", "patch"},
    "alpacafinetunes.alpaca.dev/finalizers": {"update"},
    "jobs.batch": {"get", "list", "watch", "create", "patch", "delete"},
    "services": {"get", "create", "delete"},
    "serviceaccounts": {"get", "create", "delete"},
    "configmaps": {"get", "delete"},
    # The default eksWorkload, pods: the operator makes, watches and deletes a gang's pods.
    "pods": {"get", "list", "watch", "create", "delete"},
    "roles.rbac.authorization.k8s.io": {"get", "create", "patch", "delete"},
    "rolebindings.rbac.authorization.k8s.io": {"get", "create", "delete"},
    "events": {"create", "list"},
    "workloads.kueue.x-k8s.io": {"list", "patch"},
}
EVERYONE = {"selfsubjectreviews.authentication.k8s.io", "selfsubjectaccessreviews.authorization.k8s.io",
            "selfsubjectrulesreviews.authorization.k8s.io"}


def allowed(rel: Release, namespace: str) -> dict[str, set[str]]:
    """`kubectl auth can-i --list` as the chart's account: resource -> verbs."""
    out = rel.cluster.kubectl("auth", "can-i", "--list", "-n", namespace,
                              f"--as=system:serviceaccount:{rel.namespace}:{rel.fullname}").stdout
    rules: dict[str, set[str]] = {}
    for line in out.splitlines()[1:]:
        cols = line.split()
        if cols and not cols[0].startswith("[") and cols[0] not in EVERYONE:
            rules.setdefault(cols[0], set()).update(line[line.rindex("[") + 1:line.rindex("]")].split())
    return rules


def test_the_account_may_do_what_the_operator_calls_and_nothing_else(cluster, cluster_wide, namespaced):
    elsewhere = "default"
    cluster_scoped = {"customresourcedefinitions.apiextensions.k8s.io": {"list", "watch"}}
    assert allowed(cluster_wide, elsewhere) == {**RUN_NAMESPACE_RULES, **cluster_scoped,
                                                "clusterkopfpeerings.kopf.dev": {"get", "list", "watch", "patch"},
                                                "nodes": {"get", "list"},
                                                "workloadpriorityclasses.kueue.x-k8s.io": {"get"}}
    assert allowed(namespaced, namespaced.watched) == {**RUN_NAMESPACE_RULES, **cluster_scoped,
                                                       "namespaces": {"list", "watch"},
                                                       "kopfpeerings.kopf.dev": {"get", "list", "watch", "patch"}}
    assert allowed(namespaced, elsewhere) == {**cluster_scoped, "namespaces": {"list", "watch"}}
    # The same, asked one by one as the issue puts it: no Secrets, no ConfigMap or pod reads
    # beyond what it uses.
    for rel, ns in ((cluster_wide, elsewhere), (namespaced, namespaced.watched)):
        for verb, resource in [("get", "secrets"), ("list", "secrets"), ("watch", "secrets"),
                               ("list", "configmaps"), ("watch", "configmaps"), ("update", "pods"),
                               ("patch", "pods"), ("create", "pods/exec"), ("get", "pods/log")]:
            assert not rel.can_i(verb, resource, ns), f"{rel.name} may {verb} {resource} in {ns}"
        assert rel.can_i("watch", "pods", ns) and rel.can_i("get", "configmaps", ns)


def test_namespaced_account_drives_lifecycles_and_the_metrics_move(cluster, namespaced, tmp_path):
    """Two replicas as the chart runs them (priorities from their pod IPs, the chart's
    KopfPeering): the higher one drives the runs, the standby does nothing."""
    rel, ns = namespaced, namespaced.watched
    port, standby_port = free_port(), free_port()
    op, standby = (rel.operator(tmp_path / f"{who}.log", "--namespace", ns, "--metrics-port", str(p),
                                extra_env={"POD_IP": ip, "POD_NAME": f"replica-{who}", "ALPACA_PEERING_LIFETIME": "10"})
                   for who, ip, p in (("high", "10.1.0.2", port), ("low", "10.1.0.1", standby_port)))
    op.start()
    standby.start()
    try:
        expected = {priority_from_ip("10.1.0.2"), priority_from_ip("10.1.0.1")}
        wait_for("both replicas in the chart's KopfPeering", lambda: expected <= {
            p.get("priority") for p in (get_json(cluster, "kopfpeering", rel.fullname, "-n", ns).get("status") or {}).values()},
            timeout=30, on_timeout=standby.tail)
        before = scrape(port)
        assert sample(before, f"{P}_reconciles_total", backend="eks") == 0
        apply(cluster, ns, finetune("ok", run_for="3s"),
              finetune("flaky", run_for="1s", fail=3, run_policy={"backoffLimit": 1}))

        def running():
            s = scrape(port)
            return s if sample(s, f"{P}_runs", phase="Running", backend="eks") >= 1 else None
        during = wait_for("a run Running in the metrics", running, timeout=60, on_timeout=lambda: op.tail(40))
        assert sample(during, f"{P}_time_to_running_seconds_count", backend="eks") >= 1
        for name, phase in (("ok", "Succeeded"), ("flaky", "Failed")):
            body = wait_for(f"{name} {phase}", phase_is(cluster, ns, name, "Succeeded", "Failed"), timeout=90,
                            on_timeout=lambda: op.tail(40))
            assert body["status"]["phase"] == phase, body["status"]
        assert get_json(cluster, "aft", "flaky", "-n", ns)["status"]["attempts"] == 2

        after = wait_for("the final phases in the metrics", lambda: (lambda s: s if sample(
            s, f"{P}_runs", phase="Failed", backend="eks") == 1 else None)(scrape(port)), timeout=10)
        assert sample(after, f"{P}_runs", phase="Succeeded", backend="eks") == 1
        assert sample(after, f"{P}_runs", phase="Running", backend="eks") == 0
        assert sample(after, f"{P}_run_restarts_total", backend="eks", cause="WorkerFailed") == 1
        # ok once; flaky's first attempt perhaps (its pods fail after 1 s), never its restart.
        assert 1 <= sample(after, f"{P}_time_to_running_seconds_count", backend="eks") <= 2
        assert sample(after, f"{P}_reconciles_total", backend="eks") > sample(during, f"{P}_reconciles_total",
                                                                              backend="eks") > 0
        assert sample(after, f"{P}_reconcile_duration_seconds_count", backend="eks") == \
            sample(after, f"{P}_reconciles_total", backend="eks")
        # Two attempts of flaky and one of ok: three pods created, the namespace's trainer
        # identity (3), at least Launching, Running and the end's Events of each run; status
        # patched.
        assert sample(after, f"{P}_api_calls_total", system="kubernetes", verb="POST", code="201") >= 3 + 3 + 2 * 3
        assert sample(after, f"{P}_api_calls_total", system="kubernetes", verb="PATCH", code="200") >= 6
        assert sample(after, f"{P}_api_errors_total", system="kubernetes", verb="POST", code="403") == 0
        assert_no_forbidden(op)
        assert reporters(cluster, ns, "ok") == reporters(cluster, ns, "flaky") == {"replica-high"}
        assert sample(scrape(standby_port), f"{P}_reconciles_total", backend="eks") == 0
        assert_no_forbidden(standby)
    finally:
        op.stop()
        standby.stop()


def test_cluster_wide_account_drives_a_lifecycle(cluster, cluster_wide, namespace, tmp_path):
    port = free_port()
    op = cluster_wide.operator(tmp_path / "operator.log", "--metrics-port", str(port))
    op.start()
    try:
        apply(cluster, namespace, finetune("cw", run_for="2s"))
        body = wait_for("cw Succeeded", phase_is(cluster, namespace, "cw", "Succeeded", "Failed"), timeout=90,
                        on_timeout=lambda: op.tail(40))
        assert body["status"]["phase"] == "Succeeded", body["status"]
        assert sample(scrape(port), f"{P}_runs", phase="Succeeded", backend="eks") >= 1
        assert_no_forbidden(op)
        # Under the chart's account (no `bind` verb) the trainer identity's RoleBinding is
        # refused until its Role exists: a normal run must neither warn nor wait for a retry.
        warnings = [f"{e['involvedObject']['kind']}/{e['involvedObject']['name']}: {e['reason']}: {e['message']}"
                    for e in get_json(cluster, "events", "-n", namespace,
                                      "--field-selector", "type=Warning")["items"]]
        assert not warnings, warnings
        assert attempt_names(cluster, namespace, "cw") == ["cw-a1"]
        rank0 = made_from(cluster, namespace, op, "cw", 1)
        delay = parse_time(rank0["metadata"]["creationTimestamp"]) - parse_time(body["metadata"]["creationTimestamp"])
        assert delay.total_seconds() <= 3, f"the workload was created {delay} after the run"
    finally:
        op.stop()


def test_the_job_workload_runs_a_gang_under_the_charts_own_rbac(cluster, cluster_wide, tmp_path):
    """eksWorkload: job, namespaced: the chart's account makes the gang's Job, and reads its
    pods without making, watching or deleting any, ends a failed gang and restarts it,
    without a refusal or a Warning."""
    rel = Release(cluster, f"pd{uuid.uuid4().hex[:5]}", f"alpaca-pd-{uuid.uuid4().hex[:5]}", tmp_path)
    ns = f"runs-{uuid.uuid4().hex[:6]}"
    for n in (rel.namespace, ns):
        cluster.kubectl("create", "namespace", n)
    try:
        rel.install({"crds": {"enabled": False}, "admissionPolicy": {"enabled": False},
                     "watchNamespaces": [ns], "eksWorkload": "job"})
        # The operator runs here as the chart's Deployment would run it: with its environment.
        deployment = get_json(cluster, "deployment", rel.fullname, "-n", rel.namespace)
        env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
               if e["name"] == api.WORKLOAD_ENV}
        assert env == {api.WORKLOAD_ENV: "job"}
        assert rel.can_i("create", "jobs.batch", ns) and rel.can_i("list", "pods", ns)
        assert not any(rel.can_i(verb, "pods", ns) for verb in ("get", "watch", "create", "delete"))
        op = rel.operator(tmp_path / "operator.log", "--namespace", ns, extra_env=env)
        op.start()
        try:
            apply(cluster, ns, finetune("gang", nodes=2, run_for="2s"),
                  finetune("flaky", run_for="1s", fail=3, run_policy={"backoffLimit": 1}))
            for name, phase in (("gang", "Succeeded"), ("flaky", "Failed")):
                body = wait_for(f"{name} {phase}", phase_is(cluster, ns, name, "Succeeded", "Failed"), timeout=90,
                                on_timeout=lambda: op.tail(40))
                assert body["status"]["phase"] == phase, body["status"]
            assert get_json(cluster, "aft", "flaky", "-n", ns)["status"]["attempts"] == 2
            assert [j["metadata"]["name"] for j in jobs(cluster, ns, "gang")] == ["gang-a1"]
            assert all(api.LABEL_JOB_NAME in p["metadata"]["labels"]
                       for p in get_json(cluster, "pods", "-n", ns)["items"])
            assert_no_forbidden(op)
            warnings = [f"{e['involvedObject']['kind']}/{e['involvedObject']['name']}: {e['reason']}"
                        for e in get_json(cluster, "events", "-n", ns, "--field-selector", "type=Warning")["items"]
                        if not e["involvedObject"]["name"].startswith("flaky")]   # its Jobs fail on purpose
            assert not warnings, warnings
        finally:
            op.stop()
    finally:
        rel.uninstall()
        cluster.kubectl("delete", "namespace", rel.namespace, ns, "--wait=false", check=False)


def test_upgrade_upgrades_the_crd_and_uninstall_keeps_it_and_the_runs(cluster, cluster_wide, namespace, tmp_path):
    rel = cluster_wide
    # A chart whose CRD has a new optional field (the copy resolves the symlinks).
    chart = tmp_path / "alpaca-operator"
    shutil.copytree(CHART, chart, symlinks=False)
    crd_path = chart / "files" / "crd" / CRD_FILE.name
    crd = yaml.safe_load(crd_path.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"]["notes"] = {"type": "string", "description": "a new optional field"}
    crd_path.write_text(yaml.safe_dump(crd, sort_keys=False))
    # --force-conflicts: in this shared control plane kubectl applied the CRD too (the other
    # tests' `crd` fixture, like a user who had applied manifests/crd/), and server-side
    # apply would otherwise refuse to move fields that kubectl co-owns.
    rel.install({}, chart, "upgrade", "--force-conflicts")

    live = get_json(cluster, "crd", "alpacafinetunes.alpaca.dev")
    assert "notes" in live["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    run = finetune("kept", run_for="1h")
    run["spec"]["runPolicy"] = {"suspend": True}
    run["spec"]["notes"] = "survives the upgrade and the uninstall"
    apply(cluster, namespace, run)
    assert get_json(cluster, "aft", "kept", "-n", namespace)["spec"]["notes"] == run["spec"]["notes"]

    rel.uninstall()
    assert cluster.kubectl("get", "deployment", rel.fullname, "-n", rel.namespace, check=False).returncode != 0
    assert cluster.kubectl("get", "clusterrole", rel.fullname, check=False).returncode != 0
    assert get_json(cluster, "crd", "alpacafinetunes.alpaca.dev")["metadata"]["name"]
    assert get_json(cluster, "aft", "kept", "-n", namespace)["spec"]["notes"] == run["spec"]["notes"]
