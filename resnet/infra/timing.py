"""Start-up marks for the benchmark: when ``$RESNET_TIMINGS`` names a file, each ``mark`` appends
one JSON line (event, wall-clock time) to it, from the driver and from the Ray workers alike."""

from __future__ import annotations

import json
import os
import time

ENV = "RESNET_TIMINGS"


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def mark(event: str, device=None) -> None:
    """Record that ``event`` happened now (after the device's queued work, for a CUDA device)."""
    path = os.environ.get(ENV)
    if not path:
        return
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch
        torch.cuda.synchronize(device)
    with open(path, "a") as f:  # one short line per append: processes do not interleave
        f.write(json.dumps({"event": event, "t": time.time(), "pid": os.getpid()}) + "\n")


def read_marks(path: str) -> dict[str, float]:
    """{event: time of its first occurrence}."""
    marks: dict[str, float] = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            marks.setdefault(record["event"], record["t"])
    return marks
