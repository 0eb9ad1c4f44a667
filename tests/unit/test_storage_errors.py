"""Object-store faults at the level the jobs meet them, before Ray starts: the planning functions and
the job scripts, against real moto S3 servers (a TCP proxy in front of one plays the outage).

No Ray cluster is started here: every case fails, or finishes planning, before a job would start one
(the job scripts run with RAY_ADDRESS pointing at a closed port, so a job that went further would fail
rather than start a cluster)."""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import pytest
from conftest import free_port, wait_for_port
from flaky_proxy import FlakyProxy
from jobscript import assert_one_clear_line, run_script
from tiny import PAIR_COLUMNS, write_bundle, write_pairs

from raypipe.bundle import BundleError
from raypipe.cli import run_job
from raypipe.config import IngestConfig, LabelJobConfig, PrepareConfig, StorageConfig, load_config
from raypipe.ingest import run_ingest
from raypipe.io import fs as rfs
from raypipe.io.fs import StorageError
from raypipe.pipeline.label import plan_label
from raypipe.pipeline.prepare import plan_prepare

ERROR_WITHIN_S = 30  # "a clear error within seconds"; measured: 7.8 s for a closed port, < 1 s otherwise


@pytest.fixture(scope="module")
def store(s3_endpoint) -> str:
    """A bucket holding two Parquet files of pairs (``/pairs``) and a tiny model bundle (``/bundle``)."""
    bucket = f"rp-faults-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    write_pairs(f"s3://{bucket}/pairs")
    write_bundle(f"s3://{bucket}/bundle")
    return bucket


def prepare_args(bucket: str, *more: str) -> list[str]:
    return [f"data.input=s3://{bucket}/pairs", *PAIR_COLUMNS, "text.lemmatize=false", f"output=s3://{bucket}/out", *more]


def label_args(bucket: str, *more: str) -> list[str]:
    return [f"data.input=s3://{bucket}/pairs", *PAIR_COLUMNS, f"bundle=s3://{bucket}/bundle",
            f"output=s3://{bucket}/labels", *more]


def plan_prepare_job(args: list[str]):
    return plan_prepare(load_config(PrepareConfig, None, args))


def plan_label_job(args: list[str]):
    return plan_label(load_config(LabelJobConfig, None, args))


PLANS = {"prepare": (prepare_args, plan_prepare_job), "label": (label_args, plan_label_job)}


@pytest.fixture
def proxy(s3_endpoint):
    proxy = FlakyProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    yield proxy
    proxy.close()


@pytest.mark.parametrize("job", PLANS)
def test_a_few_seconds_of_outage_are_ridden_out(job, store, proxy):
    args, plan = PLANS[job]
    proxy.outage(3.0)
    started = time.monotonic()
    planned = plan(args(store, f"storage.endpoint_url={proxy.url}"))
    assert len(planned.inputs.files) == 2  # read everything it needs once the store is back
    assert proxy.dropped >= 2  # retried while the store was down (4 attempts here, over 3.8 s)
    assert time.monotonic() - started < ERROR_WITHIN_S


@pytest.mark.parametrize("job", PLANS)
def test_a_store_that_is_down_for_good_fails_within_seconds_naming_the_url(job, store):
    args, plan = PLANS[job]
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"s3://{store}/.*{re.escape(endpoint)} does not answer") as e:
        plan(args(store, f"storage.endpoint_url={endpoint}"))
    assert time.monotonic() - started < ERROR_WITHIN_S
    message = str(e.value)
    assert "6 attempt(s)" in message  # storage.retries=5 retries


def test_a_store_that_accepts_but_never_answers_fails_too():
    """A hung server (the connection opens, no answer comes): each attempt ends after connect_timeout_s."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept_and_say_nothing():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_and_say_nothing, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    storage = StorageConfig(endpoint_url=endpoint, connect_timeout_s=1, retries=1)
    started = time.monotonic()
    with pytest.raises(StorageError, match="does not answer.*timed out"):
        rfs.list_files("s3://any-bucket/pairs", storage, (".parquet",))
    assert time.monotonic() - started < ERROR_WITHIN_S
    server.shutdown(socket.SHUT_RDWR)
    server.close()


def test_a_missing_bucket_is_named(store):
    with pytest.raises(StorageError, match="there is no bucket 'no-such-bucket'"):
        plan_prepare_job([*prepare_args(store), "data.input=s3://no-such-bucket/pairs"])
    with pytest.raises(StorageError, match="s3://no-such-bucket/out: there is no bucket 'no-such-bucket'"):
        rfs.resolve_output("s3://no-such-bucket/out", StorageConfig())
    with pytest.raises(BundleError, match="there is no bucket 'no-such-bucket'"):
        plan_label_job([*label_args(store), "bundle=s3://no-such-bucket/bundle"])
    with pytest.raises(StorageError, match="s3://no-such-bucket/labels: there is no bucket"):
        plan_label_job([*label_args(store), "output=s3://no-such-bucket/labels"])


def test_ingest_names_a_missing_output_bucket_before_it_fetches_anything(s3_endpoint, tmp_path):
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("image,text,label\nhttp://127.0.0.1:9/never-fetched.jpg,a red car,car\n")
    cfg = load_config(IngestConfig, None, [f"manifest=[{manifest}]", "output=s3://no-such-bucket/shards"])
    with pytest.raises(StorageError, match="s3://no-such-bucket/shards: there is no bucket 'no-such-bucket'"):
        run_ingest(cfg)


@pytest.fixture(scope="module")
def checked_store(tmp_path_factory):
    """A moto server that checks credentials (its IAM knows one user), with a bucket of pairs. The
    session's server accepts any credentials."""
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"},  # the three IAM calls below
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="raypipe")
        key = iam.create_access_key(UserName="raypipe")["AccessKey"]
        iam.put_user_policy(UserName="raypipe", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                     aws_secret_access_key=key["SecretAccessKey"]).create_bucket(Bucket="checked")
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_wrong_credentials_are_refused_at_once(checked_store, monkeypatch):
    endpoint, key_id, secret = checked_store
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    storage = StorageConfig(endpoint_url=endpoint)
    rfs.write_text(rfs.resolve("s3://checked/pairs/readme.txt", storage), "the right key works")
    for name, value in (("AWS_SECRET_ACCESS_KEY", "not-the-secret"), ("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY")):
        monkeypatch.setenv(name, value)
        started = time.monotonic()
        with pytest.raises(StorageError, match="cannot access s3://checked/pairs: access denied") as e:
            plan_prepare_job([*prepare_args("checked"), f"storage.endpoint_url={endpoint}"])
        assert time.monotonic() - started < ERROR_WITHIN_S
        assert "credentials" in str(e.value)
        assert value not in str(e.value)


@pytest.mark.parametrize("retries", [0, 2])
def test_a_filesystem_sent_to_ray_workers_keeps_its_retries(retries, store, proxy):
    """Ray pickles the filesystem into its workers (read tasks, training workers writing checkpoints);
    pyarrow's own pickling drops the retry strategy (3 attempts whatever was configured)."""
    loc = rfs.resolve(f"s3://{store}/bundle/config.json", StorageConfig(endpoint_url=proxy.url, retries=retries))
    in_worker = pickle.loads(pickle.dumps(loc.fs))
    proxy.outage(600)
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        in_worker.get_file_info(loc.path)
    assert proxy.dropped == retries + 1


def test_job_scripts_end_with_one_line_naming_the_url(store, checked_store):
    closed = f"http://127.0.0.1:{free_port()}"
    cases = [
        ("prepare", prepare_args(store, f"storage.endpoint_url={closed}"), {}, (f"s3://{store}/", closed)),
        ("label", label_args(store, "bundle=s3://no-such-bucket/bundle"), {}, ("s3://no-such-bucket/bundle",
                                                                                "there is no bucket")),
        ("train", [f"prepared=s3://{store}/prepared", "run.storage_path=s3://no-such-bucket/runs"], {},
         ("s3://no-such-bucket/runs", "there is no bucket")),
        ("prepare", prepare_args("checked", f"storage.endpoint_url={checked_store[0]}"),
         {"AWS_ACCESS_KEY_ID": checked_store[1], "AWS_SECRET_ACCESS_KEY": "not-the-secret"},
         ("s3://checked/pairs", "access denied")),  # the inputs are checked before the output is touched
    ]
    for job, args, env, expected in cases:
        done, seconds = run_script(job, *args, env=env)
        assert_one_clear_line(done, *expected)
        assert seconds < ERROR_WITHIN_S + 30  # + starting Python with torch and Ray imported


def test_an_error_raised_inside_a_ray_task_is_shown_without_the_remote_stack_trace(capsys):
    from ray.exceptions import RayTaskError

    remote = StorageError("cannot access s3://bucket/x: the object store at http://127.0.0.1:1 does not answer")
    wrapped = RayTaskError("write_label_batch", "Traceback (most recent call last):\n  ...", remote)

    def main():
        raise wrapped.as_instanceof_cause()

    with pytest.raises(SystemExit, match="^2$"):  # the exit status of a UserError
        run_job(main)
    assert capsys.readouterr().err == f"error: {remote}\n"
    with pytest.raises(ZeroDivisionError, match="division by zero"):  # an unexpected error keeps its stack trace
        run_job(lambda: 1 / 0)
