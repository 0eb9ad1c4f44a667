"""Train image-only, text-only and fusion models on the same split and compare them.

    python jobs/ablation.py                                  # the built-in sample
    python jobs/ablation.py prepared=s3://bucket/prepared optim.epochs=100 optim.early_stopping_patience=10
    python jobs/ablation.py prepared=/data/prepared 'seeds=[0,1,2,3,4]' confusion_matrix=true
Writes ablation.md, ablation.json and ablation.png (and ablation_confusion.png) under run.storage_path/run.name.
With seeds, each mode is trained once per seed and the table gives mean and standard deviation.
"""

import sys

from raypipe.cli import parse_job_config, run_job
from raypipe.config import AblationConfig
from raypipe.pipeline.ablation import run_ablation


def main(argv=None) -> dict:
    config = parse_job_config(AblationConfig, argv, __doc__)
    summary = run_ablation(config)
    print(summary["table"], end="")
    extra = " + ablation_confusion.png" if "fusion_confusion" in summary else ""
    print(f"table, curves and runs: {summary['output']}/ablation.{{md,png,json}}{extra}")
    return summary


if __name__ == "__main__":
    run_job(lambda: main(sys.argv[1:]))
