"""Session-wide real parts: one moto S3 server on 127.0.0.1 and one local Ray cluster."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/imagekinds.py and friends

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # never probe for an instance profile
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations checks online otherwise
# Token authentication stays on (Ray's default), on a fresh machine too: the mode is set and a token
# created (in this HOME, as a newcomer's first run would) before anything imports Ray or starts a cluster.
from raypipe.pipeline.cluster import ensure_auth_token  # noqa: E402

ensure_auth_token()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout_s} s")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server; the AWS_* variables point every client (and Ray worker) at it."""
    port = free_port()
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="testing-key-id",
            AWS_SECRET_ACCESS_KEY="testing-secret-key",
            AWS_DEFAULT_REGION="us-east-1",
        )
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def bucket(s3_endpoint) -> str:
    import boto3

    name = f"rp-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@dataclass(frozen=True)
class RayCluster:
    address: str  # GCS address, for ray.init
    dashboard: str  # job server, for `ray job submit --address`
    env: dict  # environment of the cluster's processes (PATH with this venv first)


def _stop_cluster(temp_dir: str) -> None:
    """Stops only the processes of this cluster (`ray stop` would stop every Ray on the machine)."""
    import psutil

    procs = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One `ray start --head` cluster for the session, with a job server, started after the S3
    variables are set so its workers inherit them. 4 logical CPUs on 2 cores: read tasks, actors and
    trainers can never starve each other."""
    import ray

    bin_dir = Path(sys.executable).parent
    temp_dir = tempfile.mkdtemp(prefix="rp-ray-", dir="/tmp")
    port, dashboard_port, agent_port, client_port = free_port(), free_port(), free_port(), free_port()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0"}
    # Fixed default ports (job agent 52365, Ray client 10001) would collide with any other Ray cluster on the
    # machine: the agent then cannot bind, and no job can be submitted.
    subprocess.run(
        [str(bin_dir / "ray"), "start", "--head", f"--port={port}", "--num-cpus=4", f"--temp-dir={temp_dir}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         f"--dashboard-agent-listen-port={agent_port}", f"--ray-client-server-port={client_port}",
         "--disable-usage-stats"],
        env=env, check=True, stdout=subprocess.DEVNULL,
    )
    try:
        # The GCS listens on the node's IP, and Ray rewrites 127.0.0.1 to it anyway.
        address = f"{ray.util.get_node_ip_address()}:{port}"
        ray.init(address=address)
        wait_for_port(dashboard_port)
        yield RayCluster(address, f"http://127.0.0.1:{dashboard_port}", env)
    finally:
        ray.shutdown()
        _stop_cluster(temp_dir)
