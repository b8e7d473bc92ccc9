"""The local-exec node agent (hack/localexec): pods on local-exec nodes run as real
processes on this machine, against the real control plane."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import BIN, ROOT, hack_cluster
from support import wait_for

sys.path.insert(0, str(ROOT / "hack" / "localexec"))
import procs  # noqa: E402

LOCAL_EXEC = {"alpaca.dev/local-exec": "true"}
TOLERATE = [{"key": "alpaca.dev/local-exec", "operator": "Exists", "effect": "NoSchedule"}]
PY = str(ROOT / ".venv" / "bin" / "python")


def control_plane(cluster) -> hack_cluster.Cluster:
    """The hack/cluster.py object behind the session's cluster (to kill and restart the agent)."""
    server = json.loads(Path(cluster.kubeconfig).read_text())["clusters"][0]["cluster"]["server"]
    return hack_cluster.Cluster(Path(cluster.kubeconfig).parent, int(server.rsplit(":", 1)[1]))


@pytest.fixture
def served(cluster, namespace):
    """A namespace the agent serves (it serves only namespaces labelled for it)."""
    cluster.kubectl("label", "namespace", namespace, "alpaca.dev/local-exec=true")
    return namespace


def pod(name: str, script: str, **spec) -> dict:
    container = {"name": "main", "image": "example.invalid/python:3", "command": [PY, "-u", "-c", textwrap.dedent(script)]}
    container.update(spec.pop("container", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **spec.pop("metadata", {})},
            "spec": {"restartPolicy": "Never", "nodeSelector": {**LOCAL_EXEC, "eks.amazonaws.com/nodegroup": "system"},
                     "tolerations": TOLERATE, "containers": [container], **spec}}


def apply(cluster, namespace, *objs) -> None:
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                         "items": list(objs)}))


def get(cluster, namespace, *args) -> dict:
    return json.loads(cluster.kubectl("-n", namespace, "get", *args, "-o", "json").stdout)


def wait_phase(cluster, namespace, name, phases=("Succeeded", "Failed"), timeout=90) -> dict:
    def done():
        p = get(cluster, namespace, "pod", name)
        return p if p["status"].get("phase") in phases else None
    return wait_for(f"pod {name} in {phases}", done, timeout=timeout, interval=0.5,
                    on_timeout=lambda: cluster.kubectl("-n", namespace, "get", "pod", name, "-o", "yaml",
                                                       check=False).stdout)


def process_record(cluster, pod_obj: dict, container: str = "main", run: int = 0) -> dict:
    path = (Path(cluster.kubeconfig).parent / "localexec" / "pods" / pod_obj["metadata"]["uid"] / "containers"
            / container / str(run) / "container.json")
    return wait_for(f"{path}", lambda: procs.read_record(path), timeout=30)


def test_indexed_job_pods_connect_by_their_published_names(cluster, served):
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "peers"},
           "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"app": "peers"},
                    "ports": [{"port": 29400}]}}
    script = """
        import os, socket, time
        index = int(os.environ["INDEX"])
        me = socket.gethostname()
        if index == 0:
            srv = socket.create_server((socket.gethostbyname(me), 29400))
            conn, addr = srv.accept()
            print(f"index 0 ({me}) accepted {conn.recv(100).decode()!r} from {addr[0]}")
        else:
            peer = "gang-0.peers"
            for _ in range(120):
                try:
                    s = socket.create_connection((peer, 29400), timeout=2)
                    break
                except OSError:
                    time.sleep(0.5)
            s.sendall(f"hello from {me}".encode())
            print(f"index 1 connected to {peer} = {s.getpeername()[0]}")
    """
    template = {"metadata": {"labels": {"app": "peers"}}, "spec": pod("x", script)["spec"]}
    template["spec"]["subdomain"] = "peers"
    template["spec"]["containers"][0]["env"] = [{"name": "INDEX", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}]
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "gang"},
           "spec": {"completions": 2, "parallelism": 2, "completionMode": "Indexed", "backoffLimit": 0,
                    "template": template}}
    apply(cluster, served, svc, job)
    cluster.kubectl("-n", served, "wait", "--for=condition=Complete", "job/gang", "--timeout=90s", timeout=100)
    pods = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p
            for p in get(cluster, served, "pods", "-l", "job-name=gang")["items"]}
    assert {p["status"]["phase"] for p in pods.values()} == {"Succeeded"}
    ip0 = pods["0"]["status"]["podIP"]
    assert ip0 != pods["1"]["status"]["podIP"] and ip0.startswith("127.")
    logs0 = cluster.kubectl("-n", served, "logs", pods["0"]["metadata"]["name"]).stdout
    logs1 = cluster.kubectl("-n", served, "logs", pods["1"]["metadata"]["name"]).stdout
    assert f"index 1 connected to gang-0.peers = {ip0}" in logs1
    # (The source address is the host's 127.0.0.1: pods share the host's network namespace.)
    assert "index 0 (gang-0) accepted 'hello from gang-1' from 127." in logs0


def test_environment_and_volumes_as_the_pod_declares_them(cluster, served):
    ns = served
    cluster.kubectl("-n", ns, "create", "serviceaccount", "runner")
    cluster.kubectl("-n", ns, "create", "configmap", "settings", "--from-literal=mode=fast",
                    "--from-literal=ds_config.json={\"zero\": 2}")
    cluster.kubectl("-n", ns, "create", "secret", "generic", "creds", "--from-literal=password=s3cr3t")
    script = f"""
        import json, os, socket, subprocess
        sa = "/var/run/secrets/kubernetes.io/serviceaccount"
        mounts = {{line.split()[1]: line.split()[2] for line in open("/proc/self/mounts")}}
        whoami = subprocess.run(["{BIN / 'kubectl'}", "auth", "whoami", "-o", "json"], capture_output=True, text=True)
        print("REPORT " + json.dumps({{
            "env": {{k: v for k, v in os.environ.items() if k.startswith(("E_", "CFG_", "KUBERNETES_SERVICE"))}},
            "cwd": os.getcwd(), "hostname": socket.gethostname(),
            "config": open("/etc/cfg/ds_config.json").read(), "secret": open("/etc/creds/password").read(),
            "labels": open("/etc/podinfo/labels").read(), "sa": sorted(os.listdir(sa)),
            "namespace_file": open(sa + "/namespace").read(),
            "scratch_writable": os.access("/scratch", os.W_OK), "cache_fs": mounts.get("/cache"),
            "tmp_writable": os.access("/tmp", os.W_OK),
            "config_writable": os.access("/etc/cfg", os.W_OK),
            "whoami": whoami.stdout or whoami.stderr,
            "path0": os.environ["PATH"].split(":")[0],
        }}))
    """
    spec = pod("envvol", script, serviceAccountName="runner",
               metadata={"labels": {"tier": "test"}, "annotations": {"note": "from-the-pod"}},
               volumes=[
                   {"name": "cfg", "configMap": {"name": "settings"}},
                   {"name": "creds", "secret": {"secretName": "creds"}},
                   {"name": "scratch", "emptyDir": {}},
                   {"name": "cache", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
                   # Over /tmp, where the agent's own state (the other volumes' sources) may live.
                   {"name": "tmp", "emptyDir": {}},
                   {"name": "podinfo", "downwardAPI": {"items": [
                       {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
               ],
               container={
                   "workingDir": "/scratch",
                   "env": [
                       {"name": "E_PLAIN", "value": "v1"},
                       {"name": "E_EXPANDED", "value": "$(E_PLAIN)-and-$$(E_PLAIN)"},
                       {"name": "E_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                       {"name": "E_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                       {"name": "E_NOTE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['note']"}}},
                       {"name": "E_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                       {"name": "E_MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
                       {"name": "E_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                   ],
                   "envFrom": [{"prefix": "CFG_", "configMapRef": {"name": "settings"}}],
                   "volumeMounts": [
                       {"name": "cfg", "mountPath": "/etc/cfg"}, {"name": "creds", "mountPath": "/etc/creds"},
                       {"name": "scratch", "mountPath": "/scratch"}, {"name": "cache", "mountPath": "/cache"},
                       {"name": "podinfo", "mountPath": "/etc/podinfo"}, {"name": "tmp", "mountPath": "/tmp"},
                   ]})
    apply(cluster, ns, spec)
    done = wait_phase(cluster, ns, "envvol")
    logs = cluster.kubectl("-n", ns, "logs", "envvol").stdout
    assert done["status"]["phase"] == "Succeeded", logs
    report = json.loads(next(line for line in logs.splitlines() if line.startswith("REPORT "))[7:])
    env = report["env"]
    assert env["E_PLAIN"] == "v1" and env["E_EXPANDED"] == "v1-and-$(E_PLAIN)"
    assert env["E_NAME"] == "envvol" and env["E_NS"] == ns and env["E_NOTE"] == "from-the-pod"
    assert env["E_IP"] == done["status"]["podIP"]
    assert env["E_MODE"] == "fast" and env["E_PASSWORD"] == "s3cr3t"
    assert env["CFG_mode"] == "fast" and env["CFG_ds_config.json"] == '{"zero": 2}'
    assert env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1"
    assert report["cwd"] == "/scratch" and report["hostname"] == "envvol"
    assert report["config"] == '{"zero": 2}' and report["secret"] == "s3cr3t"
    assert 'tier="test"' in report["labels"]
    assert report["sa"] == ["ca.crt", "namespace", "token"] and report["namespace_file"] == ns
    assert report["scratch_writable"] and report["tmp_writable"] and not report["config_writable"]
    assert report["cache_fs"] == "tmpfs"
    assert report["path0"] == str(ROOT / ".venv" / "bin")
    whoami = json.loads(report["whoami"])
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{ns}:runner"
    # Nothing of it leaked to the host: the volumes were the process's own.
    assert not Path("/etc/cfg/ds_config.json").exists() and not Path("/etc/creds/password").exists()


def test_exit_code_and_termination_message(cluster, served):
    apply(cluster, served, pod("fails", """
        open("/dev/termination-log", "w").write("the data set is empty")
        raise SystemExit(3)
    """), pod("missing", "", container={"command": ["no-such-program-here"]}))
    failed = wait_phase(cluster, served, "fails")
    assert failed["status"]["phase"] == "Failed"
    term = failed["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 3 and term["message"] == "the data set is empty" and term["reason"] == "Error"
    missing = wait_phase(cluster, served, "missing")
    term = missing["status"]["containerStatuses"][0]["state"]["terminated"]
    assert missing["status"]["phase"] == "Failed" and term["reason"] == "StartError"
    assert 'exec: "no-such-program-here": executable file not found in $PATH' in term["message"]


def test_delete_stops_the_process_group_within_the_grace_period(cluster, served):
    apply(cluster, served, pod("sleeper", """
        import signal, subprocess, time
        signal.signal(signal.SIGTERM, lambda *a: print("SIGTERM: not stopping", flush=True))
        child = subprocess.Popen(["sleep", "600"])
        print("child", child.pid, flush=True)
        while True:
            time.sleep(0.1)
    """, terminationGracePeriodSeconds=3))
    running = wait_phase(cluster, served, "sleeper", ("Running",))
    main = process_record(cluster, running)
    child_pid = int(wait_for("the child's pid", lambda: next(
        (line.split()[1] for line in cluster.kubectl("-n", served, "logs", "sleeper").stdout.splitlines()
         if line.startswith("child ")), None)))
    assert procs.alive(main)
    t0 = time.monotonic()
    cluster.kubectl("-n", served, "delete", "pod", "sleeper", "--wait=false")
    wait_for("the pod to be gone", lambda: cluster.kubectl("-n", served, "get", "pod", "sleeper",
                                                           check=False).returncode != 0, timeout=30)
    took = time.monotonic() - t0
    assert not procs.alive(main)
    wait_for("the child to be gone", lambda: procs.start_time(child_pid) is None, timeout=5)
    # It ignored SIGTERM, so only the SIGKILL after the grace period ended it.
    assert 2.5 <= took <= 10, took


def test_a_namespace_the_agent_does_not_serve_runs_nothing(cluster, namespace):
    apply(cluster, namespace, pod("outsider", "open('/tmp/should-not-exist', 'w')"))
    refused = wait_phase(cluster, namespace, "outsider")
    assert refused["status"]["phase"] == "Failed"
    assert "is not served by the local-exec agent" in refused["status"]["message"]
    state = Path(cluster.kubeconfig).parent / "localexec" / "pods" / refused["metadata"]["uid"]
    assert not (state / "containers").exists(), "no process may have been started"


def test_logs_follow_a_running_process(cluster, served):
    apply(cluster, served, pod("talker", """
        import time
        for i in range(6):
            print("line", i, flush=True)
            time.sleep(0.5)
    """))
    wait_phase(cluster, served, "talker", ("Running", "Succeeded"))
    follow = cluster.kubectl("-n", served, "logs", "-f", "talker", timeout=60).stdout
    assert follow.split("\n")[:6] == [f"line {i}" for i in range(6)]
    assert cluster.kubectl("-n", served, "logs", "--tail=2", "talker").stdout == "line 4\nline 5\n"


def test_agent_killed_and_restarted_finds_its_processes(cluster, served):
    cp = control_plane(cluster)
    gate = Path(cluster.kubeconfig).parent / f"gate-{served}"
    apply(cluster, served,
          pod("survivor", f"""
              import os, time
              while not os.path.exists("{gate}"):
                  time.sleep(0.2)
              print("saw the gate")
              raise SystemExit(7)
          """),
          pod("victim", "import time; time.sleep(600)"))
    survivor = wait_phase(cluster, served, "survivor", ("Running",))
    victim = wait_phase(cluster, served, "victim", ("Running",))
    rec_s, rec_v = process_record(cluster, survivor), process_record(cluster, victim)
    agent = cp.running()[hack_cluster.AGENT]
    os.kill(agent, signal.SIGKILL)
    wait_for("the agent to die", lambda: not hack_cluster._alive(agent))
    assert procs.alive(rec_s) and procs.alive(rec_v), "pods keep running while their agent is down"
    # While it is down the victim dies with its shim: its exit status is lost.
    victim_dir = Path(cluster.kubeconfig).parent / "localexec" / "pods" / victim["metadata"]["uid"] / "containers" / "main" / "0"
    shim = procs.read_record(victim_dir / "shim.json")
    os.kill(int(shim["pid"]), signal.SIGKILL)
    os.killpg(int(rec_v["pid"]), signal.SIGKILL)
    cp.up(4, 2, 1, 1)  # restarts the missing agent only
    assert cp.running()[hack_cluster.AGENT] not in (None, agent)
    gate.write_text("go")
    try:
        done = wait_phase(cluster, served, "survivor")
        lost = wait_phase(cluster, served, "victim")
    finally:
        gate.unlink()
    term = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert done["status"]["phase"] == "Failed" and term["exitCode"] == 7
    assert cluster.kubectl("-n", served, "logs", "survivor").stdout == "saw the gate\n"
    lost_term = lost["status"]["containerStatuses"][0]["state"]["terminated"]
    assert lost["status"]["phase"] == "Failed" and lost_term["reason"] == "ProcessLost"
    # Exactly one process per container ever ran: nothing was started twice.
    for p in (survivor, victim):
        runs = list((Path(cluster.kubeconfig).parent / "localexec" / "pods" / p["metadata"]["uid"]
                     / "containers" / "main").iterdir())
        assert [r.name for r in runs] == ["0"]


def test_cluster_down_leaves_no_process(tmp_path):
    from support import free_port, port_free
    port = next(p for p in (free_port() for _ in range(50)) if p > 20000 and port_free(p - 1) and port_free(p - 2))
    own = hack_cluster.Cluster(tmp_path / "c", port)
    env = dict(os.environ, KUBECONFIG=str(own.kubeconfig))
    try:
        own.up(gpu_nodes=0, system_nodes=0, local_exec_gpu_nodes=0, local_exec_system_nodes=1)
        kubectl = lambda *a, **kw: subprocess.run([str(BIN / "kubectl"), *a], env=env, capture_output=True,  # noqa: E731
                                                  text=True, check=True, **kw)
        kubectl("create", "namespace", "w")
        kubectl("label", "namespace", "w", "alpaca.dev/local-exec=true")
        spec = pod("stubborn", """
            import signal, subprocess, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            escaped = subprocess.Popen(["setsid", "sleep", "600"])  # escapes the process group
            print("escaped", escaped.pid, flush=True)
            time.sleep(600)
        """, terminationGracePeriodSeconds=1)
        kubectl("-n", "w", "apply", "-f", "-", input=json.dumps(spec))
        records = wait_for("the pod's process", lambda: [
            procs.read_record(p) for p in (own.dir / "localexec").glob("pods/*/containers/main/0/container.json")])
        shims = [procs.read_record(p) for p in (own.dir / "localexec").glob("pods/*/containers/main/0/shim.json")]
        # This pod's own escapee, named for good by pid and start time (as the agent names
        # its processes): a `sleep 600` found by name may be another test's or another run's.
        def escaped_child() -> dict | None:
            for log in (own.dir / "localexec").glob("pods/*/containers/main/0/log"):
                for line in log.read_text().splitlines():
                    if line.startswith("escaped "):
                        pid = int(line.split()[1])
                        return {"pid": pid, "start": procs.start_time(pid)}
            return None
        escaped = wait_for("the escaped child's pid", escaped_child)
        running = own.running()
    finally:
        own.down()
    assert all(running.values()) and hack_cluster.AGENT in running
    for name, pid in running.items():
        assert not hack_cluster._alive(pid), f"{name} (pid {pid}) outlived cluster down"
    assert not any(procs.alive(r) for r in records + shims)
    if procs.cgroup_root():
        assert escaped["start"] and not procs.alive(escaped), \
            f"a process that left the group survived: {describe(escaped['pid'])}"


def describe(pid: int) -> str:
    """What a failure needs to say why a process lives: its state, parent and cgroups."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cgroups = Path(f"/proc/{pid}/cgroup").read_text().replace("\n", "; ")
        cmdline = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError as e:
        return f"pid {pid}: {e}"
    return f"pid {pid} ({cmdline.strip()}), state {stat[0]}, parent {stat[1]}, cgroups {cgroups}"
