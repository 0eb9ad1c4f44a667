"""The pure parts of the labeling job (no Ray): model inputs per mode, output rows, per-file writes,
completeness of an output, explain words, config."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from imagekinds import jpeg_photo

from raypipe import schema
from raypipe.bundle import Bundle, save_bundle
from raypipe.config import ConfigError, LabelJobConfig, StorageConfig, load_config
from raypipe.io.fs import resolve
from raypipe.io.readers import plan_inputs
from raypipe.model import FusionClassifier, ModelConfig
from raypipe.pipeline import predict
from raypipe.io.per_input import InputFile, input_files, output_state
from raypipe.pipeline.label import check_output, summary_lines
from raypipe.io.per_input import output_names
from raypipe.pipeline.label_writer import output_schema, to_output_table, write_label_batch
from raypipe.transforms.image import ImageOptions
from raypipe.transforms.pairs import ModelInputPreparer, PairPreparer
from raypipe.transforms.split import SplitRule
from raypipe.transforms.text import TextOptions
from raypipe.transforms.vocab import Vocabulary

VOCAB = Vocabulary(("<pad>", "<unk>", "dog", "cat", "red", "car"))
TEXT = TextOptions(max_len=8, lemmatize=False)
IMAGE = ImageOptions(size=16)


def pairs(images, texts) -> dict[str, np.ndarray]:
    n = len(texts)
    image = np.empty(n, dtype=object)
    image[:] = images
    return {
        schema.KEY: np.array([f"k{i}" for i in range(n)], dtype=object),
        schema.IMAGE: image,
        schema.TEXT: np.array(texts, dtype=object),
        schema.SOURCE: np.full(n, "/in/a.parquet", dtype=object),
        **schema.new_status_columns(n),
    }


GOOD = jpeg_photo(40, 30)


def test_fusion_needs_both_inputs_and_reports_missing_text():
    batch = ModelInputPreparer(IMAGE, TEXT, VOCAB.token_to_id, "fusion")(
        pairs([GOOD, b"not an image", None, GOOD, GOOD], ["red dog", "a cat", "car", "", "!!! 42"])
    )
    assert list(batch[schema.STATUS]) == ["ok", "image_decode_error", "missing_image", "missing_text", "missing_text"]
    assert "text is empty" in batch[schema.ERROR_MESSAGE][3] and "'!!! 42'" in batch[schema.ERROR_MESSAGE][4]
    assert batch[schema.IMAGE].shape == (5, 16, 16, 3) and batch[schema.TOKENS].shape == (5, 8)
    assert list(batch[schema.TOKENS][0][:2]) == [4, 2] and list(batch[schema.LABEL_ID]) == [-1] * 5


def test_text_model_ignores_images_and_image_model_ignores_text():
    rows = pairs([b"not an image", None, GOOD], ["red dog", "cat", ""])
    rows[schema.STATUS][1], rows[schema.ERROR_MESSAGE][1] = "not_downloaded", "img2dataset status 'failed_to_download'"
    text = ModelInputPreparer(IMAGE, TEXT, VOCAB.token_to_id, "text")({k: v.copy() for k, v in rows.items()})
    assert list(text[schema.STATUS]) == ["ok", "ok", "missing_text"]
    assert not text[schema.IMAGE].any()  # never decoded
    image = ModelInputPreparer(IMAGE, TEXT, VOCAB.token_to_id, "image")({k: v.copy() for k, v in rows.items()})
    assert list(image[schema.STATUS]) == ["image_decode_error", "not_downloaded", "ok"]


def test_pair_preparer_is_unchanged_for_prepare_and_train():
    batch = PairPreparer(IMAGE, TEXT, VOCAB.token_to_id, None, SplitRule())(pairs([GOOD], [""]))
    assert list(batch[schema.STATUS]) == ["ok"]  # an empty caption is not an error when preparing


def test_output_names_are_stems_made_unique():
    names = output_names(["b/in/x.parquet", "b/in/y.parquet", "b/other/x.parquet"])
    assert names["b/in/y.parquet"] == "y"
    assert names["b/in/x.parquet"] != names["b/other/x.parquet"] and names["b/in/x.parquet"].startswith("x-")
    assert output_names(["b/in/x.parquet", "b/other/x.parquet"]) == output_names(["b/in/x.parquet", "b/other/x.parquet"])


def predicted_table() -> pa.Table:
    return pa.table({
        schema.KEY: ["k0", "k1"],
        "url": pa.array([None, None], pa.null()),  # a passthrough column null in a whole batch
        schema.SOURCE: ["in/a.parquet", "in/b.parquet"],
        schema.STATUS: ["ok", "image_decode_error"],
        schema.ERROR_MESSAGE: pa.array([None, "bad"], pa.string()),
        predict.PREDICTED_ID: pa.array([1, None], pa.int64()),
        predict.PREDICTED: pa.array(["b", None], pa.string()),
        predict.CONFIDENCE: pa.array([0.7, None], pa.float32()),
        predict.TOP_K_LABELS: pa.array([["b", "a"], None], pa.list_(pa.string())),
        predict.TOP_K_SCORES: pa.array([[0.7, 0.3], None], pa.list_(pa.float32())),
    })


def test_output_table_follows_the_labeling_contract():
    out_schema = output_schema({"url": pa.large_string()}, explain=True)
    table = to_output_table(predicted_table(), out_schema, "abc123")
    assert table.column_names == [
        "key", "url", "label", "label_id", "confidence", "top_k_labels", "top_k_scores", "status", "error_message",
        "model", "source", "attention_words", "attention_weights",
    ]
    assert table.schema.field("url").type == pa.large_string()  # the input's own type, not null
    row = table.to_pylist()[0]
    assert (row["label"], row["label_id"], row["model"], row["top_k_labels"]) == ("b", 1, "abc123", ["b", "a"])
    assert table.to_pylist()[1]["label"] is None and table.to_pylist()[1]["status"] == "image_decode_error"
    assert table.column("attention_words").null_count == 2


def test_nullable_integer_passthrough_keeps_its_type():
    table = predicted_table().set_column(1, "url", pa.array([7.0, float("nan")]))  # how Ray hands int + null over
    out = to_output_table(table, output_schema({"url": pa.int64()}, explain=False), "abc")
    assert out.column("url").type == pa.int64() and out.column("url").to_pylist() == [7, None]


def test_write_label_batch_writes_each_source_to_its_own_directory(tmp_path):
    out = resolve(str(tmp_path / "out"), StorageConfig())
    names = {"in/a.parquet": "a", "in/b.parquet": "b"}
    counts = write_label_batch(predicted_table(), out, names, output_schema({"url": None}, False), "abc").to_pylist()
    assert counts == [{"name": "a", "rows": 1, "ok": 1}, {"name": "b", "rows": 1, "ok": 0}]
    (part_a,) = (tmp_path / "out" / "a").iterdir()
    assert part_a.name.startswith("part-") and pq.read_table(part_a).column("key").to_pylist() == ["k0"]
    assert pq.read_table(part_a).schema.field("url").type == pa.string()  # all-null column stored as string


def test_completeness_needs_every_key_exactly_once(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    pq.write_table(pa.table({"id": [1, 2, 3], "image": pa.array([b"x"] * 3), "alt": ["a", "b", "c"]}), inputs / "a.parquet")
    cfg = load_config(LabelJobConfig, None, [f"data.input={inputs}", "data.format=parquet", "data.key_column=id",
                                             "data.image_column=image", "data.text_column=alt"])
    plan = plan_inputs(cfg.data, cfg.storage, ())
    (item,) = input_files(plan)
    assert isinstance(item, InputFile) and (item.name, item.expected_rows) == ("a", 3)
    out = resolve(str(tmp_path / "out"), StorageConfig())

    def check() -> bool:
        return check_output(plan, out, item)[1]

    def part(keys: list[str]) -> pa.Table:
        return pa.table({"key": keys, "status": ["ok"] * len(keys)})

    (tmp_path / "out" / "a").mkdir(parents=True)
    assert not check()  # nothing yet
    pq.write_table(part(["1", "2"]), tmp_path / "out" / "a" / "part-1.parquet")
    assert not check()  # a gap
    pq.write_table(part(["2"]), tmp_path / "out" / "a" / "part-2.parquet")
    assert not check()  # right count, but a duplicate and a gap
    (tmp_path / "out" / "a" / "part-2.parquet").unlink()
    pq.write_table(part(["3"]), tmp_path / "out" / "a" / "part-2.parquet")
    assert check() and check_output(plan, out, item)[2] == {"ok": 3}
    (tmp_path / "out" / "a" / "part-3.parquet").write_bytes(b"PAR1 truncated")  # a write cut short
    assert not output_state(out, "a").readable and not check()


def test_explain_reports_the_most_attended_vocabulary_words(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(num_classes=2, vocab_size=len(VOCAB), image_size=16, conv_channels=(4,), embed_dim=4,
                         lstm_hidden=4, fc_dims=(8,))
    model = FusionClassifier(config)
    save_bundle(str(tmp_path / "bundle"), StorageConfig(),
                Bundle(config, IMAGE, TEXT, VOCAB, ("x", "y"), model.state_dict(), {}))
    batch = ModelInputPreparer(IMAGE, TEXT, VOCAB.token_to_id, "fusion")(
        pairs([GOOD, None, GOOD], ["red dog zebra", "cat", "car"])
    )
    plain = predict.BundlePredictor(str(tmp_path / "bundle"), StorageConfig(), top_k=2)
    explained = predict.BundlePredictor(str(tmp_path / "bundle"), StorageConfig(), top_k=2, explain_words=2)
    without = plain({k: v.copy() for k, v in batch.items()})
    table = explained({k: v.copy() for k, v in batch.items()})
    assert predict.ATTENTION_WORDS not in without.column_names  # evaluate's behaviour is unchanged
    assert table.column(predict.PREDICTED_ID).to_pylist() == without.column(predict.PREDICTED_ID).to_pylist()
    words = table.column(predict.ATTENTION_WORDS).to_pylist()
    weights = table.column(predict.ATTENTION_WEIGHTS).to_pylist()
    assert set(words[0]) <= {"red", "dog", "<unk>"} and len(words[0]) == 2 and words[1] is None
    assert words[2] == ["car"] and weights[2] == [pytest.approx(1.0)]
    assert weights[0][0] >= weights[0][1]


@pytest.mark.parametrize("mode", ["fusion", "image", "text"])
def test_a_batch_run_in_cpu_chunks_predicts_what_one_forward_pass_does(tmp_path, mode):
    torch.manual_seed(0)
    config = ModelConfig(num_classes=3, vocab_size=len(VOCAB), mode=mode, image_size=16, conv_channels=(4,),
                         embed_dim=4, lstm_hidden=4, fc_dims=(8,))
    model = FusionClassifier(config).eval()
    save_bundle(str(tmp_path / "bundle"), StorageConfig(),
                Bundle(config, IMAGE, TEXT, VOCAB, ("x", "y", "z"), model.state_dict(), {}))
    rng = np.random.default_rng(0)
    n = 2 * predict.CPU_CHUNK_ROWS + 7  # two whole chunks and a partial one
    words = ["dog", "cat", "red", "car", "zebra"]
    texts = [" ".join(rng.choice(words, size=rng.integers(1, 9))) for _ in range(n)]
    photos = [jpeg_photo(40 + i % 7, 30 + i % 5) for i in range(n)]
    batch = ModelInputPreparer(IMAGE, TEXT, VOCAB.token_to_id, mode)(pairs(photos, texts))
    table = predict.BundlePredictor(str(tmp_path / "bundle"), StorageConfig(), top_k=3,
                                    explain_words=8)({k: v.copy() for k, v in batch.items()})
    with torch.inference_mode():
        logits, attention = model.forward_with_attention(
            torch.from_numpy(batch[schema.IMAGE]), torch.from_numpy(batch[schema.TOKENS]).long()
        )
    scores, ids = torch.softmax(logits, dim=1).topk(3, dim=1)
    assert table.column(predict.PREDICTED_ID).to_pylist() == ids[:, 0].tolist()
    np.testing.assert_allclose(np.array(table.column(predict.TOP_K_SCORES).to_pylist()), scores.numpy(), atol=1e-6)
    if mode != "image":
        for reported, row in zip(table.column(predict.ATTENTION_WEIGHTS).to_pylist(), attention.numpy()):
            np.testing.assert_allclose(reported, sorted(row[row > 0], reverse=True), atol=1e-6)


def test_label_config_defaults_and_checks():
    cfg = load_config(LabelJobConfig, None, [])
    assert cfg.labels.source == "none" and cfg.predict.use_gpu is None and not cfg.overwrite
    with pytest.raises(ConfigError, match="clash with output columns"):
        load_config(LabelJobConfig, None, ["data.keep_columns=[status]"])
    with pytest.raises(ConfigError, match="data.limit is not supported"):
        load_config(LabelJobConfig, None, ["data.limit=10"])

    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name}"
            if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields"):
                walk(field.annotation)

    walk(LabelJobConfig)


def test_expected_rows_of_img2dataset_tars_come_from_the_parquet_beside_them(tmp_path):
    from raypipe.config import DataConfig
    from raypipe.io.per_input import input_keys
    from raypipe.datasets.sample import SampleSpec, write_sample

    write_sample(str(tmp_path / "s"), SampleSpec(num_pairs=30, shard_size=20, image_size=(16, 16), failed_fraction=0.2),
                 formats=("webdataset",))
    plan = plan_inputs(DataConfig(input=[str(tmp_path / "s" / "webdataset")]), StorageConfig(), ())
    items = input_files(plan)
    assert [(i.name, i.expected_rows) for i in items] == [("00000", 20), ("00001", 10)]
    assert all(i.metadata and i.metadata.endswith(".parquet") for i in items)
    assert sum(input_keys(plan, items[0]).values()) == 20  # failed downloads included
    # Without img2dataset's .parquet, the tar's own samples are counted (failed downloads are not in it).
    (tmp_path / "s" / "webdataset" / "00001.parquet").unlink()
    plan = plan_inputs(DataConfig(input=[str(tmp_path / "s" / "webdataset")]), StorageConfig(), ())
    bare = input_files(plan)[1]
    assert bare.metadata is None and 0 < bare.expected_rows <= 10
    assert sum(input_keys(plan, bare).values()) == bare.expected_rows


def test_summary_lines_name_what_is_incomplete():
    summary = {
        "rows_processed": 10, "elapsed_s": 2.0, "pairs_per_s": 5.0, "mode": "fusion", "model": "abc", "output": "/o",
        "files": {"total": 2, "labeled": 1, "skipped_complete": 1, "incomplete": ["/in/b.parquet"]},
        "rows_in": 20, "rows_out": 15, "rows_labeled": 12, "by_status": {"ok": 12, "missing_text": 3},
        "duplicate_keys": 0,
    }
    text = "\n".join(summary_lines(summary))
    assert "missing_text: 3" in text and "INCOMPLETE: /in/b.parquet" in text and "5.0 pairs/s" in text
    assert "duplicate keys" not in text
    text = "\n".join(summary_lines(summary | {"duplicate_keys": 2}))
    assert "duplicate keys: 2 rows share their key with an earlier row of the same input file" in text
