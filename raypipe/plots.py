"""PNG figures: training curves, confusion matrix, ablation curves (matplotlib, no display)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _png(fig) -> bytes:
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out.getvalue()


def training_curves(history: list[dict], title: str) -> bytes:
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], label="validation loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.legend()
    acc_ax.plot(epochs, [h["val_accuracy"] for h in history], label="validation accuracy")
    acc_ax.plot(epochs, [h["val_macro_f1"] for h in history], label="validation macro-F1")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylim(0, 1)
    acc_ax.legend()
    fig.suptitle(title)
    return _png(fig)


def confusion_matrix(confusion: np.ndarray, classes: list[str], title: str) -> bytes:
    """Rows: true class, columns: predicted; cells normalized per true class, counts written in."""
    totals = confusion.sum(1, keepdims=True)
    share = np.divide(confusion, totals, out=np.zeros(confusion.shape), where=totals > 0)
    size = max(4.0, 0.55 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(classes) <= 30:
        for i in range(len(classes)):
            for j in range(len(classes)):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center",
                            color="white" if share[i, j] > 0.5 else "black", fontsize=8)
    ax.set_title(title)
    return _png(fig)


def ablation_curves(histories: dict[str, list[dict]], title: str) -> bytes:
    """Validation accuracy per epoch, one line per mode (like the paper's Figure 6)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode, history in histories.items():
        ax.plot([h["epoch"] for h in history], [h["val_accuracy"] for h in history], marker=".", label=mode)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    return _png(fig)


def seed_band_curves(bands: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int]], title: str) -> bytes:
    """Validation accuracy per epoch, per mode: (epochs, mean over seeds, standard deviation, seeds) as
    a line with a band of one standard deviation."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode, (epochs, mean, std, seeds) in bands.items():
        (line,) = ax.plot(epochs, mean, label=f"{mode} ({seeds} seed{'s' if seeds > 1 else ''})")
        ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(xlabel="epoch (mean over the seeds still training)", ylabel="validation accuracy", ylim=(0, 1), title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def reliability_diagram(curves: dict[str, dict[str, list[float]]], title: str) -> bytes:
    """Accuracy against mean confidence per confidence bin (``calibration.reliability``), one line per
    curve (e.g. before and after temperature scaling); the diagonal is perfect calibration, and the
    marker area grows with the bin's rows."""
    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for label, bins in curves.items():
        rows = np.asarray(bins["rows"], dtype=float)
        sizes = 12 + 120 * rows / max(rows.max(), 1) if len(rows) else []
        (line,) = ax.plot(bins["confidence"], bins["accuracy"], label=label)
        ax.scatter(bins["confidence"], bins["accuracy"], s=sizes, color=line.get_color())
    ax.set(xlabel="confidence (top-1 probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    return _png(fig)
