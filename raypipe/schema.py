"""Column names and row statuses shared by every stage (the contracts of docs/architecture.md).

A batch is a ``dict[str, np.ndarray]`` (Ray Data's "numpy" batch format). Every stage keeps the
``key`` of each row and never drops a row: a row that cannot be processed gets a ``status`` other
than ``ok`` and an ``error_message``, and later stages pass it through untouched.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import pyarrow as pa

# Normalized pair row (after reading).
KEY = "key"
IMAGE = "image"  # bytes before preprocessing, uint8[H, W, 3] after
TEXT = "text"
LABEL = "label"  # class name (string); training data only

# Prepared row (after preprocessing).
TOKENS = "tokens"  # int32[max_len], 0 = padding
LENGTH = "length"  # int32, number of real tokens before padding
LABEL_ID = "label_id"  # int64 index into classes.json, -1 when unknown
SPLIT = "split"  # "train" | "val"
SOURCE = "source"  # the shard (file URL) a row came from

STATUS = "status"
ERROR_MESSAGE = "error_message"

# Predicted row (BundlePredictor's output: the input columns but the model inputs, and these).
PREDICTED_ID, PREDICTED, CONFIDENCE = "predicted_id", "predicted", "confidence"
TOP_K_LABELS, TOP_K_SCORES = "top_k_labels", "top_k_scores"
ATTENTION_WORDS, ATTENTION_WEIGHTS = "attention_words", "attention_weights"  # explain_words > 0 only
CONFIDENCE_UNCALIBRATED = "confidence_uncalibrated"  # evaluate only: the top-1 probability at temperature 1

# Pass 1 of prepare (token and label counts): one row per (kind, name).
COUNT_KIND, COUNT_NAME, COUNT = "kind", "name", "count"

# The Arrow type of every column raypipe makes. Every batch a map stage returns is built with these
# (``to_arrow``), so a batch whose optional column is all null has the same schema as one where it is
# set: left to inference, an all-null column comes out null- or float-typed, and Ray Data then cannot
# combine it with the string-typed batches of the same stage.
COLUMN_TYPES: dict[str, pa.DataType] = {
    KEY: pa.string(),
    TEXT: pa.string(),
    LABEL: pa.string(),
    LABEL_ID: pa.int64(),
    LENGTH: pa.int32(),
    SPLIT: pa.string(),
    SOURCE: pa.string(),
    STATUS: pa.string(),
    ERROR_MESSAGE: pa.string(),
    PREDICTED_ID: pa.int64(),
    PREDICTED: pa.string(),
    CONFIDENCE: pa.float32(),
    CONFIDENCE_UNCALIBRATED: pa.float32(),
    TOP_K_LABELS: pa.list_(pa.string()),
    TOP_K_SCORES: pa.list_(pa.float32()),
    ATTENTION_WORDS: pa.list_(pa.string()),
    ATTENTION_WEIGHTS: pa.list_(pa.float32()),
    COUNT_KIND: pa.string(),
    COUNT_NAME: pa.string(),
    COUNT: pa.int64(),
}
# Columns of one fixed-shape array per row (Ray's tensor type), by element type: decoded images
# uint8[S, S, 3] and token ids int32[L]. Before decoding, ``image`` holds the encoded bytes.
TENSOR_DTYPES: dict[str, np.dtype] = {IMAGE: np.dtype(np.uint8), TOKENS: np.dtype(np.int32)}
ENCODED_IMAGE_TYPE = pa.binary()


class Status(str, Enum):
    """Why a row is (not) usable. The value is what is written to the ``status`` column."""

    OK = "ok"
    # img2dataset could not fetch or resize the image (its own status was not "success").
    NOT_DOWNLOADED = "not_downloaded"
    MISSING_IMAGE = "missing_image"  # null or empty image bytes
    IMAGE_DECODE_ERROR = "image_decode_error"  # not an image, truncated, unsupported format
    IMAGE_TOO_LARGE = "image_too_large"  # over the max-pixel guard (decompression bomb)
    IMAGE_TOO_SMALL = "image_too_small"  # under the configured minimum side
    MISSING_LABEL = "missing_label"  # training row without a usable label
    UNKNOWN_LABEL = "unknown_label"  # label not in the configured class list
    MISSING_TEXT = "missing_text"  # labeling: no tokens left after cleaning, and the model reads text


def new_status_columns(n: int) -> dict[str, np.ndarray]:
    """Status columns for ``n`` fresh rows: all ``ok``, no message."""
    return {
        STATUS: np.full(n, Status.OK.value, dtype=object),
        ERROR_MESSAGE: np.full(n, None, dtype=object),
    }


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and value != value)


def as_text_column(values: np.ndarray) -> np.ndarray:
    """Object array of str/None. Ray hands an all-null column to the next stage as float NaN."""
    out = np.empty(len(values), dtype=object)
    out[:] = [None if _is_missing(v) else v for v in values]
    return out


def ensure_status_columns(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Status columns as writable object arrays, whatever form the previous stage left them in."""
    n = len(batch[KEY])
    if STATUS not in batch:
        batch.update(new_status_columns(n))
    batch[STATUS] = as_text_column(batch[STATUS])
    batch[ERROR_MESSAGE] = as_text_column(batch[ERROR_MESSAGE])
    return batch


def mark_failed(batch: dict[str, np.ndarray], i: int, status: Status, message: str) -> None:
    """Record that row ``i`` failed; the first failure of a row wins."""
    if batch[STATUS][i] == Status.OK.value:
        batch[STATUS][i] = status.value
        batch[ERROR_MESSAGE][i] = message


def ok_mask(batch: dict[str, np.ndarray]) -> np.ndarray:
    return batch[STATUS] == Status.OK.value


def _typed_array(name: str, values: np.ndarray, declared: pa.DataType) -> pa.Array:
    if pa.types.is_string(declared) and values.dtype == object:
        # Text columns passed through from JSON may hold numbers or lists: kept as their JSON text.
        values = np.array(
            [v if v is None or isinstance(v, str) or (isinstance(v, float) and v != v) else json.dumps(v)
             for v in values],
            dtype=object,
        )
    try:
        return pa.array(values, type=declared, from_pandas=True)  # from_pandas: NaN is null
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise TypeError(f"column {name!r} does not hold {declared} values: {e}") from None


def to_arrow(batch: Mapping[str, np.ndarray], passthrough: Mapping[str, pa.DataType] | None = None) -> pa.Table:
    """A numpy batch -> an Arrow table with every column of its declared type: raypipe's own columns
    from ``COLUMN_TYPES`` / ``TENSOR_DTYPES``, the user's passthrough columns from ``passthrough`` (the
    input's own types, read when the job was planned). A column with no declared type is an error, not
    a guess."""
    from ray.data.extensions import ArrowTensorArray  # the tensor type Ray Data itself reads back

    passthrough = passthrough or {}
    columns = {}
    for name, values in batch.items():
        values = np.asarray(values) if not isinstance(values, np.ndarray) else values
        if name in TENSOR_DTYPES and values.dtype != object:
            columns[name] = ArrowTensorArray.from_numpy(np.ascontiguousarray(values, dtype=TENSOR_DTYPES[name]))
            continue
        declared = COLUMN_TYPES.get(name) or passthrough.get(name)
        if declared is None and name == IMAGE:
            declared = ENCODED_IMAGE_TYPE
        if declared is None:
            raise KeyError(
                f"column {name!r} has no declared Arrow type (raypipe/schema.py, or the input's passthrough types)"
            )
        columns[name] = _typed_array(name, values, declared)
    return pa.table(columns)


@dataclass(frozen=True)
class Typed:
    """A per-batch function (numpy batch in, numpy batch out) whose output a map stage returns as an
    Arrow table of declared types (``to_arrow``). The function itself stays plain numpy."""

    fn: Callable[..., dict]
    passthrough: Mapping[str, pa.DataType] = field(default_factory=dict)

    def __call__(self, batch: dict[str, np.ndarray], *args, **kwargs) -> pa.Table:
        return to_arrow(self.fn(batch, *args, **kwargs), self.passthrough)
