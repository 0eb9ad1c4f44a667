"""Deterministic train/validation/test split from a hash of the key.

Stable across runs, workers and re-reads, and needs no global shuffle: a row's split depends on its
key (and the salt) only. Each key draws a number u in [0, 1) from its hash:

    u < test_fraction                                  -> test
    test_fraction <= u < test_fraction + val_fraction  -> val
    otherwise                                          -> train

so changing ``val_fraction`` never moves a row into or out of test, and with ``test_fraction=0`` the
validation split is the paper's 80/20 one (``val_fraction=0.2``) exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from raypipe import schema

TRAIN, VAL, TEST = "train", "val", "test"
SPLITS = (TRAIN, VAL, TEST)


@dataclass(frozen=True)
class SplitRule:
    """Which split a row is in, from a hash of its key and ``salt`` (see the module docstring)."""

    val_fraction: float = 0.1
    test_fraction: float = 0.1
    salt: str = "raypipe"

    def __post_init__(self):
        if self.val_fraction < 0 or self.test_fraction < 0 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"need val_fraction, test_fraction >= 0 with a sum below 1, got {self}")


def key_draws(keys: np.ndarray, salt: str) -> np.ndarray:
    """A uniform number in [0, 1) per key: blake2b's 8 bytes (Python's hash() is salted per process)."""
    prefix = salt.encode() + b"\x00"
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(prefix + str(k).encode(), digest_size=8).digest(), "big") / 2**64 for k in keys),
        dtype=np.float64,
        count=len(keys),
    )


def assign_split(keys: np.ndarray, rule: SplitRule) -> np.ndarray:
    """The split name of each key: "train", "val" or "test"."""
    draws = key_draws(keys, rule.salt)
    out = np.full(len(keys), TRAIN, dtype=object)
    out[draws < rule.test_fraction + rule.val_fraction] = VAL
    out[draws < rule.test_fraction] = TEST
    return out


def rows_of_split(
    batch: dict[str, np.ndarray], split: str, usable_only: bool = False, columns: list[str] | None = None
) -> dict[str, np.ndarray]:
    """The rows of one split (with ``usable_only``, only those with status ok), with ``columns`` (default all).

    Lives here, not beside the train loop, so the Ray Data workers that run it never import torch."""
    keep = batch[schema.SPLIT] == split
    if usable_only:
        keep &= batch[schema.STATUS] == schema.Status.OK.value
    return {name: batch[name][keep] for name in columns or batch}
