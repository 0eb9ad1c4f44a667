"""Class labels: from a label column, or from COYO-Labeled-300M's ``labels`` / ``label_probs``.

The class list is fixed when data is prepared (classes.json) and a label id is a position in it.
A row without a usable label keeps its key and gets ``missing_label`` or ``unknown_label``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from raypipe import schema
from raypipe.schema import Status

COYO_LABELS, COYO_PROBS = "labels", "label_probs"


@dataclass(frozen=True)
class LabelRule:
    source: str  # "column" | "coyo_labeled"
    classes: tuple[str, ...]
    column: str = schema.LABEL
    min_prob: float = 0.5

    @property
    def input_columns(self) -> tuple[str, ...]:
        return (COYO_LABELS, COYO_PROBS) if self.source == "coyo_labeled" else (self.column,)


def label_text(value: Any) -> str | None:
    """A label cell as a class name: ints and integral floats as digits; None, NaN, '' as None."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return None
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    text = str(value).strip()
    return text or None


def class_order(name: str) -> tuple:
    """Sort key of class names: integer names by value (2 before 10), then the others as text."""
    try:
        return (0, int(name), "")
    except ValueError:
        return (1, 0, name)


def _coyo_top1(labels: Any, probs: Any, allowed: dict[str, int], min_prob: float) -> tuple[str | None, str]:
    """Top-1 of COYO-Labeled-300M's (ImageNet-21k id, probability) lists among the allowed classes."""
    if labels is None or probs is None or len(labels) == 0:
        return None, "no labels in labels/label_probs"
    if len(labels) != len(probs):
        return None, f"labels has {len(labels)} entries but label_probs has {len(probs)}"
    best, best_prob = None, -1.0
    for label, prob in zip(labels, probs):
        name = label_text(label)
        if name in allowed and prob > best_prob:
            best, best_prob = name, float(prob)
    if best is None:
        return None, "none of the predicted ImageNet-21k ids is in the class list"
    if best_prob < min_prob:
        return None, f"top class {best} has probability {best_prob:.3f} < min_prob={min_prob}"
    return best, ""


def assign_labels(batch: dict[str, np.ndarray], rule: LabelRule) -> dict[str, np.ndarray]:
    """Adds ``label`` (class name) and ``label_id`` (-1 when unusable); marks rows without a label."""
    n = len(batch[schema.KEY])
    class_ids = {c: i for i, c in enumerate(rule.classes)}
    names = np.full(n, None, dtype=object)
    ids = np.full(n, -1, dtype=np.int64)
    for i in range(n):
        if rule.source == "coyo_labeled":
            name, why = _coyo_top1(batch[COYO_LABELS][i], batch[COYO_PROBS][i], class_ids, rule.min_prob)
            if name is None:
                schema.mark_failed(batch, i, Status.MISSING_LABEL, why)
                continue
        else:
            name = label_text(batch[rule.column][i])
            if name is None:
                schema.mark_failed(batch, i, Status.MISSING_LABEL, f"no value in label column {rule.column!r}")
                continue
            if name not in class_ids:
                schema.mark_failed(
                    batch, i, Status.UNKNOWN_LABEL, f"label {name[:80]!r} is not one of the {len(class_ids)} classes"
                )
                names[i] = name
                continue
        names[i], ids[i] = name, class_ids[name]
    batch[schema.LABEL], batch[schema.LABEL_ID] = names, ids
    return batch
