"""Fuzzing the VIA import: valid exports (VIA 2.x CSV and JSON, VIA 1.x JSON and CSV) mutated at
random (fields dropped, cut short, retyped, nulled, reordered; binary noise; UTF-16 and Latin-1
bytes; huge coordinates; empty shapes). Every case ends in a tree whose manifest accounts for
every region the importer read (a crop, or a skip with its reason), or in one line on stderr
and exit 2. A seeded generator, not hypothesis: no dependency, and a failure names its case
(``VIA_FUZZ_SEED`` explores other seeds)."""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.via_import import main
from resnet.data.via_formats import CSV_COLUMNS

CASES = 520  # per format: 2,080 in all
SEED = int(os.environ.get("VIA_FUZZ_SEED", "29"))
FORMATS = ("csv2", "csv1", "json2", "json1")
ODD_VALUES = [None, "", "text", "12", "-1", 0, -1, 1.5, True, False, [], {}, ["x"], [1, 2],
              {"name": "rect"}, 1e308, -1e308, 10 ** 40, float("nan"), float("inf"), "a\nb",
              "nul\x00", "\ud800", "café", "x" * 300, "../up", "rect", "polygon"]
HUGE = [1e308, -1e308, 10 ** 40, -(2 ** 63), 2 ** 64, 1e-320, float("inf")]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Tiny images of every kind the importer opens, and one file that is not an image."""
    root = tmp_path_factory.mktemp("via-fuzz-images")
    pixels = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels[:20]).save(root / "a.png")
    Image.fromarray(pixels[:16, :16]).save(root / "b.png")
    (root / "sub").mkdir()
    Image.fromarray(pixels[:, :20]).save(root / "sub" / "c.jpg")
    Image.fromarray(pixels[..., 0]).save(root / "d.png")  # greyscale
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    return root


@pytest.fixture
def scratch(tmp_path):
    """Where the cases write, deleted at the end. In memory (tmpfs) where there is one: each
    case makes, renames and deletes a tree, and on a busy disk those calls, not the import,
    take most of the time (50 s for the four formats here, 16 s in memory)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="via-fuzz-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def random_shape(rng: random.Random) -> dict:
    def xy() -> float:
        return rng.choice([rng.randint(0, 20), round(rng.uniform(0, 20), 2)])
    kind = rng.choice(["rect"] * 3 + ["circle", "ellipse"] * 2 + ["polygon", "polyline"] * 2 +
                      ["point"])
    if kind == "rect":
        return {"name": "rect", "x": xy(), "y": xy(), "width": rng.randint(1, 12),
                "height": rng.randint(1, 12)}
    if kind == "circle":
        return {"name": "circle", "cx": xy(), "cy": xy(), "r": rng.randint(1, 8)}
    if kind == "ellipse":
        return {"name": "ellipse", "cx": xy(), "cy": xy(), "rx": rng.randint(1, 8),
                "ry": rng.randint(1, 8), "theta": round(rng.uniform(-3, 3), 3)}
    if kind == "point":
        return {"name": "point", "cx": xy(), "cy": xy()}
    n = rng.randint(2, 5)
    return {"name": kind, "all_points_x": [xy() for _ in range(n)],
            "all_points_y": [xy() for _ in range(n)]}


def random_attributes(rng: random.Random) -> dict:
    kind = rng.choice(["cat", "dog", "café", "cat", "dog"])
    if rng.random() < 0.15:  # a checkbox attribute
        return {"kind": {"cat": kind == "cat", "dog": kind != "cat"}, "note": "x"}
    return {"kind": kind, "note": "x"}


def random_images(rng: random.Random, root: Path) -> list[tuple[str, list[dict]]]:
    """A valid export's content: (file name as exported, regions) for 2-3 images."""
    names = ["a.png", "b.png", "sub/c.jpg", "c.jpg", str(root / "d.png"),
             f"file://{root / 'a.png'}", "C:\\photos\\b.png"] * 3 + ["gone.png", "broken.png"]
    return [(rng.choice(names), [{"shape_attributes": random_shape(rng),
                                  "region_attributes": random_attributes(rng)}
                                 for _ in range(rng.choice([0, 2, 3, 3, 4]))])
            for _ in range(rng.randint(2, 3))]


def csv_rows(content: list[tuple[str, list[dict]]]) -> list[list]:
    rows = []
    for filename, regions in content:
        if not regions:
            rows.append([filename, 99, {}, 0, 0, {}, {}])
        for i, region in enumerate(regions):
            rows.append([filename, 99, {}, len(regions), i, region["shape_attributes"],
                         region["region_attributes"]])
    return rows


def json_document(content: list[tuple[str, list[dict]]], fmt: str, rng: random.Random) -> dict:
    meta = {}
    for n, (filename, regions) in enumerate(content):
        if fmt == "json1":  # VIA 1.x: regions keyed "0", "1", ...; fileref, base64_img_data
            meta[f"{filename}{n}"] = {"fileref": "", "size": 99, "filename": filename,
                                      "base64_img_data": "", "file_attributes": {},
                                      "regions": {str(i): r for i, r in enumerate(regions)}}
        else:
            meta[f"{filename}{n}"] = {"filename": filename, "size": 99, "regions": regions,
                                      "file_attributes": {}}
    if fmt == "json2" and rng.random() < 0.5:  # the project file, not the annotation export
        return {"_via_settings": {"ui": {}}, "_via_img_metadata": meta, "_via_attributes": {}}
    return meta


def nodes(value, path=()):
    """Every (parent path, key) inside a JSON value, to mutate one of them."""
    items = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield path, key
        yield from nodes(child, path + (key,))


def at(value, path):
    for key in path:
        value = value[key]
    return value


def mutate_json(doc, rng: random.Random) -> tuple[object, str]:
    """One structural mutation of a JSON value (the document, or a CSV cell's object)."""
    found = list(nodes(doc))
    if not found:
        return rng.choice(ODD_VALUES + [doc]), "replace all"
    path, key = rng.choice(found)
    parent = at(doc, path)
    op = rng.choice(["drop", "null", "retype", "retype", "reorder", "empty", "huge", "rekey"])
    if op == "drop":
        del parent[key]
    elif op == "null":
        parent[key] = None
    elif op == "retype":
        parent[key] = copy.deepcopy(rng.choice(ODD_VALUES))
    elif op == "huge":
        parent[key] = rng.choice(HUGE)
    elif op == "empty":
        parent[key] = type(parent[key])() if isinstance(parent[key], (list, dict, str)) else []
    elif op == "reorder" and isinstance(parent, dict):
        items = list(parent.items())
        rng.shuffle(items)
        parent.clear()
        parent.update(items)
    elif op == "reorder":
        rng.shuffle(parent)
    elif op == "rekey" and isinstance(parent, dict):  # VIA 1.x region keys that are no numbers
        parent[rng.choice(["a", "", "01", "-1", "1.5", "99999999999", "\u0661"])] = \
            parent.pop(key)
    return doc, f"{op} {'/'.join(map(str, path + (key,)))}"


def write_csv_text(rows: list[list], header: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for row in rows:
        writer.writerow([json.dumps(c) if isinstance(c, (dict, list)) or c is None else c
                         for c in row])
    return buffer.getvalue()


def mutate_csv(rows: list[list], header: list[str], rng: random.Random) -> str:
    op = rng.choice(["cell"] * 6 + ["drop", "cut", "cut", "retype", "retype", "reorder",
                                    "shuffle"])
    row = rng.choice(rows) if rows and all(rows) else None  # rows cut to nothing are gone
    if op == "cell" and row is not None and len(row) == 7:  # inside a cell's JSON
        k = rng.choice([2, 5, 5, 6, 6])
        row[k], what = mutate_json(row[k], rng)
        return f"cell {k}: {what}"
    if op == "drop" and row is not None:
        del row[rng.randrange(len(row))]
    elif op == "cut" and row is not None:  # a truncated row
        del row[rng.randrange(len(row)):]
    elif op == "retype" and row is not None:
        row[rng.randrange(len(row))] = rng.choice(["", "abc", "-1", "2.5", "1e309", "NaN", "null",
                                                  "[1]", '"x"', "{", "1" * 5000, "\x00"])
    elif op == "reorder":
        order = list(range(len(header)))
        rng.shuffle(order)
        header[:] = [header[i] for i in order]
        for r in rows:
            r[:] = [r[i] for i in order if i < len(r)]
    elif op == "shuffle":
        rng.shuffle(rows)
    return f"csv {op}"


def mutate_text(text: str, rng: random.Random) -> tuple[str, str]:
    op = rng.choice(["truncate", "cut line", "drop line", "insert", "digits"])
    lines = text.split("\n")
    if op == "truncate":
        return text[:rng.randrange(len(text) + 1)], op
    if op == "cut line" and len(lines) > 1:
        k = rng.randrange(1, len(lines))
        lines[k] = lines[k][:rng.randrange(len(lines[k]) + 1)]
    elif op == "drop line":
        del lines[rng.randrange(len(lines))]
    elif op == "insert":
        k = rng.randrange(len(text) + 1)
        return text[:k] + rng.choice([",", '"', "{", "}", "\n", "\r", "\x00", "]", "é"]) + \
            text[k:], op
    elif op == "digits":  # a number of 5,000 digits where a coordinate was
        return text.replace("1", "1" * 5000, 1), op
    return "\n".join(lines), op


def mutate_bytes(data: bytes, text: str, rng: random.Random) -> tuple[bytes, str]:
    op = rng.choice(["utf-16", "utf-16-le", "latin-1", "cp1252", "bom", "noise", "noise",
                     "append", "random"])
    if op in ("utf-16", "utf-16-le", "latin-1", "cp1252"):
        return text.encode(op, errors="replace"), op
    if op == "bom":
        return b"\xef\xbb\xbf" + data, op
    if op == "noise":  # a few bytes overwritten at random
        buffer = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            if buffer:
                buffer[rng.randrange(len(buffer))] = rng.randrange(256)
        return bytes(buffer), op
    if op == "append":
        return data + rng.randbytes(rng.randint(1, 64)), op
    return rng.randbytes(rng.randint(0, 512)), op


def make_case(fmt: str, rng: random.Random, root: Path) -> tuple[bytes, list[str]]:
    """An export in ``fmt``, mutated 0-3 times (a few cases stay valid), and what was done."""
    content = random_images(rng, root)
    done: list[str] = []
    n = rng.choice([0, 1, 1, 1, 2, 2, 3])
    # Each layer's mutations in turn: the structure's, then the text's, then the bytes'.
    layers = [rng.choice(["structure"] * 6 + ["text"] * 2 + ["bytes"] * 2) for _ in range(n)]
    if fmt.startswith("csv"):
        rows, header = csv_rows(content), list(CSV_COLUMNS)
        if fmt == "csv1":
            header[0] = "#filename"
        for _ in range(layers.count("structure")):
            done.append(mutate_csv(rows, header, rng))
        text = write_csv_text(rows, header)
    else:
        doc = json_document(content, fmt, rng)
        for _ in range(layers.count("structure")):
            doc, what = mutate_json(doc, rng)
            done.append(what)
        text = json.dumps(doc)  # ASCII: an unpaired surrogate becomes the escape "\ud800"
    for _ in range(layers.count("text")):
        text, what = mutate_text(text, rng)
        done.append(what)
    data = text.encode("utf-8", errors="surrogatepass")
    for _ in range(layers.count("bytes")):
        data, what = mutate_bytes(data, text, rng)
        done.append(what)
    return data, done


def check_tree(tree: Path, out: str) -> None:
    """The summary on stdout and the manifest agree, and account for every region read."""
    first, *rest = out.splitlines()
    read = int(first.split("regions read: ")[1].split(";")[0])
    written = int(first.split("written: ")[1].split()[0])
    skipped = Counter()
    for line in rest:
        if line.startswith("  skipped ("):
            reason, _, n = line[len("  skipped ("):].rpartition("): ")
            skipped[reason] += int(n)
    skipped.pop("image without regions", None)  # an image, not a region: no manifest row
    with open(tree / "manifest.csv", newline="", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == read, f"{len(rows)} manifest rows for {read} regions read"
    crops = [r for r in rows if r["crop"]]
    assert len(crops) == written
    assert all(r["split"] in ("train", "test") and not r.get("skipped") and
               (tree / r["crop"]).is_file() for r in crops)
    assert all(r.get("skipped") for r in rows if not r["crop"]), "a skip without its reason"
    assert Counter(r["skipped"] for r in rows if not r["crop"]) == skipped
    assert ("skipped" in rows[0]) == bool(skipped)  # the columns of old when nothing is skipped
    assert len(list(tree.rglob("*.png"))) == written


@pytest.mark.parametrize("fmt", FORMATS)
def test_mutated_exports_end_in_an_accounted_tree_or_one_line(fmt, images, scratch, capsys):
    rng = random.Random(f"{SEED}-{fmt}")
    suffix = ".json" if fmt.startswith("json") else ".csv"
    outcomes = Counter()
    for case in range(CASES):
        data, done = make_case(fmt, rng, images)
        export, tree = scratch / f"export{suffix}", scratch / "tree"
        export.write_bytes(data)
        where = f"{fmt} case {case} (seed {SEED}), mutations {done}"
        try:
            code = main(["--csv", str(export), "--images", str(images), "--attribute", "kind",
                         "--out", str(tree), "--size", "8",
                         "--val-fraction", rng.choice(["0", "0.1", "0.5"])])
        except SystemExit as exc:  # argparse's errors: one line and exit 2 too
            code = exc.code
        except Exception as exc:
            raise AssertionError(f"{where}: {type(exc).__name__}: {exc}"[:2000]) from exc
        out, err = capsys.readouterr()
        if code == 0:
            assert not err, f"{where}: {err}"
            try:
                check_tree(tree, out)
            except AssertionError as exc:
                raise AssertionError(f"{where}: {exc}") from exc
            outcomes["tree" if "skipped (" not in out else "tree with skips"] += 1
        else:
            assert code == 2 and err.startswith("jobs.via_import: error: ") and \
                err.count("\n") == 1 and err.endswith("\n"), f"{where}: exit {code}: {err!r}"
            assert not out and not tree.exists(), where
            if not done:  # a valid export fails only for want of two classes
                assert "training needs at least 2 classes" in err, f"{where}: {err}"
            outcomes["one line"] += 1
        assert [p.name for p in scratch.iterdir() if p.name.startswith(".tree.")] == [], where
        shutil.rmtree(tree, ignore_errors=True)
    # Not vacuous: every outcome, each many times.
    assert sum(outcomes.values()) == CASES and all(
        outcomes[k] >= CASES // 40 for k in ("tree", "tree with skips", "one line")), outcomes
    print(f"{fmt}: {dict(outcomes)}")
