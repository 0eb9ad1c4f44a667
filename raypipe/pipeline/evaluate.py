"""`evaluate`: a model bundle on a prepared split (or raw labeled shards preprocessed with the
bundle's own settings) -> metrics.json, per_class.csv, confusion_matrix.png, calibration.png (reliability
diagram before and after temperature scaling), training_curves.png."""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

from raypipe import calibration, plots, schema
from raypipe.bundle import load_bundle
from raypipe.config import DataSections, EvaluateConfig
from raypipe.errors import UserError
from raypipe.io import fs as rfs
from raypipe.metrics import confusion_matrix, per_class, summary
from raypipe.pipeline.capacity import predictor_pool
from raypipe.pipeline.cluster import start_cluster
from raypipe.pipeline.predict import PREDICTED_ID, BundlePredictor
from raypipe.pipeline.prepare import PreparedOutput, input_paths, plan_prepare, prepared_dataset
from raypipe.transforms.split import rows_of_split

log = logging.getLogger(__name__)


class EvaluateError(UserError, RuntimeError):
    """An evaluation that cannot run as configured."""


# What evaluation reads of a prepared row: the model inputs, the truth, and what selects and counts rows.
EVALUATE_COLUMNS = [schema.KEY, schema.IMAGE, schema.TOKENS, schema.LABEL_ID, schema.SPLIT, schema.STATUS,
                    schema.ERROR_MESSAGE]


def _rows_to_evaluate(cfg: EvaluateConfig, bundle):
    if cfg.prepared is not None:
        prepared = PreparedOutput.open(rfs.resolve(cfg.prepared, cfg.storage))
        differences = prepared.differences(bundle.vocab, bundle.classes, bundle.image, bundle.text)
        if differences:
            raise EvaluateError(
                f"{cfg.prepared} was not prepared the way the bundle's model expects: {'; '.join(differences)}. "
                "Evaluate the raw shards instead (leave `prepared` unset): they are then preprocessed with the "
                "bundle's own settings"
            )
        start_cluster(cfg.ray, cfg.storage, {"bundle": cfg.bundle, "prepared": cfg.prepared})
        return prepared.rows(EVALUATE_COLUMNS)
    sections = DataSections(
        data=cfg.data,
        labels=cfg.labels.model_copy(update={"classes": list(bundle.classes)}),
        image=bundle.image,
        text=bundle.text,
        split=cfg.split,
        storage=cfg.storage,
        ray=cfg.ray,
    )
    plan = plan_prepare(sections)
    start_cluster(cfg.ray, cfg.storage, {"bundle": cfg.bundle, **input_paths(sections)})
    return prepared_dataset(plan, bundle.vocab, bundle.classes).select_columns(EVALUATE_COLUMNS)


def run_evaluate(cfg: EvaluateConfig) -> dict:
    bundle = load_bundle(cfg.bundle, cfg.storage)
    output = rfs.resolve_output(cfg.output or f"{cfg.bundle.rstrip('/')}/evaluation", cfg.storage)
    rows = _rows_to_evaluate(cfg, bundle)
    compute = predictor_pool(cfg.predict, cfg.ray.node_wait_s)
    if cfg.which_split != "all":
        rows = rows.map_batches(schema.Typed(rows_of_split), fn_args=(cfg.which_split,), batch_format="numpy")
    predictions = rows.map_batches(
        BundlePredictor,
        fn_constructor_args=(cfg.bundle, cfg.storage, cfg.predict.top_k, None, 0, None, cfg.predict.precision),
        fn_constructor_kwargs={"uncalibrated": True},
        batch_size=cfg.predict.batch_size,
        batch_format="numpy",
        **compute,
    ).select_columns([schema.LABEL_ID, PREDICTED_ID, schema.STATUS, schema.CONFIDENCE, schema.CONFIDENCE_UNCALIBRATED])

    n = len(bundle.classes)
    confusion = np.zeros((n, n), dtype=np.int64)
    # Confidence bins (calibration.bin_sums) with the bundle's temperature and without it.
    bins = {name: torch.zeros(calibration.ECE_BINS, 3, dtype=torch.float64) for name in ("calibrated", "uncalibrated")}
    skipped: dict[str, int] = {}
    for batch in predictions.iter_batches(batch_format="numpy", batch_size=4096):
        ok = batch[schema.STATUS] == schema.Status.OK.value
        for status in batch[schema.STATUS][~ok]:
            skipped[status] = skipped.get(status, 0) + 1
        # Null predictions (rows that are not ok) make the column float; the ok rows are whole numbers.
        truth, predicted = batch[schema.LABEL_ID][ok], batch[PREDICTED_ID][ok].astype(np.int64)
        confusion += confusion_matrix(truth, predicted, n)
        correct = torch.from_numpy(truth == predicted)
        for name, column in (("calibrated", schema.CONFIDENCE), ("uncalibrated", schema.CONFIDENCE_UNCALIBRATED)):
            bins[name] += calibration.bin_sums(torch.from_numpy(batch[column][ok].astype(np.float64)), correct)
    if confusion.sum() == 0:
        hint = " (data prepared with split.test_fraction=0 has no test split: use which_split=val)" if cfg.which_split == "test" else ""
        raise EvaluateError(f"no labeled rows to evaluate in split {cfg.which_split!r}{hint} (skipped: {skipped})")

    stats = per_class(confusion)
    result = {
        "bundle": cfg.bundle,
        "identity": bundle.identity,
        "split": cfg.which_split,
        "rows": int(confusion.sum()),
        "rows_skipped_by_status": skipped,
        **summary(confusion),
        "per_class": {
            c: {k: round(float(stats[k][i]), 4) for k in ("precision", "recall", "f1", "support")}
            for i, c in enumerate(bundle.classes)
        },
        "confusion": confusion.tolist(),
        "calibration": {
            "temperature": bundle.temperature,  # fitted on the validation split when the model was trained
            "image_share": bundle.model_config.image_share if bundle.model_config.late_fusion else None,
            "ece": round(calibration.expected_calibration_error(bins["calibrated"]), 4),
            "ece_uncalibrated": round(calibration.expected_calibration_error(bins["uncalibrated"]), 4),
            # What sampling alone gives a perfectly calibrated model on this many rows: an "ece" near it is noise.
            "ece_if_calibrated": round(calibration.ece_if_calibrated(bins["calibrated"]), 4),
            "reliability": {name: calibration.reliability(b) for name, b in bins.items()},
            "bin_sums": {name: b.tolist() for name, b in bins.items()},  # [ECE_BINS, 3]: rows, confidence, correct
        },
    }
    rfs.write_text(output.join("metrics.json"), json.dumps(result, indent=1, ensure_ascii=False))
    table = ["class,precision,recall,f1,support"] + [
        f"{c},{v['precision']},{v['recall']},{v['f1']},{int(v['support'])}" for c, v in result["per_class"].items()
    ]
    rfs.write_text(output.join("per_class.csv"), "\n".join(table) + "\n")
    title = f"{bundle.model_config.mode} model, {cfg.which_split} split: accuracy {result['accuracy']:.3f}"
    rfs.write_bytes(output.join("confusion_matrix.png"), plots.confusion_matrix(confusion, list(bundle.classes), title))
    reliability = result["calibration"]["reliability"]
    rfs.write_bytes(output.join("calibration.png"), plots.reliability_diagram(
        {f"temperature 1 (ECE {result['calibration']['ece_uncalibrated']:.3f})": reliability["uncalibrated"],
         f"temperature {bundle.temperature:.2f} (ECE {result['calibration']['ece']:.3f})": reliability["calibrated"]},
        f"{bundle.model_config.mode} model, {cfg.which_split} split",
    ))
    if bundle.metrics.get("history"):
        rfs.write_bytes(output.join("training_curves.png"), plots.training_curves(bundle.metrics["history"], title))
    result["output"] = output.url
    return result
