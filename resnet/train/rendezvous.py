"""The DDP rendezvous of a run's workers, kept on loopback when they all share one node.

Ray Train's torch backend starts torch.distributed's rendezvous store (a ``TCPStore``) in rank 0
at the node's address, and torch binds the store's listening socket to every interface: during a
local ``jobs.train`` anything that reaches the machine could reach it. torch lets the store take a
socket that is already bound (``master_listen_fd``), so when every rank is on one node this
backend binds one to 127.0.0.1 in rank 0, hands the store its descriptor, and points gloo's (and
NCCL's bootstrap) sockets at the loopback interface. Ranks spread over several nodes must reach
each other over the network: they keep Ray's own rendezvous.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig

# Ray Train's own torch backend and its per-worker environment (LOCAL_RANK, RANK, ...): private
# names, so tests/test_cluster.py checks every listening socket of a local run.
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

LOOPBACK = "127.0.0.1"
_listener: list[socket.socket] = []  # rank 0's bound socket, alive until the store has it


def loopback_interface() -> str | None:
    """The name of this machine's loopback interface (lo on Linux, lo0 on macOS)."""
    names = {name for _, name in socket.if_nameindex()}
    return next((name for name in ("lo", "lo0") if name in names), None)


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def _bind_loopback() -> int:
    """In rank 0: a socket bound to 127.0.0.1 on a free port, kept for the store."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen()
    _listener[:] = [listener]
    return listener.getsockname()[1]


def _join_on_loopback(backend: str, world_rank: int, world: int, port: int,
                      timeout_s: int) -> None:
    """Every rank: the process group over a store on 127.0.0.1, its sockets on loopback."""
    interface = loopback_interface()
    if interface:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    os.environ.update(MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port))
    timeout = timedelta(seconds=timeout_s)
    fd = _listener[0].fileno() if world_rank == 0 else None
    store = dist.TCPStore(LOOPBACK, port, world, is_master=world_rank == 0, master_listen_fd=fd,
                          timeout=timeout, wait_for_workers=False)
    if world_rank == 0:
        _listener.pop().detach()  # the store owns the descriptor now
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world,
                            timeout=timeout)


class LoopbackTorchBackend(_TorchBackend):
    """Ray Train's torch backend, with the rendezvous on loopback when the ranks share a node."""

    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        if len(set(worker_group.execute(_node_id))) > 1 or not dist.is_available():
            return super().on_start(worker_group, backend_config)
        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")
        port = worker_group.execute_single(0, _bind_loopback)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(
            rank, _join_on_loopback, backend=backend, world_rank=rank, world=len(worker_group),
            port=port, timeout_s=backend_config.timeout_s) for rank in range(len(worker_group))])


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose backend keeps a one-node run's rendezvous on loopback."""

    @property
    def backend_cls(self):
        return LoopbackTorchBackend
