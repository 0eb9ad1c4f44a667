"""Train image-only, text-only and fusion models on the same split and compare them.

The `raypipe ablation` command as a script, for `ray job submit -- python jobs/ablation.py ...` and
checkouts without the command installed; `python jobs/ablation.py --help` lists its examples and fields.
"""

import sys

from raypipe.cli import main

if __name__ == "__main__":
    main(["ablation", *sys.argv[1:]])
