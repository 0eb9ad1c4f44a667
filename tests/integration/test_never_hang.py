"""Jobs whose resources the cluster can never give fail at once, saying what they asked for and what
the cluster has, instead of waiting forever (the session's cluster: 4 CPUs, no GPU).

That the default settings run every job to the end on a 2-CPU cluster is shown by
test_no_secrets.py, which runs prepare, train and label there."""

from __future__ import annotations

import time

import pytest
from tiny import PAIR_COLUMNS, write_bundle, write_pairs

from raypipe.config import LabelJobConfig, TrainConfig, load_config
from raypipe.pipeline.capacity import CapacityError
from raypipe.pipeline.label import run_label
from raypipe.pipeline.train import run_train

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAILS_WITHIN_S = 120  # a Ray Data pass over the tiny input comes first for train; nothing waits for resources


@pytest.fixture(scope="module")
def inputs(ray_cluster, tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("never-hang")
    write_pairs(str(root / "pairs"))
    write_bundle(str(root / "bundle"))
    return str(root / "pairs"), str(root / "bundle")


def assert_refused_quickly(run, config_type, error, message: str, args: list[str]) -> None:
    """The job fails with ``message``, long before a job waiting on resources would give up."""
    started = time.monotonic()
    with pytest.raises(error, match=message):
        run(load_config(config_type, None, args))
    assert time.monotonic() - started < FAILS_WITHIN_S


@pytest.mark.parametrize("overrides, message", [
    (["predict.use_gpu=true"], r"predict.use_gpu=true asks for .* one GPU each; the cluster can have no GPU \(1 node\(s\) up with \{CPU: 4\}, no autoscaler\)"),
    (["predict.use_gpu=false", "predict.max_actors=100"],
     r"predict.max_actors=100 CPU predictor actors .* 3 CPU\(s\) left .* 4-CPU cluster .* at most 30"),
], ids=["gpu-without-gpus", "too-many-cpu-actors"])
def test_a_label_pool_that_cannot_run_is_refused(inputs, tmp_path, overrides, message):
    pairs, bundle = inputs
    assert_refused_quickly(run_label, LabelJobConfig, CapacityError, message, [
        f"data.input={pairs}", *PAIR_COLUMNS, f"bundle={bundle}", f"output={tmp_path / 'labels'}", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["scaling.use_gpu=true"], r"asks for 1 GPU worker\(s\); the cluster can have 0 GPU\(s\)"),
    (["scaling.num_workers=4", "scaling.cpus_per_worker=1"],
     r"4 worker\(s\) x 1 CPU leaves no CPU for data loading on a cluster with 4 CPUs"),
], ids=["gpu-without-gpus", "every-cpu-taken"])
def test_training_workers_that_cannot_be_placed_are_refused(inputs, tmp_path, overrides, message):
    pairs, _ = inputs
    assert_refused_quickly(run_train, TrainConfig, CapacityError, message, [
        f"data.input={pairs}", *PAIR_COLUMNS, "text.lemmatize=false", f"run.storage_path={tmp_path / 'runs'}",
        "ray.progress_bars=false", *overrides])
