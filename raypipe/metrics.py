"""Classification metrics from a confusion matrix (rows: true class, columns: predicted)."""

from __future__ import annotations

import numpy as np


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(true * num_classes + predicted, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def per_class(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class; 0 where a class was never predicted / present."""
    tp = np.diag(confusion).astype(np.float64)
    predicted, support = confusion.sum(0), confusion.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def summary(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 (over the classes present in the true labels)."""
    total = confusion.sum()
    stats = per_class(confusion)
    present = stats["support"] > 0
    return {
        "accuracy": float(np.trace(confusion) / total) if total else 0.0,
        "macro_f1": float(stats["f1"][present].mean()) if present.any() else 0.0,
    }
