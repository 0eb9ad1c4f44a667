"""An autoscaling multi-node Ray cluster on this one machine, shaped like cluster.yaml.

Ray's `fake_multinode` autoscaler provider starts each worker "node" as a raylet process tree of its
own (own node id, own resources, same files) from the autoscaler process on the head, when demand
asks for one, and stops it after `idle_timeout_minutes`. `ray.cluster_utils.AutoscalingCluster` does
the same for Ray's own tests, but it runs `ray stop --force` (every Ray on the machine) and reads an
example.yaml that the Ray 2.60 wheel does not ship, so the cluster is started here by hand.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from conftest import _stop_cluster, free_port, wait_for_port
from waiting import wait_until  # also used as multinode.wait_until

WORKER_NODE_TYPE = "raypipe.cpu"


def _descendants(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@dataclass(frozen=True)
class ClusterShape:
    """cluster.yaml in miniature: a head that runs no tasks and one worker type, from zero workers."""

    worker_resources: dict = field(default_factory=lambda: {"CPU": 1})
    min_workers: int = 0
    max_workers: int = 3
    idle_timeout_minutes: float = 0.5


def autoscaling_config(shape: ClusterShape, gcs_address: str) -> dict:
    """The cluster-launcher config for the fake provider; the launcher's schema requires the empty
    command lists and `auth`."""
    return {
        "cluster_name": "raypipe-multinode-test",
        "max_workers": shape.max_workers,
        "idle_timeout_minutes": shape.idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # Without it the worker raylets dial <ip>:6379 and never join.
            "gcs_address": gcs_address,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_NODE_TYPE: {"resources": shape.worker_resources, "node_config": {},
                               "min_workers": shape.min_workers, "max_workers": shape.max_workers},
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@dataclass(frozen=True)
class MultiNodeCluster:
    address: str  # GCS address, for ray.init
    dashboard: str  # job server and State API, for `ray job submit --address`
    env: dict  # environment of the cluster's processes (PATH with this venv first, RAY_AUTH_MODE)
    temp_dir: str  # every process of this cluster has it on its command line

    def _node_states(self) -> list:
        from ray.util.state import list_nodes

        return list_nodes(address=self.dashboard, limit=1000)

    def nodes(self) -> dict[str, dict]:
        """Alive nodes: node id -> total resources."""
        return {n.node_id: n.resources_total for n in self._node_states() if n.state == "ALIVE"}

    def head_node_id(self) -> str:
        return next(n.node_id for n in self._node_states() if n.is_head_node)

    def worker_node_ids(self) -> set[str]:
        return {n.node_id for n in self._node_states() if n.state == "ALIVE" and not n.is_head_node}

    def node_state(self, node_id: str) -> str | None:
        """ALIVE, DEAD, or None for a node the cluster never had."""
        return next((n.state for n in self._node_states() if n.node_id == node_id), None)

    def _processes(self) -> list[psutil.Process]:
        """The processes that name this cluster's temp dir: GCS, dashboard, autoscaler, raylets, log
        monitors. Workers and agents rename themselves (ray::IDLE, ray::DashboardAgent) and are
        found as descendants of the raylets."""
        return [p for p in psutil.process_iter(["cmdline"]) if self.temp_dir in " ".join(p.info["cmdline"] or [])]

    def kill_node(self, node_id: str) -> None:
        """Kills a worker node as a machine failure would: its raylet and everything the raylet started
        (workers, agents) at once, with SIGKILL. Ray learns it as it would of a lost machine: from the
        GCS's failing health checks (about 15 s)."""
        if node_id not in self.worker_node_ids():
            raise ValueError(f"{node_id} is not an alive worker node of this cluster")
        raylets = [p for p in self._processes()
                   if p.info["cmdline"][0].endswith("/raylet") and f"--node_id={node_id}" in p.info["cmdline"]]
        if len(raylets) != 1:
            raise RuntimeError(f"expected one raylet for node {node_id}, found {len(raylets)}")
        for p in [raylets[0], *_descendants(raylets[0])]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()

    def stop(self) -> None:
        """Stops this cluster's processes and their descendants: the agents of a stopped raylet would
        otherwise linger for a minute or more, holding their ports."""
        descendants = [c for p in self._processes() for c in _descendants(p)]
        _stop_cluster(self.temp_dir)
        for p in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(descendants, timeout=15)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()

    def __enter__(self) -> MultiNodeCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(shape: ClusterShape = ClusterShape(), timeout_s: float = 120) -> MultiNodeCluster:
    """`ray start --head` with CPU 0, a dashboard and the fake autoscaler, with the environment of
    this process (so AWS_* and RAY_AUTH_MODE=token set before the call reach every node). Each
    cluster has its own temp dir (short: socket paths must stay under 107 characters) and free
    ports, so it runs beside other test clusters and is stopped without touching them."""
    import ray

    bin_dir = Path(sys.executable).parent
    temp_dir = tempfile.mkdtemp(prefix="rp-mn-", dir="/tmp")
    port, dashboard_port, agent_port, client_port = free_port(), free_port(), free_port(), free_port()
    gcs_address = f"{ray.util.get_node_ip_address()}:{port}"
    config_path = Path(temp_dir) / "autoscaling.yaml"
    config_path.write_text(yaml.safe_dump(autoscaling_config(shape, gcs_address)))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    cluster = MultiNodeCluster(gcs_address, f"http://127.0.0.1:{dashboard_port}", env, temp_dir)
    try:
        # Fixed default ports (agent 52365, Ray client 10001) would collide with other clusters here.
        subprocess.run(
            [str(bin_dir / "ray"), "start", "--head", f"--port={port}", "--num-cpus=0", f"--temp-dir={temp_dir}",
             f"--autoscaling-config={config_path}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={agent_port}",
             f"--ray-client-server-port={client_port}", "--disable-usage-stats"],
            env=env, check=True, stdout=subprocess.DEVNULL, timeout=timeout_s,
        )
        wait_for_port(dashboard_port, timeout_s)
        wait_for_port(agent_port, timeout_s)  # the job server hands jobs to the head's agent
        wait_until(cluster.nodes, timeout_s, "the head node registered")
    except BaseException:
        cluster.stop()
        raise
    return cluster
