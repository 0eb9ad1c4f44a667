"""Train the CNN + LSTM-attention fusion model on Ray Train; write checkpoints and a model bundle.

    python jobs/train.py                                   # the built-in sample, local Ray, a few minutes
    python jobs/train.py prepared=~/.cache/raypipe/prepared scaling.num_workers=2 optim.epochs=30
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/train.yaml
Re-running with the same run.name and run.storage_path resumes from the last checkpoint.
"""

import json
import sys

from raypipe.cli import parse_job_config, run_job
from raypipe.config import TrainConfig
from raypipe.pipeline.train import run_train


def main(argv=None) -> dict:
    config = parse_job_config(TrainConfig, argv, __doc__)
    result = run_train(config)
    best = result["best"]
    print(
        f"best epoch {result['best_epoch']}/{result['epochs_run']}: val_acc {best['val_accuracy']:.4f} "
        f"macro_f1 {best['val_macro_f1']:.4f}; bundle {result['bundle']} ({result['identity']})"
    )
    print(json.dumps({"bundle": result["bundle"], "val_accuracy": best["val_accuracy"]}))
    return result


if __name__ == "__main__":
    run_job(lambda: main(sys.argv[1:]))
