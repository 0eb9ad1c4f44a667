"""Turn a manifest of your own labeled image-text pairs into shards in img2dataset's Parquet format.

The `raypipe ingest` command as a script, for `ray job submit -- python jobs/ingest.py ...` and
checkouts without the command installed; `python jobs/ingest.py --help` lists its examples and fields.
"""

import sys

from raypipe.cli import main

if __name__ == "__main__":
    main(["ingest", *sys.argv[1:]])
