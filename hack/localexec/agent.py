#!/usr/bin/env python3
"""The local cluster's node agent: runs the pods bound to the local-exec nodes as real
processes on this machine, the way a kubelet runs containers (dev tooling; the operator
does not know it exists). README.md, "Pods that really run", says what it does.

    python hack/localexec/agent.py --kubeconfig K --state-dir D --cert C --key K --client-ca CA
        [--node-selector alpaca.dev/local-exec=true] [--namespace-selector alpaca.dev/local-exec=true]
        [--namespace NS ...] [--max-procs-per-pod N] [--port P]

One process serves every node carrying the label. Each container runs under a shim
(shim.py) that records its pid and start time and writes its exit status, so a SIGKILLed
agent finds its processes again when it restarts, and a lost one ends its pod Failed.
SIGTERM stops every process it runs (a node shutdown), then the agent exits.
Standard library only.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import podspec  # noqa: E402
import procs  # noqa: E402
from kube import ApiError, Kube  # noqa: E402
from logserver import LogServer  # noqa: E402
from podspec import ConfigError, ContainerRun, PodRejected  # noqa: E402

log = logging.getLogger("localexec")
ROOT = Path(__file__).resolve().parents[2]
SHIM = Path(__file__).resolve().parent / "shim.py"
HOST_IP = "127.0.0.1"
LEASE_S = 40
HEARTBEAT_S = 10
TICK_S = 0.5
RESTART_BACKOFF_S = (2, 4, 8, 16, 32, 60)
TOKEN_TTL_S = 3607
DEFAULT_SHM = "64m"
VERSION = "v1.34.4-localexec"
# How the agent signs its status changes (field manager).
MANAGER = "alpaca-localexec"


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def write_in_place(path: Path, text: str) -> None:
    """Rewrite a file that is bind-mounted somewhere: the mount pins the inode, so a rename
    would not be seen. Write over the old bytes, then cut."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def busy_ports(container: dict) -> list[int]:
    """The container's declared TCP ports that something on the host listens on."""
    import socket
    busy = []
    for port in container.get("ports") or []:
        if port.get("protocol", "TCP") != "TCP":
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("0.0.0.0", int(port["containerPort"])))
            except OSError:
                busy.append(int(port["containerPort"]))
    return busy


def _selector_matches(selector: str, labels: dict) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, eq, value = term.partition("=")
        if eq and labels.get(key) != value:
            return False
        if not eq and key not in labels:
            return False
    return True


@dataclass
class Run:
    """One run (restart number) of one container: its files and process records."""
    status: ContainerRun
    dir: Path
    shim: subprocess.Popen | None = None

    @property
    def record(self) -> dict | None:
        return procs.read_record(self.dir / "container.json")

    @property
    def shim_record(self) -> dict | None:
        return procs.read_record(self.dir / "shim.json")

    @property
    def log(self) -> Path:
        return self.dir / "log"

    @property
    def placeholder(self) -> bool:
        """Waiting for its configuration: nothing was started yet."""
        return self.dir.name == "pending"


@dataclass
class PodState:
    uid: str
    namespace: str
    name: str
    node: str
    ip: str
    start_time: str
    dir: Path
    pod: dict | None = None
    gone: bool = False
    prepared: bool = False
    rejected: str | None = None
    reject_reason: str = "UnexpectedAdmissionError"
    volume_dirs: dict = field(default_factory=dict)
    runs: dict = field(default_factory=dict)        # container name -> Run (the newest)
    restart_at: dict = field(default_factory=dict)
    term_sent: float | None = None
    kill_at: float | None = None
    killed: bool = False
    deleted: bool = False
    last_status: str = ""
    transition: str = field(default_factory=now_iso)
    tokens: list = field(default_factory=list)     # (path, source, issued monotonic)
    hosts: str = ""
    memory_mounts: list = field(default_factory=list)
    next_config_try: float = 0.0
    passive: bool = False   # finished before this agent had records of it: only its deletion is ours

    @property
    def cgroup(self) -> Path | None:
        f = self.dir / "cgroup"
        return Path(f.read_text().strip()) if f.exists() else None


class Agent:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.kube = Kube(args.kubeconfig)
        self.state = Path(args.state_dir).resolve()
        (self.state / "pods").mkdir(parents=True, exist_ok=True)
        self.subnet = podspec.pod_subnet(self.kube.port)
        self.service_env = podspec.service_env(self.kube.host, self.kube.port)
        self.venv_bin = str(Path(args.venv_bin).resolve())
        self.cgroups = procs.cgroup_root()
        if self.cgroups:
            self.cgroups = self.cgroups / f"cluster-{self.kube.port}"
            self.cgroups.mkdir(exist_ok=True)
        self.lock = threading.RLock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.nodes: dict[str, dict] = {}
        self.pods: dict[str, PodState] = {}
        self.services: dict[tuple, dict] = {}
        self.records: dict[str, str] = {}
        self.ns_cache: dict[str, tuple[float, dict | None]] = {}
        self.listed = threading.Event()  # no decision about recovered pods before the first pod list
        self.logs = LogServer(self.resolve_log, HOST_IP, args.port, args.cert, args.key, args.client_ca)

    # ---- startup: what the previous agent left -------------------------------------

    def recover(self) -> None:
        for pod_dir in (self.state / "pods").iterdir():
            meta = procs.read_record(pod_dir / "pod.json")
            if not meta:
                shutil.rmtree(pod_dir, ignore_errors=True)
                continue
            ps = PodState(meta["uid"], meta["namespace"], meta["name"], meta["node"], meta["ip"],
                          meta["startTime"], pod_dir, prepared=bool(meta.get("prepared")),
                          volume_dirs=meta.get("volumeDirs", {}), memory_mounts=meta.get("memoryMounts", []))
            for cdir in (pod_dir / "containers").glob("*"):
                restarts = sorted((int(p.name) for p in cdir.iterdir() if p.name.isdigit()), reverse=True)
                if not restarts:
                    continue
                launch = procs.read_record(cdir / str(restarts[0]) / "launch.json") or {}
                run = Run(ContainerRun(cdir.name, launch.get("image", ""), restarts=restarts[0],
                                       container_id=launch.get("containerID", "")), cdir / str(restarts[0]))
                if len(restarts) > 1:
                    run.status.last = self._terminated(Run(ContainerRun(cdir.name, ""), cdir / str(restarts[1])))
                ps.runs[cdir.name] = run
            self.pods[ps.uid] = ps
            log.info("recovered pod %s/%s (%s) with %d container(s)", ps.namespace, ps.name, ps.uid, len(ps.runs))

    # ---- watches -------------------------------------------------------------------

    def _list_watch(self, path: str, on_list, on_event, params: dict | None = None) -> None:
        while not self.stopping.is_set():
            try:
                listing = self.kube.get(path, params=params)
                on_list(listing["items"])
                rv = listing["metadata"]["resourceVersion"]
                while not self.stopping.is_set():
                    for ev in self.kube.watch(path, rv, params):
                        if ev["type"] == "ERROR":
                            raise ApiError(ev["object"].get("code", 500), json.dumps(ev["object"]), path)
                        rv = ev["object"]["metadata"].get("resourceVersion", rv)
                        if ev["type"] != "BOOKMARK":
                            on_event(ev["type"], ev["object"])
            except Exception as e:  # noqa: BLE001 - relist after any error, as informers do
                if not self.stopping.is_set():
                    log.warning("watch %s: %s; relisting", path, e)
                    time.sleep(1)

    def watch_pods(self) -> None:
        def on_list(items):
            with self.lock:
                seen = set()
                for pod in items:
                    if self._mine(pod):
                        seen.add(pod["metadata"]["uid"])
                        self._upsert(pod)
                for uid, ps in self.pods.items():
                    if uid not in seen:
                        ps.gone = True
            self.listed.set()
            self.wake.set()

        def on_event(kind, pod):
            with self.lock:
                if kind == "DELETED":
                    ps = self.pods.get(pod["metadata"]["uid"])
                    if ps:
                        ps.gone = True
                elif self._mine(pod):
                    self._upsert(pod)
            self.wake.set()
        self._list_watch("/api/v1/pods", on_list, on_event)

    def watch_services(self) -> None:
        def key(s):
            return (s["metadata"]["namespace"], s["metadata"]["name"])

        def on_list(items):
            with self.lock:
                self.services = {key(s): s for s in items}
            self.wake.set()

        def on_event(kind, s):
            with self.lock:
                if kind == "DELETED":
                    self.services.pop(key(s), None)
                else:
                    self.services[key(s)] = s
            self.wake.set()
        self._list_watch("/api/v1/services", on_list, on_event)

    def _mine(self, pod: dict) -> bool:
        return pod["spec"].get("nodeName") in self.nodes

    def _upsert(self, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        ps = self.pods.get(uid)
        if ps is None:
            if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                ps = self._new_pod(pod)
                ps.passive = True
            elif (pod.get("status") or {}).get("containerStatuses") and any(
                    "running" in (c.get("state") or {}) for c in pod["status"]["containerStatuses"]):
                # Reported running by an agent whose records are gone: never start it twice.
                ps = self._new_pod(pod)
                ps.rejected = "the pod's process was lost: the local-exec agent has no record of it"
                ps.reject_reason = "ProcessLost"
            else:
                ps = self._new_pod(pod)
        ps.pod = pod
        ps.gone = False

    def _new_pod(self, pod: dict) -> PodState:
        used = {p.ip for p in self.pods.values()}
        ip = next((f"{self.subnet}.{n}" for n in range(2, 255) if f"{self.subnet}.{n}" not in used), None)
        meta = pod["metadata"]
        d = self.state / "pods" / meta["uid"]
        d.mkdir(parents=True, exist_ok=True)
        ps = PodState(meta["uid"], meta["namespace"], meta["name"], pod["spec"]["nodeName"], ip or "",
                      now_iso(), d)
        if ip is None:
            ps.rejected = f"no free pod address left in {self.subnet}.0/24"
            ps.reject_reason = "OutOfAddresses"
        self._save(ps)
        self.pods[ps.uid] = ps
        log.info("pod %s/%s (%s) on %s: address %s", ps.namespace, ps.name, ps.uid, ps.node, ps.ip)
        return ps

    def _save(self, ps: PodState) -> None:
        write_json(ps.dir / "pod.json", {
            "uid": ps.uid, "namespace": ps.namespace, "name": ps.name, "node": ps.node, "ip": ps.ip,
            "startTime": ps.start_time, "prepared": ps.prepared, "volumeDirs": ps.volume_dirs,
            "memoryMounts": ps.memory_mounts})

    # ---- nodes ---------------------------------------------------------------------

    def heartbeat(self) -> None:
        while not self.stopping.is_set():
            try:
                self.refresh_nodes()
                for name in list(self.nodes):
                    self._renew_lease(name)
                    self._post_node_status(name)
            except Exception as e:  # noqa: BLE001
                log.warning("node heartbeat: %s", e)
            self.stopping.wait(HEARTBEAT_S)

    def refresh_nodes(self) -> None:
        items = self.kube.get("/api/v1/nodes", params={"labelSelector": self.args.node_selector})["items"]
        with self.lock:
            self.nodes = {n["metadata"]["name"]: n for n in items}

    def _renew_lease(self, name: str) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"
        spec = {"holderIdentity": name, "leaseDurationSeconds": LEASE_S, "renewTime": now_micro()}
        if self.kube.patch(path, {"spec": spec}, missing_ok=True) is None:
            node = self.nodes[name]
            self.kube.request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "ownerReferences": [{
                    "apiVersion": "v1", "kind": "Node", "name": name, "uid": node["metadata"]["uid"]}]},
                "spec": spec})

    def _post_node_status(self, name: str) -> None:
        t = now_iso()

        def cond(kind: str, status: str, reason: str, message: str) -> dict:
            return {"type": kind, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": t, "lastTransitionTime": self.started_at}
        status = {
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "local-exec agent"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "local-exec agent"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "local-exec agent"),
                cond("Ready", "True", "KubeletReady", "the alpaca local-exec agent runs this node's pods"),
            ],
            "addresses": [{"type": "InternalIP", "address": HOST_IP}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.logs.port}},
            "nodeInfo": {
                "machineID": "localexec", "systemUUID": "localexec", "bootID": self.started_at,
                "kernelVersion": platform.release(), "osImage": "alpaca local-exec (host processes)",
                "containerRuntimeVersion": "localexec://0.1", "kubeletVersion": VERSION,
                "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
        }
        self.kube.patch(f"/api/v1/nodes/{name}/status", {"status": status}, strategic=True,
                        params={"fieldManager": MANAGER})

    # ---- namespaces and lookups -----------------------------------------------------

    def served(self, namespace: str) -> bool:
        if namespace in self.args.namespace:
            return True
        if not self.args.namespace_selector:
            return False
        cached = self.ns_cache.get(namespace)
        if cached is None or time.monotonic() - cached[0] > 5:
            ns = self.kube.get(f"/api/v1/namespaces/{namespace}", missing_ok=True)
            cached = (time.monotonic(), ns)
            self.ns_cache[namespace] = cached
        ns = cached[1]
        return bool(ns) and _selector_matches(self.args.namespace_selector, ns["metadata"].get("labels") or {})

    def lookups(self, namespace: str) -> podspec.Lookups:
        import base64

        def cm(name):
            obj = self.kube.get(f"/api/v1/namespaces/{namespace}/configmaps/{name}", missing_ok=True)
            return None if obj is None else dict(obj.get("data") or {})

        def secret(name):
            obj = self.kube.get(f"/api/v1/namespaces/{namespace}/secrets/{name}", missing_ok=True)
            if obj is None:
                return None
            return {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()}
        return podspec.Lookups(cm, secret)

    # ---- volumes -------------------------------------------------------------------

    def prepare(self, ps: PodState) -> None:
        pod = ps.pod
        if not self.served(ps.namespace):
            raise PodRejected(f"namespace {ps.namespace} is not served by the local-exec agent "
                              f"(it serves namespaces labelled {self.args.namespace_selector!r}"
                              f"{' and ' + ', '.join(self.args.namespace) if self.args.namespace else ''})")
        if pod["spec"].get("initContainers"):
            raise PodRejected("init containers are not supported by the local-exec agent")
        for c in pod["spec"]["containers"]:
            podspec.command_line(c, {})  # no command: rejected before anything is created
        lookups = self.lookups(ps.namespace)
        vols = ps.dir / "volumes"
        dirs = {}
        for v in pod["spec"].get("volumes") or []:
            kind = podspec.volume_kind(v)
            if kind == "hostPath":
                path = v["hostPath"]["path"]
                if v["hostPath"].get("type") == "DirectoryOrCreate":
                    os.makedirs(path, exist_ok=True)
                dirs[v["name"]] = path
                continue
            d = vols / v["name"]
            d.mkdir(parents=True, exist_ok=True)
            if kind == "emptyDir":
                if (v["emptyDir"] or {}).get("medium") == "Memory" and str(d) not in ps.memory_mounts:
                    size = v["emptyDir"].get("sizeLimit")
                    opts = "mode=1777" + (f",size={int(podspec.quantity(size))}" if size else "")
                    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], check=True,
                                   capture_output=True)
                    ps.memory_mounts.append(str(d))
            elif kind == "configMap":
                self._write_source(ps, d, "configMap", v["configMap"], lookups, v["configMap"].get("defaultMode"))
            elif kind == "secret":
                self._write_source(ps, d, "secret", v["secret"], lookups, v["secret"].get("defaultMode"))
            elif kind == "downwardAPI":
                self._write_downward(ps, d, v["downwardAPI"].get("items") or [], v["downwardAPI"].get("defaultMode"))
            elif kind == "projected":
                mode = v["projected"].get("defaultMode")
                for src in v["projected"].get("sources") or []:
                    if "serviceAccountToken" in src:
                        self._write_token(ps, d, src["serviceAccountToken"], mode)
                    elif "configMap" in src:
                        self._write_source(ps, d, "configMap", src["configMap"], lookups, mode)
                    elif "secret" in src:
                        self._write_source(ps, d, "secret", src["secret"], lookups, mode)
                    elif "downwardAPI" in src:
                        self._write_downward(ps, d, src["downwardAPI"].get("items") or [], mode)
                    else:
                        raise PodRejected(f"volume {v['name']}: projected source {sorted(src)} is not supported")
            dirs[v["name"]] = str(d)
        ps.volume_dirs = dirs
        (ps.dir / "hostname").write_text(podspec.hostname(pod) + "\n")
        self._write_hosts(ps)
        if self.cgroups and not (ps.dir / "cgroup").exists():
            cg = self.cgroups / ps.uid
            # parents: the cluster's own group may have gone (a cleanup of another run's).
            cg.mkdir(parents=True, exist_ok=True)
            (ps.dir / "cgroup").write_text(str(cg))
        ps.prepared = True
        self._save(ps)

    @staticmethod
    def _put(d: Path, rel: str, content: str, mode: int | None) -> None:
        if rel.startswith("/") or ".." in rel.split("/"):
            raise PodRejected(f"volume path {rel!r} leaves the volume")
        path = d / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(content)
        os.chmod(tmp, mode if mode is not None else 0o644)
        os.replace(tmp, path)

    def _write_source(self, ps, d, kind, src, lookups, default_mode) -> None:
        name = src.get("name") or src.get("secretName")
        data = (lookups.config_map if kind == "configMap" else lookups.secret)(name)
        if data is None:
            if src.get("optional"):
                return
            raise ConfigError(f'{kind.lower()} "{name}" not found')
        items = src.get("items")
        pairs = [(i["key"], i["path"], i.get("mode")) for i in items] if items else [(k, k, None) for k in data]
        for key, rel, mode in pairs:
            if key not in data:
                if src.get("optional"):
                    continue
                raise ConfigError(f"couldn't find key {key} in {kind} {name}")
            self._put(d, rel, data[key], mode if mode is not None else default_mode)

    def _write_downward(self, ps, d, items, default_mode) -> None:
        pod = ps.pod
        for item in items:
            if "fieldRef" in item:
                value = podspec.field_value(pod, item["fieldRef"]["fieldPath"], ps.ip, HOST_IP)
            else:
                ref = item["resourceFieldRef"]
                container = next(c for c in pod["spec"]["containers"] if c["name"] == ref.get("containerName"))
                value = podspec.resource_value(container, ref, self._allocatable(ps))
            self._put(d, item["path"], value, item.get("mode", default_mode))

    def _write_token(self, ps, d, src, mode) -> None:
        sa = ps.pod["spec"].get("serviceAccountName") or "default"
        ttl = int(src.get("expirationSeconds") or TOKEN_TTL_S)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
            "audiences": [src["audience"]] if src.get("audience") else [],
            "expirationSeconds": ttl,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": ps.name, "uid": ps.uid}}}
        try:
            resp = self.kube.request("POST", f"/api/v1/namespaces/{ps.namespace}/serviceaccounts/{sa}/token", body)
        except ApiError as e:
            raise ConfigError(f"token for service account {sa}: {e}") from None
        self._put(d, src.get("path", "token"), resp["status"]["token"], mode if mode is not None else 0o644)
        ps.tokens = [t for t in ps.tokens if t[0] != str(d)] + [(str(d), src, time.monotonic(), ttl)]

    def _refresh_tokens(self, ps: PodState) -> None:
        # The kubelet's rule: a new token once 80% of the old one's lifetime has passed.
        for path, src, issued, ttl in list(ps.tokens):
            if time.monotonic() - issued > 0.8 * ttl:
                try:
                    self._write_token(ps, Path(path), src, None)
                except ConfigError as e:
                    log.warning("%s/%s: %s", ps.namespace, ps.name, e)

    def _write_hosts(self, ps: PodState) -> None:
        text = podspec.hosts_file(ps.pod, ps.ip, self.records, HOST_IP)
        if text != ps.hosts:
            write_in_place(ps.dir / "hosts", text)
            ps.hosts = text

    def _allocatable(self, ps: PodState) -> dict:
        return ((self.nodes.get(ps.node) or {}).get("status") or {}).get("allocatable") or {}

    def _max_procs(self, ps: PodState) -> int:
        labels = ((self.nodes.get(ps.node) or {}).get("metadata") or {}).get("labels") or {}
        value = labels.get(podspec.MAX_PROCS_LABEL, "")
        return int(value) if value.isdigit() else self.args.max_procs_per_pod

    # ---- containers ----------------------------------------------------------------

    def start(self, ps: PodState, container: dict, restarts: int, last: dict | None) -> None:
        pod = ps.pod
        env = podspec.container_env(pod, container, self.lookups(ps.namespace), pod_ip=ps.ip, host_ip=HOST_IP,
                                    service_env=self.service_env, node_allocatable=self._allocatable(ps),
                                    venv_bin=self.venv_bin, max_procs=self._max_procs(ps))
        argv = podspec.command_line(container, env)
        mounts = podspec.container_mounts(pod, container, ps.volume_dirs)
        mounts.sort(key=lambda m: m.target.rstrip("/").count("/"))
        name = container["name"]
        run_dir = ps.dir / "containers" / name / str(restarts)
        run_dir.mkdir(parents=True, exist_ok=False)  # exists: this run was started once already
        (run_dir / "termination-log").touch()
        cid = f"localexec://{ps.uid[:8]}-{name}-{restarts}"
        cgroup = None
        if ps.cgroup:
            cgroup = ps.cgroup / f"{name}-{restarts}"
            cgroup.mkdir(parents=True, exist_ok=True)
        launch = {
            "argv": argv, "env": env, "cwd": container.get("workingDir") or "/",
            "hostname": podspec.hostname(pod), "hosts": str(ps.dir / "hosts"), "hostname_file": str(ps.dir / "hostname"),
            "mounts": [m.__dict__ for m in mounts],
            "termination_log": str(run_dir / "termination-log"),
            "termination_path": container.get("terminationMessagePath") or "/dev/termination-log",
            "shm_size": DEFAULT_SHM, "log": str(run_dir / "log"), "state": str(run_dir),
            "dev_stage": str(run_dir / ".dev"), "cgroup": str(cgroup) if cgroup else None,
            "image": container.get("image", ""), "containerID": cid,
            # The "image" is this checkout (its .venv): a volume over one of its parents
            # (an emptyDir at /tmp, for a checkout under /tmp) must not hide it.
            "keep_visible": [str(Path(self.venv_bin).parent.parent)],
        }
        write_json(run_dir / "launch.json", launch)
        with open(run_dir / "shim.log", "ab") as shim_log:
            shim = subprocess.Popen([sys.executable, str(SHIM), str(run_dir / "launch.json")],
                                    stdin=subprocess.DEVNULL, stdout=shim_log, stderr=shim_log,
                                    start_new_session=True, close_fds=True)
        write_json(run_dir / "shim.json", {"pid": shim.pid, "start": procs.start_time(shim.pid) or ""})
        ps.runs[name] = Run(ContainerRun(name, container.get("image", ""), restarts=restarts, container_id=cid,
                                         last=last), run_dir, shim)
        log.info("%s/%s: started container %s (run %d): %s", ps.namespace, ps.name, name, restarts, " ".join(argv))

    def _terminated(self, run: Run) -> dict | None:
        s = run.status
        self._poll(run, None)
        if not s.terminated:
            return None
        t = {"exitCode": s.exit_code, "reason": s.reason, "startedAt": s.started_at, "finishedAt": s.finished_at,
             "containerID": s.container_id, "message": s.message}
        return {k: v for k, v in t.items() if v is not None}

    def _poll(self, run: Run, container: dict | None) -> None:
        """Update a run's status from the files its shim writes."""
        s = run.status
        if s.terminated:
            return
        if run.shim is not None:
            run.shim.poll()
        launch = procs.read_record(run.dir / "launch.json") or {}
        s.container_id = s.container_id or launch.get("containerID", "")
        rec = run.record
        if rec and not s.started_at:
            s.started_at = rec.get("startedAt")
        result = procs.read_record(run.dir / "exit.json")
        if result is None:
            if procs.alive(rec) or procs.alive(run.shim_record):
                return
            # Neither the process nor its shim: it died while no one was watching.
            result = {"exitCode": 137, "reason": "ProcessLost", "finishedAt": now_iso(),
                      "message": "the container's process and its shim are gone and its exit status is unknown "
                                 "(the local-exec agent was down)"}
        # Whatever the process left behind in its cgroup ends with it, as in a container.
        cg = launch.get("cgroup")
        if cg:
            procs.cgroup_kill(cg)
        elif rec:
            procs.signal_group(rec, signal.SIGKILL)
        s.exit_code = int(result["exitCode"])
        s.finished_at = result.get("finishedAt")
        s.started_at = s.started_at or s.finished_at
        s.reason = result.get("reason") or ("Completed" if s.exit_code == 0 else "Error")
        message = result.get("message")
        if message is None:
            try:
                text = (run.dir / "termination-log").read_text(errors="replace")
            except FileNotFoundError:
                text = ""
            policy = (container or {}).get("terminationMessagePolicy", "File")
            tail = ""
            if policy == "FallbackToLogsOnError" and s.exit_code != 0 and not text.strip():
                with open(run.log, "rb") as f:
                    f.seek(max(0, run.log.stat().st_size - 16384))
                    tail = f.read().decode(errors="replace")
            message = podspec.termination_message(text, tail, policy, s.exit_code)
        s.message = message or None
        log.info("container %s in %s exited %d (%s)", s.name, run.dir.parent.parent.parent.name, s.exit_code, s.reason)

    def _alive_runs(self, ps: PodState) -> list[Run]:
        return [r for r in ps.runs.values() if not r.placeholder and not r.status.terminated and
                (procs.alive(r.record) or procs.alive(r.shim_record))]

    def _signal(self, ps: PodState, sig: int) -> None:
        for run in self._alive_runs(ps):
            rec = run.record
            if rec:
                procs.signal_group(rec, sig)
            if sig == signal.SIGKILL:
                launch = procs.read_record(run.dir / "launch.json") or {}
                procs.cgroup_kill(launch.get("cgroup"))

    # ---- the loop ------------------------------------------------------------------

    def sync(self, ps: PodState) -> None:
        if ps.gone or ps.pod is None:
            return self._finish_gone(ps)
        pod = ps.pod
        deleting = bool(pod["metadata"].get("deletionTimestamp"))
        if ps.passive:
            if deleting:
                self._delete(ps)
            return
        containers = {c["name"]: c for c in pod["spec"]["containers"]}
        if ps.rejected:
            self._report(ps, rejected=True)
            if deleting:
                self._delete(ps)
            return
        if not ps.prepared and not deleting and time.monotonic() >= ps.next_config_try:
            try:
                self.prepare(ps)
            except PodRejected as e:
                ps.rejected = str(e)
                return self.sync(ps)
            except ConfigError as e:
                ps.next_config_try = time.monotonic() + 2
                self._waiting(ps, containers, "CreateContainerConfigError", str(e))
        if ps.prepared:
            self._write_hosts(ps)
            self._refresh_tokens(ps)
        for name, c in containers.items():
            run = ps.runs.get(name)
            if run is not None and not run.placeholder:
                self._poll(run, c)
            if deleting or not ps.prepared:
                continue
            if run is None or run.placeholder:
                self._start_or_wait(ps, c, 0, None)
            elif run.status.terminated and self._restarts(pod, run):
                due = ps.restart_at.setdefault(name, time.monotonic() + RESTART_BACKOFF_S[
                    min(run.status.restarts, len(RESTART_BACKOFF_S) - 1)])
                if time.monotonic() >= due:
                    ps.restart_at.pop(name)
                    self._start_or_wait(ps, c, run.status.restarts + 1, self._terminated(run))
        if deleting:
            self._kill_for_delete(ps)
        self._report(ps)
        if deleting and not self._alive_runs(ps):
            self._delete(ps)

    def _start_or_wait(self, ps: PodState, c: dict, restarts: int, last: dict | None) -> None:
        busy = busy_ports(c)
        if busy:
            # Pods share the host's ports: a restarted gang's rank 0 waits until the old one,
            # still in its grace period, has let go of the rendezvous port.
            return self._waiting(ps, {c["name"]: c}, "PortInUse",
                                 f"container port(s) {', '.join(map(str, busy))} in use on the host")
        try:
            self.start(ps, c, restarts, last)
        except ConfigError as e:
            self._waiting(ps, {c["name"]: c}, "CreateContainerConfigError", str(e))
        except PodRejected as e:
            ps.rejected = str(e)
        except FileExistsError:
            log.error("%s/%s: run %d of %s exists already: not starting it twice", ps.namespace, ps.name,
                      restarts, c["name"])

    def _waiting(self, ps: PodState, containers: dict, reason: str, message: str) -> None:
        for name, c in containers.items():
            run = ps.runs.get(name)
            if run is None:
                placeholder = ContainerRun(name, c.get("image", ""), waiting_reason=reason, waiting_message=message)
                ps.runs[name] = Run(placeholder, ps.dir / "containers" / name / "pending")
            elif not run.status.started_at and not run.status.terminated:
                run.status.waiting_reason, run.status.waiting_message = reason, message

    @staticmethod
    def _restarts(pod: dict, run: Run) -> bool:
        policy = pod["spec"].get("restartPolicy", "Always")
        return policy == "Always" or (policy == "OnFailure" and run.status.exit_code != 0)

    def _kill_for_delete(self, ps: PodState) -> None:
        if not self._alive_runs(ps):
            return
        now = time.monotonic()
        if ps.term_sent is None:
            grace = ps.pod["metadata"].get("deletionGracePeriodSeconds")
            if grace is None:
                grace = ps.pod["spec"].get("terminationGracePeriodSeconds", 30)
            ps.term_sent, ps.kill_at = now, now + max(0, int(grace))
            log.info("%s/%s deleted: SIGTERM, SIGKILL in %ss", ps.namespace, ps.name, grace)
            self._signal(ps, signal.SIGTERM)
        elif now >= ps.kill_at and not ps.killed:
            log.info("%s/%s: grace period over: SIGKILL", ps.namespace, ps.name)
            self._signal(ps, signal.SIGKILL)
            ps.killed = True

    def _runs_for_status(self, ps: PodState) -> list[ContainerRun]:
        out = []
        for c in ps.pod["spec"]["containers"]:
            run = ps.runs.get(c["name"])
            out.append(run.status if run else ContainerRun(c["name"], c.get("image", "")))
        return out

    def _report(self, ps: PodState, rejected: bool = False) -> None:
        if ps.deleted:
            return
        if rejected:
            status = {"phase": "Failed", "reason": ps.reject_reason, "message": ps.rejected,
                      "hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}], "startTime": ps.start_time}
        else:
            runs = self._runs_for_status(ps)
            deleting = bool(ps.pod["metadata"].get("deletionTimestamp"))
            phase = podspec.pod_phase(runs, ps.pod["spec"].get("restartPolicy", "Always"), deleting)
            if deleting and phase == "Running" and not self._alive_runs(ps):
                phase = "Failed"
            status = podspec.pod_status(runs, restart_policy=ps.pod["spec"].get("restartPolicy", "Always"),
                                        deleting=deleting, pod_ip=ps.ip, host_ip=HOST_IP,
                                        start_time=ps.start_time, now=ps.transition)
            status["phase"] = phase
        fingerprint = json.dumps(status, sort_keys=True)
        if fingerprint == ps.last_status:
            return
        if ps.last_status and json.loads(ps.last_status).get("phase") != status["phase"]:
            ps.transition = now_iso()
            for c in status.get("conditions", []):
                c["lastTransitionTime"] = ps.transition
        body = {"metadata": {"uid": ps.uid}, "status": status}
        try:
            self.kube.patch(f"/api/v1/namespaces/{ps.namespace}/pods/{ps.name}/status", body, strategic=True,
                            params={"fieldManager": MANAGER})
            ps.last_status = fingerprint
        except ApiError as e:
            if e.status in (404, 409):
                ps.gone = e.status == 404 or ps.gone
            else:
                log.warning("%s/%s: status: %s", ps.namespace, ps.name, e)

    def _delete(self, ps: PodState) -> None:
        if ps.deleted:
            return
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "preconditions": {"uid": ps.uid}}
        try:
            self.kube.request("DELETE", f"/api/v1/namespaces/{ps.namespace}/pods/{ps.name}", body, missing_ok=True)
            ps.deleted = True
        except ApiError as e:
            if e.status == 409:
                ps.deleted = True
            else:
                log.warning("%s/%s: delete: %s", ps.namespace, ps.name, e)

    def _finish_gone(self, ps: PodState) -> None:
        """The pod object is gone: stop what still runs, then forget it."""
        if self._alive_runs(ps):
            now = time.monotonic()
            if ps.term_sent is None:
                ps.term_sent, ps.kill_at = now, now + 2
                self._signal(ps, signal.SIGTERM)
            elif now >= ps.kill_at:
                self._signal(ps, signal.SIGKILL)
            return
        for run in ps.runs.values():
            if run.shim is not None:
                run.shim.poll()
        self.cleanup(ps)
        self.pods.pop(ps.uid, None)

    def cleanup(self, ps: PodState) -> None:
        for point in procs.mounts_under(ps.dir):
            procs.unmount(point)
        if ps.cgroup:
            procs.cgroup_kill(ps.cgroup)
            procs.cgroup_remove(ps.cgroup)
        if not procs.mounts_under(ps.dir):
            shutil.rmtree(ps.dir, ignore_errors=True)
        log.info("pod %s/%s (%s) cleaned up", ps.namespace, ps.name, ps.uid)

    def loop(self) -> None:
        while not self.listed.wait(1):
            if self.stopping.is_set():
                return
        while not self.stopping.is_set():
            self.wake.wait(TICK_S)
            self.wake.clear()
            with self.lock:
                self.records = podspec.dns_records(
                    [(ps.pod, ps.ip) for ps in self.pods.values() if ps.pod and not ps.gone and ps.prepared],
                    self.services)
                for ps in list(self.pods.values()):
                    try:
                        self.sync(ps)
                    except Exception:  # noqa: BLE001 - one pod's trouble never stops the others
                        log.exception("pod %s/%s", ps.namespace, ps.name)

    # ---- logs ----------------------------------------------------------------------

    def resolve_log(self, namespace: str, pod: str, container: str, previous: bool):
        with self.lock:
            candidates = [p for p in self.pods.values() if p.namespace == namespace and p.name == pod]
            if not candidates:
                return None
            ps = max(candidates, key=lambda p: p.start_time)
            run = ps.runs.get(container)
            if run is None:
                return None
            d = run.dir
            if previous:
                if run.status.restarts == 0:
                    return None
                d = run.dir.parent / str(run.status.restarts - 1)
        path = d / "log"
        if not path.exists():
            return None
        return path, (lambda: previous or run.status.terminated or (d / "exit.json").exists())

    # ---- shutdown ------------------------------------------------------------------

    def shutdown(self, grace_s: float) -> None:
        """SIGTERM: a node shutdown. Every process gets SIGTERM, then SIGKILL; none stays."""
        self.stopping.set()
        with self.lock:
            pods = list(self.pods.values())
            for ps in pods:
                self._signal(ps, signal.SIGTERM)
            graces = [int((ps.pod or {}).get("spec", {}).get("terminationGracePeriodSeconds", 30)) for ps in pods]
            deadline = time.monotonic() + min([grace_s, max(graces, default=0)])
            while time.monotonic() < deadline and any(self._alive_runs(ps) for ps in pods):
                time.sleep(0.1)
            for ps in pods:
                self._signal(ps, signal.SIGKILL)
            time.sleep(0.2)
            for ps in pods:
                for run in ps.runs.values():
                    if run.shim is not None:
                        try:
                            run.shim.wait(5)
                        except subprocess.TimeoutExpired:
                            run.shim.kill()
                for point in procs.mounts_under(ps.dir):
                    procs.unmount(point)

    def run(self) -> None:
        self.started_at = now_iso()
        self.recover()
        self.refresh_nodes()
        self.logs.start()
        for target in (self.heartbeat, self.watch_pods, self.watch_services):
            threading.Thread(target=target, name=target.__name__, daemon=True).start()
        log.info("serving nodes %s on port %d (pods in %s.0/24, cgroups %s)", sorted(self.nodes),
                 self.logs.port, self.subnet, self.cgroups or "off")
        self.loop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--cert", required=True, help="serving certificate of the logs endpoint")
    p.add_argument("--key", required=True)
    p.add_argument("--client-ca", required=True, help="CA of the API server's kubelet client certificate")
    p.add_argument("--port", type=int, default=0, help="logs endpoint port (0: any free one)")
    p.add_argument("--node-selector", default=f"{podspec.LOCAL_EXEC_LABEL}=true")
    p.add_argument("--namespace-selector", default=f"{podspec.LOCAL_EXEC_LABEL}=true",
                   help="serve pods in namespaces with these labels ('' for none)")
    p.add_argument("--namespace", action="append", default=[], help="also serve this namespace")
    p.add_argument("--max-procs-per-pod", type=int, default=0,
                   help=f"cap {podspec.NPROC_VAR} (0: no cap); the node label {podspec.MAX_PROCS_LABEL} wins")
    p.add_argument("--venv-bin", default=str(ROOT / ".venv" / "bin"))
    p.add_argument("--shutdown-grace", type=float, default=10.0)
    args = p.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    agent = Agent(args)

    def stop(signum, frame):
        log.info("SIGTERM: stopping every pod process")
        agent.shutdown(args.shutdown_grace)
        os._exit(0)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
