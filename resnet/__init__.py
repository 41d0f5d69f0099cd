"""ResNets on CIFAR-10 as a distributed Ray Train job.

Modules, one concern each: ``config`` (the typed run config and presets), ``data`` (sources,
Parquet cache, splits), ``augment`` (batched on-device augmentation), ``models``, ``schedules``,
``train`` (the per-worker loop), ``driver`` (the Ray Train run and its outputs), ``export``,
``storage`` and ``provenance``.
"""

import os as _os
import sys as _sys

# Ray maps 127.0.0.1 to the machine's routable address unless it runs in single-node mode, so an
# embedded local Ray would listen on every interface. Turn single-node mode on before Ray is first
# imported, unless this process drives an existing cluster (RAY_ADDRESS, as `ray job submit` sets).
if "ray" not in _sys.modules and not _os.environ.get("RAY_ADDRESS"):
    _os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

__version__ = "0.1.0"
