"""Ray Train end to end: 2 CPU workers, checkpoints in moto S3, resume, bundle, evaluate.

Trainer runs cost ~30-60 s each here, so this module starts as few as it can and checks a lot per run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from raypipe.bundle import load_bundle
from raypipe.config import EvaluateConfig, PrepareConfig, StorageConfig, TrainConfig, load_config
from raypipe.io.fs import resolve
from raypipe.pipeline.evaluate import run_evaluate
from raypipe.pipeline.prepare import run_prepare
from raypipe.pipeline.train import load_training_data, run_train
from raypipe.datasets.sample import SampleSpec, write_sample

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("train-data")
    write_sample(str(root / "sample"), SampleSpec(num_pairs=480, shard_size=160, image_size=(96, 96)))
    out = root / "prepared"
    run_prepare(load_config(PrepareConfig, None, [f"data.input={root / 'sample' / 'parquet'}", f"output={out}"]))
    return str(out)


def _list(url: str) -> list[str]:
    loc = resolve(url, StorageConfig())
    return [i.path for i in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))]


def test_two_workers_checkpoint_to_s3_resume_and_evaluate(prepared, bucket, tmp_path):
    storage = f"s3://{bucket}/runs"
    base = [f"prepared={prepared}", f"run.storage_path={storage}", "run.name=t2", "scaling.num_workers=2",
            "optim.batch_size=32", "model.conv_channels=[8, 16]", "model.embed_dim=16", "model.lstm_hidden=16",
            "run.progress_interval_s=0.2"]
    first = run_train(load_config(TrainConfig, None, [*base, "optim.epochs=2"]))
    assert first["epochs_run"] == 2 and len(first["history"]) == 2
    assert all(h["train_rows"] > 300 and h["val_rows"] > 25 for h in first["history"])  # both workers' rows summed
    assert first["history"][1]["train_loss"] < first["history"][0]["train_loss"]
    checkpoints = [p for p in _list(f"{storage}/t2") if p.endswith("progress.json")]
    assert len(checkpoints) == 2  # one per epoch, num_to_keep=2

    # The same command with more epochs continues after epoch 2 instead of starting over.
    second = run_train(load_config(TrainConfig, None, [*base, "optim.epochs=3"]))
    assert second["epochs_run"] == 3
    assert second["history"][:2] == first["history"]
    assert len([p for p in _list(f"{storage}/t2") if p.endswith("progress.json")]) == 2  # oldest dropped

    # TensorBoard reads the event files of both attempts as one run: one point per epoch.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = tmp_path / "tensorboard"
    events.mkdir()
    tensorboard = resolve(f"{storage}/t2/tensorboard", StorageConfig())
    for path in _list(f"{storage}/t2/tensorboard"):
        (events / Path(path).name).write_bytes(tensorboard.fs.open_input_stream(path).read())
    scalars = EventAccumulator(str(events)).Reload()
    assert [e.step for e in scalars.Scalars("loss/train")] == [1, 2, 3]
    assert [e.value for e in scalars.Scalars("accuracy/val")] == pytest.approx([h["val_accuracy"] for h in second["history"]])
    assert {"loss/val", "loss/val_calibrated", "macro_f1/val", "lr", "throughput/train_samples_per_s"} <= set(
        scalars.Tags()["scalars"])

    bundle = load_bundle(second["bundle"], StorageConfig())
    assert bundle.identity == second["identity"] and bundle.model_config.mode == "fusion"
    assert bundle.metrics["best_epoch"] == second["best_epoch"]
    assert all(isinstance(v, torch.Tensor) for v in bundle.state_dict.values())

    # The bundle keeps the temperature and the late-fusion image share fitted on the best epoch's validation
    # pass (all workers' rows).
    # (T = 1 is on the grid and can be the fit; the evaluation below tells a bundle that applies the fitted T
    # from one that ignores it, by the calibrated ECE.)
    assert bundle.temperature == second["best"]["temperature"]
    assert bundle.model_config.image_share == second["best"]["image_share"]
    assert 0 <= bundle.model_config.image_share <= 1 and 0 < second["best"]["val_accuracy_plain_sum"] <= 1

    # fp32 as in training: on a CPU with native bf16, "auto" labels in bf16, whose rounded probabilities
    # can move rows across the calibration error's bins (the predicted classes stay the fp32 ones).
    validation = run_evaluate(load_config(EvaluateConfig, None, [
        f"bundle={second['bundle']}", f"prepared={prepared}", "which_split=val", f"output={tmp_path / 'val'}",
        "predict.precision=fp32"]))
    # The evaluate job sees the validation split exactly as training's last validation pass did, and
    # measures the same calibration error before and after scaling.
    assert validation["rows"] == second["best"]["val_rows"]
    assert validation["accuracy"] == pytest.approx(second["best"]["val_accuracy"])
    assert validation["calibration"]["ece_uncalibrated"] == pytest.approx(second["best"]["val_ece"], abs=1e-3)
    assert validation["calibration"]["ece"] == pytest.approx(second["best"]["val_ece_calibrated"], abs=1e-3)

    result = run_evaluate(load_config(EvaluateConfig, None, [f"bundle={second['bundle']}", f"prepared={prepared}"]))
    stats = json.loads((Path(prepared) / "stats.json").read_text())
    assert result["split"] == "test" and result["rows"] == stats["ok_by_split"]["test"]  # the held-out rows
    assert result["calibration"]["temperature"] == bundle.temperature
    assert 0 < result["calibration"]["ece_if_calibrated"] < 0.5  # the sampling floor of ~50 rows
    out = resolve(result["output"], StorageConfig())
    assert json.loads(out.fs.open_input_stream(f"{out.path}/metrics.json").read())["rows"] == result["rows"]
    for picture in ("confusion_matrix.png", "calibration.png"):
        assert out.fs.open_input_stream(f"{out.path}/{picture}").read()[:4] == b"\x89PNG"


@pytest.mark.parametrize("cache_mib, cached", [(2048, True), (1, False), (0, False)])
def test_prepared_rows_are_cached_only_when_they_fit_the_budget(prepared, cache_mib, cached):
    """480 pairs of 64x64 images decode to ~6 MiB: kept after one read under a 2 GiB budget, streamed
    from storage under 1 MiB or with caching off. The same rows either way."""
    from ray.data.dataset import MaterializedDataset

    data = load_training_data(load_config(TrainConfig, None, [f"prepared={prepared}", f"scaling.cache_mib={cache_mib}"]))
    stats = json.loads((Path(prepared) / "stats.json").read_text())
    for split, ds in (("train", data.train), ("val", data.val)):
        assert isinstance(ds, MaterializedDataset) == cached
        assert ds.count() == stats["ok_by_split"][split]


def test_mlflow_gets_the_config_every_epoch_and_the_bundle(prepared, tmp_path, monkeypatch):
    """run.mlflow_tracking_uri with the real MLflow client and a SQLite store: the metrics come from the
    rank-0 training worker, params and artifacts from the driver."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)  # the SQLite store keeps artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_train(load_config(TrainConfig, None, [
        f"prepared={prepared}", f"run.storage_path={tmp_path / 'runs'}", "run.name=tracked", f"run.mlflow_tracking_uri={uri}",
        "optim.epochs=2", "optim.batch_size=32", "model.conv_channels=[8, 16]", "model.embed_dim=16",
        "model.lstm_hidden=16", "ray.progress_bars=false",
    ]))

    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs(["0"])  # MLflow's default experiment
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["optim.epochs"] == "2" and run.data.params["prepared"] == prepared
    for key in ("train_loss", "val_loss", "val_nll_calibrated", "val_accuracy", "val_macro_f1", "train_samples_per_s",
                "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == pytest.approx(
        [h["val_accuracy"] for h in result["history"]])
    artifacts = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "bundle")}
    assert artifacts == {p.name for p in (tmp_path / "runs" / "tracked" / "bundle").iterdir()}


def test_with_a_moving_average_of_the_weights_the_bundle_holds_the_average_of_the_best_epoch(prepared, tmp_path):
    """optim.ema_decay: validated and bundled is the average (checkpointed beside the weights as trained,
    which training resumes from), not the weights of the last step."""
    result = run_train(load_config(TrainConfig, None, [
        f"prepared={prepared}", f"run.storage_path={tmp_path}", "run.name=ema", "optim.epochs=2", "optim.ema_decay=0.9",
        "model.mode=text", "model.embed_dim=8", "model.lstm_hidden=8", "model.fc_dims=[16]",
    ]))
    best = result["best_epoch"]
    [checkpoint] = (tmp_path / "ema").glob(f"checkpoint_epoch{best:04d}_step*_end")
    average, trained = (torch.load(checkpoint / name, weights_only=True) for name in ("ema_model.pt", "model.pt"))
    bundled = load_bundle(result["bundle"], StorageConfig()).state_dict
    assert bundled.keys() == average.keys()
    assert all(torch.equal(bundled[k], average[k]) for k in bundled)
    assert not all(torch.equal(average[k], trained[k]) for k in average if average[k].is_floating_point())
