"""How far the linear text classifier's logits are scaled (raypipe.model.TEXT_LINEAR_SCALE), scored on
validation: text-only models trained in a plain PyTorch loop (no Ray) on a prepared set's training split,
Adam with raypipe's defaults (lr 0.001, weight decay 0.0005, batch 32; docs/examples/epoch_choice.py's loop), the
first epoch of best validation accuracy of at most 100 with patience 10, as `raypipe train model.mode=text
optim.best_epoch_by=val_accuracy` trains them.

    python docs/examples/text_linear_scale.py <prepared> [--scales 1 10 30] [--seeds 5]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from epoch_choice import load_set, select_epoch, validation_curves  # this folder's: the same training loop

import raypipe.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prepared", help="a jobs/prepare.py output")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 10.0, 30.0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    splits, classes, vocab_size = load_set(args.prepared)
    every_row = np.arange(len(splits["val"].labels))
    torch.set_num_threads(1)
    for scale in args.scales:
        raypipe.model.TEXT_LINEAR_SCALE = scale  # read at every forward pass
        runs = []
        for seed in range(args.seeds):
            correct, nll = validation_curves(splits, classes, vocab_size, "text", seed, epochs=100)
            runs.append(float(correct[select_epoch(correct, nll, "val_accuracy", every_row)].mean()))
        print(f"scale {scale:g}: val accuracy {statistics.mean(runs):.3f} ± {statistics.stdev(runs):.3f}"
              f" ({', '.join(f'{r:.3f}' for r in runs)})", flush=True)


if __name__ == "__main__":
    main()
