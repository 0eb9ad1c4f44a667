"""MLflow as an option (no Ray): a run asking for it without MLflow installed stops before any cluster
work naming the extra; with MLflow, the real client against a SQLite store in tmp_path holds the config's
params, one point per epoch and metric, and the bundle's files, and a resumed run logs to the same run."""

from __future__ import annotations

import sys

import pytest

from raypipe.config import StorageConfig, TrainConfig, load_config
from raypipe.io.fs import resolve
from raypipe.pipeline.mlflow_log import (
    RUN_RECORD,
    MlflowError,
    end_run,
    log_bundle,
    log_epoch,
    open_run,
    require_mlflow,
)


def test_without_mlflow_installed_a_run_asking_for_it_stops_before_ray_starts(monkeypatch, tmp_path):
    from raypipe.pipeline.train import run_train

    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets where it is not installed
    # `prepared` does not exist: a run that went on to read its data (and start Ray) would fail on that instead.
    cfg = load_config(TrainConfig, None, [f"prepared={tmp_path / 'missing'}", f"run.storage_path={tmp_path}",
                                          f"run.mlflow_tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    with pytest.raises(MlflowError, match=r"MLflow is not installed: pip install 'raypipe\[mlflow\]'"):
        run_train(cfg)
    require_mlflow(load_config(TrainConfig, None, []))  # not asked for: nothing to check


def test_params_epochs_and_bundle_land_in_one_mlflow_run_also_when_resumed(monkeypatch, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)  # the SQLite store keeps artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [f"run.storage_path={tmp_path / 'runs'}", "run.name=r1", f"run.mlflow_tracking_uri={uri}"]
    run_dir = resolve(str(tmp_path / "runs"), StorageConfig()).join("r1")

    first = open_run(load_config(TrainConfig, None, [*overrides, "optim.epochs=1"]), run_dir)
    log_epoch(first, {"train_loss": 0.9, "lr": 0.001}, 1)
    end_run(first, "FAILED")
    # The same command with more epochs: the same MLflow run goes on; a param keeps its first value.
    second = open_run(load_config(TrainConfig, None, [*overrides, "optim.epochs=2"]), run_dir)
    assert second == first and (tmp_path / "runs" / "r1" / RUN_RECORD).exists()
    log_epoch(second, {"train_loss": 0.7, "lr": 0.001}, 2)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "classes.json").write_text('["cat", "dog"]')
    log_bundle(second, str(bundle))
    end_run(second, "FINISHED")

    client = mlflow.MlflowClient(uri)
    run = client.get_run(first.run_id)
    assert run.info.run_name == "r1" and run.info.status == "FINISHED"
    assert run.data.params["optim.epochs"] == "1" and run.data.params["run.name"] == "r1"
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "train_loss")] == [(1, 0.9), (2, 0.7)]
    assert [a.path for a in client.list_artifacts(first.run_id, "bundle")] == ["bundle/classes.json"]
