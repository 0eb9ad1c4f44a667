"""The token vocabulary: counted on the training split, reduced, frozen into vocab.json.

Id 0 is padding and id 1 is unknown, as the model's embedding expects (``padding_idx=0``).
Counting is a pure per-batch function so Ray Data can run it in parallel map tasks; the
per-batch counters are then summed by the caller.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1


@dataclass(frozen=True)
class Vocabulary:
    tokens: tuple[str, ...]  # index = id; tokens[0] = PAD_TOKEN, tokens[1] = UNK_TOKEN

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], min_freq: int = 1, max_size: int | None = None) -> Vocabulary:
        """Most frequent first, ties broken alphabetically so the result does not depend on
        the order in which parallel counters were merged."""
        kept = sorted(((t, c) for t, c in counts.items() if c >= min_freq), key=lambda tc: (-tc[1], tc[0]))
        if max_size is not None:
            kept = kept[: max(0, max_size - 2)]
        return cls((PAD_TOKEN, UNK_TOKEN, *(t for t, _ in kept)))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def token_to_id(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    def to_json(self) -> str:
        return json.dumps({"pad_id": PAD_ID, "unk_id": UNK_ID, "tokens": list(self.tokens)}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        data = json.loads(text)
        tokens = tuple(data["tokens"])
        if tokens[:2] != (PAD_TOKEN, UNK_TOKEN):
            raise ValueError(f"vocab.json must start with {PAD_TOKEN!r}, {UNK_TOKEN!r}; got {tokens[:2]!r}")
        return cls(tokens)


def count_tokens(token_lists: Iterable[list[str]]) -> Counter:
    counts: Counter = Counter()
    for tokens in token_lists:
        counts.update(tokens)
    return counts
