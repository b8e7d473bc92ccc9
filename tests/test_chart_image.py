"""What operator/Dockerfile relies on (no Docker engine here to build it), and that it
agrees with the chart."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "operator" / "Dockerfile"


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement)[0].lower().replace("_", "-")


def test_installs_only_lock_pinned_operator_dependencies():
    text = DOCKERFILE.read_text()
    installed = re.search(r"pip install -c /src/requirements.lock ([^\\\n&]+)", text).group(1).split()
    lock = {_name(m.group(1)) for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==", (ROOT / "requirements.lock").read_text(), re.M)}
    pinned_in = {_name(ln) for ln in (ROOT / "requirements.in").read_text().splitlines() if "==" in ln}
    project = {_name(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    for pkg in installed:
        assert _name(pkg) in lock and _name(pkg) in pinned_in, f"{pkg} is not pinned"
    # Everything the operator package declares, but the kubernetes client (see the Dockerfile)
    # and cel-python, which only the alpaca-finetune CLI uses (a run submitted without a cluster).
    assert project - {_name(p) for p in installed} == {"kubernetes", "cel-python"}
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for s in src.split():
            assert (ROOT / s).exists(), f"COPY source {s} is missing"


def test_what_the_package_links_to_is_copied_where_the_link_points():
    # COPY keeps a symlink a symlink: the CRD and the training image's exit codes must land at
    # the link's target inside /src, or the build's pip install meets a dangling link.
    copies = [ln.split()[1:] for ln in DOCKERFILE.read_text().splitlines()
              if ln.startswith("COPY ") and "--from" not in ln]
    landed = set()
    for *srcs, dst in copies:
        for src in srcs:
            path = ROOT / src
            if path.is_dir():
                landed |= {PurePosixPath(dst) / f.relative_to(path).as_posix() for f in path.rglob("*")}
            else:
                landed.add(PurePosixPath(dst) / path.name if dst.endswith("/") else PurePosixPath(dst))
    links = [p for p in (ROOT / "operator").rglob("*") if p.is_symlink()]
    assert {"exitcodes.py", "alpacafinetunes.alpaca.dev.yaml"} <= {p.name for p in links}
    for link in links:
        target = (link.parent / os.readlink(link)).resolve().relative_to(ROOT)
        assert PurePosixPath("/src") / target.as_posix() in landed, f"{link} -> {target} is not copied"


def test_the_operator_imports_without_the_kubernetes_client():
    check = re.search(r'python -c "([^"]+)"', DOCKERFILE.read_text()).group(1)
    subprocess.run([sys.executable, "-c", check], check=True, cwd=ROOT)


def test_non_root_and_the_ports_the_chart_uses():
    text = DOCKERFILE.read_text()
    uid, gid = re.search(r"^USER (\d+):(\d+)$", text, re.M).groups()
    values = yaml.safe_load((ROOT / "charts" / "alpaca-operator" / "values.yaml").read_text())
    deployment = (ROOT / "charts" / "alpaca-operator" / "templates" / "deployment.yaml").read_text()
    assert int(uid) > 0 and f"runAsUser: {uid}" in deployment and f"runAsGroup: {gid}" in deployment
    assert set(re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split()) == {"8080", str(values["metrics"]["port"])}
    assert re.search(r'^ENTRYPOINT \["python", "-m", "alpaca_operator"\]$', text, re.M)
