"""The paper's ablation: image-only, text-only and fusion trained on the same prepared split, each
with one or more seeds.

Writes, under ``run.storage_path/run.name``:

    ablation.json            every run (mode, seed, best epoch, metrics, history, bundle) and the table
    ablation.md              the table: one row per mode (with seeds: mean and standard deviation)
    ablation.png             validation accuracy per epoch (like the paper's Figure 6); with seeds the
                             mean per mode with a band of one standard deviation
    ablation_confusion.png   (confusion_matrix=true) the fusion model's validation confusion matrix,
                             summed over its seeds

Each run is an ordinary ``run_train`` run: named ``<run.name>-<mode>`` (one seed, the default) or
``<run.name>-<mode>-s<seed>``, so re-running the same command resumes or reuses finished runs.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np

from raypipe import plots
from raypipe.config import AblationConfig, EvaluateConfig, PrepareConfig
from raypipe.io import fs as rfs
from raypipe.pipeline.prepare import STATS_FILE, run_prepare
from raypipe.pipeline.train import run_train

log = logging.getLogger(__name__)

METRICS = ("val_accuracy", "val_macro_f1")


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


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per mode (in run order): number of runs, mean/std of each metric and of the best epoch."""
    rows = []
    for mode in dict.fromkeys(r["mode"] for r in runs):
        of_mode = [r for r in runs if r["mode"] == mode]
        row = {"mode": mode, "runs": len(of_mode), "seeds": [r["seed"] for r in of_mode]}
        for metric in (*METRICS, "best_epoch"):
            row[metric], row[f"{metric}_std"] = mean_std([r[metric] for r in of_mode])
        rows.append(row)
    return rows


def table_markdown(rows: list[dict]) -> str:
    """The ablation table; rows from ``aggregate``. One run per mode gives the plain one-run table."""
    if all(r.get("runs", 1) == 1 for r in rows):
        lines = ["| mode | best epoch | val accuracy | val macro-F1 |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['mode']} | {r['best_epoch']:.0f} | {r['val_accuracy']:.4f} | {r['val_macro_f1']:.4f} |" for r in rows]
        return "\n".join(lines) + "\n"
    lines = ["| mode | seeds | best epoch (mean) | val accuracy (mean ± std) | val macro-F1 (mean ± std) |",
             "| --- | --- | --- | --- | --- |"]
    lines += [
        f"| {r['mode']} | {r['runs']} | {r['best_epoch']:.1f} | {r['val_accuracy']:.4f} ± {r['val_accuracy_std']:.4f} "
        f"| {r['val_macro_f1']:.4f} ± {r['val_macro_f1_std']:.4f} |"
        for r in rows
    ]
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


def fusion_confusion(cfg: AblationConfig, prepared: str, runs: list[dict], output: rfs.Location) -> dict | None:
    """Evaluates every fusion run on the validation split (jobs/evaluate.py's pipeline, output under
    ``evaluation/<run>``) and sums the confusion matrices."""
    from raypipe.pipeline.evaluate import run_evaluate

    fusion = [r for r in runs if r["mode"] == "fusion"]
    if not fusion:
        return None
    total, classes = None, None
    for run in fusion:
        result = run_evaluate(EvaluateConfig(
            bundle=run["bundle"], prepared=prepared, which_split="val", storage=cfg.storage, ray=cfg.ray,
            output=output.join("evaluation", run["name"]).url,
        ))
        confusion = np.array(result["confusion"], dtype=np.int64)
        total = confusion if total is None else total + confusion
        classes = list(result["per_class"])
    return {"classes": classes, "confusion": total.tolist(), "runs": len(fusion)}


def run_ablation(cfg: AblationConfig) -> dict:
    prepared = _prepared_once(cfg)
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
        runs.append(
            {"mode": mode, "seed": seed, "name": name, "best_epoch": result["best_epoch"],
             "epochs_run": result["epochs_run"], **{m: best[m] for m in METRICS}, "bundle": result["bundle"],
             "history": result["history"]}
        )
    out = rfs.resolve(f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}", cfg.storage)
    rows = aggregate(runs)
    table = table_markdown(rows)
    summary = {"prepared": prepared, "seeds": cfg.seeds, "rows": rows, "runs": runs, "table": table}
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
    if cfg.confusion_matrix:
        confusion = fusion_confusion(cfg, prepared, runs, out)
        if confusion is not None:
            summary["fusion_confusion"] = confusion
            matrix = np.array(confusion["confusion"])
            accuracy = float(np.trace(matrix) / max(1, matrix.sum()))
            what = "1 seed" if confusion["runs"] == 1 else f"summed over {confusion['runs']} seeds"
            title = f"fusion, validation split ({what}): accuracy {accuracy:.3f}"
            rfs.write_bytes(out.join("ablation_confusion.png"), plots.confusion_matrix(matrix, confusion["classes"], title))
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
