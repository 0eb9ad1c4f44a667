"""Read image-text shards, preprocess them in parallel on Ray, write prepared Parquet shards.

    python jobs/prepare.py                                  # the built-in sample, local Ray
    python jobs/prepare.py --config jobs/configs/prepare.yaml data.input=s3://bucket/coyo output=s3://bucket/prepared
"""

import json
import sys

from raypipe.cli import parse_job_config, run_job
from raypipe.config import PrepareConfig
from raypipe.pipeline.prepare import run_prepare, summary_lines


def main(argv=None) -> None:
    config = parse_job_config(PrepareConfig, argv, __doc__)
    stats = run_prepare(config)
    print("\n".join(summary_lines(stats)))
    print(json.dumps({k: stats[k] for k in ("rows_in", "rows_ok", "by_status")}))


if __name__ == "__main__":
    run_job(lambda: main(sys.argv[1:]))
