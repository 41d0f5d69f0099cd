"""Provenance kept beside every result: package versions and the git revision of this code."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "torchvision", "ray", "numpy", "pyarrow", "grad-cam", "pillow")

REPO_ROOT = Path(__file__).resolve().parents[2]  # resnet/infra/provenance.py -> the checkout


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision() -> str | None:
    """HEAD of the checkout this code runs from, '+dirty' when it has uncommitted changes.

    ``$RESNET_GIT_REVISION`` wins: a ``ray job submit`` working_dir carries no .git folder.
    """
    if os.environ.get("RESNET_GIT_REVISION"):
        return os.environ["RESNET_GIT_REVISION"]
    root = REPO_ROOT
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def provenance() -> dict[str, object]:
    return {"versions": package_versions(), "git_revision": git_revision(),
            "host": platform.node(), "platform": platform.platform()}


RUNTIME_ENV = REPO_ROOT / "jobs" / "runtime_env.yaml"


def submit_runtime_env(path: Path = RUNTIME_ENV) -> str:
    """``ray job submit``'s runtime env as JSON: the YAML file plus this checkout's revision."""
    import json

    import yaml
    env = yaml.safe_load(path.read_text())
    revision = git_revision()
    if revision:
        env.setdefault("env_vars", {})["RESNET_GIT_REVISION"] = revision
    return json.dumps(env)
