"""docs/eks.md and the files it applies, checked as far as this machine can without AWS:
the eksctl config against eksctl's own schema and rules, the samples' pods against its
nodegroups, the device plugins' values, the IAM files through cfn-lint's IAM rules and
botocore's models, the chart values, `make images`, and the guide's local commands."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import boto3
import botocore.session
import jsonschema
import pytest
import yaml
from cfnlint import ManualArgs
from cfnlint.api import lint

from alpaca_operator import instances
from alpaca_operator.backends.base import Run
from alpaca_operator.backends.eks import render
from alpaca_operator.spec import parse_spec
from alpaca_train.s3io import S3Error, S5cmd
from conftest import hack_cluster
from support import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "eks.md"
EKS = ROOT / "docs" / "eks"
IAM = ROOT / "docs" / "iam"
CHART = ROOT / "charts" / "alpaca-operator"
HELM = str(ROOT / ".bin" / "helm")
CLUSTER = yaml.safe_load((EKS / "cluster.yaml").read_text())
NODEGROUPS = {ng["name"]: ng for ng in CLUSTER["managedNodeGroups"]}
GPU_NODEGROUPS = [ng for ng in NODEGROUPS.values() if getattr(instances.lookup(ng["instanceType"]), "gpus", 0)]
SAMPLE_ACCOUNT, SAMPLE_REGION = "123456789012", "us-west-2"


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", markdown, re.DOTALL)


def guide_commands() -> list[list[str]]:
    """Every command line of the guide's bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in bash_blocks(GUIDE.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


# ---- the eksctl config -----------------------------------------------------------------

def eksctl_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((ROOT / "tests" / "data" / "eksctl" / "schema.json").read_text())
    return jsonschema.Draft7Validator(schema)


def test_cluster_config_is_valid_against_eksctls_schema():
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in eksctl_validator().iter_errors(CLUSTER)]
    assert errors == []


@pytest.mark.parametrize("mistake, expected", [
    (lambda c: c["managedNodeGroups"][1].update(efaEnable=True), "'efaEnable' was unexpected"),
    (lambda c: c["managedNodeGroups"][1]["taints"][0].update(operator="Exists"), "'operator' was unexpected"),
    (lambda c: c["managedNodeGroups"][1].update(minSize="0"), "'0' is not of type 'integer'"),
    (lambda c: c.pop("metadata"), "'metadata' is a required property"),
], ids=["misspelt-field", "taint-field", "wrong-type", "no-metadata"])
def test_eksctls_schema_refuses_a_broken_config(mistake, expected):
    """The schema is strict (additionalProperties: false), so the check above means something."""
    config = json.loads(json.dumps(CLUSTER))
    mistake(config)
    assert any(expected in e.message for e in eksctl_validator().iter_errors(config))


def test_cluster_config_keeps_eksctls_own_rules():
    """What eksctl's Go validation (pkg/apis/eksctl.io/v1alpha5/validation.go) refuses but
    its schema lets through."""
    assert CLUSTER["apiVersion"] == "eksctl.io/v1alpha5" and CLUSTER["kind"] == "ClusterConfig"
    for ng in NODEGROUPS.values():
        if ng.get("efaEnabled"):
            # "efaEnabled nodegroups must have only one subnet or one availability zone"
            assert len(ng.get("availabilityZones", [])) == 1, ng["name"]
            assert ng["availabilityZones"][0].startswith(CLUSTER["metadata"]["region"]), ng["name"]
            known = instances.lookup(ng["instanceType"])
            assert known and known.efa, f"{ng['name']}: {ng['instanceType']} has no EFA"
        for taint in ng.get("taints", []):
            assert taint["effect"] in {"NoSchedule", "PreferNoSchedule", "NoExecute"}, ng["name"]
        assert ng["minSize"] <= ng["desiredCapacity"] <= ng["maxSize"], ng["name"]
    assert {"p4d.24xlarge", "p5.48xlarge"} <= {ng["instanceType"] for ng in NODEGROUPS.values()}


def node_of(ng: dict) -> tuple[dict, list[dict], dict]:
    """Labels, taints and allocatable of a node EKS makes for this managed nodegroup: its
    config's labels plus those EKS and Kubernetes set on every node."""
    known = instances.lookup(ng["instanceType"])
    labels = {**ng.get("labels", {}), "eks.amazonaws.com/nodegroup": ng["name"],
              "node.kubernetes.io/instance-type": ng["instanceType"]}
    allocatable = {"nvidia.com/gpu": known.gpus if known else 0,
                   "vpc.amazonaws.com/efa": known.efa if known and ng.get("efaEnabled") else 0}
    return labels, ng.get("taints", []), allocatable


def tolerates(tolerations: list[dict], taint: dict) -> bool:
    """Kubernetes' rule (k8s.io/api/core/v1 Toleration.ToleratesTaint)."""
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint["effect"]:
            continue
        if t.get("key") and t["key"] != taint["key"]:
            continue
        if not t.get("key") and t.get("operator") != "Exists":
            continue
        if t.get("operator", "Equal") == "Exists" or t.get("value", "") == taint.get("value", ""):
            return True
    return False


def eks_samples() -> list[tuple[str, dict]]:
    out = []
    for path in sorted((ROOT / "manifests" / "samples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "AlpacaFineTune" and doc["spec"].get("backend", "eks") == "eks":
                out.append((f"{path.name}:{doc['metadata']['name']}", doc))
    return out


@pytest.mark.parametrize("name, sample", eks_samples(), ids=[n for n, _ in eks_samples()])
def test_every_eks_sample_lands_on_a_nodegroup(name, sample):
    """The operator's own pod for the sample fits a node of the guide's cluster: selector,
    taints, GPUs and EFA adapters."""
    run = Run(sample["metadata"]["name"], "default", "uid", 1, parse_spec(sample["spec"]))
    pod = render.render_job(run, 1)["spec"]["template"]["spec"]
    requests = pod["containers"][0]["resources"]["requests"]
    fits = []
    for ng in NODEGROUPS.values():
        labels, taints, allocatable = node_of(ng)
        if all(labels.get(k) == v for k, v in pod.get("nodeSelector", {}).items()) \
                and all(tolerates(pod["tolerations"], t) for t in taints if t["effect"] != "PreferNoSchedule") \
                and all(int(requests.get(r, 0)) <= n for r, n in allocatable.items()):
            fits.append(ng["name"])
    assert fits, f"{name}: no nodegroup of docs/eks/cluster.yaml takes its pods ({pod.get('nodeSelector')}, {requests})"


def test_no_gpu_nodegroup_takes_pods_that_do_not_ask():
    """The GPU taint: a pod without the toleration (the operator, CoreDNS) stays off them."""
    assert GPU_NODEGROUPS
    for ng in GPU_NODEGROUPS:
        assert any(not tolerates([], t) for t in ng.get("taints", [])), ng["name"]


@pytest.mark.parametrize("nodegroup, make_node", [
    (hack_cluster.GPU_NODEGROUP, hack_cluster.gpu_node),
    (hack_cluster.G5_NODEGROUP, hack_cluster.g5_node),
])
def test_the_local_clusters_nodegroups_are_the_guides(nodegroup, make_node):
    """tests/test_operator_eks.py schedules the samples on hack/cluster.py's simulated
    nodegroups: they must be the nodes this config makes, or those tests prove nothing
    about a real cluster."""
    labels, taints, allocatable = node_of(NODEGROUPS[nodegroup])
    node = make_node(0)
    # alpaca.dev/pool only places the operator (values-eks.yaml): no sample selects on it.
    assert {k: v for k, v in labels.items() if k != "alpaca.dev/pool"}.items() <= node["metadata"]["labels"].items()
    assert node["spec"]["taints"] == taints
    for resource, count in allocatable.items():
        assert int(node["status"]["allocatable"].get(resource, 0)) == count, resource


# ---- the device plugins --------------------------------------------------------------

def test_both_device_plugins_run_on_every_gpu_nodegroup():
    nvidia = yaml.safe_load((EKS / "nvidia-device-plugin-values.yaml").read_text())
    efa = yaml.safe_load((EKS / "efa-device-plugin-values.yaml").read_text())
    terms = nvidia["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    for ng in GPU_NODEGROUPS:
        labels, taints, _ = node_of(ng)
        for plugin, values in (("nvidia", nvidia), ("efa", efa)):
            assert all(tolerates(values["tolerations"], t) for t in taints), (plugin, ng["name"])
        assert any(all(e["operator"] == "In" and labels.get(e["key"]) in e["values"] for e in term["matchExpressions"])
                   for term in terms), ng["name"]


def test_the_guide_pins_each_chart_it_pulls():
    """A chart from a repository is installed at an exact version that the guide's table and
    the values file's header agree on; the repository is added with its https URL."""
    commands = guide_commands()
    repos = {c[3]: c[4] for c in commands if c[:3] == ["helm", "repo", "add"]}
    assert all(url.startswith("https://") for url in repos.values())
    installs = [c for c in commands if c[:3] == ["helm", "upgrade", "--install"] and not c[4].startswith("charts/")]
    assert {c[4].split("/")[1] for c in installs} == {"nvidia-device-plugin", "aws-efa-k8s-device-plugin"}
    text = GUIDE.read_text()
    for c in installs:
        repo, chart = c[4].split("/")
        version = c[c.index("--version") + 1]
        assert re.fullmatch(r"v?[0-9]+\.[0-9]+\.[0-9]+", version), c
        assert repo in repos, f"{repo} is never added"
        assert f"| `{chart}` | `{repos[repo]}` | `{version}` |" in text
        values = ROOT / c[c.index("-f") + 1]
        assert f"{c[4]} --version {version}" in values.read_text(), values


# ---- IAM -------------------------------------------------------------------------------

IAM_FILES = sorted(IAM.glob("*.json"))
# botocore's service name where it is not the IAM prefix.
IAM_PREFIX_TO_BOTOCORE = {"servicequotas": "service-quotas"}
# IAM actions that are not the name of one API operation.
NOT_AN_OPERATION = {
    # Permissions with no API of their own: checked when CreateTrainingJob hands SageMaker
    # a role, and when EKS Pod Identity's AssumeRole passes session tags.
    "iam:PassRole": (),
    "sts:TagSession": (),
    # S3's IAM names for its list operations.
    "s3:ListBucket": ("ListObjectsV2", "ListObjects", "HeadBucket"),
    "s3:ListBucketMultipartUploads": ("ListMultipartUploads",),
    "s3:ListMultipartUploadParts": ("ListParts",),
}


def is_trust(path: Path) -> bool:
    return path.stem.endswith("-trust") or "-trust-" in path.stem


def cfn_lint(documents: dict[str, tuple[bool, dict]]) -> list[str]:
    """cfn-lint's IAM rules (E3510 identity policies, E3530 trust policies, W3037 known
    actions, I3510 resources that fit the actions) on each document, inside a template."""
    resources = {name: ({"Type": "AWS::IAM::Role", "Properties": {"AssumeRolePolicyDocument": doc}} if trust else
                        {"Type": "AWS::IAM::ManagedPolicy", "Properties": {"PolicyDocument": doc}})
                 for name, (trust, doc) in documents.items()}
    template = {"AWSTemplateFormatVersion": "2010-09-09", "Resources": resources}
    matches = lint(json.dumps(template), config=ManualArgs(include_checks=["I"], regions=[SAMPLE_REGION]))
    return [f"{m.rule.id} {'/'.join(map(str, m.path))}: {m.message[:200]}" for m in matches]


def test_the_iam_files_are_the_guides():
    assert {p.name for p in IAM_FILES} >= {
        "alpaca-operator-sagemaker.json", "alpaca-operator-trust-irsa.json", "alpaca-trainer-s3.json",
        "alpaca-trainer-trust-irsa.json", "pod-identity-trust.json", "alpaca-sagemaker-execution.json",
        "alpaca-sagemaker-execution-trust.json"}
    text = GUIDE.read_text()
    for path in IAM_FILES:
        assert f"iam/{path.name}" in text, f"docs/eks.md does not say what {path.name} is for"


def test_every_iam_file_passes_cfn_lints_iam_rules():
    documents = {re.sub(r"[^A-Za-z0-9]", "", p.stem): (is_trust(p), json.loads(p.read_text())) for p in IAM_FILES}
    assert cfn_lint(documents) == []


@pytest.mark.parametrize("trust, document, rule", [
    (False, {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "sagemaker:CreateTrainingJobs", "Resource": "*"}]}, "W3037"),
    (False, {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:iam::123456789012:role/x"}]}, "I3510"),
    (False, {"Version": "2012-10-17", "Statement": [
        {"Effect": "Alow", "Action": "s3:GetObject", "Resource": "*"}]}, "E3510"),
    (True, {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole"}]}, "E3530"),
], ids=["unknown-action", "resource-of-another-service", "bad-effect", "trust-without-principal"])
def test_cfn_lint_catches_a_broken_policy(trust, document, rule):
    assert any(m.startswith(rule) for m in cfn_lint({"Broken": (trust, document)}))


def actions(document: dict) -> set[str]:
    out = set()
    for statement in document["Statement"]:
        a = statement.get("Action", [])
        out.update([a] if isinstance(a, str) else a)
    return out


def test_every_iam_action_is_a_real_operation():
    """Each action names an operation of botocore's model of that service, or is one of the
    few IAM names that are not an API (NOT_AN_OPERATION, each with the operations it covers)."""
    session = botocore.session.get_session()
    services = set(session.get_available_services())
    problems = []
    for path in IAM_FILES:
        for action in sorted(actions(json.loads(path.read_text()))):
            prefix, name = action.split(":")
            service = IAM_PREFIX_TO_BOTOCORE.get(prefix, prefix)
            if service not in services:
                problems.append(f"{path.name}: {action}: botocore has no service {service!r}")
                continue
            operations = set(session.get_service_model(service).operation_names)
            covered = NOT_AN_OPERATION.get(action, (name,))
            missing = [op for op in covered if op not in operations]
            if missing or "*" in name:
                problems.append(f"{path.name}: {action}: not an operation of {service} ({missing or 'wildcard'})")
    assert problems == []


def test_the_permission_only_actions_are_iam_actions():
    """NOT_AN_OPERATION's entries are real IAM actions (cfn-lint's table of them)."""
    unknown = cfn_lint({"P": (False, {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": sorted(NOT_AN_OPERATION), "Resource": "*"}]})})
    assert [m for m in unknown if m.startswith("W3037")] == []


def chart_objects(values_file: Path) -> list[dict]:
    out = subprocess.run([HELM, "template", "alpaca-operator", str(CHART), "-n", "alpaca-system", "-f", str(values_file)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_the_trust_policies_name_the_service_accounts():
    docs = chart_objects(EKS / "values-eks.yaml")
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    operator_sub = f"system:serviceaccount:{sa['metadata']['namespace']}:{sa['metadata']['name']}"
    trainer_accounts = {s["spec"]["serviceAccountName"] for _, s in eks_samples() if s["spec"].get("serviceAccountName")}
    assert trainer_accounts == {"alpaca-trainer-irsa"}
    for path, sub in ((IAM / "alpaca-operator-trust-irsa.json", operator_sub),
                      (IAM / "alpaca-trainer-trust-irsa.json", "system:serviceaccount:default:alpaca-trainer-irsa")):
        [statement] = json.loads(path.read_text())["Statement"]
        assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
        provider = statement["Principal"]["Federated"].split(":oidc-provider/")[1]
        assert statement["Condition"]["StringEquals"] == {f"{provider}:sub": sub, f"{provider}:aud": "sts.amazonaws.com"}
    [pod_identity] = json.loads((IAM / "pod-identity-trust.json").read_text())["Statement"]
    assert pod_identity["Principal"] == {"Service": "pods.eks.amazonaws.com"}
    assert set(pod_identity["Action"]) == {"sts:AssumeRole", "sts:TagSession"}


def test_the_operator_may_pass_exactly_the_execution_role_of_the_values():
    values = yaml.safe_load((EKS / "values-eks.yaml").read_text())
    policy = json.loads((IAM / "alpaca-operator-sagemaker.json").read_text())
    passed = [s["Resource"] for s in policy["Statement"] if "iam:PassRole" in actions({"Statement": [s]})]
    assert passed == [values["sagemaker"]["roleArn"]]
    [trust] = json.loads((IAM / "alpaca-sagemaker-execution-trust.json").read_text())["Statement"]
    assert trust["Principal"] == {"Service": "sagemaker.amazonaws.com"}


def test_the_guides_fill_leaves_no_example_value(tmp_path):
    """Runs the guide's own `fill` function on every IAM file, with other values."""
    [block] = [b for b in bash_blocks(GUIDE.read_text()) if "fill() {" in b]
    fill = block[block.index("fill() {"):]
    env = {"PATH": os.environ["PATH"], "ACCOUNT": "111122223333", "AWS_REGION": "eu-central-1", "BUCKET": "my-llm",
           "OIDC": "oidc.eks.eu-central-1.amazonaws.com/id/0123456789ABCDEF0123456789ABCDEF"}
    filled = {}
    for path in IAM_FILES:
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", f"{fill}\nfill {shlex.quote(str(path))}"],
                             capture_output=True, text=True, env=env, check=True, cwd=ROOT).stdout
        for example in (SAMPLE_ACCOUNT, SAMPLE_REGION, "alpaca-demo", "EXAMPLE"):
            assert example not in out, (path.name, example)
        filled[re.sub(r"[^A-Za-z0-9]", "", path.stem)] = (is_trust(path), json.loads(out))
    assert "111122223333" in json.dumps(filled)
    assert cfn_lint(filled) == []


@pytest.fixture(scope="module")
def enforcing_s3():
    """A moto server of its own (the session's `s3` stays open): S3 and IAM, with IAM's
    policies enforced once `enforce()` is called."""
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2).status == 200
        except OSError:
            return proc.poll() is not None
    wait_for("moto_server", up, timeout=30)
    assert proc.poll() is None, "moto_server exited"

    def enforce() -> None:
        # moto's switch: IAM checks from the next request on (moto-api/reset-auth, body 0).
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0",
                                                      headers={"Content-Type": "text/plain"}, method="POST"))
    try:
        yield endpoint, enforce
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_trainer_policy_lets_the_images_s3_code_do_a_run(enforcing_s3, tmp_path, monkeypatch):
    """As an IAM user holding exactly docs/iam/alpaca-trainer-s3.json, with moto enforcing
    it: the image's own s5cmd calls read the model and the data, sync a checkpoint, list
    and resume it; writing over the model, or reading another bucket, is refused."""
    endpoint, enforce = enforcing_s3
    admin = {"endpoint_url": endpoint, "region_name": "us-east-1",
             "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    iam, s3 = boto3.client("iam", **admin), boto3.client("s3", **admin)
    policy = (IAM / "alpaca-trainer-s3.json").read_text().replace("alpaca-demo", "llm")
    iam.create_user(UserName="trainer")
    iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=policy)
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    for bucket in ("llm", "someone-else"):
        s3.create_bucket(Bucket=bucket)
    for name in ("models/llama-7b/config.json", "models/llama-7b/model.safetensors", "data/alpaca_data.json"):
        s3.put_object(Bucket="llm", Key=name, Body=b"{}")
    s3.put_object(Bucket="someone-else", Key="secret.json", Body=b"{}")
    enforce()

    trainer = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
               "AWS_REGION": "us-east-1", "S3_ENDPOINT_URL": endpoint}
    for name, value in trainer.items():
        monkeypatch.setenv(name, value)
    s5 = S5cmd(attempts=1, request_retries=0)
    s5.download_prefix("s3://llm/models/llama-7b/", tmp_path / "model")
    s5.download_file("s3://llm/data/alpaca_data.json", tmp_path / "data.json")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors"]
    (tmp_path / "out" / "checkpoint-100").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint-100" / "state.json").write_text("{}")
    s5.sync_up(tmp_path / "out", "s3://llm/runs/alpaca-7b/")
    assert s5.list("s3://llm/runs/alpaca-7b/") == ["checkpoint-100/state.json"]
    s5.download_prefix("s3://llm/runs/alpaca-7b/checkpoint-100/", tmp_path / "resume")
    # Old checkpoints go. (s5cmd's rm sends DeleteObjects, which moto checks against the
    # bucket's ARN; AWS checks s3:DeleteObject on each key, as DeleteObject does.)
    as_trainer = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
    as_trainer.delete_object(Bucket="llm", Key="runs/alpaca-7b/checkpoint-100/state.json")
    assert s5.list("s3://llm/runs/alpaca-7b/") == []

    with pytest.raises(S3Error, match="Access ?Denied"):
        s5.upload_file(tmp_path / "data.json", "s3://llm/models/llama-7b/config.json")
    with pytest.raises(S3Error, match="Access ?Denied"):
        s5.download_file("s3://someone-else/secret.json", tmp_path / "secret.json")


# ---- the chart values ------------------------------------------------------------------

def test_the_values_file_is_valid_against_the_charts_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((EKS / "values-eks.yaml").read_text())
    assert list(jsonschema.Draft7Validator(schema).iter_errors(values)) == []
    proc = subprocess.run([HELM, "lint", str(CHART), "-f", str(EKS / "values-eks.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_values_render_the_operator_a_real_cluster_needs():
    values = yaml.safe_load((EKS / "values-eks.yaml").read_text())
    docs = chart_objects(EKS / "values-eks.yaml")
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == values["serviceAccount"]["irsaRoleArn"]
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    images = make_images({"AWS_ACCOUNT_ID": SAMPLE_ACCOUNT, "AWS_REGION": SAMPLE_REGION}).stdout
    assert f"-t {container['image']} " in images
    assert f"-t {env['ALPACA_TRAINING_IMAGE']} " in images
    assert env["AWS_REGION"] == values["sagemaker"]["region"] == CLUSTER["metadata"]["region"]
    assert env["ALPACA_SAGEMAKER_ROLE_ARN"] == values["sagemaker"]["roleArn"]
    labels, taints, _ = node_of(NODEGROUPS["system"])
    assert pod["nodeSelector"].items() <= labels.items() and not taints


# ---- make images -----------------------------------------------------------------------

def make_images(env: dict[str, str], path: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    base = {"HOME": os.environ.get("HOME", "/tmp"), "PATH": path or os.environ["PATH"]}
    return subprocess.run(["make", "--no-print-directory", "images"], cwd=ROOT, capture_output=True, text=True,
                          env={**base, **env}, timeout=120, check=check)


def path_without_docker(tmp_path: Path) -> str:
    """PATH with only make, python3 and bash, so a docker CLI elsewhere on this machine cannot answer."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("make", "bash", "sh"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    # The interpreter itself, not a version manager's shim (which needs its own PATH).
    (bin_dir / "python3").symlink_to(os.path.realpath(sys.executable))
    return str(bin_dir)


EXPECTED_WITHOUT_ENGINE = """\
docker build --platform linux/amd64 -f image/Dockerfile -t 111122223333.dkr.ecr.eu-central-1.amazonaws.com/alpaca-operator/train:{tag} .
docker build --platform linux/amd64 -f operator/Dockerfile -t 111122223333.dkr.ecr.eu-central-1.amazonaws.com/alpaca-operator/operator:{tag} .
aws ecr describe-repositories --region eu-central-1 --repository-names alpaca-operator/train >/dev/null 2>&1 || aws ecr create-repository --region eu-central-1 --repository-name alpaca-operator/train
aws ecr describe-repositories --region eu-central-1 --repository-names alpaca-operator/operator >/dev/null 2>&1 || aws ecr create-repository --region eu-central-1 --repository-name alpaca-operator/operator
aws ecr get-login-password --region eu-central-1 | docker login --username AWS --password-stdin 111122223333.dkr.ecr.eu-central-1.amazonaws.com
docker push 111122223333.dkr.ecr.eu-central-1.amazonaws.com/alpaca-operator/train:{tag}
docker push 111122223333.dkr.ecr.eu-central-1.amazonaws.com/alpaca-operator/operator:{tag}
"""


def chart_app_version() -> str:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def fake_docker(tmp_path: Path, engine_up: bool) -> str:
    """A docker CLI: `info` answers as an engine that is up or down; build and push append
    their arguments to a log. Only for where no Docker engine can run (here, CI)."""
    bin_dir = Path(path_without_docker(tmp_path))
    script = bin_dir / "docker"
    script.write_text(f"#!/bin/bash\nif [ \"$1\" = info ]; then exit {0 if engine_up else 1}; fi\n"
                      f"printf '%s|' \"$PWD\" \"$@\" >> {tmp_path}/docker.log; echo >> {tmp_path}/docker.log\n")
    script.chmod(0o755)
    return str(bin_dir)


@pytest.mark.parametrize("docker", ["absent", "engine-down"])
def test_make_images_prints_the_commands_without_an_engine(tmp_path, docker):
    path = path_without_docker(tmp_path) if docker == "absent" else fake_docker(tmp_path, engine_up=False)
    proc = make_images({"AWS_ACCOUNT_ID": "111122223333", "AWS_REGION": "eu-central-1"}, path)
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("#")]
    assert "\n".join(lines) + "\n" == EXPECTED_WITHOUT_ENGINE.format(tag=chart_app_version())
    assert not (tmp_path / "docker.log").exists()
    for line in lines[:2]:
        args = shlex.split(line)
        assert (ROOT / args[args.index("-f") + 1]).is_file()


def test_make_images_placeholders_region_suffix_and_tag(tmp_path):
    path = path_without_docker(tmp_path)
    out = make_images({}, path).stdout
    assert "ACCOUNT.dkr.ecr.REGION.amazonaws.com/alpaca-operator/train:" in out
    assert "export AWS_ACCOUNT_ID and AWS_REGION" in out
    out = make_images({"AWS_ACCOUNT_ID": "111122223333", "AWS_REGION": "cn-north-1", "IMAGE_TAG": "rc1"}, path).stdout
    assert "-t 111122223333.dkr.ecr.cn-north-1.amazonaws.com.cn/alpaca-operator/operator:rc1 ." in out


@pytest.mark.parametrize("env, message", [
    ({"AWS_ACCOUNT_ID": "1234"}, "AWS_ACCOUNT_ID must be the 12 digits"),
    ({"AWS_REGION": "us_west_2"}, "AWS_REGION must be a region"),
    ({"IMAGE_TAG": "a:b"}, "is not a valid image tag"),
])
def test_make_images_refuses_bad_input(tmp_path, env, message):
    proc = make_images(env, path_without_docker(tmp_path), check=False)
    assert proc.returncode != 0 and message in proc.stderr and "docker build" not in proc.stdout


def test_make_images_builds_both_where_an_engine_runs(tmp_path):
    proc = make_images({"AWS_ACCOUNT_ID": "111122223333", "AWS_REGION": "eu-central-1"}, fake_docker(tmp_path, True))
    builds = [line.split("|")[:-1] for line in (tmp_path / "docker.log").read_text().splitlines()]
    expected = [shlex.split(line) for line in EXPECTED_WITHOUT_ENGINE.format(tag=chart_app_version()).splitlines()[:2]]
    assert builds == [[str(ROOT), *cmd[1:]] for cmd in expected]
    # Not pushed without PUSH=1: the push commands are printed instead.
    assert "docker push 111122223333.dkr.ecr.eu-central-1.amazonaws.com/alpaca-operator/train:" in proc.stdout


# ---- the guide itself ------------------------------------------------------------------

def test_every_file_and_make_target_the_guide_names_exists():
    text = GUIDE.read_text()
    for rel in set(re.findall(r"\]\(((?:eks|iam)/[^)#]+)\)", text)) | set(re.findall(r"docs/[\w./-]+\.(?:yaml|json)", text)):
        path = (GUIDE.parent / rel) if not rel.startswith("docs/") else ROOT / rel
        assert path.is_file(), rel
    for sample in re.findall(r"`([\w-]+\.yaml)`", text):
        assert (ROOT / "manifests" / "samples" / sample).is_file() or (EKS / sample).is_file(), sample
    makefile = (ROOT / "Makefile").read_text()
    for target in {c[1] for c in guide_commands() if c[0] == "make"}:
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), target


def test_the_guides_local_commands_run(tmp_path):
    """The guide's commands that need no AWS and no cluster, run as written: helm template
    of the chart with the values, and make images (no Docker engine here)."""
    local = [c for c in guide_commands() if c[:2] == ["helm", "template"] or c[:2] == ["make", "images"]]
    assert len(local) == 2
    env = {"PATH": f"{ROOT / '.bin'}:{path_without_docker(tmp_path)}", "HOME": str(tmp_path)}
    for command in local:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, f"{shlex.join(command)}:\n{proc.stderr}"
        assert proc.stdout.strip()
