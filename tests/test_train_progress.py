"""Progress reporting into the AlpacaFineTune's status, against the real API server, with
the service-account token and the Role the operator gives a training pod."""
from __future__ import annotations

import base64
import json
import logging
import threading
import time

from fixtures_train import python, run_cmd

from alpaca_train import progress


def finetune(name: str) -> dict:
    return {
        "apiVersion": "alpaca.dev/v1alpha1", "kind": "AlpacaFineTune", "metadata": {"name": name},
        "spec": {"model": {"uri": "s3://alpaca-demo/m/"}, "data": {"uri": "s3://alpaca-demo/d.json"},
                 "output": {"uri": f"s3://alpaca-demo/{name}/"}},
    }


def pod_identity(cluster, namespace: str, name: str, tmp_path) -> dict:
    """What the operator creates for a run NAME (docs/contract.md), and the pod's mounted token."""
    k = cluster.kubectl
    k("-n", namespace, "create", "serviceaccount", f"{name}-trainer")
    k("-n", namespace, "create", "role", f"{name}-progress", "--verb=get,patch",
      "--resource=alpacafinetunes.alpaca.dev/status", f"--resource-name={name}")
    k("-n", namespace, "create", "rolebinding", f"{name}-progress", f"--role={name}-progress",
      f"--serviceaccount={namespace}:{name}-trainer")
    token = k("-n", namespace, "create", "token", f"{name}-trainer").stdout.strip()
    kubeconfig = json.loads(open(cluster.kubeconfig).read())
    server = kubeconfig["clusters"][0]["cluster"]["server"]
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(token)
    (sa / "ca.crt").write_bytes(base64.b64decode(kubeconfig["clusters"][0]["cluster"]["certificate-authority-data"]))
    (sa / "namespace").write_text(namespace)
    host, port = server.removeprefix("https://").rsplit(":", 1)
    return {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port, "ALPACA_SERVICEACCOUNT_DIR": str(sa),
            "ALPACA_FINETUNE_NAME": name, "ALPACA_FINETUNE_NAMESPACE": namespace}


def status_of(cluster, namespace: str, name: str) -> dict:
    return json.loads(cluster.kubectl("-n", namespace, "get", "alpacafinetunes.alpaca.dev", name, "-o", "json")
                      .stdout).get("status") or {}


def test_training_reports_progress_to_its_finetune(cluster, crd, namespace, tiny_model, records_file, train_env, tmp_path):
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(finetune("demo")))
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(finetune("other")))
    cluster.kubectl("-n", namespace, "patch", "alpacafinetunes.alpaca.dev", "demo", "--subresource=status",
                    "--type=merge", "-p", json.dumps({"status": {"phase": "Running"}}))
    env = dict(train_env, **pod_identity(cluster, namespace, "demo", tmp_path))
    out = tmp_path / "out"
    run_cmd(python("-m", "alpaca_train.train", "--model_name_or_path", tiny_model, "--data_path", records_file(24),
                   "--output_dir", out, "--max_steps", "6", "--per_device_train_batch_size", "2",
                   "--logging_steps", "1", "--save_strategy", "no"), env, timeout=200).ok()
    status = status_of(cluster, namespace, "demo")
    p = status["progress"]
    assert p["stage"] == "done"
    assert p["step"] == p["totalSteps"] == 6 and p["display"] == "6/6"
    assert p["loss"] > 0 and p["learningRate"] >= 0 and p["tokensPerSecond"] > 0
    assert p["epoch"] == 0.5 and p["eta"] == "00:00:00"
    assert time.time() - time.mktime(time.strptime(p["updatedAt"], "%Y-%m-%dT%H:%M:%SZ")) < 3600 * 24
    assert status["phase"] == "Running", "a merge patch of progress leaves the operator's fields alone"
    assert "progress" not in status_of(cluster, namespace, "other")


def test_a_refused_report_is_logged_and_never_raised(cluster, crd, namespace, tmp_path, monkeypatch, caplog):
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(finetune("mine")))
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(finetune("theirs")))
    env = pod_identity(cluster, namespace, "mine", tmp_path)
    env["ALPACA_FINETUNE_NAME"] = "theirs"  # the Role allows only its own run
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RANK", "0")
    reporter = progress.ProgressReporter.from_env()
    assert reporter is not None
    with caplog.at_level(logging.WARNING, logger="alpaca_train.progress"):
        reporter.report(force=True, stage="training", step=1, totalSteps=2)
        reporter.close()
    assert reporter.failures == 1 and reporter.sent == 0
    assert "progress report failed (training goes on)" in caplog.text and "403" in caplog.text
    assert "progress" not in status_of(cluster, namespace, "theirs")


def test_no_finetune_name_no_reporting(monkeypatch):
    monkeypatch.delenv("ALPACA_FINETUNE_NAME", raising=False)
    assert progress.ProgressReporter.from_env() is None
    monkeypatch.setenv("ALPACA_FINETUNE_NAME", "x")
    monkeypatch.setenv("RANK", "1")
    assert progress.ProgressReporter.from_env() is None, "only global rank 0 reports"


def test_reports_are_throttled_to_one_per_interval():
    sent = []
    reporter = progress.ProgressReporter(sent.append, min_interval_s=10)
    for step in range(50):
        reporter.report(stage="training", step=step)
    reporter.report(force=True, stage="done", step=50)
    reporter.close()
    steps = [b["status"]["progress"]["step"] for b in sent]
    assert steps in ([0, 50], [50]), steps  # a report still queued is merged into a newer one
    assert progress.hhmmss(3725.4) == "01:02:05"


def test_a_report_still_queued_keeps_what_only_it_says():
    """While a report is on its way, the next two wait in one: the training's last report
    (its epoch and ETA) and the final "done" (steps only). Each is a merge patch, so the one
    queued keeps the first's keys; replaced, the run's progress kept an early epoch and ETA
    (a loaded machine, where the first report's PATCH outlasts the last steps)."""
    sent, sending, gate = [], threading.Event(), threading.Event()

    def patch(body):
        sending.set()
        assert gate.wait(10)
        sent.append(body["status"]["progress"])
    reporter = progress.ProgressReporter(patch)
    reporter.report(force=True, stage="training", step=1, epoch=0.0833, eta="00:00:05")
    assert sending.wait(10)
    reporter.report(force=True, stage="training", step=6, epoch=0.5, eta="00:00:00", loss=1.5)
    reporter.report(force=True, stage="done", step=6)
    gate.set()
    reporter.close()
    assert [p["step"] for p in sent] == [1, 6] and reporter.sent == 2
    assert {k: sent[1][k] for k in ("stage", "epoch", "eta", "loss")} == \
        {"stage": "done", "epoch": 0.5, "eta": "00:00:00", "loss": 1.5}
