"""VIA import: the shared export with images the test draws at its file names and sizes, every
shape and skip reason from small exports written here, and bad input."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import torch

from jobs.via_import import main
from resnet.data.via import import_via
from resnet.data.via_formats import CSV_COLUMNS
from tests.conftest import run_job

SHARED_EXPORT = Path(__file__).resolve().parents[2] / "shared" / "data" / "via" / \
    "assignment-via-export.csv"


def draw(path: Path, width: int, height: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_csv(path: Path, rows: list[tuple]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for filename, count, rid, shape, attrs in rows:
            writer.writerow([filename, -1, "{}", count, rid, json.dumps(shape), json.dumps(attrs)])
    return path


@pytest.fixture(scope="module")
def shared_export():
    if not SHARED_EXPORT.is_file():
        message = f"the shared VIA export is missing: {SHARED_EXPORT}"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return SHARED_EXPORT


def draw_shared_images(export: Path, images: Path) -> tuple[list[dict], Counter]:
    """The export's rows, and the Gender counts; its images drawn at their names and sizes."""
    rows = list(csv.DictReader(open(export, newline="")))
    extent: dict[str, tuple[int, int]] = {}  # the photos are private: draw each one as large
    expected = Counter()                     # as its boxes need, at its file name
    for row in rows:
        shape = json.loads(row["region_shape_attributes"])
        assert shape["name"] == "rect"
        w, h = extent.get(row["filename"], (0, 0))
        extent[row["filename"]] = (max(w, shape["x"] + shape["width"] + 8),
                                   max(h, shape["y"] + shape["height"] + 8))
        expected[json.loads(row["region_attributes"])["Gender"]] += 1
    for i, (filename, (w, h)) in enumerate(extent.items()):
        draw(images / filename, w, h, seed=i)
    return rows, expected


def test_the_shared_export_imports_on_gender(shared_export, tmp_path):
    images = tmp_path / "images"
    rows, expected = draw_shared_images(shared_export, images)
    summary = import_via(str(shared_export), str(images), "Gender", str(tmp_path / "tree"))
    assert summary.regions_read == len(rows) == 102 and set(expected) == {"male", "female"}
    assert dict(summary.written) == dict(expected) and not summary.skipped
    tree = tmp_path / "tree"
    for name, n in expected.items():
        train = list((tree / "train" / name).glob("*.png"))
        test = list((tree / "test" / name).glob("*.png"))
        assert len(train) + len(test) == n and len(test) == round(0.1 * n)
        assert Image.open(train[0]).size == (32, 32)
    manifest = list(csv.DictReader(open(tree / "manifest.csv")))
    assert len(manifest) == 102 and {m["filename"] for m in manifest} == {r["filename"] for r in rows}
    # Deterministic: the same import again gives the same split.
    import_via(str(shared_export), str(images), "Gender", str(tmp_path / "again"))
    assert (tmp_path / "again" / "manifest.csv").read_text() == (tree / "manifest.csv").read_text()


def test_every_shape_and_skip_reason(tmp_path):
    images = tmp_path / "images"
    draw(images / "a.png", 100, 80)
    draw(images / "sub" / "b.jpg", 60, 60, seed=1)
    (images / "broken.png").write_bytes(b"not an image")
    rect = {"name": "rect", "x": 10, "y": 10, "width": 30, "height": 20}
    rows = [
        ("a.png", 8, 0, rect, {"kind": "cat"}),
        ("a.png", 8, 1, {"name": "circle", "cx": 50, "cy": 40, "r": 10}, {"kind": "dog"}),
        ("a.png", 8, 2, {"name": "ellipse", "cx": 50, "cy": 40, "rx": 20, "ry": 5, "theta": 0.5},
         {"kind": {"cat": True, "dog": False}}),
        ("a.png", 8, 3, {"name": "polygon", "all_points_x": [5, 90, 40],
                         "all_points_y": [5, 20, 70]}, {"kind": "dog"}),
        ("file:///home/someone/photos/b.jpg", 2, 0, {"name": "polyline", "all_points_x": [0, 70],
                                                      "all_points_y": [0, 70]}, {"kind": "cat"}),
        ("a.png", 8, 4, {"name": "point", "cx": 3, "cy": 3}, {"kind": "cat"}),
        ("a.png", 8, 5, rect, {"kind": {"cat": True, "dog": True}}),
        ("a.png", 8, 6, rect, {"kind": {"cat": False}}),
        ("a.png", 8, 7, rect, {"other": "x"}),
        ("gone.png", 1, 0, rect, {"kind": "cat"}),
        ("broken.png", 1, 0, rect, {"kind": "cat"}),
        ("b.jpg", 2, 1, {"name": "rect", "x": 500, "y": 500, "width": 5, "height": 5},
         {"kind": "dog"}),
        ("empty.png", 0, 0, {}, {}),
    ]
    export = write_csv(tmp_path / "export.csv", rows)
    summary = import_via(str(export), str(images), "kind", str(tmp_path / "tree"), size=16,
                         val_fraction=0.0)
    assert dict(summary.written) == {"cat": 3, "dog": 2}
    assert dict(summary.skipped) == {
        "point region": 1, "kind: several checked": 1, "kind: none checked": 1,
        "no kind value": 1, "image missing or unreadable": 2, "box outside the image": 1,
        "image without regions": 1}
    assert summary.missing_images == ["gone.png", "broken.png"]
    manifest = {(m["filename"], m["region_id"]): m for m in
                csv.DictReader(open(tmp_path / "tree" / "manifest.csv"))}
    assert manifest[("a.png", "2")]["box"] == "32 29 68 51"  # box of the rotated ellipse
    assert manifest[("a.png", "3")]["box"] == "5 5 90 70"  # polygon
    assert manifest[("file:///home/someone/photos/b.jpg", "0")]["box"] == "0 0 60 60"  # clipped
    assert not (tmp_path / "tree" / "test").exists()


def test_the_json_project_export(tmp_path):
    images = tmp_path / "images"
    draw(images / "a.png", 50, 50)
    regions = [{"shape_attributes": {"name": "rect", "x": 0, "y": 0, "width": 20, "height": 20},
                "region_attributes": {"kind": kind}} for kind in ("cat", "dog", "cat", "dog")]
    project = {"_via_settings": {}, "_via_img_metadata": {
        "a.png62": {"filename": str(images / "a.png"), "size": 62, "regions": regions,
                    "file_attributes": {}}}}
    (tmp_path / "project.json").write_text(json.dumps(project))
    summary = import_via(str(tmp_path / "project.json"), str(images), "kind", str(tmp_path / "t"),
                         val_fraction=0.5)
    assert dict(summary.written) == {"cat": 2, "dog": 2}
    assert len(list((tmp_path / "t" / "test").rglob("*.png"))) == 2  # one of each class


def test_windows_paths_match_by_base_name(tmp_path):
    images = tmp_path / "images"
    draw(images / "street_02.jpg", 60, 60)
    draw(images / "img.jpg", 60, 60, seed=1)
    rect = {"name": "rect", "x": 0, "y": 0, "width": 30, "height": 30}
    export = write_csv(tmp_path / "export.csv", [
        ("file://D:\\annot\\street_02.jpg", 1, 0, rect, {"kind": "cat"}),
        ("C:\\data\\img.jpg", 1, 0, rect, {"kind": "dog"}),
        ("file:///D:/annot/street_02.jpg", 1, 0, rect, {"kind": "dog"})])
    summary = import_via(str(export), str(images), "kind", str(tmp_path / "tree"),
                         val_fraction=0.0)
    assert dict(summary.written) == {"cat": 1, "dog": 2} and not summary.skipped


def test_a_via_1_json_export_with_regions_keyed_by_number(tmp_path):
    # The via_region_data.json layout of the Mask R-CNN tutorials (VIA 1.x).
    images = tmp_path / "images"
    draw(images / "balloon.jpg", 80, 60)
    polygon = {"name": "polygon", "all_points_x": [5, 40, 20], "all_points_y": [5, 10, 50]}
    export = {"balloon.jpg1234": {
        "fileref": "", "size": 1234, "filename": "balloon.jpg", "base64_img_data": "",
        "file_attributes": {},
        "regions": {"0": {"shape_attributes": polygon, "region_attributes": {"kind": "red"}},
                    "1": {"shape_attributes": {"name": "rect", "x": 40, "y": 20, "width": 30,
                                               "height": 30},
                          "region_attributes": {"kind": "blue"}}}},
        "empty.jpg99": {"fileref": "", "size": 99, "filename": "empty.jpg",
                        "base64_img_data": "", "file_attributes": {}, "regions": {}}}
    (tmp_path / "via_region_data.json").write_text(json.dumps(export))
    summary = import_via(str(tmp_path / "via_region_data.json"), str(images), "kind",
                         str(tmp_path / "tree"), val_fraction=0.0)
    assert dict(summary.written) == {"red": 1, "blue": 1}
    assert dict(summary.skipped) == {"image without regions": 1}
    manifest = list(csv.DictReader(open(tmp_path / "tree" / "manifest.csv")))
    assert [(m["region_id"], m["box"]) for m in manifest] == [("0", "5 5 40 50"),
                                                               ("1", "40 20 70 50")]


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    images = tmp_path / "images"
    draw(images / "a.png", 50, 50)
    rect = {"name": "rect", "x": 0, "y": 0, "width": 20, "height": 20}
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    (tmp_path / "bad.csv").write_text(",".join(CSV_COLUMNS) + '\na.png,-1,{},1,0,"{""name"":",{}\n')
    one_class = write_csv(tmp_path / "one.csv", [("a.png", 1, 0, rect, {"kind": "cat"})])
    no_images = write_csv(tmp_path / "none.csv", [("x.png", 2, 0, rect, {"kind": "cat"}),
                                                   ("y.png", 2, 1, rect, {"kind": "dog"})])
    (tmp_path / "random.csv").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "random.json").write_bytes(np.random.default_rng(1).bytes(4096))
    cases = [
        (tmp_path / "random.csv", "kind", "is not a VIA export: not UTF-8 text"),
        (tmp_path / "random.json", "kind", "is not a VIA export: not UTF-8 text"),
        (tmp_path / "notes.csv", "kind", "is not a VIA CSV export"),
        (tmp_path / "bad.csv", "kind", "line 2: malformed JSON"),
        (one_class, "Gender", "no region has the attribute 'Gender'; the export has: kind"),
        (one_class, "kind", "training needs at least 2 classes"),
        (no_images, "kind", "0 usable region(s)"),
    ]
    for export, attribute, message in cases:
        code = main(["--csv", str(export), "--images", str(images), "--attribute", attribute,
                     "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp left


def read_manifest(tree: Path) -> list[dict]:
    with open(tree / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def two_classes(images: Path) -> list[str]:
    """Two good CSV rows (a cat and a dog in a.png) that every defect test below keeps, so
    the import succeeds and the bad row is the only skip."""
    draw(images / "a.png", 60, 60)
    return [('a.png,-1,"{}",3,0,"{""name"":""rect"",""x"":0,""y"":0,""width"":20,""height"":20}",'
             '"{""kind"":""cat""}"'),
            ('a.png,-1,"{}",3,1,"{""name"":""circle"",""cx"":30,""cy"":30,""r"":9}",'
             '"{""kind"":""dog""}"')]


def import_lines(tmp_path: Path, lines: list[str], header: str = ",".join(CSV_COLUMNS)):
    export = tmp_path / "export.csv"
    export.write_text("\n".join([header, *lines]) + "\n")
    tree = tmp_path / "tree"
    return import_via(str(export), str(tmp_path / "images"), "kind", str(tree),
                      val_fraction=0.0), read_manifest(tree)


@pytest.mark.parametrize("cut", ['a.png,-1,"{}",3,2', "a.png,-1", "a.png",
                                 'a.png,-1,"{}",3,2,"{""name"":""rect"",""x"":1}"'])
def test_a_truncated_csv_row_is_skipped_with_its_reason(tmp_path, cut):
    good = two_classes(tmp_path / "images")
    summary, manifest = import_lines(tmp_path, [*good, cut])
    assert summary.regions_read == 3 and dict(summary.written) == {"cat": 1, "dog": 1}
    assert dict(summary.skipped) == {"truncated row": 1}
    assert [(m["filename"], m["crop"] == "", m["skipped"]) for m in manifest] == [
        ("a.png", False, ""), ("a.png", False, ""), ("a.png", True, "truncated row")]


def test_a_region_id_that_is_not_a_number_is_skipped(tmp_path):
    good = two_classes(tmp_path / "images")
    bad = 'a.png,-1,"{}",3,two,"{""name"":""rect"",""x"":0,""y"":0,""width"":9,""height"":9}",' \
          '"{""kind"":""cat""}"'
    summary, manifest = import_lines(tmp_path, [*good, bad])
    assert summary.regions_read == 3 and dict(summary.skipped) == {"region_id not a number": 1}
    assert manifest[2]["region_id"] == "two" and manifest[2]["skipped"] == \
        "region_id not a number"


@pytest.mark.parametrize("shape, reason", [
    ({"name": "rect", "x": 0, "y": 0, "height": 9}, "rect region: width missing or not a number"),
    ({"name": "rect", "x": 0, "y": "0", "width": 9, "height": 9},
     "rect region: y missing or not a number"),
    ({"name": "circle", "cx": 1e308, "cy": 0, "r": 1e308}, "circle region: coordinates too large"),
    ({"name": "polygon", "all_points_x": [], "all_points_y": []},
     "polygon region without points"),
    ({"name": "polyline"}, "polyline region without points"),
    ({"name": "polygon", "all_points_x": [1, None], "all_points_y": [1, 2]},
     "polygon region: a point is not a number")])
def test_a_shape_without_usable_coordinates_is_skipped(tmp_path, shape, reason):
    good = two_classes(tmp_path / "images")
    bad = f'a.png,-1,"{{}}",3,2,"{json.dumps(shape).replace(chr(34), chr(34) * 2)}",' \
          '"{""kind"":""cat""}"'
    summary, manifest = import_lines(tmp_path, [*good, bad])
    assert dict(summary.skipped) == {reason: 1} and len(manifest) == summary.regions_read == 3
    assert manifest[2]["skipped"] == reason


def test_null_and_other_non_object_regions_in_json_are_skipped(tmp_path):
    images = tmp_path / "images"
    draw(images / "a.png", 50, 50)
    rect = {"name": "rect", "x": 0, "y": 0, "width": 20, "height": 20}
    regions = [{"shape_attributes": rect, "region_attributes": {"kind": "cat"}}, None, 7,
               {"shape_attributes": None, "region_attributes": {"kind": "cat"}},
               {"shape_attributes": rect, "region_attributes": ["kind"]},
               {"shape_attributes": rect, "region_attributes": {"kind": "dog"}}]
    (tmp_path / "v.json").write_text(json.dumps({"a.png9": {"filename": "a.png", "size": 9,
                                                            "regions": regions}}))
    summary = import_via(str(tmp_path / "v.json"), str(images), "kind", str(tmp_path / "tree"),
                         val_fraction=0.0)
    assert summary.regions_read == 6 and dict(summary.written) == {"cat": 1, "dog": 1}
    assert dict(summary.skipped) == {"region is not a JSON object": 2,
                                     "shape is not a JSON object": 1,
                                     "region attributes are not a JSON object": 1}
    manifest = read_manifest(tmp_path / "tree")
    assert [m["region_id"] for m in manifest] == ["0", "1", "2", "3", "4", "5"]  # export order
    assert [bool(m["skipped"]) for m in manifest] == [False, True, True, True, True, False]


def test_via_1_regions_keyed_by_non_numbers_sort_after_the_numbers(tmp_path):
    images = tmp_path / "images"
    draw(images / "a.png", 50, 50)

    def region(x, kind):
        return {"shape_attributes": {"name": "rect", "x": x, "y": 0, "width": 5, "height": 5},
                "region_attributes": {"kind": kind}}
    export = {"a.png9": {"filename": "a.png", "size": 9, "regions": {
        "b": region(30, "cat"), "10": region(20, "dog"), "2": region(10, "cat"),
        "a": region(40, "dog")}}}
    (tmp_path / "v.json").write_text(json.dumps(export))
    summary = import_via(str(tmp_path / "v.json"), str(images), "kind", str(tmp_path / "tree"),
                         val_fraction=0.0)
    assert dict(summary.written) == {"cat": 2, "dog": 2} and not summary.skipped
    assert [m["box"].split()[0] for m in read_manifest(tmp_path / "tree")] == \
        ["10", "20", "40", "30"]  # "2", "10", then "a", "b"


def test_a_via_1_csv_export_imports_like_2(tmp_path):
    good = two_classes(tmp_path / "images")
    header = "#filename," + ",".join(CSV_COLUMNS[1:])
    summary, manifest = import_lines(tmp_path, good, header=header)
    assert dict(summary.written) == {"cat": 1, "dog": 1} and not summary.skipped
    assert list(manifest[0]) == ["crop", "split", "class", "source", "filename", "region_id",
                                 "box"]  # no skipped column when nothing was skipped


def test_skipped_regions_are_rows_of_the_manifest(tmp_path):
    """Every region the export holds is a manifest row: a crop, or a skip with its reason."""
    images = tmp_path / "images"
    draw(images / "a.png", 50, 50)
    rect = {"name": "rect", "x": 0, "y": 0, "width": 20, "height": 20}
    export = write_csv(tmp_path / "export.csv", [
        ("a.png", 4, 0, rect, {"kind": "cat"}),
        ("a.png", 4, 1, {"name": "point", "cx": 1, "cy": 1}, {"kind": "cat"}),
        ("gone.png", 1, 0, rect, {"kind": "dog"}),
        ("a.png", 4, 2, rect, {"kind": "dog"}),
        ("a.png", 4, 3, rect, {}),
        ("empty.png", 0, 0, {}, {})])
    summary = import_via(str(export), str(images), "kind", str(tmp_path / "tree"),
                         val_fraction=0.0)
    manifest = read_manifest(tmp_path / "tree")
    assert len(manifest) == summary.regions_read == 5  # the image without regions is no region
    assert [(m["filename"], m["region_id"], m["crop"], m["class"], m["skipped"])
            for m in manifest] == [
        ("a.png", "0", "train/cat/00000.png", "cat", ""),
        ("a.png", "1", "", "", "point region"),
        ("gone.png", "0", "", "dog", "image missing or unreadable"),
        ("a.png", "2", "train/dog/00001.png", "dog", ""),
        ("a.png", "3", "", "", "no kind value")]


def test_malformed_text_is_one_line_and_exit_2(tmp_path, capsys):
    images = tmp_path / "images"
    draw(images / "a.png", 50, 50)
    rect = json.dumps({"name": "rect", "x": 0, "y": 0, "width": 20, "height": 20})
    cases = {
        "deep.json": "[" * 100_000,
        "digits.json": '{"a.png": {"filename": "a.png", "regions": [{"shape_attributes": '
                       '{"name": "rect", "x": ' + "1" * 5000 + "}}]}}",
        "surrogate.json": json.dumps({"a.png": {"filename": "a.png", "regions": [
            {"shape_attributes": json.loads(rect), "region_attributes": {"kind": "\ud800"}}]}}),
        "long.csv": ",".join(CSV_COLUMNS) + '\na.png,1,{},1,0,"' + "x" * 200_000 + '",{}\n',
        "keys.json": json.dumps({"a.png": {"filename": "a.png", "regions": [  # quoted keys
            {"shape_attributes": json.loads(rect), "region_attributes": {"a\nb": "x"}}]}}),
    }
    messages = {"deep.json": "malformed JSON (nested too deeply)",
                "digits.json": "malformed JSON (",
                "surrogate.json": "an unpaired surrogate escape", "long.csv": "not a well-formed CSV",
                "keys.json": "the export has: a\\nb"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        code = main(["--csv", str(tmp_path / name), "--images", str(images), "--attribute",
                     "kind", "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and messages[name] in err, (name, err)


def test_unusable_file_names_and_class_values_are_skipped(tmp_path):
    images = tmp_path / "images"
    draw(images / "a.png", 50, 50)
    rect = {"name": "rect", "x": 0, "y": 0, "width": 20, "height": 20}
    export = write_csv(tmp_path / "export.csv", [
        ("a.png", 5, 0, rect, {"kind": "cat"}),
        ("a.png", 5, 1, rect, {"kind": "dog"}),
        ("x" * 5000 + ".png", 1, 0, rect, {"kind": "dog"}),  # too long for the file system
        ("a.png", 5, 2, rect, {"kind": "y" * 300}),
        ("a.png", 5, 3, rect, {"kind": "nul\x00"})])
    summary = import_via(str(export), str(images), "kind", str(tmp_path / "tree"),
                         val_fraction=0.0)
    assert dict(summary.written) == {"cat": 1, "dog": 1, "nul\x00": 1}
    assert dict(summary.skipped) == {"image missing or unreadable": 1,
                                     "kind: value too long for a folder name": 1}
    assert (tmp_path / "tree" / "train" / "nul_").is_dir()


@pytest.mark.e2e
def test_train_and_gradcam_on_an_imported_tree(shared_export, tmp_path):
    draw_shared_images(shared_export, tmp_path / "images")
    tree = tmp_path / "people"
    proc = run_job("jobs.via_import", "--csv", str(shared_export), "--images",
                   str(tmp_path / "images"), "--attribute", "Gender", "--out", str(tree))
    assert proc.returncode == 0 and "class female:" in proc.stdout, proc.stderr[-2000:]
    proc = run_job("jobs.train", "--data", str(tree), "--val-size", "10", "--epochs", "1",
                   "--batch-size", "16", "--cpus-per-worker", "1", "--storage",
                   str(tmp_path / "runs"), "--name", "people")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "people" / "summary.json").read_text())
    assert summary["classes"] == ["female", "male"] and summary["test_acc"] is not None
    assert summary["data"]["sizes"]["test"] == 10
    exported = torch.export.load(tmp_path / "runs" / "people" / "best" / "model.pt2").module()
    assert exported(torch.rand(3, 3, 32, 32)).shape == (3, 2)  # one logit per class
    proc = run_job("jobs.gradcam", "--checkpoint", summary["best_checkpoint"], "--data",
                   str(tree), "--images", "2", "--out", str(tmp_path / "cam"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "cam").iterdir()) == \
        ["00_female.png", "01_male.png", "cams.npz", "gradcam.png"]


def test_class_names_become_safe_folder_names(tmp_path):
    from resnet.data.via import safe
    assert [safe(n) for n in ("cat/dog", "a\\b", "..", ".hidden", "../../etc")] == \
        ["cat_dog", "a_b", "_", "hidden", "_.._etc"]
    images = tmp_path / "images"
    draw(images / "a.png", 50, 50)
    rect = {"name": "rect", "x": 0, "y": 0, "width": 20, "height": 20}
    export = write_csv(tmp_path / "export.csv", [("a.png", 2, 0, rect, {"kind": "../up"}),
                                                 ("a.png", 2, 1, rect, {"kind": "b/c"})])
    import_via(str(export), str(images), "kind", str(tmp_path / "tree"), val_fraction=0.0)
    assert sorted(p.name for p in (tmp_path / "tree" / "train").iterdir()) == ["_up", "b_c"]
    assert not (tmp_path / "up").exists()  # nothing written outside the tree
