"""The quiet console: Ray's known noise off the screen, everything else (errors above all) on it.
Lines as Ray and Tune print them, and a real sweep whose every trial fails."""

from __future__ import annotations

import io
import json

import pytest

from resnet.infra.console import NOISE as PATTERNS
from resnet.infra.console import QuietStream
from tests.conftest import run_job

NOISE = """\
\x1b[36m(TrainController pid=8246)\x1b[0m [2026-11-29 21:37:33,643 E 8246 8274] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: '7b6f' has constructor arguments in the object store and max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart will fail.
\x1b[36m(raylet)\x1b[0m WARNING: 4 PYTHON worker processes have been started on node: abc with address: 127.0.0.1. This could be a result of using a large number of actors, or due to tasks blocked in ray.get() calls.
\x1b[36m(TrainController pid=900)\x1b[0m Failed to send resource request to the autoscaling coordinator.
\x1b[36m(TrainController pid=900)\x1b[0m Traceback (most recent call last):
\x1b[36m(TrainController pid=900)\x1b[0m   File "/x/ray/train/v2/_internal/execution/scaling_policy/scaling_policy.py", line 99, in _send_resource_request
\x1b[36m(TrainController pid=900)\x1b[0m     ray.get(ref, timeout=5)
\x1b[36m(TrainController pid=900)\x1b[0m ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.
\x1b[36m(PlacementGroupCleaner pid=20350)\x1b[0m Detected that the Ray Train controller actor (3fe0) is dead. Cleaning up placement group = [PlacementGroupID(4a0d)] created by this run.
\x1b[36m(train_trial pid=14098)\x1b[0m Checkpoint successfully created at: Checkpoint(filesystem=local, path=/tmp/s/trial_1/checkpoint_000000)
2026-11-29 22:04:24,784\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.
Trial train_trial_cffbf_00001 completed after 1 iterations at 2026-11-29 22:19:09. Total running time: 36s
╭──────────────────────────────╮
│ Trial train_trial_cffbf_00001 result │
├──────────────────────────────┤
│ val_acc                0.135 │
╰──────────────────────────────╯
"""
KEPT = """\
sweep s: 2 trial(s) x 1 epochs of tiny, 1 worker(s) x 1 CPU per trial
\x1b[36m(RayTrainWorker pid=12)\x1b[0m [cffbf_00000] Epoch 1/1 - 0s - loss: 2.3162 - val_acc: 0.1050
\x1b[36m(RayTrainWorker pid=12)\x1b[0m Traceback (most recent call last):
\x1b[36m(RayTrainWorker pid=12)\x1b[0m RuntimeError: CUDA error: out of memory
2026-11-29 22:19:09,944\tERROR tune_controller.py:1331 -- Trial task failed for trial train_trial_cffbf_00001
Trial train_trial_cffbf_00001 errored after 0 iterations at 2026-11-29 22:19:09. Total running time: 36s
Error file: /tmp/s/trial_cffbf_00001/error.txt
\x1b[36m(raylet)\x1b[0m A worker died or was killed while executing a task by an unexpected system error.
"""


def filtered(text: str) -> tuple[str, int]:
    out = io.StringIO()
    quiet = QuietStream(out)
    for piece in (text[:50], text[50:51], text[51:]):  # writes split mid-line, as prints are
        quiet.write(piece)
    quiet.flush()
    return out.getvalue(), quiet.hidden


def test_known_noise_is_hidden_and_counted():
    shown, hidden = filtered(NOISE)
    assert shown == "" and hidden == len(NOISE.splitlines())


def test_our_lines_and_every_error_pass_through():
    shown, hidden = filtered(KEPT)
    lines = shown.splitlines()
    assert hidden == 0 and len(lines) == len(KEPT.splitlines())
    assert lines[1] == "[cffbf_00000] Epoch 1/1 - 0s - loss: 2.3162 - val_acc: 0.1050"  # our own
    assert "RuntimeError: CUDA error: out of memory" in shown and "Error file:" in shown
    assert "A worker died or was killed" in shown


def test_noise_between_errors_does_not_swallow_them():
    shown, _ = filtered(NOISE + KEPT + NOISE)
    assert shown.splitlines()[0].startswith("sweep s:") and "errored after 0 iterations" in shown


@pytest.mark.e2e
def test_a_failing_trial_reaches_the_console_with_where_its_log_is(shared_archive, tmp_path):
    # Each value is possible alone, so the space passes its check before Ray; but a shift TTA
    # needs the flip TTA: every sampled trial fails as it starts, and must still get its row.
    (tmp_path / "space.json").write_text(json.dumps({"schedule": "onecycle", "batch_size": 64,
                                                     "tta": {"grid": [False]}, "tta_shift": 1}))
    proc = run_job("jobs.tune", "--data", str(shared_archive), "--model", "tiny", "--space",
                   str(tmp_path / "space.json"), "--samples", "1", "--epochs", "1", "--subset",
                   "200", "--val-size", "50", "--cpu", "--storage", str(tmp_path), "--name", "f")
    console = proc.stdout + proc.stderr
    assert proc.returncode == 1, console[-3000:]
    assert "--tta-shift needs --tta" in console
    assert "error.txt" in console  # where the trial's whole traceback is
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "jobs.tune: error: no trial completed an epoch; see the trial errors in")
    assert not any(p.search(line) for p in PATTERNS for line in console.splitlines())
