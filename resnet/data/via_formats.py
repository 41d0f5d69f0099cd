"""Reading VGG Image Annotator exports into regions: the CSV export (VIA 2.x, and VIA 1.x whose
header begins ``#filename``) and the JSON exports (the 2.x project file, the 2.x annotation
export, the 1.x export). A malformed file is a ``UsageError``; a malformed row or region is kept
as a ``Region`` with a ``problem``, which the import skips with that reason."""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resnet.errors import UsageError

CSV_COLUMNS = ("filename", "file_size", "file_attributes", "region_count", "region_id",
               "region_shape_attributes", "region_attributes")


@dataclass
class Region:
    filename: str
    region_id: int | str  # the text as exported when it is not a number
    shape: dict[str, Any]
    attributes: dict[str, Any]
    problem: str = ""  # why the region cannot be imported, found while reading


@dataclass
class ImportSummary:
    regions_read: int = 0
    written: Counter = field(default_factory=Counter)  # class -> crops
    skipped: Counter = field(default_factory=Counter)  # reason -> regions
    missing_images: list[str] = field(default_factory=list)


def printable(text: str) -> str:
    """``text`` with line breaks and other control characters escaped: error messages quote
    the export, and they must stay one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _cell(text: str, where: str) -> Any:
    try:
        value = json.loads(text) if text.strip() else {}
        # An unpaired surrogate escape ("\ud800") decodes, but no file name, folder or
        # manifest can hold it: reject it here, with the line it is on.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return value
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); fix or "
                         "export the annotations again") from None
    except UnicodeEncodeError:
        raise UsageError(f"{where}: malformed JSON (an unpaired surrogate escape such as "
                         "\\ud800); fix or export the annotations again") from None
    except (ValueError, RecursionError) as exc:  # a 5,000-digit number; nesting too deep
        message = "nested too deeply" if isinstance(exc, RecursionError) else \
            printable(str(exc).split(";")[0])
        raise UsageError(f"{where}: malformed JSON ({message}); fix or export the annotations "
                         "again") from None


def _object(value: Any, what: str) -> tuple[dict[str, Any], str]:
    """(value, "") for a JSON object, else ({}, why the region is skipped)."""
    return (value, "") if isinstance(value, dict) else ({}, f"{what} not a JSON object")


def read_csv(path: Path, summary: ImportSummary) -> list[Region]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        names = list(reader.fieldnames or ())
        if names[:1] == ["#filename"]:  # VIA 1.x: the same columns, the header a comment
            reader.fieldnames = names = ["filename", *names[1:]]
        if tuple(names) != CSV_COLUMNS:
            raise UsageError(f"{path} is not a VIA CSV export (expected the columns "
                             f"{', '.join(CSV_COLUMNS)}; VIA 1.x: #filename, ...)")
        regions = []
        for row in reader:
            count = row["region_count"]
            if count is not None and count.strip() in ("", "0"):
                summary.skipped["image without regions"] += 1
                continue
            raw_id = row["region_id"] or ""
            try:
                region_id: int | str = int(raw_id or 0)
            except ValueError:
                region_id = raw_id
            if None in (row[name] for name in CSV_COLUMNS):  # the row ends early (cut off)
                regions.append(Region(row["filename"], region_id, {}, {}, "truncated row"))
                continue
            where = f"{path} line {reader.line_num}"
            shape, bad_shape = _object(_cell(row["region_shape_attributes"], where), "shape is")
            attributes, bad_attributes = _object(_cell(row["region_attributes"], where),
                                                 "region attributes are")
            bad_id = "region_id not a number" if isinstance(region_id, str) else ""
            regions.append(Region(row["filename"], region_id, shape, attributes,
                                  bad_id or bad_shape or bad_attributes))
    return regions


def _numbered_first(key: str) -> tuple[int, int, str]:
    """VIA 1.x region keys "0", "1", ..., "10" in numeric order, any other key after them."""
    return (0, int(key), "") if key.isdecimal() and len(key) < 100 else (1, 0, key)


def read_json(path: Path, summary: ImportSummary) -> list[Region]:
    """The VIA 2.x project file (``_via_img_metadata`` inside) or annotation export (the
    metadata itself), or a VIA 1.x export (``regions`` an object keyed "0", "1", ...)."""
    data = _cell(path.read_text(encoding="utf-8-sig"), str(path))
    images = data.get("_via_img_metadata", data) if isinstance(data, dict) else None
    if not isinstance(images, dict) or not all(
            isinstance(v, dict) and "filename" in v and isinstance(v.get("regions"), (list, dict))
            for v in images.values()):
        raise UsageError(f"{path} is not a VIA project or annotation JSON export")
    regions = []
    for image in images.values():
        listed, filename = image["regions"], image["filename"]
        if isinstance(listed, dict):  # VIA 1.x: {"0": region, "1": region, ...}
            listed = [listed[k] for k in sorted(listed, key=_numbered_first)]
        if not listed:
            summary.skipped["image without regions"] += 1
        for i, region in enumerate(listed):
            if not isinstance(filename, str):
                regions.append(Region(str(filename), i, {}, {}, "filename not text"))
            elif not isinstance(region, dict):
                regions.append(Region(filename, i, {}, {}, "region is not a JSON object"))
            else:
                shape, bad_shape = _object(region.get("shape_attributes", {}), "shape is")
                attributes, bad_attributes = _object(region.get("region_attributes", {}),
                                                     "region attributes are")
                regions.append(Region(filename, i, shape, attributes, bad_shape or bad_attributes))
    return regions


def read_export(path: str, summary: ImportSummary) -> list[Region]:
    source = Path(path)
    if not source.is_file():
        raise UsageError(f"--csv {path}: no such file")
    try:
        return read_json(source, summary) if source.suffix.lower() == ".json" else \
            read_csv(source, summary)
    except UnicodeDecodeError:  # a binary file, or text in UTF-16 or Latin-1
        raise UsageError(f"--csv {path} is not a VIA export: not UTF-8 text; pass the .csv or "
                         ".json VIA saved") from None
    except csv.Error as exc:  # a field over csv's size limit: not an export VIA wrote
        raise UsageError(f"--csv {path} is not a VIA export: not a well-formed CSV "
                         f"({printable(str(exc))}); pass the .csv or .json VIA saved") from None
