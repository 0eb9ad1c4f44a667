"""img2dataset's output, as COYO-700M downloads come: the one place raypipe spells its layout.

Shards are named ``{shard:05d}`` (``shard_name``); sample keys are img2dataset's ``compute_key`` of the
sample's index and shard. ``output_format="webdataset"`` writes ``{shard}.tar`` with ``{key}.jpg``,
``{key}.json``, ``{key}.txt`` per downloaded sample, a ``{shard}.parquet`` beside it with the metadata
of every sample (failed downloads included) and ``{shard}_stats.json``; ``output_format="parquet"``
writes the metadata plus the image bytes in ``{shard}.parquet``. Each sample's ``status`` is one of
``STATUSES``.
"""

from __future__ import annotations

import math

import pyarrow as pa

# A sample's status, as img2dataset's downloader writes it.
SUCCESS, FAILED_TO_DOWNLOAD, FAILED_TO_RESIZE = "success", "failed_to_download", "failed_to_resize"
STATUSES = (SUCCESS, FAILED_TO_DOWNLOAD, FAILED_TO_RESIZE)

# The image member of a WebDataset sample is named after encode_format.
WEBDATASET_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")

# Schema of the metadata parquet beside each tar (and of the parquet output without ``jpg``):
# the input columns (save_additional_columns + caption + url) then what img2dataset's Downloader
# appends (key ... original_height, exif when extract_exif, sha256 when compute_hash="sha256").
METADATA_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("label", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("url", pa.string()),
        pa.field("key", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("exif", pa.string()),
        pa.field("sha256", pa.string()),
    ]
)
# ParquetSampleWriter appends the image column (named after encode_format).
PARQUET_SCHEMA = METADATA_SCHEMA.append(pa.field("jpg", pa.binary()))

TAR_MEMBER_SUFFIXES: tuple[str, ...] = ("jpg", "json", "txt")  # TarWriter writes sorted(keys)
OOM_SHARD_COUNT = 5  # img2dataset's default: shard names are {shard:05d}
PARQUET_ROW_GROUP = 100  # BufferedParquetWriter's buffer size


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{OOM_SHARD_COUNT}d}"


def compute_key(index: int, shard_id: int, shard_size: int) -> str:
    """img2dataset.downloader.compute_key for the ``index``-th sample of shard ``shard_id``."""
    oom_sample_per_shard = math.ceil(math.log10(shard_size))
    true_key = (10**oom_sample_per_shard) * shard_id + index
    return f"{true_key:0{oom_sample_per_shard + OOM_SHARD_COUNT}d}"
