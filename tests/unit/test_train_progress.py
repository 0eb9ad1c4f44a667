"""The progress line a training run prints inside each epoch."""

from __future__ import annotations

from raypipe.pipeline.train import progress_line


def test_the_line_gives_rows_rate_and_time_left_in_the_epoch_and_the_run():
    # 500 of 2,000 rows in 10 s: 50 rows/s, 30 s left in epoch 2, then 3 more epochs of 40 s.
    line = progress_line(2, 5, 500, 2000, 1.23456, 10.0)
    assert line == "  epoch 2/5  500/2,000 rows (25%)  loss 1.2346  50 samples/s  epoch left ~30 s, run left ~2 min 30 s"


def test_without_an_expected_count_the_line_has_no_time_left():
    assert progress_line(1, 3, 1234, None, 0.5, 2.0) == "  epoch 1/3  1,234 rows  loss 0.5000  617 samples/s"


def test_long_runs_are_given_in_hours():
    assert progress_line(1, 100, 10, 100_000, 0.1, 1.0).endswith("epoch left ~2 h 46 min, run left ~277 h 46 min")
