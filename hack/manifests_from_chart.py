#!/usr/bin/env python3
"""Writes the plain manifests (kustomize) for users without helm, from the chart.

    .venv/bin/python hack/manifests_from_chart.py           # (make manifests) rewrite them
    .venv/bin/python hack/manifests_from_chart.py --check   # non-zero if they differ

`helm template` of charts/alpaca-operator with its default values, as the release
"alpaca-operator" in namespace alpaca-system, less what only helm needs (its labels and
hooks). The CRDs and the admission policy are not rendered: manifests/crd/ (ours),
manifests/peering/ (kopf's) and manifests/policy/ are the one source the chart itself reads. tests/test_chart_manifests.py checks that the
files match.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "alpaca-operator"
MANIFESTS = ROOT / "manifests"
RELEASE, NAMESPACE = "alpaca-operator", "alpaca-system"
HELM_ONLY = ("helm.sh/chart", "app.kubernetes.io/managed-by", "helm.sh/hook", "helm.sh/hook-delete-policy")
HEADER = ("# Generated from charts/alpaca-operator by `make manifests` "
          "(hack/manifests_from_chart.py): do not edit.\n")
# kind -> file, in the order kustomization.yaml lists them.
FILES = {
    "Namespace": "rbac/namespace.yaml",
    "ServiceAccount": "rbac/serviceaccount.yaml",
    "ClusterRole": "rbac/clusterrole.yaml",
    "ClusterRoleBinding": "rbac/clusterrolebinding.yaml",
    "Deployment": "operator/deployment.yaml",
    "Service": "operator/service.yaml",
    "ClusterKopfPeering": "operator/peering.yaml",
}


def helm_template(helm: Path = ROOT / ".bin" / "helm") -> str:
    return subprocess.run([str(helm), "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                           "--set", "crds.enabled=false", "--set", "admissionPolicy.enabled=false"],
                          check=True, capture_output=True, text=True).stdout


def _plain(doc: str) -> str:
    """One rendered object less helm's own lines, its comments kept (they say why a rule is there)."""
    lines = [ln for ln in doc.splitlines() if not ln.startswith("# Source:")
             and not any(f"{k}:" in ln for k in HELM_ONLY)]
    out: list[str] = []
    for i, ln in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        indent = len(ln) - len(ln.lstrip())
        if ln.strip() in ("annotations:", "labels:") and len(nxt) - len(nxt.lstrip()) <= indent:
            continue    # emptied by the line filter
        out.append(ln)
    return "\n".join(out).strip("\n") + "\n"


def render(rendered: str | None = None) -> dict[str, str]:
    """relative path under manifests/ -> its text."""
    text = rendered if rendered is not None else helm_template()
    docs = [_plain(d) for d in re.split(r"(?m)^---[ \t]*$", text) if yaml.safe_load(d)]
    namespace = yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace",
                                "metadata": {"name": NAMESPACE, "labels": {"app.kubernetes.io/name": RELEASE}}},
                               sort_keys=False)
    by_file: dict[str, list[str]] = {}
    for d in [namespace, *docs]:
        kind = yaml.safe_load(d)["kind"]
        if kind not in FILES:
            raise SystemExit(f"the chart renders a {kind}, which has no file in {__file__}'s FILES")
        by_file.setdefault(FILES[kind], []).append(d)
    files = {path: HEADER + "---\n".join(ds) for path, ds in by_file.items()}
    resources = ["crd/" + p.name for p in sorted((MANIFESTS / "crd").glob("*.yaml"))]
    resources += ["policy/" + p.name for p in sorted((MANIFESTS / "policy").glob("*.yaml"))]
    resources += ["peering/" + p.name for p in sorted((MANIFESTS / "peering").glob("*.yaml"))]
    resources += [p for p in dict.fromkeys(FILES.values()) if p in files]
    files["kustomization.yaml"] = HEADER + yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": resources}, sort_keys=False)
    return files


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only compare; exit 1 if a file differs")
    args = p.parse_args()
    stale = []
    for rel, text in render().items():
        path = MANIFESTS / rel
        if path.exists() and path.read_text() == text:
            continue
        stale.append(rel)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check and stale:
        print("stale (run `make manifests`): " + ", ".join(f"manifests/{s}" for s in stale), file=sys.stderr)
        return 1
    for rel in stale:
        print(f"wrote manifests/{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
