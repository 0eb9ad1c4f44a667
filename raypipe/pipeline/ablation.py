"""The paper's ablation: image-only, text-only and fusion trained on the same prepared split, each
with one or more seeds.

Every run is chosen on validation (early stopping, the epoch kept, the temperature) and then evaluated
once on ``evaluate_split`` (test by default: rows no training decision has read). Writes, under
``run.storage_path/run.name``:

    ablation.json             every run (mode, seed, best epoch, validation and test metrics, history,
                              bundle) and the table
    ablation.md               the table: one row per mode (with seeds: mean and standard deviation)
    ablation.png              validation accuracy per epoch (like the paper's Figure 6); with seeds the
                              mean per mode with a band of one standard deviation
    ablation_confusion.png    the fusion model's confusion matrix on ``evaluate_split``, summed over its seeds
    ablation_calibration.png  the fusion model's reliability diagram on ``evaluate_split`` (summed over its
                              seeds), before and after temperature scaling
    evaluation/<run>/         each run's jobs/evaluate.py output

Each run is an ordinary ``run_train`` run: named ``<run.name>-<mode>`` (one seed, the default) or
``<run.name>-<mode>-s<seed>``, so re-running the same command resumes or reuses finished runs.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import torch

from raypipe import calibration, plots
from raypipe.config import AblationConfig, EvaluateConfig, PrepareConfig
from raypipe.io import fs as rfs
from raypipe.pipeline.prepare import STATS_FILE, run_prepare
from raypipe.pipeline.train import run_train

log = logging.getLogger(__name__)

TRAINING_METRICS = ("val_accuracy", "val_macro_f1")  # of the best epoch, from training


def evaluated_metrics(split: str) -> tuple[str, ...]:
    """What ``evaluate_split`` adds per run (the validation accuracy is training's own)."""
    if split == "none":
        return ()
    scores = () if split == "val" else (f"{split}_accuracy", f"{split}_macro_f1")
    return (*scores, f"{split}_ece_uncalibrated", f"{split}_ece", f"{split}_ece_if_calibrated")


def _prepared_once(cfg: AblationConfig) -> str:
    """All modes read the same prepared rows (same split, vocabulary and decode)."""
    if cfg.prepared is not None:
        return cfg.prepared
    url = f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}/prepared"
    if rfs.exists(rfs.resolve(url, cfg.storage).join(STATS_FILE)):
        log.info("reusing the prepared data at %s", url)
        return url
    sections = {name: getattr(cfg, name) for name in PrepareConfig.model_fields if hasattr(cfg, name)}
    run_prepare(PrepareConfig(**{**sections, "output": url, "overwrite": True}))
    return url


def planned_runs(cfg: AblationConfig) -> list[tuple[str, int, str]]:
    """(mode, seed, run name) of every training run, modes outermost."""
    if cfg.seeds is None:
        return [(mode, cfg.optim.seed, f"{cfg.run.name}-{mode}") for mode in cfg.modes]
    return [(mode, seed, f"{cfg.run.name}-{mode}-s{seed}") for mode in cfg.modes for seed in cfg.seeds]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def aggregate(runs: list[dict], metrics: tuple[str, ...]) -> list[dict]:
    """One row per mode (in run order): number of runs, mean/std of each metric and of the best epoch."""
    rows = []
    for mode in dict.fromkeys(r["mode"] for r in runs):
        of_mode = [r for r in runs if r["mode"] == mode]
        row = {"mode": mode, "runs": len(of_mode), "seeds": [r["seed"] for r in of_mode]}
        for metric in (*metrics, "best_epoch"):
            row[metric], row[f"{metric}_std"] = mean_std([r[metric] for r in of_mode])
        rows.append(row)
    return rows


def _heading(metric: str) -> str:
    split, _, name = metric.partition("_")
    names = {"accuracy": "accuracy", "macro_f1": "macro-F1", "ece": "ECE", "ece_uncalibrated": "ECE at T=1",
             "ece_if_calibrated": "ECE of a calibrated model"}
    return f"{split} {names[name]}"


def table_markdown(rows: list[dict], metrics: tuple[str, ...]) -> str:
    """The ablation table; rows from ``aggregate``. One run per mode gives the plain one-run table."""
    one_run = all(r.get("runs", 1) == 1 for r in rows)
    headings = ["mode", *([] if one_run else ["seeds"]), "best epoch" + ("" if one_run else " (mean)"),
                *(_heading(m) + ("" if one_run else " (mean ± std)") for m in metrics)]
    lines = ["| " + " | ".join(headings) + " |", "|" + " --- |" * len(headings)]
    for r in rows:
        cells = [r["mode"], *([] if one_run else [str(r["runs"])]), f"{r['best_epoch']:.0f}" if one_run else f"{r['best_epoch']:.1f}"]
        cells += [f"{r[m]:.4f}" if one_run else f"{r[m]:.4f} ± {r[f'{m}_std']:.4f}" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def epoch_bands(histories: list[list[dict]], metric: str = "val_accuracy") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per epoch: (epochs, mean, std, runs) over the runs that reached that epoch (early stopping
    ends runs at different epochs)."""
    longest = max(len(h) for h in histories)
    epochs, means, stds, counts = [], [], [], []
    for e in range(longest):
        values = [h[e][metric] for h in histories if len(h) > e]
        mean, std = mean_std(values)
        epochs.append(e + 1)
        means.append(mean)
        stds.append(std)
        counts.append(len(values))
    return np.array(epochs), np.array(means), np.array(stds), np.array(counts)


def evaluate_run(cfg: AblationConfig, prepared: str, run: dict, output: rfs.Location) -> dict:
    """jobs/evaluate.py's pipeline on ``cfg.evaluate_split`` (output under ``evaluation/<run>``): the run's
    figures there, plus its confusion matrix and confidence bins for the summed plots."""
    from raypipe.pipeline.evaluate import run_evaluate

    split = cfg.evaluate_split
    result = run_evaluate(EvaluateConfig(
        bundle=run["bundle"], prepared=prepared, which_split=split, storage=cfg.storage, ray=cfg.ray,
        output=output.join("evaluation", run["name"]).url,
    ))
    figures = {f"{split}_ece": result["calibration"]["ece"],
               f"{split}_ece_uncalibrated": result["calibration"]["ece_uncalibrated"],
               f"{split}_ece_if_calibrated": result["calibration"]["ece_if_calibrated"]}
    if split != "val":
        figures.update({f"{split}_accuracy": result["accuracy"], f"{split}_macro_f1": result["macro_f1"]})
    return {**figures, "temperature": result["calibration"]["temperature"],
            "image_share": result["calibration"]["image_share"], "classes": list(result["per_class"]),
            "confusion": result["confusion"], "bin_sums": result["calibration"]["bin_sums"]}


def fusion_plots(cfg: AblationConfig, runs: list[dict], output: rfs.Location) -> dict | None:
    """The fusion runs' confusion matrices and confidence bins on the evaluated split, summed over the seeds,
    as ablation_confusion.png and ablation_calibration.png; returns the sums."""
    fusion = [r for r in runs if r["mode"] == "fusion" and "confusion" in r]
    if not fusion:
        return None
    split, what = cfg.evaluate_split, "1 seed" if len(fusion) == 1 else f"summed over {len(fusion)} seeds"
    confusion = np.sum([r["confusion"] for r in fusion], axis=0)
    accuracy = float(np.trace(confusion) / max(1, confusion.sum()))
    title = f"fusion, {split} split ({what}): accuracy {accuracy:.3f}"
    rfs.write_bytes(output.join("ablation_confusion.png"), plots.confusion_matrix(confusion, fusion[0]["classes"], title))
    bins = {name: torch.tensor(np.sum([r["bin_sums"][name] for r in fusion], axis=0)) for name in fusion[0]["bin_sums"]}
    ece = {name: calibration.expected_calibration_error(b) for name, b in bins.items()}
    curves = {f"temperature 1 (ECE {ece['uncalibrated']:.3f})": calibration.reliability(bins["uncalibrated"]),
              f"fitted on validation (ECE {ece['calibrated']:.3f})": calibration.reliability(bins["calibrated"])}
    rfs.write_bytes(output.join("ablation_calibration.png"),
                    plots.reliability_diagram(curves, f"fusion, {split} split ({what})"))
    return {"classes": fusion[0]["classes"], "confusion": confusion.tolist(), "runs": len(fusion),
            "ece_uncalibrated": round(ece["uncalibrated"], 4), "ece": round(ece["calibrated"], 4),
            "ece_if_calibrated": round(calibration.ece_if_calibrated(bins["calibrated"]), 4)}


def run_ablation(cfg: AblationConfig) -> dict:
    prepared = _prepared_once(cfg)
    out = rfs.resolve(f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}", cfg.storage)
    metrics = (*TRAINING_METRICS, *evaluated_metrics(cfg.evaluate_split))
    runs = []
    for mode, seed, name in planned_runs(cfg):
        run_cfg = cfg.model_copy(
            update={
                "prepared": prepared,
                "model": cfg.model.model_copy(update={"mode": mode}),
                "optim": cfg.optim.model_copy(update={"seed": seed}),
                "run": cfg.run.model_copy(update={"name": name}),
            }
        )
        result = run_train(run_cfg)
        best = result["best"]
        run = {"mode": mode, "seed": seed, "name": name, "best_epoch": result["best_epoch"],
               "epochs_run": result["epochs_run"], **{m: best[m] for m in TRAINING_METRICS},
               "bundle": result["bundle"], "history": result["history"]}
        if cfg.evaluate_split != "none":
            run.update(evaluate_run(cfg, prepared, run, out))
        runs.append(run)
    rows = aggregate(runs, metrics)
    table = table_markdown(rows, metrics)
    summary = {"prepared": prepared, "seeds": cfg.seeds, "evaluate_split": cfg.evaluate_split, "metrics": metrics,
               "rows": rows, "runs": runs, "table": table}
    histories: dict[str, list[list[dict]]] = {}
    for run in runs:
        histories.setdefault(run["mode"], []).append(run["history"])
    title = f"{cfg.run.name}: validation accuracy"
    if cfg.seeds is None:
        curves = plots.ablation_curves({mode: h[0] for mode, h in histories.items()}, title)
    else:
        bands = {mode: (*epoch_bands(runs)[:3], len(runs)) for mode, runs in histories.items()}
        curves = plots.seed_band_curves(bands, title)
    rfs.write_bytes(out.join("ablation.png"), curves)
    fusion = fusion_plots(cfg, runs, out)
    if fusion is not None:
        summary["fusion"] = fusion
    rfs.write_text(out.join("ablation.json"), json.dumps(summary, indent=1, default=_json_number))
    rfs.write_text(out.join("ablation.md"), table)
    summary["output"] = out.url
    return summary


def _json_number(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def gap_in_stds(rows: list[dict], better: str, worse: str, metric: str = "val_accuracy") -> float:
    """(mean of ``better`` - mean of ``worse``) / the larger of their standard deviations: the issue's
    "difference above the seed spread" test. inf when both spreads are 0."""
    by_mode = {r["mode"]: r for r in rows}
    gap = by_mode[better][metric] - by_mode[worse][metric]
    spread = max(by_mode[better][f"{metric}_std"], by_mode[worse][f"{metric}_std"])
    return gap / spread if spread > 0 else math.copysign(math.inf, gap) if gap else 0.0
