"""The three jobs a user runs, as a user runs them (the scripts, a fresh local Ray cluster of 2 CPUs,
default resource settings), against S3 with planted secret keys, one in the environment and one in the
config's secret fields (train and label): every job finishes, and neither secret is anywhere in what
they print or write, in Ray's session logs, or in the home directory they ran in."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import boto3
import pytest
import yaml

from raypipe.datasets.sample import SampleSpec, write_sample

pytestmark = [pytest.mark.integration, pytest.mark.slow]

JOBS = Path(__file__).parents[2] / "jobs"


def files_holding(root: Path, secret: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink() and secret in p.read_bytes()]


def test_jobs_finish_on_2_cpus_and_leave_no_secret_anywhere(s3_endpoint, bucket, tmp_path):
    secret = f"planted-secret-{uuid.uuid4().hex}"
    config_secret = f"planted-config-secret-{uuid.uuid4().hex}"
    secrets_config = tmp_path / "secrets.yaml"  # the way docs/configuration.md says to give the secret fields
    secrets_config.write_text(yaml.safe_dump({"storage": {"access_key_id": "testing-key-id",
                                                          "secret_access_key": config_secret}}))
    write_sample(str(tmp_path / "sample"), SampleSpec(num_pairs=160, shard_size=80, image_size=(64, 64)),
                 formats=("parquet",))
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for shard in sorted((tmp_path / "sample" / "parquet").iterdir()):
        s3.upload_file(str(shard), bucket, f"pairs/{shard.name}")

    # A short RAY_TMPDIR: Ray's socket paths must stay under the 107-character limit.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rp-secret-", dir="/tmp"))
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": secret, "RAY_TMPDIR": str(ray_tmp), "HOME": str(home)}
    env.pop("RAY_ADDRESS", None)  # each job starts its own local cluster
    cluster = ["ray.num_cpus=2", "ray.progress_bars=false"]
    jobs = {
        "prepare": [f"data.input=s3://{bucket}/pairs", f"output=s3://{bucket}/prepared"],
        "train": ["--config", str(secrets_config), f"prepared=s3://{bucket}/prepared",
                  f"run.storage_path=s3://{bucket}/runs", "run.name=secret", "optim.epochs=1",
                  "model.conv_channels=[8]", "model.embed_dim=8", "model.lstm_hidden=8", "model.fc_dims=[16]"],
        "label": ["--config", str(secrets_config), f"bundle=s3://{bucket}/runs/secret/bundle",
                  f"data.input=s3://{bucket}/pairs", f"output=s3://{bucket}/labels"],
    }
    runs = {}
    try:
        for job, args in jobs.items():
            done = subprocess.run([sys.executable, str(JOBS / f"{job}.py"), *args, *cluster], env=env,
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{job}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            runs[job] = done
        summary = [line for line in runs["label"].stdout.splitlines() if line.startswith("{")][-1]
        assert json.loads(summary)["rows_in"] == 160  # every pair, failed downloads included, accounted for

        metrics = json.loads(s3.get_object(Bucket=bucket, Key="runs/secret/bundle/metrics.json")["Body"].read())
        assert metrics["config"]["storage"]["secret_access_key"] == "**********"  # train had it, and masked it

        objects = s3.list_objects_v2(Bucket=bucket)["Contents"]
        assert {o["Key"].split("/")[0] for o in objects} == {"pairs", "prepared", "runs", "labels"}
        assert any(o["Key"].endswith("stats.json") for o in objects)
        assert any(o["Key"].endswith("bundle/model.pt") for o in objects)
        assert list(ray_tmp.glob("ray/session_*/logs/*"))  # Ray's logs are where they are searched
        written = {o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in objects}
        for planted in (secret, config_secret):
            assert not [job for job, done in runs.items() if planted in done.stdout + done.stderr]
            assert not [key for key, data in written.items() if planted.encode() in data]
            assert not files_holding(ray_tmp, planted.encode())
            assert not files_holding(home, planted.encode())
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
