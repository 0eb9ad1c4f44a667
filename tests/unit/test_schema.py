"""Every batch a map stage returns has the declared Arrow schema, whether its optional columns are all
missing, all present or mixed: Ray Data combines a stage's batches into one block, which fails when an
all-null column was inferred as null or float and another batch's as string."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from imagekinds import jpeg_photo

from raypipe import schema
from raypipe.bundle import Bundle, save_bundle
from raypipe.config import StorageConfig
from raypipe.model import FusionClassifier, ModelConfig
from raypipe.pipeline.predict import BundlePredictor
from raypipe.transforms.image import ImageOptions
from raypipe.transforms.pairs import ModelInputPreparer
from raypipe.transforms.split import rows_of_split
from raypipe.transforms.text import TextOptions
from raypipe.transforms.vocab import Vocabulary

VOCAB = Vocabulary(("<pad>", "<unk>", "dog", "cat"))
TEXT = TextOptions(max_len=4, lemmatize=False)
IMAGE = ImageOptions(size=8)
GOOD = jpeg_photo(20, 16)


def objects(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def prepared(messages: list, label_ids: np.ndarray, url: list) -> dict[str, np.ndarray]:
    n = len(messages)
    return {
        schema.KEY: objects([f"k{i}" for i in range(n)]),
        schema.IMAGE: np.zeros((n, 8, 8, 3), np.uint8),
        schema.TOKENS: np.ones((n, 4), np.int32),
        schema.LABEL_ID: label_ids,
        schema.SPLIT: objects(["train"] * n),
        schema.STATUS: objects(["ok" if m is None else "image_decode_error" for m in messages]),
        schema.ERROR_MESSAGE: objects(messages),
        "url": objects(url),
    }


# The three shapes of an optional column, and the float NaN form Ray hands an all-null column on in.
BATCHES = {
    "all missing": prepared([None, None], np.array([0, 1]), [None, None]),
    "all present": prepared(["bad", "worse"], np.array([1, 0]), ["a", "b"]),
    "mixed": prepared([None, "bad"], np.array([0, -1]), ["a", None]),
    "missing as NaN": prepared([np.nan, np.nan], np.array([0.0, np.nan]), [np.nan, np.nan]),
}
URL = {"url": pa.string()}


def test_every_shape_of_an_optional_column_gives_the_declared_schema():
    tables = {name: schema.to_arrow(batch, URL) for name, batch in BATCHES.items()}
    expected = tables["all present"].schema
    assert expected.field(schema.ERROR_MESSAGE).type == pa.string()
    assert expected.field(schema.LABEL_ID).type == pa.int64()
    for name, table in tables.items():
        assert table.schema == expected, name
    combined = pa.concat_tables(tables.values())  # what Ray Data does with a stage's batches
    assert combined.column(schema.ERROR_MESSAGE).to_pylist() == [None, None, "bad", "worse", None, "bad", None, None]
    assert combined.column(schema.LABEL_ID).to_pylist()[-1] is None  # NaN became null, not a number


def test_a_column_without_a_declared_type_is_refused_not_guessed():
    with pytest.raises(KeyError, match="column 'url' has no declared Arrow type"):
        schema.to_arrow(BATCHES["mixed"])
    with pytest.raises(TypeError, match="column 'label_id' does not hold int64 values"):
        schema.to_arrow({schema.LABEL_ID: objects(["seven"])})


def test_json_values_of_a_text_passthrough_column_keep_their_json_text():
    table = schema.to_arrow({"meta": objects([{"w": 3}, "x", None, 4])}, {"meta": pa.string()})
    assert table.column("meta").to_pylist() == ['{"w": 3}', "x", None, "4"]


def test_a_typed_split_stage_gives_one_schema_even_for_an_empty_selection():
    split = schema.Typed(rows_of_split, URL)
    train = split({k: v.copy() for k, v in BATCHES["mixed"].items()}, "train")
    none = split({k: v.copy() for k, v in BATCHES["mixed"].items()}, "val")
    assert none.num_rows == 0 and none.schema == train.schema


@pytest.fixture
def predictor(tmp_path) -> BundlePredictor:
    torch.manual_seed(0)
    config = ModelConfig(num_classes=2, vocab_size=len(VOCAB), image_size=8, conv_channels=(4,), embed_dim=4,
                         lstm_hidden=4, fc_dims=(8,))
    save_bundle(str(tmp_path / "bundle"), StorageConfig(),
                Bundle(config, IMAGE, TEXT, VOCAB, ("x", "y"), FusionClassifier(config).state_dict(), {}))
    return BundlePredictor(str(tmp_path / "bundle"), StorageConfig(), top_k=2, explain_words=2, passthrough=URL)


@pytest.mark.parametrize("images", [[GOOD, GOOD], [None, b"not an image"], [GOOD, None]],
                         ids=["all predicted", "none predicted", "mixed"])
def test_predictions_have_one_schema_whichever_rows_fail(predictor, images):
    batch = {
        schema.KEY: objects(["a", "b"]), schema.IMAGE: objects(images), schema.TEXT: objects(["dog", "cat"]),
        schema.SOURCE: objects(["/in/x.parquet"] * 2), **schema.new_status_columns(2),
        "url": objects([None, None]),
    }
    table = predictor(ModelInputPreparer(IMAGE, TEXT, VOCAB.token_to_id, "fusion")(batch))
    reference = predictor(ModelInputPreparer(IMAGE, TEXT, VOCAB.token_to_id, "fusion")(
        {**batch, schema.IMAGE: objects([GOOD, GOOD]), "url": objects(["u", "v"]),
         **schema.new_status_columns(2)}
    ))
    assert table.schema == reference.schema
    assert table.schema.field(schema.TOP_K_SCORES).type == pa.list_(pa.float32())
    predicted = [p is not None for p in table.column(schema.PREDICTED).to_pylist()]
    assert predicted == [image is GOOD for image in images]
