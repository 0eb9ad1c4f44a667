import json

from raypipe.config import PrepareConfig, StorageConfig, dump_config, load_config
from raypipe.io import fs as rfs
from raypipe.pipeline.prepare import CLASSES_FILE, CONFIG_FILE, STATS_FILE, VOCAB_FILE, PreparedOutput
from raypipe.transforms.image import ImageOptions
from raypipe.transforms.text import TextOptions
from raypipe.transforms.vocab import Vocabulary

VOCAB = Vocabulary.from_counts({"cat": 3, "dog": 2, "park": 1})
CLASSES = ("cat", "dog")


def _prepared(tmp_path, overrides: list[str], vocab=VOCAB, classes=CLASSES) -> PreparedOutput:
    cfg = load_config(PrepareConfig, overrides=overrides)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(dump_config(cfg)))
    (tmp_path / VOCAB_FILE).write_text(vocab.to_json())
    (tmp_path / CLASSES_FILE).write_text(json.dumps(list(classes)))
    (tmp_path / STATS_FILE).write_text(json.dumps({"rows_ok": 5}))
    return PreparedOutput.open(rfs.resolve(str(tmp_path), StorageConfig()))


def test_a_prepared_output_reads_back_the_settings_it_was_made_with(tmp_path):
    prepared = _prepared(tmp_path, ["image.size=32", "text.max_len=16"])
    assert prepared.image.size == 32 and prepared.text.max_len == 16
    assert prepared.vocab == VOCAB and prepared.classes == CLASSES and prepared.stats == {"rows_ok": 5}
    assert prepared.differences(VOCAB, CLASSES, prepared.image, prepared.text) == []


def test_every_setting_a_model_would_not_expect_is_named(tmp_path):
    """What evaluate checks before it feeds prepared rows to a bundle's model: all of it, not only the
    vocabulary (other classes would silently scramble the confusion matrix)."""
    prepared = _prepared(
        tmp_path, ["image.size=32", "text.max_len=16"], Vocabulary.from_counts({"cat": 1}), ("dog", "cat")
    )
    found = prepared.differences(VOCAB, CLASSES, ImageOptions(), TextOptions())
    assert found[0].startswith("another vocabulary")
    assert found[1] == "other classes (['dog', 'cat'] here, ['cat', 'dog'] expected)"
    assert found[2:] == ["image.size=32 (expected 64)", "text.max_len=16 (expected 32)"]
