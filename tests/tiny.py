"""Tiny real inputs for tests that need some: Parquet files of labeled pairs and an untrained bundle."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from imagekinds import jpeg_photo

from raypipe.bundle import Bundle, save_bundle
from raypipe.config import StorageConfig
from raypipe.io import fs as rfs
from raypipe.model import FusionClassifier, ModelConfig
from raypipe.transforms.image import ImageOptions
from raypipe.transforms.text import TextOptions
from raypipe.transforms.vocab import Vocabulary

# Overrides that read these files (a plain Parquet table: key, jpg, caption, label).
PAIR_COLUMNS = ["data.format=parquet", "data.key_column=key", "data.image_column=jpg", "data.text_column=caption"]


def write_pairs(url: str, files: int = 2) -> None:
    loc = rfs.resolve(url, StorageConfig())
    loc.fs.create_dir(loc.path, recursive=True)
    image = jpeg_photo(32, 24)
    for i in range(files):
        table = pa.table({
            "key": [f"{i}-{j}" for j in range(4)],
            "jpg": pa.array([image] * 4, pa.binary()),
            "caption": ["a red dog", "a cat", "a car", "two dogs"],
            "label": ["dog", "cat", "car", "dog"],
        })
        pq.write_table(table, f"{loc.path}/pairs-{i}.parquet", filesystem=loc.fs)


def write_bundle(url: str) -> None:
    vocab = Vocabulary(("<pad>", "<unk>", "dog", "cat", "car"))
    config = ModelConfig(num_classes=3, vocab_size=len(vocab), image_size=16, conv_channels=(4,), embed_dim=4,
                         lstm_hidden=4, fc_dims=(8,))
    save_bundle(url, StorageConfig(), Bundle(config, ImageOptions(size=16), TextOptions(max_len=8, lemmatize=False),
                                             vocab, ("car", "cat", "dog"), FusionClassifier(config).state_dict(), {}))
