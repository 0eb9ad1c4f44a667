"""`prepare`: read shards -> preprocess in parallel Ray Data tasks -> prepared Parquet + metadata.

Output layout (at ``config.output``, any URL)::

    prepared/*.parquet   every input row: key, image (S*S*3 bytes of uint8 pixels, row-major),
                         tokens int32[L], length, label, label_id, split, source, status,
                         error_message, passthrough columns
    vocab.json           the vocabulary counted on the training split (id 0 pad, 1 unknown)
    classes.json         the class list; a label id is a position in it
    stats.json           rows in / ok / per error kind, in total and per input shard; duplicate keys
    prepare_config.json  the resolved configuration (holds no credentials)

Two passes: the first reads only what the vocabulary and class list need (text and labels; Parquet
inputs skip the image column), the second does the full preprocessing with the frozen vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from functools import partial

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raypipe import schema
from raypipe.config import DataSections, PrepareConfig, dump_config
from raypipe.console import say
from raypipe.datasets import ensure_default_sample
from raypipe.errors import UserError
from raypipe.io import fs as rfs
from raypipe.io.per_input import (
    complete, input_files, only, output_names_with_bare_paths, output_state, parallel, write_parts,
)
from raypipe.io.readers import InputPlan, SidecarJoin, first_values, plan_inputs, read_pairs, read_sidecar
from raypipe.pipeline.cluster import start_cluster, wait_for_free_cpus
from raypipe.schema import Status
from raypipe.transforms.image import ImageOptions, pixels_as_bytes, unpack_images
from raypipe.transforms.labels import COYO_LABELS, COYO_PROBS, LabelRule, class_order, label_text
from raypipe.transforms.pairs import TOKEN, PairPreparer, count_batch
from raypipe.transforms.split import SplitRule
from raypipe.transforms.text import TextNormalizer, TextOptions, ensure_wordnet
from raypipe.transforms.vocab import Vocabulary

log = logging.getLogger(__name__)

PREPARED_DIR = "prepared"
STAGING_PREFIX = ".staging-"  # a run's output until it is complete
VOCAB_FILE, CLASSES_FILE, STATS_FILE, CONFIG_FILE = "vocab.json", "classes.json", "stats.json", "prepare_config.json"
EXAMPLES_PER_STATUS = 5


class PrepareError(UserError, RuntimeError):
    """A prepare run that cannot start or finish; the message says what to do."""


def input_paths(cfg: DataSections) -> dict[str, str | None]:
    """The settings naming what the read tasks open, for the check of paths on a multi-node cluster."""
    return {"data.input": ", ".join(cfg.data.input), "labels.sidecar": cfg.labels.sidecar}


def _label_inputs(cfg: DataSections) -> tuple[str, ...]:
    if cfg.labels.source == "none":
        return ()
    return (COYO_LABELS, COYO_PROBS) if cfg.labels.source == "coyo_labeled" else (cfg.labels.column,)


def _check_output(cfg: PrepareConfig) -> rfs.Location:
    """The output location; an existing prepare output is refused unless overwrite=true, and even then
    left in place until the new one is complete (``run_prepare`` writes to a staging folder first)."""
    out = rfs.resolve_output(cfg.output, cfg.storage)
    prepared = out.join(PREPARED_DIR)
    if rfs.is_nonempty_dir(prepared) and not cfg.overwrite:
        raise PrepareError(f"{prepared.url} already holds prepared data; pass overwrite=true to replace it")
    return out


@dataclass(frozen=True)
class PreparePlan:
    """Everything the prepare passes need, resolved and checked on the driver before Ray starts."""

    cfg: DataSections
    inputs: InputPlan
    sidecar: SidecarJoin | None
    split: SplitRule

    def label_rule(self, classes: tuple[str, ...]) -> LabelRule | None:
        labels = self.cfg.labels
        return None if labels.source == "none" else LabelRule(labels.source, classes, labels.column, labels.min_prob)

    def pairs(self, then: tuple = (), with_images: bool = True):
        """The normalized rows (with the label sidecar's columns), with the per-batch steps ``then``."""
        added = {}
        if self.sidecar is not None:
            then, added = (self.sidecar, *then), self.sidecar.column_types
        return read_pairs(self.inputs, self.cfg.data.limit, with_images, then, self.cfg.ray.batch_size, added)


def plan_prepare(cfg: DataSections) -> PreparePlan:
    ensure_default_sample(cfg.data)
    sidecar_join = cfg.labels.join_on if cfg.labels.sidecar else None
    label_inputs = _label_inputs(cfg)
    shard_columns = [*cfg.data.keep_columns]
    if sidecar_join is None:
        shard_columns += label_inputs
    elif sidecar_join != schema.KEY:
        shard_columns.append(sidecar_join)
    inputs = plan_inputs(cfg.data, cfg.storage, tuple(dict.fromkeys(shard_columns)))
    sidecar = (
        SidecarJoin(read_sidecar(cfg.labels.sidecar, cfg.storage, sidecar_join, label_inputs), sidecar_join)
        if sidecar_join
        else None
    )
    if cfg.labels.classes and cfg.labels.source == "column":
        _check_classes_against_first_rows(cfg, inputs, sidecar)
    if cfg.text.lemmatize:
        ensure_wordnet()
    log.info("reading %d %s file(s) from %s", len(inputs.files), inputs.format, ", ".join(cfg.data.input))
    return PreparePlan(cfg, inputs, sidecar, cfg.split.rule())


def _check_classes_against_first_rows(cfg: DataSections, inputs: InputPlan, sidecar: SidecarJoin | None) -> None:
    """A class list that names none of the labels in the first rows is refused before any pass over the
    data (a class list that covers only some labels is a choice: the others become ``unknown_label``)."""
    if sidecar is not None:
        where, values = cfg.labels.sidecar, sidecar.sidecar.column(cfg.labels.column).to_pylist()
    else:
        where, values = first_values(inputs, cfg.labels.column)
    seen = Counter(name for name in map(label_text, values) if name is not None)
    if seen and not set(seen) & set(cfg.labels.classes):
        common = ", ".join(f"{name!r}" for name, _ in seen.most_common(8))
        raise PrepareError(
            f"labels.classes {cfg.labels.classes[:8]} matches none of the labels of column "
            f"{cfg.labels.column!r} in the first {len(values)} rows of {where} (most common: {common}). "
            "Fix labels.classes (names as the column holds them), or leave it unset to take the classes from the data"
        )


def build_vocab_and_classes(plan: PreparePlan) -> tuple[Vocabulary, tuple[str, ...], dict[str, int]]:
    """Pass 1: token counts of the training split and label counts, in map tasks, reduced here.

    Returns the vocabulary, the class list and the number of labeled rows per class."""
    cfg = plan.cfg
    configured = tuple(cfg.labels.classes or ())
    counts = plan.pairs(
        (partial(count_batch, normalizer=TextNormalizer(cfg.text), label_rule=plan.label_rule(configured),
                 split=plan.split),),
        with_images=False,
    )
    tokens, labels = Counter(), Counter()
    for batch in counts.iter_batches(batch_format="numpy", batch_size=None):
        for kind, name, count in zip(batch["kind"], batch["name"], batch["count"]):
            (tokens if kind == TOKEN else labels)[name] += int(count)
    wait_for_free_cpus()  # pass 2 starts right away
    classes = configured or tuple(sorted(labels, key=class_order))
    if cfg.labels.source != "none" and not classes:
        raise PrepareError(f"no labels found in column {cfg.labels.column!r} of {cfg.data.input}")
    return Vocabulary.from_counts(tokens, cfg.vocab.min_freq, cfg.vocab.max_size), classes, dict(labels)


def prepared_dataset(plan: PreparePlan, vocab: Vocabulary, classes: tuple[str, ...]):
    """Pass 2, lazily: every input row as a prepared row (status != ok rows included)."""
    cfg = plan.cfg
    preparer = PairPreparer(
        cfg.image, cfg.text, vocab.token_to_id, plan.label_rule(classes), plan.split
    )
    keep = [schema.KEY, schema.IMAGE, schema.TOKENS, schema.LENGTH, schema.LABEL, schema.LABEL_ID, schema.SPLIT,
            schema.SOURCE, schema.STATUS, schema.ERROR_MESSAGE, *cfg.data.keep_columns]
    return plan.pairs((preparer,)).select_columns(list(dict.fromkeys(keep)))


@dataclass(frozen=True)
class PreparedOutput:
    """A prepare output and the settings its rows were made with (its own json files)."""

    root: rfs.Location
    vocab: Vocabulary
    classes: tuple[str, ...]
    image: ImageOptions
    text: TextOptions
    stats: dict

    @classmethod
    def open(cls, root: rfs.Location) -> PreparedOutput:
        settings = json.loads(rfs.read_text(root.join(CONFIG_FILE)))
        return cls(
            root,
            Vocabulary.from_json(rfs.read_text(root.join(VOCAB_FILE))),
            tuple(json.loads(rfs.read_text(root.join(CLASSES_FILE)))),
            ImageOptions.model_validate(settings["image"]),
            TextOptions.model_validate(settings["text"]),
            json.loads(rfs.read_text(root.join(STATS_FILE))),
        )

    def differences(self, vocab: Vocabulary, classes: tuple[str, ...], image: ImageOptions, text: TextOptions) -> list[str]:
        """How these rows differ from what a model made with the given settings expects (empty: they match)."""
        found = []
        if self.vocab != vocab:
            found.append(f"another vocabulary ({len(self.vocab)} tokens here, {len(vocab)} expected)")
        if self.classes != tuple(classes):
            found.append(f"other classes ({list(self.classes)} here, {list(classes)} expected)")
        for section, here_options, expected_options in (("image", self.image, image), ("text", self.text, text)):
            here, expected = here_options.model_dump(), expected_options.model_dump()
            found += [f"{section}.{k}={here.get(k)!r} (expected {v!r})" for k, v in expected.items() if here.get(k) != v]
        return found

    def rows(self, columns: list[str]):
        """The prepared rows' ``columns`` (raypipe's own) as a lazy Ray Dataset, images as uint8[S, S, 3]
        again."""
        import ray.data

        prepared = self.root.join(PREPARED_DIR)
        return ray.data.read_parquet(prepared.path, filesystem=prepared.fs, columns=columns).map_batches(
            schema.Typed(unpack_images), fn_args=(self.image.size,), batch_format="numpy"
        )


def _for_parquet(table: pa.Table) -> pa.Table:
    """Images as one byte string per row (``pixels_as_bytes``); a column that is null in a whole block
    typed string, so every output file has one schema."""
    for i, field in enumerate(table.schema):
        if field.name == schema.IMAGE:
            table = table.set_column(i, field.name, pixels_as_bytes(table.column(i)))
        elif pa.types.is_null(field.type):
            table = table.set_column(i, field.name, table.column(i).cast(pa.string()))
    return table


def _staging(cfg: PrepareConfig, out: rfs.Location) -> rfs.Location:
    """Where this command writes before its output replaces the old one: named after the settings that
    decide the output, so the same command run again finds what it had finished (with data.limit,
    whose rows are no whole input files, every run starts afresh)."""
    if cfg.data.limit is not None:
        return out.join(f"{STAGING_PREFIX}{uuid.uuid4().hex[:16]}")
    deciding = {k: v for k, v in dump_config(cfg).items() if k not in ("ray", "storage", "overwrite")}
    return out.join(STAGING_PREFIX + hashlib.sha256(json.dumps(deciding, sort_keys=True).encode()).hexdigest()[:16])


def _finished_inputs(staged: rfs.Location, files: list, vocab: Vocabulary, classes: tuple[str, ...]) -> set[str]:
    """The input files an earlier run of this command finished in ``staged`` (none when it encoded with
    another vocabulary or class list); the partial output of any other input is removed."""
    if not rfs.exists(staged.join(VOCAB_FILE)):
        return set()
    same = (Vocabulary.from_json(rfs.read_text(staged.join(VOCAB_FILE))) == vocab
            and tuple(json.loads(rfs.read_text(staged.join(CLASSES_FILE)))) == tuple(classes))
    if not same:
        rfs.delete_dir(staged)
        return set()
    prepared = staged.join(PREPARED_DIR)
    states = parallel(lambda item: output_state(prepared, item.name), files)
    done = {item.name for item, state in zip(files, states) if complete(state, item)}
    for item, state in zip(files, states):
        if state.files and item.name not in done:
            rfs.delete_dir(prepared.join(item.name))
    return done


def run_prepare(cfg: PrepareConfig) -> dict:
    started = time.perf_counter()
    plan = plan_prepare(cfg)  # everything that can be checked without a cluster is checked first
    out = _check_output(cfg)
    start_cluster(cfg.ray, cfg.storage, {**input_paths(cfg), "output": cfg.output})
    vocab, classes, _ = build_vocab_and_classes(plan)
    # The new output is written beside the old one and replaces it only once complete and usable: a run
    # that fails (or finds no usable row) leaves an existing output as it was, and the same command run
    # again continues from the input files it had finished.
    staged = _staging(cfg, out)
    files = input_files(plan.inputs)
    done = _finished_inputs(staged, files, vocab, classes) if cfg.data.limit is None else set()
    if done:
        say(f"resuming in {staged.url}: {len(done)} of {len(files)} input file(s) already prepared")
    rfs.write_text(staged.join(VOCAB_FILE), vocab.to_json())  # what the parts are encoded with, for a rerun
    rfs.write_text(staged.join(CLASSES_FILE), json.dumps(list(classes), ensure_ascii=False, indent=1))
    prepared_dir = staged.join(PREPARED_DIR)
    pending = [item for item in files if item.name not in done]
    if pending:
        names = output_names_with_bare_paths([item.path for item in files])
        written = (
            prepared_dataset(replace(plan, inputs=only(plan.inputs, pending)), vocab, classes)
            .map_batches(_for_parquet, batch_format="pyarrow")
            .map_batches(write_parts, fn_args=(prepared_dir, names), batch_format="pyarrow")
        )
        for _ in written.iter_batches(batch_size=None):
            pass
    unfinished = [] if cfg.data.limit is not None else [
        item.path for item in files if not complete(output_state(prepared_dir, item.name), item)
    ]
    if unfinished:  # a task retried after writing a part: its input is prepared again by the next run
        raise PrepareError(f"{len(unfinished)} input file(s) were not prepared completely "
                           f"({', '.join(unfinished[:3])}); run the same command again to finish them")
    stats = collect_stats(prepared_dir)
    if stats["rows_ok"] == 0:
        rfs.delete_dir(staged)
        examples = "; ".join(
            f"{status}: {found[0]['error_message']}" for status, found in stats["error_examples"].items()
        )
        raise PrepareError(
            f"no usable row in {', '.join(cfg.data.input)}: {stats['rows_in']} rows read, by status "
            f"{stats['by_status']}{f' (e.g. {examples})' if examples else ''}. Check the label settings "
            f"(labels.*) and the column settings (data.*); nothing was written to {out.url}"
        )
    rfs.write_text(staged.join(CONFIG_FILE), json.dumps(dump_config(cfg), indent=1))
    stats.update(
        vocab_size=len(vocab), num_classes=len(classes), input_format=plan.inputs.format,
        input_files=len(plan.inputs.files), elapsed_s=round(time.perf_counter() - started, 2), output=out.url,
        input_files_resumed=len(done),
    )
    stats["rows_per_s"] = round(stats["rows_in"] / stats["elapsed_s"], 1) if stats["elapsed_s"] else None
    rfs.write_text(staged.join(STATS_FILE), json.dumps(stats, indent=1, ensure_ascii=False))
    rfs.replace_with(staged, out, (PREPARED_DIR, VOCAB_FILE, CLASSES_FILE, CONFIG_FILE, STATS_FILE))
    return stats


def collect_stats(prepared: rfs.Location) -> dict:
    """Counts per status, split and shard, read back from what was written (so they match it)."""
    files = [
        i.path
        for i in prepared.fs.get_file_info(pafs.FileSelector(prepared.path, recursive=True))
        if i.type == pafs.FileType.File and i.path.endswith(".parquet")
    ]
    by_status, by_split, by_class = Counter(), Counter(), Counter()
    shards: dict[str, Counter] = defaultdict(Counter)
    examples: dict[str, list] = defaultdict(list)
    keyed = []  # (key, source) of every row, as Arrow: a fraction of the memory of Python strings
    columns = [schema.KEY, schema.SOURCE, schema.STATUS, schema.ERROR_MESSAGE, schema.SPLIT, schema.LABEL]
    for path in files:
        for batch in pq.ParquetFile(path, filesystem=prepared.fs).iter_batches(columns=columns):
            keyed.append(batch.select([schema.KEY, schema.SOURCE]))
            rows = batch.to_pydict()
            for key, source, status, message, split, label in zip(*(rows[c] for c in columns)):
                by_status[status] += 1
                shards[source][status] += 1
                if status == Status.OK.value:
                    by_split[split] += 1
                    by_class[label] += 1
                elif len(examples[status]) < EXAMPLES_PER_STATUS:
                    examples[status].append({"key": key, "source": source, "error_message": message})
    return {
        "rows_in": sum(by_status.values()),
        "rows_ok": by_status[Status.OK.value],
        "by_status": dict(by_status.most_common()),
        "ok_by_split": dict(sorted(by_split.items())),
        "ok_by_class": dict(sorted(by_class.items(), key=lambda kv: str(kv[0]))),
        "error_examples": dict(examples),
        "duplicate_keys": _duplicate_keys(keyed),
        "shards": {
            source: {"rows": sum(c.values()), "ok": c[Status.OK.value], "by_status": dict(c)}
            for source, c in sorted(shards.items())
        },
    }


def _duplicate_keys(keyed: list[pa.RecordBatch]) -> int:
    """Rows whose key an earlier row of the same source has (a key used twice counts 1)."""
    if not keyed:
        return 0
    rows = pa.Table.from_batches(keyed)
    return rows.num_rows - rows.group_by([schema.SOURCE, schema.KEY]).aggregate([]).num_rows


def summary_lines(stats: dict) -> list[str]:
    errors = {k: v for k, v in stats["by_status"].items() if k != Status.OK.value}
    lines = [
        f"prepared {stats['rows_in']} rows from {stats['input_files']} {stats['input_format']} file(s) "
        f"in {stats['elapsed_s']} s ({stats['rows_per_s']} rows/s) -> {stats['output']}",
        f"  ok: {stats['rows_ok']} (train {stats['ok_by_split'].get('train', 0)}, "
        f"val {stats['ok_by_split'].get('val', 0)}, test {stats['ok_by_split'].get('test', 0)}); {stats['num_classes']} classes, vocabulary {stats['vocab_size']}",
    ]
    lines += [f"  {status}: {count}" for status, count in errors.items()]
    for status, examples in stats["error_examples"].items():
        lines.append(f"  e.g. {status}: {examples[0]['key']} ({examples[0]['error_message']})")
    if stats["duplicate_keys"]:
        lines.append(f"  duplicate keys: {stats['duplicate_keys']} rows share their key with an earlier row of the same "
                     "input file (not unique there); each was prepared on its own")
    return lines
