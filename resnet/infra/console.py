"""A quiet console for the jobs: Ray's internal chatter off the screen, everything else on it.

Ray forwards every worker's output to the driver's console, including lines that read like
failures but are not (a PreemptionWatcher "constructor arguments in the object store" error per
Train run, the raylet's "N PYTHON worker processes have been started", the autoscaling client's
GetTimeoutError tracebacks on a busy machine, the PlacementGroupCleaner's notes, Tune's
checkpoint chatter). ``QuietStream`` wraps stdout/stderr and drops exactly those lines; anything
else, errors above all, passes through. Ray keeps all of it in its session logs; the jobs' last
lines say where, and ``--verbose`` (or RESNET_VERBOSE=1) turns the filter off.
"""

from __future__ import annotations

import io
import os
import re
import sys
from typing import TextIO

# Lines dropped: Ray's own, known to be harmless on a successful run.
NOISE = [re.compile(p) for p in (
    r"PreemptionWatcher.*constructor arguments in the object store",
    r"\(raylet\).*PYTHON worker processes have been started",
    r"Failed to send resource request",
    r"\(PlacementGroupCleaner pid=",
    r"Checkpoint successfully created at: Checkpoint\(",
    r"Restored on [\d.]+ from checkpoint: Checkpoint\(",
    r"Token authentication is enabled for this Ray cluster",
    r"TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC|experiment checkpoint syncing has been "
    r"triggered|increasing the `CheckpointConfig\(num_to_keep\)`",
    r"Wrote the latest version of all result files and experiment state",
    r"Experiment state snapshotting has been triggered multiple times",
    # Tune's hint points at its driver's staging folder; the sweep's own line names the sweep.
    r"To visualize your results with TensorBoard|View detailed results here",
    r"Consider boosting PBT performance by enabling `reuse_actors`",
    r"Trials did not complete: ",  # Tune's list of early-stopped trials: our table says it
)]
# The noise that comes with a traceback, dropped with it (same process, traceback-shaped lines).
WITH_TRACEBACK = re.compile(r"Failed to send resource request")
TRACEBACK = re.compile(r"^\s*(Traceback|File \"|\^+|raise |ray\.exceptions\.|During handling|"
                       r"The above exception|\S+Error\b|\S+Exception\b|$)|^\s{2,}")
# Tune's per-trial boxes (its configuration when it starts, all its metrics when it completes):
# our one line per epoch and the final table say the same. Dropped from the header to the box's end.
TRIAL_BOX = re.compile(r"^Trial \S+ (started with configuration:|completed after \d+ iterations)")
PREFIX = re.compile(r"^(\x1b\[\d+m)?\((?P<who>[^)]*? pid=\d+[^)]*)\)(\x1b\[\d+m)?\s?")
ANSI = re.compile(r"\x1b\[\d+m")


class QuietStream(io.TextIOBase):
    """A text stream that passes lines through, minus Ray's noise (counted in ``hidden``)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.buffer_text = ""
        self.hidden = 0
        self.dropping: str | None = None  # the process whose traceback is being dropped
        self.in_box = False  # inside one of Tune's per-trial boxes

    def write(self, text: str) -> int:
        self.buffer_text += text
        *lines, self.buffer_text = self.buffer_text.split("\n")
        for line in lines:
            self.line(line)
        if "\r" in self.buffer_text:  # a progress bar redrawing its line: show it as it goes
            shown, _, self.buffer_text = self.buffer_text.rpartition("\r")
            self.stream.write(shown + "\r")
            self.stream.flush()
        return len(text)

    def line(self, line: str) -> None:
        if self.in_box or TRIAL_BOX.match(line):
            self.hidden += 1
            self.in_box = not line.startswith("╰")
            return
        match = PREFIX.match(line)
        who = match.group("who") if match else ""
        body = line[match.end():] if match else line
        if self.dropping is not None and who == self.dropping and TRACEBACK.match(body):
            self.hidden += 1
            return
        self.dropping = None
        if any(p.search(line) for p in NOISE):
            self.hidden += 1
            # Only a Ray process's traceback that follows its own known noise goes with it;
            # never a traceback of this process (no prefix): that is an error to show.
            self.dropping = who if who and WITH_TRACEBACK.search(line) else None
            return
        if match and re.match(r"\[[\w-]+\] ", body) or match and body.startswith("Epoch "):
            line = ANSI.sub("", body)  # our own epoch lines: without Ray's process prefix
        self.stream.write(line + "\n")

    def flush(self) -> None:
        if self.buffer_text:
            self.line(self.buffer_text)
            self.buffer_text = ""
        self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


def quiet(verbose: bool) -> list[QuietStream]:
    """Filter stdout and stderr (before Ray is imported: its log handlers keep the stream they
    find then). Returns the filters, for ``hidden_note``; none with ``verbose``."""
    if verbose or os.environ.get("RESNET_VERBOSE") == "1":
        return []
    sys.stdout, sys.stderr = QuietStream(sys.stdout), QuietStream(sys.stderr)
    return [sys.stdout, sys.stderr]


def hidden_note(filters: list[QuietStream]) -> str | None:
    """The line that says how much was hidden and where Ray keeps it."""
    hidden = sum(f.hidden for f in filters)
    if not hidden:
        return None
    logs = session_logs()
    return (f"{hidden} line(s) of Ray's own logging were not shown here; Ray keeps all of it in "
            f"{logs or 'its session logs (/tmp/ray/session_latest/logs)'}; --verbose shows it")


def session_logs() -> str | None:
    """The logs folder of the Ray this process started or joined, while it is up."""
    try:
        import ray
        from ray._private.worker import global_worker
        if ray.is_initialized():
            return os.path.join(global_worker.node.get_session_dir_path(), "logs")
    except Exception:  # noqa: BLE001 (a private attribute moved: say the usual place instead)
        return None
    return None
