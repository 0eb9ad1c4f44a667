"""Session-wide real parts: one moto S3 server on 127.0.0.1 and one local Ray cluster."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/imagekinds.py and friends

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # never probe for an instance profile
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations checks online otherwise


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


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One local Ray cluster for the session, started after the S3 variables are set so workers
    inherit them. 4 logical CPUs on 2 cores: read tasks and map tasks can never starve each other."""
    import ray

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rp-ray-", dir="/tmp"))
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()
