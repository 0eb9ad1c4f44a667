"""Confidence that means something: temperature scaling, the late-fusion weight and the expected calibration error.

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") divides the logits by
one scalar T > 0, fitted on the validation split by minimum negative log-likelihood. The predicted class
does not change; its probability does. A late-fusion model (fusion_head "sum") also gets the image
branch's share s of the sum fitted the same way, jointly with T:

    logits = (2 s image_logits + 2 (1 - s) text_logits) / T        s = 0.5: the sum the model was trained with

so a branch that is overconfident on data it has not trained on (typically the CNN, which memorises a
small training set) is weighted down, and one that only adds noise can be weighted out (s = 0 or 1).
The fit works from sums only, so data-parallel workers accumulate them over their shards and all-reduce them:

    nll_sums   [S, G]        summed NLL of the true class at each image share and temperature of fixed grids
    bin_sums   [S, G, B, 3]  per share, temperature and confidence bin: rows, summed confidence, correct rows

S = 1 for a model without two late-fused branches. The expected calibration error (ECE) is the
row-weighted mean |accuracy - confidence| over B equal-width bins of the top-1 probability.
"""

from __future__ import annotations

import torch

from raypipe.model import late_sum

# Log-spaced from 1/20 to 20 with 1 in the middle: neighbours differ by 5%, finer than the NLL's curvature
# near its minimum on a few hundred validation rows.
TEMPERATURES = torch.logspace(-1.30103, 1.30103, 125, dtype=torch.float64)  # 10**±1.30103 = 1/20, 20
UNSCALED = int(torch.argmin((TEMPERATURES - 1).abs()))  # the grid index of T = 1
IMAGE_SHARES = torch.linspace(0, 1, 21, dtype=torch.float64)  # steps of 0.05, from text only to image only
AS_TRAINED = 10  # the index of share 0.5: the plain sum
ECE_BINS = 15
# Rows x classes x temperatures of one vectorised step: bounds the memory of a validation batch with many
# classes (a 21k-class batch of 128 rows takes 2 temperatures at a time, 8 classes take the whole grid).
CHUNK_ELEMENTS = 1 << 22


def empty_sums(shares: int = 1, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(shares, len(TEMPERATURES), dtype=torch.float64, device=device),
            torch.zeros(shares, len(TEMPERATURES), ECE_BINS, 3, dtype=torch.float64, device=device))


def share_logits(image_logits: torch.Tensor, text_logits: torch.Tensor) -> torch.Tensor:
    """[S, N, C]: the late-fused logits at every image share of the grid."""
    return late_sum(image_logits.double(), text_logits.double(), IMAGE_SHARES.to(image_logits.device)[:, None, None])


def bin_sums(confidence: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """[..., ECE_BINS, 3] from confidence and correct [..., N]: rows, summed confidence and correct rows per bin
    of the top-1 probability."""
    lead, n = confidence.shape[:-1], confidence.shape[-1]
    bins = (confidence * ECE_BINS).long().clamp(max=ECE_BINS - 1).reshape(-1, n)  # [K, N]
    index = (bins + ECE_BINS * torch.arange(len(bins), device=bins.device)[:, None]).reshape(-1)
    values = torch.stack([torch.ones_like(confidence), confidence, correct.to(confidence.dtype)], -1).double()
    out = torch.zeros(len(bins) * ECE_BINS, 3, dtype=torch.float64, device=confidence.device)
    return out.index_add_(0, index, values.reshape(-1, 3)).reshape(*lead, ECE_BINS, 3)


def accumulate(nll: torch.Tensor, bins: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Adds one batch to the sums, in place: logits [N, C] (one share) or [S, N, C] (``share_logits``), labels [N]."""
    logits = logits.detach().double()
    logits = logits[None] if logits.ndim == 2 else logits  # [S, N, C]
    n, classes = logits.shape[1:]
    step = max(1, CHUNK_ELEMENTS // max(n * classes, 1))
    temperatures = TEMPERATURES.to(logits.device)
    for s, share in enumerate(logits):
        correct = (share.argmax(1) == labels).expand(min(step, len(temperatures)), n)  # the same at every T
        for start in range(0, len(temperatures), step):
            chunk = temperatures[start : start + step]
            log_probs = torch.log_softmax(share[None] / chunk[:, None, None], dim=2)  # [g, N, C]
            nll[s, start : start + len(chunk)] -= log_probs.gather(2, labels.expand(len(chunk), n)[..., None]).sum((1, 2))
            bins[s, start : start + len(chunk)] += bin_sums(log_probs.max(2).values.exp(), correct[: len(chunk)])


def expected_calibration_error(bins: torch.Tensor) -> float:
    """ECE from one temperature's [ECE_BINS, 3] sums."""
    rows = bins[:, 0]
    if rows.sum() == 0:
        return 0.0
    gaps = (bins[:, 2] - bins[:, 1]).abs()  # |correct - summed confidence| = rows * |accuracy - confidence|
    return float(gaps.sum() / rows.sum())


def ece_if_calibrated(bins: torch.Tensor) -> float:
    """The ECE a perfectly calibrated model with these confidences would still show on this many rows: its
    expectation when each bin's correct rows are drawn Binomial(rows, mean confidence), from one temperature's
    [ECE_BINS, 3] sums. ECE is a sum of absolute gaps, so sampling alone makes it positive, by about
    sqrt(confidence (1 - confidence) / rows) per bin: measured ECEs near this floor cannot tell a calibrated
    model from a miscalibrated one (~0.1 on 100 rows in 15 bins)."""
    expected_gaps = 0.0
    for rows, confidence, _ in bins.tolist():
        if rows == 0:
            continue
        n, p = int(rows), min(max(confidence / rows, 1e-12), 1 - 1e-12)
        correct = torch.arange(n + 1, dtype=torch.float64)
        pmf = torch.distributions.Binomial(n, torch.tensor(p, dtype=torch.float64)).log_prob(correct).exp()
        expected_gaps += float((pmf * (correct - n * p).abs()).sum())
    return expected_gaps / max(float(bins[:, 0].sum()), 1)


def fit(nll: torch.Tensor, bins: torch.Tensor) -> dict:
    """The image share and temperature of least validation NLL and what they change (JSON-ready): "nll" and
    "ece" at the fitted share before temperature scaling (T = 1), the "_calibrated" ones with both fitted.
    "image_share" and the accuracies at share 0.5 (the plain sum, as trained), 1 (the image branch alone) and
    0 (the text branch alone) are None for a model without late-fused branches, as are "nll_calibrated_image" and
    "nll_calibrated_text": each branch's NLL alone at its own best temperature, what the branch's epoch is chosen by
    under optim.best_epoch_by=val_nll."""
    late = len(nll) > 1
    share, t = divmod(int(torch.argmin(nll)), nll.shape[1])
    rows = float(bins[share, UNSCALED, :, 0].sum())
    return {
        # Not rounded: the bundle divides by it, and a rounded temperature moves confidences across ECE bins.
        "temperature": float(TEMPERATURES[t]),
        "image_share": round(float(IMAGE_SHARES[share]), 2) if late else None,
        "nll": round(float(nll[share, UNSCALED]) / max(rows, 1), 4),
        "nll_calibrated": round(float(nll[share, t]) / max(rows, 1), 4),
        "ece": round(expected_calibration_error(bins[share, UNSCALED]), 4),
        "ece_calibrated": round(expected_calibration_error(bins[share, t]), 4),
        # The temperature cannot change the predicted class, so T = 1's correct rows count for every T.
        **{f"accuracy_{name}": round(float(bins[index, UNSCALED, :, 2].sum()) / max(rows, 1), 4) if late else None
           for name, index in (("plain_sum", AS_TRAINED), ("image", -1), ("text", 0))},
        **{f"nll_calibrated_{name}": round(float(nll[index].min()) / max(rows, 1), 4) if late else None
           for name, index in (("image", -1), ("text", 0))},
        "rows": int(rows),
    }


def reliability(bins: torch.Tensor) -> dict[str, list[float]]:
    """Per non-empty bin: mean confidence, accuracy and rows, for a reliability diagram."""
    keep = bins[:, 0] > 0
    rows = bins[keep, 0]
    return {"confidence": (bins[keep, 1] / rows).tolist(), "accuracy": (bins[keep, 2] / rows).tolist(),
            "rows": rows.tolist()}
