"""A crafted model bundle cannot run code, and no config value can place outputs outside their folder."""

from __future__ import annotations

import io
import posixpath
import re
from pathlib import Path

import pytest
import torch
import yaml
from jobscript import assert_one_clear_line, run_script
from tiny import write_bundle

from raypipe.bundle import WEIGHTS, BundleError, load_bundle
from raypipe.config import FOLDER_NAME_PATTERN, AblationConfig, ConfigError, StorageConfig, TrainConfig, load_config
from raypipe.pipeline.ablation import planned_runs
from raypipe.io.per_input import output_names
from raypipe.pipeline.predict import BundlePredictor
from raypipe.formats.img2dataset import shard_name


class CreatesFile:
    """Unpickling this creates ``path``: a stand-in for any code a crafted pickle could run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return exec, (f"open({str(self.path)!r}, 'w').close()",)


def crafted_weights(marker: Path) -> bytes:
    """What torch.save writes for a "state_dict" whose value runs code when loaded."""
    buffer = io.BytesIO()
    torch.save({"cnn.0.weight": CreatesFile(marker)}, buffer)
    return buffer.getvalue()


@pytest.fixture
def crafted_bundle(tmp_path) -> tuple[str, Path]:
    """A real bundle whose model.pt was replaced by a crafted pickle; and the file it would create."""
    url = str(tmp_path / "bundle")
    write_bundle(url)
    marker = tmp_path / "code-ran"
    Path(url, WEIGHTS).write_bytes(crafted_weights(marker))
    return url, marker


def test_the_crafted_weights_would_run_code_if_unpickled(tmp_path):
    """The payload is live: a plain unpickle (weights_only=False) runs it."""
    marker = tmp_path / "control"
    torch.load(io.BytesIO(crafted_weights(marker)), weights_only=False)
    assert marker.exists()


def test_a_crafted_bundle_is_refused_and_runs_nothing(crafted_bundle):
    url, marker = crafted_bundle
    for load in (lambda: load_bundle(url, StorageConfig()), lambda: BundlePredictor(url, StorageConfig())):
        with pytest.raises(BundleError, match="holds more than plain tensors") as e:
            load()
        assert f"{url}/{WEIGHTS} holds more than plain tensors" in str(e.value)
        assert "refused, since loading it could run code" in str(e.value)
        assert "weights_only=False" not in str(e.value)  # torch's own advice is not passed on
    assert not marker.exists()


def test_the_label_job_refuses_a_crafted_bundle_in_one_line(crafted_bundle, tmp_path):
    url, marker = crafted_bundle
    done, _ = run_script("label", f"bundle={url}", f"data.input={tmp_path}", f"output={tmp_path / 'labels'}")
    assert_one_clear_line(done, url, "holds more than plain tensors")
    assert not marker.exists()


# --- config values that become path components -------------------------------------------------

ESCAPING_NAMES = ["../escape", "..", ".", "/etc/cron.d", "runs/r1", "r1/", "..\\r1", "a\\b", "~root", "-r1", "",
                  "r" * 129, "r1\n", "r 1"]


def stays_inside(name: str) -> bool:
    """``name`` used as one folder under /out names a folder directly under /out."""
    return posixpath.dirname(posixpath.normpath(posixpath.join("/out", name))) == "/out" and "\\" not in name


@pytest.mark.parametrize("config", [TrainConfig, AblationConfig])
@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_a_run_name_that_is_not_one_folder_name_is_refused(config, name, tmp_path):
    path = tmp_path / "config.yaml"  # YAML keeps every name exactly (an override would strip "r1\n")
    path.write_text(yaml.safe_dump({"run": {"name": name}}))
    with pytest.raises(ConfigError, match="run.name: Value error, must be a single folder name") as e:
        load_config(config, path)
    message = str(e.value)
    assert "run.name: Value error, must be a single folder name" in message
    assert "becomes part of the output path" in message


@pytest.mark.parametrize("name", ["r1", "coyo-fusion.v2", "A_b-3", "a..b", "r" * 128])
def test_ordinary_run_names_are_kept(name):
    assert load_config(TrainConfig, None, [f"run.name={name}"]).run.name == name
    assert stays_inside(name)


def test_names_derived_from_a_valid_config_stay_inside():
    """Ablation run names (and its evaluation/<run> folders) come from run.name, a mode and a seed."""
    cfg = load_config(AblationConfig, None, ["run.name=abl", "seeds=[-3, 0, 12]"])
    assert all(stays_inside(name) for _, _, name in planned_runs(cfg))
    assert all(re.fullmatch(FOLDER_NAME_PATTERN, name) for _, _, name in planned_runs(cfg))
    assert all(stays_inside(shard_name(shard)) for shard in (0, 7, 10**6))  # ingest: {shard:05d}.parquet


def test_label_output_folders_stay_inside_whatever_the_input_keys():
    """One output folder per input file, named after it; object stores allow keys like "in/..", which
    a glob (s3://bucket/in/*) or an explicit URL lists."""
    files = ["bkt/in/..", "bkt/in/.", "bkt/in/../x.parquet", "bkt/in/a/..parquet", "bkt/in/.parquet",
             "bkt/in/x.parquet", "bkt/other/x.parquet"]
    names = output_names(files)
    assert all(stays_inside(name) for name in names.values()), names
    assert len(set(names.values())) == len(files)  # and none is shared
