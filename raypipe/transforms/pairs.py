"""Normalized pair rows -> prepared rows: the per-batch work of `prepare`, with no Ray in it.

``count_batch`` is the first pass (token counts of the training split and label counts, for the
vocabulary and the class list); ``PairPreparer`` is the second (labels, split, image, text).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from raypipe import schema
from raypipe.transforms.image import ImageOptions, preprocess_images
from raypipe.transforms.labels import LabelRule, assign_labels, label_text
from raypipe.transforms.split import TRAIN, SplitRule, assign_split
from raypipe.transforms.text import TextNormalizer, TextOptions, encode_tokens

TOKEN, LABEL_KIND = "token", "label"


def _counts_to_batch(kind: str, counts: Counter) -> dict[str, np.ndarray]:
    return {
        "kind": np.full(len(counts), kind, dtype=object),
        "name": np.array(list(counts), dtype=object),
        "count": np.fromiter(counts.values(), dtype=np.int64, count=len(counts)),
    }


def count_batch(
    batch: dict[str, np.ndarray], normalizer: TextNormalizer, label_rule: LabelRule | None, split: SplitRule
) -> dict[str, np.ndarray]:
    """Token counts over labeled training rows, and label counts over all rows, as (kind, name, count)."""
    n = len(batch[schema.KEY])
    schema.ensure_status_columns(batch)
    if label_rule is None:
        usable = np.ones(n, dtype=bool)
        labels = Counter()
    elif label_rule.source == "coyo_labeled":
        assign_labels(batch, label_rule)
        usable = schema.ok_mask(batch)
        labels = Counter(batch[schema.LABEL][usable])
    else:
        names = [label_text(v) for v in batch[label_rule.column]]
        usable = np.array([name is not None for name in names], dtype=bool)
        labels = Counter(name for name in names if name is not None)
    usable &= schema.ok_mask(batch) & (assign_split(batch[schema.KEY], split) == TRAIN)
    tokens = Counter()
    for text in batch[schema.TEXT][usable]:
        tokens.update(normalizer.tokens(text))
    counted = [_counts_to_batch(TOKEN, tokens), _counts_to_batch(LABEL_KIND, labels)]
    return {k: np.concatenate([c[k] for c in counted]) for k in counted[0]}


class PairPreparer:
    """Labels, split, image decode + resize, text encode; bad rows keep their key and get a status."""

    def __init__(
        self,
        image: ImageOptions,
        text: TextOptions,
        token_to_id: dict[str, int],
        label_rule: LabelRule | None,
        split: SplitRule,
    ):
        self.image, self.text = image, text
        self.normalizer = TextNormalizer(text)
        self.token_to_id = token_to_id
        self.label_rule = label_rule
        self.split = split

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[schema.KEY])
        schema.ensure_status_columns(batch)
        if self.label_rule is not None:
            assign_labels(batch, self.label_rule)
        else:
            batch[schema.LABEL] = np.full(n, None, dtype=object)
            batch[schema.LABEL_ID] = np.full(n, -1, dtype=np.int64)
        batch[schema.SPLIT] = assign_split(batch[schema.KEY], self.split)
        batch = preprocess_images(batch, self.image)
        token_lists = [self.normalizer.tokens(t) for t in batch[schema.TEXT]]
        batch[schema.TOKENS], batch[schema.LENGTH] = encode_tokens(token_lists, self.token_to_id, self.text.max_len)
        return batch


class ModelInputPreparer:
    """Normalized pair rows -> model inputs for labeling, aware of which inputs the model reads.

    The same transforms as ``PairPreparer`` (so a pair is preprocessed exactly as in training), but:
    a text-only model does not decode images (a bad image cannot fail its row), an image-only model
    never fails a row for its text, and a model that reads text fails a row whose text has no tokens
    left after cleaning with ``missing_text``. No labels and no split: ``label`` is None and
    ``label_id`` -1 on every row. ``PairPreparer`` (prepare, train) is unchanged."""

    def __init__(self, image: ImageOptions, text: TextOptions, token_to_id: dict[str, int], mode: str = "fusion"):
        if mode not in ("fusion", "image", "text"):
            raise ValueError(f"mode must be fusion, image or text, got {mode!r}")
        self.image, self.text, self.mode = image, text, mode
        self.normalizer = TextNormalizer(text)
        self.token_to_id = token_to_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[schema.KEY])
        schema.ensure_status_columns(batch)
        batch[schema.LABEL] = np.full(n, None, dtype=object)
        batch[schema.LABEL_ID] = np.full(n, -1, dtype=np.int64)
        if self.mode == "text":  # img2dataset's failed downloads still have their caption
            for i in np.flatnonzero(batch[schema.STATUS] == schema.Status.NOT_DOWNLOADED.value):
                batch[schema.STATUS][i], batch[schema.ERROR_MESSAGE][i] = schema.Status.OK.value, None
        token_lists = [self.normalizer.tokens(t) for t in batch[schema.TEXT]]
        if self.mode in ("fusion", "image"):
            batch = preprocess_images(batch, self.image)
        else:
            batch[schema.IMAGE] = np.zeros((n, self.image.size, self.image.size, 3), dtype=np.uint8)
        if self.mode in ("fusion", "text"):
            for i, tokens in enumerate(token_lists):
                if not tokens:
                    text = batch[schema.TEXT][i]
                    detail = "text is empty" if not text else f"no words left after cleaning {str(text)[:60]!r}"
                    schema.mark_failed(batch, i, schema.Status.MISSING_TEXT, f"{detail}; the {self.mode} model reads text")
        batch[schema.TOKENS], batch[schema.LENGTH] = encode_tokens(token_lists, self.token_to_id, self.text.max_len)
        return batch
