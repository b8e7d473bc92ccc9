#!/usr/bin/env python3
"""A real Kubernetes control plane on loopback, with kwok simulating an EKS GPU nodegroup.

etcd, kube-apiserver (RBAC on), kube-controller-manager (Jobs, garbage collection) and
kube-scheduler run as local processes from the binaries `hack/build-controlplane.sh`
built; kwok plays the kubelets. Like controller-runtime's envtest, but with a scheduler,
controllers and nodes, so Jobs really get scheduled, run and complete.

Beside kwok's nodes, local-exec nodes (label and taint alpaca.dev/local-exec=true) whose
pods the node agent hack/localexec/agent.py runs as real processes on this machine; kwok
does not manage them. The agent is one more component: `down` stops it and every
process it started.

Kueue runs beside them unless KUEUE=0 (or --kueue 0): a local process whose webhooks the API
server calls on loopback, with a certificate from the cluster's CA, and a ClusterQueue
`alpaca-gpu` whose quota is the simulated GPU nodegroups' (hack/kueue/local_kueue.py).

    python hack/cluster.py up   [--dir .cluster] [--gpu-nodes 4] [--g5-nodes 1] [--system-nodes 2] [--port 36443]
                                [--local-exec-gpu-nodes 1] [--local-exec-system-nodes 1]
                                [--local-exec-max-procs 2] [--kueue 1]
    python hack/cluster.py down [--dir .cluster]
    python hack/cluster.py status [--dir .cluster]

Only the standard library, so it runs before the virtualenv exists.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("BIN", ROOT / ".bin"))
STAGES = ROOT / "hack" / "kwok-stages.yaml"
LOCALEXEC = ROOT / "hack" / "localexec"
sys.path.insert(0, str(LOCALEXEC))
sys.path.insert(0, str(ROOT / "hack" / "kueue"))
import local_kueue  # noqa: E402  (standard library only, like this file)
import procs as localexec_procs  # noqa: E402

# Order matters: each component needs the ones before it.
COMPONENTS = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"]
AGENT = "localexec-agent"
KUEUE = "kueue"
# Kueue's CRDs and webhook configurations, copied from its Go module by hack/build-controlplane.sh.
KUEUE_MANIFESTS = BIN / "kueue-manifests"

LOCAL_EXEC_LABEL = "alpaca.dev/local-exec"
LOCAL_EXEC_TAINT = {"key": LOCAL_EXEC_LABEL, "value": "true", "effect": "NoSchedule"}
MAX_PROCS_LABEL = "alpaca.dev/local-exec-max-procs"

GPU_NODEGROUP = "gpu-p4d"
# A one-GPU nodegroup beside it: the shape of a LoRA fine-tune (one 24 GB A10G).
G5_NODEGROUP = "gpu-g5"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}


def crd_established(kubectl, crd: str) -> bool:
    """Is the CRD Established? What to poll: `kubectl wait --for=condition=Established` fails
    outright ("accessor error") when it reads the CRD before the API server wrote its first
    status. kubectl: a Cluster's (or the tests' handle's), taking check=False."""
    path = '{.status.conditions[?(@.type=="Established")].status}'
    return kubectl("get", f"crd/{crd}", "-o", f"jsonpath={path}", check=False).stdout.strip() == "True"


class ClusterError(RuntimeError):
    pass


def kueue_wanted(env=os.environ) -> bool:
    """Whether a cluster brought up now runs Kueue: yes, unless KUEUE=0."""
    return env.get("KUEUE", "1") != "0"


class Cluster:
    def __init__(self, directory: Path, port: int = 36443):
        self.dir = Path(directory).resolve()
        self.api_port = port
        # etcd sits just below the apiserver port so a second cluster only needs a
        # different --port.
        self.etcd_port = port - 2
        self.etcd_peer_port = port - 1
        self.pki = self.dir / "pki"
        self.logs = self.dir / "logs"
        self.pids = self.dir / "pids"
        self.kubeconfig = self.dir / "kubeconfig"
        self.agent_state = self.dir / "localexec"
        self.layout_file = self.dir / "local-exec.json"
        # Kueue's Configuration; there while the cluster runs Kueue.
        self.kueue_config = self.dir / "kueue" / "config.json"
        # Set before `up`: the API server writes every request's metadata (user agent
        # included) there as it completes, one JSON line per stage (the operator benchmark
        # counts Kueue's requests there: Kueue's metrics endpoint lacks client-go's counter).
        self.audit_log: Path | None = None
        self._procs: dict[str, subprocess.Popen] = {}

    # ---- certificates -------------------------------------------------------------

    def _openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    def make_pki(self) -> None:
        if (self.pki / "admin.crt").exists():
            return
        self.pki.mkdir(parents=True, exist_ok=True)
        p = lambda name: str(self.pki / name)  # noqa: E731
        self._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
                      "-keyout", p("ca.key"), "-out", p("ca.crt"), "-subj", "/CN=alpaca-local-ca")
        ext = self.pki / "apiserver.ext"
        ext.write_text(
            "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc,"
            "DNS:kubernetes.default.svc.cluster.local\n"
            "extendedKeyUsage=serverAuth\n")
        self._sign("apiserver", "/CN=kube-apiserver", ext)
        client_ext = self.pki / "client.ext"
        client_ext.write_text("extendedKeyUsage=clientAuth\n")
        # system:masters: the admin of this throwaway cluster (tests, kwok, controllers).
        self._sign("admin", "/O=system:masters/CN=alpaca-admin", client_ext)
        self._openssl("genrsa", "-out", p("sa.key"), "2048")
        self._openssl("rsa", "-in", p("sa.key"), "-pubout", "-out", p("sa.pub"))

    def make_agent_pki(self) -> None:
        """The local-exec agent's serving certificate, and the client certificate the API
        server shows it when it proxies `kubectl logs` (only the API server may read logs)."""
        if (self.pki / "kubelet-client.crt").exists():
            return
        server_ext = self.pki / "localexec.ext"
        server_ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
        self._sign("localexec", "/CN=alpaca-localexec-agent", server_ext)
        self._sign("kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client", self.pki / "client.ext")

    def make_kueue_pki(self) -> None:
        """The serving certificate of Kueue's webhooks (and metrics), as tls.crt and tls.key
        in one directory: the names Kueue reads."""
        if (self.pki / "kueue" / "tls.crt").exists():
            return
        (self.pki / "kueue").mkdir(parents=True, exist_ok=True)
        ext = self.pki / "kueue.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
        self._sign("kueue/tls", "/CN=kueue-webhook", ext)

    def _sign(self, name: str, subject: str, ext: Path) -> None:
        p = lambda n: str(self.pki / n)  # noqa: E731
        self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", p(f"{name}.key"),
                      "-out", p(f"{name}.csr"), "-subj", subject)
        self._openssl("x509", "-req", "-in", p(f"{name}.csr"), "-CA", p("ca.crt"),
                      "-CAkey", p("ca.key"), "-CAcreateserial", "-days", "3650",
                      "-extfile", str(ext), "-out", p(f"{name}.crt"))

    def write_kubeconfig(self) -> None:
        b64 = lambda n: base64.b64encode((self.pki / n).read_bytes()).decode()  # noqa: E731
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "alpaca-local", "cluster": {
                "server": f"https://127.0.0.1:{self.api_port}",
                "certificate-authority-data": b64("ca.crt")}}],
            "users": [{"name": "alpaca-admin", "user": {
                "client-certificate-data": b64("admin.crt"),
                "client-key-data": b64("admin.key")}}],
            "contexts": [{"name": "alpaca-local", "context": {
                "cluster": "alpaca-local", "user": "alpaca-admin"}}],
            "current-context": "alpaca-local",
        }
        # kubectl reads JSON kubeconfigs as well as YAML.
        tmp = self.kubeconfig.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=2))
        tmp.chmod(0o600)
        tmp.replace(self.kubeconfig)

    # ---- processes ----------------------------------------------------------------

    def _args(self, name: str) -> list[str]:
        pki, kc = self.pki, str(self.kubeconfig)
        if name == "etcd":
            return [
                "--name=alpaca-local", f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{self.etcd_peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{self.etcd_peer_port}",
                f"--initial-cluster=alpaca-local=http://127.0.0.1:{self.etcd_peer_port}",
                "--unsafe-no-fsync=true", "--log-level=warn",
            ]
        if name == "kube-apiserver":
            return [
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                f"--secure-port={self.api_port}", "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--cert-dir={pki}", f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                "--service-cluster-ip-range=10.0.0.0/24", "--allow-privileged=true",
                "--authorization-mode=RBAC",
                f"--kubelet-client-certificate={pki / 'kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'kubelet-client.key'}",
                "--kubelet-preferred-address-types=InternalIP",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                # Room for the 500-CR benchmark's bursts.
                "--max-requests-inflight=1000", "--max-mutating-requests-inflight=500",
                "--profiling=false", "--v=0",
            ] + ([f"--audit-policy-file={self.dir / 'audit-policy.json'}", f"--audit-log-path={self.audit_log}",
                  "--audit-log-format=json"] if self.audit_log else [])
        if name == "kube-controller-manager":
            return [
                f"--kubeconfig={kc}", "--leader-elect=false", "--secure-port=0",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                "--use-service-account-credentials=true",
                "--kube-api-qps=300", "--kube-api-burst=600",
                "--concurrent-job-syncs=20", "--concurrent-gc-syncs=50",
                "--v=0",
            ]
        if name == "kube-scheduler":
            return [f"--config={self.dir / 'scheduler.yaml'}", "--secure-port=0", "--v=0"]
        if name == "kwok":
            return [
                f"--kubeconfig={kc}", "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                f"--config={STAGES}", "--node-lease-duration-seconds=40",
                "--cidr=10.128.0.1/16", "--node-ip=10.127.0.1",
            ]
        if name == KUEUE:
            return [f"--config={self.kueue_config}", f"--kubeconfig={kc}"]
        if name == AGENT:
            return [
                str(LOCALEXEC / "agent.py"), f"--kubeconfig={kc}", f"--state-dir={self.agent_state}",
                f"--cert={pki / 'localexec.crt'}", f"--key={pki / 'localexec.key'}",
                f"--client-ca={pki / 'ca.crt'}", f"--venv-bin={ROOT / '.venv' / 'bin'}",
            ]
        raise ValueError(name)

    def _write_scheduler_config(self) -> None:
        (self.dir / "scheduler.yaml").write_text(json.dumps({
            "apiVersion": "kubescheduler.config.k8s.io/v1",
            "kind": "KubeSchedulerConfiguration",
            "clientConnection": {"kubeconfig": str(self.kubeconfig), "qps": 300, "burst": 600},
            "leaderElection": {"leaderElect": False},
        }))

    def _pid(self, name: str) -> int | None:
        try:
            pid = int((self.pids / f"{name}.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except FileNotFoundError:
            return None
        # A recycled pid belongs to some other program: not ours to signal.
        if name == AGENT:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            return pid if len(args) > 1 and args[1].decode().endswith("localexec/agent.py") else None
        return pid if os.path.basename(cmdline.decode()) == name else None

    def local_exec_layout(self) -> dict:
        try:
            return json.loads(self.layout_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"gpu_nodes": 0, "system_nodes": 0}

    def components(self) -> list[str]:
        layout = self.local_exec_layout()
        return (COMPONENTS + ([AGENT] if layout["gpu_nodes"] + layout["system_nodes"] > 0 else [])
                + ([KUEUE] if self.kueue_enabled() else []))

    def kueue_enabled(self) -> bool:
        return self.kueue_config.exists()

    def running(self) -> dict[str, int | None]:
        return {name: self._pid(name) for name in self.components()}

    def _start(self, name: str) -> None:
        if name == AGENT:
            python = ROOT / ".venv" / "bin" / "python"
            command = [str(python if python.exists() else sys.executable), *self._args(name)]
        else:
            binary = BIN / name
            if not binary.exists():
                raise ClusterError(f"{binary} is missing: run `make setup` (hack/build-controlplane.sh)")
            command = [str(binary), *self._args(name)]
        env = None
        if name == KUEUE:
            # Read by the build's one change to Kueue (hack/build-controlplane.sh).
            env = {**os.environ, "KUEUE_METRICS_CERT_DIR": str(self.pki / "kueue")}
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pids.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=log, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.dir)
        self._procs[name] = proc
        (self.pids / f"{name}.pid").write_text(str(proc.pid))

    def _wait(self, what: str, check, timeout: float, component: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self._procs.get(component)
            if proc is not None and proc.poll() is not None:
                raise ClusterError(f"{component} exited while starting; last log lines:\n"
                                   + self._tail(component))
            if check():
                return
            time.sleep(0.3)
        raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}; "
                           f"last {component} log lines:\n" + self._tail(component))

    def _tail(self, name: str, lines: int = 20) -> str:
        try:
            return "\n".join((self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(BIN / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
                              input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def wait_established(self, crd: str, timeout: float = 60) -> None:
        self._wait(f"CRD {crd} Established", lambda: crd_established(self.kubectl, crd), timeout, "kube-apiserver")

    def _etcd_healthy(self) -> bool:
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.etcd_port}/health", timeout=2) as r:
                return json.loads(r.read()).get("health") == "true"
        except OSError:
            return False

    def _api_ready(self) -> bool:
        try:
            return self.kubectl("get", "--raw=/readyz", check=False, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def healthy(self) -> bool:
        return all(self.running().values()) and self._api_ready()

    def _control_plane_healthy(self) -> bool:
        return all(self._pid(name) for name in COMPONENTS) and self._api_ready()

    def up(self, gpu_nodes: int, system_nodes: int, local_exec_gpu_nodes: int = 0,
           local_exec_system_nodes: int = 0, local_exec_max_procs: int = 0, g5_nodes: int = 0,
           kueue: bool | None = None) -> None:
        """kueue: run Kueue; None: unless KUEUE=0 (kueue_wanted)."""
        kueue = kueue_wanted() if kueue is None else kueue
        exec_nodes = local_exec_gpu_nodes + local_exec_system_nodes
        queues = kueue_nodegroups(gpu_nodes, g5_nodes, local_exec_gpu_nodes)
        if self._control_plane_healthy():
            self._write_layout(local_exec_gpu_nodes, local_exec_system_nodes)
            self.ensure_nodes(gpu_nodes, system_nodes, local_exec_gpu_nodes, local_exec_system_nodes,
                              local_exec_max_procs, g5_nodes)
            # A restarted agent finds the processes of the one that died.
            if exec_nodes and not self._pid(AGENT):
                self.start_agent()
            if not kueue:
                self.stop_kueue()
            elif self._pid(KUEUE):
                self.apply_queues(queues)  # the node counts may have changed
            else:
                self.install_kueue()
                self._start(KUEUE)
                self._wait_kueue(queues)
            return
        # Half a cluster (a crash, a reboot) is not worth repairing: start clean.
        self.down()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_layout(local_exec_gpu_nodes, local_exec_system_nodes)
        shutil.rmtree(self.kueue_config.parent, ignore_errors=True)
        self.make_pki()
        self.make_agent_pki()
        self.write_kubeconfig()
        self._write_scheduler_config()
        self._start("etcd")
        self._wait("etcd health", self._etcd_healthy, 60, "etcd")
        if self.audit_log:
            # Metadata only, and one line per request (not also one when it is received).
            (self.dir / "audit-policy.json").write_text(json.dumps({
                "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
                "rules": [{"level": "Metadata"}]}))
        self._start("kube-apiserver")
        self._wait("kube-apiserver /readyz", self._api_ready, 120, "kube-apiserver")
        for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
            self._start(name)
        if kueue:
            self.install_kueue()
        self.ensure_nodes(gpu_nodes, system_nodes, local_exec_gpu_nodes, local_exec_system_nodes,
                          local_exec_max_procs, g5_nodes)
        if exec_nodes:
            self._start(AGENT)
        if kueue:
            self._start(KUEUE)
        self._wait("the default ServiceAccount (controller-manager up)",
                   lambda: self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0,
                   120, "kube-controller-manager")
        self._wait("all nodes Ready", lambda: self._nodes_ready(gpu_nodes + system_nodes + exec_nodes), 120,
                   AGENT if exec_nodes else "kwok")
        if kueue:
            self._wait_kueue(queues)

    # ---- Kueue --------------------------------------------------------------------

    def install_kueue(self) -> None:
        """Kueue's certificate, Configuration, CRDs and webhook configurations, for a process
        about to start on fresh ports (the webhooks and CRD conversion call it there)."""
        missing = [p for p in (BIN / KUEUE, KUEUE_MANIFESTS) if not p.exists()]
        if missing:
            raise ClusterError(f"{missing[0]} is missing: run `make setup` (hack/build-controlplane.sh)")
        self.make_kueue_pki()
        webhook, metrics, health = _free_ports(3)
        self.kueue_config.parent.mkdir(parents=True, exist_ok=True)
        self.kueue_config.write_text(json.dumps(local_kueue.configuration(
            webhook, metrics, health, str(self.pki / "kueue")), indent=2))
        ca = (self.pki / "ca.crt").read_bytes()
        crds = local_kueue.crds(self._read_manifests(KUEUE_MANIFESTS / "crd"), webhook, ca)
        hooks = local_kueue.webhook_configurations(self._read_manifests(KUEUE_MANIFESTS / "webhooks.yaml"),
                                                   webhook, ca)
        objects = json.dumps({"apiVersion": "v1", "kind": "List", "items": crds + hooks})
        # `create` costs the API server a third of what a server-side apply of these 1.6 MB of
        # schemas does; on a cluster that ran Kueue before, the objects are applied over.
        created = self.kubectl("create", "-f", "-", input=objects, check=False, timeout=300)
        if created.returncode != 0:
            if "AlreadyExists" not in created.stderr:
                raise ClusterError(f"creating Kueue's CRDs and webhooks failed: {created.stderr.strip()}")
            self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=objects, timeout=300)
        # Kueue's informers need its kinds served before it starts.
        names = [crd["metadata"]["name"] for crd in crds]
        self._wait("Kueue's CRDs Established", lambda: self.kubectl(
            "get", "crd", *names, "-o",
            "jsonpath={range .items[*]}{.status.conditions[?(@.type=='Established')].status}{' '}{end}",
            check=False).stdout.split() == ["True"] * len(names), 60, "kube-apiserver")

    def _read_manifests(self, path: Path) -> list[dict]:
        """YAML manifests as objects (kubectl parses them: this file has only the standard library)."""
        out = self.kubectl("create", "--dry-run=client", "--validate=false", "-o", "json", "-f", str(path)).stdout
        # One JSON document per object, one after the other.
        docs, decoder, i = [], json.JSONDecoder(), 0
        while i < len(out):
            if out[i].isspace():
                i += 1
                continue
            doc, i = decoder.raw_decode(out, i)
            docs.extend(doc["items"] if doc.get("kind") == "List" else [doc])
        return docs

    def kueue_ports(self) -> dict[str, int]:
        config = json.loads(self.kueue_config.read_text())
        return {"webhook": config["webhook"]["port"],
                "metrics": int(config["metrics"]["bindAddress"].rsplit(":", 1)[1]),
                "health": int(config["health"]["healthProbeBindAddress"].rsplit(":", 1)[1])}

    def _kueue_ready(self) -> bool:
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.kueue_ports()['health']}/readyz",
                                        timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def _wait_kueue(self, queues: list[tuple[str, dict, int]], retries: int = 2) -> None:
        try:
            self._wait("Kueue /readyz (its webhooks served)", self._kueue_ready, 120, KUEUE)
        except ClusterError as e:
            # Its ports were free when chosen, but other programs take ports too meanwhile.
            if retries and "address already in use" in str(e):
                self.install_kueue()
                self._start(KUEUE)
                return self._wait_kueue(queues, retries - 1)
            raise
        self.apply_queues(queues)
        # Active once Kueue has the flavors in its cache: a Job queued from now on is admitted.
        self._wait(f"ClusterQueue {local_kueue.CLUSTER_QUEUE} Active", lambda: self.kubectl(
            "get", f"clusterqueue/{local_kueue.CLUSTER_QUEUE}", "-o",
            "jsonpath={.status.conditions[?(@.type=='Active')].status}", check=False).stdout == "True",
            60, KUEUE)

    def apply_queues(self, queues: list[tuple[str, dict, int]]) -> None:
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": local_kueue.queue_objects(queues)}))

    def stop_kueue(self) -> None:
        """Stops Kueue on a running cluster. Its webhooks go first, since without the process
        they would refuse every Job; its CRDs and objects stay (Workloads carry finalizers
        only Kueue removes)."""
        if self.kueue_enabled():
            self.kubectl("delete", "--ignore-not-found", *[f"{kind}/{name}" for kind, name in (
                ("mutatingwebhookconfiguration", "kueue-mutating-webhook-configuration"),
                ("validatingwebhookconfiguration", "kueue-validating-webhook-configuration"))])
        pid = self._pid(KUEUE)
        if pid is not None:
            _terminate([pid])
        shutil.rmtree(self.kueue_config.parent, ignore_errors=True)

    def _write_layout(self, gpu_nodes: int, system_nodes: int) -> None:
        self.layout_file.write_text(json.dumps({"gpu_nodes": gpu_nodes, "system_nodes": system_nodes}))

    def start_agent(self) -> None:
        self._start(AGENT)
        self._wait("the local-exec agent's heartbeat", lambda: self._local_exec_ready(), 60, AGENT)

    def _local_exec_ready(self) -> bool:
        out = self.kubectl("get", "nodes", "-l", f"{LOCAL_EXEC_LABEL}=true", "-o",
                           "jsonpath={range .items[*]}{.status.daemonEndpoints.kubeletEndpoint.Port}{'\\n'}{end}",
                           check=False).stdout.split()
        pid = self._pid(AGENT)
        return bool(out) and pid is not None and all(
            _listening(int(port)) for port in out if port.isdigit() and port != "0") and "0" not in out

    def _nodes_ready(self, want: int) -> bool:
        out = self.kubectl("get", "nodes", "-o",
                           "jsonpath={range .items[*]}{.status.conditions[?(@.type=='Ready')].status}{'\\n'}{end}",
                           check=False).stdout.split()
        return out.count("True") >= want

    def ensure_nodes(self, gpu_nodes: int, system_nodes: int, local_exec_gpu_nodes: int = 0,
                     local_exec_system_nodes: int = 0, local_exec_max_procs: int = 0, g5_nodes: int = 0) -> None:
        nodes = [gpu_node(i) for i in range(gpu_nodes)] + [system_node(i) for i in range(system_nodes)]
        nodes += [g5_node(i) for i in range(g5_nodes)]
        nodes += [local_exec(gpu_node(i, subnet=200), local_exec_max_procs) for i in range(local_exec_gpu_nodes)]
        nodes += [local_exec(system_node(i, subnet=20), 0) for i in range(local_exec_system_nodes)]
        doc = {"apiVersion": "v1", "kind": "List", "items": nodes}
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                     input=json.dumps(doc), timeout=300)

    def down(self) -> None:
        # The agent first, while the API server still answers: its SIGTERM stops every pod
        # process (SIGTERM, then SIGKILL after its grace).
        agent = self._pid(AGENT)
        if agent is not None:
            os.kill(agent, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and _alive(agent):
                time.sleep(0.1)
            if _alive(agent):
                os.killpg(agent, signal.SIGKILL)
        # Whatever an agent that was killed outright left behind.
        if self.agent_state.exists():
            localexec_procs.sweep(self.agent_state)
        cgroups = localexec_procs.cgroup_root()
        if cgroups is not None:
            localexec_procs.cgroup_remove(cgroups / f"cluster-{self.api_port}")
        # Every kind of component, whatever this cluster was started with.
        _terminate([pid for pid in (self._pid(name) for name in (*COMPONENTS, AGENT, KUEUE)) if pid])
        for proc in self._procs.values():
            proc.poll()  # reap the children this process started
        self._procs.clear()
        # State does not outlive the processes: the next `up` starts from an empty etcd.
        shutil.rmtree(self.dir / "etcd", ignore_errors=True)
        shutil.rmtree(self.pids, ignore_errors=True)
        if self.agent_state.exists() and not localexec_procs.mounts_under(self.agent_state):
            shutil.rmtree(self.agent_state, ignore_errors=True)


def _terminate(pids: list[int]) -> None:
    """SIGTERM to each process group, then SIGKILL to what is left after a grace."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        if not any(_alive(p) for p in pids):
            break


def _free_ports(n: int) -> list[int]:
    """n distinct ports free now, below Linux's ephemeral range (32768-60999), where the
    ports bind(0) hands every other program's "free port" come from."""
    import random
    import socket
    ports: list[int] = []
    while len(ports) < n:
        port = random.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def _listening(port: int) -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _eks_name(i: int, subnet: int) -> str:
    return f"ip-192-168-{subnet + i // 250}-{10 + i % 250}.us-west-2.compute.internal"


def kueue_nodegroups(gpu_nodes: int, g5_nodes: int, local_exec_gpu_nodes: int) -> list[tuple[str, dict, int]]:
    """Kueue's flavors of the GPU nodes: (flavor name, one node, how many). The local-exec
    flavor comes first: its taint keeps out every pod not meant for it, while a pod meant
    for it would also match the p4d flavor's labels."""
    return [("local-exec-gpu", local_exec(gpu_node(0, subnet=200), 0), local_exec_gpu_nodes),
            (GPU_NODEGROUP, gpu_node(0), gpu_nodes),
            (G5_NODEGROUP, g5_node(0), g5_nodes)]


def gpu_node(i: int, subnet: int = 100) -> dict:
    """A p4d.24xlarge of the EKS managed nodegroup `gpu-p4d`, as kwok will play it."""
    name = _eks_name(i, subnet)
    resources = {"cpu": "96", "memory": "1152Gi", "pods": "110", "ephemeral-storage": "8Ti",
                 "nvidia.com/gpu": "8", "vpc.amazonaws.com/efa": "4"}
    return _node(name, {
        "eks.amazonaws.com/nodegroup": GPU_NODEGROUP,
        "eks.amazonaws.com/capacityType": "ON_DEMAND",
        "node.kubernetes.io/instance-type": "p4d.24xlarge",
        "nvidia.com/gpu.present": "true",
        "topology.kubernetes.io/zone": "us-west-2a",
    }, resources, [GPU_TAINT])


def g5_node(i: int, subnet: int = 110) -> dict:
    """A g5.2xlarge (one A10G) of the managed nodegroup `gpu-g5`, as kwok will play it."""
    name = _eks_name(i, subnet)
    resources = {"cpu": "8", "memory": "32Gi", "pods": "58", "ephemeral-storage": "450Gi", "nvidia.com/gpu": "1"}
    return _node(name, {
        "eks.amazonaws.com/nodegroup": G5_NODEGROUP,
        "eks.amazonaws.com/capacityType": "ON_DEMAND",
        "node.kubernetes.io/instance-type": "g5.2xlarge",
        "nvidia.com/gpu.present": "true",
        "topology.kubernetes.io/zone": "us-west-2a",
    }, resources, [GPU_TAINT])


def system_node(i: int, subnet: int = 10) -> dict:
    name = _eks_name(i, subnet)
    resources = {"cpu": "4", "memory": "16Gi", "pods": "58", "ephemeral-storage": "100Gi"}
    return _node(name, {
        "eks.amazonaws.com/nodegroup": "system",
        "eks.amazonaws.com/capacityType": "ON_DEMAND",
        "node.kubernetes.io/instance-type": "m5.xlarge",
        "topology.kubernetes.io/zone": "us-west-2a",
    }, resources, [])


def local_exec(node: dict, max_procs: int) -> dict:
    """The same node, run by the local-exec agent instead of kwok: no kwok annotation (kwok
    manages only annotated nodes), its label, and a taint so only pods that ask land there."""
    meta = node["metadata"]
    del meta["annotations"]["kwok.x-k8s.io/node"]
    meta["labels"].pop("type")
    meta["labels"][LOCAL_EXEC_LABEL] = "true"
    if max_procs:
        meta["labels"][MAX_PROCS_LABEL] = str(max_procs)
    node["spec"]["taints"] = [*node["spec"]["taints"], LOCAL_EXEC_TAINT]
    return node


def _node(name: str, labels: dict, resources: dict, taints: list) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {**labels, "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", "type": "kwok"},
        },
        "spec": {"taints": taints},
        "status": {"capacity": resources, "allocatable": resources},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--dir", default=os.environ.get("CLUSTER_DIR", str(ROOT / ".cluster")))
    parser.add_argument("--port", type=int, default=int(os.environ.get("CLUSTER_PORT", "36443")))
    parser.add_argument("--gpu-nodes", type=int, default=int(os.environ.get("GPU_NODES", "4")))
    parser.add_argument("--system-nodes", type=int, default=int(os.environ.get("SYSTEM_NODES", "2")))
    parser.add_argument("--g5-nodes", type=int, default=int(os.environ.get("G5_NODES", "1")),
                        help="g5.2xlarge nodes (one GPU each) of the simulated nodegroup gpu-g5")
    parser.add_argument("--local-exec-gpu-nodes", type=int,
                        default=int(os.environ.get("LOCAL_EXEC_GPU_NODES", "1")))
    parser.add_argument("--local-exec-system-nodes", type=int,
                        default=int(os.environ.get("LOCAL_EXEC_SYSTEM_NODES", "1")))
    parser.add_argument("--local-exec-max-procs", type=int,
                        default=int(os.environ.get("LOCAL_EXEC_MAX_PROCS", "2")),
                        help="cap on training processes per pod on the local-exec GPU nodes (0: none)")
    parser.add_argument("--kueue", type=int, choices=[0, 1], default=int(kueue_wanted()),
                        help="run Kueue with the ClusterQueue alpaca-gpu and LocalQueue default/gpu "
                             "(default: 1, unless KUEUE=0)")
    args = parser.parse_args(argv)
    cluster = Cluster(Path(args.dir), args.port)
    try:
        if args.command == "up":
            t0 = time.monotonic()
            cluster.up(args.gpu_nodes, args.system_nodes, args.local_exec_gpu_nodes,
                       args.local_exec_system_nodes, args.local_exec_max_procs, args.g5_nodes,
                       kueue=bool(args.kueue))
            print(f"control plane up in {time.monotonic() - t0:.1f}s "
                  f"({args.gpu_nodes} p4d and {args.g5_nodes} g5 GPU nodes, {args.system_nodes} system nodes, local-exec: "
                  f"{args.local_exec_gpu_nodes} GPU, {args.local_exec_system_nodes} system; "
                  f"Kueue {'on' if args.kueue else 'off'})", file=sys.stderr)
            print(f"export KUBECONFIG={cluster.kubeconfig}")
        elif args.command == "down":
            cluster.down()
            print("control plane down", file=sys.stderr)
        else:
            for name, pid in cluster.running().items():
                print(f"{name:25} {'running, pid ' + str(pid) if pid else 'stopped'}")
            return 0 if cluster.healthy() else 1
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
