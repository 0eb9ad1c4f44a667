"""The training loop's shuffle buffer (optim.shuffle_buffer): every row once, mixed, reproducible."""

import pytest
import torch

from raypipe import schema
from raypipe.pipeline.train import shuffled_batches


def chunks_of(rows: int, sizes: list[int]):
    """Row i holds i in every column (images [n, 2, 2, 3] as the model's are 4-d)."""
    start = 0
    for size in sizes:
        ids = torch.arange(start, min(start + size, rows))
        start += size
        yield {schema.IMAGE: ids.view(-1, 1, 1, 1).expand(-1, 2, 2, 3).clone(), schema.TOKENS: ids[:, None] * 10,
               schema.LABEL_ID: ids}
        if start >= rows:
            return


def drawn(rows: int, chunk: int, batch: int, buffer: int, seed: int = 0) -> list[dict]:
    sizes = [chunk] * (rows // chunk + 1)
    return list(shuffled_batches(chunks_of(rows, sizes), batch, buffer, torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("rows, chunk, batch, buffer", [
    (1000, 100, 32, 200), (1000, 250, 32, 100), (1003, 97, 16, 2000), (31, 8, 32, 10), (64, 64, 32, 64),
])
def test_every_row_comes_out_once_in_full_batches_but_the_last(rows, chunk, batch, buffer):
    batches = drawn(rows, chunk, batch, buffer)
    ids = torch.cat([b[schema.LABEL_ID] for b in batches])
    assert sorted(ids.tolist()) == list(range(rows))
    assert all(len(b[schema.LABEL_ID]) == batch for b in batches[:-1]) and 0 < len(batches[-1][schema.LABEL_ID]) <= batch
    for b in batches:  # the columns of a row stay together
        assert torch.equal(b[schema.IMAGE][:, 1, 1, 2], b[schema.LABEL_ID])
        assert torch.equal(b[schema.TOKENS][:, 0], b[schema.LABEL_ID] * 10)


def test_rows_are_drawn_from_the_whole_buffer_across_chunks():
    batches = drawn(10_000, 500, 32, 1000)
    first = batches[0][schema.LABEL_ID]
    assert first.max() >= 1000  # not only from the first chunks read
    order = torch.cat([b[schema.LABEL_ID] for b in batches]).float()
    positions = torch.arange(len(order)).float()
    assert torch.corrcoef(torch.stack([order, positions]))[0, 1] > 0.9  # a buffer: local mixing, not a global shuffle
    assert (order != positions).float().mean() > 0.95


def test_the_same_seed_gives_the_same_order_and_another_seed_another():
    ids = [torch.cat([b[schema.LABEL_ID] for b in drawn(500, 64, 16, 128, seed)]) for seed in (1, 1, 2)]
    assert torch.equal(ids[0], ids[1]) and not torch.equal(ids[0], ids[2])


def test_no_chunks_no_batches():
    assert list(shuffled_batches(iter([]), 32, 100, torch.Generator())) == []
