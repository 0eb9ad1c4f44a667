"""Label Parquet collections of image-text pairs (or img2dataset shards) with a trained model bundle.

    python jobs/label.py bundle=~/raypipe-runs/demo-fusion/bundle output=/tmp/labels   # the built-in sample
    python jobs/label.py --config jobs/configs/label.yaml
    python jobs/label.py data.input=s3://bucket/pairs data.format=parquet data.key_column=id \\
        data.image_column=image data.text_column=alt_text data.keep_columns=[url] \\
        bundle=s3://bucket/runs/r1/bundle output=s3://bucket/labels explain=true

One output directory per input file; re-running the same command finishes what a crash left undone
and skips complete outputs (overwrite=true relabels everything). See docs/labeling.md.
"""

import json
import sys

from raypipe.cli import parse_job_config, run_job
from raypipe.config import LabelJobConfig
from raypipe.pipeline.label import LabelError, run_label, summary_lines


def main(argv=None) -> dict:
    config = parse_job_config(LabelJobConfig, argv, __doc__)
    summary = run_label(config)
    print("\n".join(summary_lines(summary)))
    print(json.dumps({k: summary[k] for k in ("rows_in", "rows_labeled", "by_status", "pairs_per_s", "output")}))
    if not summary["complete"]:
        raise LabelError(f"{len(summary['files']['incomplete'])} input file(s) are not completely labeled; "
                         "run the same command again to finish them")
    return summary


if __name__ == "__main__":
    run_job(lambda: main(sys.argv[1:]))
