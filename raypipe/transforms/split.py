"""Deterministic train/validation split from a hash of the key.

Stable across runs, workers and re-reads, and needs no global shuffle: a row's split depends on its
key (and the salt) only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from raypipe import schema

TRAIN, VAL = "train", "val"


@dataclass(frozen=True)
class SplitRule:
    """Which split a row is in: a hash of its key and ``salt`` below ``val_fraction`` is validation."""

    val_fraction: float = 0.2
    salt: str = "raypipe"


def validation_mask(keys: np.ndarray, val_fraction: float, salt: str = "raypipe") -> np.ndarray:
    """True where a key belongs to the validation split."""
    prefix = salt.encode() + b"\x00"
    # blake2b's 8 bytes as a uniform number in [0, 1); Python's hash() is salted per process.
    draws = np.fromiter(
        (int.from_bytes(hashlib.blake2b(prefix + str(k).encode(), digest_size=8).digest(), "big") / 2**64 for k in keys),
        dtype=np.float64,
        count=len(keys),
    )
    return draws < val_fraction


def assign_split(keys: np.ndarray, val_fraction: float, salt: str = "raypipe") -> np.ndarray:
    return np.where(validation_mask(keys, val_fraction, salt), VAL, TRAIN).astype(object)


def rows_of_split(
    batch: dict[str, np.ndarray], split: str, usable_only: bool = False, columns: list[str] | None = None
) -> dict[str, np.ndarray]:
    """The rows of one split (with ``usable_only``, only those with status ok), with ``columns`` (default all).

    Lives here, not beside the train loop, so the Ray Data workers that run it never import torch."""
    keep = batch[schema.SPLIT] == split
    if usable_only:
        keep &= batch[schema.STATUS] == schema.Status.OK.value
    return {name: batch[name][keep] for name in columns or batch}
