"""The ablation's orchestration without Ray: runs per mode and seed, the table, the curves, the
fusion confusion matrix and reliability diagram (run_train / run_evaluate replaced by fakes)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from raypipe import calibration
from raypipe.config import AblationConfig, ConfigError, load_config
from raypipe.pipeline import ablation
from raypipe.pipeline import evaluate as evaluate_module

ACCURACY = {"image": 0.40, "text": 0.70, "fusion": 0.85}


def fake_history(mode: str, seed: int, epochs: int) -> list[dict]:
    top = ACCURACY[mode] + 0.01 * seed
    return [{"epoch": e + 1, "val_accuracy": top * (e + 1) / epochs, "val_macro_f1": top * (e + 1) / epochs - 0.05}
            for e in range(epochs)]


@pytest.fixture
def trained(monkeypatch):
    calls = []

    def run_train(cfg):
        calls.append(cfg)
        history = fake_history(cfg.model.mode, cfg.optim.seed, 3 + cfg.optim.seed)  # early stopping: lengths differ
        return {"best": history[-1], "best_epoch": len(history), "epochs_run": len(history), "history": history,
                "bundle": f"{cfg.run.storage_path}/{cfg.run.name}/bundle"}

    def run_evaluate(cfg):
        calls.append(cfg)
        bins = np.zeros((calibration.ECE_BINS, 3))
        bins[14] = [4, 3.9, 4]  # 4 rows at confidence 0.975, all right
        bins[9] = [4, 2.6, 3]  # 4 rows at 0.65, 3 right
        seed = int(cfg.bundle.split("-s")[-1].split("/")[0]) if "-s" in cfg.bundle else 0
        return {"accuracy": 0.8 + 0.01 * seed, "macro_f1": 0.75, "confusion": [[3, 1], [0, 4]],
                "per_class": {"cat": {}, "dog": {}},
                "calibration": {"temperature": 1.5, "image_share": 0.45, "ece": 0.02, "ece_uncalibrated": 0.1,
                                "ece_if_calibrated": 0.05,
                                "bin_sums": {"calibrated": bins.tolist(), "uncalibrated": bins.tolist()}}}

    monkeypatch.setattr(ablation, "run_train", run_train)
    monkeypatch.setattr(evaluate_module, "run_evaluate", run_evaluate)
    return calls


def config(tmp_path, *overrides):
    return load_config(AblationConfig, None, ["prepared=/data/prepared", f"run.storage_path={tmp_path}", "run.name=abl", *overrides])


def test_one_seed_keeps_the_plain_runs_and_table(tmp_path, trained):
    summary = ablation.run_ablation(config(tmp_path, "optim.seed=2", "evaluate_split=none"))
    assert [c.run.name for c in trained] == ["abl-image", "abl-text", "abl-fusion"]
    assert {c.optim.seed for c in trained} == {2} and [c.model.mode for c in trained] == ["image", "text", "fusion"]
    assert all(c.prepared == "/data/prepared" for c in trained)
    assert summary["table"].splitlines()[0] == "| mode | best epoch | val accuracy | val macro-F1 |"
    assert "| fusion | 5 | 0.8700 | 0.8200 |" in summary["table"]
    out = tmp_path / "abl"
    assert (out / "ablation.md").read_text() == summary["table"]
    assert Image.open(out / "ablation.png").format == "PNG"
    assert not (out / "ablation_confusion.png").exists()


def test_every_run_is_evaluated_on_test_after_training_and_the_table_reports_it(tmp_path, trained):
    summary = ablation.run_ablation(config(tmp_path, "modes=[text, fusion]"))
    evaluations = [c for c in trained if not hasattr(c, "optim")]
    assert [c.bundle for c in evaluations] == [f"{tmp_path}/abl-{m}/bundle" for m in ("text", "fusion")]
    assert {c.which_split for c in evaluations} == {"test"}
    assert summary["table"].splitlines()[0] == (
        "| mode | best epoch | val accuracy | val macro-F1 | test accuracy | test macro-F1 | test ECE at T=1 | test ECE | test ECE of a calibrated model |")
    assert "| fusion | 3 | 0.8500 | 0.8000 | 0.8000 | 0.7500 | 0.1000 | 0.0200 | 0.0500 |" in summary["table"]
    assert summary["fusion"]["ece"] == pytest.approx(abs(6.5 - 7) / 8)  # from the bins: |3.9+2.6 - (4+3)| / 8 rows


def test_seeds_give_mean_and_std_per_mode_and_the_fusion_confusion(tmp_path, trained):
    summary = ablation.run_ablation(config(tmp_path, "seeds=[0, 1, 2]", "modes=[text, fusion]"))
    trains = [c for c in trained if hasattr(c, "optim")]
    assert [c.run.name for c in trains] == [f"abl-{m}-s{s}" for m in ("text", "fusion") for s in (0, 1, 2)]
    assert [c.optim.seed for c in trains] == [0, 1, 2, 0, 1, 2]
    evaluations = [c for c in trained if not hasattr(c, "optim")]
    assert [c.bundle for c in evaluations] == [f"{tmp_path}/abl-{m}-s{s}/bundle" for m in ("text", "fusion") for s in (0, 1, 2)]
    assert evaluations[3].output.endswith("abl/evaluation/abl-fusion-s0")

    fusion = {r["mode"]: r for r in summary["rows"]}["fusion"]
    assert fusion["runs"] == 3 and fusion["val_accuracy"] == pytest.approx(0.86)
    assert fusion["val_accuracy_std"] == pytest.approx(0.01)  # sample standard deviation of .85 .86 .87
    assert "| fusion | 3 | 4.0 | 0.8600 ± 0.0100 | 0.8100 ± 0.0100 | 0.8100 ± 0.0100 | 0.7500 ± 0.0000 |" in summary["table"]
    assert fusion["test_accuracy"] == pytest.approx(0.81)
    assert {k: summary["fusion"][k] for k in ("classes", "confusion", "runs")} == {
        "classes": ["cat", "dog"], "confusion": [[9, 3], [0, 12]], "runs": 3}
    assert ablation.gap_in_stds(summary["rows"], "fusion", "text") == pytest.approx(15.0)  # (0.86 - 0.71) / 0.01

    out = tmp_path / "abl"
    saved = json.loads((out / "ablation.json").read_text())
    assert len(saved["runs"]) == 6 and saved["runs"][0]["history"][0]["epoch"] == 1
    for name in ("ablation.png", "ablation_confusion.png", "ablation_calibration.png"):
        assert Image.open(io.BytesIO((out / name).read_bytes())).format == "PNG"


def test_epoch_bands_average_the_runs_still_training():
    epochs, mean, std, counts = ablation.epoch_bands([fake_history("text", 0, 2), fake_history("text", 0, 4)])
    assert list(epochs) == [1, 2, 3, 4] and list(counts) == [2, 2, 1, 1]
    assert mean[0] == pytest.approx((0.35 + 0.175) / 2) and std[3] == 0.0
    assert np.isfinite(std).all()


def test_seeds_must_be_distinct(tmp_path):
    with pytest.raises(ConfigError, match="distinct"):
        config(tmp_path, "seeds=[1, 1]")
