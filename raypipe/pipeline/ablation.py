"""The paper's ablation: image-only, text-only and fusion trained on the same prepared split.

Writes ablation.json, ablation.md (the table) and ablation.png (validation accuracy per epoch for
each mode, like the paper's Figure 6) next to the runs.
"""

from __future__ import annotations

import json
import logging

from raypipe import plots
from raypipe.config import AblationConfig, PrepareConfig
from raypipe.io import fs as rfs
from raypipe.pipeline.prepare import STATS_FILE, run_prepare
from raypipe.pipeline.train import run_train

log = logging.getLogger(__name__)


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


def table_markdown(rows: list[dict]) -> str:
    lines = ["| mode | best epoch | val accuracy | val macro-F1 |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['mode']} | {r['best_epoch']} | {r['val_accuracy']:.4f} | {r['val_macro_f1']:.4f} |" for r in rows]
    return "\n".join(lines) + "\n"


def run_ablation(cfg: AblationConfig) -> dict:
    prepared = _prepared_once(cfg)
    rows, histories = [], {}
    for mode in cfg.modes:
        mode_cfg = cfg.model_copy(
            update={
                "prepared": prepared,
                "model": cfg.model.model_copy(update={"mode": mode}),
                "run": cfg.run.model_copy(update={"name": f"{cfg.run.name}-{mode}"}),
            }
        )
        result = run_train(mode_cfg)
        best = result["best"]
        rows.append(
            {"mode": mode, "best_epoch": result["best_epoch"], "val_accuracy": best["val_accuracy"],
             "val_macro_f1": best["val_macro_f1"], "bundle": result["bundle"]}
        )
        histories[mode] = result["history"]
    out = rfs.resolve(f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}", cfg.storage)
    summary = {"prepared": prepared, "rows": rows, "histories": histories}
    rfs.write_text(out.join("ablation.json"), json.dumps(summary, indent=1))
    rfs.write_text(out.join("ablation.md"), table_markdown(rows))
    rfs.write_bytes(out.join("ablation.png"), plots.ablation_curves(histories, f"{cfg.run.name}: validation accuracy"))
    summary["output"] = out.url
    return summary
