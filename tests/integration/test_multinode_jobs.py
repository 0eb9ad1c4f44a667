"""The three jobs submitted with `ray job submit` (token auth on) to an autoscaling multi-node cluster
shaped like cluster.yaml (tests/multinode.py: a head of CPU 0, 1-CPU workers, 0 to 3 of them, none up
at the start): prepare -> train on 2 workers on 2 different nodes -> label, every path on S3 (the moto
server); then a worker node killed in the middle of training (Ray Train restarts from the last
checkpoint and ends with the epochs of an uninterrupted run) and in the middle of labeling (a re-run
of the same command leaves every input row labeled exactly once).

The jobs' drivers run on the head (`--entrypoint-num-cpus 0`); this pytest process only submits,
polls (job status, the State API, S3 listings) and reads the outputs."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import multinode
import pyarrow.parquet as pq
import pytest
import tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.multinode]

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
AGENT_NOT_READY = "No available agent to submit job"
TINY_MODEL = ["model.conv_channels=[8]", "model.embed_dim=8", "model.lstm_hidden=8", "model.fc_dims=[16]"]
QUIET = ["ray.progress_bars=false"]
TRAIN_PAIRS = 240  # 3 shards: prepare, train, the first label run
LABEL_SHARDS, LABEL_SHARD_SIZE = 8, 150  # the input of the labeling run a node is killed in


# --- helpers -------------------------------------------------------------------------------------


class S3:
    def __init__(self, endpoint: str, bucket: str):
        import boto3

        self.client = boto3.client("s3", endpoint_url=endpoint)
        self.bucket = bucket

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def json(self, key: str) -> dict:
        return json.loads(self.read(key))


class Job:
    """A job submitted with `ray job submit --no-wait`, followed through the job server."""

    def __init__(self, cluster: multinode.MultiNodeCluster, name: str, *entrypoint: str):
        from ray.job_submission import JobSubmissionClient

        self.cluster, self.id = cluster, f"{name}-{uuid.uuid4().hex[:8]}"
        self.entrypoint = entrypoint
        self.started = time.monotonic()
        # The job agent of a fresh head starts after `ray start` returns, and the job server waits only
        # 10 s per request for it: submit again while it says so.
        done = multinode.wait_until(self._submit, 180, f"job {self.id} accepted by the job server")
        assert done.returncode == 0, f"ray job submit failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        self.client = JobSubmissionClient(cluster.dashboard)

    def _submit(self) -> subprocess.CompletedProcess | None:
        # The repository in place (`local://`, a directory every node has), not `--working-dir` uploaded: each
        # node's runtime-env agent unpacks an uploaded working_dir afresh into the session directory, which
        # the fake nodes share, so a node starting mid-job deletes the directory the other nodes' workers run
        # in (measured: predictor actors failing in os.getcwd). On a real cluster each node has its own disk;
        # tests/integration/test_job_submit.py submits with --working-dir to a one-node cluster.
        done = subprocess.run(
            [RAY, "job", "submit", "--address", self.cluster.dashboard, "--submission-id", self.id, "--no-wait",
             "--entrypoint-num-cpus", "0", "--runtime-env-json", json.dumps({"working_dir": f"local://{REPO}"}),
             "--", *self.entrypoint],
            cwd=REPO, env=self.cluster.env, capture_output=True, text=True, timeout=180, check=False,
        )
        return None if AGENT_NOT_READY in done.stdout + done.stderr else done

    def status(self) -> str:
        return str(self.client.get_job_status(self.id).value)

    def running(self) -> bool:
        return self.status() in ("PENDING", "RUNNING")

    def logs(self) -> str:
        return self.client.get_job_logs(self.id)

    def start_time_ms(self) -> int:
        return self.client.get_job_info(self.id).start_time

    def wait(self, timeout_s: float) -> str:
        """Waits for the job to end; returns its final status (SUCCEEDED, FAILED, STOPPED)."""
        status = multinode.wait_until(lambda: not self.running() and self.status(), timeout_s, f"job {self.id} ended")
        self.seconds = time.monotonic() - self.started
        return status

    def succeeded(self, timeout_s: float) -> str:
        status = self.wait(timeout_s)
        logs = self.logs()
        assert status == "SUCCEEDED", f"job {self.id} {status}: {' '.join(self.entrypoint)}\n{logs[-6000:]}"
        return logs


def node_waits(logs: str) -> list[str]:
    """The jobs' own lines about waiting for the autoscaler's nodes."""
    return [line.strip() for line in logs.splitlines() if re.search(r"waiting for|resources ready after", line)]


def worker_start_times_ms(cluster: multinode.MultiNodeCluster) -> list[int]:
    """When each worker node the cluster has had (alive or dead) started: the autoscaler started them all."""
    from ray.util.state import list_nodes

    return sorted(n.start_time_ms for n in list_nodes(address=cluster.dashboard, limit=1000, detail=True)
                  if not n.is_head_node)


def alive_actor_nodes(cluster: multinode.MultiNodeCluster, class_part: str) -> set[str]:
    """Worker nodes running an alive actor whose class name contains `class_part`."""
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.dashboard, filters=[("state", "=", "ALIVE")], limit=10000)
    return {a.node_id for a in actors if class_part in a.class_name} & cluster.worker_node_ids()


def parquet_keys(tables: list) -> Counter:
    return Counter(str(key) for table in tables for key in table.column("key").to_pylist())


class Pipeline:
    """The data on S3 and the prepare and train runs the tests share: each job runs once per module,
    when the first test needs it, so any one test also runs alone."""

    def __init__(self, cluster: multinode.MultiNodeCluster, s3: S3):
        self.cluster, self.s3 = cluster, s3
        self.jobs: dict[str, Job] = {}

    def prepared(self) -> str:
        if "prepare" not in self.jobs:
            job = Job(self.cluster, "prepare", "python", "jobs/prepare.py", f"data.input={self.s3.url('pairs')}",
                      f"output={self.s3.url('prepared')}", *QUIET)
            job.succeeded(600)
            self.jobs["prepare"] = job
        return self.s3.url("prepared")

    def bundle(self) -> str:
        if "train" not in self.jobs:
            prepared = self.prepared()
            job = Job(self.cluster, "train", "python", "jobs/train.py", f"prepared={prepared}",
                      f"run.storage_path={self.s3.url('runs')}", "run.name=first", "scaling.num_workers=2",
                      "optim.epochs=2", *TINY_MODEL, *QUIET)
            job.succeeded(600)
            self.jobs["train"] = job
        return self.s3.url("runs/first/bundle")


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(s3_endpoint, tmp_path_factory) -> S3:
    """A bucket with the inputs: pairs/ (3 shards of 80) and many/ (8 shards of 150), img2dataset Parquet."""
    from raypipe.datasets.sample import SampleSpec, write_sample

    store = S3(s3_endpoint, f"rp-mn-{uuid.uuid4().hex[:10]}")
    store.client.create_bucket(Bucket=store.bucket)
    root = tmp_path_factory.mktemp("multinode-jobs")
    for prefix, spec in (("pairs", SampleSpec(num_pairs=TRAIN_PAIRS, shard_size=80, image_size=(64, 64))),
                         ("many", SampleSpec(num_pairs=LABEL_SHARDS * LABEL_SHARD_SIZE, shard_size=LABEL_SHARD_SIZE,
                                             image_size=(64, 64), seed=1))):
        write_sample(str(root / prefix), spec, formats=("parquet",))
        for shard in sorted((root / prefix / "parquet").iterdir()):
            store.client.upload_file(str(shard), store.bucket, f"{prefix}/{shard.name}")
    return store


@pytest.fixture(scope="module")
def cluster(s3):
    """Started after s3_endpoint set AWS_* in this process's environment, which every node inherits."""
    with multinode.start(multinode.ClusterShape()) as started:
        yield started


@pytest.fixture(scope="module")
def pipeline(cluster, s3) -> Pipeline:
    return Pipeline(cluster, s3)


# --- tests ---------------------------------------------------------------------------------------


def test_label_as_the_first_job_of_a_fresh_autoscaling_cluster_waits_for_the_nodes_it_asks_for(s3):
    """Ray 2.60's cluster launcher does not report its node types: a labeling job that is the first work
    of a cluster with no worker up is not sized for the 0-CPU head and refused, but asks the autoscaler
    for its first predictor actor and a preprocessing task, and labels every row. A cluster of its own,
    started before the module's: no job has ever brought a node up."""
    bundle = s3.url("untrained/bundle")
    tiny.write_bundle(bundle)
    with multinode.start(multinode.ClusterShape()) as fresh:
        assert fresh.worker_node_ids() == set()
        label = Job(fresh, "label-first", "python", "jobs/label.py", f"bundle={bundle}",
                    f"data.input={s3.url('pairs')}", f"output={s3.url('labels-first')}", *QUIET)
        logs = label.succeeded(600)
        started = [ms - label.start_time_ms() for ms in worker_start_times_ms(fresh)]
    summary = s3.json("labels-first/_summary.json")
    assert summary["complete"] and summary["rows_out"] == summary["rows_in"] == TRAIN_PAIRS, summary
    assert started and min(started) > 0, f"worker nodes started {started} ms after the job: not for it"
    assert any("resources ready after" in line for line in node_waits(logs)), logs[-3000:]
    print(f"\nlabel as the first job: SUCCEEDED in {label.seconds:.1f} s (submit to end), {len(started)} worker "
          f"node(s) started; {sorted(set(node_waits(logs)))}")


def test_prepare_train_label_submitted_to_an_autoscaling_cluster_with_no_worker_up(cluster, s3, pipeline):
    head = cluster.head_node_id()
    assert cluster.worker_node_ids() == set()
    assert cluster.nodes()[head].get("CPU", 0) == 0

    pipeline.prepared()
    assert any(k.endswith(".parquet") for k in s3.keys("prepared/")) and "prepared/stats.json" in s3.keys("prepared/")
    bundle = pipeline.bundle()
    label = Job(cluster, "label", "python", "jobs/label.py", f"bundle={bundle}", f"data.input={s3.url('pairs')}",
                f"output={s3.url('labels')}", *QUIET)
    label_logs = label.succeeded(600)

    metrics = s3.json("runs/first/bundle/metrics.json")
    ranks = metrics["worker_nodes"]
    assert len(ranks) == 2 and len(set(ranks)) == 2, metrics["worker_nodes"]
    assert head not in ranks and all(cluster.node_state(node) is not None for node in ranks), ranks
    assert metrics["epochs_run"] == 2 and metrics["attempts"] == 1
    summary = s3.json("labels/_summary.json")
    assert summary["complete"] and summary["rows_out"] == summary["rows_in"] == TRAIN_PAIRS, summary
    assert summary["files"]["incomplete"] == [] and summary["duplicate_keys"] == 0, summary

    first_job_ms = pipeline.jobs["prepare"].start_time_ms()
    started = [(ms - first_job_ms) / 1000 for ms in worker_start_times_ms(cluster)]
    print(f"\nthe autoscaler started {len(started)} worker node(s) for prepare -> train -> label, "
          f"{', '.join(f'{s:.1f}' for s in started)} s after the prepare job started")
    for name, job in {**pipeline.jobs, "label": label}.items():
        logs = label_logs if name == "label" else job.logs()
        print(f"  {name}: SUCCEEDED in {job.seconds:.1f} s (submit to end); "
              f"{sorted(set(node_waits(logs))) or 'no wait for nodes'}")


def test_a_worker_node_killed_mid_training_restarts_from_the_checkpoint(cluster, s3, pipeline):
    prepared = pipeline.prepared()
    epochs, run = 4, "killed"
    job = Job(cluster, "train-killed", "python", "jobs/train.py", f"prepared={prepared}",
              f"run.storage_path={s3.url('runs')}", f"run.name={run}", "scaling.num_workers=2",
              f"optim.epochs={epochs}", "optim.early_stopping_patience=", "run.max_failures=2", *TINY_MODEL, *QUIET)
    # Ray Train writes the checkpoint manager's snapshot once the controller has registered a checkpoint:
    # from then on a restart resumes from it.
    snapshot = f"runs/{run}/checkpoint_manager_snapshot.json"

    def first_checkpoint():
        if not job.running():
            raise AssertionError(f"train ended ({job.status()}) before a node could be killed:\n{job.logs()[-4000:]}")
        return snapshot in s3.keys(f"runs/{run}/") and alive_actor_nodes(cluster, "RayTrainWorker")

    nodes = multinode.wait_until(first_checkpoint, 400, "the first checkpoint of the run")
    victim = min(nodes)
    checkpoints = [k for k in s3.keys(f"runs/{run}/") if k.endswith("/progress.json")]
    cluster.kill_node(victim)
    killed_at = time.monotonic()
    print(f"\nkilled node {victim} (a training worker's) with {len(checkpoints)} checkpoint(s) written")

    logs = job.succeeded(600)
    metrics = s3.json(f"runs/{run}/bundle/metrics.json")
    print(f"train SUCCEEDED {time.monotonic() - killed_at:.1f} s after the kill, {job.seconds:.1f} s in all; "
          f"attempts {metrics['attempts']}; {sorted({line for line in logs.splitlines() if 'resuming' in line})}")
    resumed = sorted({int(n) for n in re.findall(r"resuming from the checkpoint after epoch (\d+)", logs)})
    assert resumed and all(1 <= n < epochs for n in resumed), resumed  # the kill came mid-run, after a checkpoint
    assert metrics["epochs_run"] == epochs, metrics["history"]  # what an uninterrupted run gives
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, epochs + 1)), metrics["history"]
    assert metrics["attempts"] >= 2, metrics
    multinode.wait_until(lambda: cluster.node_state(victim) == "DEAD", 120, f"node {victim} marked DEAD")
    assert victim not in metrics["worker_nodes"] and len(set(metrics["worker_nodes"])) == 2, metrics["worker_nodes"]


def test_a_worker_node_killed_mid_labeling_then_a_rerun_labels_every_row_once(cluster, s3, pipeline):
    bundle = pipeline.bundle()
    out = "labels-killed"
    command = ("python", "jobs/label.py", f"bundle={bundle}", f"data.input={s3.url('many')}",
               f"output={s3.url(out)}", "progress_interval_s=2", "predict.batch_size=4", "rows_per_part=4", *QUIET)
    first = Job(cluster, "label-killed", *command)

    def predictors_running():
        if not first.running():
            raise AssertionError(f"label ended ({first.status()}) before a node could be killed:\n"
                                 f"{first.logs()[-4000:]}")
        # As soon as a predictor actor runs: on 1,200 rows the job can finish within seconds after that,
        # so waiting for parts as well could miss it (small batches and parts keep it running longer).
        return alive_actor_nodes(cluster, "MapWorker(MapBatches(BundlePredictor))")

    nodes = multinode.wait_until(predictors_running, 400, "a running predictor actor")
    victim = min(nodes)
    parts_before = len([k for k in s3.keys(f"{out}/") if k.endswith(".parquet")])
    cluster.kill_node(victim)
    print(f"\nkilled node {victim} (a predictor actor's) with {parts_before} part(s) written")

    first_status = first.wait(600)
    after_first = s3.json(f"{out}/_summary.json") if f"{out}/_summary.json" in s3.keys(f"{out}/") else {}
    print(f"first label run: {first_status} in {first.seconds:.1f} s; its summary: "
          f"{ {k: after_first.get(k) for k in ('complete', 'rows_in', 'rows_out', 'files', 'duplicate_keys')} }")
    rerun = Job(cluster, "label-rerun", *command)
    rerun.succeeded(600)
    print(f"re-run: SUCCEEDED in {rerun.seconds:.1f} s")

    summary = s3.json(f"{out}/_summary.json")
    expected, labeled = (parquet_keys([pq.read_table(io.BytesIO(s3.read(k)), columns=["key"])
                                       for k in s3.keys(prefix) if k.endswith(".parquet")])
                         for prefix in ("many/", f"{out}/"))
    assert sum(expected.values()) == LABEL_SHARDS * LABEL_SHARD_SIZE
    assert summary["complete"] and summary["files"]["incomplete"] == [], summary
    assert summary["rows_out"] == summary["rows_in"] == LABEL_SHARDS * LABEL_SHARD_SIZE, summary
    # Ray marks a killed node DEAD after its health checks fail (~14 s here); the jobs may end sooner.
    multinode.wait_until(lambda: cluster.node_state(victim) == "DEAD", 120, f"node {victim} marked DEAD")
    assert labeled == expected, (f"missing {sum((expected - labeled).values())}, "
                                 f"extra {sum((labeled - expected).values())}")
