"""Turn a manifest of your own labeled image-text pairs into shards in img2dataset's Parquet format.

    python jobs/ingest.py manifest=pairs.csv output=/data/shards          # columns image, text, label
    python jobs/ingest.py --config jobs/configs/ingest.yaml
    python jobs/ingest.py manifest=s3://bucket/pairs.parquet image_column=path text_column=alt \\
        label_column=category key_column=id output=s3://bucket/shards
    python jobs/prepare.py data.input=/data/shards labels.column=label     # then as any img2dataset download

The manifest (CSV, JSON lines or Parquet) names each image by a local path (relative to the manifest
or base_dir), an http(s):// or s3:// URL, or holds its bytes. A row whose image cannot be read or
decoded is kept with img2dataset's status (failed_to_download / failed_to_resize) and a message.
"""

import json
import sys

from raypipe.cli import parse_job_config, run_job
from raypipe.config import IngestConfig
from raypipe.ingest import run_ingest, summary_lines


def main(argv=None) -> dict:
    config = parse_job_config(IngestConfig, argv, __doc__)
    summary = run_ingest(config)
    print("\n".join(summary_lines(summary)))
    print(json.dumps({k: summary[k] for k in ("rows", "shards", "by_status", "output")}))
    return summary


if __name__ == "__main__":
    run_job(lambda: main(sys.argv[1:]))
