"""Ray itself: the cluster a job runs on (an embedded local Ray on loopback, or the one in
RAY_ADDRESS as under ``ray job submit``), what it offers a run, and storage every node sees."""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from resnet.config import TrainConfig
from resnet.errors import UsageError
from resnet.infra import storage


def connect_ray() -> bool:
    """Join the cluster in RAY_ADDRESS (as under ``ray job submit``), else start an embedded
    local Ray on loopback. Returns True when the Ray is embedded."""
    if ray.is_initialized():
        return not os.environ.get("RAY_ADDRESS")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # A cluster on loopback (its head on this machine): this driver must use loopback too,
        # or Ray picks the machine's interface address and cannot reach the GCS from there.
        host = address.split("://")[-1].rsplit(":", 1)[0]
        local = host in ("127.0.0.1", "localhost")
        ray.init(**({"_node_ip_address": "127.0.0.1"} if local else {}))
        return False
    # Every process of this Ray (raylet, workers, the Train and Tune processes they start)
    # inherits the environment the driver has while Ray starts: pin this cluster's address there
    # (its GCS on a port chosen now), so that anything resolving "the" local cluster, such as the
    # state API that Ray Train's PlacementGroupCleaner asks whether a run's controller is alive,
    # finds this one even when another Ray runs on the machine (it would otherwise take the
    # latest `ray start`'s and clean up the placement groups of live runs). The driver's own
    # environment is restored afterwards: jobs it starts get an embedded Ray of their own.
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    port = free_port()
    os.environ.update(RAY_ADDRESS=f"127.0.0.1:{port}", RAY_GCS_SERVER_PORT=str(port))
    try:
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return True


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ray_cluster(embedded: bool) -> dict[str, Any]:
    """Which Ray a run used, for its summary: an embedded one or a cluster (its GCS address)."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    return {"embedded": embedded, "gcs_address": ray.get_runtime_context().gcs_address,
            "nodes": len(nodes), "node_ips": sorted({n["NodeManagerAddress"] for n in nodes})}


@ray.remote(num_cpus=0)
def _sees(path: str) -> bool:
    return storage.read_bytes(path) is not None


def check_shared_storage(root: str) -> None:
    """Every node must reach --storage: write a marker from here, read it on each alive node.

    A local path works on one machine only; across nodes it takes s3://, gs:// or an NFS mount.
    """
    marker = storage.join(root, f".storage-check-{uuid.uuid4().hex}")
    try:
        storage.write_bytes(marker, b"ok")
    except OSError as exc:
        raise UsageError(f"--storage {root} is not writable from the driver ({exc}); pick "
                         "another --storage") from None
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        seen = ray.get([_sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(marker) for n in nodes])
    finally:
        storage.delete(marker)
    blind = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise UsageError(f"--storage {root} is not visible from node(s) {', '.join(blind)}; "
                         "on a cluster of several nodes use shared storage: s3://BUCKET/PATH, "
                         "gs://BUCKET/PATH or a path on an NFS mount every node has")


def resolve_hardware(config: TrainConfig, embedded: bool, total: dict | None = None,
                     node_cpus: float | None = None) -> TrainConfig:
    """Fill in GPU use and CPUs per worker from the cluster (``total``: Ray's
    ``cluster_resources()``; ``node_cpus``: the CPUs of its largest node); refuse what the
    local Ray can't fit."""
    total = ray.cluster_resources() if total is None else total
    if node_cpus is None:
        node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]),
                        default=1)
    use_gpu = config.use_gpu if config.use_gpu is not None else total.get("GPU", 0) > 0
    cpus = config.cpus_per_worker or max(1, int(node_cpus) // config.num_workers)
    if embedded:  # a real cluster may autoscale; the local one will not
        needed = config.num_workers * config.gpus_per_worker
        if use_gpu and total.get("GPU", 0) < needed:
            raise UsageError(f"--gpu with {config.num_workers} worker(s) x "
                             f"{config.gpus_per_worker:g} GPU needs {needed:g} GPUs; this machine "
                             f"has {int(total.get('GPU', 0))} (use --cpu or fewer workers)")
        if cpus * config.num_workers > total.get("CPU", 0):
            raise UsageError(f"{config.num_workers} worker(s) x {cpus} CPU(s) do not fit the "
                             f"{int(total.get('CPU', 0))} CPUs of this machine; lower "
                             "--num-workers or --cpus-per-worker")
    return config.replace(use_gpu=use_gpu, cpus_per_worker=cpus)
