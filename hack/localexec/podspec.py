"""Pod spec -> what one process needs (environment, mounts, names), and the pod status a
kubelet would report. Pure functions: the agent does the I/O (tests/test_localexec_spec.py)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

LOCAL_EXEC_LABEL = "alpaca.dev/local-exec"
# Caps torchrun's processes per pod on a small machine (a node label or an agent flag).
MAX_PROCS_LABEL = "alpaca.dev/local-exec-max-procs"
NPROC_VAR = "PET_NPROC_PER_NODE"
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
CLUSTER_DOMAIN = "cluster.local"
# Where the process finds the host's programs: the repo's virtualenv first ("the image").
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_LINES = 80

# Volume kinds whose content the kubelet always mounts read-only.
READ_ONLY_KINDS = ("configMap", "secret", "downwardAPI", "projected")
SUPPORTED_VOLUMES = ("emptyDir", "hostPath", *READ_ONLY_KINDS)


class ConfigError(Exception):
    """The container cannot be configured yet (a missing ConfigMap or Secret): the kubelet
    reports CreateContainerConfigError and tries again."""


class PodRejected(Exception):
    """The pod can never run here: it ends Failed with this message."""


_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, $$ escapes, the rest stays."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)
    return _REF.sub(sub, value)


_FIELD = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_value(pod: Mapping[str, Any], path: str, pod_ip: str, host_ip: str) -> str:
    meta, spec = pod["metadata"], pod["spec"]
    simple = {
        "metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"], "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": pod_ip, "status.podIPs": pod_ip,
        "status.hostIP": host_ip, "status.hostIPs": host_ip,
    }
    if path in simple:
        return simple[path]
    m = _FIELD.match(path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise PodRejected(f"unsupported fieldRef {path!r}")


_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str) -> float:
    m = _QUANTITY.match(str(value))
    if not m or m.group(2) not in _SUFFIX:
        raise PodRejected(f"cannot read the quantity {value!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def resource_value(container: Mapping[str, Any], ref: Mapping[str, Any], node_allocatable: Mapping[str, str]) -> str:
    kind, _, name = ref["resource"].partition(".")
    res = container.get("resources") or {}
    amount = (res.get(kind) or {}).get(name) or (res.get("limits") or {}).get(name) or node_allocatable.get(name, "0")
    divisor = quantity(ref.get("divisor") or "1")
    # The kubelet rounds up: 500m of CPU with divisor 1 is "1".
    value = quantity(amount) / divisor
    return str(int(value) if value == int(value) else int(value) + 1)


@dataclass
class Lookups:
    """How the agent reads the objects a pod refers to; each returns None when absent."""
    config_map: Callable[[str], Mapping[str, str] | None]
    secret: Callable[[str], Mapping[str, str] | None]


def _ref_value(lookups: Lookups, kind: str, ref: Mapping[str, Any]) -> str | None:
    data = (lookups.config_map if kind == "configMapKeyRef" else lookups.secret)(ref["name"])
    what = "ConfigMap" if kind == "configMapKeyRef" else "Secret"
    if data is None:
        if ref.get("optional"):
            return None
        raise ConfigError(f'{what.lower()} "{ref["name"]}" not found')
    if ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise ConfigError(f'couldn\'t find key {ref["key"]} in {what} {ref["name"]}')
    return data[ref["key"]]


def container_env(pod: Mapping[str, Any], container: Mapping[str, Any], lookups: Lookups, *,
                  pod_ip: str, host_ip: str, service_env: Mapping[str, str],
                  node_allocatable: Mapping[str, str], venv_bin: str, max_procs: int = 0) -> dict[str, str]:
    """The process environment, in the kubelet's order: service variables, envFrom, env
    (each value expanded against what came before), then PATH/HOSTNAME/HOME defaults."""
    env: dict[str, str] = {"PATH": f"{venv_bin}:{SYSTEM_PATH}", "HOSTNAME": hostname(pod), "HOME": "/root"}
    env.update(service_env)
    for src in container.get("envFrom") or []:
        prefix = src.get("prefix", "")
        kind = "configMapRef" if "configMapRef" in src else "secretRef"
        ref = src[kind]
        data = (lookups.config_map if kind == "configMapRef" else lookups.secret)(ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise ConfigError(f'{"configmap" if kind == "configMapRef" else "secret"} "{ref["name"]}" not found')
        for k, v in data.items():
            env[prefix + k] = v
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(var.get("value", ""), env)
            continue
        src = var["valueFrom"]
        if "fieldRef" in src:
            env[name] = field_value(pod, src["fieldRef"]["fieldPath"], pod_ip, host_ip)
        elif "resourceFieldRef" in src:
            env[name] = resource_value(container, src["resourceFieldRef"], node_allocatable)
        elif "configMapKeyRef" in src or "secretKeyRef" in src:
            kind = "configMapKeyRef" if "configMapKeyRef" in src else "secretKeyRef"
            value = _ref_value(lookups, kind, src[kind])
            if value is not None:
                env[name] = value
        else:
            raise PodRejected(f"env {name}: unsupported valueFrom {sorted(src)}")
    if max_procs > 0 and env.get(NPROC_VAR, "").isdigit() and int(env[NPROC_VAR]) > max_procs:
        env[NPROC_VAR] = str(max_procs)
    return env


def command_line(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    command = list(container.get("command") or [])
    if not command:
        raise PodRejected(f"container {container['name']} has no command: with no container runtime "
                          f"the image's entrypoint ({container.get('image')}) is unknown")
    return [expand(a, env) for a in command + list(container.get("args") or [])]


def service_env(api_host: str, api_port: int) -> dict[str, str]:
    """What the kubelet gives every container for the `kubernetes` Service: here the real
    API server on loopback (its certificate has the SAN 127.0.0.1)."""
    port = str(api_port)
    return {
        "KUBERNETES_SERVICE_HOST": api_host, "KUBERNETES_SERVICE_PORT": port,
        "KUBERNETES_SERVICE_PORT_HTTPS": port, "KUBERNETES_PORT": f"tcp://{api_host}:{port}",
        f"KUBERNETES_PORT_{port}_TCP": f"tcp://{api_host}:{port}",
        f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp", f"KUBERNETES_PORT_{port}_TCP_PORT": port,
        f"KUBERNETES_PORT_{port}_TCP_ADDR": api_host,
    }


# ---- names ------------------------------------------------------------------------

def hostname(pod: Mapping[str, Any]) -> str:
    return (pod["spec"].get("hostname") or pod["metadata"]["name"])[:63].rstrip("-.")


def pod_fqdn(pod: Mapping[str, Any]) -> str | None:
    sub = pod["spec"].get("subdomain")
    if not sub:
        return None
    return f"{hostname(pod)}.{sub}.{pod['metadata']['namespace']}.svc.{CLUSTER_DOMAIN}"


def published_names(host: str, service: str, namespace: str) -> list[str]:
    """The names cluster DNS gives a pod behind a headless Service, with the short forms a
    pod's search path (NAMESPACE.svc.cluster.local, svc.cluster.local) resolves."""
    fq = f"{host}.{service}.{namespace}.svc.{CLUSTER_DOMAIN}"
    return [fq, f"{host}.{service}.{namespace}.svc", f"{host}.{service}.{namespace}", f"{host}.{service}"]


def _ready(pod: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def dns_records(pods: list[tuple[Mapping[str, Any], str]], services: Mapping[tuple, Mapping[str, Any]]) -> dict[str, str]:
    """name -> address: the A records cluster DNS serves for pods behind headless Services
    (a pod with hostname and subdomain S, selected by the headless Service S of its
    namespace; not-ready pods only with publishNotReadyAddresses). Computed from pods and
    Services, since EndpointSlices refuse loopback addresses."""
    records: dict[str, str] = {}
    for pod, ip in pods:
        meta, spec = pod["metadata"], pod["spec"]
        sub = spec.get("subdomain")
        svc = services.get((meta["namespace"], sub)) if sub else None
        if not svc or not ip or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        sspec = svc.get("spec") or {}
        selector = sspec.get("selector") or {}
        labels = meta.get("labels") or {}
        if sspec.get("clusterIP") != "None" or not selector or any(labels.get(k) != v for k, v in selector.items()):
            continue
        if not (sspec.get("publishNotReadyAddresses") or _ready(pod)):
            continue
        for name in published_names(hostname(pod), sub, meta["namespace"]):
            records[name] = ip
    return records


def hosts_file(pod: Mapping[str, Any], pod_ip: str, records: Mapping[str, str], api_host: str) -> str:
    """The pod's /etc/hosts: the kubelet's own lines, then what cluster DNS would answer."""
    own = [n for n in (pod_fqdn(pod), hostname(pod)) if n]
    lines = ["# Kubernetes-managed hosts file (alpaca local-exec agent).",
             "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
             f"{pod_ip}\t{' '.join(own)}"]
    by_ip: dict[str, list[str]] = {}
    for name, ip in sorted(records.items()):
        if name not in own:
            by_ip.setdefault(ip, []).append(name)
    lines += [f"{ip}\t{' '.join(names)}" for ip, names in sorted(by_ip.items())]
    lines.append(f"{api_host}\tkubernetes kubernetes.default kubernetes.default.svc "
                 f"kubernetes.default.svc.{CLUSTER_DOMAIN}")
    return "\n".join(lines) + "\n"


def pod_subnet(api_port: int) -> str:
    """127.X.Y: one loopback /24 per control plane (from its port), so two clusters on one
    machine never hand out the same pod address."""
    return f"127.{api_port // 256}.{api_port % 256}"


# ---- volumes ----------------------------------------------------------------------

@dataclass
class Mount:
    source: str
    target: str
    read_only: bool = False


def volume_kind(volume: Mapping[str, Any]) -> str:
    kinds = [k for k in volume if k != "name"]
    if len(kinds) != 1 or kinds[0] not in SUPPORTED_VOLUMES:
        raise PodRejected(f"volume {volume['name']}: {', '.join(kinds) or 'no source'} is not supported "
                          f"by the local-exec agent (supported: {', '.join(SUPPORTED_VOLUMES)})")
    return kinds[0]


def container_mounts(pod: Mapping[str, Any], container: Mapping[str, Any],
                     volume_dirs: Mapping[str, str]) -> list[Mount]:
    volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    mounts = []
    for vm in container.get("volumeMounts") or []:
        vol = volumes.get(vm["name"])
        if vol is None:
            raise PodRejected(f"volumeMount {vm['name']!r} names no volume of the pod")
        src = volume_dirs[vm["name"]]
        if vm.get("subPath"):
            if vm["subPath"].startswith("/") or ".." in vm["subPath"].split("/"):
                raise PodRejected(f"volumeMount {vm['name']}: subPath {vm['subPath']!r} leaves the volume")
            src = f"{src}/{vm['subPath']}"
        read_only = bool(vm.get("readOnly")) or volume_kind(vol) in READ_ONLY_KINDS
        mounts.append(Mount(src, vm["mountPath"], read_only))
    return mounts


# ---- status -----------------------------------------------------------------------

@dataclass
class ContainerRun:
    """One run of one container, as the agent knows it."""
    name: str
    image: str
    restarts: int = 0
    container_id: str = ""
    started_at: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = None
    finished_at: str | None = None
    waiting_reason: str | None = None
    waiting_message: str | None = None
    last: dict | None = field(default=None)

    @property
    def terminated(self) -> bool:
        return self.exit_code is not None


def container_status(run: ContainerRun) -> dict[str, Any]:
    status: dict[str, Any] = {"name": run.name, "image": run.image, "imageID": "", "restartCount": run.restarts,
                              "ready": False, "started": False}
    if run.container_id:
        status["containerID"] = run.container_id
    if run.terminated:
        term = {"exitCode": run.exit_code, "reason": run.reason or ("Completed" if run.exit_code == 0 else "Error"),
                "startedAt": run.started_at, "finishedAt": run.finished_at, "containerID": run.container_id}
        if run.message:
            term["message"] = run.message
        status["state"] = {"terminated": {k: v for k, v in term.items() if v is not None}}
    elif run.started_at:
        status.update(ready=True, started=True, state={"running": {"startedAt": run.started_at}})
    else:
        waiting = {"reason": run.waiting_reason or "ContainerCreating"}
        if run.waiting_message:
            waiting["message"] = run.waiting_message
        status["state"] = {"waiting": waiting}
    if run.last:
        status["lastState"] = {"terminated": run.last}
    return status


def pod_phase(runs: list[ContainerRun], restart_policy: str, deleting: bool) -> str:
    if not any(r.started_at or r.terminated for r in runs):
        return "Pending"
    if all(r.terminated for r in runs):
        will_restart = not deleting and any(
            restart_policy == "Always" or (restart_policy == "OnFailure" and r.exit_code != 0) for r in runs)
        if not will_restart:
            return "Succeeded" if all(r.exit_code == 0 for r in runs) else "Failed"
    return "Running"


def pod_status(runs: list[ContainerRun], *, restart_policy: str, deleting: bool, pod_ip: str, host_ip: str,
               start_time: str, now: str) -> dict[str, Any]:
    phase = pod_phase(runs, restart_policy, deleting)
    ready = phase == "Running" and all(r.started_at and not r.terminated for r in runs)

    def cond(kind: str, ok: bool, reason: str | None = None) -> dict:
        c = {"type": kind, "status": "True" if ok else "False", "lastTransitionTime": now, "lastProbeTime": None}
        if reason and not ok:
            c["reason"] = reason
        return c
    started = any(r.started_at for r in runs)
    return {
        "phase": phase,
        "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
        "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
        "startTime": start_time,
        "conditions": [
            cond("PodReadyToStartContainers", True),
            cond("Initialized", True),
            cond("ContainersReady", ready, "PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady"),
            cond("Ready", ready, "PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady"),
        ] if started or phase != "Pending" else [cond("PodReadyToStartContainers", True), cond("Initialized", True)],
        "containerStatuses": [container_status(r) for r in runs],
    }


def termination_message(file_text: str, log_tail: str, policy: str, exit_code: int) -> str:
    """The file's content; with FallbackToLogsOnError, the log's last lines when it is empty
    and the container failed (the kubelet's rule)."""
    text = file_text
    if not text.strip() and policy == "FallbackToLogsOnError" and exit_code != 0:
        text = "\n".join(log_tail.splitlines()[-FALLBACK_LOG_LINES:])
    return text[-MAX_TERMINATION_MESSAGE:]
