"""Session fixtures shared by every test: the real control plane and a local S3.

The control plane is the one `make cluster-up` started when it is healthy, else one
brought up for this session on a free port in a temporary directory and torn down at the
end. Nothing here skips: a part that cannot start fails the tests that need it, with why.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support import free_port, three_free_ports, wait_for

# The training-image tests' fixtures (tiny model, training environment) and the SageMaker stand-in's.
pytest_plugins = ["fixtures_train", "fixtures_sagemaker"]

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".bin"
VENV_BIN = Path(sys.executable).parent

_spec = importlib.util.spec_from_file_location("hack_cluster", ROOT / "hack" / "cluster.py")
hack_cluster = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hack_cluster)


@dataclass
class ClusterHandle:
    kubeconfig: str
    env: dict = field(repr=False)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(BIN / "kubectl"), *args], input=input, capture_output=True,
                              text=True, timeout=timeout, env=self.env)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def wait_established(self, crd: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not hack_cluster.crd_established(self.kubectl, crd):
            if time.monotonic() > deadline:
                raise AssertionError(f"CRD {crd} not Established in {timeout:.0f}s")
            time.sleep(0.2)

    def api_client(self):
        from kubernetes import client, config
        return config.new_client_from_config(config_file=self.kubeconfig)


def _env_with(kubeconfig: Path) -> dict:
    env = dict(os.environ)
    env["KUBECONFIG"] = str(kubeconfig)
    env["PATH"] = f"{BIN}:{VENV_BIN}:{env.get('PATH', '')}"
    return env


# `make test` runs two pytest-xdist workers, each with control plane, S3 and stand-in of its
# own. The rest of the suite mostly waits on them (test_operator_eks keeps 2 cores 28% busy),
# while the modules below train for real, or run processes that do: one worker runs all of
# those, one after another, dealt first; the other worker runs the rest. Two trainings at
# once would halve each one's CPU under its deadlines, and gangs of local-exec pods on two
# control planes would share this host's rendezvous port.
TRAINING_GROUP = "training"
TRAINING_MODULES = ("test_train_", "test_e2e_", "test_exit_paths", "test_demo", "test_operator_sagemaker_exec",
                    "test_gpu")


def _group(nodeid: str) -> str:
    module_path = nodeid.split("::")[0]
    return TRAINING_GROUP if Path(module_path).stem.startswith(TRAINING_MODULES) else module_path


@pytest.hookimpl(optionalhook=True)     # pytest -p no:xdist has no such hook
def pytest_xdist_make_scheduler(config, log):
    # xdist's own loadgroup reads xdist_group marks into node ids, which pytest 9 no longer
    # lets it rewrite; the grouping is made here instead: whole modules, the training ones
    # together, dealt in collection order.
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)
    return ByGroup(config, log)


def pytest_collection_modifyitems(config, items):
    # The training group first (stable: modules keep their order), so it starts at once.
    items.sort(key=lambda item: _group(item.nodeid) != TRAINING_GROUP)


@pytest.fixture(scope="session")
def cluster():
    # Kueue runs as `make cluster-up` runs it: unless KUEUE=0. A shared cluster started the
    # other way is not the one asked for. Parallel workers each need one of their own: a
    # module changes cluster-wide objects (the admission policy, the CRD, Kueue's queues).
    kueue = hack_cluster.kueue_wanted()
    shared = hack_cluster.Cluster(ROOT / ".cluster")
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) <= 1 and shared.kubeconfig.exists() \
            and shared.healthy() and shared.kueue_enabled() == kueue:
        yield ClusterHandle(str(shared.kubeconfig), _env_with(shared.kubeconfig))
        return
    own = hack_cluster.Cluster(Path(tempfile.mkdtemp(prefix="alpaca-cluster-")), three_free_ports())
    try:
        own.up(gpu_nodes=4, system_nodes=2, local_exec_gpu_nodes=1, local_exec_system_nodes=1, g5_nodes=1,
               kueue=kueue)
    except hack_cluster.ClusterError as e:
        own.down()
        pytest.fail(f"the control plane could not start: {e}", pytrace=False)
    try:
        yield ClusterHandle(str(own.kubeconfig), _env_with(own.kubeconfig))
    finally:
        own.down()
        shutil.rmtree(own.dir, ignore_errors=True)


@pytest.fixture
def namespace(cluster, request):
    name = f"t-{uuid.uuid4().hex[:10]}"
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("label", "namespace", name, f"alpaca.dev/test={request.node.name[:40].strip('-_.[]') or 'x'}",
                    check=False)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def crd(cluster):
    """The CRD and its immutability policy (manifests/crd/), both in force."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "manifests" / "crd"))
    cluster.wait_established("alpacafinetunes.alpaca.dev")
    _wait_for_immutability(cluster)
    return "alpacafinetunes.alpaca.dev"


def _wait_for_immutability(cluster, timeout: float = 60) -> None:
    """The API server enforces a new ValidatingAdmissionPolicy once its informers have seen
    the policy and its binding: a moment after the apply, with no condition saying so. So a
    started probe run's spec is changed until the change is refused."""
    ns = f"crd-probe-{uuid.uuid4().hex[:6]}"
    probe = {"apiVersion": "alpaca.dev/v1alpha1", "kind": "AlpacaFineTune", "metadata": {"name": "probe"},
             "spec": {"model": {"uri": "s3://alpaca-test/m/"}, "data": {"uri": "s3://alpaca-test/d.json"},
                      "output": {"uri": "s3://alpaca-test/probe/"}, "runPolicy": {"suspend": True}}}
    cluster.kubectl("create", "namespace", ns)
    try:
        cluster.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(probe))
        cluster.kubectl("patch", "-n", ns, "aft", "probe", "--subresource=status", "--type=merge",
                        "-p", json.dumps({"status": {"startTime": "2026-12-01T00:00:00Z"}}))
        epochs = itertools.count(2)

        def refused() -> str | None:
            proc = cluster.kubectl("patch", "-n", ns, "aft", "probe", "--type=merge", "-p",
                                   json.dumps({"spec": {"training": {"epochs": next(epochs)}}}), check=False)
            return proc.stderr if proc.returncode != 0 else None

        stderr = wait_for("the immutability policy of manifests/crd/ in force", refused, timeout, interval=0.2)
        assert "spec.training is immutable" in stderr, stderr
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@dataclass
class S3Server:
    endpoint: str
    env: dict = field(repr=False)
    client: object = field(repr=False)


@pytest.fixture(scope="session")
def s3():
    """A moto server speaking the real S3 (and SageMaker) wire protocol on loopback."""
    port = free_port()
    log = open(tempfile.mktemp(prefix="moto-", suffix=".log"), "wb")
    proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=log, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto_server did not start; see {log.name}", pytrace=False)
            time.sleep(0.2)
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint, "S3_ENDPOINT_URL": endpoint,
    }
    import boto3
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    try:
        yield S3Server(endpoint, env, client)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def bucket(s3):
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3.client.create_bucket(Bucket=name)
    return name
