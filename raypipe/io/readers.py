"""Input shards -> a Ray Dataset of normalized pair rows.

``plan_inputs`` runs on the driver before any cluster work: it lists the files, picks the format and
checks every Parquet footer and the end of every tar, so a missing column, a wrong type or a file cut
short names the file at once.
``read_pairs`` then builds the lazy Ray Data pipeline.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raypipe import schema
from raypipe.config import DataConfig, StorageConfig
from raypipe.io import fs as rfs
from raypipe.io.errors import InputError
from raypipe.io.normalize import IMG2DATASET_COLUMNS, InputColumns, normalize_table

TAR_BLOCK = 512
TAR_END = b"\0" * (2 * TAR_BLOCK)  # the end-of-archive marker


@dataclass(frozen=True)
class InputPlan:
    format: str  # "webdataset" | "img2dataset_parquet" | "parquet"
    filesystem: pafs.FileSystem
    files: tuple[str, ...]
    columns: InputColumns
    # webdataset: img2dataset's per-shard .parquet, which also lists the failed downloads.
    metadata_files: tuple[str, ...] = ()
    # The declared Arrow type of each extra (passthrough, label input) column: the input's own.
    column_types: Mapping[str, pa.DataType] = field(default_factory=dict)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _each_file(fn, files: list[str]) -> list:
    """``fn`` over the files, in parallel: each is a small ranged read, slow only in its latency."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(fn, files))


def _read_footers(filesystem: pafs.FileSystem, files: list[str]) -> list[pq.FileMetaData]:
    """Each file's Parquet footer: its schema and row count, without reading any row."""

    def read(path: str) -> pq.FileMetaData:
        try:
            with filesystem.open_input_file(path) as f:
                return pq.ParquetFile(f).metadata
        except (OSError, pa.ArrowInvalid) as e:
            raise InputError(f"{path}: not a readable Parquet file ({e})") from None

    return _each_file(read, files)


def _read_schemas(filesystem: pafs.FileSystem, files: list[str]) -> list[pa.Schema]:
    return [footer.schema.to_arrow_schema() for footer in _read_footers(filesystem, files)]


def _refuse_empty(inputs: list[str], files: list[str], rows: int, where: str) -> None:
    if rows == 0:
        raise InputError(
            f"{', '.join(inputs)}: the {len(files)} input file(s) hold no rows ({where}); nothing to read. "
            "Check data.input"
        )


def _check_tars(filesystem: pafs.FileSystem, files: list[str]) -> None:
    """A tar has no footer to check, but a complete one is whole 512-byte blocks ending in two zero
    blocks. An empty file, a non-tar or a tar cut short is named here, before any task runs, rather
    than by the reader (``raypipe/io/tar.py``) mid-run."""

    def check(path: str) -> None:
        try:
            with filesystem.open_input_file(path) as f:
                size = f.size()
                if size >= len(TAR_END) and size % TAR_BLOCK == 0:
                    f.seek(size - len(TAR_END))
                    if f.read(len(TAR_END)) == TAR_END:
                        return
        except OSError as e:
            raise InputError(f"{path}: not readable ({e})") from None
        why = "it is empty" if size == 0 else f"its {size} bytes do not end with the two zero blocks that close a tar"
        raise InputError(f"{path}: not a complete tar archive ({why}: cut short, or not a tar); re-copy or re-create it")

    _each_file(check, files)


def _first_sample_fields(filesystem: pafs.FileSystem, tars: list[str]) -> set[str] | None:
    """The fields of the first sample's .json (where img2dataset keeps a sample's extra columns), read
    from the front of the first tar that has one; None when no tar has a sample."""
    from raypipe.io.tar import tar_members, tar_samples

    for path in tars:
        with filesystem.open_input_stream(path) as stream:
            for _, members in tar_samples(tar_members(stream, path, keep=lambda name: name.endswith(".json"))):
                try:
                    meta = json.loads(members.get("json", b"{}"))
                except ValueError:
                    meta = None
                return set(meta) if isinstance(meta, dict) else set()
    return None


def _check_table_schema(path: str, table_schema: pa.Schema, columns: InputColumns, config_hint: bool) -> None:
    names = set(table_schema.names)
    required = {
        columns.key: ("data.key_column", None),
        columns.image: ("data.image_column", _is_binary),
        columns.text: ("data.text_column", _is_text),
    }
    for extra in columns.extra:
        required.setdefault(extra, ("data.keep_columns / labels", None))
    for column, (setting, type_ok) in required.items():
        if column not in names:
            fix = f" Set {setting} to the right column name." if config_hint else ""
            raise InputError(
                f"{path}: column {column!r} is missing; the file has {sorted(names)}.{fix}"
            )
        if type_ok is not None and not type_ok(table_schema.field(column).type):
            wanted = "binary (encoded image bytes)" if type_ok is _is_binary else "string"
            raise InputError(f"{path}: column {column!r} has type {table_schema.field(column).type}, expected {wanted}")


def plan_inputs(data: DataConfig, storage: StorageConfig, extra_columns: tuple[str, ...]) -> InputPlan:
    """List and check the inputs. ``extra_columns`` are needed beside key/image/text (labels, passthrough)."""
    extensions = {"webdataset": (".tar",), "auto": (".tar", ".parquet")}.get(data.format, (".parquet",))
    filesystem, files = rfs.list_inputs(data.input, storage, extensions)
    fmt = data.format
    if fmt == "auto":
        tars = [f for f in files if f.endswith(".tar")]
        fmt, files = ("webdataset", tars) if tars else ("img2dataset_parquet", files)

    if fmt == "webdataset":
        _check_tars(filesystem, files)
        stems = [f[: -len(".tar")] for f in files]
        infos = filesystem.get_file_info([s + ".parquet" for s in stems])
        metadata = tuple(i.path for i in infos if i.type == pafs.FileType.File)
        # A sample's .json holds its extra columns; img2dataset's .parquet beside the tar has their types.
        footers = _read_footers(filesystem, list(metadata))
        known = [footers[0].schema.to_arrow_schema()] if footers else []
        found = set(known[0].names) if known else _first_sample_fields(filesystem, files)
        if footers:
            _refuse_empty(data.input, files, sum(f.num_rows for f in footers), "img2dataset's .parquet beside each tar")
        elif found is None:
            _refuse_empty(data.input, files, 0, "no tar has a sample")
        missing = [c for c in extra_columns if found is not None and c not in found]
        if missing:
            where = metadata[0] if known else f"the first sample's .json in {files[0]}"
            raise InputError(
                f"{where}: column(s) {missing} missing; the samples have {sorted(found)}. Set labels.column (or "
                "labels.source=none for unlabeled data) and data.keep_columns to columns the shards have."
            )
        types = {c: known[0].field(c).type if known and c in known[0].names else pa.string() for c in extra_columns}
        return InputPlan(fmt, filesystem, tuple(files), InputColumns(extra=extra_columns), metadata, types)

    if fmt == "img2dataset_parquet":
        columns = IMG2DATASET_COLUMNS.with_extra(extra_columns)
    else:
        columns = InputColumns(data.key_column, data.image_column, data.text_column, extra_columns)
    types: dict[str, pa.DataType] = {}
    footers = _read_footers(filesystem, files)
    _refuse_empty(data.input, files, sum(f.num_rows for f in footers), "Parquet footers")
    for path, file_schema in zip(files, (f.schema.to_arrow_schema() for f in footers)):
        if data.format == "auto" and not {"key", "caption", "status"} <= set(file_schema.names):
            raise InputError(
                f"{path}: not an img2dataset Parquet shard (no key/caption/status columns). "
                "Set data.format=parquet and data.key_column / image_column / text_column."
            )
        _check_table_schema(path, file_schema, columns, config_hint=fmt == "parquet")
        for column in extra_columns:
            found = file_schema.field(column).type
            if types.setdefault(column, found) != found and not pa.types.is_null(found):
                raise InputError(
                    f"{path}: column {column!r} has type {found}, but {files[0]} has {types[column]}; "
                    "the files of one input must agree on each column's type"
                )
    return InputPlan(fmt, filesystem, tuple(files), columns, column_types=types)


def first_values(plan: InputPlan, column: str, rows: int = 2000) -> tuple[str, list]:
    """Up to ``rows`` values of ``column`` from the front of the first input file (for tars, of their
    img2dataset .parquet, else of the samples' .json), and where they were read: enough to check a
    setting against the data in a second, before any pass over it."""
    from raypipe.io.tar import tar_members, tar_samples

    if plan.format != "webdataset" or plan.metadata_files:
        path = plan.metadata_files[0] if plan.format == "webdataset" else plan.files[0]
        with plan.filesystem.open_input_file(path) as f:
            batches = pq.ParquetFile(f).iter_batches(batch_size=rows, columns=[column])
            first = next(batches, None)
        return path, [] if first is None else first.column(0).to_pylist()
    values = []
    with plan.filesystem.open_input_stream(plan.files[0]) as stream:
        keep = lambda name: name.endswith(".json")  # noqa: E731  (images are read past, never held)
        for _, members in tar_samples(tar_members(stream, plan.files[0], keep=keep)):
            try:
                values.append(json.loads(members.get("json", b"{}")).get(column))
            except (ValueError, AttributeError):
                values.append(None)
            if len(values) >= rows:
                break
    return f"the samples' .json in {plan.files[0]}", values


class BatchSteps:
    """Per-batch functions run one after another in one ``map_batches`` call. Between two calls Ray
    Data builds an Arrow block even when it fuses them into one task, which for a column of JPEG bytes
    costs ~90 us a row (more than the normalization itself), so the steps of a read branch share one."""

    def __init__(self, *steps: Callable[[dict], dict], passthrough: Mapping[str, pa.DataType]):
        self.steps = steps
        self.passthrough = passthrough

    def __call__(self, batch: dict) -> pa.Table:
        for step in self.steps:
            batch = step(batch)
        return schema.to_arrow(batch, self.passthrough)


def read_pairs(
    plan: InputPlan,
    limit: int | None = None,
    with_images: bool = True,
    then: tuple[Callable[[dict], dict], ...] = (),
    batch_size: int | None = None,
    extra_types: Mapping[str, pa.DataType] | None = None,
):
    """The normalized pair rows of every input, as a lazy Ray Dataset, with the per-batch steps
    ``then`` (e.g. preprocessing) applied.

    Every batch leaves as an Arrow table of declared types: raypipe's own columns as in
    ``raypipe/schema.py``, the input's extra columns with the input's types (``plan.column_types``),
    and columns a step adds beyond those (a label sidecar's) with ``extra_types``.

    ``then`` runs in the same ``map_batches`` call as the normalization (tars: right after the reader,
    which normalizes): each file is read, normalized and preprocessed in one task. ``batch_size`` caps
    its rows per batch (None: one batch per read block, which is also what lets Ray Data fuse the read
    itself into that task). With a ``limit``, ``then``
    runs after the limit instead. ``with_images=False`` leaves the image bytes in storage (Parquet) or
    drops them while reading (tar), for passes that only need text and labels; ``image`` is then None
    everywhere."""
    import ray.data

    from raypipe.io.tar import WebDatasetPairs

    fused = then if limit is None else ()
    passthrough = {**plan.column_types, **(extra_types or {})}

    def normalized(ds, *steps):
        steps = (*steps, *fused)
        if not steps:
            return ds
        return ds.map_batches(BatchSteps(*steps, passthrough=passthrough), batch_size=batch_size, batch_format="numpy")

    if plan.format == "webdataset":
        tars = WebDatasetPairs(list(plan.files), plan.filesystem, plan.columns, plan.metadata_files, with_images)
        ds = normalized(ray.data.read_datasource(tars, override_num_blocks=len(plan.files)))
    else:
        wanted = [plan.columns.key, plan.columns.text, *plan.columns.extra]
        if with_images:
            wanted.append(plan.columns.image)
        if plan.format == "img2dataset_parquet":
            wanted += ["status", "error_message"]
        ds = normalized(
            ray.data.read_parquet(
                list(plan.files), filesystem=plan.filesystem, include_paths=True, override_num_blocks=len(plan.files)
            ).select_columns([*dict.fromkeys(wanted), "path"]),
            partial(normalize_table, columns=plan.columns),
        )
    if limit is None:
        return ds
    ds = ds.limit(limit)
    if not then:
        return ds
    return ds.map_batches(BatchSteps(*then, passthrough=passthrough), batch_size=batch_size, batch_format="numpy")


def read_sidecar(url: str, storage: StorageConfig, join_on: str, columns: tuple[str, ...]) -> pa.Table:
    """The label sidecar as one Arrow table (``join_on`` + label columns), checked and de-duplicated."""
    filesystem, files = rfs.list_inputs([url], storage, (".parquet",))
    for path, file_schema in zip(files, _read_schemas(filesystem, files)):
        missing = [c for c in (join_on, *columns) if c not in file_schema.names]
        if missing:
            raise InputError(f"{path}: label sidecar lacks column(s) {missing}; it has {file_schema.names}")
    table = pq.ParquetDataset(files, filesystem=filesystem).read(columns=[join_on, *columns])
    keys = pc.cast(table[join_on], pa.string())
    if pc.count_distinct(keys).as_py() != len(keys):
        raise InputError(f"{url}: label sidecar has duplicate values in {join_on!r}; each row needs one label")
    return table.set_column(table.schema.get_field_index(join_on), join_on, keys)


# Per worker process: the key -> row lookup of the sidecar a SidecarJoin was made with.
_SIDECAR_ROWS: dict[str, dict[str, int]] = {}


class SidecarJoin:
    """Left join of the sidecar's columns onto a batch by ``join_on`` (null where no match).

    The key -> row lookup is built once per worker process, not per batch: ``pyarrow.compute.index_in``
    hashes its whole value set on every call, 250 ms a 500-row batch for a 1M-row sidecar (measured),
    which made a join over N rows cost O(N^2). The lookup costs ~100 bytes a sidecar row per process."""

    def __init__(self, sidecar: pa.Table, join_on: str):
        self.sidecar, self.join_on = sidecar, join_on
        self.token = uuid.uuid4().hex  # names this sidecar in every process the join is pickled to

    @property
    def column_types(self) -> dict[str, pa.DataType]:
        """The Arrow types of the columns the join adds."""
        return {f.name: f.type for f in self.sidecar.schema if f.name != self.join_on}

    def _rows(self) -> dict[str, int]:
        rows = _SIDECAR_ROWS.get(self.token)
        if rows is None:
            keys = self.sidecar[self.join_on].to_pylist()
            rows = {key: i for i, key in enumerate(keys) if key is not None}
            _SIDECAR_ROWS.clear()  # one job's sidecar at a time
            _SIDECAR_ROWS[self.token] = rows
        return rows

    def __call__(self, batch: dict) -> dict:
        rows = self._rows()
        index = pa.array([None if k is None else rows.get(str(k)) for k in batch[self.join_on]], type=pa.int64())
        for name in self.sidecar.column_names:
            if name != self.join_on:
                batch[name] = self.sidecar[name].take(index).to_numpy(zero_copy_only=False)
        return batch
