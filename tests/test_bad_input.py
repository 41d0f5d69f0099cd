"""Bad input: every row of the table in docs/reliability.md, run through the job's own ``main``
(one case as a real process). Each is one line on stderr, exit 2, and nothing written."""

from __future__ import annotations

import ctypes
import importlib
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from resnet.train.checkpoint import export_model, save_state
from resnet.config import make_config
from resnet.models import build_model
from tests.conftest import ROOT
from tests.test_data import write_official, write_tree

DOC = ROOT / "docs" / "reliability.md"


def documented_cases() -> dict[str, str]:
    """``{case: message}`` from the bad-input table of docs/reliability.md."""
    section = DOC.read_text().split("## Bad input", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|.*\| `([^`]+)` \|$", section, re.MULTILINE)
    return dict(rows)


class Payload:
    """Unpickling this would create the marker file: the restricted unpickler must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def build_inputs(tmp: Path, cifar, archive: Path, s3: str) -> dict[str, list[str]]:
    """Each case's command line, ``[job, *args]``, with the files it needs written under ``tmp``;
    ``s3``: the query of the session's S3 server."""
    data = ["--data", str(archive)]
    nine = write_tree(tmp / "nine", cifar, test=0)
    shutil.rmtree(nine / "train" / "truck")
    eleven = write_tree(tmp / "eleven", cifar, test=0)
    shutil.copytree(eleven / "train" / "cat", eleven / "train" / "lion")
    big = write_tree(tmp / "big", cifar, test=0)
    Image.new("RGB", (64, 64)).save(next((big / "train" / "dog").glob("*.png")))
    broken = write_tree(tmp / "broken", cifar, test=0)
    next((broken / "train" / "dog").glob("*.png")).write_bytes(b"not an image")
    truncated = tmp / "truncated.tar.xz"
    truncated.write_bytes(archive.read_bytes()[:2_000_000])
    evil = write_official(tmp / "evil", cifar)
    with open(evil / "data_batch_2", "wb") as f:
        pickle.dump({b"data": Payload(tmp / "payload-ran"), b"labels": []}, f, protocol=2)
    locked = tmp / "locked.tar.xz"
    locked.write_bytes(b"")
    locked.chmod(0)

    (tmp / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a zip")
    tiny = build_model("tiny")
    save_state(tmp, {"model": tiny.state_dict(), "classes": list(range(10)),
                     "config": make_config(model="resnet20").to_dict()})
    (tmp / "model.pt2").write_bytes(export_model(tiny))
    (tmp / "unknown-key.json").write_text('{"learning_rate": 0.1}')
    (tmp / "impossible.json").write_text('{"lr": {"loguniform": [0.5, 0.1]}}')
    (tmp / "odd-batch.json").write_text('{"batch_size": {"choice": [64, 90]}}')
    (tmp / "grid.json").write_text('{"lr": {"grid": [0.1, 0.2]}}')
    (tmp / "not-a-schedule.json").write_text('{"lr": 0.1}')
    cam = ["--data", str(archive), "--checkpoint"]
    (tmp / "no-images").mkdir()
    (tmp / "a-file").write_text("x")
    export = [str(tmp / "model.pt2"), str(big), "--classes", ",".join("abcdefghij")]
    return {
        "data-missing": ["jobs.train", "--data", str(tmp / "nope")],
        "data-unreadable": ["jobs.train", "--data", str(locked)],
        "data-truncated": ["jobs.train", "--data", str(truncated)],
        "data-9-classes": ["jobs.train", "--data", str(nine)],
        "data-11-classes": ["jobs.train", "--data", str(eleven)],
        "image-not-32x32": ["jobs.train", "--data", str(big)],
        "image-undecodable": ["jobs.train", "--data", str(broken)],
        "pickle-payload": ["jobs.train", "--data", str(evil)],
        "checkpoint-corrupt": ["jobs.gradcam", *cam, str(tmp / "corrupt.pt")],
        "checkpoint-other-model": ["jobs.gradcam", *cam, str(tmp / "checkpoint.pt")],
        "checkpoint-is-export": ["jobs.gradcam", *cam, str(tmp / "model.pt2")],
        "epochs-0": ["jobs.train", *data, "--epochs", "0"],
        "lr-negative": ["jobs.train", *data, "--lr", "-0.1"],
        "val-size-too-large": ["jobs.train", *data, "--val-size", "60000"],
        "subset-too-small": ["jobs.train", *data, "--subset", "9"],
        "tune-subset-not-a-number": ["jobs.tune", *data, "--subset", "most"],
        "fractional-gpus-several-workers": ["jobs.train", *data, "--gpu", "--gpus-per-worker",
                                            "0.5", "--num-workers", "2"],
        "batch-not-divisible": ["jobs.train", *data, "--batch-size", "3", "--num-workers", "2"],
        "model-unknown": ["jobs.train", *data, "--model", "resnet50"],
        "space-unknown-key": ["jobs.tune", *data, "--space", str(tmp / "unknown-key.json")],
        "space-impossible-range": ["jobs.tune", *data, "--space", str(tmp / "impossible.json")],
        "name-with-separator": ["jobs.train", *data, "--name", "runs/a"],
        "sweep-name-with-separator": ["jobs.tune", *data, "--name", "../a"],
        "gpus-per-worker-0": ["jobs.train", *data, "--gpus-per-worker", "0"],
        "space-batch-not-divisible": ["jobs.tune", *data, "--num-workers", "4", "--space",
                                      str(tmp / "odd-batch.json")],
        "optuna-with-grid": ["jobs.tune", *data, "--search", "optuna", "--space",
                             str(tmp / "grid.json")],
        "pbt-with-keras-trial": ["jobs.tune", *data, "--scheduler", "pbt", "--keras-trial"],
        "resume-nothing": ["jobs.tune", *data, "--resume", "--name", "nothing"],
        "lr-schedule-not-a-schedule": ["jobs.train", *data, "--lr-schedule",
                                       str(tmp / "not-a-schedule.json")],
        # Storage: the bucket is not there, the endpoint does not answer, no such filesystem.
        "storage-no-such-bucket": ["jobs.tune", *data, "--storage",
                                   f"s3://no-such-bucket/sweeps?{s3}"],
        "storage-unreachable": ["jobs.train", *data, "--storage", "s3://runs/x?endpoint_override="
                                "http://127.0.0.1:9&region=us-east-1"],
        "storage-unknown-scheme": ["jobs.train", *data, "--storage", "nosuchfs://bucket/runs"],
        # jobs.predict: nothing to predict, a MODEL that is no export, an --out it cannot write.
        "predict-empty-source": ["jobs.predict", export[0], str(tmp / "no-images"), *export[2:]],
        "predict-not-an-export": ["jobs.predict", str(tmp / "corrupt.pt"), str(big)],
        "predict-out-not-writable": ["jobs.predict", *export, "--out", str(tmp / "a-file" / "x")],
    }


@pytest.fixture(scope="module")
def inputs(cifar, shared_archive, tmp_path_factory, s3_server):
    tmp = tmp_path_factory.mktemp("bad-input")
    return tmp, build_inputs(tmp, cifar, shared_archive, s3_server)


def test_the_table_and_the_cases_match(inputs):
    assert set(documented_cases()) == set(inputs[1])


def run_in_process(job: str, args: list[str], capsys) -> tuple[int, str]:
    try:
        code = importlib.import_module(job).main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    return code, capsys.readouterr().err


def run_unprivileged(job: str, args: list[str]) -> tuple[int, str]:
    """A real process. Root reads any file, so as root the child gives up the two capabilities
    that bypass file modes (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) before it starts."""
    def drop_file_mode_override() -> None:
        if os.geteuid() == 0:
            libc = ctypes.CDLL(None, use_errno=True)
            for capability in (1, 2):  # linux/capability.h
                if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                    raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    proc = subprocess.run([sys.executable, "-m", job, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, preexec_fn=drop_file_mode_override)
    assert "Traceback" not in proc.stdout
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("case", sorted(documented_cases()))
def test_bad_input_is_one_line_and_writes_nothing(case, inputs, capsys, tmp_path):
    tmp, commands = inputs
    job, *args = commands[case]
    out = tmp_path / "out"
    if "--storage" not in args and "--out" not in args:
        args += ["--out", str(out)] if job in ("jobs.gradcam", "jobs.predict") else \
            ["--storage", str(out)]
    if case == "data-unreadable":
        code, err = run_unprivileged(job, args)
    else:
        code, err = run_in_process(job, args, capsys)
    assert code == 2, err[-2000:]
    assert documented_cases()[case] in err, err[-2000:]
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    assert not (tmp / "payload-ran").exists()
