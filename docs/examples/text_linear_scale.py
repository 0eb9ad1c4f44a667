"""How far the linear text classifier's logits are scaled (raypipe.model.TEXT_LINEAR_SCALE), scored on
validation: text-only models trained in a plain PyTorch loop (no Ray) on a prepared set's training split,
Adam with raypipe's defaults (lr 0.001, weight decay 0.0005, batch 32), the best validation epoch of at most
100 with patience 10, as `raypipe train model.mode=text` trains them.

    python docs/examples/text_linear_scale.py <prepared> [--scales 1 10 30] [--seeds 5]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import raypipe.model
from raypipe.config import StorageConfig
from raypipe.io import fs as rfs
from raypipe.model import FusionClassifier, ModelConfig
from raypipe.pipeline.prepare import PreparedOutput
from raypipe.tools.baselines import load_prepared


def best_val_accuracy(train, val, vocab_size: int, num_classes: int, seed: int) -> float:
    torch.manual_seed(seed)
    model = FusionClassifier(ModelConfig(num_classes=num_classes, vocab_size=vocab_size, mode="text", text_linear=True))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)
    tokens, labels = torch.as_tensor(train.tokens, dtype=torch.long), torch.as_tensor(train.labels)
    val_tokens, val_labels = torch.as_tensor(val.tokens, dtype=torch.long), torch.as_tensor(val.labels)
    best, since_best = 0.0, 0
    for _ in range(100):
        model.train()
        for batch in torch.randperm(len(labels)).split(32):
            loss = F.cross_entropy(model(None, tokens[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(None, val_tokens).argmax(1) == val_labels).float().mean().item()
        best, since_best = (accuracy, 0) if accuracy > best else (best, since_best + 1)
        if since_best == 10:
            break
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prepared", help="a jobs/prepare.py output")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 10.0, 30.0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    splits, classes = load_prepared(args.prepared)
    vocab_size = len(PreparedOutput.open(rfs.resolve(args.prepared, StorageConfig())).vocab)  # as training sizes it
    torch.set_num_threads(1)
    for scale in args.scales:
        raypipe.model.TEXT_LINEAR_SCALE = scale  # read at every forward pass
        runs = [best_val_accuracy(splits["train"], splits["val"], vocab_size, len(classes), s) for s in range(args.seeds)]
        print(f"scale {scale:g}: val accuracy {statistics.mean(runs):.3f} ± {statistics.stdev(runs):.3f}"
              f" ({', '.join(f'{r:.3f}' for r in runs)})", flush=True)


if __name__ == "__main__":
    main()
