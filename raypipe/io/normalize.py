"""Input batches -> normalized pair rows (key, image bytes, text, source, status, passthrough).

Pure per-batch functions, one per input format. They never drop a row: img2dataset's failed
downloads become ``not_downloaded`` rows, a sample without image bytes becomes ``missing_image``
later in the image transform.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from raypipe import schema
from raypipe.schema import Status

# img2dataset names the image member after its encode_format.
WEBDATASET_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
IMG2DATASET_OK = "success"


@dataclass(frozen=True)
class InputColumns:
    key: str = "key"
    image: str = "jpg"
    text: str = "caption"
    extra: tuple[str, ...] = ()  # passthrough and label-input columns, copied as they are


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
            if status != IMG2DATASET_OK:
                detail = batch["error_message"][i] if "error_message" in batch else None
                schema.mark_failed(out, i, Status.NOT_DOWNLOADED, f"img2dataset status {status!r}: {detail}")
    return out


def normalize_webdataset(batch: dict[str, np.ndarray], columns: InputColumns) -> dict[str, np.ndarray]:
    """A read_webdataset batch (``__key__``, ``__url__``, ``jpg``, ``txt``, ``json``) -> normalized rows.

    Passthrough columns come from each sample's ``.json``, where img2dataset stores saved columns.
    """
    n = len(batch["__key__"])
    # A tar may mix image members (a.jpg, b.png): each sample takes the one it has.
    image_columns = [batch[s] for s in WEBDATASET_IMAGE_SUFFIXES if s in batch]
    metas = [_parse_json(v) for v in batch["json"]] if "json" in batch else [{}] * n
    out = {
        schema.KEY: _object_column(str(k).rsplit("/", 1)[-1] for k in batch["__key__"]),
        schema.IMAGE: _object_column(
            next((image for column in image_columns if (image := _bytes_or_none(column[i])) is not None), None)
            for i in range(n)
        ),
        schema.TEXT: _object_column(_text_or_empty(t) for t in batch["txt"])
        if "txt" in batch
        else _object_column(m.get("caption") or "" for m in metas),
        schema.SOURCE: batch["__url__"],
        **schema.new_status_columns(n),
    }
    for name in columns.extra:
        out[name] = _object_column(m.get(name) for m in metas)
    return out


def _parse_json(value) -> dict:
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return {}
    try:
        parsed = json.loads(value)
    except (ValueError, TypeError):
        return {}
    return parsed if isinstance(parsed, dict) else {}
