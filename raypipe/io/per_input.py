"""Outputs kept per input file (labeling, prepare): each input's expected row count and what an
output folder already holds, so a rerun finishes only the inputs whose output is missing or partial.

An input's expected rows come from its Parquet footer (img2dataset tars: from the ``.parquet`` beside
the tar, which lists failed downloads too; else from the tar's own samples); its output folder is
named by ``output_names`` (the file's stem, made unique)."""

from __future__ import annotations

import hashlib
import posixpath
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raypipe import schema
from raypipe.errors import UserError
from raypipe.io import fs as rfs
from raypipe.io.readers import InputPlan
from raypipe.io.tar import tar_members, tar_samples

PART_PREFIX = "part-"
# What a write stage returns to the driver, one row per part file written.
COUNT_NAME, COUNT_ROWS, COUNT_OK = "name", "rows", "ok"


def output_names(files: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Input file path -> output directory name: the file's stem, made unique with a short hash of
    the full path when two inputs share a stem (a/x.parquet and b/x.parquet). An object store may hold
    a key ending in "/.." ("s3://b/in/.."): such a stem is not used, as it would name a folder outside
    the output."""
    stems = {path: posixpath.splitext(posixpath.basename(path))[0] for path in files}
    stems = {path: "input" if stem in ("", ".", "..") else stem for path, stem in stems.items()}
    counts = Counter(stems.values())
    return {
        path: stem if counts[stem] == 1 else f"{stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"
        for path, stem in stems.items()
    }


@dataclass(frozen=True)
class InputFile:
    path: str  # as listed by plan_inputs (the rows' `source`)
    name: str  # output directory name
    expected_rows: int
    metadata: str | None = None  # webdataset: img2dataset's .parquet beside the tar


def _tar_keys(filesystem: pafs.FileSystem, path: str) -> list[str]:
    """Sample keys of a WebDataset tar, as the reader finds them (member bytes read past, not kept)."""
    with filesystem.open_input_stream(path) as stream:
        return [key for key, _ in tar_samples(tar_members(stream, path, keep=lambda name: False))]


def parallel(fn, items: list) -> list:
    if len(items) < 2:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(fn, items))


def input_files(plan: InputPlan) -> list[InputFile]:
    """Each input file with its expected row count (from Parquet footers; tars: the sibling .parquet,
    else the tar's own listing)."""
    names = output_names(plan.files)
    metadata = {posixpath.splitext(m)[0]: m for m in plan.metadata_files}

    def count(path: str) -> InputFile:
        meta = metadata.get(posixpath.splitext(path)[0]) if plan.format == "webdataset" else None
        if plan.format == "webdataset" and meta is None:
            rows = len(_tar_keys(plan.filesystem, path))
        else:
            rows = pq.ParquetFile(meta or path, filesystem=plan.filesystem).metadata.num_rows
        return InputFile(path, names[path], rows, meta)

    return parallel(count, list(plan.files))


def input_keys(plan: InputPlan, item: InputFile) -> Counter:
    if plan.format == "webdataset":
        if item.metadata is None:
            return Counter(_tar_keys(plan.filesystem, item.path))
        column = "key"
    else:
        column = plan.columns.key
    keys = pq.read_table(item.metadata or item.path, columns=[column], filesystem=plan.filesystem).column(0)
    return Counter(str(k) for k in keys.to_pylist())


@dataclass
class OutputState:
    files: list[str] = field(default_factory=list)
    rows: int = 0
    readable: bool = True
    duplicate_keys: int = 0  # rows whose key an earlier row has (set when the parts are read)

    def describe(self, expected: int) -> str:
        if not self.files:
            return "no output"
        if not self.readable:
            return "an unreadable (partial) part file"
        return f"{self.rows} of {expected} rows"


def output_state(out: rfs.Location, name: str) -> OutputState:
    infos = out.fs.get_file_info(pafs.FileSelector(out.join(name).path, recursive=True, allow_not_found=True))
    state = OutputState(files=sorted(i.path for i in infos if i.type == pafs.FileType.File))
    for path in state.files:
        try:
            state.rows += pq.ParquetFile(path, filesystem=out.fs).metadata.num_rows
        except (OSError, pa.ArrowInvalid):
            state.readable = False
    return state


def strip_scheme(path: str) -> str:
    return path.split("://", 1)[1] if "://" in path else path


def write_parts(table: pa.Table, out: rfs.Location, names: dict[str, str]) -> pa.Table:
    """Writes the rows of each input file in ``table`` (by their ``source``) to
    ``<out>/<name>/part-<uuid>.parquet``; returns one count row per file written (name, rows, ok). Part
    names are unique per write, so a retried task never overwrites a part: it can only add one, which
    the completeness check (rows against the input's) then catches."""
    sources = np.asarray(table.column(schema.SOURCE).to_pylist(), dtype=object)
    statuses = np.asarray(table.column(schema.STATUS).to_pylist(), dtype=object)
    counts: dict[str, list] = {COUNT_NAME: [], COUNT_ROWS: [], COUNT_OK: []}
    for source in dict.fromkeys(sources):
        name = names.get(source) or names.get(strip_scheme(source))
        if name is None:
            raise UserError(f"row source {source!r} is not one of the planned inputs")
        rows = np.flatnonzero(sources == source)
        path = posixpath.join(out.path, name, f"{PART_PREFIX}{uuid.uuid4().hex}.parquet")
        out.fs.create_dir(posixpath.dirname(path), recursive=True)
        pq.write_table(table.take(pa.array(rows)), path, filesystem=out.fs)
        counts[COUNT_NAME].append(name)
        counts[COUNT_ROWS].append(len(rows))
        counts[COUNT_OK].append(int((statuses[rows] == schema.Status.OK.value).sum()))
    return pa.table({
        COUNT_NAME: pa.array(counts[COUNT_NAME], pa.string()),
        COUNT_ROWS: pa.array(counts[COUNT_ROWS], pa.int64()),
        COUNT_OK: pa.array(counts[COUNT_OK], pa.int64()),
    })


def output_names_with_bare_paths(files) -> dict[str, str]:
    """``output_names`` keyed by each path both as listed and without its URL scheme (rows' ``source``
    may hold either, depending on the filesystem that read them)."""
    names = output_names(files)
    names.update({strip_scheme(p): n for p, n in list(names.items())})
    return names


def only(plan: InputPlan, items: list[InputFile] | tuple[InputFile, ...]) -> InputPlan:
    """``plan`` restricted to the input files ``items`` (with their img2dataset metadata)."""
    metadata = tuple(item.metadata for item in items if item.metadata is not None)
    return replace(plan, files=tuple(item.path for item in items), metadata_files=metadata)


def complete(state: OutputState, item: InputFile) -> bool:
    """Whether an input's output holds all its rows in readable parts (an empty input needs none)."""
    return state.readable and state.rows == item.expected_rows
