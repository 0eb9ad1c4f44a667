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

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import multinode
from tiny import PAIR_COLUMNS, write_bundle, write_pairs

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.multinode]

REPO = Path(__file__).resolve().parents[2]

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


def test_a_label_job_started_before_any_worker_node_joined_waits_for_one(tmp_path):
    """A fixed cluster (its autoscaler may start no node) whose head runs no tasks, the workers not yet
    joined: a job started then waits for them instead of refusing for want of CPUs, and labels once one
    has joined. The same wait covers an autoscaler that has not yet published its node types."""
    pairs, bundle, output = tmp_path / "pairs", tmp_path / "bundle", tmp_path / "labels"
    write_pairs(str(pairs))
    write_bundle(str(bundle))
    command = [sys.executable, str(REPO / "jobs" / "label.py"), f"data.input={pairs}", *PAIR_COLUMNS,
               f"bundle={bundle}", f"output={output}", "storage.shared_filesystem=true", "ray.progress_bars=false"]
    log_path = tmp_path / "label.log"
    with multinode.start(multinode.ClusterShape(max_workers=0)) as fixed, log_path.open("w") as log:
        job = subprocess.Popen(command, cwd=REPO, env={**fixed.env, "RAY_ADDRESS": fixed.address},
                               stdout=log, stderr=subprocess.STDOUT)
        try:
            multinode.wait_until(lambda: "waiting for worker nodes" in log_path.read_text() or job.poll() is not None,
                                 120, "the job's line about waiting")
            assert job.poll() is None, log_path.read_text()[-3000:]
            fixed.add_node(cpus=2)
            assert job.wait(timeout=300) == 0, log_path.read_text()[-3000:]
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    labeled = pa.concat_tables([pq.read_table(f) for f in sorted(output.rglob("*.parquet"))])
    assert sorted(labeled["key"].to_pylist()) == sorted(f"{i}-{j}" for i in range(2) for j in range(4))
    assert set(labeled["status"].to_pylist()) == {"ok"}
