"""The README and docs/: short, every relative link resolves, every flag of every job documented."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation out, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_reads_in_ten_minutes():
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 200, len(readme)
    assert readme[3:5] == ["make run    # set-up (.venv on first use) + the main job on defaults, "
                           "on an embedded local Ray",
                           "make test   # set-up (.venv on first use) + the whole test suite "
                           "(what CI runs: .ci/run)"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_resolves(doc):
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.exists(), f"{doc.name}: {target} does not exist"
        if anchor and file.suffix == ".md":
            headings = re.findall(r"(?m)^#+ (.+)$", file.read_text())
            assert anchor in {slug(h) for h in headings}, f"{doc.name}: no heading #{anchor}"


def test_the_readme_pictures_are_real_and_small():
    for name in ("gradcam.png", "report.png"):
        path = ROOT / "docs" / name
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 400
        assert path.stat().st_size < 400_000, name


@pytest.mark.parametrize("job", ["jobs.train", "jobs.tune", "jobs.gradcam", "jobs.bench",
                                 "jobs.via_import", "jobs.analyze", "jobs.runtime_env",
                                 "jobs.predict"])
def test_help_and_docs_document_every_flag(job):
    proc = subprocess.run([sys.executable, "-m", job, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    flags = (ROOT / "docs" / "flags.md").read_text()
    section = flags.split(f"## `python -m {job}`", 1)[1].split("\n## ", 1)[0]
    for action in importlib.import_module(job).build_parser()._actions:
        for flag in action.option_strings:
            assert flag in proc.stdout, flag
            if flag.startswith("--") and flag != "--help":
                assert f"`{flag}`" in section, f"{job} {flag} is not documented in docs/flags.md"
        assert action.help, action.option_strings
