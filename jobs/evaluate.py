"""Evaluate a model bundle: metrics.json, per_class.csv, confusion_matrix.png, training_curves.png.

The `raypipe evaluate` command as a script, for `ray job submit -- python jobs/evaluate.py ...` and
checkouts without the command installed; `python jobs/evaluate.py --help` lists its examples and fields.
"""

import sys

from raypipe.cli import main

if __name__ == "__main__":
    main(["evaluate", *sys.argv[1:]])
