"""Training faults: a Ray Train worker killed mid-epoch, the driver killed mid-run, and a worker failing
inside an epoch of a run with step checkpoints.

Both are done from outside, as an operator or the kernel would: a watcher polls the run directory
until Ray Train has registered a checkpoint (Train V2 writes ``checkpoint_manager_snapshot.json``
then), and kills processes found through /proc. Nothing in raypipe helps the tests.

Proof of a resume rather than a restart from scratch: the final history's first epoch is the very
record (measured seconds and throughput included) that the first checkpoint held before the kill;
a run started over would have measured epoch 1 again.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from flaky_proxy import FlakyProxy
from test_train import _list, prepared  # noqa: F401  (fixture: the prepared 480-pair sample)
from waiting import wait_until

from raypipe.bundle import load_bundle
from raypipe.config import OptimSection, StorageConfig, TrainConfig, load_config
from raypipe.model import BRANCH_KEYS
from raypipe.pipeline.train import BUNDLE_DIR, CKPT_PROGRESS, epoch_score, run_train

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of the run's registered checkpoints
TRAIN_WORKER = "ray::RayTrainWorker"  # process title of a Ray Train worker
TINY_MODEL = ["model.conv_channels=[8, 16]", "model.embed_dim=16", "model.lstm_hidden=16", "optim.batch_size=32"]
WAIT_S = 300  # for the first checkpoint; a bound on a stuck run, not an expectation


def first_epoch_record(run_dir: Path, still_running) -> dict:
    """Waits until Ray Train has registered a checkpoint of the run; returns the history record of
    epoch 1 that the checkpoint holds."""
    def registered() -> bool:
        if (run_dir / SNAPSHOT).exists():
            return True
        if not still_running():
            raise AssertionError(f"the run ended without a checkpoint registered under {run_dir}")
        return False

    wait_until(registered, WAIT_S, f"a checkpoint registered under {run_dir}")
    for progress in sorted(run_dir.glob(f"checkpoint_*/{CKPT_PROGRESS}")):
        try:
            history = json.loads(progress.read_text())["history"]
        except ValueError:  # a later checkpoint still being written
            continue
        return history[0]
    raise AssertionError(f"{run_dir} has a snapshot but no readable {CKPT_PROGRESS}")


def _title(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # exited meanwhile
        return ""


def raylet_of(gcs_address: str) -> psutil.Process:
    """The raylet of the cluster at ``gcs_address`` (other Ray clusters may run on this machine)."""
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and cmdline[0].endswith("/raylet") and f"--gcs-address={gcs_address}" in cmdline:
            return process
    raise AssertionError(f"no raylet of the cluster at {gcs_address}")


def train_worker_pids(raylet: psutil.Process) -> set[int]:
    return {p.pid for p in raylet.children(recursive=True) if _title(p).startswith(TRAIN_WORKER)}


@dataclass
class WorkerKill:
    """What the watcher thread saw and did."""

    epoch_1: dict | None = None  # the first checkpoint's epoch-1 record, read before the kill
    killed: int | None = None
    restarted: set[int] = field(default_factory=set)  # train workers that appeared after the kill
    error: BaseException | None = None


def kill_a_worker_after_the_first_checkpoint(run_dir: Path, raylet: psutil.Process, fit_done: threading.Event,
                                             seen: WorkerKill) -> None:
    try:
        seen.epoch_1 = first_epoch_record(run_dir, lambda: not fit_done.is_set())
        # The fault itself, not a wait: the kill is timed to land half way through the next epoch's
        # training (rather than while the checkpoint is saved), as the test's name says.
        time.sleep(seen.epoch_1["epoch_seconds"] / 2)
        before = train_worker_pids(raylet)
        assert before, "no Ray Train worker process found"
        seen.killed = min(before)
        os.kill(seen.killed, signal.SIGKILL)
        while not seen.restarted and not fit_done.wait(0.2):
            seen.restarted = train_worker_pids(raylet) - before
    except BaseException as e:  # reported by the test's thread
        seen.error = e


def test_a_killed_worker_is_restarted_from_the_last_checkpoint(ray_cluster, prepared, tmp_path):  # noqa: F811
    storage, name, epochs = tmp_path / "runs", "worker-kill", 4
    cfg = load_config(TrainConfig, None, [
        f"prepared={prepared}", f"run.storage_path={storage}", f"run.name={name}", "run.max_failures=1",
        "scaling.num_workers=2", f"optim.epochs={epochs}", *TINY_MODEL,
    ])
    seen, fit_done = WorkerKill(), threading.Event()
    watcher = threading.Thread(
        target=kill_a_worker_after_the_first_checkpoint,
        args=(storage / name, raylet_of(ray_cluster.address), fit_done, seen),
    )
    watcher.start()
    try:
        result = run_train(cfg)
    finally:
        fit_done.set()
        watcher.join()
    if seen.error is not None:
        raise seen.error

    assert seen.killed is not None and not psutil.pid_exists(seen.killed)
    assert seen.restarted, "no new Ray Train worker started after the kill"
    history = result["history"]
    assert result["epochs_run"] == epochs and [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert history[0] == seen.epoch_1  # resumed from a checkpoint: epoch 1 was not trained again
    # The epochs after the restart saw all the data, on both workers.
    assert len({(h["train_rows"], h["val_rows"]) for h in history}) == 1
    bundle = load_bundle(result["bundle"], StorageConfig())
    assert bundle.identity == result["identity"] and bundle.metrics["history"] == history


def processes_with_env(name: str, value: str) -> list[psutil.Process]:
    """Processes whose environment has name=value: a driver's Ray processes inherit its environment,
    whatever their process group or title."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(name) == value:
                found.append(process)
        except psutil.Error:  # exited, or a kernel thread
            continue
    return found


def stop_processes_with_env(name: str, value: str) -> None:
    """Waits for them to exit (Ray's processes die with their driver), then kills any left."""
    _, alive = psutil.wait_procs(processes_with_env(name, value), timeout=30)
    for process in alive:
        process.kill()
    psutil.wait_procs(alive, timeout=10)


def test_a_killed_driver_is_resumed_by_running_the_same_command(ray_cluster, prepared, tmp_path):  # noqa: F811
    """jobs/train.py on its own local Ray, the driver's process group SIGKILLed after the first
    checkpoint, then the same command again."""
    storage, name, epochs = tmp_path / "runs", "driver-kill", 3
    command = [
        sys.executable, str(REPO / "jobs" / "train.py"), f"prepared={prepared}", f"run.storage_path={storage}",
        f"run.name={name}", f"optim.epochs={epochs}", "scaling.num_workers=1", "ray.num_cpus=2",
        "ray.progress_bars=false", *TINY_MODEL,
    ]
    # Its own Ray temp dir: the job starts a fresh local cluster (not the session's) whose processes
    # all carry this variable.
    ray_tmp = tempfile.mkdtemp(prefix="rp-drv-", dir="/tmp")
    env = {k: v for k, v in ray_cluster.env.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    try:
        with first_log.open("w") as log:
            driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
            try:
                epoch_1 = first_epoch_record(storage / name, lambda: driver.poll() is None)
            finally:
                if driver.poll() is None:
                    os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
        assert driver.returncode == -signal.SIGKILL, first_log.read_text()[-3000:]
        stop_processes_with_env("RAY_TMPDIR", ray_tmp)
        assert not processes_with_env("RAY_TMPDIR", ray_tmp)

        with second_log.open("w") as log:
            rerun = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600)
        output = second_log.read_text()
        assert rerun.returncode == 0, output[-3000:]
    finally:
        stop_processes_with_env("RAY_TMPDIR", ray_tmp)

    resumed_after = [int(n) for n in re.findall(r"resuming from the checkpoint after epoch (\d+)", output)]
    assert resumed_after and resumed_after[0] >= 1, output[-3000:]
    assert re.search(rf"best epoch \d+/{epochs}:", output)
    bundle = load_bundle(str(storage / name / BUNDLE_DIR), StorageConfig())
    history = bundle.metrics["history"]
    assert bundle.metrics["epochs_run"] == epochs and [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert history[0] == epoch_1

    # The same name with another model would resume these checkpoints: refused before any cluster work.
    other = subprocess.run([*command, "model.mode=text"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert other.returncode != 0 and "model.mode=text (the run's: fusion)" in other.stderr, other.stderr[-3000:]
    assert "Ray cluster" not in other.stderr  # the line init_ray logs once it has joined or started one


def test_a_worker_failing_inside_an_epoch_goes_on_from_the_step_checkpoint(ray_cluster, prepared, bucket,  # noqa: F811
                                                                           s3_endpoint):
    """Checkpoints every 4 steps of 32 rows on 1 worker; the store refuses the upload of the checkpoint
    after step 8 of epoch 1, which fails the worker. Ray Train restarts it from the checkpoint at step 4,
    and epoch 1 goes on from there rather than starting again."""
    train_rows = json.loads((Path(prepared) / "stats.json").read_text())["ok_by_split"]["train"]
    steps_per_epoch = math.ceil(train_rows / 32)
    assert steps_per_epoch > 8, "step 8 must fall inside epoch 1"
    proxy = FlakyProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    proxy.refuse_on(rb"^PUT /[^ ]*/checkpoint_epoch0001_step00000008/")
    storage, name = f"s3://{bucket}/runs", "mid-epoch"
    try:
        result = run_train(load_config(TrainConfig, None, [
            f"prepared={prepared}", f"run.storage_path={storage}", f"run.name={name}",
            f"storage.endpoint_url={proxy.url}", "run.max_failures=1", "run.checkpoint_every_steps=4",
            "scaling.num_workers=1", "optim.epochs=2", "ray.progress_bars=false", *TINY_MODEL,
        ]))
    finally:
        proxy.close()

    assert proxy.refused == 1 and result["attempts"] == 2
    assert result["resumed_mid_epoch"] == [{"epoch": 1, "steps": 4, "rows": 4 * 32}]
    history = result["history"]
    # Each epoch trained as many rows as the training split has: epoch 1 neither started over nor
    # trained its first 128 rows twice.
    assert [(h["epoch"], h["train_rows"]) for h in history] == [(1, train_rows), (2, train_rows)]
    # Step checkpoints carry each branch's best epoch along (the default trains the branches separately)
    # and are never taken for an epoch.
    by = OptimSection().best_epoch_by
    best = {branch: 1 + max(range(2), key=lambda e: (epoch_score(history[e], by, branch), -e)) for branch in BRANCH_KEYS}
    assert result["best"]["branch_epochs"] == best and result["best_epoch"] == max(best.values())
    # num_to_keep=2 holds for step checkpoints too; the newest, which the bundle comes from, is the model of
    # the best branches, after epoch 2.
    kept = sorted(path.split("/")[-2] for path in _list(f"{storage}/{name}") if path.endswith(f"/{CKPT_PROGRESS}"))
    assert kept == [f"checkpoint_epoch0002_step{2 * steps_per_epoch:08d}_end{suffix}" for suffix in ("", "_assembled")]
