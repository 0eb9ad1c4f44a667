"""Column names and row statuses shared by every stage (the contracts of docs/architecture.md).

A batch is a ``dict[str, np.ndarray]`` (Ray Data's "numpy" batch format). Every stage keeps the
``key`` of each row and never drops a row: a row that cannot be processed gets a ``status`` other
than ``ok`` and an ``error_message``, and later stages pass it through untouched.
"""

from __future__ import annotations

from enum import Enum

import numpy as np

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
