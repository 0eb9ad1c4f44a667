"""Which validation figure should choose the epoch kept (optim.best_epoch_by), judged on validation alone.

One-branch models (text only or image only) are trained in a plain PyTorch loop (no Ray) on a prepared
set's training split with training's settings (Adam, lr 0.001, weight decay 0.0005, batch 32; images
augmented as optim.augment does), for a fixed number of epochs, recording every validation row's result at
every epoch. Each rule then picks an epoch on one half of the validation rows (patience 10, as training
stops) and is scored by the accuracy of that epoch on the other half, and the other way round:

    val_accuracy  the first epoch of highest accuracy
    val_nll       the epoch of least negative log-likelihood at the best temperature of that half

    python docs/examples/epoch_choice.py <prepared> --mode text [--seeds 5] [--epochs 40]
    python docs/examples/epoch_choice.py <prepared> --mode image --epochs 60
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
import torch.nn.functional as F

from raypipe import calibration
from raypipe.config import StorageConfig
from raypipe.io import fs as rfs
from raypipe.model import FusionClassifier, ModelConfig
from raypipe.pipeline.prepare import PreparedOutput
from raypipe.pipeline.train import augment_images
from raypipe.tools.baselines import load_prepared

PATIENCE = 10
RULES = ("val_accuracy", "val_nll")


def load_set(prepared: str) -> tuple[dict, list[str], int]:
    """(splits, classes, vocabulary size as training sizes the model) of a prepare output."""
    splits, classes = load_prepared(prepared)
    return splits, classes, len(PreparedOutput.open(rfs.resolve(prepared, StorageConfig())).vocab)


def validation_curves(splits: dict, classes: list[str], vocab_size: int, mode: str, seed: int,
                      epochs: int) -> tuple[np.ndarray, np.ndarray]:
    """One run's (correct [E, N], nll [E, T, N]): per epoch, which validation rows are right, and each row's
    NLL at every temperature of calibration.TEMPERATURES."""
    train, val = splits["train"], splits["val"]
    text = mode == "text"
    inputs = torch.as_tensor(train.tokens if text else train.images)
    val_inputs = torch.as_tensor(val.tokens if text else val.images)
    labels, val_labels = torch.as_tensor(train.labels), torch.as_tensor(val.labels)
    torch.manual_seed(seed)
    augmenter = torch.Generator().manual_seed(seed)
    model = FusionClassifier(ModelConfig(num_classes=len(classes), vocab_size=vocab_size, mode=mode, text_linear=text))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)

    def logits_of(x: torch.Tensor, train_batch: bool = False) -> torch.Tensor:
        if text:
            return model(None, x.long())
        return model(augment_images(x, augmenter) if train_batch else x, None)

    correct, nll = [], []
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(labels)).split(32):
            loss = F.cross_entropy(logits_of(inputs[batch], train_batch=True), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            logits = logits_of(val_inputs).double()
        correct.append((logits.argmax(1) == val_labels).numpy())
        nll.append(torch.stack([F.cross_entropy(logits / t, val_labels, reduction="none")
                                for t in calibration.TEMPERATURES]).numpy())
    return np.array(correct), np.array(nll)


def select_epoch(correct: np.ndarray, nll: np.ndarray, rule: str, rows: np.ndarray) -> int:
    """The epoch index ``rule`` keeps, judged on ``rows``, stopping after PATIENCE epochs without a better one."""
    scores = correct[:, rows].mean(1) if rule == "val_accuracy" else -nll[:, :, rows].mean(2).min(1)
    best, since_best = 0, 0
    for epoch in range(1, len(scores)):
        best, since_best = (epoch, 0) if scores[epoch] > scores[best] else (best, since_best + 1)
        if since_best == PATIENCE:
            break
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prepared", help="a jobs/prepare.py output")
    parser.add_argument("--mode", choices=["text", "image"], default="text")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    splits, classes, vocab_size = load_set(args.prepared)
    torch.set_num_threads(1)
    held_out: dict[str, list[float]] = {rule: [] for rule in RULES}
    for seed in range(args.seeds):
        correct, nll = validation_curves(splits, classes, vocab_size, args.mode, seed, args.epochs)
        order = np.random.default_rng(0).permutation(correct.shape[1])  # the same halves for every seed
        halves = (order[: len(order) // 2], order[len(order) // 2 :])
        for choose, score in (halves, halves[::-1]):
            for rule in RULES:
                held_out[rule].append(float(correct[select_epoch(correct, nll, rule, choose), score].mean()))
        every_row = np.arange(correct.shape[1])
        print(f"seed {seed}: epochs chosen on all validation rows "
              + ", ".join(f"{rule} {select_epoch(correct, nll, rule, every_row) + 1}" for rule in RULES), flush=True)
    for rule in RULES:
        print(f"{rule}: accuracy on the other half {statistics.mean(held_out[rule]):.3f}")
    difference = np.array(held_out["val_nll"]) - np.array(held_out["val_accuracy"])
    standard_error = difference.std(ddof=1) / np.sqrt(len(difference))
    print(f"val_nll - val_accuracy: {difference.mean():+.4f} (standard error {standard_error:.4f}, "
          f"{len(difference)} seed x half pairs)")


if __name__ == "__main__":
    main()
