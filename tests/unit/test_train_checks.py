"""What training checks and prints on its own: the progress line inside each epoch, data it refuses,
the class order."""

from __future__ import annotations

import pytest

from raypipe.config import PrepareConfig, load_config
from raypipe.pipeline.train import TrainError, check_trainable, progress_line
from raypipe.transforms.labels import class_order


def test_the_line_gives_rows_rate_and_time_left_in_the_epoch_and_the_run():
    # 500 of 2,000 rows in 10 s: 50 rows/s, 30 s left in epoch 2, then 3 more epochs of 40 s.
    line = progress_line(2, 5, 500, 2000, 1.23456, 10.0)
    assert line == "  epoch 2/5  500/2,000 rows (25%)  loss 1.2346  50 samples/s  epoch left ~30 s, run left ~2 min 30 s"


def test_without_an_expected_count_the_line_has_no_time_left():
    assert progress_line(1, 3, 1234, None, 0.5, 2.0) == "  epoch 1/3  1,234 rows  loss 0.5000  617 samples/s"


def test_long_runs_are_given_in_hours():
    assert progress_line(1, 100, 10, 100_000, 0.1, 1.0).endswith("epoch left ~2 h 46 min, run left ~277 h 46 min")


def test_data_without_training_rows_or_with_one_class_is_refused():
    check_trainable("s3://b/prepared", {"cat": 3, "dog": 1}, 4)
    with pytest.raises(TrainError, match=r"s3://b/prepared has no usable row in the training split.*stats.json"):
        check_trainable("s3://b/prepared", {"cat": 3, "dog": 1}, 0)
    with pytest.raises(TrainError, match=r"labeled rows of 1 class\(es\) \(\['cat'\]\); a classifier needs two"):
        check_trainable("s3://b/prepared", {"cat": 3, "dog": 0}, 3)


def test_integer_classes_are_text_in_their_given_order_and_sorted_by_value_by_default():
    assert load_config(PrepareConfig, None, ["labels.classes=[10, 2, 1]"]).labels.classes == ["10", "2", "1"]
    assert sorted(["10", "2", "cat", "1"], key=class_order) == ["1", "2", "10", "cat"]
