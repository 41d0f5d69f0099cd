"""A real multi-node Ray cluster on this machine, for tests/test_multinode.py: a head node (no
CPUs for training, the dashboard for ``ray job submit``) and worker nodes with 2 CPUs each, each a
raylet of its own on 127.0.0.1 (``ray.cluster_utils.Cluster``, Ray's own test utility).

Run as ``python tests/multinode_cluster.py INFO_FILE WORKERS``: it writes the head's addresses
and every worker node's id and raylet pid to INFO_FILE, then waits; SIGTERM stops the cluster.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from ray.cluster_utils import Cluster  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(info_file: str, workers: int) -> None:
    # Free ports, not Ray's defaults: another Ray on this machine may hold those (its dashboard
    # agent on 52365 would leave this head without a job agent).
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
        "dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port(),
        "runtime_env_agent_port": free_port()})
    nodes = [cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1") for _ in range(workers)]
    cluster.wait_for_nodes()
    info = {"gcs_address": cluster.gcs_address, "head_node_id": cluster.head_node.node_id,
            "dashboard_url": f"http://{cluster.head_node.webui_url}",
            "nodes": [{"node_id": node.node_id,
                       "raylet_pid": node.all_processes["raylet"][0].process.pid}
                      for node in nodes]}
    with open(info_file + ".tmp", "w") as f:
        json.dump(info, f)
    os.replace(info_file + ".tmp", info_file)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    while not stop:
        time.sleep(0.2)
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
