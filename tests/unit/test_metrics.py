import numpy as np

from raypipe.metrics import confusion_matrix, per_class, summary


def test_confusion_accuracy_and_macro_f1_by_hand():
    true = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    cm = confusion_matrix(true, pred, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    stats = per_class(cm)
    # class 0: p=1, r=2/3 -> f1=0.8; class 1: p=1/2, r=1/2 -> 0.5; class 2: p=1/2, r=1 -> 2/3
    assert np.allclose(stats["f1"], [0.8, 0.5, 2 / 3])
    s = summary(cm)
    assert s["accuracy"] == 4 / 6 and np.isclose(s["macro_f1"], (0.8 + 0.5 + 2 / 3) / 3)


def test_absent_classes_do_not_count_and_empty_is_zero():
    cm = confusion_matrix(np.array([0, 0]), np.array([0, 1]), 3)
    assert np.isclose(summary(cm)["macro_f1"], 2 / 3)  # only class 0 is present: p=1, r=1/2
    assert summary(np.zeros((2, 2), dtype=int)) == {"accuracy": 0.0, "macro_f1": 0.0}
