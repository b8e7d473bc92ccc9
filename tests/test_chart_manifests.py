"""manifests/ (plain YAML and a kustomization, for users without helm) is what
hack/manifests_from_chart.py makes from the chart: regenerated here and compared."""
from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("manifests_from_chart", ROOT / "hack" / "manifests_from_chart.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)


def test_manifests_match_the_chart():
    files = gen.render()
    stale = [rel for rel, text in files.items()
             if not (gen.MANIFESTS / rel).exists() or (gen.MANIFESTS / rel).read_text() != text]
    assert not stale, f"manifests/ differs from the chart in {stale}: run `make manifests`"
    # No file of the generated folders is left over from an older chart.
    for folder in ("operator", "rbac"):
        on_disk = {f"{folder}/{p.name}" for p in (gen.MANIFESTS / folder).glob("*.yaml")}
        assert on_disk <= set(files), f"not made from the chart: {sorted(on_disk - set(files))}"
    for rel, text in files.items():
        for doc in yaml.safe_load_all(text):
            labels = (doc.get("metadata") or {}).get("labels") or {}
            annotations = (doc.get("metadata") or {}).get("annotations") or {}
            assert not any(k.startswith("helm.sh/") for k in [*labels, *annotations]), rel
            assert labels.get("app.kubernetes.io/managed-by") != "Helm", rel


def test_kustomize_builds_and_the_api_server_accepts_it(cluster):
    built = subprocess.run([str(ROOT / ".bin" / "kubectl"), "kustomize", str(gen.MANIFESTS)],
                           capture_output=True, text=True, check=True).stdout
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(built) if d)
    assert kinds.count("CustomResourceDefinition") == 3 and "Deployment" in kinds and "ClusterKopfPeering" in kinds
    # The CRDs and the Namespace for real (the other objects need them), then all of it as
    # a dry run. kubectl reads the text itself: PyYAML would read Go's 2e-05 as a string.
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(gen.MANIFESTS / "crd"),
                    "-f", str(gen.MANIFESTS / "peering"), "-f", str(gen.MANIFESTS / "rbac" / "namespace.yaml"))
    cluster.wait_established("clusterkopfpeerings.kopf.dev")
    proc = cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-k", str(gen.MANIFESTS))
    assert proc.stdout.count("(server dry run)") == len(kinds), proc.stdout
