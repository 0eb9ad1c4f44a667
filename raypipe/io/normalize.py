"""Input batches -> normalized pair rows (key, image bytes, text, source, status, passthrough).

Pure per-batch functions, one per input format. They never drop a row: img2dataset's failed
downloads become ``not_downloaded`` rows, a sample without image bytes becomes ``missing_image``
later in the image transform.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np

from raypipe import schema
from raypipe.formats.img2dataset import SUCCESS, WEBDATASET_IMAGE_SUFFIXES
from raypipe.schema import Status



@dataclass(frozen=True)
class InputColumns:
    key: str = "key"
    image: str = "jpg"
    text: str = "caption"
    extra: tuple[str, ...] = ()  # passthrough and label-input columns, copied as they are

    def with_extra(self, extra: tuple[str, ...]) -> InputColumns:
        return replace(self, extra=tuple(extra))


IMG2DATASET_COLUMNS = InputColumns(key="key", image="jpg", text="caption")


def _text_or_empty(value) -> str:
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _bytes_or_none(value) -> bytes | None:
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) and len(value) else None


def _object_column(values) -> np.ndarray:
    """An object array that keeps bytes, None and lists as they are (np.array would not)."""
    items = list(values)
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def normalize_table(batch: dict[str, np.ndarray], columns: InputColumns) -> dict[str, np.ndarray]:
    """A Parquet batch (img2dataset's or a plain table of pairs) -> normalized rows."""
    n = len(batch[columns.key])
    out = {
        schema.KEY: _object_column(str(k) for k in batch[columns.key]),
        schema.IMAGE: _object_column(_bytes_or_none(v) for v in batch[columns.image])
        if columns.image in batch
        else np.full(n, None, dtype=object),
        schema.TEXT: _object_column(_text_or_empty(t) for t in batch[columns.text]),
        schema.SOURCE: batch["path"] if "path" in batch else np.full(n, "", dtype=object),
        **schema.new_status_columns(n),
    }
    for name in columns.extra:
        out[name] = batch[name]
    if "status" in batch:  # img2dataset's own per-sample status
        for i, status in enumerate(batch["status"]):
            if status != SUCCESS:
                detail = batch["error_message"][i] if "error_message" in batch else None
                schema.mark_failed(out, i, Status.NOT_DOWNLOADED, f"img2dataset status {status!r}: {detail}")
    return out


def normalize_webdataset(
    samples: list[tuple[str, dict[str, bytes]]], source: str, columns: InputColumns
) -> dict[str, np.ndarray]:
    """The samples of one tar, (key, {suffix: member bytes}), -> normalized rows.

    The text is the ``.txt`` member, else the caption in the ``.json``, where img2dataset also stores
    the saved columns that become passthrough columns. A sample without an image member keeps its row.
    """
    n = len(samples)
    files = [member_files for _, member_files in samples]
    metas = [_parse_json(f.get("json")) for f in files]
    out = {
        schema.KEY: _object_column(key for key, _ in samples),
        # A tar may mix image members (a.jpg, b.png): each sample takes the one it has.
        schema.IMAGE: _object_column(
            next((image for s in WEBDATASET_IMAGE_SUFFIXES if (image := _bytes_or_none(f.get(s))) is not None), None)
            for f in files
        ),
        schema.TEXT: _object_column(
            _text_or_empty(f["txt"]) if "txt" in f else _text_or_empty(meta.get("caption"))
            for f, meta in zip(files, metas)
        ),
        schema.SOURCE: np.full(n, source, dtype=object),
        **schema.new_status_columns(n),
    }
    for name in columns.extra:
        out[name] = _object_column(meta.get(name) for meta in metas)
    return out


def _parse_json(value: bytes | None) -> dict:
    if value is None:
        return {}
    try:
        parsed = json.loads(value)
    except (ValueError, TypeError):
        return {}
    return parsed if isinstance(parsed, dict) else {}
