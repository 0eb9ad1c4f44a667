"""The labeling output, without torch (the writer actors import only this): its columns, the output table
of a predicted batch, and the writer that puts each input file's rows in its own directory."""

from __future__ import annotations


import pyarrow as pa
import pyarrow.compute as pc

from raypipe import schema
from raypipe.errors import UserError
from raypipe.io import fs as rfs
from raypipe.io.per_input import write_parts

# Labeling output columns (the "Labeling output" contract of design.md).
LABEL, LABEL_ID, CONFIDENCE = schema.LABEL, schema.LABEL_ID, schema.CONFIDENCE
TOP_K_LABELS, TOP_K_SCORES = schema.TOP_K_LABELS, schema.TOP_K_SCORES
MODEL = "model"  # identity of the bundle that produced the row (sha256 prefix of its weights)
ATTENTION_WORDS, ATTENTION_WEIGHTS = schema.ATTENTION_WORDS, schema.ATTENTION_WEIGHTS


class LabelError(UserError, RuntimeError):
    """A labeling run that cannot start or finish; the message says what to do."""


def output_schema(passthrough: dict[str, pa.DataType | None], explain: bool) -> pa.Schema:
    """The labeling output's columns, in order. A passthrough type of None is taken from the data."""
    fields = [pa.field(schema.KEY, pa.string())]
    fields += [pa.field(name, t if t is not None else pa.null()) for name, t in passthrough.items()]
    fields += [
        pa.field(LABEL, pa.string()),
        pa.field(LABEL_ID, pa.int64()),
        pa.field(CONFIDENCE, pa.float32()),
        pa.field(TOP_K_LABELS, pa.list_(pa.string())),
        pa.field(TOP_K_SCORES, pa.list_(pa.float32())),
        pa.field(schema.STATUS, pa.string()),
        pa.field(schema.ERROR_MESSAGE, pa.string()),
        pa.field(MODEL, pa.string()),
        pa.field(schema.SOURCE, pa.string()),
    ]
    if explain:
        fields += [pa.field(ATTENTION_WORDS, pa.list_(pa.string())), pa.field(ATTENTION_WEIGHTS, pa.list_(pa.float32()))]
    return pa.schema(fields)


def to_output_table(predicted: pa.Table, out_schema: pa.Schema, model_identity: str) -> pa.Table:
    """BundlePredictor's rows -> labeling output rows: predicted / predicted_id become label / label_id,
    the model identity is added, columns are ordered and typed as ``out_schema`` (null-typed fields
    there take the data's type, or string when a whole batch is null)."""
    n = predicted.num_rows
    renamed = {schema.PREDICTED: LABEL, schema.PREDICTED_ID: LABEL_ID}
    source: dict[str, pa.ChunkedArray | pa.Array] = {}
    for name in predicted.column_names:
        if name in (LABEL, LABEL_ID):  # the input's own (ground truth) columns: not part of the output
            continue
        source[renamed.get(name, name)] = predicted.column(name)
    source[MODEL] = pa.array([model_identity] * n, pa.string())
    columns, fields = [], []
    for f in out_schema:
        column = source.get(f.name)
        if column is None:
            column = pa.nulls(n, f.type if not pa.types.is_null(f.type) else pa.string())
        wanted = f.type
        if pa.types.is_null(wanted):
            wanted = pa.string() if pa.types.is_null(column.type) else column.type
        if column.type != wanted:
            if pa.types.is_floating(column.type) and not pa.types.is_floating(wanted):
                # Ray hands a nullable integer column over as float with NaN for its nulls.
                column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
            column = column.cast(wanted)
        columns.append(column)
        fields.append(pa.field(f.name, wanted))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def write_label_batch(
    predicted: pa.Table, out: rfs.Location, names: dict[str, str], out_schema: pa.Schema, model_identity: str
) -> pa.Table:
    """Writes the rows of each input file in this batch to its own folder (``write_parts``); returns one
    count row per file written (name, rows, ok)."""
    return write_parts(to_output_table(predicted, out_schema, model_identity), out, names)


class PartWriter:
    """``write_label_batch`` in a long-lived actor: a writer that needs no CPU reservation can always
    run, so labeled rows are written as they come instead of piling up in the object store while
    preprocessing and inference hold every CPU; and it imports its libraries once, not per task."""

    def __init__(self, out: rfs.Location, names: dict[str, str], out_schema: pa.Schema, model_identity: str):
        self.args = (out, names, out_schema, model_identity)

    def __call__(self, predicted: pa.Table) -> pa.Table:
        return write_label_batch(predicted, *self.args)
