"""`alpaca-finetune` where users install it: the package built as an sdist and a wheel
(`uv build`, the wheel from the sdist, as pip would from PyPI), installed into a fresh venv
with the lock's versions, and run outside the repository against a plain moto server. It
validates with the CRD it carries as package data, which must be the repository's one CRD."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import boto3
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
UV = Path(sys.executable).parent / "uv"
CRD = ROOT / "manifests" / "crd" / "alpacafinetunes.alpaca.dev.yaml"
EXIT_CODES = ROOT / "image" / "alpaca_train" / "exitcodes.py"


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin/ of a fresh venv holding only the built wheel and its dependencies."""
    work = tmp_path_factory.mktemp("wheel")
    _run([str(UV), "build", "-q", "--out-dir", str(work / "dist"), str(ROOT)])
    wheel = next((work / "dist").glob("alpaca_operator-*.whl"))
    venv = work / "venv"
    _run([str(UV), "venv", "-q", "--python", sys.executable, str(venv)])
    _run([str(UV), "pip", "install", "-q", "--python", str(venv / "bin" / "python"),
          "-c", str(ROOT / "requirements.lock"), str(wheel)])
    return venv / "bin"


def _outside_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "ALPACA_SAGEMAKER_IMAGE")}
    return {**env, **extra}


def test_the_wheel_carries_the_crd_and_it_is_the_repositorys(installed, tmp_path):
    proc = _run([str(installed / "python"), "-c",
                 "import alpaca_operator, alpaca_operator.manifest_validation as m; "
                 "print(alpaca_operator.__file__); print(m.CRD_PATH)"], cwd=tmp_path, env=_outside_env({}))
    module, crd = proc.stdout.split()
    # Imported from the venv, not the source tree; the CRD a plain file there, byte for byte ours.
    assert str(installed.parent) in module and ROOT.as_posix() not in module
    assert not Path(crd).is_symlink() and Path(crd).read_bytes() == CRD.read_bytes()


def test_the_wheel_carries_the_training_images_exit_codes(installed, tmp_path):
    # The backends read them from the image's module (backends/base.py): in the wheel a plain
    # file, byte for byte the image's, and no alpaca_train installed with it (a partial one
    # would shadow the image's own).
    proc = _run([str(installed / "python"), "-c",
                 "import importlib.util, alpaca_operator.backends.base as b, alpaca_operator.exitcodes as e; "
                 "print(e.__file__); print(sorted(b.PERMANENT_EXIT_CODES)); "
                 "print(importlib.util.find_spec('alpaca_train'))"], cwd=tmp_path, env=_outside_env({}))
    path, codes, train = proc.stdout.splitlines()
    assert str(installed.parent) in path and not Path(path).is_symlink()
    assert Path(path).read_bytes() == EXIT_CODES.read_bytes()
    assert codes == "[64, 65, 66, 67]" and train == "None"


def test_the_operators_exit_codes_are_the_images_one_source():
    # One file, linked, not a copy the operator keeps equal to the image's.
    pkg = ROOT / "operator" / "alpaca_operator" / "exitcodes.py"
    assert pkg.is_symlink() and pkg.resolve() == EXIT_CODES.resolve()


def test_the_packaged_crd_is_the_charts_one_source():
    # In the tree, the package data is a link to manifests/crd/, which the chart links to too:
    # one file, not copies that could drift.
    pkg = ROOT / "operator" / "alpaca_operator" / "crd" / CRD.name
    assert pkg.is_symlink() and pkg.resolve() == CRD.resolve()
    assert (ROOT / "charts" / "alpaca-operator" / "files" / "crd" / CRD.name).resolve() == CRD.resolve()


def test_submit_sagemaker_from_the_installed_wheel_against_plain_moto(installed, s3, tmp_path):
    sample = yaml.safe_load((ROOT / "manifests" / "samples" / "sagemaker.yaml").read_text())
    bucket = sample["spec"]["output"]["uri"].removeprefix("s3://").split("/")[0]
    try:
        s3.client.create_bucket(Bucket=bucket)
    except s3.client.exceptions.BucketAlreadyOwnedByYou:
        pass
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(sample))
    proc = subprocess.run([str(installed / "alpaca-finetune"), "submit-sagemaker", "-f", str(run_yaml)],
                          cwd=tmp_path, env=_outside_env(s3.env), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    sm = boto3.client("sagemaker", endpoint_url=s3.endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    desc = sm.describe_training_job(TrainingJobName=proc.stdout.strip())
    assert desc["AlgorithmSpecification"]["TrainingImage"] == sample["spec"]["sagemaker"]["image"]
    # Validation from the packaged CRD refuses as the API server would (exit 2, its message).
    sample["spec"]["sagemaker"]["image"] = "ghcr.io/alpaca-operator/train:0.1.0"
    run_yaml.write_text(yaml.safe_dump(sample))
    bad = subprocess.run([str(installed / "alpaca-finetune"), "submit-sagemaker", "-f", str(run_yaml)],
                         cwd=tmp_path, env=_outside_env(s3.env), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "spec.sagemaker.image" in bad.stderr and "Amazon ECR" in bad.stderr, bad.stderr


def test_the_wheel_lists_the_crd_as_package_data(installed):
    wheel = next((installed.parent.parent / "dist").glob("alpaca_operator-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert f"alpaca_operator/crd/{CRD.name}" in names
    record = next(n for n in names if n.endswith("RECORD"))
    assert f"alpaca_operator/crd/{CRD.name}" in zipfile.ZipFile(wheel).read(record).decode()
