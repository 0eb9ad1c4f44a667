"""An autoscaling multi-node cluster on this machine (tests/multinode.py): worker nodes start from zero
when tasks need CPUs, jobs submitted with `ray job submit` run on them, and a killed node is dead to Ray.

Drivers run as subprocesses, so this pytest process keeps its own Ray connection (if any) untouched."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import multinode

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.multinode]

# Two 1-CPU tasks that only finish together: on 1-CPU nodes they need two nodes running at once. The
# barrier is a directory (the fake nodes share this machine's files), not an actor: a task blocked in
# ray.get gives its CPU back, and Ray then runs the other task on the same node.
TWO_TASKS_THAT_MEET = """
import json, os, sys, time, uuid, ray
ray.init()

@ray.remote(num_cpus=1)
def meet(barrier_dir):
    open(os.path.join(barrier_dir, uuid.uuid4().hex), "w").close()
    deadline = time.monotonic() + 150
    while len(os.listdir(barrier_dir)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return ray.get_runtime_context().get_node_id()

start = time.monotonic()
node_ids = ray.get([meet.remote(sys.argv[1]) for _ in range(2)], timeout=180)
print(json.dumps({"node_ids": node_ids, "seconds": time.monotonic() - start}))
"""

ONE_TASK = """
import json, ray
ray.init()
node_id = ray.get(ray.remote(num_cpus=1)(lambda: ray.get_runtime_context().get_node_id()).remote(), timeout=150)
print(json.dumps({"node_id": node_id}))
"""


def last_json_line(output: str) -> dict:
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])


def run_driver(cluster: multinode.MultiNodeCluster, script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", script, *args], env={**cluster.env, "RAY_ADDRESS": cluster.address},
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return last_json_line(done.stdout)


@pytest.fixture(scope="module")
def cluster():
    with multinode.start(multinode.ClusterShape()) as started:
        yield started


def test_the_autoscaler_starts_worker_nodes_from_zero_for_tasks_and_places_them_on_different_nodes(cluster, tmp_path):
    head = cluster.head_node_id()
    assert cluster.worker_node_ids() == set()
    assert cluster.nodes()[head].get("CPU", 0) == 0

    met = run_driver(cluster, TWO_TASKS_THAT_MEET, str(tmp_path))

    print(f"the autoscaler brought 2 worker nodes up for the waiting tasks in {met['seconds']:.1f} s")
    assert len(set(met["node_ids"])) == 2 and head not in met["node_ids"], met
    assert all(cluster.nodes()[node]["CPU"] == 1 for node in met["node_ids"])


def test_a_job_submitted_with_ray_job_submit_runs_on_worker_nodes(cluster):
    with pytest.raises(urllib.error.HTTPError, match="401"):  # token authentication is on
        urllib.request.urlopen(f"{cluster.dashboard}/api/jobs/", timeout=30)

    ray_bin = str(Path(sys.executable).with_name("ray"))
    done = subprocess.run(
        [ray_bin, "job", "submit", "--address", cluster.dashboard, "--entrypoint-num-cpus", "0", "--",
         "python", "-c", ONE_TASK],
        env=cluster.env, capture_output=True, text=True, timeout=300,
    )

    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    node_id = last_json_line(done.stdout)["node_id"]
    assert node_id != cluster.head_node_id() and cluster.node_state(node_id) is not None


def test_killing_a_worker_node_is_seen_as_a_dead_node(cluster):
    node_id = run_driver(cluster, ONE_TASK)["node_id"]
    assert node_id in cluster.worker_node_ids()

    killed_at = time.monotonic()
    cluster.kill_node(node_id)

    multinode.wait_until(lambda: cluster.node_state(node_id) == "DEAD", 120, f"node {node_id} marked dead")
    print(f"Ray marked the killed node dead after {time.monotonic() - killed_at:.1f} s")
    assert node_id not in cluster.worker_node_ids()
