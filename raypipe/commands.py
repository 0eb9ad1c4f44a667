"""The jobs raypipe runs, one entry each: its config model, what it does, its examples, and what it
prints when it is done. The `raypipe` command and the scripts in jobs/ both run these."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from raypipe.config import (
    AblationConfig, EvaluateConfig, IngestConfig, LabelJobConfig, PrepareConfig, TrainConfig,
)


@dataclass(frozen=True)
class Command:
    name: str
    config: type[BaseModel]
    summary: str  # one line
    examples: str  # shown by --help as written
    run: Callable[[BaseModel], dict]  # runs the job and prints its result

    @property
    def script(self) -> str:
        return f"jobs/{self.name}.py"


def _prepare(cfg: PrepareConfig) -> dict:
    from raypipe.pipeline.prepare import run_prepare, summary_lines

    stats = run_prepare(cfg)
    print("\n".join(summary_lines(stats)))
    print(json.dumps({k: stats[k] for k in ("rows_in", "rows_ok", "by_status")}))
    return stats


def _train(cfg: TrainConfig) -> dict:
    from raypipe.pipeline.train import run_train

    result = run_train(cfg)
    best = result["best"]
    print(
        f"best epoch {result['best_epoch']}/{result['epochs_run']}: val_acc {best['val_accuracy']:.4f} "
        f"macro_f1 {best['val_macro_f1']:.4f}; bundle {result['bundle']} ({result['identity']})"
    )
    print(json.dumps({"bundle": result["bundle"], "val_accuracy": best["val_accuracy"]}))
    return result


def _evaluate(cfg: EvaluateConfig) -> dict:
    from raypipe.pipeline.evaluate import run_evaluate

    result = run_evaluate(cfg)
    print(f"{result['split']} split, {result['rows']} rows: accuracy {result['accuracy']:.4f}, "
          f"macro-F1 {result['macro_f1']:.4f} -> {result['output']}")
    calibrated = result["calibration"]
    print(f"calibration: ECE {calibrated['ece']:.4f} at the bundle's temperature {calibrated['temperature']:.3g} "
          f"({calibrated['ece_uncalibrated']:.4f} at 1); a perfectly calibrated model would show "
          f"{calibrated['ece_if_calibrated']:.4f} on these rows from sampling alone")
    for name, row in result["per_class"].items():
        print(f"  {name:>16}  precision {row['precision']:.3f}  recall {row['recall']:.3f}  "
              f"f1 {row['f1']:.3f}  support {int(row['support'])}")
    print(json.dumps({k: result[k] for k in ("accuracy", "macro_f1", "rows")}))
    return result


def _ablation(cfg: AblationConfig) -> dict:
    from raypipe.pipeline.ablation import run_ablation

    summary = run_ablation(cfg)
    print(summary["table"], end="")
    extra = " + ablation_confusion.png" if "fusion_confusion" in summary else ""
    print(f"table, curves and runs: {summary['output']}/ablation.{{md,png,json}}{extra}")
    return summary


def _label(cfg: LabelJobConfig) -> dict:
    from raypipe.pipeline.label import LabelError, run_label, summary_lines

    summary = run_label(cfg)
    print("\n".join(summary_lines(summary)))
    print(json.dumps({k: summary[k] for k in ("rows_in", "rows_labeled", "by_status", "pairs_per_s", "output")}))
    if not summary["complete"]:
        raise LabelError(f"{len(summary['files']['incomplete'])} input file(s) are not completely labeled; "
                         "run the same command again to finish them")
    return summary


def _ingest(cfg: IngestConfig) -> dict:
    from raypipe.ingest import run_ingest, summary_lines

    summary = run_ingest(cfg)
    print("\n".join(summary_lines(summary)))
    print(json.dumps({k: summary[k] for k in ("rows", "shards", "by_status", "output")}))
    return summary


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("ingest", IngestConfig, "Turn a manifest of your own labeled image-text pairs into shards in "
            "img2dataset's Parquet format.", """\
  raypipe ingest manifest=pairs.csv output=/data/shards          # columns image, text, label
  raypipe ingest --config jobs/configs/ingest.yaml
  raypipe ingest manifest=s3://bucket/pairs.parquet image_column=path text_column=alt \\
      label_column=category key_column=id output=s3://bucket/shards
  raypipe prepare data.input=/data/shards labels.column=label     # then as any img2dataset download

The manifest (CSV, JSON lines or Parquet) names each image by a local path (relative to the manifest
or base_dir), an http(s):// or s3:// URL, or holds its bytes. A row whose image cannot be read or
decoded is kept with img2dataset's status (failed_to_download / failed_to_resize) and a message.""", _ingest),
    Command("prepare", PrepareConfig, "Read image-text shards, preprocess them in parallel on Ray, write prepared "
            "Parquet shards.", """\
  raypipe prepare                                  # the built-in sample, local Ray
  raypipe prepare --config jobs/configs/prepare.yaml data.input=s3://bucket/coyo output=s3://bucket/prepared""",
            _prepare),
    Command("train", TrainConfig, "Train the CNN + LSTM-attention fusion model on Ray Train; write checkpoints "
            "and a model bundle.", """\
  raypipe train                                   # the built-in sample, local Ray, a few minutes
  raypipe train prepared=~/.cache/raypipe/prepared scaling.num_workers=2 optim.epochs=30
  ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/train.yaml

Re-running with the same run.name and run.storage_path resumes from the last checkpoint.""", _train),
    Command("ablation", AblationConfig, "Train image-only, text-only and fusion models on the same split and "
            "compare them.", """\
  raypipe ablation                                  # the built-in sample
  raypipe ablation prepared=s3://bucket/prepared optim.epochs=100 optim.early_stopping_patience=10
  raypipe ablation prepared=/data/prepared 'seeds=[0,1,2,3,4]' confusion_matrix=true

Writes ablation.md, ablation.json and ablation.png (and ablation_confusion.png) under
run.storage_path/run.name. With seeds, each mode is trained once per seed and the table gives mean
and standard deviation.""", _ablation),
    Command("evaluate", EvaluateConfig, "Evaluate a model bundle: metrics.json, per_class.csv, "
            "confusion_matrix.png, training_curves.png.", """\
  raypipe evaluate                                          # the default run's bundle, built-in sample
  raypipe evaluate bundle=s3://bucket/runs/r1/bundle prepared=s3://bucket/prepared""", _evaluate),
    Command("label", LabelJobConfig, "Label Parquet collections of image-text pairs (or img2dataset shards) with "
            "a trained model bundle.", """\
  raypipe label bundle=~/raypipe-runs/demo-fusion/bundle output=/tmp/labels   # the built-in sample
  raypipe label --config jobs/configs/label.yaml
  raypipe label data.input=s3://bucket/pairs data.format=parquet data.key_column=id \\
      data.image_column=image data.text_column=alt_text data.keep_columns=[url] \\
      bundle=s3://bucket/runs/r1/bundle output=s3://bucket/labels explain=true

One output directory per input file; re-running the same command finishes what a crash left undone
and skips complete outputs (overwrite=true relabels everything). See docs/labeling.md.""", _label),
)}
