"""VGG Image Annotator exports -> an image-folder tree of region crops.

Reads the export (``via_formats``: VIA 2.x and 1.x, CSV and JSON); crops every region by its
bounding box clipped to the image, resizes it, and writes ``train/<class>/*.png`` and
``test/<class>/*.png`` (split stratified and deterministic) plus ``manifest.csv``: a row per
region, a crop or a skip with its reason. The class of a region is the value of one region
attribute.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import tempfile
from pathlib import Path, PureWindowsPath
from typing import Any
from urllib.parse import unquote

import numpy as np
from PIL import Image

from resnet.data.via_formats import ImportSummary, Region, printable, read_export
from resnet.errors import UsageError

SHAPES = ("rect", "circle", "ellipse", "polygon", "polyline")
# The numbers each shape needs, by name (an ellipse's theta, its rotation, defaults to 0).
COORDINATES = {"rect": ("x", "y", "width", "height"), "circle": ("cx", "cy", "r"),
               "ellipse": ("cx", "cy", "rx", "ry")}
MANIFEST_COLUMNS = ("crop", "split", "class", "source", "filename", "region_id", "box")


def _number(value: Any) -> float | None:
    """A JSON number as a finite float; None for anything else (text, true, null, 1e999)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        return None
    return number if math.isfinite(number) else None


def bounding_box(shape: dict[str, Any]) -> tuple[tuple[float, float, float, float] | None, str]:
    """((left, top, right, bottom) in pixels, "") or (None, why the region is skipped): a point,
    an unknown shape, or coordinates missing, not numbers or too large."""
    name = shape.get("name")
    if not isinstance(name, str):
        return None, "unknown region"
    if name in COORDINATES:
        values = [_number(shape.get(key)) for key in COORDINATES[name]]
        if None in values:
            missing = COORDINATES[name][values.index(None)]
            return None, f"{name} region: {missing} missing or not a number"
    if name == "rect":
        x, y, w, h = values
        box = x, y, x + w, y + h
    elif name == "circle":
        cx, cy, r = values
        box = cx - r, cy - r, cx + r, cy + r
    elif name == "ellipse":  # rotated by theta (radians): the box of the rotated ellipse
        (cx, cy, rx, ry), t = values, _number(shape.get("theta", 0))
        if t is None:
            return None, "ellipse region: theta not a number"
        half_w = math.hypot(rx * math.cos(t), ry * math.sin(t))
        half_h = math.hypot(rx * math.sin(t), ry * math.cos(t))
        box = cx - half_w, cy - half_h, cx + half_w, cy + half_h
    elif name in ("polygon", "polyline"):
        xs, ys = shape.get("all_points_x"), shape.get("all_points_y")
        if not (isinstance(xs, list) and isinstance(ys, list) and xs and len(xs) == len(ys)):
            return None, f"{name} region without points"
        xs, ys = [_number(v) for v in xs], [_number(v) for v in ys]
        if None in xs or None in ys:
            return None, f"{name} region: a point is not a number"
        box = min(xs), min(ys), max(xs), max(ys)
    else:
        return None, f"{printable(name)} region"
    if not all(map(math.isfinite, box)):  # finite numbers can add up to infinity: 1e308 * 2
        return None, f"{name} region: coordinates too large"
    return box, ""


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
    if len(safe(str(value).strip()).encode("utf-8")) > 255:  # the file systems' limit
        return None, f"{attribute}: value too long for a folder name"
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
            try:
                if candidate.is_file():
                    return candidate
            except OSError:  # a name too long for the file system is no file of ours
                pass
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
    readable = [r for r in regions if not r.problem]
    if readable and not any(attribute in r.attributes for r in readable):
        found = sorted({printable(k) for r in readable for k in r.attributes})
        raise UsageError(f"no region has the attribute {attribute!r}; the export has: "
                         f"{', '.join(found) or 'none'}")
    finder, crops, skips = ImageFinder(Path(images)), [], []

    def skip(region: Region, why: str, name: str = "", path: Path | None = None) -> None:
        summary.skipped[why] += 1
        skips.append((len(crops), {  # a manifest row, after the crops made before it
            "crop": "", "split": "", "class": name, "source": str(path or ""),
            "filename": region.filename, "region_id": region.region_id, "box": "",
            "skipped": why}))

    # Only the image in hand stays open: an export lists each image's regions together.
    opened: dict[Path, Image.Image | None] = {}
    for region in regions:
        if region.problem:
            skip(region, region.problem)
            continue
        box, why = bounding_box(region.shape)
        if box is None:
            skip(region, why)
            continue
        name, why = region_class(region.attributes, attribute)
        if name is None:
            skip(region, why)
            continue
        path = finder.find(region.filename)
        if path is not None and path not in opened:
            opened.clear()
            try:
                with Image.open(path) as image:
                    opened[path] = image.convert("RGB")
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                opened[path] = None  # PIL's errors for files it cannot decode
        if path is None or opened[path] is None:
            skip(region, "image missing or unreadable", name, path)
            if region.filename not in summary.missing_images:
                summary.missing_images.append(region.filename)
            continue
        image = opened[path]
        left, top = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
        right, bottom = min(image.width, math.ceil(box[2])), min(image.height, math.ceil(box[3]))
        if right <= left or bottom <= top:
            skip(region, "box outside the image", name, path)
            continue
        crop = image.crop((left, top, right, bottom)).resize((size, size), Image.Resampling.BICUBIC)
        crops.append((crop, name, region, path, (left, top, right, bottom)))
    classes = [c[1] for c in crops]
    if len(set(classes)) < 2:
        raise UsageError(f"{len(crops)} usable region(s) in {len(set(classes))} class(es) of "
                         f"{attribute!r}; training needs at least 2 classes")
    write_tree(out, crops, split_test(classes, val_fraction, seed), skips, summary)
    return summary


def write_tree(out: str, crops: list, test: np.ndarray, skips: list[tuple[int, dict]],
               summary: ImportSummary) -> None:
    """The crops, and ``manifest.csv``: a row per region in export order, the skipped ones
    with their reason in a last column, ``skipped`` (absent when none was skipped)."""
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        rows = [(position, 0, row) for position, row in skips]
        for i, ((crop, name, region, path, box), is_test) in enumerate(zip(crops, test)):
            relative = Path("test" if is_test else "train") / safe(name) / f"{i:05d}.png"
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            crop.save(staging / relative)
            rows.append((i, 1, {"crop": str(relative), "split": relative.parts[0], "class": name,
                                "source": str(path), "filename": region.filename,
                                "region_id": region.region_id, "box": " ".join(map(str, box))}))
            summary.written[name] += 1
        rows.sort(key=lambda r: r[:2])  # export order: a skip before the crop made after it
        # surrogateescape: a source path in bytes that are not UTF-8 is written back as is
        with open(staging / "manifest.csv", "w", newline="", errors="surrogateescape") as f:
            writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS + ("skipped",) * bool(skips),
                                    restval="")
            writer.writeheader()
            writer.writerows(row for *_, row in rows)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def safe(name: str) -> str:
    """A class value as a folder name: path separators, NUL and leading dots replaced."""
    return name.replace("/", "_").replace("\\", "_").replace("\0", "_").lstrip(".") or "_"


def print_summary(summary: ImportSummary, out: str) -> None:
    print(f"regions read: {summary.regions_read}; written: {sum(summary.written.values())} "
          f"crops to {out}")
    # printable: a class, reason or file name from the export with a line break in it would
    # otherwise read as several lines of the summary
    for name, n in sorted(summary.written.items()):
        print(f"  class {printable(name)}: {n}")
    for reason, n in sorted(summary.skipped.items()):
        print(f"  skipped ({printable(reason)}): {n}")
    if summary.missing_images:
        print("  images missing or unreadable: "
              f"{', '.join(map(printable, summary.missing_images))}")
