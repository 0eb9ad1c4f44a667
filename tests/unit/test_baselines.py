"""Linear baselines on a tiny synthetic prepared table (the layout jobs/prepare.py writes)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import sklearn  # noqa: F401  (the test extra installs it; a missing one must fail, not skip)

from raypipe.tools import baselines  # noqa: E402

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220)]
SIZE, LENGTH = 8, 6


def _tensor_field(name: str, value_type: pa.DataType, shape: list[int]) -> pa.Field:
    """A column as Ray Data writes a tensor column (flat values + its shape in the field metadata)."""
    return pa.field(name, pa.large_list(value_type), metadata={
        b"ARROW:extension:metadata": json.dumps(shape).encode(), b"ARROW:extension:name": b"ray.data.arrow_tensor_v2"})


def write_prepared(root, rows_per_class: int = 30, seed: int = 0, image_bytes: bool = True) -> None:
    """Class c: images of colour c (noisy); tokens 10+c (the class word) among shared filler words
    3..5; every 10th row is test, the other 5th rows validation; one failed row per class that must be ignored. Images as prepare
    writes them (one byte string per row), or ``image_bytes=False`` as it did before (a tensor column)."""
    rng = np.random.default_rng(seed)
    images, tokens, labels, splits, statuses = [], [], [], [], []
    for c in range(len(COLOURS)):
        for i in range(rows_per_class + 1):
            pixels = np.clip(np.array(COLOURS[c]) + rng.integers(-40, 40, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
            words = np.zeros(LENGTH, dtype=np.int32)
            words[:4] = [10 + c, *rng.integers(3, 6, 3)]
            failed = i == rows_per_class
            images.append((np.zeros_like(pixels) if failed else pixels).ravel())
            tokens.append(words)
            labels.append(c if not failed else -1)
            splits.append("test" if i % 10 == 0 else "val" if i % 5 == 0 else "train")
            statuses.append("image_decode_error" if failed else "ok")
    image_field = pa.field("image", pa.large_binary()) if image_bytes else _tensor_field("image", pa.uint8(), [SIZE, SIZE, 3])
    schema = pa.schema([image_field, _tensor_field("tokens", pa.int32(), [LENGTH]),
                        pa.field("label_id", pa.int64()), pa.field("split", pa.string()), pa.field("status", pa.string())])
    image_values = [x.tobytes() if image_bytes else x.tolist() for x in images]
    table = pa.Table.from_pydict({"image": image_values, "tokens": [t.tolist() for t in tokens],
                                  "label_id": labels, "split": splits, "status": statuses}, schema)
    (root / "prepared").mkdir(parents=True)
    pq.write_table(table.slice(0, 40), root / "prepared" / "part-0.parquet")
    pq.write_table(table.slice(40), root / "prepared" / "part-1.parquet")
    (root / "classes.json").write_text(json.dumps(["red", "green", "blue"]))


@pytest.mark.parametrize("image_bytes", [True, False], ids=["image bytes", "tensor column"])
def test_load_prepared_keeps_ok_rows_per_split(tmp_path, image_bytes):
    write_prepared(tmp_path, image_bytes=image_bytes)
    splits, classes = baselines.load_prepared(str(tmp_path))
    assert classes == ["red", "green", "blue"]
    assert splits["train"].images.shape == (72, SIZE, SIZE, 3) and splits["val"].images.shape == (9, SIZE, SIZE, 3)
    assert splits["test"].images.shape == (9, SIZE, SIZE, 3)
    assert splits["train"].tokens.shape == (72, LENGTH) and set(splits["val"].labels) == {0, 1, 2}
    assert splits["train"].images.dtype == np.uint8
    red = splits["train"].images[splits["train"].labels == 0].reshape(-1, 3).mean(axis=0)
    assert abs(red[0] - COLOURS[0][0]) < 10 and red[1] < 60  # the pixels themselves, in HWC order


def test_token_counts_drop_padding():
    counts = baselines.token_counts(np.array([[4, 4, 2, 0], [0, 0, 0, 0]]), 6).toarray()
    assert counts.tolist() == [[0, 0, 1, 0, 2, 0], [0] * 6]


def test_baselines_on_separable_modalities(tmp_path):
    write_prepared(tmp_path)
    result = baselines.run_baselines(str(tmp_path), components=10)
    assert result["rows"] == {"train": 72, "val": 9, "test": 9}
    for split in ("val", "test"):
        for name in baselines.BASELINES:
            scores = result["results"][split][name]
            assert scores["accuracy"] == 1.0 and scores["macro_f1"] == 1.0  # each modality names the class here
            assert np.array(scores["confusion"]).sum() == 9
    assert result["settings"]["pca_components"] == 10 and result["settings"]["C_text"] in baselines.CS


def test_cli_writes_the_table(tmp_path, capsys):
    write_prepared(tmp_path / "data")
    assert baselines.main([str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--pca", "5"]) == 0
    assert "| late fusion: mean of the two probabilities | 1.0000 | 1.0000 | 1.0000 | 1.0000 |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "baselines.json").read_text())
    assert set(saved["results"]) == {"val", "test"} and set(saved["results"]["test"]) == set(baselines.BASELINES)
    assert (tmp_path / "out" / "baselines.md").read_text().startswith("| linear baseline |")
