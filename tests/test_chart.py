"""charts/alpaca-operator rendered: helm lint, the values schema, the CRD's one source, what
each value does, and every object checked by the control plane's own OpenAPI (server-side
dry-run). Installing it for real is tests/test_chart_install.py."""
from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "alpaca-operator"
HELM = str(ROOT / ".bin" / "helm")
LOCAL_EXEC = {"nodeSelector": {"alpaca.dev/local-exec": "true"},
              "tolerations": [{"key": "alpaca.dev/local-exec", "operator": "Equal", "value": "true",
                               "effect": "NoSchedule"}]}
DIGEST = "sha256:" + "ab" * 32
# Namespaced mode, several replicas, metrics and a ServiceMonitor, placement, identities.
NON_DEFAULT = {
    "replicaCount": 3,
    "watchNamespaces": ["team-a", "team-b"],
    "image": {"repository": "registry.example.com/ml/alpaca-operator", "digest": DIGEST},
    "healthPort": 8181,
    "metrics": {"enabled": True, "port": 9191, "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "serviceAccount": {"irsaRoleArn": "arn:aws:iam::123456789012:role/alpaca-operator"},
    "defaults": {"trainingImage": "registry.example.com/ml/alpaca-train:1.2"},
    "sagemaker": {"region": "eu-west-1", "roleArn": "arn:aws:iam::123456789012:role/SageMakerExecution",
                  "image": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/alpaca-train:1.2"},
    "logLevel": "debug",
    "eksWorkload": "job",
    "podAnnotations": {"example.com/team": "ml"},
    "resources": {"requests": {"cpu": "200m", "memory": "200Mi"}, "limits": {"memory": "300Mi"}},
    **LOCAL_EXEC,
}


def helm(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def values_file(tmp_path: Path, values: dict) -> str:
    path = tmp_path / f"values-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(values))
    return str(path)


def render(tmp_path: Path, values: dict | None = None, *, namespace: str = "alpaca-system",
           release: str = "alpaca-operator", chart: Path = CHART) -> list[dict]:
    out = helm("template", release, str(chart), "--namespace", namespace,
               "-f", values_file(tmp_path, values or {})).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    (doc,) = by_kind(docs, kind)
    return doc


def crd_sources() -> list[dict]:
    """manifests/crd/ (the CRD and its immutability policy) and manifests/peering/ (kopf's CRDs)."""
    return [d for p in sorted([*(ROOT / "manifests" / "crd").glob("*.yaml"),
                               *(ROOT / "manifests" / "peering").glob("*.yaml")])
            for d in yaml.safe_load_all(p.read_text()) if d]


def kind_and_name(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


# ---- lint and schema ---------------------------------------------------------------

def test_helm_lint_default_and_non_default(tmp_path):
    helm("lint", "--strict", str(CHART))
    helm("lint", "--strict", str(CHART), "-f", values_file(tmp_path, NON_DEFAULT))
    for values in sorted((CHART / "ci").glob("*.yaml")):
        helm("lint", "--strict", str(CHART), "-f", str(values))


def test_local_exec_values_place_the_operator_on_a_local_exec_node(tmp_path):
    docs = render(tmp_path, yaml.safe_load((CHART / "ci" / "local-exec-values.yaml").read_text()))
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == LOCAL_EXEC["nodeSelector"] and pod["tolerations"] == LOCAL_EXEC["tolerations"]
    # A node that runs the command without the image needs the command itself.
    assert pod["containers"][0]["command"] == ["python", "-m", "alpaca_operator"]


def test_peering_priorities_from_pod_ips_are_distinct():
    from alpaca_operator.__main__ import priority_from_ip
    ips = ["10.244.0.7", "10.244.1.7", "10.244.0.8", "fd00::7", "fd00::1:7"]
    priorities = [priority_from_ip(ip) for ip in ips]
    assert len(set(priorities)) == len(ips) and all(p > 0 for p in priorities)
    assert priority_from_ip(None) is None and priority_from_ip("") is None


@pytest.mark.parametrize("values, named", [
    ({"replicaCount": -1}, "/replicaCount"),
    ({"replicaCount": "two"}, "/replicaCount"),
    ({"logLevel": "loud"}, "/logLevel"),
    ({"image": {"digest": "latest"}}, "/image/digest"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
    ({"serviceAccount": {"irsaRoleArn": "alpaca-operator"}}, "/serviceAccount/irsaRoleArn"),
    ({"sagemaker": {"region": "Europe"}}, "/sagemaker/region"),
    # SageMaker pulls from ECR only: the chart refuses another registry's image at install.
    ({"sagemaker": {"image": "ghcr.io/alpaca-operator/train:0.1.0"}}, "/sagemaker/image"),
    ({"metrics": {"port": 8080}}, "/metrics/port"),
    ({"healthPort": 80}, "/healthPort"),
    ({"tolerations": [{"key": "k", "effect": "Never"}]}, "/tolerations/0/effect"),
    ({"nodeSelector": {"alpaca.dev/local-exec": True}}, "/nodeSelector/alpaca.dev~1local-exec"),
    ({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
    ({"replicas": 2}, "'replicas' not allowed"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_schema_refuses_a_bad_value_naming_it(tmp_path, values, named):
    # `helm install` checks the values the same way before it talks to any cluster.
    verb = ("install", "--dry-run=client") if "logLevel" in values else ("template",)
    proc = helm(*verb, "x", str(CHART), "-f", values_file(tmp_path, values), check=False)
    assert proc.returncode != 0, f"{values} was accepted"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert named in proc.stderr, proc.stderr


# ---- the CRD -----------------------------------------------------------------------

def test_chart_crds_are_exactly_manifests_crd_plus_keep(tmp_path):
    """The chart reads manifests/crd/ (and manifests/peering/) through symlinks: a copy that
    drifted, or a CRD left out, fails here. The CRD's immutability policy comes and stays
    with it."""
    for link in ("crd", "peering"):
        assert (CHART / "files" / link).is_symlink(), f"files/{link} must link to manifests/{link}, not copy it"
    sources = {kind_and_name(d) for d in crd_sources()}
    assert ("ValidatingAdmissionPolicy", "alpacafinetune-immutability.alpaca.dev") in sources
    rendered = [d for d in render(tmp_path) if kind_and_name(d) in sources]
    for doc in rendered:
        assert doc["metadata"]["annotations"].pop("helm.sh/resource-policy") == "keep"
        if not doc["metadata"]["annotations"]:
            del doc["metadata"]["annotations"]
    assert sorted(rendered, key=kind_and_name) == sorted(crd_sources(), key=kind_and_name)
    assert not [d for d in render(tmp_path, {"crds": {"enabled": False}}) if kind_and_name(d) in sources]


def test_chart_admission_policy_is_manifests_policy_exempting_its_own_account(tmp_path):
    """The trainer-status policy comes from manifests/policy/ (one source); only the
    operator's account it exempts is the release's own."""
    assert (CHART / "files" / "policy").is_symlink()
    source = [d for p in sorted((ROOT / "manifests" / "policy").glob("*.yaml"))
              for d in yaml.safe_load_all(p.read_text()) if d]
    names = {kind_and_name(d) for d in source}
    docs = render(tmp_path, namespace="ml-ops")
    rendered = [d for d in docs if kind_and_name(d) in names]
    account = one(docs, "ServiceAccount")["metadata"]["name"]
    exempt = [c for c in rendered[0]["spec"]["matchConditions"] if c["name"] == "not-the-operator"]
    assert exempt and f"system:serviceaccount:ml-ops:{account}" in exempt[0]["expression"]
    assert json.dumps(rendered).replace(f"ml-ops:{account}", "alpaca-system:alpaca-operator") == json.dumps(source)
    off = render(tmp_path, {"admissionPolicy": {"enabled": False}})
    assert [kind_and_name(d) for d in by_kind(off, "ValidatingAdmissionPolicy")] == [
        ("ValidatingAdmissionPolicy", "alpacafinetune-immutability.alpaca.dev")]   # the CRD's, not this one


# ---- what the values do ------------------------------------------------------------

def test_defaults_one_hardened_replica_cluster_wide(tmp_path):
    docs = render(tmp_path)
    dep = one(docs, "Deployment")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/alpaca-operator/operator:0.1.0"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert "--liveness=http://0.0.0.0:8080/healthz" in c["args"]
    assert {"name": "health", "containerPort": 8080} in c["ports"]
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    name = dep["metadata"]["name"]
    assert f"--peering={name}" in c["args"] and not any(a.startswith("--namespace") for a in c["args"])
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == name
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert not by_kind(docs, "Role") and not by_kind(docs, "KopfPeering")
    assert one(docs, "Service")["spec"]["ports"][0]["port"] == 9090
    assert not by_kind(docs, "ServiceMonitor")


def test_rbac_is_least_privilege(tmp_path):
    for docs in (render(tmp_path), render(tmp_path, NON_DEFAULT)):
        for role in [*by_kind(docs, "ClusterRole"), *by_kind(docs, "Role")]:
            for rule in role["rules"]:
                where = f"{role['kind']}/{role['metadata']['name']} {rule}"
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], where
                assert "secrets" not in rule["resources"], where
                if {"configmaps", "pods"} & set(rule["resources"]):
                    # configmaps: get a named one (configMapRef), delete an earlier version's
                    # own; pods: the gang's bare pods (the default eksWorkload), never update,
                    # patch, exec or logs.
                    allowed = {"configmaps": {"get", "delete"}, "pods": {"get", "list", "watch", "create", "delete"}}
                    for r in {"configmaps", "pods"} & set(rule["resources"]):
                        assert set(rule["verbs"]) <= allowed[r], where


def test_non_default_values(tmp_path):
    docs = render(tmp_path, NON_DEFAULT, namespace="ml-ops")
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert dep["spec"]["replicas"] == 3 and dep["spec"]["strategy"] == {"type": "Recreate"}
    assert c["image"] == f"registry.example.com/ml/alpaca-operator@{DIGEST}"
    assert pod["nodeSelector"] == LOCAL_EXEC["nodeSelector"] and pod["tolerations"] == LOCAL_EXEC["tolerations"]
    assert dep["spec"]["template"]["metadata"]["annotations"] == {"example.com/team": "ml"}
    assert c["resources"] == NON_DEFAULT["resources"]
    # Standbys spread over nodes.
    assert pod["affinity"]["podAntiAffinity"]
    assert {"--namespace=team-a", "--namespace=team-b", "--metrics-port=9191", "--debug",
            "--liveness=http://0.0.0.0:8181/healthz"} <= set(c["args"])
    assert {"name": "health", "containerPort": 8181} in c["ports"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["ALPACA_TRAINING_IMAGE"] == "registry.example.com/ml/alpaca-train:1.2"
    assert env["AWS_REGION"] == "eu-west-1"
    assert env["ALPACA_SAGEMAKER_ROLE_ARN"] == NON_DEFAULT["sagemaker"]["roleArn"]
    assert env["ALPACA_SAGEMAKER_IMAGE"] == NON_DEFAULT["sagemaker"]["image"]
    assert "POD_IP" in env     # the peering priority
    sa = one(docs, "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == NON_DEFAULT["serviceAccount"]["irsaRoleArn"]
    # Namespaced: a Role, a binding to the chart's account and a peering object per namespace;
    # cluster-wide only kopf's discovery.
    for kind in ("Role", "RoleBinding", "KopfPeering"):
        assert sorted(d["metadata"]["namespace"] for d in by_kind(docs, kind)) == ["team-a", "team-b"], kind
    for rb in by_kind(docs, "RoleBinding"):
        assert rb["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "ml-ops"}]
    (cluster_role,) = by_kind(docs, "ClusterRole")
    assert {r for rule in cluster_role["rules"] for r in rule["resources"]} == {"customresourcedefinitions", "namespaces"}
    assert {v for rule in cluster_role["rules"] for v in rule["verbs"]} == {"list", "watch"}
    assert not by_kind(docs, "ClusterKopfPeering")
    svc, mon = one(docs, "Service"), one(docs, "ServiceMonitor")
    assert svc["spec"]["ports"][0]["port"] == 9191
    assert mon["metadata"]["labels"]["release"] == "prom"
    assert mon["spec"]["endpoints"][0]["port"] == "metrics"
    assert all(mon["spec"]["selector"]["matchLabels"][k] == v for k, v in svc["metadata"]["labels"].items()
               if k in mon["spec"]["selector"]["matchLabels"])


def test_metrics_and_health_on_one_port_are_refused_naming_both(tmp_path):
    proc = helm("template", "x", str(CHART), "-f", values_file(tmp_path, {"healthPort": 9090}), check=False)
    assert proc.returncode != 0 and "metrics.port and healthPort must differ (both are 9090)" in proc.stderr, proc.stderr
    helm("template", "x", str(CHART), "-f", values_file(tmp_path, {"healthPort": 9090, "metrics": {"enabled": False}}))


def test_pod_identity_notes_and_ack_association(tmp_path):
    values = {"serviceAccount": {"podIdentity": {"roleArn": "arn:aws:iam::123456789012:role/op",
                                                 "clusterName": "ml"}}}
    out = helm("install", "x", str(CHART), "--dry-run=client", "-n", "ops",
               "-f", values_file(tmp_path, values)).stdout
    # NOTES.txt: what to run next.
    assert "kubectl -n ops rollout status deployment/x-alpaca-operator" in out and "kubectl get aft" in out
    assert ("aws eks create-pod-identity-association --cluster-name ml" in out
            and "--role-arn arn:aws:iam::123456789012:role/op" in out), out
    values["serviceAccount"]["podIdentity"]["ackAssociation"] = True
    pia = one(render(tmp_path, values, namespace="ops", release="x"), "PodIdentityAssociation")
    assert pia["spec"] == {"clusterName": "ml", "namespace": "ops", "serviceAccount": "x-alpaca-operator",
                           "roleARN": "arn:aws:iam::123456789012:role/op"}


# ---- validated by the control plane ------------------------------------------------

def test_every_object_passes_the_api_servers_openapi(cluster, tmp_path):
    """Server-side dry-run: the API server's own schemas (1.34) and admission, nothing stored."""
    ns = f"chart-dry-{uuid.uuid4().hex[:6]}"
    watched = [f"{ns}-a", f"{ns}-b"]
    cases = {"default": render(tmp_path, namespace=ns),
             "non-default": render(tmp_path, {**NON_DEFAULT, "watchNamespaces": watched}, namespace=ns,
                                   release="other")}
    # The CRDs are the sources the other tests install too; apply them for real so that
    # the peering objects can be checked against them.
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                    input="\n---\n".join(json.dumps(d) for d in crd_sources()))
    for crd in by_kind(crd_sources(), "CustomResourceDefinition"):
        cluster.wait_established(crd["metadata"]["name"])
    for name in (ns, *watched):
        cluster.kubectl("create", "namespace", name)
    try:
        for case, docs in cases.items():
            # The Prometheus Operator's CRD is not in this cluster: that one object is
            # checked by test_non_default_values only.
            objects = [d for d in docs if d["kind"] != "ServiceMonitor"]
            assert len(docs) - len(objects) == (1 if case == "non-default" else 0)
            proc = cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-",
                                   input="\n---\n".join(json.dumps(d) for d in objects), check=False)
            assert proc.returncode == 0, f"{case}: {proc.stderr}"
            assert proc.stdout.count("(server dry run)") == len(objects), proc.stdout
    finally:
        cluster.kubectl("delete", "namespace", ns, *watched, "--wait=false", check=False)


def test_eks_workload_sets_the_operator_and_grants_pods_only_where_it_makes_them(tmp_path):
    def pod_verbs(docs: list[dict]) -> set[str]:
        rules = [r for d in by_kind(docs, "ClusterRole") for r in d["rules"] if "pods" in r["resources"]]
        return {v for r in rules for v in r["verbs"]}

    def env(docs: list[dict]) -> dict:
        return {e["name"]: e.get("value") for e in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    default = render(tmp_path)
    assert env(default)["ALPACA_EKS_WORKLOAD"] == "pods"
    assert pod_verbs(default) == {"get", "list", "watch", "create", "delete"}
    job = render(tmp_path, {"eksWorkload": "job"})
    assert env(job)["ALPACA_EKS_WORKLOAD"] == "job" and pod_verbs(job) == {"list"}
    bad = helm("template", "x", str(CHART), "-f", values_file(tmp_path, {"eksWorkload": "pod"}), check=False)
    assert bad.returncode != 0 and "eksWorkload" in bad.stderr
