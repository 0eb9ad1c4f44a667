"""Confidence that means something: temperature scaling and the expected calibration error.

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") divides the logits by
one scalar T > 0, fitted on the validation split by minimum negative log-likelihood. The predicted class
does not change; its probability does. The fit works from sums only, so data-parallel workers
accumulate them over their shards and all-reduce them:

    nll_sums   [G]        summed NLL of the true class at each temperature of a fixed grid
    bin_sums   [G, B, 3]  per temperature and confidence bin: rows, summed confidence, correct rows

The expected calibration error (ECE) is the row-weighted mean |accuracy - confidence| over B
equal-width bins of the top-1 probability.
"""

from __future__ import annotations

import torch

# Log-spaced from 1/20 to 20 with 1 in the middle: neighbours differ by 5%, finer than the NLL's curvature
# near its minimum on a few hundred validation rows.
TEMPERATURES = torch.logspace(-1.30103, 1.30103, 125, dtype=torch.float64)  # 10**±1.30103 = 1/20, 20
UNSCALED = int(torch.argmin((TEMPERATURES - 1).abs()))  # the grid index of T = 1
ECE_BINS = 15


def empty_sums(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(len(TEMPERATURES), dtype=torch.float64, device=device),
            torch.zeros(len(TEMPERATURES), ECE_BINS, 3, dtype=torch.float64, device=device))


def bin_sums(confidence: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """[ECE_BINS, 3]: rows, summed confidence and correct rows per bin of the top-1 probability."""
    bins = (confidence * ECE_BINS).long().clamp(max=ECE_BINS - 1)
    out = torch.zeros(ECE_BINS, 3, dtype=torch.float64, device=confidence.device)
    values = torch.stack([torch.ones_like(confidence), confidence, correct.to(confidence.dtype)], 1).double()
    return out.index_add_(0, bins, values)


def accumulate(nll: torch.Tensor, bins: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Adds one batch (logits [N, C], labels [N]) to the sums, in place."""
    logits = logits.detach().double()
    correct = logits.argmax(1) == labels  # the same at every temperature
    for g, temperature in enumerate(TEMPERATURES.tolist()):
        log_probs = torch.log_softmax(logits / temperature, dim=1)
        nll[g] += -log_probs.gather(1, labels[:, None]).sum()
        bins[g] += bin_sums(log_probs.max(1).values.exp(), correct)


def expected_calibration_error(bins: torch.Tensor) -> float:
    """ECE from one temperature's [ECE_BINS, 3] sums."""
    rows = bins[:, 0]
    if rows.sum() == 0:
        return 0.0
    gaps = (bins[:, 2] - bins[:, 1]).abs()  # |correct - summed confidence| = rows * |accuracy - confidence|
    return float(gaps.sum() / rows.sum())


def fit(nll: torch.Tensor, bins: torch.Tensor) -> dict:
    """The temperature of least validation NLL and what it changes (JSON-ready)."""
    best = int(torch.argmin(nll))
    rows = float(bins[UNSCALED, :, 0].sum())
    return {
        "temperature": round(float(TEMPERATURES[best]), 4),
        "nll": round(float(nll[UNSCALED]) / max(rows, 1), 4),
        "nll_calibrated": round(float(nll[best]) / max(rows, 1), 4),
        "ece": round(expected_calibration_error(bins[UNSCALED]), 4),
        "ece_calibrated": round(expected_calibration_error(bins[best]), 4),
        "rows": int(rows),
    }


def reliability(bins: torch.Tensor) -> dict[str, list[float]]:
    """Per non-empty bin: mean confidence, accuracy and rows, for a reliability diagram."""
    keep = bins[:, 0] > 0
    rows = bins[keep, 0]
    return {"confidence": (bins[keep, 1] / rows).tolist(), "accuracy": (bins[keep, 2] / rows).tolist(),
            "rows": rows.tolist()}
