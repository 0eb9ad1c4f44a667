"""Label Parquet collections of image-text pairs (or img2dataset shards) with a trained model bundle.

The `raypipe label` command as a script, for `ray job submit -- python jobs/label.py ...` and
checkouts without the command installed; `python jobs/label.py --help` lists its examples and fields.
"""

import sys

from raypipe.cli import main

if __name__ == "__main__":
    main(["label", *sys.argv[1:]])
