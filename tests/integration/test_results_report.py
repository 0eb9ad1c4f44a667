"""docs/examples/results_report.py on what results.sh leaves behind, on a tiny sample run end to end
on the real local Ray: img2dataset-layout shards and their stats, jobs/prepare.py's output, an
ablation of two seeds per mode evaluated on test, and the linear baselines. The block it writes into
a results file must carry those runs' figures and settings, and leave the rest of the file alone."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from raypipe.config import AblationConfig, PrepareConfig, load_config
from raypipe.datasets.sample import SampleSpec, write_sample
from raypipe.pipeline.ablation import run_ablation
from raypipe.pipeline.prepare import run_prepare
from raypipe.tools import baselines

pytestmark = [pytest.mark.integration]

REPORT = Path(__file__).resolve().parents[2] / "docs" / "examples" / "results_report.py"
TINY_MODEL = ["model.conv_channels=[8, 16]", "model.embed_dim=16", "model.lstm_hidden=16"]


def load_report():
    spec = importlib.util.spec_from_file_location("results_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_report_carries_the_runs_figures_and_departures(ray_cluster, tmp_path):
    work = tmp_path / "work"
    write_sample(str(tmp_path / "sample"), SampleSpec(num_pairs=320, shard_size=160, image_size=(64, 64)))
    work.mkdir()
    (work / "shards").symlink_to(tmp_path / "sample" / "parquet")  # img2dataset's layout, with *_stats.json
    run_prepare(load_config(PrepareConfig, None, [f"data.input={work / 'shards'}", f"output={work / 'prepared'}"]))
    run_ablation(load_config(AblationConfig, None, [
        f"prepared={work / 'prepared'}", f"run.storage_path={work / 'runs'}", "run.name=emoji", "seeds=[0,1]",
        "optim.epochs=2", "ray.progress_bars=false", *TINY_MODEL,
    ]))
    assert baselines.main([str(work / "prepared"), "--output", str(work / "runs" / "emoji")]) == 0

    report = load_report()
    begin, end = report.markers("emoji")
    results = tmp_path / "results.md"
    results.write_text(f"# Results\n\ndiscussion before\n\n{begin}\nstale\n{end}\n\ndiscussion after\n")
    assert report.main(["--dataset", "emoji", "--work", str(work), "--results", str(results),
                        "--images", str(tmp_path / "images")]) == 0

    text = results.read_text()
    assert text.startswith("# Results\n\ndiscussion before\n\n") and text.endswith("\n\ndiscussion after\n")
    block = text[text.index(begin):text.index(end)]
    assert "stale" not in block
    ablation = json.loads((work / "runs" / "emoji" / "ablation.json").read_text())
    for row in ablation["rows"]:  # every mode's test accuracy, mean ± std over the two seeds
        assert f"**{row['test_accuracy']:.4f} ± {row['test_accuracy_std']:.4f}**" in block, row["mode"]
    test_rows = json.loads((work / "prepared" / "stats.json").read_text())["ok_by_split"]["test"]
    assert f"{test_rows} test. 2 seed(s) per mode (0, 1)" in block
    found = json.loads((work / "runs" / "emoji" / "baselines.json").read_text())["results"]["test"]
    assert "| linear: late fusion (mean of the two probabilities) | - |" in block
    assert f"| {found['late_fusion']['accuracy']:.4f} | {found['late_fusion']['macro_f1']:.4f} |" in block
    # The settings that differ from raypipe's defaults are named, the schedule every run sets is not.
    assert "`model.conv_channels=[8, 16]`, `model.embed_dim=16`, `model.lstm_hidden=16`" in block
    assert "optim.epochs" not in block
    assert "Targets of the issue (test split):" in block
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "emoji_ablation.png", "emoji_fusion_calibration.png", "emoji_fusion_confusion.png"]
