"""Read image-text shards, preprocess them in parallel on Ray, write prepared Parquet shards.

The `raypipe prepare` command as a script, for `ray job submit -- python jobs/prepare.py ...` and
checkouts without the command installed; `python jobs/prepare.py --help` lists its examples and fields.
"""

import sys

from raypipe.cli import main

if __name__ == "__main__":
    main(["prepare", *sys.argv[1:]])
