from pathlib import Path

import pytest

from raypipe.config import AblationConfig, ConfigError, PrepareConfig, flat_config, load_config, parse_override

REPO = Path(__file__).resolve().parents[2]


def test_defaults_validate_and_every_field_has_a_description():
    cfg = load_config(PrepareConfig)
    assert cfg.image.size == 64 and (cfg.split.val_fraction, cfg.split.test_fraction) == (0.1, 0.1)

    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation)

    walk(PrepareConfig)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  input: s3://a/b\nimage:\n  size: 32\n")
    cfg = load_config(PrepareConfig, path, ["image.size=48", "data.keep_columns=[id, url]", "text.stem=true"])
    assert cfg.data.input == ["s3://a/b"]
    assert cfg.image.size == 48
    assert cfg.data.keep_columns == ["id", "url"]
    assert cfg.text.stem is True


def test_override_value_keeps_urls_as_text():
    assert parse_override("data.input=s3://bucket/x/*.tar") == (["data", "input"], "s3://bucket/x/*.tar")
    assert parse_override("output=gs://b/p:q") == (["output"], "gs://b/p:q")


def test_unknown_key_names_field_and_suggests():
    with pytest.raises(ConfigError, match="data.inptu: unknown key") as e:
        load_config(PrepareConfig, None, ["data.inptu=x"])
    msg = str(e.value)
    assert "data.inptu: unknown key" in msg and "did you mean 'input'" in msg and "keep_columns" in msg


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match="image.resize_mode") as e:
        load_config(PrepareConfig, None, ["image.resize_mode=squash"])
    msg = str(e.value)
    assert "image.resize_mode" in msg and "'stretch'" in msg and "'center_crop'" in msg and "squash" in msg


def test_bad_number_names_field():
    with pytest.raises(ConfigError, match=r"split.val_fraction"):
        load_config(PrepareConfig, None, ["split.val_fraction=1.5"])


def test_malformed_override_and_file(tmp_path):
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(PrepareConfig, None, ["justaword"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(PrepareConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(PrepareConfig, bad)


def test_coyo_labels_need_a_class_list():
    with pytest.raises(ConfigError, match="labels.classes is required"):
        load_config(PrepareConfig, None, ["labels.source=coyo_labeled"])


# Every shipped YAML and the job it is for: each must validate, so an example cannot drift from the models.
SHIPPED_CONFIGS = {"ingest.yaml": "IngestConfig", "prepare.yaml": "PrepareConfig", "train.yaml": "TrainConfig",
                   "label.yaml": "LabelJobConfig", "paper.yaml": "AblationConfig"}


def test_every_shipped_config_validates_against_its_job():
    import raypipe.config as config_module

    shipped = {p.name for p in (REPO / "jobs" / "configs").glob("*.yaml")}
    assert shipped == set(SHIPPED_CONFIGS), "a YAML under jobs/configs/ is not listed here (or one is gone)"
    for name, model in SHIPPED_CONFIGS.items():
        load_config(getattr(config_module, model), str(REPO / "jobs" / "configs" / name), [])


def test_the_paper_preset_is_the_papers_model_schedule_and_split():
    cfg = load_config(AblationConfig, str(REPO / "jobs" / "configs" / "paper.yaml"), [])
    assert (cfg.model.image_pool, cfg.model.fusion_head, cfg.model.aux_heads, cfg.model.modality_dropout) == (
        "flatten", "mlp", False, 0.0)
    assert not cfg.model.text_linear
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.optim.epochs, cfg.optim.augment) == (0.001, 32, 100, False)
    assert (cfg.optim.early_stopping_patience, cfg.optim.best_epoch_by) == (None, "val_accuracy")
    assert (cfg.split.val_fraction, cfg.split.test_fraction, cfg.evaluate_split) == (0.2, 0.0, "val")


def test_a_dumped_config_flattens_to_the_keys_of_its_overrides():
    assert flat_config({"run": {"name": "r1", "num_to_keep": 2}, "model": {"conv_channels": [8, 16]}, "x": None}) == {
        "run.name": "r1", "run.num_to_keep": "2", "model.conv_channels": "[8, 16]", "x": "null"}
