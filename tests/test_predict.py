"""jobs.predict on real images: the decoding of every usual format, what SOURCE and MODEL name,
the Ray Data pipeline on a real local Ray (a folder of the shared archive's JPEGs against the
export run directly, mixed formats, corrupt files, an s3:// prefix, an archive, a rerun), bad
input, the VIA path end to end, and jobs.bench's table 6 at smoke size."""

from __future__ import annotations

import json
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

from jobs.predict import main
from resnet.data.sources import CIFAR10_CLASSES
from resnet.errors import UsageError
from resnet.models import build_model
from resnet.predict.images import decode, decode_many
from resnet.predict.model import load_model
from resnet.predict.sources import resolve_source
from resnet.train.checkpoint import export_model
from tests.conftest import ROOT, S3_BUCKET, run_job, s3_location

OLD_RUN = ROOT / "tests" / "fixtures" / "pre-move" / "old-run"  # tiny, trained 2 epochs


def write_export(path: Path, classes=CIFAR10_CLASSES, model: str = "tiny") -> Path:
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(export_model(build_model(model, len(classes)),
                                  list(classes) if classes else None))
    return path


def png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit RGB PNG (H x W x 3 uint16), written by the PNG spec (Pillow writes none)."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def mixed_tree(root: Path) -> dict[str, tuple[int, int]]:
    """Images of every usual format and size, in sub-folders: {relative path: (width, height)}."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    made = {}

    def save(name: str, image: Image.Image, **kw) -> None:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name, **kw)
        made[name] = image.size
    save("photos/wide.png", Image.fromarray(rgb))  # 500 x 300
    save("photos/tall.jpg", Image.fromarray(rgb[:, :120]).rotate(90, expand=True))
    save("a/b/small.webp", Image.fromarray(rgb[:20, :24]), quality=90)
    save("a/b/bitmap.bmp", Image.fromarray(rgb[:40, :40]))
    save("a/grey.png", Image.fromarray(rgb[:64, :48, 0]))  # mode L
    save("a/rgba.png", Image.fromarray(np.dstack([rgb[:33, :33], rgb[:33, :33, 0]]), "RGBA"))
    save("a/palette.gif", Image.fromarray(rgb[:50, :50]).convert("P"))
    save("a/grey16.png", Image.fromarray(rgb[:64, :48, 0].astype(np.uint16) * 257))  # I;16
    png16(root / "a" / "rgb16.png", rgb[:32, :32].astype(np.uint16) * 257)
    made["a/rgb16.png"] = (32, 32)
    return made


def corrupt_files(root: Path) -> dict[str, str]:
    """Files that give no image: {relative path: the start of the reason}."""
    root.mkdir(parents=True, exist_ok=True)
    good = (ROOT / "docs" / "gradcam.png").read_bytes()
    (root / "notes.txt").write_text("not an image\n")
    (root / "empty.jpg").write_bytes(b"")
    (root / "cut.png").write_bytes(good[:300])
    jpeg = root / "half.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:len(jpeg.read_bytes()) // 2])
    (root / ".hidden.jpg").write_bytes(b"left out")  # hidden: not a file of the source
    return {"notes.txt": "not an image", "empty.jpg": "empty file", "cut.png": "corrupt image",
            "half.jpg": "corrupt image"}


# --- decoding, without Ray ---------------------------------------------------------------------

def test_every_format_becomes_32_by_32_rgb_with_its_size(tmp_path):
    made = mixed_tree(tmp_path)
    for name, (width, height) in made.items():
        pixels, w, h = decode((tmp_path / name).read_bytes())
        assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8, name
        assert (w, h) == (width, height), name
    grey, _, _ = decode((tmp_path / "a" / "grey16.png").read_bytes())
    assert (grey[..., 0] == grey[..., 1]).all()  # greyscale repeated over the channels
    expected, _, _ = decode((tmp_path / "a" / "grey.png").read_bytes())  # the same, 8-bit
    assert np.array_equal(grey, expected)  # 16 bits scaled to 8: v * 257 -> v
    rgb16, _, _ = decode((tmp_path / "a" / "rgb16.png").read_bytes())
    original = np.asarray(Image.open(tmp_path / "photos" / "wide.png"))[:32, :32]
    assert np.array_equal(rgb16, original)  # 48-bit RGB keeps its top 8 bits


def test_resize_and_crop_are_torchvisions(tmp_path):
    from torchvision import transforms
    mixed_tree(tmp_path)
    image = Image.open(tmp_path / "photos" / "wide.png")
    reference = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32)])(image)
    pixels, _, _ = decode((tmp_path / "photos" / "wide.png").read_bytes())
    assert np.array_equal(pixels, np.asarray(reference))


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the white half on top
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    out, width, height = decode((tmp_path / "phone.jpg").read_bytes())
    assert (width, height) == (20, 40)
    assert out[:8].mean() > 200 and out[-8:].mean() < 50


def test_unreadable_files_are_reasons_not_errors(tmp_path):
    expected = corrupt_files(tmp_path)
    names = sorted(expected)
    images, widths, _, reasons = decode_many([(tmp_path / n).read_bytes() for n in names])
    assert len(images) == 0 and widths.tolist() == [0] * len(names)
    for name, reason in zip(names, reasons):
        assert reason.startswith(expected[name]), (name, reason)


# --- SOURCE and MODEL, without Ray -------------------------------------------------------------

def test_what_source_names(tmp_path):
    mixed_tree(tmp_path / "tree")
    corrupt_files(tmp_path / "tree" / "bad")
    (tmp_path / "tree" / "out").mkdir()
    (tmp_path / "tree" / "out" / "old.png").write_bytes(b"an earlier run's output")
    folder = resolve_source(str(tmp_path / "tree"), exclude=str(tmp_path / "tree" / "out"))
    paths = folder.groups[0].paths
    assert folder.kind == "folder" and len(paths) == 9 + 4 and list(paths) == sorted(paths)
    assert not [p for p in paths if "/out/" in p or ".hidden" in p]
    listing = tmp_path / "tree" / "list.txt"
    listing.write_text(f"# images\nphotos/wide.png\n\n{tmp_path}/tree/a/grey.png\nphotos/wide.png\n"
                       "gone.png\n")
    listed = resolve_source(str(listing))
    assert listed.kind == "list" and listed.files == 2
    assert listed.skipped == ((str(tmp_path / "tree" / "gone.png"),
                               "not found (line 6 of the list)"),)
    with tarfile.open(tmp_path / "images.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "tree" / "a", arcname="a")
    archive = resolve_source(str(tmp_path / "images.tar.gz"))
    assert archive.kind == "archive" and archive.files is None


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file, folder or prefix"),
    ("empty", "holds no files"),
    ("hidden-only", "holds no files"),
    ("empty-archive", "the archive holds no files"),
    ("broken-archive", "archive is corrupt or not a tar archive"),
    ("list-of-missing", "none of its 2 file(s) exists"),
])
def test_a_source_without_images_is_a_usage_error(tmp_path, case, message):
    where = tmp_path / case
    if case in ("empty", "hidden-only"):
        where.mkdir()
        if case == "hidden-only":
            (where / ".DS_Store").write_bytes(b"x")
    elif case == "empty-archive":
        with tarfile.open(where, "w:gz"):
            pass
    elif case == "broken-archive":
        where.write_bytes(b"\xfd7zXZ\x00" + b"\x00" * 600)  # xz's magic, then nothing
    elif case == "list-of-missing":
        where.write_text("a.jpg\nb.jpg\n")
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_source(str(where))


def test_class_names_come_from_the_export_or_its_run(tmp_path):
    people = load_model(str(write_export(tmp_path / "people.pt2", ("female", "male"))))
    assert people.classes == ("female", "male") and people.classes_from == "export metadata"
    run = tmp_path / "old-run"
    (run / "best").mkdir(parents=True)
    shutil.copy(OLD_RUN / "best" / "model.pt2", run / "best")
    shutil.copy(OLD_RUN / "summary.json", run)
    old = load_model(str(run))  # exported before exports carried their classes
    assert old.classes == CIFAR10_CLASSES and old.classes_from == str(run / "summary.json")
    alone = tmp_path / "alone.pt2"
    shutil.copy(OLD_RUN / "best" / "model.pt2", alone)
    with pytest.raises(UsageError, match="carries no class names.*--classes a,b,c"):
        load_model(str(alone))
    assert load_model(str(alone), ",".join("abcdefghij")).classes == tuple("abcdefghij")
    with pytest.raises(UsageError, match="has 10 outputs but 3 class names"):
        load_model(str(alone), "a,b,c")


def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    images = tmp_path / "images"
    mixed_tree(images)
    export = write_export(tmp_path / "model.pt2")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.pt2").write_text("not a model")
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "out"
    cases = [
        ([str(export), str(tmp_path / "empty")], "holds no files"),
        ([str(tmp_path / "notes.pt2"), str(images)], "not a torch.export model"),
        ([str(tmp_path / "nowhere"), str(images)], "MODEL"),
        ([str(export), str(images), "--top-k", "0"], "--top-k must be at least 1"),
        ([str(export), str(images), "--classes", "a,b"], "10 outputs but 2 class names"),
        ([str(export), str(images), "--out", str(tmp_path / "a-file" / "sub")],
         "cannot be written"),
    ]
    # In the whole suite the session's Ray may be up already: Ray must be as it was; the
    # subprocesses below prove "before Ray starts" (Ray's first log line would be a second line).
    was_up = ray.is_initialized()
    for args, message in cases:
        code = main([*args, *([] if "--out" in args else ["--out", str(out)])])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
        assert not out.exists() and ray.is_initialized() == was_up
    for args in ([str(tmp_path / "notes.pt2"), str(images), "--out", str(out)],
                 [str(export), str(images), "--out", str(tmp_path / "a-file" / "sub")]):
        proc = run_job("jobs.predict", *args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "Traceback" not in proc.stderr and not out.exists()


# --- the pipeline on a real local Ray ----------------------------------------------------------

@pytest.fixture(scope="module")
def cifar_folder(shared_archive, tmp_path_factory) -> Path:
    """20 JPEGs of each class of the shared archive, as files: train/<class>/NNNN.jpg."""
    root = tmp_path_factory.mktemp("cifar-jpegs")
    taken: dict[str, int] = {}
    with tarfile.open(shared_archive, "r|*") as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and taken.get(parts[1], 0) < 20:
                taken[parts[1]] = taken.get(parts[1], 0) + 1
                (root / parts[1]).mkdir(exist_ok=True)
                (root / parts[1] / parts[2]).write_bytes(tar.extractfile(member).read())
    assert len(taken) == 10 and set(taken.values()) == {20}
    return root


def read_out(out: Path) -> tuple[list[dict], dict]:
    return (pq.read_table(out / "predictions.parquet").to_pylist(),
            json.loads((out / "summary.json").read_text()))


@pytest.mark.ray
def test_predictions_match_the_export_run_directly(ray_local, cifar_folder, tmp_path):
    """200 CIFAR-10 JPEGs plus mixed formats and corrupt files in one source; the model is a
    run folder (classes from its summary.json); --gradcam 4; then the same command again."""
    source = tmp_path / "source"
    shutil.copytree(cifar_folder, source / "cifar")
    sizes = mixed_tree(source / "mixed")
    broken = corrupt_files(source / "broken")
    run = tmp_path / "old-run"
    shutil.copytree(OLD_RUN, run)
    out = tmp_path / "out"
    assert main([str(run), str(source), "--out", str(out), "--gradcam", "4", "--top-k", "4"]) == 0
    rows, summary = read_out(out)
    by_path = {row["path"]: row for row in rows}
    assert len(rows) == len(by_path) == 200 + len(sizes) and [r["path"] for r in rows] == \
        sorted(by_path)
    # The export itself, on the same images decoded the usual way (32 x 32 already).
    jpegs = sorted(cifar_folder.rglob("*.jpg"))
    x = torch.tensor(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in jpegs]))
    module = torch.export.load(run / "best" / "model.pt2").module()
    with torch.no_grad():
        probs = torch.softmax(module(x.permute(0, 3, 1, 2).float() / 255), dim=1)
    labels = [CIFAR10_CLASSES.index(p.parent.name) for p in jpegs]
    rows_here = [by_path[str(source / "cifar" / p.relative_to(cifar_folder))] for p in jpegs]
    assert [r["predicted"] for r in rows_here] == [CIFAR10_CLASSES[i] for i in probs.argmax(1)]
    assert np.allclose([r["probability"] for r in rows_here], probs.max(1).values, atol=1e-5)
    accuracy = np.mean([r["predicted"] == CIFAR10_CLASSES[y] for r, y in zip(rows_here, labels)])
    direct = (probs.argmax(1) == torch.tensor(labels)).double().mean().item()
    assert accuracy == pytest.approx(direct, abs=1e-12) and direct > 0.1
    for name, (width, height) in sizes.items():
        row = by_path[str(source / "mixed" / name)]
        assert (row["width"], row["height"]) == (width, height) and len(row["top_k_classes"]) == 4
        assert row["top_k_probabilities"] == sorted(row["top_k_probabilities"], reverse=True)
    skipped = {item["path"]: item["reason"] for item in summary["skipped_files"]}
    assert set(skipped) == {str(source / "broken" / n) for n in broken}
    for name, reason in broken.items():
        assert skipped[str(source / "broken" / name)].startswith(reason)
    assert summary["classes_from"] == str(run / "summary.json") and summary["images"] == len(rows)
    assert sum(summary["counts"].values()) == len(rows) and summary["images_per_s"] > 0
    assert summary["ray_cluster"]["node_ips"] == ["127.0.0.1"]
    # Grad-CAM of the 4 least confident, and the gallery linking them.
    least = sorted(rows, key=lambda r: (r["probability"], r["path"]))[:4]
    assert summary["gradcam"] == sorted(f"gradcam/{p.name}" for p in (out / "gradcam").iterdir())
    page = (out / "index.html").read_text()
    assert all(f'src="{name}"' in page for name in summary["gradcam"])
    assert all(row["path"] in page for row in least)
    with Image.open(out / summary["gradcam"][0]) as overlay:
        assert overlay.size == (256, 128)
    # The same command again: the outputs are replaced, row for row.
    assert main([str(run), str(source), "--out", str(out), "--top-k", "4"]) == 0
    again, second = read_out(out)
    assert again == rows and second["skipped_files"] == summary["skipped_files"]
    assert not (out / "gradcam").exists() or not list((out / "gradcam").iterdir())
    assert not (out / "index.html").exists()


@pytest.mark.ray
def test_an_s3_prefix_and_an_archive(ray_local, s3_server, cifar_folder, tmp_path):
    import pyarrow.fs as pafs
    prefix = s3_location(s3_server, f"{tmp_path.name}/images")
    fs, inner = pafs.FileSystem.from_uri(prefix)
    files = sorted(cifar_folder.rglob("*.jpg"))[::20]  # one per class
    for path in files:
        with fs.open_output_stream(f"{inner}/{path.parent.name}/{path.name}") as f:
            f.write(path.read_bytes())
    with fs.open_output_stream(f"{inner}/broken/notes.txt") as f:
        f.write(b"not an image")
    export = write_export(tmp_path / "model.pt2")
    out = s3_location(s3_server, f"{tmp_path.name}/out")
    assert main([str(export), prefix, "--out", out, "--gradcam", "1"]) == 0
    from tests.conftest import download
    local = download(out, tmp_path / "out")
    rows, summary = read_out(local)
    assert [r["path"] for r in rows] == [f"s3://{S3_BUCKET}/{tmp_path.name}/images/"
                                         f"{p.parent.name}/{p.name}" for p in files]
    assert [s["reason"][:12] for s in summary["skipped_files"]] == ["not an image"]
    assert len(summary["gradcam"]) == 1 and (local / summary["gradcam"][0]).is_file()
    # The same images (and the broken file) in a .tar.xz, streamed by one read task.
    with tarfile.open(tmp_path / "images.tar.xz", "w:xz") as tar:
        for path in files:
            tar.add(path, arcname=f"{path.parent.name}/{path.name}")
        corrupt_files(tmp_path / "bad")
        tar.add(tmp_path / "bad" / "notes.txt", arcname="broken/notes.txt")
    archive_out = tmp_path / "archive-out"
    assert main([str(export), str(tmp_path / "images.tar.xz"), "--out", str(archive_out)]) == 0
    archived, summary = read_out(archive_out)
    assert [r["path"] for r in archived] == [str(tmp_path / "images.tar.xz") + "/"
                                             f"{p.parent.name}/{p.name}" for p in files]
    assert [(a["predicted"], a["probability"]) for a in archived] == \
        [(r["predicted"], r["probability"]) for r in rows]
    assert summary["skipped"] == 1 and summary["source_kind"] == "archive"


@pytest.mark.ray
def test_bench_table_6_at_smoke_size(ray_local, shared_archive, tmp_path):
    from resnet.bench.predict_speed import TARGET, bench_predict
    rows = bench_predict(str(shared_archive), str(tmp_path), images=256, batch=64, rounds=1,
                         model="tiny")
    assert [row["pipeline"] for row in rows] == ["1 replica(s) x 2 CPU", "2 replica(s) x 1 CPU"]
    for row in rows:
        assert row["images"] == 256 and row["target"] == TARGET
        assert row["ratio"] == row["pipeline_images_per_s"] / row["plain_images_per_s"] > 0
    assert rows[0]["plain_images_per_s"] == rows[1]["plain_images_per_s"]  # one plain side
    assert not (tmp_path / "predict-images").exists()  # the bench's copies are removed


# --- end to end: VIA export -> jobs.via_import -> jobs.train -> jobs.predict --------------------

@pytest.mark.e2e
def test_a_model_trained_on_a_via_import_predicts_its_own_classes(ray_local, tmp_path):
    from tests.test_via import SHARED_EXPORT, draw_shared_images
    if not SHARED_EXPORT.is_file():
        pytest.skip(f"the shared VIA export is missing: {SHARED_EXPORT}")
    photos = tmp_path / "photos"
    draw_shared_images(SHARED_EXPORT, photos)
    tree = tmp_path / "people"
    proc = run_job("jobs.via_import", "--csv", str(SHARED_EXPORT), "--images", str(photos),
                   "--attribute", "Gender", "--out", str(tree))
    assert proc.returncode == 0, proc.stderr[-2000:]
    from jobs.train import main as train
    assert train(["--data", str(tree), "--model", "tiny", "--val-size", "10", "--epochs", "1",
                  "--batch-size", "16", "--cpus-per-worker", "1", "--storage",
                  str(tmp_path / "runs"), "--name", "people"]) == 0
    proc = run_job("jobs.predict", str(tmp_path / "runs" / "people"), str(photos), "--out",
                   str(tmp_path / "predicted"), "--gradcam", "2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "[predict] wrote" in proc.stdout and "Traceback" not in proc.stderr
    rows, summary = read_out(tmp_path / "predicted")
    assert len(rows) == len([p for p in photos.rglob("*") if p.is_file()]) and \
        summary["skipped"] == 0
    assert {r["predicted"] for r in rows} <= {"female", "male"}
    assert set(summary["counts"]) == {"female", "male"} and summary["classes_from"] == \
        "export metadata"
    assert all(r["width"] > 32 and r["height"] > 32 for r in rows)  # the photos, not the crops
    assert len(summary["gradcam"]) == 2
