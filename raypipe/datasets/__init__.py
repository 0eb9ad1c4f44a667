"""Data sets raypipe ships or builds: the built-in sample (``raypipe.datasets.sample``), written on first
use by any job run on its default input."""

from __future__ import annotations

import logging
from pathlib import Path

from raypipe.config import DEFAULT_SAMPLE_DIR, DataConfig

log = logging.getLogger(__name__)


def ensure_default_sample(data: DataConfig) -> None:
    """Jobs run with no arguments read the built-in sample: write it on first use."""
    if data.input != DataConfig().input:
        return
    sample_dir = Path(DEFAULT_SAMPLE_DIR).expanduser()
    if not (sample_dir / "webdataset").is_dir():
        from raypipe.datasets.sample import write_sample  # the generator (Pillow drawing) only when needed

        log.info("writing the built-in sample to %s", sample_dir)
        write_sample(str(sample_dir))
