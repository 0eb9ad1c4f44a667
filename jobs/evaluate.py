"""Evaluate a model bundle: metrics.json, per_class.csv, confusion_matrix.png, training_curves.png.

    python jobs/evaluate.py                                          # the default run's bundle, built-in sample
    python jobs/evaluate.py bundle=s3://bucket/runs/r1/bundle prepared=s3://bucket/prepared
"""

import json
import sys

from raypipe.cli import parse_job_config, run_job
from raypipe.config import EvaluateConfig
from raypipe.pipeline.evaluate import run_evaluate


def main(argv=None) -> dict:
    config = parse_job_config(EvaluateConfig, argv, __doc__)
    result = run_evaluate(config)
    print(f"{result['split']} split, {result['rows']} rows: accuracy {result['accuracy']:.4f}, "
          f"macro-F1 {result['macro_f1']:.4f} -> {result['output']}")
    for name, row in result["per_class"].items():
        print(f"  {name:>16}  precision {row['precision']:.3f}  recall {row['recall']:.3f}  "
              f"f1 {row['f1']:.3f}  support {int(row['support'])}")
    print(json.dumps({k: result[k] for k in ("accuracy", "macro_f1", "rows")}))
    return result


if __name__ == "__main__":
    run_job(lambda: main(sys.argv[1:]))
