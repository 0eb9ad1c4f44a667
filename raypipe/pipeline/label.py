"""`label`: a model bundle over large collections of image-text pairs -> one labeled row per input row.

Output layout (at ``config.output``, any URL)::

    <name>/part-<uuid>.parquet   the rows of one input file (<name>: the file's stem), any number of parts
    _job.json                    which bundle (identity) writes here; another bundle needs overwrite=true
    _summary.json                rows in / labeled / per status, files done / skipped, throughput

Restartable by construction (planned on the driver, before Ray starts):

* the expected row count of each input file comes from its Parquet footer (img2dataset tars: from
  the ``.parquet`` img2dataset writes beside each tar, which lists failed downloads too);
* an input is *complete* when its output parts are all readable, hold exactly the expected number of
  rows, and their keys are the input's keys, each as often as the input has it;
* complete inputs are skipped (unless ``overwrite=true``); the output of any other input is deleted
  and the input labeled again. Part names are unique per write (uuid), so a retried task never
  overwrites a part: it can only add one, which the completeness check then catches.

So a re-run after a crash at any point finishes with no duplicates and no gaps.

Pipeline: read (Ray Data read tasks) -> ``ModelInputPreparer`` in map tasks (CPU, the bundle's own
image / text settings and vocabulary) -> ``BundlePredictor`` in an autoscaling actor pool (the bundle
loaded once per actor) -> ``PartWriter`` actors (no CPU reserved) that write each input file's rows
to its own directory and return row counts, which the driver turns into progress lines.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from raypipe import schema
from raypipe.bundle import Bundle, load_bundle
from raypipe.config import LabelJobConfig, dump_config
from raypipe.console import say
from raypipe.datasets import ensure_default_sample
from raypipe.io import fs as rfs
from raypipe.io.per_input import (
    COUNT_OK, COUNT_ROWS, InputFile, OutputState, input_files, input_keys, output_names_with_bare_paths,
    only, output_state, parallel,
)
from raypipe.io.readers import InputPlan, plan_inputs, read_pairs
from raypipe.pipeline import predict
from raypipe.pipeline.capacity import predictor_pool
from raypipe.pipeline.cluster import start_cluster
from raypipe.pipeline.label_writer import (
    LabelError, PartWriter, output_schema,
)
from raypipe.schema import Status
from raypipe.transforms.pairs import ModelInputPreparer
from raypipe.transforms.text import ensure_wordnet

log = logging.getLogger(__name__)

JOB_FILE, SUMMARY_FILE = "_job.json", "_summary.json"


# --------------------------------------------------------------------------------------------------
# Driver: completeness of outputs (expected rows per input: raypipe/io/per_input.py)


def _read_output(out: rfs.Location, state: OutputState) -> tuple[Counter, Counter]:
    """Keys and statuses of an input's output parts, in one read per part (which also sets
    ``state.duplicate_keys``)."""
    keys, statuses = Counter(), Counter()
    for path in state.files:
        table = pq.read_table(path, columns=[schema.KEY, schema.STATUS], filesystem=out.fs)
        keys.update(table.column(0).to_pylist())
        statuses.update(table.column(1).to_pylist())
    state.duplicate_keys = sum(keys.values()) - len(keys)
    return keys, statuses


def check_output(
    plan: InputPlan, out: rfs.Location, item: InputFile, keys_verified: bool = False
) -> tuple[OutputState, bool, Counter]:
    """An input's output: its state, whether it is complete, and its rows per status.

    Complete = readable Parquet parts, the expected number of rows, and exactly the input's keys, each
    as often as there (not compared again when ``keys_verified``). Each part is read once, for keys
    and statuses (statuses of an unreadable output are not counted)."""
    state = output_state(out, item.name)
    if not state.files and item.expected_rows == 0:
        return state, True, Counter()  # an empty input: no part is written, and nothing is missing
    if not state.files or not state.readable or any(not p.endswith(".parquet") for p in state.files):
        return state, False, Counter()
    keys, statuses = _read_output(out, state)
    if state.rows != item.expected_rows:
        return state, False, statuses
    return state, keys_verified or keys == input_keys(plan, item), statuses


# --------------------------------------------------------------------------------------------------
# The job


@dataclass(frozen=True)
class LabelPlan:
    cfg: LabelJobConfig
    bundle: Bundle
    inputs: InputPlan
    files: tuple[InputFile, ...]
    pending: tuple[InputFile, ...]
    skipped: tuple[InputFile, ...]
    out: rfs.Location
    out_schema: pa.Schema




def _check_job_file(cfg: LabelJobConfig, out: rfs.Location, bundle: Bundle) -> None:
    job = out.join(JOB_FILE)
    if rfs.exists(job) and not cfg.overwrite:
        previous = json.loads(rfs.read_text(job))
        if previous.get("model") != bundle.identity:
            raise LabelError(
                f"{out.url} holds labels of another bundle (model {previous.get('model')}, {previous.get('bundle')}); "
                f"this bundle is {bundle.identity}. Pass overwrite=true to relabel, or choose another output"
            )


def plan_label(cfg: LabelJobConfig) -> LabelPlan:
    """Everything decided on the driver before Ray starts: inputs, expected rows, what is done."""
    bundle = load_bundle(cfg.bundle, cfg.storage)
    ensure_default_sample(cfg.data)
    inputs = plan_inputs(cfg.data, cfg.storage, tuple(dict.fromkeys(cfg.data.keep_columns)))
    if bundle.text.lemmatize:
        ensure_wordnet()
    out = rfs.resolve_output(cfg.output, cfg.storage)
    _check_job_file(cfg, out, bundle)
    files = input_files(inputs)
    if cfg.overwrite:
        checks = [(state, False, None) for state in parallel(lambda item: output_state(out, item.name), files)]
    else:
        checks = parallel(lambda item: check_output(inputs, out, item), files)
    pending, skipped = [], []
    for item, (state, complete, _) in zip(files, checks):
        if complete:
            skipped.append(item)
            continue
        if state.files:
            log.info("%s: relabeling (found %s)", item.path, state.describe(item.expected_rows))
        pending.append(item)
    out_schema = output_schema({c: inputs.column_types[c] for c in dict.fromkeys(cfg.data.keep_columns)}, cfg.explain)
    return LabelPlan(cfg, bundle, inputs, tuple(files), tuple(pending), tuple(skipped), out, out_schema)


def labeled_dataset(plan: LabelPlan, compute: dict):
    """Lazily: the pending inputs' rows, preprocessed, predicted and written; yields count rows."""
    from ray.data import ActorPoolStrategy

    cfg, bundle = plan.cfg, plan.bundle
    preparer = ModelInputPreparer(bundle.image, bundle.text, bundle.vocab.token_to_id, bundle.model_config.mode)
    keep = [schema.KEY, schema.IMAGE, schema.TOKENS, schema.SOURCE, schema.STATUS, schema.ERROR_MESSAGE,
            *cfg.data.keep_columns]
    names = output_names_with_bare_paths([item.path for item in plan.files])  # as item.name
    return (
        read_pairs(only(plan.inputs, plan.pending), then=(preparer,), batch_size=cfg.ray.batch_size)
        .select_columns(list(dict.fromkeys(keep)))
        .map_batches(
            predict.BundlePredictor,
            fn_constructor_args=(cfg.bundle, cfg.storage, cfg.predict.top_k, None,
                                 cfg.explain_words if cfg.explain else 0,
                                 {c: plan.inputs.column_types[c] for c in cfg.data.keep_columns},
                                 cfg.predict.precision),
            batch_size=cfg.predict.batch_size,
            batch_format="numpy",
            **compute,
        )
        .map_batches(
            PartWriter,
            fn_constructor_args=(plan.out, names, plan.out_schema, bundle.identity),
            batch_size=cfg.rows_per_part,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=1, max_size=max(1, compute["compute"].max_size // 4)),
            num_cpus=0,
        )
    )


def collect_summary(plan: LabelPlan) -> dict:
    """Counts read back from the output (so they match it), with each input's completeness; inputs
    skipped as complete were verified at planning and only have their statuses counted. Duplicate
    keys are counted in complete outputs only, whose keys are their input's: elsewhere a repeated key
    may be a retried write rather than the input's."""
    by_status: Counter = Counter()
    complete, incomplete = [], []
    duplicate_keys = 0
    skipped = {item.name for item in plan.skipped}
    checks = parallel(lambda item: check_output(plan.inputs, plan.out, item, item.name in skipped), list(plan.files))
    for item, (state, done, statuses) in zip(plan.files, checks):
        (complete if done else incomplete).append(item)
        by_status.update(statuses)
        duplicate_keys += state.duplicate_keys if done else 0
    return {
        "rows_in": sum(item.expected_rows for item in plan.files),
        "rows_out": sum(by_status.values()),
        "rows_labeled": by_status[Status.OK.value],
        "by_status": dict(by_status.most_common()),
        "duplicate_keys": duplicate_keys,
        "files": {
            "total": len(plan.files),
            "labeled": len(plan.pending),
            "skipped_complete": len(plan.skipped),
            "complete": len(complete),
            "incomplete": [item.path for item in incomplete],
        },
        "complete": not incomplete,
    }


def run_label(cfg: LabelJobConfig) -> dict:
    started = time.perf_counter()
    plan = plan_label(cfg)  # everything that can be checked without a cluster is checked first
    bundle, out = plan.bundle, plan.out
    for item in plan.pending:  # partial or stale outputs: labeled again from scratch
        rfs.delete_dir(out.join(item.name))
    rfs.write_text(
        out.join(JOB_FILE),
        json.dumps({"bundle": cfg.bundle, "model": bundle.identity, "mode": bundle.model_config.mode,
                    "config": dump_config(cfg)}, indent=1),
    )
    pending_rows = sum(item.expected_rows for item in plan.pending)
    say(f"labeling {len(plan.pending)} of {len(plan.files)} input file(s) ({pending_rows} rows; "
         f"{len(plan.skipped)} already complete) with {bundle.model_config.mode} model {bundle.identity} -> {out.url}")
    rows_done = ok_done = 0
    label_started = time.perf_counter()
    if plan.pending:
        start_cluster(cfg.ray, cfg.storage,
                      {"data.input": ", ".join(cfg.data.input), "bundle": cfg.bundle, "output": cfg.output})
        pool = predictor_pool(cfg.predict, cfg.ray.node_wait_s, cfg.predict.cpus_per_actor)
        label_started = time.perf_counter()  # throughput without the cluster start
        last = time.perf_counter()
        for batch in labeled_dataset(plan, pool).iter_batches(batch_format="numpy", batch_size=None):
            rows_done += int(batch[COUNT_ROWS].sum())
            ok_done += int(batch[COUNT_OK].sum())
            now = time.perf_counter()
            if now - last >= cfg.progress_interval_s:
                last = now
                rate = rows_done / max(now - label_started, 1e-9)
                say(f"  labeled {rows_done}/{pending_rows} rows ({ok_done} ok), {rate:.1f} pairs/s")
    label_elapsed = time.perf_counter() - label_started
    summary = collect_summary(plan)
    elapsed = time.perf_counter() - started
    summary.update(
        rows_processed=rows_done,
        elapsed_s=round(elapsed, 2),
        labeling_s=round(label_elapsed, 2),
        pairs_per_s=round(rows_done / label_elapsed, 1) if rows_done and label_elapsed else None,
        output=out.url,
        bundle=cfg.bundle,
        model=bundle.identity,
        mode=bundle.model_config.mode,
        input_format=plan.inputs.format,
        precision=predict.pool_precision(cfg.predict.precision, pool if plan.pending else None),
    )
    rfs.write_text(out.join(SUMMARY_FILE), json.dumps(summary, indent=1, ensure_ascii=False))
    return summary


def summary_lines(summary: dict) -> list[str]:
    files = summary["files"]
    rate = f"{summary['pairs_per_s']} pairs/s" if summary["pairs_per_s"] else "nothing to label"
    lines = [
        f"labeled {summary['rows_processed']} rows in {summary['elapsed_s']} s ({rate}) with "
        f"{summary['mode']} model {summary['model']} -> {summary['output']}",
        f"  files: {files['total']} ({files['labeled']} labeled now, {files['skipped_complete']} already complete, "
        f"{len(files['incomplete'])} incomplete)",
        f"  rows in: {summary['rows_in']}, rows out: {summary['rows_out']}, labeled (ok): {summary['rows_labeled']}",
    ]
    lines += [f"  {status}: {count}" for status, count in summary["by_status"].items() if status != Status.OK.value]
    if summary["duplicate_keys"]:
        lines.append(f"  duplicate keys: {summary['duplicate_keys']} rows share their key with an earlier row of "
                     "the same input file (not unique there); each was labeled on its own")
    if files["incomplete"]:
        lines.append(f"  INCOMPLETE: {', '.join(files['incomplete'][:5])}; run the same command again to finish")
    return lines
