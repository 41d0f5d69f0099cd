"""The layout is the architecture: ``resnet/`` in layers, every import pointing down them, thin
``jobs/``; and outputs written before the move (tests/fixtures/pre-move) still read."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The layers, bottom first: a module imports from its own package or from a lower layer, never
# from a layer above or from another package of its own layer. docs/architecture.md shows the
# same list (checked below), so the two cannot drift apart.
LAYERS: list[tuple[str, ...]] = [
    ("resnet.errors",),
    ("resnet.config",),
    ("resnet.infra",),
    ("resnet.data", "resnet.models"),
    ("resnet.train",),
    ("resnet.tune",),
    ("resnet.report", "resnet.tracking"),
    ("resnet.predict",),
    ("resnet.sweep", "resnet.bench"),
]


def unit_of(module: str) -> str:
    """The package (or top-level module) of a dotted module name: resnet.tune.trial -> resnet.tune."""
    parts = module.split(".")
    return ".".join(parts[:2])


def layer_of(module: str) -> int:
    unit = unit_of(module)
    for index, units in enumerate(LAYERS):
        if unit in units:
            return index
    raise AssertionError(f"{module} belongs to no layer: add {unit} to LAYERS and to "
                         "docs/architecture.md")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package: str | None = None) -> set[str]:
    """Every module a file imports, at the top or inside a function (lazy imports count too).
    ``package``: the file's package, for relative imports (default: from its path)."""
    found = set()
    if package is None:
        package = module_name(path) if path.name == "__init__.py" else \
            module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            found.add(base)
            # ``from resnet.infra import storage`` imports the module resnet.infra.storage
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def library_modules() -> list[Path]:
    return sorted((ROOT / "resnet").rglob("*.py"))


def test_every_import_points_down_the_layers():
    wrong = []
    for path in library_modules():
        me = module_name(path)
        for imported in imports_of(path):
            if imported.startswith("jobs"):
                wrong.append(f"{me} imports {imported}: the library never imports jobs/")
            if not imported.startswith("resnet.") or imported == "resnet":
                continue
            if unit_of(imported) == unit_of(me):
                continue
            if (ROOT / Path(*imported.split("."))).with_suffix(".py").exists() or \
                    (ROOT / Path(*imported.split("."))).is_dir():
                if layer_of(imported) >= layer_of(me):
                    wrong.append(f"{me} (layer {layer_of(me)}) imports {imported} "
                                 f"(layer {layer_of(imported)})")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_the_layer_check_catches_an_upward_import(tmp_path):
    """The check above is not vacuous: a module of train/ importing tune/ is caught."""
    path = ROOT / "resnet" / "train" / "loop.py"
    assert "resnet.tune.space" not in imports_of(path)
    bad = path.read_text() + "\n\ndef f():\n    from resnet.tune.space import load_space\n"
    copy = tmp_path / "loop.py"
    copy.write_text(bad)
    assert "resnet.tune.space" in imports_of(copy, "resnet.train")
    assert layer_of("resnet.tune.space") > layer_of("resnet.train.loop")


def test_every_package_has_a_layer():
    units = {unit_of(module_name(p)) for p in library_modules()} - {"resnet"}
    for unit in units:
        layer_of(unit)


def test_jobs_stay_thin():
    """jobs/ parse flags and call resnet/: no third-party library, nothing but the standard
    library, jobs/ and resnet/."""
    import sys
    stdlib = sys.stdlib_module_names
    for path in sorted((ROOT / "jobs").glob("*.py")):
        for imported in imports_of(path):
            top = imported.split(".")[0]
            assert top in stdlib or top in ("jobs", "resnet", "__future__"), \
                f"{path.name} imports {imported}: move that work into resnet/"


def test_the_architecture_doc_shows_these_layers():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"```text\n(.*?)```", doc, re.S)
    assert block, "docs/architecture.md opens with the layer diagram in a ```text block"
    rows = [line for line in block.group(1).splitlines() if re.match(r"\s*\d+\s", line)]
    shown = [tuple(sorted(re.findall(r"resnet/([a-z_]+)(?:/|\.py)", row))) for row in rows]
    expected = [tuple(sorted(unit.split(".")[1] for unit in units))
                for units in reversed(LAYERS)]
    assert shown == expected, f"docs/architecture.md shows {shown}, the layers are {expected}"


# --- Outputs written before the move (tests/fixtures/pre-move, made by main at 98475c1) ------

PRE_MOVE = ROOT / "tests" / "fixtures" / "pre-move"


def pre_move_copy(tmp_path: Path) -> Path:
    """A copy elsewhere, as a user's results would be: the paths recorded inside are stale."""
    import shutil
    copy = tmp_path / "pre-move"
    shutil.copytree(PRE_MOVE, copy)
    return copy


def test_an_older_runs_checkpoint_and_export_still_load(tmp_path):
    import json

    import torch

    from resnet.train.checkpoint import inference_model, load_state
    run = pre_move_copy(tmp_path) / "old-run"
    summary = json.loads((run / "summary.json").read_text())
    state = load_state(run / f"epoch_{summary['best_epoch']:04d}")
    assert state["epoch"] == summary["best_epoch"]
    exported = torch.export.load(run / "best" / "model.pt2").module()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(exported(x), inference_model(state)(x), atol=1e-5)


@pytest.mark.e2e
def test_analyze_gradcam_and_resume_read_an_older_sweep(tmp_path, shared_archive):
    from tests.conftest import run_job
    sweep = pre_move_copy(tmp_path) / "old-sweep"
    analysed = run_job("jobs.analyze", str(sweep), "--out", str(tmp_path / "analysis"))
    assert analysed.returncode == 0, analysed.stderr[-3000:]
    # The winner's checkpoint was found in the copy (its recorded path is gone): its confusion.
    assert (tmp_path / "analysis" / "confusion.png").is_file(), analysed.stdout
    [checkpoint] = sorted((sweep / "train_runs").glob("*_00000/epoch_0002"))
    cam = run_job("jobs.gradcam", "--checkpoint", str(checkpoint), "--data", str(shared_archive),
                  "--images", "2", "--out", str(tmp_path / "cam"))
    assert cam.returncode == 0, cam.stderr[-3000:]
    assert (tmp_path / "cam" / "gradcam.png").is_file()
    # --resume of the finished older sweep: Tune restores it (its pickled trial_dirname still
    # resolves) and the post-job step runs again.
    resumed = run_job("jobs.tune", "--data", str(shared_archive), "--model", "tiny",
                      "--storage", str(sweep.parent), "--name", "old-sweep", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert (sweep / "best" / "model.pt2").is_file()
