"""Train image-only, text-only and fusion models on the same split and compare them.

    python jobs/ablation.py                                  # the built-in sample
    python jobs/ablation.py prepared=s3://bucket/prepared optim.epochs=100 optim.early_stopping_patience=10
Writes ablation.md, ablation.json and ablation.png under run.storage_path/run.name.
"""

import sys

from raypipe.bundle import BundleError
from raypipe.cli import parse_job_config, register_user_error, run_job
from raypipe.config import AblationConfig
from raypipe.io.fs import StorageError
from raypipe.io.readers import InputError
from raypipe.pipeline.ablation import run_ablation, table_markdown
from raypipe.pipeline.prepare import PrepareError
from raypipe.pipeline.train import TrainError
from raypipe.transforms.text import WordNetMissingError


def main(argv=None) -> dict:
    config = parse_job_config(AblationConfig, argv, __doc__)
    summary = run_ablation(config)
    print(table_markdown(summary["rows"]), end="")
    print(f"table, curves and histories: {summary['output']}/ablation.{{md,png,json}}")
    return summary


if __name__ == "__main__":
    register_user_error(TrainError, PrepareError, InputError, StorageError, WordNetMissingError, BundleError)
    run_job(lambda: main(sys.argv[1:]))
