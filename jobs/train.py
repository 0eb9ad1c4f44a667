"""Train the CNN + LSTM-attention fusion model on Ray Train; write checkpoints and a model bundle.

The `raypipe train` command as a script, for `ray job submit -- python jobs/train.py ...` and
checkouts without the command installed; `python jobs/train.py --help` lists its examples and fields.
"""

import sys

from raypipe.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
