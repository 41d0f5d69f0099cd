"""VGG Image Annotator (VIA 2.x) exports -> an image-folder tree of region crops.

Reads the CSV export (one row per region, JSON inside CSV quoting) or the project / annotation
JSON export; crops every region by its bounding box clipped to the image, resizes it, and writes
``train/<class>/*.png`` and ``test/<class>/*.png`` (split stratified and deterministic) plus
``manifest.csv``. The class of a region is the value of one region attribute.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any
from urllib.parse import unquote

import numpy as np
from PIL import Image

from resnet.errors import UsageError

CSV_COLUMNS = ("filename", "file_size", "file_attributes", "region_count", "region_id",
               "region_shape_attributes", "region_attributes")
SHAPES = ("rect", "circle", "ellipse", "polygon", "polyline")


@dataclass
class Region:
    filename: str
    region_id: int
    shape: dict[str, Any]
    attributes: dict[str, Any]


@dataclass
class ImportSummary:
    regions_read: int = 0
    written: Counter = field(default_factory=Counter)  # class -> crops
    skipped: Counter = field(default_factory=Counter)  # reason -> regions
    missing_images: list[str] = field(default_factory=list)


def _cell(text: str, where: str) -> Any:
    try:
        return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); fix or "
                         "export the annotations again") from None


def read_csv(path: Path, summary: ImportSummary) -> list[Region]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise UsageError(f"{path} is not a VIA 2.x CSV export (expected the columns "
                             f"{', '.join(CSV_COLUMNS)})")
        regions = []
        for line, row in enumerate(reader, start=2):
            if row["region_count"].strip() in ("", "0"):
                summary.skipped["image without regions"] += 1
                continue
            where = f"{path} line {line}"
            regions.append(Region(row["filename"], int(row["region_id"] or 0),
                                  _cell(row["region_shape_attributes"], where),
                                  _cell(row["region_attributes"], where)))
    return regions


def read_json(path: Path, summary: ImportSummary) -> list[Region]:
    """The VIA 2.x project file (``_via_img_metadata`` inside) or annotation export (the
    metadata itself), or a VIA 1.x export (``regions`` an object keyed "0", "1", ...)."""
    data = _cell(path.read_text(encoding="utf-8"), str(path))
    images = data.get("_via_img_metadata", data) if isinstance(data, dict) else None
    if not isinstance(images, dict) or not all(
            isinstance(v, dict) and "filename" in v and isinstance(v.get("regions"), (list, dict))
            for v in images.values()):
        raise UsageError(f"{path} is not a VIA project or annotation JSON export")
    regions = []
    for image in images.values():
        listed = image["regions"]
        if isinstance(listed, dict):  # VIA 1.x: {"0": region, "1": region, ...}
            listed = [listed[k] for k in sorted(listed, key=lambda k: int(k) if k.isdigit() else k)]
        if not listed:
            summary.skipped["image without regions"] += 1
        for i, region in enumerate(listed):
            regions.append(Region(image["filename"], i, region.get("shape_attributes", {}),
                                  region.get("region_attributes", {})))
    return regions


def read_export(path: str, summary: ImportSummary) -> list[Region]:
    source = Path(path)
    if not source.is_file():
        raise UsageError(f"--csv {path}: no such file")
    try:
        return read_json(source, summary) if source.suffix.lower() == ".json" else \
            read_csv(source, summary)
    except (UnicodeDecodeError, csv.Error) as exc:  # a binary file, or NUL bytes in text
        raise UsageError(f"--csv {path} is not a VIA export: not UTF-8 text "
                         f"({type(exc).__name__}); pass the .csv or .json VIA saved") from None


def bounding_box(shape: dict[str, Any]) -> tuple[float, float, float, float] | None:
    """(left, top, right, bottom) in pixels, or None for a point or an unknown shape."""
    name = shape.get("name")
    if name == "rect":
        return shape["x"], shape["y"], shape["x"] + shape["width"], shape["y"] + shape["height"]
    if name == "circle":
        cx, cy, r = shape["cx"], shape["cy"], shape["r"]
        return cx - r, cy - r, cx + r, cy + r
    if name == "ellipse":  # rotated by theta (radians): the box of the rotated ellipse
        cx, cy, rx, ry, t = shape["cx"], shape["cy"], shape["rx"], shape["ry"], shape.get("theta", 0)
        half_w = math.hypot(rx * math.cos(t), ry * math.sin(t))
        half_h = math.hypot(rx * math.sin(t), ry * math.cos(t))
        return cx - half_w, cy - half_h, cx + half_w, cy + half_h
    if name in ("polygon", "polyline"):
        xs, ys = shape["all_points_x"], shape["all_points_y"]
        return min(xs), min(ys), max(xs), max(ys)
    return None


def region_class(attributes: dict[str, Any], attribute: str) -> tuple[str | None, str]:
    """(class, "") or (None, why the region is skipped). Checkbox attributes are a dict of
    option -> checked; exactly one must be checked."""
    value = attributes.get(attribute)
    if isinstance(value, dict):
        checked = [k for k, v in value.items() if v]
        if len(checked) != 1:
            return None, f"{attribute}: {'none' if not checked else 'several'} checked"
        value = checked[0]
    if value is None or str(value).strip() == "":
        return None, f"no {attribute} value"
    return str(value).strip(), ""


class ImageFinder:
    """Export filenames (relative, absolute, or file:// URIs from another machine) -> files."""

    def __init__(self, images: Path) -> None:
        self.images = images
        self.by_name: dict[str, list[Path]] | None = None

    def find(self, filename: str) -> Path | None:
        # file:///home/a/x.jpg -> /home/a/x.jpg; file://D:\annot\x.jpg -> D:\annot\x.jpg
        name = unquote(filename[len("file://"):]) if filename.lower().startswith("file://") \
            else filename
        for candidate in (Path(name), self.images / name):
            if candidate.is_file():
                return candidate
        if self.by_name is None:  # matched by base name anywhere under --images
            self.by_name = {}
            for p in self.images.rglob("*"):
                self.by_name.setdefault(p.name, []).append(p)
        # The base name across both separator styles: exports made on Windows use backslashes.
        found = self.by_name.get(PureWindowsPath(name).name, [])
        return found[0] if len(found) == 1 else None


def split_test(classes: list[str], fraction: float, seed: int) -> np.ndarray:
    """True for the crops that go to test/: ``fraction`` of each class (at least one when the
    class has two or more), chosen by a seeded shuffle of the crops in export order."""
    test = np.zeros(len(classes), dtype=bool)
    rng = np.random.default_rng(seed)
    for name in sorted(set(classes)):
        members = np.flatnonzero(np.array(classes) == name)
        n = min(len(members) - 1, max(1, round(fraction * len(members)))) if fraction > 0 else 0
        test[rng.permutation(members)[:n]] = True
    return test


def import_via(export: str, images: str, attribute: str, out: str, size: int = 32,
               val_fraction: float = 0.1, seed: int = 0) -> ImportSummary:
    """Crop every usable region into ``out`` (written to a temp folder, then renamed)."""
    if size < 8:
        raise UsageError(f"--size must be at least 8 pixels, got {size}")
    if not 0 <= val_fraction < 1:
        raise UsageError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not Path(images).is_dir():
        raise UsageError(f"--images {images}: no such folder")
    if Path(out).exists():
        raise UsageError(f"--out {out} already exists; pass a new folder")
    summary = ImportSummary()
    regions = read_export(export, summary)
    summary.regions_read = len(regions)
    if regions and not any(attribute in r.attributes for r in regions):
        found = sorted({k for r in regions for k in r.attributes})
        raise UsageError(f"no region has the attribute {attribute!r}; the export has: "
                         f"{', '.join(found) or 'none'}")
    finder, crops = ImageFinder(Path(images)), []
    # Only the image in hand stays open: an export lists each image's regions together.
    opened: dict[Path, Image.Image | None] = {}
    for region in regions:
        box = bounding_box(region.shape)
        if box is None:
            summary.skipped[f"{region.shape.get('name', 'unknown')} region"] += 1
            continue
        name, why = region_class(region.attributes, attribute)
        if name is None:
            summary.skipped[why] += 1
            continue
        path = finder.find(region.filename)
        if path is not None and path not in opened:
            opened.clear()
            try:
                with Image.open(path) as image:
                    opened[path] = image.convert("RGB")
            except OSError:
                opened[path] = None
        if path is None or opened[path] is None:
            summary.skipped["image missing or unreadable"] += 1
            if region.filename not in summary.missing_images:
                summary.missing_images.append(region.filename)
            continue
        image = opened[path]
        left, top = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
        right, bottom = min(image.width, math.ceil(box[2])), min(image.height, math.ceil(box[3]))
        if right <= left or bottom <= top:
            summary.skipped["box outside the image"] += 1
            continue
        crop = image.crop((left, top, right, bottom)).resize((size, size), Image.Resampling.BICUBIC)
        crops.append((crop, name, region, path, (left, top, right, bottom)))
    classes = [c[1] for c in crops]
    if len(set(classes)) < 2:
        raise UsageError(f"{len(crops)} usable region(s) in {len(set(classes))} class(es) of "
                         f"{attribute!r}; training needs at least 2 classes")
    write_tree(out, crops, split_test(classes, val_fraction, seed), summary)
    return summary


def write_tree(out: str, crops: list, test: np.ndarray, summary: ImportSummary) -> None:
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        rows = []
        for i, ((crop, name, region, path, box), is_test) in enumerate(zip(crops, test)):
            relative = Path("test" if is_test else "train") / safe(name) / f"{i:05d}.png"
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            crop.save(staging / relative)
            rows.append({"crop": str(relative), "split": relative.parts[0], "class": name,
                         "source": str(path), "filename": region.filename,
                         "region_id": region.region_id, "box": " ".join(map(str, box))})
            summary.written[name] += 1
        with open(staging / "manifest.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def safe(name: str) -> str:
    """A class value as a folder name: path separators and leading dots replaced."""
    return name.replace("/", "_").replace("\\", "_").lstrip(".") or "_"


def print_summary(summary: ImportSummary, out: str) -> None:
    print(f"regions read: {summary.regions_read}; written: {sum(summary.written.values())} "
          f"crops to {out}")
    for name, n in sorted(summary.written.items()):
        print(f"  class {name}: {n}")
    for reason, n in sorted(summary.skipped.items()):
        print(f"  skipped ({reason}): {n}")
    if summary.missing_images:
        print(f"  images missing or unreadable: {', '.join(summary.missing_images)}")
