import numpy as np
import pytest

from raypipe import schema
from raypipe.schema import Status
from raypipe.transforms.labels import LabelRule, assign_labels
from raypipe.config import SplitConfig
from raypipe.transforms.split import SplitRule, assign_split
from raypipe.transforms.vocab import PAD_ID, UNK_ID, Vocabulary, count_tokens


def test_split_is_stable_and_close_to_the_fractions():
    keys = np.array([f"{i:09d}" for i in range(20_000)], dtype=object)
    first = assign_split(keys, SplitRule())  # 80/10/10
    for name, share in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert abs((first == name).mean() - share) < 0.01
    # Same key -> same split, whatever batch it arrives in or in what order.
    shuffled = np.random.default_rng(0).permutation(len(keys))
    assert (assign_split(keys[shuffled], SplitRule()) == first[shuffled]).all()
    assert (assign_split(keys[:7], SplitRule()) == first[:7]).all()
    # A different salt draws a different split.
    assert (assign_split(keys, SplitRule(salt="other")) != first).mean() > 0.2
    assert not (assign_split(keys, SplitRule(0.0, 0.0)) != "train").any()


def test_the_test_split_does_not_move_with_the_validation_share_and_the_paper_split_is_kept():
    keys = np.array([f"k{i}" for i in range(5_000)], dtype=object)
    default = assign_split(keys, SplitRule(0.1, 0.1))
    wider_val = assign_split(keys, SplitRule(0.2, 0.1))
    assert ((default == "test") == (wider_val == "test")).all()
    assert (wider_val[default == "val"] == "val").all()  # validation only grows
    # The paper's 80/20 (no test) holds exactly the rows the default puts in validation or test.
    paper = assign_split(keys, SplitRule(0.2, 0.0))
    assert set(paper) == {"train", "val"}
    assert ((paper == "val") == (default != "train")).all()


@pytest.mark.parametrize("val, test", [(0.5, 0.5), (0.9, 0.2), (-0.1, 0.1)])
def test_fractions_that_leave_no_training_rows_are_refused(val, test):
    with pytest.raises(ValueError, match="val_fraction, test_fraction >= 0 with a sum below 1"):
        SplitRule(val, test)


def test_the_split_config_refuses_fractions_that_sum_to_one_naming_both():
    with pytest.raises(ValueError, match=r"split.val_fraction \+ split.test_fraction must be below 1"):
        SplitConfig(val_fraction=0.5, test_fraction=0.5)
    assert SplitConfig(val_fraction=0.2, test_fraction=0.0).rule() == SplitRule(0.2, 0.0, "raypipe")


def test_vocab_frequency_order_cutoffs_and_json_round_trip():
    counts = count_tokens([["b", "a", "c"], ["a", "b"], ["a", "d"]])
    vocab = Vocabulary.from_counts(counts, min_freq=2)
    assert vocab.tokens == ("<pad>", "<unk>", "a", "b")  # c and d seen once
    assert vocab.token_to_id["<pad>"] == PAD_ID and vocab.token_to_id["<unk>"] == UNK_ID
    assert Vocabulary.from_counts(counts, max_size=3).tokens == ("<pad>", "<unk>", "a")
    # Ties are broken alphabetically, so merging counters in any order gives the same vocabulary.
    assert Vocabulary.from_counts({"z": 1, "y": 1}).tokens[2:] == ("y", "z")
    assert Vocabulary.from_json(vocab.to_json()) == vocab


def _batch(**columns):
    n = len(next(iter(columns.values())))
    batch = {schema.KEY: np.array([str(i) for i in range(n)], dtype=object), **schema.new_status_columns(n)}
    for name, values in columns.items():
        arr = np.empty(n, dtype=object)
        arr[:] = values
        batch[name] = arr
    return batch


def test_label_column_names_ints_missing_and_unknown():
    batch = _batch(label=["cat", 3, 3.0, None, float("nan"), " ", "zebra"])
    out = assign_labels(batch, LabelRule("column", ("cat", "3")))
    assert list(out[schema.LABEL_ID]) == [0, 1, 1, -1, -1, -1, -1]
    assert list(out[schema.STATUS][3:6]) == [Status.MISSING_LABEL.value] * 3
    assert out[schema.STATUS][6] == Status.UNKNOWN_LABEL.value and "zebra" in out[schema.ERROR_MESSAGE][6]


def test_coyo_labeled_top1_within_classes_above_threshold():
    batch = _batch(
        labels=[[10, 20, 30], [10, 20], [99], [], [10, 20]],
        label_probs=[[0.1, 0.7, 0.2], [0.3, 0.2], [0.9], [], [0.5]],
    )
    out = assign_labels(batch, LabelRule("coyo_labeled", ("10", "30"), min_prob=0.15))
    # Row 0: 20 is not a class, so the best allowed is 30 (0.2). Row 1: 10 (0.3).
    assert list(out[schema.LABEL][:2]) == ["30", "10"] and list(out[schema.LABEL_ID][:2]) == [1, 0]
    assert "is in the class list" in out[schema.ERROR_MESSAGE][2]
    assert out[schema.STATUS][3] == Status.MISSING_LABEL.value
    assert "label_probs has 1" in out[schema.ERROR_MESSAGE][4]
    strict = assign_labels(_batch(labels=[[10]], label_probs=[[0.4]]), LabelRule("coyo_labeled", ("10",)))
    assert "probability 0.400 < min_prob=0.5" in strict[schema.ERROR_MESSAGE][0]


def test_a_failed_row_keeps_its_first_error():
    batch = _batch(label=[None])
    schema.mark_failed(batch, 0, Status.NOT_DOWNLOADED, "404")
    out = assign_labels(batch, LabelRule("column", ("a",)))
    assert out[schema.STATUS][0] == Status.NOT_DOWNLOADED.value and out[schema.ERROR_MESSAGE][0] == "404"
