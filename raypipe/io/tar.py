"""img2dataset's WebDataset tars -> normalized pair rows, read inside Ray Data read tasks.

A sample is a run of adjacent members that share a key: ``00/000123.jpg``, ``00/000123.txt`` and
``00/000123.json`` make the sample ``000123`` (the base name up to its first dot, as in the
WebDataset spec). Members whose base name has no key (``._000123.jpg``, ``README``) are skipped.
A key used again (after other samples, or with a suffix its sample already has) starts a new sample
with that key: each becomes its own row, as a key used twice in a Parquet file does.

Why not ``ray.data.read_webdataset``: img2dataset writes a pax header before every member, and
Python's ``tarfile`` spends ~40 us parsing each header pair, ~125 us a sample, a quarter of the
sample's JPEG decode; Ray then turns the raw members into a pandas frame that the normalization turns
into rows again: 255 us a sample in all. Parsing the ustar/pax/GNU headers here and normalizing costs
~55 us a sample (measured on img2dataset-like shards).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource

from raypipe import schema
from raypipe.formats.img2dataset import SUCCESS, WEBDATASET_IMAGE_SUFFIXES
from raypipe.io.errors import InputError
from raypipe.io.normalize import (
    IMG2DATASET_COLUMNS,
    InputColumns,
    normalize_table,
    normalize_webdataset,
)

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
REGULAR_FILE_TYPES = frozenset(b"0\x007")  # '7' is a contiguous file, a regular file to a reader
PAX_HEADER, GNU_LONG_NAME = ord("x"), ord("L")
POSIX_MAGIC = b"ustar\x00"  # GNU's "ustar  " header reuses the name prefix field for times
SAMPLES_PER_BLOCK = 1000


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256, for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """Records are ``"<length> <key>=<value>\\n"``, the length counting the whole record."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        end = pos + int(data[pos:space])
        key, _, value = data[space + 1 : end - 1].partition(b"=")
        records[key] = value
        pos = end
    return records


def tar_members(stream, path: str, keep: Callable[[str], bool]) -> Iterator[tuple[str, bytes | None]]:
    """(name, bytes) of each regular file of a tar read front to back; the bytes are None for a name
    ``keep`` refuses (read past, never held). Directories, links and devices are passed over."""

    def read(size: int, what: str) -> bytes:
        data = stream.read(size)
        if len(data) != size:
            raise InputError(f"{path}: ends inside {what} (cut short while being read?); re-copy the file")
        return data

    offset, long_name, pax = 0, None, {}
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK or header == ZERO_BLOCK:
            return
        checksum = sum(header[:148]) + 8 * ord(" ") + sum(header[156:])
        if checksum != _number(header[148:156]):
            raise InputError(f"{path}: damaged tar header at byte {offset} (checksum mismatch); re-copy or re-create the tar")
        kind, size = header[156], _number(header[124:136])
        if kind not in (PAX_HEADER, GNU_LONG_NAME):  # a pax size applies to the member it precedes
            size = int(pax.get(b"size", size))
        padded = -(-size // BLOCK) * BLOCK
        offset += BLOCK + padded
        if kind == PAX_HEADER:
            pax = _pax_records(read(padded, "a pax header"))
            continue
        if kind == GNU_LONG_NAME:
            long_name = read(padded, "a long name").split(b"\0", 1)[0]
            continue
        name = pax.get(b"path") or long_name or header[:100].split(b"\0", 1)[0]
        if not (long_name or b"path" in pax) and header[257:263] == POSIX_MAGIC and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        name = name.decode("utf-8", "replace")
        long_name, pax = None, {}
        if kind in REGULAR_FILE_TYPES and keep(name):
            data = read(size, repr(name))
            read(padded - size, repr(name))
            yield name, data
        else:
            read(padded, repr(name))
            if kind in REGULAR_FILE_TYPES:
                yield name, None


def split_member_name(name: str) -> tuple[str | None, str]:
    """``dir/000123.json`` -> (``dir/000123``, ``json``); no sample key (hidden file, no dot) -> None."""
    directory, base = posixpath.split(name)
    key, dot, suffix = base.partition(".")
    if not key or not dot:
        return None, ""
    return posixpath.join(directory, key), suffix


def tar_samples(members: Iterator[tuple[str, bytes | None]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Adjacent members sharing a key -> (key, {suffix: bytes}). A suffix the current sample already
    has ends it, so ``a.jpg, a.jpg`` gives two samples ``a``, as ``a.jpg, b.jpg, a.txt`` does (one
    with the image, one with the text): a merge would drop a member. Members read past (bytes None)
    count too, so a read without images, or of keys only, finds the same samples."""
    current, suffixes, files = None, set(), {}
    for name, data in members:
        prefix, suffix = split_member_name(name)
        if prefix is None:
            continue
        if prefix != current or suffix in suffixes:
            if current is not None:
                yield posixpath.basename(current), files
            current, suffixes, files = prefix, set(), {}
        suffixes.add(suffix)
        if data is not None:
            files[suffix] = data
    if current is not None:
        yield posixpath.basename(current), files


def failed_downloads(filesystem: pafs.FileSystem, metadata_path: str, tar_path: str, columns: InputColumns) -> dict:
    """The samples img2dataset listed in a tar's metadata (its sibling ``.parquet``) but could not
    download, so absent from the tar, as normalized ``not_downloaded`` rows sourced to the tar."""
    with pq.ParquetFile(metadata_path, filesystem=filesystem) as metadata:  # one footer read
        extra = [c for c in columns.extra if c in metadata.schema_arrow.names]
        table = metadata.read(columns=["key", "caption", "status", "error_message", *extra])
    table = table.filter(pc.invert(pc.fill_null(pc.equal(table["status"], SUCCESS), False)))
    batch = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
    batch["path"] = np.full(table.num_rows, tar_path, dtype=object)
    for name in columns.extra:
        batch.setdefault(name, np.full(table.num_rows, None, dtype=object))
    return normalize_table(batch, IMG2DATASET_COLUMNS.with_extra(columns.extra))


class WebDatasetPairs(FileBasedDatasource):
    """Ray Data source of normalized pair rows from WebDataset tars (see the module's docstring),
    followed by each tar's failed downloads when img2dataset's metadata lies beside it: one read task
    covers a shard, so the rows need no second read joined by a union (which would end operator fusion).

    Blocks are pandas frames: their object columns reach the next ``map_batches`` without a copy,
    where an Arrow block would copy every image's bytes in and out (~34 us a row, measured)."""

    _FILE_EXTENSIONS = ["tar"]

    def __init__(
        self,
        paths: list[str],
        filesystem: pafs.FileSystem,
        columns: InputColumns,
        metadata_files: tuple[str, ...],
        with_images: bool,
    ):
        super().__init__(paths, filesystem=filesystem)
        self._files = filesystem
        self._columns = columns
        self._metadata_files = frozenset(metadata_files)
        self._with_images = with_images

    def _keep(self, name: str) -> bool:
        return self._with_images or split_member_name(name)[1] not in WEBDATASET_IMAGE_SUFFIXES

    def _read_stream(self, f, path: str) -> Iterator[pd.DataFrame]:
        samples = []
        for sample in tar_samples(tar_members(f, path, self._keep)):
            samples.append(sample)
            if len(samples) == SAMPLES_PER_BLOCK:
                yield pd.DataFrame(normalize_webdataset(samples, path, self._columns))
                samples = []
        if samples:
            yield pd.DataFrame(normalize_webdataset(samples, path, self._columns))
        metadata_path = path[: -len(".tar")] + ".parquet"
        if metadata_path in self._metadata_files:
            failed = failed_downloads(self._files, metadata_path, path, self._columns)
            if len(failed[schema.KEY]):
                yield pd.DataFrame(failed)
