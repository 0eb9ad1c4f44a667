"""`ray job submit --working-dir . -- python jobs/...` against a `ray start --head` cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


AGENT_NOT_READY = "No available agent to submit job"


def submit(cluster, *entrypoint: str, timeout: int = 600) -> str:
    """Submits a job, waits for it, returns its output; fails the test unless it succeeded."""
    ray_bin = str(Path(sys.executable).with_name("ray"))

    def submitted() -> subprocess.CompletedProcess | None:
        done = subprocess.run(
            [ray_bin, "job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO), "--", *entrypoint],
            cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=timeout,
        )
        return None if AGENT_NOT_READY in done.stdout + done.stderr else done

    # The job agent starts after `ray start` returns, slowly on a loaded 2-core machine, and the job
    # server waits only 10 s per request for it.
    done = wait_until(submitted, 180, "the job agent accepting a job", interval_s=2)
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_train_then_label_jobs_submitted_to_a_head_node(ray_cluster, tmp_path):
    """Training on the streaming path (no prepare output: raw img2dataset shards preprocessed while
    training), then labeling the Parquet shards with the bundle it wrote, both as submitted jobs."""
    from raypipe.datasets.sample import SampleSpec, write_sample

    sample, runs = tmp_path / "sample", tmp_path / "runs"
    write_sample(str(sample), SampleSpec(num_pairs=240, shard_size=120, image_size=(64, 64)))
    out = submit(
        ray_cluster, "python", "jobs/train.py", f"data.input={sample / 'webdataset'}", f"run.storage_path={runs}",
        "run.name=submitted", "optim.epochs=1", "model.conv_channels=[8]", "model.embed_dim=8", "model.lstm_hidden=8",
    )
    assert "epoch 1/1" in out
    summary = json.loads([line for line in out.splitlines() if line.startswith('{"bundle"')][-1])
    bundle = Path(summary["bundle"])
    assert {"model.pt", "config.json", "vocab.json", "classes.json", "metrics.json"} <= {p.name for p in bundle.iterdir()}

    labels = tmp_path / "labels"
    out = submit(ray_cluster, "python", "jobs/label.py", f"data.input={sample / 'parquet'}", f"bundle={bundle}",
                 f"output={labels}", "data.keep_columns=[url]")
    summary = json.loads((labels / "_summary.json").read_text())
    assert summary["complete"] and summary["rows_in"] == summary["rows_out"] == 240, summary
    assert summary["rows_labeled"] > 200 and f"labeled {summary['rows_processed']} rows" in out
    assert sorted(p.name for p in labels.iterdir() if p.is_dir()) == ["00000", "00001"]
