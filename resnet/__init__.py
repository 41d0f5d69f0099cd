"""ResNets on CIFAR-10 as a distributed Ray Train job.

Modules, one concern each: docs/architecture.md lists them.
"""

import os as _os
import sys as _sys
from urllib.parse import urlsplit as _urlsplit


def _on_loopback(address: str) -> bool:
    """Whether RAY_ADDRESS (host:port, or ray://, http://... host:port) names this machine's
    loopback, as a cluster started with ``ray start --node-ip-address 127.0.0.1`` has it."""
    host = _urlsplit(address if "//" in address else f"//{address}").hostname
    return host in ("127.0.0.1", "localhost", "::1")


# Ray maps 127.0.0.1 to the machine's routable address unless it runs in single-node mode, so an
# embedded local Ray would listen on every interface, and a driver joining a cluster on loopback
# would listen on the machine's address. Turn single-node mode on before Ray is first imported,
# unless this process drives a cluster elsewhere (RAY_ADDRESS, as `ray job submit` sets it).
if "ray" not in _sys.modules and (not _os.environ.get("RAY_ADDRESS")
                                  or _on_loopback(_os.environ["RAY_ADDRESS"])):
    _os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# Ray's log de-duplication merges lines of different processes that differ only in digits: the
# "[trial] Epoch 2/3 ..." lines of two trials would collapse into one. Every epoch line counts.
_os.environ.setdefault("RAY_DEDUP_LOGS", "0")

__version__ = "0.1.0"
