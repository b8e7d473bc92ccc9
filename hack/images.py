#!/usr/bin/env python3
"""`make images`: the training image (image/Dockerfile) and the operator's (operator/Dockerfile)
for Amazon ECR.

Where a Docker engine answers, both are built and tagged for ECR (and pushed with PUSH=1);
otherwise this prints the exact commands that do it on a machine that has one. The account
and region come from AWS_ACCOUNT_ID and AWS_REGION (placeholders ACCOUNT and REGION when
unset), the tag from IMAGE_TAG, default the chart's appVersion, the tag the chart and
docs/eks/values-eks.yaml expect. Standard library only: it runs before `make setup`.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# ECR repository -> Dockerfile; both build from the repository root (they copy the lock file).
IMAGES = {
    "alpaca-operator/train": "image/Dockerfile",
    "alpaca-operator/operator": "operator/Dockerfile",
}
# EKS's GPU nodes and SageMaker's training instances are x86_64: a build on an arm64
# laptop must still produce amd64 images.
PLATFORM = "linux/amd64"


@dataclass(frozen=True)
class Target:
    account: str
    region: str
    tag: str

    @property
    def registry(self) -> str:
        # The China regions' ECR endpoints end in .amazonaws.com.cn.
        suffix = ".cn" if self.region.startswith("cn-") else ""
        return f"{self.account}.dkr.ecr.{self.region}.amazonaws.com{suffix}"

    def uri(self, repository: str) -> str:
        return f"{self.registry}/{repository}:{self.tag}"


def chart_app_version() -> str:
    text = (ROOT / "charts" / "alpaca-operator" / "Chart.yaml").read_text()
    match = re.search(r'^appVersion:\s*"?([^"\s]+)"?\s*$', text, re.MULTILINE)
    if not match:
        raise SystemExit("error: charts/alpaca-operator/Chart.yaml has no appVersion")
    return match.group(1)


def target_from_env(env: dict[str, str]) -> Target:
    account, region = env.get("AWS_ACCOUNT_ID", ""), env.get("AWS_REGION", "")
    tag = env.get("IMAGE_TAG") or chart_app_version()
    # A typo here would only show as a failed push after a 20-minute build.
    if account and not re.fullmatch(r"[0-9]{12}", account):
        raise SystemExit(f"error: AWS_ACCOUNT_ID must be the 12 digits of an AWS account, not {account!r}")
    if region and not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}", region):
        raise SystemExit(f"error: AWS_REGION must be a region such as us-west-2, not {region!r}")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag):
        raise SystemExit(f"error: IMAGE_TAG {tag!r} is not a valid image tag")
    return Target(account or "ACCOUNT", region or "REGION", tag)


def build_commands(t: Target) -> list[list[str]]:
    return [["docker", "build", "--platform", PLATFORM, "-f", dockerfile, "-t", t.uri(repo), "."]
            for repo, dockerfile in IMAGES.items()]


def push_commands(t: Target) -> list[str]:
    """Shell lines (the login is a pipe): repositories, login, pushes."""
    lines = [f"aws ecr describe-repositories --region {t.region} --repository-names {repo} >/dev/null 2>&1"
             f" || aws ecr create-repository --region {t.region} --repository-name {repo}"
             for repo in IMAGES]
    lines.append(f"aws ecr get-login-password --region {t.region}"
                 f" | docker login --username AWS --password-stdin {t.registry}")
    lines += [shlex.join(["docker", "push", t.uri(repo)]) for repo in IMAGES]
    return lines


def docker_engine() -> bool:
    """A docker CLI whose engine answers (a CLI alone, without a daemon, cannot build)."""
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def main() -> int:
    t = target_from_env(dict(os.environ))
    placeholders = "ACCOUNT" in (t.account, t.region) or "REGION" in (t.account, t.region)
    if docker_engine():
        for cmd in build_commands(t):
            print("+", shlex.join(cmd), flush=True)
            if subprocess.run(cmd, cwd=ROOT).returncode != 0:
                print(f"error: {shlex.join(cmd)} failed", file=sys.stderr)
                return 1
        if os.environ.get("PUSH") == "1" and not placeholders:
            for line in push_commands(t):
                print("+", line, flush=True)
                if subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=ROOT).returncode != 0:
                    print(f"error: {line} failed", file=sys.stderr)
                    return 1
            return 0
        print("# built; to push them to ECR (or: make images PUSH=1 with AWS_ACCOUNT_ID and AWS_REGION set):")
        print("\n".join(push_commands(t)))
        return 0
    print("# No Docker engine here: run these from the repository root where one is.")
    if placeholders:
        print("# (export AWS_ACCOUNT_ID and AWS_REGION, then `make images` prints them filled in)")
    print("\n".join([*(shlex.join(c) for c in build_commands(t)), *push_commands(t)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
